//! The deferred frees: references that L2/L1 changes dropped, whose
//! refcount decrements wait until those changes are durable (see the flush
//! order in ARCHITECTURE.md), and which clusters they will leave free, so
//! that an allocation knows when QEMU, which frees at once, would reuse
//! one of them.

use std::collections::HashMap;

use oxqcow_format::HostCluster;

use crate::error::Result;
use crate::qcow2::meta::FreeReason;

/// The deferred frees of an image, in the order they were made.
#[derive(Default)]
pub(crate) struct PendingFrees {
    list: Vec<(HostCluster, FreeReason)>,
    /// How many entries of `list` [`PendingFrees::lowest_freed`] looked at
    /// (each is looked at once: the list is only appended to until taken).
    scanned: usize,
    /// How many of the scanned entries drop a reference on each cluster (a
    /// compressed cluster's frees may name one host cluster several times).
    counts: HashMap<u64, u64>,
    /// The lowest scanned cluster whose frees drop its refcount to zero.
    lowest: Option<u64>,
}

impl PendingFrees {
    pub(crate) fn push(&mut self, cluster: HostCluster, reason: FreeReason) {
        self.list.push((cluster, reason));
    }

    pub(crate) fn len(&self) -> usize {
        self.list.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Takes every deferred free, to apply them.
    pub(crate) fn take(&mut self) -> Vec<(HostCluster, FreeReason)> {
        std::mem::take(self).list
    }

    /// The lowest cluster these frees will leave with refcount 0, given each
    /// cluster's refcount now. A cluster whose frees were pending is
    /// referenced by no active table any more, so its refcount cannot rise
    /// until they are applied (snapshot operations settle first); compressed
    /// packing may add a reference to the cluster being packed, which at worst
    /// makes the answer too low, and the caller flush once for nothing.
    pub(crate) fn lowest_freed(&mut self, mut refcount: impl FnMut(HostCluster) -> Result<u64>) -> Result<Option<u64>> {
        while let Some(&(HostCluster(c), _)) = self.list.get(self.scanned) {
            let n = self.counts.get(&c).copied().unwrap_or(0) + 1;
            let freed = self.lowest.is_none_or(|l| c < l) && refcount(HostCluster(c))? <= n;
            self.counts.insert(c, n);
            self.scanned += 1;
            if freed {
                self.lowest = Some(c);
            }
        }
        Ok(self.lowest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_is_freed_once_its_frees_reach_its_refcount() {
        let mut p = PendingFrees::default();
        let refcount = |c: HostCluster| Ok(if c.0 == 5 { 2 } else { 1 });
        p.push(HostCluster(9), FreeReason::Request);
        p.push(HostCluster(5), FreeReason::Other);
        assert_eq!(p.lowest_freed(refcount).unwrap(), Some(9), "cluster 5 keeps a reference");
        p.push(HostCluster(5), FreeReason::Other);
        assert_eq!(p.lowest_freed(refcount).unwrap(), Some(5));
        assert_eq!(p.take().len(), 3);
        assert!(p.is_empty());
        assert_eq!(p.lowest_freed(refcount).unwrap(), None, "taking them forgets the scan");
    }
}
