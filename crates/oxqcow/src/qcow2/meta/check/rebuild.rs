//! QEMU's `rebuild_refcount_structure`: new refcount blocks and table
//! written from the in-memory counts into clusters nothing uses, the
//! header switched to them, the old ones freed.

use std::collections::BTreeSet;

use oxqcow_format::refcount::RefcountBlock;
use oxqcow_format::refcount::RefcountTableEntry;
use oxqcow_format::table::encode_entries;

use super::*;

impl Checker<'_> {
    /// Clusters that some refcount table entry names, valid or not: the
    /// rebuild never puts new structures there (QEMU does, when the entry
    /// is broken, and then fails on its overlap check).
    pub(super) fn named_by_reftable(&self) -> BTreeSet<u64> {
        let g = self.g;
        let mut out = BTreeSet::new();
        for &e in &self.reftable {
            let offset = RefcountTableEntry(e).block_offset().map_or(0, |o| o.0);
            if offset != 0 {
                // An unaligned entry touches the next cluster too; one near
                // the top of the address space must not overflow.
                let first = offset >> g.cluster_bits();
                out.insert(first);
                out.insert(first + u64::from(g.offset_in_cluster(offset) != 0));
            }
        }
        out
    }

    /// QEMU's `alloc_clusters_imrt`: the first run of `count` clusters the
    /// in-memory table says are free, from `*first_free` on.
    pub(super) fn alloc_imrt(&mut self, count: u64, first_free: &mut u64, avoid: &BTreeSet<u64>) -> u64 {
        let mut cluster = *first_free;
        let mut contiguous = 0u64;
        let mut first_gap = true;
        while cluster < self.imrt.len() && contiguous < count {
            if self.imrt.get(cluster) == 0 && !avoid.contains(&cluster) {
                contiguous += 1;
                if first_gap {
                    *first_free = cluster;
                    first_gap = false;
                }
            } else if contiguous > 0 {
                contiguous = 0;
            }
            cluster += 1;
        }
        while contiguous < count {
            // Past the table's end every cluster is free, but for those a
            // broken entry names.
            if avoid.contains(&cluster) {
                contiguous = 0;
            } else {
                contiguous += 1;
            }
            cluster += 1;
        }
        self.imrt.grow(cluster);
        let start = cluster - contiguous;
        for c in start..start + count {
            self.imrt.set(c, 1);
        }
        start << self.g.cluster_bits()
    }

    /// Writes one refcount block: the in-memory counts of its range.
    pub(super) fn write_refblock(&mut self, index: u64, offset: u64) -> Step<()> {
        let g = self.g;
        let per_block = g.refcounts_per_block();
        let mut block = vec![0u8; g.cluster_size() as usize];
        for k in 0..per_block {
            let r = self.imrt.get(index * per_block + k);
            if r != 0 {
                RefcountBlock::set(&mut block, k as usize, g.refcount_order(), r);
            }
        }
        self.st.write_at(&block, offset).map_err(Error::io("writing a refcount block", offset))?;
        Ok(())
    }

    /// QEMU's `rebuild_refcounts_write_refblocks`: a block for every range
    /// of `[first, end)` with a count in it. Returns whether the table grew.
    pub(super) fn write_refblocks(
        &mut self,
        first: u64,
        mut end: u64,
        table: &mut Vec<u64>,
        avoid: &BTreeSet<u64>,
    ) -> Step<bool> {
        let g = self.g;
        let per_block = g.refcounts_per_block();
        let per_table_cluster = g.cluster_size() / 8;
        let mut first_free = 0u64;
        let mut grown = false;
        let mut cluster = first;
        while cluster < end {
            if self.imrt.get(cluster) == 0 {
                cluster += 1;
                continue;
            }
            let index = cluster / per_block;
            let start = index * per_block;
            let offset = match table.get(index as usize).copied().filter(|&o| o != 0) {
                Some(o) => o,
                None => {
                    first_free = first_free.max(start);
                    let o = self.alloc_imrt(1, &mut first_free, avoid);
                    let c = o >> g.cluster_bits();
                    if c >= end {
                        end = c + 1;
                    }
                    if table.len() as u64 <= index {
                        let entries = (index + 1).div_ceil(per_table_cluster) * per_table_cluster;
                        table.resize(entries as usize, 0);
                        grown = true;
                    }
                    table[index as usize] = o;
                    o
                }
            };
            self.write_refblock(index, offset)?;
            cluster = start + per_block;
        }
        Ok(grown)
    }

    /// QEMU's `rebuild_refcount_structure`.
    pub(super) fn rebuild_refcount_structure(&mut self) -> Step<()> {
        self.write_block()?;
        self.block = None;
        let g = self.g;
        let avoid = self.named_by_reftable();
        let mut table: Vec<u64> = Vec::new();
        let len = self.imrt.len();
        self.write_refblocks(0, len, &mut table, &avoid)?;
        let (offset, clusters) = loop {
            let clusters = g.clusters_for(table.len() as u64 * 8);
            let mut first_free = 0;
            let offset = self.alloc_imrt(clusters, &mut first_free, &avoid);
            let start = offset >> g.cluster_bits();
            if !self.write_refblocks(start, start + clusters, &mut table, &avoid)? {
                break (offset, clusters);
            }
            for c in start..start + clusters {
                self.imrt.set(c, 0);
            }
        };
        if table.len() as u64 * 8 > oxqcow_format::limits::MAX_REFTABLE_BYTES {
            return Err(Stop::Errno(EFBIG));
        }
        let bytes = encode_entries(&table);
        self.st.write_at(&bytes, offset).map_err(Error::io("writing the refcount table", offset))?;
        self.st.sync().map_err(Error::io("syncing the rebuilt refcounts", offset))?;
        let (pos, field) = oxqcow_format::header::refcount_table_fields(offset, clusters as u32);
        self.st.write_at(&field, pos).map_err(Error::io("updating the header", pos))?;
        self.st.sync().map_err(Error::io("syncing the header", pos))?;
        self.meta.header.refcount_table_offset = offset;
        self.meta.header.refcount_table_clusters = clusters as u32;
        self.reftable = table;
        self.reftable_offset = offset;
        self.block = None;
        // The overlap checks of the repairs still to come (COPIED flags)
        // must see the new structures, not the old table: an L2 table the
        // damage put over the old table is legitimate now, as in QEMU.
        self.reload_meta()?;
        Ok(())
    }
}
