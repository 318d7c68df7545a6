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
//! preallocated zero clusters and incomplete snapshot table entries.
//!
//! Where QEMU's repair would fail (a rebuild whose new blocks land on a
//! refcount block that a broken table entry still names), the rebuild here
//! steps over every cluster any table entry names, and succeeds. Growing
//! the file to reach a refcount block past its end is bounded.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};

use oxqcow_format::header::{autoclear, incompat};
use oxqcow_format::refcount::RefcountBlock;
use oxqcow_format::table::{
    decode_entries, encode_entries, read_l2_bitmap, read_l2_word, write_l2_bitmap, write_l2_word,
};
use oxqcow_format::Geometry;
use oxqcow_format::L2Bitmap;

use crate::error::{Error, Result};
use crate::qcow2::meta::Meta;
use crate::storage::Storage;

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

const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
const REFT_RESERVED_MASK: u64 = 0x1ff;
const OFLAG_COPIED: u64 = 1 << 63;
const OFLAG_COMPRESSED: u64 = 1 << 62;
const OFLAG_ZERO: u64 = 1;
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

/// printf's `%#x`: `0` for zero, `0x...` otherwise.
fn alt_hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// The in-memory refcount table (QEMU's "IMRT"): 16 bits per host cluster,
/// larger counts on the side, and a length that grows as QEMU's does.
struct Imrt {
    counts: Vec<u16>,
    big: HashMap<u64, u64>,
}

impl Imrt {
    fn new(len: u64) -> Self {
        Imrt { counts: vec![0; len as usize], big: HashMap::new() }
    }
    fn len(&self) -> u64 {
        self.counts.len() as u64
    }
    fn grow(&mut self, len: u64) {
        if len > self.len() {
            self.counts.resize(len as usize, 0);
        }
    }
    fn get(&self, c: u64) -> u64 {
        match self.counts.get(c as usize) {
            Some(&u16::MAX) => self.big[&c],
            Some(&v) => u64::from(v),
            None => 0,
        }
    }
    fn set(&mut self, c: u64, v: u64) {
        self.grow(c + 1);
        if v >= u64::from(u16::MAX) {
            self.counts[c as usize] = u16::MAX;
            self.big.insert(c, v);
        } else {
            self.counts[c as usize] = v as u16;
            self.big.remove(&c);
        }
    }
    fn clear(&mut self) {
        self.counts.fill(0);
        self.big.clear();
    }
}

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

/// The cluster types of QEMU's `qcow2_get_cluster_type`. With extended L2
/// entries the zero flag has no meaning, so there are no zero clusters.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ClusterType {
    Unallocated,
    ZeroPlain,
    ZeroAlloc,
    Normal,
    Compressed,
}

/// `external`: the image keeps its data in an external data file, where
/// offset 0 with COPIED is guest cluster 0, not an unallocated entry.
fn cluster_type(entry: u64, extended_l2: bool, external: bool) -> ClusterType {
    if entry & OFLAG_COMPRESSED != 0 {
        ClusterType::Compressed
    } else if entry & OFLAG_ZERO != 0 && !extended_l2 {
        if entry & L2E_OFFSET_MASK != 0 {
            ClusterType::ZeroAlloc
        } else {
            ClusterType::ZeroPlain
        }
    } else if entry & L2E_OFFSET_MASK == 0 && !(external && entry & OFLAG_COPIED != 0) {
        ClusterType::Unallocated
    } else {
        ClusterType::Normal
    }
}

const UNKNOWN_LEN: u64 = u64::MAX;

/// The image file with its length remembered until something changes it:
/// check asks for the length for every cluster it counts (as QEMU's check
/// asks its block layer, which keeps the length too), and a stat per
/// cluster made checking a large image several times slower than QEMU.
struct CachedLen<'a> {
    inner: &'a dyn Storage,
    len: AtomicU64,
}

impl CachedLen<'_> {
    fn changed(&self) {
        self.len.store(UNKNOWN_LEN, Ordering::Relaxed);
    }
}

impl Storage for CachedLen<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.changed();
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        match self.len.load(Ordering::Relaxed) {
            UNKNOWN_LEN => {
                let len = self.inner.len()?;
                self.len.store(len, Ordering::Relaxed);
                Ok(len)
            }
            len => Ok(len),
        }
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.changed();
        self.inner.set_len(len)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.inner.sync()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.changed();
        self.inner.punch_hole(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.changed();
        self.inner.write_zeroes(offset, len)
    }
    fn write_zeroes_fast(&self, offset: u64, len: u64) -> std::io::Result<bool> {
        self.changed();
        self.inner.write_zeroes_fast(offset, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.changed();
        self.inner.allocate(offset, len)
    }
    fn data_runs(&self, offset: u64, len: u64) -> std::io::Result<Vec<(u64, u64, bool)>> {
        self.inner.data_runs(offset, len)
    }
    fn set_ignore_sync(&self, ignore: bool) {
        self.inner.set_ignore_sync(ignore)
    }
    fn allocated_bytes(&self) -> std::io::Result<u64> {
        self.inner.allocated_bytes()
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
    let incomplete: Vec<usize> = if c.meta.header.version >= 3 {
        (0..c.meta.snapshots.entries.len()).filter(|&i| c.meta.snapshots.entries[i].disk_size.is_none()).collect()
    } else {
        Vec::new()
    };
    for &i in &incomplete {
        snapshot_res.corruptions += 1;
        let verb = if fix.errors { "Repairing" } else { "ERROR" };
        c.say(&format!("{verb} snapshot table entry {i} is incomplete"));
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
    // qcow2_check_fix_snapshot_table.
    if snapshot_res.corruptions > 0 && fix.errors {
        let size = c.meta.header.size;
        let mut entries = c.meta.snapshots.entries.clone();
        for e in &mut entries {
            e.disk_size.get_or_insert(size);
            e.vm_state_size_large.get_or_insert(u64::from(e.vm_state_size));
        }
        let modes = crate::qcow2::meta::DiscardModes { snapshot: true, ..Default::default() };
        c.meta.write_snapshot_table(storage, entries, modes)?;
        c.meta.flush_all(storage)?;
        snapshot_res.corruptions_fixed += snapshot_res.corruptions;
        snapshot_res.corruptions = 0;
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
    fn finish(mut self, mut report: CheckReport, stop: Option<Stop>, extra: CheckReport) -> Result<CheckReport> {
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
    fn reload_meta(&mut self) -> Result<()> {
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

    fn say(&mut self, line: &str) {
        (self.out)(line);
    }

    fn file_len(&self) -> Result<u64> {
        self.st.len().map_err(Error::io("reading the file length", 0))
    }

    /// Reads `len` bytes at `offset`; what lies past the end of the file
    /// reads as zeros, as QEMU's file driver returns it.
    fn read_padded(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
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
    fn signal_corruption(&mut self, what: String) -> Result<()> {
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
    fn signal_overlap(&mut self, template: u32) -> Result<()> {
        let name = crate::qcow2::meta::overlap::template_name(template);
        self.signal_corruption(format!("Preventing invalid write on metadata (overlaps with {name})"))
    }

    /// The stored refcount of host cluster `c` (QEMU's `qcow2_get_refcount`).
    fn get_refcount(&mut self, c: u64) -> Step<u64> {
        let g = self.g;
        let ti = c >> g.refcount_block_bits();
        let Some(&entry) = self.reftable.get(ti as usize) else { return Ok(0) };
        let offset = entry & REFT_OFFSET_MASK;
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
        self.load_block(offset)?;
        let (_, data, _) = self.block.as_ref().expect("just read");
        let index = (c & (g.refcounts_per_block() - 1)) as usize;
        Ok(RefcountBlock::get(data, index, g.refcount_order()))
    }

    /// Makes the block at `offset` the cached one (writing back a changed
    /// one first).
    fn load_block(&mut self, offset: u64) -> Result<()> {
        if self.block.as_ref().is_some_and(|(o, _, _)| *o == offset) {
            return Ok(());
        }
        self.write_block()?;
        let data = self.read_padded(offset, self.g.cluster_size())?;
        self.block = Some((offset, data, false));
        Ok(())
    }

    /// Writes the cached block back if it changed.
    fn write_block(&mut self) -> Result<()> {
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
    fn update_refcount(&mut self, c: u64, value: u64) -> Step<()> {
        let g = self.g;
        let ti = c >> g.refcount_block_bits();
        let offset = self.reftable.get(ti as usize).map_or(0, |e| e & REFT_OFFSET_MASK);
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

    /// QEMU's `qcow2_inc_refcounts_imrt`.
    fn inc_refcounts(&mut self, res: &mut CheckReport, offset: u64, size: u64) -> Step<()> {
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
    fn check_l1(
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
            if e & L1E_RESERVED_MASK != 0 {
                self.say(&format!("ERROR found L1 entry with reserved bits set: {e:x}"));
                res.corruptions += 1;
            }
            let l2_offset = e & L1E_OFFSET_MASK;
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
    fn check_l2(&mut self, res: &mut CheckReport, l2_offset: u64, frag_info: bool, fix: Fix, active: bool) -> Step<()> {
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
            let ty = cluster_type(entry, ext, external);
            if ty != ClusterType::Compressed && entry & L2E_STD_RESERVED_MASK != 0 {
                self.say(&format!("ERROR found l2 entry with reserved bits set: {entry:x}"));
                res.corruptions += 1;
            }
            match ty {
                ClusterType::Compressed => {
                    if entry & OFLAG_COPIED != 0 {
                        self.say(&format!(
                            "ERROR: coffset=0x{:x}: copied flag must never be set for compressed clusters",
                            entry & offset_mask
                        ));
                        entry &= !OFLAG_COPIED;
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
                    let offset = entry & L2E_OFFSET_MASK;
                    if bitmap.alloc() & bitmap.zero() != 0 {
                        res.corruptions += 1;
                        self.say(&format!(
                            "ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                        ));
                    }
                    if !g.is_cluster_aligned(offset) {
                        res.corruptions += 1;
                        let contains_data = if ext { bitmap.alloc() != 0 } else { entry & OFLAG_ZERO == 0 };
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
    fn fix_l2_entry_by_zero(
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
            write_l2_word(table, i, esize, OFLAG_ZERO);
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
    fn calculate_refcounts(&mut self, res: &mut CheckReport, fix: Fix, rebuild: &mut bool) -> Step<()> {
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
    fn count_bitmaps(&mut self, res: &mut CheckReport) -> Step<()> {
        let Some(b) = self.meta.header.extensions.bitmaps else { return Ok(()) };
        if b.nb_bitmaps == 0 {
            return Ok(());
        }
        self.inc_refcounts(res, b.directory_offset, b.directory_size)?;
        // The header parser bounded the directory size; bytes past the end
        // of the file read as zeros, as QEMU's reads do.
        let dir = self.read_padded(b.directory_offset, b.directory_size)?;
        let cs = self.g.cluster_size();
        let Ok(entries) = oxqcow_format::bitmap::parse_directory(&dir, b.nb_bitmaps, cs, self.meta.header.size) else {
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
    fn check_refblocks(&mut self, res: &mut CheckReport, fix: Fix, rebuild: &mut bool) -> Step<()> {
        let g = self.g;
        let cs = g.cluster_size();
        for i in 0..self.reftable.len() {
            let entry = self.reftable[i];
            let offset = entry & REFT_OFFSET_MASK;
            let cluster = offset >> g.cluster_bits();
            if entry & REFT_RESERVED_MASK != 0 {
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

    /// QEMU's `compare_ref_counts`; returns the highest cluster in use.
    fn compare(&mut self, res: &mut CheckReport, fix: Fix, rebuild: &mut bool) -> Step<u64> {
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
    fn check_refcounts(&mut self, res: &mut CheckReport, fix: Fix) -> Step<()> {
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

    /// QEMU's `check_oflag_copied` over the active L1 and L2 tables.
    fn check_oflag_copied(&mut self, res: &mut CheckReport, fix: Fix) -> Step<()> {
        let g = self.g;
        let cs = g.cluster_size();
        let repair = if fix.errors {
            true
        } else if fix.leaks {
            res.check_errors == 0 && res.corruptions == 0 && res.leaks == 0
        } else {
            false
        };
        let verb = if repair { "Repairing" } else { "ERROR" };
        for i in 0..self.meta.l1.len() {
            let l1_entry = self.meta.l1[i];
            let l2_offset = l1_entry & L1E_OFFSET_MASK;
            if l2_offset == 0 {
                continue;
            }
            let Ok(rc) = self.get_refcount(l2_offset >> g.cluster_bits()) else { continue };
            if (rc == 1) != (l1_entry & OFLAG_COPIED != 0) {
                res.corruptions += 1;
                self.say(&format!("{verb} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1_entry:x} refcount={rc}"));
                if repair {
                    let new = if rc == 1 { l1_entry | OFLAG_COPIED } else { l1_entry & !OFLAG_COPIED };
                    let at = self.meta.header.l1_table_offset + i as u64 * 8;
                    if let Some(t) = self.meta.refcounts.overlap(at, 8, crate::qcow2::meta::overlap::ACTIVE_L1) {
                        self.signal_overlap(t)?;
                        res.check_errors += 1;
                        return Err(Stop::Errno(EIO));
                    }
                    self.st.write_at(&new.to_be_bytes(), at).map_err(Error::io("writing an L1 entry", at))?;
                    self.st.sync().map_err(Error::io("syncing an L1 entry", at))?;
                    self.meta.l1[i] = new;
                    res.corruptions -= 1;
                    res.corruptions_fixed += 1;
                }
            }
            let mut table = self.read_padded(l2_offset, cs)?;
            let mut dirty = 0u64;
            let esize = g.l2_entry_size() as usize;
            let external = self.meta.data_file.is_some();
            for j in 0..g.l2_entries() as usize {
                let entry = read_l2_word(&table, j, esize);
                if !matches!(
                    cluster_type(entry, g.extended_l2(), external),
                    ClusterType::Normal | ClusterType::ZeroAlloc
                ) {
                    continue;
                }
                // QEMU takes every data file cluster's refcount to be 1.
                let rc = if external {
                    1
                } else {
                    let Ok(rc) = self.get_refcount((entry & L2E_OFFSET_MASK) >> g.cluster_bits()) else { continue };
                    rc
                };
                if (rc == 1) != (entry & OFLAG_COPIED != 0) {
                    res.corruptions += 1;
                    self.say(&format!("{verb} OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={rc}"));
                    if repair {
                        let new = if rc == 1 { entry | OFLAG_COPIED } else { entry & !OFLAG_COPIED };
                        write_l2_word(&mut table, j, esize, new);
                        dirty += 1;
                    }
                }
            }
            if dirty > 0 {
                if let Some(t) = self.meta.refcounts.overlap(l2_offset, cs, crate::qcow2::meta::overlap::ACTIVE_L2) {
                    self.signal_overlap(t)?;
                    self.say(&format!("ERROR: Could not write L2 table; metadata overlap check failed: {EIO}"));
                    res.check_errors += 1;
                    return Err(Stop::Errno(EIO));
                }
                self.st.write_at(&table, l2_offset).map_err(Error::io("writing an L2 table", l2_offset))?;
                res.corruptions -= dirty;
                res.corruptions_fixed += dirty;
            }
        }
        self.st.sync().map_err(Error::io("syncing the repaired tables", 0))?;
        Ok(())
    }

    /// Clusters that some refcount table entry names, valid or not: the
    /// rebuild never puts new structures there (QEMU does, when the entry
    /// is broken, and then fails on its overlap check).
    fn named_by_reftable(&self) -> BTreeSet<u64> {
        let g = self.g;
        let mut out = BTreeSet::new();
        for &e in &self.reftable {
            let offset = e & REFT_OFFSET_MASK;
            if offset != 0 {
                out.insert(offset >> g.cluster_bits());
                out.insert((offset + g.cluster_size() - 1) >> g.cluster_bits());
            }
        }
        out
    }

    /// QEMU's `alloc_clusters_imrt`: the first run of `count` clusters the
    /// in-memory table says are free, from `*first_free` on.
    fn alloc_imrt(&mut self, count: u64, first_free: &mut u64, avoid: &BTreeSet<u64>) -> u64 {
        let mut cluster = *first_free;
        let mut contiguous = 0u64;
        let mut first_gap = true;
        while cluster < self.imrt.len() && contiguous < count {
            if self.imrt.get(cluster) == 0 && !avoid.contains(&cluster) {
                contiguous += 1;
                if first_gap {
                    *first_free = cluster;
                    first_gap = false;
                }
            } else if contiguous > 0 {
                contiguous = 0;
            }
            cluster += 1;
        }
        while contiguous < count {
            // Past the table's end every cluster is free, but for those a
            // broken entry names.
            if avoid.contains(&cluster) {
                contiguous = 0;
            } else {
                contiguous += 1;
            }
            cluster += 1;
        }
        self.imrt.grow(cluster);
        let start = cluster - contiguous;
        for c in start..start + count {
            self.imrt.set(c, 1);
        }
        start << self.g.cluster_bits()
    }

    /// Writes one refcount block: the in-memory counts of its range.
    fn write_refblock(&mut self, index: u64, offset: u64) -> Step<()> {
        let g = self.g;
        let per_block = g.refcounts_per_block();
        let mut block = vec![0u8; g.cluster_size() as usize];
        for k in 0..per_block {
            let r = self.imrt.get(index * per_block + k);
            if r != 0 {
                RefcountBlock::set(&mut block, k as usize, g.refcount_order(), r);
            }
        }
        self.st.write_at(&block, offset).map_err(Error::io("writing a refcount block", offset))?;
        Ok(())
    }

    /// QEMU's `rebuild_refcounts_write_refblocks`: a block for every range
    /// of `[first, end)` with a count in it. Returns whether the table grew.
    fn write_refblocks(&mut self, first: u64, mut end: u64, table: &mut Vec<u64>, avoid: &BTreeSet<u64>) -> Step<bool> {
        let g = self.g;
        let per_block = g.refcounts_per_block();
        let per_table_cluster = g.cluster_size() / 8;
        let mut first_free = 0u64;
        let mut grown = false;
        let mut cluster = first;
        while cluster < end {
            if self.imrt.get(cluster) == 0 {
                cluster += 1;
                continue;
            }
            let index = cluster / per_block;
            let start = index * per_block;
            let offset = match table.get(index as usize).copied().filter(|&o| o != 0) {
                Some(o) => o,
                None => {
                    first_free = first_free.max(start);
                    let o = self.alloc_imrt(1, &mut first_free, avoid);
                    let c = o >> g.cluster_bits();
                    if c >= end {
                        end = c + 1;
                    }
                    if table.len() as u64 <= index {
                        let entries = (index + 1).div_ceil(per_table_cluster) * per_table_cluster;
                        table.resize(entries as usize, 0);
                        grown = true;
                    }
                    table[index as usize] = o;
                    o
                }
            };
            self.write_refblock(index, offset)?;
            cluster = start + per_block;
        }
        Ok(grown)
    }

    /// QEMU's `rebuild_refcount_structure`.
    fn rebuild_refcount_structure(&mut self) -> Step<()> {
        self.write_block()?;
        self.block = None;
        let g = self.g;
        let avoid = self.named_by_reftable();
        let mut table: Vec<u64> = Vec::new();
        let len = self.imrt.len();
        self.write_refblocks(0, len, &mut table, &avoid)?;
        let (offset, clusters) = loop {
            let clusters = g.clusters_for(table.len() as u64 * 8);
            let mut first_free = 0;
            let offset = self.alloc_imrt(clusters, &mut first_free, &avoid);
            let start = offset >> g.cluster_bits();
            if !self.write_refblocks(start, start + clusters, &mut table, &avoid)? {
                break (offset, clusters);
            }
            for c in start..start + clusters {
                self.imrt.set(c, 0);
            }
        };
        if table.len() as u64 * 8 > oxqcow_format::limits::MAX_REFTABLE_BYTES {
            return Err(Stop::Errno(EFBIG));
        }
        let bytes = encode_entries(&table);
        self.st.write_at(&bytes, offset).map_err(Error::io("writing the refcount table", offset))?;
        self.st.sync().map_err(Error::io("syncing the rebuilt refcounts", offset))?;
        let (pos, field) = oxqcow_format::header::refcount_table_fields(offset, clusters as u32);
        self.st.write_at(&field, pos).map_err(Error::io("updating the header", pos))?;
        self.st.sync().map_err(Error::io("syncing the header", pos))?;
        self.meta.header.refcount_table_offset = offset;
        self.meta.header.refcount_table_clusters = clusters as u32;
        self.reftable = table;
        self.reftable_offset = offset;
        self.block = None;
        Ok(())
    }
}
