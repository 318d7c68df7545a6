//! Internal snapshots: create, apply, delete, and the refcount walks they
//! rest on.
//!
//! A snapshot is a copy of the active L1 table plus one more reference on
//! every L2 table and data cluster the copy reaches; COPIED is cleared
//! wherever a cluster becomes shared, so the next write to it copies. All
//! operations run with exclusive access and order their writes so that a
//! crash leaves at worst leaked clusters: references are added (and made
//! durable) before the table that needs them is written, and dropped only
//! after the table that held them is durably gone.

use oxqcow_format::limits::{MAX_L1_BYTES, MAX_SNAPSHOTS};
use oxqcow_format::snapshot::SnapshotTable;
use oxqcow_format::table::{decode_entries, encode_entries, L1Entry, COPIED};
use oxqcow_format::{HostCluster, HostOffset, L2Entry, L2Mapping, SnapshotEntry};

use crate::error::{Error, Result};
use crate::qcow2::meta::{DiscardModes, FreeReason, Meta};
use crate::storage::Storage;

/// Finds the first snapshot matching both `id` and `name` where given
/// (QEMU's `find_snapshot_by_id_and_name`).
pub(crate) fn find_exact(entries: &[SnapshotEntry], id: Option<&str>, name: Option<&str>) -> Option<usize> {
    entries.iter().position(|s| id.is_none_or(|i| s.id == i) && name.is_none_or(|n| s.name == n))
}

/// Finds a snapshot by id first, then by name (QEMU's `find_snapshot_by_id_or_name`).
pub(crate) fn find(entries: &[SnapshotEntry], id_or_name: &str) -> Option<usize> {
    entries.iter().position(|s| s.id == id_or_name).or_else(|| entries.iter().position(|s| s.name == id_or_name))
}

impl Meta {
    /// Every host cluster one reference of the tree under `l1` holds, in a
    /// fixed order: per L2 table, its data clusters, then the table itself.
    fn for_each_tree_cluster(
        &mut self,
        storage: &dyn Storage,
        l1: &[u64],
        f: &mut dyn FnMut(&mut Meta, HostCluster) -> Result<bool>,
    ) -> Result<bool> {
        let g = self.geometry;
        for (i, &raw) in l1.iter().enumerate() {
            let e = L1Entry(raw);
            e.validate(&g).map_err(|err| Error::Corrupt(format!("L1 entry {i}: {err}")))?;
            let Some(table) = e.l2_offset() else { continue };
            self.load_l2(storage, table.0)?;
            for j in 0..g.l2_entries() as usize {
                let entry = self.l2_entry(table.0, j);
                if entry == L2Entry::UNALLOCATED {
                    continue;
                }
                match self.decode(entry, table.0, j)? {
                    L2Mapping::Normal { host, .. } | L2Mapping::ZeroAllocated { host, .. } => {
                        if !f(self, g.host_cluster(host))? {
                            return Ok(false);
                        }
                    }
                    L2Mapping::Compressed(d) => {
                        for c in self.compressed_clusters(&d) {
                            if !f(self, HostCluster(c))? {
                                return Ok(false);
                            }
                        }
                    }
                    L2Mapping::Unallocated | L2Mapping::ZeroPlain => {}
                }
            }
            if !f(self, g.host_cluster(table))? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Adds `delta` to every reference the tree under `l1` holds. An
    /// increase that would overflow the refcount width is undone completely
    /// and reported (QEMU fails the snapshot the same way).
    pub(crate) fn update_tree_refcounts(&mut self, storage: &dyn Storage, l1: &[u64], delta: i64) -> Result<()> {
        let mut done = 0u64;
        let mut failure = None;
        self.for_each_tree_cluster(storage, l1, &mut |m, c| match m.refcounts.update(storage, c, delta) {
            Ok(_) => {
                done += 1;
                Ok(true)
            }
            Err(e) => {
                failure = Some(e);
                Ok(false)
            }
        })?;
        let Some(err) = failure else { return Ok(()) };
        let mut undo = done;
        self.for_each_tree_cluster(storage, l1, &mut |m, c| {
            if undo == 0 {
                return Ok(false);
            }
            undo -= 1;
            m.refcounts.update(storage, c, -delta)?;
            Ok(true)
        })?;
        Err(err)
    }

    /// Sets COPIED on the active L1 and L2 entries exactly where the
    /// referenced cluster's refcount is one.
    pub(crate) fn refresh_copied_flags(&mut self, storage: &dyn Storage) -> Result<()> {
        let g = self.geometry;
        for i in 0..self.l1.len() {
            let e = L1Entry(self.l1[i]);
            let Some(table) = e.l2_offset() else { continue };
            for j in 0..g.l2_entries() as usize {
                self.load_l2(storage, table.0)?;
                let entry = self.l2_entry(table.0, j);
                let host = match self.decode(entry, table.0, j)? {
                    L2Mapping::Normal { host, .. } | L2Mapping::ZeroAllocated { host, .. } => host,
                    _ => continue,
                };
                let want = self.refcounts.get(storage, g.host_cluster(host))? == 1;
                if want != entry.copied() {
                    self.load_l2(storage, table.0)?;
                    let data = self.l2.get_mut(table.0).expect("loaded");
                    oxqcow_format::table::write_l2_word(data, j, g.l2_entry_size() as usize, entry.with_copied(want).0);
                }
            }
            let want = self.refcounts.get(storage, g.host_cluster(table))? == 1;
            if want != e.copied() {
                self.set_l1(i, if want { e.0 | COPIED } else { e.0 & !COPIED });
            }
        }
        Ok(())
    }

    /// Writes a new snapshot table, switches the header to it and frees the
    /// old one (giving its host space back when `modes` pass snapshot
    /// discards, as QEMU frees it with `QCOW2_DISCARD_SNAPSHOT`). Returns
    /// whether the old table was freed: as QEMU's `qcow2_free_clusters`,
    /// a free that would take a refcount below zero changes none of them
    /// (a table `check -r all` read from past the end of the file has no
    /// refcounts) and the rewrite still stands.
    pub(crate) fn write_snapshot_table(
        &mut self,
        storage: &dyn Storage,
        entries: Vec<SnapshotEntry>,
        modes: DiscardModes,
    ) -> Result<bool> {
        let g = self.geometry;
        let bytes = SnapshotTable::serialize(&entries, self.header.size)?;
        let new_offset = if entries.is_empty() {
            0
        } else {
            let offset = self.alloc_clusters(storage, g.clusters_for(bytes.len() as u64))?;
            self.refcounts.check_write(offset, bytes.len() as u64, 0)?;
            storage.write_at(&bytes, offset).map_err(Error::io("writing the snapshot table", offset))?;
            offset
        };
        self.flush_all(storage)?;
        let old_offset = self.header.snapshots_offset;
        let old_clusters = if self.header.nb_snapshots > 0 { g.clusters_for(self.snapshots.byte_size) } else { 0 };
        self.header.nb_snapshots = entries.len() as u32;
        self.header.snapshots_offset = new_offset;
        self.write_header(storage)?;
        storage.sync().map_err(Error::io("syncing the header", 0))?;
        self.snapshots = SnapshotTable { byte_size: bytes.len() as u64, entries };
        let first = g.host_cluster(HostOffset(old_offset)).0;
        let mut freeable = true;
        for c in first..first + old_clusters {
            if !freeable {
                break;
            }
            freeable = self.refcounts.get(storage, HostCluster(c))? > 0;
        }
        if !freeable {
            self.update_reserved();
            self.load_inactive_map(storage)?;
            return Ok(false);
        }
        for c in first..first + old_clusters {
            if self.refcounts.update(storage, HostCluster(c), -1)? == 0 && modes.punches(FreeReason::Snapshot) {
                let offset = g.cluster_offset(HostCluster(c)).0;
                storage.punch_hole(offset, g.cluster_size()).map_err(Error::io("discarding a host cluster", offset))?;
            }
        }
        self.update_reserved();
        self.load_inactive_map(storage)?;
        Ok(true)
    }

    fn read_l1(&self, storage: &dyn Storage, offset: u64, entries: u32) -> Result<Vec<u64>> {
        let bytes = u64::from(entries) * 8;
        let g = self.geometry;
        if bytes > MAX_L1_BYTES || offset % g.cluster_size() != 0 || (bytes > 0 && offset < g.cluster_size()) {
            return Err(Error::Corrupt(format!(
                "Snapshot L1 table offset invalid (offset 0x{offset:x}, {entries} entries)"
            )));
        }
        if g.host_cluster(HostOffset(offset + bytes)).0 > self.refcounts.host_end + 1 {
            return Err(Error::Corrupt(format!("Snapshot L1 table at 0x{offset:x} lies past the end of the file")));
        }
        let mut buf = vec![0u8; bytes as usize];
        storage.read_at(&mut buf, offset).map_err(Error::io("reading a snapshot L1 table", offset))?;
        Ok(decode_entries(&buf))
    }

    /// Creates a snapshot of the active layer. `template` supplies what the
    /// caller decides (QEMU's `QEMUSnapshotInfo`): name, id (empty: the next
    /// free number), dates, VM clock and instruction count; the table
    /// location, sizes and VM state come from the image.
    pub(crate) fn snapshot_create(
        &mut self,
        storage: &dyn Storage,
        template: &SnapshotEntry,
        modes: DiscardModes,
    ) -> Result<SnapshotEntry> {
        if self.snapshots.entries.len() as u64 >= u64::from(MAX_SNAPSHOTS) {
            return Err(Error::NoSpace(format!("File too large (an image holds at most {MAX_SNAPSHOTS} snapshots)")));
        }
        let id = if template.id.is_empty() {
            // QEMU's find_new_snapshot_id: one past the largest id, read as
            // strtoul reads it (leading digits; none counts as 0).
            let numeric = |id: &str| {
                let digits: String = id.trim_start().chars().take_while(char::is_ascii_digit).collect();
                digits.parse::<u64>().unwrap_or(if digits.is_empty() { 0 } else { u64::MAX })
            };
            let max = self.snapshots.entries.iter().map(|s| numeric(&s.id)).max().unwrap_or(0);
            max.saturating_add(1).to_string()
        } else {
            template.id.clone()
        };
        if find_exact(&self.snapshots.entries, Some(&id), None).is_some() {
            return Err(Error::InvalidArgument(format!("File exists (a snapshot with id '{id}' exists)")));
        }
        let g = self.geometry;
        let l1 = self.l1.clone();
        let l1_bytes = l1.len() as u64 * 8;
        let l1_offset = if l1.is_empty() { 0 } else { self.alloc_clusters(storage, g.clusters_for(l1_bytes))? };
        if let Err(e) = self.update_tree_refcounts(storage, &l1, 1) {
            let first = g.host_cluster(HostOffset(l1_offset)).0;
            for c in first..first + g.clusters_for(l1_bytes) {
                self.refcounts.update(storage, HostCluster(c), -1)?;
            }
            return Err(e);
        }
        if !l1.is_empty() {
            self.refcounts.check_write(l1_offset, l1_bytes, 0)?;
            storage
                .write_at(&encode_entries(&l1), l1_offset)
                .map_err(Error::io("writing a snapshot L1 table", l1_offset))?;
        }
        self.refresh_copied_flags(storage)?;
        let entry = SnapshotEntry {
            l1_table_offset: l1_offset,
            l1_size: l1.len() as u32,
            id,
            name: template.name.clone(),
            date_sec: template.date_sec,
            date_nsec: template.date_nsec,
            vm_clock_nsec: template.vm_clock_nsec,
            vm_state_size: 0,
            vm_state_size_large: Some(0),
            disk_size: Some(self.header.size),
            icount: template.icount,
            unknown_extra: Vec::new(),
        };
        let mut entries = self.snapshots.entries.clone();
        entries.push(entry.clone());
        self.write_snapshot_table(storage, entries, modes)?;
        self.l2_cache_reset(storage)?;
        Ok(entry)
    }

    /// Deletes a snapshot and drops its references.
    pub(crate) fn snapshot_delete(
        &mut self,
        storage: &dyn Storage,
        id_or_name: &str,
        modes: DiscardModes,
    ) -> Result<()> {
        let index = find(&self.snapshots.entries, id_or_name)
            .ok_or_else(|| Error::InvalidArgument(format!("Can't find the snapshot '{id_or_name}'")))?;
        let mut entries = self.snapshots.entries.clone();
        let sn = entries.remove(index);
        let l1 = self.read_l1(storage, sn.l1_table_offset, sn.l1_size)?;
        self.write_snapshot_table(storage, entries, modes)?;
        // The snapshot is durably gone: its references can go.
        self.l2_cache_reset(storage)?;
        let mut freed = self.release_tree(storage, &l1)?;
        let g = self.geometry;
        let first = g.host_cluster(HostOffset(sn.l1_table_offset)).0;
        for c in first..first + g.clusters_for(u64::from(sn.l1_size) * 8) {
            if self.refcounts.update(storage, HostCluster(c), -1)? == 0 {
                freed.push(HostCluster(c));
            }
        }
        // Refcounts first (flush order), then the COPIED flags they allow,
        // in the tables the snapshot shared and in the active ones.
        self.flush_all(storage)?;
        self.l2_cache_reset(storage)?;
        self.recompute_tree_flags(storage, &l1)?;
        self.refresh_copied_flags(storage)?;
        self.flush_all(storage)?;
        self.punch_freed(storage, &freed, modes)?;
        // Freed tables may still be cached (clean): forget them.
        self.l2.drop_clean();
        Ok(())
    }

    /// Recomputes COPIED in the still-allocated L2 tables of the tree under
    /// `l1` (set where the cluster's refcount is one, never on compressed,
    /// zero-plain or unallocated entries) and returns the L1 entries with
    /// COPIED recomputed too, as QEMU's `qcow2_update_snapshot_refcount`
    /// leaves every tree it walks.
    fn recompute_tree_flags(&mut self, storage: &dyn Storage, l1: &[u64]) -> Result<Vec<u64>> {
        let g = self.geometry;
        let mut out = l1.to_vec();
        let mut seen = std::collections::HashSet::new();
        for (i, &raw) in l1.iter().enumerate() {
            let Some(table) = L1Entry(raw).l2_offset() else { continue };
            let table_refs = self.refcounts.get(storage, g.host_cluster(table))?;
            out[i] = if table_refs == 1 { raw | COPIED } else { raw & !COPIED };
            if table_refs == 0 || !seen.insert(table.0) {
                continue;
            }
            for j in 0..g.l2_entries() as usize {
                self.load_l2(storage, table.0)?;
                let entry = self.l2_entry(table.0, j);
                let want = match self.decode(entry, table.0, j)? {
                    L2Mapping::Normal { host, .. } | L2Mapping::ZeroAllocated { host, .. } => {
                        self.refcounts.get(storage, g.host_cluster(host))? == 1
                    }
                    _ => false,
                };
                if want != entry.copied() {
                    self.load_l2(storage, table.0)?;
                    let data = self.l2.get_mut(table.0).expect("loaded");
                    oxqcow_format::table::write_l2_word(data, j, g.l2_entry_size() as usize, entry.with_copied(want).0);
                }
            }
        }
        Ok(out)
    }

    /// Drops one reference of every cluster of the tree under `l1` and
    /// returns the clusters that became free.
    fn release_tree(&mut self, storage: &dyn Storage, l1: &[u64]) -> Result<Vec<HostCluster>> {
        let mut freed = Vec::new();
        self.for_each_tree_cluster(storage, l1, &mut |m, c| {
            if m.refcounts.update(storage, c, -1)? == 0 {
                freed.push(c);
            }
            Ok(true)
        })?;
        Ok(freed)
    }

    /// Gives the host space of freed clusters back when snapshot discards
    /// pass (QEMU frees them with `QCOW2_DISCARD_SNAPSHOT`).
    fn punch_freed(&self, storage: &dyn Storage, freed: &[HostCluster], modes: DiscardModes) -> Result<()> {
        if !modes.punches(FreeReason::Snapshot) {
            return Ok(());
        }
        let g = self.geometry;
        for &c in freed {
            let offset = g.cluster_offset(c).0;
            storage.punch_hole(offset, g.cluster_size()).map_err(Error::io("discarding a host cluster", offset))?;
        }
        Ok(())
    }

    /// Reverts the active layer to a snapshot (its size follows the snapshot).
    pub(crate) fn snapshot_apply(
        &mut self,
        storage: &dyn Storage,
        id_or_name: &str,
        modes: DiscardModes,
    ) -> Result<()> {
        let index = find(&self.snapshots.entries, id_or_name)
            .ok_or_else(|| Error::InvalidArgument(format!("Can't find the snapshot '{id_or_name}'")))?;
        let sn = self.snapshots.entries[index].clone();
        let g = self.geometry;
        let sn_l1 = self.read_l1(storage, sn.l1_table_offset, sn.l1_size)?;
        let disk_size = sn.disk_size.unwrap_or(self.header.size);
        // QEMU resizes the disk to the snapshot's size before anything
        // else, and a resize to a size that is not whole sectors fails.
        if disk_size % crate::crypt::SECTOR != 0 {
            return Err(Error::InvalidArgument("The new size must be a multiple of 512".into()));
        }
        let needed = g.l1_entries_for(disk_size).max(u64::from(sn.l1_size));
        if needed > self.l1.len() as u64 {
            self.grow_l1_to(storage, needed)?;
        }
        // New references first, durable before the L1 that needs them.
        self.update_tree_refcounts(storage, &sn_l1, 1)?;
        // The snapshot's own tree gets its COPIED flags recomputed (QEMU
        // rewrites its L1 and L2 tables so).
        let sn_flags = self.recompute_tree_flags(storage, &sn_l1)?;
        self.flush_all(storage)?;
        if sn_flags != sn_l1 {
            let at = sn.l1_table_offset;
            self.refcounts.check_write(at, sn_flags.len() as u64 * 8, crate::qcow2::meta::overlap::INACTIVE_L1)?;
            storage.write_at(&encode_entries(&sn_flags), at).map_err(Error::io("writing a snapshot L1 table", at))?;
            storage.sync().map_err(Error::io("syncing a snapshot L1 table", at))?;
        }
        let mut new_l1 = sn_l1;
        new_l1.resize(self.l1.len(), 0);
        let l1_offset = self.header.l1_table_offset;
        self.refcounts.check_write(l1_offset, new_l1.len() as u64 * 8, crate::qcow2::meta::overlap::ACTIVE_L1)?;
        storage.write_at(&encode_entries(&new_l1), l1_offset).map_err(Error::io("writing the L1 table", l1_offset))?;
        storage.sync().map_err(Error::io("syncing the L1 table", l1_offset))?;
        let old_l1 = std::mem::replace(&mut self.l1, new_l1);
        self.l1_dirty.clear();
        self.update_reserved();
        // The old tree is durably unreferenced by the active L1.
        self.l2_cache_reset(storage)?;
        let freed = self.release_tree(storage, &old_l1)?;
        if self.header.size != disk_size {
            self.header.size = disk_size;
            self.write_header(storage)?;
        }
        self.flush_all(storage)?;
        self.l2_cache_reset(storage)?;
        self.recompute_tree_flags(storage, &old_l1)?;
        self.refresh_copied_flags(storage)?;
        self.flush_all(storage)?;
        self.punch_freed(storage, &freed, modes)?;
        // Freed tables may still be cached (clean): forget them.
        self.l2.drop_clean();
        Ok(())
    }

    /// Drops every cached L2 table (flushing first): after trees changed
    /// owners, tables may have been freed.
    fn l2_cache_reset(&mut self, storage: &dyn Storage) -> Result<()> {
        self.flush_all(storage)?;
        self.l2.drop_clean();
        Ok(())
    }

    /// The L1 table of a snapshot, for reading its content.
    pub(crate) fn snapshot_view(&self, storage: &dyn Storage, id_or_name: &str) -> Result<(Vec<u64>, u64)> {
        let index = find(&self.snapshots.entries, id_or_name)
            .ok_or_else(|| Error::InvalidArgument(format!("Can't find the snapshot '{id_or_name}'")))?;
        let sn = &self.snapshots.entries[index];
        let l1 = self.read_l1(storage, sn.l1_table_offset, sn.l1_size)?;
        Ok((l1, sn.disk_size.unwrap_or(self.header.size)))
    }
}
