//! Concurrency: many threads on one shared image.
//!
//! - Striped writers: every cluster of region A is cut into one stripe per
//!   thread (unaligned boundaries); each thread writes its stripe of every
//!   cluster, in its own random order. The threads race to allocate the
//!   same clusters, and the result does not depend on who wins.
//! - Whole-cluster writers: each thread owns every other cluster of region
//!   B (neighbours share L2 tables and allocation runs).
//! - Readers: region C is half written (and flushed) beforehand, half
//!   unallocated; writers overwrite it in unaligned chunks while readers
//!   read random ranges and check that every byte is either the old or
//!   the new value.
//! - Churners: each thread owns every other cluster of region D and runs
//!   write, discard, partial write, zero write (with and without unmap),
//!   partial write on each: clusters are freed and reallocated while the
//!   others allocate.
//! - A flusher flushes in a loop the whole time, so deferred frees are
//!   applied while requests are in flight.
//!
//! Afterwards the content equals the model and check is clean, also after
//! close and reopen, and qemu-img agrees (check clean, compare identical to
//! a raw file holding the model).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use oxqcow::{BlockDevice, Compat, Image, OpenOptions};
use oxqcow_testkit::model::{pattern, pattern_byte, ImageConfig, Model, Op};
use oxqcow_testkit::prng::Prng;
use oxqcow_testkit::qemu;

const MIB: u64 = 1 << 20;
const REGION: u64 = 2 * MIB;
const STRIPERS: u64 = 3;
const OLD: u8 = 50;
const NEW: u8 = 60;

fn shuffled(n: u64, rng: &mut Prng) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).collect();
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i as u64 + 1) as usize);
    }
    v
}

fn read_all(img: &Image) -> Vec<u8> {
    let mut buf = vec![0u8; img.len() as usize];
    img.read_at(&mut buf, 0).unwrap();
    buf
}

fn assert_clean(img: &Image, what: &str) {
    let r = img.check(None).unwrap();
    assert!(r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0, "{what}: {r:?}");
}

/// Runs the scenario; with `small_cache` the image is reopened with caches
/// of two L2 tables and four refcount blocks, so the threads also race
/// through cache evictions.
fn run(cfg: ImageConfig, seed: u64, small_cache: bool) {
    let cs = cfg.cluster_size;
    let size = 4 * REGION;
    let (a, b, c, d) = (0, REGION, 2 * REGION, 3 * REGION);
    let dir = oxqcow_testkit::scratch_dir();
    let path = dir.path().join("shared.qcow2");
    let mut img = Image::create(&path, &cfg.create_options(size)).unwrap();
    if small_cache {
        img.close().unwrap();
        let mut opts = OpenOptions::new();
        opts.l2_cache_size = Some(2 * cs);
        opts.refcount_cache_size = Some(4 * cs);
        img = Image::open(&path, &opts).unwrap();
    }
    let mut model = Model::new(size, cs);

    // Region C: first half old data (flushed), second half unallocated.
    let old_half = REGION / 2;
    img.write_at(&pattern(OLD, c, old_half), c).unwrap();
    img.flush().unwrap();
    model.apply(&Op::Write { offset: c, len: old_half, seed: OLD });

    // Region C's chunks: unaligned, 1 byte to 3 clusters long.
    let mut rng = Prng::new(seed);
    let mut chunks = Vec::new();
    let mut pos = c;
    while pos < c + REGION {
        let len = rng.range(1, 3 * cs).min(c + REGION - pos);
        chunks.push((pos, len));
        pos += len;
    }
    let stripe = |t: u64| (t * cs / STRIPERS, (t + 1) * cs / STRIPERS);
    for cl in 0..REGION / cs {
        for t in 0..STRIPERS {
            let (s, e) = stripe(t);
            model.apply(&Op::Write { offset: a + cl * cs + s, len: e - s, seed: t as u8 });
        }
        model.apply(&Op::Write { offset: b + cl * cs, len: cs, seed: 10 + (cl % 2) as u8 });
    }
    for &(o, l) in &chunks {
        model.apply(&Op::Write { offset: o, len: l, seed: NEW });
    }
    let churn_ops = |k: u64, i: u64| -> Vec<Op> {
        let off = d + (2 * i + k) * cs;
        let half = cs / 2;
        let mut ops = vec![
            Op::Write { offset: off, len: cs, seed: 20 + k as u8 },
            Op::Discard { offset: off, len: cs },
            Op::Write { offset: off + half, len: half, seed: 30 + k as u8 },
            Op::WriteZeroes { offset: off, len: cs, may_unmap: i % 2 == 0 },
        ];
        if i % 3 != 0 {
            ops.push(Op::Write { offset: off, len: half, seed: 40 + k as u8 });
        }
        ops
    };
    for k in 0..2 {
        for i in 0..REGION / cs / 2 {
            for op in churn_ops(k, i) {
                model.apply(&op);
            }
        }
    }

    let done = AtomicBool::new(false);
    let reads = AtomicU64::new(0);
    std::thread::scope(|s| {
        let mut writers = Vec::new();
        for t in 0..STRIPERS {
            let img = &img;
            writers.push(s.spawn(move || {
                let mut rng = Prng::new(seed ^ ((t + 1) * 0x1234_5678));
                let (s0, e0) = stripe(t);
                for cl in shuffled(REGION / cs, &mut rng) {
                    let off = a + cl * cs + s0;
                    img.write_at(&pattern(t as u8, off, e0 - s0), off).unwrap();
                }
            }));
        }
        for w in 0..2u64 {
            let img = &img;
            writers.push(s.spawn(move || {
                let mut rng = Prng::new(seed ^ ((w + 7) * 0x9876_5432));
                for i in shuffled(REGION / cs / 2, &mut rng) {
                    let off = b + (2 * i + w) * cs;
                    img.write_at(&pattern(10 + w as u8, off, cs), off).unwrap();
                }
            }));
        }
        for k in 0..2u64 {
            let (img, churn_ops) = (&img, &churn_ops);
            writers.push(s.spawn(move || {
                let mut rng = Prng::new(seed ^ ((k + 3) * 0x5555_1111));
                for i in shuffled(REGION / cs / 2, &mut rng) {
                    for op in churn_ops(k, i) {
                        let r = match op {
                            Op::Write { offset, len, seed } => img.write_at(&pattern(seed, offset, len), offset),
                            Op::Discard { offset, len } => img.discard(offset, len),
                            Op::WriteZeroes { offset, len, may_unmap } => img.write_zeroes_at(offset, len, may_unmap),
                            _ => unreachable!(),
                        };
                        r.unwrap_or_else(|e| panic!("{op:?}: {e}"));
                    }
                }
            }));
        }
        let flushes = {
            let (img, done) = (&img, &done);
            s.spawn(move || {
                let mut n = 0u64;
                while !done.load(Ordering::Acquire) || n == 0 {
                    img.flush().unwrap();
                    n += 1;
                }
                n
            })
        };
        for w in 0..2usize {
            let (img, chunks) = (&img, &chunks);
            writers.push(s.spawn(move || {
                for &(o, l) in chunks.iter().skip(w).step_by(2) {
                    img.write_at(&pattern(NEW, o, l), o).unwrap();
                }
            }));
        }
        for r in 0..2u64 {
            let (img, done, reads) = (&img, &done, &reads);
            s.spawn(move || {
                let mut rng = Prng::new(seed ^ (r + 100));
                let mut buf = vec![0u8; 3 * cs as usize];
                // At least a few reads even if the writers finish first.
                let mut n = 0;
                while !done.load(Ordering::Acquire) || n < 20 {
                    let len = rng.range(1, buf.len() as u64);
                    let off = c + rng.below(REGION - len);
                    img.read_at(&mut buf[..len as usize], off).unwrap();
                    for (i, &byte) in buf[..len as usize].iter().enumerate() {
                        let p = off + i as u64;
                        let old = if p < c + old_half { pattern_byte(OLD, p) } else { 0 };
                        let new = pattern_byte(NEW, p);
                        assert!(
                            byte == old || byte == new,
                            "reader saw {byte:#04x} at {p}: neither old {old:#04x} nor new {new:#04x}"
                        );
                    }
                    n += 1;
                }
                reads.fetch_add(n, Ordering::Relaxed);
            });
        }
        // Let the readers stop once every writer is done.
        for w in writers {
            w.join().expect("a writer panicked");
        }
        done.store(true, Ordering::Release);
        assert!(flushes.join().expect("the flusher panicked") > 0);
    });
    assert!(reads.load(Ordering::Relaxed) >= 40);

    let all = read_all(&img);
    if let Some(at) = model.first_difference(&all) {
        panic!(
            "{cfg:?}: content differs from the model at {at} (image {:#04x}, model {:#04x}; regions at {a}, {b}, {c}, {d})",
            all[at as usize], model.data[at as usize]
        );
    }
    assert_clean(&img, "after the threads");
    img.close().unwrap();

    let img = Image::open(&path, &OpenOptions::new()).unwrap();
    if let Some(at) = model.first_difference(&read_all(&img)) {
        panic!("{cfg:?}: after reopen the content differs at {at}");
    }
    assert_clean(&img, "after reopen");
    img.close().unwrap();

    qemu::assert_check_clean(&path);
    let raw = dir.path().join("model.raw");
    std::fs::write(&raw, &model.data).unwrap();
    let cmp = qemu::compare(&path, "qcow2", &raw, "raw");
    assert!(cmp.success(), "qemu-img compare with the model: {}", cmp.text());
}

#[test]
fn concurrent_writers_and_readers_4k_clusters() {
    run(ImageConfig::new(4096, 16, Compat::V3, false), 1, false);
}

#[test]
fn concurrent_writers_and_readers_64k_clusters_lazy_refcounts() {
    run(ImageConfig::new(65536, 16, Compat::V3, true), 2, false);
}

#[test]
fn concurrent_writers_and_readers_512_byte_clusters_v2_small_cache() {
    run(ImageConfig::new(512, 16, Compat::V2, false), 3, true);
}

#[test]
fn concurrent_writers_and_readers_4k_clusters_refcount_1_small_cache() {
    run(ImageConfig::new(4096, 1, Compat::V3, false), 4, true);
}
