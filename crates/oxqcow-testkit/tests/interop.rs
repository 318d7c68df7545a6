//! Interop through the library, over every cluster size (512, 4k, 64k,
//! 2M), refcount width (1, 16, 64), compat (0.10, 1.1), lazy refcounts and
//! preallocation mode (off, metadata, falloc, full) that QEMU accepts
//! together (compat 0.10 has 16-bit refcounts and no lazy refcounts):
//!
//! - image A is created by qemu-img and written by qemu-io (unaligned
//!   writes, `write -z`, `write -z -u`, discards, a write at the last
//!   byte); oxqcow reads it exactly as `qemu-img convert -O raw` does, and
//!   oxqcow's check finds it clean;
//! - image B is created by oxqcow with the same options and gets the same
//!   workload through the library; `qemu-img compare A B` calls them
//!   identical and `qemu-img check B` finds no error and no leak.
//!
//! The same runs on images with extended L2 entries (16k, 64k, 2M clusters).

use std::path::Path;

use oxqcow::{BlockDevice, Compat, Image, OpenOptions, Preallocation};
use oxqcow_testkit::model::ImageConfig;
use oxqcow_testkit::prng::Prng;
use oxqcow_testkit::qemu;

/// A disk size that leaves a partial last cluster for every cluster size
/// above 512 bytes.
const SIZE: u64 = (4 << 20) + 3 * 512;

#[derive(Clone, Copy, Debug)]
enum IoOp {
    Write { offset: u64, len: u64, byte: u8 },
    Zero { offset: u64, len: u64, unmap: bool },
    Discard { offset: u64, len: u64 },
}

impl IoOp {
    fn qemu_io(&self) -> String {
        match *self {
            IoOp::Write { offset, len, byte } => format!("write -P {byte} {offset} {len}"),
            IoOp::Zero { offset, len, unmap: false } => format!("write -z {offset} {len}"),
            IoOp::Zero { offset, len, unmap: true } => format!("write -z -u {offset} {len}"),
            IoOp::Discard { offset, len } => format!("discard {offset} {len}"),
        }
    }

    fn apply(&self, img: &Image) {
        let res = match *self {
            IoOp::Write { offset, len, byte } => img.write_at(&vec![byte; len as usize], offset),
            IoOp::Zero { offset, len, unmap } => img.write_zeroes_at(offset, len, unmap),
            IoOp::Discard { offset, len } => img.discard(offset, len),
        };
        res.unwrap_or_else(|e| panic!("{self:?}: {e}"));
    }
}

/// A few operations of every kind inside a window that the first write
/// fills (so zero writes and discards hit data), unaligned or cluster
/// aligned; then the tail of the disk is written and discarded up to the
/// end (which takes the partial last cluster), and the last byte written.
fn workload(cs: u64, seed: u64) -> Vec<IoOp> {
    let mut rng = Prng::new(seed);
    let window = (16 * cs).clamp(64 << 10, SIZE / 2);
    let base = rng.below(SIZE - window) / 512 * 512;
    let mut ops = vec![IoOp::Write { offset: base + 100, len: window - 200, byte: 0x11 }];
    for round in 0..2 {
        for kind in 0..5 {
            let aligned = (round + kind) % 2 == 1;
            let mut len = rng.range(1, (3 * cs).min(window / 2));
            let mut offset = base + rng.below(window - len);
            if aligned {
                offset = offset / cs * cs;
                len = len.div_ceil(cs) * cs;
            }
            ops.push(match kind {
                0 | 1 => IoOp::Write { offset, len, byte: rng.range(1, 256) as u8 },
                2 => IoOp::Zero { offset, len, unmap: false },
                3 => IoOp::Zero { offset, len, unmap: true },
                _ => IoOp::Discard { offset, len },
            });
        }
    }
    let tail = (2 * cs).min(SIZE / 2);
    ops.push(IoOp::Write { offset: SIZE - tail, len: tail, byte: 0x22 });
    let from = (SIZE - cs.min(SIZE / 4)) / cs * cs;
    ops.push(IoOp::Discard { offset: from, len: SIZE - from });
    ops.push(IoOp::Write { offset: SIZE - 1, len: 1, byte: 0xee });
    ops
}

fn read_all(img: &Image) -> Vec<u8> {
    let mut buf = vec![0u8; img.len() as usize];
    img.read_at(&mut buf, 0).unwrap();
    buf
}

fn assert_clean_check(img: &Image, what: &str) {
    let r = img.check(None).unwrap();
    assert!(r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0, "{what}: oxqcow check: {r:?}");
}

fn run_case(dir: &Path, cfg: ImageConfig, seed: u64) {
    let ops = workload(cfg.cluster_size, seed);
    let theirs = dir.join("theirs.qcow2");
    let ours = dir.join("ours.qcow2");
    let raw = dir.join("theirs.raw");
    let what = format!("{} (ops {ops:?})", cfg.qemu_options());

    qemu::qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &cfg.qemu_options(),
        theirs.to_str().unwrap(),
        &SIZE.to_string(),
    ]);
    let cmds: Vec<String> = ops.iter().map(IoOp::qemu_io).collect();
    qemu::qemu_io_ok(&theirs, &cmds);
    qemu::assert_check_clean(&theirs);
    qemu::convert_to_raw(&theirs, &raw);
    let expected = std::fs::read(&raw).unwrap();
    assert_eq!(expected.len() as u64, SIZE);

    // QEMU's image through oxqcow.
    let a = Image::open(&theirs, &OpenOptions::new().read_only(true)).unwrap();
    let got = read_all(&a);
    if let Some(at) = got.iter().zip(&expected).position(|(x, y)| x != y) {
        panic!("{what}: oxqcow reads QEMU's image differently at offset {at}: {} vs {}", got[at], expected[at]);
    }
    assert_clean_check(&a, &format!("{what}: QEMU's image"));
    drop(a);

    // The same workload through the library.
    let b = Image::create(&ours, &cfg.create_options(SIZE)).unwrap();
    for op in &ops {
        op.apply(&b);
    }
    assert!(read_all(&b) == expected, "{what}: oxqcow's own image reads differently from QEMU's");
    assert_clean_check(&b, &format!("{what}: oxqcow's image"));
    b.close().unwrap();

    let cmp = qemu::compare(&theirs, "qcow2", &ours, "qcow2");
    assert!(cmp.success(), "{what}: qemu-img compare: {}", cmp.text());
    let check = qemu::check(&ours);
    assert!(check.success(), "{what}: qemu-img check of oxqcow's image (exit {:?}): {}", check.code, check.text());
}

fn matrix(cluster_size: u64) {
    let dir = oxqcow_testkit::scratch_dir();
    let mut n = 0;
    for mut cfg in ImageConfig::matrix(&[cluster_size], &[1, 16, 64]) {
        for prealloc in [Preallocation::Off, Preallocation::Metadata, Preallocation::Falloc, Preallocation::Full] {
            cfg.preallocation = prealloc;
            run_case(dir.path(), cfg, cluster_size ^ n);
            n += 1;
        }
    }
    // 7 refcount/compat/lazy combinations times 4 preallocation modes.
    assert_eq!(n, 28);
    let _ = Compat::V2;
}

#[test]
fn interop_512_byte_clusters() {
    matrix(512);
}

#[test]
fn interop_4k_clusters() {
    matrix(4096);
}

#[test]
fn interop_64k_clusters() {
    matrix(65536);
}

#[test]
fn interop_2m_clusters() {
    matrix(2 << 20);
}

/// Extended L2 entries (compat 1.1 only) at 16 KiB, 64 KiB and 2 MiB
/// clusters, with and without lazy refcounts, in every preallocation mode
/// (preallocated clusters have no allocated subclusters: they read as
/// zeros until written).
#[test]
fn interop_extended_l2() {
    let dir = oxqcow_testkit::scratch_dir();
    let mut n = 0;
    for cs in [16 << 10, 64 << 10, 2 << 20] {
        for lazy in [false, true] {
            for prealloc in [Preallocation::Off, Preallocation::Metadata, Preallocation::Falloc, Preallocation::Full] {
                let mut cfg = ImageConfig::new(cs, 16, Compat::V3, lazy).with_extended_l2(true);
                cfg.preallocation = prealloc;
                run_case(dir.path(), cfg, cs ^ n);
                n += 1;
            }
        }
    }
    assert_eq!(n, 24);
}
