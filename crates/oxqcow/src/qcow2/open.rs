//! Opening a qcow2 image: the header, the tables, the caches sized from
//! the options, the encryption, the repair of a dirty image, the bitmaps;
//! and describing an image from its header alone (`inspect`).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use oxqcow_format::header::{autoclear, peek_cluster_bits, Header};

use super::meta::{read_snapshots, SnapshotRead};
use super::meta::{DiscardModes, Meta};
use super::{Qcow2, Qcow2Info};
use crate::error::{Error, Result};
use crate::options::{ImageMessage, OpenOptions};
use crate::storage::{GrowAhead, Storage};

/// Opens a qcow2 image with `backing` as its backing image and
/// `data_file` as the storage of its guest data. An image whose header
/// says its data lives in an external data file needs one; any other
/// image refuses one (QEMU's messages).
pub(super) fn open(
    storage: Arc<dyn Storage>,
    opts: &OpenOptions,
    backing: Option<Arc<crate::image::Image>>,
    data_file: Option<Arc<dyn Storage>>,
) -> Result<Qcow2> {
    // A writable image's file grows ahead of its allocations (see
    // `storage/grow_ahead.rs`).
    let storage: Arc<dyn Storage> = if opts.read_only {
        storage
    } else {
        Arc::new(GrowAhead::new(storage).map_err(Error::io("reading the file length", 0))?)
    };
    let st = &*storage;
    let file_len = st.len().map_err(Error::io("reading the file length", 0))?;
    let header = read_header(st, opts.repair)?;
    // Tables past the end of the file read as zeros, as in QEMU, where
    // nothing will be allocated from them: for check, and read-only.
    let tables_past_eof = opts.repair || opts.read_only;
    header.validate_against_file(file_len, tables_past_eof)?;
    if !opts.repair {
        // Read-only, only the snapshot table's place on the header counts
        // (as a file of unbounded length).
        header.validate_snapshots_against_file(if tables_past_eof { u64::MAX } else { file_len })?;
    }
    let geometry = header.geometry();

    let crypt = crate::crypt::open_image(st, &header, opts)?;
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
        if backing.is_none() && !matches!(opts.backing, crate::options::BackingPolicy::Ignore) {
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

    let dirty_at_open = header.is_dirty();
    let stale_bitmaps = header.extensions.stale_bitmaps.then_some(header.version);
    let (version, size, compression_type) = (header.version, header.size, header.compression_type);
    let discard = DiscardModes {
        request: opts.discard_passthrough,
        snapshot: opts.pass_discard_snapshot.unwrap_or(true),
        other: opts.pass_discard_other,
    };
    let data = data_file.clone().unwrap_or_else(|| storage.clone());
    let data_file = data_file.map(|storage| super::meta::data_file::DataFile { storage, raw: data_file_raw, discard });
    let mut meta = Meta::load(st, header, opts, read_only, backing.is_some(), data_file, file_len)?;
    // QEMU warns while reading the header extensions, before the repair.
    if let (Some(version), Some(sink)) = (stale_bitmaps, &opts.messages) {
        sink(ImageMessage::StaleBitmaps(stale_bitmaps_text(version)));
    }
    let open_repair = if read_only { None } else { meta.prepare_for_writing(st, opts)? };
    meta.load_bitmaps(st, !read_only)?;
    let tracking = AtomicBool::new(!read_only && meta.bitmaps_tracking());
    let meta = Arc::new(Mutex::new(meta));
    super::cleaner::register(&meta, opts.cache_clean_interval.unwrap_or(crate::options::DEFAULT_CACHE_CLEAN_INTERVAL));

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
        meta,
        alloc_done: Condvar::new(),
        detect_zeroes: opts.detect_zeroes,
        dirty_at_open,
        open_repair,
        closed: AtomicBool::new(false),
        tracking,
        stale_bitmaps,
        crypt,
        serialiser: Default::default(),
        cow_budget: Default::default(),
    })
}

/// Reads what `info` reports from the header and the snapshot table
/// alone, without opening the image: this works for images whose
/// features this engine cannot read or write yet (backing files,
/// external data files, extended L2 entries, encryption).
pub(super) fn inspect(storage: &dyn Storage) -> Result<(Qcow2Info, Vec<oxqcow_format::SnapshotEntry>)> {
    let file_len = storage.len().map_err(Error::io("reading the file length", 0))?;
    let header = read_header(storage, false)?;
    // Read-only: tables past the end of the file read as zeros, as in QEMU.
    header.validate_against_file(file_len, true)?;
    header.validate_snapshots_against_file(u64::MAX)?;
    let snapshots =
        read_snapshots(storage, header.snapshots_offset, header.nb_snapshots, file_len, SnapshotRead::Check, None)?;
    let mut info = Qcow2Info::from_header(&header, snapshots.entries.len());
    info.bitmaps =
        crate::qcow2::meta::bitmap::read_directory(storage, &header, file_len)?.iter().map(Into::into).collect();
    if let (oxqcow_format::header::crypt::LUKS, Some(c)) = (header.crypt_method, header.extensions.crypto) {
        info.luks = Some(crate::crypt::read_luks_header(storage, &c)?);
    }
    Ok((info, snapshots.entries))
}

/// QEMU's `BDRV_SECTOR_SIZE`: the unit its block layer sizes disks in.
pub(super) const SECTOR_SIZE: u64 = 512;

/// Reads the header cluster of an image, with the guest size as QEMU sees
/// it: in whole sectors. QEMU validates the size the header records, then
/// counts the disk in 512-byte sectors rounded down (`total_sectors`), so
/// a tail of less than a sector is not part of the disk: not readable, not
/// reported, not exported, and what QEMU writes back when it rewrites the
/// header. Rounding here gives every user of the header that one view.
/// `for_check` leaves the snapshot table pointer to the check
/// ([`Header::parse_for_check`]).
pub(crate) fn read_header(storage: &dyn Storage, for_check: bool) -> Result<Header> {
    let mut prefix = [0u8; 512];
    storage.read_at(&mut prefix, 0).map_err(Error::io("reading the qcow2 header", 0))?;
    let cluster_bits = peek_cluster_bits(&prefix)?;
    let mut cluster0 = vec![0u8; 1 << cluster_bits];
    storage.read_at(&mut cluster0, 0).map_err(Error::io("reading the qcow2 header", 0))?;
    let mut header = if for_check { Header::parse_for_check(&cluster0)? } else { Header::parse(&cluster0)? };
    header.size -= header.size % SECTOR_SIZE;
    Ok(header)
}

impl Qcow2Info {
    pub(super) fn from_header(h: &Header, snapshots: usize) -> Qcow2Info {
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
pub(super) fn stale_bitmaps_text(version: u32) -> &'static str {
    if version < 3 {
        "This qcow2 v2 image contains bitmaps, but they may have been modified by a program without persistent bitmap support; so now they must all be considered inconsistent"
    } else {
        "a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent"
    }
}
