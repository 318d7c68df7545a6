//! Metadata laid out ahead of a copy, for targets that must be written
//! front to back: a new object in an object store is uploaded while it is
//! written, and a part once sent cannot change.
//!
//! A copy allocates an L2 table when it first writes into the table's
//! range, and a refcount block when the file first grows into the block's
//! range; both land between data clusters and are rewritten for as long
//! as the copy stays in their range (an L2 table for 512 MiB of guest
//! data, a refcount block for 2 GiB of file, with 64 KiB clusters). Made
//! up front, every table the copy will touch lies before the first data
//! cluster, and past that point the copy only appends data clusters, each
//! written once. Compressed data then packs only into the newest cluster
//! (QEMU packs into the last partly filled one, however many clusters
//! were allocated since).

use oxqcow_format::GuestOffset;

use crate::error::Result;
use crate::qcow2::meta::Meta;
use crate::storage::Storage;

impl Meta {
    /// Allocates the L2 tables of every guest range in `data` and the
    /// refcount blocks that cover the file once every cluster of those
    /// ranges holds data (an upper bound: ranges may share clusters, and
    /// zeros found inside them are not written), then writes them out.
    pub(crate) fn reserve_for_copy(&mut self, storage: &dyn Storage, data: &[(u64, u64)]) -> Result<()> {
        let g = self.geometry;
        let size = self.size();
        let mut data_clusters = 0u64;
        let mut last_table = None;
        for &(offset, len) in data {
            let end = offset.saturating_add(len).min(size);
            if offset >= end {
                continue;
            }
            let first = g.align_down(offset);
            data_clusters += g.clusters_for(end - first);
            let first_table = g.l1_index(GuestOffset(offset));
            let last = g.l1_index(GuestOffset(end - 1));
            for l1_index in first_table..=last {
                if last_table.is_some_and(|t| t >= l1_index) {
                    continue;
                }
                self.ensure_l2_for_write(storage, l1_index)?;
                last_table = Some(l1_index);
            }
        }
        self.refcounts.cover_ahead(storage, data_clusters)?;
        self.refcounts.append_only = true;
        self.flush_all(storage)
    }
}
