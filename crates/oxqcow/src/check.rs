//! Consistency check and refcount rebuild.
//!
//! The check counts, for every host cluster, the references the metadata
//! holds (header, L1 and L2 tables, data and compressed clusters, refcount
//! structures, snapshot tables), compares them with the stored refcounts,
//! and checks the COPIED flags, reporting what QEMU's `qemu-img check`
//! reports. The rebuild writes brand-new refcount structures from those
//! counts past the end of everything in use, syncs, and only then points the
//! header at them, so a crash during a rebuild loses nothing.

use std::collections::HashMap;

use oxqcow_format::header::refcount_table_fields;
use oxqcow_format::refcount::RefcountBlock;
use oxqcow_format::table::{decode_entries, encode_entries, read_l2_word, L1Entry};
use oxqcow_format::{CompressedDescriptor, HostCluster, HostOffset, L2Entry, L2Mapping, RefcountTableEntry};

use crate::error::{Error, Result};
use crate::qcow2::Meta;
use crate::storage::Storage;

/// What a repair may change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepairMode {
    /// Only leaked clusters (`check -r leaks`).
    Leaks,
    /// Leaks and corruptions (`check -r all`).
    All,
}

/// The outcome of a check, with the numbers `qemu-img check` prints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Corruptions found (after repair: those left).
    pub corruptions: u64,
    /// Leaked clusters found (after repair: those left).
    pub leaks: u64,
    /// Errors that stopped parts of the check.
    pub check_errors: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// Offset just past the last used cluster.
    pub image_end_offset: u64,
    /// Guest clusters.
    pub total_clusters: u64,
    /// Guest clusters with data (or a reserved cluster).
    pub allocated_clusters: u64,
    /// Allocated clusters not contiguous with their predecessor.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// The lines QEMU prints on stderr for each problem, in order.
    pub messages: Vec<String>,
}

/// Reference counts per host cluster: 16 bits each, larger counts on the side
/// (so checking a huge image costs two bytes per host cluster).
struct RefMap {
    counts: Vec<u16>,
    big: HashMap<u64, u64>,
}

impl RefMap {
    fn new(clusters: u64) -> Self {
        RefMap { counts: vec![0; clusters as usize], big: HashMap::new() }
    }
    fn len(&self) -> u64 {
        self.counts.len() as u64
    }
    fn get(&self, c: u64) -> u64 {
        match self.counts.get(c as usize) {
            Some(&u16::MAX) => self.big[&c],
            Some(&v) => u64::from(v),
            None => 0,
        }
    }
    /// Adds one reference; `false` when the cluster is past the map.
    fn add(&mut self, c: u64) -> bool {
        let Some(v) = self.counts.get_mut(c as usize) else { return false };
        if *v == u16::MAX - 1 {
            *v = u16::MAX;
            self.big.insert(c, u64::from(u16::MAX));
        } else if *v == u16::MAX {
            *self.big.get_mut(&c).expect("saturated counts live in big") += 1;
        } else {
            *v += 1;
        }
        true
    }
}

struct Walker<'a> {
    meta: &'a Meta,
    storage: &'a dyn Storage,
    refs: RefMap,
    report: CheckReport,
    file_len: u64,
}

impl Walker<'_> {
    fn corruption(&mut self, msg: String) {
        self.report.corruptions += 1;
        self.report.messages.push(msg);
    }

    /// Counts a reference to every cluster of `[offset, offset + len)`.
    fn add_range(&mut self, what: &str, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let g = self.meta.geometry;
        let first = g.host_cluster(HostOffset(offset)).0;
        let last = g.host_cluster(HostOffset(offset + len - 1)).0;
        for c in first..=last {
            if !self.refs.add(c) {
                self.corruption(format!(
                    "ERROR {what} at offset 0x{offset:x}: cluster {c} is beyond the end of the image file"
                ));
                return;
            }
        }
    }

    fn read(&mut self, what: &'static str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        self.storage.read_at(&mut buf, offset).map_err(Error::io(what, offset))?;
        Ok(buf)
    }

    fn walk_l1(&mut self, l1: &[u64], active: bool) -> Result<()> {
        let g = self.meta.geometry;
        let cs = g.cluster_size();
        for (i, &raw) in l1.iter().enumerate() {
            let e = L1Entry(raw);
            if let Err(err) = e.validate(&g) {
                self.corruption(format!("ERROR l1 entry {i}: {err}"));
                continue;
            }
            let Some(l2) = e.l2_offset() else { continue };
            if l2.0 + cs > self.file_len {
                self.corruption(format!("ERROR l2_offset=0x{:x}: L2 table is outside the image file", l2.0));
                continue;
            }
            self.add_range("L2 table", l2.0, cs);
            let table = self.read("reading an L2 table", l2.0, cs)?;
            // Fragmentation is counted within each L2 table, as QEMU does.
            let mut next_contiguous = 0u64;
            let esize = g.l2_entry_size() as usize;
            for j in 0..g.l2_entries() as usize {
                let entry = L2Entry(read_l2_word(&table, j, esize));
                let mapping = match entry.mapping(&g, self.meta.header.version) {
                    Ok(m) => m,
                    Err(err) => {
                        self.corruption(format!("ERROR L2 table at 0x{:x} index {j}: {err}", l2.0));
                        continue;
                    }
                };
                match mapping {
                    L2Mapping::Normal { host, .. } | L2Mapping::ZeroAllocated { host, .. } => {
                        if active {
                            self.report.allocated_clusters += 1;
                            if next_contiguous != 0 && host.0 != next_contiguous {
                                self.report.fragmented_clusters += 1;
                            }
                            next_contiguous = host.0 + cs;
                        }
                        if host.0 + cs > self.file_len && matches!(mapping, L2Mapping::Normal { .. }) {
                            self.corruption(format!(
                                "ERROR offset=0x{:x}: Cluster is outside the image file (L2 entry 0x{:x})",
                                host.0, entry.0
                            ));
                            continue;
                        }
                        self.add_range("data cluster", host.0, cs);
                    }
                    L2Mapping::Compressed(CompressedDescriptor { offset, .. }) => {
                        let CompressedDescriptor { sectors, .. } = match mapping {
                            L2Mapping::Compressed(d) => d,
                            _ => unreachable!(),
                        };
                        let d = CompressedDescriptor { offset, sectors };
                        if active {
                            self.report.allocated_clusters += 1;
                            self.report.compressed_clusters += 1;
                            self.report.fragmented_clusters += 1;
                        }
                        if offset.0 + d.max_len() > self.file_len.div_ceil(512) * 512 {
                            self.corruption(format!(
                                "ERROR compressed cluster at 0x{:x} ({} bytes) runs past the end of the image file",
                                offset.0,
                                d.max_len()
                            ));
                            continue;
                        }
                        self.add_range("compressed cluster", offset.0, d.max_len());
                    }
                    L2Mapping::Unallocated | L2Mapping::ZeroPlain => {}
                }
            }
        }
        Ok(())
    }

    /// Counts every reference; `with_refcount_structures` includes the
    /// refcount table and blocks (false when rebuilding them).
    fn count(&mut self, with_refcount_structures: bool) -> Result<()> {
        let m = self.meta;
        let g = m.geometry;
        let cs = g.cluster_size();
        self.add_range("header", 0, cs);
        self.add_range("L1 table", m.header.l1_table_offset, u64::from(m.header.l1_size) * 8);
        let l1 = m.l1.clone();
        self.walk_l1(&l1, true)?;
        for (i, s) in m.snapshots.entries.iter().enumerate() {
            let bytes = u64::from(s.l1_size) * 8;
            if s.l1_table_offset % cs != 0
                || bytes > oxqcow_format::limits::MAX_L1_BYTES
                || s.l1_table_offset + bytes > self.file_len
            {
                self.corruption(format!(
                    "ERROR snapshot {i} ({}) has an invalid L1 table (offset 0x{:x}, {} entries)",
                    s.id, s.l1_table_offset, s.l1_size
                ));
                continue;
            }
            self.add_range("snapshot L1 table", s.l1_table_offset, bytes);
            let l1 = decode_entries(&self.read("reading a snapshot L1 table", s.l1_table_offset, bytes)?);
            self.walk_l1(&l1, false)?;
        }
        if m.header.nb_snapshots > 0 {
            self.add_range("snapshot table", m.header.snapshots_offset, m.snapshots.byte_size);
        }
        if with_refcount_structures {
            let table_offset = m.refcounts.table_offset();
            self.add_range("refcount table", table_offset, u64::from(m.refcounts.table_clusters()) * cs);
            let entries = m.refcounts.table_entries().to_vec();
            for (i, &e) in entries.iter().enumerate() {
                if m.refcounts.unreferenced.contains(&i) {
                    continue;
                }
                let entry = RefcountTableEntry(e);
                if let Err(err) = entry.validate(&g) {
                    self.corruption(format!(
                        "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted ({err})"
                    ));
                    continue;
                }
                if let Some(o) = entry.block_offset() {
                    if o.0 + cs > self.file_len {
                        self.corruption(format!("ERROR refcount block {i} is outside image"));
                        continue;
                    }
                    self.add_range("refcount block", o.0, cs);
                }
            }
        }
        Ok(())
    }
}

fn new_walker<'a>(meta: &'a Meta, storage: &'a dyn Storage) -> Result<Walker<'a>> {
    let file_len = storage.len().map_err(Error::io("reading the file length", 0))?;
    let g = meta.geometry;
    let clusters = g.clusters_for(file_len).max(meta.refcounts.host_end);
    Ok(Walker { meta, storage, refs: RefMap::new(clusters), report: CheckReport::default(), file_len })
}

/// Stored refcounts, block by block, read straight from disk: `f(cluster, refcount)`
/// for every cluster covered by an existing block.
fn for_each_stored(meta: &Meta, storage: &dyn Storage, mut f: impl FnMut(u64, u64)) -> Result<()> {
    let g = meta.geometry;
    let cs = g.cluster_size();
    let rpb = g.refcounts_per_block();
    let file_len = storage.len().map_err(Error::io("reading the file length", 0))?;
    let mut block = vec![0u8; cs as usize];
    for (ti, &e) in meta.refcounts.table_entries().iter().enumerate() {
        let entry = RefcountTableEntry(e);
        if entry.validate(&g).is_err() {
            continue;
        }
        let Some(o) = entry.block_offset() else { continue };
        if o.0 + cs > file_len {
            continue;
        }
        storage.read_at(&mut block, o.0).map_err(Error::io("reading a refcount block", o.0))?;
        for i in 0..rpb {
            let v = RefcountBlock::get(&block, i as usize, g.refcount_order());
            f(ti as u64 * rpb + i, v);
        }
    }
    Ok(())
}

/// Checks the image. The caller holds exclusive access with metadata flushed.
pub(crate) fn check(meta: &mut Meta, storage: &dyn Storage, repair: Option<RepairMode>) -> Result<CheckReport> {
    let first = check_once(meta, storage)?;
    let Some(mode) = repair else { return Ok(first) };
    let fix_leaks = first.leaks > 0;
    let fix_corruptions = mode == RepairMode::All && first.corruptions > 0;
    let report = if !fix_leaks && !fix_corruptions {
        first
    } else {
        if mode == RepairMode::Leaks && first.corruptions > 0 {
            // Rebuilding would also rewrite corrupted counts, which -r leaks
            // must not touch: fix leaks one by one instead.
            fix_leaked_clusters(meta, storage)?;
        } else {
            if mode == RepairMode::All {
                fix_copied_flags(meta, storage)?;
            }
            rebuild_refcounts(meta, storage)?;
        }
        meta.refcounts.damaged.clear();
        let mut after = check_once(meta, storage)?;
        after.leaks_fixed = first.leaks.saturating_sub(after.leaks);
        after.corruptions_fixed = first.corruptions.saturating_sub(after.corruptions);
        let mut messages = first.messages;
        messages.append(&mut after.messages);
        after.messages = messages;
        after
    };
    if report.corruptions == 0 && report.check_errors == 0 && meta.header.is_corrupt() {
        // Consistent again: the image may be written (QEMU's qcow2_mark_consistent).
        meta.header.incompatible_features &= !oxqcow_format::header::incompat::CORRUPT;
        meta.write_header(storage)?;
        storage.sync().map_err(Error::io("syncing the header", 0))?;
    }
    Ok(report)
}

fn check_once(meta: &mut Meta, storage: &dyn Storage) -> Result<CheckReport> {
    let mut w = new_walker(meta, storage)?;
    w.count(true)?;
    let Walker { refs, mut report, .. } = w;
    for problem in &meta.refcounts.damaged {
        report.corruptions += 1;
        report.messages.push(problem.clone());
    }
    let g = meta.geometry;
    let mut highest: Option<u64> = None;
    let mut covered = 0u64;
    let mut messages = Vec::new();
    let (mut leaks, mut corruptions, mut check_errors) = (0u64, 0u64, 0u64);
    let file_clusters = g.clusters_for(storage.len().map_err(Error::io("reading the file length", 0))?);
    for_each_stored(meta, storage, |c, stored| {
        covered = covered.max(c + 1);
        let computed = refs.get(c);
        if c >= file_clusters && computed == 0 {
            // Like QEMU, compare only the clusters inside the file: a count
            // left past its end is harmless and not reported.
            return;
        }
        if stored > 0 || computed > 0 {
            highest = Some(highest.map_or(c, |h| h.max(c)));
        }
        if stored != computed {
            if stored < computed {
                corruptions += 1;
                messages.push(format!("ERROR cluster {c} refcount={stored} reference={computed}"));
            } else {
                leaks += 1;
                messages.push(format!("Leaked cluster {c} refcount={stored} reference={computed}"));
            }
        }
    })?;
    // Referenced clusters that no refcount block covers.
    for c in 0..refs.len() {
        let covered_by_block = {
            let ti = g.reftable_index(HostCluster(c));
            meta.refcounts
                .table_entries()
                .get(ti as usize)
                .and_then(|&e| RefcountTableEntry(e).block_offset())
                .is_some()
        };
        if covered_by_block {
            continue;
        }
        let computed = refs.get(c);
        let ti = g.reftable_index(HostCluster(c)) as usize;
        if meta.refcounts.unreadable.contains(&ti) {
            check_errors += 1;
            messages.push(format!("Can't get refcount for cluster {c}: Input/output error"));
            continue;
        }
        if computed > 0 {
            highest = Some(highest.map_or(c, |h| h.max(c)));
            corruptions += 1;
            messages.push(format!("ERROR cluster {c} refcount=0 reference={computed}"));
        }
    }
    report.leaks += leaks;
    report.corruptions += corruptions;
    report.check_errors += check_errors;
    report.messages.append(&mut messages);
    check_copied(meta, storage, &mut report)?;
    report.image_end_offset = highest.map_or(0, |h| (h + 1) * g.cluster_size());
    report.total_clusters = g.clusters_for(meta.header.size);
    Ok(report)
}

/// Checks COPIED on the active L1 and L2 entries against stored refcounts.
fn check_copied(meta: &mut Meta, storage: &dyn Storage, report: &mut CheckReport) -> Result<()> {
    let g = meta.geometry;
    let cs = g.cluster_size();
    // Refcounts that cannot be read end this pass, as the failed refcount
    // lookup ends QEMU's check (the check errors are already counted).
    let unreadable = meta.refcounts.unreadable.clone();
    let readable = |c: HostCluster| !unreadable.contains(&(g.reftable_index(c) as usize));
    let file_len = storage.len().map_err(Error::io("reading the file length", 0))?;
    for i in 0..meta.l1.len() {
        let e = L1Entry(meta.l1[i]);
        if e.validate(&g).is_err() {
            continue;
        }
        let Some(l2) = e.l2_offset() else { continue };
        if l2.0 + cs > file_len {
            continue;
        }
        if !readable(g.host_cluster(l2)) {
            return Ok(());
        }
        let rc = meta.refcounts.get(storage, g.host_cluster(l2))?;
        if (rc == 1) != e.copied() {
            report.corruptions += 1;
            report
                .messages
                .push(format!("ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={:x} refcount={rc}", e.0));
        }
        let mut table = vec![0u8; cs as usize];
        storage.read_at(&mut table, l2.0).map_err(Error::io("reading an L2 table", l2.0))?;
        for j in 0..g.l2_entries() as usize {
            let entry = L2Entry(read_l2_word(&table, j, g.l2_entry_size() as usize));
            let Ok(m) = entry.mapping(&g, meta.header.version) else { continue };
            let (host, copied) = match m {
                L2Mapping::Normal { host, copied } | L2Mapping::ZeroAllocated { host, copied } => (host, copied),
                _ => continue,
            };
            if host.0 + cs > file_len {
                continue;
            }
            if !readable(g.host_cluster(host)) {
                return Ok(());
            }
            let rc = meta.refcounts.get(storage, g.host_cluster(host))?;
            if (rc == 1) != copied {
                report.corruptions += 1;
                report.messages.push(format!("ERROR OFLAG_COPIED data cluster: l2_entry={:x} refcount={rc}", entry.0));
            }
        }
    }
    Ok(())
}

/// Sets COPIED wherever the refcount (as the references count it) is one.
fn fix_copied_flags(meta: &mut Meta, storage: &dyn Storage) -> Result<()> {
    let mut w = new_walker(meta, storage)?;
    w.count(true)?;
    let refs = w.refs;
    let g = meta.geometry;
    for i in 0..meta.l1.len() {
        let e = L1Entry(meta.l1[i]);
        let Some(l2) = e.l2_offset() else { continue };
        if e.validate(&g).is_err() {
            continue;
        }
        let want = refs.get(g.host_cluster(l2).0) == 1;
        if want != e.copied() {
            meta.set_l1(i, if want { e.0 | oxqcow_format::table::COPIED } else { e.0 & !oxqcow_format::table::COPIED });
        }
        meta.load_l2(storage, l2.0)?;
        for j in 0..g.l2_entries() as usize {
            let entry = meta.l2_entry(l2.0, j);
            let Ok(m) = entry.mapping(&g, meta.header.version) else { continue };
            let (host, copied) = match m {
                L2Mapping::Normal { host, copied } | L2Mapping::ZeroAllocated { host, copied } => (host, copied),
                _ => continue,
            };
            let want = refs.get(g.host_cluster(host).0) == 1;
            if want != copied {
                let data = meta.l2.get_mut(l2.0).expect("loaded");
                oxqcow_format::table::write_l2_word(data, j, g.l2_entry_size() as usize, entry.with_copied(want).0);
            }
        }
    }
    meta.flush(storage)
}

/// Lowers the refcount of every leaked cluster to its reference count.
fn fix_leaked_clusters(meta: &mut Meta, storage: &dyn Storage) -> Result<()> {
    let mut w = new_walker(meta, storage)?;
    w.count(true)?;
    let refs = w.refs;
    let mut leaked = Vec::new();
    for_each_stored(meta, storage, |c, stored| {
        let computed = refs.get(c);
        if stored > computed {
            leaked.push((c, stored - computed));
        }
    })?;
    for (c, excess) in leaked {
        for _ in 0..excess {
            meta.refcounts.update(storage, HostCluster(c), -1)?;
        }
    }
    meta.flush_all(storage)
}

/// Writes new refcount structures that match the references exactly.
pub(crate) fn rebuild_refcounts(meta: &mut Meta, storage: &dyn Storage) -> Result<()> {
    let order = meta.geometry.refcount_order();
    rebuild_refcounts_with_order(meta, storage, order)
}

/// Rebuilds the refcount structures with entries `1 << order` bits wide
/// (amend's `refcount_bits`). The header switches to the new table and
/// width in one write of its first sector.
pub(crate) fn rebuild_refcounts_with_order(meta: &mut Meta, storage: &dyn Storage, order: u32) -> Result<()> {
    let mut w = new_walker(meta, storage)?;
    w.count(false)?;
    if w.report.corruptions > 0 {
        return Err(Error::Corrupt(format!(
            "cannot rebuild refcounts: the metadata has {} errors ({})",
            w.report.corruptions,
            w.report.messages.first().cloned().unwrap_or_default()
        )));
    }
    let refs = w.refs;
    let old_geometry = meta.geometry;
    let g = oxqcow_format::Geometry::new(old_geometry.cluster_bits(), order, old_geometry.extended_l2())?;
    let cs = g.cluster_size();
    let rpb = g.refcounts_per_block();
    let per_table_cluster = g.reftable_entries_per_cluster();
    let max = g.max_refcount();
    let file_clusters = g.clusters_for(storage.len().map_err(Error::io("reading the file length", 0))?);
    let mut highest = 0u64;
    for c in 0..refs.len() {
        let r = refs.get(c);
        if r > 0 {
            highest = c;
            if r > max {
                let msg =
                    format!("cluster {c} has {r} references, more than {}-bit refcounts can count", g.refcount_bits());
                return Err(if order == old_geometry.refcount_order() {
                    Error::Corrupt(msg)
                } else {
                    Error::InvalidArgument(format!(
                        "Cannot decrease refcount entry width to {} bits: {msg}",
                        g.refcount_bits()
                    ))
                });
            }
        }
    }
    // New structures go past everything in use and past the old file end,
    // so nothing live is overwritten before the header switches.
    let area = (highest + 1).max(file_clusters);
    let blocks_with_refs: Vec<u64> = (0..=highest / rpb)
        .filter(|&ti| (ti * rpb..((ti + 1) * rpb).min(refs.len())).any(|c| refs.get(c) > 0))
        .collect();
    let mut table_clusters = 1u64;
    let mut new_blocks;
    loop {
        // Blocks needed for the new area itself.
        let mut nb = 1u64;
        loop {
            let end = area + table_clusters + blocks_with_refs.len() as u64 + nb;
            let area_blocks: Vec<u64> =
                (area / rpb..=(end - 1) / rpb).filter(|ti| !blocks_with_refs.contains(ti)).collect();
            if area_blocks.len() as u64 <= nb {
                new_blocks = area_blocks;
                break;
            }
            nb = area_blocks.len() as u64;
        }
        let total_blocks = blocks_with_refs.len() as u64 + new_blocks.len() as u64;
        let end = area + table_clusters + total_blocks;
        let entries = (end - 1) / rpb + 1;
        let needed = entries.div_ceil(per_table_cluster);
        if needed <= table_clusters {
            break;
        }
        table_clusters = needed;
    }
    if table_clusters * cs > oxqcow_format::limits::MAX_REFTABLE_BYTES {
        return Err(Error::NoSpace("the rebuilt refcount table would exceed 8 MiB".into()));
    }
    let mut all_blocks: Vec<u64> = blocks_with_refs.iter().copied().chain(new_blocks.iter().copied()).collect();
    all_blocks.sort_unstable();
    all_blocks.dedup();
    let table_start = area;
    let blocks_start = area + table_clusters;
    let used_end = blocks_start + all_blocks.len() as u64;
    let mut table = vec![0u64; (table_clusters * per_table_cluster) as usize];
    let mut block = vec![0u8; cs as usize];
    for (k, &ti) in all_blocks.iter().enumerate() {
        block.fill(0);
        for i in 0..rpb {
            let c = ti * rpb + i;
            let mut r = refs.get(c);
            if c >= table_start && c < used_end {
                r += 1;
            }
            if r > 0 {
                RefcountBlock::set(&mut block, i as usize, g.refcount_order(), r);
            }
        }
        let offset = (blocks_start + k as u64) * cs;
        storage.write_at(&block, offset).map_err(Error::io("writing a refcount block", offset))?;
        table[ti as usize] = offset;
    }
    let table_offset = table_start * cs;
    storage
        .write_at(&encode_entries(&table), table_offset)
        .map_err(Error::io("writing the refcount table", table_offset))?;
    storage.sync().map_err(Error::io("syncing the rebuilt refcounts", table_offset))?;
    if order == old_geometry.refcount_order() {
        let (pos, field) = refcount_table_fields(table_offset, table_clusters as u32);
        storage.write_at(&field, pos).map_err(Error::io("updating the header", pos))?;
    } else {
        // Width and table change together, in the header's first sector.
        let mut header = meta.header.clone();
        header.refcount_order = order;
        header.refcount_table_offset = table_offset;
        header.refcount_table_clusters = table_clusters as u32;
        let bytes = header.serialize()?;
        storage.write_at(&bytes[..512], 0).map_err(Error::io("updating the header", 0))?;
    }
    storage.sync().map_err(Error::io("syncing the header", 0))?;
    let file_len = storage.len().map_err(Error::io("reading the file length", 0))?;
    meta.header.refcount_order = order;
    meta.geometry = g;
    meta.refcounts.reload_with_geometry(storage, g, table_offset, table_clusters as u32, file_len)?;
    meta.header.refcount_table_offset = table_offset;
    meta.header.refcount_table_clusters = table_clusters as u32;
    meta.update_reserved();
    Ok(())
}
