//! Allocating writes, zero writes and discards.
//!
//! A write into a cluster that is not exclusively ours (unallocated, zero,
//! shared, compressed) gets a fresh host cluster; the parts of that cluster
//! the request does not cover are copied from the old content (copy on
//! write). The allocation is registered as in flight before the lock is
//! released, so a second request touching the same guest cluster waits for
//! it (QEMU's dependency on `QCowL2Meta`) instead of allocating again; the L2
//! entry is switched to the new cluster only after the data is written, and
//! the old cluster's reference is dropped only after that switch is durable.

use oxqcow_format::table::{write_l2_word, L1Entry};
use oxqcow_format::{GuestOffset, HostCluster, HostOffset, L2Entry, L2Mapping};

use crate::error::{Error, Result};
use crate::qcow2::{FreeReason, Meta};
use crate::storage::Storage;

/// Where the untouched bytes of a newly allocated cluster come from.
#[derive(Clone, Copy, Debug)]
pub(crate) enum CowSource {
    /// The old cluster read as zeros.
    Zero,
    /// The old cluster's bytes at this host offset.
    Host(u64),
    /// The old compressed cluster, decompressed, from this offset in it.
    Compressed(oxqcow_format::CompressedDescriptor, u64),
    /// The backing image at this guest offset.
    Backing(u64),
}

/// A region of a new cluster to fill with old content.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CowRegion {
    pub(crate) len: u64,
    /// Guest offset of the region (encryption numbers legacy AES sectors by it).
    pub(crate) guest: u64,
    pub(crate) source: CowSource,
}

/// An allocation in flight.
pub(crate) struct Inflight {
    pub(crate) id: u64,
    /// First guest cluster index.
    pub(crate) first_cluster: u64,
    /// Number of clusters.
    pub(crate) count: u64,
    /// Host offset of the first new cluster.
    pub(crate) host: u64,
    /// For a compressed write: the descriptor to link.
    pub(crate) compressed: Option<oxqcow_format::CompressedDescriptor>,
}

/// What the writer must do for an allocating write.
pub(crate) struct Allocation {
    pub(crate) id: u64,
    /// Host offset of the first new cluster; the head region starts here.
    pub(crate) host: u64,
    /// Guest offset of the first new cluster.
    pub(crate) guest: u64,
    pub(crate) head: Option<CowRegion>,
    pub(crate) tail: Option<CowRegion>,
    /// Request bytes this allocation covers.
    pub(crate) len: u64,
}

/// The plan for the next piece of a write.
pub(crate) enum WritePlan {
    /// Another request is allocating a cluster we touch: wait and replan.
    Wait,
    /// Write in place.
    InPlace { host: u64, len: u64 },
    /// Write into newly allocated clusters.
    Allocate(Allocation),
}

impl Meta {
    fn inflight_overlaps(&self, first: u64, count: u64) -> bool {
        self.inflight.iter().any(|a| first < a.first_cluster + a.count && a.first_cluster < first + count)
    }

    /// Allocates host clusters and extends the known end of the file.
    pub(crate) fn alloc_clusters(&mut self, storage: &dyn Storage, n: u64) -> Result<u64> {
        let c = self.refcounts.alloc(storage, n)?;
        Ok(self.geometry.cluster_offset(c).0)
    }

    /// Drops the reference an old L2 mapping held, once the change is durable.
    /// A compressed cluster holds one reference on every host cluster its
    /// sectors touch.
    pub(crate) fn defer_free(&mut self, old: L2Mapping, reason: FreeReason) {
        match old {
            L2Mapping::Compressed(d) => {
                for c in self.compressed_clusters(&d) {
                    self.pending_frees.push((HostCluster(c), reason));
                }
            }
            other => {
                if let Some(host) = other.host_cluster() {
                    self.pending_frees.push((self.geometry.host_cluster(host), reason));
                }
            }
        }
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
            let new = self.alloc_clusters(storage, 1)?;
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
            if L1Entry(raw).copied() {
                return Ok(offset);
            }
        }
        self.mark_dirty(storage)?;
        let new = self.alloc_clusters(storage, 1)?;
        let data = match current {
            Some(old) => {
                self.load_l2(storage, old)?;
                let copy: Box<[u8]> = self.l2.peek(old).expect("just loaded").into();
                self.pending_frees.push((self.geometry.host_cluster(HostOffset(old)), FreeReason::Other));
                copy
            }
            None => vec![0u8; self.geometry.cluster_size() as usize].into_boxed_slice(),
        };
        self.make_room_l2(storage)?;
        self.l2.insert(new, data, true);
        self.set_l1(l1_index as usize, L1Entry::new(HostOffset(new)).0);
        Ok(new)
    }

    fn set_l2_entry(&mut self, table: u64, index: usize, entry: L2Entry) {
        let size = self.geometry.l2_entry_size() as usize;
        let data = self.l2.get_mut(table).expect("table loaded");
        write_l2_word(data, index, size, entry.0);
    }

    /// Plans the next piece of a write at `offset` of `len` bytes.
    pub(crate) fn plan_write(&mut self, storage: &dyn Storage, offset: u64, len: u64) -> Result<WritePlan> {
        self.check_in_disk(offset, len)?;
        let g = self.geometry;
        let cs = g.cluster_size();
        let first = g.guest_cluster_index(GuestOffset(offset));
        if self.inflight_overlaps(first, 1) {
            return Ok(WritePlan::Wait);
        }
        let l1_index = g.l1_index(GuestOffset(offset));
        // Read-only lookup first: in-place writes must not allocate L2 tables.
        let table = match self.l2_offset(l1_index)? {
            Some(t) if L1Entry(self.l1[l1_index as usize]).copied() => t,
            _ => self.ensure_l2_for_write(storage, l1_index)?,
        };
        self.load_l2(storage, table)?;
        let index = g.l2_index(GuestOffset(offset));
        let in_cluster = g.offset_in_cluster(offset);
        let end = offset + len;
        let table_end_cluster = first - index as u64 + g.l2_entries();
        let last_cluster = (end - 1) / cs; // inclusive
        let limit = last_cluster.min(table_end_cluster - 1);

        let m0 = self.mapping_at(table, index)?;
        if let L2Mapping::Normal { host, copied: true } = m0 {
            let mut run_end = first + 1;
            let mut next_host = host.0 + cs;
            while run_end <= limit && !self.inflight_overlaps(run_end, 1) {
                let i = index + (run_end - first) as usize;
                match self.mapping_at(table, i)? {
                    L2Mapping::Normal { host: h, copied: true } if h.0 == next_host => {
                        run_end += 1;
                        next_host += cs;
                    }
                    _ => break,
                }
            }
            let run_len = (run_end * cs).min(end) - offset;
            self.refcounts.check_write(host.0 + in_cluster, run_len, 0)?;
            return Ok(WritePlan::InPlace { host: host.0 + in_cluster, len: run_len });
        }

        // Allocate a run of clusters that all need allocation.
        self.mark_dirty(storage)?;
        let mut count = 1;
        let mut last_mapping = m0;
        while first + count <= limit && !self.inflight_overlaps(first + count, 1) {
            let i = index + count as usize;
            let m = self.mapping_at(table, i)?;
            if matches!(m, L2Mapping::Normal { copied: true, .. }) {
                break;
            }
            last_mapping = m;
            count += 1;
        }
        let host = self.alloc_clusters(storage, count)?;
        self.refcounts.check_write(host, count * cs, 0)?;
        let covered_end = end.min((first + count) * cs);
        let has_backing = self.has_backing;
        let cow = |m: L2Mapping, cluster: u64, at: u64, len: u64| -> CowRegion {
            let source = match m {
                L2Mapping::Normal { host, .. } => CowSource::Host(host.0 + at),
                L2Mapping::Compressed(d) => CowSource::Compressed(d, at),
                L2Mapping::Unallocated if has_backing => CowSource::Backing(cluster * cs + at),
                _ => CowSource::Zero,
            };
            CowRegion { len, guest: cluster * cs + at, source }
        };
        let head = (in_cluster != 0).then(|| cow(m0, first, 0, in_cluster));
        let tail_at = g.offset_in_cluster(covered_end);
        let tail = (tail_at != 0).then(|| cow(last_mapping, first + count - 1, tail_at, cs - tail_at));
        let id = self.next_inflight_id;
        self.next_inflight_id += 1;
        self.inflight.push(Inflight { id, first_cluster: first, count, host, compressed: None });
        Ok(WritePlan::Allocate(Allocation { id, host, guest: first * cs, head, tail, len: covered_end - offset }))
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
        offset: u64,
        len: u64,
    ) -> Result<Option<(u64, u64)>> {
        let g = self.geometry;
        let cluster = g.guest_cluster_index(GuestOffset(offset));
        if self.inflight_overlaps(cluster, 1) {
            return Ok(None);
        }
        let l1_index = g.l1_index(GuestOffset(offset));
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
        self.inflight.push(Inflight { id, first_cluster: cluster, count: 1, host, compressed: Some(desc) });
        Ok(Some((id, host)))
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
            self.defer_free(old, FreeReason::Other);
            return Ok(());
        }
        for i in 0..a.count as usize {
            let old = self.mapping_at(table, index + i)?;
            self.set_l2_entry(table, index + i, L2Entry::normal(HostOffset(a.host + i as u64 * cs)));
            self.defer_free(old, FreeReason::Other);
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
        let first = self.geometry.host_cluster(HostOffset(a.host));
        for c in 0..a.count {
            self.refcounts.update(storage, HostCluster(first.0 + c), -1)?;
        }
        Ok(())
    }

    /// Applies `f(old) -> new entry` to every cluster of `[offset, offset +
    /// len)` (cluster aligned, inside one L2 table). Returns `false` without
    /// changing anything if an allocation in flight overlaps.
    fn rewrite_clusters(
        &mut self,
        storage: &dyn Storage,
        offset: u64,
        len: u64,
        mut f: impl FnMut(L2Mapping, L2Entry) -> Option<(L2Entry, bool)>,
    ) -> Result<bool> {
        if offset >= self.header.size {
            return Err(Error::OutOfBounds { offset, len, size: self.header.size });
        }
        let g = self.geometry;
        let cs = g.cluster_size();
        let first = offset / cs;
        let count = len.div_ceil(cs);
        if self.inflight_overlaps(first, count) {
            return Ok(false);
        }
        let l1_index = g.l1_index(GuestOffset(offset));
        let table = match self.l2_offset(l1_index)? {
            Some(t) if L1Entry(self.l1[l1_index as usize]).copied() => t,
            Some(_) => self.ensure_l2_for_write(storage, l1_index)?,
            None => {
                // Unallocated everywhere: only zero writes need a table.
                if f(L2Mapping::Unallocated, L2Entry::UNALLOCATED).is_none() {
                    return Ok(true);
                }
                self.ensure_l2_for_write(storage, l1_index)?
            }
        };
        self.load_l2(storage, table)?;
        let index = g.l2_index(GuestOffset(offset));
        for i in 0..count as usize {
            let entry = self.l2_entry(table, index + i);
            let old = self.decode(entry, table, index + i)?;
            if let Some((new, free_old)) = f(old, entry) {
                if new != entry {
                    self.mark_dirty(storage)?;
                    self.set_l2_entry(table, index + i, new);
                }
                if free_old {
                    self.defer_free(old, FreeReason::Request);
                }
            }
        }
        Ok(true)
    }

    /// Turns whole clusters into zero clusters (version 3).
    pub(crate) fn zero_range(&mut self, storage: &dyn Storage, offset: u64, len: u64, may_unmap: bool) -> Result<bool> {
        self.rewrite_clusters(storage, offset, len, |old, entry| match old {
            L2Mapping::ZeroPlain => None,
            L2Mapping::ZeroAllocated { .. } if !may_unmap => None,
            L2Mapping::Normal { host, copied: true } | L2Mapping::ZeroAllocated { host, copied: true }
                if !may_unmap =>
            {
                Some((L2Entry(host.0 | oxqcow_format::table::ZERO | oxqcow_format::table::COPIED), false))
            }
            L2Mapping::Unallocated => Some((L2Entry::ZERO_PLAIN, false)),
            _ => {
                let _ = entry;
                Some((L2Entry::ZERO_PLAIN, true))
            }
        })
    }

    /// Discards whole clusters: they read as zeros afterwards (version 3; in
    /// version 2 they become unallocated, which reads as zeros without a
    /// backing file) and their host clusters are freed.
    pub(crate) fn discard_range(&mut self, storage: &dyn Storage, offset: u64, len: u64) -> Result<bool> {
        let v3 = self.header.version >= 3;
        let backing = self.has_backing;
        // QEMU's rule: with a backing file (or for allocated clusters) the
        // cluster must read as zeros afterwards, which only v3 can say;
        // without one, unallocated already reads as zeros.
        self.rewrite_clusters(storage, offset, len, |old, _| match old {
            L2Mapping::Unallocated if backing && v3 => Some((L2Entry::ZERO_PLAIN, false)),
            L2Mapping::Unallocated => None,
            L2Mapping::ZeroPlain if backing => None,
            L2Mapping::ZeroPlain => Some((L2Entry::UNALLOCATED, false)),
            _ => Some((if v3 { L2Entry::ZERO_PLAIN } else { L2Entry::UNALLOCATED }, true)),
        })
    }
}
