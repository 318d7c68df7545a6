//! The allocation model: what each guest cluster's L2 entry says
//! (unallocated, zero, zero with a host cluster, data, compressed), kept
//! beside the content model by the rules QEMU applies, so that the tests
//! know which compressed writes QEMU refuses (those over a cluster whose
//! L2 entry holds a host offset) and can compare the whole allocation map
//! with the image's block status after every step.
//!
//! Every data or zero cluster with a host cluster carries an identity, so
//! that the model knows when a cluster is shared with an internal snapshot
//! (its refcount is above one, the L2 entry lacks COPIED): a write then
//! copies it to a new cluster, and a zero write without may-unmap cannot
//! keep it.
//!
//! The rules, per guest cluster (`v3`: compat 1.1; "backing": the image has
//! a backing file):
//! - write: becomes data; a data cluster of our own keeps its host cluster.
//! - compressed write of a cluster that compresses: refused over a cluster
//!   with a host offset (data, zero-allocated, compressed), else it becomes
//!   compressed; a cluster that does not compress is written as data.
//! - zero write, whole clusters, v3: zero stays zero; zero-allocated stays
//!   so without may-unmap; data of our own becomes zero-allocated without
//!   may-unmap; everything else becomes plain zero (freeing its cluster).
//!   v2 without backing: as a discard. v2 with backing: zeros are written
//!   as data.
//! - zero write, partial cluster (QEMU's `qcow2_co_pwrite_zeroes`): if the
//!   cluster is zero, zero-allocated or unallocated and the part outside
//!   the request reads as zeros without data (zeros of the backing file or
//!   past its end for an unallocated cluster), as a whole-cluster zero
//!   write; else zeros are written as data.
//! - discard: unallocated stays so, but becomes plain zero on a v3
//!   overlay; plain zero stays so; every other cluster becomes plain zero
//!   on v3, unallocated on v2.
//! - resize: growing first copies a shared partial last cluster;
//!   preallocation maps every unallocated cluster from the old last one on
//!   to a new data cluster; an overlay whose backing file reaches past the
//!   old end then gets zeros written over the new area (up to the backing
//!   file's end on v2), by the zero write rules. Shrinking drops clusters.
//! - downgrade to v2: zero-allocated becomes data (zeros written into its
//!   cluster), plain zero becomes unallocated, or a new data cluster of
//!   zeros over a backing file.

use std::collections::HashSet;
use std::sync::Arc;

use oxqcow::{Extent, Preallocation};

/// What a guest cluster's L2 entry says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    /// Unallocated (reads the backing file, or zeros).
    Unallocated,
    /// Plain zero cluster (v3).
    ZeroPlain,
    /// Zero cluster that keeps a host cluster (v3).
    ZeroAlloc,
    /// Data in a host cluster.
    Normal,
    /// Compressed data.
    Compressed,
}

impl State {
    /// Whether the L2 entry holds a host offset (QEMU refuses compressed
    /// writes over such clusters).
    pub fn has_offset(self) -> bool {
        matches!(self, State::ZeroAlloc | State::Normal | State::Compressed)
    }
}

/// One guest cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cluster {
    /// What the L2 entry says.
    pub state: State,
    /// Identity of the host cluster (zero-allocated and data clusters;
    /// 0 for the others).
    pub id: u64,
}

const UNALLOCATED: Cluster = Cluster { state: State::Unallocated, id: 0 };
const ZERO_PLAIN: Cluster = Cluster { state: State::ZeroPlain, id: 0 };

/// What block status reports for a backing file: which bytes read as
/// zeros without data (a qcow2 backing file's unallocated and zero
/// clusters; nothing in a raw one held in memory).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackingMap {
    /// The backing file's disk size.
    pub len: u64,
    /// Per 512-byte sector: reads as zeros without data.
    pub zero: Vec<bool>,
}

impl BackingMap {
    /// A backing file whose every byte is data (raw in memory: the storage
    /// reports no holes).
    pub fn all_data(len: u64) -> Self {
        BackingMap { len, zero: vec![false; len.div_ceil(512) as usize] }
    }

    /// A qcow2 backing file (without a backing file of its own) with this
    /// allocation.
    pub fn from_layout(layout: &Layout) -> Self {
        let cs = layout.cluster_size;
        let zero = (0..layout.size.div_ceil(512))
            .map(|s| !matches!(layout.clusters[(s * 512 / cs) as usize].state, State::Normal | State::Compressed))
            .collect();
        BackingMap { len: layout.size, zero }
    }

    /// Whether `[start, end)` reads as zeros without data (everything past
    /// the end does).
    pub fn reads_zero(&self, start: u64, end: u64) -> bool {
        let end = end.min(self.len);
        start >= end || (start / 512..end.div_ceil(512)).all(|s| self.zero[s as usize])
    }
}

/// The allocation of every guest cluster of one image layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Cluster size.
    pub cluster_size: u64,
    /// Disk size.
    pub size: u64,
    /// Header version (2 or 3).
    pub version: u32,
    /// One entry per guest cluster (the last may be partial).
    pub clusters: Vec<Cluster>,
    /// The backing file, if any.
    pub backing: Option<Arc<BackingMap>>,
    next_id: u64,
}

impl Layout {
    /// A new image: every cluster unallocated.
    pub fn new(size: u64, cluster_size: u64, version: u32, backing: Option<Arc<BackingMap>>) -> Self {
        Layout {
            cluster_size,
            size,
            version,
            clusters: vec![UNALLOCATED; size.div_ceil(cluster_size) as usize],
            backing,
            next_id: 1,
        }
    }

    fn fresh(&mut self, state: State) -> Cluster {
        self.next_id += 1;
        Cluster { state, id: self.next_id }
    }

    /// Whether any cluster is compressed.
    pub fn any_compressed(&self) -> bool {
        self.clusters.iter().any(|c| c.state == State::Compressed)
    }

    /// The ids of clusters with a host cluster (for sharing with snapshots).
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.clusters.iter().filter(|c| c.id != 0).map(|c| c.id)
    }

    fn cluster_range(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let cs = self.cluster_size;
        (offset / cs) as usize..(offset + len).div_ceil(cs) as usize
    }

    fn align_down(&self, o: u64) -> u64 {
        o / self.cluster_size * self.cluster_size
    }

    fn align_up(&self, o: u64) -> u64 {
        o.div_ceil(self.cluster_size) * self.cluster_size
    }

    /// A data write of `len` bytes at `offset`.
    pub fn write(&mut self, offset: u64, len: u64, shared: &HashSet<u64>) {
        if len == 0 {
            return;
        }
        for i in self.cluster_range(offset, len) {
            let c = self.clusters[i];
            // Only a data cluster of our own is written in place.
            if c.state != State::Normal || shared.contains(&c.id) {
                self.clusters[i] = self.fresh(State::Normal);
            }
        }
    }

    /// A compressed write of whole clusters at `offset` (cluster aligned);
    /// `compresses[i]` says whether the i-th cluster's data shrinks.
    /// Clusters are written in order; `Err(offset)` names the cluster the
    /// write stopped at (refused: it holds a host offset), the ones before
    /// it having been written.
    pub fn write_compressed(
        &mut self,
        offset: u64,
        len: u64,
        compresses: &[bool],
        shared: &HashSet<u64>,
    ) -> Result<(), u64> {
        let cs = self.cluster_size;
        for (k, &compresses) in compresses.iter().enumerate() {
            let at = offset + k as u64 * cs;
            let chunk = cs.min(offset + len - at);
            if !compresses {
                self.write(at, chunk, shared);
                continue;
            }
            let i = (at / cs) as usize;
            if self.clusters[i].state.has_offset() {
                return Err(at);
            }
            self.clusters[i] = self.fresh(State::Compressed);
        }
        Ok(())
    }

    /// A zero write (with or without may-unmap).
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool, shared: &HashSet<u64>) {
        if len == 0 {
            return;
        }
        let size = self.size;
        let cs = self.cluster_size;
        let aligned = |o: u64| o % cs == 0 || o == size;
        let end = offset + len;
        let head_end = if aligned(offset) { offset } else { end.min(self.align_up(offset)) };
        let tail_start = if aligned(end) { end } else { self.align_down(end).max(head_end) };
        if head_end > offset {
            self.zero_partial(offset, head_end - offset, unmap, shared);
        }
        if tail_start > head_end {
            self.zero_clusters(head_end, self.align_up(tail_start) - head_end, unmap, shared);
        }
        if end > tail_start {
            self.zero_partial(tail_start, end - tail_start, unmap, shared);
        }
    }

    fn zero_partial(&mut self, offset: u64, len: u64, unmap: bool, shared: &HashSet<u64>) {
        let start = self.align_down(offset);
        let end = (start + self.cluster_size).min(self.size);
        let own_zero_or_unallocated = matches!(
            self.clusters[(start / self.cluster_size) as usize].state,
            State::Unallocated | State::ZeroPlain | State::ZeroAlloc
        );
        if own_zero_or_unallocated && self.reads_as_zero(start, offset) && self.reads_as_zero(offset + len, end) {
            self.zero_clusters(start, self.cluster_size, unmap, shared);
        } else {
            self.write(offset, len, shared);
        }
    }

    /// Whether block status reports `[start, end)` (inside one cluster) as
    /// zeros without data.
    fn reads_as_zero(&self, start: u64, end: u64) -> bool {
        if start >= end {
            return true;
        }
        match self.clusters[(start / self.cluster_size) as usize].state {
            State::ZeroPlain | State::ZeroAlloc => true,
            State::Normal | State::Compressed => false,
            State::Unallocated => self.backing.as_ref().is_none_or(|b| b.reads_zero(start, end)),
        }
    }

    fn zero_clusters(&mut self, offset: u64, len: u64, unmap: bool, shared: &HashSet<u64>) {
        if self.version < 3 {
            if self.backing.is_some() {
                let end = (offset + len).min(self.size);
                self.write(offset, end - offset, shared);
            } else {
                self.discard_clusters(offset, len);
            }
            return;
        }
        for i in self.cluster_range(offset, len) {
            let c = self.clusters[i];
            self.clusters[i] = match c.state {
                State::ZeroPlain => c,
                State::ZeroAlloc if !unmap => c,
                State::Normal if !unmap && !shared.contains(&c.id) => Cluster { state: State::ZeroAlloc, id: c.id },
                _ => ZERO_PLAIN,
            };
        }
    }

    fn discard_clusters(&mut self, offset: u64, len: u64) {
        let v3 = self.version >= 3;
        let backing = self.backing.is_some();
        for i in self.cluster_range(offset, len) {
            self.clusters[i] = match self.clusters[i].state {
                State::Unallocated if backing && v3 => ZERO_PLAIN,
                State::Unallocated => UNALLOCATED,
                State::ZeroPlain => ZERO_PLAIN,
                _ if v3 => ZERO_PLAIN,
                _ => UNALLOCATED,
            };
        }
    }

    /// A discard: whole clusters inside the range, and the partial last
    /// cluster of the disk when the range reaches the end.
    pub fn discard(&mut self, offset: u64, len: u64) {
        if self.version < 3 && self.backing.is_some() {
            // QEMU refuses to discard where only an unallocated entry could
            // say "gone", which would show the backing file's data.
            return;
        }
        let start = self.align_up(offset);
        let end = if offset + len == self.size { self.align_up(self.size) } else { self.align_down(offset + len) };
        if start < end {
            self.discard_clusters(start, end - start);
        }
    }

    /// A resize to `new` bytes.
    pub fn resize(&mut self, new: u64, prealloc: Preallocation, shared: &HashSet<u64>) {
        let old = self.size;
        let cs = self.cluster_size;
        if new > old {
            if old % cs != 0 {
                let last = (old / cs) as usize;
                let c = self.clusters[last];
                if c.state == State::Normal && shared.contains(&c.id) {
                    self.clusters[last] = self.fresh(State::Normal);
                }
            }
            self.size = new;
            self.clusters.resize(new.div_ceil(cs) as usize, UNALLOCATED);
            if prealloc != Preallocation::Off {
                for i in (old / cs) as usize..self.clusters.len() {
                    if self.clusters[i].state == State::Unallocated {
                        self.clusters[i] = self.fresh(State::Normal);
                    }
                }
            }
        } else {
            self.size = new;
            self.clusters.truncate(new.div_ceil(cs) as usize);
        }
        if let Some(blen) = self.backing.as_ref().map(|b| b.len) {
            if new > old && blen > old {
                let end = if self.version >= 3 { new } else { new.min(blen) };
                self.write_zeroes(old, end - old, false, shared);
            }
        }
    }

    /// What a downgrade to version 2 does to one tree: zero-allocated
    /// clusters become data, plain zero clusters unallocated (or new data
    /// clusters over a backing file).
    pub fn expand_zero_clusters(&mut self) {
        for i in 0..self.clusters.len() {
            let c = self.clusters[i];
            self.clusters[i] = match c.state {
                State::ZeroAlloc => Cluster { state: State::Normal, id: c.id },
                State::ZeroPlain if self.backing.is_some() => self.fresh(State::Normal),
                State::ZeroPlain => UNALLOCATED,
                _ => c,
            };
        }
    }
}

/// What a downgrade to version 2 does to a snapshot's tree of an image
/// without a backing file: zero-allocated clusters become data, plain zero
/// clusters unallocated.
pub fn expand_zero_tree(clusters: &mut [Cluster]) {
    for c in clusters {
        *c = match c.state {
            State::ZeroAlloc => Cluster { state: State::Normal, id: c.id },
            State::ZeroPlain => UNALLOCATED,
            _ => *c,
        };
    }
}

/// The state of every guest cluster as block status reports it for the
/// top layer: unallocated where the top layer describes nothing (the run
/// is described by the backing file, or not at all).
pub fn observed_states(extents: &[Extent], cluster_size: u64, size: u64) -> Result<Vec<State>, String> {
    let mut out = Vec::with_capacity(size.div_ceil(cluster_size) as usize);
    let mut it = extents.iter().peekable();
    for c in 0..size.div_ceil(cluster_size) {
        let at = c * cluster_size;
        while it.peek().is_some_and(|e| e.offset + e.length <= at) {
            it.next();
        }
        let e =
            it.peek().filter(|e| e.offset <= at).ok_or_else(|| format!("block status does not cover offset {at}"))?;
        out.push(if e.depth > 0 || !e.present {
            State::Unallocated
        } else if e.compressed {
            State::Compressed
        } else if e.data {
            State::Normal
        } else if e.host_offset.is_some() {
            State::ZeroAlloc
        } else {
            State::ZeroPlain
        });
    }
    Ok(out)
}

/// What one subcluster of an image with extended L2 entries says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sub {
    /// Not allocated (the backing file, or zeros).
    Unallocated,
    /// Reads as zeros.
    Zero,
    /// Data in the cluster's host cluster.
    Data,
}

/// The allocation model of an image with extended L2 entries, per
/// subcluster, by QEMU's rules (no internal snapshots, no compressed
/// clusters, no resizes: every host cluster is the active layer's own):
/// - write: every subcluster the write touches becomes data (copy on
///   write fills the rest of a partly written one), and the cluster gets
///   a host cluster; the other subclusters keep what they said.
/// - zero write: at subcluster granularity. A partial subcluster that is
///   not data, whose part outside the request reads as zeros, becomes a
///   zero subcluster (the whole cluster becomes zero when it is the first
///   subcluster of the last cluster and reaches the end of the disk), else
///   zeros are written as data. Aligned subclusters of a partial cluster
///   become zero; whole clusters become all zero, losing their host
///   cluster with may-unmap.
/// - discard (whole clusters): a cluster with a host cluster, or any
///   cluster of an overlay, becomes all zero without a host cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubclusterLayout {
    /// Cluster size.
    pub cluster_size: u64,
    /// Disk size.
    pub size: u64,
    /// Per cluster: the L2 entry holds a host offset.
    pub host: Vec<bool>,
    /// Per subcluster (32 per cluster).
    pub subs: Vec<Sub>,
    /// The backing file, if any.
    pub backing: Option<Arc<BackingMap>>,
}

impl SubclusterLayout {
    /// A new image: everything unallocated.
    pub fn new(size: u64, cluster_size: u64, backing: Option<Arc<BackingMap>>) -> Self {
        let clusters = size.div_ceil(cluster_size) as usize;
        SubclusterLayout {
            cluster_size,
            size,
            host: vec![false; clusters],
            subs: vec![Sub::Unallocated; clusters * 32],
            backing,
        }
    }

    fn sc(&self) -> u64 {
        self.cluster_size / 32
    }

    /// A write of `[offset, offset + len)`.
    pub fn write(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let sc = self.sc();
        for i in offset / sc..=(offset + len - 1) / sc {
            self.subs[i as usize] = Sub::Data;
            self.host[(i / 32) as usize] = true;
        }
    }

    /// Whether `[a, b)` reads as zeros without data.
    fn reads_zero(&self, a: u64, b: u64) -> bool {
        let sc = self.sc();
        let mut pos = a;
        while pos < b {
            let end = b.min((pos / sc + 1) * sc);
            let ok = match self.subs[(pos / sc) as usize] {
                Sub::Zero => true,
                Sub::Data => false,
                Sub::Unallocated => self.backing.as_ref().is_none_or(|m| m.reads_zero(pos, end)),
            };
            if !ok {
                return false;
            }
            pos = end;
        }
        true
    }

    fn zero_cluster(&mut self, c: usize, unmap: bool) {
        if unmap {
            self.host[c] = false;
        }
        self.subs[c * 32..(c + 1) * 32].fill(Sub::Zero);
    }

    /// A zero write of `[offset, offset + len)`.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) {
        if len == 0 {
            return;
        }
        let (sc, size, end) = (self.sc(), self.size, offset + len);
        let aligned = |o: u64| o % sc == 0 || o == size;
        let head_end = if aligned(offset) { offset } else { end.min(offset.div_ceil(sc) * sc) };
        let tail_start = if aligned(end) { end } else { (end / sc * sc).max(head_end) };
        if head_end > offset {
            self.zero_partial(offset, head_end - offset, unmap);
        }
        if tail_start > head_end {
            self.zeroize(head_end, tail_start, unmap);
        }
        if end > tail_start {
            self.zero_partial(tail_start, end - tail_start, unmap);
        }
    }

    fn zero_partial(&mut self, offset: u64, len: u64, unmap: bool) {
        let (sc, cs) = (self.sc(), self.cluster_size);
        let start = offset / sc * sc;
        let end = (start + sc).min(self.size);
        let own = self.subs[(start / sc) as usize];
        if own != Sub::Data && self.reads_zero(start, offset) && self.reads_zero(offset + len, end) {
            if start % cs == 0 && start + sc >= self.size {
                self.zero_cluster((start / cs) as usize, unmap);
            } else {
                self.subs[(start / sc) as usize] = Sub::Zero;
            }
        } else {
            self.write(offset, len);
        }
    }

    fn zeroize(&mut self, start: u64, end: u64, unmap: bool) {
        let (sc, cs) = (self.sc(), self.cluster_size);
        let head_end = end.min(start.div_ceil(cs) * cs);
        let tail_start = if end >= self.size { end } else { (end / cs * cs).max(head_end) };
        for i in start / sc..head_end.div_ceil(sc) {
            self.subs[i as usize] = Sub::Zero;
        }
        if tail_start > head_end {
            for c in head_end / cs..tail_start.div_ceil(cs) {
                self.zero_cluster(c as usize, unmap);
            }
        }
        for i in tail_start / sc..end.div_ceil(sc) {
            self.subs[i as usize] = Sub::Zero;
        }
    }

    /// A discard: whole clusters inside the range, and the partial last
    /// cluster of the disk when the range reaches the end.
    pub fn discard(&mut self, offset: u64, len: u64) {
        let cs = self.cluster_size;
        let start = offset.div_ceil(cs) * cs;
        let end = if offset + len == self.size { self.size.div_ceil(cs) * cs } else { (offset + len) / cs * cs };
        for c in start / cs..end.max(start) / cs {
            let c = c as usize;
            if self.backing.is_some() || self.host[c] {
                self.zero_cluster(c, true);
            }
        }
    }

    /// What block status should say of every subcluster inside the disk.
    pub fn expected(&self) -> Vec<State> {
        let sc = self.sc();
        (0..self.size.div_ceil(sc) as usize)
            .map(|i| match self.subs[i] {
                Sub::Data => State::Normal,
                Sub::Zero if self.host[i / 32] => State::ZeroAlloc,
                Sub::Zero => State::ZeroPlain,
                Sub::Unallocated => State::Unallocated,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn states(l: &Layout) -> Vec<State> {
        l.clusters.iter().map(|c| c.state).collect()
    }

    #[test]
    fn compressed_writes_are_refused_over_host_offsets() {
        use State::*;
        let none = HashSet::new();
        let mut l = Layout::new(6 * 512, 512, 3, None);
        l.write(0, 100, &none);
        l.write(512, 512, &none);
        l.write_zeroes(512, 512, false, &none);
        l.write(1024, 512, &none);
        l.write_zeroes(1024, 512, true, &none);
        assert_eq!(states(&l), [Normal, ZeroAlloc, ZeroPlain, Unallocated, Unallocated, Unallocated]);
        assert_eq!(l.write_compressed(0, 512, &[true], &none), Err(0));
        assert_eq!(l.write_compressed(512, 512, &[true], &none), Err(512));
        // Clusters that do not compress are written as data, anywhere.
        assert_eq!(l.write_compressed(0, 1024, &[false, false], &none), Ok(()));
        // Plain zero and unallocated take compressed data; the write stops
        // at the first refused cluster.
        assert_eq!(l.write_compressed(1024, 3 * 512, &[true, true, true], &none), Ok(()));
        assert_eq!(l.write_compressed(1024, 2 * 512, &[true, true], &none), Err(1024));
        assert_eq!(states(&l), [Normal, Normal, Compressed, Compressed, Compressed, Unallocated]);
        // A zero write unmaps compressed clusters even without may-unmap.
        l.write_zeroes(1024, 512, false, &none);
        assert_eq!(l.clusters[2].state, ZeroPlain);
    }

    #[test]
    fn shared_clusters_are_copied_and_not_kept_as_zero() {
        let mut l = Layout::new(2 * 512, 512, 3, None);
        let none = HashSet::new();
        l.write(0, 1024, &none);
        let shared: HashSet<u64> = l.ids().collect();
        let before = l.clusters[0].id;
        l.write(0, 10, &shared);
        assert_ne!(l.clusters[0].id, before, "a shared cluster is copied");
        l.write_zeroes(512, 512, false, &shared);
        assert_eq!(l.clusters[1].state, State::ZeroPlain);
        l.write_zeroes(0, 512, false, &shared);
        assert_eq!(l.clusters[0].state, State::ZeroAlloc);
    }

    #[test]
    fn overlay_rules() {
        use State::*;
        let none = HashSet::new();
        // Backing: 3 sectors of data, then 3 of zeros, 1536 bytes long
        // against an overlay of 4 KiB with 1 KiB clusters.
        let map = Arc::new(BackingMap { len: 3072, zero: vec![false, false, false, true, true, true] });
        for version in [2, 3] {
            let mut l = Layout::new(4096, 1024, version, Some(map.clone()));
            // Partial zero writes: cluster 0 has backing data, cluster 2
            // (past the backing data) and 3 (past the backing end) do not.
            l.write_zeroes(10, 10, false, &none);
            l.write_zeroes(2048 + 10, 10, false, &none);
            l.write_zeroes(3072 + 10, 10, false, &none);
            let zero = if version == 3 { ZeroPlain } else { Normal };
            assert_eq!(states(&l), [Normal, Unallocated, zero, zero]);
            l.discard(0, 4096);
            if version == 3 {
                assert_eq!(states(&l), [ZeroPlain; 4]);
            } else {
                // Version 2 cannot mask the backing file: nothing changes.
                assert_eq!(states(&l), [Normal, Unallocated, Normal, Normal]);
            }
        }
    }

    #[test]
    fn observed_states_follow_extents() {
        let e = |offset, length, present, zero, data, compressed, host: Option<u64>, depth| Extent {
            offset,
            length,
            present,
            zero,
            data,
            compressed,
            host_offset: host,
            depth,
        };
        let ext = [
            e(0, 1024, true, false, true, false, Some(4096), 0),
            e(1024, 512, true, false, true, true, None, 0),
            e(1536, 512, true, true, false, false, Some(8192), 0),
            e(2048, 512, true, true, false, false, None, 0),
            e(2560, 512, true, false, true, false, Some(0), 1),
            e(3072, 512, false, true, false, false, None, 0),
        ];
        use State::*;
        assert_eq!(
            observed_states(&ext, 512, 3584).unwrap(),
            [Normal, Normal, Compressed, ZeroAlloc, ZeroPlain, Unallocated, Unallocated]
        );
        assert!(observed_states(&ext, 512, 4096).is_err());
    }
}
