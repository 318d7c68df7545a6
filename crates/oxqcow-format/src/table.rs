//! L1 and L2 table entries and compressed cluster descriptors.
//!
//! Each entry is a thin wrapper over its raw big-endian word with named bit
//! accessors; [`L2Entry::mapping`] decodes a standard L2 entry into what it
//! means for a read or write. Tables are converted between bytes and entries
//! only by [`decode_entries`] and [`encode_entries`].

use crate::error::FormatError;
use crate::limits::HOST_OFFSET_MASK;
use crate::types::{Geometry, HostOffset};

/// Bit 63 of L1 and standard L2 entries: the refcount of the referenced
/// cluster is exactly one, so it may be written in place.
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of L2 entries: the cluster is compressed.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of standard L2 entries (v3 only): the cluster reads as zeros.
pub const ZERO: u64 = 1;
/// Size of a compressed-data sector in descriptors.
pub const COMPRESSED_SECTOR_SIZE: u64 = 512;

/// Decodes a table of big-endian u64 entries.
pub fn decode_entries(bytes: &[u8]) -> Vec<u64> {
    bytes.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().expect("chunks of 8"))).collect()
}

/// Encodes a table of u64 entries as big-endian bytes.
pub fn encode_entries(entries: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * 8);
    for e in entries {
        out.extend_from_slice(&e.to_be_bytes());
    }
    out
}

/// Encodes entries into an existing buffer of exactly `entries.len() * 8` bytes.
pub fn encode_entries_into(entries: &[u64], out: &mut [u8]) {
    for (e, c) in entries.iter().zip(out.chunks_exact_mut(8)) {
        c.copy_from_slice(&e.to_be_bytes());
    }
}

/// Reads the first word of L2 entry `index` from an L2 table's bytes
/// (`entry_size` is 8, or 16 for extended entries).
pub fn read_l2_word(table: &[u8], index: usize, entry_size: usize) -> u64 {
    let at = index * entry_size;
    u64::from_be_bytes(table[at..at + 8].try_into().expect("8 bytes"))
}

/// Writes the first word of L2 entry `index` into an L2 table's bytes.
pub fn write_l2_word(table: &mut [u8], index: usize, entry_size: usize, word: u64) {
    let at = index * entry_size;
    table[at..at + 8].copy_from_slice(&word.to_be_bytes());
}

/// Reads the subcluster bitmap (second word) of extended L2 entry `index`.
pub fn read_l2_bitmap(table: &[u8], index: usize) -> L2Bitmap {
    let at = index * 16 + 8;
    L2Bitmap(u64::from_be_bytes(table[at..at + 8].try_into().expect("8 bytes")))
}

/// Writes the subcluster bitmap of extended L2 entry `index`.
pub fn write_l2_bitmap(table: &mut [u8], index: usize, bitmap: L2Bitmap) {
    let at = index * 16 + 8;
    table[at..at + 8].copy_from_slice(&bitmap.0.to_be_bytes());
}

/// An entry of an L1 table: the host offset of an L2 table and COPIED.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L1Entry(pub u64);

impl L1Entry {
    /// An entry pointing at an L2 table with refcount one.
    pub fn new(l2_offset: HostOffset) -> Self {
        L1Entry(l2_offset.0 | COPIED)
    }
    /// The unallocated entry.
    pub const UNALLOCATED: L1Entry = L1Entry(0);

    /// The L2 table offset, or `None` when unallocated.
    pub fn l2_offset(self) -> Option<HostOffset> {
        match self.0 & HOST_OFFSET_MASK {
            0 => None,
            o => Some(HostOffset(o)),
        }
    }
    /// Whether COPIED is set.
    pub fn copied(self) -> bool {
        self.0 & COPIED != 0
    }
    /// Bits that must be zero.
    pub fn reserved_bits(self) -> u64 {
        self.0 & !(HOST_OFFSET_MASK | COPIED)
    }
    /// The offset bits as they are, aligned or not (the tolerant reading
    /// `check` reports from; [`L1Entry::validate`] is the strict one).
    pub fn offset_bits(self) -> u64 {
        self.0 & HOST_OFFSET_MASK
    }
    /// Checks reserved bits and alignment.
    pub fn validate(self, geometry: &Geometry) -> Result<(), FormatError> {
        if self.reserved_bits() != 0 {
            return Err(FormatError::InvalidEntry { table: "L1", entry: self.0, reason: "reserved bits set" });
        }
        if let Some(o) = self.l2_offset() {
            if !geometry.is_cluster_aligned(o.0) {
                return Err(FormatError::InvalidEntry {
                    table: "L1",
                    entry: self.0,
                    reason: "L2 table offset not cluster aligned",
                });
            }
        }
        Ok(())
    }
}

/// A compressed cluster: where its data starts and how many bytes may hold it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompressedDescriptor {
    /// Host byte offset of the compressed stream (not aligned).
    pub offset: HostOffset,
    /// Number of 512-byte sectors the stream touches (at least one).
    pub sectors: u64,
}

impl CompressedDescriptor {
    /// Bytes from `offset` to the end of the last sector: an upper bound of
    /// the stream length (the stream may end anywhere in the last sector).
    pub fn max_len(&self) -> u64 {
        self.sectors * COMPRESSED_SECTOR_SIZE - (self.offset.0 % COMPRESSED_SECTOR_SIZE)
    }
    /// Encodes the descriptor bits of an L2 entry (without the COMPRESSED flag).
    pub fn encode(&self, geometry: &Geometry) -> Result<u64, FormatError> {
        let shift = geometry.compressed_size_shift();
        let max_sectors = 1u64 << (geometry.cluster_bits() - 8);
        if self.sectors == 0 || self.sectors > max_sectors || self.offset.0 >= 1 << shift {
            return Err(FormatError::InvalidEntry {
                table: "L2",
                entry: self.offset.0,
                reason: "compressed descriptor out of range",
            });
        }
        Ok(self.offset.0 | ((self.sectors - 1) << shift))
    }
}

/// What a standard (64-bit) L2 entry says about its guest cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2Mapping {
    /// No data here: read the backing file, or zeros without one.
    Unallocated,
    /// Reads as zeros; no host cluster.
    ZeroPlain,
    /// Reads as zeros; a host cluster stays reserved for later writes.
    ZeroAllocated {
        /// The reserved host cluster.
        host: HostOffset,
        /// Whether its refcount is one.
        copied: bool,
    },
    /// Data at a host cluster.
    Normal {
        /// The host cluster.
        host: HostOffset,
        /// Whether its refcount is one (writable in place).
        copied: bool,
    },
    /// Compressed data.
    Compressed(CompressedDescriptor),
}

impl L2Mapping {
    /// The host cluster this mapping references, if any (not for compressed).
    pub fn host_cluster(&self) -> Option<HostOffset> {
        match *self {
            L2Mapping::Normal { host, .. } | L2Mapping::ZeroAllocated { host, .. } => Some(host),
            _ => None,
        }
    }
}

/// A standard 64-bit L2 entry (the first word of an extended entry).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L2Entry(pub u64);

impl L2Entry {
    /// The unallocated entry.
    pub const UNALLOCATED: L2Entry = L2Entry(0);
    /// A plain zero cluster.
    pub const ZERO_PLAIN: L2Entry = L2Entry(ZERO);

    /// A normal cluster with refcount one.
    pub fn normal(host: HostOffset) -> Self {
        L2Entry(host.0 | COPIED)
    }
    /// A compressed cluster.
    pub fn compressed(desc: &CompressedDescriptor, geometry: &Geometry) -> Result<Self, FormatError> {
        Ok(L2Entry(desc.encode(geometry)? | COMPRESSED))
    }
    /// Whether COPIED is set.
    pub fn copied(self) -> bool {
        self.0 & COPIED != 0
    }
    /// Whether the compressed flag is set.
    pub fn is_compressed(self) -> bool {
        self.0 & COMPRESSED != 0
    }
    /// The same entry with COPIED set or cleared.
    pub fn with_copied(self, copied: bool) -> Self {
        if copied {
            L2Entry(self.0 | COPIED)
        } else {
            L2Entry(self.0 & !COPIED)
        }
    }
    /// Bits that must be zero in a standard (non-compressed) entry.
    pub fn reserved_bits(self, geometry: &Geometry) -> u64 {
        if self.is_compressed() {
            return 0;
        }
        // Bit 0 is the zero flag; with extended L2 entries it has no meaning
        // and QEMU ignores it (its check does not count it as reserved).
        let _ = geometry;
        self.0 & !(HOST_OFFSET_MASK | COPIED | ZERO)
    }

    /// The offset bits as they are, aligned or not (tolerant, for `check`).
    pub fn offset_bits(self) -> u64 {
        self.0 & HOST_OFFSET_MASK
    }

    /// What the entry is by QEMU's `qcow2_get_cluster_type`, without any
    /// validation: the tolerant decoder `check` uses to report what is
    /// wrong with an entry ([`L2Entry::mapping_in`] is the strict one, which
    /// refuses it). With extended L2 entries the zero flag means nothing;
    /// in an image with an external data file (`external`) offset 0 with
    /// COPIED is guest cluster 0, not an unallocated entry.
    pub fn cluster_type(self, extended_l2: bool, external: bool) -> ClusterType {
        if self.is_compressed() {
            ClusterType::Compressed
        } else if self.0 & ZERO != 0 && !extended_l2 {
            if self.offset_bits() != 0 {
                ClusterType::ZeroAlloc
            } else {
                ClusterType::ZeroPlain
            }
        } else if self.offset_bits() == 0 && !(external && self.copied()) {
            ClusterType::Unallocated
        } else {
            ClusterType::Normal
        }
    }

    /// Decodes the entry. `version` is the image version: the zero flag is
    /// only defined from version 3 on (QEMU treats it as corruption in v2).
    pub fn mapping(self, geometry: &Geometry, version: u32) -> Result<L2Mapping, FormatError> {
        self.mapping_in(geometry, version, false)
    }

    /// Decodes the entry of an image whose guest data lives in an external
    /// data file (`external`): there host offset 0 is a valid cluster (guest
    /// cluster 0 lives at offset 0), and QEMU tells it from an unallocated
    /// entry by the COPIED flag, which every data-file cluster carries
    /// because its refcount is always taken to be 1.
    pub fn mapping_in(self, geometry: &Geometry, version: u32, external: bool) -> Result<L2Mapping, FormatError> {
        let invalid = |reason| FormatError::InvalidEntry { table: "L2", entry: self.0, reason };
        if self.is_compressed() {
            if self.copied() {
                return Err(invalid("COPIED set on a compressed cluster"));
            }
            let shift = geometry.compressed_size_shift();
            let offset = self.0 & ((1u64 << shift) - 1);
            let size_mask = (1u64 << (geometry.cluster_bits() - 8)) - 1;
            let sectors = ((self.0 >> shift) & size_mask) + 1;
            return Ok(L2Mapping::Compressed(CompressedDescriptor { offset: HostOffset(offset), sectors }));
        }
        if self.reserved_bits(geometry) != 0 {
            return Err(invalid("reserved bits set"));
        }
        let host = self.0 & HOST_OFFSET_MASK;
        if host != 0 && !geometry.is_cluster_aligned(host) {
            return Err(invalid("host offset not cluster aligned"));
        }
        let copied = self.copied();
        let zero = !geometry.extended_l2() && self.0 & ZERO != 0;
        if zero {
            if version < 3 {
                return Err(invalid("zero cluster flag in a version 2 image"));
            }
            return Ok(if host == 0 {
                L2Mapping::ZeroPlain
            } else {
                L2Mapping::ZeroAllocated { host: HostOffset(host), copied }
            });
        }
        if host == 0 && !(external && copied) {
            return Ok(L2Mapping::Unallocated);
        }
        Ok(L2Mapping::Normal { host: HostOffset(host), copied })
    }
}

/// An L2 entry's type as QEMU's `qcow2_get_cluster_type` names it (see
/// [`L2Entry::cluster_type`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterType {
    /// No offset, no flags: the backing file or zeros.
    Unallocated,
    /// The zero flag without an offset.
    ZeroPlain,
    /// The zero flag with a preallocated host cluster.
    ZeroAlloc,
    /// Data at a host offset.
    Normal,
    /// Compressed data.
    Compressed,
}

/// Bits 0-31 of a subcluster bitmap: subcluster `i` is allocated (bit `i`).
pub const SUB_ALLOC_ALL: u64 = 0xffff_ffff;
/// Bits 32-63 of a subcluster bitmap: subcluster `i` reads as zeros (bit `32 + i`).
pub const SUB_ZERO_ALL: u64 = 0xffff_ffff << 32;

/// What one subcluster of an extended L2 entry holds (QEMU's
/// `QCow2SubclusterType` without the invalid case, which
/// [`L2Bitmap::validate`] rules out first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subcluster {
    /// Data in the entry's host cluster.
    Normal,
    /// Reads as zeros; the entry has no host cluster.
    ZeroPlain,
    /// Reads as zeros; the entry has a host cluster.
    ZeroAlloc,
    /// Not allocated (backing file or zeros); no host cluster.
    UnallocatedPlain,
    /// Not allocated (backing file or zeros); the entry has a host cluster
    /// whose bytes for this subcluster mean nothing.
    UnallocatedAlloc,
    /// Part of a compressed cluster (compressed clusters have no subclusters).
    Compressed,
}

impl Subcluster {
    /// Whether the subcluster's bytes are the host cluster's (written in
    /// place without copy on write).
    pub fn is_allocated(self) -> bool {
        self == Subcluster::Normal
    }
}

/// The second word of an extended L2 entry: 32 allocation bits and 32
/// "reads as zeros" bits, one of each per subcluster.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L2Bitmap(pub u64);

/// The mask of subclusters `first..end` in one half of a bitmap.
fn sc_mask(first: u32, end: u32) -> u32 {
    debug_assert!(first <= end && end <= 32);
    if first == end {
        return 0;
    }
    let high = if end == 32 { u32::MAX } else { (1u32 << end) - 1 };
    high & !((1u32 << first) - 1)
}

impl L2Bitmap {
    /// Every subcluster reads as zeros.
    pub const ALL_ZEROES: L2Bitmap = L2Bitmap(SUB_ZERO_ALL);

    /// The allocation bits.
    pub fn alloc(self) -> u32 {
        self.0 as u32
    }
    /// The "reads as zeros" bits.
    pub fn zero(self) -> u32 {
        (self.0 >> 32) as u32
    }

    /// Checks the bitmap against the mapping of its entry, with QEMU's rules
    /// for an invalid subcluster type: a cluster with a host offset must not
    /// have a subcluster both allocated and zero, a cluster without one must
    /// not have allocated subclusters. Compressed clusters have no
    /// subclusters: their bitmap is not looked at when reading (only
    /// `check` reports it when it is not zero, as QEMU does).
    pub fn validate(self, m: &L2Mapping) -> Result<(), FormatError> {
        let invalid = |reason| FormatError::InvalidEntry { table: "L2 subcluster bitmap", entry: self.0, reason };
        match m {
            L2Mapping::Compressed(_) => Ok(()),
            L2Mapping::Unallocated | L2Mapping::ZeroPlain => {
                if self.alloc() != 0 {
                    Err(invalid("allocated subclusters in a cluster without a host offset"))
                } else {
                    Ok(())
                }
            }
            L2Mapping::Normal { .. } | L2Mapping::ZeroAllocated { .. } => {
                if self.alloc() & self.zero() != 0 {
                    Err(invalid("a subcluster is both allocated and zero"))
                } else {
                    Ok(())
                }
            }
        }
    }

    /// The type of subcluster `sc` of a validated entry with mapping `m`.
    pub fn subcluster(self, m: &L2Mapping, sc: u32) -> Subcluster {
        let bit = 1u32 << sc;
        let host = match m {
            L2Mapping::Compressed(_) => return Subcluster::Compressed,
            L2Mapping::Normal { .. } | L2Mapping::ZeroAllocated { .. } => true,
            L2Mapping::Unallocated | L2Mapping::ZeroPlain => false,
        };
        match (self.zero() & bit != 0, self.alloc() & bit != 0, host) {
            (true, _, true) => Subcluster::ZeroAlloc,
            (true, _, false) => Subcluster::ZeroPlain,
            (false, true, _) => Subcluster::Normal,
            (false, false, true) => Subcluster::UnallocatedAlloc,
            (false, false, false) => Subcluster::UnallocatedPlain,
        }
    }

    /// The type of subcluster `sc` and how many subclusters from `sc` on
    /// (to the end of the cluster) have that type.
    pub fn run(self, m: &L2Mapping, sc: u32) -> (Subcluster, u32) {
        let ty = self.subcluster(m, sc);
        let mut n = 1;
        if ty != Subcluster::Compressed {
            while sc + n < 32 && self.subcluster(m, sc + n) == ty {
                n += 1;
            }
        } else {
            n = 32 - sc;
        }
        (ty, n)
    }

    /// The mapping a run of subclusters of type `ty` reads as, in terms of
    /// whole-cluster mappings (so that read plans and block status treat
    /// subclusters as small clusters).
    pub fn as_mapping(ty: Subcluster, m: &L2Mapping) -> L2Mapping {
        match (ty, *m) {
            (Subcluster::Normal, L2Mapping::Normal { host, copied } | L2Mapping::ZeroAllocated { host, copied }) => {
                L2Mapping::Normal { host, copied }
            }
            (Subcluster::ZeroAlloc, L2Mapping::Normal { host, copied } | L2Mapping::ZeroAllocated { host, copied }) => {
                L2Mapping::ZeroAllocated { host, copied }
            }
            (Subcluster::ZeroPlain | Subcluster::ZeroAlloc, _) => L2Mapping::ZeroPlain,
            (Subcluster::Compressed, m) => m,
            _ => L2Mapping::Unallocated,
        }
    }

    /// Subclusters `first..end` marked allocated (their zero bits cleared).
    pub fn with_allocated(self, first: u32, end: u32) -> Self {
        let m = u64::from(sc_mask(first, end));
        L2Bitmap((self.0 | m) & !(m << 32))
    }

    /// Subclusters `first..end` marked as reading zeros (their allocation
    /// bits cleared).
    pub fn with_zeroes(self, first: u32, end: u32) -> Self {
        let m = u64::from(sc_mask(first, end));
        L2Bitmap((self.0 | (m << 32)) & !m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g64k() -> Geometry {
        Geometry::new(16, 4, false).unwrap()
    }

    #[test]
    fn l1_entry_roundtrip_and_validation() {
        let e = L1Entry::new(HostOffset(0x30000));
        assert!(e.copied());
        assert_eq!(e.l2_offset(), Some(HostOffset(0x30000)));
        assert!(e.validate(&g64k()).is_ok());
        assert!(L1Entry(0x30001).validate(&g64k()).is_err());
        assert!(L1Entry(0x30200).validate(&g64k()).is_err());
        assert_eq!(L1Entry(0).l2_offset(), None);
    }

    #[test]
    fn l2_entry_offset_zero_in_data_files() {
        let g = g64k();
        let e = L2Entry(COPIED);
        assert_eq!(e.mapping(&g, 3), Ok(L2Mapping::Unallocated));
        assert_eq!(e.mapping_in(&g, 3, true), Ok(L2Mapping::Normal { host: HostOffset(0), copied: true }));
        assert_eq!(L2Entry(0).mapping_in(&g, 3, true), Ok(L2Mapping::Unallocated));
        assert_eq!(L2Entry(COPIED | ZERO).mapping_in(&g, 3, true), Ok(L2Mapping::ZeroPlain));
    }

    #[test]
    fn l2_entry_kinds() {
        let g = g64k();
        assert_eq!(L2Entry(0).mapping(&g, 3), Ok(L2Mapping::Unallocated));
        assert_eq!(L2Entry(1).mapping(&g, 3), Ok(L2Mapping::ZeroPlain));
        assert!(L2Entry(1).mapping(&g, 2).is_err());
        assert_eq!(
            L2Entry(0x50000 | 1).mapping(&g, 3),
            Ok(L2Mapping::ZeroAllocated { host: HostOffset(0x50000), copied: false })
        );
        assert_eq!(
            L2Entry::normal(HostOffset(0x50000)).mapping(&g, 2),
            Ok(L2Mapping::Normal { host: HostOffset(0x50000), copied: true })
        );
        assert!(L2Entry(0x50002).mapping(&g, 3).is_err(), "reserved bit 1");
        assert!(L2Entry(0x50200).mapping(&g, 3).is_err(), "unaligned");
        assert!(L2Entry(0x0100_0000_0005_0000).mapping(&g, 3).is_err(), "reserved bit 56");
    }

    #[test]
    fn compressed_roundtrip() {
        for bits in 9..=21 {
            let g = Geometry::new(bits, 4, false).unwrap();
            let max = 1u64 << (bits - 8);
            for sectors in [1, max / 2 + 1, max] {
                let d = CompressedDescriptor { offset: HostOffset(0x12345), sectors };
                let e = L2Entry::compressed(&d, &g).unwrap();
                assert_eq!(e.mapping(&g, 3), Ok(L2Mapping::Compressed(d)));
            }
            let too_many = CompressedDescriptor { offset: HostOffset(0), sectors: max + 1 };
            assert!(too_many.encode(&g).is_err());
        }
        let d = CompressedDescriptor { offset: HostOffset(1000), sectors: 2 };
        assert_eq!(d.max_len(), 1024 - 488);
    }

    fn g64k_ext() -> Geometry {
        Geometry::new(16, 4, true).unwrap()
    }

    #[test]
    fn extended_entries_ignore_the_zero_flag() {
        let g = g64k_ext();
        assert_eq!(L2Entry(1).mapping(&g, 3), Ok(L2Mapping::Unallocated));
        assert_eq!(
            L2Entry(0x50000 | 1 | COPIED).mapping(&g, 3),
            Ok(L2Mapping::Normal { host: HostOffset(0x50000), copied: true })
        );
    }

    #[test]
    fn bitmap_validation_follows_qemu() {
        let normal = L2Mapping::Normal { host: HostOffset(0x50000), copied: true };
        assert!(L2Bitmap(0x3).validate(&normal).is_ok());
        assert!(L2Bitmap(0x4_0000_0003).validate(&normal).is_ok());
        assert!(L2Bitmap(0x1_0000_0001).validate(&normal).is_err(), "allocated and zero");
        assert!(L2Bitmap(0x1).validate(&L2Mapping::Unallocated).is_err(), "allocated without host");
        assert!(L2Bitmap::ALL_ZEROES.validate(&L2Mapping::Unallocated).is_ok());
        let c = L2Mapping::Compressed(CompressedDescriptor { offset: HostOffset(0x20000), sectors: 1 });
        assert!(L2Bitmap(u64::MAX).validate(&c).is_ok(), "ignored at run time");
    }

    #[test]
    fn subcluster_types_and_runs() {
        let normal = L2Mapping::Normal { host: HostOffset(0x50000), copied: true };
        let b = L2Bitmap(0b0111 | (0b1000 << 32));
        assert_eq!(b.run(&normal, 0), (Subcluster::Normal, 3));
        assert_eq!(b.run(&normal, 1), (Subcluster::Normal, 2));
        assert_eq!(b.run(&normal, 3), (Subcluster::ZeroAlloc, 1));
        assert_eq!(b.run(&normal, 4), (Subcluster::UnallocatedAlloc, 28));
        assert_eq!(b.run(&L2Mapping::Unallocated, 31), (Subcluster::UnallocatedPlain, 1));
        assert_eq!(L2Bitmap::ALL_ZEROES.run(&L2Mapping::Unallocated, 0), (Subcluster::ZeroPlain, 32));
        assert_eq!(L2Bitmap::as_mapping(Subcluster::UnallocatedAlloc, &normal), L2Mapping::Unallocated);
        assert_eq!(
            L2Bitmap::as_mapping(Subcluster::ZeroAlloc, &normal),
            L2Mapping::ZeroAllocated { host: HostOffset(0x50000), copied: true }
        );
    }

    #[test]
    fn bitmap_ranges() {
        let b = L2Bitmap::ALL_ZEROES.with_allocated(2, 5);
        assert_eq!(b.alloc(), 0b11100);
        assert_eq!(b.zero(), !0b11100);
        let z = L2Bitmap(u64::from(u32::MAX)).with_zeroes(30, 32);
        assert_eq!(z.alloc(), 0x3fff_ffff);
        assert_eq!(z.zero(), 0xc000_0000);
        assert_eq!(L2Bitmap(0).with_allocated(0, 32).0, SUB_ALLOC_ALL);
        assert_eq!(L2Bitmap(7).with_allocated(3, 3).0, 7);
        let mut t = vec![0u8; 64];
        write_l2_bitmap(&mut t, 1, L2Bitmap(0x1234));
        write_l2_word(&mut t, 1, 16, 0x50000);
        assert_eq!(read_l2_bitmap(&t, 1), L2Bitmap(0x1234));
        assert_eq!(read_l2_word(&t, 1, 16), 0x50000);
    }

    #[test]
    fn entries_roundtrip() {
        let v = vec![1u64, 0x8000_0000_0003_0000, u64::MAX];
        assert_eq!(decode_entries(&encode_entries(&v)), v);
    }

    #[test]
    fn tolerant_cluster_types_as_qemu_names_them() {
        let t = |e: u64, ext: bool, external: bool| L2Entry(e).cluster_type(ext, external);
        assert_eq!(t(0, false, false), ClusterType::Unallocated);
        assert_eq!(t(ZERO, false, false), ClusterType::ZeroPlain);
        assert_eq!(t(ZERO | 0x10000, false, false), ClusterType::ZeroAlloc);
        // Misaligned or with reserved bits: still named, for check to report.
        assert_eq!(t(0x10200 | 1 << 57, false, false), ClusterType::Normal);
        assert_eq!(t(COMPRESSED | COPIED, false, false), ClusterType::Compressed);
        // The zero flag means nothing with extended L2 entries.
        assert_eq!(t(ZERO, true, false), ClusterType::Unallocated);
        // Offset 0 with COPIED is a cluster in an external data file.
        assert_eq!(t(COPIED, false, true), ClusterType::Normal);
        assert_eq!(t(COPIED, false, false), ClusterType::Unallocated);
        assert_eq!(L1Entry(0x10200 | COPIED).offset_bits(), 0x10200);
        assert_eq!(L2Entry(0x0100_0000_0001_0000).offset_bits(), 0x10000);
    }
}
