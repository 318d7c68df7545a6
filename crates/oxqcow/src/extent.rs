//! Block status: what a run of guest bytes is (data, zeros, unallocated,
//! compressed, which layer), as every format reports it and as
//! `qemu-img map` merges it.

/// The status of a run of guest bytes, as `qemu-img map` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Guest offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Described by some layer of the image (`present` in qemu-img map).
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Stored as data in some layer.
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset of the data, when it is stored uncompressed.
    pub host_offset: Option<u64>,
    /// Number of backing layers above the one that describes the run.
    pub depth: u32,
}

impl Extent {
    fn mergeable(&self, next: &Extent) -> bool {
        self.offset + self.length == next.offset
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && self.depth == next.depth
            && match (self.host_offset, next.host_offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }
}

/// Appends an extent, merging it into the last one when they continue each other.
pub(crate) fn push_extent(out: &mut Vec<Extent>, e: Extent) {
    if let Some(last) = out.last_mut() {
        if last.mergeable(&e) {
            last.length += e.length;
            return;
        }
    }
    out.push(e);
}
