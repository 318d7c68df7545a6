//! `oxqcow map` against `qemu-img map` on the same images.

mod common;

use common::Scratch;

/// Every kind of qcow2 cluster qemu-io can produce: data, zero (plain and
/// allocated), discarded, partially written, and untouched.
fn cluster_kinds(s: &Scratch, name: &str, opts: &str) {
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "-o", opts, name, "8M"]);
    s.qemu_io(
        "qcow2",
        name,
        &[
            "write -P 1 0 64k",
            "write -z 128k 64k",
            "write -P 2 256k 128k",
            "write -z 256k 64k",
            "write -P 3 1M 64k",
            "discard 1M 64k",
            "write -P 4 3M 4k",
            "write -P 5 5M 1M",
            "write -P 6 7M 3k",
        ],
    );
}

fn check_all_views(s: &Scratch, name: &str) {
    for output in ["human", "json"] {
        let out = format!("--output={output}");
        s.assert_same(&["map", &out, name]);
        s.assert_same(&["map", &out, "--start-offset", "100000", "--max-length", "3000000", name]);
        s.assert_same(&["map", &out, "--start-offset", "5M", name]);
        s.assert_same(&["map", &out, "--start-offset", "64M", name]);
        s.assert_same(&["map", &out, "--max-length", "0", name]);
    }
}

/// map's --start-offset and --max-length (and every other cvtnum) went
/// through a size parser of their own that refused hex ("0x10000"),
/// accepted trailing blanks and refused 8E as not a size; qemu-img's
/// cvtnum is qemu_strtosz and a range check.
#[test]
fn offsets_are_read_as_qemu_img_reads_them() {
    let s = Scratch::new();
    cluster_kinds(&s, "a.qcow2", "cluster_size=65536");
    for v in ["0x10000", "1k ", " 1k", "-x", "-1", "1.5", "99999999999999999999", "8E", "0x", "1.5k"] {
        s.assert_same(&["map", "--output=json", "--start-offset", v, "a.qcow2"]);
        s.assert_same(&["map", "--output=json", "--max-length", v, "a.qcow2"]);
    }
}

#[test]
fn map_matches_qemu_on_every_cluster_kind() {
    let s = Scratch::new();
    cluster_kinds(&s, "a.qcow2", "cluster_size=65536");
    check_all_views(&s, "a.qcow2");
    // A different cluster size and a version 2 image.
    cluster_kinds(&s, "small.qcow2", "cluster_size=4096");
    check_all_views(&s, "small.qcow2");
    cluster_kinds(&s, "v2.qcow2", "compat=0.10");
    check_all_views(&s, "v2.qcow2");
    // The qcow2 file read as raw.
    s.assert_same(&["map", "-f", "raw", "--output=json", "a.qcow2"]);
}

#[test]
fn map_matches_qemu_on_preallocated_images() {
    let s = Scratch::new();
    for prealloc in ["metadata", "falloc", "full"] {
        let name = format!("p-{prealloc}.qcow2");
        s.qemu_ok(&["create", "-q", "-f", "qcow2", "-o", &format!("preallocation={prealloc}"), &name, "3M"]);
        s.qemu_io("qcow2", &name, &["write -P 7 64k 4k", "write -z 1M 64k", "discard 2M 64k"]);
        check_all_views(&s, &name);
    }
}

#[test]
fn map_matches_qemu_on_raw_images_with_holes() {
    let s = Scratch::new();
    s.qemu_ok(&["create", "-q", "-f", "raw", "h.raw", "4M"]);
    s.qemu_io("raw", "h.raw", &["write -P 1 8k 4k", "write -P 2 1M 100k", "write -P 3 4092k 4k"]);
    check_all_views(&s, "h.raw");
    // A file whose size is not a multiple of 512: QEMU rounds the disk up.
    std::fs::write(s.path("odd.raw"), b"abc").unwrap();
    std::fs::File::options().write(true).open(s.path("odd.raw")).unwrap().set_len(1000).unwrap();
    check_all_views(&s, "odd.raw");
    common::random_raw(&s.path("r.raw"), 6 << 20, 11);
    check_all_views(&s, "r.raw");
}

#[test]
fn map_errors_match_qemu() {
    let s = Scratch::new();
    cluster_kinds(&s, "a.qcow2", "cluster_size=65536");
    std::fs::write(s.path("plain.raw"), vec![1u8; 4096]).unwrap();
    std::fs::create_dir(s.path("adir")).unwrap();
    // qcow2 magic with a version QEMU does not know: still probed as qcow2.
    let mut bad = b"QFI\xfb\x1d\xb9\x00\x3c".to_vec();
    bad.resize(65536, 7);
    std::fs::write(s.path("badversion.qcow2"), bad).unwrap();
    for args in [
        &["map"][..],
        &["map", "a.qcow2", "b.qcow2"],
        &["map", "missing.qcow2"],
        &["map", "--output=xml", "a.qcow2"],
        &["map", "--start-offset", "-1", "a.qcow2"],
        &["map", "--start-offset", "1x", "a.qcow2"],
        &["map", "--max-length", "abc", "a.qcow2"],
        &["map", "-f", "qcow3", "a.qcow2"],
        &["map", "-f", "qcow2", "plain.raw"],
        &["map", "adir"],
        &["map", "badversion.qcow2"],
        &["map", "-z", "a.qcow2"],
        &["map", "--bogus", "a.qcow2"],
        &["map", "-f"],
        &["map", "--start-offset"],
    ] {
        let out = s.assert_same(args);
        assert_ne!(out.code, 0, "{args:?} should fail");
    }
    // Options after the file name and abbreviated long options work as in qemu-img.
    s.assert_same(&["map", "a.qcow2", "--out=json", "-U"]);
}

#[test]
fn map_matches_qemu_on_compressed_clusters() {
    let s = Scratch::new();
    common::random_raw(&s.path("src.raw"), 2 << 20, 21);
    s.qemu_ok(&["convert", "-c", "-O", "qcow2", "src.raw", "c.qcow2"]);
    // JSON lists compressed runs; the human format refuses them.
    s.assert_same(&["map", "--output=json", "c.qcow2"]);
    let out = s.assert_same(&["map", "c.qcow2"]);
    assert_eq!(out.code, 1);
}
