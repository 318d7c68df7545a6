//! Zero writes and discards as L2 rewrites: whole clusters become zero
//! clusters or unallocated (version 2), subclusters get their zero bits,
//! the old host clusters are given back as the discard modes say, and a
//! raw external data file gets its zeros first.

use oxqcow_format::table::L1Entry;
use oxqcow_format::{GuestOffset, L2Bitmap, L2Entry, L2Mapping};

use crate::error::{Error, Result};
use crate::qcow2::meta::{FreeReason, Meta};
use crate::storage::Storage;

impl Meta {
    /// Applies `f(old mapping, old entry, old bitmap) -> (new entry, new
    /// bitmap, free the old cluster)` to every cluster of `[offset, offset +
    /// len)` (cluster aligned, inside one L2 table). Returns `false` without
    /// changing anything if an allocation in flight overlaps.
    pub(super) fn rewrite_clusters(
        &mut self,
        storage: &dyn Storage,
        offset: u64,
        len: u64,
        mut f: impl FnMut(L2Mapping, L2Entry, L2Bitmap) -> Option<(L2Entry, L2Bitmap, bool)>,
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
                if f(L2Mapping::Unallocated, L2Entry::UNALLOCATED, L2Bitmap(0)).is_none() {
                    return Ok(true);
                }
                self.ensure_l2_for_write(storage, l1_index)?
            }
        };
        self.load_l2(storage, table)?;
        let index = g.l2_index(GuestOffset(offset));
        for i in 0..count as usize {
            let entry = self.l2_entry(table, index + i);
            let bitmap = self.l2_bitmap(table, index + i);
            let old = self.decode(entry, table, index + i)?;
            self.check_data_file_host(&old, offset + i as u64 * cs, index + i)?;
            if let Some((new, new_bitmap, free_old)) = f(old, entry, bitmap) {
                if new != entry || new_bitmap != bitmap {
                    self.mark_dirty(storage)?;
                    self.set_l2_entry(table, index + i, new);
                    self.set_l2_bitmap(table, index + i, new_bitmap);
                }
                if free_old {
                    self.defer_free(old, FreeReason::Request)?;
                }
            }
        }
        Ok(true)
    }

    /// Turns whole clusters into zero clusters (version 3). With extended
    /// L2 entries (QEMU's `zero_in_l2_slice`) every subcluster becomes
    /// zero; the host cluster is kept unless `may_unmap` (compressed
    /// clusters are always given back). With `discard-no-unref` an
    /// unmapping zero write keeps the host cluster referenced too, and only
    /// its space is given back.
    pub(crate) fn zero_range(
        &mut self,
        storage: &dyn Storage,
        at: GuestOffset,
        len: u64,
        may_unmap: bool,
    ) -> Result<bool> {
        let offset = at.0;
        if !self.zero_in_raw_data_file(offset, len, may_unmap)? {
            return Ok(false);
        }
        let keep = self.discard_no_unref;
        let mut punch = Vec::new();
        let done = if self.geometry.extended_l2() {
            self.rewrite_clusters(storage, offset, len, |old, entry, bitmap| {
                let unmap = match old {
                    L2Mapping::Compressed(_) => true,
                    m => may_unmap && m.host_cluster().is_some(),
                };
                if unmap && keep && !matches!(old, L2Mapping::Compressed(_)) {
                    kept(&old, bitmap != L2Bitmap::ALL_ZEROES, &mut punch);
                    return Some((entry, L2Bitmap::ALL_ZEROES, false));
                }
                let new = if unmap { L2Entry::UNALLOCATED } else { entry };
                Some((new, L2Bitmap::ALL_ZEROES, unmap))
            })?
        } else {
            self.rewrite_clusters(storage, offset, len, |old, entry, b| match old {
                L2Mapping::ZeroPlain => None,
                L2Mapping::ZeroAllocated { .. } if !may_unmap || keep => None,
                L2Mapping::Normal { host, copied: true } | L2Mapping::ZeroAllocated { host, copied: true }
                    if !may_unmap =>
                {
                    Some((L2Entry(host.0 | oxqcow_format::table::ZERO | oxqcow_format::table::COPIED), b, false))
                }
                L2Mapping::Unallocated => Some((L2Entry::ZERO_PLAIN, b, false)),
                L2Mapping::Normal { .. } if keep => {
                    kept(&old, true, &mut punch);
                    Some((L2Entry(entry.0 | oxqcow_format::table::ZERO), b, false))
                }
                _ => Some((L2Entry::ZERO_PLAIN, b, true)),
            })?
        };
        self.punch_kept(storage, &punch)?;
        Ok(done)
    }

    /// Gives back the host space of clusters that `discard-no-unref` keeps
    /// referenced, when `pass-discard-request` says so (QEMU passes the
    /// discard on). The clusters read as zeros by their entries already.
    fn punch_kept(&self, storage: &dyn Storage, hosts: &[u64]) -> Result<()> {
        if !self.punch_requests || hosts.is_empty() {
            return Ok(());
        }
        let cs = self.geometry.cluster_size();
        let st: &dyn Storage = match &self.data_file {
            Some(d) => &*d.storage,
            None => storage,
        };
        for &h in hosts {
            st.punch_hole(h, cs).map_err(Error::io("discarding a host cluster", h))?;
        }
        Ok(())
    }

    /// With a raw external data file, which must read as the disk does:
    /// real zeros there first (QEMU's `qcow2_subcluster_zeroize`), before
    /// the metadata changes. Returns `false` (nothing done) when an
    /// allocation in flight overlaps the range.
    pub(super) fn zero_in_raw_data_file(&mut self, offset: u64, len: u64, may_unmap: bool) -> Result<bool> {
        let Some(d) = self.data_file.as_ref().filter(|d| d.raw) else { return Ok(true) };
        let cs = self.geometry.cluster_size();
        if self.inflight_overlaps(offset / cs, (offset % cs + len).div_ceil(cs)) {
            return Ok(false);
        }
        let end = (offset + len).min(self.header.size);
        if end > offset {
            let st = &d.storage;
            let res =
                if may_unmap { st.punch_hole(offset, end - offset) } else { st.write_zeroes(offset, end - offset) };
            res.map_err(Error::io("zeroing in the data file", offset))?;
        }
        Ok(true)
    }

    /// Makes subclusters of one cluster read as zeros (QEMU's
    /// `zero_l2_subclusters`): `[offset, offset + len)` is subcluster
    /// aligned and less than a cluster. Returns `Ok(None)` when an
    /// allocation of the cluster is in flight, `Ok(Some(false))` when the
    /// cluster is compressed (which cannot be zeroed in part: the caller
    /// writes zeros instead).
    pub(crate) fn zero_subclusters(
        &mut self,
        storage: &dyn Storage,
        at: GuestOffset,
        len: u64,
    ) -> Result<Option<bool>> {
        let offset = at.0;
        let g = self.geometry;
        let cluster = g.guest_cluster_index(GuestOffset(offset));
        if self.inflight_overlaps(cluster, 1) {
            return Ok(None);
        }
        let l1_index = g.l1_index(GuestOffset(offset));
        let table = self.ensure_l2_for_write(storage, l1_index)?;
        self.load_l2(storage, table)?;
        let index = g.l2_index(GuestOffset(offset));
        if matches!(self.mapping_at(table, index)?, L2Mapping::Compressed(_)) {
            return Ok(Some(false));
        }
        self.zero_in_raw_data_file(offset, len, false)?;
        let sc = g.subcluster_size();
        let first_sc = (g.offset_in_cluster(offset) / sc) as u32;
        let end_sc = first_sc + len.div_ceil(sc) as u32;
        let old = self.l2_bitmap(table, index);
        let new = old.with_zeroes(first_sc, end_sc);
        if new != old {
            self.mark_dirty(storage)?;
            self.set_l2_bitmap(table, index, new);
        }
        Ok(Some(true))
    }

    /// Whether the cluster containing `offset` is compressed.
    pub(crate) fn is_compressed_at(&mut self, storage: &dyn Storage, at: GuestOffset) -> Result<bool> {
        let offset = at.0;
        let g = self.geometry;
        let Some(table) = self.l2_offset(g.l1_index(GuestOffset(offset)))? else { return Ok(false) };
        self.load_l2(storage, table)?;
        Ok(matches!(self.mapping_at(table, g.l2_index(GuestOffset(offset)))?, L2Mapping::Compressed(_)))
    }

    /// Discards whole clusters: they read as zeros afterwards (version 3; in
    /// version 2 they become unallocated, which reads as zeros without a
    /// backing file) and their host clusters are freed.
    pub(crate) fn discard_range(&mut self, storage: &dyn Storage, at: GuestOffset, len: u64) -> Result<bool> {
        let offset = at.0;
        let v3 = self.header.version >= 3;
        if !v3 && self.backing_named() {
            // Version 2 cannot say "reads as zeros": an unallocated entry
            // would expose the backing file's data. QEMU refuses
            // (`qcow2_co_pdiscard`: ENOTSUP, which its block layer turns
            // into a successful no-op), and so the data stays.
            return Ok(true);
        }
        let backing = self.has_backing;
        let keep = self.discard_no_unref;
        let mut punch = Vec::new();
        let done = if self.geometry.extended_l2() {
            // QEMU's discard_in_l2_slice with subclusters: every subcluster
            // reads as zeros, unless the cluster was unallocated and there
            // is no backing file (it reads as zeros already).
            self.rewrite_clusters(storage, offset, len, |old, entry, bitmap| {
                let allocated = matches!(old, L2Mapping::Compressed(_)) || old.host_cluster().is_some();
                if !backing && !allocated {
                    return None;
                }
                if keep && allocated && !matches!(old, L2Mapping::Compressed(_)) {
                    kept(&old, bitmap != L2Bitmap::ALL_ZEROES, &mut punch);
                    return Some((entry, L2Bitmap::ALL_ZEROES, false));
                }
                Some((L2Entry::UNALLOCATED, L2Bitmap::ALL_ZEROES, allocated))
            })?
        } else {
            // QEMU's rule: with a backing file (or for allocated clusters)
            // the cluster must read as zeros afterwards, which only v3 can
            // say; without one, unallocated already reads as zeros. A
            // plain zero cluster is left as it is (QEMU's
            // discard_in_l2_slice). With discard-no-unref (v3 only) an
            // allocated cluster becomes a zero cluster that keeps it.
            self.rewrite_clusters(storage, offset, len, |old, entry, b| match old {
                L2Mapping::Unallocated if backing && v3 => Some((L2Entry::ZERO_PLAIN, b, false)),
                L2Mapping::Unallocated => None,
                L2Mapping::ZeroPlain => None,
                L2Mapping::ZeroAllocated { .. } if keep => None,
                L2Mapping::Normal { .. } if keep => {
                    kept(&old, true, &mut punch);
                    Some((L2Entry(entry.0 | oxqcow_format::table::ZERO), b, false))
                }
                _ => Some((if v3 { L2Entry::ZERO_PLAIN } else { L2Entry::UNALLOCATED }, b, true)),
            })?
        };
        self.punch_kept(storage, &punch)?;
        Ok(done)
    }
}

/// Notes the host cluster of a cluster that `discard-no-unref` keeps, when
/// its entry `changes`, for its space to be given back; only a cluster of
/// this image alone (COPIED): the space of one a snapshot shares still
/// holds the snapshot's data.
fn kept(old: &L2Mapping, changes: bool, punch: &mut Vec<u64>) {
    if let (true, L2Mapping::Normal { host, copied: true } | L2Mapping::ZeroAllocated { host, copied: true }) =
        (changes, old)
    {
        punch.push(host.0);
    }
}
