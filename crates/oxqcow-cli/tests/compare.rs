//! `oxqcow compare` against `qemu-img compare`: messages, exit codes,
//! strict mode and images of different sizes.

mod common;

use common::Scratch;

/// Images that differ in every way compare cares about.
fn images(s: &Scratch) {
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "a.qcow2", "4M"]);
    s.qemu_io(
        "qcow2",
        "a.qcow2",
        &["write -P 1 0 64k", "write -z 128k 64k", "write -P 2 256k 128k", "write -z 256k 64k", "write -P 4 3M 4k"],
    );
    // Same content, other layout.
    s.qemu_ok(&["convert", "-O", "qcow2", "-o", "cluster_size=4096", "a.qcow2", "same.qcow2"]);
    s.qemu_ok(&["convert", "-O", "raw", "a.qcow2", "same.raw"]);
    // One byte differs inside a data cluster.
    std::fs::copy(s.path("a.qcow2"), s.path("byte.qcow2")).unwrap();
    s.qemu_io("qcow2", "byte.qcow2", &["write -P 9 300001 1"]);
    // Data where the other image has only zeros.
    std::fs::copy(s.path("a.qcow2"), s.path("extra.qcow2")).unwrap();
    s.qemu_io("qcow2", "extra.qcow2", &["write -P 9 2000003 1"]);
    // Zeros written as data where the other image is unallocated: equal.
    std::fs::copy(s.path("a.qcow2"), s.path("zeros.qcow2")).unwrap();
    s.qemu_io("qcow2", "zeros.qcow2", &["write -P 0 2M 64k"]);
    // Larger images: zero tail, and data in the tail.
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "big.qcow2", "5M"]);
    s.qemu_ok(&["convert", "-n", "-O", "qcow2", "a.qcow2", "big.qcow2"]);
    std::fs::copy(s.path("big.qcow2"), s.path("bigdata.qcow2")).unwrap();
    s.qemu_io("qcow2", "bigdata.qcow2", &["write -P 3 4900k 1k"]);
}

#[test]
fn compare_matches_qemu() {
    let s = Scratch::new();
    images(&s);
    let pairs = [
        ("a.qcow2", "a.qcow2"),
        ("a.qcow2", "same.qcow2"),
        ("a.qcow2", "same.raw"),
        ("same.raw", "a.qcow2"),
        ("a.qcow2", "byte.qcow2"),
        ("byte.qcow2", "a.qcow2"),
        ("a.qcow2", "extra.qcow2"),
        ("extra.qcow2", "a.qcow2"),
        ("a.qcow2", "zeros.qcow2"),
        ("a.qcow2", "big.qcow2"),
        ("big.qcow2", "a.qcow2"),
        ("a.qcow2", "bigdata.qcow2"),
        ("bigdata.qcow2", "a.qcow2"),
    ];
    for (x, y) in pairs {
        for flags in [&[][..], &["-s"], &["-q"], &["-s", "-q"], &["-p"], &["-f", "raw", "-F", "raw"]] {
            let mut args = vec!["compare"];
            args.extend_from_slice(flags);
            args.push(x);
            args.push(y);
            s.assert_same(&args);
        }
    }
    // The exit codes say identical, different.
    assert_eq!(s.ours(&["compare", "a.qcow2", "same.raw"]).code, 0);
    assert_eq!(s.ours(&["compare", "a.qcow2", "byte.qcow2"]).code, 1);
    assert_eq!(s.ours(&["compare", "-s", "a.qcow2", "big.qcow2"]).code, 1);
}

#[test]
fn compare_errors_match_qemu() {
    let s = Scratch::new();
    images(&s);
    for args in [
        &["compare"][..],
        &["compare", "a.qcow2"],
        &["compare", "a.qcow2", "b", "c"],
        &["compare", "a.qcow2", "missing"],
        &["compare", "missing", "a.qcow2"],
        &["compare", "-p", "a.qcow2", "missing"],
        &["compare", "-f", "qcow3", "a.qcow2", "a.qcow2"],
        &["compare", "-F", "qcow2", "a.qcow2", "same.raw"],
        &["compare", "-T", "bogus", "a.qcow2", "a.qcow2"],
        &["compare", "-z", "a.qcow2", "a.qcow2"],
        &["compare", "--out", "a.qcow2", "a.qcow2"],
        &["compare", "-f"],
    ] {
        let out = s.assert_same(args);
        assert!(out.code == 1 || out.code == 2, "{args:?} should fail");
    }
    assert_eq!(s.ours(&["compare", "a.qcow2", "missing"]).code, 2);
}
