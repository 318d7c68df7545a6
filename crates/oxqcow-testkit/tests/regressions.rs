//! Regression tests for engine bugs the test suite found. Each test's
//! comment states the bug.

use std::sync::Arc;

use oxqcow::{BlockDevice, Compat, Image};
use oxqcow_testkit::faulty::FaultyStorage;
use oxqcow_testkit::model::ImageConfig;

/// Bug: `Qcow2::create` returned the handle it had opened on the still
/// empty (size 0) image, so its L2 cache was sized for a 0-byte disk (two
/// tables, QEMU's minimum) instead of covering the disk. Every write that
/// touched a third L2 table evicted a dirty one, and every eviction costs a
/// sync: writes to a freshly created 6 MiB image with 512-byte clusters
/// issued ~9000 fdatasyncs (25 s in the concurrency test). Counted here as
/// host syncs, not time.
#[test]
fn created_image_has_a_cache_covering_the_disk() {
    let storage = Arc::new(FaultyStorage::new(Vec::new()));
    let cfg = ImageConfig::new(512, 16, Compat::V3, false);
    // 4 MiB: 128 L2 tables of 32 KiB each, far below the 32 MiB cache cap.
    let img = Image::create_storage(storage.clone(), &cfg.create_options(4 << 20)).unwrap();
    let before = storage.syncs();
    for pass in 0..2u8 {
        for table in 0..128u64 {
            img.write_at(&[pass + 1], table * 32768 + 100).unwrap();
        }
    }
    let syncs = storage.syncs() - before;
    // Only new refcount blocks (one per 256 clusters here) may sync.
    assert!(syncs < 20, "256 writes without a flush issued {syncs} syncs");
    img.close().unwrap();
}

/// Bug (found by the model test): growing with preallocation=metadata or
/// falloc linked free host clusters into the new area without zeroing
/// them. Clusters freed earlier without a hole punch (a discard without
/// pass-discard-request, the default) still held their old data, so the
/// new part of the disk showed discarded data instead of zeros. (QEMU only
/// frees clusters on discard when it also passes the discard down to the
/// file, so its reused clusters are holes.)
#[test]
fn preallocated_growth_reads_zeros_over_reused_clusters() {
    use oxqcow::{MemoryStorage, Preallocation};
    for prealloc in [Preallocation::Metadata, Preallocation::Falloc, Preallocation::Full] {
        let storage = Arc::new(MemoryStorage::new());
        let cfg = ImageConfig::new(4096, 16, Compat::V3, false);
        let img = Image::create_storage(storage, &cfg.create_options(16 << 10)).unwrap();
        img.write_at(&[0x2a; 12 << 10], 0).unwrap();
        img.discard(0, 8 << 10).unwrap();
        img.flush().unwrap();
        img.resize(24 << 10, prealloc).unwrap();
        let mut buf = vec![0xffu8; 8 << 10];
        img.read_at(&mut buf, 16 << 10).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "{prealloc:?}: the grown area shows old data");
        let r = img.check(None).unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0), "{r:?}");
    }
}

/// Bug: `flush` applied the deferred refcount decrements of freed clusters
/// (discards, unmapping zero writes, copy on write) in the refcount cache
/// only after writing it, so a crash right after `flush` returned left
/// those clusters leaked; only the next flush wrote them. QEMU's flush
/// leaves no leak (its refcount cache is written after the L2 cache).
#[test]
fn flush_writes_the_refcounts_of_freed_clusters() {
    use oxqcow::{MemoryStorage, OpenOptions};
    for lazy in [false, true] {
        let storage = Arc::new(MemoryStorage::new());
        let cfg = ImageConfig::new(65536, 16, Compat::V3, lazy);
        let img = Image::create_storage(storage.clone(), &cfg.create_options(1 << 20)).unwrap();
        img.write_at(&[1; 3 * 65536], 0).unwrap();
        img.flush().unwrap();
        img.discard(0, 65536).unwrap();
        img.write_zeroes_at(65536, 65536, true).unwrap();
        img.flush().unwrap();
        // Power cut now: open a copy of the bytes (read-write, so a dirty
        // lazy-refcount image gets its refcounts rebuilt).
        let copy = Arc::new(MemoryStorage::from_bytes(storage.to_bytes()));
        let crashed = Image::open_storage(copy, &OpenOptions::new()).unwrap();
        let r = crashed.check(None).unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0), "lazy {lazy}: {:?}", r.messages);
    }
}

/// Bug (found by the model test with snapshots): growing an image whose
/// size is not a multiple of the cluster size failed with "not supported
/// yet: growing an image whose last cluster is shared" when a snapshot
/// shared that last cluster; QEMU grows it. The bytes past the old end
/// inside that cluster must read as zeros afterwards, and the snapshot
/// must keep its content.
#[test]
fn growing_with_a_shared_partial_last_cluster() {
    use oxqcow::{MemoryStorage, Preallocation};
    for compat in [Compat::V2, Compat::V3] {
        let storage = Arc::new(MemoryStorage::new());
        let cfg = ImageConfig::new(4096, 16, compat, false);
        let img = Image::create_storage(storage, &cfg.create_options(3 * 4096)).unwrap();
        img.write_at(&[7; 3 * 4096], 0).unwrap();
        // Shrink into the last cluster: its tail keeps 7s past the end.
        img.resize(2 * 4096 + 512, Preallocation::Off).unwrap();
        let q = img.as_qcow2().unwrap();
        q.snapshot_create("s").unwrap();
        img.resize(4 * 4096, Preallocation::Off).unwrap();
        let mut buf = vec![0u8; 4 * 4096];
        img.read_at(&mut buf, 0).unwrap();
        assert!(buf[..2 * 4096 + 512].iter().all(|&b| b == 7), "{compat:?}: data before the old end");
        assert!(buf[2 * 4096 + 512..].iter().all(|&b| b == 0), "{compat:?}: the grown part must read as zeros");
        let r = img.check(None).unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
        q.snapshot_apply("s").unwrap();
        let mut snap = vec![0u8; img.len() as usize];
        img.read_at(&mut snap, 0).unwrap();
        assert_eq!(snap, vec![7; 2 * 4096 + 512], "{compat:?}: the snapshot changed");
    }
}
