//! Consistency check and repair, done the way QEMU's qcow2 driver does them
//! (`qcow2_co_check_locked` and the refcount check it runs), so that the
//! verdict, the counts, every message line and the repaired image are the
//! ones `qemu-img check` gives.
//!
//! The check reads the metadata straight from the file: it counts, in an
//! in-memory refcount table, every reference the header, the L1 and L2
//! tables (active and snapshots), the snapshot table and the refcount
//! structures hold, then compares those counts with the stored refcounts,
//! then checks the COPIED flags of the active tables. A repair fixes counts
//! one by one (leaks, and with `All` too-low counts), or, where a stored
//! count is 0 for a used cluster or the refcount structures themselves are
//! broken, rebuilds them from the in-memory table in the clusters it says
//! are free (QEMU's `rebuild_refcount_structure`), points the header at
//! them, and frees the old ones. It also fixes COPIED flags, unaligned
//! preallocated zero clusters and the snapshot table (`snapshots.rs`:
//! incomplete entries, too much extra data, too many entries).
//!
//! Where QEMU's repair would fail (a rebuild whose new blocks land on a
//! refcount block that a broken table entry still names), the rebuild here
//! steps over every cluster any table entry names, and succeeds. Growing
//! the file to reach a refcount block past its end is bounded.

use std::sync::atomic::AtomicU64;

use oxqcow_format::header::{autoclear, incompat};
use oxqcow_format::refcount::RefcountBlock;
use oxqcow_format::refcount::RefcountTableEntry;
use oxqcow_format::table::decode_entries;
use oxqcow_format::Geometry;

mod cached_len;
mod calculate;
mod compare;
mod copied;
mod imrt;
mod rebuild;
mod snapshots;

use crate::error::{Error, Result};
use crate::qcow2::meta::{alt_hex, Meta};
use crate::storage::Storage;
use cached_len::{CachedLen, UNKNOWN_LEN};
use imrt::Imrt;

/// What a repair may change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepairMode {
    /// Only leaked clusters (`check -r leaks`).
    Leaks,
    /// Leaks and corruptions (`check -r all`).
    All,
}

/// The outcome of a check, with the numbers `qemu-img check` prints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Corruptions found (after repair: those left).
    pub corruptions: u64,
    /// Leaked clusters found (after repair: those left).
    pub leaks: u64,
    /// Errors that stopped parts of the check.
    pub check_errors: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// Offset just past the last used cluster.
    pub image_end_offset: u64,
    /// Guest clusters.
    pub total_clusters: u64,
    /// Guest clusters with data (or a reserved cluster).
    pub allocated_clusters: u64,
    /// Allocated clusters not contiguous with their predecessor.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// The lines QEMU prints on stderr for each problem, in order, when
    /// the check collected them ([`crate::Qcow2::check`]): the first
    /// [`MAX_KEPT_MESSAGES`]. Empty when they went to a caller's sink
    /// ([`crate::Qcow2::check_with`]).
    pub messages: Vec<String>,
    /// Lines left out of `messages` past [`MAX_KEPT_MESSAGES`].
    pub messages_dropped: u64,
    /// When the check itself failed, the error text QEMU gives for it
    /// (`qemu-img` then prints "Check failed: TEXT" and no summary).
    pub error: Option<String>,
    /// What QEMU reports with its program name in front (`error_report`)
    /// just before such a failure, hint lines included ("ERROR failed to
    /// read the snapshot table: ...").
    pub error_report: Option<String>,
}

/// Most lines a collected [`CheckReport`] keeps. A damaged image can make
/// a check print a line per reference (65536 L1 entries naming one full
/// L2 table give billions); QEMU prints each as it finds it and keeps
/// none, so a caller that wants them all gives a sink instead.
pub const MAX_KEPT_MESSAGES: usize = 10_000;

/// Runs `check` with a sink that keeps the first [`MAX_KEPT_MESSAGES`]
/// lines in the report and counts the rest.
pub(crate) fn collected(check: impl FnOnce(&mut dyn FnMut(&str)) -> Result<CheckReport>) -> Result<CheckReport> {
    let mut kept = Vec::new();
    let mut dropped = 0u64;
    let mut report = check(&mut |line: &str| {
        if kept.len() < MAX_KEPT_MESSAGES {
            kept.push(line.to_string());
        } else {
            dropped += 1;
        }
    })?;
    report.messages = kept;
    report.messages_dropped = dropped;
    Ok(report)
}

/// QEMU refuses to check images of more than `INT_MAX` host clusters.
const MAX_CHECK_CLUSTERS: u64 = i32::MAX as u64;
/// How far a repair may grow the file to reach a refcount block that lies
/// past its end (QEMU grows it without a bound; a hostile table entry
/// could ask for terabytes).
const MAX_REPAIR_GROWTH: u64 = 1 << 30;

const EIO: &str = "Input/output error";
const EFBIG: &str = "File too large";
const EINVAL: &str = "Invalid argument";

/// Why a step of the check stopped: an errno-like condition QEMU reports
/// by its text, or a real error of the engine.
enum Stop {
    Errno(&'static str),
    Engine(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Stop::Engine(e)
    }
}

type Step<T> = std::result::Result<T, Stop>;

/// Which repairs a pass may make (QEMU's `BdrvCheckMode` bits).
#[derive(Clone, Copy, Default)]
struct Fix {
    leaks: bool,
    errors: bool,
}

impl Fix {
    fn any(self) -> bool {
        self.leaks || self.errors
    }
}

struct Checker<'a> {
    meta: &'a mut Meta,
    st: &'a dyn Storage,
    g: Geometry,
    writable: bool,
    /// The refcount table as QEMU keeps it in memory: raw entries.
    reftable: Vec<u64>,
    reftable_offset: u64,
    /// The last refcount block read: (offset, bytes, changed and not yet
    /// written).
    block: Option<(u64, Vec<u8>, bool)>,
    imrt: Imrt,
    /// Where each message line goes the moment it is found, as QEMU
    /// prints it: nothing here grows with the number of problems.
    out: &'a mut dyn FnMut(&str),
}

/// Checks the image as QEMU's qcow2 check does, handing each message line
/// to `out` as it is found. The caller holds exclusive access with
/// metadata flushed.
pub(crate) fn check(
    meta: &mut Meta,
    storage: &dyn Storage,
    repair: Option<RepairMode>,
    out: &mut dyn FnMut(&str),
) -> Result<CheckReport> {
    let fix = match repair {
        None => Fix::default(),
        Some(RepairMode::Leaks) => Fix { leaks: true, errors: false },
        Some(RepairMode::All) => Fix { leaks: true, errors: true },
    };
    let g = meta.geometry;
    // The allocator moves the refcount table without touching the header
    // copy in memory (it rewrites only the two fields on disk).
    meta.header.refcount_table_offset = meta.refcounts.table_offset();
    meta.header.refcount_table_clusters = meta.refcounts.table_clusters();
    let reftable_offset = meta.header.refcount_table_offset;
    let reftable_bytes = u64::from(meta.header.refcount_table_clusters) * g.cluster_size();
    let cached = CachedLen { inner: storage, len: AtomicU64::new(UNKNOWN_LEN) };
    let mut c = Checker {
        writable: !meta.read_only,
        st: &cached,
        g,
        reftable: Vec::new(),
        reftable_offset,
        block: None,
        imrt: Imrt::new(0),
        out,
        meta,
    };
    c.reftable = decode_entries(&c.read_padded(reftable_offset, reftable_bytes)?);
    let mut report = CheckReport::default();
    // QEMU's qcow2_check_header: a raw data file cannot stand for the disk
    // when unallocated clusters read from a backing file.
    if c.meta.has_backing && c.meta.header.autoclear_features & autoclear::DATA_FILE_RAW != 0 {
        let verb = if fix.errors { "Repairing" } else { "ERROR in" };
        c.say(&format!("{verb} header: data-file-raw cannot be set when there is a backing file."));
        if fix.errors {
            c.meta.header.autoclear_features &= !autoclear::DATA_FILE_RAW;
            if let Some(d) = c.meta.data_file.as_mut() {
                d.raw = false;
            }
            c.meta.write_header(storage)?;
            storage.sync().map_err(Error::io("syncing the header", 0))?;
            report.corruptions_fixed += 1;
        } else {
            report.corruptions += 1;
        }
    }
    // The snapshot table (QEMU's qcow2_check_read_snapshot_table).
    let mut snapshot_res = CheckReport::default();
    if let Err(stop) = c.read_snapshot_table(&mut snapshot_res, fix) {
        report.check_errors += snapshot_res.check_errors;
        report.error_report = snapshot_res.error_report.take();
        return c.finish(report, Some(stop), snapshot_res);
    }
    let outcome = c.check_refcounts(&mut report, fix);
    let mut result = report;
    if let Err(stop) = outcome {
        return c.finish(result, Some(stop), snapshot_res);
    }
    // The engine's view of the refcount structures follows the repair
    // before anything else writes (a header write takes the table
    // location from it).
    c.reload_meta()?;
    if let Err(stop) = c.fix_snapshot_table(&mut snapshot_res, fix) {
        result.check_errors += snapshot_res.check_errors;
        return c.finish(result, Some(stop), snapshot_res);
    }
    result.corruptions += snapshot_res.corruptions;
    result.corruptions_fixed += snapshot_res.corruptions_fixed;
    if fix.any() && result.check_errors == 0 && result.corruptions == 0 {
        // qcow2_mark_clean and qcow2_mark_consistent.
        let h = &mut c.meta.header;
        if h.incompatible_features & (incompat::DIRTY | incompat::CORRUPT) != 0 {
            h.incompatible_features &= !(incompat::DIRTY | incompat::CORRUPT);
            c.meta.write_header(storage)?;
            storage.sync().map_err(Error::io("syncing the header", 0))?;
        }
    }
    c.finish(result, None, CheckReport::default())
}

impl Checker<'_> {
    /// Hands the report back, after bringing the engine's view of the
    /// metadata in line with what the repair wrote.
    pub(super) fn finish(
        mut self,
        mut report: CheckReport,
        stop: Option<Stop>,
        extra: CheckReport,
    ) -> Result<CheckReport> {
        report.corruptions += extra.corruptions;
        report.corruptions_fixed += extra.corruptions_fixed;
        if let Some(stop) = stop {
            match stop {
                Stop::Errno(text) => report.error = Some(text.to_string()),
                Stop::Engine(e) => {
                    self.reload_meta()?;
                    return Err(e);
                }
            }
        }
        self.reload_meta()?;
        Ok(report)
    }

    /// Reloads the refcount structures and tables the engine caches.
    pub(super) fn reload_meta(&mut self) -> Result<()> {
        if self.meta.read_only {
            return Ok(());
        }
        let st = self.st;
        let file_len = st.len().map_err(Error::io("reading the file length", 0))?;
        let h = &self.meta.header;
        let (g, offset, clusters) = (self.meta.geometry, h.refcount_table_offset, h.refcount_table_clusters);
        self.meta.refcounts.reload_with_geometry(st, g, offset, clusters, file_len, true)?;
        self.meta.l2.drop_clean();
        self.meta.update_reserved();
        self.meta.load_inactive_map(st)
    }

    pub(super) fn say(&mut self, line: &str) {
        (self.out)(line);
    }

    pub(super) fn file_len(&self) -> Result<u64> {
        self.st.len().map_err(Error::io("reading the file length", 0))
    }

    /// Reads `len` bytes at `offset`; what lies past the end of the file
    /// reads as zeros, as QEMU's file driver returns it.
    pub(super) fn read_padded(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        let file_len = self.file_len()?;
        let n = file_len.saturating_sub(offset).min(len) as usize;
        if n > 0 {
            self.st.read_at(&mut buf[..n], offset).map_err(Error::io("reading metadata", offset))?;
        }
        Ok(buf)
    }

    /// QEMU's `qcow2_signal_corruption` for a fatal event: on a writable
    /// image the corrupt bit is set; the message is printed once.
    pub(super) fn signal_corruption(&mut self, what: String) -> Result<()> {
        if self.meta.signaled_corruption && (!self.writable || self.meta.header.is_corrupt()) {
            return Ok(());
        }
        if self.writable {
            self.say(&format!("qcow2: Marking image as corrupt: {what}; further corruption events will be suppressed"));
            if self.meta.header.version >= 3 && !self.meta.header.is_corrupt() {
                let features = self.meta.header.incompatible_features | incompat::CORRUPT;
                let (pos, bytes) = oxqcow_format::header::incompatible_features_field(features);
                self.st.write_at(&bytes, pos).map_err(Error::io("setting the corrupt bit", pos))?;
                self.st.sync().map_err(Error::io("syncing the header", pos))?;
                self.meta.header.incompatible_features = features;
            }
        } else {
            self.say(&format!(
                "qcow2: Image is corrupt: {what}; further non-fatal corruption events will be suppressed"
            ));
        }
        self.meta.signaled_corruption = true;
        Ok(())
    }

    /// A write refused by the overlap check: QEMU signals a corruption.
    pub(super) fn signal_overlap(&mut self, template: u32) -> Result<()> {
        let name = crate::qcow2::meta::overlap::template_name(template);
        self.signal_corruption(format!("Preventing invalid write on metadata (overlaps with {name})"))
    }

    /// The stored refcount of host cluster `c` (QEMU's `qcow2_get_refcount`).
    pub(super) fn get_refcount(&mut self, c: u64) -> Step<u64> {
        let g = self.g;
        let ti = c >> g.refcount_block_bits();
        let Some(&entry) = self.reftable.get(ti as usize) else { return Ok(0) };
        let offset = RefcountTableEntry(entry).block_offset().map_or(0, |o| o.0);
        if offset == 0 {
            return Ok(0);
        }
        if !g.is_cluster_aligned(offset) {
            self.signal_corruption(format!(
                "Refblock offset {} unaligned (reftable index: {})",
                alt_hex(offset),
                alt_hex(ti)
            ))?;
            return Err(Stop::Errno(EIO));
        }
        // A broken entry may name a block QEMU's block layer will not read.
        if offset.checked_add(g.cluster_size()).is_none_or(|end| end > oxqcow_format::limits::MAX_REQUEST_END) {
            return Err(Stop::Errno(EIO));
        }
        self.load_block(offset)?;
        let (_, data, _) = self.block.as_ref().expect("just read");
        let index = (c & (g.refcounts_per_block() - 1)) as usize;
        Ok(RefcountBlock::get(data, index, g.refcount_order()))
    }

    /// Makes the block at `offset` the cached one (writing back a changed
    /// one first).
    pub(super) fn load_block(&mut self, offset: u64) -> Result<()> {
        if self.block.as_ref().is_some_and(|(o, _, _)| *o == offset) {
            return Ok(());
        }
        self.write_block()?;
        let data = self.read_padded(offset, self.g.cluster_size())?;
        self.block = Some((offset, data, false));
        Ok(())
    }

    /// Writes the cached block back if it changed.
    pub(super) fn write_block(&mut self) -> Result<()> {
        if let Some((offset, data, dirty)) = &mut self.block {
            if *dirty {
                self.st.write_at(data, *offset).map_err(Error::io("writing a refcount block", *offset))?;
                *dirty = false;
            }
        }
        Ok(())
    }

    /// Changes the stored refcount of `c` by `diff` (QEMU's
    /// `update_refcount` as the check calls it: the block exists).
    pub(super) fn update_refcount(&mut self, c: u64, value: u64) -> Step<()> {
        let g = self.g;
        let ti = c >> g.refcount_block_bits();
        let offset =
            self.reftable.get(ti as usize).map_or(0, |&e| RefcountTableEntry(e).block_offset().map_or(0, |o| o.0));
        if offset == 0 || !g.is_cluster_aligned(offset) {
            return Err(Stop::Errno(EIO));
        }
        self.load_block(offset)?;
        let (_, data, dirty) = self.block.as_mut().expect("just read");
        let index = (c & (g.refcounts_per_block() - 1)) as usize;
        RefcountBlock::set(data, index, g.refcount_order(), value);
        *dirty = true;
        if value == 0 {
            // Freed with QCOW2_DISCARD_ALWAYS: the host space goes back.
            let at = c << g.cluster_bits();
            self.st.punch_hole(at, g.cluster_size()).map_err(Error::io("discarding a host cluster", at))?;
        }
        Ok(())
    }
}
