//! Guest offset to host location: L1/L2 lookup, read plans and block status.
//!
//! A lookup runs under the metadata lock and returns a plan; the caller
//! performs the data I/O after releasing the lock.

use oxqcow_format::table::{read_l2_bitmap, read_l2_word, ClusterType, L1Entry};
use oxqcow_format::{CompressedDescriptor, GuestOffset, HostOffset, L2Bitmap, L2Entry, L2Mapping};

use crate::error::{Error, Result};
use crate::extent::{push_extent, Extent};
use crate::qcow2::meta::{alt_hex, Meta};
use crate::storage::Storage;

/// One piece of a read plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReadSegment {
    /// Reads as zeros.
    Zero(u64),
    /// Reads from the image file.
    Data {
        /// Host offset.
        host: HostOffset,
        /// Length.
        len: u64,
    },
    /// Not allocated here: read the backing image at this guest offset.
    Backing {
        /// Guest offset.
        guest: GuestOffset,
        /// Length.
        len: u64,
    },
    /// Part of a compressed cluster.
    Compressed {
        /// Where the compressed stream is.
        desc: CompressedDescriptor,
        /// Offset of the piece inside the decompressed cluster.
        in_cluster: u64,
        /// Length.
        len: u64,
    },
}

impl ReadSegment {
    pub(crate) fn len(&self) -> u64 {
        match *self {
            ReadSegment::Zero(l)
            | ReadSegment::Data { len: l, .. }
            | ReadSegment::Compressed { len: l, .. }
            | ReadSegment::Backing { len: l, .. } => l,
        }
    }
}

/// Which kind of request looks a mapping up: QEMU words some corruption
/// reports differently on its read and write paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// A read or block status (`qcow2_get_host_offset`).
    Read,
    /// A write (`handle_copied`, `calculate_l2_meta`).
    Write,
}

impl Meta {
    /// The L2 table offset for `l1_index`, or `None` when unallocated.
    pub(crate) fn l2_offset(&self, l1_index: u64) -> Result<Option<u64>> {
        let Some(&raw) = self.l1.get(l1_index as usize) else { return Ok(None) };
        let e = L1Entry(raw);
        self.check_l2_alignment(e, l1_index)?;
        e.validate(&self.geometry).map_err(|err| Error::Corrupt(format!("L1 entry {l1_index} is invalid: {err}")))?;
        match e.l2_offset() {
            None => Ok(None),
            Some(o) => {
                if self.geometry.host_cluster(o).0 >= self.refcounts.host_end {
                    return Err(Error::Corrupt(format!(
                        "L1 entry {l1_index} points at an L2 table at offset 0x{:x}, past the end of the file",
                        o.0
                    )));
                }
                if o.0 < self.geometry.cluster_size() {
                    return Err(Error::Corrupt(format!("L1 entry {l1_index} points at the image header")));
                }
                Ok(Some(o.0))
            }
        }
    }

    /// The corruption QEMU reports first when it follows an L1 entry: an
    /// L2 table offset inside a cluster.
    pub(crate) fn check_l2_alignment(&self, e: L1Entry, l1_index: u64) -> Result<()> {
        if self.geometry.is_cluster_aligned(e.offset_bits()) {
            return Ok(());
        }
        Err(Error::Corrupt(format!(
            "L2 table offset {} unaligned (L1 index: {})",
            alt_hex(e.offset_bits()),
            alt_hex(l1_index)
        )))
    }

    /// Makes sure the L2 table at `offset` is cached.
    pub(crate) fn load_l2(&mut self, storage: &dyn Storage, offset: u64) -> Result<()> {
        if self.l2.contains(offset) {
            return Ok(());
        }
        self.make_room_l2(storage)?;
        let mut data = vec![0u8; self.geometry.cluster_size() as usize].into_boxed_slice();
        storage.read_at(&mut data, offset).map_err(Error::io("reading an L2 table", offset))?;
        self.l2.insert(offset, data, false);
        Ok(())
    }

    /// Evicts tables until there is room for one more.
    pub(crate) fn make_room_l2(&mut self, storage: &dyn Storage) -> Result<()> {
        while let Some((offset, dirty)) = self.l2.victim() {
            if dirty {
                self.write_back_l2(storage, offset)?;
            }
            self.l2.remove(offset);
        }
        Ok(())
    }

    /// Reads L2 entry `index` of the cached table at `offset`.
    pub(crate) fn l2_entry(&mut self, offset: u64, index: usize) -> L2Entry {
        let size = self.geometry.l2_entry_size() as usize;
        L2Entry(read_l2_word(self.l2.get(offset).expect("table loaded"), index, size))
    }

    /// The subcluster bitmap of L2 entry `index` of the cached table at
    /// `offset` (zero without extended L2 entries).
    pub(crate) fn l2_bitmap(&mut self, offset: u64, index: usize) -> L2Bitmap {
        if !self.geometry.extended_l2() {
            return L2Bitmap(0);
        }
        read_l2_bitmap(self.l2.get(offset).expect("table loaded"), index)
    }

    /// The decoded mapping and the validated subcluster bitmap of entry
    /// `index` of the cached table at `table`. An invalid bitmap is
    /// corruption, reported in the words of the QEMU function that meets
    /// it for this `lookup` (the two differ by one space).
    pub(crate) fn mapping_with_bitmap(
        &mut self,
        table: u64,
        index: usize,
        lookup: Lookup,
    ) -> Result<(L2Mapping, L2Bitmap)> {
        let m = self.mapping_at(table, index)?;
        let bitmap = self.l2_bitmap(table, index);
        if bitmap.validate(&m).is_err() {
            let gap = match lookup {
                Lookup::Read => "  ",
                Lookup::Write => " ",
            };
            return Err(Error::Corrupt(format!(
                "Invalid cluster entry found{gap}(L2 offset: {}, L2 index: {})",
                alt_hex(table),
                alt_hex(index as u64)
            )));
        }
        Ok((m, bitmap))
    }

    /// The decoded mapping of entry `index` of the cached table at `table`.
    pub(crate) fn mapping_at(&mut self, table: u64, index: usize) -> Result<L2Mapping> {
        let entry = self.l2_entry(table, index);
        self.decode(entry, table, index)
    }

    /// Decodes an entry, turning format errors into corruption reports that
    /// say where the entry is, and checking the host offset is in the file.
    /// What QEMU detects at run time is reported in its words.
    pub(crate) fn decode(&self, entry: L2Entry, table: u64, index: usize) -> Result<L2Mapping> {
        let ty = entry.cluster_type(self.geometry.extended_l2(), self.data_file.is_some());
        let at = || format!("(L2 offset: {}, L2 index: {})", alt_hex(table), alt_hex(index as u64));
        if self.header.version < 3 && matches!(ty, ClusterType::ZeroPlain | ClusterType::ZeroAlloc) {
            return Err(Error::Corrupt(format!("Zero cluster entry found in pre-v3 image {}", at())));
        }
        if ty != ClusterType::Compressed && !self.geometry.is_cluster_aligned(entry.offset_bits()) {
            return Err(Error::Corrupt(format!(
                "Cluster allocation offset {} unaligned {}",
                alt_hex(entry.offset_bits()),
                at()
            )));
        }
        let m = entry
            .mapping_in(&self.geometry, self.header.version, self.data_file.is_some())
            .map_err(|e| Error::Corrupt(format!("L2 table at offset 0x{table:x}, entry {index}: {e}")))?;
        if self.data_file.is_some() {
            // Data clusters live in the data file, at their guest offset
            // (checked by the callers, which know it).
            if let L2Mapping::Compressed(_) = m {
                return Err(Error::Corrupt(format!(
                    "Compressed cluster entry found in image with external data file (L2 offset: 0x{table:x}, L2 index: 0x{index:x})"
                )));
            }
            return Ok(m);
        }
        if let Some(host) = m.host_cluster() {
            if self.geometry.host_cluster(host).0 >= self.refcounts.host_end {
                return Err(Error::Corrupt(format!(
                    "L2 table at offset 0x{table:x}, entry {index}: cluster offset 0x{:x} is past the end of the file",
                    host.0
                )));
            }
            if host.0 < self.geometry.cluster_size() {
                return Err(Error::Corrupt(format!(
                    "L2 table at offset 0x{table:x}, entry {index}: data cluster overlaps the image header"
                )));
            }
        }
        if let L2Mapping::Compressed(d) = m {
            let cs = self.geometry.cluster_size();
            let end = self.refcounts.host_end * cs;
            if d.offset.0 < cs || d.offset.0 >= end || d.offset.0 + d.max_len() > end + cs {
                return Err(Error::Corrupt(format!(
                    "L2 table at offset 0x{table:x}, entry {index}: compressed cluster at 0x{:x} ({} sectors) lies outside the image file",
                    d.offset.0, d.sectors
                )));
            }
        }
        Ok(m)
    }

    /// With an external data file, a data cluster must lie at its guest
    /// offset (QEMU's check in `qcow2_get_host_offset`); `guest` is the
    /// guest offset of the cluster the mapping belongs to.
    pub(crate) fn check_data_file_host(&self, m: &L2Mapping, guest: u64, index: usize) -> Result<()> {
        if self.data_file.is_none() {
            return Ok(());
        }
        let cluster = self.geometry.align_down(guest);
        match m.host_cluster() {
            Some(host) if host.0 != cluster => Err(Error::Corrupt(format!(
                "External data file host cluster offset 0x{:x} does not match guest cluster offset: 0x{cluster:x}, L2 index: 0x{index:x}",
                host.0
            ))),
            _ => Ok(()),
        }
    }

    /// Visits the mapping of every cluster touched by `[offset, offset + len)`,
    /// calling `f(guest_offset_of_piece, piece_len, offset_in_cluster, mapping)`.
    /// With extended L2 entries a cluster is visited in runs of subclusters
    /// of one type, each with the mapping it reads as; unallocated
    /// subclusters of a cluster with a host offset also get that offset
    /// (the last argument: QEMU reports it in block status).
    pub(crate) fn walk(
        &mut self,
        storage: &dyn Storage,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, u64, u64, L2Mapping, Option<u64>),
    ) -> Result<()> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let l1_index = g.l1_index(GuestOffset(pos));
            let table_end = end.min((l1_index + 1) * g.bytes_per_l2());
            match self.l2_offset(l1_index)? {
                None => {
                    f(pos, table_end - pos, g.offset_in_cluster(pos), L2Mapping::Unallocated, None);
                    pos = table_end;
                }
                Some(table) => {
                    self.load_l2(storage, table)?;
                    while pos < table_end {
                        let index = g.l2_index(GuestOffset(pos));
                        let in_cluster = g.offset_in_cluster(pos);
                        let piece = (cs - in_cluster).min(table_end - pos);
                        if g.extended_l2() {
                            let (m, bitmap) = self.mapping_with_bitmap(table, index, Lookup::Read)?;
                            self.check_data_file_host(&m, pos, index)?;
                            let sc_size = g.subcluster_size();
                            let mut at = in_cluster;
                            while at < in_cluster + piece {
                                let (ty, n) = bitmap.run(&m, (at / sc_size) as u32);
                                let run_end = ((at / sc_size + u64::from(n)) * sc_size).min(in_cluster + piece);
                                let unalloc_host = match ty {
                                    oxqcow_format::Subcluster::UnallocatedAlloc => m.host_cluster().map(|h| h.0),
                                    _ => None,
                                };
                                f(
                                    pos + (at - in_cluster),
                                    run_end - at,
                                    at,
                                    L2Bitmap::as_mapping(ty, &m),
                                    unalloc_host,
                                );
                                at = run_end;
                            }
                            pos += piece;
                            continue;
                        }
                        let entry = self.l2_entry(table, index);
                        let m = self.decode(entry, table, index)?;
                        self.check_data_file_host(&m, pos, index)?;
                        f(pos, piece, in_cluster, m, None);
                        pos += piece;
                    }
                }
            }
        }
        Ok(())
    }

    /// Re-checks a request against the size under the lock (a resize may
    /// have run since the caller's unlocked check).
    pub(crate) fn check_in_disk(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.header.size;
        // The VM state area after the disk (QEMU's qcow2_vm_state_offset),
        // reached only through `Qcow2::read_vmstate`/`write_vmstate`.
        if offset >= self.vm_state_offset() && offset.checked_add(len).is_some() {
            return Ok(());
        }
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::OutOfBounds { offset, len, size });
        }
        Ok(())
    }

    /// Where the VM state area starts: the first L1 entry after the disk.
    pub(crate) fn vm_state_offset(&self) -> u64 {
        let g = &self.geometry;
        g.l1_entries_for(self.header.size).saturating_mul(g.bytes_per_l2())
    }

    /// Grows the L1 table so that it maps `[offset, offset + len)` (a VM
    /// state write: the disk's own range is always mapped).
    pub(crate) fn l1_covering(&mut self, storage: &dyn Storage, offset: u64, len: u64) -> Result<()> {
        let needed = self.geometry.l1_index(GuestOffset(offset + len.max(1) - 1)) + 1;
        if needed > self.l1.len() as u64 {
            self.check_writable()?;
            self.grow_l1_to(storage, needed)?;
        }
        Ok(())
    }

    /// Plans a read of `[offset, offset + len)`.
    pub(crate) fn plan_read(&mut self, storage: &dyn Storage, at: GuestOffset, len: u64) -> Result<Vec<ReadSegment>> {
        let offset = at.0;
        self.check_in_disk(offset, len)?;
        self.plan_range(storage, GuestOffset(offset), len)
    }

    /// Plans a read of `[offset, offset + len)` without the size check: the
    /// copy-on-write regions of the last cluster may lie past the end of the
    /// disk (they read as the old cluster, or the backing image, or zeros).
    pub(crate) fn plan_range(&mut self, storage: &dyn Storage, at: GuestOffset, len: u64) -> Result<Vec<ReadSegment>> {
        let offset = at.0;
        let mut plan: Vec<ReadSegment> = Vec::new();
        let has_backing = self.has_backing;
        self.walk(storage, offset, len, |pos, piece, in_cluster, m, _| {
            let seg = match m {
                L2Mapping::Normal { host, .. } => ReadSegment::Data { host: host + in_cluster, len: piece },
                L2Mapping::Compressed(desc) => ReadSegment::Compressed { desc, in_cluster, len: piece },
                L2Mapping::Unallocated if has_backing => ReadSegment::Backing { guest: GuestOffset(pos), len: piece },
                _ => ReadSegment::Zero(piece),
            };
            match (plan.last_mut(), seg) {
                (Some(ReadSegment::Zero(l)), ReadSegment::Zero(n)) => *l += n,
                (Some(ReadSegment::Data { host, len }), ReadSegment::Data { host: h, len: n }) if *host + *len == h => {
                    *len += n
                }
                (Some(ReadSegment::Backing { len, .. }), ReadSegment::Backing { len: n, .. }) => *len += n,
                _ => plan.push(seg),
            }
        })?;
        Ok(plan)
    }

    /// QEMU's `qcow2_detect_metadata_preallocation`: the image counts as
    /// preallocated with metadata when clearly more clusters are in use
    /// (nonzero refcount) than the host file has allocated: at least
    /// `max(allocated * 10 / 9, allocated + 2)` of them.
    fn looks_metadata_preallocated(&mut self, storage: &dyn Storage) -> Result<bool> {
        if let Some(known) = self.metadata_preallocation {
            return Ok(known);
        }
        let cs = self.geometry.cluster_size();
        let file_len = storage.len().map_err(Error::io("reading the file length", 0))?;
        // A file whose allocation is unknown (an HTTP object) counts as not
        // preallocated, as QEMU takes any failure here.
        let Ok(allocated) = storage.allocated_bytes() else {
            self.metadata_preallocation = Some(false);
            return Ok(false);
        };
        let real_clusters = allocated / cs;
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        let end_cluster = file_len.div_ceil(cs);
        let mut in_use = 0;
        let mut i = 0;
        while i < end_cluster && in_use < threshold {
            if self.refcounts.get(storage, oxqcow_format::HostCluster(i))? != 0 {
                in_use += 1;
            }
            i += 1;
        }
        let found = in_use >= threshold;
        self.metadata_preallocation = Some(found);
        Ok(found)
    }

    /// Block status of `[offset, offset + len)`.
    pub(crate) fn block_status(&mut self, storage: &dyn Storage, at: GuestOffset, len: u64) -> Result<Vec<Extent>> {
        let offset = at.0;
        let mut out = Vec::new();
        self.walk(storage, offset, len, |pos, piece, in_cluster, m, unalloc_host| {
            let (present, zero, data, host) = match m {
                L2Mapping::Unallocated => (false, true, false, unalloc_host.map(|h| h + in_cluster)),
                L2Mapping::ZeroPlain => (true, true, false, None),
                L2Mapping::ZeroAllocated { host, .. } => (true, true, false, Some(host.0 + in_cluster)),
                L2Mapping::Normal { host, .. } => (true, false, true, Some(host.0 + in_cluster)),
                L2Mapping::Compressed(_) => (true, false, true, None),
            };
            let compressed = matches!(m, L2Mapping::Compressed(_));
            push_extent(
                &mut out,
                Extent { offset: pos, length: piece, present, zero, data, compressed, host_offset: host, depth: 0 },
            );
        })?;
        // Data clusters over holes of the host file read as zeros too. QEMU
        // only looks at the host file for images that seem preallocated
        // with metadata (its BDRV_BLOCK_RECURSE), and so do we, so that
        // `map` and `compare` agree with qemu-img.
        if !self.looks_metadata_preallocated(storage)? {
            return Ok(out);
        }
        let mut refined = Vec::with_capacity(out.len());
        let data_storage = self.data_file.as_ref().map(|d| d.storage.clone());
        let data_storage: &dyn Storage = data_storage.as_deref().unwrap_or(storage);
        for e in out {
            match e.host_offset {
                Some(host) if e.data => {
                    let runs =
                        data_storage.data_runs(host, e.length).map_err(Error::io("querying host allocation", host))?;
                    for (h, l, is_data) in runs {
                        let piece = Extent {
                            offset: e.offset + (h - host),
                            length: l,
                            zero: !is_data,
                            host_offset: Some(h),
                            ..e
                        };
                        push_extent(&mut refined, piece);
                    }
                }
                _ => push_extent(&mut refined, e),
            }
        }
        Ok(refined)
    }
}
