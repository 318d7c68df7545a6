//! `oxqcow create/info/check/resize/measure` against qemu-img: the same
//! arguments on copies of the same files must give the same exit code, the
//! same stdout and the same stderr, and images oxqcow writes must satisfy
//! `qemu-img check` (and be byte-identical where the engine lays them out
//! as QEMU does).

mod common;

use std::path::Path;

use common::{must, oxqcow, patch, qemu_img, qemu_io, run_in, words, Pair};

/// Builds a directory of images made by the QEMU tools.
fn fixtures() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let q = qemu_img();
    must(d, q, &words("create -q -f qcow2 v3.qcow2 1G"));
    must(d, q, &words("create -q -f qcow2 -o compat=0.10 v2.qcow2 100M"));
    must(d, q, &words("create -q -f raw raw.img 1M"));
    must(d, q, &words("create -q -f qcow2 -o cluster_size=4k,lazy_refcounts=on,refcount_bits=8 small.qcow2 10M"));
    must(d, q, &words("create -q -f qcow2 -o cluster_size=4k,preallocation=metadata meta.qcow2 10M"));
    must(d, q, &words("create -q -f qcow2 -o compression_type=zstd zstd.qcow2 10M"));
    // 256 KiB of data in a 64 MiB image, some of it zeroes written as data.
    must(d, q, &words("create -q -f qcow2 data.qcow2 64M"));
    must(d, qemu_io(), &["-c", "write -P 1 0 256k", "-c", "write -P 0 1M 64k", "-c", "write -z 2M 64k", "data.qcow2"]);
    // A raw image with two data runs and holes.
    must(d, q, &words("create -q -f raw sparse.img 8M"));
    must(d, qemu_io(), &["-f", "raw", "-c", "write -P 7 4k 4k", "-c", "write -P 9 5M 100k", "sparse.img"]);
    // Snapshots (listed by info; dates in local time for both tools).
    must(d, q, &words("create -q -f qcow2 snap.qcow2 64M"));
    must(d, qemu_io(), &["-c", "write -P 1 0 1M", "snap.qcow2"]);
    must(d, q, &words("snapshot -c first snap.qcow2"));
    must(d, q, &["snapshot", "-c", "a longer snapshot name", "snap.qcow2"]);
    must(d, q, &words("create -q -f qcow2 -o compat=0.10 v2snap.qcow2 1M"));
    must(d, q, &words("snapshot -c s1 v2snap.qcow2"));
    // Features the engine cannot open yet; info reads their headers.
    must(d, q, &words("create -q -f qcow2 -b v3.qcow2 -F qcow2 overlay.qcow2"));
    must(d, q, &words("create -q -f qcow2 -u -b /nonexistent/base.raw -F raw absback.qcow2 1G"));
    must(d, q, &words("create -q -f qcow2 -o extended_l2=on extl2.qcow2 10M"));
    must(d, q, &words("create -q -f qcow2 -o data_file=datafile.raw datafile.qcow2 1M"));
    // Header flags: dirty (incompatible bit 0), corrupt (bit 1).
    std::fs::copy(d.join("v3.qcow2"), d.join("dirty.qcow2")).unwrap();
    patch(&d.join("dirty.qcow2"), 79, &[1]);
    std::fs::copy(d.join("v3.qcow2"), d.join("corrupt.qcow2")).unwrap();
    patch(&d.join("corrupt.qcow2"), 79, &[2]);
    // Refcount damage in data.qcow2's single refcount block (cluster 2,
    // 16-bit entries): a leak (header refcount 2), a count past the end of
    // the file (ignored), and a corruption (the L1 table's count zeroed).
    let block = 2 * 65536;
    std::fs::copy(d.join("data.qcow2"), d.join("leak.qcow2")).unwrap();
    patch(&d.join("leak.qcow2"), block, &[0, 2]);
    patch(&d.join("leak.qcow2"), block + 2 * 40, &[0, 1]);
    std::fs::copy(d.join("data.qcow2"), d.join("corruption.qcow2")).unwrap();
    patch(&d.join("corruption.qcow2"), block + 2 * 3, &[0, 0]);
    dir
}

fn fixture_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(fixtures).path()
}

/// `dd` writes the same bytes into the same files as qemu-img dd, and
/// fails with the same messages and exit codes.
#[test]
fn dd_matches_qemu() {
    for case in [
        "dd if=data.qcow2 of=out.raw",
        "dd -f qcow2 -O qcow2 bs=64k count=3 skip=1 if=data.qcow2 of=out.qcow2",
        "dd -O qcow2 bs=1M if=data.qcow2 of=out.qcow2",
        "dd bs=1k count=010 skip=0x2 if=sparse.img of=out.raw",
        "dd bs=3 count=5 if=data.qcow2 of=out.raw",
        "dd count=0 if=data.qcow2 of=out.raw",
        "dd skip=999999999 if=data.qcow2 of=out.raw",
        "dd bs=1G skip=9223372036854775807 if=data.qcow2 of=out.raw",
        "dd -f raw if=v3.qcow2 of=out.raw",
        "dd -U if=snap.qcow2 of=out.raw bs=1M",
        "dd --image-opts if=driver=qcow2,file.filename=data.qcow2 of=out.raw bs=64k",
        "dd",
        "dd if=data.qcow2",
        "dd if=data.qcow2 of=out.raw foo=1",
        "dd if=data.qcow2 of=out.raw if",
        "dd if=data.qcow2 of=out.raw bs=0",
        "dd if=data.qcow2 of=out.raw bs=1x",
        "dd if=data.qcow2 of=out.raw count=1k",
        "dd if=data.qcow2 of=out.raw skip=-1",
        "dd if=data.qcow2 of=out.raw count=9223372036854775808",
        "dd -O foo if=data.qcow2 of=out.raw",
        "dd if=nonexistent of=out.raw",
        "dd if=data.qcow2 of=/nonexistent/out.raw",
        "dd -x if=data.qcow2 of=out.raw",
    ] {
        let pair = Pair::from(fixture_dir());
        let args = words(case);
        pair.same_output(&args);
        pair.same_files(&args);
    }
}

#[test]
fn create_output_and_images_match_qemu() {
    let cases = [
        "create -f qcow2 a.qcow2 1G",
        "create -f qcow2 -o compat=0.10 a.qcow2 100M",
        "create a.img 1M",
        "create -f raw a.img 1000",
        "create -f raw -o preallocation=full a.img 1001",
        "create -f raw -o preallocation=falloc a.img 1M",
        "create -f qcow2 -o cluster_size=4k,lazy_refcounts=on,refcount_bits=8 a.qcow2 10M",
        "create -f qcow2 -o compression_type=zstd a.qcow2 1G",
        "create -f qcow2 -o refcount_bits=1 a.qcow2 1G",
        "create -f qcow2 -o refcount_bits=64,cluster_size=512 a.qcow2 100M",
        "create -f qcow2 -o cluster_size=2M a.qcow2 10G",
        "create -f qcow2 a.qcow2 1000",
        "create -f qcow2 a.qcow2 1.5k",
        "create -f qcow2 a.qcow2 0x100000",
        "create -q -f qcow2 a.qcow2 1G",
        "create -f qcow2 -o lazy_refcounts=yes,cluster_size=0x1000 -o refcount_bits=010 a.qcow2 1M",
        "create -f qcow2 -o nolazy_refcounts,nocow=on,extent_size_hint=1M a.qcow2 1M",
        "create -f raw -o nocow=on,preallocation=off,extent_size_hint=0 a.img 1M",
        "create --format=qcow2 -o size=2M a.qcow2",
        "create -f qcow2 a.qcow2 1G -q",
        // -o help, with and without a file name.
        "create -f qcow2 -o help",
        "create -f qcow2 -o help a.qcow2",
        "create -f raw -o ?",
        "create -o help,cluster_size=4k x",
        // Errors before the "Formatting" line.
        "create",
        "create -f qcow2",
        "create a.qcow2",
        "create a.qcow2 1Q",
        "create a.qcow2 1e3",
        "create a.qcow2 99E",
        "create a.qcow2 -1",
        "create -f qcow2 a.qcow2 1G extra",
        "create -f vmdkx a.qcow2 1G",
        "create -Z a 1G",
        "create --foo a 1G",
        "create -f",
        "create --o=x a 1M",
        "create -o foo=1 a.qcow2 1G",
        "create -f raw -o cluster_size=4k a.img 1G",
        "create -f qcow2 -o lazy_refcounts=maybe a.qcow2 1G",
        "create -f qcow2 -o cluster_size=abc a.qcow2 1G",
        "create -f qcow2 -o refcount_bits=abc a.qcow2 1G",
        "create -f qcow2 -o refcount_bits=99999999999999999999 a.qcow2 1G",
        "create -f qcow2 -o nocow a.qcow2 1M",
        "create -f qcow2 -o ,cluster_size=4k a.qcow2 1M",
        "create -f qcow2 -o cluster_size=4k, a.qcow2 1M",
        "create -f qcow2 -o size=2M a.qcow2 3M",
        "create -f raw -b base a.img 1M",
        "create -f raw -F qcow2 a.img 1M",
        "create -f qcow2 -b nonexistent.qcow2 -F qcow2 a.qcow2 1G",
        "create -f qcow2 -b v3.qcow2 a.qcow2 1G",
        "create -f qcow2 -u -b v3.qcow2 a.qcow2 1G",
        "create -f qcow2 -b a.qcow2 -F qcow2 a.qcow2 1G",
        // Errors after it.
        "create -f qcow2 -o cluster_size=3k a.qcow2 1G",
        "create -f qcow2 -o cluster_size=4M a.qcow2 1G",
        "create -f qcow2 -o compat=2 a.qcow2 1G",
        "create -f qcow2 -o refcount_bits=3 a.qcow2 1G",
        "create -f qcow2 -o refcount_bits=128 a.qcow2 1G",
        "create -f qcow2 -o refcount_bits=-1 a.qcow2 1G",
        "create -f qcow2 -o preallocation=xx a.qcow2 1G",
        "create -f raw -o preallocation=xx a.img 1G",
        "create -f raw -o preallocation=metadata a.img 1G",
        "create -f qcow2 -o compression_type=lz a.qcow2 1G",
        "create -f qcow2 -o compat=0.10,refcount_bits=8 a.qcow2 1G",
        "create -f qcow2 -o compat=0.10,lazy_refcounts=on a.qcow2 1G",
        "create -f qcow2 -o compat=0.10,compression_type=zstd a.qcow2 1G",
        "create -f qcow2 -o compat=0.10,extended_l2=on a.qcow2 1G",
        "create -f qcow2 -o extended_l2=on,cluster_size=4k a.qcow2 1G",
        "create -f qcow2 -o extended_l2=on a.qcow2 1G",
        "create -f qcow2 -o extended_l2=on,cluster_size=16k a.qcow2 100G",
        "create -f qcow2 -o extended_l2=on,cluster_size=2M,preallocation=metadata a.qcow2 5G",
        "create -f qcow2 -o extended_l2=on,preallocation=metadata -b v3.qcow2 -F qcow2 a.qcow2 1G",
        "create -f qcow2 -o data_file_raw=on a.qcow2 1G",
        "create -f qcow2 -o backing_fmt=qcow2 a.qcow2 1G",
        "create -f qcow2 -o preallocation=metadata -b v3.qcow2 -F qcow2 a.qcow2 1G",
        "create -f qcow2 -o cluster_size=4k a.qcow2 100T",
        "create -f qcow2 -o cluster_size=512 a.qcow2 10P",
        "create -f raw a.img 1P",
        "create -f qcow2 /nonexistent/a.qcow2 1G",
        "create -f qcow2 -b v3.qcow2 -F qcow2 a.qcow2",
        "create -f qcow2 -u -b v3.qcow2 -F qcow2 a.qcow2 1G",
        "create -f qcow2 -u -b missing.qcow2 -F qcow2 a.qcow2 1G",
        "create -f qcow2 -b missing.qcow2 -F qcow2 a.qcow2 1G",
        "create -f qcow2 -b v3.qcow2 a.qcow2",
    ];
    for case in cases {
        let pair = Pair::from(fixture_dir());
        let args = words(case);
        pair.same_output(&args);
        pair.same_files(&args);
    }
}

#[test]
fn created_images_pass_qemu_check() {
    for opts in [
        "",
        "-o compat=0.10",
        "-o cluster_size=512,refcount_bits=1",
        "-o cluster_size=2M,refcount_bits=64",
        "-o lazy_refcounts=on",
        "-o preallocation=metadata,cluster_size=4k",
        "-o preallocation=falloc",
        "-o preallocation=full",
        "-o compression_type=zstd",
    ] {
        let pair = Pair::new();
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        args.extend(words(opts));
        args.extend(["a.qcow2", "3M"]);
        must(&pair.ox, oxqcow(), &args);
        let check = run_in(&pair.ox, qemu_img(), &words("check a.qcow2"));
        assert_eq!(check.code, 0, "qemu-img check of an image made with {opts:?}: {}{}", check.stdout, check.stderr);
        // Both tools describe it alike.
        must(&pair.qemu, qemu_img(), &args);
        pair.same_output(&words("info --output=json a.qcow2"));
        pair.same_output(&words("check a.qcow2"));
    }
}

#[test]
fn info_matches_qemu() {
    let pair = Pair::from(fixture_dir());
    for image in [
        "v3.qcow2",
        "v2.qcow2",
        "raw.img",
        "small.qcow2",
        "meta.qcow2",
        "zstd.qcow2",
        "data.qcow2",
        "sparse.img",
        "snap.qcow2",
        "dirty.qcow2",
        "corrupt.qcow2",
        "leak.qcow2",
        "overlay.qcow2",
        "absback.qcow2",
        "extl2.qcow2",
        "datafile.qcow2",
    ] {
        pair.same_output(&["info", image]);
        pair.same_output(&["info", "--output=json", image]);
        pair.same_output(&["info", "--backing-chain", image]);
        pair.same_output(&["info", "--backing-chain", "--output", "json", "-U", image]);
    }
    for case in [
        "info -f raw v3.qcow2",
        "info -f qcow2 raw.img",
        "info -f foo v3.qcow2",
        "info --image-opts driver=qcow2,file.filename=v3.qcow2",
        "info --image-opts v3.qcow2",
        "info nonexistent.qcow2",
        "info",
        "info v3.qcow2 v2.qcow2",
        "info --output=xml v3.qcow2",
        "info --out=json --force-share v2.qcow2",
        "info --o=json v2.qcow2",
        "info --f v2.qcow2",
        "info --foo v2.qcow2",
        "info --output",
        "info --help=x v2.qcow2",
    ] {
        pair.same_output(&words(case));
    }
}

#[test]
fn check_matches_qemu() {
    let pair = Pair::from(fixture_dir());
    for image in ["v3.qcow2", "v2.qcow2", "small.qcow2", "meta.qcow2", "data.qcow2", "snap.qcow2", "corrupt.qcow2"] {
        for mode in ["", "--output=json", "-q"] {
            let mut args = vec!["check"];
            args.extend(words(mode));
            args.push(image);
            assert_eq!(pair.same_output(&args).code, 0, "{args:?}");
        }
    }
    // Leaks exit 3, corruptions 2, raw images 63: with the same messages.
    for (image, code) in [("leak.qcow2", 3), ("corruption.qcow2", 2), ("raw.img", 63)] {
        for mode in ["", "--output=json", "-q"] {
            let mut args = vec!["check"];
            args.extend(words(mode));
            args.push(image);
            assert_eq!(pair.same_output(&args).code, code, "{args:?}");
        }
    }
    for case in [
        "check -f raw v3.qcow2",
        "check -r foo v3.qcow2",
        "check -r all -U v3.qcow2",
        "check -T none v3.qcow2",
        "check -T bogus v3.qcow2",
        "check -r all v3.qcow2",
        "check -r leaks --output=json v2.qcow2",
        "check nonexistent",
        "check",
        "check --o=json v3.qcow2",
    ] {
        pair.same_output(&words(case));
    }
}

#[test]
fn check_repairs_like_qemu() {
    for (image, mode, fixed_key) in [
        ("leak.qcow2", "leaks", "leaks-fixed"),
        ("leak.qcow2", "all", "leaks-fixed"),
        ("corruption.qcow2", "all", "corruptions-fixed"),
    ] {
        let pair = Pair::from(fixture_dir());
        let args = ["check", "-r", mode, "--output=json", image];
        let (q, o) = pair.run(&args);
        assert_eq!(o.code, q.code, "{args:?}: {}", o.stderr);
        let qj: serde_json::Value = serde_json::from_str(&q.stdout).unwrap();
        let oj: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
        assert_eq!(oj[fixed_key], qj[fixed_key], "{args:?}");
        for key in ["leaks", "corruptions", "check-errors", "allocated-clusters", "total-clusters"] {
            assert_eq!(oj.get(key), qj.get(key), "{args:?}: {key}");
        }
        // The repaired image is clean for qemu-img too.
        let after = run_in(&pair.ox, qemu_img(), &["check", image]);
        assert_eq!(after.code, 0, "qemu-img check after oxqcow {args:?}: {}{}", after.stdout, after.stderr);
    }
}

#[test]
fn resize_matches_qemu() {
    for case in [
        "resize v3.qcow2 2G",
        "resize v3.qcow2 +1G",
        "resize v2.qcow2 +10M",
        "resize v3.qcow2 +1.5M",
        "resize -q v3.qcow2 +1M",
        "resize v3.qcow2 +0",
        "resize v3.qcow2 100T",
        "resize --preallocation=metadata v3.qcow2 +1M",
        "resize small.qcow2 +1M",
        "resize -f raw raw.img +1",
        "resize raw.img 2M",
        "resize --shrink -f raw raw.img 1000",
        // Refusals.
        "resize v3.qcow2 -- -1G",
        "resize v3.qcow2 1G",
        "resize v3.qcow2 -512M",
        "resize v3.qcow2 1000",
        "resize v3.qcow2 0x1000000",
        "resize raw.img 1M",
        "resize --shrink v3.qcow2 1000",
        "resize v3.qcow2 +1000",
        "resize --shrink v3.qcow2 -8G",
        "resize --shrink v3.qcow2 0",
        "resize v3.qcow2 +8E",
        "resize v3.qcow2 1Q",
        "resize v3.qcow2",
        "resize",
        "resize --preallocation=foo v3.qcow2 +1M",
        "resize --preallocation=full --shrink v3.qcow2 1M",
        "resize --preallocation=full v3.qcow2 +0",
        "resize -f qcow2 raw.img 1M",
        "resize nonexistent 1G",
        "resize -U v3.qcow2 1G",
        // QEMU refuses any new size for a version 2 image with snapshots.
        "resize v2snap.qcow2 2M",
        "resize v2snap.qcow2 1M",
        "amend -o size=2M v2snap.qcow2",
    ] {
        let pair = Pair::from(fixture_dir());
        let args = words(case);
        pair.same_output(&args);
        pair.same_files(&args);
    }
}

#[test]
fn resize_results_agree_with_qemu() {
    // Shrinking and preallocating lay clusters out differently from QEMU;
    // the images must still be consistent and of the requested size.
    for (case, image) in [
        ("resize --shrink data.qcow2 128k", "data.qcow2"),
        ("resize --shrink v3.qcow2 -- -512M", "v3.qcow2"),
        ("resize --preallocation=falloc v3.qcow2 +1M", "v3.qcow2"),
        ("resize --preallocation=full v3.qcow2 +3M", "v3.qcow2"),
        ("resize --shrink meta.qcow2 5M", "meta.qcow2"),
    ] {
        let pair = Pair::from(fixture_dir());
        let args = words(case);
        pair.same_output(&args);
        let check = run_in(&pair.ox, qemu_img(), &["check", image]);
        assert_eq!(check.code, 0, "qemu-img check after {case}: {}{}", check.stdout, check.stderr);
        let q = must(&pair.qemu, qemu_img(), &["info", "--output=json", image]);
        let o = must(&pair.ox, qemu_img(), &["info", "--output=json", image]);
        let qv: serde_json::Value = serde_json::from_str(&q.stdout).unwrap();
        let ov: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
        assert_eq!(ov["virtual-size"], qv["virtual-size"], "{case}");
        let data_q = run_in(&pair.qemu, qemu_io(), &["-r", "-c", "read -P 1 0 128k", image]);
        let data_o = run_in(&pair.ox, qemu_io(), &["-r", "-c", "read -P 1 0 128k", image]);
        assert_eq!(data_o.code, data_q.code, "{case}");
    }
}

#[test]
fn measure_matches_qemu() {
    let pair = Pair::from(fixture_dir());
    let mut cases: Vec<String> = Vec::new();
    for size in ["0", "1", "512", "1000", "64k", "1M", "1G", "100G", "1.5T", "7T"] {
        cases.push(format!("measure --size {size}"));
        cases.push(format!("measure -O qcow2 --size {size}"));
    }
    for cs in ["512", "4k", "64k", "2M"] {
        for bits in ["1", "8", "16", "64"] {
            cases.push(format!("measure -O qcow2 -o cluster_size={cs},refcount_bits={bits} --size 10G"));
        }
        cases.push(format!("measure -O qcow2 -o cluster_size={cs},preallocation=metadata --size 3G"));
    }
    for source in
        ["data.qcow2", "v3.qcow2", "v2.qcow2", "snap.qcow2", "meta.qcow2", "raw.img", "sparse.img", "small.qcow2"]
    {
        for opts in
            ["", "-o cluster_size=4k", "-o compat=0.10", "-o refcount_bits=1,cluster_size=512", "-o backing_file=x"]
        {
            cases.push(format!("measure -O qcow2 {opts} {source}"));
            cases.push(format!("measure -O qcow2 {opts} --output=json {source}"));
        }
        cases.push(format!("measure {source}"));
        cases.push(format!("measure -O raw --output=json {source}"));
    }
    for case in [
        "measure -f raw -O qcow2 data.qcow2",
        "measure -O qcow2 -o extended_l2=on --size 1T",
        "measure -O qcow2 -o preallocation=full --size 1G",
        "measure -O qcow2 -o preallocation=falloc --output=json --size 1G",
        "measure -O qcow2 -o size=5M",
        "measure -O qcow2 -o cluster_size=4k,size=5M --size 1G",
        "measure -O qcow2 -o compat=0.10,lazy_refcounts=on,compression_type=zstd --size 1G",
        "measure",
        "measure --size 1G data.qcow2",
        "measure -f qcow2 --size 1G",
        "measure data.qcow2 v3.qcow2",
        "measure --size 1Q",
        "measure --size -1",
        "measure -O vmdkx --size 1G",
        "measure -o compat=0.10 --size 1G",
        "measure -O qcow2 -o foo=bar --size 1G",
        "measure -O qcow2 -o cluster_size=3k --size 1G",
        "measure -O qcow2 -o compat=2 --size 1G",
        "measure -O qcow2 -o compat=v3 --size 1G",
        "measure -O qcow2 -o compat=0.10,refcount_bits=8 --size 1G",
        "measure -O qcow2 -o preallocation=xx --size 1G",
        "measure -O qcow2 -o refcount_bits=3 --size 1G",
        "measure -O qcow2 -o extended_l2=on,cluster_size=4k --size 1G",
        "measure -O qcow2 -o lazy_refcounts=maybe --size 1G",
        "measure -O qcow2 -o cluster_size=512 --size 10T",
        "measure -O qcow2 -o help --size 1G",
        "measure --o=x",
        "measure --s=x",
    ] {
        cases.push(case.to_string());
    }
    for case in &cases {
        pair.same_output(&words(case));
    }
}

/// A new raw image has its first block allocated, as QEMU allocates it
/// (for alignment probing), so `disk size` / `actual-size` agree.
#[test]
fn raw_create_allocates_the_first_block_as_qemu() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for size in ["1M", "1000", "100"] {
        must(d, qemu_img(), &["create", "-q", "-f", "raw", "q.img", size]);
        must(d, oxqcow(), &["create", "-q", "-f", "raw", "o.img", size]);
        let q = std::fs::metadata(d.join("q.img")).unwrap();
        let o = std::fs::metadata(d.join("o.img")).unwrap();
        assert_eq!((o.len(), o.blocks()), (q.len(), q.blocks()), "size {size}: length and allocated blocks");
    }
}

/// qemu-img parses --image-opts "noisily" (qemu_opts_parse_noisily) and
/// warns about every flag written without `=`; oxqcow's qemu-img commands
/// did not, while its io did.
#[test]
fn image_opts_flags_are_warned_about_as_qemu_img_does() {
    let s = common::Scratch::new();
    s.qemu_ok(&["create", "-q", "-f", "raw", "r.raw", "1M"]);
    for flag in ["read-only", "noread-only", "force-share"] {
        let spec = format!("driver=raw,file.filename=r.raw,{flag}");
        s.assert_same(&["info", "--image-opts", &spec]);
        s.assert_same(&["map", "--image-opts", &spec]);
    }
}
