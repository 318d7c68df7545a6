//! The image header (cluster 0): fixed fields, extensions and backing name.
//!
//! [`Header::parse`] validates every field in the order QEMU does, so an image
//! QEMU refuses is refused here with the same first complaint, and it bounds
//! every table the header describes before the engine reads any of them.
//! [`Header::serialize`] writes cluster 0 back the way QEMU's
//! `qcow2_update_header` lays it out, keeping unknown header fields and
//! unknown extensions byte for byte (in their original order).

use zerocopy::byteorder::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::FormatError;
use crate::limits::*;
use crate::types::Geometry;

/// `QFI\xfb`.
pub const QCOW_MAGIC: u32 = 0x5146_49fb;

/// Header extension types.
pub mod ext {
    /// End of the extension list.
    pub const END: u32 = 0;
    /// Backing file format name.
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    /// Feature name table.
    pub const FEATURE_TABLE: u32 = 0x6803_f857;
    /// Persistent bitmaps.
    pub const BITMAPS: u32 = 0x2385_2875;
    /// Full disk encryption header pointer.
    pub const CRYPTO: u32 = 0x0537_be77;
    /// External data file name.
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// Incompatible feature bits.
pub mod incompat {
    /// Refcounts may be inconsistent (lazy refcounts in use).
    pub const DIRTY: u64 = 1 << 0;
    /// Metadata is known to be corrupt.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file.
    pub const DATA_FILE: u64 = 1 << 2;
    /// The compression type field is in use.
    pub const COMPRESSION: u64 = 1 << 3;
    /// Extended (128-bit) L2 entries.
    pub const EXTL2: u64 = 1 << 4;
    /// Every bit this implementation knows.
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTL2;
}

/// Compatible feature bits.
pub mod compat {
    /// Lazy refcounts.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits.
pub mod autoclear {
    /// The bitmaps extension is consistent.
    pub const BITMAPS: u64 = 1 << 0;
    /// The external data file is a valid raw image.
    pub const DATA_FILE_RAW: u64 = 1 << 1;
    /// Every bit this implementation knows.
    pub const KNOWN: u64 = BITMAPS | DATA_FILE_RAW;
}

/// Encryption methods (`crypt_method`).
pub mod crypt {
    /// No encryption.
    pub const NONE: u32 = 0;
    /// Legacy AES-CBC.
    pub const AES: u32 = 1;
    /// LUKS.
    pub const LUKS: u32 = 2;
}

/// The fixed part of a version 3 header (the first 72 bytes are version 2's).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawHeader {
    magic: U32,
    version: U32,
    backing_file_offset: U64,
    backing_file_size: U32,
    cluster_bits: U32,
    size: U64,
    crypt_method: U32,
    l1_size: U32,
    l1_table_offset: U64,
    refcount_table_offset: U64,
    refcount_table_clusters: U32,
    nb_snapshots: U32,
    snapshots_offset: U64,
    incompatible_features: U64,
    compatible_features: U64,
    autoclear_features: U64,
    refcount_order: U32,
    header_length: U32,
}

const RAW_HEADER_SIZE: usize = std::mem::size_of::<RawHeader>();
const _: () = assert!(RAW_HEADER_SIZE == MIN_V3_HEADER_LENGTH as usize);

/// A parsed and validated qcow2 header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Guest disk size in bytes.
    pub size: u64,
    /// Encryption method.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width.
    pub refcount_order: u32,
    /// The header length as read (rewritten as 112 + unknown fields).
    pub header_length: u32,
    /// 0 deflate, 1 zstd.
    pub compression_type: u8,
    /// Header bytes past the 112 this implementation knows, kept.
    pub unknown_header_fields: Vec<u8>,
    /// Extensions.
    pub extensions: Extensions,
    /// The backing file name.
    pub backing_file: Option<String>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Checks a table's entry count and offset as QEMU's `qcow2_validate_table` does.
pub fn validate_table(
    table: &'static str,
    offset: u64,
    entries: u64,
    entry_size: u64,
    max_bytes: u64,
    cluster_size: u64,
) -> Result<(), FormatError> {
    if entries > max_bytes / entry_size {
        return Err(FormatError::TableTooLarge { table, entries, entry_size, limit: max_bytes });
    }
    if MAX_OFFSET - entries * entry_size < offset || offset % cluster_size != 0 {
        return Err(FormatError::TableOffset { table, offset });
    }
    Ok(())
}

/// QEMU's bounds on the snapshot table pointer (`table` names it: the open
/// says "Snapshot table", the check "snapshot table").
pub fn validate_snapshot_table(
    table: &'static str,
    offset: u64,
    entries: u32,
    cluster_size: u64,
) -> Result<(), FormatError> {
    validate_table(
        table,
        offset,
        u64::from(entries),
        SNAPSHOT_HEADER_SIZE,
        SNAPSHOT_HEADER_SIZE * u64::from(MAX_SNAPSHOTS),
        cluster_size,
    )
}

/// Reads the cluster size out of the first bytes of an image, after checking
/// magic and version, so that the caller knows how much of cluster 0 to read
/// before calling [`Header::parse`].
pub fn peek_cluster_bits(prefix: &[u8]) -> Result<u32, FormatError> {
    if prefix.len() < V2_HEADER_LENGTH as usize {
        if prefix.len() >= 4 && be32(prefix, 0) != QCOW_MAGIC {
            return Err(FormatError::BadMagic { found: be32(prefix, 0) });
        }
        return Err(FormatError::Truncated {
            what: "qcow2 header",
            needed: u64::from(V2_HEADER_LENGTH),
            available: prefix.len() as u64,
        });
    }
    let magic = be32(prefix, 0);
    if magic != QCOW_MAGIC {
        return Err(FormatError::BadMagic { found: magic });
    }
    let version = be32(prefix, 4);
    if !(2..=3).contains(&version) {
        return Err(FormatError::UnsupportedVersion(version));
    }
    let cluster_bits = be32(prefix, 20);
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(FormatError::ClusterBits(cluster_bits));
    }
    Ok(cluster_bits)
}

impl Header {
    /// The geometry the header describes.
    pub fn geometry(&self) -> Geometry {
        Geometry::new(self.cluster_bits, self.refcount_order, self.extended_l2()).expect("validated at parse time")
    }
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Whether L2 entries are extended.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompat::EXTL2 != 0
    }
    /// Whether lazy refcounts are enabled.
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & compat::LAZY_REFCOUNTS != 0
    }
    /// Whether the dirty bit is set.
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & incompat::DIRTY != 0
    }
    /// Whether the corrupt bit is set.
    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & incompat::CORRUPT != 0
    }
    /// Whether guest data lives in an external data file.
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & incompat::DATA_FILE != 0
    }
    /// Refcount table size in entries.
    pub fn refcount_table_entries(&self) -> u64 {
        u64::from(self.refcount_table_clusters) << (self.cluster_bits - 3)
    }

    /// A fresh version 2 or 3 header as QEMU's create writes it (before the
    /// engine sets the table offsets).
    pub fn new(version: u32, geometry: Geometry, size: u64) -> Self {
        let mut incompatible_features = 0;
        if geometry.extended_l2() {
            incompatible_features |= incompat::EXTL2;
        }
        Header {
            version,
            cluster_bits: geometry.cluster_bits(),
            size,
            crypt_method: crypt::NONE,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: 0,
            refcount_table_clusters: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: geometry.refcount_order(),
            header_length: if version >= 3 { V3_HEADER_LENGTH } else { V2_HEADER_LENGTH },
            compression_type: 0,
            unknown_header_fields: Vec::new(),
            extensions: Extensions::default(),
            backing_file: None,
        }
    }

    /// Parses and validates cluster 0. `cluster0` holds at least the first
    /// cluster of the image (zero-filled past the end of a short file).
    pub fn parse(cluster0: &[u8]) -> Result<Header, FormatError> {
        Self::parse_inner(cluster0, true)
    }

    /// As [`Header::parse`], but the snapshot table's count and offset are
    /// left unchecked, and a refcount table of no clusters is taken: QEMU
    /// opens an image for `check` without those checks, and the check
    /// reports (and repairs) them itself.
    pub fn parse_for_check(cluster0: &[u8]) -> Result<Header, FormatError> {
        Self::parse_inner(cluster0, false)
    }

    fn parse_inner(cluster0: &[u8], strict: bool) -> Result<Header, FormatError> {
        let cluster_bits = peek_cluster_bits(cluster0)?;
        let cluster_size = 1u64 << cluster_bits;
        if (cluster0.len() as u64) < cluster_size {
            return Err(FormatError::Truncated {
                what: "qcow2 header cluster",
                needed: cluster_size,
                available: cluster0.len() as u64,
            });
        }
        let mut fixed = [0u8; RAW_HEADER_SIZE];
        fixed[..RAW_HEADER_SIZE].copy_from_slice(&cluster0[..RAW_HEADER_SIZE]);
        let version = be32(&fixed, 4);
        if version == 2 {
            // Version 2 headers end at byte 72; whatever follows is not header.
            fixed[V2_HEADER_LENGTH as usize..].fill(0);
        }
        let raw = RawHeader::read_from_bytes(&fixed[..]).expect("exact size");

        let (incompatible, compatible, autoclear, refcount_order, header_length) = if version == 2 {
            (0, 0, 0, 4, V2_HEADER_LENGTH)
        } else {
            let hl = raw.header_length.get();
            if hl < MIN_V3_HEADER_LENGTH {
                return Err(FormatError::HeaderTooShort(hl));
            }
            (
                raw.incompatible_features.get(),
                raw.compatible_features.get(),
                raw.autoclear_features.get(),
                raw.refcount_order.get(),
                hl,
            )
        };
        if u64::from(header_length) > cluster_size {
            return Err(FormatError::HeaderExceedsCluster { header_length, cluster_size });
        }
        if header_length % 8 != 0 {
            return Err(FormatError::HeaderLengthUnaligned(header_length));
        }
        let backing_file_offset = raw.backing_file_offset.get();
        if backing_file_offset > cluster_size {
            return Err(FormatError::BackingFileOffset { offset: backing_file_offset, cluster_size });
        }
        let ext_end = if backing_file_offset != 0 { backing_file_offset } else { cluster_size };

        let compression_type = if header_length > MIN_V3_HEADER_LENGTH { cluster0[104] } else { 0 };
        match compression_type {
            0 if incompatible & incompat::COMPRESSION != 0 => {
                return Err(FormatError::CompressionType(
                    "Compression type incompatible feature bit must not be set".into(),
                ))
            }
            0 => {}
            1 if incompatible & incompat::COMPRESSION == 0 => {
                return Err(FormatError::CompressionType(
                    "Compression type incompatible feature bit must be set".into(),
                ))
            }
            1 => {}
            other => return Err(FormatError::CompressionType(format!("unknown compression type: {other}"))),
        }

        if incompatible & !incompat::KNOWN != 0 {
            // Names come from the image's own table when it has one; a
            // damaged extension area must not hide the real complaint.
            let names = parse_extensions(cluster0, header_length as u64, ext_end, 0, cluster_size)
                .map(|e| e.feature_table)
                .unwrap_or_default();
            return Err(FormatError::UnsupportedFeatures(describe_unknown_incompatible(
                &names,
                incompatible & !incompat::KNOWN,
            )));
        }

        let extended_l2 = incompatible & incompat::EXTL2 != 0;
        if refcount_order > MAX_REFCOUNT_ORDER {
            // Subcluster size is checked first in QEMU.
            if extended_l2 && cluster_size / u64::from(SUBCLUSTERS_PER_CLUSTER) < 512 {
                return Err(FormatError::SubclusterSize(cluster_size / u64::from(SUBCLUSTERS_PER_CLUSTER)));
            }
            return Err(FormatError::RefcountOrder(refcount_order));
        }
        let geometry = Geometry::new(cluster_bits, refcount_order, extended_l2)?;

        let crypt_method = raw.crypt_method.get();
        if crypt_method > crypt::LUKS {
            return Err(FormatError::CryptMethod(crypt_method));
        }

        let refcount_table_clusters = raw.refcount_table_clusters.get();
        if refcount_table_clusters == 0 && strict {
            return Err(FormatError::NoRefcountTable);
        }
        let refcount_table_offset = raw.refcount_table_offset.get();
        validate_table(
            "Reference count table",
            refcount_table_offset,
            u64::from(refcount_table_clusters),
            cluster_size,
            MAX_REFTABLE_BYTES,
            cluster_size,
        )?;
        let nb_snapshots = raw.nb_snapshots.get();
        let snapshots_offset = raw.snapshots_offset.get();
        if strict {
            validate_snapshot_table("Snapshot table", snapshots_offset, nb_snapshots, cluster_size)?;
        }
        let l1_size = raw.l1_size.get();
        let l1_table_offset = raw.l1_table_offset.get();
        validate_table("Active L1 table", l1_table_offset, u64::from(l1_size), 8, MAX_L1_BYTES, cluster_size)?;
        let size = raw.size.get();
        let needed = geometry.l1_entries_for(size);
        if needed > MAX_L1_INDEX {
            return Err(FormatError::ImageTooBig(size));
        }
        if u64::from(l1_size) < needed {
            return Err(FormatError::L1TooSmall { l1_size, needed, size });
        }

        let extensions = parse_extensions(cluster0, header_length as u64, ext_end, autoclear, cluster_size)?;
        if extensions.crypto.is_some() && crypt_method != crypt::LUKS {
            return Err(FormatError::CryptoExtension(
                "CRYPTO header extension only expected with LUKS encryption method",
            ));
        }
        if crypt_method == crypt::LUKS && extensions.crypto.is_none() {
            return Err(FormatError::CryptoExtension("Missing CRYPTO header for crypt method 2"));
        }

        let backing_file = if backing_file_offset != 0 {
            let len = raw.backing_file_size.get();
            if u64::from(len) > u64::from(MAX_BACKING_NAME).min(cluster_size - backing_file_offset) {
                return Err(FormatError::BackingNameTooLong(len));
            }
            let start = backing_file_offset as usize;
            let bytes = &cluster0[start..start + len as usize];
            // QEMU stores the name as a C string: it ends at the first NUL.
            let bytes = bytes.split(|b| *b == 0).next().unwrap_or(&[]);
            Some(String::from_utf8(bytes.to_vec()).map_err(|_| FormatError::BackingNameEncoding)?)
        } else {
            None
        };

        let unknown_header_fields = if header_length > V3_HEADER_LENGTH {
            cluster0[V3_HEADER_LENGTH as usize..header_length as usize].to_vec()
        } else {
            Vec::new()
        };

        Ok(Header {
            version,
            cluster_bits,
            size,
            crypt_method,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            snapshots_offset,
            incompatible_features: incompatible,
            compatible_features: compatible,
            autoclear_features: autoclear,
            refcount_order,
            header_length,
            compression_type,
            unknown_header_fields,
            extensions,
            backing_file,
        })
    }

    /// Checks that the tables the header names lie inside a file of
    /// `file_len` bytes and not on the header cluster. QEMU reads past the
    /// end of the file as zeros here; we refuse, naming the table, except
    /// for the active L1 table: QEMU reads a truncated one with its missing
    /// entries as zeros (unallocated), which is what lets `check -r all`
    /// repair such an image, so the engine reads it that way too. With
    /// `past_eof_as_zeros` (the opens of `check` and read-only opens) the
    /// refcount table may run past the end as well, read as zeros, or lie
    /// on the header, so that check reports such an image as QEMU's does
    /// and its repair rebuilds the refcounts, and a damaged or truncated
    /// image can be read and converted.
    pub fn validate_against_file(&self, file_len: u64, past_eof_as_zeros: bool) -> Result<(), FormatError> {
        let cs = self.cluster_size();
        let tables = [
            ("Reference count table", self.refcount_table_offset, u64::from(self.refcount_table_clusters) * cs, true),
            ("Active L1 table", self.l1_table_offset, u64::from(self.l1_size) * 8, false),
        ];
        for (table, offset, length, inside) in tables {
            if length == 0 {
                continue;
            }
            if offset == 0 && !(inside && past_eof_as_zeros) {
                return Err(FormatError::TableOverlapsHeader { table, offset });
            }
            if inside && !past_eof_as_zeros && offset + length > file_len {
                return Err(FormatError::TablePastEof { table, offset, length, file_len });
            }
        }
        if let Some(c) = &self.extensions.crypto {
            if c.offset == 0 {
                return Err(FormatError::TableOverlapsHeader { table: "Encryption header", offset: 0 });
            }
            if c.offset.saturating_add(c.length) > file_len {
                return Err(FormatError::TablePastEof {
                    table: "Encryption header",
                    offset: c.offset,
                    length: c.length,
                    file_len,
                });
            }
        }
        Ok(())
    }

    /// Checks that the snapshot table lies inside a file of `file_len`
    /// bytes and not on the header cluster (left out for `check`, which
    /// reads the table as QEMU does: past the end of the file as zeros).
    pub fn validate_snapshots_against_file(&self, file_len: u64) -> Result<(), FormatError> {
        if self.nb_snapshots > 0 {
            if self.snapshots_offset == 0 {
                return Err(FormatError::TableOverlapsHeader { table: "Snapshot table", offset: 0 });
            }
            let min_len = u64::from(self.nb_snapshots) * SNAPSHOT_HEADER_SIZE;
            if self.snapshots_offset.saturating_add(min_len) > file_len {
                return Err(FormatError::TablePastEof {
                    table: "Snapshot table",
                    offset: self.snapshots_offset,
                    length: min_len,
                    file_len,
                });
            }
        }
        Ok(())
    }

    /// Writes cluster 0 as QEMU's `qcow2_update_header` does: the fixed
    /// header, unknown header fields, the backing format, data file and
    /// crypto extensions, the feature name table (v3 with clusters over
    /// 4 KiB), the bitmaps extension, unknown extensions, the end marker and
    /// the backing file name. Also updates `header_length` and returns the
    /// full cluster.
    pub fn serialize(&mut self) -> Result<Vec<u8>, FormatError> {
        let cluster_size = self.cluster_size();
        let mut buf = Vec::with_capacity(cluster_size as usize);
        let fixed_len = if self.version >= 3 { V3_HEADER_LENGTH } else { V2_HEADER_LENGTH };
        let header_length = if self.version >= 3 {
            let extra = u32::try_from(self.unknown_header_fields.len()).map_err(|_| FormatError::FieldOverflow {
                field: "header_length",
                value: self.unknown_header_fields.len() as u64,
            })?;
            V3_HEADER_LENGTH + extra
        } else {
            V2_HEADER_LENGTH
        };
        self.header_length = header_length;
        let raw = RawHeader {
            magic: QCOW_MAGIC.into(),
            version: self.version.into(),
            backing_file_offset: 0.into(),
            backing_file_size: 0.into(),
            cluster_bits: self.cluster_bits.into(),
            size: self.size.into(),
            crypt_method: self.crypt_method.into(),
            l1_size: self.l1_size.into(),
            l1_table_offset: self.l1_table_offset.into(),
            refcount_table_offset: self.refcount_table_offset.into(),
            refcount_table_clusters: self.refcount_table_clusters.into(),
            nb_snapshots: self.nb_snapshots.into(),
            snapshots_offset: self.snapshots_offset.into(),
            incompatible_features: self.incompatible_features.into(),
            compatible_features: self.compatible_features.into(),
            autoclear_features: self.autoclear_features.into(),
            refcount_order: self.refcount_order.into(),
            header_length: header_length.into(),
        };
        buf.extend_from_slice(raw.as_bytes());
        if self.version >= 3 {
            buf.push(self.compression_type);
        }
        buf.resize(fixed_len as usize, 0);
        buf.extend_from_slice(&self.unknown_header_fields);

        if let Some(fmt) = &self.extensions.backing_format {
            push_extension(&mut buf, ext::BACKING_FORMAT, fmt.as_bytes());
        }
        if let Some(name) = &self.extensions.data_file {
            push_extension(&mut buf, ext::DATA_FILE, name.as_bytes());
        }
        if let Some(c) = &self.extensions.crypto {
            let mut data = Vec::with_capacity(16);
            data.extend_from_slice(&c.offset.to_be_bytes());
            data.extend_from_slice(&c.length.to_be_bytes());
            push_extension(&mut buf, ext::CRYPTO, &data);
        }
        if self.version >= 3 && cluster_size > 4096 {
            push_extension(&mut buf, ext::FEATURE_TABLE, &qemu_feature_table());
        }
        if let Some(b) = &self.extensions.bitmaps {
            let mut data = Vec::with_capacity(24);
            data.extend_from_slice(&b.nb_bitmaps.to_be_bytes());
            data.extend_from_slice(&0u32.to_be_bytes());
            data.extend_from_slice(&b.directory_size.to_be_bytes());
            data.extend_from_slice(&b.directory_offset.to_be_bytes());
            push_extension(&mut buf, ext::BITMAPS, &data);
        }
        for u in &self.extensions.unknown {
            push_extension(&mut buf, u.magic, &u.data);
        }
        push_extension(&mut buf, ext::END, &[]);
        if let Some(name) = &self.backing_file {
            if name.len() > MAX_BACKING_NAME as usize {
                return Err(FormatError::BackingNameTooLong(name.len() as u32));
            }
            let offset = buf.len() as u64;
            buf.extend_from_slice(name.as_bytes());
            buf[8..16].copy_from_slice(&offset.to_be_bytes());
            buf[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        }
        if buf.len() as u64 > cluster_size {
            return Err(FormatError::HeaderTooLarge { needed: buf.len() as u64, cluster_size });
        }
        buf.resize(cluster_size as usize, 0);
        Ok(buf)
    }
}

mod extensions;
#[cfg(test)]
mod tests;

use extensions::{describe_unknown_incompatible, parse_extensions, push_extension, qemu_feature_table};
pub use extensions::{BitmapsExtension, CryptoExtension, Extensions, FeatureName, FeatureType, UnknownExtension};

/// Byte position and encoding of the `refcount_table_offset` and
/// `refcount_table_clusters` fields, for the one in-place header update that
/// refcount table growth makes (as QEMU does, without rewriting cluster 0).
pub fn refcount_table_fields(offset: u64, clusters: u32) -> (u64, [u8; 12]) {
    let mut b = [0u8; 12];
    b[..8].copy_from_slice(&offset.to_be_bytes());
    b[8..].copy_from_slice(&clusters.to_be_bytes());
    (48, b)
}

/// Byte position and encoding of `incompatible_features`, for setting the
/// dirty bit in place before the first write with lazy refcounts.
pub fn incompatible_features_field(features: u64) -> (u64, [u8; 8]) {
    (72, features.to_be_bytes())
}

/// The header field `nb_snapshots` as written in place (QEMU's repair of
/// a snapshot table with overhanging entries rewrites only this field).
pub fn nb_snapshots_field(count: u32) -> (u64, [u8; 4]) {
    (60, count.to_be_bytes())
}
