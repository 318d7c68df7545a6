//! QEMU's `check_oflag_copied`: the COPIED flags of the active tables
//! against the refcounts, fixed when asked.

use oxqcow_format::table::{read_l2_word, write_l2_word, ClusterType, L1Entry, L2Entry, COPIED};

use super::*;

impl Checker<'_> {
    /// QEMU's `check_oflag_copied` over the active L1 and L2 tables.
    pub(super) fn check_oflag_copied(&mut self, res: &mut CheckReport, fix: Fix) -> Step<()> {
        let g = self.g;
        let cs = g.cluster_size();
        let repair = if fix.errors {
            true
        } else if fix.leaks {
            res.check_errors == 0 && res.corruptions == 0 && res.leaks == 0
        } else {
            false
        };
        let verb = if repair { "Repairing" } else { "ERROR" };
        for i in 0..self.meta.l1.len() {
            let l1_entry = self.meta.l1[i];
            let l2_offset = L1Entry(l1_entry).offset_bits();
            if l2_offset == 0 {
                continue;
            }
            let Ok(rc) = self.get_refcount(l2_offset >> g.cluster_bits()) else { continue };
            if (rc == 1) != L1Entry(l1_entry).copied() {
                res.corruptions += 1;
                self.say(&format!("{verb} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1_entry:x} refcount={rc}"));
                if repair {
                    let new = if rc == 1 { l1_entry | COPIED } else { l1_entry & !COPIED };
                    let at = self.meta.header.l1_table_offset + i as u64 * 8;
                    if let Some(t) = self.meta.refcounts.overlap(at, 8, crate::qcow2::meta::overlap::ACTIVE_L1) {
                        self.signal_overlap(t)?;
                        res.check_errors += 1;
                        return Err(Stop::Errno(EIO));
                    }
                    self.st.write_at(&new.to_be_bytes(), at).map_err(Error::io("writing an L1 entry", at))?;
                    self.st.sync().map_err(Error::io("syncing an L1 entry", at))?;
                    self.meta.l1[i] = new;
                    res.corruptions -= 1;
                    res.corruptions_fixed += 1;
                }
            }
            let mut table = self.read_padded(l2_offset, cs)?;
            let mut dirty = 0u64;
            let esize = g.l2_entry_size() as usize;
            let external = self.meta.data_file.is_some();
            for j in 0..g.l2_entries() as usize {
                let entry = read_l2_word(&table, j, esize);
                if !matches!(
                    L2Entry(entry).cluster_type(g.extended_l2(), external),
                    ClusterType::Normal | ClusterType::ZeroAlloc
                ) {
                    continue;
                }
                // QEMU takes every data file cluster's refcount to be 1.
                let rc = if external {
                    1
                } else {
                    let Ok(rc) = self.get_refcount(L2Entry(entry).offset_bits() >> g.cluster_bits()) else { continue };
                    rc
                };
                if (rc == 1) != L2Entry(entry).copied() {
                    res.corruptions += 1;
                    self.say(&format!("{verb} OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={rc}"));
                    if repair {
                        let new = if rc == 1 { entry | COPIED } else { entry & !COPIED };
                        write_l2_word(&mut table, j, esize, new);
                        dirty += 1;
                    }
                }
            }
            if dirty > 0 {
                if let Some(t) = self.meta.refcounts.overlap(l2_offset, cs, crate::qcow2::meta::overlap::ACTIVE_L2) {
                    self.signal_overlap(t)?;
                    self.say(&format!("ERROR: Could not write L2 table; metadata overlap check failed: {EIO}"));
                    res.check_errors += 1;
                    return Err(Stop::Errno(EIO));
                }
                self.st.write_at(&table, l2_offset).map_err(Error::io("writing an L2 table", l2_offset))?;
                res.corruptions -= dirty;
                res.corruptions_fixed += dirty;
            }
        }
        self.st.sync().map_err(Error::io("syncing the repaired tables", 0))?;
        Ok(())
    }
}
