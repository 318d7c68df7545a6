//! Write planning: allocating writes and writes in place.
//!
//! A write into a cluster that is not exclusively ours (unallocated, zero,
//! shared, compressed) gets a fresh host cluster; the parts of that cluster
//! the request does not cover are copied from the old content (copy on
//! write). The allocation is registered as in flight before the lock is
//! released, so a second request touching the same guest cluster waits for
//! it (QEMU's dependency on `QCowL2Meta`) instead of allocating again; the L2
//! entry is switched to the new cluster only after the data is written, and
//! the old cluster's reference is dropped only after that switch is durable.
//!
//! With extended L2 entries the same machinery works per subcluster: copy
//! on write covers only the partial subclusters a write touches, and a
//! write into unallocated subclusters of a cluster of ours is an in-flight
//! allocation that keeps its cluster and sets allocation bits on commit.

use oxqcow_format::table::{write_l2_bitmap, write_l2_word, ClusterType, L1Entry};
use oxqcow_format::{GuestOffset, HostCluster, HostOffset, L2Bitmap, L2Entry, L2Mapping};

use crate::error::{Error, Result};
use crate::qcow2::meta::mapping::{Lookup, ReadSegment};
use crate::qcow2::meta::refcount::allocating;
use crate::qcow2::meta::{alt_hex, FreeReason, Meta};
use crate::storage::Storage;

/// A region of a new cluster to fill with old content: what the guest read
/// there before the write (the old cluster, a compressed cluster, the
/// backing image or zeros), as a read plan made when the write was planned.
#[derive(Clone, Debug)]
pub(crate) struct CowRegion {
    pub(crate) len: u64,
    /// Guest offset of the region (encryption numbers legacy AES sectors by it).
    pub(crate) guest: GuestOffset,
    pub(crate) plan: Vec<ReadSegment>,
}

/// An allocation in flight.
pub(crate) struct Inflight {
    pub(crate) id: u64,
    /// First guest cluster index.
    pub(crate) first_cluster: u64,
    /// Number of clusters.
    pub(crate) count: u64,
    /// Host offset of the first new cluster.
    pub(crate) host: HostOffset,
    /// For a compressed write: the descriptor to link.
    pub(crate) compressed: Option<oxqcow_format::CompressedDescriptor>,
    /// The clusters are the ones already linked (an in-place write that
    /// allocates subclusters): nothing to free or give back.
    pub(crate) keep_old: bool,
    /// Guest bytes `[start, end)` the write fills (data and copy on write):
    /// with extended L2 entries their subclusters become allocated.
    pub(crate) start: GuestOffset,
    pub(crate) end: GuestOffset,
}

/// What the writer must do for an allocating write.
pub(crate) struct Allocation {
    pub(crate) id: u64,
    /// Host offset where the head region starts (the first new cluster's
    /// start, or with extended L2 entries the first subcluster written).
    pub(crate) host: HostOffset,
    /// Guest offset that `host` maps (where the head region starts).
    pub(crate) guest: GuestOffset,
    pub(crate) head: Option<CowRegion>,
    pub(crate) tail: Option<CowRegion>,
    /// Request bytes this allocation covers.
    pub(crate) len: u64,
}

/// Which entry's COPIED flag [`Meta::copied_holds`] checks.
#[derive(Clone, Copy)]
pub(crate) enum CopiedEntry {
    /// An L2 entry (its raw word) pointing at a data cluster.
    Data { l2_entry: u64 },
    /// An L1 entry pointing at an L2 table.
    L2Table { l1_index: u64, l1_entry: u64 },
}

/// Host clusters whose COPIED flag this session checked against their
/// refcount, one bit each. Clusters past the end of the file are never
/// remembered (they are checked each time), so the set is bounded by the
/// file's size: 2 MiB per TiB of 64 KiB clusters.
#[derive(Default)]
pub(crate) struct VerifiedClusters {
    words: Vec<u64>,
}

impl VerifiedClusters {
    fn contains(&self, cluster: u64) -> bool {
        self.words.get((cluster / 64) as usize).is_some_and(|w| w & (1 << (cluster % 64)) != 0)
    }

    /// Remembers `cluster` if it lies below `limit` (in clusters).
    fn insert(&mut self, cluster: u64, limit: u64) {
        if cluster >= limit {
            return;
        }
        let word = (cluster / 64) as usize;
        if word >= self.words.len() {
            self.words.resize(word + 1, 0);
        }
        self.words[word] |= 1 << (cluster % 64);
    }

    pub(crate) fn clear(&mut self) {
        self.words.clear();
    }
}

/// Where a write starts, as [`Meta::plan_write`] found it: the guest range,
/// the first guest cluster, its L2 table and index, the last cluster the
/// plan may cover (inclusive, within the table), and the first cluster's
/// entry.
#[derive(Clone, Copy)]
struct WriteStart {
    offset: u64,
    end: u64,
    first: u64,
    table: u64,
    index: usize,
    limit: u64,
    mapping: L2Mapping,
    bitmap: L2Bitmap,
}

/// The plan for the next piece of a write.
pub(crate) enum WritePlan {
    /// Another request is allocating a cluster we touch: wait and replan.
    Wait,
    /// Write in place.
    InPlace { host: HostOffset, len: u64 },
    /// Write into newly allocated clusters.
    Allocate(Allocation),
    /// Nothing planned: the write allocates, and a deferred free leaves a
    /// cluster lower than the first free one. Flush (which applies the
    /// frees) and plan again (see [`Meta::reclaim_first`]).
    Reclaim,
}

/// The plan for a compressed write of one cluster.
pub(crate) enum CompressedPlan {
    /// Another request is allocating the cluster: wait and replan.
    Wait,
    /// Flush and plan again, as for [`WritePlan::Reclaim`].
    Reclaim,
    /// Write the compressed data at `host`; `id` is the allocation in flight.
    Write { id: u64, host: HostOffset },
}

impl Meta {
    pub(super) fn inflight_overlaps(&self, first: u64, count: u64) -> bool {
        self.inflight.iter().any(|a| first < a.first_cluster + a.count && a.first_cluster < first + count)
    }

    /// Whether the COPIED flag of the entry `entry` (L1 or L2, `what` says
    /// which) holds for its cluster at `host`: the cluster's refcount is 1,
    /// so writing into it in place changes nothing else. QEMU trusts the
    /// flag, and one wrong bit on a cluster an internal snapshot shares
    /// makes a write change the snapshot. Checked once per cluster and
    /// session (a refcount cache lookup); a mismatch is reported with the
    /// line QEMU's check prints for it (`ImageMessage::Inconsistency`), and the caller then copies on write
    /// as for any shared cluster (a count of 0 is no sharing: refcounts
    /// that low are check's to repair).
    pub(crate) fn copied_holds(&mut self, storage: &dyn Storage, host: HostOffset, what: CopiedEntry) -> Result<bool> {
        if self.data_file.is_some() && matches!(what, CopiedEntry::Data { .. }) {
            // Data file clusters have no refcount: COPIED is always right.
            return Ok(true);
        }
        let cluster = self.geometry.host_cluster(host).0;
        if self.verified.contains(cluster) {
            return Ok(true);
        }
        let refcount = self.refcounts.get(storage, HostCluster(cluster))?;
        if refcount == 1 {
            self.verified.insert(cluster, self.refcounts.host_end);
            return Ok(true);
        }
        let line = match what {
            CopiedEntry::Data { l2_entry } => {
                format!("ERROR OFLAG_COPIED data cluster: l2_entry={l2_entry:x} refcount={refcount}")
            }
            CopiedEntry::L2Table { l1_index, l1_entry } => {
                format!("ERROR OFLAG_COPIED L2 cluster: l1_index={l1_index} l1_entry={l1_entry:x} refcount={refcount}")
            }
        };
        if let Some(sink) = &self.messages {
            sink(crate::options::ImageMessage::Inconsistency(&line));
        }
        Ok(refcount == 0)
    }

    /// Whether the data cluster that entry `index` of `table` maps (as
    /// `mapping`) takes a write in place: a normal cluster with COPIED,
    /// whose flag holds.
    fn writable_in_place(
        &mut self,
        storage: &dyn Storage,
        table: u64,
        index: usize,
        mapping: L2Mapping,
    ) -> Result<bool> {
        let L2Mapping::Normal { host, copied: true } = mapping else { return Ok(false) };
        let l2_entry = self.l2_entry(table, index).0;
        self.copied_holds(storage, host, CopiedEntry::Data { l2_entry })
    }

    /// Whether an allocation of `n` clusters must wait for the deferred
    /// frees to be applied: one of them leaves a cluster free below the
    /// first run of `n` free ones (it may complete a lower run). QEMU
    /// frees at once and allocates the lowest free clusters, so images
    /// written the same way get the same layout (`qemu-img map` offsets)
    /// only if freed clusters are reused as soon as QEMU reuses them. A
    /// freed cluster may not take new data while an L2 or L1 entry on disk
    /// may still point at it (a crash would show the new owner's data
    /// there), so the caller flushes, which makes the table changes durable
    /// before it applies the frees, and plans again.
    pub(crate) fn reclaim_first(&mut self, storage: &dyn Storage, n: u64) -> Result<bool> {
        if self.pending_frees.is_empty() {
            return Ok(false);
        }
        let refcounts = &mut self.refcounts;
        let Some(lowest) = self.pending_frees.lowest_freed(|c| refcounts.get(storage, c))? else {
            return Ok(false);
        };
        // Where the search fails, so does the allocation that follows,
        // which reports it in its own words.
        Ok(self.refcounts.first_free_run(storage, n).is_ok_and(|first| lowest < first))
    }

    /// [`Meta::reclaim_first`] for a zero write at `at`, asked before its
    /// metadata step: whether its L2 table must be allocated while a
    /// deferred free leaves a lower cluster. A failure to tell says no;
    /// the step itself meets it and reports it.
    pub(crate) fn reclaim_for_table(&mut self, storage: &dyn Storage, at: GuestOffset) -> bool {
        let l1_index = self.geometry.l1_index(at);
        matches!(self.l2_needs_alloc(l1_index), Ok(true)) && matches!(self.reclaim_first(storage, 1), Ok(true))
    }

    /// Whether the L2 table of `l1_index` must be allocated (or copied) for
    /// a write: none, or one without COPIED. (A COPIED flag that its
    /// refcount contradicts is found only by `ensure_l2_for_write`.)
    fn l2_needs_alloc(&self, l1_index: u64) -> Result<bool> {
        let raw = self.l1.get(l1_index as usize).copied().unwrap_or(0);
        Ok(self.l2_offset(l1_index)?.is_none() || !L1Entry(raw).copied())
    }

    /// Allocates host clusters and extends the known end of the file.
    pub(crate) fn alloc_clusters(&mut self, storage: &dyn Storage, n: u64) -> Result<u64> {
        let c = self.refcounts.alloc(storage, n)?;
        // Ours alone: their COPIED flags need no check.
        for i in 0..n {
            self.verified.insert(c.0 + i, self.refcounts.host_end);
        }
        Ok(self.geometry.cluster_offset(c).0)
    }

    /// Drops the reference an old L2 mapping held, once the change is durable.
    /// A compressed cluster holds one reference on every host cluster its
    /// sectors touch.
    pub(crate) fn defer_free(&mut self, old: L2Mapping, reason: FreeReason) -> Result<()> {
        if let Some(d) = &self.data_file {
            // Not refcounted: only the data file's space can be given back.
            if let Some(host) = old.host_cluster() {
                d.release(host.0, self.geometry.cluster_size(), reason)?;
            }
            return Ok(());
        }
        match old {
            L2Mapping::Compressed(d) => {
                for c in self.compressed_clusters(&d) {
                    self.pending_frees.push(HostCluster(c), reason);
                }
            }
            other => {
                if let Some(host) = other.host_cluster() {
                    self.pending_frees.push(self.geometry.host_cluster(host), reason);
                }
            }
        }
        Ok(())
    }

    /// The host clusters a compressed cluster's sectors touch.
    pub(crate) fn compressed_clusters(&self, d: &oxqcow_format::CompressedDescriptor) -> std::ops::RangeInclusive<u64> {
        let start = d.offset.0 & !511;
        let first = self.geometry.host_cluster(HostOffset(start)).0;
        let last = self.geometry.host_cluster(HostOffset(start + d.sectors * 512 - 1)).0;
        first..=last
    }

    /// Allocates `size` bytes for compressed data, packing them after the
    /// previous compressed cluster when they fit (QEMU's `qcow2_alloc_bytes`):
    /// every host cluster the bytes touch gains one reference.
    pub(crate) fn alloc_bytes(&mut self, storage: &dyn Storage, size: u64) -> Result<u64> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let mut offset = self.free_byte_offset;
        if offset != 0 {
            // Never pack into a cluster that was freed (and maybe reused)
            // meanwhile, nor one whose refcount is already at the maximum.
            let cluster = g.host_cluster(HostOffset(offset));
            let rc = self.refcounts.get(storage, cluster)?;
            if self.refcounts.packing != Some(cluster.0) || rc == 0 || rc == g.max_refcount() {
                offset = 0;
            }
        }
        let free_in_cluster = if offset == 0 { 0 } else { cs - g.offset_in_cluster(offset) };
        if offset != 0 && free_in_cluster >= size {
            self.refcounts.update(storage, g.host_cluster(HostOffset(offset)), 1)?;
        } else {
            let new = self.alloc_clusters(storage, 1).map_err(|e| allocating("compressed cluster", e))?;
            if offset != 0 && g.align_up(offset) == new && size <= free_in_cluster + cs {
                // Continue into the adjacent new cluster.
                self.refcounts.update(storage, g.host_cluster(HostOffset(offset)), 1)?;
            } else {
                offset = new;
            }
        }
        let end = offset + size;
        self.free_byte_offset = if g.offset_in_cluster(end) == 0 { 0 } else { end };
        self.refcounts.packing = (self.free_byte_offset != 0).then(|| g.host_cluster(HostOffset(end)).0);
        Ok(offset)
    }

    /// The L2 table for `l1_index`, allocated (or copied, when shared) for writing.
    pub(crate) fn ensure_l2_for_write(&mut self, storage: &dyn Storage, l1_index: u64) -> Result<u64> {
        let current = self.l2_offset(l1_index)?;
        let raw = *self.l1.get(l1_index as usize).ok_or_else(|| {
            Error::Corrupt(format!("guest offset needs L1 entry {l1_index}, but the L1 table has {}", self.l1.len()))
        })?;
        if let Some(offset) = current {
            let what = CopiedEntry::L2Table { l1_index, l1_entry: raw };
            if L1Entry(raw).copied() && self.copied_holds(storage, HostOffset(offset), what)? {
                return Ok(offset);
            }
        }
        self.mark_dirty(storage)?;
        let new = self.alloc_clusters(storage, 1).map_err(|e| allocating("L2 table", e))?;
        let data = match current {
            Some(old) => {
                self.load_l2(storage, old)?;
                let copy: Box<[u8]> = self.l2.peek(old).expect("just loaded").into();
                self.pending_frees.push(self.geometry.host_cluster(HostOffset(old)), FreeReason::Other);
                copy
            }
            None => vec![0u8; self.geometry.cluster_size() as usize].into_boxed_slice(),
        };
        self.make_room_l2(storage)?;
        self.l2.insert(new, data, true);
        self.set_l1(l1_index as usize, L1Entry::new(HostOffset(new)).0);
        Ok(new)
    }

    pub(super) fn set_l2_entry(&mut self, table: u64, index: usize, entry: L2Entry) {
        let size = self.geometry.l2_entry_size() as usize;
        let data = self.l2.get_mut(table).expect("table loaded");
        write_l2_word(data, index, size, entry.0);
    }

    pub(super) fn set_l2_bitmap(&mut self, table: u64, index: usize, bitmap: L2Bitmap) {
        if self.geometry.extended_l2() {
            let data = self.l2.get_mut(table).expect("table loaded");
            write_l2_bitmap(data, index, bitmap);
        }
    }

    /// Registers an allocation as in flight and returns its id.
    fn register_inflight(
        &mut self,
        first_cluster: u64,
        count: u64,
        host: u64,
        keep_old: bool,
        start: u64,
        end: u64,
    ) -> u64 {
        let id = self.next_inflight_id;
        self.next_inflight_id += 1;
        self.inflight.push(Inflight {
            id,
            first_cluster,
            count,
            host: HostOffset(host),
            compressed: None,
            keep_old,
            start: GuestOffset(start),
            end: GuestOffset(end),
        });
        id
    }

    /// Plans the next piece of a write at `offset` of `len` bytes.
    ///
    /// With extended L2 entries (QEMU's `calculate_l2_meta`), copy on write
    /// only covers what must be copied: the untouched part of the first and
    /// last subcluster written, and for a cluster that held data the
    /// subclusters between the written ones and the allocated ones; the
    /// other subclusters of a new cluster stay unallocated. A write into a
    /// cluster of ours whose touched subclusters are not all allocated is
    /// written in place, copying on write the partial subclusters, and
    /// then marks them allocated.
    pub(crate) fn plan_write(&mut self, storage: &dyn Storage, at: GuestOffset, len: u64) -> Result<WritePlan> {
        let offset = at.0;
        self.check_in_disk(offset, len)?;
        let g = self.geometry;
        let cs = g.cluster_size();
        let first = g.guest_cluster_index(GuestOffset(offset));
        if self.inflight_overlaps(first, 1) {
            return Ok(WritePlan::Wait);
        }
        let l1_index = g.l1_index(GuestOffset(offset));
        if self.l2_needs_alloc(l1_index)? && self.reclaim_first(storage, 1)? {
            return Ok(WritePlan::Reclaim);
        }
        let table = self.ensure_l2_for_write(storage, l1_index)?;
        self.load_l2(storage, table)?;
        let index = g.l2_index(GuestOffset(offset));
        let end = offset + len;
        let table_end_cluster = first - index as u64 + g.l2_entries();
        let last_cluster = (end - 1) / cs; // inclusive
        let limit = last_cluster.min(table_end_cluster - 1);

        // A cluster QEMU would write in place is checked first
        // (`handle_copied`), and reported in its words.
        let entry = self.l2_entry(table, index);
        let ty = entry.cluster_type(g.extended_l2(), self.data_file.is_some());
        if entry.copied()
            && matches!(ty, ClusterType::Normal | ClusterType::ZeroAlloc)
            && !g.is_cluster_aligned(entry.offset_bits())
        {
            let kind = if ty == ClusterType::ZeroAlloc { "Preallocated zero" } else { "Data" };
            return Err(Error::Corrupt(format!(
                "{kind} cluster offset {} unaligned (guest offset: {})",
                alt_hex(entry.offset_bits()),
                alt_hex(offset)
            )));
        }
        let (m0, b0) = self.mapping_with_bitmap(table, index, Lookup::Write)?;
        self.check_data_file_host(&m0, offset, index)?;
        let w = WriteStart { offset, end, first, table, index, limit, mapping: m0, bitmap: b0 };
        if let (true, L2Mapping::Normal { host, .. }) = (self.writable_in_place(storage, table, index, m0)?, m0) {
            return self.plan_in_place(storage, &w, host);
        }
        self.plan_allocation(storage, &w)
    }

    /// The in-place part of [`Meta::plan_write`]: the first cluster is ours
    /// (COPIED, refcount 1) at `host`; the run covers the following clusters
    /// that are ours and contiguous on the host. With extended L2 entries a
    /// run touching unallocated subclusters becomes an allocation that
    /// keeps its cluster (QEMU's keep_old case).
    fn plan_in_place(&mut self, storage: &dyn Storage, w: &WriteStart, host: HostOffset) -> Result<WritePlan> {
        let WriteStart { offset, end, first, table, index, limit, mapping: m0, bitmap: b0 } = *w;
        let g = self.geometry;
        let (cs, sc) = (g.cluster_size(), g.subcluster_size());
        let in_cluster = g.offset_in_cluster(offset);
        let external = self.data_file.is_some();
        let mut run_end = first + 1;
        let mut next_host = host.0 + cs;
        while run_end <= limit && !self.inflight_overlaps(run_end, 1) {
            let i = index + (run_end - first) as usize;
            let m = self.mapping_with_bitmap(table, i, Lookup::Write)?.0;
            if m.host_cluster() != Some(HostOffset(next_host)) || !self.writable_in_place(storage, table, i, m)? {
                break;
            }
            run_end += 1;
            next_host += cs;
        }
        let run_len = (run_end * cs).min(end) - offset;
        if !g.extended_l2() || self.subclusters_allocated(table, index, offset, offset + run_len) {
            if !external {
                self.refcounts.check_write(host.0 + in_cluster, run_len, 0)?;
            }
            return Ok(WritePlan::InPlace { host: host + in_cluster, len: run_len });
        }
        // In place, but some subclusters need copy on write and all of
        // them a bitmap update (QEMU's keep_old case).
        let w_end = offset + run_len;
        let head_from = match b0.subcluster(&m0, (in_cluster / sc) as u32) {
            oxqcow_format::Subcluster::Normal => offset,
            _ => offset - in_cluster % sc,
        };
        let last_index = index + (run_end - 1 - first) as usize;
        let (ml, bl) = self.mapping_with_bitmap(table, last_index, Lookup::Write)?;
        let tail_to = match bl.subcluster(&ml, (g.offset_in_cluster(w_end - 1) / sc) as u32) {
            oxqcow_format::Subcluster::Normal => w_end,
            _ => w_end.div_ceil(sc) * sc,
        };
        let head = self.cow_region(storage, head_from, offset)?;
        let tail = self.cow_region(storage, w_end, tail_to)?;
        let head_host = host.0 + g.offset_in_cluster(head_from);
        if !external {
            self.refcounts.check_write(head_host, tail_to - head_from, 0)?;
        }
        self.mark_dirty(storage)?;
        let id = self.register_inflight(first, run_end - first, host.0, true, head_from, tail_to);
        Ok(WritePlan::Allocate(Allocation {
            id,
            host: HostOffset(head_host),
            guest: GuestOffset(head_from),
            head,
            tail,
            len: run_len,
        }))
    }

    /// The allocating part of [`Meta::plan_write`]: a run of clusters that
    /// all need new host clusters, with the copy-on-write regions around
    /// the data.
    fn plan_allocation(&mut self, storage: &dyn Storage, w: &WriteStart) -> Result<WritePlan> {
        let WriteStart { offset, end, first, table, index, limit, mapping: m0, bitmap: b0 } = *w;
        let g = self.geometry;
        let (cs, sc) = (g.cluster_size(), g.subcluster_size());
        let in_cluster = g.offset_in_cluster(offset);
        let external = self.data_file.is_some();
        // Allocate a run of clusters that all need allocation.
        let mut count = 1;
        let (mut last_mapping, mut last_bitmap) = (m0, b0);
        while first + count <= limit && !self.inflight_overlaps(first + count, 1) {
            let i = index + count as usize;
            let (m, b) = self.mapping_with_bitmap(table, i, Lookup::Write)?;
            if self.writable_in_place(storage, table, i, m)? {
                break;
            }
            (last_mapping, last_bitmap) = (m, b);
            count += 1;
        }
        if !external && self.reclaim_first(storage, count)? {
            return Ok(WritePlan::Reclaim);
        }
        self.mark_dirty(storage)?;
        let host = if external {
            // QEMU's rule for data files: the cluster lives at its guest
            // offset, and has no refcount in the image file.
            first * cs
        } else {
            let host = self.alloc_clusters(storage, count)?;
            self.refcounts.check_write(host, count * cs, 0)?;
            host
        };
        let covered_end = end.min((first + count) * cs);
        // Where copy on write starts in the first cluster and ends in the
        // last one (QEMU's cow_start_from / cow_end_to): a cluster that
        // held data keeps every allocated subcluster, a compressed one is
        // copied whole, one without a host cluster only the touched
        // subclusters. Without extended L2 entries this is the whole cluster.
        let first_start = first * cs;
        let sc_index = in_cluster / sc;
        let cow_start = first_start
            + match m0 {
                L2Mapping::Compressed(_) => 0,
                m if m.host_cluster().is_some() => sc_index.min(u64::from(b0.alloc().trailing_zeros())) * sc,
                _ => sc_index * sc,
            };
        let last_start = (first + count - 1) * cs;
        let last_sc = g.offset_in_cluster(covered_end - 1) / sc;
        let spc = g.subclusters_per_cluster();
        let cow_end = match last_mapping {
            L2Mapping::Compressed(_) => last_start + cs,
            m if m.host_cluster().is_some() => {
                last_start + cs - (spc - last_sc - 1).min(u64::from(last_bitmap.alloc().leading_zeros())) * sc
            }
            _ => covered_end.div_ceil(sc) * sc,
        };
        let head = self.cow_region(storage, cow_start, offset)?;
        let tail = self.cow_region(storage, covered_end, cow_end)?;
        let id = self.register_inflight(first, count, host, false, cow_start, cow_end);
        Ok(WritePlan::Allocate(Allocation {
            id,
            host: HostOffset(host + (cow_start - first_start)),
            guest: GuestOffset(cow_start),
            head,
            tail,
            len: covered_end - offset,
        }))
    }

    /// The old content of guest bytes `[from, to)`, to copy on write.
    fn cow_region(&mut self, storage: &dyn Storage, from: u64, to: u64) -> Result<Option<CowRegion>> {
        if to <= from {
            return Ok(None);
        }
        let plan = self.plan_range(storage, GuestOffset(from), to - from)?;
        Ok(Some(CowRegion { len: to - from, guest: GuestOffset(from), plan }))
    }

    /// Whether every subcluster `[from, to)` touches is allocated (written
    /// in place without copy on write or bitmap change). The range lies in
    /// clusters with host offsets, inside one L2 table.
    fn subclusters_allocated(&mut self, table: u64, index: usize, from: u64, to: u64) -> bool {
        let g = self.geometry;
        let cs = g.cluster_size();
        let sc = g.subcluster_size();
        let mut pos = from;
        let mut i = index;
        while pos < to {
            let cluster_end = (pos / cs + 1) * cs;
            let piece_end = to.min(cluster_end);
            let first_sc = (g.offset_in_cluster(pos) / sc) as u32;
            let last_sc = (g.offset_in_cluster(piece_end - 1) / sc) as u32;
            let alloc = self.l2_bitmap(table, i).alloc();
            let want = L2Bitmap(0).with_allocated(first_sc, last_sc + 1).alloc();
            if alloc & want != want {
                return false;
            }
            pos = piece_end;
            i += 1;
        }
        true
    }

    fn take_inflight(&mut self, id: u64) -> Inflight {
        let pos = self.inflight.iter().position(|a| a.id == id).expect("allocation is in flight");
        self.inflight.swap_remove(pos)
    }

    /// Plans a compressed write of `len` bytes of compressed data for the
    /// guest cluster at `offset`. Like QEMU, compressed data only goes into
    /// clusters that hold no data yet.
    pub(crate) fn plan_compressed(
        &mut self,
        storage: &dyn Storage,
        at: GuestOffset,
        len: u64,
    ) -> Result<CompressedPlan> {
        let offset = at.0;
        let g = self.geometry;
        let cluster = g.guest_cluster_index(GuestOffset(offset));
        if self.inflight_overlaps(cluster, 1) {
            return Ok(CompressedPlan::Wait);
        }
        let l1_index = g.l1_index(GuestOffset(offset));
        // Packing into the current cluster allocates nothing, but a flush
        // for nothing is cheaper than predicting `alloc_bytes`.
        if self.reclaim_first(storage, 1)? {
            return Ok(CompressedPlan::Reclaim);
        }
        let table = self.ensure_l2_for_write(storage, l1_index)?;
        self.load_l2(storage, table)?;
        let index = g.l2_index(GuestOffset(offset));
        match self.mapping_at(table, index)? {
            L2Mapping::Unallocated | L2Mapping::ZeroPlain => {}
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "cannot write compressed data over the allocated cluster at guest offset {offset}"
                )))
            }
        }
        self.mark_dirty(storage)?;
        let host = self.alloc_bytes(storage, len)?;
        self.refcounts.check_write(host, len, 0)?;
        let start_sector = host / 512;
        let end_sector = (host + len - 1) / 512;
        let desc =
            oxqcow_format::CompressedDescriptor { offset: HostOffset(host), sectors: end_sector - start_sector + 1 };
        // Check the descriptor encodes before anything is written.
        desc.encode(&g)?;
        let id = self.next_inflight_id;
        self.next_inflight_id += 1;
        self.inflight.push(Inflight {
            id,
            first_cluster: cluster,
            count: 1,
            host: HostOffset(host),
            compressed: Some(desc),
            keep_old: false,
            start: GuestOffset(0),
            end: GuestOffset(0),
        });
        Ok(CompressedPlan::Write { id, host: HostOffset(host) })
    }

    /// Links the clusters of a finished allocation into the L2 table.
    pub(crate) fn commit_alloc(&mut self, storage: &dyn Storage, id: u64) -> Result<()> {
        let a = self.take_inflight(id);
        let g = self.geometry;
        let cs = g.cluster_size();
        let guest = GuestOffset(a.first_cluster * cs);
        let l1_index = g.l1_index(guest);
        let table = self.ensure_l2_for_write(storage, l1_index)?;
        self.load_l2(storage, table)?;
        let index = g.l2_index(guest);
        if let Some(desc) = a.compressed {
            let old = self.mapping_at(table, index)?;
            self.set_l2_entry(table, index, L2Entry::compressed(&desc, &g)?);
            // Compressed clusters have no subclusters: their bitmap is zero.
            self.set_l2_bitmap(table, index, L2Bitmap(0));
            self.defer_free(old, FreeReason::Other)?;
            return Ok(());
        }
        let external = self.data_file.is_some();
        let sc = g.subcluster_size();
        for i in 0..a.count as usize {
            let cluster_start = guest.0 + i as u64 * cs;
            if g.extended_l2() {
                // Mark the subclusters written (data and copy on write).
                let from = a.start.max(GuestOffset(cluster_start)) - GuestOffset(cluster_start);
                let to = a.end.min(GuestOffset(cluster_start + cs)) - GuestOffset(cluster_start);
                let bitmap = self.l2_bitmap(table, index + i);
                let first_sc = (from / sc) as u32;
                let end_sc = to.div_ceil(sc) as u32;
                self.set_l2_bitmap(table, index + i, bitmap.with_allocated(first_sc, end_sc));
            }
            if a.keep_old {
                continue;
            }
            let old = self.mapping_at(table, index + i)?;
            self.set_l2_entry(table, index + i, L2Entry::normal(HostOffset((a.host + i as u64 * cs).0)));
            // In a data file the new cluster is the old one's place: nothing
            // to give back.
            if !external {
                self.defer_free(old, FreeReason::Other)?;
            }
        }
        Ok(())
    }

    /// Gives back the clusters of a failed allocation (never referenced, so
    /// they can be freed at once).
    pub(crate) fn abort_alloc(&mut self, storage: &dyn Storage, id: u64) -> Result<()> {
        let a = self.take_inflight(id);
        if let Some(desc) = a.compressed {
            // Never referenced, so released at once.
            for c in self.compressed_clusters(&desc) {
                self.refcounts.update(storage, HostCluster(c), -1)?;
            }
            return Ok(());
        }
        // Data file clusters were never counted; kept clusters were not new.
        if self.data_file.is_some() || a.keep_old {
            return Ok(());
        }
        let first = self.geometry.host_cluster(HostOffset(a.host.0));
        for c in 0..a.count {
            self.refcounts.update(storage, HostCluster(first.0 + c), -1)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::options::CreateOptions;
    use crate::qcow2::Qcow2;
    use crate::storage::MemoryStorage;

    const CS: u64 = 65536;

    fn image(opts: CreateOptions) -> (Qcow2, Arc<MemoryStorage>) {
        let st = Arc::new(MemoryStorage::new());
        (Qcow2::create(st.clone(), &opts).unwrap(), st)
    }

    fn allocation(plan: WritePlan) -> Allocation {
        match plan {
            WritePlan::Allocate(a) => a,
            WritePlan::InPlace { .. } => panic!("planned in place"),
            WritePlan::Wait => panic!("planned a wait"),
            WritePlan::Reclaim => panic!("planned a reclaim"),
        }
    }

    fn region(r: &Option<CowRegion>) -> Option<(u64, u64)> {
        r.as_ref().map(|r| (r.guest.0, r.len))
    }

    #[test]
    fn a_partial_write_into_a_new_cluster_copies_the_rest_of_it() {
        let (q, st) = image(CreateOptions::qcow2(1 << 20));
        let mut m = q.lock_meta();
        let a = allocation(m.plan_write(&*st, GuestOffset(4096), 512).unwrap());
        assert_eq!((a.guest.0, a.len), (0, 512));
        assert_eq!(a.host.0 % CS, 0, "a whole new cluster");
        assert_eq!(region(&a.head), Some((0, 4096)));
        assert_eq!(region(&a.tail), Some((4608, CS - 4608)));
        // The whole cluster is in flight: a second write to it waits.
        assert!(matches!(m.plan_write(&*st, GuestOffset(60000), 10).unwrap(), WritePlan::Wait));
        m.commit_alloc(&*st, a.id).unwrap();
        // Ours now: the next write goes in place.
        match m.plan_write(&*st, GuestOffset(100), 200).unwrap() {
            WritePlan::InPlace { host, len } => assert_eq!((host, len), (a.host + 100, 200)),
            _ => panic!("not in place"),
        }
    }

    #[test]
    fn a_write_over_several_clusters_allocates_them_contiguously_with_head_and_tail() {
        let (q, st) = image(CreateOptions::qcow2(1 << 20));
        let mut m = q.lock_meta();
        let a = allocation(m.plan_write(&*st, GuestOffset(CS + 1000), 2 * CS).unwrap());
        assert_eq!((a.guest.0, a.len), (CS, 2 * CS));
        assert_eq!(region(&a.head), Some((CS, 1000)));
        assert_eq!(region(&a.tail), Some((3 * CS + 1000, CS - 1000)));
        m.abort_alloc(&*st, a.id).unwrap();
        // Given back: the same clusters are handed out again.
        let b = allocation(m.plan_write(&*st, GuestOffset(CS + 1000), 2 * CS).unwrap());
        assert_eq!(b.host, a.host);
    }

    #[test]
    fn with_subclusters_copy_on_write_covers_only_the_touched_subclusters() {
        let (q, st) = image(CreateOptions { extended_l2: true, ..CreateOptions::qcow2(1 << 20) });
        let sc = CS / 32;
        let mut m = q.lock_meta();
        let a = allocation(m.plan_write(&*st, GuestOffset(2 * sc + 100), 100).unwrap());
        assert_eq!(a.guest.0, 2 * sc, "copy on write starts at the subcluster");
        assert_eq!(region(&a.head), Some((2 * sc, 100)));
        assert_eq!(region(&a.tail), Some((2 * sc + 200, sc - 200)));
        assert_eq!(a.host.0 % CS, 2 * sc, "the data lands at its subcluster of the new cluster");
        m.commit_alloc(&*st, a.id).unwrap();
        // An untouched subcluster of that cluster keeps the cluster but
        // needs its own copy on write and bitmap update.
        let b = allocation(m.plan_write(&*st, GuestOffset(5 * sc + 10), 10).unwrap());
        assert_eq!(b.host.0 - b.host.0 % CS, a.host.0 - a.host.0 % CS, "the cluster is kept");
        assert_eq!(region(&b.head), Some((5 * sc, 10)));
        assert_eq!(region(&b.tail), Some((5 * sc + 20, sc - 20)));
    }
}
