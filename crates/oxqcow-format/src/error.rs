//! The one error type of the format layer.
//!
//! Where QEMU has a message for a condition, the text is QEMU's exactly
//! (tools and QEMU's own tests match qemu-img's errors), and the variant's
//! fields keep the offending values for callers. Where QEMU says nothing
//! useful or accepts what is refused here, the message names the field,
//! its value and where it is.

use thiserror::Error;

/// What is wrong with the bytes of an image.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FormatError {
    /// Fewer bytes than a structure needs.
    #[error("{what} is truncated: need {needed} bytes, have {available}")]
    Truncated {
        /// The structure being parsed.
        what: &'static str,
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// The magic is not `QFI\xfb`.
    #[error("Image is not in qcow2 format")]
    BadMagic {
        /// The magic found.
        found: u32,
    },
    /// `version` is neither 2 nor 3.
    #[error("Unsupported qcow2 version {0}")]
    UnsupportedVersion(u32),
    /// `cluster_bits` outside 9..=21.
    #[error("Unsupported cluster size: 2^{0}")]
    ClusterBits(u32),
    /// v3 `header_length` below 104.
    #[error("qcow2 header too short")]
    HeaderTooShort(u32),
    /// `header_length` larger than the cluster.
    #[error("qcow2 header exceeds cluster size")]
    HeaderExceedsCluster {
        /// The header length field.
        header_length: u32,
        /// The cluster size.
        cluster_size: u64,
    },
    /// `header_length` not a multiple of 8 (the spec requires it; QEMU does not check).
    #[error("qcow2 header_length {0} is not a multiple of 8")]
    HeaderLengthUnaligned(u32),
    /// `backing_file_offset` outside cluster 0.
    #[error("Invalid backing file offset")]
    BackingFileOffset {
        /// The field.
        offset: u64,
        /// The cluster size.
        cluster_size: u64,
    },
    /// Backing file name longer than 1023 bytes or past cluster 0.
    #[error("Backing file name too long")]
    BackingNameTooLong(u32),
    /// Backing file name is not UTF-8.
    #[error("Backing file name is not valid UTF-8")]
    BackingNameEncoding,
    /// A header extension runs past the end of the extension area.
    #[error("Header extension too large")]
    ExtensionTooLarge {
        /// The extension type.
        magic: u32,
        /// Where its data starts.
        offset: u64,
        /// The length field.
        length: u32,
    },
    /// An extension type appears twice.
    #[error("Header extension 0x{0:08x} appears more than once")]
    DuplicateExtension(u32),
    /// A known extension has the wrong size or content.
    #[error("Invalid header extension 0x{magic:08x}: {reason}")]
    InvalidExtension {
        /// The extension type.
        magic: u32,
        /// What is wrong.
        reason: String,
    },
    /// Unknown incompatible feature bits.
    #[error("Unsupported qcow2 feature(s): {0}")]
    UnsupportedFeatures(String),
    /// `refcount_order` above 6.
    #[error("Reference count entry width too large; may not exceed 64 bits")]
    RefcountOrder(u32),
    /// A LUKS header field is invalid (QEMU's message where it has one).
    #[error("{0}")]
    Luks(String),
    /// A qcow (version 1) header field is invalid (QEMU's message).
    #[error("{0}")]
    Qcow(String),
    /// The CRYPTO header extension and `crypt_method` disagree (QEMU's
    /// messages, which name no extension number).
    #[error("{0}")]
    CryptoExtension(&'static str),
    /// `crypt_method` above 2.
    #[error("Unsupported encryption method: {0}")]
    CryptMethod(u32),
    /// The compression type is unknown or disagrees with incompatible bit 3.
    #[error("qcow2: {0}")]
    CompressionType(String),
    /// Extended L2 with clusters too small for 512-byte subclusters.
    #[error("Unsupported subcluster size: {0}")]
    SubclusterSize(u64),
    /// `refcount_table_clusters` is 0.
    #[error("Image does not contain a reference count table")]
    NoRefcountTable,
    /// A table is larger than its limit.
    #[error("{table} too large")]
    TableTooLarge {
        /// Which table.
        table: &'static str,
        /// Its entry count.
        entries: u64,
        /// Bytes per entry.
        entry_size: u64,
        /// The limit in bytes.
        limit: u64,
    },
    /// A table offset is unaligned or the table would end past `i64::MAX`.
    #[error("{table} offset invalid")]
    TableOffset {
        /// Which table.
        table: &'static str,
        /// The offset.
        offset: u64,
    },
    /// A table lies (partly) past the end of the image file.
    #[error("{table} at offset 0x{offset:x} with {length} bytes lies past the end of the file ({file_len} bytes)")]
    TablePastEof {
        /// Which table.
        table: &'static str,
        /// The offset.
        offset: u64,
        /// The table size in bytes.
        length: u64,
        /// The file length.
        file_len: u64,
    },
    /// A table overlaps the header cluster.
    #[error("{table} at offset 0x{offset:x} overlaps the image header")]
    TableOverlapsHeader {
        /// Which table.
        table: &'static str,
        /// The offset.
        offset: u64,
    },
    /// The guest size makes L1 index arithmetic overflow.
    #[error("Image is too big")]
    ImageTooBig(u64),
    /// The active L1 is too small for the guest size.
    #[error("L1 table is too small")]
    L1TooSmall {
        /// The l1_size field.
        l1_size: u32,
        /// Entries needed.
        needed: u64,
        /// The guest size.
        size: u64,
    },
    /// A table entry has reserved bits set or an unaligned offset.
    #[error("{table} entry 0x{entry:016x} is invalid: {reason}")]
    InvalidEntry {
        /// Which table.
        table: &'static str,
        /// The raw entry.
        entry: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A snapshot table entry is malformed.
    #[error("Snapshot table entry {index} is invalid: {reason}")]
    InvalidSnapshot {
        /// Position in the table.
        index: u32,
        /// What is wrong.
        reason: String,
    },
    /// A snapshot table entry has more extra data than QEMU accepts (QEMU's
    /// text and hint; `check -r all` cuts it to the limit).
    #[error(
        "Too much extra metadata in snapshot table entry {index}\nYou can force-remove this extra metadata with qemu-img check -r all"
    )]
    SnapshotExtraData {
        /// Position in the table.
        index: u32,
    },
    /// The snapshot table grows past 64 MiB (QEMU's text and hint; `check
    /// -r all` drops the entries from the one that crosses the limit).
    #[error(
        "Snapshot table is too big\nYou can force-remove all {overhanging} overhanging snapshots with qemu-img check -r all"
    )]
    SnapshotTableTooBig {
        /// Entries from the one that crosses the limit to the end.
        overhanging: u32,
    },
    /// A value does not fit a header field.
    #[error("{field} value {value} does not fit the header")]
    FieldOverflow {
        /// The field.
        field: &'static str,
        /// The value.
        value: u64,
    },
    /// The header with its extensions and backing name does not fit cluster 0.
    #[error("The header does not fit in the first cluster ({needed} bytes needed, cluster size {cluster_size})")]
    HeaderTooLarge {
        /// Bytes needed.
        needed: u64,
        /// The cluster size.
        cluster_size: u64,
    },
    /// The bitmap directory or a bitmap is invalid (QEMU's messages).
    #[error("{0}")]
    Bitmap(String),
}
