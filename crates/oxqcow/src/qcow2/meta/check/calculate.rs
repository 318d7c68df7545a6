//! QEMU's `calculate_refcounts`: every reference the header, the L1 and L2
//! tables (active and snapshots), the snapshot table, the bitmaps and the
//! refcount structures hold, counted into the in-memory refcount table,
//! with the entry checks (and fixes) QEMU makes on the way.

use oxqcow_format::refcount::RefcountTableEntry;
use oxqcow_format::table::{
    decode_entries, read_l2_bitmap, read_l2_word, write_l2_bitmap, write_l2_word, ClusterType, L1Entry, L2Entry,
    COPIED, ZERO,
};
use oxqcow_format::L2Bitmap;

use super::*;

impl Checker<'_> {
    /// QEMU's `qcow2_inc_refcounts_imrt`.
    pub(super) fn inc_refcounts(&mut self, res: &mut CheckReport, offset: u64, size: u64) -> Step<()> {
        if size == 0 {
            return Ok(());
        }
        let g = self.g;
        let cs = g.cluster_size();
        let file_len = self.file_len()?;
        if i128::from(offset) + i128::from(size) - i128::from(file_len) >= i128::from(cs) {
            self.say(&format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: \
                 offset 0x{offset:x} size 0x{size:x}"
            ));
            res.corruptions += 1;
            return Ok(());
        }
        let max = g.max_refcount();
        let first = offset >> g.cluster_bits();
        let last = (offset + size - 1) >> g.cluster_bits();
        for k in first..=last {
            let r = self.imrt.get(k);
            if r == max {
                self.say(&format!("ERROR: overflow cluster offset=0x{:x}", k << g.cluster_bits()));
                self.say(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean \
                     copy if the image cannot be opened for writing",
                );
                res.corruptions += 1;
                continue;
            }
            self.imrt.set(k, r + 1);
        }
        Ok(())
    }

    /// QEMU's `check_refcounts_l1`.
    pub(super) fn check_l1(
        &mut self,
        res: &mut CheckReport,
        l1_offset: u64,
        l1_size: u64,
        frag_info: bool,
        fix: Fix,
        active: bool,
    ) -> Step<()> {
        if l1_size == 0 {
            return Ok(());
        }
        self.inc_refcounts(res, l1_offset, l1_size * 8)?;
        let l1 = decode_entries(&self.read_padded(l1_offset, l1_size * 8)?);
        for &e in &l1 {
            if e == 0 {
                continue;
            }
            if L1Entry(e).reserved_bits() != 0 {
                self.say(&format!("ERROR found L1 entry with reserved bits set: {e:x}"));
                res.corruptions += 1;
            }
            let l2_offset = L1Entry(e).offset_bits();
            self.inc_refcounts(res, l2_offset, self.g.cluster_size())?;
            if !self.g.is_cluster_aligned(l2_offset) {
                self.say(&format!("ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted"));
                res.corruptions += 1;
            }
            self.check_l2(res, l2_offset, frag_info, fix, active)?;
        }
        Ok(())
    }

    /// QEMU's `check_refcounts_l2`.
    pub(super) fn check_l2(
        &mut self,
        res: &mut CheckReport,
        l2_offset: u64,
        frag_info: bool,
        fix: Fix,
        active: bool,
    ) -> Step<()> {
        let g = self.g;
        let cs = g.cluster_size();
        let mut table = self.read_padded(l2_offset, cs)?;
        let mut next_contiguous = 0u64;
        let csize_shift = g.compressed_size_shift();
        let offset_mask = (1u64 << csize_shift) - 1;
        let csize_mask = (1u64 << (g.cluster_bits() - 8)) - 1;
        let ext = g.extended_l2();
        let esize = g.l2_entry_size() as usize;
        let external = self.meta.data_file.is_some();
        for i in 0..g.l2_entries() as usize {
            let mut entry = read_l2_word(&table, i, esize);
            let bitmap = if ext { read_l2_bitmap(&table, i) } else { L2Bitmap(0) };
            let ty = L2Entry(entry).cluster_type(ext, external);
            if ty != ClusterType::Compressed && L2Entry(entry).reserved_bits(&g) != 0 {
                self.say(&format!("ERROR found l2 entry with reserved bits set: {entry:x}"));
                res.corruptions += 1;
            }
            match ty {
                ClusterType::Compressed => {
                    if L2Entry(entry).copied() {
                        self.say(&format!(
                            "ERROR: coffset=0x{:x}: copied flag must never be set for compressed clusters",
                            entry & offset_mask
                        ));
                        entry &= !COPIED;
                        res.corruptions += 1;
                    }
                    if external {
                        self.say(&format!("ERROR compressed cluster {i} with data file, entry=0x{entry:x}"));
                        res.corruptions += 1;
                        continue;
                    }
                    if bitmap.0 != 0 {
                        self.say(&format!(
                            "ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, entry=0x{entry:x}"
                        ));
                        res.corruptions += 1;
                        continue;
                    }
                    let coffset = entry & offset_mask;
                    let sectors = ((entry >> csize_shift) & csize_mask) + 1;
                    let csize = sectors * 512 - (coffset & 511);
                    self.inc_refcounts(res, coffset, csize)?;
                    if frag_info {
                        res.allocated_clusters += 1;
                        res.compressed_clusters += 1;
                        res.fragmented_clusters += 1;
                    }
                }
                ClusterType::ZeroAlloc | ClusterType::Normal => {
                    let offset = L2Entry(entry).offset_bits();
                    if bitmap.alloc() & bitmap.zero() != 0 {
                        res.corruptions += 1;
                        self.say(&format!(
                            "ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                        ));
                    }
                    if !g.is_cluster_aligned(offset) {
                        res.corruptions += 1;
                        let contains_data = if ext { bitmap.alloc() != 0 } else { entry & ZERO == 0 };
                        if !contains_data {
                            let verb = if fix.errors { "Repairing" } else { "ERROR" };
                            self.say(&format!(
                                "{verb} offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry \
                                 corrupted."
                            ));
                            if fix.errors && self.fix_l2_entry_by_zero(res, l2_offset, &mut table, i, active)? {
                                continue;
                            }
                        } else {
                            self.say(&format!(
                                "ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted."
                            ));
                        }
                    }
                    if frag_info {
                        res.allocated_clusters += 1;
                        if next_contiguous != 0 && offset != next_contiguous {
                            res.fragmented_clusters += 1;
                        }
                        next_contiguous = offset + cs;
                    }
                    // Data file clusters are not refcounted in the image file.
                    if !external {
                        self.inc_refcounts(res, offset, cs)?;
                    }
                }
                ClusterType::ZeroPlain => {}
                ClusterType::Unallocated => {
                    if bitmap.alloc() != 0 {
                        res.corruptions += 1;
                        self.say("ERROR: Unallocated cluster has non-zero subcluster allocation map");
                    }
                }
            }
        }
        Ok(())
    }

    /// QEMU's `fix_l2_entry_by_zero`: the entry becomes a plain zero
    /// cluster. Returns whether it was fixed.
    pub(super) fn fix_l2_entry_by_zero(
        &mut self,
        res: &mut CheckReport,
        l2_offset: u64,
        table: &mut [u8],
        i: usize,
        active: bool,
    ) -> Step<bool> {
        let esize = self.g.l2_entry_size() as usize;
        if self.g.extended_l2() {
            // Allocated subclusters become zero, the host offset goes.
            let b = read_l2_bitmap(table, i).0;
            write_l2_bitmap(table, i, L2Bitmap((b | (b << 32)) & L2Bitmap::ALL_ZEROES.0));
            write_l2_word(table, i, esize, 0);
        } else {
            write_l2_word(table, i, esize, ZERO);
        }
        let at = l2_offset + (i * esize) as u64;
        let ignore =
            if active { crate::qcow2::meta::overlap::ACTIVE_L2 } else { crate::qcow2::meta::overlap::INACTIVE_L2 };
        if let Some(t) = self.meta.refcounts.overlap(at, esize as u64, ignore) {
            // QEMU signals the corruption, and the check of this table and
            // the whole check end there.
            self.signal_overlap(t)?;
            self.say("ERROR: Overlap check failed");
            res.check_errors += 1;
            return Err(Stop::Errno(EIO));
        }
        self.st.write_at(&table[i * esize..(i + 1) * esize], at).map_err(Error::io("writing an L2 entry", at))?;
        self.st.sync().map_err(Error::io("syncing an L2 entry", at))?;
        res.corruptions -= 1;
        res.corruptions_fixed += 1;
        Ok(true)
    }

    /// QEMU's `calculate_refcounts`.
    pub(super) fn calculate_refcounts(&mut self, res: &mut CheckReport, fix: Fix, rebuild: &mut bool) -> Step<()> {
        let cs = self.g.cluster_size();
        self.inc_refcounts(res, 0, cs)?;
        let (l1_offset, l1_size) = (self.meta.header.l1_table_offset, u64::from(self.meta.header.l1_size));
        self.check_l1(res, l1_offset, l1_size, true, fix, true)?;
        let snapshots = self.meta.snapshots.entries.clone();
        for sn in &snapshots {
            if !self.g.is_cluster_aligned(sn.l1_table_offset) {
                self.say(&format!(
                    "ERROR snapshot {} ({}) l1_offset={}: L1 table is not cluster aligned; snapshot table entry \
                     corrupted",
                    sn.id,
                    sn.name,
                    alt_hex(sn.l1_table_offset)
                ));
                res.corruptions += 1;
                continue;
            }
            if u64::from(sn.l1_size) > oxqcow_format::limits::MAX_L1_BYTES / 8 {
                self.say(&format!(
                    "ERROR snapshot {} ({}) l1_size={}: L1 table is too large; snapshot table entry corrupted",
                    sn.id,
                    sn.name,
                    alt_hex(u64::from(sn.l1_size))
                ));
                res.corruptions += 1;
                continue;
            }
            self.check_l1(res, sn.l1_table_offset, u64::from(sn.l1_size), false, fix, false)?;
        }
        if !snapshots.is_empty() {
            let (offset, size) = (self.meta.header.snapshots_offset, self.meta.snapshots.byte_size);
            self.inc_refcounts(res, offset, size)?;
        }
        self.inc_refcounts(res, self.reftable_offset, self.reftable.len() as u64 * 8)?;
        if let Some(c) = self.meta.header.extensions.crypto {
            // The LUKS header and its key material.
            self.inc_refcounts(res, c.offset, c.length)?;
        }
        self.count_bitmaps(res)?;
        self.check_refblocks(res, fix, rebuild)
    }

    /// QEMU's `qcow2_check_bitmaps_refcounts`: the bitmap directory, every
    /// bitmap table and the clusters the tables name.
    pub(super) fn count_bitmaps(&mut self, res: &mut CheckReport) -> Step<()> {
        let Some(b) = self.meta.header.extensions.bitmaps else { return Ok(()) };
        if b.nb_bitmaps == 0 {
            return Ok(());
        }
        self.inc_refcounts(res, b.directory_offset, b.directory_size)?;
        // The header parser bounded the directory size; bytes past the end
        // of the file read as zeros, as QEMU's reads do.
        let dir = self.read_padded(b.directory_offset, b.directory_size)?;
        let cs = self.g.cluster_size();
        let Ok(entries) =
            oxqcow_format::bitmap::parse_directory(&dir, dir.len() as u64, b.nb_bitmaps, cs, self.meta.header.size)
        else {
            res.corruptions += 1;
            return Err(Stop::Errno(EINVAL));
        };
        for e in entries {
            // The directory parser bounded the table (512 MiB of bitmap data).
            let bytes = u64::from(e.table_size) * 8;
            self.inc_refcounts(res, e.table_offset, bytes)?;
            let mut table = Vec::with_capacity(e.table_size as usize);
            for raw in decode_entries(&self.read_padded(e.table_offset, bytes)?) {
                match oxqcow_format::BitmapTableEntry::parse(raw, cs) {
                    Ok(entry) => table.push(entry),
                    Err(_) => {
                        // QEMU's bitmap_table_load refuses the whole table.
                        res.corruptions += 1;
                        return Err(Stop::Errno(EINVAL));
                    }
                }
            }
            for entry in table {
                if let oxqcow_format::BitmapTableEntry::Data(at) = entry {
                    self.inc_refcounts(res, at, cs)?;
                }
            }
        }
        Ok(())
    }

    /// QEMU's `check_refblocks`.
    pub(super) fn check_refblocks(&mut self, res: &mut CheckReport, fix: Fix, rebuild: &mut bool) -> Step<()> {
        let g = self.g;
        let cs = g.cluster_size();
        for i in 0..self.reftable.len() {
            let entry = self.reftable[i];
            let offset = RefcountTableEntry(entry).block_offset().map_or(0, |o| o.0);
            let cluster = offset >> g.cluster_bits();
            if RefcountTableEntry(entry).reserved_bits() != 0 {
                self.say(&format!("ERROR refcount table entry {i} has reserved bits set"));
                res.corruptions += 1;
                *rebuild = true;
                continue;
            }
            if !g.is_cluster_aligned(offset) {
                self.say(&format!("ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"));
                res.corruptions += 1;
                *rebuild = true;
                continue;
            }
            if cluster >= self.imrt.len() {
                res.corruptions += 1;
                let verb = if fix.errors { "Repairing" } else { "ERROR" };
                self.say(&format!("{verb} refcount block {i} is outside image"));
                if fix.errors {
                    let file_len = self.file_len()?;
                    let new_len = offset.checked_add(cs).filter(|&end| end - file_len.min(end) <= MAX_REPAIR_GROWTH);
                    match new_len {
                        Some(end) => {
                            self.st.set_len(end).map_err(Error::io("growing the image file", end))?;
                            self.imrt.grow(g.clusters_for(end));
                            res.corruptions -= 1;
                            res.corruptions_fixed += 1;
                            self.inc_refcounts(res, offset, cs)?;
                            continue;
                        }
                        None => {
                            *rebuild = true;
                            self.say(&format!("ERROR could not resize image: {EFBIG}"));
                        }
                    }
                }
                continue;
            }
            if offset != 0 {
                self.inc_refcounts(res, offset, cs)?;
                let r = self.imrt.get(cluster);
                if r != 1 {
                    self.say(&format!("ERROR refcount block {i} refcount={r}"));
                    res.corruptions += 1;
                    *rebuild = true;
                }
            }
        }
        Ok(())
    }
}
