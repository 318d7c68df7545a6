//! Address types and the index arithmetic of an image's geometry.
//!
//! Guest offsets (positions on the virtual disk) and host offsets (positions in
//! the image file) are different types so that one can never be passed where
//! the other is meant. [`Geometry`] holds the three numbers that shape every
//! table of an image (cluster size, L2 entry size, refcount width) and does all
//! index arithmetic on them.

use crate::error::FormatError;
use crate::limits::{MAX_CLUSTER_BITS, MAX_REFCOUNT_ORDER, MIN_CLUSTER_BITS, SUBCLUSTERS_PER_CLUSTER};

/// A byte offset on the virtual disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestOffset(pub u64);

/// A byte offset in the image file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostOffset(pub u64);

/// The index of a cluster in the image file (host offset / cluster size).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostCluster(pub u64);

/// The index of a cluster on the virtual disk (guest offset / cluster size).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestCluster(pub u64);

/// Moving an offset by a byte count keeps it on its side (guest or host);
/// the distance between two offsets of one side is a byte count.
macro_rules! offset_arithmetic {
    ($t:ident) => {
        impl std::ops::Add<u64> for $t {
            type Output = $t;
            fn add(self, bytes: u64) -> $t {
                $t(self.0 + bytes)
            }
        }
        impl std::ops::AddAssign<u64> for $t {
            fn add_assign(&mut self, bytes: u64) {
                self.0 += bytes;
            }
        }
        impl std::ops::Sub<$t> for $t {
            type Output = u64;
            fn sub(self, other: $t) -> u64 {
                self.0 - other.0
            }
        }
    };
}
offset_arithmetic!(GuestOffset);
offset_arithmetic!(HostOffset);

impl std::fmt::Display for HostOffset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "0x{:x}", self.0)
    }
}

impl std::fmt::Display for GuestOffset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Cluster size, L2 entry size and refcount width of one image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    cluster_bits: u32,
    l2_bits: u32,
    refcount_order: u32,
    extended_l2: bool,
}

impl Geometry {
    /// Validates and builds a geometry.
    pub fn new(cluster_bits: u32, refcount_order: u32, extended_l2: bool) -> Result<Self, FormatError> {
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(FormatError::ClusterBits(cluster_bits));
        }
        if refcount_order > MAX_REFCOUNT_ORDER {
            return Err(FormatError::RefcountOrder(refcount_order));
        }
        if extended_l2 {
            let sub = (1u64 << cluster_bits) / u64::from(SUBCLUSTERS_PER_CLUSTER);
            if sub < (1 << MIN_CLUSTER_BITS) {
                return Err(FormatError::SubclusterSize(sub));
            }
        }
        let entry_bits = if extended_l2 { 4 } else { 3 };
        Ok(Geometry { cluster_bits, l2_bits: cluster_bits - entry_bits, refcount_order, extended_l2 })
    }

    /// log2 of the cluster size.
    pub fn cluster_bits(&self) -> u32 {
        self.cluster_bits
    }
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Whether L2 entries are 128-bit extended entries.
    pub fn extended_l2(&self) -> bool {
        self.extended_l2
    }
    /// Subclusters per cluster: 32 with extended L2, else 1.
    pub fn subclusters_per_cluster(&self) -> u64 {
        if self.extended_l2 {
            u64::from(SUBCLUSTERS_PER_CLUSTER)
        } else {
            1
        }
    }
    /// Subcluster size in bytes (the cluster size without extended L2).
    pub fn subcluster_size(&self) -> u64 {
        self.cluster_size() / self.subclusters_per_cluster()
    }
    /// log2 of the number of entries in an L2 table.
    pub fn l2_bits(&self) -> u32 {
        self.l2_bits
    }
    /// Entries in one L2 table.
    pub fn l2_entries(&self) -> u64 {
        1 << self.l2_bits
    }
    /// Size of one L2 entry in bytes (8, or 16 with extended L2).
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }
    /// Guest bytes covered by one L2 table.
    pub fn bytes_per_l2(&self) -> u64 {
        1 << (self.l2_bits + self.cluster_bits)
    }
    /// Index into the L1 table of the L2 table covering `guest`.
    pub fn l1_index(&self, guest: GuestOffset) -> u64 {
        guest.0 >> (self.l2_bits + self.cluster_bits)
    }
    /// Index into its L2 table of the entry covering `guest`.
    pub fn l2_index(&self, guest: GuestOffset) -> usize {
        ((guest.0 >> self.cluster_bits) & (self.l2_entries() - 1)) as usize
    }
    /// Index of the guest cluster containing `guest`.
    pub fn guest_cluster_index(&self, guest: GuestOffset) -> u64 {
        guest.0 >> self.cluster_bits
    }
    /// The guest cluster an offset lies in.
    pub fn guest_cluster(&self, guest: GuestOffset) -> GuestCluster {
        GuestCluster(self.guest_cluster_index(guest))
    }
    /// Where a guest cluster starts.
    pub fn guest_cluster_offset(&self, cluster: GuestCluster) -> GuestOffset {
        GuestOffset(cluster.0 << self.cluster_bits)
    }
    /// Byte offset of `offset` inside its cluster.
    pub fn offset_in_cluster(&self, offset: u64) -> u64 {
        offset & (self.cluster_size() - 1)
    }
    /// The cluster index of a host offset.
    pub fn host_cluster(&self, host: HostOffset) -> HostCluster {
        HostCluster(host.0 >> self.cluster_bits)
    }
    /// The host offset of a cluster index.
    pub fn cluster_offset(&self, cluster: HostCluster) -> HostOffset {
        HostOffset(cluster.0 << self.cluster_bits)
    }
    /// Whether `offset` is a multiple of the cluster size.
    pub fn is_cluster_aligned(&self, offset: u64) -> bool {
        self.offset_in_cluster(offset) == 0
    }
    /// `bytes` rounded up to whole clusters, counted in clusters.
    pub fn clusters_for(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.cluster_size())
    }
    /// `offset` rounded down to a cluster boundary.
    pub fn align_down(&self, offset: u64) -> u64 {
        offset & !(self.cluster_size() - 1)
    }
    /// `offset` rounded up to a cluster boundary (saturating).
    pub fn align_up(&self, offset: u64) -> u64 {
        offset.saturating_add(self.cluster_size() - 1) & !(self.cluster_size() - 1)
    }
    /// L1 entries needed for a guest disk of `size` bytes (QEMU's `size_to_l1`).
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.bytes_per_l2())
    }

    /// log2 of the refcount width in bits.
    pub fn refcount_order(&self) -> u32 {
        self.refcount_order
    }
    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }
    /// The largest refcount the width can hold.
    pub fn max_refcount(&self) -> u64 {
        if self.refcount_bits() == 64 {
            u64::MAX
        } else {
            (1u64 << self.refcount_bits()) - 1
        }
    }
    /// Refcount entries in one refcount block.
    pub fn refcounts_per_block(&self) -> u64 {
        (self.cluster_size() * 8) >> self.refcount_order
    }
    /// log2 of [`Self::refcounts_per_block`].
    pub fn refcount_block_bits(&self) -> u32 {
        self.cluster_bits + 3 - self.refcount_order
    }
    /// Index into the refcount table of the block covering `cluster`.
    pub fn reftable_index(&self, cluster: HostCluster) -> u64 {
        cluster.0 >> self.refcount_block_bits()
    }
    /// Index into its refcount block of the entry for `cluster`.
    pub fn refblock_index(&self, cluster: HostCluster) -> usize {
        (cluster.0 & (self.refcounts_per_block() - 1)) as usize
    }
    /// Refcount table entries that fit in one cluster.
    pub fn reftable_entries_per_cluster(&self) -> u64 {
        self.cluster_size() / 8
    }
    /// Host bytes covered by one refcount block.
    pub fn bytes_per_refblock(&self) -> u64 {
        self.refcounts_per_block() << self.cluster_bits
    }

    /// Bit position of the sector count in a compressed descriptor
    /// (`62 - (cluster_bits - 8)`).
    pub fn compressed_size_shift(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_math_64k() {
        let g = Geometry::new(16, 4, false).unwrap();
        assert_eq!(g.cluster_size(), 65536);
        assert_eq!(g.l2_entries(), 8192);
        assert_eq!(g.bytes_per_l2(), 512 << 20);
        assert_eq!(g.l1_index(GuestOffset(512 << 20)), 1);
        assert_eq!(g.l2_index(GuestOffset(65536 * 3 + 5)), 3);
        assert_eq!(g.refcounts_per_block(), 32768);
        assert_eq!(g.reftable_index(HostCluster(32768)), 1);
        assert_eq!(g.refblock_index(HostCluster(32769)), 1);
        assert_eq!(g.l1_entries_for(1 << 30), 2);
        assert_eq!(g.l1_entries_for(0), 0);
        assert_eq!(g.compressed_size_shift(), 54);
    }

    #[test]
    fn extended_l2_halves_entries() {
        let g = Geometry::new(16, 4, true).unwrap();
        assert_eq!(g.l2_entries(), 4096);
        assert_eq!(g.subcluster_size(), 2048);
        assert_eq!(Geometry::new(13, 4, true), Err(FormatError::SubclusterSize(256)));
    }

    #[test]
    fn refcount_widths() {
        for order in 0..=6 {
            let g = Geometry::new(9, order, false).unwrap();
            assert_eq!(g.refcounts_per_block(), 4096 >> order);
            assert_eq!(g.refcounts_per_block(), 1 << g.refcount_block_bits());
        }
        assert_eq!(Geometry::new(16, 0, false).unwrap().max_refcount(), 1);
        assert_eq!(Geometry::new(16, 6, false).unwrap().max_refcount(), u64::MAX);
        assert_eq!(Geometry::new(16, 7, false), Err(FormatError::RefcountOrder(7)));
    }

    #[test]
    fn cluster_bits_bounds() {
        assert_eq!(Geometry::new(8, 4, false), Err(FormatError::ClusterBits(8)));
        assert_eq!(Geometry::new(22, 4, false), Err(FormatError::ClusterBits(22)));
        assert!(Geometry::new(21, 4, false).is_ok());
    }
}
