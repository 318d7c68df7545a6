//! The internal snapshot table.
//!
//! Entries are variable length (extra data, id and name follow the fixed
//! part); every length is bounded before it is used.

use crate::error::FormatError;
use crate::limits::{MAX_SNAPSHOT_EXTRA_DATA, MAX_SNAPSHOT_TABLE_BYTES, SNAPSHOT_HEADER_SIZE};

/// The extra data QEMU knows: VM state size, disk size, instruction count.
const KNOWN_EXTRA: usize = 24;

/// One snapshot table entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in that L1 table.
    pub l1_size: u32,
    /// Unique id string.
    pub id: String,
    /// Name.
    pub name: String,
    /// Creation time, seconds.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest clock at creation, nanoseconds.
    pub vm_clock_nsec: u64,
    /// VM state size (32-bit field).
    pub vm_state_size: u32,
    /// VM state size from the extra data, when present.
    pub vm_state_size_large: Option<u64>,
    /// Guest disk size at creation, when present.
    pub disk_size: Option<u64>,
    /// Instruction count, when present (-1 when not recorded).
    pub icount: Option<u64>,
    /// Extra data beyond the known fields, kept.
    pub unknown_extra: Vec<u8>,
}

/// The parsed table and its size in bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotTable {
    /// The entries in table order.
    pub entries: Vec<SnapshotEntry>,
    /// Bytes the table occupies.
    pub byte_size: u64,
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

/// An id or name as QEMU holds it: a C string, so it ends at the first
/// NUL. Bytes that are not UTF-8 become U+FFFD; the result is cut to what
/// the 16-bit length field can record again.
fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let mut s = String::from_utf8_lossy(&bytes[..end]).into_owned();
    if s.len() > usize::from(u16::MAX) {
        let mut cut = usize::from(u16::MAX);
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

impl SnapshotEntry {
    /// The VM state size (from the 64-bit field when present).
    pub fn vm_state_bytes(&self) -> u64 {
        self.vm_state_size_large.unwrap_or(u64::from(self.vm_state_size))
    }

    /// Appends the entry as QEMU writes it: fixed part, 24 bytes of known
    /// extra data (VM state size, disk size, instruction count), the extra
    /// data this implementation does not know, id and name, padded to 8.
    /// `default_disk_size` fills in a disk size the entry did not record.
    pub fn write_to(&self, out: &mut Vec<u8>, default_disk_size: u64) -> Result<(), FormatError> {
        let too_long = |what: &str, len: usize| FormatError::InvalidSnapshot {
            index: 0,
            reason: format!("snapshot {what} of {len} bytes is too long"),
        };
        let id_len = u16::try_from(self.id.len()).map_err(|_| too_long("id", self.id.len()))?;
        let name_len = u16::try_from(self.name.len()).map_err(|_| too_long("name", self.name.len()))?;
        let extra_len = 24 + self.unknown_extra.len();
        if extra_len > MAX_SNAPSHOT_EXTRA_DATA as usize {
            return Err(too_long("extra data", extra_len));
        }
        let vm_state = self.vm_state_bytes();
        out.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&id_len.to_be_bytes());
        out.extend_from_slice(&name_len.to_be_bytes());
        out.extend_from_slice(&self.date_sec.to_be_bytes());
        out.extend_from_slice(&self.date_nsec.to_be_bytes());
        out.extend_from_slice(&self.vm_clock_nsec.to_be_bytes());
        out.extend_from_slice(&u32::try_from(vm_state).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&(extra_len as u32).to_be_bytes());
        out.extend_from_slice(&vm_state.to_be_bytes());
        out.extend_from_slice(&self.disk_size.unwrap_or(default_disk_size).to_be_bytes());
        out.extend_from_slice(&self.icount.unwrap_or(u64::MAX).to_be_bytes());
        out.extend_from_slice(&self.unknown_extra);
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(self.name.as_bytes());
        Ok(())
    }
}

impl SnapshotTable {
    /// Serialises a table (entries 8-byte aligned, as QEMU lays them out).
    pub fn serialize(entries: &[SnapshotEntry], default_disk_size: u64) -> Result<Vec<u8>, FormatError> {
        let mut out = Vec::new();
        for e in entries {
            out.resize(out.len().div_ceil(8) * 8, 0);
            e.write_to(&mut out, default_disk_size)?;
        }
        if out.len() as u64 > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(FormatError::InvalidSnapshot {
                index: entries.len() as u32,
                reason: "snapshot table would exceed 64 MiB".into(),
            });
        }
        Ok(out)
    }

    /// Reads `count` entries as QEMU's `qcow2_do_read_snapshots` does,
    /// entry by entry through `read` (bytes at an offset relative to the
    /// table's start; the caller decides what lies past the end of the
    /// file). Without `repair`, an entry with more than
    /// [`MAX_SNAPSHOT_EXTRA_DATA`] bytes of extra data, or a table that
    /// grows past [`MAX_SNAPSHOT_TABLE_BYTES`], is QEMU's error. With it
    /// (`check -r all`), such extra data is cut to the limit and the table
    /// ends before the entry that crosses the limit; each repair is handed
    /// to `repair` as it is made. `byte_size` is the span the entries
    /// occupy on disk (cut extra data included), which is what a rewrite
    /// frees.
    pub fn read<E: From<FormatError>>(
        count: u32,
        mut repair: Option<&mut dyn FnMut(SnapshotRepair)>,
        mut read: impl FnMut(u64, &mut [u8]) -> Result<(), E>,
    ) -> Result<SnapshotTable, E> {
        let mut entries = Vec::with_capacity(count.min(1024) as usize);
        // `offset` walks the disk; `table_length` counts what is kept, so
        // cut extra data no longer counts against the limit.
        let mut offset = 0u64;
        let mut table_length = 0u64;
        for index in 0..count {
            let before = offset;
            table_length = table_length.div_ceil(8) * 8;
            offset = offset.div_ceil(8) * 8;
            let mut h = [0u8; SNAPSHOT_HEADER_SIZE as usize];
            read(offset, &mut h)?;
            offset += SNAPSHOT_HEADER_SIZE;
            let id_size = be16(&h, 12) as usize;
            let name_size = be16(&h, 14) as usize;
            let extra_size = be32(&h, 36);
            let mut kept_extra = extra_size;
            if extra_size > MAX_SNAPSHOT_EXTRA_DATA {
                let Some(report) = repair.as_mut() else {
                    return Err(FormatError::SnapshotExtraData { index }.into());
                };
                report(SnapshotRepair::ExtraDataDropped { index, size: extra_size });
                kept_extra = MAX_SNAPSHOT_EXTRA_DATA;
            }
            let mut known = [0u8; KNOWN_EXTRA];
            let known_len = (extra_size as usize).min(KNOWN_EXTRA);
            read(offset, &mut known[..known_len])?;
            offset += known_len as u64;
            let field = |at: usize| (known_len >= at + 8).then(|| be64(&known, at));
            let mut unknown_extra = Vec::new();
            if extra_size as usize > KNOWN_EXTRA {
                unknown_extra = vec![0u8; kept_extra as usize - KNOWN_EXTRA];
                read(offset, &mut unknown_extra)?;
                offset += u64::from(extra_size) - KNOWN_EXTRA as u64;
            }
            let mut id = vec![0u8; id_size];
            read(offset, &mut id)?;
            offset += id_size as u64;
            let mut name = vec![0u8; name_size];
            read(offset, &mut name)?;
            offset += name_size as u64;
            table_length += SNAPSHOT_HEADER_SIZE + u64::from(kept_extra) + (id_size + name_size) as u64;
            if table_length > MAX_SNAPSHOT_TABLE_BYTES || offset > i32::MAX as u64 {
                let overhanging = count - index;
                let Some(report) = repair.as_mut() else {
                    return Err(FormatError::SnapshotTableTooBig { overhanging }.into());
                };
                report(SnapshotRepair::Overhanging { count: overhanging });
                offset = before;
                break;
            }
            entries.push(SnapshotEntry {
                l1_table_offset: be64(&h, 0),
                l1_size: be32(&h, 8),
                id: c_string(&id),
                name: c_string(&name),
                date_sec: be32(&h, 16),
                date_nsec: be32(&h, 20),
                vm_clock_nsec: be64(&h, 24),
                vm_state_size: be32(&h, 32),
                vm_state_size_large: field(0),
                disk_size: field(8),
                icount: field(16),
                unknown_extra,
            });
        }
        Ok(SnapshotTable { entries, byte_size: offset })
    }
}

/// A repair [`SnapshotTable::read`] made, in the order QEMU reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotRepair {
    /// Entry `index` had `size` bytes of extra data; all but the first
    /// [`MAX_SNAPSHOT_EXTRA_DATA`] are dropped.
    ExtraDataDropped {
        /// Position in the table.
        index: u32,
        /// The extra data size the entry recorded.
        size: u32,
    },
    /// The table crossed [`MAX_SNAPSHOT_TABLE_BYTES`]: the last `count`
    /// entries are dropped.
    Overhanging {
        /// Entries dropped.
        count: u32,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, name: &str, extra: &[u8]) -> Vec<u8> {
        let mut e = Vec::new();
        e.extend_from_slice(&0x50000u64.to_be_bytes());
        e.extend_from_slice(&2u32.to_be_bytes());
        e.extend_from_slice(&(id.len() as u16).to_be_bytes());
        e.extend_from_slice(&(name.len() as u16).to_be_bytes());
        e.extend_from_slice(&[0; 20]);
        e.extend_from_slice(&(extra.len() as u32).to_be_bytes());
        e.extend_from_slice(extra);
        e.extend_from_slice(id.as_bytes());
        e.extend_from_slice(name.as_bytes());
        e.resize(e.len().div_ceil(8) * 8, 0);
        e
    }

    /// Reads from `bytes`; what lies past their end is an error.
    fn parse(
        bytes: &[u8],
        count: u32,
        repair: Option<&mut dyn FnMut(SnapshotRepair)>,
    ) -> Result<SnapshotTable, FormatError> {
        SnapshotTable::read(count, repair, |at, buf: &mut [u8]| {
            let at = at as usize;
            let src = bytes
                .get(at..at + buf.len())
                .ok_or(FormatError::InvalidSnapshot { index: 0, reason: format!("bytes at {at} past the end") })?;
            buf.copy_from_slice(src);
            Ok(())
        })
    }

    #[test]
    fn parses_entries() {
        let mut extra = Vec::new();
        extra.extend_from_slice(&0u64.to_be_bytes());
        extra.extend_from_slice(&(1u64 << 30).to_be_bytes());
        let mut t = entry("1", "snap", &extra);
        t.extend(entry("2", "other", &[]));
        let table = parse(&t, 2, None).unwrap();
        assert_eq!(table.entries[0].disk_size, Some(1 << 30));
        assert_eq!(table.entries[0].icount, None);
        assert_eq!(table.entries[1].name, "other");
        assert_eq!(table.byte_size, t.len() as u64 - 2);
    }

    #[test]
    fn serialize_roundtrip() {
        let mut extra = Vec::new();
        extra.extend_from_slice(&0u64.to_be_bytes());
        extra.extend_from_slice(&(1u64 << 30).to_be_bytes());
        extra.extend_from_slice(&7u64.to_be_bytes());
        extra.extend_from_slice(b"futurefield!");
        let mut t = entry("1", "snap", &extra);
        t.extend(entry("22", "other name", &[]));
        let table = parse(&t, 2, None).unwrap();
        assert_eq!(table.entries[0].unknown_extra, b"futurefield!");
        let bytes = SnapshotTable::serialize(&table.entries, 5 << 20).unwrap();
        let again = parse(&bytes, 2, None).unwrap();
        assert_eq!(again.entries[0], table.entries[0]);
        // The entry without extra data gets QEMU's defaults written.
        assert_eq!(again.entries[1].disk_size, Some(5 << 20));
        assert_eq!(again.entries[1].icount, Some(u64::MAX));
        assert_eq!(again.entries[1].name, "other name");
    }

    #[test]
    fn rejects_overruns() {
        let t = entry("1", "snap", &[]);
        assert!(parse(&t, 2, None).is_err());
        assert!(parse(&t[..20], 1, None).is_err());
    }

    // Guards against the reader refusing, with a text of its own, what QEMU
    // refuses with "Too much extra metadata" and repairs by cutting the
    // extra data to 1024 bytes (keeping its first bytes and the entries
    // that follow it).
    #[test]
    fn too_much_extra_data_is_refused_or_cut() {
        let mut extra = vec![0u8; 2000];
        extra[30] = 0xaa;
        let mut t = entry("1", "big", &extra);
        t.extend(entry("2", "next", &[0; 16]));
        let err = parse(&t, 2, None).unwrap_err();
        assert!(matches!(err, FormatError::SnapshotExtraData { index: 0 }));
        assert_eq!(
            err.to_string(),
            "Too much extra metadata in snapshot table entry 0\nYou can force-remove this extra metadata with qemu-img check -r all"
        );
        let mut seen = Vec::new();
        let table = parse(&t, 2, Some(&mut |r| seen.push(r))).unwrap();
        assert_eq!(seen, [SnapshotRepair::ExtraDataDropped { index: 0, size: 2000 }]);
        assert_eq!(table.entries[0].unknown_extra.len(), 1000);
        assert_eq!(table.entries[0].unknown_extra[6], 0xaa);
        assert_eq!(table.entries[1].name, "next");
        // The span on disk still covers the whole of the cut extra data.
        assert_eq!(table.byte_size, t.len() as u64 - 3);
    }

    // Guards against ids and names read past their first NUL: QEMU holds
    // them as C strings, so an id of NUL bytes lists (and is written back)
    // as an empty one, and a long run of bytes that are not UTF-8 must
    // still fit the length field when the table is rewritten.
    #[test]
    fn ids_and_names_end_at_the_first_nul() {
        let t = entry("7\0junk", "\0\0\0", &[]);
        let table = parse(&t, 1, None).unwrap();
        assert_eq!(table.entries[0].id, "7");
        assert_eq!(table.entries[0].name, "");
        let bad = c_string(&[0xff; 65535]);
        assert!(bad.len() <= 65535 && bad.starts_with('\u{fffd}'));
        assert!(SnapshotTable::serialize(&[SnapshotEntry { id: bad, ..Default::default() }], 0).is_ok());
    }

    // Guards against tables past 64 MiB: QEMU refuses them naming how many
    // entries overhang, and its repair ends the table before the entry
    // that crosses the limit.
    #[test]
    fn table_past_64_mib_is_refused_or_shortened() {
        // Entries of 40 + 1024 + 65535 + 65535 bytes, padded to 8.
        const SIZE: u64 = 132_136;
        let count = (MAX_SNAPSHOT_TABLE_BYTES / SIZE + 3) as u32;
        let mut fixed = [0u8; 40];
        fixed[12..16].copy_from_slice(&[0xff; 4]);
        fixed[36..40].copy_from_slice(&1024u32.to_be_bytes());
        let mut synth = |at: u64, buf: &mut [u8]| -> Result<(), FormatError> {
            for (i, b) in buf.iter_mut().enumerate() {
                let pos = ((at + i as u64) % SIZE) as usize;
                *b = if pos < 40 { fixed[pos] } else { b'x' };
            }
            Ok(())
        };
        let crossing = (MAX_SNAPSHOT_TABLE_BYTES / SIZE) as u32;
        let err = SnapshotTable::read(count, None, &mut synth).unwrap_err();
        assert!(matches!(err, FormatError::SnapshotTableTooBig { overhanging } if overhanging == count - crossing));
        let mut seen = Vec::new();
        let table = SnapshotTable::read(count, Some(&mut |r| seen.push(r)), &mut synth).unwrap();
        assert_eq!(seen, [SnapshotRepair::Overhanging { count: count - crossing }]);
        assert_eq!(table.entries.len(), crossing as usize);
        assert_eq!(table.byte_size, u64::from(crossing) * SIZE - 2);
    }
}
