//! The copy between in-memory images: content, holes, zero detection,
//! compression, concatenation, a backing image, the hooks, and errors.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::*;
use crate::{CreateOptions, MemoryStorage, OpenOptions, Qcow2, Storage};

const MIB: u64 = 1 << 20;
const CLUSTER: u64 = 65536;

fn raw(bytes: Vec<u8>) -> Image {
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(bytes));
    Image::open_storage(storage, &OpenOptions::new().format(ImageFormat::Raw)).expect("a raw image in memory")
}

fn qcow2(size: u64) -> Image {
    Image::create_storage(Arc::new(MemoryStorage::new()), &CreateOptions::qcow2(size)).expect("a new qcow2 image")
}

fn content(image: &Image) -> Vec<u8> {
    let mut buf = vec![0u8; image.len() as usize];
    image.read_at(&mut buf, 0).expect("the image reads");
    buf
}

/// Bytes `[start, end)` of `image` that are allocated in it (qcow2).
fn allocated(image: &Image, start: u64, end: u64) -> u64 {
    let extents = image.block_status(start, end - start).expect("block status");
    extents.iter().filter(|e| e.present && e.depth == 0).map(|e| e.length).sum()
}

/// A pattern that never has a zero byte, so no zero detection touches it.
fn pattern(len: u64, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1).collect()
}

fn copy_default(sources: &[&Image], target: &Image, options: &CopyOptions) {
    copy(sources, target, None, options, &Hooks::default()).expect("the copy succeeds");
}

#[test]
fn holes_stay_holes_and_data_is_copied() {
    // A qcow2 source with data in clusters 1 and 20 only: the rest is never
    // read and never written.
    let src = qcow2(4 * MIB);
    src.write_at(&pattern(CLUSTER, 7), CLUSTER).unwrap();
    src.write_at(&pattern(CLUSTER, 9), 20 * CLUSTER).unwrap();
    let dst = qcow2(4 * MIB);
    copy_default(&[&src], &dst, &CopyOptions { target_is_zero: true, ..CopyOptions::default() });
    assert_eq!(content(&dst), content(&src));
    assert_eq!(allocated(&dst, 0, 4 * MIB), 2 * CLUSTER, "only the two data clusters are allocated");
    assert_eq!(allocated(&dst, CLUSTER, 2 * CLUSTER), CLUSTER);
}

#[test]
fn zeros_inside_data_are_detected() {
    // A raw source is all data to block status: the zeros in it are found
    // by scanning, and runs of at least min_sparse are not written.
    let mut bytes = pattern(2 * MIB, 3);
    bytes[(MIB as usize)..(MIB as usize + 4 * CLUSTER as usize)].fill(0);
    let src = raw(bytes);
    let dst = qcow2(2 * MIB);
    copy_default(&[&src], &dst, &CopyOptions { target_is_zero: true, ..CopyOptions::default() });
    assert_eq!(content(&dst), content(&src));
    assert_eq!(allocated(&dst, MIB, MIB + 4 * CLUSTER), 0, "the zero clusters stay holes");
    assert_eq!(allocated(&dst, 0, 2 * MIB), 2 * MIB - 4 * CLUSTER);

    // min_sparse 0 writes everything as data.
    let all = qcow2(2 * MIB);
    copy_default(&[&src], &all, &CopyOptions { min_sparse: 0, target_is_zero: true, ..CopyOptions::default() });
    assert_eq!(content(&all), content(&src));
    assert_eq!(allocated(&all, 0, 2 * MIB), 2 * MIB);
}

#[test]
fn zeros_are_written_over_a_target_that_is_not_zero() {
    let src = raw(vec![0u8; MIB as usize]);
    let dst = qcow2(MIB);
    dst.write_at(&pattern(MIB, 5), 0).unwrap();
    copy_default(&[&src], &dst, &CopyOptions::default());
    assert!(content(&dst).iter().all(|&b| b == 0), "the old data is gone");
}

#[test]
fn compressed_target() {
    let mut bytes = vec![0u8; 2 * MIB as usize];
    // Compressible data in clusters 0-3, zeros after it.
    for (i, b) in bytes[..4 * CLUSTER as usize].iter_mut().enumerate() {
        *b = b"compressible text "[i % 18];
    }
    let src = raw(bytes);
    let dst = qcow2(2 * MIB);
    let options = CopyOptions { compress: true, target_is_zero: true, workers: Some(3), ..CopyOptions::default() };
    copy_default(&[&src], &dst, &options);
    assert_eq!(content(&dst), content(&src));
    let extents = dst.block_status(0, 2 * MIB).unwrap();
    let compressed: u64 = extents.iter().filter(|e| e.compressed).map(|e| e.length).sum();
    assert_eq!(compressed, 4 * CLUSTER, "every data cluster is compressed: {extents:?}");
    assert_eq!(allocated(&dst, 4 * CLUSTER, 2 * MIB), 0, "zero clusters stay holes");

    // A raw target cannot take compressed clusters.
    let r = raw(vec![0u8; 2 * MIB as usize]);
    let e = copy(&[&src], &r, None, &options, &Hooks::default()).unwrap_err();
    assert_eq!(e.step, CopyStep::Start);
}

#[test]
fn sources_are_concatenated() {
    let a = raw(pattern(3 * CLUSTER + 512, 1));
    let b = qcow2(2 * MIB);
    b.write_at(&pattern(CLUSTER, 2), MIB).unwrap();
    let c = raw(pattern(4096, 3));
    let total = a.len() + b.len() + c.len();
    let dst = raw(vec![0xffu8; total as usize + 4096]);
    for in_order in [true, false] {
        let options = CopyOptions { in_order, workers: Some(4), ..CopyOptions::default() };
        copy_default(&[&a, &b, &c], &dst, &options);
        let mut expected = [content(&a), content(&b), content(&c)].concat();
        expected.extend_from_slice(&[0xff; 4096]);
        assert_eq!(content(&dst), expected, "in order: {in_order}");
    }
    let small = raw(vec![0u8; total as usize - 512]);
    let e = copy(&[&a, &b, &c], &small, None, &CopyOptions::default(), &Hooks::default()).unwrap_err();
    assert_eq!(e.step, CopyStep::Start, "a target smaller than the sources is refused");
}

#[test]
fn only_what_differs_from_the_backing_image_is_written() {
    let base_bytes = pattern(4 * CLUSTER, 11);
    let base = raw(base_bytes.clone());
    // Same as the base in clusters 0 and 2, different in 1, zeros in 3.
    let mut src_bytes = base_bytes.clone();
    src_bytes[CLUSTER as usize..2 * CLUSTER as usize].copy_from_slice(&pattern(CLUSTER, 12));
    src_bytes[3 * CLUSTER as usize..].fill(0);
    let src = raw(src_bytes.clone());
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let dst = Image::create_storage(storage.clone(), &CreateOptions::qcow2(4 * CLUSTER)).unwrap();
    copy(
        &[&src],
        &dst,
        Some(&base),
        &CopyOptions { target_is_zero: true, ..CopyOptions::default() },
        &Hooks::default(),
    )
    .unwrap();
    assert_eq!(allocated(&dst, 0, CLUSTER), 0, "cluster 0 reads the same from the base");
    assert_eq!(allocated(&dst, CLUSTER, 2 * CLUSTER), CLUSTER, "cluster 1 differs");
    assert_eq!(allocated(&dst, 2 * CLUSTER, 3 * CLUSTER), 0);
    assert_eq!(allocated(&dst, 3 * CLUSTER, 4 * CLUSTER), CLUSTER, "zeros over base data are recorded");
    dst.close().unwrap();
    let overlay = Qcow2::open_with_backing(storage, &OpenOptions::new(), Some(Arc::new(base))).unwrap();
    assert_eq!(content(&Image::Qcow2(overlay)), src_bytes);
}

#[test]
fn hooks_see_every_data_byte_in_order() {
    let mut bytes = pattern(5 * MIB, 4);
    bytes[(2 * MIB) as usize..(3 * MIB) as usize].fill(0);
    let src = qcow2(8 * MIB);
    src.write_at(&bytes, 0).unwrap();
    src.write_zeroes_at(2 * MIB, MIB, true).unwrap();
    let paced = AtomicU64::new(0);
    let seen = Mutex::new(Vec::new());
    let pace = |n: u64| {
        paced.fetch_add(n, Ordering::Relaxed);
    };
    let progress = |done: u64, total: u64| seen.lock().unwrap().push((done, total));
    let hooks = Hooks { before_read: Some(&pace), progress: Some(&progress), unreadable: None };
    let dst = qcow2(8 * MIB);
    let options = CopyOptions { target_is_zero: true, workers: Some(4), ..CopyOptions::default() };
    copy(&[&src], &dst, None, &options, &hooks).unwrap();
    assert_eq!(content(&dst), content(&src));
    // The data runs: 0-2 MiB and 3-5 MiB; the zero run and the unallocated
    // tail are neither read nor counted.
    assert_eq!(data_bytes(&[&src], 4096).unwrap(), 4 * MIB);
    assert_eq!(paced.load(Ordering::Relaxed), 4 * MIB, "every data chunk is paced before it is read");
    let seen = seen.into_inner().unwrap();
    assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "progress never goes back: {seen:?}");
    assert_eq!(seen.last(), Some(&(4 * MIB, 4 * MIB)));
    assert!(seen.iter().all(|&(_, total)| total == 4 * MIB));
    // With min_sparse 0 the zeros are data too.
    assert_eq!(data_bytes(&[&src], 0).unwrap(), 8 * MIB);
}

/// A storage whose reads fail when they touch `bad`, after a pause when
/// they start below `slow_below`.
#[derive(Debug)]
struct Failing {
    inner: MemoryStorage,
    bad: std::ops::Range<u64>,
    slow_below: u64,
}

impl Storage for Failing {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let end = offset + buf.len() as u64;
        if offset < self.bad.end && end > self.bad.start {
            if offset < self.slow_below {
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            return Err(std::io::Error::other("injected read failure"));
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
}

fn failing_raw(len: u64, bad: std::ops::Range<u64>, slow_below: u64) -> Image {
    let storage = Failing { inner: MemoryStorage::from_bytes(pattern(len, 8)), bad, slow_below };
    Image::open_storage(Arc::new(storage), &OpenOptions::new().format(ImageFormat::Raw)).unwrap()
}

#[test]
fn salvage_copies_unreadable_sectors_as_zeros() {
    let src = failing_raw(MIB, 4096..5120, 0);
    let dst = qcow2(MIB);
    let e = copy(&[&src], &dst, None, &CopyOptions::default(), &Hooks::default()).unwrap_err();
    assert_eq!((e.step, e.offset), (CopyStep::Read, 0), "without salvage the chunk's read fails: {e}");

    let bad = Mutex::new(Vec::new());
    let unreadable = |offset: u64, _: &Error| bad.lock().unwrap().push(offset);
    let hooks = Hooks { unreadable: Some(&unreadable), ..Hooks::default() };
    let dst = qcow2(MIB);
    let options = CopyOptions { salvage: true, target_is_zero: true, ..CopyOptions::default() };
    copy(&[&src], &dst, None, &options, &hooks).unwrap();
    assert_eq!(bad.into_inner().unwrap(), [4096, 4608]);
    let mut expected = pattern(MIB, 8);
    expected[4096..5120].fill(0);
    assert_eq!(content(&dst), expected);
}

/// Workers failed in any order and the first failure in time was reported,
/// so `convert -c` into an image with an external data file named byte 0
/// or byte 1048576 depending on the scheduling (data_file.rs's
/// convert_into_a_data_file_image failed now and then). The failure
/// earliest in the copy is reported.
#[test]
fn the_earliest_failure_in_the_copy_is_reported() {
    // Chunk 0 (0-2 MiB) fails after a delay, chunk 1 (2-4 MiB) at once.
    let src = failing_raw(4 * MIB, 0..4 * MIB, 2 * MIB);
    let dst = qcow2(4 * MIB);
    for in_order in [true, false] {
        let options = CopyOptions { workers: Some(2), in_order, ..CopyOptions::default() };
        let e = copy(&[&src], &dst, None, &options, &Hooks::default()).unwrap_err();
        assert_eq!((e.step, e.offset), (CopyStep::Read, 0), "in order: {in_order}");
    }
}

/// A memory medium that records where each write starts.
#[derive(Default)]
struct WriteLog {
    inner: MemoryStorage,
    starts: Mutex<Vec<u64>>,
}

impl Storage for WriteLog {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        // Later chunks overtake slow ones when nothing keeps the order.
        std::thread::sleep(std::time::Duration::from_micros((offset / MIB % 3) * 5000));
        self.starts.lock().unwrap().push(offset);
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_front_to_back_target_is_written_in_guest_order() {
    // A raw target is written out of order for speed, even without -W;
    // front to back it is written in order whatever `in_order` says.
    let src = raw(pattern(24 * MIB, 5));
    for front_to_back in [false, true] {
        let log = Arc::new(WriteLog::default());
        let dst = Image::create_storage(log.clone(), &CreateOptions::raw(24 * MIB)).unwrap();
        log.starts.lock().unwrap().clear();
        let options = CopyOptions { in_order: false, workers: Some(4), front_to_back, ..CopyOptions::default() };
        copy_default(&[&src], &dst, &options);
        assert_eq!(content(&dst), content(&src));
        let starts = log.starts.lock().unwrap().clone();
        let sorted = starts.windows(2).all(|w| w[0] < w[1]);
        assert_eq!(sorted, front_to_back, "front to back: {front_to_back}, writes at {starts:?}");
    }
}
