//! Persistent dirty bitmaps of a qcow2 image, with QEMU's semantics
//! (`block/qcow2-bitmap.c`).
//!
//! The image's bitmaps are loaded at open. Opened read-write, every
//! consistent bitmap is marked in use on disk before anything else is
//! written (the directory is rewritten in place with the bitmaps autoclear
//! bit dropped around the rewrite, so a crash in between leaves an extension
//! that later opens discard rather than a half-written directory). Enabled
//! bitmaps then record every guest write, zero write and discard in memory
//! ([`DirtyBitmap`]); only a clean close stores them: new data clusters and
//! tables, a new directory, the header switched to it after everything it
//! names is durable, then the old clusters freed. A crash while the image
//! is open leaves the in-use flags set, and such bitmaps are inconsistent:
//! listed, removable, never used or stored again.

use oxqcow_format::bitmap::{
    check_new_bitmap, dir_entry_size, parse_directory, serialize_directory, table_entries, BitmapDirEntry,
    BitmapTableEntry, FLAG_AUTO, FLAG_IN_USE,
};
use oxqcow_format::header::{autoclear, BitmapsExtension, Header};
use oxqcow_format::limits::{MAX_BITMAPS, MAX_BITMAP_DIRECTORY_BYTES};
use oxqcow_format::table::{decode_entries, encode_entries};
use oxqcow_format::{FormatError, HostCluster, HostOffset};

use crate::dirty::DirtyBitmap;
use crate::error::{Error, Result};
use crate::qcow2::meta::overlap;
use crate::qcow2::meta::Meta;
use crate::storage::Storage;

/// A bitmap as `info` lists it (from the directory on disk).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapInfo {
    /// The name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// The in-use flag: the bitmap is open for writing, or was when the
    /// image was not closed cleanly (then it is inconsistent).
    pub in_use: bool,
    /// The auto flag: the bitmap records writes.
    pub auto: bool,
}

impl From<&BitmapDirEntry> for BitmapInfo {
    fn from(e: &BitmapDirEntry) -> Self {
        BitmapInfo { name: e.name.clone(), granularity: 1 << e.granularity_bits, in_use: e.in_use(), auto: e.auto() }
    }
}

/// One bitmap of the open image (QEMU's `BdrvDirtyBitmap` of a persistent bitmap).
#[derive(Clone, Debug)]
pub(crate) struct Live {
    pub(crate) name: String,
    pub(crate) granularity_bits: u8,
    pub(crate) enabled: bool,
    /// Found in use at open: its stored data is stale and unusable.
    pub(crate) inconsistent: bool,
    /// The bits; `None` until loaded (read-only opens load on demand) and
    /// for inconsistent bitmaps.
    pub(crate) data: Option<DirtyBitmap>,
}

/// The bitmaps of an open image.
#[derive(Clone, Debug, Default)]
pub(crate) struct Bitmaps {
    /// The directory as it is on disk.
    pub(crate) dir: Vec<BitmapDirEntry>,
    /// The bitmaps in creation order (loaded ones first, in directory order).
    pub(crate) live: Vec<Live>,
}

/// QEMU's message for a bitmap that was found in use.
pub(crate) fn inconsistent_error(name: &str) -> Error {
    Error::InvalidArgument(format!(
        "Bitmap '{name}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk"
    ))
}

fn past_eof(table: &'static str, offset: u64, length: u64, file_len: u64) -> Error {
    Error::Format(FormatError::TablePastEof { table, offset, length, file_len })
}

/// Reads and parses the bitmap directory the header names (none: empty).
/// What runs past the end of the file reads as zeros, as QEMU reads it
/// (its first entry there fails the entry checks); only what lies inside
/// the file is read into memory.
pub(crate) fn read_directory(storage: &dyn Storage, header: &Header, file_len: u64) -> Result<Vec<BitmapDirEntry>> {
    let Some(ext) = &header.extensions.bitmaps else { return Ok(Vec::new()) };
    let (offset, size) = (ext.directory_offset, ext.directory_size);
    if size > MAX_BITMAP_DIRECTORY_BYTES {
        return Err(Error::Format(FormatError::Bitmap("Requested bitmap directory size is too big".into())));
    }
    if offset.checked_add(size).is_none_or(|end| end > oxqcow_format::limits::MAX_REQUEST_END) {
        return Err(past_eof("Bitmap directory", offset, size, file_len));
    }
    let mut buf = vec![0u8; file_len.saturating_sub(offset).min(size) as usize];
    storage.read_at(&mut buf, offset).map_err(Error::io("reading the bitmap directory", offset))?;
    Ok(parse_directory(&buf, size, ext.nb_bitmaps, header.cluster_size(), header.size)?)
}

/// Refuses bitmap tables that share clusters. Besides being corrupt, a
/// shared table would let a small file make us load the same large table
/// for every bitmap: with disjoint tables (each checked to lie inside the
/// file), what loading allocates is bounded by the file's size.
fn check_tables_disjoint(dir: &[BitmapDirEntry], cluster_size: u64) -> Result<()> {
    let mut spans: Vec<(u64, u64, &str)> = dir
        .iter()
        .filter(|e| !e.in_use())
        .map(|e| {
            let clusters = (u64::from(e.table_size) * 8).div_ceil(cluster_size);
            (e.table_offset / cluster_size, clusters, e.name.as_str())
        })
        .collect();
    spans.sort();
    for pair in spans.windows(2) {
        if pair[0].0 + pair[0].1 > pair[1].0 {
            return Err(Error::Corrupt(format!(
                "Bitmap '{}': its table at 0x{:x} overlaps the table of bitmap '{}'",
                pair[1].2,
                pair[1].0 * cluster_size,
                pair[0].2
            )));
        }
    }
    Ok(())
}

impl Meta {
    /// Reads a bitmap table, checking its place and every entry.
    pub(crate) fn read_bitmap_table(&self, storage: &dyn Storage, e: &BitmapDirEntry) -> Result<Vec<BitmapTableEntry>> {
        let cs = self.geometry.cluster_size();
        let file_len = self.file_len(storage)?;
        let bytes = u64::from(e.table_size) * 8;
        if e.table_offset.checked_add(bytes).is_none_or(|end| end > file_len) {
            return Err(past_eof("Bitmap table", e.table_offset, bytes, file_len));
        }
        let mut buf = vec![0u8; bytes as usize];
        storage.read_at(&mut buf, e.table_offset).map_err(Error::io("reading a bitmap table", e.table_offset))?;
        let mut out = Vec::with_capacity(e.table_size as usize);
        for raw in decode_entries(&buf) {
            let entry = BitmapTableEntry::parse(raw, cs)?;
            if let BitmapTableEntry::Data(at) = entry {
                if at + cs > file_len {
                    return Err(past_eof("Bitmap data cluster", at, cs, file_len));
                }
            }
            out.push(entry);
        }
        Ok(out)
    }

    fn file_len(&self, storage: &dyn Storage) -> Result<u64> {
        storage.len().map_err(Error::io("reading the file length", 0))
    }

    /// Loads the bits of a consistent bitmap (QEMU's `load_bitmap`).
    pub(crate) fn load_bitmap_data(&self, storage: &dyn Storage, e: &BitmapDirEntry) -> Result<DirtyBitmap> {
        let cs = self.geometry.cluster_size();
        let cannot = |why: &str| Error::Corrupt(format!("Could not read bitmap '{}' from image: {why}", e.name));
        let mut bm = DirtyBitmap::new(self.header.size, e.granularity_bits, cs);
        if u64::from(e.table_size) != table_entries(self.header.size, e.granularity_bits, cs) {
            return Err(cannot("Invalid argument"));
        }
        let table = self.read_bitmap_table(storage, e).map_err(|err| {
            Error::Corrupt(format!("Could not read bitmap_table table from image for bitmap '{}': {err}", e.name))
        })?;
        let mut buf = vec![0u8; cs as usize];
        for (i, entry) in table.into_iter().enumerate() {
            match entry {
                BitmapTableEntry::Zeros => {}
                BitmapTableEntry::Ones => bm.set_chunk_ones(i),
                BitmapTableEntry::Data(at) => {
                    if let Some(t) = self.refcounts.overlap(at, cs, 0) {
                        return Err(cannot(&format!(
                            "its data cluster at 0x{at:x} overlaps {}",
                            overlap::template_name(t)
                        )));
                    }
                    storage.read_at(&mut buf, at).map_err(Error::io("reading bitmap data", at))?;
                    bm.set_chunk_bytes(i, &buf);
                }
            }
        }
        Ok(bm)
    }

    /// Loads the directory at open; opened for writing, loads every
    /// consistent bitmap and marks it in use on disk (QEMU's
    /// `qcow2_load_dirty_bitmaps`).
    pub(crate) fn load_bitmaps(&mut self, storage: &dyn Storage, writable: bool) -> Result<()> {
        let file_len = self.file_len(storage)?;
        let dir = read_directory(storage, &self.header, file_len)?;
        if writable {
            check_tables_disjoint(&dir, self.geometry.cluster_size())?;
        }
        let mut live = Vec::with_capacity(dir.len());
        for e in &dir {
            let data = if writable && !e.in_use() {
                if let Some(t) = self.refcounts.overlap(e.table_offset, u64::from(e.table_size) * 8, 0) {
                    return Err(Error::Corrupt(format!(
                        "Bitmap '{}': its table at 0x{:x} overlaps {}",
                        e.name,
                        e.table_offset,
                        overlap::template_name(t)
                    )));
                }
                Some(self.load_bitmap_data(storage, e)?)
            } else {
                None
            };
            live.push(Live {
                name: e.name.clone(),
                granularity_bits: e.granularity_bits,
                enabled: e.auto(),
                inconsistent: e.in_use(),
                data,
            });
        }
        self.bitmaps = Bitmaps { dir, live };
        if writable && self.bitmaps.dir.iter().any(|e| !e.in_use()) {
            let mut dir = self.bitmaps.dir.clone();
            dir.iter_mut().for_each(|e| e.flags |= FLAG_IN_USE);
            self.rewrite_directory_in_place(storage, dir)?;
        }
        Ok(())
    }

    /// Rewrites the directory where it is (only flags change), with the
    /// autoclear bit dropped around the rewrite (QEMU's
    /// `update_ext_header_and_dir_in_place`).
    fn rewrite_directory_in_place(&mut self, storage: &dyn Storage, dir: Vec<BitmapDirEntry>) -> Result<()> {
        let ext = self.header.extensions.bitmaps.expect("a directory to rewrite");
        let bytes = serialize_directory(&dir, self.geometry.cluster_size(), self.header.size)?;
        if bytes.len() as u64 != ext.directory_size {
            return Err(Error::Corrupt(format!(
                "the bitmap directory cannot be rewritten in place ({} bytes, {} on disk)",
                bytes.len(),
                ext.directory_size
            )));
        }
        self.header.autoclear_features &= !autoclear::BITMAPS;
        self.write_header(storage)?;
        storage.sync().map_err(Error::io("syncing the header", 0))?;
        self.refcounts.check_write(ext.directory_offset, ext.directory_size, overlap::BITMAP_DIRECTORY)?;
        storage
            .write_at(&bytes, ext.directory_offset)
            .map_err(Error::io("writing the bitmap directory", ext.directory_offset))?;
        storage.sync().map_err(Error::io("syncing the bitmap directory", ext.directory_offset))?;
        self.header.autoclear_features |= autoclear::BITMAPS;
        self.write_header(storage)?;
        storage.sync().map_err(Error::io("syncing the header", 0))?;
        self.bitmaps.dir = dir;
        Ok(())
    }

    /// Writes `dir` as a new directory and switches the header to it once
    /// everything it names is durable, then frees the old directory (QEMU's
    /// `update_ext_header_and_dir`). An empty list drops the extension.
    fn replace_directory(&mut self, storage: &dyn Storage, dir: Vec<BitmapDirEntry>) -> Result<()> {
        let g = self.geometry;
        let new_ext = if dir.is_empty() {
            None
        } else {
            let bytes = serialize_directory(&dir, g.cluster_size(), self.header.size)?;
            let offset = self.alloc_clusters(storage, g.clusters_for(bytes.len() as u64))?;
            self.refcounts.check_write(offset, bytes.len() as u64, 0)?;
            storage.write_at(&bytes, offset).map_err(Error::io("writing the bitmap directory", offset))?;
            Some(BitmapsExtension {
                nb_bitmaps: dir.len() as u32,
                directory_size: bytes.len() as u64,
                directory_offset: offset,
            })
        };
        // Data, tables, directory and their refcounts before the header.
        self.flush_all(storage)?;
        let old = self.header.extensions.bitmaps;
        self.header.extensions.bitmaps = new_ext;
        if new_ext.is_some() {
            self.header.autoclear_features |= autoclear::BITMAPS;
        } else {
            self.header.autoclear_features &= !autoclear::BITMAPS;
        }
        self.write_header(storage)?;
        storage.sync().map_err(Error::io("syncing the header", 0))?;
        self.bitmaps.dir = dir;
        self.update_reserved();
        if let Some(old) = old {
            self.free_clusters_now(storage, old.directory_offset, old.directory_size)?;
        }
        Ok(())
    }

    /// Drops one reference on every cluster of `[offset, offset + len)`:
    /// for structures no durable metadata names any more.
    fn free_clusters_now(&mut self, storage: &dyn Storage, offset: u64, len: u64) -> Result<()> {
        let g = self.geometry;
        let first = g.host_cluster(HostOffset(offset)).0;
        for c in first..first + g.clusters_for(len) {
            self.refcounts.update(storage, HostCluster(c), -1)?;
        }
        Ok(())
    }

    /// Frees a stored bitmap's data clusters and table (QEMU's
    /// `free_bitmap_clusters`); a table that cannot be read is left alone
    /// (its clusters leak, as in QEMU).
    fn free_bitmap_clusters(&mut self, storage: &dyn Storage, e: &BitmapDirEntry) -> Result<()> {
        let Ok(table) = self.read_bitmap_table(storage, e) else { return Ok(()) };
        let cs = self.geometry.cluster_size();
        for entry in table {
            if let BitmapTableEntry::Data(at) = entry {
                if self.refcounts.update(storage, self.geometry.host_cluster(HostOffset(at)), -1)? == 0 {
                    storage.punch_hole(at, cs).map_err(Error::io("discarding a host cluster", at))?;
                }
            }
        }
        self.free_clusters_now(storage, e.table_offset, u64::from(e.table_size) * 8)
    }

    /// Writes a bitmap's data clusters and table; returns the table's place
    /// and size (QEMU's `store_bitmap`). On failure every cluster it took
    /// is given back, and a host write that failed is worded as QEMU words
    /// it ("Failed to write bitmap 'NAME' to file: REASON").
    fn store_bitmap_data(&mut self, storage: &dyn Storage, name: &str, bm: &DirtyBitmap) -> Result<(u64, u32)> {
        let cs = self.geometry.cluster_size();
        let mut table = vec![0u64; bm.chunk_count()];
        let written = self.write_bitmap_clusters(storage, name, bm, &mut table);
        if let Err(e) = written {
            for &at in table.iter().filter(|&&at| at != 0) {
                self.refcounts.update(storage, self.geometry.host_cluster(HostOffset(at)), -1)?;
            }
            return Err(e);
        }
        let bytes = encode_entries(&table);
        let clusters = self.geometry.clusters_for(bytes.len() as u64);
        let at = self.alloc_clusters(storage, clusters)?;
        let stored = self
            .refcounts
            .check_write(at, bytes.len() as u64, 0)
            .and_then(|()| storage.write_at(&bytes, at).map_err(|e| write_failed(name, &e)));
        if let Err(e) = stored {
            self.free_clusters_now(storage, at, clusters * cs)?;
            for entry in table.iter().filter(|&&e| e != 0) {
                self.refcounts.update(storage, self.geometry.host_cluster(HostOffset(*entry)), -1)?;
            }
            return Err(e);
        }
        Ok((at, table.len() as u32))
    }

    /// Writes the data clusters of a bitmap's set chunks, recording each
    /// in `table` as soon as it is allocated (so that a failure can give
    /// back exactly what was taken).
    fn write_bitmap_clusters(
        &mut self,
        storage: &dyn Storage,
        name: &str,
        bm: &DirtyBitmap,
        table: &mut [u64],
    ) -> Result<()> {
        let cs = self.geometry.cluster_size();
        for (i, slot) in table.iter_mut().enumerate() {
            if let Some(bytes) = bm.chunk_bytes(i, cs as usize) {
                let at = self.alloc_clusters(storage, 1)?;
                *slot = BitmapTableEntry::Data(at).raw();
                self.refcounts.check_write(at, cs, 0)?;
                storage.write_at(&bytes, at).map_err(|e| write_failed(name, &e))?;
            }
        }
        Ok(())
    }

    /// Stores every consistent bitmap and clears their in-use flags (QEMU's
    /// `qcow2_store_persistent_dirty_bitmaps`, run at close). When that
    /// fails, the clusters taken for it are given back, the bitmaps stay
    /// in use on disk and in memory (a later close tries again, as QEMU's
    /// does), and the error is [`Error::BitmapsLost`].
    pub(crate) fn store_bitmaps(&mut self, storage: &dyn Storage) -> Result<()> {
        let mut stored = Vec::new();
        let result = self.try_store_bitmaps(storage, &mut stored);
        if let Err(e) = result {
            for e in &stored {
                self.free_bitmap_clusters(storage, e)?;
            }
            return Err(match e {
                Error::BitmapsLost(m) => Error::BitmapsLost(m),
                other => Error::BitmapsLost(other.to_string()),
            });
        }
        Ok(())
    }

    /// [`Meta::store_bitmaps`]'s work; `stored` receives the entries whose
    /// clusters were written, for the caller to give back on failure.
    fn try_store_bitmaps(&mut self, storage: &dyn Storage, stored: &mut Vec<BitmapDirEntry>) -> Result<()> {
        let cs = self.geometry.cluster_size();
        let size = self.header.size;
        let mut dir = self.bitmaps.dir.clone();
        let mut dropped = Vec::new();
        let mut need_write = false;
        let mut dir_bytes: u64 = dir.iter().map(BitmapDirEntry::size).sum();
        // QEMU walks its bitmap list newest first; new bitmaps are appended
        // to the directory in that order.
        for live in self.bitmaps.live.iter().rev() {
            if live.inconsistent {
                continue;
            }
            need_write = true;
            check_new_bitmap(&live.name, 1 << live.granularity_bits, cs, size).map_err(|why| {
                Error::InvalidArgument(format!("Bitmap '{}' doesn't satisfy the constraints: {why}", live.name))
            })?;
            let flags = if live.enabled { FLAG_AUTO } else { 0 };
            match dir.iter_mut().find(|e| e.name == live.name) {
                Some(e) => {
                    if !e.in_use() {
                        return Err(Error::InvalidArgument(format!(
                            "Bitmap '{}' already exists in the image",
                            live.name
                        )));
                    }
                    dropped.push(e.clone());
                    e.flags = flags;
                    e.granularity_bits = live.granularity_bits;
                }
                None => {
                    if dir.len() >= MAX_BITMAPS as usize {
                        return Err(Error::InvalidArgument("Too many persistent bitmaps".into()));
                    }
                    dir_bytes += dir_entry_size(live.name.len(), 0);
                    if dir_bytes > MAX_BITMAP_DIRECTORY_BYTES {
                        return Err(Error::InvalidArgument("Bitmap directory is too large".into()));
                    }
                    dir.push(BitmapDirEntry {
                        table_offset: 0,
                        table_size: 0,
                        flags,
                        granularity_bits: live.granularity_bits,
                        name: live.name.clone(),
                    });
                }
            }
        }
        if !need_write {
            return Ok(());
        }
        for e in dir.iter_mut() {
            let Some(live) = self.bitmaps.live.iter().find(|l| l.name == e.name && !l.inconsistent) else {
                continue;
            };
            let data = match &live.data {
                Some(d) => d.clone(),
                None => DirtyBitmap::new(size, live.granularity_bits, cs),
            };
            let name = live.name.clone();
            let (offset, entries) = self.store_bitmap_data(storage, &name, &data)?;
            e.table_offset = offset;
            e.table_size = entries;
            stored.push(e.clone());
        }
        self.replace_directory(storage, dir)
            .map_err(|e| Error::BitmapsLost(format!("Failed to update bitmap extension: {}", errno_text(&e))))?;
        stored.clear();
        for old in dropped {
            self.free_bitmap_clusters(storage, &old)?;
        }
        Ok(())
    }

    /// Removes a bitmap from the image now (QEMU's
    /// `qcow2_co_remove_persistent_dirty_bitmap`): the directory without it
    /// is written first, its clusters are freed after.
    pub(crate) fn remove_bitmap(&mut self, storage: &dyn Storage, name: &str) -> Result<()> {
        let Some(i) = self.bitmaps.live.iter().position(|l| l.name == name) else {
            return Err(Error::InvalidArgument(format!("Dirty bitmap '{name}' not found")));
        };
        self.bitmaps.live.remove(i);
        if let Some(j) = self.bitmaps.dir.iter().position(|e| e.name == name) {
            let mut dir = self.bitmaps.dir.clone();
            let old = dir.remove(j);
            self.replace_directory(storage, dir)?;
            self.free_bitmap_clusters(storage, &old)?;
            self.flush_all(storage)?;
        }
        Ok(())
    }

    /// Records a guest write, zero write or discard in every enabled bitmap.
    pub(crate) fn mark_bitmaps(&mut self, offset: u64, len: u64) {
        for l in self.bitmaps.live.iter_mut().filter(|l| l.enabled && !l.inconsistent) {
            if let Some(d) = &mut l.data {
                d.set_range(offset, len);
            }
        }
    }

    /// Whether any bitmap records writes.
    pub(crate) fn bitmaps_tracking(&self) -> bool {
        self.bitmaps.live.iter().any(|l| l.enabled && !l.inconsistent && l.data.is_some())
    }

    /// The bits of a bitmap, loading them if needed.
    pub(crate) fn bitmap_contents(&self, storage: &dyn Storage, name: &str) -> Result<DirtyBitmap> {
        let live = self
            .bitmaps
            .live
            .iter()
            .find(|l| l.name == name)
            .ok_or_else(|| Error::InvalidArgument(format!("Dirty bitmap '{name}' not found")))?;
        if live.inconsistent {
            return Err(inconsistent_error(name));
        }
        if let Some(d) = &live.data {
            return Ok(d.clone());
        }
        let e = self.bitmaps.dir.iter().find(|e| e.name == name).expect("a loaded bitmap is in the directory");
        self.load_bitmap_data(storage, e)
    }

    /// Resizes every bitmap with the disk (QEMU 10 resizes persistent
    /// bitmaps in memory and stores them at their new size at close).
    pub(crate) fn resize_bitmaps(&mut self, new_size: u64) {
        let cs = self.geometry.cluster_size();
        for l in &mut self.bitmaps.live {
            if let Some(d) = &mut l.data {
                d.resize(new_size, cs);
            }
        }
    }

    /// QEMU's `qcow2_truncate_bitmaps_check`: a resize is refused while an
    /// inconsistent bitmap is present.
    pub(crate) fn check_bitmaps_resizable(&self) -> Result<()> {
        match self.bitmaps.live.iter().find(|l| l.inconsistent) {
            Some(l) => Err(inconsistent_error(&l.name)),
            None => Ok(()),
        }
    }
}

impl Meta {
    /// The persistent bitmaps as the directory on disk lists them.
    pub(crate) fn bitmaps_on_disk(&self) -> Vec<BitmapInfo> {
        self.bitmaps.dir.iter().map(Into::into).collect()
    }

    /// Bitmap `name` over `[offset, offset + len)` as runs of `(length,
    /// dirty)`; a bitmap not loaded yet (read-only images) is loaded once.
    pub(crate) fn bitmap_extents(
        &mut self,
        st: &dyn Storage,
        name: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, bool)>> {
        let i = self
            .bitmaps
            .live
            .iter()
            .position(|l| l.name == name)
            .ok_or_else(|| Error::InvalidArgument(format!("Dirty bitmap '{name}' not found")))?;
        if self.bitmaps.live[i].inconsistent {
            return Err(inconsistent_error(name));
        }
        if self.bitmaps.live[i].data.is_none() {
            let loaded = self.bitmap_contents(st, name)?;
            self.bitmaps.live[i].data = Some(loaded);
        }
        Ok(self.bitmaps.live[i].data.as_ref().expect("loaded above").extents(offset, len))
    }

    /// The bitmaps as this session has them, in creation order.
    pub(crate) fn bitmaps_in_session(&self) -> Vec<BitmapInfo> {
        self.bitmaps
            .live
            .iter()
            .map(|l| BitmapInfo {
                name: l.name.clone(),
                granularity: 1 << l.granularity_bits,
                in_use: l.inconsistent,
                auto: l.enabled,
            })
            .collect()
    }

    /// Whether the image has persistent bitmaps (consistent or not).
    pub(crate) fn has_bitmaps(&self) -> bool {
        !self.bitmaps.live.is_empty()
    }

    /// Adds an empty persistent bitmap (stored at close), with QEMU's checks
    /// and messages.
    pub(crate) fn add_bitmap(&mut self, name: &str, granularity: u64, enabled: bool) -> Result<()> {
        if self.bitmaps.live.iter().any(|l| l.name == name) {
            return Err(Error::InvalidArgument(format!("Bitmap already exists: {name}")));
        }
        let cant = |why: String| {
            Error::InvalidArgument(format!("Can't make bitmap '{name}' persistent in '{}': {why}", NODE_NAME))
        };
        if self.header.version < 3 {
            return Err(cant("Cannot store dirty bitmaps in qcow2 v2 files".into()));
        }
        let cs = self.geometry.cluster_size();
        check_new_bitmap(name, granularity, cs, self.header.size).map_err(cant)?;
        let count = self.bitmaps.live.len() + 1;
        let dir: u64 = self.bitmaps.live.iter().map(|l| dir_entry_size(l.name.len(), 0)).sum::<u64>()
            + dir_entry_size(name.len(), 0);
        if count > MAX_BITMAPS as usize {
            return Err(cant("Maximum number of persistent bitmaps is already reached".into()));
        }
        if dir > MAX_BITMAP_DIRECTORY_BYTES {
            return Err(cant("Not enough space in the bitmap directory".into()));
        }
        let bits = granularity.trailing_zeros() as u8;
        self.bitmaps.live.push(Live {
            name: name.to_string(),
            granularity_bits: bits,
            enabled,
            inconsistent: false,
            data: Some(DirtyBitmap::new(self.header.size, bits, cs)),
        });
        Ok(())
    }

    /// Runs `f` on bitmap `name`, which must exist and be consistent.
    pub(crate) fn with_usable_bitmap(&mut self, name: &str, f: impl FnOnce(&mut Live)) -> Result<()> {
        let live = self
            .bitmaps
            .live
            .iter_mut()
            .find(|l| l.name == name)
            .ok_or_else(|| Error::InvalidArgument(format!("Dirty bitmap '{name}' not found")))?;
        if live.inconsistent {
            return Err(inconsistent_error(name));
        }
        f(live);
        Ok(())
    }
}

/// How QEMU names the node in its messages when qemu-img opened the image
/// without a node name (the number varies there; oxqcow has one node).
pub const NODE_NAME: &str = "#block101";

/// Space copying these bitmaps of a disk of `len` bytes needs in an image
/// with `cluster_size` clusters, as QEMU's
/// `qcow2_get_persistent_dirty_bitmap_size` estimates it: every bitmap
/// fully allocated, its table, and the directory.
pub fn bitmaps_size(bitmaps: &[BitmapInfo], len: u64, cluster_size: u64) -> u64 {
    let mut total = 0;
    let mut dir = 0;
    for b in bitmaps {
        let bytes = oxqcow_format::bitmap::bytes_needed(len, b.granularity.trailing_zeros() as u8);
        let clusters = bytes.div_ceil(cluster_size);
        total += clusters * cluster_size;
        total += (clusters * 8).div_ceil(cluster_size) * cluster_size;
        dir += dir_entry_size(b.name.len(), 0);
    }
    total + dir.div_ceil(cluster_size) * cluster_size
}

/// QEMU's message for a host write of a bitmap that failed.
fn write_failed(name: &str, e: &std::io::Error) -> Error {
    Error::BitmapsLost(format!("Failed to write bitmap '{name}' to file: {}", io_text(e)))
}

/// C's `strerror` text of a host error.
fn io_text(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// The `strerror` text of an engine error, for QEMU's messages that end
/// in one.
fn errno_text(e: &Error) -> String {
    match e {
        Error::Io { source, .. } => io_text(source),
        other => other.to_string(),
    }
}
