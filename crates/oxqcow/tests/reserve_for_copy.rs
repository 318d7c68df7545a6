//! `Qcow2::reserve_for_copy`: with the metadata of a copy laid out first,
//! the copy only appends past the file's end and never writes a byte
//! there twice, which a target uploaded while it is written (a new object
//! in an object store) relies on. Checked for several cluster sizes (512
//! bytes makes the refcount table grow), compressed and plain, with
//! QEMU's check and a read back of every byte.

use std::io;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use oxqcow::{BlockDevice, CreateOptions, Image, MemoryStorage, OpenOptions, Storage};

/// A memory medium that records the writes made once `recording` is set.
#[derive(Default)]
struct Recording {
    inner: MemoryStorage,
    writes: Mutex<Option<Vec<(u64, u64)>>>,
}

impl Recording {
    fn record(&self, offset: u64, len: u64) {
        if let Some(w) = self.writes.lock().unwrap().as_mut() {
            w.push((offset, len));
        }
    }
}

impl Storage for Recording {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.record(offset, buf.len() as u64);
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.record(offset, len);
        self.inner.write_zeroes(offset, len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.record(offset, len);
        self.inner.punch_hole(offset, len)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }
}

/// The guest bytes of `len` at `offset`, the same whatever the offsets a
/// range is written in: sectors of one repeated byte (which compress)
/// alternating with sectors of noise (which do not).
fn data(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64)
        .map(|p| {
            if (p / 512) % 2 == 0 {
                (p / 512) as u8
            } else {
                let x = p.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                (x >> 56) as u8
            }
        })
        .collect()
}

fn assert_qemu_clean(bytes: &[u8], dir: &Path, what: &str) {
    let path = dir.join("image.qcow2");
    std::fs::write(&path, bytes).unwrap();
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", path.to_str().unwrap()])
        .output()
        .unwrap_or_else(|e| panic!("qemu-img must be installed (apt-get install qemu-utils): {e}"));
    assert!(
        out.status.success(),
        "{what}: qemu-img check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_copy_after_the_reservation_only_appends() {
    let dir = tempfile::tempdir().unwrap();
    const SIZE: u64 = 40 << 20;
    // Data with holes, across many L2 tables for small clusters; the last
    // range ends inside a cluster.
    let ranges: Vec<(u64, u64)> =
        vec![(0, 3 << 20), (5 << 20, 64 << 10), (9 << 20, 1000), (12 << 20, 20 << 20), (SIZE - (1 << 20), 1 << 20)];
    for cluster in [512u64, 4096, 65536] {
        for compressed in [false, true] {
            let what = format!("{cluster}-byte clusters, compressed: {compressed}");
            let storage = Arc::new(Recording::default());
            let opts = CreateOptions::qcow2(SIZE).cluster_size(cluster);
            let image = Image::create_storage(storage.clone(), &opts).unwrap();
            let q = image.as_qcow2().unwrap();
            q.reserve_for_copy(&ranges).unwrap();
            let head = storage.len().unwrap();
            *storage.writes.lock().unwrap() = Some(Vec::new());
            let chunk = if compressed { cluster } else { 1 << 20 };
            for &(offset, len) in &ranges {
                let mut at = offset;
                while at < offset + len {
                    let n = chunk.min(offset + len - at) as usize;
                    let bytes = data(at, n);
                    if compressed && n as u64 == cluster && at % cluster == 0 {
                        q.write_compressed(&bytes, at).unwrap();
                    } else {
                        image.write_at(&bytes, at).unwrap();
                    }
                    at += n as u64;
                }
            }
            image.flush().unwrap();
            image.close().unwrap();
            let writes = storage.writes.lock().unwrap().take().unwrap();
            let mut end = head;
            let mut appended = 0;
            for &(offset, len) in writes.iter().filter(|w| w.0 + w.1 > head) {
                assert!(
                    offset >= end,
                    "{what}: a write at {offset}+{len} past the reserved {head} bytes goes below {end}"
                );
                end = offset + len;
                appended += 1;
            }
            // With 512-byte clusters the refcount table outgrows its first
            // cluster (8 MiB of reach) and its replacement goes past that
            // reach, where the data will not: the copy fills the space
            // below, all of it inside what the target keeps to the end.
            if cluster >= 4096 {
                assert!(head < 2 << 20, "{what}: {head} bytes of metadata");
                assert!(appended > 10, "{what}: only {appended} writes past {head}");
            }
            // And the image is whole: QEMU finds it clean, every byte reads back.
            let bytes = storage.inner.to_bytes();
            assert_qemu_clean(&bytes, dir.path(), &what);
            let image =
                Image::open_storage(Arc::new(MemoryStorage::from_bytes(bytes)), &OpenOptions::new().read_only(true))
                    .unwrap();
            for &(offset, len) in &ranges {
                let mut got = vec![0u8; len as usize];
                image.read_at(&mut got, offset).unwrap();
                assert!(got == data(offset, len as usize), "{what}: data at {offset} differs");
            }
            let mut gap = vec![1u8; 1 << 20];
            image.read_at(&mut gap, 3 << 20).unwrap();
            assert!(gap.iter().all(|&b| b == 0), "{what}: a hole reads as data");
        }
    }
}
