//! Changing an existing image's options (`qemu-img amend`): compatibility
//! level in both directions (expanding zero clusters, also in snapshots, on
//! the way down), lazy refcounts, refcount width, and size.
//!
//! Steps run in QEMU's order (`qcow2_amend_options`): the option values are
//! checked, then the upgrade, the refcount width change, a header rewrite,
//! the backing file check, lazy refcounts, the size, and the downgrade last,
//! so that a downgrade sees the final state and can refuse what version 2
//! cannot express. A failing step leaves the earlier ones done, as in QEMU.
//! Progress is reported as QEMU's amend status callback reports it.

use std::collections::HashSet;

use oxqcow_format::header::{autoclear, incompat};
use oxqcow_format::refcount::RefcountBlock;
use oxqcow_format::table::{decode_entries, encode_entries, write_l2_word, L1Entry, COPIED};
use oxqcow_format::{HostCluster, HostOffset, L2Entry, L2Mapping};

use crate::error::{Error, Result};
use crate::options::{check_refcount_bits, AmendOptions};
use crate::qcow2::meta::Meta;
use crate::storage::Storage;

/// The operations whose progress amend reports (QEMU's `Qcow2AmendOperation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Operation {
    None,
    Upgrading,
    ChangingRefcountOrder,
    Downgrading,
}

/// QEMU's `qcow2_amend_helper_cb`: folds the progress of several
/// operations into one (offset, total work) stream, projecting the work of
/// the operations not started yet from the ones seen so far.
pub(crate) struct Status<'a> {
    cb: &'a mut dyn FnMut(u64, u64),
    total_operations: i64,
    operations_completed: i64,
    offset_completed: i64,
    last_operation: Operation,
    current_operation: Operation,
    last_work_size: i64,
}

impl Status<'_> {
    /// Progress of `operations` operations reported to `cb`.
    pub(crate) fn new(cb: &mut dyn FnMut(u64, u64), operations: i64) -> Status<'_> {
        Status {
            cb,
            total_operations: operations,
            operations_completed: 0,
            offset_completed: 0,
            last_operation: Operation::None,
            current_operation: Operation::None,
            last_work_size: 0,
        }
    }

    /// The next reports belong to `operation`.
    pub(crate) fn start(&mut self, operation: Operation) {
        self.current_operation = operation;
    }

    fn report(&mut self, offset: i64, work_size: i64) {
        if self.current_operation != self.last_operation {
            if self.last_operation != Operation::None {
                self.offset_completed += self.last_work_size;
                self.operations_completed += 1;
            }
            self.last_operation = self.current_operation;
        }
        if self.total_operations <= 0 || self.operations_completed >= self.total_operations {
            return;
        }
        self.last_work_size = work_size;
        let current = self.offset_completed + work_size;
        let projected =
            current * (self.total_operations - self.operations_completed - 1) / (self.operations_completed + 1);
        (self.cb)((self.offset_completed + offset) as u64, (current + projected) as u64);
    }
}

impl Meta {
    /// QEMU's checks on a new size given to amend.
    pub(crate) fn amend_size_check(&self, size: u64) -> Result<()> {
        if size % 512 != 0 {
            return Err(Error::InvalidArgument("The new size must be a multiple of 512".into()));
        }
        if !self.snapshots.entries.is_empty() && self.header.version < 3 {
            return Err(Error::InvalidArgument("Can't resize a v2 image which has snapshots".into()));
        }
        Ok(())
    }

    /// The checks QEMU makes on the option values before changing anything,
    /// in the order of its option list.
    pub(crate) fn amend_check(&self, opts: &AmendOptions) -> Result<()> {
        // LUKS key slots are changed by `Qcow2::amend_encryption`.
        if opts.encryption && self.header.crypt_method != oxqcow_format::header::crypt::LUKS {
            return Err(if self.header.crypt_method == 0 {
                Error::InvalidArgument("Can't amend encryption options - encryption not present".into())
            } else {
                Error::InvalidArgument("Only LUKS encryption options can be amended".into())
            });
        }
        if opts.data_file.is_some() && !self.header.has_data_file() {
            return Err(Error::InvalidArgument(
                "data-file can only be set for images that use an external data file".into(),
            ));
        }
        if opts.data_file_raw == Some(true) && self.header.autoclear_features & autoclear::DATA_FILE_RAW == 0 {
            return Err(Error::InvalidArgument("data-file-raw cannot be set on existing images".into()));
        }
        if let Some(bits) = opts.refcount_bits {
            check_refcount_bits(bits)?;
        }
        Ok(())
    }

    /// Everything amend does before the size change.
    pub(crate) fn amend_up_to_size(
        &mut self,
        storage: &dyn Storage,
        opts: &AmendOptions,
        new_version: u32,
        status: &mut Status<'_>,
    ) -> Result<()> {
        if new_version > self.header.version {
            status.current_operation = Operation::Upgrading;
            self.upgrade(storage, status)?;
        }
        if let Some(bits) = opts.refcount_bits.filter(|&b| b != self.geometry.refcount_bits()) {
            if new_version < 3 && bits != 16 {
                return Err(Error::InvalidArgument(
                    "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 \
                     or greater)"
                        .into(),
                ));
            }
            status.current_operation = Operation::ChangingRefcountOrder;
            self.change_refcount_order(storage, bits.trailing_zeros(), status)?;
        }
        if let Some(name) = &opts.data_file {
            // An empty name removes the extension, as in QEMU (the image
            // then needs an explicit data file to open).
            let mut probe = self.header.clone();
            probe.extensions.data_file = (!name.is_empty()).then(|| name.clone());
            probe.serialize()?;
            self.header.extensions.data_file = probe.extensions.data_file;
        }
        if opts.data_file_raw == Some(false) {
            self.header.autoclear_features &= !autoclear::DATA_FILE_RAW;
            if let Some(d) = self.data_file.as_mut() {
                d.raw = false;
            }
        }
        self.write_header(storage)?;
        storage.sync().map_err(Error::io("syncing the header", 0))?;
        if opts.backing_file.is_some() || opts.backing_format.is_some() {
            // Both must equal what the header says (an absent one counts as none).
            if opts.backing_file != self.header.backing_file
                || opts.backing_format != self.header.extensions.backing_format
            {
                return Err(Error::InvalidArgument(
                    "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.".into(),
                ));
            }
        }
        if let Some(lazy) = opts.lazy_refcounts.filter(|&l| l != self.lazy_refcounts) {
            if lazy {
                if new_version < 3 {
                    return Err(Error::InvalidArgument(
                        "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or \
                         greater)"
                            .into(),
                    ));
                }
                self.header.compatible_features |= oxqcow_format::header::compat::LAZY_REFCOUNTS;
            } else {
                self.make_clean(storage)?;
                self.header.compatible_features &= !oxqcow_format::header::compat::LAZY_REFCOUNTS;
            }
            self.lazy_refcounts = lazy;
            self.write_header(storage)?;
            storage.sync().map_err(Error::io("syncing the header", 0))?;
        }
        Ok(())
    }

    /// Version 2 to 3: snapshot entries get the extra data version 3
    /// requires, then the header switches.
    fn upgrade(&mut self, storage: &dyn Storage, status: &mut Status<'_>) -> Result<()> {
        status.report(0, 2);
        if self.snapshots.entries.iter().any(|s| s.disk_size.is_none() || s.vm_state_size_large.is_none()) {
            let mut entries = self.snapshots.entries.clone();
            for e in &mut entries {
                e.disk_size.get_or_insert(self.header.size);
                e.vm_state_size_large.get_or_insert(u64::from(e.vm_state_size));
            }
            // QEMU's qcow2_write_snapshots frees the old table with snapshot discards.
            let modes = crate::qcow2::meta::DiscardModes { snapshot: true, ..Default::default() };
            self.write_snapshot_table(storage, entries, modes)?;
        }
        status.report(1, 2);
        self.header.version = 3;
        self.header.header_length = oxqcow_format::limits::V3_HEADER_LENGTH;
        self.write_header(storage)?;
        storage.sync().map_err(Error::io("syncing the header", 0))?;
        status.report(2, 2);
        Ok(())
    }

    /// Rewrites the refcount structures with `1 << order`-bit entries the
    /// way QEMU's `qcow2_change_refcount_order` does, so that the new
    /// structures land where QEMU puts them: walks over the old table
    /// allocate the new blocks with the ordinary allocator until a walk
    /// allocates nothing, one more walk writes them, then the new table is
    /// written, the header switches (width and table in one write), and
    /// the old structures are freed in the new ones.
    fn change_refcount_order(&mut self, storage: &dyn Storage, order: u32, status: &mut Status<'_>) -> Result<()> {
        let old = self.geometry;
        let new = oxqcow_format::Geometry::new(old.cluster_bits(), order, old.extended_l2())?;
        let mut walk = RefcountWalk { new, table: Vec::new(), index: 0 };
        let mut walk_index = 0i64;
        let mut new_table_offset = 0u64;
        let mut allocated_entries = 0u64;
        loop {
            let total = (walk_index + 2).max(3);
            let allocated = self.walk_refcounts(storage, &mut walk, false, status, walk_index, total)?;
            walk_index += 1;
            walk.index = 0;
            if !allocated {
                break;
            }
            if new_table_offset != 0 {
                let first = old.host_cluster(HostOffset(new_table_offset)).0;
                for c in first..first + old.clusters_for(allocated_entries * 8) {
                    self.refcounts.update(storage, HostCluster(c), -1)?;
                }
            }
            new_table_offset = self.alloc_clusters(storage, old.clusters_for(walk.table.len() as u64 * 8))?;
            allocated_entries = walk.table.len() as u64;
        }
        let allocated = self.walk_refcounts(storage, &mut walk, true, status, walk_index, walk_index + 1)?;
        debug_assert!(!allocated);
        let table_bytes = encode_entries(&walk.table);
        self.refcounts.check_write(new_table_offset, table_bytes.len() as u64, 0)?;
        storage
            .write_at(&table_bytes, new_table_offset)
            .map_err(Error::io("writing the new refcount table", new_table_offset))?;
        self.flush_all(storage)?;
        // Width and table switch together, in one header write.
        let old_table: Vec<u64> = self.refcounts.table_entries().to_vec();
        let old_table_offset = self.refcounts.table_offset();
        let new_clusters = new.clusters_for(walk.table.len() as u64 * 8) as u32;
        let mut header = self.header.clone();
        header.refcount_order = order;
        header.refcount_table_offset = new_table_offset;
        header.refcount_table_clusters = new_clusters;
        storage.write_at(&header.serialize()?, 0).map_err(Error::io("updating the header", 0))?;
        storage.sync().map_err(Error::io("syncing the header", 0))?;
        self.header = header;
        self.geometry = new;
        let file_len = storage.len().map_err(Error::io("reading the file length", 0))?;
        self.refcounts.reload_with_geometry(storage, new, new_table_offset, new_clusters, file_len, false)?;
        self.update_reserved();
        // The old blocks and table are free now, counted in the new structures.
        for &e in &old_table {
            if let Some(o) = oxqcow_format::RefcountTableEntry(e).block_offset() {
                self.refcounts.update(storage, new.host_cluster(o), -1)?;
            }
        }
        let first = new.host_cluster(HostOffset(old_table_offset)).0;
        for c in first..first + new.clusters_for(old_table.len() as u64 * 8) {
            self.refcounts.update(storage, HostCluster(c), -1)?;
        }
        self.flush_all(storage)
    }

    /// One walk over the old refcount table (QEMU's `walk_over_reftable`):
    /// every refcount is carried into blocks of the new width; a full new
    /// block is allocated (`write` false) or written (`write` true). Returns
    /// whether a new block was allocated.
    fn walk_refcounts(
        &mut self,
        storage: &dyn Storage,
        walk: &mut RefcountWalk,
        write: bool,
        status: &mut Status<'_>,
        index: i64,
        total: i64,
    ) -> Result<bool> {
        let old = self.geometry;
        let new = walk.new;
        let new_bits = new.refcount_bits();
        let new_per_block = new.refcounts_per_block();
        let mut filling = NewBlock { bytes: vec![0u8; new.cluster_size() as usize], used: 0, empty: true };
        let mut allocated = false;
        let mut ti = 0u64;
        while ti < self.refcounts.table_entries().len() as u64 {
            let table_len = self.refcounts.table_entries().len() as i64;
            status.report(index * table_len + ti as i64, total * table_len);
            let offset = self.refcounts.table_entry(ti) & oxqcow_format::limits::HOST_OFFSET_MASK & !0x1ff;
            if offset == 0 {
                // No block: its refcounts are all zero. Whole runs of them
                // are carried at once (QEMU steps through each, which made
                // an amend of an empty 1 GiB image take a second).
                let mut left = old.refcounts_per_block();
                while left > 0 {
                    allocated |= self.finish_if_full(storage, walk, &mut filling, write)?;
                    let run = left.min(new_per_block - filling.used);
                    filling.used += run;
                    left -= run;
                }
                ti += 1;
                continue;
            }
            if !old.is_cluster_aligned(offset) {
                return Err(Error::Corrupt("Image is corrupt (unaligned refblock offset)".into()));
            }
            let mut old_block = self.refcounts.block_copy(storage, offset)?;
            for ri in 0..old.refcounts_per_block() {
                if self.finish_if_full(storage, walk, &mut filling, write)? {
                    // The new block's cluster was counted in the old
                    // structure, maybe in this very block: QEMU's walk reads
                    // the block it is on live, so later refcounts of this
                    // walk see the allocation.
                    allocated = true;
                    old_block = self.refcounts.block_copy(storage, offset)?;
                }
                let refcount = RefcountBlock::get(&old_block, ri as usize, old.refcount_order());
                if new_bits < 64 && refcount >> new_bits != 0 {
                    let at = (ti * old.refcounts_per_block() + ri) << old.cluster_bits();
                    return Err(Error::InvalidArgument(format!(
                        "Cannot decrease refcount entry width to {new_bits} bits: Cluster at offset {at:#x} has a \
                         refcount of {refcount}"
                    )));
                }
                if write && refcount != 0 {
                    RefcountBlock::set(&mut filling.bytes, filling.used as usize, new.refcount_order(), refcount);
                }
                filling.used += 1;
                filling.empty &= refcount == 0;
            }
            ti += 1;
        }
        if filling.used > 0 {
            allocated |= self.finish_new_block(storage, walk, &filling.bytes, filling.empty, write)?;
            walk.index += 1;
        }
        let table_len = self.refcounts.table_entries().len() as i64;
        status.report((index + 1) * table_len, total * table_len);
        Ok(allocated)
    }

    /// Finishes `filling` when it holds a whole block of the new width
    /// ([`Self::finish_new_block`]) and starts the next, empty one.
    fn finish_if_full(
        &mut self,
        storage: &dyn Storage,
        walk: &mut RefcountWalk,
        filling: &mut NewBlock,
        write: bool,
    ) -> Result<bool> {
        if filling.used < walk.new.refcounts_per_block() {
            return Ok(false);
        }
        let allocated = self.finish_new_block(storage, walk, &filling.bytes, filling.empty, write)?;
        walk.index += 1;
        // Only a block that held a refcount has bytes to clear (the walk
        // over an empty table would otherwise clear megabytes per block).
        if !filling.empty {
            filling.bytes.fill(0);
        }
        filling.used = 0;
        filling.empty = true;
        Ok(allocated)
    }

    /// A new refcount block is complete: allocate its cluster (QEMU's
    /// `alloc_refblock`) or write it there (`flush_refblock`).
    fn finish_new_block(
        &mut self,
        storage: &dyn Storage,
        walk: &mut RefcountWalk,
        block: &[u8],
        empty: bool,
        write: bool,
    ) -> Result<bool> {
        let i = walk.index as usize;
        if write {
            match walk.table.get(i).copied().filter(|&o| o != 0) {
                Some(offset) => {
                    self.refcounts.check_write(offset, block.len() as u64, 0)?;
                    storage.write_at(block, offset).map_err(Error::io("writing a refcount block", offset))?;
                }
                None => debug_assert!(empty),
            }
            return Ok(false);
        }
        if empty {
            return Ok(false);
        }
        if i >= walk.table.len() {
            let per_cluster = walk.new.cluster_size() as usize / 8;
            let entries = (i + 1).div_ceil(per_cluster) * per_cluster;
            if entries as u64 * 8 > oxqcow_format::limits::MAX_REFTABLE_BYTES {
                return Err(Error::InvalidArgument(
                    "This operation would make the refcount table grow beyond the maximum size supported by QEMU, \
                     aborting"
                        .into(),
                ));
            }
            walk.table.resize(entries, 0);
        }
        if walk.table[i] != 0 {
            return Ok(false);
        }
        walk.table[i] = self.alloc_clusters(storage, 1)?;
        Ok(true)
    }

    /// Writes all metadata and clears the dirty bit.
    fn make_clean(&mut self, storage: &dyn Storage) -> Result<()> {
        self.flush_all(storage)?;
        if self.header.is_dirty() {
            self.header.incompatible_features &= !incompat::DIRTY;
            self.write_header(storage)?;
            storage.sync().map_err(Error::io("syncing the header", 0))?;
        }
        Ok(())
    }

    pub(crate) fn downgrade(&mut self, storage: &dyn Storage, status: &mut Status<'_>) -> Result<()> {
        if self.geometry.refcount_bits() != 16 {
            return Err(Error::InvalidArgument("compat=0.10 requires refcount_bits=16".into()));
        }
        if self.header.has_data_file() {
            return Err(Error::InvalidArgument("Cannot downgrade an image with a data file".into()));
        }
        if self
            .snapshots
            .entries
            .iter()
            .any(|s| s.vm_state_bytes() > u64::from(u32::MAX) || s.disk_size.is_some_and(|d| d != self.header.size))
        {
            return Err(Error::InvalidArgument("Internal snapshots prevent downgrade of image".into()));
        }
        self.make_clean(storage)?;
        let blocking = self.header.incompatible_features & !incompat::COMPRESSION;
        if blocking != 0 {
            return Err(Error::InvalidArgument(format!(
                "Cannot downgrade an image with incompatible features 0x{blocking:x} set"
            )));
        }
        // A failed downgrade leaves the features as they were (QEMU clears
        // them in memory before it may fail, but never writes them then).
        let saved = (self.header.compatible_features, self.header.autoclear_features, self.lazy_refcounts);
        self.header.compatible_features = 0;
        self.header.autoclear_features = 0;
        // The image is clean now: expand with ordered flushes (refcounts
        // before the tables that need them), not in lazy-refcount mode,
        // which would write the tables first with the dirty bit clear.
        self.lazy_refcounts = false;
        let res = self.expand_and_write_v2_header(storage, status);
        if res.is_err() {
            (self.header.compatible_features, self.header.autoclear_features, self.lazy_refcounts) = saved;
        }
        res
    }

    fn expand_and_write_v2_header(&mut self, storage: &dyn Storage, status: &mut Status<'_>) -> Result<()> {
        if let Err(e) = self.expand_zero_clusters(storage, status) {
            if e.kind() != crate::ErrorKind::Corrupt {
                return Err(e);
            }
            // As qcow2_downgrade: the corruption is signalled in its own
            // words, the amend fails with EIO.
            self.fail(storage, &e);
            return Err(Error::Corrupt("Failed to turn zero into data clusters: Input/output error".into()));
        }
        if self.header.incompatible_features & incompat::COMPRESSION != 0 {
            if self.has_compressed_clusters(storage)? {
                return Err(Error::InvalidArgument(
                    "Cannot downgrade an image with zstd compression type and existing compressed clusters".into(),
                ));
            }
            self.header.incompatible_features &= !incompat::COMPRESSION;
            self.header.compression_type = 0;
        }
        self.header.version = 2;
        self.write_header(storage)?;
        storage.sync().map_err(Error::io("syncing the header", 0))
    }

    fn has_compressed_clusters(&mut self, storage: &dyn Storage) -> Result<bool> {
        let g = self.geometry;
        for i in 0..self.l1.len() as u64 {
            let Some(table) = self.l2_offset(i)? else { continue };
            self.load_l2(storage, table)?;
            for j in 0..g.l2_entries() as usize {
                if self.l2_entry(table, j).is_compressed() {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Replaces every zero cluster (active layer and snapshots) by what
    /// version 2 can say: an allocated zero cluster gets zeros written and
    /// keeps its cluster; a plain one becomes unallocated, or, over a
    /// backing file, a new cluster of zeros.
    fn expand_zero_clusters(&mut self, storage: &dyn Storage, status: &mut Status<'_>) -> Result<()> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let mut trees: Vec<Vec<u64>> = vec![self.l1.clone()];
        for s in self.snapshots.entries.clone() {
            let bytes = u64::from(s.l1_size) * 8;
            let mut buf = vec![0u8; bytes as usize];
            storage
                .read_at(&mut buf, s.l1_table_offset)
                .map_err(Error::io("reading a snapshot L1 table", s.l1_table_offset))?;
            trees.push(decode_entries(&buf));
        }
        let zeros = vec![0u8; cs as usize];
        let mut seen = HashSet::new();
        let l1_entries: i64 = trees.iter().map(|t| t.len() as i64).sum();
        // References dropped once the tables that held them are durable.
        let mut released = Vec::new();
        let mut visited = 0i64;
        for l1 in trees {
            for (l1_index, &raw) in l1.iter().enumerate() {
                visited += 1;
                self.check_l2_alignment(L1Entry(raw), l1_index as u64)?;
                let Some(table) = L1Entry(raw).l2_offset() else {
                    status.report(visited, l1_entries);
                    continue;
                };
                if !seen.insert(table.0) {
                    status.report(visited, l1_entries);
                    continue;
                }
                let sharers = self.refcounts.get(storage, g.host_cluster(table))?;
                self.load_l2(storage, table.0)?;
                for j in 0..g.l2_entries() as usize {
                    let entry = self.l2_entry(table.0, j);
                    if entry.is_compressed() || entry.0 & oxqcow_format::table::ZERO == 0 {
                        continue;
                    }
                    let new = match self.decode(entry, table.0, j)? {
                        L2Mapping::ZeroAllocated { host, .. } => {
                            let old = g.host_cluster(host);
                            let refs = self.refcounts.get(storage, old)?;
                            if refs > sharers {
                                // A table outside this one's sharers (a
                                // snapshot's own L2 table) still reads the
                                // cluster's data: zero a new cluster
                                // instead. (QEMU 10 zeroes the shared
                                // cluster in place, changing the snapshot.)
                                let new = self.alloc_clusters(storage, 1)?;
                                for _ in 1..sharers {
                                    self.refcounts.update(storage, g.host_cluster(HostOffset(new)), 1)?;
                                }
                                storage.write_at(&zeros, new).map_err(Error::io("writing zeros", new))?;
                                for _ in 0..sharers {
                                    released.push(old);
                                }
                                L2Entry(new | if sharers == 1 { COPIED } else { 0 })
                            } else {
                                storage.write_at(&zeros, host.0).map_err(Error::io("writing zeros", host.0))?;
                                L2Entry(entry.0 & !oxqcow_format::table::ZERO).with_copied(refs == 1)
                            }
                        }
                        L2Mapping::ZeroPlain if !self.has_backing => L2Entry::UNALLOCATED,
                        L2Mapping::ZeroPlain => {
                            let host = self.alloc_clusters(storage, 1)?;
                            // Every L1 sharing this table references the new cluster.
                            for _ in 1..sharers {
                                self.refcounts.update(storage, g.host_cluster(HostOffset(host)), 1)?;
                            }
                            storage.write_at(&zeros, host).map_err(Error::io("writing zeros", host))?;
                            L2Entry(host | if sharers == 1 { COPIED } else { 0 })
                        }
                        _ => continue,
                    };
                    self.load_l2(storage, table.0)?;
                    let data = self.l2.get_mut(table.0).expect("loaded");
                    write_l2_word(data, j, g.l2_entry_size() as usize, new.0);
                }
                status.report(visited, l1_entries);
            }
        }
        self.flush_all(storage)?;
        for c in released {
            self.refcounts.update(storage, c, -1)?;
        }
        self.flush_all(storage)
    }
}

/// The refcount block of the new width that a walk is filling.
struct NewBlock {
    /// Its bytes (zeros where nothing was set).
    bytes: Vec<u8>,
    /// Refcounts carried into it so far.
    used: u64,
    /// Whether every refcount carried into it is zero.
    empty: bool,
}

/// The new refcount table being built by [`Meta::change_refcount_order`].
struct RefcountWalk {
    new: oxqcow_format::Geometry,
    table: Vec<u64>,
    index: u64,
}
