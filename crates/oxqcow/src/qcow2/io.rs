//! Guest I/O: reads, writes, zero writes, discards, compressed writes and
//! flushes, each planned under the metadata lock and carried out without
//! it (see the module docs of [`super`] for the locking rules).

use std::sync::atomic::Ordering;
use std::sync::MutexGuard;

use oxqcow_format::{GuestOffset, L2Mapping};

use super::meta::mapping::ReadSegment;
use super::meta::plan::{CompressedPlan, WritePlan};
use super::meta::Meta;
use super::{Qcow2, MAX_PENDING_FREES};
use crate::error::{Error, Result};
use crate::extent::Extent;
use crate::storage::Storage;

/// Reads `buf.len()` bytes at guest `offset`.
pub(super) fn read(q: &Qcow2, buf: &mut [u8], offset: u64) -> Result<()> {
    q.check_range(offset, buf.len() as u64)?;
    read_unchecked(q, buf, offset)
}

/// Reads at an offset the caller checked: in the disk, or in the VM state
/// area after it.
pub(super) fn read_unchecked(q: &Qcow2, buf: &mut [u8], offset: u64) -> Result<()> {
    if q.crypt.is_some() && !is_sector_aligned(offset, buf.len() as u64) {
        // Encryption works on whole sectors: read them and copy out.
        let (start, end) = sector_bounds(offset, buf.len() as u64);
        let mut bounce = vec![0u8; (end - start) as usize];
        read_unchecked(q, &mut bounce, start)?;
        let at = (offset - start) as usize;
        buf.copy_from_slice(&bounce[at..at + buf.len()]);
        return Ok(());
    }
    let _gate = q.io_gate.read().unwrap_or_else(|p| p.into_inner());
    let plan = {
        let mut m = q.lock_meta();
        match m.plan_read(q.storage_ref(), GuestOffset(offset), buf.len() as u64) {
            Ok(p) => p,
            Err(e) => {
                if e.kind() == crate::ErrorKind::Corrupt {
                    m.fail(q.storage_ref(), &e);
                }
                return Err(e);
            }
        }
    };
    q.read_segments(&plan, GuestOffset(offset), buf)
}

/// Makes every completed write durable.
pub(super) fn flush(q: &Qcow2) -> Result<()> {
    if q.read_only {
        return Ok(());
    }
    let frees = {
        let mut m = q.lock_meta();
        if let Some(e) = m.failure() {
            return Err(e);
        }
        // Guest data in an external data file first, as QEMU flushes
        // its children: the metadata flush may make it reachable.
        if let Err(e) = m.sync_data().and_then(|()| m.flush(q.storage_ref())) {
            m.fail(q.storage_ref(), &e);
            return Err(e);
        }
        m.take_pending_frees()
    };
    if frees.is_empty() {
        return Ok(());
    }
    // Wait for every request that may still use a freed cluster.
    let _gate = q.io_gate.write().unwrap_or_else(|p| p.into_inner());
    let mut m = q.lock_meta();
    let st = q.storage_ref();
    let mut res = m.apply_frees(st, frees, q.discard);
    // The decrements are in the refcount cache now: write them too, so
    // that a crash after flush returns leaves no leaked cluster (with
    // lazy refcounts, refcounts are rebuilt after a crash anyway).
    if res.is_ok() {
        res = m.write_applied_frees(st);
    }
    if let Err(e) = res {
        m.fail(st, &e);
        return Err(e);
    }
    Ok(())
}

/// Describes `[offset, offset + len)` as extents of equal status.
/// Ranges this image does not allocate are described by the backing
/// image, one level deeper; past the backing image's end they read as
/// zeros at this level (as qemu-img map reports them).
pub(super) fn block_status(q: &Qcow2, offset: u64, len: u64) -> Result<Vec<Extent>> {
    q.check_range(offset, len)?;
    let mut own = {
        let mut m = q.lock_meta();
        // Corruption met here is signalled as on a read (QEMU's block
        // status goes through the same lookup).
        m.block_status(q.storage_ref(), GuestOffset(offset), len).inspect_err(|e| {
            if e.kind() == crate::ErrorKind::Corrupt {
                m.fail(q.storage_ref(), e);
            }
        })?
    };
    if q.crypt.is_some() {
        // The host bytes are ciphertext: as QEMU, no offset is reported
        // for them.
        own.iter_mut().for_each(|e| e.host_offset = None);
    }
    let Some(backing) = &q.backing else { return Ok(own) };
    let blen = crate::image::BlockDevice::len(&**backing);
    let mut out = Vec::with_capacity(own.len());
    for e in own {
        if e.present {
            crate::extent::push_extent(&mut out, e);
            continue;
        }
        let end = e.offset + e.length;
        let inside = end.min(blen).saturating_sub(e.offset);
        if inside > 0 {
            for mut b in crate::image::BlockDevice::block_status(&**backing, e.offset, inside)? {
                b.depth += 1;
                crate::extent::push_extent(&mut out, b);
            }
        }
        if inside < e.length {
            let rest = Extent {
                offset: e.offset + inside,
                length: e.length - inside,
                host_offset: e.host_offset.map(|h| h + inside),
                ..e
            };
            crate::extent::push_extent(&mut out, rest);
        }
    }
    Ok(out)
}

/// See [`Qcow2::zeroes_by_metadata`].
pub(super) fn zeroes_by_metadata(q: &Qcow2, offset: u64, len: u64) -> Result<bool> {
    q.check_range(offset, len)?;
    if q.version() < 3 {
        return Ok(false);
    }
    let (size, unit) = (q.len(), q.geometry.subcluster_size());
    let end = offset + len;
    let mut partial = Vec::with_capacity(2);
    if offset % unit != 0 {
        partial.push(offset - offset % unit);
    }
    if end % unit != 0 && end != size {
        partial.push(end - end % unit);
    }
    for start in partial {
        let extents = q.block_status(start, unit.min(size - start))?;
        if !extents.iter().all(|e| e.zero && !e.data) {
            return Ok(false);
        }
    }
    Ok(true)
}

impl Qcow2 {
    /// One metadata step of a request, as every request takes it (the
    /// caller holds the I/O gate shared): under the metadata lock, refused
    /// when the image takes no writes; `step` is rerun each time it asks to
    /// wait for an allocation in flight (`Ok(None)`: the lock is released
    /// while waiting); its error is a metadata failure and made sticky
    /// (`Meta::fail`), unless it is a refusal of the request itself
    /// (`InvalidArgument`). Returns the result with the lock still held.
    pub(crate) fn meta_step<T>(
        &self,
        mut step: impl FnMut(&mut Meta, &dyn Storage) -> Result<Option<T>>,
    ) -> Result<(T, MutexGuard<'_, Meta>)> {
        let mut m = self.lock_meta();
        m.check_writable()?;
        loop {
            match step(&mut m, self.storage_ref()) {
                Ok(Some(done)) => return Ok((done, m)),
                Ok(None) => m = self.alloc_done.wait(m).unwrap_or_else(|p| p.into_inner()),
                Err(e) => {
                    if e.kind() != crate::ErrorKind::InvalidArgument {
                        m.fail(self.storage_ref(), &e);
                    }
                    return Err(e);
                }
            }
        }
    }

    pub(crate) fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.len();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::OutOfBounds { offset, len, size });
        }
        Ok(())
    }

    /// Performs a read plan into `buf` (as long as the plan).
    /// Reads `plan` into `buf`, whose first byte is at guest offset `guest`.
    pub(crate) fn read_segments(&self, plan: &[ReadSegment], guest: GuestOffset, buf: &mut [u8]) -> Result<()> {
        let mut pos = 0usize;
        for &seg in plan {
            let len = seg.len() as usize;
            let out = &mut buf[pos..pos + len];
            match seg {
                ReadSegment::Zero(_) => out.fill(0),
                ReadSegment::Data { host, .. } => {
                    self.data.read_at(out, host.0).map_err(Error::io("reading guest data", host.0))?;
                    if let Some(c) = &self.crypt {
                        c.decrypt(out, if c.uses_host_offset() { host.0 } else { guest.0 + pos as u64 })?;
                    }
                }
                // A whole cluster is inflated straight into the caller's buffer.
                ReadSegment::Compressed { desc, in_cluster: 0, .. } if len as u64 == self.geometry.cluster_size() => {
                    self.read_compressed_into(desc, out)?;
                }
                ReadSegment::Compressed { desc, in_cluster, .. } => {
                    let cluster = self.read_compressed(desc)?;
                    out.copy_from_slice(&cluster[in_cluster as usize..in_cluster as usize + len]);
                }
                ReadSegment::Backing { guest, .. } => self.read_backing(out, guest)?,
            }
            pos += len;
        }
        Ok(())
    }

    /// Registers a request that changes guest data on an encrypted image,
    /// waiting for the conflicting ones in flight: one that covers part of
    /// a sector (and so rewrites the whole sector) excludes every other
    /// request on that sector (see `serialise.rs`).
    pub(crate) fn begin_write(&self, offset: u64, len: u64) -> Option<crate::qcow2::serialise::InFlight<'_>> {
        self.crypt.as_ref()?;
        let (start, end) = sector_bounds(offset, len);
        Some(self.serialiser.begin(start, end, !is_sector_aligned(offset, len)))
    }

    /// Flushes after a write request in cache mode writethrough.
    pub(crate) fn write_through(&self) -> Result<()> {
        if self.writethrough.load(Ordering::Relaxed) {
            self.flush()?;
        }
        Ok(())
    }

    pub(crate) fn write_at_inner(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.write_unchecked(buf, offset)
    }

    /// Writes at an offset the caller checked: in the disk, or in the VM
    /// state area after it.
    pub(crate) fn write_unchecked(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.crypt.is_some() && !is_sector_aligned(offset, buf.len() as u64) {
            // Encryption works on whole sectors: read, modify, write them
            // (QEMU's block layer does the same for its 512-byte request
            // alignment of encrypted images).
            let (start, end) = sector_bounds(offset, buf.len() as u64);
            let mut bounce = vec![0u8; (end - start) as usize];
            self.read_at(&mut bounce, start)?;
            let at = (offset - start) as usize;
            bounce[at..at + buf.len()].copy_from_slice(buf);
            return self.write_unchecked(&bounce, start);
        }
        let mut done = 0u64;
        let total = buf.len() as u64;
        while done < total {
            let pos = offset + done;
            let gate = self.io_gate.read().unwrap_or_else(|p| p.into_inner());
            let (plan, m) = self.meta_step(|m, st| {
                Ok(match m.plan_write(st, GuestOffset(pos), total - done)? {
                    WritePlan::Wait => None,
                    plan => Some(plan),
                })
            })?;
            drop(m);
            let chunk = &buf[done as usize..];
            match plan {
                WritePlan::Wait => unreachable!("handled above"),
                WritePlan::Reclaim => {
                    drop(gate);
                    self.flush()?;
                }
                WritePlan::InPlace { host, len } => {
                    let data = &chunk[..len as usize];
                    match &self.crypt {
                        None => self.data.write_at(data, host.0),
                        Some(c) => {
                            // Into a scratch buffer: the caller's stays plaintext.
                            let mut scratch = data.to_vec();
                            c.encrypt(&mut scratch, if c.uses_host_offset() { host.0 } else { pos })?;
                            self.data.write_at(&scratch, host.0)
                        }
                    }
                    .map_err(Error::io("writing guest data", host.0))?;
                    drop(gate);
                    done += len;
                }
                WritePlan::Allocate(alloc) => {
                    let len = alloc.len;
                    let io = self.write_allocated(&alloc, &chunk[..len as usize]);
                    drop(gate);
                    let pending = self.finish_alloc(alloc.id, io)?;
                    if pending > MAX_PENDING_FREES {
                        self.flush()?;
                    }
                    done += len;
                }
            }
        }
        Ok(())
    }

    pub(crate) fn write_zeroes_inner(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        // QEMU's block layer splits a zero write at subcluster boundaries
        // (the cluster without extended L2 entries): the unaligned ends
        // are requests of their own, handled one unit at a time, the
        // aligned middle in metadata. An end piece that reaches the end of
        // the disk has no tail for qcow2 and is zeroed in metadata as it
        // stands.
        let unit = self.geometry.subcluster_size();
        let size = self.len();
        let end = offset + len;
        let head_end = if offset % unit == 0 { offset } else { end.min(offset.div_ceil(unit) * unit) };
        let tail_start = if end % unit == 0 { end } else { (end / unit * unit).max(head_end) };
        if head_end > offset {
            self.zero_partial(offset, head_end - offset, may_unmap)?;
        }
        if tail_start > head_end {
            self.zeroize(head_end, tail_start - head_end, may_unmap)?;
        }
        if end > tail_start && end == size {
            self.zeroize(tail_start, end - tail_start, may_unmap)?;
        } else if end > tail_start {
            self.zero_partial(tail_start, end - tail_start, may_unmap)?;
        }
        Ok(())
    }

    /// Zeroes part of one unit (subcluster, or cluster without extended L2
    /// entries), as QEMU's `qcow2_co_pwrite_zeroes` does: when the rest of
    /// the unit reads as zeros and the unit holds no data of this layer,
    /// the whole unit becomes zeros in metadata, else zeros are written
    /// over the part.
    ///
    /// The check and the metadata update happen in one hold of the metadata
    /// lock, retried once no allocation of the cluster is in flight, so that
    /// a concurrent write to another part of the cluster is never zeroed over
    /// (QEMU serialises such requests in its block layer). Version 2 images
    /// over a backing file have no metadata-only zeros: zeros are written.
    pub(crate) fn zero_partial(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let unit = g.subcluster_size();
        let size = self.len();
        let start = offset / unit * unit;
        let end = (start + unit).min(size);
        if self.version() < 3 && self.lock_meta().backing_named() {
            return self.write_zero_buffer(offset, len);
        }
        // QEMU zeroes the whole cluster when the unit is its first
        // subcluster and reaches the end of the disk (its zeroize has no
        // tail there), and always without subclusters.
        let whole_cluster = !g.extended_l2() || (start % cs == 0 && start + unit >= size);
        if self.version() >= 3 {
            self.reclaim_for_table(start)?;
        }
        let (zeroed, pending) = {
            let _gate = self.io_gate.read().unwrap_or_else(|p| p.into_inner());
            // What the unit reads as is not metadata of this image: failing
            // to find out fails the request, not the image.
            let mut unknown = None;
            let (zeroed, m) = self.meta_step(|m, st| {
                match self.unit_can_be_zeroed(m, start, offset, offset + len, end) {
                    Ok(true) => {}
                    Ok(false) => return Ok(Some(false)),
                    Err(e) => {
                        unknown = Some(e);
                        return Ok(Some(false));
                    }
                }
                let updated = if self.version() < 3 {
                    m.discard_range(st, GuestOffset(g.align_down(start)), cs)?
                } else if whole_cluster {
                    m.zero_range(st, GuestOffset(g.align_down(start)), cs, may_unmap)?
                } else {
                    m.zero_subclusters(st, GuestOffset(start), unit)?.is_some()
                };
                Ok(updated.then_some(true))
            })?;
            if let Some(e) = unknown {
                return Err(e);
            }
            (zeroed, m.pending_free_count())
        };
        if pending > MAX_PENDING_FREES {
            self.flush()?;
        }
        if zeroed {
            Ok(())
        } else {
            self.write_zero_buffer(offset, len)
        }
    }

    /// QEMU's test before zeroing a whole unit for a partial zero write:
    /// `[start, from)` and `[to, end)` read as zeros (through the backing
    /// chain), and the unit is unallocated or zero in this layer.
    pub(crate) fn unit_can_be_zeroed(&self, m: &mut Meta, start: u64, from: u64, to: u64, end: u64) -> Result<bool> {
        let st = self.storage_ref();
        for (a, b) in [(start, from), (to, end)] {
            if b > a {
                let own = m.block_status(st, GuestOffset(a), b - a)?;
                if !self.extents_read_as_zero(&own)? {
                    return Ok(false);
                }
            }
        }
        let mut own_kind = None;
        m.walk(st, start, 1, |_, _, _, mapping, _| own_kind = Some(mapping))?;
        Ok(matches!(own_kind, Some(L2Mapping::Unallocated | L2Mapping::ZeroPlain | L2Mapping::ZeroAllocated { .. })))
    }

    /// Whether extents of this layer read as zeros, asking the backing image
    /// about the ones this layer does not allocate.
    pub(crate) fn extents_read_as_zero(&self, own: &[Extent]) -> Result<bool> {
        for e in own {
            if e.present {
                if !e.zero || e.data {
                    return Ok(false);
                }
                continue;
            }
            let Some(backing) = &self.backing else { continue };
            let blen = crate::image::BlockDevice::len(&**backing);
            let inside = (e.offset + e.length).min(blen).saturating_sub(e.offset);
            if inside > 0 {
                let below = crate::image::BlockDevice::block_status(&**backing, e.offset, inside)?;
                if !below.iter().all(|b| b.zero && !b.data) {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    pub(crate) fn write_zero_buffer(&self, offset: u64, len: u64) -> Result<()> {
        let chunk = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len() as u64);
            self.write_at_inner(&chunk[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }

    /// QEMU's `qcow2_subcluster_zeroize` for a unit-aligned range (its end
    /// may be the end of the disk): subclusters of a partial cluster at
    /// either end become zero subclusters, whole clusters zero clusters.
    /// A compressed partial cluster cannot be zeroed in part; QEMU's block
    /// layer then writes zeros over the whole range, and so do we.
    pub(crate) fn zeroize(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        let g = self.geometry;
        let size = self.len();
        let end = offset + len;
        if self.version() < 3 {
            // Version 2 has no zero flag. Without a backing file an
            // unallocated cluster reads as zeros, so QEMU discards; over a
            // backing file it has to write zeros.
            if self.lock_meta().backing_named() {
                return self.write_zero_buffer(offset, end.min(size) - offset);
            }
            return self
                .update_clusters(offset, g.align_up(end) - offset, false, |m, st, o, l| m.discard_range(st, o, l));
        }
        let head = end.min(g.align_up(offset)) - offset;
        let mid_start = offset + head;
        let tail = if end >= size { 0 } else { end - mid_start.max(g.align_down(end)) };
        let mid_end = end - tail;
        if head > 0 || tail > 0 {
            let compressed = {
                let mut m = self.lock_meta();
                (head > 0 && m.is_compressed_at(self.storage_ref(), GuestOffset(offset))?)
                    || (tail > 0 && m.is_compressed_at(self.storage_ref(), GuestOffset(mid_end))?)
            };
            if compressed {
                return self.write_zero_buffer(offset, end - offset);
            }
        }
        if head > 0 {
            self.zero_subclusters(offset, head)?;
        }
        if mid_end > mid_start {
            self.update_clusters(mid_start, g.align_up(mid_end) - mid_start, true, |m, st, o, l| {
                m.zero_range(st, o, l, may_unmap)
            })?;
        }
        if tail > 0 {
            self.zero_subclusters(mid_end, tail)?;
        }
        Ok(())
    }

    /// Flushes first when a zero write at `offset` has to allocate its L2
    /// table while a deferred free leaves a lower cluster, so that the
    /// table goes where QEMU puts it (see `Meta::reclaim_first`; writes
    /// get the same from `WritePlan::Reclaim`). Only placement depends on
    /// it: the allocator never hands out a cluster whose free is pending.
    pub(crate) fn reclaim_for_table(&self, offset: u64) -> Result<()> {
        let reclaim = self.lock_meta().reclaim_for_table(self.storage_ref(), GuestOffset(offset));
        if reclaim {
            self.flush()?;
        }
        Ok(())
    }

    /// Zero subclusters inside one cluster, waiting out allocations in flight.
    pub(crate) fn zero_subclusters(&self, offset: u64, len: u64) -> Result<()> {
        self.reclaim_for_table(offset)?;
        let _gate = self.io_gate.read().unwrap_or_else(|p| p.into_inner());
        self.meta_step(|m, st| m.zero_subclusters(st, GuestOffset(offset), len)).map(|_| ())
    }

    /// Runs a whole-cluster metadata update in chunks of one L2 table,
    /// waiting out in-flight allocations that overlap each chunk. With
    /// `tables` (zero writes), a chunk may need its L2 table allocated.
    pub(crate) fn update_clusters(
        &self,
        offset: u64,
        len: u64,
        tables: bool,
        mut f: impl FnMut(&mut Meta, &dyn Storage, GuestOffset, u64) -> Result<bool>,
    ) -> Result<()> {
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let chunk_end = end.min((self.geometry.l1_index(GuestOffset(pos)) + 1) * self.geometry.bytes_per_l2());
            if tables {
                self.reclaim_for_table(pos)?;
            }
            let _gate = self.io_gate.read().unwrap_or_else(|p| p.into_inner());
            let ((), m) = self.meta_step(|m, st| Ok(f(m, st, GuestOffset(pos), chunk_end - pos)?.then_some(())))?;
            let pending = m.pending_free_count();
            drop(m);
            drop(_gate);
            if pending > MAX_PENDING_FREES {
                self.flush()?;
            }
            pos = chunk_end;
        }
        Ok(())
    }

    pub(crate) fn discard_inner(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let size = self.len();
        let start = self.geometry.align_up(offset);
        let end =
            if offset + len == size { self.geometry.align_up(size) } else { self.geometry.align_down(offset + len) };
        if start >= end {
            return Ok(());
        }
        self.update_clusters(start, end - start, false, |m, st, o, l| m.discard_range(st, o, l))
    }

    /// Writes an allocated run: the copy-on-write head, the new data and the
    /// copy-on-write tail, as one write when they are small.
    pub(crate) fn write_allocated(&self, alloc: &crate::qcow2::meta::plan::Allocation, data: &[u8]) -> Result<()> {
        let host = alloc.host;
        if let Some(c) = &self.crypt {
            return self.write_allocated_encrypted(c, alloc, data);
        }
        if (alloc.head.is_some() || alloc.tail.is_some())
            && self.cow_reads_zero(&alloc.head)?
            && self.cow_reads_zero(&alloc.tail)?
        {
            // Zero the new clusters without writing zeros, then write only
            // the data (QEMU's handle_alloc_space does the same).
            let head_len = alloc.head.as_ref().map_or(0, |r| r.len);
            let total = head_len + data.len() as u64 + alloc.tail.as_ref().map_or(0, |r| r.len);
            if self.data.write_zeroes_fast(host.0, total).map_err(Error::io("zeroing new clusters", host.0))? {
                let at = host + head_len;
                return self.data.write_at(data, at.0).map_err(Error::io("writing guest data", at.0));
            }
        }
        let head_len = alloc.head.as_ref().map_or(0, |r| r.len) as usize;
        let tail_len = alloc.tail.as_ref().map_or(0, |r| r.len) as usize;
        let total = head_len + data.len() + tail_len;
        let cs = self.geometry.cluster_size() as usize;
        if total <= 4 * cs {
            // One write: head and tail are read straight into the buffer
            // that carries the data, so a request holds one copy.
            let _lease = self.cow_budget.take(total as u64);
            let mut buf = vec![0u8; total];
            self.read_cow_into(&alloc.head, &mut buf[..head_len])?;
            buf[head_len..head_len + data.len()].copy_from_slice(data);
            self.read_cow_into(&alloc.tail, &mut buf[head_len + data.len()..])?;
            return self.data.write_at(&buf, host.0).map_err(Error::io("writing guest data", host.0));
        }
        let _lease = self.cow_budget.take((head_len + tail_len) as u64);
        let head = self.read_cow(&alloc.head)?;
        let tail = self.read_cow(&alloc.tail)?;
        let mut at = host;
        for part in [&head[..], data, &tail[..]] {
            if !part.is_empty() {
                self.data.write_at(part, at.0).map_err(Error::io("writing guest data", at.0))?;
                at += part.len() as u64;
            }
        }
        Ok(())
    }

    /// Whether a copy-on-write region reads as zeros as far as metadata
    /// tells (QEMU's `is_zero_cow`, which asks `bdrv_co_is_zero_fast`: zero
    /// clusters and subclusters, unallocated ranges over nothing or over
    /// zeros in the backing chain; data is never looked at). Then the new
    /// clusters are zeroed on the host instead of written, as QEMU's
    /// `handle_alloc_space` does.
    pub(crate) fn cow_reads_zero(&self, region: &Option<crate::qcow2::meta::plan::CowRegion>) -> Result<bool> {
        let Some(r) = region else { return Ok(true) };
        for seg in &r.plan {
            match *seg {
                ReadSegment::Zero(_) => {}
                ReadSegment::Backing { guest, len } => {
                    let Some(backing) = &self.backing else { continue };
                    let blen = crate::image::BlockDevice::len(&**backing);
                    let inside = (guest.0 + len).min(blen).saturating_sub(guest.0);
                    if inside > 0 {
                        let below = crate::image::BlockDevice::block_status(&**backing, guest.0, inside)?;
                        if !below.iter().all(|b| b.zero && !b.data) {
                            return Ok(false);
                        }
                    }
                }
                _ => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Writes an allocated run of an encrypted image: the copy-on-write
    /// regions are read as plaintext (decrypted with their old sector
    /// numbers) and everything is encrypted for the new clusters, in one
    /// scratch buffer.
    pub(crate) fn write_allocated_encrypted(
        &self,
        c: &crate::crypt::Crypt,
        alloc: &crate::qcow2::meta::plan::Allocation,
        data: &[u8],
    ) -> Result<()> {
        let head_len = alloc.head.as_ref().map_or(0, |r| r.len) as usize;
        let tail_len = alloc.tail.as_ref().map_or(0, |r| r.len) as usize;
        let _lease = self.cow_budget.take((head_len + data.len() + tail_len) as u64);
        let mut buf = vec![0u8; head_len + data.len() + tail_len];
        self.read_cow_into(&alloc.head, &mut buf[..head_len])?;
        buf[head_len..head_len + data.len()].copy_from_slice(data);
        self.read_cow_into(&alloc.tail, &mut buf[head_len + data.len()..])?;
        let host = alloc.host;
        c.encrypt(&mut buf, if c.uses_host_offset() { host.0 } else { alloc.guest.0 })?;
        self.data.write_at(&buf, host.0).map_err(Error::io("writing guest data", host.0))
    }

    pub(crate) fn read_cow(&self, region: &Option<crate::qcow2::meta::plan::CowRegion>) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; region.as_ref().map_or(0, |r| r.len as usize)];
        self.read_cow_into(region, &mut buf)?;
        Ok(buf)
    }

    /// Reads a copy-on-write region into `out`, which is exactly its length.
    fn read_cow_into(&self, region: &Option<crate::qcow2::meta::plan::CowRegion>, out: &mut [u8]) -> Result<()> {
        match region {
            Some(r) => self.read_segments(&r.plan, r.guest, out),
            None => Ok(()),
        }
    }

    /// Reads from the backing image; past its end everything reads as zeros.
    pub(crate) fn read_backing(&self, out: &mut [u8], guest: GuestOffset) -> Result<()> {
        let Some(backing) = &self.backing else {
            out.fill(0);
            return Ok(());
        };
        let blen = crate::image::BlockDevice::len(&**backing);
        let n = blen.saturating_sub(guest.0).min(out.len() as u64) as usize;
        if n > 0 {
            crate::image::BlockDevice::read_at(&**backing, &mut out[..n], guest.0)?;
        }
        out[n..].fill(0);
        Ok(())
    }

    /// Reads and decompresses one compressed cluster.
    pub(crate) fn read_compressed(&self, desc: oxqcow_format::CompressedDescriptor) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.geometry.cluster_size() as usize];
        self.read_compressed_into(desc, &mut out)?;
        Ok(out)
    }

    /// Reads and decompresses one compressed cluster into `out` (one
    /// cluster long).
    pub(crate) fn read_compressed_into(&self, desc: oxqcow_format::CompressedDescriptor, out: &mut [u8]) -> Result<()> {
        let mut src = vec![0u8; desc.max_len() as usize];
        self.storage.read_at(&mut src, desc.offset.0).map_err(Error::io("reading compressed data", desc.offset.0))?;
        self.codec().decompress(&src, out, || format!("compressed cluster at host offset 0x{:x}", desc.offset.0))
    }

    pub(crate) fn write_compressed_inner(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        if self.has_data_file() {
            // QEMU: -ENOTSUP; a compressed cluster cannot sit at host offset
            // == guest offset.
            return Err(Error::Unsupported("compressed clusters in images with an external data file".into()));
        }
        if self.crypt.is_some() {
            // QEMU's qcow2 has no compressed writes for encrypted images.
            return Err(Error::Unsupported("compressed writes to encrypted images".into()));
        }
        let cs = self.geometry.cluster_size();
        let end = offset + buf.len() as u64;
        if offset % cs != 0 || (end % cs != 0 && end != self.len()) {
            return Err(Error::InvalidArgument(format!(
                "compressed writes must cover whole clusters (offset {offset}, length {})",
                buf.len()
            )));
        }
        for (i, chunk) in buf.chunks(cs as usize).enumerate() {
            let at = offset + i as u64 * cs;
            let mut cluster = chunk.to_vec();
            cluster.resize(cs as usize, 0);
            match self.codec().compress(&cluster, cs as usize - 1)? {
                None => self.write_at_inner(chunk, at)?,
                Some(data) => self.write_compressed_cluster(&data, at)?,
            }
        }
        Ok(())
    }

    pub(crate) fn write_compressed_cluster(&self, data: &[u8], offset: u64) -> Result<()> {
        loop {
            let gate = self.io_gate.read().unwrap_or_else(|p| p.into_inner());
            let (plan, m) = self.meta_step(|m, st| {
                Ok(match m.plan_compressed(st, GuestOffset(offset), data.len() as u64)? {
                    CompressedPlan::Wait => None,
                    plan => Some(plan),
                })
            })?;
            drop(m);
            let CompressedPlan::Write { id, host } = plan else {
                drop(gate);
                self.flush()?;
                continue;
            };
            let io = self.storage.write_at(data, host.0).map_err(Error::io("writing compressed data", host.0));
            drop(gate);
            return self.finish_alloc(id, io).map(|_| ());
        }
    }

    /// Ends the in-flight allocation `id` after its data I/O gave `io`:
    /// commits it (the L2 entries point at the new clusters), or gives its
    /// clusters back. Returns how many frees are pending.
    ///
    /// A failed data I/O (an unreadable copy-on-write source, such as a
    /// compressed cluster that does not inflate, or a failed data write)
    /// fails this request only, as in QEMU: no metadata points at the new
    /// clusters yet, so the image stays consistent and usable, and writes
    /// acknowledged earlier are still flushed. Only metadata that could not
    /// be updated makes the image refuse further writes.
    pub(crate) fn finish_alloc(&self, id: u64, io: Result<()>) -> Result<usize> {
        let st = self.storage_ref();
        let mut m = self.lock_meta();
        let res = match io {
            Ok(()) => m.commit_alloc(st, id).inspect_err(|e| m.fail(st, e)),
            Err(e) => {
                if let Err(abort) = m.abort_alloc(st, id) {
                    m.fail(st, &abort);
                }
                Err(e)
            }
        };
        self.alloc_done.notify_all();
        res.map(|()| m.pending_free_count())
    }
    /// Records a guest write, zero write or discard in the enabled bitmaps
    /// (whether or not it succeeded, as QEMU's `bdrv_co_write_req_finish`).
    pub(crate) fn record_dirty(&self, offset: u64, len: u64) {
        if self.tracking.load(Ordering::Acquire) {
            self.lock_meta().mark_bitmaps(offset, len);
        }
    }
}

/// Whether a request covers whole 512-byte sectors.
pub(super) fn is_sector_aligned(offset: u64, len: u64) -> bool {
    offset % crate::crypt::SECTOR == 0 && len % crate::crypt::SECTOR == 0
}

/// The whole sectors around a request.
pub(super) fn sector_bounds(offset: u64, len: u64) -> (u64, u64) {
    let s = crate::crypt::SECTOR;
    (offset / s * s, (offset + len).div_ceil(s) * s)
}
