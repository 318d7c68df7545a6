//! Creating qcow2 images, growing and shrinking them, and preallocation.
//!
//! Creation follows QEMU's `qcow2_co_create` so that a new image has the
//! same layout as one qemu-img makes: header in cluster 0, a one-cluster
//! refcount table in cluster 1, one refcount block in cluster 2, then the L1
//! table allocated by the same resize path that grows images later.

use oxqcow_format::limits::MAX_L1_BYTES;
use oxqcow_format::table::{encode_entries, L1Entry};
use oxqcow_format::{GuestOffset, HostCluster, HostOffset, L2Entry, L2Mapping};

use crate::error::{Error, Result};
use crate::options::Preallocation;
use crate::qcow2::meta::{DiscardModes, FreeReason, Meta};
use crate::storage::Storage;

impl Meta {
    /// Whether the cluster at guest `start` is shared with a snapshot
    /// (normal without COPIED), or unallocated when `reads_backing` (its
    /// content comes from the backing file): then it must be rewritten
    /// into a cluster of ours before a resize changes it in place.
    pub(crate) fn cluster_shared_or_backed(
        &mut self,
        st: &dyn Storage,
        start: u64,
        reads_backing: bool,
    ) -> Result<bool> {
        let g = self.geometry;
        let Some(table) = self.l2_offset(g.l1_index(GuestOffset(start)))? else { return Ok(reads_backing) };
        self.load_l2(st, table)?;
        Ok(match self.mapping_at(table, g.l2_index(GuestOffset(start)))? {
            L2Mapping::Normal { copied: false, .. } => true,
            L2Mapping::Unallocated => reads_backing,
            _ => false,
        })
    }

    /// Grows the L1 table to `entries` entries: a new table is written,
    /// synced, switched to in the header, and the old one freed.
    pub(crate) fn grow_l1_to(&mut self, storage: &dyn Storage, entries: u64) -> Result<()> {
        self.grow_l1(storage, entries)
    }

    fn grow_l1(&mut self, storage: &dyn Storage, entries: u64) -> Result<()> {
        if entries * 8 > MAX_L1_BYTES {
            return Err(Error::NoSpace(format!(
                "Failed to grow the L1 table: File too large ({entries} entries exceed the 32 MiB limit)"
            )));
        }
        // The copy must not point at L2 tables that are not on disk yet.
        self.flush_all(storage)?;
        let g = self.geometry;
        let clusters = g.clusters_for(entries * 8);
        let new_offset = self.alloc_clusters(storage, clusters)?;
        let mut l1 = self.l1.clone();
        l1.resize(entries as usize, 0);
        // Exactly the entries, as QEMU writes them: the rest of the last
        // cluster may lie past the end of the file and reads as zeros.
        let bytes = encode_entries(&l1);
        self.refcounts.check_write(new_offset, bytes.len() as u64, 0)?;
        storage.write_at(&bytes, new_offset).map_err(Error::io("writing the L1 table", new_offset))?;
        self.refcounts.write_dirty(storage)?;
        storage.sync().map_err(Error::io("syncing the new L1 table", new_offset))?;
        let old_offset = self.header.l1_table_offset;
        let old_clusters = g.clusters_for(u64::from(self.header.l1_size) * 8);
        self.header.l1_table_offset = new_offset;
        self.header.l1_size = entries as u32;
        self.l1 = l1;
        self.l1_dirty.clear();
        self.write_header(storage)?;
        storage.sync().map_err(Error::io("syncing the header", 0))?;
        if old_clusters > 0 {
            let first = g.host_cluster(HostOffset(old_offset)).0;
            for c in first..first + old_clusters {
                self.refcounts.update(storage, HostCluster(c), -1)?;
            }
        }
        self.update_reserved();
        Ok(())
    }

    /// Changes the guest size (exclusive access, metadata flushed).
    /// The refusals QEMU's truncate makes before it changes anything.
    pub(crate) fn check_resize(&self, new_size: u64) -> Result<()> {
        if new_size % 512 != 0 {
            return Err(Error::InvalidArgument(format!("The new size must be a multiple of 512 (got {new_size})")));
        }
        // Version 2 snapshot entries record no disk size, so a snapshot
        // could not say how large its disk was (QEMU's rule, any new size).
        if !self.snapshots.entries.is_empty() && self.header.version < 3 {
            return Err(Error::InvalidArgument("Can't resize a v2 image which has snapshots".into()));
        }
        Ok(())
    }

    pub(crate) fn resize(&mut self, storage: &dyn Storage, new_size: u64, prealloc: Preallocation) -> Result<()> {
        self.check_resize(new_size)?;
        let g = self.geometry;
        let old_size = self.header.size;
        let needed = g.l1_entries_for(new_size);
        if needed > oxqcow_format::limits::MAX_L1_INDEX {
            return Err(Error::InvalidArgument(format!("Image size {new_size} is too big")));
        }
        // A raw data file must read as the disk at all times: QEMU maps
        // every new cluster (to its place in the data file) when growing.
        let prealloc = match &self.data_file {
            Some(d) if d.raw && prealloc == Preallocation::Off && new_size >= old_size => Preallocation::Metadata,
            _ => prealloc,
        };
        if new_size >= old_size {
            if needed > self.l1.len() as u64 {
                self.grow_l1(storage, needed)?;
            }
            // Bytes past the old end in its last cluster must read as zeros.
            let tail_end = g.align_up(old_size).min(new_size);
            if tail_end > old_size {
                self.zero_tail(storage, old_size, tail_end - old_size)?;
            }
            self.header.size = new_size;
            self.write_header(storage)?;
            storage.sync().map_err(Error::io("syncing the header", 0))?;
            if prealloc != Preallocation::Off && new_size > old_size {
                self.preallocate(storage, g.align_down(old_size), new_size, prealloc)?;
            }
            self.size_data_file(new_size)?;
            return Ok(());
        }
        if prealloc != Preallocation::Off {
            return Err(Error::InvalidArgument("Preallocation can only be used for growing images".into()));
        }
        // Shrink: drop every cluster past the new end, then the L2 tables
        // wholly past it.
        let start = g.align_up(new_size);
        let end = g.align_up(old_size);
        let mut pos = start;
        while pos < end {
            let chunk_end = end.min((g.l1_index(GuestOffset(pos)) + 1) * g.bytes_per_l2());
            self.drop_clusters(storage, pos, chunk_end - pos)?;
            pos = chunk_end;
        }
        for i in needed as usize..self.l1.len() {
            if let Some(offset) = self.l2_offset(i as u64)? {
                if self.l2.contains(offset) {
                    self.l2.remove(offset);
                }
                self.pending_frees.push(g.host_cluster(HostOffset(offset)), FreeReason::Always);
                self.set_l1(i, 0);
            }
        }
        self.header.size = new_size;
        self.write_header(storage)?;
        self.flush_all(storage)?;
        let frees = self.pending_frees.take();
        self.apply_frees(storage, frees, DiscardModes::default())?;
        self.flush_all(storage)?;
        // Give the space back: cut the file after the last used cluster.
        let file_len = storage.len().map_err(Error::io("reading the file length", 0))?;
        let mut last = g.clusters_for(file_len);
        while last > 0 && self.refcounts.get(storage, HostCluster(last - 1))? == 0 {
            last -= 1;
        }
        let new_len = last * g.cluster_size();
        if new_len < file_len {
            storage.set_len(new_len).map_err(Error::io("truncating the image file", new_len))?;
            self.refcounts.file_shrunk(new_len);
        }
        self.size_data_file(new_size)
    }

    /// The data file follows the disk size, as QEMU truncates it with the
    /// image.
    fn size_data_file(&self, size: u64) -> Result<()> {
        let Some(d) = &self.data_file else { return Ok(()) };
        let len = d.storage.len().map_err(Error::io("reading the data file length", 0))?;
        if len != size {
            d.storage.set_len(size).map_err(Error::io("resizing the data file", size))?;
        }
        Ok(())
    }

    /// Drops every cluster of the active layer (entries become unallocated).
    pub(crate) fn drop_all_clusters(&mut self, storage: &dyn Storage) -> Result<()> {
        let g = self.geometry;
        let end = g.align_up(self.header.size);
        let mut pos = 0;
        while pos < end {
            let chunk_end = end.min((g.l1_index(GuestOffset(pos)) + 1) * g.bytes_per_l2());
            self.drop_clusters(storage, pos, chunk_end - pos)?;
            pos = chunk_end;
        }
        self.flush_all(storage)?;
        let frees = self.pending_frees.take();
        self.apply_frees(storage, frees, DiscardModes::default())?;
        self.flush_all(storage)
    }

    /// Drops whole clusters (shrink): entries become unallocated.
    fn drop_clusters(&mut self, storage: &dyn Storage, offset: u64, len: u64) -> Result<()> {
        let g = self.geometry;
        let l1_index = g.l1_index(GuestOffset(offset));
        let Some(table) = self.l2_offset(l1_index)? else { return Ok(()) };
        if !L1Entry(self.l1[l1_index as usize]).copied() {
            self.ensure_l2_for_write(storage, l1_index)?;
        }
        let table = self.l2_offset(l1_index)?.unwrap_or(table);
        self.load_l2(storage, table)?;
        let index = g.l2_index(GuestOffset(offset));
        for i in 0..g.clusters_for(len) as usize {
            let entry = self.l2_entry(table, index + i);
            if entry == L2Entry::UNALLOCATED && self.l2_bitmap(table, index + i).0 == 0 {
                continue;
            }
            let old = self.decode(entry, table, index + i)?;
            let data = self.l2.get_mut(table).expect("loaded");
            oxqcow_format::table::write_l2_word(data, index + i, g.l2_entry_size() as usize, 0);
            if g.extended_l2() {
                // QEMU's full discard: the whole 128-bit entry is cleared.
                oxqcow_format::table::write_l2_bitmap(data, index + i, oxqcow_format::L2Bitmap(0));
            }
            self.defer_free(old, FreeReason::Always)?;
        }
        Ok(())
    }

    /// Zeroes `[offset, offset + len)` inside the old last cluster when
    /// growing, if that cluster holds data.
    fn zero_tail(&mut self, storage: &dyn Storage, offset: u64, len: u64) -> Result<()> {
        let g = self.geometry;
        let l1_index = g.l1_index(GuestOffset(offset));
        let Some(table) = self.l2_offset(l1_index)? else { return Ok(()) };
        self.load_l2(storage, table)?;
        let index = g.l2_index(GuestOffset(offset));
        match self.mapping_at(table, index)? {
            L2Mapping::Normal { host, copied: true } => {
                let at = host.0 + g.offset_in_cluster(offset);
                let data = self.data_file.as_ref().map(|d| d.storage.clone());
                data.as_deref()
                    .unwrap_or(storage)
                    .write_zeroes(at, len)
                    .map_err(Error::io("zeroing the old end of the disk", at))?;
            }
            L2Mapping::Normal { .. } => {
                return Err(Error::Unsupported("growing an image whose last cluster is shared".into()));
            }
            _ => {}
        }
        Ok(())
    }

    /// Maps every unallocated cluster of `[from, to)` to a new host cluster.
    fn preallocate(&mut self, storage: &dyn Storage, from: u64, to: u64, mode: Preallocation) -> Result<()> {
        let image_file = storage;
        let g = self.geometry;
        let cs = g.cluster_size();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        // Free clusters below the current end of the file may still hold
        // data from their previous use (freed without a hole punch, e.g. a
        // discard without pass-discard-request): zero them before linking
        // them. Clusters past the end read as zeros already.
        let file_end = storage.len().map_err(Error::io("reading the file length", 0))?;
        let data = self.data_file.as_ref().map(|d| d.storage.clone());
        let external = data.is_some();
        let mut pos = from;
        while pos < to {
            let l1_index = g.l1_index(GuestOffset(pos));
            let table_end = to.min((l1_index + 1) * g.bytes_per_l2());
            let table = self.ensure_l2_for_write(storage, l1_index)?;
            self.load_l2(storage, table)?;
            let first_index = g.l2_index(GuestOffset(pos));
            let count = g.clusters_for(table_end - pos);
            let mut i = 0;
            while i < count {
                let idx = first_index + i as usize;
                if self.l2_entry(table, idx) != L2Entry::UNALLOCATED {
                    i += 1;
                    continue;
                }
                let mut n = 1;
                while i + n < count && self.l2_entry(table, idx + n as usize) == L2Entry::UNALLOCATED {
                    n += 1;
                }
                // Data file clusters sit at their guest offset, unrefcounted.
                let host = if external { (pos / cs + i) * cs } else { self.alloc_clusters(storage, n)? };
                let stale_end = if external { host } else { (host + n * cs).min(file_end) };
                if stale_end > host && mode != Preallocation::Full {
                    let res = if mode == Preallocation::Metadata {
                        storage.punch_hole(host, stale_end - host)
                    } else {
                        storage.write_zeroes(host, stale_end - host)
                    };
                    res.map_err(Error::io("zeroing reused clusters", host))?;
                }
                for k in 0..n {
                    let data = self.l2.get_mut(table).expect("loaded");
                    let entry = L2Entry::normal(HostOffset(host + k * cs));
                    oxqcow_format::table::write_l2_word(data, idx + k as usize, g.l2_entry_size() as usize, entry.0);
                }
                match runs.last_mut() {
                    Some((s, l)) if *s + *l == host => *l += n * cs,
                    _ => runs.push((host, n * cs)),
                }
                i += n;
            }
            pos = table_end;
        }
        let storage: &dyn Storage = data.as_deref().unwrap_or(storage);
        for &(host, len) in &runs {
            match mode {
                Preallocation::Full => {
                    let zeros = vec![0u8; len.min(1 << 20) as usize];
                    let mut done = 0;
                    while done < len {
                        let n = (len - done).min(zeros.len() as u64);
                        storage
                            .write_at(&zeros[..n as usize], host + done)
                            .map_err(Error::io("preallocating", host + done))?;
                        done += n;
                    }
                }
                Preallocation::Falloc => {
                    storage.allocate(host, len).map_err(Error::io("preallocating", host))?;
                }
                _ => {}
            }
        }
        if let Some(&(host, len)) = runs.iter().max_by_key(|r| r.0) {
            let end = host + len;
            let file_len = storage.len().map_err(Error::io("reading the file length", 0))?;
            if file_len < end {
                storage.set_len(end).map_err(Error::io("extending the image file", end))?;
            }
        }
        self.flush_all(image_file)
    }
}
