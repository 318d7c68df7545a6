//! Named limits on every size read from an image.
//!
//! Each bound says where it comes from. They are checked where the field is
//! parsed, before any arithmetic or allocation that depends on it, so that a
//! hostile header can neither overflow a computation nor make us allocate
//! memory in proportion to a number it chose.

/// Smallest cluster: 512 bytes (`MIN_CLUSTER_BITS` in QEMU, the spec's lower bound).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster: 2 MiB (`MAX_CLUSTER_BITS` in QEMU; larger clusters are refused there).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Extended L2 entries split a cluster into this many subclusters (spec).
pub const SUBCLUSTERS_PER_CLUSTER: u32 = 32;

/// Length of a version 2 header: the fields up to `snapshots_offset`.
pub const V2_HEADER_LENGTH: u32 = 72;
/// The smallest valid version 3 `header_length` (spec: fields up to `header_length`).
pub const MIN_V3_HEADER_LENGTH: u32 = 104;
/// The version 3 header as QEMU writes it: 104 bytes, the compression type
/// byte and 7 bytes of padding.
pub const V3_HEADER_LENGTH: u32 = 112;

/// The active L1 table may use at most 32 MiB (QEMU's `QCOW_MAX_L1_SIZE`).
pub const MAX_L1_BYTES: u64 = 32 * 1024 * 1024;
/// The refcount table may use at most 8 MiB (QEMU's `QCOW_MAX_REFTABLE_SIZE`).
pub const MAX_REFTABLE_BYTES: u64 = 8 * 1024 * 1024;

/// At most this many internal snapshots (QEMU's `QCOW_MAX_SNAPSHOTS`).
pub const MAX_SNAPSHOTS: u32 = 65536;
/// The snapshot table may use at most 64 MiB (QEMU's `QCOW_MAX_SNAPSHOTS_SIZE`:
/// 1 KiB per entry on average).
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 * 1024 * 1024;
/// Extra data of one snapshot entry is at most 1 KiB (QEMU's
/// `QCOW_MAX_SNAPSHOT_EXTRA_DATA`).
pub const MAX_SNAPSHOT_EXTRA_DATA: u32 = 1024;
/// Size of the fixed part of a snapshot table entry.
pub const SNAPSHOT_HEADER_SIZE: u64 = 40;

/// A backing file name is at most 1023 bytes (QEMU keeps it in a 1024-byte buffer).
pub const MAX_BACKING_NAME: u32 = 1023;
/// A backing format name is at most 15 bytes (QEMU keeps it in a 16-byte buffer).
pub const MAX_BACKING_FORMAT_NAME: u32 = 15;

/// Refcount width is `1 << refcount_order` bits, at most 64 (spec).
pub const MAX_REFCOUNT_ORDER: u32 = 6;

/// QEMU keeps every offset below `i64::MAX` because it passes them to
/// functions taking signed 64-bit offsets; we use the same bound so that
/// `offset + length` can never overflow in either implementation.
pub const MAX_OFFSET: u64 = i64::MAX as u64;

/// The end of the last byte QEMU's block layer reads or writes
/// (`BDRV_MAX_LENGTH`: `i64::MAX` aligned down to 1 GiB): a request past it
/// fails with EIO before it reaches the file, where one past the file's
/// end but below this reads zeros.
pub const MAX_REQUEST_END: u64 = (i64::MAX as u64) & !((1 << 30) - 1);

/// QEMU refuses guest sizes whose L1 index does not fit an `int`
/// ("Image is too big").
pub const MAX_L1_INDEX: u64 = i32::MAX as u64;

/// Host offsets in standard L1/L2/refcount entries occupy bits 9..=55.
pub const HOST_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Largest number of bitmaps QEMU accepts (`QCOW2_MAX_BITMAPS`).
pub const MAX_BITMAPS: u32 = 65535;
/// Largest bitmap directory QEMU accepts (`QCOW2_MAX_BITMAP_DIRECTORY_SIZE`:
/// 1 KiB per bitmap, just under 64 MiB).
pub const MAX_BITMAP_DIRECTORY_BYTES: u64 = 1024 * MAX_BITMAPS as u64;
/// Fixed part of a bitmap directory entry.
pub const BITMAP_DIR_ENTRY_HEADER: usize = 24;
/// A bitmap name is at most 1023 bytes (QEMU's `BME_MAX_NAME_SIZE`).
pub const MAX_BITMAP_NAME: usize = 1023;
/// A bitmap table has at most this many entries (`BME_MAX_TABLE_SIZE`).
pub const MAX_BITMAP_TABLE_ENTRIES: u32 = 0x800_0000;
/// Serialized bitmap data is at most 512 MiB (`BME_MAX_PHYS_SIZE`, which
/// bounds a bitmap's size in memory).
pub const MAX_BITMAP_PHYS_BYTES: u64 = 0x2000_0000;
/// Smallest bitmap granularity: 512 bytes per bit (`BME_MIN_GRANULARITY_BITS`).
pub const MIN_BITMAP_GRANULARITY_BITS: u32 = 9;
/// Largest bitmap granularity: 2 GiB per bit (`BME_MAX_GRANULARITY_BITS`).
pub const MAX_BITMAP_GRANULARITY_BITS: u32 = 31;
