//! Persistent dirty bitmaps: the bitmap directory, bitmap table entries and
//! the serialized bitmap data layout.
//!
//! The directory is a run of variable-length entries (a 24-byte fixed part,
//! extra data, the name, padding to 8 bytes); every length is checked
//! against the bytes present before it is used, and every entry against
//! QEMU's constraints (`check_dir_entry` in `block/qcow2-bitmap.c`), with
//! QEMU's messages. Bitmap data is stored as QEMU serializes it: bit `i` of
//! the bitmap (guest bytes `i << granularity_bits ..`) is bit `i % 8` of
//! byte `i / 8`, one cluster of those bytes per bitmap table entry.

use crate::error::FormatError;
use crate::limits::{
    BITMAP_DIR_ENTRY_HEADER, MAX_BITMAPS, MAX_BITMAP_DIRECTORY_BYTES, MAX_BITMAP_GRANULARITY_BITS, MAX_BITMAP_NAME,
    MAX_BITMAP_PHYS_BYTES, MAX_BITMAP_TABLE_ENTRIES, MIN_BITMAP_GRANULARITY_BITS,
};

/// Directory entry flag: the bitmap was in use (opened read-write) and its
/// stored data may be stale.
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Directory entry flag: the bitmap records guest writes ("enabled").
pub const FLAG_AUTO: u32 = 1 << 1;
/// Flags QEMU does not accept (it treats `extra_data_compatible` as
/// reserved too, since it supports no extra data).
pub const RESERVED_FLAGS: u32 = 0xffff_fffc;
/// The only bitmap type: dirty tracking.
pub const TYPE_DIRTY_TRACKING: u8 = 1;

/// Reserved bits of a bitmap table entry (1..=8 and 56..=63).
const TABLE_ENTRY_RESERVED: u64 = 0xff00_0000_0000_01fe;
/// Host offset bits of a bitmap table entry.
const TABLE_ENTRY_OFFSET: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 0 of a table entry without an offset: that part of the bitmap is all ones.
const TABLE_ENTRY_ALL_ONES: u64 = 1;

/// One bitmap directory entry (without extra data: QEMU refuses it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapDirEntry {
    /// Host offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// log2 of the bytes one bit covers.
    pub granularity_bits: u8,
    /// The name (not NUL-terminated on disk).
    pub name: String,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn err(msg: impl Into<String>) -> FormatError {
    FormatError::Bitmap(msg.into())
}

/// Bytes a directory entry with this name and extra data occupies.
pub fn dir_entry_size(name_len: usize, extra_len: usize) -> u64 {
    ((BITMAP_DIR_ENTRY_HEADER + name_len + extra_len) as u64).div_ceil(8) * 8
}

/// Bytes of a bitmap over `len` guest bytes (QEMU's `get_bitmap_bytes_needed`).
pub fn bytes_needed(len: u64, granularity_bits: u8) -> u64 {
    let bits = len.div_ceil(1u64 << granularity_bits);
    bits.div_ceil(8)
}

/// Entries of the bitmap table of a bitmap over `len` guest bytes: one per
/// cluster of serialized bitmap data (QEMU serializes in 64-bit words).
pub fn table_entries(len: u64, granularity_bits: u8, cluster_size: u64) -> u64 {
    let bits = len.div_ceil(1u64 << granularity_bits);
    (bits.div_ceil(64) * 8).div_ceil(cluster_size)
}

/// Guest bytes one cluster of serialized bitmap data covers.
pub fn cluster_coverage(granularity_bits: u8, cluster_size: u64) -> u64 {
    (cluster_size * 8) << granularity_bits
}

impl BitmapDirEntry {
    /// Bytes this entry occupies in the directory.
    pub fn size(&self) -> u64 {
        dir_entry_size(self.name.len(), 0)
    }

    /// Whether the in-use flag is set.
    pub fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }

    /// Whether the auto (enabled) flag is set.
    pub fn auto(&self) -> bool {
        self.flags & FLAG_AUTO != 0
    }

    /// QEMU's `check_dir_entry` for an image of `image_len` guest bytes.
    fn satisfies_constraints(&self, type_: u8, cluster_size: u64, image_len: u64) -> bool {
        let basic = self.table_size != 0
            && self.table_offset != 0
            && self.table_offset % cluster_size == 0
            && self.table_size <= MAX_BITMAP_TABLE_ENTRIES
            && (MIN_BITMAP_GRANULARITY_BITS..=MAX_BITMAP_GRANULARITY_BITS).contains(&u32::from(self.granularity_bits))
            && self.flags & RESERVED_FLAGS == 0
            && self.name.len() <= MAX_BITMAP_NAME
            && type_ == TYPE_DIRTY_TRACKING;
        if !basic {
            return false;
        }
        let phys = u64::from(self.table_size) * cluster_size;
        if phys > MAX_BITMAP_PHYS_BYTES {
            return false;
        }
        // A consistent bitmap's table must cover the whole disk; a stale
        // one (in use) may have the size of an older disk.
        self.in_use() || image_len <= (phys * 8) << self.granularity_bits
    }

    /// Appends the entry as QEMU writes it.
    fn write_to(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.table_offset.to_be_bytes());
        out.extend_from_slice(&self.table_size.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.push(TYPE_DIRTY_TRACKING);
        out.push(self.granularity_bits);
        out.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.resize(start + self.size() as usize, 0);
    }
}

/// Parses a bitmap directory of `nb_bitmaps` entries occupying exactly
/// `dir_len` bytes (the header extension's `bitmap_directory_size`), as
/// QEMU's `bitmap_list_load` does, with its messages. `buf` holds its
/// first bytes; the rest reads as zeros, as QEMU reads a directory that
/// runs past the end of the file (the first entry wholly past `buf` is then
/// all zeros and fails, so a hostile size costs no allocation).
pub fn parse_directory(
    buf: &[u8],
    dir_len: u64,
    nb_bitmaps: u32,
    cluster_size: u64,
    image_len: u64,
) -> Result<Vec<BitmapDirEntry>, FormatError> {
    if dir_len == 0 {
        return Err(err("Requested bitmap directory size is zero"));
    }
    if dir_len > MAX_BITMAP_DIRECTORY_BYTES {
        return Err(err("Requested bitmap directory size is too big"));
    }
    let len = dir_len as usize;
    let byte = |i: usize| buf.get(i).copied().unwrap_or(0);
    let broken = || err("Broken bitmap directory");
    let mut entries = Vec::new();
    let mut pos = 0usize;
    while pos < len {
        if pos + BITMAP_DIR_ENTRY_HEADER > len {
            return Err(broken());
        }
        if entries.len() as u64 >= u64::from(nb_bitmaps) {
            return Err(err("More bitmaps found than specified in header extension"));
        }
        let mut e = [0u8; BITMAP_DIR_ENTRY_HEADER];
        for (k, b) in e.iter_mut().enumerate() {
            *b = byte(pos + k);
        }
        let table_offset = be64(&e, 0);
        let table_size = be32(&e, 8);
        let flags = be32(&e, 12);
        let type_ = e[16];
        let granularity_bits = e[17];
        let name_size = usize::from(be16(&e, 18));
        let extra = be32(&e, 20) as usize;
        let size = dir_entry_size(name_size, extra);
        if pos as u64 + size > len as u64 {
            return Err(broken());
        }
        if extra != 0 {
            return Err(err("Bitmap extra data is not supported"));
        }
        // QEMU copies the name with g_strndup: it ends at a NUL.
        let name_bytes: Vec<u8> =
            (0..name_size).map(|k| byte(pos + BITMAP_DIR_ENTRY_HEADER + k)).take_while(|&b| b != 0).collect();
        let name = String::from_utf8_lossy(&name_bytes).into_owned();
        let entry = BitmapDirEntry { table_offset, table_size, flags, granularity_bits, name };
        if !entry.satisfies_constraints(type_, cluster_size, image_len) {
            return Err(err(format!("Bitmap '{}' doesn't satisfy the constraints", entry.name)));
        }
        entries.push(entry);
        pos += size as usize;
    }
    if entries.len() as u64 != u64::from(nb_bitmaps) {
        return Err(err("Less bitmaps found than specified in header extension"));
    }
    Ok(entries)
}

/// Serializes a directory as QEMU's `bitmap_list_store` writes it,
/// checking every entry against the same constraints.
pub fn serialize_directory(
    entries: &[BitmapDirEntry],
    cluster_size: u64,
    image_len: u64,
) -> Result<Vec<u8>, FormatError> {
    if entries.is_empty() || entries.len() > MAX_BITMAPS as usize {
        return Err(err(format!("cannot store a bitmap directory of {} entries", entries.len())));
    }
    let size: u64 = entries.iter().map(BitmapDirEntry::size).sum();
    if size > MAX_BITMAP_DIRECTORY_BYTES {
        return Err(err("Bitmap directory is too large"));
    }
    let mut out = Vec::with_capacity(size as usize);
    for e in entries {
        if !e.satisfies_constraints(TYPE_DIRTY_TRACKING, cluster_size, image_len) {
            return Err(err(format!("Bitmap '{}' doesn't satisfy the constraints", e.name)));
        }
        e.write_to(&mut out);
    }
    Ok(out)
}

/// A bitmap table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BitmapTableEntry {
    /// That part of the bitmap is all zeros.
    Zeros,
    /// That part of the bitmap is all ones.
    Ones,
    /// That part of the bitmap is stored in the cluster at this host offset.
    Data(u64),
}

impl BitmapTableEntry {
    /// Decodes a raw entry as QEMU's `check_table_entry` accepts it.
    pub fn parse(raw: u64, cluster_size: u64) -> Result<Self, FormatError> {
        let bad = |reason| FormatError::InvalidEntry { table: "Bitmap table", entry: raw, reason };
        if raw & TABLE_ENTRY_RESERVED != 0 {
            return Err(bad("reserved bits are set"));
        }
        let offset = raw & TABLE_ENTRY_OFFSET;
        if offset == 0 {
            return Ok(if raw & TABLE_ENTRY_ALL_ONES != 0 { Self::Ones } else { Self::Zeros });
        }
        if raw & TABLE_ENTRY_ALL_ONES != 0 {
            return Err(bad("the all-ones flag is set on an entry with an offset"));
        }
        if offset % cluster_size != 0 {
            return Err(bad("the data offset is not cluster aligned"));
        }
        Ok(Self::Data(offset))
    }

    /// The raw entry.
    pub fn raw(self) -> u64 {
        match self {
            Self::Zeros => 0,
            Self::Ones => TABLE_ENTRY_ALL_ONES,
            Self::Data(offset) => offset,
        }
    }
}

/// Checks a new bitmap against QEMU's `check_constraints_on_bitmap` for an
/// image of `image_len` guest bytes, with its messages.
pub fn check_new_bitmap(name: &str, granularity: u64, cluster_size: u64, image_len: u64) -> Result<(), String> {
    let bits = granularity.trailing_zeros();
    if bits > MAX_BITMAP_GRANULARITY_BITS {
        return Err(format!("Granularity exceeds maximum ({} bytes)", 1u64 << MAX_BITMAP_GRANULARITY_BITS));
    }
    if bits < MIN_BITMAP_GRANULARITY_BITS {
        return Err(format!("Granularity is under minimum ({} bytes)", 1u64 << MIN_BITMAP_GRANULARITY_BITS));
    }
    let bytes = bytes_needed(image_len, bits as u8);
    if bytes > MAX_BITMAP_PHYS_BYTES || bytes > u64::from(MAX_BITMAP_TABLE_ENTRIES) * cluster_size {
        return Err("Too much space will be occupied by the bitmap. Use larger granularity".into());
    }
    if name.len() > MAX_BITMAP_NAME {
        return Err(format!("Name length exceeds maximum ({MAX_BITMAP_NAME} characters)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, flags: u32) -> BitmapDirEntry {
        BitmapDirEntry { table_offset: 0x30000, table_size: 1, flags, granularity_bits: 16, name: name.into() }
    }

    #[test]
    fn directory_round_trips_with_qemu_padding() {
        let entries = vec![entry("b0", FLAG_AUTO), entry("a-longer-name", FLAG_IN_USE)];
        let bytes = serialize_directory(&entries, 65536, 64 << 20).unwrap();
        assert_eq!(bytes.len(), 32 + 40);
        assert_eq!(&bytes[24..26], b"b0");
        assert_eq!(bytes[16], 1);
        assert_eq!(parse_directory(&bytes, bytes.len() as u64, 2, 65536, 64 << 20).unwrap(), entries);
    }

    /// A directory cut by the end of the file reads as zeros past the cut,
    /// as QEMU reads it: a cut name ends there, and the first entry
    /// wholly past the cut is a zero entry that fails the constraints,
    /// whatever the directory size claims.
    #[test]
    fn directory_past_the_bytes_read_is_zeros() {
        let entries = vec![entry("b0", FLAG_AUTO), entry("a-longer-name", FLAG_AUTO)];
        let bytes = serialize_directory(&entries, 65536, 64 << 20).unwrap();
        let msg = |r: Result<Vec<BitmapDirEntry>, FormatError>| r.unwrap_err().to_string();
        assert_eq!(
            msg(parse_directory(&bytes[..32], 72 + 24, 3, 65536, 64 << 20)),
            "Bitmap '' doesn't satisfy the constraints"
        );
        assert_eq!(
            msg(parse_directory(&bytes[..32], MAX_BITMAP_DIRECTORY_BYTES, 3, 65536, 64 << 20)),
            "Bitmap '' doesn't satisfy the constraints"
        );
        let cut = parse_directory(&bytes[..58], 72, 2, 65536, 64 << 20).unwrap();
        // (QEMU's g_strndup ends the name at the first NUL.)
        assert_eq!(cut[1].name, "a-");
        assert_eq!(
            parse_directory(&bytes[..32], 72, 1, 65536, 64 << 20).unwrap_err().to_string(),
            "More bitmaps found than specified in header extension"
        );
    }

    #[test]
    fn directory_errors_use_qemu_messages() {
        let bytes = serialize_directory(&[entry("b0", 0)], 65536, 1 << 20).unwrap();
        let msg = |r: Result<Vec<BitmapDirEntry>, FormatError>| r.unwrap_err().to_string();
        assert_eq!(
            msg(parse_directory(&bytes, bytes.len() as u64, 2, 65536, 1 << 20)),
            "Less bitmaps found than specified in header extension"
        );
        assert_eq!(
            msg(parse_directory(&bytes, bytes.len() as u64, 0, 65536, 1 << 20)),
            "More bitmaps found than specified in header extension"
        );
        assert_eq!(msg(parse_directory(&bytes[..20], 20, 1, 65536, 1 << 20)), "Broken bitmap directory");
        assert_eq!(msg(parse_directory(&bytes[..30], 30, 1, 65536, 1 << 20)), "Broken bitmap directory");
        let mut bad = bytes.clone();
        bad[17] = 8;
        assert_eq!(
            msg(parse_directory(&bad, bad.len() as u64, 1, 65536, 1 << 20)),
            "Bitmap 'b0' doesn't satisfy the constraints"
        );
        let mut extra = bytes.clone();
        extra[23] = 8;
        extra.extend_from_slice(&[0; 8]);
        assert_eq!(
            msg(parse_directory(&extra, extra.len() as u64, 1, 65536, 1 << 20)),
            "Bitmap extra data is not supported"
        );
        // A table too small for the disk is refused unless the bitmap is in use.
        let big = 1u64 << 50;
        assert!(parse_directory(&bytes, bytes.len() as u64, 1, 65536, big).is_err());
        let stale = serialize_directory(&[entry("b0", FLAG_IN_USE)], 65536, 1 << 20).unwrap();
        assert!(parse_directory(&stale, stale.len() as u64, 1, 65536, big).is_ok());
    }

    #[test]
    fn table_entries_follow_the_spec() {
        let cs = 65536;
        assert_eq!(BitmapTableEntry::parse(0, cs).unwrap(), BitmapTableEntry::Zeros);
        assert_eq!(BitmapTableEntry::parse(1, cs).unwrap(), BitmapTableEntry::Ones);
        assert_eq!(BitmapTableEntry::parse(0x50000, cs).unwrap(), BitmapTableEntry::Data(0x50000));
        for raw in [0x50001, 0x50200, 2, 1 << 60] {
            assert!(BitmapTableEntry::parse(raw, cs).is_err(), "{raw:x}");
        }
    }

    #[test]
    fn sizes_match_qemu() {
        assert_eq!(table_entries(64 << 20, 16, 65536), 1);
        assert_eq!(table_entries(1 << 40, 9, 65536), (1u64 << 31) / 8 / 65536);
        assert_eq!(bytes_needed(64 << 20, 16), 128);
        assert!(check_new_bitmap("b", 256, 65536, 1 << 20).is_err());
        assert!(check_new_bitmap("b", 1 << 16, 65536, 1 << 20).is_ok());
        assert!(check_new_bitmap(&"n".repeat(1024), 1 << 16, 65536, 1 << 20).is_err());
    }
}
