//! The reference model: a disk as a flat byte vector, with the rules qcow2
//! (and QEMU) give each operation, and the image configurations the tests
//! run over.
//!
//! Semantics modelled:
//! - `write` stores the bytes;
//! - `write_zeroes` (with or without may-unmap) makes the whole range read
//!   as zeros;
//! - `discard` makes only whole clusters inside the range read as zeros,
//!   plus the last, partial cluster of the disk when the range reaches the
//!   end of the disk (QEMU fragments a discard at cluster boundaries, drops
//!   the unaligned pieces, and accepts the piece that starts aligned and
//!   ends at the end of the disk). Partial clusters keep their data;
//! - `resize` truncates or extends with zeros;
//! - a compressed write stores its bytes (which clusters the engine takes
//!   is [`crate::layout`]'s business: the harness applies only those);
//! - amend changes nothing visible but the size;
//! - flush, close and reopen change nothing visible.
//!
//! Over a backing file the disk starts as the backing file's content
//! (zeros past its end); every rule above stays, except that a discard on
//! a version 2 overlay changes nothing (version 2 has no zero flag to mask
//! the backing file with, so QEMU refuses it and keeps the data).

use std::sync::Arc;

use oxqcow::{Compat, CompressionType, CreateOptions, Preallocation};

/// How an image is created: the geometry and features a test runs over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageConfig {
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Compatibility level.
    pub compat: Compat,
    /// Lazy refcounts (version 3 only).
    pub lazy_refcounts: bool,
    /// Preallocation at creation.
    pub preallocation: Preallocation,
    /// Compression type of compressed clusters.
    pub compression_type: CompressionType,
    /// Guest data in an external data file (named [`DATA_FILE_NAME`]);
    /// `Some(true)`: with `data_file_raw=on`.
    pub data_file: Option<bool>,
    /// Extended L2 entries (subclusters; compat 1.1, clusters of 16 KiB
    /// and more).
    pub extended_l2: bool,
}

/// The name images with an external data file record for it.
pub const DATA_FILE_NAME: &str = "model.data";

impl ImageConfig {
    /// A configuration with preallocation off.
    pub fn new(cluster_size: u64, refcount_bits: u32, compat: Compat, lazy_refcounts: bool) -> Self {
        ImageConfig {
            cluster_size,
            refcount_bits,
            compat,
            lazy_refcounts,
            preallocation: Preallocation::Off,
            compression_type: CompressionType::Zlib,
            data_file: None,
            extended_l2: false,
        }
    }

    /// The same configuration with an external data file (`raw`:
    /// `data_file_raw=on`).
    pub fn with_data_file(self, raw: bool) -> Self {
        ImageConfig { data_file: Some(raw), ..self }
    }

    /// The same configuration with extended L2 entries on or off.
    pub fn with_extended_l2(self, on: bool) -> Self {
        ImageConfig { extended_l2: on, ..self }
    }

    /// The same configuration with compression type `t`.
    pub fn with_compression(self, t: CompressionType) -> Self {
        ImageConfig { compression_type: t, ..self }
    }

    /// Whether QEMU accepts the combination: lazy refcounts, refcount
    /// widths other than 16, zstd compression and extended L2 entries need
    /// compat 1.1; extended L2 entries need clusters of 16 KiB or more.
    pub fn is_valid(&self) -> bool {
        if self.extended_l2 && (self.compat != Compat::V3 || self.cluster_size < 16384) {
            return false;
        }
        self.compat == Compat::V3
            || (!self.lazy_refcounts
                && self.refcount_bits == 16
                && self.compression_type == CompressionType::Zlib
                && self.data_file.is_none())
    }

    /// Library creation options for an image of `size` bytes.
    pub fn create_options(&self, size: u64) -> CreateOptions {
        let mut o = CreateOptions::qcow2(size)
            .cluster_size(self.cluster_size)
            .refcount_bits(self.refcount_bits)
            .compat(self.compat)
            .lazy_refcounts(self.lazy_refcounts)
            .preallocation(self.preallocation);
        o.compression_type = self.compression_type;
        if let Some(raw) = self.data_file {
            o.data_file = Some(DATA_FILE_NAME.to_string());
            o.data_file_raw = raw;
        }
        o.extended_l2 = self.extended_l2;
        o
    }

    /// The same options as a `qemu-img create -o` string.
    pub fn qemu_options(&self) -> String {
        let data_file = match self.data_file {
            Some(raw) => format!(",data_file={DATA_FILE_NAME},data_file_raw={}", if raw { "on" } else { "off" }),
            None => String::new(),
        };
        let base = format!(
            "cluster_size={},refcount_bits={},compat={},lazy_refcounts={},preallocation={},compression_type={},extended_l2={}",
            self.cluster_size,
            self.refcount_bits,
            self.compat.name(),
            if self.lazy_refcounts { "on" } else { "off" },
            self.preallocation.name(),
            self.compression_type.name(),
            if self.extended_l2 { "on" } else { "off" }
        );
        base + &data_file
    }

    /// Every valid combination of the given cluster sizes and refcount
    /// widths with compat 0.10, 1.1 and 1.1 + lazy refcounts (compat 0.10
    /// only with 16-bit refcounts, the only width it has).
    pub fn matrix(cluster_sizes: &[u64], refcount_bits: &[u32]) -> Vec<ImageConfig> {
        let mut out = Vec::new();
        for &cs in cluster_sizes {
            for &rb in refcount_bits {
                for (compat, lazy) in [(Compat::V2, false), (Compat::V3, false), (Compat::V3, true)] {
                    let c = ImageConfig::new(cs, rb, compat, lazy);
                    if c.is_valid() {
                        out.push(c);
                    }
                }
            }
        }
        out
    }
}

/// The byte a write with `seed` stores at guest offset `pos`: varies with
/// the position (so misplaced data is caught) and the seed (so stale data
/// is caught).
pub fn pattern_byte(seed: u8, pos: u64) -> u8 {
    let h = (pos ^ (pos >> 13)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    ((h >> 56) as u8) ^ seed.wrapping_mul(0x3b) ^ 0x5a
}

/// The buffer a write of `len` bytes at `offset` with `seed` stores.
pub fn pattern(seed: u8, offset: u64, len: u64) -> Vec<u8> {
    (offset..offset + len).map(|p| pattern_byte(seed, p)).collect()
}

/// The buffer a compressed write of `len` bytes at `offset` with `seed`
/// stores: runs of equal bytes (4 to 64 long, by seed) whose values vary
/// with the position and the seed, so every cluster compresses (with a
/// ratio that varies, so compressed clusters have different lengths and
/// pack differently) and misplaced or stale data is still caught. Seeds
/// that are 7 modulo 8 give random bytes instead (a strong hash of the
/// position and the seed), which no codec shrinks, so the fallback to
/// uncompressed clusters runs too.
pub fn compressible_pattern(seed: u8, offset: u64, len: u64) -> Vec<u8> {
    if seed % 8 == 7 {
        let noise =
            |p: u64| (crate::prng::Prng::new(p.wrapping_mul(0x9e37_79b9) ^ u64::from(seed)).next_u64() >> 56) as u8;
        return (offset..offset + len).map(noise).collect();
    }
    let run = 4u64 << (seed % 5);
    (offset..offset + len).map(|p| pattern_byte(seed, p / run * run)).collect()
}

/// An option change of `qemu-img amend`, one at a time (so that a refused
/// amend leaves nothing half done).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AmendOp {
    /// Change the compatibility level (a downgrade expands zero clusters).
    Compat(Compat),
    /// Change the refcount width (rebuilds the refcount structures).
    RefcountBits(u32),
    /// Switch lazy refcounts on or off.
    LazyRefcounts(bool),
    /// Change the size (as a resize without preallocation).
    Size(u64),
}

impl AmendOp {
    /// The library's amend options for this change.
    pub fn options(&self) -> oxqcow::options::AmendOptions {
        let mut o = oxqcow::options::AmendOptions::default();
        match *self {
            AmendOp::Compat(c) => o.compat = Some(c),
            AmendOp::RefcountBits(b) => o.refcount_bits = Some(b),
            AmendOp::LazyRefcounts(l) => o.lazy_refcounts = Some(l),
            AmendOp::Size(s) => o.size = Some(s),
        }
        o
    }
}

/// One operation on a disk, with concrete offsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Write `pattern(seed, offset, len)`.
    Write {
        /// Guest offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Pattern seed.
        seed: u8,
    },
    /// Write `compressible_pattern(seed, offset, len)` compressed:
    /// `offset` is cluster aligned and `len` covers whole clusters (the
    /// last one may end at the end of the disk).
    WriteCompressed {
        /// Guest offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Pattern seed.
        seed: u8,
    },
    /// Write zeros.
    WriteZeroes {
        /// Guest offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Whether host clusters may be released.
        may_unmap: bool,
    },
    /// Discard.
    Discard {
        /// Guest offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Flush.
    Flush,
    /// Resize to `size` bytes (a multiple of 512), preallocating new
    /// space as `prealloc` says (growing only).
    Resize {
        /// New guest size.
        size: u64,
        /// Preallocation of the new space.
        prealloc: Preallocation,
    },
    /// Close the image and open it again.
    Reopen,
    /// Create an internal snapshot (the content does not change).
    SnapshotCreate,
    /// Revert to the snapshot with this index (modulo the number of
    /// snapshots; nothing when there is none): the content and size become
    /// the snapshot's.
    SnapshotApply(u8),
    /// Delete the snapshot with this index (modulo the number of snapshots).
    SnapshotDelete(u8),
    /// Flush, then reopen a copy of the host bytes without closing (as
    /// after a power cut right after the flush): a lazy-refcount image is
    /// dirty and gets its refcounts rebuilt on open; either way check must
    /// find it clean.
    CrashReopen,
    /// `qemu-img amend`: the content does not change (but for the size).
    Amend(AmendOp),
}

/// A disk as a flat byte vector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Model {
    /// The disk content; its length is the disk size.
    pub data: Vec<u8>,
    /// The image's cluster size (discard granularity).
    pub cluster_size: u64,
    /// The backing file's content, if the image has one.
    pub backing: Option<Arc<Vec<u8>>>,
    /// Whether a discard leaves the data as it is (a version 2 overlay)
    /// instead of making it read as zeros.
    pub discard_keeps_data: bool,
}

impl Model {
    /// A zeroed disk of `size` bytes.
    pub fn new(size: u64, cluster_size: u64) -> Self {
        Model { data: vec![0; size as usize], cluster_size, backing: None, discard_keeps_data: false }
    }

    /// A disk of `size` bytes over a backing file holding `backing`: it
    /// reads the backing file's bytes, and zeros past its end. `v2` says
    /// whether the image is a version 2 overlay.
    pub fn with_backing(size: u64, cluster_size: u64, backing: Arc<Vec<u8>>, v2: bool) -> Self {
        let mut data = vec![0; size as usize];
        let n = backing.len().min(data.len());
        data[..n].copy_from_slice(&backing[..n]);
        Model { data, cluster_size, backing: Some(backing), discard_keeps_data: v2 }
    }

    /// The disk size.
    pub fn len(&self) -> u64 {
        self.data.len() as u64
    }

    /// Whether the disk has no bytes.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Applies `op`; returns the range of bytes whose content the operation
    /// may have changed (for crash tests), `None` for no change.
    pub fn apply(&mut self, op: &Op) -> Option<(u64, u64)> {
        match *op {
            Op::Write { offset, len, seed } => {
                let buf = pattern(seed, offset, len);
                self.data[offset as usize..(offset + len) as usize].copy_from_slice(&buf);
                Some((offset, len))
            }
            Op::WriteZeroes { offset, len, .. } => {
                self.data[offset as usize..(offset + len) as usize].fill(0);
                Some((offset, len))
            }
            Op::WriteCompressed { offset, len, seed } => {
                let buf = compressible_pattern(seed, offset, len);
                self.data[offset as usize..(offset + len) as usize].copy_from_slice(&buf);
                Some((offset, len))
            }
            Op::Discard { offset, len } => {
                if let Some((s, e)) = self.discarded_range(offset, len).filter(|_| !self.discard_keeps_data) {
                    self.data[s as usize..e as usize].fill(0);
                }
                Some((offset, len))
            }
            Op::Amend(AmendOp::Size(size)) | Op::Resize { size, .. } => {
                let old = self.len();
                self.data.resize(size as usize, 0);
                let (lo, hi) = (old.min(size), old.max(size));
                Some((lo, hi - lo))
            }
            // Snapshots are the harness's business: the model only holds
            // the active layer.
            Op::Amend(AmendOp::Compat(c)) => {
                self.discard_keeps_data = self.backing.is_some() && c == Compat::V2;
                None
            }
            Op::Flush | Op::Reopen | Op::CrashReopen | Op::SnapshotCreate | Op::SnapshotDelete(_) | Op::Amend(_) => {
                None
            }
            Op::SnapshotApply(_) => panic!("the harness applies snapshot reverts to the model"),
        }
    }

    /// The bytes a discard of `[offset, offset + len)` turns into zeros.
    pub fn discarded_range(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let cs = self.cluster_size;
        let size = self.len();
        let start = offset.div_ceil(cs) * cs;
        let end = if offset + len == size { size } else { (offset + len) / cs * cs };
        (start < end).then_some((start, end))
    }

    /// The first offset where `actual` differs from the model, if any.
    pub fn first_difference(&self, actual: &[u8]) -> Option<u64> {
        if actual.len() != self.data.len() {
            return Some(actual.len().min(self.data.len()) as u64);
        }
        actual.iter().zip(&self.data).position(|(a, b)| a != b).map(|p| p as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discard_keeps_partial_clusters() {
        let mut m = Model::new(10 * 512 + 100, 512);
        m.data.fill(1);
        m.apply(&Op::Discard { offset: 100, len: 1000 });
        assert!(m.data[..512].iter().all(|&b| b == 1));
        assert!(m.data[512..1024].iter().all(|&b| b == 0));
        assert!(m.data[1024..1100].iter().all(|&b| b == 1));
        // Reaching the end of the disk takes the partial last cluster.
        m.apply(&Op::Discard { offset: 4000, len: 5220 - 4000 });
        assert!(m.data[4000..4096].iter().all(|&b| b == 1));
        assert!(m.data[4096..].iter().all(|&b| b == 0));
        // A range inside one cluster discards nothing.
        let before = m.clone();
        m.apply(&Op::Discard { offset: 1, len: 510 });
        assert_eq!(m, before);
    }

    #[test]
    fn compressible_patterns_compress_and_random_ones_do_not() {
        use oxqcow::compress::Codec;
        for codec in [Codec::Deflate, Codec::Zstd] {
            for cs in [512usize, 4096, 65536] {
                for seed in 0..16u8 {
                    let data = compressible_pattern(seed, 3 * cs as u64, cs as u64);
                    let packed = codec.compress(&data, cs - 1).unwrap();
                    assert_eq!(packed.is_some(), seed % 8 != 7, "{codec:?}, {cs}-byte cluster, seed {seed}");
                }
            }
        }
        // Different seeds and positions give different data.
        assert_ne!(compressible_pattern(1, 0, 512), compressible_pattern(2, 0, 512));
        assert_ne!(compressible_pattern(1, 0, 512), compressible_pattern(1, 512, 512));
    }

    #[test]
    fn resize_extends_with_zeros() {
        let mut m = Model::new(512, 512);
        m.apply(&Op::Write { offset: 0, len: 512, seed: 1 });
        m.apply(&Op::Resize { size: 256 * 2, prealloc: Preallocation::Off });
        m.apply(&Op::Resize { size: 1536, prealloc: Preallocation::Metadata });
        assert!(m.data[512..].iter().all(|&b| b == 0));
        assert_eq!(m.len(), 1536);
    }
}
