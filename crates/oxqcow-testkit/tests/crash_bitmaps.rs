//! Crash tests for persistent bitmaps: a session opens an image with two
//! stored bitmaps (one enabled, one disabled), writes, and closes (which
//! marks the bitmaps in use first and stores them last); it is cut at every
//! host write, torn, unsynced or reordered. After every crash the on-disk
//! structure must be sound: the image opens, `check` finds no corruption
//! (leaks are allowed), and every bitmap is either marked in use
//! (inconsistent, as QEMU treats it) or holds exactly the bits it had
//! before the session or the bits it had at its end; a crash between the
//! autoclear updates may drop the extension (QEMU then drops the bitmaps
//! too). Every 8th crash point also goes past `qemu-img check` (not with
//! lazy refcounts, whose refcounts are stale until the next read-write
//! open repairs them). With and without lazy refcounts.

use std::sync::Arc;

use oxqcow::{DirtyBitmap, MemoryStorage, OpenOptions, Qcow2, Storage};
use oxqcow_testkit::faulty::{CrashModel, FaultyStorage};
use oxqcow_testkit::qemu;

const MIB: u64 = 1 << 20;

fn base(lazy: bool) -> Vec<u8> {
    let storage = Arc::new(MemoryStorage::new());
    let mut opts = oxqcow::CreateOptions::qcow2(4 * MIB);
    opts.cluster_size = 512;
    opts.lazy_refcounts = lazy;
    oxqcow::Image::create_storage(storage.clone(), &opts).unwrap().close().unwrap();
    let q = Qcow2::open(storage.clone(), &OpenOptions::new()).unwrap();
    q.bitmap_add("on", Some(512), true).unwrap();
    q.bitmap_add("off", Some(4096), false).unwrap();
    q.write_at(&[7u8; 3000], 100_000).unwrap();
    q.close().unwrap();
    storage.to_bytes()
}

/// The session: writes recorded by "on", then a clean close.
fn session(storage: Arc<dyn Storage>) -> oxqcow::Result<()> {
    let q = Qcow2::open(storage, &OpenOptions::new())?;
    q.write_at(&[1u8; 5000], 0)?;
    q.write_zeroes_at(2 * MIB, 64 * 1024, true)?;
    q.discard(3 * MIB, 8192)?;
    q.flush()?;
    q.write_at(&[2u8; 700], 1_500_000)?;
    q.close()
}

fn contents(bytes: &[u8]) -> Vec<(String, bool, Option<DirtyBitmap>)> {
    let q = Qcow2::open(Arc::new(MemoryStorage::from_bytes(bytes.to_vec())), &OpenOptions::new().read_only(true))
        .expect("the image opens read-only");
    q.bitmaps().into_iter().map(|b| (b.name.clone(), b.in_use, q.bitmap_contents(&b.name).ok())).collect()
}

fn crash_everywhere(model: fn(u64) -> CrashModel, lazy: bool) {
    let base = base(lazy);
    let before = contents(&base);
    assert_eq!(before.len(), 2);
    let full = Arc::new(FaultyStorage::new(base.clone()));
    session(full.clone()).unwrap();
    let after = contents(&full.durable_bytes());
    assert!(after.iter().all(|(_, in_use, _)| !in_use), "a clean close stores every bitmap");
    let bits = |list: &[(String, bool, Option<DirtyBitmap>)], name: &str| {
        list.iter().find(|b| b.0 == name).and_then(|b| b.2.clone()).expect("bitmap listed")
    };
    assert_ne!(bits(&before, "on"), bits(&after, "on"), "the enabled bitmap recorded the session's writes");
    assert_eq!(bits(&before, "off"), bits(&after, "off"), "the disabled bitmap recorded nothing");
    assert_eq!(
        bits(&after, "on").dirty_ranges(),
        vec![(0, 5120), (99840, 3584), (1_499_648, 1536), (2 * MIB, 65536), (3 * MIB, 8192)]
    );
    let total = full.writes();
    let dir = oxqcow_testkit::scratch_dir();
    let file = dir.path().join("crashed.qcow2");
    let mut failures = Vec::new();
    for n in 0..total {
        let storage = Arc::new(FaultyStorage::with_crash(base.clone(), Some(n), model(n)));
        let _ = session(storage.clone());
        assert!(storage.has_crashed(), "write {n} of {total} was not reached");
        let crashed = storage.durable_bytes();
        let what = format!("crash at host write {n}/{total}");
        let listed = match std::panic::catch_unwind(|| contents(&crashed)) {
            Ok(l) => l,
            Err(_) => {
                failures.push(format!("{what}: the image does not open read-only"));
                continue;
            }
        };
        for (name, in_use, bits) in &listed {
            if *in_use {
                continue;
            }
            let was = before.iter().find(|b| &b.0 == name).and_then(|b| b.2.clone());
            let now = after.iter().find(|b| &b.0 == name).and_then(|b| b.2.clone());
            if bits.is_none() || (*bits != was && *bits != now) {
                failures.push(format!("{what}: bitmap {name} is neither in use nor as before or after"));
            }
        }
        if !listed.is_empty() && listed.len() != 2 {
            failures.push(format!("{what}: {} bitmaps listed", listed.len()));
        }
        // Our check finds no corruption; a read-write open and close works.
        let mem = Arc::new(MemoryStorage::from_bytes(crashed.clone()));
        match Qcow2::open(mem.clone(), &OpenOptions::new()) {
            Err(e) => failures.push(format!("{what}: read-write open failed: {e}")),
            Ok(q) => {
                match q.check(None) {
                    Ok(r) if r.corruptions == 0 && r.check_errors == 0 => {}
                    Ok(r) => failures.push(format!("{what}: check found {} corruptions", r.corruptions)),
                    Err(e) => failures.push(format!("{what}: check failed: {e}")),
                }
                if let Err(e) = q.close() {
                    failures.push(format!("{what}: close failed: {e}"));
                }
            }
        }
        if n % 8 == 0 && !lazy {
            std::fs::write(&file, &crashed).unwrap();
            let out = qemu::check(&file);
            if !matches!(out.code, Some(0) | Some(3)) {
                failures.push(format!("{what}: qemu-img check: {}", out.text()));
            }
        }
    }
    println!("{total} crash points");
    assert!(failures.is_empty(), "{} of {total} crash points failed:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn bitmap_store_survives_torn_writes() {
    crash_everywhere(|n| CrashModel::Torn { seed: n }, false);
}

#[test]
fn bitmap_store_survives_torn_writes_lazy_refcounts() {
    crash_everywhere(|n| CrashModel::Torn { seed: n }, true);
}

#[test]
fn bitmap_store_survives_lost_unsynced_writes() {
    crash_everywhere(|_| CrashModel::Unsynced, false);
}

#[test]
fn bitmap_store_survives_lost_unsynced_writes_lazy_refcounts() {
    crash_everywhere(|_| CrashModel::Unsynced, true);
}

#[test]
fn bitmap_store_survives_reordered_unsynced_writes() {
    crash_everywhere(|n| CrashModel::Reordered { seed: n }, false);
}
