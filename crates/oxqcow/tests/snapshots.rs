//! Internal snapshots against QEMU: the same sequence through oxqcow and
//! through qemu-img/qemu-io gives equal active layers and equal snapshots,
//! and qemu-img check finds oxqcow's image clean.

use std::path::Path;
use std::process::Command;

use oxqcow::{BlockDevice, CreateOptions, Image, OpenOptions};

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{} must be installed (apt-get install qemu-utils): {e}", args[0]));
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn snapshot_raw(dir: &Path, image: &Path, name: &str) -> Vec<u8> {
    let raw = dir.join("snap.raw");
    let l = format!("snapshot.name={name}");
    run(&["qemu-img", "convert", "-l", &l, "-O", "raw", p(image), p(&raw)]);
    std::fs::read(raw).unwrap()
}

enum Op {
    Write(u64, u64, u8),
    Zero(u64, u64),
    Discard(u64, u64),
    Create(&'static str),
    Apply(&'static str),
    Delete(&'static str),
}

fn apply_ours(img: &Image, op: &Op) {
    let q = img.as_qcow2().unwrap();
    match *op {
        Op::Write(o, l, pat) => img.write_at(&vec![pat; l as usize], o).unwrap(),
        Op::Zero(o, l) => img.write_zeroes_at(o, l, false).unwrap(),
        Op::Discard(o, l) => img.discard(o, l).unwrap(),
        Op::Create(n) => {
            q.snapshot_create(n).unwrap();
        }
        Op::Apply(n) => q.snapshot_apply(n).unwrap(),
        Op::Delete(n) => q.snapshot_delete(n).unwrap(),
    }
}

fn apply_qemu(path: &Path, op: &Op) {
    match *op {
        Op::Write(o, l, pat) => run(&["qemu-io", "-c", &format!("write -P {pat} {o} {l}"), p(path)]),
        Op::Zero(o, l) => run(&["qemu-io", "-c", &format!("write -z {o} {l}"), p(path)]),
        Op::Discard(o, l) => run(&["qemu-io", "-c", &format!("discard {o} {l}"), p(path)]),
        Op::Create(n) => run(&["qemu-img", "snapshot", "-c", n, p(path)]),
        Op::Apply(n) => run(&["qemu-img", "snapshot", "-a", n, p(path)]),
        Op::Delete(n) => run(&["qemu-img", "snapshot", "-d", n, p(path)]),
    };
}

#[test]
fn snapshot_sequences_match_qemu() {
    let ops = [
        Op::Write(0, 200_000, 1),
        Op::Write(1_000_000, 5000, 2),
        Op::Create("s1"),
        Op::Write(100, 1000, 3),
        Op::Write(150_000, 100_000, 4),
        Op::Zero(1_000_000, 65536),
        Op::Create("s2"),
        Op::Discard(0, 131_072),
        Op::Write(2_000_000, 70_000, 5),
        Op::Create("s3"),
        Op::Delete("s1"),
        Op::Apply("s2"),
        Op::Write(60_000, 10, 6),
        Op::Delete("s3"),
        Op::Create("s4"),
        Op::Write(3_000_000, 4096, 7),
    ];
    for (cluster_size, compat) in
        [(65536u64, oxqcow::Compat::V3), (4096, oxqcow::Compat::V2), (512, oxqcow::Compat::V3)]
    {
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("ours.qcow2");
        let theirs = dir.path().join("theirs.qcow2");
        let img =
            Image::create(&ours, &CreateOptions::qcow2(4 << 20).cluster_size(cluster_size).compat(compat)).unwrap();
        let o = format!("cluster_size={cluster_size},compat={}", compat.name());
        run(&["qemu-img", "create", "-q", "-f", "qcow2", "-o", &o, p(&theirs), "4M"]);
        for op in &ops {
            apply_ours(&img, op);
            apply_qemu(&theirs, op);
        }
        let names: Vec<String> = img.as_qcow2().unwrap().snapshots().iter().map(|s| s.name.clone()).collect();
        assert_eq!(names, ["s2", "s4"]);
        img.close().unwrap();
        let check = run(&["qemu-img", "check", p(&ours)]);
        assert!(check.contains("No errors"), "{check}");
        run(&["qemu-img", "compare", p(&ours), p(&theirs)]);
        for s in ["s2", "s4"] {
            assert!(
                snapshot_raw(dir.path(), &ours, s) == snapshot_raw(dir.path(), &theirs, s),
                "snapshot {s} differs ({cluster_size}, {compat:?})"
            );
        }
        // QEMU's image: read its snapshots and active layer through oxqcow.
        for s in ["s2", "s4"] {
            let view =
                Image::open(&theirs, &OpenOptions { read_only: true, snapshot: Some(s.into()), ..Default::default() })
                    .unwrap();
            let mut buf = vec![0u8; view.len() as usize];
            view.read_at(&mut buf, 0).unwrap();
            assert!(buf == snapshot_raw(dir.path(), &theirs, s), "reading QEMU's snapshot {s}");
        }
        let ours_check = Image::open(&ours, &OpenOptions::new().read_only(true)).unwrap().check(None).unwrap();
        assert_eq!((ours_check.corruptions, ours_check.leaks), (0, 0), "{:?}", ours_check.messages);
    }
}

#[test]
fn refcount_overflow_fails_the_snapshot_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("one-bit.qcow2");
    let img = Image::create(&path, &CreateOptions::qcow2(1 << 20).refcount_bits(1)).unwrap();
    img.write_at(&[9; 4096], 0).unwrap();
    let q = img.as_qcow2().unwrap();
    assert!(q.snapshot_create("x").is_err(), "1-bit refcounts cannot count two references");
    assert!(q.snapshots().is_empty());
    img.write_at(&[8; 10], 100).unwrap();
    img.close().unwrap();
    let check = run(&["qemu-img", "check", p(&path)]);
    assert!(check.contains("No errors"), "{check}");
}
