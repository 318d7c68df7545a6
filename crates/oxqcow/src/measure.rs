//! Space estimates for new images (`qemu-img measure`): qcow2's, raw's and
//! luks's.
//!
//! The numbers follow QEMU's `qcow2_measure` so that `oxqcow measure` and
//! `qemu-img measure` agree byte for byte:
//!
//! - *fully allocated*: one header cluster, every L2 table the disk needs,
//!   the L1 table rounded up to whole clusters, every data cluster, and the
//!   refcount blocks and table that count all of those (and themselves);
//! - *required*: the same metadata, but only the data clusters the source
//!   actually holds (all of them with `falloc`/`full` preallocation).
//!
//! The estimate is pure arithmetic on the geometry; [`data_bytes`] provides
//! the one input that needs the source image.

use crate::error::{Error, Result};
use crate::image::BlockDevice;
use oxqcow_format::luks::{HashAlg, IvGenAlg, LuksHeader};

use crate::options::{Compat, LuksParams, Preallocation};

/// Bytes per L1 entry.
const L1_ENTRY_BYTES: u64 = 8;
/// Bytes per refcount table entry.
const REFTABLE_ENTRY_BYTES: u64 = 8;
/// Bytes per standard L2 entry.
const L2_ENTRY_BYTES: u64 = 8;
/// Bytes per extended L2 entry (entry plus subcluster bitmap).
const L2_ENTRY_BYTES_EXTENDED: u64 = 16;
/// QEMU's bound on the L1 table (`QCOW_MAX_L1_SIZE`, 32 MiB).
const MAX_L1_BYTES: u64 = 32 << 20;
/// Smallest cluster size (QEMU's `MIN_CLUSTER_BITS` = 9).
const MIN_CLUSTER_SIZE: u64 = 512;
/// Largest cluster size (QEMU's `MAX_CLUSTER_BITS` = 21).
const MAX_CLUSTER_SIZE: u64 = 2 << 20;
/// Subclusters per cluster with extended L2 entries; each must be at least
/// `MIN_CLUSTER_SIZE` bytes.
const SUBCLUSTERS_PER_CLUSTER: u64 = 32;
/// Bytes queried per block-status call while scanning a source.
const STATUS_CHUNK: u64 = 1 << 30;
/// Raw images are sized in whole sectors.
const SECTOR: u64 = 512;

/// The layout choices of a qcow2 image that decide its metadata size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Qcow2Layout {
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Extended (128-bit) L2 entries.
    pub extended_l2: bool,
    /// Compatibility level (only validated: v2 requires 16-bit refcounts).
    pub compat: Compat,
}

impl Default for Qcow2Layout {
    fn default() -> Self {
        Qcow2Layout { cluster_size: 65536, refcount_bits: 16, extended_l2: false, compat: Compat::V3 }
    }
}

impl Qcow2Layout {
    /// Checks the layout with QEMU's messages (in `qcow2_measure`'s order).
    pub fn validate(&self) -> Result<()> {
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&cs) {
            return Err(Error::InvalidArgument(format!(
                "Cluster size must be a power of two between {MIN_CLUSTER_SIZE} and {}k",
                MAX_CLUSTER_SIZE >> 10
            )));
        }
        if self.extended_l2 && cs < MIN_CLUSTER_SIZE * SUBCLUSTERS_PER_CLUSTER {
            return Err(Error::InvalidArgument(format!(
                "Extended L2 entries are only supported with cluster sizes of at least {} bytes",
                MIN_CLUSTER_SIZE * SUBCLUSTERS_PER_CLUSTER
            )));
        }
        if self.refcount_bits > 64 || !self.refcount_bits.is_power_of_two() {
            return Err(Error::InvalidArgument(
                "Refcount width must be a power of two and may not exceed 64 bits".into(),
            ));
        }
        if self.compat == Compat::V2 && self.refcount_bits != 16 {
            return Err(Error::InvalidArgument(
                "Different refcount widths than 16 bits require compatibility level 1.1 or above \
                 (use compat=1.1 or greater)"
                    .into(),
            ));
        }
        Ok(())
    }

    fn l2_entry_bytes(&self) -> u64 {
        if self.extended_l2 {
            L2_ENTRY_BYTES_EXTENDED
        } else {
            L2_ENTRY_BYTES
        }
    }
}

/// The two sizes `qemu-img measure` reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Measurement {
    /// Bytes the new image needs for the source's data and all metadata.
    pub required: u64,
    /// Bytes the new image needs with every cluster allocated.
    pub fully_allocated: u64,
}

/// Bytes of refcount blocks and refcount table needed to count `clusters`
/// clusters plus the refcount structures themselves (QEMU's
/// `qcow2_refcount_metadata_size` without the generous increase): the
/// smallest fixed point where adding the blocks and table clusters needs no
/// further block or table cluster.
pub fn refcount_metadata_bytes(clusters: u64, cluster_size: u64, refcount_bits: u32) -> u64 {
    let per_table_cluster = cluster_size / REFTABLE_ENTRY_BYTES;
    let per_block = cluster_size * 8 / u64::from(refcount_bits);
    let (mut table, mut blocks) = (0u64, 0u64);
    let mut total = clusters;
    loop {
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        let next = clusters + blocks + table;
        if next == total {
            break;
        }
        total = next;
    }
    (blocks + table) * cluster_size
}

/// Bytes of a qcow2 image of `virtual_size` bytes with every cluster
/// allocated, metadata included (QEMU's `qcow2_calc_prealloc_size`).
pub fn fully_allocated_bytes(virtual_size: u64, layout: &Qcow2Layout) -> u64 {
    let cs = layout.cluster_size;
    let l2e = layout.l2_entry_bytes();
    let data = virtual_size.div_ceil(cs) * cs;
    // The header cluster.
    let mut meta = cs;
    // Every L2 table, each one cluster of entries.
    let l2_entries = (data / cs).div_ceil(cs / l2e) * (cs / l2e);
    meta += l2_entries * l2e;
    // The L1 table, rounded up to whole clusters.
    let l1_entries = (l2_entries * l2e / cs).div_ceil(cs / L1_ENTRY_BYTES) * (cs / L1_ENTRY_BYTES);
    meta += l1_entries * L1_ENTRY_BYTES;
    meta += refcount_metadata_bytes((meta + data) / cs, cs, layout.refcount_bits);
    meta + data
}

/// Whether a disk of `virtual_size` bytes fits the 32 MiB L1 table limit.
pub fn check_virtual_size(virtual_size: u64, layout: &Qcow2Layout) -> Result<()> {
    let cs = layout.cluster_size;
    let clusters = virtual_size.div_ceil(cs);
    let l2_tables = clusters.div_ceil(cs / layout.l2_entry_bytes());
    if l2_tables.saturating_mul(L1_ENTRY_BYTES) > MAX_L1_BYTES {
        return Err(Error::InvalidArgument("The image size is too large (try using a larger cluster size)".into()));
    }
    Ok(())
}

/// Measures a new qcow2 image of `virtual_size` bytes that will receive
/// `data_bytes` bytes of data clusters (`None` when nothing is copied into
/// it, as for `--size`).
pub fn measure_qcow2(
    virtual_size: u64,
    data_bytes: Option<u64>,
    layout: &Qcow2Layout,
    preallocation: Preallocation,
) -> Result<Measurement> {
    layout.validate()?;
    check_virtual_size(virtual_size, layout)?;
    let cs = layout.cluster_size;
    let aligned = virtual_size.div_ceil(cs) * cs;
    let data = match preallocation {
        Preallocation::Full | Preallocation::Falloc => aligned,
        Preallocation::Off | Preallocation::Metadata => data_bytes.unwrap_or(0).min(aligned),
    };
    let fully_allocated = fully_allocated_bytes(virtual_size, layout);
    Ok(Measurement { required: fully_allocated - aligned + data, fully_allocated })
}

/// Measures a new raw image: a raw file needs its whole length either way.
/// `source_len` is the length of a source image; without one, `size` is
/// rounded up to whole sectors as QEMU does.
pub fn measure_raw(size: u64, source_len: Option<u64>) -> Measurement {
    let bytes = source_len.unwrap_or_else(|| size.div_ceil(SECTOR) * SECTOR);
    Measurement { required: bytes, fully_allocated: bytes }
}

/// Where the payload of a LUKS header with these parameters starts (QEMU's
/// `qcrypto_block_calculate_payload_offset`): the header and its eight key
/// slots, laid out as creation lays them out.
pub fn luks_payload_offset(params: &LuksParams) -> u64 {
    let ivgen_hash = match params.ivgen_alg {
        IvGenAlg::Essiv => Some(params.ivgen_hash_alg.unwrap_or(HashAlg::Sha256)),
        _ => params.ivgen_hash_alg,
    };
    LuksHeader::layout(params.cipher_alg, params.cipher_mode, params.ivgen_alg, ivgen_hash, params.hash_alg, "")
        .payload_offset()
}

/// Measures a new luks image of `size` bytes (the source's length when
/// there is one): every payload sector is written, allocated or not, so
/// both sizes are the header area plus the disk (QEMU's
/// `block_crypto_measure`).
pub fn measure_luks(params: &LuksParams, size: u64) -> Measurement {
    let bytes = luks_payload_offset(params) + size;
    Measurement { required: bytes, fully_allocated: bytes }
}

/// Bytes of data clusters (of `cluster_size`) that copying `source` into a
/// new image would allocate: every cluster that holds data which is not
/// known to read as zeros, counted whole (QEMU's accounting of the input
/// image in `qcow2_measure`).
pub fn data_bytes(source: &dyn BlockDevice, cluster_size: u64) -> Result<u64> {
    if cluster_size == 0 {
        return Err(Error::InvalidArgument("cluster size 0".into()));
    }
    let size = source.len();
    let mut counted_end = 0u64;
    let mut total = 0u64;
    let mut pos = 0u64;
    while pos < size {
        let len = (size - pos).min(STATUS_CHUNK);
        for e in source.block_status(pos, len)? {
            if !e.data || e.zero || e.length == 0 {
                continue;
            }
            let start = (e.offset / cluster_size * cluster_size).max(counted_end);
            let end = (e.offset + e.length).div_ceil(cluster_size) * cluster_size;
            if end > start {
                total += end - start;
                counted_end = end;
            }
        }
        pos += len;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extent::Extent;

    fn layout(cluster_size: u64, refcount_bits: u32) -> Qcow2Layout {
        Qcow2Layout { cluster_size, refcount_bits, ..Default::default() }
    }

    #[test]
    fn one_gib_default_layout() {
        // 1 GiB, 64 KiB clusters: header + 16384*8 bytes of L2 (2 tables) +
        // one L1 cluster + 1 refcount block + 1 table cluster.
        let m = measure_qcow2(1 << 30, None, &layout(65536, 16), Preallocation::Off).unwrap();
        assert_eq!(m.fully_allocated, (1 << 30) + 6 * 65536);
        assert_eq!(m.required, 6 * 65536);
    }

    #[test]
    fn zero_size() {
        // No L1 or L2 tables: the header and the refcounts for it.
        let m = measure_qcow2(0, None, &layout(65536, 16), Preallocation::Off).unwrap();
        assert_eq!(m.fully_allocated, 3 * 65536);
        assert_eq!(m.required, m.fully_allocated);
    }

    #[test]
    fn refcount_fixed_point_counts_itself() {
        // 1-bit refcounts in 512-byte clusters: 4096 clusters per block.
        // 4096 clusters need a second block once the block and table
        // clusters are counted too.
        assert_eq!(refcount_metadata_bytes(4094, 512, 1), 2 * 512);
        assert_eq!(refcount_metadata_bytes(4095, 512, 1), 3 * 512);
        assert_eq!(refcount_metadata_bytes(0, 65536, 16), 0);
        assert_eq!(refcount_metadata_bytes(1, 65536, 16), 2 * 65536);
    }

    #[test]
    fn preallocation_counts_all_data() {
        let l = layout(65536, 16);
        let full = measure_qcow2(1 << 30, None, &l, Preallocation::Full).unwrap();
        assert_eq!(full.required, full.fully_allocated);
        let falloc = measure_qcow2(1 << 30, Some(0), &l, Preallocation::Falloc).unwrap();
        assert_eq!(falloc, full);
        let meta = measure_qcow2(1 << 30, None, &l, Preallocation::Metadata).unwrap();
        assert_eq!(meta.required, full.fully_allocated - (1 << 30));
    }

    #[test]
    fn source_data_is_added() {
        let l = layout(65536, 16);
        let m = measure_qcow2(64 << 20, Some(4 * 65536), &l, Preallocation::Off).unwrap();
        let none = measure_qcow2(64 << 20, None, &l, Preallocation::Off).unwrap();
        assert_eq!(m.required, none.required + 4 * 65536);
        assert_eq!(m.fully_allocated, none.fully_allocated);
    }

    #[test]
    fn extended_l2_doubles_l2_tables() {
        let std = fully_allocated_bytes(1 << 40, &layout(65536, 16));
        let ext = fully_allocated_bytes(1 << 40, &Qcow2Layout { extended_l2: true, ..layout(65536, 16) });
        // 1 TiB: 16 Mi clusters, 128 MiB of standard L2 entries; the L1
        // table and the refcounts keep their size.
        assert_eq!(ext - std, 128 << 20);
        assert_eq!(std - (1 << 40), 2564 * 65536);
    }

    #[test]
    fn validation_messages() {
        let err = |l: Qcow2Layout| measure_qcow2(1 << 20, None, &l, Preallocation::Off).unwrap_err().to_string();
        assert!(err(layout(3072, 16)).starts_with("Cluster size must be a power of two"));
        assert!(err(layout(65536, 3)).starts_with("Refcount width must be"));
        assert!(err(layout(65536, 128)).starts_with("Refcount width must be"));
        assert!(err(Qcow2Layout { extended_l2: true, ..layout(4096, 16) }).contains("at least 16384 bytes"));
        assert!(err(Qcow2Layout { compat: Compat::V2, ..layout(65536, 8) }).contains("compat=1.1"));
        let big = measure_qcow2(100 << 40, None, &layout(4096, 16), Preallocation::Off).unwrap_err();
        assert!(big.to_string().contains("too large"));
    }

    #[test]
    fn raw_rounds_to_sectors() {
        assert_eq!(measure_raw(1000, None), Measurement { required: 1024, fully_allocated: 1024 });
        assert_eq!(measure_raw(0, Some(1001)), Measurement { required: 1001, fully_allocated: 1001 });
    }

    /// A device whose block status is a fixed list of extents.
    struct Fake(Vec<Extent>, u64);
    impl BlockDevice for Fake {
        fn len(&self) -> u64 {
            self.1
        }
        fn read_at(&self, _: &mut [u8], _: u64) -> Result<()> {
            unreachable!()
        }
        fn write_at(&self, _: &[u8], _: u64) -> Result<()> {
            unreachable!()
        }
        fn write_zeroes_at(&self, _: u64, _: u64, _: bool) -> Result<()> {
            unreachable!()
        }
        fn discard(&self, _: u64, _: u64) -> Result<()> {
            unreachable!()
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
            Ok(self.0.iter().filter(|e| e.offset < offset + len && e.offset + e.length > offset).cloned().collect())
        }
        fn is_read_only(&self) -> bool {
            true
        }
    }

    fn ext(offset: u64, length: u64, data: bool, zero: bool) -> Extent {
        Extent { offset, length, present: true, zero, data, compressed: false, host_offset: None, depth: 0 }
    }

    #[test]
    fn data_bytes_counts_whole_clusters_once() {
        let dev = Fake(
            vec![
                ext(0, 4096, true, false),
                ext(4096, 4096, false, true),
                ext(8192, 4096, true, false),
                ext(12288, 200_000, false, true),
                ext(212_288, 10, true, false),
                ext(212_298, 100_000, true, true),
            ],
            312_298,
        );
        // Cluster 0 (three extents in it) and cluster 3 (offset 212288).
        assert_eq!(data_bytes(&dev, 65536).unwrap(), 2 * 65536);
        assert_eq!(data_bytes(&dev, 512).unwrap(), 4096 + 4096 + 512);
    }
}
