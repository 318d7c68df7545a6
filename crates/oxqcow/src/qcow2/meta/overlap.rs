//! Metadata overlap checks: before anything is written to the image file,
//! make sure it does not land on metadata it is not meant to replace.
//!
//! QEMU's templates and modes: `none`, `constant` (header, active L1,
//! refcount table, snapshot table, bitmap directory: positions known
//! without I/O), `cached` (the default: also active L2 tables and refcount
//! blocks, known from the in-memory L1 and refcount table) and `all` (also
//! snapshot L1 and L2 tables). A hit means the metadata is corrupt: the
//! image is marked corrupt and the write refused.

use std::collections::BTreeSet;

use crate::error::Error;
pub use crate::options::overlap::*;

/// Where the metadata is, in host clusters, as far as the mask asks.
#[derive(Clone, Debug)]
pub(crate) struct MetadataMap {
    /// Templates checked.
    pub(crate) mask: u32,
    /// Fixed structures: (template, first cluster, clusters).
    pub(crate) constant: Vec<(u32, u64, u64)>,
    /// Clusters of active L2 tables.
    pub(crate) active_l2: BTreeSet<u64>,
    /// Snapshot L1 tables (first cluster, clusters), when `mask` has INACTIVE_L1.
    pub(crate) inactive_l1: Vec<(u64, u64)>,
    /// Clusters of snapshot L2 tables, when `mask` has INACTIVE_L2.
    pub(crate) inactive_l2: BTreeSet<u64>,
}

impl Default for MetadataMap {
    fn default() -> Self {
        MetadataMap {
            mask: CACHED,
            constant: Vec::new(),
            active_l2: BTreeSet::new(),
            inactive_l1: Vec::new(),
            inactive_l2: BTreeSet::new(),
        }
    }
}

impl MetadataMap {
    /// The first template (outside `ignore`) that clusters `first..=last`
    /// overlap, ignoring refcount blocks (the refcount layer checks those).
    pub(crate) fn find(&self, first: u64, last: u64, ignore: u32) -> Option<u32> {
        let mask = self.mask & !ignore;
        for &(template, start, count) in &self.constant {
            if mask & template != 0 && count > 0 && first < start + count && start <= last {
                return Some(template);
            }
        }
        if mask & ACTIVE_L2 != 0 && self.active_l2.range(first..=last).next().is_some() {
            return Some(ACTIVE_L2);
        }
        if mask & INACTIVE_L1 != 0 && self.inactive_l1.iter().any(|&(s, n)| n > 0 && first < s + n && s <= last) {
            return Some(INACTIVE_L1);
        }
        if mask & INACTIVE_L2 != 0 && self.inactive_l2.range(first..=last).next().is_some() {
            return Some(INACTIVE_L2);
        }
        None
    }

    /// Constant structures only (what must never be allocated).
    /// Returns the structure's template and its first cluster.
    pub(crate) fn constant_overlap(&self, first: u64, count: u64) -> Option<(u32, u64)> {
        self.constant.iter().find(|&&(_, s, n)| n > 0 && first < s + n && s < first + count).map(|&(t, s, _)| (t, s))
    }
}

const OVERLAP_TEXT: &str = "Preventing invalid write on metadata";

/// The error for a refused write.
pub(crate) fn overlap_error(template: u32) -> Error {
    // QEMU's words exactly: they are also the corruption message printed.
    Error::Corrupt(format!("{OVERLAP_TEXT} (overlaps with {})", template_name(template)))
}

/// Whether `e` is a write refused by the overlap check (QEMU marks the
/// image corrupt for it).
pub(crate) fn is_overlap_error(e: &Error) -> bool {
    matches!(e, Error::Corrupt(text) if text.starts_with(OVERLAP_TEXT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_templates() {
        let mut o = OverlapOptions::default();
        o.apply("overlap-check", "none").unwrap();
        assert_eq!(o.mask().unwrap(), 0);
        o.apply("overlap-check.active-l2", "on").unwrap();
        assert_eq!(o.mask().unwrap(), ACTIVE_L2);
        o.apply("overlap-check", "all").unwrap();
        o.apply("overlap-check.inactive-l2", "off").unwrap();
        assert_eq!(o.mask().unwrap(), (ALL & !INACTIVE_L2) | ACTIVE_L2);
        assert!(o.apply("overlap-check", "some").is_err());
        assert!(o.apply("overlap-check.nothing", "on").is_err());
    }

    #[test]
    fn finds_overlaps() {
        let mut map = MetadataMap { constant: vec![(MAIN_HEADER, 0, 1), (ACTIVE_L1, 3, 1)], ..Default::default() };
        map.active_l2.insert(10);
        assert_eq!(map.find(0, 0, 0), Some(MAIN_HEADER));
        assert_eq!(map.find(2, 4, 0), Some(ACTIVE_L1));
        assert_eq!(map.find(3, 3, ACTIVE_L1), None);
        assert_eq!(map.find(9, 11, 0), Some(ACTIVE_L2));
        assert_eq!(map.find(11, 20, 0), None);
        map.mask = CONSTANT;
        assert_eq!(map.find(10, 10, 0), None);
    }
}
