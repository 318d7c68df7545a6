//! A writable qcow2 image's file grows ahead of its allocations in large
//! steps (`storage/grow_ahead.rs`): few length changes for many allocated
//! runs, the reserve cut off at every flush and at close, and a crash that
//! leaves the reserve leaves an image QEMU's check accepts without errors
//! or leaks.

use std::io;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use oxqcow::{BlockDevice, CreateOptions, Image, MemoryStorage, OpenOptions, Storage};

const CLUSTER: usize = 64 << 10;

/// A memory medium that counts the length queries and changes it gets.
#[derive(Default)]
struct Counting {
    inner: MemoryStorage,
    lens: AtomicUsize,
    set_lens: AtomicUsize,
}

impl Storage for Counting {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        self.lens.fetch_add(1, Ordering::Relaxed);
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.set_lens.fetch_add(1, Ordering::Relaxed);
        self.inner.set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }
}

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("qemu-img must be installed (apt-get install qemu-utils): {e}"))
}

/// QEMU's check of the image bytes `bytes`: its exit status must be 0 (no
/// corruption, no leak).
fn assert_qemu_clean(bytes: &[u8], dir: &Path, what: &str) {
    let path = dir.join("crashed.qcow2");
    std::fs::write(&path, bytes).unwrap();
    let out = qemu_img(&["check", "-f", "qcow2", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{what}: qemu-img check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn data(seed: u8) -> Vec<u8> {
    (0..CLUSTER).map(|i| (i as u8).wrapping_mul(31) ^ seed | 1).collect()
}

#[test]
fn allocations_extend_the_file_in_steps_and_flush_cuts_the_reserve() {
    let medium = Arc::new(Counting::default());
    let opts = CreateOptions::qcow2(64 << 20);
    let img = Image::create_storage(medium.clone(), &opts).unwrap();
    let (lens, set_lens) = (medium.lens.load(Ordering::Relaxed), medium.set_lens.load(Ordering::Relaxed));
    // 256 allocating writes, one cluster each. Extending the file exactly
    // over each took a length query and a truncate per write; growing by a
    // quarter of the file (at least 1 MiB) takes about ten for 16 MiB.
    for i in 0..256 {
        img.write_at(&data(i as u8), (i * CLUSTER) as u64).unwrap();
    }
    let lens = medium.lens.load(Ordering::Relaxed) - lens;
    let set_lens = medium.set_lens.load(Ordering::Relaxed) - set_lens;
    assert!(set_lens <= 16, "{set_lens} length changes for 256 allocations");
    assert!(lens <= 16, "{lens} length queries for 256 allocations");
    let reported = img.as_qcow2().unwrap().storage().len().unwrap();
    assert!(medium.inner.len().unwrap() > reported, "no reserve past the reported length");
    img.flush().unwrap();
    assert_eq!(medium.inner.len().unwrap(), reported, "the reserve outlived a flush");
    img.close().unwrap();
    let len = medium.inner.len().unwrap();
    // Header, refcount table and block, L1, one L2 table, 256 data clusters.
    assert_eq!(len, (5 + 256) * CLUSTER as u64);
    let img = Image::open_storage(medium.clone(), &OpenOptions::new().read_only(true)).unwrap();
    let report = img.check(None).unwrap();
    assert_eq!((report.corruptions, report.leaks, report.image_end_offset), (0, 0, len));
    for i in [0usize, 100, 255] {
        let mut back = vec![0u8; CLUSTER];
        img.read_at(&mut back, (i * CLUSTER) as u64).unwrap();
        assert_eq!(back, data(i as u8), "cluster {i}");
    }
}

#[test]
fn a_crash_that_leaves_the_reserve_leaves_a_clean_image() {
    let dir = tempfile::tempdir().unwrap();
    let medium = Arc::new(MemoryStorage::new());
    let img = Image::create_storage(medium.clone(), &CreateOptions::qcow2(64 << 20)).unwrap();
    for i in 0..40 {
        img.write_at(&data(i as u8), (i * CLUSTER) as u64).unwrap();
    }
    let reported = img.as_qcow2().unwrap().storage().len().unwrap();
    // Everything written so far reached the medium, the reserve too, and
    // nothing refers to the new clusters yet.
    let crashed = medium.to_bytes();
    assert!(crashed.len() as u64 > reported, "no reserve to crash with");
    assert_qemu_clean(&crashed, dir.path(), "crash before the first flush");
    img.flush().unwrap();
    // Allocations past the reserve the flush cut off: a new reserve, now
    // past refcounts and tables that are durable.
    for i in 40..80 {
        img.write_at(&data(i as u8), (i * CLUSTER) as u64).unwrap();
    }
    let crashed = medium.to_bytes();
    assert!(crashed.len() as u64 > img.as_qcow2().unwrap().storage().len().unwrap());
    assert_qemu_clean(&crashed, dir.path(), "crash after a flush");
    // The crashed image opens, checks clean in oxqcow too, and reads what
    // was flushed.
    let survivor = Image::open_storage(Arc::new(MemoryStorage::from_bytes(crashed)), &OpenOptions::new()).unwrap();
    let report = survivor.check(None).unwrap();
    assert_eq!((report.corruptions, report.leaks), (0, 0), "{:?}", report.messages);
    let mut back = vec![0u8; CLUSTER];
    survivor.read_at(&mut back, 39 * CLUSTER as u64).unwrap();
    assert_eq!(back, data(39));
    survivor.close().unwrap();
    img.close().unwrap();
}
