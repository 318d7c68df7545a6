//! The snapshot table steps of QEMU's check: reading the table as the file
//! has it (`qcow2_check_read_snapshot_table`: the open left it unread, so a
//! damaged table is reported here, and with `-r all` entries past QEMU's
//! limits are dropped and extra data cut), then rewriting it once the
//! refcounts are sound (`qcow2_check_fix_snapshot_table`).

use oxqcow_format::header::{nb_snapshots_field, validate_snapshot_table};
use oxqcow_format::limits::MAX_SNAPSHOTS;
use oxqcow_format::{FormatError, SnapshotRepair, SnapshotTable};

use super::{CheckReport, Checker, Fix, Step, Stop, EFBIG, EINVAL, EIO};
use crate::error::Error;
use crate::qcow2::meta::{overlap, read_snapshots, DiscardModes, SnapshotRead};

impl Checker<'_> {
    /// Reads the snapshot table the header names into the engine's view,
    /// counting in `res` what is wrong with it (and what `fix` repaired).
    /// A table that cannot be read stops the check, as in QEMU.
    pub(super) fn read_snapshot_table(&mut self, res: &mut CheckReport, fix: Fix) -> Step<()> {
        let pointer = self.read_padded(60, 12)?;
        let mut count = u32::from_be_bytes(pointer[..4].try_into().expect("4 bytes"));
        let offset = u64::from_be_bytes(pointer[4..].try_into().expect("8 bytes"));
        // Until the table is read, the engine knows no snapshots (QEMU
        // forgets them too when the read fails).
        self.meta.snapshots = SnapshotTable::default();
        let mut reduced = 0u32;
        if count > MAX_SNAPSHOTS && fix.errors {
            self.say(&format!("Discarding {} overhanging snapshots", count - MAX_SNAPSHOTS));
            reduced += count - MAX_SNAPSHOTS;
            count = MAX_SNAPSHOTS;
        }
        if let Err(e) = validate_snapshot_table("snapshot table", offset, count, self.g.cluster_size()) {
            let mut text = format!("ERROR {e}");
            if count > MAX_SNAPSHOTS {
                text += &format!(
                    "\nYou can force-remove all {} overhanging snapshots with qemu-img check -r all",
                    count - MAX_SNAPSHOTS
                );
            }
            res.check_errors += 1;
            res.error_report = Some(text);
            let errno = if matches!(e, FormatError::TableTooLarge { .. }) { EFBIG } else { EINVAL };
            return Err(Stop::Errno(errno));
        }
        let file_len = self.file_len()?;
        let mut dropped = 0u64;
        let out = &mut *self.out;
        let mut report = |r: SnapshotRepair| match r {
            SnapshotRepair::ExtraDataDropped { index, size } => {
                out(&format!(
                    "Discarding too much extra metadata in snapshot table entry {index} ({size} > {})",
                    oxqcow_format::limits::MAX_SNAPSHOT_EXTRA_DATA
                ));
                dropped += 1;
            }
            SnapshotRepair::Overhanging { count } => {
                out(&format!("Discarding {count} overhanging snapshots (snapshot table is too big)"));
                reduced += count;
            }
        };
        let repair: Option<&mut dyn FnMut(SnapshotRepair)> = if fix.errors { Some(&mut report) } else { None };
        let table = match read_snapshots(self.st, offset, count, file_len, SnapshotRead::Check, repair) {
            Ok(t) => t,
            Err(Error::Format(
                e @ (FormatError::SnapshotExtraData { .. } | FormatError::SnapshotTableTooBig { .. }),
            )) => {
                res.check_errors += 1;
                res.error_report = Some(format!("ERROR failed to read the snapshot table: {e}"));
                return Err(Stop::Errno(EFBIG));
            }
            Err(e) => return Err(e.into()),
        };
        res.corruptions += u64::from(reduced) + dropped;
        let kept = table.entries.len() as u32;
        if reduced > 0 {
            // The header follows now: the refcount check counts the
            // entries it names, and the ones dropped become leaks it
            // repairs.
            let (at, bytes) = nb_snapshots_field(kept);
            self.st.write_at(&bytes, at).map_err(Error::io("updating the snapshot count", at))?;
            self.st.sync().map_err(Error::io("syncing the header", at))?;
            res.corruptions_fixed += u64::from(reduced);
            res.corruptions -= u64::from(reduced);
        }
        self.meta.header.nb_snapshots = kept;
        self.meta.header.snapshots_offset = offset;
        self.meta.snapshots = table;
        self.meta.update_reserved();
        // Version 3 wants the VM state and disk sizes in every entry.
        if self.meta.header.version >= 3 {
            let incomplete: Vec<usize> = (0..self.meta.snapshots.entries.len())
                .filter(|&i| self.meta.snapshots.entries[i].disk_size.is_none())
                .collect();
            for i in incomplete {
                res.corruptions += 1;
                let verb = if fix.errors { "Repairing" } else { "ERROR" };
                self.say(&format!("{verb} snapshot table entry {i} is incomplete"));
            }
        }
        Ok(())
    }

    /// Rewrites the snapshot table when its read found something to
    /// repair (complete v3 entries, extra data cut to the limit).
    pub(super) fn fix_snapshot_table(&mut self, res: &mut CheckReport, fix: Fix) -> Step<()> {
        if res.corruptions == 0 || !fix.errors {
            return Ok(());
        }
        let size = self.meta.header.size;
        let mut entries = self.meta.snapshots.entries.clone();
        for e in &mut entries {
            e.disk_size.get_or_insert(size);
            e.vm_state_size_large.get_or_insert(u64::from(e.vm_state_size));
        }
        let st = self.st;
        let modes = DiscardModes { snapshot: true, ..Default::default() };
        match self.meta.write_snapshot_table(st, entries, modes) {
            Ok(true) => {}
            Ok(false) => self.say(&format!("qcow2_free_clusters failed: {EINVAL}")),
            Err(e) if !overlap::is_overlap_error(&e) => return Err(e.into()),
            Err(e) => {
                // The new table's clusters are free by their refcounts but
                // under a structure the header names (the old table, when it
                // reaches past the end of the file): QEMU's write is refused.
                self.signal_corruption(e.to_string())?;
                self.say(&format!("ERROR failed to update snapshot table: {EIO}"));
                res.check_errors += 1;
                return Err(Stop::Errno(EIO));
            }
        }
        self.meta.flush_all(st)?;
        res.corruptions_fixed += res.corruptions;
        res.corruptions = 0;
        Ok(())
    }
}
