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
        let zero = if geometry.extended_l2() { 0 } else { ZERO };
        self.0 & !(HOST_OFFSET_MASK | COPIED | zero)
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

    #[test]
    fn entries_roundtrip() {
        let v = vec![1u64, 0x8000_0000_0003_0000, u64::MAX];
        assert_eq!(decode_entries(&encode_entries(&v)), v);
    }
}
