//! Crash tests: a fixed workload runs on a fault-injecting storage that
//! stops at host write N, for every N the workload performs, in two crash
//! models:
//! (a) torn: every write before N reached the medium, write N only a
//!     prefix of whole 512-byte sectors;
//! (b) unsynced: only what the last sync made durable survives;
//! (c) reordered: what the last sync made durable survives, and a random
//!     subset of the writes since.
//! After each crash the image must open read-write (a dirty lazy-refcount
//! image gets its refcounts rebuilt on open), check must find no
//! corruption (leaks are allowed), and every byte flushed and not touched
//! since must read back. Runs with lazy refcounts off and on.
//!
//! The main image has 512-byte clusters and 64-bit refcounts, so one
//! refcount block covers 64 clusters and the first refcount table 2 MiB of
//! host file: the workload grows the L1 table with one resize and the
//! refcount table with a preallocating one. Further scenarios:
//! - snapshots: creation and deletion while the active layer copies on write;
//! - compressed clusters (zlib, zstd; 4 KiB clusters): several packed into
//!   one host cluster, copied on write, freed by zero writes and discards
//!   until the shared host cluster is free, and packed again;
//! - overlays (v3 and v2) of a shorter qcow2 backing file: copy on write
//!   from the backing file must never lose its data in the parts of a
//!   cluster a write does not cover; zero writes and discards mask it (or,
//!   on v2, show it again); a shrink and regrowth must hide it;
//! - amend: refcount width changes (16 to 64 to 8 bits) and downgrades to
//!   compat 0.10 (expanding zero clusters, also a snapshot's, and, on an
//!   overlay, allocating clusters of zeros), with and without lazy
//!   refcounts: every host write of the amend is a crash point.
//!
//! `crash_harness_detects_*` show that the checks fail on what a wrong
//! write order would leave.

use oxqcow::{Compat, CompressionType, Image, MemoryStorage, Preallocation};
use oxqcow_testkit::crash::{run_workload, run_workload_on, unsafe_findings, verify_crashed, verify_crashed_on};
use oxqcow_testkit::faulty::CrashModel;
use oxqcow_testkit::model::{AmendOp, ImageConfig, Op};
use oxqcow_testkit::qemu;
use oxqcow_testkit::workload::{Backing, Harness, BACKING_NAME};
use std::sync::Arc;

const CS: u64 = 512;
const MIB: u64 = 1 << 20;

fn workload() -> Vec<Op> {
    let w = |offset: u64, len: u64, seed: u8| Op::Write { offset, len, seed };
    let z = |offset: u64, len: u64, may_unmap: bool| Op::WriteZeroes { offset, len, may_unmap };
    let d = |offset: u64, len: u64| Op::Discard { offset, len };
    vec![
        // Allocating writes, unaligned, across L2 tables (32 KiB each).
        w(1000, 40_000, 1),
        w(100_000, 700, 3),
        Op::Flush,
        // Overwrites in place, and a partial write next to an allocated one.
        w(5000, 3000, 2),
        w(100_500, 300, 4),
        // Zero writes: keeping the clusters, and unmapping them.
        z(10_000, 5000, false),
        z(20_000, 6000, true),
        Op::Flush,
        // Discard, then reuse part of the discarded range.
        d(30_000, 8000),
        w(31_000, 2000, 5),
        Op::Flush,
        // Grow from 32 to 128 L1 entries: a new L1 table.
        Op::Resize { size: 4 * MIB, prealloc: Preallocation::Off },
        w(3 * MIB + 77, 20_000, 6),
        Op::Flush,
        // Preallocating 2 MiB of 512-byte clusters takes the host file past
        // the 2 MiB the first refcount table covers: the table grows.
        Op::Resize { size: 6 * MIB, prealloc: Preallocation::Metadata },
        w(5 * MIB + 100, 10_000, 7),
        Op::Flush,
        d(4 * MIB, 64 * 1024),
        z(4 * MIB + 70_000, 3000, true),
        w(4 * MIB + 1000, 1500, 8),
        w(2000, 600, 9),
        Op::Flush,
        // Shrink by 16 KiB: clusters past the new end are freed (each one
        // punched out separately, so a small shrink keeps the run short),
        // the file is cut.
        Op::Resize { size: 6 * MIB - 16 * 1024, prealloc: Preallocation::Off },
        w(200_000, 3000, 10),
    ]
}

fn base_image(cs: u64, lazy: bool) -> Vec<u8> {
    let storage = Arc::new(MemoryStorage::new());
    let cfg = ImageConfig::new(cs, 64, Compat::V3, lazy);
    Image::create_storage(storage.clone(), &cfg.create_options(MIB)).unwrap().close().unwrap();
    storage.to_bytes()
}

fn crash_everywhere(cs: u64, lazy: bool, model: fn(u64) -> CrashModel) {
    crash_everywhere_with(cs, lazy, model, workload(), false);
}

/// Internal snapshots: creating and deleting them while the active layer
/// copies shared clusters on write.
fn snapshot_workload() -> Vec<Op> {
    let w = |offset: u64, len: u64, seed: u8| Op::Write { offset, len, seed };
    vec![
        w(1000, 40_000, 1),
        Op::Flush,
        Op::SnapshotCreate,
        // Copy on write of shared clusters, partial and whole.
        w(3000, 5000, 2),
        Op::WriteZeroes { offset: 12_000, len: 4000, may_unmap: true },
        Op::Discard { offset: 20_000, len: 6000 },
        Op::Flush,
        Op::SnapshotCreate,
        w(30_000, 9000, 3),
        Op::SnapshotDelete(0),
        Op::Flush,
        // Grow the L1 table while a snapshot holds the old one's tables.
        Op::Resize { size: 4 * MIB, prealloc: Preallocation::Off },
        w(3 * MIB, 3000, 4),
        w(2000, 3000, 5),
        Op::Flush,
        Op::SnapshotDelete(0),
        w(100, 700, 6),
    ]
}

/// Runs `ops` with a crash at every host write. With `snapshots`, the
/// harmless COPIED mismatches a crash inside snapshot creation or deletion
/// leaves are allowed (and must be repaired by `check -r all`).
fn crash_everywhere_with(cs: u64, lazy: bool, model: fn(u64) -> CrashModel, ops: Vec<Op>, snapshots: bool) {
    let base = base_image(cs, lazy);
    let full = run_workload(&base, cs, &ops, None);
    assert!(full.error.is_none(), "the workload fails without a crash: {:?}", full.error);
    // The refcount table grew (its offset moved) and so did the L1 table.
    let header = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let end = full.storage.durable_bytes();
    if cs == CS && ops == workload() {
        assert_ne!(header(&end, 48), header(&base, 48), "the workload must grow the refcount table");
    }
    assert_ne!(header(&end, 40), header(&base, 40), "the workload must grow the L1 table");
    let scenario = Scenario { base, backing: None, cs, ops, snapshots, qemu_before: !lazy };
    scenario.crash_everywhere(model);
}

/// A workload on a base image (maybe an overlay), run with a crash at
/// every host write.
struct Scenario {
    base: Vec<u8>,
    backing: Option<Backing>,
    cs: u64,
    ops: Vec<Op>,
    /// Allow the harmless COPIED mismatches of snapshot operations.
    snapshots: bool,
    /// Have QEMU check the image as the crash left it (not with lazy
    /// refcounts, whose refcounts are stale until the next open).
    qemu_before: bool,
}

impl Scenario {
    /// Host writes of the whole workload (which must succeed without a crash).
    fn host_writes(&self) -> u64 {
        let full = run_workload_on(&self.base, self.backing.as_ref(), self.cs, &self.ops, None);
        assert!(full.error.is_none(), "the workload fails without a crash: {:?}", full.error);
        full.storage.writes()
    }

    /// Crashes at every host write: the image must open, check must find
    /// no corruption, every flushed byte must read back.
    fn crash_everywhere(&self, model: fn(u64) -> CrashModel) {
        let total = self.host_writes();
        let mut failures = Vec::new();
        let mut copied_mismatches = 0;
        let dir = oxqcow_testkit::scratch_dir();
        let file = dir.path().join("crashed.qcow2");
        if let Some(b) = &self.backing {
            std::fs::write(dir.path().join(BACKING_NAME), &b.bytes).unwrap();
        }
        let cs = self.cs;
        for n in 0..total {
            let run = run_workload_on(&self.base, self.backing.as_ref(), cs, &self.ops, Some((n, model(n))));
            assert!(run.storage.has_crashed(), "write {n} of {total} was not reached");
            let crashed = run.storage.durable_bytes();
            let what = format!(
                "crash at host write {n}/{total} during op {} ({:?})",
                run.completed,
                self.ops.get(run.completed)
            );
            // Every 32nd crash point also goes past QEMU: the image as the
            // crash left it has no corruption (leaks are allowed: exit 0 or 3).
            let sample = n % 32 == 0;
            let qemu_before = (sample && self.qemu_before).then(|| {
                std::fs::write(&file, &crashed).unwrap();
                qemu::check(&file)
            });
            match verify_crashed_on(crashed, self.backing.as_ref(), &run.tracker, cs, self.snapshots) {
                Err(e) => failures.push(format!("{what}: {e}")),
                Ok(survivor) => {
                    copied_mismatches += survivor.copied_mismatches;
                    // QEMU agrees: leaks at most, or (exit 2, in snapshot
                    // scenarios) only the harmless COPIED mismatches, judged
                    // from QEMU's own findings. Ours cannot vouch for them:
                    // snapshot operations run under the dirty bit, so our
                    // read-write open repairs the image before our check
                    // looks (QEMU's check reads it as the crash left it).
                    if let Some(out) = qemu_before {
                        let text = out.text();
                        let findings: Vec<String> = text
                            .lines()
                            .filter(|l| l.starts_with("ERROR") || l.starts_with("Leaked cluster"))
                            .map(str::to_string)
                            .collect();
                        let ok = matches!(out.code, Some(0) | Some(3))
                            || (out.code == Some(2) && self.snapshots && unsafe_findings(&findings, cs).is_empty());
                        if !ok {
                            failures.push(format!("{what}: qemu-img check before repair: {}", out.text()));
                        }
                    }
                    if !sample {
                        continue;
                    }
                    // After our open, repair and a write, QEMU finds it clean.
                    std::fs::write(&file, &survivor.bytes).unwrap();
                    let out = qemu::check(&file);
                    if !out.success() {
                        failures.push(format!("{what}: qemu-img check after reopening: {}", out.text()));
                    }
                }
            }
        }
        println!("{total} crash points");
        if self.snapshots {
            // Snapshot operations run under the dirty bit, so a read-write
            // open after any crash point repairs what a crash between their
            // steps left: nothing remains for check to find.
            assert_eq!(copied_mismatches, 0, "COPIED mismatches survived the open over {total} crash points");
        }
        // Long check reports are cut: the first lines say what went wrong.
        let shown: Vec<String> = failures.iter().map(|f| f.chars().take(600).collect()).collect();
        assert!(failures.is_empty(), "{} of {total} crash points failed:\n{}", failures.len(), shown.join("\n"));
    }
}

#[test]
fn crash_torn_write() {
    crash_everywhere(CS, false, |n| CrashModel::Torn { seed: n });
}

#[test]
fn crash_torn_write_lazy_refcounts() {
    crash_everywhere(CS, true, |n| CrashModel::Torn { seed: n });
}

#[test]
fn crash_unsynced_lost() {
    crash_everywhere(CS, false, |_| CrashModel::Unsynced);
}

#[test]
fn crash_unsynced_lost_lazy_refcounts() {
    crash_everywhere(CS, true, |_| CrashModel::Unsynced);
}

/// Writes since the last sync persist in any subset: the engine must put a
/// sync between every two writes whose order matters.
#[test]
fn crash_reordered_unsynced() {
    crash_everywhere(CS, false, |n| CrashModel::Reordered { seed: n });
}

/// The same with lazy refcounts.
#[test]
fn crash_reordered_unsynced_lazy_refcounts() {
    crash_everywhere(CS, true, |n| CrashModel::Reordered { seed: n });
}

/// 4 KiB clusters: L2 tables, refcount blocks, the L1 table and the header
/// span eight sectors each, so torn metadata writes leave tables half
/// old, half new.
#[test]
fn crash_torn_write_4k_clusters() {
    crash_everywhere(4096, false, |n| CrashModel::Torn { seed: n });
}

/// The same with lazy refcounts: the rebuild on open must cope with torn
/// L2 tables.
#[test]
fn crash_torn_write_4k_clusters_lazy_refcounts() {
    crash_everywhere(4096, true, |n| CrashModel::Torn { seed: n });
}

/// Snapshot creation and deletion, torn writes. A crash between the
/// refcount update and the COPIED update of snapshot creation or deletion
/// leaves COPIED flags that disagree with refcounts in the harmless
/// direction (QEMU has the same windows): allowed, and repaired.
#[test]
fn crash_torn_write_snapshots() {
    crash_everywhere_with(CS, false, |n| CrashModel::Torn { seed: n }, snapshot_workload(), true);
}

/// Snapshot creation and deletion, unsynced writes lost, lazy refcounts.
#[test]
fn crash_unsynced_lost_snapshots_lazy_refcounts() {
    crash_everywhere_with(CS, true, |_| CrashModel::Unsynced, snapshot_workload(), true);
}

/// Snapshot creation and deletion, unsynced writes reordered.
#[test]
fn crash_reordered_unsynced_snapshots() {
    crash_everywhere_with(CS, false, |n| CrashModel::Reordered { seed: n }, snapshot_workload(), true);
}

/// The harness itself can fail: the image as it was before the workload
/// lacks every flushed write, and a metadata cluster zeroed after the
/// workload loses data; both must be reported.
#[test]
fn crash_harness_detects_lost_data() {
    let base = base_image(CS, false);
    let ops = workload();
    let full = run_workload(&base, CS, &ops, None);
    assert!(full.error.is_none(), "{:?}", full.error);
    let e = verify_crashed(base.clone(), &full.tracker, CS, false).expect_err("the unwritten image must fail");
    assert!(e.contains("disk size") || e.contains("flushed byte"), "{e}");
    // Zero the L1 table of the final image: every mapping is lost.
    let mut bytes = full.storage.durable_bytes();
    let l1 = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
    bytes[l1..l1 + 512].fill(0);
    let e = verify_crashed(bytes, &full.tracker, CS, false).expect_err("a lost L1 table must fail");
    assert!(e.contains("flushed byte") || e.contains("check"), "{e}");
}

// ---------------------------------------------------------------------------
// Compressed clusters.

/// Cluster size of the compressed-cluster scenarios: a 4 KiB cluster of
/// long runs compresses to a few dozen bytes, so many share a host cluster.
const CCS: u64 = 4096;

/// An empty 1 MiB image with 4 KiB clusters, 16-bit refcounts and this
/// compression type.
fn compressed_base(t: CompressionType, lazy: bool) -> Vec<u8> {
    let storage = Arc::new(MemoryStorage::new());
    let cfg = ImageConfig::new(CCS, 16, Compat::V3, lazy).with_compression(t);
    Image::create_storage(storage.clone(), &cfg.create_options(MIB)).unwrap().close().unwrap();
    storage.to_bytes()
}

/// Compressed writes packed several to a host cluster, copy on write out of
/// them, zero writes and discards that free them until the shared host
/// cluster's refcount drops to zero, and compressed writes into the freed
/// space. No compressed write lands on a cluster with a host offset (they
/// would be refused).
fn compressed_workload() -> Vec<Op> {
    let c = |cluster: u64, n: u64, seed: u8| Op::WriteCompressed { offset: cluster * CCS, len: n * CCS, seed };
    let w = |offset: u64, len: u64, seed: u8| Op::Write { offset, len, seed };
    let z = |offset: u64, len: u64, may_unmap: bool| Op::WriteZeroes { offset, len, may_unmap };
    let d = |offset: u64, len: u64| Op::Discard { offset, len };
    vec![
        // Eight clusters of 64-byte runs (tiny streams, packed together),
        // four of 8-byte runs.
        c(0, 8, 4),
        c(8, 4, 1),
        w(20 * CCS + 100, 3000, 2),
        Op::Flush,
        // Copy on write out of compressed clusters: partial and whole.
        w(CCS + 100, 200, 3),
        w(9 * CCS, CCS, 5),
        // Zero writes and discards free compressed clusters; each drops
        // one reference of the host cluster they share.
        z(2 * CCS, 2 * CCS, false),
        z(4 * CCS + 10, CCS - 20, true),
        d(5 * CCS, 3 * CCS),
        Op::Flush,
        // The rest of the first host cluster goes (its refcount reaches
        // zero) and new compressed data lands in freed space.
        d(0, CCS),
        z(CCS, CCS, true),
        c(2, 2, 0),
        Op::Flush,
        // Incompressible data is stored uncompressed; more packing.
        c(30, 2, 7),
        c(5, 2, 2),
        c(12, 2, 3),
    ]
}

fn crash_compressed(t: CompressionType, lazy: bool, model: fn(u64) -> CrashModel) {
    let base = compressed_base(t, lazy);
    let ops = compressed_workload();
    // The first write packs its eight compressed clusters into at most two
    // host clusters (plus one L2 table): the scenario packs.
    let first = run_workload(&base, CCS, &ops[..1], None);
    assert!(first.error.is_none(), "{:?}", first.error);
    let grown = first.storage.live_bytes().len() as u64 - base.len() as u64;
    assert!(grown <= 3 * CCS, "eight compressed clusters took {grown} bytes: they were not packed");
    let scenario = Scenario { base, backing: None, cs: CCS, ops, snapshots: false, qemu_before: !lazy };
    scenario.crash_everywhere(model);
}

/// Compressed clusters (zlib), torn writes.
#[test]
fn crash_torn_write_compressed() {
    crash_compressed(CompressionType::Zlib, false, |n| CrashModel::Torn { seed: n });
}

/// Compressed clusters (zstd), unsynced writes reordered.
#[test]
fn crash_reordered_unsynced_compressed_zstd() {
    crash_compressed(CompressionType::Zstd, false, |n| CrashModel::Reordered { seed: n });
}

/// Compressed clusters (zstd), unsynced writes lost, lazy refcounts: the
/// refcount rebuild on open counts every compressed cluster's host
/// clusters.
#[test]
fn crash_unsynced_lost_compressed_zstd_lazy_refcounts() {
    crash_compressed(CompressionType::Zstd, true, |_| CrashModel::Unsynced);
}

// ---------------------------------------------------------------------------
// Overlays.

/// The backing file's length: shorter than the 1 MiB overlay.
const BACKING_LEN: u64 = 768 << 10;

/// A qcow2 backing file (4 KiB clusters) full of data, part of it
/// compressed, with a zeroed stretch.
fn backing_file() -> Backing {
    let cfg = ImageConfig::new(4096, 16, Compat::V3, false);
    let opts = Harness::open_options(&cfg, false, false);
    let mut b = Harness::new(cfg, BACKING_LEN, BACKING_LEN, opts).unwrap();
    for op in [
        Op::Write { offset: 0, len: 400 << 10, seed: 11 },
        Op::WriteCompressed { offset: 400 << 10, len: 64 << 10, seed: 12 },
        Op::Write { offset: 464 << 10, len: BACKING_LEN - (464 << 10), seed: 13 },
        Op::WriteZeroes { offset: 300 << 10, len: 8 << 10, may_unmap: true },
    ] {
        b.apply(&op).and_then(|()| b.verify()).unwrap();
    }
    Backing::qcow2(b).unwrap()
}

/// A 1 MiB overlay (512-byte clusters, 64-bit refcounts) of `backing`.
fn overlay_base(compat: Compat, backing: &Backing) -> Vec<u8> {
    let cfg = ImageConfig::new(CS, if compat == Compat::V2 { 16 } else { 64 }, compat, false);
    let opts = Harness::open_options(&cfg, false, false);
    let mut h = Harness::with_backing(cfg, MIB, MIB, opts, backing.clone()).unwrap();
    h.image.take().unwrap().close().unwrap();
    h.storage.to_bytes()
}

/// Writes that copy on write from the backing file (partial clusters, a
/// run across the backing file's end), zero writes and discards that mask
/// it (or, on v2, discards that show it again), and a shrink below the
/// backing file's end followed by a growth that must hide the backing
/// file's data past the old end.
fn overlay_workload() -> Vec<Op> {
    let w = |offset: u64, len: u64, seed: u8| Op::Write { offset, len, seed };
    let z = |offset: u64, len: u64, may_unmap: bool| Op::WriteZeroes { offset, len, may_unmap };
    vec![
        w(1000, 3000, 1),
        w(BACKING_LEN - 8000, 20_000, 2),
        Op::Flush,
        z(10_000, 700, false),
        z(20_480, 4096, true),
        Op::Discard { offset: 40_000, len: 5000 },
        Op::Flush,
        w(40_100, 100, 3),
        w(100_000, 30_000, 4),
        Op::Resize { size: 600_064, prealloc: Preallocation::Off },
        Op::Resize { size: MIB, prealloc: Preallocation::Off },
        w(650_000, 1000, 5),
        Op::Flush,
        w(200_007, 5000, 6),
        z(300_000, 12_000, false),
    ]
}

fn crash_overlay(compat: Compat, model: fn(u64) -> CrashModel) {
    let backing = backing_file();
    let base = overlay_base(compat, &backing);
    let scenario =
        Scenario { base, backing: Some(backing), cs: CS, ops: overlay_workload(), snapshots: false, qemu_before: true };
    scenario.crash_everywhere(model);
}

/// An overlay (v3) of a shorter qcow2 backing file, torn writes: copy on
/// write from the backing file never loses backing data in the parts of a
/// cluster a write does not cover.
#[test]
fn crash_torn_write_overlay() {
    crash_overlay(Compat::V3, |n| CrashModel::Torn { seed: n });
}

/// The same on a version 2 overlay (zero writes write zeros, discards show
/// the backing file again), unsynced writes reordered.
#[test]
fn crash_reordered_unsynced_overlay_v2() {
    crash_overlay(Compat::V2, |n| CrashModel::Reordered { seed: n });
}

// ---------------------------------------------------------------------------
// Amend.

/// A 1 MiB image (512-byte clusters, 16-bit refcounts, v3, lazy
/// refcounts as `lazy` says; an overlay of `backing` if given) holding data, compressed clusters, zero clusters
/// with and without a host cluster, and a snapshot sharing some of them.
fn amend_base(backing: Option<&Backing>, lazy: bool) -> Vec<u8> {
    let cfg = ImageConfig::new(CS, 16, Compat::V3, lazy);
    let opts = Harness::open_options(&cfg, false, false);
    let mut h = match backing {
        Some(b) => Harness::with_backing(cfg, MIB, MIB, opts, b.clone()),
        None => Harness::new(cfg, MIB, MIB, opts),
    }
    .unwrap();
    for op in [
        Op::Write { offset: 0, len: 200 << 10, seed: 1 },
        Op::WriteCompressed { offset: 300 << 10, len: 6 * CS, seed: 2 },
        // Zero clusters keeping their host clusters, plain ones, and plain
        // ones over unallocated clusters (over the backing file's data).
        Op::WriteZeroes { offset: 10 << 10, len: 5 << 10, may_unmap: false },
        Op::WriteZeroes { offset: 30 << 10, len: 3 << 10, may_unmap: true },
        Op::WriteZeroes { offset: 400 << 10, len: 2 << 10, may_unmap: false },
        Op::SnapshotCreate,
        Op::Write { offset: 5000, len: 20 << 10, seed: 3 },
        Op::WriteZeroes { offset: 50 << 10, len: 4 << 10, may_unmap: false },
        Op::Discard { offset: 60 << 10, len: 4 << 10 },
        // Zero clusters keeping host clusters of the active layer's own
        // (the ones before the snapshot are the snapshot's now).
        Op::WriteZeroes { offset: 6 << 10, len: 8 << 10, may_unmap: false },
    ] {
        h.apply(&op).and_then(|()| h.verify()).unwrap();
    }
    h.image.take().unwrap().close().unwrap();
    h.storage.to_bytes()
}

fn header_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

/// Runs `ops` (amends) on the amend base with a crash at every host write,
/// after checking that the whole run leaves `version` and refcount order
/// `order` in the header.
fn crash_amend(overlay: bool, lazy: bool, ops: Vec<Op>, version: u32, order: u32, model: fn(u64) -> CrashModel) {
    let backing = overlay.then(backing_file);
    let base = amend_base(backing.as_ref(), lazy);
    let full = run_workload_on(&base, backing.as_ref(), CS, &ops, None);
    assert!(full.error.is_none(), "{:?}", full.error);
    let end = full.storage.durable_bytes();
    assert_eq!(header_u32(&end, 4), version, "header version after the amend");
    if version == 3 {
        assert_eq!(header_u32(&end, 96), order, "refcount order after the amend");
    }
    let scenario = Scenario { base, backing, cs: CS, ops, snapshots: false, qemu_before: !lazy };
    scenario.crash_everywhere(model);
}

fn widths() -> Vec<Op> {
    vec![Op::Amend(AmendOp::RefcountBits(64)), Op::Amend(AmendOp::RefcountBits(8))]
}

/// Changing the refcount width (16 to 64 to 8 bits) rebuilds the refcount
/// structures: torn writes.
#[test]
fn crash_torn_write_amend_refcount_width() {
    crash_amend(false, false, widths(), 3, 3, |n| CrashModel::Torn { seed: n });
}

/// The same, unsynced writes reordered.
#[test]
fn crash_reordered_unsynced_amend_refcount_width() {
    crash_amend(false, false, widths(), 3, 3, |n| CrashModel::Reordered { seed: n });
}

/// A downgrade to compat 0.10 expands zero clusters (zeros written into
/// the ones with host clusters, also the snapshot's): torn writes.
#[test]
fn crash_torn_write_amend_downgrade() {
    crash_amend(false, false, vec![Op::Amend(AmendOp::Compat(Compat::V2))], 2, 4, |n| CrashModel::Torn { seed: n });
}

/// The same, unsynced writes reordered.
#[test]
fn crash_reordered_unsynced_amend_downgrade() {
    crash_amend(false, false, vec![Op::Amend(AmendOp::Compat(Compat::V2))], 2, 4, |n| CrashModel::Reordered {
        seed: n,
    });
}

/// A downgrade of an overlay: plain zero clusters must keep masking the
/// backing file, so each gets a new host cluster of zeros. Torn writes.
#[test]
fn crash_torn_write_amend_downgrade_overlay() {
    crash_amend(true, false, vec![Op::Amend(AmendOp::Compat(Compat::V2))], 2, 4, |n| CrashModel::Torn { seed: n });
}

/// The same with lazy refcounts, where the new clusters' refcounts must
/// still be durable before the L2 tables that point at them.
#[test]
fn crash_torn_write_amend_downgrade_overlay_lazy_refcounts() {
    crash_amend(true, true, vec![Op::Amend(AmendOp::Compat(Compat::V2))], 2, 4, |n| CrashModel::Torn { seed: n });
}

/// The same, unsynced writes reordered.
#[test]
fn crash_reordered_unsynced_amend_downgrade_overlay() {
    crash_amend(true, false, vec![Op::Amend(AmendOp::Compat(Compat::V2))], 2, 4, |n| CrashModel::Reordered { seed: n });
}

/// Refcount width changes on a lazy-refcount image, unsynced writes lost:
/// the amend starts from refcounts rebuilt on open, and a crash leaves a
/// dirty image whose refcounts are rebuilt again.
#[test]
fn crash_unsynced_lost_amend_refcount_width_lazy_refcounts() {
    crash_amend(false, true, widths(), 3, 3, |_| CrashModel::Unsynced);
}

/// A downgrade of a lazy-refcount image (which must write its refcounts
/// and clear the dirty bit first), unsynced writes lost.
#[test]
fn crash_unsynced_lost_amend_downgrade_lazy_refcounts() {
    crash_amend(false, true, vec![Op::Amend(AmendOp::Compat(Compat::V2))], 2, 4, |_| CrashModel::Unsynced);
}

// ---------------------------------------------------------------------------
// The checks of the new scenarios can fail.

/// Copy on write from the backing file that lost the backing data in the
/// part of a cluster the write did not cover is reported: the overlay
/// workload's first write covers bytes 1000.. of the cluster at 512, so
/// bytes 512..1000 of its host cluster were copied from the backing file;
/// zeroing them must fail the check of flushed data. So must the image
/// opened over a backing file with other content.
#[test]
fn crash_harness_detects_lost_backing_data() {
    use oxqcow::{BlockDevice, OpenOptions};
    let backing = backing_file();
    let base = overlay_base(Compat::V3, &backing);
    let ops = overlay_workload();
    let full = run_workload_on(&base, Some(&backing), CS, &ops, None);
    assert!(full.error.is_none(), "{:?}", full.error);
    let bytes = full.storage.durable_bytes();
    verify_crashed_on(bytes.clone(), Some(&backing), &full.tracker, CS, false).expect("the intact image passes");
    let host = {
        let st = Arc::new(MemoryStorage::from_bytes(bytes.clone()));
        let img =
            oxqcow_testkit::workload::open_image(st, &OpenOptions::new().read_only(true), Some(&backing)).unwrap();
        let e = img.block_status(512, 512).unwrap();
        assert_eq!(e[0].depth, 0, "the cluster at 512 is allocated in the overlay");
        e[0].host_offset.expect("the cluster at 512 has a host cluster")
    };
    let mut broken = bytes.clone();
    broken[host as usize..host as usize + 488].fill(0);
    let e = verify_crashed_on(broken, Some(&backing), &full.tracker, CS, false).expect_err("lost COW data must fail");
    assert!(e.contains("flushed byte at offset 512"), "{e}");
    let other = Backing::raw(vec![0x77; BACKING_LEN as usize]).unwrap();
    let e =
        verify_crashed_on(bytes, Some(&other), &full.tracker, CS, false).expect_err("another backing file must fail");
    assert!(e.contains("flushed byte"), "{e}");
}

/// The amend crash checks fail on what a wrong order would leave: a
/// header that switched to another refcount width without the rebuilt
/// structures, and a header that says version 2 while zero clusters are
/// still there.
#[test]
fn crash_harness_detects_half_done_amends() {
    use oxqcow::format::header::Header;
    let base = amend_base(None, false);
    let full = run_workload(&base, CS, &[], None);
    assert!(full.error.is_none(), "{:?}", full.error);
    let rewrite = |f: &dyn Fn(&mut Header)| {
        let mut bytes = base.clone();
        let mut h = Header::parse(&bytes[..CS as usize]).unwrap();
        f(&mut h);
        let new = h.serialize().unwrap();
        bytes[..new.len()].copy_from_slice(&new);
        bytes
    };
    verify_crashed(base.clone(), &full.tracker, CS, false).expect("the intact image passes");
    let width = rewrite(&|h| h.refcount_order = 6);
    let e = verify_crashed(width, &full.tracker, CS, false).expect_err("a width switched alone must fail");
    assert!(e.starts_with("check: ") && !e.starts_with("check: 0 corruptions"), "{e}");
    let v2 = rewrite(&|h| {
        h.version = 2;
        h.header_length = 72;
        h.compatible_features = 0;
        h.autoclear_features = 0;
    });
    let e = verify_crashed(v2, &full.tracker, CS, false).expect_err("zero clusters in a v2 image must fail");
    assert!(e.contains("Zero cluster entry found in pre-v3 image"), "{e}");
}

// ---------------------------------------------------------------------------
// Extended L2 entries.

/// Clusters of 16 KiB: 512-byte subclusters.
const ECS: u64 = 16 << 10;

/// A 1 MiB image with extended L2 entries (an overlay of `backing` if
/// given).
fn extended_base(backing: Option<&Backing>, lazy: bool) -> Vec<u8> {
    let cfg = ImageConfig::new(ECS, 16, Compat::V3, lazy).with_extended_l2(true);
    let opts = Harness::open_options(&cfg, false, false);
    let mut h = match backing {
        Some(b) => Harness::with_backing(cfg, MIB, MIB, opts, b.clone()),
        None => Harness::new(cfg, MIB, MIB, opts),
    }
    .unwrap();
    h.image.take().unwrap().close().unwrap();
    h.storage.to_bytes()
}

/// Subcluster writes into fresh clusters (copy on write of the touched
/// subclusters only), writes into unallocated and zero subclusters of
/// allocated clusters (in place, copy on write of partial subclusters, a
/// bitmap update), zero writes of whole and partial subclusters, discards,
/// and a zero write with unmap over whole clusters.
fn extended_workload() -> Vec<Op> {
    let w = |offset: u64, len: u64, seed: u8| Op::Write { offset, len, seed };
    let z = |offset: u64, len: u64, may_unmap: bool| Op::WriteZeroes { offset, len, may_unmap };
    vec![
        w(2 * ECS + 1000, 300, 1),
        w(2 * ECS + 5000, 2000, 2),
        w(3 * ECS - 100, 700, 3),
        Op::Flush,
        z(2 * ECS + 2048, 1024, false),
        z(5 * ECS + 100, 200, false),
        w(2 * ECS + 2058, 100, 4),
        Op::Discard { offset: 3 * ECS, len: ECS },
        Op::Flush,
        w(3 * ECS + 7000, 100, 5),
        z(10 * ECS, 3 * ECS + 1536, true),
        w(11 * ECS + 300, 5000, 6),
        Op::Flush,
        w(600_000, 40_000, 7),
        w(BACKING_LEN - 300, 600, 8),
    ]
}

fn crash_extended(backing: Option<Backing>, lazy: bool, model: fn(u64) -> CrashModel) {
    let base = extended_base(backing.as_ref(), lazy);
    let scenario = Scenario { base, backing, cs: ECS, ops: extended_workload(), snapshots: false, qemu_before: !lazy };
    scenario.crash_everywhere(model);
}

/// Extended L2 entries over a shorter backing file, torn writes: a
/// subcluster copied on write never loses the backing file's bytes, and
/// a bitmap never claims a subcluster whose data is not written.
#[test]
fn crash_torn_write_extended_l2_overlay() {
    crash_extended(Some(backing_file()), false, |n| CrashModel::Torn { seed: n });
}

/// Extended L2 entries, unsynced writes reordered.
#[test]
fn crash_reordered_unsynced_extended_l2() {
    crash_extended(None, false, |n| CrashModel::Reordered { seed: n });
}

/// Extended L2 entries, unsynced writes lost, lazy refcounts.
#[test]
fn crash_unsynced_lost_extended_l2_lazy_refcounts() {
    crash_extended(None, true, |_| CrashModel::Unsynced);
}
