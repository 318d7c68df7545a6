//! The qcow (version 1) on-disk format, as QEMU's `block/qcow.c` reads
//! it: the 48-byte header and the L1/L2 entries.
//!
//! A qcow image maps the guest disk through a two-level table: the L1
//! table (one 64-bit big-endian entry per `2^(cluster_bits + l2_bits)`
//! guest bytes, at `l1_table_offset`) names L2 tables of `2^l2_bits`
//! entries; an L2 entry is 0 (unallocated: the backing file, or zeros), a
//! host offset (the cluster's bytes, AES-encrypted when `crypt_method` is
//! 1), or, with bit 63 set, a compressed cluster: raw deflate data whose
//! host offset is in the low `63 - cluster_bits` bits and whose length in
//! bytes is in the `cluster_bits` bits above them.

use crate::error::FormatError;

/// Bytes of the header.
pub const HEADER_SIZE: usize = 48;
/// The magic, "QFI\xfb" (shared with qcow2).
pub const MAGIC: u32 = 0x5146_49fb;
/// The one version this format has.
pub const VERSION: u32 = 1;
/// `crypt_method`: not encrypted.
pub const CRYPT_NONE: u32 = 0;
/// `crypt_method`: AES-128-CBC with plain64 IVs of guest sectors.
pub const CRYPT_AES: u32 = 1;
/// Bit 63 of an L2 entry: the cluster is compressed.
pub const COMPRESSED: u64 = 1 << 63;
/// Smallest and largest cluster (`cluster_bits` 9 to 16).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// See [`MIN_CLUSTER_BITS`].
pub const MAX_CLUSTER_BITS: u32 = 16;
/// An L2 table spans 512 bytes to 64 KiB (`l2_bits` 6 to 13).
pub const MIN_L2_BITS: u32 = 9 - 3;
/// See [`MIN_L2_BITS`].
pub const MAX_L2_BITS: u32 = 16 - 3;
/// QEMU's bound on the L1 table: its byte size must fit a C `int`.
pub const MAX_L1_ENTRIES: u64 = i32::MAX as u64 / 8;
/// A backing file name is at most 1023 bytes.
pub const MAX_BACKING_NAME: u32 = 1023;

/// A parsed and validated qcow header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QcowHeader {
    /// Where the backing file name is; 0 for none.
    pub backing_file_offset: u64,
    /// Its length in bytes (at most [`MAX_BACKING_NAME`]).
    pub backing_file_size: u32,
    /// Modification time (unused).
    pub mtime: u32,
    /// Guest size in bytes as stored (the disk is `size / 512` sectors).
    pub size: u64,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// log2 of the entries of an L2 table.
    pub l2_bits: u32,
    /// [`CRYPT_NONE`] or [`CRYPT_AES`].
    pub crypt_method: u32,
    /// Where the L1 table is.
    pub l1_table_offset: u64,
    /// L1 entries the guest size needs (at most [`MAX_L1_ENTRIES`]).
    pub l1_entries: u64,
}

/// What an L2 entry says about its cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QcowCluster {
    /// No data in this image.
    Unallocated,
    /// The cluster's bytes are at this host offset.
    Normal(u64),
    /// Deflated data of `length` bytes at `offset`.
    Compressed {
        /// Host offset of the compressed bytes.
        offset: u64,
        /// Their length.
        length: u64,
    },
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn invalid(msg: impl Into<String>) -> FormatError {
    FormatError::Qcow(msg.into())
}

impl QcowHeader {
    /// Parses and validates a header with QEMU's checks, in its order and
    /// with its messages (`qcow_open`).
    pub fn parse(bytes: &[u8]) -> Result<QcowHeader, FormatError> {
        if bytes.len() < HEADER_SIZE {
            return Err(FormatError::Truncated {
                what: "qcow header",
                needed: HEADER_SIZE as u64,
                available: bytes.len() as u64,
            });
        }
        if be32(bytes, 0) != MAGIC {
            return Err(invalid("Image not in qcow format"));
        }
        let version = be32(bytes, 4);
        if version != VERSION {
            return Err(invalid(format!("qcow (v1) does not support qcow version {version}")));
        }
        let header = QcowHeader {
            backing_file_offset: be64(bytes, 8),
            backing_file_size: be32(bytes, 16),
            mtime: be32(bytes, 20),
            size: be64(bytes, 24),
            cluster_bits: u32::from(bytes[32]),
            l2_bits: u32::from(bytes[33]),
            crypt_method: be32(bytes, 36),
            l1_table_offset: be64(bytes, 40),
            l1_entries: 0,
        };
        if header.size <= 1 {
            return Err(invalid("Image size is too small (must be at least 2 bytes)"));
        }
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&header.cluster_bits) {
            return Err(invalid("Cluster size must be between 512 and 64k"));
        }
        if !(MIN_L2_BITS..=MAX_L2_BITS).contains(&header.l2_bits) {
            return Err(invalid("L2 table size must be between 512 and 64k"));
        }
        if header.crypt_method > CRYPT_AES {
            return Err(invalid("invalid encryption method in qcow header"));
        }
        let shift = header.cluster_bits + header.l2_bits;
        let too_large = || invalid("Image too large");
        let l1_entries = header.size.checked_add((1 << shift) - 1).ok_or_else(too_large)? >> shift;
        if l1_entries > MAX_L1_ENTRIES {
            return Err(too_large());
        }
        if header.backing_file_offset != 0 && header.backing_file_size > MAX_BACKING_NAME {
            return Err(invalid("Backing file name too long"));
        }
        Ok(QcowHeader { l1_entries, ..header })
    }

    /// The 48 header bytes.
    pub fn serialize(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&VERSION.to_be_bytes());
        b[8..16].copy_from_slice(&self.backing_file_offset.to_be_bytes());
        b[16..20].copy_from_slice(&self.backing_file_size.to_be_bytes());
        b[20..24].copy_from_slice(&self.mtime.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[32] = self.cluster_bits as u8;
        b[33] = self.l2_bits as u8;
        b[36..40].copy_from_slice(&self.crypt_method.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b
    }

    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        1 << self.l2_bits
    }

    /// Guest bytes one L1 entry maps.
    pub fn l1_span(&self) -> u64 {
        1 << (self.cluster_bits + self.l2_bits)
    }

    /// The disk size QEMU uses: whole sectors, rounded down.
    pub fn disk_size(&self) -> u64 {
        self.size / 512 * 512
    }

    /// Whether the header names a backing file.
    pub fn has_backing_file(&self) -> bool {
        self.backing_file_offset != 0
    }

    /// Decodes an L2 entry.
    pub fn cluster(&self, entry: u64) -> QcowCluster {
        if entry == 0 {
            return QcowCluster::Unallocated;
        }
        if entry & COMPRESSED == 0 {
            return QcowCluster::Normal(entry);
        }
        let shift = 63 - self.cluster_bits;
        QcowCluster::Compressed {
            offset: entry & ((1 << shift) - 1),
            length: (entry >> shift) & (self.cluster_size() - 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> QcowHeader {
        QcowHeader {
            backing_file_offset: 0,
            backing_file_size: 0,
            mtime: 0,
            size: 10 << 20,
            cluster_bits: 12,
            l2_bits: 9,
            crypt_method: 0,
            l1_table_offset: 48,
            l1_entries: 5,
        }
    }

    #[test]
    fn round_trip_and_geometry() {
        let h = header();
        let parsed = QcowHeader::parse(&h.serialize()).unwrap();
        assert_eq!(parsed, h);
        assert_eq!(parsed.l1_span(), 2 << 20);
        let odd = QcowHeader { size: 1000, ..h };
        assert_eq!(QcowHeader::parse(&odd.serialize()).unwrap().disk_size(), 512);
    }

    /// Guards against hostile headers being accepted or overflowing the
    /// L1 arithmetic: each field QEMU checks is refused with its message.
    #[test]
    fn hostile_headers_refused_with_qemu_messages() {
        let h = header();
        let mut bad_magic = h.serialize();
        bad_magic[0] = 0;
        let cases: Vec<([u8; HEADER_SIZE], &str)> = vec![
            (bad_magic, "Image not in qcow format"),
            (
                {
                    let mut b = h.serialize();
                    b[7] = 2;
                    b
                },
                "qcow (v1) does not support qcow version 2",
            ),
            (QcowHeader { size: 1, ..h }.serialize(), "Image size is too small (must be at least 2 bytes)"),
            (QcowHeader { cluster_bits: 17, ..h }.serialize(), "Cluster size must be between 512 and 64k"),
            (QcowHeader { l2_bits: 5, ..h }.serialize(), "L2 table size must be between 512 and 64k"),
            (QcowHeader { crypt_method: 2, ..h }.serialize(), "invalid encryption method in qcow header"),
            (QcowHeader { size: u64::MAX - 3, ..h }.serialize(), "Image too large"),
            (QcowHeader { size: 1 << 62, ..h }.serialize(), "Image too large"),
            (
                QcowHeader { backing_file_offset: 100, backing_file_size: 1024, ..h }.serialize(),
                "Backing file name too long",
            ),
        ];
        for (bytes, msg) in cases {
            assert_eq!(QcowHeader::parse(&bytes).unwrap_err().to_string(), msg);
        }
        assert!(matches!(QcowHeader::parse(&[0u8; 10]), Err(FormatError::Truncated { .. })));
    }

    #[test]
    fn l2_entries_decode_as_qemu_reads_them() {
        let h = header();
        assert_eq!(h.cluster(0), QcowCluster::Unallocated);
        assert_eq!(h.cluster(0x2000), QcowCluster::Normal(0x2000));
        let entry = COMPRESSED | (300 << (63 - 12)) | 0x1_2345;
        assert_eq!(h.cluster(entry), QcowCluster::Compressed { offset: 0x1_2345, length: 300 });
    }
}
