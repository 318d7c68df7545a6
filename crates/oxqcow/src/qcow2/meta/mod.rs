//! The metadata of an open qcow2 image, everything [`crate::qcow2::Qcow2`]
//! keeps under its `meta` lock: header, L1 table, the L2 and refcount
//! caches, in-flight allocations, deferred frees, snapshots and bitmaps.
//! Its submodules each own one concern of it; only they see its fields.

pub mod amend;
pub mod bitmap;
pub(crate) mod cache;
pub mod check;
mod crypt;
pub(crate) mod data_file;
pub mod mapping;
pub mod overlap;
pub(crate) mod pending;
pub(crate) mod plan;
pub(crate) mod refcount;
pub(crate) mod reserve;
pub(crate) mod resize;
pub(crate) mod snapshot;
mod zero;

use std::collections::BTreeSet;

use oxqcow_format::header::{self, autoclear, incompat, CryptoExtension, Header};
use oxqcow_format::snapshot::SnapshotTable;
use oxqcow_format::table::{decode_entries, encode_entries, L1Entry};
use oxqcow_format::{Geometry, HostCluster};

use crate::error::{Error, Result};
use crate::options::{ImageMessage, OpenOptions};
use crate::storage::Storage;
use cache::TableCache;
use plan::Inflight;
use refcount::Refcounts;

/// printf's `%#x`, in which QEMU's messages print offsets and indexes:
/// `0` for zero, `0x...` otherwise.
pub(crate) fn alt_hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// QEMU's default L2 cache limit on Linux (`DEFAULT_L2_CACHE_MAX_SIZE`).
const DEFAULT_L2_CACHE_MAX: u64 = 32 << 20;
/// QEMU's minimum L2 cache: two tables (`MIN_L2_CACHE_SIZE`).
const MIN_L2_CACHE_TABLES: u64 = 2;
/// QEMU's minimum and default refcount cache: four blocks (`MIN_REFCOUNT_CACHE_SIZE`).
const MIN_REFCOUNT_CACHE_TABLES: u64 = 4;

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
    header: Header,
    geometry: Geometry,
    l1: Vec<u64>,
    l1_dirty: BTreeSet<usize>,
    l2: TableCache,
    refcounts: Refcounts,
    inflight: Vec<Inflight>,
    next_inflight_id: u64,
    /// Host clusters whose refcount drops by one once the L2/L1 changes that
    /// stopped referencing them are durable.
    pending_frees: pending::PendingFrees,
    /// Set when a metadata write failed: further writes are refused.
    failed: Option<String>,
    lazy_refcounts: bool,
    snapshots: SnapshotTable,
    read_only: bool,
    /// Where the next compressed cluster is packed (0: start a new cluster).
    free_byte_offset: u64,
    /// Whether unallocated clusters read from a backing image.
    has_backing: bool,
    /// Whether the image looks preallocated with `preallocation=metadata`
    /// (QEMU's `qcow2_detect_metadata_preallocation`), decided at the first
    /// block status query and kept for the rest of the session as QEMU does.
    metadata_preallocation: Option<bool>,
    /// Whether a corruption event was reported already (QEMU prints the
    /// first one only: `signaled_corruption`).
    signaled_corruption: bool,
    /// Host clusters whose COPIED flag was checked against their refcount
    /// this session (see `Meta::copied_holds`).
    verified: crate::qcow2::meta::plan::VerifiedClusters,
    /// Where run-time findings are reported.
    messages: Option<crate::options::ImageMessages>,
    /// Persistent dirty bitmaps (see `bitmap.rs`).
    bitmaps: crate::qcow2::meta::bitmap::Bitmaps,
    /// The external data file, when guest data lives in one.
    data_file: Option<data_file::DataFile>,
    /// `discard-no-unref`: discards and unmapping zero writes keep their
    /// host clusters referenced (see `zero.rs`).
    discard_no_unref: bool,
    /// `pass-discard-request`: the host space of a discarded cluster is
    /// given back (kept clusters included).
    punch_requests: bool,
}

impl Meta {
    /// Loads the metadata of an image whose header was read and checked:
    /// the L1 table, the caches sized from the options, the refcount
    /// table, the snapshot table, the metadata map for overlap checks,
    /// and with `opts.snapshot` that snapshot's L1 table as the view.
    pub(crate) fn load(
        st: &dyn Storage,
        header: Header,
        opts: &OpenOptions,
        read_only: bool,
        has_backing: bool,
        data_file: Option<data_file::DataFile>,
        file_len: u64,
    ) -> Result<Meta> {
        let geometry = header.geometry();
        let l1_bytes = u64::from(header.l1_size) * 8;
        let mut l1_raw = vec![0u8; l1_bytes as usize];
        if l1_bytes > 0 {
            st.read_at(&mut l1_raw, header.l1_table_offset)
                .map_err(Error::io("reading the L1 table", header.l1_table_offset))?;
        }
        let l1 = decode_entries(&l1_raw);
        let (l2_tables, rc_tables) = cache_tables(opts, &geometry, header.size)?;
        // The rest of QEMU's `qcow2_update_options_prepare`, in its order.
        if opts.cache_clean_interval.is_some_and(|i| i > u64::from(u32::MAX)) {
            return Err(Error::InvalidArgument("Cache clean interval too big".into()));
        }
        if opts.lazy_refcounts == Some(true) && header.version < 3 {
            return Err(Error::InvalidArgument(
                "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level".into(),
            ));
        }
        let overlap_mask = match opts.overlap_check {
            Some(mask) => mask,
            None => opts.overlap.mask()?,
        };
        if opts.discard_no_unref && header.version < 3 {
            return Err(Error::InvalidArgument("discard-no-unref is only supported since qcow2 version 3".into()));
        }
        let refcounts = Refcounts::load(
            st,
            geometry,
            header.refcount_table_offset,
            header.refcount_table_clusters,
            rc_tables,
            file_len,
            // Read-only, nothing is allocated from the refcounts: a damaged
            // refcount table entry is no reason to refuse the image (QEMU
            // opens it and fails only what needs the block).
            opts.repair || read_only,
        )?;
        // QEMU opens an image for a check without its snapshot table (the
        // check reads and repairs it); a table that reads is kept, so the
        // image stays usable.
        let snapshots = if opts.repair {
            read_snapshots(st, header.snapshots_offset, header.nb_snapshots, file_len, SnapshotRead::Check, None)
                .unwrap_or_default()
        } else {
            // Read-only, nothing is allocated from what the zeros past the
            // end of the file would say: read them as QEMU does.
            let mode = if read_only { SnapshotRead::Check } else { SnapshotRead::Open };
            read_snapshots(st, header.snapshots_offset, header.nb_snapshots, file_len, mode, None)?
        };
        let lazy = opts.lazy_refcounts.unwrap_or(header.lazy_refcounts()) && header.version >= 3;
        let mut meta = Meta {
            header,
            geometry,
            l1,
            l1_dirty: BTreeSet::new(),
            l2: TableCache::new(l2_tables),
            refcounts,
            inflight: Vec::new(),
            next_inflight_id: 0,
            pending_frees: pending::PendingFrees::default(),
            failed: None,
            lazy_refcounts: lazy,
            snapshots,
            read_only,
            free_byte_offset: 0,
            has_backing,
            metadata_preallocation: None,
            signaled_corruption: false,
            verified: Default::default(),
            messages: opts.messages.clone(),
            bitmaps: Default::default(),
            data_file,
            discard_no_unref: opts.discard_no_unref,
            punch_requests: opts.discard_passthrough,
        };
        meta.refcounts.map.mask = overlap_mask;
        meta.update_reserved();
        meta.load_inactive_map(st)?;

        if let Some(name) = &opts.snapshot {
            if !read_only {
                return Err(Error::InvalidArgument("snapshots can only be opened read-only".into()));
            }
            // The guest size stays the active layer's, as with QEMU's
            // bdrv_snapshot_load_tmp: past the snapshot's own disk size (and
            // its L1 table) everything reads as zeros.
            let (l1, _disk_size) = meta.snapshot_view(st, name)?;
            meta.l1 = l1;
        }

        Ok(meta)
    }

    /// Drops the clean cached L2 tables and refcount blocks that no request
    /// used since the last call (`cache-clean-interval`); returns how many.
    pub(crate) fn clean_unused_caches(&mut self) -> usize {
        self.l2.clean_unused() + self.refcounts.clean_unused()
    }

    /// Before a read-write session: unknown autoclear bits and a stale
    /// bitmaps extension are dropped from the header, and a dirty image
    /// (lazy refcounts) is repaired as `check -r all` repairs it (QEMU
    /// does both at open). Returns that repair's report.
    pub(crate) fn prepare_for_writing(
        &mut self,
        st: &dyn Storage,
        opts: &OpenOptions,
    ) -> Result<Option<check::CheckReport>> {
        let mut rewrite = false;
        if self.header.autoclear_features & !autoclear::KNOWN != 0 {
            self.header.autoclear_features &= autoclear::KNOWN;
            rewrite = true;
        }
        if self.header.extensions.stale_bitmaps {
            self.header.extensions.stale_bitmaps = false;
            rewrite = true;
        }
        if rewrite {
            self.write_header(st)?;
            st.sync().map_err(Error::io("syncing the header", 0))?;
        }
        if self.header.is_dirty() && !opts.repair {
            // As QEMU: a full repair (`check -r all`), which also
            // clears the dirty bit once the image is consistent.
            let all = Some(crate::qcow2::meta::check::RepairMode::All);
            let report = match &opts.messages {
                Some(sink) => {
                    crate::qcow2::meta::check::check(self, st, all, &mut |line: &str| sink(ImageMessage::Repair(line)))?
                }
                None => {
                    crate::qcow2::meta::check::collected(|out| crate::qcow2::meta::check::check(self, st, all, out))?
                }
            };
            if report.error.is_some() || report.check_errors > 0 {
                let why = report.error.unwrap_or_else(|| "Input/output error".into());
                return Err(Error::Corrupt(format!("Could not repair dirty image: {why}")));
            }
            return Ok(Some(report));
        }
        Ok(None)
    }

    /// The header as it would be written now: the refcount table's place
    /// and size are the allocator's, not a second copy kept in step.
    pub(crate) fn header(&self) -> Header {
        let mut h = self.header.clone();
        h.refcount_table_offset = self.refcounts.table_offset();
        h.refcount_table_clusters = self.refcounts.table_clusters();
        h
    }

    /// The cluster geometry.
    pub(crate) fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The guest size the header records.
    pub(crate) fn size(&self) -> u64 {
        self.header.size
    }

    /// The header's compression type.
    pub(crate) fn compression_type(&self) -> u8 {
        self.header.compression_type
    }

    /// The LUKS header area, for encrypted images.
    pub(crate) fn crypto_extension(&self) -> Option<CryptoExtension> {
        self.header.extensions.crypto
    }

    /// The internal snapshots, in table order.
    pub(crate) fn snapshot_entries(&self) -> &[oxqcow_format::SnapshotEntry] {
        &self.snapshots.entries
    }

    /// Why writes are refused since a metadata write failed, if one did.
    pub(crate) fn failure(&self) -> Option<Error> {
        self.failed.clone().map(Error::Failed)
    }

    /// How many deferred frees wait for the next flush.
    pub(crate) fn pending_free_count(&self) -> usize {
        self.pending_frees.len()
    }

    /// Takes the deferred frees, to apply once no request can still use
    /// the clusters.
    pub(crate) fn take_pending_frees(&mut self) -> Vec<(HostCluster, FreeReason)> {
        self.pending_frees.take()
    }

    /// Whether an allocation is in flight.
    pub(crate) fn allocating(&self) -> bool {
        !self.inflight.is_empty()
    }

    /// Makes the refcount decrements just applied durable, unless lazy
    /// refcounts leave that to the next clean close (a crash rebuilds them).
    pub(crate) fn write_applied_frees(&mut self, st: &dyn Storage) -> Result<()> {
        if self.lazy_refcounts {
            return Ok(());
        }
        if self.refcounts.write_dirty(st)? {
            st.sync().map_err(Error::io("syncing refcounts", 0))?;
        }
        Ok(())
    }

    /// Brings the metadata to rest before an operation that needs the
    /// image to itself: everything flushed, deferred frees applied and
    /// flushed, checked COPIED flags forgotten (the operation may change
    /// which clusters are shared).
    pub(crate) fn settle(&mut self, st: &dyn Storage, discard: DiscardModes) -> Result<()> {
        self.verified.clear();
        if self.read_only {
            return Ok(());
        }
        if let Some(e) = self.failure() {
            return Err(e);
        }
        self.flush_all(st)?;
        let frees = self.take_pending_frees();
        self.apply_frees(st, frees, discard)?;
        self.flush_all(st)
    }

    /// Records the failure of an exclusive operation: host I/O errors in a
    /// writable image are sticky (the metadata may be half written).
    pub(crate) fn exclusive_failed(&mut self, st: &dyn Storage, e: &Error) {
        if !self.read_only && e.kind() == crate::ErrorKind::Io {
            self.fail(st, e);
        }
    }

    /// Records a new backing file name and format (both `None`: no backing
    /// file) in the header, written and synced; refused, changing nothing,
    /// when the header would not fit its cluster.
    pub(crate) fn set_backing_file(
        &mut self,
        st: &dyn Storage,
        name: Option<&str>,
        format: Option<&str>,
    ) -> Result<()> {
        let mut h = self.header.clone();
        h.backing_file = name.map(str::to_string);
        h.extensions.backing_format = format.map(str::to_string);
        h.serialize()?;
        self.header = h;
        self.write_header(st)?;
        st.sync().map_err(Error::io("syncing the header", 0))
    }

    /// The clean close: bitmaps stored, caches written, the dirty bit
    /// cleared (QEMU's `qcow2_inactivate`). Nothing is written after a
    /// metadata write failed.
    pub(crate) fn close(&mut self, st: &dyn Storage) -> Result<()> {
        if self.failed.is_some() {
            return Ok(());
        }
        let stored = self.store_bitmaps(st);
        if let (Err(Error::BitmapsLost(why)), Some(sink)) = (&stored, &self.messages) {
            sink(crate::options::ImageMessage::BitmapsLost(why));
        }
        self.flush_all(st)?;
        stored?;
        if self.header.is_dirty() {
            self.header.incompatible_features &= !incompat::DIRTY;
            self.write_header(st)?;
            st.sync().map_err(Error::io("syncing the header", 0))?;
        }
        Ok(())
    }

    /// Completes a new image whose header, refcount table and first
    /// refcount block (its first three clusters) were just written: counts
    /// those clusters, sizes the disk with its preallocation, records the
    /// backing file name and sets up encryption, in QEMU's order
    /// (`qcow2_co_create`), then flushes.
    pub(crate) fn finish_creation(
        &mut self,
        st: &dyn Storage,
        opts: &crate::options::CreateOptions,
        size: u64,
    ) -> Result<()> {
        for c in 0..3 {
            self.refcounts.update(st, HostCluster(c), 1)?;
        }
        self.resize(st, size, opts.preallocation)?;
        if let Some(name) = &opts.backing_file {
            self.header.backing_file = Some(name.clone());
            self.header.extensions.backing_format = opts.backing_format.clone();
            self.write_header(st)?;
        }
        if let Some(enc) = &opts.encryption {
            // After the size, as QEMU's qcow2_co_create sets it up.
            self.set_up_encryption(st, enc)?;
        }
        self.flush_all(st)
    }

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
        if e.kind() != crate::ErrorKind::Corrupt {
            return;
        }
        // QEMU's qcow2_signal_corruption: one message, the first time.
        if !self.signaled_corruption {
            self.signaled_corruption = true;
            let line = if self.read_only {
                format!("qcow2: Image is corrupt: {e}; further non-fatal corruption events will be suppressed")
            } else {
                format!("qcow2: Marking image as corrupt: {e}; further corruption events will be suppressed")
            };
            if let Some(sink) = &self.messages {
                sink(crate::options::ImageMessage::Corruption(&line));
            }
        }
        if !self.read_only {
            self.mark_corrupt(storage);
        }
    }

    /// Whether a corruption stopped the image (QEMU then drops the image's
    /// driver: nothing is flushed at close).
    pub(crate) fn stopped_by_corruption(&self) -> bool {
        self.signaled_corruption && self.failed.is_some() && !self.read_only
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
        self.check_usable()?;
        if let Some(f) = &self.failed {
            return Err(Error::Failed(f.clone()));
        }
        Ok(())
    }

    /// After a corruption stopped the image, QEMU's requests find no
    /// driver and fail with ENOMEDIUM ("No medium found"), reads included.
    pub(crate) fn check_usable(&self) -> Result<()> {
        if self.stopped_by_corruption() {
            return Err(Error::Io {
                op: "using an image a corruption stopped",
                offset: 0,
                source: std::io::Error::from_raw_os_error(libc::ENOMEDIUM),
            });
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
        let mut punched = Vec::new();
        for (c, reason) in frees {
            let left = self.refcounts.update(storage, c, -1)?;
            if left == 0 && modes.punches(reason) {
                punched.push(c.0);
            }
        }
        // Adjacent clusters go out in one punch, as QEMU merges its queued
        // discards: punching a run cluster by cluster splits the file's
        // extents on the way, and the file system may keep the extent tree
        // block that the split needed (a disk usage QEMU's does not have).
        punched.sort_unstable();
        let mut runs = punched.chunk_by(|a, b| b - a == 1);
        runs.try_for_each(|run| {
            let offset = run[0] * cs;
            storage.punch_hole(offset, run.len() as u64 * cs).map_err(Error::io("discarding host clusters", offset))
        })
    }
}

/// The cache sizes of QEMU's `read_cache_sizes` and
/// `qcow2_update_options_prepare`, with their messages, in tables: the
/// L2 cache in `l2-cache-entry-size` slices of tables, the refcount cache
/// in blocks.
fn cache_tables(opts: &OpenOptions, geometry: &Geometry, size: u64) -> Result<(usize, usize)> {
    let cs = geometry.cluster_size();
    let min_refcount_cache = MIN_REFCOUNT_CACHE_TABLES * cs;
    let max_l2_cache = geometry.clusters_for(size).saturating_mul(geometry.l2_entry_size()).div_ceil(cs) * cs;
    let l2_setting = opts.l2_cache_size.unwrap_or(DEFAULT_L2_CACHE_MAX);
    let mut l2 = max_l2_cache.min(l2_setting);
    let mut rc = opts.refcount_cache_size.unwrap_or(0);
    if let Some(total) = opts.cache_size {
        let invalid = |m: &str| Err(Error::InvalidArgument(m.into()));
        match (opts.l2_cache_size, opts.refcount_cache_size) {
            (Some(_), Some(_)) => {
                return invalid("cache-size, l2-cache-size and refcount-cache-size may not be set at the same time")
            }
            (Some(setting), None) if setting > total => return invalid("l2-cache-size may not exceed cache-size"),
            (_, Some(r)) if r > total => return invalid("refcount-cache-size may not exceed cache-size"),
            _ => {}
        }
        if opts.l2_cache_size.is_some() {
            rc = total - l2;
        } else if opts.refcount_cache_size.is_some() {
            l2 = total - rc;
        } else if total >= max_l2_cache.saturating_add(min_refcount_cache) {
            // As much as possible for the L2 cache, the rest for refcounts.
            l2 = max_l2_cache;
            rc = total - l2;
        } else {
            rc = total.min(min_refcount_cache);
            l2 = total - rc;
        }
    }
    // QEMU's default when the L2 cache cannot cover the whole disk: 4 KiB
    // entries, which make loads and evictions cheaper.
    let entry = match opts.l2_cache_entry_size {
        Some(e) => e,
        None if l2 < max_l2_cache => cs.min(4096),
        None => cs,
    };
    if !(512..=cs).contains(&entry) || !entry.is_power_of_two() {
        return Err(Error::InvalidArgument(format!(
            "L2 cache entry size must be a power of two between 512 and the cluster size ({cs})"
        )));
    }
    let l2_entries = (l2 / entry).max(MIN_L2_CACHE_TABLES);
    if l2_entries > i32::MAX as u64 {
        return Err(Error::InvalidArgument("L2 cache size too big".into()));
    }
    let rc_tables = (rc / cs).max(MIN_REFCOUNT_CACHE_TABLES);
    if rc_tables > i32::MAX as u64 {
        return Err(Error::InvalidArgument("Refcount cache size too big".into()));
    }
    // The cache holds whole tables: as many as the slices' bytes make.
    let l2_tables = (l2_entries * entry / cs).max(MIN_L2_CACHE_TABLES);
    Ok((l2_tables as usize, rc_tables as usize))
}

/// How [`read_snapshots`] treats a damaged table.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum SnapshotRead {
    /// A read-write open: a table reaching past the end of the file is
    /// refused.
    Open,
    /// A check or a read-only open (QEMU reads the table through its file
    /// driver): past the end of the file reads as zeros.
    Check,
}

/// The snapshot table is read in whole pages: a table of many small
/// entries costs few reads, yet nothing is read past the page the last
/// entry ends in. Reading further (as a larger window did) pulls pages of
/// preallocated, unwritten clusters into the page cache, and the file
/// system then reports them as data: `map` saw data where QEMU sees a hole.
const SNAPSHOT_READ_PAGE: u64 = 4096;

/// Reads and parses the `count` entries of the snapshot table at `base`
/// entry by entry, as QEMU does;
/// `repair` receives the repairs `check -r all` makes
/// ([`SnapshotTable::read`]).
pub(crate) fn read_snapshots(
    storage: &dyn Storage,
    base: u64,
    count: u32,
    file_len: u64,
    mode: SnapshotRead,
    repair: Option<&mut dyn FnMut(oxqcow_format::SnapshotRepair)>,
) -> Result<SnapshotTable> {
    if count == 0 {
        return Ok(SnapshotTable::default());
    }
    let mut window_start = 0u64;
    let mut window: Vec<u8> = Vec::new();
    let mut read = |at: u64, out: &mut [u8]| -> Result<()> {
        let mut done = 0usize;
        while done < out.len() {
            let pos = base.saturating_add(at + done as u64);
            if pos < window_start || pos >= window_start + window.len() as u64 {
                let want = pos.saturating_add((out.len() - done) as u64);
                let page_end = want.checked_next_multiple_of(SNAPSHOT_READ_PAGE).unwrap_or(u64::MAX);
                let available = page_end.min(file_len).saturating_sub(pos);
                if available == 0 {
                    if mode == SnapshotRead::Open {
                        return Err(oxqcow_format::FormatError::TablePastEof {
                            table: "Snapshot table",
                            offset: base,
                            length: at + out.len() as u64,
                            file_len,
                        }
                        .into());
                    }
                    out[done..].fill(0);
                    return Ok(());
                }
                window.resize(available as usize, 0);
                storage.read_at(&mut window, pos).map_err(Error::io("reading the snapshot table", pos))?;
                window_start = pos;
            }
            let from = (pos - window_start) as usize;
            let n = (window.len() - from).min(out.len() - done);
            out[done..done + n].copy_from_slice(&window[from..from + n]);
            done += n;
        }
        Ok(())
    };
    SnapshotTable::read(count, repair, &mut read)
}
