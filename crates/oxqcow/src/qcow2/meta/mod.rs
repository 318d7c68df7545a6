//! The metadata of an open qcow2 image, everything [`crate::qcow2::Qcow2`]
//! keeps under its `meta` lock: header, L1 table, the L2 and refcount
//! caches, in-flight allocations, deferred frees, snapshots and bitmaps.
//! Its submodules each own one concern of it; only they see its fields.

pub mod amend;
pub mod bitmap;
pub(crate) mod cache;
pub mod check;
mod crypt;
pub mod mapping;
pub mod overlap;
pub(crate) mod plan;
pub(crate) mod refcount;
pub(crate) mod resize;
pub(crate) mod snapshot;

use std::collections::BTreeSet;

use oxqcow_format::header::{self, incompat, Header};
use oxqcow_format::snapshot::SnapshotTable;
use oxqcow_format::table::{decode_entries, encode_entries, L1Entry};
use oxqcow_format::{Geometry, HostCluster};

use crate::error::{Error, Result};
use crate::storage::Storage;
use cache::TableCache;
use plan::Inflight;
use refcount::Refcounts;

/// Why a cluster is freed: decides whether its host space is given back
/// too (QEMU's pass-discard-request / -snapshot / -other options).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FreeReason {
    /// A guest discard or unmapping zero write.
    Request,
    /// Deleting a snapshot.
    Snapshot,
    /// Anything else (copy on write, overwritten compressed data).
    Other,
    /// Shrinking the image: always given back.
    Always,
}

/// Which freed clusters get their host space punched out.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct DiscardModes {
    pub(crate) request: bool,
    pub(crate) snapshot: bool,
    pub(crate) other: bool,
}

impl DiscardModes {
    pub(crate) fn punches(&self, reason: FreeReason) -> bool {
        match reason {
            FreeReason::Request => self.request,
            FreeReason::Snapshot => self.snapshot,
            FreeReason::Other => self.other,
            FreeReason::Always => true,
        }
    }
}

/// All metadata of an open image; guarded by `Qcow2::meta`.
pub(crate) struct Meta {
    pub(crate) header: Header,
    pub(crate) geometry: Geometry,
    pub(crate) l1: Vec<u64>,
    pub(crate) l1_dirty: BTreeSet<usize>,
    pub(crate) l2: TableCache,
    pub(crate) refcounts: Refcounts,
    pub(crate) inflight: Vec<Inflight>,
    pub(crate) next_inflight_id: u64,
    /// Host clusters whose refcount drops by one once the L2/L1 changes that
    /// stopped referencing them are durable.
    pub(crate) pending_frees: Vec<(HostCluster, FreeReason)>,
    /// Set when a metadata write failed: further writes are refused.
    pub(crate) failed: Option<String>,
    pub(crate) lazy_refcounts: bool,
    pub(crate) snapshots: SnapshotTable,
    pub(crate) read_only: bool,
    /// Where the next compressed cluster is packed (0: start a new cluster).
    pub(crate) free_byte_offset: u64,
    /// Whether unallocated clusters read from a backing image.
    pub(crate) has_backing: bool,
    /// Whether the image looks preallocated with `preallocation=metadata`
    /// (QEMU's `qcow2_detect_metadata_preallocation`), decided at the first
    /// block status query and kept for the rest of the session as QEMU does.
    pub(crate) metadata_preallocation: Option<bool>,
    /// Whether a corruption event was reported already (QEMU prints the
    /// first one only: `signaled_corruption`).
    pub(crate) signaled_corruption: bool,
    /// Host clusters whose COPIED flag was checked against their refcount
    /// this session (see `Meta::copied_holds`).
    pub(crate) verified: crate::qcow2::meta::plan::VerifiedClusters,
    /// Where run-time findings are reported.
    pub(crate) messages: Option<crate::options::ImageMessages>,
    /// Persistent dirty bitmaps (see `bitmap.rs`).
    pub(crate) bitmaps: crate::qcow2::meta::bitmap::Bitmaps,
    /// The external data file, when guest data lives in one.
    pub(crate) data_file: Option<crate::image::data_file::DataFile>,
}

impl Meta {
    /// The header version.
    pub(crate) fn version(&self) -> u32 {
        self.header.version
    }

    /// Recomputes where the metadata lies (for overlap checks and the
    /// allocator) after structures moved.
    pub(crate) fn update_reserved(&mut self) {
        let g = self.geometry;
        let cs = g.cluster_size();
        let mut constant = vec![(overlap::MAIN_HEADER, 0, 1)];
        if self.header.l1_size > 0 {
            let n = g.clusters_for(u64::from(self.header.l1_size) * 8);
            constant.push((overlap::ACTIVE_L1, self.header.l1_table_offset / cs, n));
        }
        constant.push((
            overlap::REFCOUNT_TABLE,
            self.refcounts.table_offset() / cs,
            u64::from(self.refcounts.table_clusters()),
        ));
        if self.header.nb_snapshots > 0 {
            constant.push((
                overlap::SNAPSHOT_TABLE,
                self.header.snapshots_offset / cs,
                g.clusters_for(self.snapshots.byte_size),
            ));
        }
        if let Some(b) = &self.header.extensions.bitmaps {
            constant.push((overlap::BITMAP_DIRECTORY, b.directory_offset / cs, g.clusters_for(b.directory_size)));
        }
        let map = &mut self.refcounts.map;
        map.constant = constant;
        map.active_l2 = self.l1.iter().filter_map(|&e| L1Entry(e).l2_offset()).map(|o| o.0 / cs).collect();
        map.inactive_l1.clear();
        map.inactive_l2.clear();
    }

    /// Loads snapshot L1 locations and their L2 tables into the metadata
    /// map (overlap-check mode `all` only: it reads every snapshot L1).
    pub(crate) fn load_inactive_map(&mut self, storage: &dyn Storage) -> Result<()> {
        if self.refcounts.map.mask & (overlap::INACTIVE_L1 | overlap::INACTIVE_L2) == 0 {
            return Ok(());
        }
        let g = self.geometry;
        let cs = g.cluster_size();
        let mut l1s = Vec::new();
        let mut l2s = std::collections::BTreeSet::new();
        for s in &self.snapshots.entries {
            let bytes = u64::from(s.l1_size) * 8;
            if bytes > oxqcow_format::limits::MAX_L1_BYTES || s.l1_table_offset % cs != 0 {
                continue;
            }
            l1s.push((s.l1_table_offset / cs, g.clusters_for(bytes)));
            let mut buf = vec![0u8; bytes as usize];
            storage
                .read_at(&mut buf, s.l1_table_offset)
                .map_err(Error::io("reading a snapshot L1 table", s.l1_table_offset))?;
            l2s.extend(decode_entries(&buf).into_iter().filter_map(|e| L1Entry(e).l2_offset()).map(|o| o.0 / cs));
        }
        self.refcounts.map.inactive_l1 = l1s;
        self.refcounts.map.inactive_l2 = l2s;
        Ok(())
    }

    /// Sets active L1 entry `index` (keeping the metadata map in step).
    pub(crate) fn set_l1(&mut self, index: usize, raw: u64) {
        let cs = self.geometry.cluster_size();
        if let Some(old) = L1Entry(self.l1[index]).l2_offset() {
            self.refcounts.map.active_l2.remove(&(old.0 / cs));
        }
        if let Some(new) = L1Entry(raw).l2_offset() {
            self.refcounts.map.active_l2.insert(new.0 / cs);
        }
        self.l1[index] = raw;
        self.l1_dirty.insert(index);
    }

    /// Records a failed metadata update: the image refuses writes from now
    /// on. Corruption found while the image is writable also sets the
    /// corrupt bit (version 3), so that no later session writes to it
    /// before `check -r` (QEMU's `qcow2_signal_corruption`).
    pub(crate) fn fail(&mut self, storage: &dyn Storage, e: &Error) {
        if self.failed.is_none() {
            self.failed = Some(e.to_string());
        }
        if e.kind() == crate::ErrorKind::Corrupt && !self.read_only {
            self.mark_corrupt(storage);
        }
    }

    fn mark_corrupt(&mut self, storage: &dyn Storage) {
        if self.header.version < 3 || self.header.is_corrupt() {
            return;
        }
        let features = self.header.incompatible_features | incompat::CORRUPT;
        let (pos, bytes) = header::incompatible_features_field(features);
        // Best effort: the image is refused for writing from now on anyway.
        if storage.write_at(&bytes, pos).and_then(|()| storage.sync()).is_ok() {
            self.header.incompatible_features = features;
        }
    }

    /// Whether the image has a backing file: one attached, or one its
    /// header names (opened with `BackingPolicy::Ignore`, it will be
    /// attached again later, so its data must stay masked all the same).
    pub(crate) fn backing_named(&self) -> bool {
        self.has_backing || self.header.backing_file.is_some()
    }

    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if let Some(f) = &self.failed {
            return Err(Error::Failed(f.clone()));
        }
        Ok(())
    }

    /// Writes the whole header cluster (the refcount table fields as the
    /// allocator last left them).
    pub(crate) fn write_header(&mut self, storage: &dyn Storage) -> Result<()> {
        self.header.refcount_table_offset = self.refcounts.table_offset();
        self.header.refcount_table_clusters = self.refcounts.table_clusters();
        let bytes = self.header.serialize()?;
        storage.write_at(&bytes, 0).map_err(Error::io("writing the header", 0))
    }

    /// Sets the dirty bit before the first metadata change with lazy refcounts.
    pub(crate) fn mark_dirty(&mut self, storage: &dyn Storage) -> Result<()> {
        if !self.lazy_refcounts {
            return Ok(());
        }
        self.set_dirty_bit(storage)
    }

    /// Sets the dirty bit (version 3) and syncs it.
    fn set_dirty_bit(&mut self, storage: &dyn Storage) -> Result<()> {
        if self.header.is_dirty() || self.header.version < 3 {
            return Ok(());
        }
        let features = self.header.incompatible_features | incompat::DIRTY;
        let (pos, bytes) = header::incompatible_features_field(features);
        storage.write_at(&bytes, pos).map_err(Error::io("setting the dirty bit", pos))?;
        storage.sync().map_err(Error::io("syncing the dirty bit", pos))?;
        self.header.incompatible_features = features;
        Ok(())
    }

    /// Runs a multi-step metadata operation (snapshot create, apply,
    /// delete) under the dirty bit: a crash between its steps can leave
    /// refcounts and COPIED flags disagreeing, and the dirty bit makes the
    /// next read-write open repair that, as for lazy refcounts. The bit is
    /// cleared once the operation is complete and flushed (unless lazy
    /// refcounts keep the image dirty anyway).
    pub(crate) fn with_dirty_bit<T>(
        &mut self,
        storage: &dyn Storage,
        f: impl FnOnce(&mut Meta) -> Result<T>,
    ) -> Result<T> {
        let was_dirty = self.header.is_dirty();
        self.set_dirty_bit(storage)?;
        let value = f(self)?;
        if !was_dirty && !self.lazy_refcounts && self.header.is_dirty() {
            self.flush_all(storage)?;
            self.header.incompatible_features &= !incompat::DIRTY;
            let (pos, bytes) = header::incompatible_features_field(self.header.incompatible_features);
            storage.write_at(&bytes, pos).map_err(Error::io("clearing the dirty bit", pos))?;
            storage.sync().map_err(Error::io("syncing the dirty bit", pos))?;
        }
        Ok(value)
    }

    /// Writes dirty L1 entries (grouped into contiguous runs).
    fn write_l1(&mut self, storage: &dyn Storage) -> Result<()> {
        let indices: Vec<usize> = self.l1_dirty.iter().copied().collect();
        let mut i = 0;
        while i < indices.len() {
            let start = indices[i];
            let mut end = start + 1;
            while i + 1 < indices.len() && indices[i + 1] == end {
                i += 1;
                end += 1;
            }
            let offset = self.header.l1_table_offset + start as u64 * 8;
            self.refcounts.check_write(offset, (end - start) as u64 * 8, overlap::ACTIVE_L1)?;
            storage
                .write_at(&encode_entries(&self.l1[start..end]), offset)
                .map_err(Error::io("writing the L1 table", offset))?;
            i += 1;
        }
        self.l1_dirty.clear();
        Ok(())
    }

    /// Writes one dirty L2 table back, after making what it depends on
    /// (guest data and refcounts of the clusters it references) durable.
    pub(crate) fn write_back_l2(&mut self, storage: &dyn Storage, offset: u64) -> Result<()> {
        if !self.lazy_refcounts {
            self.refcounts.write_dirty(storage)?;
        }
        self.sync_data()?;
        storage.sync().map_err(Error::io("syncing before an L2 write", offset))?;
        let data = self.l2.peek(offset).expect("dirty tables are cached");
        self.refcounts.check_write(offset, data.len() as u64, overlap::ACTIVE_L2 | overlap::INACTIVE_L2)?;
        storage.write_at(data, offset).map_err(Error::io("writing an L2 table", offset))?;
        self.l2.mark_clean(offset);
        Ok(())
    }

    /// Writes every dirty table in the safe order and syncs.
    pub(crate) fn flush(&mut self, storage: &dyn Storage) -> Result<()> {
        let l2_dirty = self.l2.dirty_offsets();
        let need_l1 = !self.l1_dirty.is_empty();
        if !self.lazy_refcounts {
            self.refcounts.write_dirty(storage)?;
        }
        if !l2_dirty.is_empty() || need_l1 {
            // Data and refcounts before the tables that reference them.
            self.sync_data()?;
            storage.sync().map_err(Error::io("syncing data and refcounts", 0))?;
        }
        for &offset in &l2_dirty {
            let data = self.l2.peek(offset).expect("dirty tables are cached");
            self.refcounts.check_write(offset, data.len() as u64, overlap::ACTIVE_L2 | overlap::INACTIVE_L2)?;
            storage.write_at(data, offset).map_err(Error::io("writing an L2 table", offset))?;
            self.l2.mark_clean(offset);
        }
        if need_l1 {
            if !l2_dirty.is_empty() {
                storage.sync().map_err(Error::io("syncing L2 tables", 0))?;
            }
            self.write_l1(storage)?;
        }
        storage.sync().map_err(Error::io("syncing metadata", 0))?;
        Ok(())
    }

    /// Makes guest data in the external data file durable (the image
    /// file's own sync covers data kept there).
    pub(crate) fn sync_data(&self) -> Result<()> {
        match &self.data_file {
            Some(d) => d.storage.sync().map_err(Error::io("syncing the data file", 0)),
            None => Ok(()),
        }
    }

    /// Writes everything including lazily kept refcounts (for close and for
    /// operations that rewrite structures).
    pub(crate) fn flush_all(&mut self, storage: &dyn Storage) -> Result<()> {
        self.flush(storage)?;
        if self.refcounts.write_dirty(storage)? {
            storage.sync().map_err(Error::io("syncing refcounts", 0))?;
        }
        Ok(())
    }

    /// Applies deferred refcount decrements. Call only after a flush made
    /// the table changes that dropped these references durable, with the io
    /// gate held exclusively.
    pub(crate) fn apply_frees(
        &mut self,
        storage: &dyn Storage,
        frees: Vec<(HostCluster, FreeReason)>,
        modes: DiscardModes,
    ) -> Result<()> {
        let cs = self.geometry.cluster_size();
        for (c, reason) in frees {
            let left = self.refcounts.update(storage, c, -1)?;
            if left == 0 && modes.punches(reason) {
                let offset = self.geometry.cluster_offset(c).0;
                storage.punch_hole(offset, cs).map_err(Error::io("discarding a host cluster", offset))?;
            }
        }
        Ok(())
    }
}
