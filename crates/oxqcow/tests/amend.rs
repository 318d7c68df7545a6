//! amend against QEMU: the same option changes through oxqcow and through
//! qemu-img give images with equal content, equal header facts, and a clean
//! `qemu-img check`.

use std::path::Path;
use std::process::Command;

use oxqcow::options::AmendOptions;
use oxqcow::{BlockDevice, Image, OpenOptions};

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

fn info_fields(path: &Path) -> Vec<String> {
    let info = run(&["qemu-img", "info", "--output=json", p(path)]);
    info.lines()
        .filter(|l| {
            // The guest size is the top-level "virtual-size" (four spaces in);
            // the file child's one is the host file's length.
            ["\"compat\"", "\"lazy-refcounts\"", "\"refcount-bits\"", "\"corrupt\""].iter().any(|k| l.contains(k))
                || l.starts_with("    \"virtual-size\"")
        })
        .map(|l| l.trim().to_string())
        .collect()
}

/// An image with data, allocated and plain zero clusters, and a snapshot.
fn prepare(path: &Path, create_opts: &str) {
    run(&["qemu-img", "create", "-q", "-f", "qcow2", "-o", create_opts, p(path), "2M"]);
    run(&[
        "qemu-io",
        "-c",
        "write -P 7 0 300000",
        "-c",
        "write -z 65536 65536",
        "-c",
        "write -z 1000000 65536",
        "-c",
        "write -P 9 1500000 4096",
        p(path),
    ]);
}

#[test]
fn amend_sequences_match_qemu() {
    let cases: &[(&str, &[&str], bool)] = &[
        ("compat=1.1", &["compat=0.10"], true),
        ("compat=1.1", &["refcount_bits=64", "lazy_refcounts=on"], true),
        ("compat=1.1,lazy_refcounts=on", &["lazy_refcounts=off", "refcount_bits=2"], false),
        ("compat=0.10", &["compat=1.1", "refcount_bits=8"], true),
        ("compat=1.1,refcount_bits=4", &["refcount_bits=16,compat=0.10"], false),
        ("compat=1.1", &["size=4M"], true),
    ];
    for &(create, steps, with_snapshot) in cases {
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("ours.qcow2");
        let theirs = dir.path().join("theirs.qcow2");
        for f in [&ours, &theirs] {
            prepare(f, create);
            if with_snapshot {
                run(&["qemu-img", "snapshot", "-c", "snap", p(f)]);
                run(&["qemu-io", "-c", "write -z 0 65536", "-c", "write -P 3 200000 1000", p(f)]);
            }
        }
        let before = dir.path().join("before.raw");
        if with_snapshot {
            run(&["qemu-img", "convert", "-l", "snapshot.name=snap", "-O", "raw", p(&ours), p(&before)]);
        }
        for step in steps {
            let img = Image::open(&ours, &OpenOptions::new()).unwrap();
            img.as_qcow2().unwrap().amend(&AmendOptions::parse(step).unwrap(), &mut |_, _| {}).unwrap();
            img.close().unwrap();
            run(&["qemu-img", "amend", "-o", step, p(&theirs)]);
        }
        let check = run(&["qemu-img", "check", p(&ours)]);
        assert!(check.contains("No errors"), "{create} {steps:?}: {check}");
        run(&["qemu-img", "compare", p(&ours), p(&theirs)]);
        assert_eq!(info_fields(&ours), info_fields(&theirs), "{create} {steps:?}");
        if with_snapshot {
            // The snapshot keeps its content (compared with what it read
            // before: QEMU 10's downgrade changes a snapshot that shares a
            // zero-allocated cluster with the active layer).
            let a = dir.path().join("a.raw");
            run(&["qemu-img", "convert", "-l", "snapshot.name=snap", "-O", "raw", p(&ours), p(&a)]);
            // (Read through the active layer's size, which may have grown.)
            let (after, before) = (std::fs::read(a).unwrap(), std::fs::read(&before).unwrap());
            let n = before.len().min(after.len());
            assert!(after[..n] == before[..n], "{create} {steps:?}: snapshot changed");
            assert!(after[n..].iter().all(|&b| b == 0), "{create} {steps:?}: snapshot changed");
        }
    }
}

#[test]
fn refused_amends_leave_the_image_intact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.qcow2");
    prepare(&path, "compat=1.1");
    run(&["qemu-img", "snapshot", "-c", "s", p(&path)]);
    let before = run(&["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", p(&path), p(&path)]);
    let img = Image::open(&path, &OpenOptions::new()).unwrap();
    let q = img.as_qcow2().unwrap();
    for bad in ["refcount_bits=1", "compat=0.10,refcount_bits=8", "cluster_size=4k", "backing_file=x", "compat=2"] {
        let r = AmendOptions::parse(bad).and_then(|o| q.amend(&o, &mut |_, _| {}));
        assert!(r.is_err(), "{bad} must be refused");
    }
    let mut buf = vec![0u8; 10];
    img.read_at(&mut buf, 1_500_000).unwrap();
    assert_eq!(buf, vec![9; 10]);
    img.close().unwrap();
    let check = run(&["qemu-img", "check", p(&path)]);
    assert!(check.contains("No errors"), "{check}");
    assert_eq!(before, run(&["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", p(&path), p(&path)]));
}

/// A refcount width change walks the whole refcount table, whose entries
/// are mostly empty on a sparse image: oxqcow carries an empty entry's
/// refcounts at once (QEMU steps through each: a second for an empty
/// 1 GiB image), and the file it writes is still QEMU's, byte for byte.
/// With 512-byte clusters and 64-bit refcounts a new block is counted in
/// the old block the walk is reading, which the walk must see at once as
/// QEMU's does (it saw it a walk later, and the new table landed one
/// cluster lower than qemu-img puts it).
#[test]
fn refcount_width_changes_of_sparse_images_are_qemus_bytes() {
    let cases = [(65536, "3G", "4"), (65536, "3G", "64"), (4096, "3G", "2"), (4096, "3G", "64"), (512, "200M", "64")];
    for (cluster_size, size, bits) in cases {
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("ours.qcow2");
        let theirs = dir.path().join("theirs.qcow2");
        run(&[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("cluster_size={cluster_size}"),
            p(&ours),
            size,
        ]);
        run(&["qemu-io", "-c", "write -P 1 0 1M", "-c", "write -P 2 70M 64k", "-c", "write -P 3 150M 3M", p(&ours)]);
        run(&["qemu-img", "snapshot", "-c", "s", p(&ours)]);
        run(&["qemu-io", "-c", "write -P 4 1M 1M", p(&ours)]);
        std::fs::copy(&ours, &theirs).unwrap();
        let step = format!("refcount_bits={bits}");
        let img = Image::open(&ours, &OpenOptions::new()).unwrap();
        img.as_qcow2().unwrap().amend(&AmendOptions::parse(&step).unwrap(), &mut |_, _| {}).unwrap();
        img.close().unwrap();
        run(&["qemu-img", "amend", "-o", &step, p(&theirs)]);
        let (a, b) = (std::fs::read(&ours).unwrap(), std::fs::read(&theirs).unwrap());
        assert!(a == b, "cluster_size={cluster_size} {step}: the files differ");
    }
}
