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

mod admin;
mod cleaner;
mod cow_budget;
mod create;
mod io;
pub(crate) mod meta;
mod open;
pub(crate) mod serialise;

pub(crate) use create::create_unattached;
pub(crate) use open::read_header;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};

use oxqcow_format::header::Header;
use oxqcow_format::Geometry;

use crate::compress::Codec;
use crate::dirty::DirtyBitmap;
use crate::error::{Error, Result};
use crate::extent::Extent;
use crate::options::{AmendOptions, CreateOptions, OpenOptions, Preallocation};
use crate::storage::Storage;
use meta::bitmap::BitmapInfo;
use meta::check::{CheckReport, RepairMode};
use meta::{DiscardModes, Meta};

/// Deferred frees are applied by an internal flush once this many pile up,
/// so that a workload that never flushes still gets its space back.
pub(crate) const MAX_PENDING_FREES: usize = 16384;

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
    /// Shared with the cache cleaner (`cleaner.rs`), which holds it weakly.
    meta: Arc<Mutex<Meta>>,
    alloc_done: Condvar,
    /// What writes of all-zero buffers become (`detect-zeroes`).
    detect_zeroes: crate::options::DetectZeroes,
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
    /// Bounds the copy-on-write buffers of the writes in flight.
    cow_budget: cow_budget::CowBudget,
}

impl Qcow2 {
    /// Creates a qcow2 image on `storage` (whose content is replaced) and
    /// opens it read-write. Images with a backing file are made by
    /// `Image::create`, which resolves and attaches the backing file.
    pub fn create(storage: Arc<dyn Storage>, opts: &CreateOptions) -> Result<Qcow2> {
        if opts.backing_file.is_some() {
            return Err(Error::InvalidArgument(
                "images with a backing file are created with Image::create, which opens the backing chain".into(),
            ));
        }
        create::create_unattached(storage, None, opts)
    }

    /// Creates a qcow2 image on `storage` whose guest data lives in
    /// `data` (`opts.data_file` is the name the header records for it;
    /// `data` is emptied and sized to the disk, as QEMU creates it).
    pub fn create_with_data_file(
        storage: Arc<dyn Storage>,
        data: Arc<dyn Storage>,
        opts: &CreateOptions,
    ) -> Result<Qcow2> {
        if opts.backing_file.is_some() {
            return Err(Error::InvalidArgument(
                "images with a backing file are created with Image::create, which opens the backing chain".into(),
            ));
        }
        create::create_unattached(storage, Some(data), opts)
    }

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
        open::open(storage, opts, backing, data_file)
    }

    pub(crate) fn set_tracking(&self, on: bool) {
        self.tracking.store(on, Ordering::Release);
    }

    /// QEMU's warning for a bitmaps extension that a program without
    /// bitmap support left behind (the bitmaps are dropped), if there was one.
    pub fn stale_bitmaps_warning(&self) -> Option<&'static str> {
        self.stale_bitmaps.map(open::stale_bitmaps_text)
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
        self.version.store(m.version(), Ordering::Release);
        self.compression_type.store(m.compression_type(), Ordering::Release);
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
        self.lock_meta().geometry()
    }

    /// A copy of the current header.
    pub fn header(&self) -> Header {
        self.lock_meta().header()
    }

    /// Facts for `info`.
    pub fn info(&self) -> Qcow2Info {
        let m = self.lock_meta();
        let mut info = Qcow2Info::from_header(&m.header(), m.snapshot_entries().len());
        info.refcount_bits = m.geometry().refcount_bits();
        info.dirty = self.dirty_at_open;
        info.bitmaps = m.bitmaps_on_disk();
        // It was read and checked at open; only a failing disk fails now.
        info.luks = m.crypto_extension().and_then(|c| crate::crypt::read_luks_header(self.storage_ref(), &c).ok());
        info
    }

    /// Reads what `info` reports from the header and the snapshot table
    /// alone, without opening the image: this works for images whose
    /// features this engine cannot read or write yet (backing files,
    /// external data files, extended L2 entries, encryption).
    pub fn inspect(storage: &dyn Storage) -> Result<(Qcow2Info, Vec<oxqcow_format::SnapshotEntry>)> {
        open::inspect(storage)
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
        self.lock_meta().snapshot_entries().to_vec()
    }

    /// Reads `buf.len()` bytes at guest `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.lock_meta().check_usable()?;
        io::read(self, buf, offset)
    }

    /// Reads `buf.len()` bytes at `pos` in the VM state area, which lives
    /// after the disk in the image's guest address space (QEMU's
    /// `qcow2_load_vmstate`); what was never written reads as zeros.
    pub fn read_vmstate(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        self.lock_meta().check_usable()?;
        let offset = self.vm_state_range(pos, buf.len() as u64)?;
        io::read_unchecked(self, buf, offset)
    }

    /// Writes `buf` at `pos` in the VM state area (QEMU's
    /// `qcow2_save_vmstate`), growing the L1 table to map it.
    pub fn write_vmstate(&self, buf: &[u8], pos: u64) -> Result<()> {
        let offset = self.vm_state_range(pos, buf.len() as u64)?;
        {
            let mut m = self.lock_meta();
            if let Err(e) = m.l1_covering(self.storage_ref(), offset, buf.len() as u64) {
                if !matches!(
                    e.kind(),
                    crate::ErrorKind::ReadOnly | crate::ErrorKind::Failed | crate::ErrorKind::NoSpace
                ) {
                    m.fail(self.storage_ref(), &e);
                }
                return Err(e);
            }
        }
        self.write_unchecked(buf, offset)?;
        self.write_through()
    }

    /// The guest offset of `[pos, pos + len)` in the VM state area.
    fn vm_state_range(&self, pos: u64, len: u64) -> Result<u64> {
        let start = self.lock_meta().vm_state_offset();
        match start.checked_add(pos).filter(|o| o.checked_add(len).is_some()) {
            Some(offset) => Ok(offset),
            None => Err(Error::OutOfBounds { offset: pos, len, size: u64::MAX - start }),
        }
    }

    /// Writes `buf` at guest `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if let Some(may_unmap) = self.detect_zeroes.zero_write(buf) {
            return self.write_zeroes_at(offset, buf.len() as u64, may_unmap);
        }
        let in_flight = self.begin_write(offset, buf.len() as u64);
        let res = self.write_at_inner(buf, offset);
        drop(in_flight);
        self.record_dirty(offset, buf.len() as u64);
        res?;
        self.write_through()
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

    /// Whether zeroing `[offset, offset + len)` changes metadata only, with
    /// no zeros written as data: the one rule for requests that must not
    /// fall back to writing (NBD's fast zero, the FUSE export's hole
    /// punching, qemu-io's `write -z -n`; QEMU's `BDRV_REQ_NO_FALLBACK`).
    /// Version 2 has no zero flag (QEMU's qcow2 answers ENOTSUP). Otherwise
    /// whole units (subclusters with extended L2 entries, else clusters)
    /// are, and so is a partial unit at either end that already reads as
    /// zeros and holds no data of its own; the end of the disk counts as a
    /// unit boundary.
    pub fn zeroes_by_metadata(&self, offset: u64, len: u64) -> Result<bool> {
        io::zeroes_by_metadata(self, offset, len)
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

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<()> {
        io::flush(self)
    }

    /// Describes `[offset, offset + len)` as extents of equal status.
    /// Ranges this image does not allocate are described by the backing
    /// image, one level deeper; past the backing image's end they read as
    /// zeros at this level (as qemu-img map reports them).
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        io::block_status(self, offset, len)
    }

    /// Lays out the metadata a copy into this new image will need: the L2
    /// tables of the guest ranges in `data` (those the copy may write) and
    /// the refcount blocks for the file they make, all before the first
    /// data cluster. A copy writing in guest order then only appends data
    /// clusters past the file's end, each written once, and rewrites
    /// nothing past it: what a target uploaded while it is written needs.
    pub fn reserve_for_copy(&self, data: &[(u64, u64)]) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.exclusive(|m, st| m.reserve_for_copy(st, data))
    }

    /// Changes the guest size. Growing maps the new space as `prealloc`
    /// says; shrinking frees every cluster past the new end.
    pub fn resize(&self, new_size: u64, prealloc: Preallocation) -> Result<()> {
        admin::resize(self, new_size, prealloc)
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
        admin::snapshot_create_with(self, template)
    }

    /// Deletes the snapshot with this id (or, failing that, this name).
    pub fn snapshot_delete(&self, id_or_name: &str) -> Result<()> {
        admin::snapshot_delete(self, id_or_name)
    }

    /// Reverts the active layer to the snapshot with this id (or name).
    /// Refused while the image has persistent bitmaps, as QEMU's
    /// `bdrv_snapshot_goto` refuses it (they would no longer describe the
    /// disk).
    pub fn snapshot_apply(&self, id_or_name: &str) -> Result<()> {
        admin::snapshot_apply(self, id_or_name)
    }

    /// Records a different backing file (or none) in the header. The data
    /// is not touched: this is `rebase -u`. The backing image attached to
    /// this handle stays until the image is reopened.
    pub fn set_backing_file(&self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        admin::set_backing_file(self, name, format)
    }

    /// Drops every cluster of the active layer: the image then reads as its
    /// backing file (or zeros). Used by commit.
    pub fn make_empty(&self) -> Result<()> {
        admin::make_empty(self)
    }

    /// Flushes everything, clears the dirty bit and closes the image.
    pub fn close(self) -> Result<()> {
        self.close_inner(true)
    }

    /// What closing writes, with the image kept (QEMU's inactivation, which
    /// qemu-img runs before closing to learn whether it worked): bitmaps
    /// stored, caches written, the dirty bit cleared. Nothing may be
    /// written after it succeeded. When the bitmaps could not be stored
    /// ([`Error::BitmapsLost`]), the close tries again.
    pub fn inactivate(&self) -> Result<()> {
        self.close_inner(false)
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
            let ext = m.crypto_extension().expect("LUKS images have the extension");
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

    /// The backing image, when the image has one and it was opened.
    pub fn backing(&self) -> Option<&Arc<crate::image::Image>> {
        self.backing.as_ref()
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

    /// The persistent bitmaps as the directory on disk lists them.
    pub fn bitmaps(&self) -> Vec<BitmapInfo> {
        self.lock_meta().bitmaps_on_disk()
    }

    /// Bitmap `name` over `[offset, offset + len)` as runs of `(length,
    /// dirty)` (for NBD's `qemu:dirty-bitmap:` context). A read-only image
    /// loads the bitmap once and keeps it.
    pub fn bitmap_extents(&self, name: &str, offset: u64, len: u64) -> Result<Vec<(u64, bool)>> {
        self.lock_meta().bitmap_extents(self.storage_ref(), name, offset, len)
    }

    /// The bitmaps as this handle has them (added ones included, removed
    /// ones gone; `in_use` means inconsistent, `auto` enabled), in creation
    /// order. [`bitmaps`](Self::bitmaps) lists what is on disk, as `info`.
    pub fn open_bitmaps(&self) -> Vec<BitmapInfo> {
        self.lock_meta().bitmaps_in_session()
    }

    /// Whether the image has persistent bitmaps (consistent or not).
    pub fn has_bitmaps(&self) -> bool {
        self.lock_meta().has_bitmaps()
    }

    /// The bits of bitmap `name` as they are now (an inconsistent bitmap is
    /// refused with QEMU's message).
    pub fn bitmap_contents(&self, name: &str) -> Result<DirtyBitmap> {
        self.lock_meta().bitmap_contents(self.storage_ref(), name)
    }

    /// The granularity QEMU gives a bitmap when none is asked for
    /// (`bdrv_get_default_bitmap_granularity`): the cluster size, at least 4 KiB.
    pub fn default_bitmap_granularity(&self) -> u64 {
        self.geometry().cluster_size().max(4096)
    }

    /// Adds an empty persistent bitmap, stored when the image is closed
    /// (QEMU's `block-dirty-bitmap-add` with `persistent`), with QEMU's checks
    /// and messages. `granularity` must be a power of two of at least 512.
    pub fn bitmap_add(&self, name: &str, granularity: Option<u64>, enabled: bool) -> Result<()> {
        let granularity = granularity.unwrap_or_else(|| self.default_bitmap_granularity());
        if granularity < 512 || !granularity.is_power_of_two() || granularity > u64::from(u32::MAX) {
            return Err(Error::InvalidArgument("Granularity must be power of 2 and at least 512".into()));
        }
        self.bitmap_op(|m, _| m.add_bitmap(name, granularity, enabled))
    }

    /// Removes a bitmap from the image at once.
    pub fn bitmap_remove(&self, name: &str) -> Result<()> {
        self.bitmap_op(|m, st| m.remove_bitmap(st, name))
    }

    /// Clears every bit of a bitmap.
    pub fn bitmap_clear(&self, name: &str) -> Result<()> {
        self.bitmap_op(|m, _| {
            m.with_usable_bitmap(name, |l| {
                if let Some(d) = &mut l.data {
                    d.clear();
                }
            })
        })
    }

    /// Makes a bitmap record writes (or stop recording them).
    pub fn bitmap_set_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        self.bitmap_op(|m, _| m.with_usable_bitmap(name, |l| l.enabled = enabled))
    }

    /// Sets in bitmap `name` every bit set in `source` (QEMU's
    /// `block-dirty-bitmap-merge`; the sizes must agree).
    pub fn bitmap_merge(&self, name: &str, source: &DirtyBitmap) -> Result<()> {
        if source.len() != self.len() {
            return Err(Error::InvalidArgument("Bitmaps are incompatible and can't be merged".into()));
        }
        self.bitmap_op(|m, _| {
            m.with_usable_bitmap(name, |l| {
                if let Some(d) = &mut l.data {
                    d.merge(source);
                }
            })
        })
    }

    /// Changes the image's options as `qemu-img amend` does. `progress`
    /// receives QEMU's amend status: (work done, total work), which
    /// qemu-img prints as `100 * done / total` percent.
    pub fn amend(&self, opts: &AmendOptions, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
        admin::amend(self, opts, progress)
    }

    /// Checks the image's consistency, repairing what `repair` allows. The
    /// report keeps the first [`crate::MAX_KEPT_MESSAGES`] message lines.
    pub fn check(&self, repair: Option<RepairMode>) -> Result<CheckReport> {
        meta::check::collected(|out| self.check_with(repair, out))
    }

    /// [`Qcow2::check`], handing each message line to `out` as it is found
    /// (QEMU prints them on stderr as it goes); the report keeps none.
    pub fn check_with(&self, repair: Option<RepairMode>, out: &mut dyn FnMut(&str)) -> Result<CheckReport> {
        if repair.is_some() && self.is_read_only() {
            return Err(Error::ReadOnly);
        }
        self.exclusive(|m, st| meta::check::check(m, st, repair, out))
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        let _ = self.close_inner(true);
    }
}
