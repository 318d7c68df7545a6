//! Opening a qcow2 image: the header, the tables, the caches sized from
//! the options, the encryption, the repair of a dirty image, the bitmaps;
//! and describing an image from its header alone (`inspect`).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use oxqcow_format::header::{autoclear, peek_cluster_bits, Header};
use oxqcow_format::snapshot::SnapshotTable;
use oxqcow_format::table::decode_entries;
use oxqcow_format::Geometry;

use super::meta::cache::TableCache;
use super::meta::refcount::Refcounts;
use super::meta::{overlap, DiscardModes, Meta};
use super::{Qcow2, Qcow2Info, DEFAULT_L2_CACHE_MAX, MIN_L2_CACHE_TABLES, MIN_REFCOUNT_CACHE_TABLES};
use crate::error::{Error, Result};
use crate::options::{ImageMessage, OpenOptions};
use crate::storage::Storage;

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
        data_file: data_file.map(|storage| crate::image::data_file::DataFile { storage, raw: data_file_raw, discard }),
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

/// Reads what `info` reports from the header and the snapshot table
/// alone, without opening the image: this works for images whose
/// features this engine cannot read or write yet (backing files,
/// external data files, extended L2 entries, encryption).
pub(super) fn inspect(storage: &dyn Storage) -> Result<(Qcow2Info, Vec<oxqcow_format::SnapshotEntry>)> {
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

pub(super) fn cache_tables(opts: &OpenOptions, geometry: &Geometry, size: u64) -> Result<(usize, usize)> {
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
pub(super) const SECTOR_SIZE: u64 = 512;

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
pub(super) fn read_snapshots(storage: &dyn Storage, header: &Header, file_len: u64) -> Result<SnapshotTable> {
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
