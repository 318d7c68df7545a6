//! Refcount rebuild for images opened with the dirty bit set (lazy
//! refcounts): counts every reference the metadata holds, writes brand-new
//! refcount structures from those counts past the end of everything in use,
//! syncs, and only then points the header at them, so a crash during a
//! rebuild loses nothing.

use std::collections::HashMap;

use oxqcow_format::header::refcount_table_fields;
use oxqcow_format::refcount::RefcountBlock;
use oxqcow_format::table::{decode_entries, encode_entries, read_l2_word, L1Entry};
use oxqcow_format::{CompressedDescriptor, HostOffset, L2Entry, L2Mapping, RefcountTableEntry};

use crate::check::CheckReport;
use crate::error::{Error, Result};
use crate::qcow2::Meta;
use crate::storage::Storage;

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
    meta.refcounts.reload_with_geometry(storage, g, table_offset, table_clusters as u32, file_len, false)?;
    meta.header.refcount_table_offset = table_offset;
    meta.header.refcount_table_clusters = table_clusters as u32;
    meta.update_reserved();
    Ok(())
}
