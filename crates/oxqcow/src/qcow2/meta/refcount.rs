//! Refcount table and blocks, and the cluster allocator built on them.
//!
//! Owns the in-memory refcount table, the refcount block cache, and the
//! search for free clusters. Allocation raises refcounts in the cache only;
//! the image's flush writes dirty blocks, syncs, and only then writes table
//! entries that point at new blocks, so a table entry never reaches the disk
//! before the block it names. New refcount blocks describe themselves when
//! they fall inside their own range, and a full table is replaced by a larger
//! one placed past the current coverage together with the blocks that cover
//! it (written, synced, then the header switched, then the old table freed).
//! All methods run under the image's metadata lock.

use std::collections::BTreeSet;

use oxqcow_format::header::refcount_table_fields;
use oxqcow_format::limits::{HOST_OFFSET_MASK, MAX_REFTABLE_BYTES};
use oxqcow_format::refcount::RefcountBlock;
use oxqcow_format::table::{decode_entries, encode_entries};
use oxqcow_format::{Geometry, HostCluster, RefcountTableEntry};

use crate::error::{Error, Result};
use crate::qcow2::meta::cache::TableCache;
use crate::qcow2::meta::overlap::{self, MetadataMap};
use crate::storage::Storage;

/// The least and the most the file is grown past an allocation that ends
/// past it (see `Refcounts::cover_allocated`).
const GROW_AHEAD_MIN: u64 = 1 << 20;
const GROW_AHEAD_MAX: u64 = 64 << 20;

/// The refcount structures of one image.
pub(crate) struct Refcounts {
    geometry: Geometry,
    table: Vec<u64>,
    table_offset: u64,
    table_clusters: u32,
    dirty_table: BTreeSet<usize>,
    blocks: TableCache,
    /// No cluster below this index is free.
    free_hint: u64,
    /// The host cluster compressed data is being packed into
    /// (`Meta::alloc_bytes`). Forgotten as soon as its refcount drops to
    /// zero: the cluster may be reused for anything (an L2 table, say)
    /// before the next compressed write, which must then not pack into it.
    pub(crate) packing: Option<u64>,
    /// Compressed data never packs into a cluster allocated before
    /// another one (`Meta::reserve_for_copy`): the file is written front
    /// to back.
    pub(crate) append_only: bool,
    /// Where the metadata is, for overlap checks and the allocator.
    pub(crate) map: MetadataMap,
    /// Clusters holding refcount blocks.
    block_clusters: BTreeSet<u64>,
    /// One past the highest cluster ever allocated or present in the file.
    pub(crate) host_end: u64,
    /// A length the file is known to have reached (see `cover_allocated`).
    covered_len: u64,
}

impl Refcounts {
    /// Drops the clean cached blocks no request used since the last call.
    pub(crate) fn clean_unused(&mut self) -> usize {
        self.blocks.clean_unused()
    }

    /// Reads the refcount table. A damaged entry (reserved bits, a block
    /// outside the image) refuses the image unless `tolerant` (the opens
    /// for check and read-only opens, which allocate nothing): then its
    /// refcounts read as zeros. QEMU opens such an image read-write too and
    /// fails only what needs the block; a read-write open here refuses it,
    /// rather than trust the other entries of a table known to be damaged.
    pub(crate) fn load(
        storage: &dyn Storage,
        geometry: Geometry,
        table_offset: u64,
        table_clusters: u32,
        cache_tables: usize,
        file_len: u64,
        tolerant: bool,
    ) -> Result<Self> {
        let bytes_len = u64::from(table_clusters) * geometry.cluster_size();
        let mut bytes = vec![0u8; bytes_len as usize];
        storage.read_at(&mut bytes, table_offset).map_err(Error::io("reading the refcount table", table_offset))?;
        let mut table = decode_entries(&bytes);
        for (i, e) in table.iter_mut().enumerate() {
            let entry = RefcountTableEntry(*e);
            let masked = RefcountTableEntry(*e & !0x1ff).block_offset().map_or(0, |o| o.0);
            let problem = if entry.reserved_bits() != 0 {
                // QEMU still reads refcounts through the masked offset but
                // does not count the entry as a reference to the block.
                Some((format!("ERROR refcount table entry {i} has reserved bits set"), masked))
            } else if !geometry.is_cluster_aligned(masked) {
                if !tolerant {
                    // QEMU opens the image and fails (marking it corrupt)
                    // only the requests that need this block: `load_block`.
                    continue;
                }
                // Its refcounts cannot be read at all (the check reports it).
                Some((format!("ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"), 0))
            } else if masked >= file_len {
                Some((format!("ERROR refcount block {i} is outside image"), 0))
            } else {
                None
            };
            let Some((problem, keep)) = problem else { continue };
            if !tolerant {
                return Err(Error::Corrupt(format!("refcount table entry {i} (0x{:x}) is invalid: {problem}", *e)));
            }
            // Repair mode: the check reports it and the repair rebuilds
            // the refcount structures.
            *e = keep;
        }
        let block_clusters = table
            .iter()
            .filter_map(|&e| RefcountTableEntry(e).block_offset())
            .map(|o| geometry.host_cluster(o).0)
            .collect();
        Ok(Refcounts {
            geometry,
            table,
            table_offset,
            table_clusters,
            dirty_table: BTreeSet::new(),
            blocks: TableCache::new(cache_tables),
            free_hint: 0,
            packing: None,
            append_only: false,
            map: MetadataMap::default(),
            block_clusters,
            host_end: geometry.clusters_for(file_len),
            covered_len: file_len,
        })
    }

    pub(crate) fn table_offset(&self) -> u64 {
        self.table_offset
    }
    pub(crate) fn table_clusters(&self) -> u32 {
        self.table_clusters
    }
    pub(crate) fn table_entries(&self) -> &[u64] {
        &self.table
    }

    fn block_offset(&self, ti: u64) -> Option<u64> {
        RefcountTableEntry(*self.table.get(ti as usize)?).block_offset().map(|o| o.0)
    }

    /// The template a write of `len` bytes at `offset` would overlap
    /// (outside `ignore`), refcount blocks included.
    pub(crate) fn overlap(&self, offset: u64, len: u64, ignore: u32) -> Option<u32> {
        if len == 0 {
            return None;
        }
        let first = offset >> self.geometry.cluster_bits();
        let last = (offset + len - 1) >> self.geometry.cluster_bits();
        if let Some(t) = self.map.find(first, last, ignore) {
            return Some(t);
        }
        let check_blocks = self.map.mask & !ignore & overlap::REFCOUNT_BLOCK != 0;
        (check_blocks && self.block_clusters.range(first..=last).next().is_some()).then_some(overlap::REFCOUNT_BLOCK)
    }

    /// Fails when a write would overlap metadata outside `ignore`.
    pub(crate) fn check_write(&self, offset: u64, len: u64, ignore: u32) -> Result<()> {
        match self.overlap(offset, len, ignore) {
            Some(t) => Err(overlap::overlap_error(t)),
            None => Ok(()),
        }
    }

    fn write_block(&self, storage: &dyn Storage, offset: u64, data: &[u8]) -> Result<()> {
        self.check_write(offset, data.len() as u64, overlap::REFCOUNT_BLOCK)?;
        storage.write_at(data, offset).map_err(Error::io("writing a refcount block", offset))
    }

    /// Extends the file into the last allocated cluster, as soon as it is
    /// allocated. A cluster allocated for metadata that is written later (a
    /// new L2 table, say) may lie past the end of the file; were its
    /// refcount durable before the file reached it, a crash would leave a
    /// leak past the end, which check cannot see (it looks at the clusters
    /// the file reaches into, as QEMU's does) and so cannot repair until the
    /// file grows over it. One byte of the cluster is enough, and keeps
    /// files QEMU's length (a new L1 table, written before its refcount, may
    /// end inside its cluster).
    ///
    /// Doing it at allocation, under the metadata lock, is what makes the
    /// length check and the truncate safe against guest data writes running
    /// meanwhile: those go only to clusters allocated earlier, which end at
    /// or before the first byte of the newest cluster, so the truncate can
    /// only lengthen the file past them. (Done later, the newest cluster
    /// could be the one being written, and the truncate would cut it.)
    ///
    /// The file grows ahead of the allocations (`Storage::extend_to`: a
    /// quarter of its length, between 1 and 64 MiB, on the storage a
    /// writable image is opened through), so a copy that allocates run
    /// after run extends it once per step, not once per run; the reserve
    /// holds only free clusters and is cut off at the next sync.
    fn cover_allocated(&mut self, storage: &dyn Storage) -> Result<()> {
        if self.host_end == 0 {
            return Ok(());
        }
        let end = (self.host_end - 1) * self.geometry.cluster_size() + 1;
        if end <= self.covered_len {
            return Ok(());
        }
        let ahead = (end / 4).clamp(GROW_AHEAD_MIN, GROW_AHEAD_MAX);
        match storage.extend_to(end, ahead) {
            // A storage that keeps its length (a raw node with a
            // `size`, a null device) cannot be covered: the allocation
            // stands and the write into the cluster fails instead
            // (ENOSPC past a raw window), as in QEMU, whose allocator
            // never touches the file.
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => return Ok(()),
            r => r.map_err(Error::io("extending the file over allocated clusters", end))?,
        }
        self.covered_len = end;
        Ok(())
    }

    /// Forgets what the file's length was known to be (after it shrank).
    pub(crate) fn file_shrunk(&mut self, len: u64) {
        self.covered_len = len;
        self.host_end = self.geometry.clusters_for(len);
    }

    fn make_room(&mut self, storage: &dyn Storage) -> Result<()> {
        while let Some((offset, dirty)) = self.blocks.victim() {
            if dirty {
                let data = self.blocks.peek(offset).expect("victim is cached");
                self.check_write(offset, data.len() as u64, overlap::REFCOUNT_BLOCK)?;
                storage.write_at(data, offset).map_err(Error::io("writing a refcount block", offset))?;
            }
            self.blocks.remove(offset);
        }
        Ok(())
    }

    fn load_block(&mut self, storage: &dyn Storage, offset: u64) -> Result<()> {
        if self.blocks.contains(offset) {
            return Ok(());
        }
        if !self.geometry.is_cluster_aligned(offset) {
            let ti = self.table.iter().position(|&e| RefcountTableEntry(e).block_offset().map(|o| o.0) == Some(offset));
            // QEMU's text, its `%#x` included (no prefix for 0).
            let ti = match ti {
                Some(0) | None => "0".to_string(),
                Some(i) => format!("{i:#x}"),
            };
            return Err(Error::Corrupt(format!("Refblock offset {offset:#x} unaligned (reftable index: {ti})")));
        }
        self.make_room(storage)?;
        let mut data = vec![0u8; self.geometry.cluster_size() as usize].into_boxed_slice();
        storage.read_at(&mut data, offset).map_err(Error::io("reading a refcount block", offset))?;
        self.blocks.insert(offset, data, false);
        Ok(())
    }

    /// The raw table entry `ti` (0 past the table's end).
    pub(crate) fn table_entry(&self, ti: u64) -> u64 {
        self.table.get(ti as usize).copied().unwrap_or(0)
    }

    /// A copy of the refcount block at `offset`, as the cache holds it.
    pub(crate) fn block_copy(&mut self, storage: &dyn Storage, offset: u64) -> Result<Box<[u8]>> {
        self.load_block(storage, offset)?;
        Ok(self.blocks.get(offset).expect("just loaded").to_vec().into_boxed_slice())
    }

    /// The refcount of `cluster` (0 where no block covers it).
    pub(crate) fn get(&mut self, storage: &dyn Storage, cluster: HostCluster) -> Result<u64> {
        let ti = self.geometry.reftable_index(cluster);
        let Some(offset) = self.block_offset(ti) else { return Ok(0) };
        self.load_block(storage, offset)?;
        let block = self.blocks.get(offset).expect("just loaded");
        Ok(RefcountBlock::get(block, self.geometry.refblock_index(cluster), self.geometry.refcount_order()))
    }

    /// Adds `delta` (+1 or -1 typically) to the refcount of `cluster`. The
    /// block must exist (allocation creates blocks before raising counts).
    pub(crate) fn update(&mut self, storage: &dyn Storage, cluster: HostCluster, delta: i64) -> Result<u64> {
        let ti = self.geometry.reftable_index(cluster);
        let Some(offset) = self.block_offset(ti) else {
            return Err(Error::Corrupt(format!(
                "refcount of cluster {} (offset 0x{:x}) changed by {delta}, but no refcount block covers it",
                cluster.0,
                self.geometry.cluster_offset(cluster).0
            )));
        };
        self.load_block(storage, offset)?;
        let order = self.geometry.refcount_order();
        let max = self.geometry.max_refcount();
        let index = self.geometry.refblock_index(cluster);
        let block = self.blocks.get_mut(offset).expect("just loaded");
        let old = RefcountBlock::get(block, index, order);
        let new = if delta >= 0 { old.checked_add(delta as u64) } else { old.checked_sub(delta.unsigned_abs()) };
        let new = match new {
            Some(n) if n <= max => n,
            _ => {
                // Leave the block untouched: it was marked dirty but not changed.
                return Err(if delta >= 0 {
                    Error::InvalidArgument(format!(
                        "refcount of cluster {} would exceed the maximum {max} of {}-bit refcounts",
                        cluster.0,
                        self.geometry.refcount_bits()
                    ))
                } else {
                    Error::Corrupt(format!(
                        "refcount of cluster {} (offset 0x{:x}) would drop below zero",
                        cluster.0,
                        self.geometry.cluster_offset(cluster).0
                    ))
                });
            }
        };
        RefcountBlock::set(block, index, order, new);
        if new == 0 && cluster.0 < self.free_hint {
            self.free_hint = cluster.0;
        }
        if new == 0 && self.packing == Some(cluster.0) {
            self.packing = None;
        }
        Ok(new)
    }

    /// Finds `n` contiguous clusters with refcount 0, starting at the hint.
    /// Moves the hint to the run found, as QEMU's `free_cluster_index`
    /// moves: free clusters passed over because the run did not fit there
    /// stay behind it until a cluster below it is freed (so a run of many
    /// clusters leaves smaller holes for later, as in QEMU's files).
    fn find_free(&mut self, storage: &dyn Storage, n: u64) -> Result<u64> {
        let (start, _) = self.find_free_run(storage, self.free_hint, n)?;
        self.free_hint = start;
        Ok(start)
    }

    /// The first cluster of the first run of `n` free clusters, where the
    /// next allocation of `n` clusters would go. Only a look: the search
    /// hint stays where it was (an allocation moves it past the clusters
    /// it passes over, as QEMU's free_cluster_index, which a look must
    /// not do).
    pub(crate) fn first_free_run(&mut self, storage: &dyn Storage, n: u64) -> Result<u64> {
        Ok(self.find_free_run(storage, self.free_hint, n)?.0)
    }

    /// The first run of `n` free clusters at or after `from`, and the
    /// first free cluster seen.
    fn find_free_run(&mut self, storage: &dyn Storage, from: u64, n: u64) -> Result<(u64, u64)> {
        let rpb = self.geometry.refcounts_per_block();
        let order = self.geometry.refcount_order();
        let mut c = from;
        let mut run_start = c;
        let mut run_len = 0u64;
        let mut first_free: Option<u64> = None;
        let max_cluster = (HOST_OFFSET_MASK + (1 << 9)) >> self.geometry.cluster_bits();
        loop {
            if c >= max_cluster {
                return Err(Error::NoSpace("the image file reached the largest host offset qcow2 can address".into()));
            }
            let ti = c / rpb;
            let block_end = (ti + 1) * rpb;
            match self.block_offset(ti) {
                None => {
                    if run_len == 0 {
                        run_start = c;
                    }
                    first_free.get_or_insert(c);
                    if ti >= self.table.len() as u64 {
                        // Past the table's reach every cluster is free.
                        run_len = n;
                    } else {
                        run_len += block_end - c;
                        c = block_end;
                    }
                }
                Some(offset) => {
                    self.load_block(storage, offset)?;
                    let block = self.blocks.get(offset).expect("just loaded");
                    while c < block_end {
                        if RefcountBlock::get(block, (c % rpb) as usize, order) == 0 {
                            first_free.get_or_insert(c);
                            if run_len == 0 {
                                run_start = c;
                            }
                            run_len += 1;
                            if run_len >= n {
                                break;
                            }
                        } else {
                            run_len = 0;
                        }
                        c += 1;
                    }
                    if run_len < n {
                        continue;
                    }
                }
            }
            if run_len >= n {
                if let Some((template, _)) = self.map.constant_overlap(run_start, n) {
                    if run_start == 0 && self.block_offset(0).is_none() {
                        // QEMU's allocator hands out offset 0, then needs
                        // the refcount block that would count it and puts
                        // it on the next cluster it takes for free; when
                        // that is metadata too, the block's write is what
                        // its overlap check refuses.
                        if let Some((next, _)) = self.map.constant_overlap(n, 1) {
                            return Err(overlap::overlap_error(next));
                        }
                    }
                    // QEMU hands the clusters out and its overlap check
                    // refuses the write that follows, in these words
                    // (unless the caller checks for offset 0 itself: see
                    // `allocating`).
                    return Err(overlap::overlap_error(template));
                }
                return Ok((run_start, first_free.unwrap_or(run_start)));
            }
        }
    }

    /// Allocates `n` contiguous clusters with refcount 1.
    pub(crate) fn alloc(&mut self, storage: &dyn Storage, n: u64) -> Result<HostCluster> {
        assert!(n > 0);
        loop {
            let start = self.find_free(storage, n)?;
            if self.ensure_blocks(storage, start, start + n)? {
                continue;
            }
            for c in start..start + n {
                self.update(storage, HostCluster(c), 1)?;
            }
            if self.append_only {
                self.packing = None;
            }
            if start == self.free_hint {
                self.free_hint = start + n;
            }
            self.host_end = self.host_end.max(start + n);
            self.cover_allocated(storage)?;
            return Ok(HostCluster(start));
        }
    }

    /// Creates missing refcount blocks for `[start, end)`, as QEMU's
    /// `update_refcount` does once the run is picked: each new block goes
    /// to the first free cluster past the run, so the run stays where it
    /// was found (QEMU's layout; the data does not move up by a cluster
    /// for each block). Returns true if it created one (the caller
    /// searches again, and finds the same run).
    fn ensure_blocks(&mut self, storage: &dyn Storage, start: u64, end: u64) -> Result<bool> {
        let first = self.geometry.reftable_index(HostCluster(start));
        let last = self.geometry.reftable_index(HostCluster(end - 1));
        for ti in first..=last {
            if self.block_offset(ti).is_some() {
                continue;
            }
            if ti >= self.table.len() as u64 {
                self.grow_table(storage, ti + 1)?;
            } else {
                self.create_block(storage, ti, end)?;
            }
            return Ok(true);
        }
        Ok(false)
    }

    /// Creates the refcount blocks for every cluster up to `more` clusters
    /// past the last one allocated (the blocks made count among them), so
    /// that allocating that many more creates none: the blocks lie before
    /// those clusters instead of between them (`Meta::reserve_for_copy`).
    pub(crate) fn cover_ahead(&mut self, storage: &dyn Storage, more: u64) -> Result<()> {
        loop {
            let end = self.host_end + more.max(1);
            let last = self.geometry.reftable_index(HostCluster(end - 1));
            let Some(missing) = (0..=last).find(|&ti| self.block_offset(ti).is_none()) else {
                return Ok(());
            };
            if missing >= self.table.len() as u64 {
                self.grow_table(storage, missing + 1)?;
            } else {
                self.create_block(storage, missing, self.host_end)?;
            }
        }
    }

    /// Creates the block for table index `ti` at the first free cluster at
    /// or after `from`.
    fn create_block(&mut self, storage: &dyn Storage, ti: u64, from: u64) -> Result<()> {
        let c = self.find_free_run(storage, from.max(self.free_hint), 1)?.0;
        let cti = self.geometry.reftable_index(HostCluster(c));
        let mut block = vec![0u8; self.geometry.cluster_size() as usize].into_boxed_slice();
        if cti == ti {
            // The block lies in its own range: it counts itself.
            RefcountBlock::set(
                &mut block,
                self.geometry.refblock_index(HostCluster(c)),
                self.geometry.refcount_order(),
                1,
            );
        } else if self.block_offset(cti).is_some() {
            self.update(storage, HostCluster(c), 1)?;
        } else {
            // The first free cluster is in yet another uncovered range: cover
            // that one first (its block will describe itself), then retry.
            if cti >= self.table.len() as u64 {
                self.grow_table(storage, cti + 1)?;
            } else {
                self.create_block(storage, cti, from)?;
            }
            return self.create_block(storage, ti, from);
        }
        let offset = self.geometry.cluster_offset(HostCluster(c)).0;
        self.check_write(offset, self.geometry.cluster_size(), 0)?;
        self.make_room(storage)?;
        self.blocks.insert(offset, block, true);
        self.block_clusters.insert(c);
        self.table[ti as usize] = offset;
        self.dirty_table.insert(ti as usize);
        if c == self.free_hint {
            self.free_hint = c + 1;
        }
        self.host_end = self.host_end.max(c + 1);
        self.cover_allocated(storage)?;
        Ok(())
    }

    /// Replaces the table by one with at least `min_entries` entries.
    fn grow_table(&mut self, storage: &dyn Storage, min_entries: u64) -> Result<()> {
        let g = self.geometry;
        let per_cluster = g.reftable_entries_per_cluster();
        let rpb = g.refcounts_per_block();
        let max_entries = MAX_REFTABLE_BYTES / 8;
        let old_entries = self.table.len() as u64;
        let mut entries = min_entries.max(old_entries + old_entries / 2).div_ceil(per_cluster) * per_cluster;
        // The new table and its blocks go right past the old table's reach,
        // where every cluster is free.
        let area = old_entries * rpb;
        let (table_clusters, nblocks) = loop {
            if entries > max_entries {
                return Err(Error::NoSpace(format!(
                    "the refcount table would need {entries} entries, more than the {} that fit in 8 MiB",
                    max_entries
                )));
            }
            let t = entries / per_cluster;
            let mut b = 1u64;
            while (t + b).div_ceil(rpb) > b {
                b += 1;
            }
            let last_index = (area + t + b - 1) / rpb;
            if last_index < entries {
                break (t, b);
            }
            entries = (last_index + 1).div_ceil(per_cluster) * per_cluster;
        };
        // Blocks the old table points at must be on disk before the new
        // table (a copy of the old one) is.
        self.write_dirty_blocks(storage)?;

        let cs = g.cluster_size();
        let table_start = area;
        let blocks_start = area + table_clusters;
        let used_end = blocks_start + nblocks;
        let mut new_table = self.table.clone();
        new_table.resize(entries as usize, 0);
        for k in 0..nblocks {
            let block_cluster = blocks_start + k;
            let range_start = area + k * rpb;
            let mut block = vec![0u8; cs as usize];
            for c in range_start.max(table_start)..used_end.min(range_start + rpb) {
                RefcountBlock::set(&mut block, (c - range_start) as usize, g.refcount_order(), 1);
            }
            let offset = block_cluster * cs;
            self.write_block(storage, offset, &block)?;
            new_table[(range_start / rpb) as usize] = offset;
        }
        let table_offset = table_start * cs;
        self.check_write(table_offset, table_clusters * cs, 0)?;
        storage
            .write_at(&encode_entries(&new_table), table_offset)
            .map_err(Error::io("writing the refcount table", table_offset))?;
        storage.sync().map_err(Error::io("syncing the new refcount table", table_offset))?;
        let (pos, field) = refcount_table_fields(table_offset, table_clusters as u32);
        storage.write_at(&field, pos).map_err(Error::io("updating the header", pos))?;
        storage.sync().map_err(Error::io("syncing the header", pos))?;

        let old_offset = self.table_offset;
        let old_clusters = u64::from(self.table_clusters);
        self.table = new_table;
        self.table_offset = table_offset;
        self.table_clusters = table_clusters as u32;
        self.block_clusters.extend(blocks_start..used_end);
        // Entries written with the new table are durable.
        self.dirty_table.clear();
        self.host_end = self.host_end.max(used_end);
        for r in self.map.constant.iter_mut() {
            if r.0 == overlap::REFCOUNT_TABLE {
                *r = (overlap::REFCOUNT_TABLE, table_start, table_clusters);
            }
        }
        let old_first = g.host_cluster(oxqcow_format::HostOffset(old_offset)).0;
        for c in old_first..old_first + old_clusters {
            self.update(storage, HostCluster(c), -1)?;
        }
        Ok(())
    }

    fn write_dirty_blocks(&mut self, storage: &dyn Storage) -> Result<bool> {
        let dirty = self.blocks.dirty_offsets();
        for &offset in &dirty {
            let data = self.blocks.peek(offset).expect("dirty blocks are cached");
            self.write_block(storage, offset, data)?;
            self.blocks.mark_clean(offset);
        }
        Ok(!dirty.is_empty())
    }

    /// Writes dirty blocks, then (after a sync) the table entries that point
    /// at new blocks. Returns whether anything was written.
    pub(crate) fn write_dirty(&mut self, storage: &dyn Storage) -> Result<bool> {
        let wrote = self.write_dirty_blocks(storage)?;
        if self.dirty_table.is_empty() {
            return Ok(wrote);
        }
        storage.sync().map_err(Error::io("syncing refcount blocks", self.table_offset))?;
        let indices: Vec<usize> = self.dirty_table.iter().copied().collect();
        let mut i = 0;
        while i < indices.len() {
            let start = indices[i];
            let mut end = start + 1;
            while i + 1 < indices.len() && indices[i + 1] == end {
                i += 1;
                end += 1;
            }
            let offset = self.table_offset + start as u64 * 8;
            self.check_write(offset, (end - start) as u64 * 8, overlap::REFCOUNT_TABLE)?;
            storage
                .write_at(&encode_entries(&self.table[start..end]), offset)
                .map_err(Error::io("writing the refcount table", offset))?;
            i += 1;
        }
        self.dirty_table.clear();
        Ok(true)
    }

    /// Forgets cached blocks and reads the table again (after the
    /// structures were rebuilt on disk, possibly with another width).
    pub(crate) fn reload_with_geometry(
        &mut self,
        storage: &dyn Storage,
        geometry: Geometry,
        table_offset: u64,
        table_clusters: u32,
        file_len: u64,
        tolerant: bool,
    ) -> Result<()> {
        let cache = self.blocks.capacity();
        let map = std::mem::take(&mut self.map);
        let host_end = self.host_end;
        *self = Refcounts::load(storage, geometry, table_offset, table_clusters, cache, file_len, tolerant)?;
        self.map = map;
        self.host_end = self.host_end.max(host_end);
        Ok(())
    }
}

/// QEMU's refusal to allocate `what` at offset 0 (the header), which a
/// refcount of 0 for the header's cluster leads its allocator to.
pub(crate) fn alloc_at_zero(what: &str) -> Error {
    Error::Corrupt(format!("Preventing invalid allocation of {what} at offset 0"))
}

/// An allocation's error as QEMU reports it for `what`: the structures
/// QEMU checks for offset 0 themselves (L2 tables, compressed clusters)
/// are refused in their own words, where other allocations at offset 0
/// only meet the overlap check of the write that follows.
pub(crate) fn allocating(what: &str, e: Error) -> Error {
    let at_header = overlap::overlap_error(overlap::MAIN_HEADER).to_string();
    if matches!(&e, Error::Corrupt(text) if *text == at_header) {
        alloc_at_zero(what)
    } else {
        e
    }
}
