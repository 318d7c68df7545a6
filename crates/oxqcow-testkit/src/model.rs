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
//! - flush, close and reopen change nothing visible.

use oxqcow::{Compat, CreateOptions, Preallocation};

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
}

impl ImageConfig {
    /// A configuration with preallocation off.
    pub fn new(cluster_size: u64, refcount_bits: u32, compat: Compat, lazy_refcounts: bool) -> Self {
        ImageConfig { cluster_size, refcount_bits, compat, lazy_refcounts, preallocation: Preallocation::Off }
    }

    /// Whether QEMU accepts the combination: lazy refcounts and refcount
    /// widths other than 16 need compat 1.1.
    pub fn is_valid(&self) -> bool {
        self.compat == Compat::V3 || (!self.lazy_refcounts && self.refcount_bits == 16)
    }

    /// Library creation options for an image of `size` bytes.
    pub fn create_options(&self, size: u64) -> CreateOptions {
        CreateOptions::qcow2(size)
            .cluster_size(self.cluster_size)
            .refcount_bits(self.refcount_bits)
            .compat(self.compat)
            .lazy_refcounts(self.lazy_refcounts)
            .preallocation(self.preallocation)
    }

    /// The same options as a `qemu-img create -o` string.
    pub fn qemu_options(&self) -> String {
        format!(
            "cluster_size={},refcount_bits={},compat={},lazy_refcounts={},preallocation={}",
            self.cluster_size,
            self.refcount_bits,
            self.compat.name(),
            if self.lazy_refcounts { "on" } else { "off" },
            self.preallocation.name()
        )
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
}

/// A disk as a flat byte vector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Model {
    /// The disk content; its length is the disk size.
    pub data: Vec<u8>,
    /// The image's cluster size (discard granularity).
    pub cluster_size: u64,
}

impl Model {
    /// A zeroed disk of `size` bytes.
    pub fn new(size: u64, cluster_size: u64) -> Self {
        Model { data: vec![0; size as usize], cluster_size }
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
            Op::Discard { offset, len } => {
                if let Some((s, e)) = self.discarded_range(offset, len) {
                    self.data[s as usize..e as usize].fill(0);
                }
                Some((offset, len))
            }
            Op::Resize { size, .. } => {
                let old = self.len();
                self.data.resize(size as usize, 0);
                let (lo, hi) = (old.min(size), old.max(size));
                Some((lo, hi - lo))
            }
            // Snapshots are the harness's business: the model only holds
            // the active layer.
            Op::Flush | Op::Reopen | Op::CrashReopen | Op::SnapshotCreate | Op::SnapshotDelete(_) => None,
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
    fn resize_extends_with_zeros() {
        let mut m = Model::new(512, 512);
        m.apply(&Op::Write { offset: 0, len: 512, seed: 1 });
        m.apply(&Op::Resize { size: 256 * 2, prealloc: Preallocation::Off });
        m.apply(&Op::Resize { size: 1536, prealloc: Preallocation::Metadata });
        assert!(m.data[512..].iter().all(|&b| b == 0));
        assert_eq!(m.len(), 1536);
    }
}
