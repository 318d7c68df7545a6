//! Operations that need the image to themselves (no request in flight,
//! everything flushed): resize, snapshots, the backing file name, making
//! the image empty, and close.

use std::sync::atomic::Ordering;

use super::meta::amend::{Operation, Status};
use super::meta::Meta;
use super::Qcow2;
use crate::error::{Error, Result};
use crate::options::{AmendOptions, Compat, Preallocation};
use crate::storage::Storage;

/// Changes the guest size. Growing maps the new space as `prealloc`
/// says; shrinking frees every cluster past the new end.
pub(super) fn resize(q: &Qcow2, new_size: u64, prealloc: Preallocation) -> Result<()> {
    if q.read_only {
        return Err(Error::ReadOnly);
    }
    q.lock_meta().check_resize(new_size)?;
    let old_size = q.len();
    q.lock_meta().check_bitmaps_resizable()?;
    if new_size > old_size {
        q.unshare_last_cluster(old_size, prealloc != Preallocation::Off)?;
    }
    q.exclusive(|m, st| {
        m.resize(st, new_size, prealloc)?;
        m.resize_bitmaps(new_size);
        Ok(())
    })?;
    // A grown overlay must not show what its backing image has past
    // the old end: zero the new area, as QEMU's truncate does.
    if let Some(backing) = &q.backing {
        let blen = crate::image::BlockDevice::len(&**backing);
        if new_size > old_size && blen > old_size {
            let end = if q.version() >= 3 { new_size } else { new_size.min(blen) };
            // Not a guest write: bitmaps do not record it (as in QEMU,
            // where the driver zeroes the area itself).
            q.write_zeroes_inner(old_size, end - old_size, false)?;
            q.write_through()?;
        }
    }
    Ok(())
}

/// Creates an internal snapshot of the active layer described by
/// `template`: its name, id (empty: the next free number; an id in use
/// is refused), date, VM clock and instruction count are recorded as
/// given (`qemu-img snapshot -c` records microsecond dates and an
/// instruction count of 0); everything else comes from the image.
pub(super) fn snapshot_create_with(
    q: &Qcow2,
    template: &oxqcow_format::SnapshotEntry,
) -> Result<oxqcow_format::SnapshotEntry> {
    if q.read_only {
        return Err(Error::ReadOnly);
    }
    q.refuse_snapshots_with_data_file()?;
    let modes = q.discard;
    q.exclusive(|m, st| m.with_dirty_bit(st, |m| m.snapshot_create(st, template, modes)))
}

/// Deletes the snapshot with this id (or, failing that, this name).
pub(super) fn snapshot_delete(q: &Qcow2, id_or_name: &str) -> Result<()> {
    if q.read_only {
        return Err(Error::ReadOnly);
    }
    q.refuse_snapshots_with_data_file()?;
    let modes = q.discard;
    q.exclusive(|m, st| m.with_dirty_bit(st, |m| m.snapshot_delete(st, id_or_name, modes)))
}

/// Reverts the active layer to the snapshot with this id (or name).
/// Refused while the image has persistent bitmaps, as QEMU's
/// `bdrv_snapshot_goto` refuses it (they would no longer describe the
/// disk).
pub(super) fn snapshot_apply(q: &Qcow2, id_or_name: &str) -> Result<()> {
    if q.read_only {
        return Err(Error::ReadOnly);
    }
    if q.has_bitmaps() {
        return Err(Error::InvalidArgument("Device has active dirty bitmaps".into()));
    }
    q.refuse_snapshots_with_data_file()?;
    let modes = q.discard;
    q.exclusive(|m, st| m.with_dirty_bit(st, |m| m.snapshot_apply(st, id_or_name, modes)))
}

/// Records a different backing file (or none) in the header. The data
/// is not touched: this is `rebase -u`. The backing image attached to
/// this handle stays until the image is reopened.
pub(super) fn set_backing_file(q: &Qcow2, name: Option<&str>, format: Option<&str>) -> Result<()> {
    if q.read_only {
        return Err(Error::ReadOnly);
    }
    if let Some(n) = name {
        if n.len() > oxqcow_format::limits::MAX_BACKING_NAME as usize {
            return Err(Error::InvalidArgument(format!("Backing file name too long ({} bytes)", n.len())));
        }
    }
    q.exclusive(|m, st| m.set_backing_file(st, name, format))
}

/// Drops every cluster of the active layer: the image then reads as its
/// backing file (or zeros). Used by commit.
pub(super) fn make_empty(q: &Qcow2) -> Result<()> {
    if q.read_only {
        return Err(Error::ReadOnly);
    }
    q.exclusive(|m, st| m.drop_all_clusters(st))
}

/// Changes the image's options as `qemu-img amend` does. `progress`
/// receives QEMU's amend status: (work done, total work), which
/// qemu-img prints as `100 * done / total` percent.
pub(super) fn amend(q: &Qcow2, opts: &AmendOptions, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
    if q.is_read_only() {
        return Err(Error::ReadOnly);
    }
    let (old_version, new_version) = q.exclusive(|m, _| {
        m.amend_check(opts)?;
        let version = m.version();
        Ok((version, opts.compat.map_or(version, Compat::version)))
    })?;
    let old_bits = q.geometry().refcount_bits();
    let operations =
        i64::from(new_version != old_version) + i64::from(opts.refcount_bits.is_some_and(|b| b != old_bits));
    let mut status = Status::new(progress, operations);
    q.exclusive(|m, st| {
        let res = m.amend_up_to_size(st, opts, new_version, &mut status);
        // Also after a failure: an upgrade may have succeeded before it.
        q.refresh_header_facts(m);
        res
    })?;
    if let Some(size) = opts.size.filter(|&s| s != 0) {
        q.exclusive(|m, _| m.amend_size_check(size))?;
        q.resize(size, Preallocation::Off)?;
    }
    if new_version < old_version {
        status.start(Operation::Downgrading);
        q.exclusive(|m, st| {
            let res = m.downgrade(st, &mut status);
            q.refresh_header_facts(m);
            res
        })?;
    }
    Ok(())
}

impl Qcow2 {
    /// Growing zeroes the bytes past the old end inside its last cluster,
    /// in place. When a snapshot shares that cluster (no COPIED flag),
    /// rewrite its in-disk part first: the write copies the cluster into
    /// one of our own, where the zeroing may land.
    ///
    /// With `preallocating` over a backing file, an unallocated old last
    /// cluster is rewritten the same way: preallocation would map it to a
    /// new cluster of zeros, losing the backing file's data in the old
    /// disk (QEMU copies it into the preallocated cluster).
    pub(crate) fn unshare_last_cluster(&self, old_size: u64, preallocating: bool) -> Result<()> {
        let g = self.geometry();
        let start = g.align_down(old_size);
        if start == old_size {
            return Ok(());
        }
        let reads_backing = preallocating && self.backing().is_some();
        let shared = self.lock_meta().cluster_shared_or_backed(self.storage_ref(), start, reads_backing)?;
        if shared {
            let mut buf = vec![0u8; (old_size - start) as usize];
            self.read_at(&mut buf, start)?;
            self.write_at_inner(&buf, start)?;
        }
        Ok(())
    }

    /// Runs a bitmap change with the image to itself, then takes over
    /// whether any bitmap records writes now.
    pub(crate) fn bitmap_op<T>(&self, f: impl FnOnce(&mut Meta, &dyn Storage) -> Result<T>) -> Result<T> {
        if self.is_read_only() {
            return Err(Error::ReadOnly);
        }
        let res = self.exclusive(f);
        let tracking = self.lock_meta().bitmaps_tracking();
        self.set_tracking(tracking);
        res
    }

    /// Runs `f` with exclusive access: no request in flight, no allocation
    /// pending, metadata flushed.
    pub(crate) fn exclusive<T>(&self, f: impl FnOnce(&mut Meta, &dyn Storage) -> Result<T>) -> Result<T> {
        let _gate = self.io_gate.write().unwrap_or_else(|p| p.into_inner());
        let mut m = self.lock_meta();
        while m.allocating() {
            m = self.alloc_done.wait(m).unwrap_or_else(|p| p.into_inner());
        }
        m.settle(self.storage_ref(), self.discard)?;
        let res = f(&mut m, self.storage_ref());
        if let Err(e) = &res {
            m.exclusive_failed(self.storage_ref(), e);
        }
        self.size.store(m.size(), Ordering::Release);
        res
    }

    /// The clean close (QEMU's `qcow2_inactivate`). With `last`, the image
    /// counts as closed whatever happens; without, a failure to store the
    /// bitmaps leaves it open, so that the close tries again (QEMU marks a
    /// node inactive only when its inactivation succeeded, and its close
    /// inactivates a node that is not).
    pub(crate) fn close_inner(&self, last: bool) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) || self.read_only || self.lock_meta().stopped_by_corruption() {
            return Ok(());
        }
        let res = self.flush().and_then(|()| self.lock_meta().close(self.storage_ref()));
        if !last && matches!(res, Err(Error::BitmapsLost(_))) {
            self.closed.store(false, Ordering::Release);
        }
        res
    }

    /// Refuses internal snapshot operations on images with an external
    /// data file, as QEMU does (-ENOTSUP): the snapshot could not keep its
    /// own copy of the data.
    pub(crate) fn refuse_snapshots_with_data_file(&self) -> Result<()> {
        if self.has_data_file() {
            return Err(Error::Unsupported("internal snapshots of images with an external data file".into()));
        }
        Ok(())
    }
}
