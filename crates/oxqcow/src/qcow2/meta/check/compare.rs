//! QEMU's `compare_refcounts` and the leak and error fixing around it: the
//! stored refcounts against the counted ones.

use super::*;

impl Checker<'_> {
    /// QEMU's `compare_ref_counts`; returns the highest cluster in use.
    pub(super) fn compare(&mut self, res: &mut CheckReport, fix: Fix, rebuild: &mut bool) -> Step<u64> {
        let mut highest = 0;
        let mut i = 0;
        while i < self.imrt.len() {
            let stored = match self.get_refcount(i) {
                Ok(r) => r,
                Err(Stop::Errno(text)) => {
                    self.say(&format!("Can't get refcount for cluster {i}: {text}"));
                    res.check_errors += 1;
                    i += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let counted = self.imrt.get(i);
            if stored > 0 || counted > 0 {
                highest = i;
            }
            if stored != counted {
                #[derive(PartialEq)]
                enum Fixed {
                    No,
                    Leak,
                    Corruption,
                }
                let fixed = if stored == 0 {
                    *rebuild = true;
                    Fixed::No
                } else if stored > counted && fix.leaks {
                    Fixed::Leak
                } else if stored < counted && fix.errors {
                    Fixed::Corruption
                } else {
                    Fixed::No
                };
                let verb = if fixed != Fixed::No {
                    "Repairing"
                } else if stored < counted {
                    "ERROR"
                } else {
                    "Leaked"
                };
                self.say(&format!("{verb} cluster {i} refcount={stored} reference={counted}"));
                if fixed != Fixed::No && self.update_refcount(i, counted).is_ok() {
                    if fixed == Fixed::Leak {
                        res.leaks_fixed += 1;
                    } else {
                        res.corruptions_fixed += 1;
                    }
                    i += 1;
                    continue;
                }
                if stored < counted {
                    res.corruptions += 1;
                } else {
                    res.leaks += 1;
                }
            }
            i += 1;
        }
        self.write_block()?;
        self.st.sync().map_err(Error::io("syncing refcount blocks", 0))?;
        Ok(highest)
    }

    /// QEMU's `qcow2_check_refcounts`.
    pub(super) fn check_refcounts(&mut self, res: &mut CheckReport, fix: Fix) -> Step<()> {
        let g = self.g;
        let file_len = self.file_len()?;
        let nb_clusters = g.clusters_for(file_len);
        if nb_clusters > MAX_CHECK_CLUSTERS {
            res.check_errors += 1;
            return Err(Stop::Errno(EFBIG));
        }
        res.total_clusters = g.clusters_for(self.meta.header.size);
        self.imrt = Imrt::new(nb_clusters);
        let mut rebuild = false;
        self.calculate_refcounts(res, fix, &mut rebuild)?;
        let pre_compare = res.clone();
        let mut highest = self.compare(res, Fix::default(), &mut rebuild)?;
        if rebuild && fix.errors {
            let old = res.clone();
            self.say("Rebuilding refcount structure");
            self.rebuild_refcount_structure()?;
            res.corruptions = 0;
            res.leaks = 0;
            rebuild = false;
            self.imrt.clear();
            self.calculate_refcounts(res, Fix::default(), &mut rebuild)?;
            let mut fresh_leaks = 0;
            if fix.leaks {
                let saved = std::mem::take(res);
                highest = self.compare(res, Fix { leaks: true, errors: false }, &mut rebuild)?;
                if rebuild {
                    self.say("ERROR rebuilt refcount structure is still broken");
                }
                fresh_leaks = res.leaks;
                *res = saved;
            }
            if res.corruptions < old.corruptions {
                res.corruptions_fixed += old.corruptions - res.corruptions;
            }
            if res.leaks < old.leaks {
                res.leaks_fixed += old.leaks - res.leaks;
            }
            res.leaks += fresh_leaks;
        } else if fix.any() {
            if rebuild {
                self.say("ERROR need to rebuild refcount structures");
                res.check_errors += 1;
                return Err(Stop::Errno(EIO));
            }
            if res.leaks > 0 || res.corruptions > 0 {
                *res = pre_compare;
                highest = self.compare(res, fix, &mut rebuild)?;
            }
        }
        self.check_oflag_copied(res, fix)?;
        res.image_end_offset = (highest + 1) * g.cluster_size();
        Ok(())
    }
}
