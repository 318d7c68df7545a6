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
//! The image has 512-byte clusters and 64-bit refcounts, so one refcount
//! block covers 64 clusters and the first refcount table 2 MiB of host
//! file: the workload grows the L1 table with one resize and the refcount
//! table with a preallocating one.

use oxqcow::{Compat, Image, MemoryStorage, Preallocation};
use oxqcow_testkit::crash::{run_workload, verify_crashed};
use oxqcow_testkit::faulty::CrashModel;
use oxqcow_testkit::model::{ImageConfig, Op};
use oxqcow_testkit::qemu;
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
    let total = full.storage.writes();
    // The refcount table grew (its offset moved) and so did the L1 table.
    let header = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let end = full.storage.durable_bytes();
    if cs == CS && ops == workload() {
        assert_ne!(header(&end, 48), header(&base, 48), "the workload must grow the refcount table");
    }
    assert_ne!(header(&end, 40), header(&base, 40), "the workload must grow the L1 table");
    let mut failures = Vec::new();
    let mut copied_mismatches = 0;
    let dir = oxqcow_testkit::scratch_dir();
    let file = dir.path().join("crashed.qcow2");
    for n in 0..total {
        let run = run_workload(&base, cs, &ops, Some((n, model(n))));
        assert!(run.storage.has_crashed(), "write {n} of {total} was not reached");
        let crashed = run.storage.durable_bytes();
        let what =
            format!("crash at host write {n}/{total} during op {} ({:?})", run.completed, ops.get(run.completed));
        // Every 32nd crash point also goes past QEMU: without lazy
        // refcounts the image as the crash left it has no corruption
        // (leaks are allowed: exit 0 or 3).
        let sample = n % 32 == 0;
        let qemu_before = (sample && !lazy).then(|| {
            std::fs::write(&file, &crashed).unwrap();
            qemu::check(&file)
        });
        match verify_crashed(crashed, &run.tracker, cs, snapshots) {
            Err(e) => failures.push(format!("{what}: {e}")),
            Ok(survivor) => {
                copied_mismatches += survivor.copied_mismatches;
                // QEMU agrees: leaks at most, or (exit 2) only where we found
                // the harmless COPIED mismatches.
                if let Some(out) = qemu_before {
                    let ok = matches!(out.code, Some(0) | Some(3))
                        || (out.code == Some(2) && survivor.copied_mismatches > 0);
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
    if snapshots {
        println!("{copied_mismatches} harmless COPIED mismatches repaired over {total} crash points");
    }
    // Long check reports are cut: the first lines say what went wrong.
    let shown: Vec<String> = failures.iter().map(|f| f.chars().take(600).collect()).collect();
    assert!(failures.is_empty(), "{} of {total} crash points failed:\n{}", failures.len(), shown.join("\n"));
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
