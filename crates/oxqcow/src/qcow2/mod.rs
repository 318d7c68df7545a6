//! The qcow2 image: open, create, and the public I/O entry points.
//!
//! Locking: `meta` (a mutex) guards all metadata: header, L1, the L2 and
//! refcount caches, in-flight allocations and deferred frees. It is held
//! only to plan an operation or to record its result, never across guest
//! data I/O. `io_gate` (a read-write lock) is held shared for the duration
//! of every request's data I/O; applying deferred frees takes it exclusive,
//! so a host cluster is never reused while a request planned against its old
//! owner may still read or write it. Lock order: `io_gate`, then `meta`.
//!
//! Flush order (see ARCHITECTURE.md): refcount blocks, then (after a sync)
//! refcount table entries for new blocks, sync, L2 tables, sync, L1
//! entries, sync; only then are deferred refcount decrements applied (and,
//! without lazy refcounts, written and synced), so a crash at any point
//! leaves at worst leaked clusters, and none after a completed flush.

pub(crate) mod meta;
pub(crate) mod serialise;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};

use oxqcow_format::header::{autoclear, incompat, peek_cluster_bits, Header};
use oxqcow_format::snapshot::SnapshotTable;
use oxqcow_format::table::decode_entries;
use oxqcow_format::{Geometry, HostOffset, L2Mapping};

use crate::compress::Codec;
use crate::error::{Error, Result};
use crate::extent::Extent;
use crate::options::{ImageMessage, OpenOptions, Preallocation};
use crate::qcow2::meta::mapping::ReadSegment;
use crate::qcow2::meta::overlap;
use crate::qcow2::meta::plan::WritePlan;
use crate::qcow2::meta::refcount::Refcounts;
use crate::storage::Storage;
use meta::cache::TableCache;
use meta::{DiscardModes, Meta};

/// QEMU's default L2 cache limit on Linux (`DEFAULT_L2_CACHE_MAX_SIZE`).
const DEFAULT_L2_CACHE_MAX: u64 = 32 << 20;
/// QEMU's minimum L2 cache: two tables (`MIN_L2_CACHE_SIZE`).
const MIN_L2_CACHE_TABLES: u64 = 2;
/// QEMU's minimum and default refcount cache: four blocks (`MIN_REFCOUNT_CACHE_SIZE`).
const MIN_REFCOUNT_CACHE_TABLES: u64 = 4;
/// Deferred frees are applied by an internal flush once this many pile up,
/// so that a workload that never flushes still gets its space back.
const MAX_PENDING_FREES: usize = 16384;

/// Facts about an open qcow2 image, for `info`.
#[derive(Clone, Debug)]
pub struct Qcow2Info {
    /// Header version (2 or 3).
    pub version: u32,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Lazy refcounts enabled.
    pub lazy_refcounts: bool,
    /// Corrupt bit set.
    pub corrupt: bool,
    /// Dirty bit set (as found at open).
    pub dirty: bool,
    /// Extended L2 entries.
    pub extended_l2: bool,
    /// "zlib" or "zstd".
    pub compression_type: &'static str,
    /// Backing file name from the header.
    pub backing_file: Option<String>,
    /// Backing format from the header.
    pub backing_format: Option<String>,
    /// Number of internal snapshots.
    pub snapshots: usize,
    /// Whether persistent bitmaps are present.
    pub has_bitmaps: bool,
    /// The persistent bitmaps, as the directory on disk lists them.
    pub bitmaps: Vec<crate::qcow2::meta::bitmap::BitmapInfo>,
    /// External data file name (the header extension).
    pub data_file: Option<String>,
    /// Whether guest data lives in an external data file (incompatible
    /// feature bit 2; the name may be missing).
    pub has_data_file: bool,
    /// Raw external data file.
    pub data_file_raw: bool,
    /// Encryption method (0 none).
    pub crypt_method: u32,
    /// The LUKS header of a LUKS-encrypted image (`crypt_method` 2).
    pub luks: Option<oxqcow_format::luks::LuksHeader>,
    /// Guest size in bytes, from the header.
    pub size: u64,
}

/// An open qcow2 image.
pub struct Qcow2 {
    storage: Arc<dyn Storage>,
    /// Where guest data clusters live: the external data file, or the
    /// image file itself.
    data: Arc<dyn Storage>,
    geometry: Geometry,
    /// The header's `compression_type` and version, read without the
    /// metadata lock; amend changes both (see [`Qcow2::refresh_header_facts`]).
    compression_type: AtomicU8,
    version: AtomicU32,
    read_only: bool,
    discard: DiscardModes,
    /// Cache mode writethrough: every write request ends with a flush.
    writethrough: AtomicBool,
    size: AtomicU64,
    io_gate: RwLock<()>,
    backing: Option<Arc<crate::image::Image>>,
    meta: Mutex<Meta>,
    alloc_done: Condvar,
    dirty_at_open: bool,
    /// The repair a dirty image got at open, with QEMU's messages.
    open_repair: Option<crate::qcow2::meta::check::CheckReport>,
    closed: AtomicBool,
    /// Whether an enabled bitmap records writes (read without the lock on
    /// every write; changed under it).
    tracking: AtomicBool,
    /// The header had a bitmaps extension without the autoclear bit: a
    /// program without bitmap support wrote to the image (QEMU warns).
    stale_bitmaps: Option<u32>,
    /// The cipher of an encrypted image: guest data is encrypted on its way
    /// to the host file and decrypted on its way back (see `crypt.rs`).
    crypt: Option<crate::crypt::Crypt>,
    /// Keeps the read-modify-write of a partly written encrypted sector
    /// apart from other writes to that sector (unused without encryption).
    serialiser: crate::qcow2::serialise::RequestSerialiser,
}

fn cache_tables(opts: &OpenOptions, geometry: &Geometry, size: u64) -> Result<(usize, usize)> {
    let cs = geometry.cluster_size();
    let max_l2 = geometry.clusters_for(size).saturating_mul(geometry.l2_entry_size());
    let max_l2 = max_l2.div_ceil(cs) * cs;
    let (l2, rc) = match (opts.cache_size, opts.l2_cache_size, opts.refcount_cache_size) {
        (Some(_), Some(_), Some(_)) => {
            return Err(Error::InvalidArgument(
                "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time".into(),
            ))
        }
        (Some(total), Some(l2), None) => {
            if l2 > total {
                return Err(Error::InvalidArgument("l2-cache-size may not exceed cache-size".into()));
            }
            (l2, total - l2)
        }
        (Some(total), None, Some(rc)) => {
            if rc > total {
                return Err(Error::InvalidArgument("refcount-cache-size may not exceed cache-size".into()));
            }
            (total - rc, rc)
        }
        (Some(total), None, None) => {
            let l2 = total.min(max_l2);
            (l2, total - l2)
        }
        (None, l2, rc) => {
            (l2.unwrap_or_else(|| max_l2.min(DEFAULT_L2_CACHE_MAX)), rc.unwrap_or(MIN_REFCOUNT_CACHE_TABLES * cs))
        }
    };
    let l2_tables = (l2 / cs).max(MIN_L2_CACHE_TABLES);
    let rc_tables = (rc / cs).max(MIN_REFCOUNT_CACHE_TABLES);
    Ok((l2_tables as usize, rc_tables as usize))
}

/// QEMU's `BDRV_SECTOR_SIZE`: the unit its block layer sizes disks in.
const SECTOR_SIZE: u64 = 512;

/// Reads the header cluster of an image, with the guest size as QEMU sees
/// it: in whole sectors. QEMU validates the size the header records, then
/// counts the disk in 512-byte sectors rounded down (`total_sectors`), so
/// a tail of less than a sector is not part of the disk: not readable, not
/// reported, not exported, and what QEMU writes back when it rewrites the
/// header. Rounding here gives every user of the header that one view.
pub(crate) fn read_header(storage: &dyn Storage) -> Result<Header> {
    let mut prefix = [0u8; 512];
    storage.read_at(&mut prefix, 0).map_err(Error::io("reading the qcow2 header", 0))?;
    let cluster_bits = peek_cluster_bits(&prefix)?;
    let mut cluster0 = vec![0u8; 1 << cluster_bits];
    storage.read_at(&mut cluster0, 0).map_err(Error::io("reading the qcow2 header", 0))?;
    let mut header = Header::parse(&cluster0)?;
    header.size -= header.size % SECTOR_SIZE;
    Ok(header)
}

/// Reads and parses the snapshot table, growing the read as entries demand
/// (never beyond the table's 64 MiB limit or the file's end).
fn read_snapshots(storage: &dyn Storage, header: &Header, file_len: u64) -> Result<SnapshotTable> {
    if header.nb_snapshots == 0 {
        return Ok(SnapshotTable::default());
    }
    let limit = oxqcow_format::limits::MAX_SNAPSHOT_TABLE_BYTES.min(file_len.saturating_sub(header.snapshots_offset));
    let mut len = (u64::from(header.nb_snapshots) * 64).min(limit).max(1);
    loop {
        let mut buf = vec![0u8; len as usize];
        storage
            .read_at(&mut buf, header.snapshots_offset)
            .map_err(Error::io("reading the snapshot table", header.snapshots_offset))?;
        match SnapshotTable::parse(&buf, header.nb_snapshots) {
            Ok(t) => return Ok(t),
            Err(e) if len < limit => {
                let _ = e;
                len = (len * 2).min(limit);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

impl Qcow2 {
    /// Opens a qcow2 image on `storage`. An image that names a backing file
    /// is refused unless `opts.backing` is `BackingPolicy::Ignore` (use
    /// [`Qcow2::open_with_backing`] or `Image::open`, which resolves names).
    pub fn open(storage: Arc<dyn Storage>, opts: &OpenOptions) -> Result<Self> {
        Self::open_with_backing(storage, opts, None)
    }

    /// Opens a qcow2 image with `backing` as the image its unallocated
    /// clusters read from.
    pub fn open_with_backing(
        storage: Arc<dyn Storage>,
        opts: &OpenOptions,
        backing: Option<Arc<crate::image::Image>>,
    ) -> Result<Self> {
        Self::open_with(storage, opts, backing, None)
    }

    /// Opens a qcow2 image with `backing` as its backing image and
    /// `data_file` as the storage of its guest data. An image whose header
    /// says its data lives in an external data file needs one; any other
    /// image refuses one (QEMU's messages).
    pub fn open_with(
        storage: Arc<dyn Storage>,
        opts: &OpenOptions,
        backing: Option<Arc<crate::image::Image>>,
        data_file: Option<Arc<dyn Storage>>,
    ) -> Result<Self> {
        let st = &*storage;
        let file_len = st.len().map_err(Error::io("reading the file length", 0))?;
        let header = read_header(st)?;
        header.validate_against_file(file_len)?;
        let geometry = header.geometry();

        let crypt = crate::crypt::open_image(st, &header, opts.passphrase.as_deref())?;
        let data_file_raw = header.autoclear_features & autoclear::DATA_FILE_RAW != 0;
        match (header.has_data_file(), &data_file) {
            (true, None) => return Err(Error::InvalidArgument("'data-file' is required for this image".into())),
            (false, Some(_)) => {
                return Err(Error::InvalidArgument(
                    "'data-file' can only be set for images with an external data file".into(),
                ))
            }
            (false, None) if data_file_raw => {
                return Err(Error::InvalidArgument("data-file-raw requires a data file".into()))
            }
            _ => {}
        }
        if let Some(name) = &header.backing_file {
            if backing.is_none() && !matches!(opts.backing, crate::image::backing::BackingPolicy::Ignore) {
                return Err(Error::InvalidArgument(format!(
                    "the image has a backing file ('{name}'): open it with Image::open, Qcow2::open_with_backing, or BackingPolicy::Ignore"
                )));
            }
        }
        let mut read_only = opts.read_only;
        if !read_only && header.is_corrupt() && !opts.repair {
            return Err(Error::Corrupt("qcow2: Image is corrupt; cannot be opened read/write".into()));
        }
        if header.is_dirty() && read_only {
            // Refcounts may be stale; reading through the L1/L2 tables is
            // still exact.
            read_only = true;
        }

        let l1_bytes = u64::from(header.l1_size) * 8;
        let mut l1_raw = vec![0u8; l1_bytes as usize];
        if l1_bytes > 0 {
            st.read_at(&mut l1_raw, header.l1_table_offset)
                .map_err(Error::io("reading the L1 table", header.l1_table_offset))?;
        }
        let l1 = decode_entries(&l1_raw);
        let (l2_tables, rc_tables) = cache_tables(opts, &geometry, header.size)?;
        let refcounts = Refcounts::load(
            st,
            geometry,
            header.refcount_table_offset,
            header.refcount_table_clusters,
            rc_tables,
            file_len,
            opts.repair,
        )?;
        let snapshots = read_snapshots(st, &header, file_len)?;
        let lazy = opts.lazy_refcounts.unwrap_or(header.lazy_refcounts()) && header.version >= 3;
        let dirty_at_open = header.is_dirty();
        let stale_bitmaps = header.extensions.stale_bitmaps.then_some(header.version);
        let version = header.version;
        let size = header.size;
        let compression_type = header.compression_type;
        let discard = DiscardModes {
            request: opts.discard_passthrough,
            snapshot: opts.pass_discard_snapshot.unwrap_or(true),
            other: opts.pass_discard_other,
        };
        let data = data_file.clone().unwrap_or_else(|| storage.clone());
        let mut meta = Meta {
            header,
            geometry,
            l1,
            l1_dirty: BTreeSet::new(),
            l2: TableCache::new(l2_tables),
            refcounts,
            inflight: Vec::new(),
            next_inflight_id: 0,
            pending_frees: Vec::new(),
            failed: None,
            lazy_refcounts: lazy,
            snapshots,
            read_only,
            free_byte_offset: 0,
            has_backing: backing.is_some(),
            metadata_preallocation: None,
            signaled_corruption: false,
            verified: Default::default(),
            messages: opts.messages.clone(),
            bitmaps: Default::default(),
            data_file: data_file.map(|storage| crate::image::data_file::DataFile {
                storage,
                raw: data_file_raw,
                discard,
            }),
        };
        meta.refcounts.map.mask = opts.overlap_check.unwrap_or(overlap::CACHED);
        meta.update_reserved();
        meta.load_inactive_map(st)?;

        let mut open_repair = None;
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

        // QEMU warns while reading the header extensions, before the repair.
        if let (Some(version), Some(sink)) = (stale_bitmaps, &opts.messages) {
            sink(ImageMessage::StaleBitmaps(stale_bitmaps_text(version)));
        }
        if !read_only {
            let mut rewrite = false;
            if meta.header.autoclear_features & !autoclear::KNOWN != 0 {
                meta.header.autoclear_features &= autoclear::KNOWN;
                rewrite = true;
            }
            if meta.header.extensions.stale_bitmaps {
                meta.header.extensions.stale_bitmaps = false;
                rewrite = true;
            }
            if rewrite {
                meta.write_header(st)?;
                st.sync().map_err(Error::io("syncing the header", 0))?;
            }
            if meta.header.is_dirty() && !opts.repair {
                // As QEMU: a full repair (`check -r all`), which also
                // clears the dirty bit once the image is consistent.
                let all = Some(crate::qcow2::meta::check::RepairMode::All);
                let report = match &opts.messages {
                    Some(sink) => crate::qcow2::meta::check::check(&mut meta, st, all, &mut |line: &str| {
                        sink(ImageMessage::Repair(line))
                    })?,
                    None => crate::qcow2::meta::check::collected(|out| {
                        crate::qcow2::meta::check::check(&mut meta, st, all, out)
                    })?,
                };
                if report.error.is_some() || report.check_errors > 0 {
                    let why = report.error.unwrap_or_else(|| "Input/output error".into());
                    return Err(Error::Corrupt(format!("Could not repair dirty image: {why}")));
                }
                open_repair = Some(report);
            }
        }
        meta.load_bitmaps(st, !read_only)?;
        let tracking = AtomicBool::new(!read_only && meta.bitmaps_tracking());

        Ok(Qcow2 {
            storage,
            data,
            geometry,
            compression_type: AtomicU8::new(compression_type),
            version: AtomicU32::new(version),
            read_only,
            writethrough: AtomicBool::new(opts.cache.writes_through()),
            discard,
            size: AtomicU64::new(size),
            io_gate: RwLock::new(()),
            backing,
            meta: Mutex::new(meta),
            alloc_done: Condvar::new(),
            dirty_at_open,
            open_repair,
            closed: AtomicBool::new(false),
            tracking,
            stale_bitmaps,
            crypt,
            serialiser: Default::default(),
        })
    }

    /// Records a guest write, zero write or discard in the enabled bitmaps
    /// (whether or not it succeeded, as QEMU's `bdrv_co_write_req_finish`).
    fn record_dirty(&self, offset: u64, len: u64) {
        if self.tracking.load(Ordering::Acquire) {
            self.lock_meta().mark_bitmaps(offset, len);
        }
    }

    pub(crate) fn set_tracking(&self, on: bool) {
        self.tracking.store(on, Ordering::Release);
    }

    /// QEMU's warning for a bitmaps extension that a program without
    /// bitmap support left behind (the bitmaps are dropped), if there was one.
    pub fn stale_bitmaps_warning(&self) -> Option<&'static str> {
        self.stale_bitmaps.map(stale_bitmaps_text)
    }

    /// The cipher state of an encrypted image.
    pub(crate) fn crypt(&self) -> Option<&crate::crypt::Crypt> {
        self.crypt.as_ref()
    }

    /// The codec of compressed clusters written now.
    fn codec(&self) -> Codec {
        Codec::from_type(self.compression_type.load(Ordering::Acquire))
    }

    /// The header version now.
    fn version(&self) -> u32 {
        self.version.load(Ordering::Acquire)
    }

    /// Takes over the header facts amend may change (version, compression
    /// type), under exclusive access so no request runs with stale ones.
    pub(crate) fn refresh_header_facts(&self, m: &Meta) {
        self.version.store(m.header.version, Ordering::Release);
        self.compression_type.store(m.header.compression_type, Ordering::Release);
    }

    pub(crate) fn lock_meta(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn storage_ref(&self) -> &dyn Storage {
        &*self.storage
    }

    /// The host storage.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Guest disk size in bytes.
    pub fn len(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Whether the guest disk is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the image was opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The image geometry (the refcount width can change with amend).
    pub fn geometry(&self) -> Geometry {
        self.lock_meta().geometry
    }

    /// A copy of the current header.
    pub fn header(&self) -> Header {
        self.lock_meta().header.clone()
    }

    /// Facts for `info`.
    pub fn info(&self) -> Qcow2Info {
        let m = self.lock_meta();
        let mut info = Qcow2Info::from_header(&m.header, m.snapshots.entries.len());
        info.refcount_bits = m.geometry.refcount_bits();
        info.dirty = self.dirty_at_open;
        info.bitmaps = m.bitmaps.dir.iter().map(Into::into).collect();
        // It was read and checked at open; only a failing disk fails now.
        info.luks =
            m.header.extensions.crypto.and_then(|c| crate::crypt::read_luks_header(self.storage_ref(), &c).ok());
        info
    }

    /// Reads what `info` reports from the header and the snapshot table
    /// alone, without opening the image: this works for images whose
    /// features this engine cannot read or write yet (backing files,
    /// external data files, extended L2 entries, encryption).
    pub fn inspect(storage: &dyn Storage) -> Result<(Qcow2Info, Vec<oxqcow_format::SnapshotEntry>)> {
        let file_len = storage.len().map_err(Error::io("reading the file length", 0))?;
        let header = read_header(storage)?;
        header.validate_against_file(file_len)?;
        let snapshots = read_snapshots(storage, &header, file_len)?;
        let mut info = Qcow2Info::from_header(&header, snapshots.entries.len());
        info.bitmaps =
            crate::qcow2::meta::bitmap::read_directory(storage, &header, file_len)?.iter().map(Into::into).collect();
        if let (crate::format::header::crypt::LUKS, Some(c)) = (header.crypt_method, header.extensions.crypto) {
            info.luks = Some(crate::crypt::read_luks_header(storage, &c)?);
        }
        Ok((info, snapshots.entries))
    }
}

impl Qcow2Info {
    fn from_header(h: &Header, snapshots: usize) -> Qcow2Info {
        Qcow2Info {
            version: h.version,
            cluster_size: h.cluster_size(),
            refcount_bits: h.geometry().refcount_bits(),
            lazy_refcounts: h.lazy_refcounts(),
            corrupt: h.is_corrupt(),
            dirty: h.is_dirty(),
            extended_l2: h.extended_l2(),
            compression_type: if h.compression_type == 1 { "zstd" } else { "zlib" },
            backing_file: h.backing_file.clone(),
            backing_format: h.extensions.backing_format.clone(),
            snapshots,
            has_bitmaps: h.extensions.bitmaps.is_some(),
            bitmaps: Vec::new(),
            data_file: h.extensions.data_file.clone(),
            has_data_file: h.has_data_file(),
            data_file_raw: h.autoclear_features & autoclear::DATA_FILE_RAW != 0,
            crypt_method: h.crypt_method,
            luks: None,
            size: h.size,
        }
    }
}

/// QEMU's warning for a bitmaps extension of a header `version` that a
/// program without bitmap support left behind.
fn stale_bitmaps_text(version: u32) -> &'static str {
    if version < 3 {
        "This qcow2 v2 image contains bitmaps, but they may have been modified by a program without persistent bitmap support; so now they must all be considered inconsistent"
    } else {
        "a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent"
    }
}

impl Qcow2 {
    /// The repair a dirty image (lazy refcounts) got when it was opened
    /// read-write, as `check -r all` reports it. Its `messages` are the
    /// first lines QEMU prints while opening such an image, unless they
    /// went to `OpenOptions::messages`.
    pub fn open_repair(&self) -> Option<&crate::qcow2::meta::check::CheckReport> {
        self.open_repair.as_ref()
    }

    /// The snapshot table as read at open.
    pub fn snapshots(&self) -> Vec<oxqcow_format::SnapshotEntry> {
        self.lock_meta().snapshots.entries.clone()
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.len();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::OutOfBounds { offset, len, size });
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at guest `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        if self.crypt.is_some() && !is_sector_aligned(offset, buf.len() as u64) {
            // Encryption works on whole sectors: read them and copy out.
            let (start, end) = sector_bounds(offset, buf.len() as u64);
            let mut bounce = vec![0u8; (end - start) as usize];
            self.read_at(&mut bounce, start)?;
            let at = (offset - start) as usize;
            buf.copy_from_slice(&bounce[at..at + buf.len()]);
            return Ok(());
        }
        let _gate = self.io_gate.read().unwrap_or_else(|p| p.into_inner());
        let plan = {
            let mut m = self.lock_meta();
            match m.plan_read(self.storage_ref(), offset, buf.len() as u64) {
                Ok(p) => p,
                Err(e) => {
                    if e.kind() == crate::ErrorKind::Corrupt {
                        m.fail(self.storage_ref(), &e);
                    }
                    return Err(e);
                }
            }
        };
        self.read_segments(&plan, offset, buf)
    }

    /// Performs a read plan into `buf` (as long as the plan).
    /// Reads `plan` into `buf`, whose first byte is at guest offset `guest`.
    fn read_segments(&self, plan: &[ReadSegment], guest: u64, buf: &mut [u8]) -> Result<()> {
        let mut pos = 0usize;
        for &seg in plan {
            let len = seg.len() as usize;
            let out = &mut buf[pos..pos + len];
            match seg {
                ReadSegment::Zero(_) => out.fill(0),
                ReadSegment::Data { host, .. } => {
                    self.data.read_at(out, host).map_err(Error::io("reading guest data", host))?;
                    if let Some(c) = &self.crypt {
                        c.decrypt(out, if c.uses_host_offset() { host } else { guest + pos as u64 })?;
                    }
                }
                // A whole cluster is inflated straight into the caller's buffer.
                ReadSegment::Compressed { desc, in_cluster: 0, .. } if len as u64 == self.geometry.cluster_size() => {
                    self.read_compressed_into(desc, out)?;
                }
                ReadSegment::Compressed { desc, in_cluster, .. } => {
                    let cluster = self.read_compressed(desc)?;
                    out.copy_from_slice(&cluster[in_cluster as usize..in_cluster as usize + len]);
                }
                ReadSegment::Backing { guest, .. } => self.read_backing(out, guest)?,
            }
            pos += len;
        }
        Ok(())
    }

    /// Writes `buf` at guest `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let in_flight = self.begin_write(offset, buf.len() as u64);
        let res = self.write_at_inner(buf, offset);
        drop(in_flight);
        self.record_dirty(offset, buf.len() as u64);
        res?;
        self.write_through()
    }

    /// Registers a request that changes guest data on an encrypted image,
    /// waiting for the conflicting ones in flight: one that covers part of
    /// a sector (and so rewrites the whole sector) excludes every other
    /// request on that sector (see `serialise.rs`).
    fn begin_write(&self, offset: u64, len: u64) -> Option<crate::qcow2::serialise::InFlight<'_>> {
        self.crypt.as_ref()?;
        let (start, end) = sector_bounds(offset, len);
        Some(self.serialiser.begin(start, end, !is_sector_aligned(offset, len)))
    }

    /// Flushes after a write request in cache mode writethrough.
    fn write_through(&self) -> Result<()> {
        if self.writethrough.load(Ordering::Relaxed) {
            self.flush()?;
        }
        Ok(())
    }

    /// Applies a cache mode: `unsafe` ignores flushes, writethrough makes
    /// every write request durable before it returns, `none` and
    /// `directsync` bypass the host page cache for the image, its data
    /// file and its backing chain (which inherit it, as in QEMU). Fails
    /// when the file system cannot bypass its cache.
    pub fn set_cache_mode(&self, mode: crate::options::CacheMode) -> Result<()> {
        self.storage.set_ignore_sync(mode == crate::options::CacheMode::Unsafe);
        self.data.set_ignore_sync(mode == crate::options::CacheMode::Unsafe);
        self.writethrough.store(mode.writes_through(), Ordering::Relaxed);
        self.storage.set_direct(mode.direct()).map_err(Error::io("opening the image file for direct I/O", 0))?;
        if !Arc::ptr_eq(&self.storage, &self.data) {
            self.data.set_direct(mode.direct()).map_err(Error::io("opening the data file for direct I/O", 0))?;
        }
        match &self.backing {
            Some(b) => b.set_cache_mode(mode),
            None => Ok(()),
        }
    }

    pub(crate) fn write_at_inner(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        if self.crypt.is_some() && !is_sector_aligned(offset, buf.len() as u64) {
            // Encryption works on whole sectors: read, modify, write them
            // (QEMU's block layer does the same for its 512-byte request
            // alignment of encrypted images).
            let (start, end) = sector_bounds(offset, buf.len() as u64);
            let mut bounce = vec![0u8; (end - start) as usize];
            self.read_at(&mut bounce, start)?;
            let at = (offset - start) as usize;
            bounce[at..at + buf.len()].copy_from_slice(buf);
            return self.write_at_inner(&bounce, start);
        }
        let mut done = 0u64;
        let total = buf.len() as u64;
        while done < total {
            let pos = offset + done;
            let gate = self.io_gate.read().unwrap_or_else(|p| p.into_inner());
            let plan = {
                let mut m = self.lock_meta();
                m.check_writable()?;
                loop {
                    match m.plan_write(self.storage_ref(), pos, total - done) {
                        Ok(WritePlan::Wait) => m = self.alloc_done.wait(m).unwrap_or_else(|p| p.into_inner()),
                        Ok(plan) => break plan,
                        Err(e) => {
                            m.fail(self.storage_ref(), &e);
                            return Err(e);
                        }
                    }
                }
            };
            let chunk = &buf[done as usize..];
            match plan {
                WritePlan::Wait => unreachable!("handled above"),
                WritePlan::InPlace { host, len } => {
                    let data = &chunk[..len as usize];
                    match &self.crypt {
                        None => self.data.write_at(data, host),
                        Some(c) => {
                            // Into a scratch buffer: the caller's stays plaintext.
                            let mut scratch = data.to_vec();
                            c.encrypt(&mut scratch, if c.uses_host_offset() { host } else { pos })?;
                            self.data.write_at(&scratch, host)
                        }
                    }
                    .map_err(Error::io("writing guest data", host))?;
                    drop(gate);
                    done += len;
                }
                WritePlan::Allocate(alloc) => {
                    let len = alloc.len;
                    let io = self.write_allocated(&alloc, &chunk[..len as usize]);
                    drop(gate);
                    let pending = self.finish_alloc(alloc.id, io)?;
                    if pending > MAX_PENDING_FREES {
                        self.flush()?;
                    }
                    done += len;
                }
            }
        }
        Ok(())
    }

    /// Writes zeros over `[offset, offset + len)`. With `may_unmap`, whole
    /// clusters give back their host clusters.
    ///
    /// As in QEMU, whole clusters become zero clusters; a partial cluster at
    /// either end becomes a zero cluster too when it held no data, and gets
    /// zeros written as data otherwise. Version 2 images have no zero flag:
    /// their whole clusters are discarded (they have no backing file, so
    /// unallocated clusters read as zeros), as QEMU does.
    pub fn write_zeroes_at(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        let in_flight = self.begin_write(offset, len);
        let res = self.write_zeroes_inner(offset, len, may_unmap);
        drop(in_flight);
        self.record_dirty(offset, len);
        res?;
        self.write_through()
    }

    fn write_zeroes_inner(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        // QEMU zeroes at subcluster granularity (the cluster without
        // extended L2 entries): unaligned ends are handled one unit at a
        // time, the aligned middle in metadata.
        let unit = self.geometry.subcluster_size();
        let size = self.len();
        let end = offset + len;
        // The end of the disk counts as a unit boundary.
        let aligned = |o: u64| o % unit == 0 || o == size;
        let head_end = if aligned(offset) { offset } else { end.min(offset.div_ceil(unit) * unit) };
        let tail_start = if aligned(end) { end } else { (end / unit * unit).max(head_end) };
        if head_end > offset {
            self.zero_partial(offset, head_end - offset, may_unmap)?;
        }
        if tail_start > head_end {
            self.zeroize(head_end, tail_start - head_end, may_unmap)?;
        }
        if end > tail_start {
            self.zero_partial(tail_start, end - tail_start, may_unmap)?;
        }
        Ok(())
    }

    /// Zeroes part of one unit (subcluster, or cluster without extended L2
    /// entries), as QEMU's `qcow2_co_pwrite_zeroes` does: when the rest of
    /// the unit reads as zeros and the unit holds no data of this layer,
    /// the whole unit becomes zeros in metadata, else zeros are written
    /// over the part.
    ///
    /// The check and the metadata update happen in one hold of the metadata
    /// lock, retried once no allocation of the cluster is in flight, so that
    /// a concurrent write to another part of the cluster is never zeroed over
    /// (QEMU serialises such requests in its block layer). Version 2 images
    /// over a backing file have no metadata-only zeros: zeros are written.
    fn zero_partial(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let unit = g.subcluster_size();
        let size = self.len();
        let start = offset / unit * unit;
        let end = (start + unit).min(size);
        if self.version() < 3 && self.lock_meta().backing_named() {
            return self.write_zero_buffer(offset, len);
        }
        // QEMU zeroes the whole cluster when the unit is its first
        // subcluster and reaches the end of the disk (its zeroize has no
        // tail there), and always without subclusters.
        let whole_cluster = !g.extended_l2() || (start % cs == 0 && start + unit >= size);
        let (zeroed, pending) = {
            let _gate = self.io_gate.read().unwrap_or_else(|p| p.into_inner());
            let mut m = self.lock_meta();
            m.check_writable()?;
            let zeroed = loop {
                if !self.unit_can_be_zeroed(&mut m, start, offset, offset + len, end)? {
                    break false;
                }
                let updated = if self.version() < 3 {
                    m.discard_range(self.storage_ref(), g.align_down(start), cs)
                } else if whole_cluster {
                    m.zero_range(self.storage_ref(), g.align_down(start), cs, may_unmap)
                } else {
                    m.zero_subclusters(self.storage_ref(), start, unit).map(|r| r.is_some())
                };
                match updated {
                    Ok(true) => break true,
                    Ok(false) => m = self.alloc_done.wait(m).unwrap_or_else(|p| p.into_inner()),
                    Err(e) => {
                        m.fail(self.storage_ref(), &e);
                        return Err(e);
                    }
                }
            };
            (zeroed, m.pending_frees.len())
        };
        if pending > MAX_PENDING_FREES {
            self.flush()?;
        }
        if zeroed {
            Ok(())
        } else {
            self.write_zero_buffer(offset, len)
        }
    }

    /// QEMU's test before zeroing a whole unit for a partial zero write:
    /// `[start, from)` and `[to, end)` read as zeros (through the backing
    /// chain), and the unit is unallocated or zero in this layer.
    fn unit_can_be_zeroed(&self, m: &mut Meta, start: u64, from: u64, to: u64, end: u64) -> Result<bool> {
        let st = self.storage_ref();
        for (a, b) in [(start, from), (to, end)] {
            if b > a {
                let own = m.block_status(st, a, b - a)?;
                if !self.extents_read_as_zero(&own)? {
                    return Ok(false);
                }
            }
        }
        let mut own_kind = None;
        m.walk(st, start, 1, |_, _, _, mapping, _| own_kind = Some(mapping))?;
        Ok(matches!(own_kind, Some(L2Mapping::Unallocated | L2Mapping::ZeroPlain | L2Mapping::ZeroAllocated { .. })))
    }

    /// Whether extents of this layer read as zeros, asking the backing image
    /// about the ones this layer does not allocate.
    fn extents_read_as_zero(&self, own: &[Extent]) -> Result<bool> {
        for e in own {
            if e.present {
                if !e.zero || e.data {
                    return Ok(false);
                }
                continue;
            }
            let Some(backing) = &self.backing else { continue };
            let blen = crate::image::BlockDevice::len(&**backing);
            let inside = (e.offset + e.length).min(blen).saturating_sub(e.offset);
            if inside > 0 {
                let below = crate::image::BlockDevice::block_status(&**backing, e.offset, inside)?;
                if !below.iter().all(|b| b.zero && !b.data) {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    fn write_zero_buffer(&self, offset: u64, len: u64) -> Result<()> {
        let chunk = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len() as u64);
            self.write_at_inner(&chunk[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }

    /// QEMU's `qcow2_subcluster_zeroize` for a unit-aligned range (its end
    /// may be the end of the disk): subclusters of a partial cluster at
    /// either end become zero subclusters, whole clusters zero clusters.
    /// A compressed partial cluster cannot be zeroed in part; QEMU's block
    /// layer then writes zeros over the whole range, and so do we.
    fn zeroize(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        let g = self.geometry;
        let size = self.len();
        let end = offset + len;
        if self.version() < 3 {
            // Version 2 has no zero flag. Without a backing file an
            // unallocated cluster reads as zeros, so QEMU discards; over a
            // backing file it has to write zeros.
            if self.lock_meta().backing_named() {
                return self.write_zero_buffer(offset, end.min(size) - offset);
            }
            return self.update_clusters(offset, g.align_up(end) - offset, |m, st, o, l| m.discard_range(st, o, l));
        }
        let head = end.min(g.align_up(offset)) - offset;
        let mid_start = offset + head;
        let tail = if end >= size { 0 } else { end - mid_start.max(g.align_down(end)) };
        let mid_end = end - tail;
        if head > 0 || tail > 0 {
            let compressed = {
                let mut m = self.lock_meta();
                (head > 0 && m.is_compressed_at(self.storage_ref(), offset)?)
                    || (tail > 0 && m.is_compressed_at(self.storage_ref(), mid_end)?)
            };
            if compressed {
                return self.write_zero_buffer(offset, end - offset);
            }
        }
        if head > 0 {
            self.zero_subclusters(offset, head)?;
        }
        if mid_end > mid_start {
            self.update_clusters(mid_start, g.align_up(mid_end) - mid_start, |m, st, o, l| {
                m.zero_range(st, o, l, may_unmap)
            })?;
        }
        if tail > 0 {
            self.zero_subclusters(mid_end, tail)?;
        }
        Ok(())
    }

    /// Zero subclusters inside one cluster, waiting out allocations in flight.
    fn zero_subclusters(&self, offset: u64, len: u64) -> Result<()> {
        let _gate = self.io_gate.read().unwrap_or_else(|p| p.into_inner());
        let mut m = self.lock_meta();
        m.check_writable()?;
        loop {
            match m.zero_subclusters(self.storage_ref(), offset, len) {
                Ok(Some(_)) => return Ok(()),
                Ok(None) => m = self.alloc_done.wait(m).unwrap_or_else(|p| p.into_inner()),
                Err(e) => {
                    m.fail(self.storage_ref(), &e);
                    return Err(e);
                }
            }
        }
    }

    /// Runs a whole-cluster metadata update in chunks of one L2 table,
    /// waiting out in-flight allocations that overlap each chunk.
    fn update_clusters(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&mut Meta, &dyn Storage, u64, u64) -> Result<bool>,
    ) -> Result<()> {
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let chunk_end =
                end.min((self.geometry.l1_index(HostOffset(pos).into_guest()) + 1) * self.geometry.bytes_per_l2());
            let _gate = self.io_gate.read().unwrap_or_else(|p| p.into_inner());
            let mut m = self.lock_meta();
            m.check_writable()?;
            loop {
                match f(&mut m, self.storage_ref(), pos, chunk_end - pos) {
                    Ok(true) => break,
                    Ok(false) => m = self.alloc_done.wait(m).unwrap_or_else(|p| p.into_inner()),
                    Err(e) => {
                        m.fail(self.storage_ref(), &e);
                        return Err(e);
                    }
                }
            }
            let pending = m.pending_frees.len();
            drop(m);
            drop(_gate);
            if pending > MAX_PENDING_FREES {
                self.flush()?;
            }
            pos = chunk_end;
        }
        Ok(())
    }

    /// Discards whole clusters inside `[offset, offset + len)` (and the last
    /// partial cluster when the range reaches the end of the disk), as QEMU
    /// does: partial clusters keep their data.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let in_flight = self.begin_write(offset, len);
        let res = self.discard_inner(offset, len);
        drop(in_flight);
        self.record_dirty(offset, len);
        res?;
        self.write_through()
    }

    fn discard_inner(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let size = self.len();
        let start = self.geometry.align_up(offset);
        let end =
            if offset + len == size { self.geometry.align_up(size) } else { self.geometry.align_down(offset + len) };
        if start >= end {
            return Ok(());
        }
        self.update_clusters(start, end - start, |m, st, o, l| m.discard_range(st, o, l))
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let frees = {
            let mut m = self.lock_meta();
            if let Some(f) = &m.failed {
                return Err(Error::Failed(f.clone()));
            }
            // Guest data in an external data file first, as QEMU flushes
            // its children: the metadata flush may make it reachable.
            if let Err(e) = m.sync_data().and_then(|()| m.flush(self.storage_ref())) {
                m.fail(self.storage_ref(), &e);
                return Err(e);
            }
            std::mem::take(&mut m.pending_frees)
        };
        if frees.is_empty() {
            return Ok(());
        }
        // Wait for every request that may still use a freed cluster.
        let _gate = self.io_gate.write().unwrap_or_else(|p| p.into_inner());
        let mut m = self.lock_meta();
        let st = self.storage_ref();
        let mut res = m.apply_frees(st, frees, self.discard);
        // The decrements are in the refcount cache now: write them too, so
        // that a crash after flush returns leaves no leaked cluster (with
        // lazy refcounts, refcounts are rebuilt after a crash anyway).
        if res.is_ok() && !m.lazy_refcounts {
            res = m.refcounts.write_dirty(st).and_then(|wrote| {
                if wrote {
                    st.sync().map_err(Error::io("syncing refcounts", 0))?;
                }
                Ok(())
            });
        }
        if let Err(e) = res {
            m.fail(st, &e);
            return Err(e);
        }
        Ok(())
    }

    /// Describes `[offset, offset + len)` as extents of equal status.
    /// Ranges this image does not allocate are described by the backing
    /// image, one level deeper; past the backing image's end they read as
    /// zeros at this level (as qemu-img map reports them).
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_range(offset, len)?;
        let mut own = self.lock_meta().block_status(self.storage_ref(), offset, len)?;
        if self.crypt.is_some() {
            // The host bytes are ciphertext: as QEMU, no offset is reported
            // for them.
            own.iter_mut().for_each(|e| e.host_offset = None);
        }
        let Some(backing) = &self.backing else { return Ok(own) };
        let blen = crate::image::BlockDevice::len(&**backing);
        let mut out = Vec::with_capacity(own.len());
        for e in own {
            if e.present {
                crate::extent::push_extent(&mut out, e);
                continue;
            }
            let end = e.offset + e.length;
            let inside = end.min(blen).saturating_sub(e.offset);
            if inside > 0 {
                for mut b in crate::image::BlockDevice::block_status(&**backing, e.offset, inside)? {
                    b.depth += 1;
                    crate::extent::push_extent(&mut out, b);
                }
            }
            if inside < e.length {
                let rest = Extent {
                    offset: e.offset + inside,
                    length: e.length - inside,
                    host_offset: e.host_offset.map(|h| h + inside),
                    ..e
                };
                crate::extent::push_extent(&mut out, rest);
            }
        }
        Ok(out)
    }

    /// Runs `f` with exclusive access: no request in flight, no allocation
    /// pending, metadata flushed.
    pub(crate) fn exclusive<T>(&self, f: impl FnOnce(&mut Meta, &dyn Storage) -> Result<T>) -> Result<T> {
        let _gate = self.io_gate.write().unwrap_or_else(|p| p.into_inner());
        let mut m = self.lock_meta();
        while !m.inflight.is_empty() {
            m = self.alloc_done.wait(m).unwrap_or_else(|p| p.into_inner());
        }
        // Snapshot operations change which clusters are shared.
        m.verified.clear();
        if !m.read_only {
            if let Some(f) = &m.failed {
                return Err(Error::Failed(f.clone()));
            }
            m.flush_all(self.storage_ref())?;
            let frees = std::mem::take(&mut m.pending_frees);
            m.apply_frees(self.storage_ref(), frees, self.discard)?;
            m.flush_all(self.storage_ref())?;
        }
        let res = f(&mut m, self.storage_ref());
        if let Err(e) = &res {
            if !m.read_only && e.kind() == crate::ErrorKind::Io {
                m.fail(self.storage_ref(), e);
            }
        }
        let size = m.header.size;
        self.size.store(size, Ordering::Release);
        res
    }

    /// Changes the guest size. Growing maps the new space as `prealloc`
    /// says; shrinking frees every cluster past the new end.
    pub fn resize(&self, new_size: u64, prealloc: Preallocation) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.lock_meta().check_resize(new_size)?;
        let old_size = self.len();
        self.lock_meta().check_bitmaps_resizable()?;
        if new_size > old_size {
            self.unshare_last_cluster(old_size, prealloc != Preallocation::Off)?;
        }
        self.exclusive(|m, st| {
            m.resize(st, new_size, prealloc)?;
            m.resize_bitmaps(new_size);
            Ok(())
        })?;
        // A grown overlay must not show what its backing image has past
        // the old end: zero the new area, as QEMU's truncate does.
        if let Some(backing) = &self.backing {
            let blen = crate::image::BlockDevice::len(&**backing);
            if new_size > old_size && blen > old_size {
                let end = if self.version() >= 3 { new_size } else { new_size.min(blen) };
                // Not a guest write: bitmaps do not record it (as in QEMU,
                // where the driver zeroes the area itself).
                self.write_zeroes_inner(old_size, end - old_size, false)?;
                self.write_through()?;
            }
        }
        Ok(())
    }

    /// Creates an internal snapshot of the active layer named `name`, dated
    /// now, with no instruction count recorded.
    pub fn snapshot_create(&self, name: &str) -> Result<oxqcow_format::SnapshotEntry> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        self.snapshot_create_with(&oxqcow_format::SnapshotEntry {
            name: name.to_string(),
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_nanos(),
            icount: Some(u64::MAX),
            ..Default::default()
        })
    }

    /// Creates an internal snapshot of the active layer described by
    /// `template`: its name, id (empty: the next free number; an id in use
    /// is refused), date, VM clock and instruction count are recorded as
    /// given (`qemu-img snapshot -c` records microsecond dates and an
    /// instruction count of 0); everything else comes from the image.
    pub fn snapshot_create_with(
        &self,
        template: &oxqcow_format::SnapshotEntry,
    ) -> Result<oxqcow_format::SnapshotEntry> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.refuse_snapshots_with_data_file()?;
        let modes = self.discard;
        self.exclusive(|m, st| m.with_dirty_bit(st, |m| m.snapshot_create(st, template, modes)))
    }

    /// Deletes the snapshot with this id (or, failing that, this name).
    pub fn snapshot_delete(&self, id_or_name: &str) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.refuse_snapshots_with_data_file()?;
        let modes = self.discard;
        self.exclusive(|m, st| m.with_dirty_bit(st, |m| m.snapshot_delete(st, id_or_name, modes)))
    }

    /// Reverts the active layer to the snapshot with this id (or name).
    /// Refused while the image has persistent bitmaps, as QEMU's
    /// `bdrv_snapshot_goto` refuses it (they would no longer describe the
    /// disk).
    pub fn snapshot_apply(&self, id_or_name: &str) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if self.has_bitmaps() {
            return Err(Error::InvalidArgument("Device has active dirty bitmaps".into()));
        }
        self.refuse_snapshots_with_data_file()?;
        let modes = self.discard;
        self.exclusive(|m, st| m.with_dirty_bit(st, |m| m.snapshot_apply(st, id_or_name, modes)))
    }

    /// Records a different backing file (or none) in the header. The data
    /// is not touched: this is `rebase -u`. The backing image attached to
    /// this handle stays until the image is reopened.
    pub fn set_backing_file(&self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if let Some(n) = name {
            if n.len() > oxqcow_format::limits::MAX_BACKING_NAME as usize {
                return Err(Error::InvalidArgument(format!("Backing file name too long ({} bytes)", n.len())));
            }
        }
        self.exclusive(|m, st| {
            let old = (m.header.backing_file.clone(), m.header.extensions.backing_format.clone());
            m.header.backing_file = name.map(str::to_string);
            m.header.extensions.backing_format = format.map(str::to_string);
            if let Err(e) = m.header.clone().serialize() {
                (m.header.backing_file, m.header.extensions.backing_format) = old;
                return Err(e.into());
            }
            m.write_header(st)?;
            st.sync().map_err(Error::io("syncing the header", 0))
        })
    }

    /// Drops every cluster of the active layer: the image then reads as its
    /// backing file (or zeros). Used by commit.
    pub fn make_empty(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.exclusive(|m, st| m.drop_all_clusters(st))
    }

    /// Flushes everything, clears the dirty bit and closes the image.
    pub fn close(self) -> Result<()> {
        self.close_inner()
    }

    fn close_inner(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) || self.read_only {
            return Ok(());
        }
        self.flush()?;
        let mut m = self.lock_meta();
        if m.failed.is_some() {
            return Ok(());
        }
        // As QEMU's qcow2_inactivate: bitmaps first, then the caches.
        let stored = m.store_bitmaps(self.storage_ref());
        m.flush_all(self.storage_ref())?;
        stored?;
        if m.header.is_dirty() {
            m.header.incompatible_features &= !incompat::DIRTY;
            m.write_header(self.storage_ref())?;
            self.storage.sync().map_err(Error::io("syncing the header", 0))?;
        }
        Ok(())
    }

    /// Writes an allocated run: the copy-on-write head, the new data and the
    /// copy-on-write tail, as one write when they are small.
    fn write_allocated(&self, alloc: &crate::qcow2::meta::plan::Allocation, data: &[u8]) -> Result<()> {
        let host = alloc.host;
        if let Some(c) = &self.crypt {
            return self.write_allocated_encrypted(c, alloc, data);
        }
        if (alloc.head.is_some() || alloc.tail.is_some())
            && self.cow_reads_zero(&alloc.head)?
            && self.cow_reads_zero(&alloc.tail)?
        {
            // Zero the new clusters without writing zeros, then write only
            // the data (QEMU's handle_alloc_space does the same).
            let head_len = alloc.head.as_ref().map_or(0, |r| r.len);
            let total = head_len + data.len() as u64 + alloc.tail.as_ref().map_or(0, |r| r.len);
            if self.data.write_zeroes_fast(host, total).map_err(Error::io("zeroing new clusters", host))? {
                let at = host + head_len;
                return self.data.write_at(data, at).map_err(Error::io("writing guest data", at));
            }
        }
        let head = self.read_cow(&alloc.head)?;
        let tail = self.read_cow(&alloc.tail)?;
        let cs = self.geometry.cluster_size() as usize;
        if head.len() + data.len() + tail.len() <= 4 * cs {
            let mut buf = Vec::with_capacity(head.len() + data.len() + tail.len());
            buf.extend_from_slice(&head);
            buf.extend_from_slice(data);
            buf.extend_from_slice(&tail);
            return self.data.write_at(&buf, host).map_err(Error::io("writing guest data", host));
        }
        let mut at = host;
        for part in [&head[..], data, &tail[..]] {
            if !part.is_empty() {
                self.data.write_at(part, at).map_err(Error::io("writing guest data", at))?;
                at += part.len() as u64;
            }
        }
        Ok(())
    }

    /// Whether a copy-on-write region reads as zeros as far as metadata
    /// tells (QEMU's `is_zero_cow`, which asks `bdrv_co_is_zero_fast`: zero
    /// clusters and subclusters, unallocated ranges over nothing or over
    /// zeros in the backing chain; data is never looked at). Then the new
    /// clusters are zeroed on the host instead of written, as QEMU's
    /// `handle_alloc_space` does.
    fn cow_reads_zero(&self, region: &Option<crate::qcow2::meta::plan::CowRegion>) -> Result<bool> {
        let Some(r) = region else { return Ok(true) };
        for seg in &r.plan {
            match *seg {
                ReadSegment::Zero(_) => {}
                ReadSegment::Backing { guest, len } => {
                    let Some(backing) = &self.backing else { continue };
                    let blen = crate::image::BlockDevice::len(&**backing);
                    let inside = (guest + len).min(blen).saturating_sub(guest);
                    if inside > 0 {
                        let below = crate::image::BlockDevice::block_status(&**backing, guest, inside)?;
                        if !below.iter().all(|b| b.zero && !b.data) {
                            return Ok(false);
                        }
                    }
                }
                _ => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Writes an allocated run of an encrypted image: the copy-on-write
    /// regions are read as plaintext (decrypted with their old sector
    /// numbers) and everything is encrypted for the new clusters, in one
    /// scratch buffer.
    fn write_allocated_encrypted(
        &self,
        c: &crate::crypt::Crypt,
        alloc: &crate::qcow2::meta::plan::Allocation,
        data: &[u8],
    ) -> Result<()> {
        let mut buf = self.read_cow(&alloc.head)?;
        buf.extend_from_slice(data);
        buf.extend_from_slice(&self.read_cow(&alloc.tail)?);
        let host = alloc.host;
        c.encrypt(&mut buf, if c.uses_host_offset() { host } else { alloc.guest })?;
        self.data.write_at(&buf, host).map_err(Error::io("writing guest data", host))
    }

    fn read_cow(&self, region: &Option<crate::qcow2::meta::plan::CowRegion>) -> Result<Vec<u8>> {
        let Some(r) = region else { return Ok(Vec::new()) };
        let mut buf = vec![0u8; r.len as usize];
        self.read_segments(&r.plan, r.guest, &mut buf)?;
        Ok(buf)
    }

    /// Reads from the backing image; past its end everything reads as zeros.
    fn read_backing(&self, out: &mut [u8], guest: u64) -> Result<()> {
        let Some(backing) = &self.backing else {
            out.fill(0);
            return Ok(());
        };
        let blen = crate::image::BlockDevice::len(&**backing);
        let n = blen.saturating_sub(guest).min(out.len() as u64) as usize;
        if n > 0 {
            crate::image::BlockDevice::read_at(&**backing, &mut out[..n], guest)?;
        }
        out[n..].fill(0);
        Ok(())
    }

    /// Adds or erases LUKS key slots with qemu-img amend's rules and
    /// messages (see [`crate::crypt`]).
    pub fn amend_encryption(&self, change: &crate::options::KeyslotChange) -> Result<()> {
        if self.is_read_only() {
            return Err(Error::ReadOnly);
        }
        let Some(master_key) = self.crypt().and_then(crate::crypt::Crypt::luks_master_key) else {
            return Err(Error::InvalidArgument("Only LUKS encryption options can be amended".into()));
        };
        self.exclusive(|m, st| {
            let ext = m.header.extensions.crypto.expect("LUKS images have the extension");
            crate::crypt::amend_keyslots(st, ext, master_key, change)
        })
    }

    /// Whether guest data lives in an external data file.
    pub fn has_data_file(&self) -> bool {
        !Arc::ptr_eq(&self.data, &self.storage)
    }

    /// The storage guest data clusters live in: the external data file, or
    /// the image file itself.
    pub fn data_storage(&self) -> &Arc<dyn Storage> {
        &self.data
    }

    /// Refuses internal snapshot operations on images with an external
    /// data file, as QEMU does (-ENOTSUP): the snapshot could not keep its
    /// own copy of the data.
    fn refuse_snapshots_with_data_file(&self) -> Result<()> {
        if self.has_data_file() {
            return Err(Error::Unsupported("internal snapshots of images with an external data file".into()));
        }
        Ok(())
    }

    /// The backing image, when the image has one and it was opened.
    pub fn backing(&self) -> Option<&Arc<crate::image::Image>> {
        self.backing.as_ref()
    }

    /// Reads and decompresses one compressed cluster.
    fn read_compressed(&self, desc: oxqcow_format::CompressedDescriptor) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.geometry.cluster_size() as usize];
        self.read_compressed_into(desc, &mut out)?;
        Ok(out)
    }

    /// Reads and decompresses one compressed cluster into `out` (one
    /// cluster long).
    fn read_compressed_into(&self, desc: oxqcow_format::CompressedDescriptor, out: &mut [u8]) -> Result<()> {
        let mut src = vec![0u8; desc.max_len() as usize];
        self.storage.read_at(&mut src, desc.offset.0).map_err(Error::io("reading compressed data", desc.offset.0))?;
        self.codec().decompress(&src, out, || format!("compressed cluster at host offset 0x{:x}", desc.offset.0))
    }

    /// Writes whole clusters compressed (`buf` starts at a cluster boundary
    /// and covers whole clusters, or ends at the end of the disk). Clusters
    /// that do not shrink are written uncompressed, as QEMU does. Like QEMU,
    /// compressed data only goes to clusters that hold no data yet.
    pub fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        let res = self.write_compressed_inner(buf, offset);
        self.record_dirty(offset, buf.len() as u64);
        res?;
        self.write_through()
    }

    fn write_compressed_inner(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        if self.has_data_file() {
            // QEMU: -ENOTSUP; a compressed cluster cannot sit at host offset
            // == guest offset.
            return Err(Error::Unsupported("compressed clusters in images with an external data file".into()));
        }
        if self.crypt.is_some() {
            // QEMU's qcow2 has no compressed writes for encrypted images.
            return Err(Error::Unsupported("compressed writes to encrypted images".into()));
        }
        let cs = self.geometry.cluster_size();
        let end = offset + buf.len() as u64;
        if offset % cs != 0 || (end % cs != 0 && end != self.len()) {
            return Err(Error::InvalidArgument(format!(
                "compressed writes must cover whole clusters (offset {offset}, length {})",
                buf.len()
            )));
        }
        for (i, chunk) in buf.chunks(cs as usize).enumerate() {
            let at = offset + i as u64 * cs;
            let mut cluster = chunk.to_vec();
            cluster.resize(cs as usize, 0);
            match self.codec().compress(&cluster, cs as usize - 1)? {
                None => self.write_at_inner(chunk, at)?,
                Some(data) => self.write_compressed_cluster(&data, at)?,
            }
        }
        Ok(())
    }

    fn write_compressed_cluster(&self, data: &[u8], offset: u64) -> Result<()> {
        let gate = self.io_gate.read().unwrap_or_else(|p| p.into_inner());
        let (id, host) = {
            let mut m = self.lock_meta();
            m.check_writable()?;
            loop {
                match m.plan_compressed(self.storage_ref(), offset, data.len() as u64) {
                    Ok(Some(plan)) => break plan,
                    Ok(None) => m = self.alloc_done.wait(m).unwrap_or_else(|p| p.into_inner()),
                    Err(e) => {
                        if e.kind() != crate::ErrorKind::InvalidArgument {
                            m.fail(self.storage_ref(), &e);
                        }
                        return Err(e);
                    }
                }
            }
        };
        let io = self.storage.write_at(data, host).map_err(Error::io("writing compressed data", host));
        drop(gate);
        self.finish_alloc(id, io).map(|_| ())
    }

    /// Ends the in-flight allocation `id` after its data I/O gave `io`:
    /// commits it (the L2 entries point at the new clusters), or gives its
    /// clusters back. Returns how many frees are pending.
    ///
    /// A failed data I/O (an unreadable copy-on-write source, such as a
    /// compressed cluster that does not inflate, or a failed data write)
    /// fails this request only, as in QEMU: no metadata points at the new
    /// clusters yet, so the image stays consistent and usable, and writes
    /// acknowledged earlier are still flushed. Only metadata that could not
    /// be updated makes the image refuse further writes.
    fn finish_alloc(&self, id: u64, io: Result<()>) -> Result<usize> {
        let st = self.storage_ref();
        let mut m = self.lock_meta();
        let res = match io {
            Ok(()) => m.commit_alloc(st, id).inspect_err(|e| m.fail(st, e)),
            Err(e) => {
                if let Err(abort) = m.abort_alloc(st, id) {
                    m.fail(st, &abort);
                }
                Err(e)
            }
        };
        self.alloc_done.notify_all();
        res.map(|()| m.pending_frees.len())
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        let _ = self.close_inner();
    }
}

/// Whether a request covers whole 512-byte sectors.
fn is_sector_aligned(offset: u64, len: u64) -> bool {
    offset % crate::crypt::SECTOR == 0 && len % crate::crypt::SECTOR == 0
}

/// The whole sectors around a request.
fn sector_bounds(offset: u64, len: u64) -> (u64, u64) {
    let s = crate::crypt::SECTOR;
    (offset / s * s, (offset + len).div_ceil(s) * s)
}

trait IntoGuest {
    fn into_guest(self) -> oxqcow_format::GuestOffset;
}
impl IntoGuest for HostOffset {
    fn into_guest(self) -> oxqcow_format::GuestOffset {
        oxqcow_format::GuestOffset(self.0)
    }
}
