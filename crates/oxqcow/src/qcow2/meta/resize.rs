//! Creating qcow2 images, growing and shrinking them, and preallocation.
//!
//! Creation follows QEMU's `qcow2_co_create` so that a new image has the
//! same layout as one qemu-img makes: header in cluster 0, a one-cluster
//! refcount table in cluster 1, one refcount block in cluster 2, then the L1
//! table allocated by the same resize path that grows images later.

use std::sync::Arc;

use oxqcow_format::header::{compat, incompat, Header};
use oxqcow_format::limits::MAX_L1_BYTES;
use oxqcow_format::table::{encode_entries, L1Entry};
use oxqcow_format::{Geometry, GuestOffset, HostCluster, HostOffset, L2Entry, L2Mapping};

use crate::error::{Error, Result};
use crate::options::{Compat, CompressionType, CreateOptions, OpenOptions, Preallocation};
use crate::qcow2::meta::{DiscardModes, FreeReason, Meta};
use crate::qcow2::Qcow2;
use crate::storage::{empty, Storage};

/// Checks creation options as QEMU's `qcow2_co_create` does, in its order
/// and with its messages; then refuses, naming them, the valid options this
/// engine does not implement yet.
pub(crate) fn validate_create(opts: &CreateOptions) -> Result<Geometry> {
    let invalid = |msg: &str| Err(Error::InvalidArgument(msg.to_string()));
    let v2 = opts.compat == Compat::V2;
    if opts.extended_l2 && v2 {
        return invalid(
            "Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)",
        );
    }
    let cs = opts.cluster_size;
    if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
        return invalid("Cluster size must be a power of two between 512 and 2048k");
    }
    if opts.extended_l2 && cs < 512 * u64::from(oxqcow_format::limits::SUBCLUSTERS_PER_CLUSTER) {
        return invalid("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes");
    }
    // With extended L2 entries preallocated clusters have no allocated
    // subclusters, so they still read from the backing file.
    if opts.backing_file.is_some() && opts.preallocation != Preallocation::Off && !opts.extended_l2 {
        return invalid("Backing file and preallocation can only be used at the same time if extended_l2 is on");
    }
    if opts.backing_format.is_some() && opts.backing_file.is_none() {
        return invalid("Backing format cannot be used without backing file");
    }
    if opts.lazy_refcounts && v2 {
        return invalid(
            "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)",
        );
    }
    if opts.refcount_bits > 64 || !opts.refcount_bits.is_power_of_two() {
        return invalid("Refcount width must be a power of two and may not exceed 64 bits");
    }
    if v2 && opts.refcount_bits != 16 {
        return invalid(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)",
        );
    }
    if opts.data_file_raw && opts.data_file.is_none() {
        return invalid("data-file-raw requires data-file");
    }
    if opts.data_file_raw && opts.backing_file.is_some() {
        return invalid("Backing file and data-file-raw cannot be used at the same time");
    }
    if opts.data_file.is_some() && v2 {
        return invalid(
            "External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)",
        );
    }
    if v2 && opts.compression_type != CompressionType::Zlib {
        return invalid(
            "Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)",
        );
    }
    if opts.backing_file.is_some() {
        if opts.backing_format.is_none() {
            return Err(Error::InvalidArgument("Backing file specified without backing format".into()));
        }
        if opts.preallocation != Preallocation::Off && !opts.extended_l2 {
            return Err(Error::InvalidArgument(
                "Backing file and preallocation can only be used at the same time if extended_l2 is on".into(),
            ));
        }
        if opts.backing_file.as_deref().is_some_and(|n| n.len() > oxqcow_format::limits::MAX_BACKING_NAME as usize) {
            return Err(Error::InvalidArgument("Backing file name too long".into()));
        }
    } else if opts.backing_format.is_some() {
        return Err(Error::InvalidArgument("backing_fmt requires backing_file".into()));
    }
    let order = opts.refcount_bits.trailing_zeros();
    Ok(Geometry::new(cs.trailing_zeros(), order, opts.extended_l2)?)
}

impl crate::options::CreateOptions {
    /// Checks the options as creating a qcow2 image would, with QEMU's
    /// messages, without touching any file.
    pub fn validate(&self) -> Result<()> {
        match self.format {
            crate::options::ImageFormat::Qcow2 => validate_create(self).map(|_| ()),
            crate::options::ImageFormat::Raw => Ok(()),
        }
    }
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
        Self::create_unattached(storage, None, opts)
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
        Self::create_unattached(storage, Some(data), opts)
    }

    /// Creates the image; a backing file name is recorded but not opened.
    pub(crate) fn create_unattached(
        storage: Arc<dyn Storage>,
        data: Option<Arc<dyn Storage>>,
        opts: &CreateOptions,
    ) -> Result<Qcow2> {
        let g = validate_create(opts)?;
        if opts.data_file.is_some() != data.is_some() {
            return Err(Error::InvalidArgument(
                "an image with an external data file needs both its name (data_file) and its storage".into(),
            ));
        }
        let size = opts.size.div_ceil(512) * 512;
        let cs = g.cluster_size();
        let st = &*storage;
        empty(st).map_err(Error::io("truncating the new image", 0))?;
        let mut header = Header::new(opts.compat.version(), g, 0);
        header.refcount_table_offset = cs;
        header.refcount_table_clusters = 1;
        if opts.lazy_refcounts {
            header.compatible_features |= compat::LAZY_REFCOUNTS;
        }
        if opts.compression_type == CompressionType::Zstd {
            header.compression_type = 1;
            header.incompatible_features |= incompat::COMPRESSION;
        }
        if let (Some(name), Some(data)) = (&opts.data_file, &data) {
            if name.len() > oxqcow_format::limits::MAX_BACKING_NAME as usize {
                return Err(Error::InvalidArgument(format!("Data file name too long ({} bytes)", name.len())));
            }
            header.incompatible_features |= incompat::DATA_FILE;
            header.extensions.data_file = Some(name.clone());
            if opts.data_file_raw {
                header.autoclear_features |= oxqcow_format::header::autoclear::DATA_FILE_RAW;
            }
            // As QEMU's file driver creates it: the disk's size, the first
            // block allocated (so that later alignment probes find data).
            empty(&**data).map_err(Error::io("truncating the data file", 0))?;
            data.set_len(size).map_err(Error::io("sizing the data file", size))?;
            let first = vec![0u8; size.min(4096) as usize];
            data.write_at(&first, 0).map_err(Error::io("allocating the first block of the data file", 0))?;
        }
        st.write_at(&header.serialize()?, 0).map_err(Error::io("writing the header", 0))?;
        let mut table = vec![0u8; 2 * cs as usize];
        table[..8].copy_from_slice(&encode_entries(&[2 * cs]));
        st.write_at(&table, cs).map_err(Error::io("writing the refcount table", cs))?;

        let image = Qcow2::open_with(storage.clone(), &OpenOptions::new(), None, data.clone())?;
        image.exclusive(|m, st| {
            for c in 0..3 {
                m.refcounts.update(st, HostCluster(c), 1)?;
            }
            m.resize(st, size, opts.preallocation)?;
            if let Some(name) = &opts.backing_file {
                m.header.backing_file = Some(name.clone());
                m.header.extensions.backing_format = opts.backing_format.clone();
                m.write_header(st)?;
            }
            if let Some(enc) = &opts.encryption {
                // After the size, as QEMU's qcow2_co_create sets it up.
                m.set_up_encryption(st, enc)?;
            }
            m.flush_all(st)
        })?;
        // That handle was opened while the disk had size 0, so its L2 cache
        // holds two tables: every write reaching a third table would evict
        // a dirty one, with a sync. Reopen so the caches are sized for the
        // disk, as any later open sizes them.
        image.close()?;
        let mut reopen = if opts.backing_file.is_some() {
            OpenOptions::new().backing(crate::image::backing::BackingPolicy::Ignore)
        } else {
            OpenOptions::new()
        };
        reopen.passphrase = opts.encryption.as_ref().map(|e| e.passphrase.clone());
        Qcow2::open_with(storage, &reopen, None, data)
    }
}

impl Qcow2 {
    /// Growing zeroes the bytes past the old end inside its last cluster,
    /// in place. When a snapshot shares that cluster (no COPIED flag),
    /// rewrite its in-disk part first: the write copies the cluster into
    /// one of our own, where the zeroing may land.
    ///
    /// With `preallocating` over a backing file, an unallocated old last
    /// cluster is rewritten the same way: preallocation would map it to a
    /// new cluster of zeros, losing the backing file's data in the old
    /// disk (QEMU copies it into the preallocated cluster).
    pub(crate) fn unshare_last_cluster(&self, old_size: u64, preallocating: bool) -> Result<()> {
        let g = self.geometry();
        let start = g.align_down(old_size);
        if start == old_size {
            return Ok(());
        }
        let reads_backing = preallocating && self.backing().is_some();
        let shared = {
            let mut m = self.lock_meta();
            match m.l2_offset(g.l1_index(GuestOffset(start)))? {
                None => reads_backing,
                Some(table) => {
                    m.load_l2(self.storage_ref(), table)?;
                    let index = g.l2_index(GuestOffset(start));
                    match m.mapping_at(table, index)? {
                        L2Mapping::Normal { copied: false, .. } => true,
                        L2Mapping::Unallocated => reads_backing,
                        _ => false,
                    }
                }
            }
        };
        if shared {
            let mut buf = vec![0u8; (old_size - start) as usize];
            self.read_at(&mut buf, start)?;
            self.write_at_inner(&buf, start)?;
        }
        Ok(())
    }
}

impl Meta {
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
                self.pending_frees.push((g.host_cluster(HostOffset(offset)), FreeReason::Always));
                self.set_l1(i, 0);
            }
        }
        self.header.size = new_size;
        self.write_header(storage)?;
        self.flush_all(storage)?;
        let frees = std::mem::take(&mut self.pending_frees);
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
        let frees = std::mem::take(&mut self.pending_frees);
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
