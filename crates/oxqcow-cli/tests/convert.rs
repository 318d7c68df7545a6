//! `oxqcow convert`: round trips between raw and qcow2 checked with
//! `qemu-img compare` and `qemu-img check`, compactness against qemu-img's
//! own output, existing targets, several sources, and qemu-img's errors.

mod common;

use common::Scratch;

/// Clusters of slack allowed over qemu-img's allocation.
const SLACK: u64 = 65536;

#[test]
fn convert_round_trip_raw_qcow2_raw_qcow2() {
    let s = Scratch::new();
    common::random_raw(&s.path("src.raw"), 24 << 20, 7);
    // A megabyte of zeros written as data, between two of random data.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::options().write(true).open(s.path("src.raw")).unwrap();
        let mut data = vec![0u8; 3 << 20];
        common::Rng::new(3).fill(&mut data[..1 << 20]);
        common::Rng::new(4).fill(&mut data[2 << 20..]);
        f.write_all_at(&data, 15 << 20).unwrap();
    }
    // raw -> qcow2 -> raw -> qcow2 (4k clusters), each step checked.
    s.ours_ok(&["convert", "-O", "qcow2", "src.raw", "1.qcow2"]);
    s.assert_identical("src.raw", "1.qcow2");
    s.assert_clean("1.qcow2");
    s.ours_ok(&["convert", "-O", "raw", "1.qcow2", "2.raw"]);
    s.assert_identical("src.raw", "2.raw");
    s.ours_ok(&["convert", "-O", "qcow2", "-o", "cluster_size=4k", "2.raw", "3.qcow2"]);
    s.assert_identical("src.raw", "3.qcow2");
    s.assert_clean("3.qcow2");
    s.ours_ok(&["convert", "-f", "qcow2", "-O", "qcow2", "3.qcow2", "4.qcow2"]);
    s.assert_identical("src.raw", "4.qcow2");
    s.assert_clean("4.qcow2");

    // As compact as qemu-img's output for the same sources.
    s.qemu_ok(&["convert", "-O", "qcow2", "src.raw", "q1.qcow2"]);
    s.qemu_ok(&["convert", "-O", "raw", "q1.qcow2", "q2.raw"]);
    s.qemu_ok(&["convert", "-O", "qcow2", "-o", "cluster_size=4k", "q2.raw", "q3.qcow2"]);
    s.qemu_ok(&["convert", "-f", "qcow2", "-O", "qcow2", "3.qcow2", "q4.qcow2"]);
    for (ours, theirs) in [("1.qcow2", "q1.qcow2"), ("3.qcow2", "q3.qcow2"), ("4.qcow2", "q4.qcow2")] {
        let (o, q) = (s.data_bytes(ours), s.data_bytes(theirs));
        assert!(o <= q + SLACK, "{ours} maps {o} data bytes, qemu-img's {theirs} {q}");
        let (o, q) = (s.allocated(ours), s.allocated(theirs));
        assert!(o <= q + 4 * SLACK, "{ours} allocates {o} host bytes, qemu-img's {theirs} {q}");
    }
    // The raw copy keeps the holes (qemu-img also allocates the first 4k).
    assert!(s.allocated("2.raw") <= s.allocated("q2.raw") + 4096);
    // No data clusters for zero runs.
    assert_eq!(s.data_bytes_in("src.raw", 16 << 20, 1 << 20), 1 << 20);
    for image in ["1.qcow2", "2.raw", "3.qcow2", "4.qcow2"] {
        assert_eq!(s.data_bytes_in(image, 16 << 20, 1 << 20), 0, "{image} allocated a zero run");
        assert_eq!(s.data_bytes_in(image, 15 << 20, 1 << 20), 1 << 20, "{image} lost data");
    }
}

#[test]
fn convert_options_keep_content() {
    let s = Scratch::new();
    common::random_raw(&s.path("src.raw"), 8 << 20, 99);
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "z.qcow2", "8M"]);
    s.qemu_io(
        "qcow2",
        "z.qcow2",
        &["write -P 1 0 64k", "write -z 128k 64k", "write -P 2 256k 128k", "write -z 256k 64k"],
    );
    let cases: &[&[&str]] = &[
        &["-O", "qcow2", "-W", "-m", "16"],
        &["-O", "qcow2", "-m", "1"],
        &["-O", "qcow2", "-m", "3", "-S", "64k"],
        &["-O", "qcow2", "-o", "compat=0.10"],
        &["-O", "qcow2", "-o", "cluster_size=512,refcount_bits=1"],
        &["-O", "qcow2", "-o", "preallocation=metadata"],
        &["-O", "qcow2", "-o", "preallocation=full"],
        &["-O", "qcow2", "-t", "none", "-T", "writeback", "-U", "-q"],
        &["-O", "raw", "-S", "0"],
        &["-O", "raw", "-W"],
    ];
    for (i, opts) in cases.iter().enumerate() {
        for src in ["src.raw", "z.qcow2"] {
            let out = format!("out{i}-{src}");
            let mut args = vec!["convert"];
            args.extend_from_slice(opts);
            args.push(src);
            args.push(&out);
            let r = s.ours_ok(&args);
            assert_eq!(r.stdout, "", "{args:?} printed {r:?}");
            s.assert_identical(src, &out);
            if opts.contains(&"qcow2") {
                s.assert_clean(&out);
            }
        }
    }
    // In-order writes lay the clusters out as qemu-img does.
    s.qemu_ok(&["convert", "-O", "qcow2", "src.raw", "q.qcow2"]);
    s.ours_ok(&["convert", "-O", "qcow2", "src.raw", "o.qcow2"]);
    assert_eq!(
        s.ours_ok(&["map", "o.qcow2"]).stdout.replace("o.qcow2", "q.qcow2"),
        s.qemu_ok(&["map", "q.qcow2"]).stdout
    );
    // -S 0 allocates everything, on both tools.
    s.qemu_ok(&["convert", "-O", "qcow2", "-S", "0", "src.raw", "qfull.qcow2"]);
    s.ours_ok(&["convert", "-O", "qcow2", "-S", "0", "src.raw", "ofull.qcow2"]);
    assert_eq!(s.data_bytes("ofull.qcow2"), 8 << 20);
    assert_eq!(s.data_bytes("qfull.qcow2"), 8 << 20);
}

#[test]
fn convert_into_existing_targets() {
    let s = Scratch::new();
    common::random_raw(&s.path("src.raw"), 6 << 20, 5);
    for (fmt, opts) in [("qcow2", "compat=1.1"), ("qcow2", "compat=0.10"), ("raw", "")] {
        for who in ["q", "o"] {
            let name = format!("{who}-{fmt}-{opts}");
            let mut args = vec!["create", "-q", "-f", fmt];
            if !opts.is_empty() {
                args.extend(["-o", opts]);
            }
            args.extend([name.as_str(), "7M"]);
            s.qemu_ok(&args);
            s.qemu_io(fmt, &name, &["write -P 0xaa 0 7M"]);
        }
        let (q, o) = (format!("q-{fmt}-{opts}"), format!("o-{fmt}-{opts}"));
        s.qemu_ok(&["convert", "-n", "-O", fmt, "src.raw", &q]);
        s.ours_ok(&["convert", "-n", "-O", fmt, "src.raw", &o]);
        // The old content past the source stays, as with qemu-img.
        s.assert_identical(&q, &o);
        if fmt == "qcow2" {
            s.assert_clean(&o);
            assert!(s.data_bytes(&o) <= s.data_bytes(&q) + SLACK);
        }
    }
    // A target that reads as zeros already.
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "zero.qcow2", "6M"]);
    s.ours_ok(&["convert", "-n", "--target-is-zero", "-O", "qcow2", "src.raw", "zero.qcow2"]);
    s.assert_identical("src.raw", "zero.qcow2");
    s.assert_clean("zero.qcow2");
}

#[test]
fn convert_replaces_existing_files() {
    let s = Scratch::new();
    common::random_raw(&s.path("src.raw"), 6 << 20, 6);
    for fmt in ["qcow2", "raw"] {
        for who in ["q", "o"] {
            let name = format!("{who}.{fmt}");
            s.qemu_ok(&["create", "-q", "-f", fmt, &name, "16M"]);
            s.qemu_io(fmt, &name, &["write -P 0xaa 0 16M"]);
        }
        let (q, o) = (format!("q.{fmt}"), format!("o.{fmt}"));
        s.qemu_ok(&["convert", "-O", fmt, "src.raw", &q]);
        s.ours_ok(&["convert", "-O", fmt, "src.raw", &o]);
        // Nothing of the old file survives: not its data, not its length.
        s.assert_identical("src.raw", &o);
        let len = |n: &str| std::fs::metadata(s.path(n)).unwrap().len();
        assert_eq!(len(&o), len(&q), "{fmt}");
        if fmt == "qcow2" {
            s.assert_clean(&o);
            assert_eq!(s.data_bytes(&o), s.data_bytes(&q));
        }
    }
}

#[test]
fn convert_concatenates_sources() {
    let s = Scratch::new();
    common::random_raw(&s.path("a.raw"), 3 << 20, 1);
    common::random_raw(&s.path("b.raw"), 2 << 20, 2);
    s.qemu_ok(&["convert", "-O", "qcow2", "b.raw", "b.qcow2"]);
    s.qemu_ok(&["convert", "-O", "qcow2", "a.raw", "b.qcow2", "a.raw", "q.qcow2"]);
    s.ours_ok(&["convert", "-O", "qcow2", "a.raw", "b.qcow2", "a.raw", "o.qcow2"]);
    s.assert_identical("q.qcow2", "o.qcow2");
    s.assert_clean("o.qcow2");
    assert_eq!(s.ours_ok(&["compare", "-s", "q.qcow2", "o.qcow2"]).code, 0);
}

#[test]
fn convert_progress_is_qemu_style() {
    let s = Scratch::new();
    common::random_raw(&s.path("src.raw"), 8 << 20, 3);
    let out = s.ours_ok(&["convert", "-p", "-O", "qcow2", "src.raw", "o.qcow2"]).stdout;
    assert!(out.starts_with("    (0.00/100%)\r"), "{out:?}");
    assert!(out.ends_with("    (100.00/100%)\r\n"), "{out:?}");
    let values: Vec<f64> = out
        .trim_end_matches('\n')
        .split_terminator('\r')
        .map(|l| {
            let v = l.strip_prefix("    (").and_then(|l| l.strip_suffix("/100%)")).unwrap_or_else(|| panic!("{l:?}"));
            v.parse().unwrap()
        })
        .collect();
    assert!(values.windows(2).all(|w| w[0] <= w[1]), "progress went backwards: {values:?}");
    // -q silences it.
    assert_eq!(s.ours_ok(&["convert", "-p", "-q", "-O", "qcow2", "src.raw", "o2.qcow2"]).stdout, "");
}

#[test]
fn convert_errors_match_qemu() {
    let s = Scratch::new();
    common::random_raw(&s.path("a.raw"), 1 << 20, 4);
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "small.qcow2", "64k"]);
    for args in [
        &["convert"][..],
        &["convert", "a.raw"],
        &["convert", "-O", "qcow3", "a.raw", "x"],
        &["convert", "missing", "x"],
        &["convert", "-f", "qcow2", "a.raw", "x"],
        &["convert", "-n", "a.raw", "missing-target"],
        &["convert", "-n", "-O", "qcow2", "a.raw", "small.qcow2"],
        &["convert", "-n", "-o", "compat=1.1", "a.raw", "small.qcow2"],
        &["convert", "-S", "100", "a.raw", "x"],
        &["convert", "-S", "abc", "a.raw", "x"],
        &["convert", "-m", "0", "a.raw", "x"],
        &["convert", "-m", "17", "a.raw", "x"],
        &["convert", "-m", "x", "a.raw", "x"],
        &["convert", "-r", "-5", "a.raw", "x"],
        &["convert", "-r", "abc", "a.raw", "x"],
        &["convert", "-C", "-c", "-O", "qcow2", "a.raw", "x"],
        &["convert", "-C", "-S", "4k", "a.raw", "x"],
        &["convert", "-o", "foo=bar", "-O", "qcow2", "a.raw", "x"],
        &["convert", "-o", "cluster_size=3k", "-O", "qcow2", "a.raw", "x"],
        &["convert", "-O", "raw", "-o", "cluster_size=4k", "a.raw", "x"],
        &["convert", "-T", "bogus", "a.raw", "x"],
        &["convert", "--target-is-zero", "a.raw", "x"],
        &["convert", "-z", "a.raw", "x"],
        &["convert", "--foo", "a.raw", "x"],
        &["convert", "-O"],
        &["convert", "-p", "missing", "x"],
        &["convert", "a.raw", "no-such-dir/x"],
        &["convert", "-O", "qcow2", "a.raw", "no-such-dir/x"],
    ] {
        let out = s.assert_same(args);
        assert_eq!(out.code, 1, "{args:?} should fail");
        let _ = std::fs::remove_file(s.path("x"));
    }
}

#[test]
fn convert_refuses_what_it_cannot_do() {
    let s = Scratch::new();
    common::random_raw(&s.path("a.raw"), 1 << 20, 4);
    // A raw source has no bitmaps to copy: qemu-img's refusal.
    let out = s.assert_same(&["convert", "--bitmaps", "-O", "qcow2", "a.raw", "x"]);
    assert_eq!(out.code, 1);
    assert!(!s.path("x").exists(), "convert --bitmaps of a raw source created the target");
}

/// `-t none` / `-T none` (direct I/O) work in convert, check, compare,
/// commit, amend and rebase and give qemu-img's results.
#[test]
fn direct_io_cache_modes_give_the_same_results() {
    let s = Scratch::new();
    common::random_raw(&s.path("src.raw"), 5 << 20, 9);
    for who in ["q", "o"] {
        let name = format!("{who}.qcow2");
        let args = ["convert", "-t", "none", "-T", "none", "-O", "qcow2", "src.raw", &name];
        if who == "q" {
            s.qemu_ok(&args);
        } else {
            s.ours_ok(&args);
        }
    }
    s.assert_identical("q.qcow2", "o.qcow2");
    s.assert_clean("o.qcow2");
    assert_eq!(s.data_bytes("o.qcow2"), s.data_bytes("q.qcow2"));
    s.assert_same(&["check", "-T", "none", "o.qcow2"]);
    s.assert_same(&["check", "-T", "directsync", "--output=json", "o.qcow2"]);
    s.assert_same(&["compare", "-T", "none", "q.qcow2", "o.qcow2"]);
    // commit and amend through direct I/O, each tool on its own chain.
    for who in ["q", "o"] {
        let (base, top) = (format!("{who}-base.qcow2"), format!("{who}-top.qcow2"));
        std::fs::copy(s.path("q.qcow2"), s.path(&base)).unwrap();
        s.qemu_ok(&["create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &top]);
        s.qemu_io("qcow2", &top, &["write -P 0x5c 1000 70000"]);
        let commit = ["commit", "-q", "-t", "none", top.as_str()];
        let amend = ["amend", "-t", "none", "-o", "compat=0.10", top.as_str()];
        let rebase = ["rebase", "-q", "-t", "none", "-T", "directsync", "-b", "", top.as_str()];
        if who == "q" {
            s.qemu_ok(&commit);
            s.qemu_ok(&amend);
            s.qemu_ok(&rebase);
        } else {
            s.ours_ok(&commit);
            s.ours_ok(&amend);
            s.ours_ok(&rebase);
        }
    }
    s.assert_identical("q-top.qcow2", "o-top.qcow2");
    s.assert_identical("q-base.qcow2", "o-base.qcow2");
    s.assert_clean("o-base.qcow2");
    s.qemu_io("qcow2", "o-base.qcow2", &["read -P 0x5c 1000 70000"]);
    s.assert_clean("o-top.qcow2");
    assert!(s.qemu_ok(&["info", "o-top.qcow2"]).stdout.contains("compat: 0.10"));
    assert_eq!(s.data_bytes("o-base.qcow2"), s.data_bytes("q-base.qcow2"));
}

/// `-r` paces the copy (no timing is asserted) without changing what is
/// written.
#[test]
fn rate_limited_convert_writes_the_same_image() {
    let s = Scratch::new();
    common::random_raw(&s.path("src.raw"), 3 << 20, 12);
    s.qemu_ok(&["convert", "-r", "64M", "-O", "qcow2", "src.raw", "q.qcow2"]);
    s.ours_ok(&["convert", "-r", "64M", "-O", "qcow2", "src.raw", "o.qcow2"]);
    s.assert_identical("q.qcow2", "o.qcow2");
    s.assert_clean("o.qcow2");
    assert_eq!(s.data_bytes("o.qcow2"), s.data_bytes("q.qcow2"));
    s.ours_ok(&["convert", "--rate=0", "-O", "raw", "o.qcow2", "o.raw"]);
    s.assert_identical("src.raw", "o.raw");
}

/// `--salvage` copies what cannot be read (here a compressed cluster whose
/// data is damaged) as zeros, one warning per unreadable sector, as
/// qemu-img does; without it the conversion fails.
#[test]
fn salvage_copies_unreadable_sectors_as_zeros() {
    let s = Scratch::new();
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "bad.qcow2", "1M"]);
    s.qemu_io("qcow2", "bad.qcow2", &["write -c -P 0x41 0 64k", "write -P 0x42 64k 64k"]);
    // Damage the compressed data: L1 -> L2 -> first entry's host offset.
    let image = std::fs::read(s.path("bad.qcow2")).unwrap();
    let be = |at: usize| u64::from_be_bytes(image[at..at + 8].try_into().unwrap());
    let l2 = be(be(40) as usize) & 0x00ff_ffff_ffff_fe00;
    let entry = be(l2 as usize);
    assert_ne!(entry & (1 << 62), 0, "the first cluster is not compressed");
    let data = entry & ((1 << 54) - 1);
    common::patch(&s.path("bad.qcow2"), data, &[0xff; 64]);

    let (q, o) = (
        s.qemu(&["convert", "-O", "raw", "bad.qcow2", "q.raw"]),
        s.ours(&["convert", "-O", "raw", "bad.qcow2", "o.raw"]),
    );
    assert_eq!((q.code, o.code), (1, 1), "{q:?} {o:?}");
    for quiet in [false, true] {
        let mut args = vec!["convert", "--salvage", "-O", "raw", "bad.qcow2"];
        if quiet {
            args.push("-q");
        }
        let q = s.qemu_ok(&[&args[..], &["q.raw"]].concat());
        let o = s.ours_ok(&[&args[..], &["o.raw"]].concat());
        assert_eq!(std::fs::read(s.path("q.raw")).unwrap(), std::fs::read(s.path("o.raw")).unwrap());
        let offsets = |stderr: &str| -> Vec<String> {
            stderr
                .lines()
                .map(|l| l.strip_prefix("qemu-img: warning: error while reading offset ").unwrap_or(l))
                .map(|l| l.split(':').next().unwrap().to_string())
                .collect()
        };
        assert_eq!(offsets(&o.stderr), offsets(&q.stderr), "quiet={quiet}");
        assert_eq!(offsets(&o.stderr).len(), if quiet { 0 } else { 128 });
    }
    let raw = std::fs::read(s.path("o.raw")).unwrap();
    assert!(raw[..65536].iter().all(|&b| b == 0) && raw[65536..131072].iter().all(|&b| b == 0x42));
}

/// `-C` (copy offloading) copies data as it is: zeros written in the
/// source stay data in the target, as with qemu-img; raw to raw goes
/// through copy_file_range.
#[test]
fn copy_offloading_matches_qemu() {
    let s = Scratch::new();
    common::random_raw(&s.path("src.raw"), 3 << 20, 13);
    // Zeros written as data in the middle, a hole at the end.
    common::patch(&s.path("src.raw"), 320 << 10, &[0u8; 256 << 10]);
    std::fs::OpenOptions::new().write(true).open(s.path("src.raw")).unwrap().set_len(8 << 20).unwrap();
    for fmt in ["raw", "qcow2"] {
        let (q, o) = (format!("q.{fmt}"), format!("o.{fmt}"));
        s.qemu_ok(&["convert", "-C", "-O", fmt, "src.raw", &q]);
        s.ours_ok(&["convert", "--copy-range-offloading", "-O", fmt, "src.raw", &o]);
        s.assert_identical("src.raw", &o);
        let map = |name: &str| s.qemu_ok(&["map", "--output=json", "-f", fmt, name]).stdout;
        assert_eq!(map(&o), map(&q), "{fmt}");
        if fmt == "qcow2" {
            s.assert_clean(&o);
        }
    }
    // Without -C the zeros become a hole.
    s.ours_ok(&["convert", "-O", "qcow2", "src.raw", "plain.qcow2"]);
    assert!(s.data_bytes("plain.qcow2") < s.data_bytes("o.qcow2"));
}

/// convert joined its `-o` arguments without qemu-img's check, so a bad
/// list reached the option parser ("Invalid parameter ''"); qemu-img
/// refuses it first: "Invalid option list: ,cluster_size=4k".
#[test]
fn option_lists_are_checked_as_qemu_img_checks_them() {
    let s = Scratch::new();
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "src.qcow2", "1M"]);
    for o in [",cluster_size=4k", "cluster_size=4k,", ""] {
        s.assert_same(&["convert", "-O", "qcow2", "-o", o, "src.qcow2", "t.qcow2"]);
    }
    s.assert_same(&[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-o",
        "lazy_refcounts=on",
        "src.qcow2",
        "t.qcow2",
    ]);
    s.assert_same(&["info", "t.qcow2"]);
}

/// -l was split without QemuOpts' warning for flags written without `=`.
#[test]
fn snapshot_params_warn_as_qemu_img_warns() {
    let s = Scratch::new();
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "src.qcow2", "1M"]);
    for l in ["snapshot.id=1,bogus", "snapshot.id=1,nosnapshot.name"] {
        s.assert_same(&["convert", "-l", l, "-O", "raw", "src.qcow2", "t.raw"]);
        s.assert_same(&["measure", "-l", l, "src.qcow2"]);
    }
}

/// The qcow2 file grows ahead of its allocations in large steps while
/// convert writes it (`storage/grow_ahead.rs`); the reserve must be gone
/// when convert ends: the file ends where qemu-img's ends, and QEMU's check
/// reports the same image end and no leak.
#[test]
fn converted_files_end_where_qemu_img_ends_them() {
    let s = Scratch::new();
    common::random_raw(&s.path("src.raw"), 40 << 20, 13);
    // Data filling the middle, so that the file grows past several steps.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::options().write(true).open(s.path("src.raw")).unwrap();
        let mut data = vec![0u8; 12 << 20];
        common::Rng::new(5).fill(&mut data);
        f.write_all_at(&data, 10 << 20).unwrap();
    }
    s.qemu_ok(&["convert", "-O", "qcow2", "src.raw", "src.qcow2"]);
    let end_offset = |image: &str| {
        let o = s.qemu(&["check", "--output=json", image]);
        assert_eq!(o.code, 0, "qemu-img check {image}: {o:?}");
        let v: serde_json::Value = serde_json::from_str(&o.stdout).expect("check json");
        (v["image-end-offset"].as_u64().unwrap(), v["leaks"].as_u64().unwrap_or(0))
    };
    let cases: &[&[&str]] = &[
        &["-f", "raw", "-O", "qcow2", "src.raw"],
        &["-f", "raw", "-O", "qcow2", "-o", "cluster_size=4k", "src.raw"],
        &["-f", "qcow2", "-O", "qcow2", "src.qcow2"],
        &["-f", "raw", "-O", "qcow2", "-t", "none", "-T", "none", "src.raw"],
    ];
    for args in cases {
        let ours = [&args[..], &["ours.qcow2"]].concat();
        let theirs = [&args[..], &["theirs.qcow2"]].concat();
        let _ = std::fs::remove_file(s.path("ours.qcow2"));
        let _ = std::fs::remove_file(s.path("theirs.qcow2"));
        s.ours_ok(&[&["convert"], &ours[..]].concat());
        s.qemu_ok(&[&["convert"], &theirs[..]].concat());
        s.assert_clean("ours.qcow2");
        s.assert_identical("src.raw", "ours.qcow2");
        let len = |name: &str| std::fs::metadata(s.path(name)).unwrap().len();
        assert_eq!(len("ours.qcow2"), len("theirs.qcow2"), "file length after convert {args:?}");
        assert_eq!(end_offset("ours.qcow2"), end_offset("theirs.qcow2"), "check after convert {args:?}");
    }
}
