//! `oxqcow snapshot` and `oxqcow amend` against qemu-img: the same command
//! sequences on copies of the same images print the same lines, exit with
//! the same codes and leave the same images (byte for byte, but for the
//! creation dates of snapshots the two tools took at different moments);
//! every snapshot and the active layer read the same, and `qemu-img check`
//! finds oxqcow's images clean.

mod common;

use std::path::Path;

use common::{must, qemu_img, qemu_io, run_in, words, Outcome, Pair};

/// Replaces every `YYYY-MM-DD HH:MM:SS` by a fixed text, and drops JSON
/// lines with snapshot dates: the two tools create snapshots at different
/// moments.
fn mask_dates(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        if line.contains("\"date-sec\"") || line.contains("\"date-nsec\"") {
            continue;
        }
        let b = line.as_bytes();
        let pattern = b"dddd-dd-dd dd:dd:dd";
        let mut masked = String::new();
        let mut i = 0;
        while i < b.len() {
            let matches = i + pattern.len() <= b.len()
                && pattern.iter().zip(&b[i..]).all(|(p, c)| if *p == b'd' { c.is_ascii_digit() } else { p == c });
            if matches {
                masked.push_str("<date>");
                i += pattern.len();
            } else {
                masked.push(b[i] as char);
                i += 1;
            }
        }
        out.push_str(&masked);
        out.push('\n');
    }
    out
}

fn masked(o: Outcome) -> Outcome {
    Outcome { code: o.code, stdout: mask_dates(&o.stdout), stderr: mask_dates(&o.stderr) }
}

/// Runs both tools and compares their outputs with dates masked.
fn same_masked(pair: &Pair, args: &[&str]) {
    let (q, mut o) = pair.run(args);
    o.stdout = common::same_allocation(&o.stdout, &q.stdout);
    assert_eq!(masked(o), masked(q), "oxqcow and qemu-img differ for {args:?}");
}

/// Byte ranges of the date fields of every snapshot table entry.
fn date_ranges(image: &[u8]) -> Vec<std::ops::Range<usize>> {
    let be32 = |at: usize| u32::from_be_bytes(image[at..at + 4].try_into().unwrap()) as usize;
    let be16 = |at: usize| u16::from_be_bytes(image[at..at + 2].try_into().unwrap()) as usize;
    let count = be32(60);
    let mut pos = u64::from_be_bytes(image[64..72].try_into().unwrap()) as usize;
    let mut out = Vec::new();
    for _ in 0..count {
        out.push(pos + 16..pos + 24);
        let len = 40 + be32(pos + 36) + be16(pos + 12) + be16(pos + 14);
        pos += len.div_ceil(8) * 8;
    }
    out
}

/// The two images are equal byte for byte but for snapshot dates.
fn same_but_dates(a: &Path, b: &Path) {
    let x = std::fs::read(a).unwrap();
    let y = std::fs::read(b).unwrap();
    assert_eq!(x.len(), y.len(), "{} and {} differ in length", a.display(), b.display());
    let dates = date_ranges(&x);
    for (i, (p, q)) in x.iter().zip(&y).enumerate() {
        if p != q {
            assert!(dates.iter().any(|r| r.contains(&i)), "{} differs at byte {i:#x}", b.display());
        }
    }
}

/// Every snapshot and the active layer of `image` read the same in both
/// directories (read by qemu-img).
fn same_content(pair: &Pair, image: &str) {
    let list = run_in(&pair.qemu, qemu_img(), &["info", "--output=json", image]);
    let info: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    let ids: Vec<String> = info["snapshots"]
        .as_array()
        .map(|a| a.iter().map(|s| s["id"].as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    for id in ids {
        let param = format!("snapshot.id={id}");
        let mut raws = Vec::new();
        for d in [&pair.qemu, &pair.ox] {
            must(d, qemu_img(), &["convert", "-l", &param, "-O", "raw", image, "snap.raw"]);
            raws.push(std::fs::read(d.join("snap.raw")).unwrap());
        }
        assert!(raws[0] == raws[1], "snapshot {id} of {image} differs");
    }
    let q = pair.qemu.join(image);
    let o = pair.ox.join(image);
    let cmp = run_in(&pair.ox, qemu_img(), &["compare", q.to_str().unwrap(), o.to_str().unwrap()]);
    assert_eq!(cmp.code, 0, "active layers of {image} differ: {cmp:?}");
    let check = run_in(&pair.ox, qemu_img(), &["check", image]);
    assert_eq!(check.code, 0, "qemu-img check of oxqcow's {image}: {check:?}");
}

#[test]
fn snapshot_sequences_match_qemu() {
    let pair = Pair::new();
    for d in [&pair.qemu, &pair.ox] {
        must(d, qemu_img(), &words("create -q -f qcow2 a.qcow2 64M"));
        must(d, qemu_img(), &words("create -q -f qcow2 -o compat=0.10,cluster_size=4k v2.qcow2 8M"));
        must(d, qemu_img(), &words("create -q -f raw r.img 1M"));
    }
    let io = |cmds: &[&str], image: &str| {
        for d in [&pair.qemu, &pair.ox] {
            let mut args = Vec::new();
            for c in cmds {
                args.push("-c");
                args.push(c);
            }
            args.push(image);
            must(d, qemu_io(), &args);
        }
    };
    for image in ["a.qcow2", "v2.qcow2"] {
        same_masked(&pair, &["snapshot", "-l", image]);
        same_masked(&pair, &["snapshot", "-c", "empty", image]);
        io(&["write -P 1 0 1M", "write -z 2M 64k"], image);
        same_masked(&pair, &["snapshot", "-c", "first", image]);
        io(&["write -P 2 512k 1M", "discard 0 64k"], image);
        same_masked(&pair, &["snapshot", "-c", "first", image]);
        same_masked(&pair, &["snapshot", "-c", "é and a name longer than sixteen bytes", image]);
        same_masked(&pair, &["snapshot", image]);
        same_masked(&pair, &["snapshot", "-q", "-l", image]);
        same_masked(&pair, &["info", image]);
        same_masked(&pair, &["info", "--output=json", image]);
        // apply finds ids first, then names; delete takes names only.
        same_masked(&pair, &["snapshot", "-a", "2", image]);
        same_masked(&pair, &["snapshot", "-a", "first", image]);
        same_masked(&pair, &["snapshot", "-a", "nope", image]);
        same_masked(&pair, &["snapshot", "-d", "nope", image]);
        same_masked(&pair, &["snapshot", "-d", "1", image]);
        same_masked(&pair, &["snapshot", "-d", "first", image]);
        io(&["write -P 3 3M 100k"], image);
        same_masked(&pair, &["snapshot", "-c", "after", image]);
        same_masked(&pair, &["snapshot", "-d", "empty", image]);
        same_masked(&pair, &["snapshot", "-l", image]);
        same_masked(&pair, &["check", image]);
        same_masked(&pair, &["map", "--output=json", image]);
        same_masked(&pair, &["compare", "-f", "qcow2", "-F", "qcow2", image, image]);
        same_content(&pair, image);
        same_but_dates(&pair.qemu.join(image), &pair.ox.join(image));
    }
    // Snapshots of different sizes, applied and deleted, with compressed
    // clusters: the snapshot trees' COPIED flags are rewritten as QEMU
    // rewrites them, and freed clusters are given back.
    let both = |args: &[&str]| {
        for d in [&pair.qemu, &pair.ox] {
            must(d, qemu_img(), args);
        }
    };
    both(&words("create -q -f qcow2 c.qcow2 64M"));
    io(&["write -P 1 0 1M"], "c.qcow2");
    same_masked(&pair, &words("snapshot -c s1 c.qcow2"));
    both(&words("resize -q c.qcow2 128M"));
    io(&["write -P 2 100M 1M"], "c.qcow2");
    same_masked(&pair, &words("snapshot -c s2 c.qcow2"));
    same_masked(&pair, &words("snapshot -a s1 c.qcow2"));
    same_masked(&pair, &words("info c.qcow2"));
    same_masked(&pair, &words("snapshot -a s2 c.qcow2"));
    both(&words("resize -q --shrink c.qcow2 32M"));
    same_masked(&pair, &words("snapshot -a s2 c.qcow2"));
    same_masked(&pair, &words("snapshot -d s1 c.qcow2"));
    same_masked(&pair, &words("snapshot -c s3 c.qcow2"));
    io(&["write -P 5 0 64k", "write -c -P 6 50M 64k"], "c.qcow2");
    same_masked(&pair, &words("snapshot -a s3 c.qcow2"));
    same_masked(&pair, &words("snapshot -d s2 c.qcow2"));
    same_masked(&pair, &words("info c.qcow2"));
    same_masked(&pair, &words("check c.qcow2"));
    same_content(&pair, "c.qcow2");
    same_but_dates(&pair.qemu.join("c.qcow2"), &pair.ox.join("c.qcow2"));

    for args in [
        "snapshot",
        "snapshot a.qcow2 b",
        "snapshot -l -c x a.qcow2",
        "snapshot -a x -d y a.qcow2",
        "snapshot -c",
        "snapshot -x a.qcow2",
        "snapshot --f a.qcow2",
        "snapshot -U -c x a.qcow2",
        "snapshot -U -l a.qcow2",
        "snapshot --image-opts -f qcow2 -l a.qcow2",
        "snapshot --image-opts -l driver=qcow2,file.filename=a.qcow2",
        "snapshot --object foo -l a.qcow2",
        "snapshot --object secret,id=s -l a.qcow2",
        "snapshot -l nonexistent.qcow2",
        "snapshot -f raw -l r.img",
        "snapshot -f raw -c x r.img",
        "snapshot -f raw -a x r.img",
        "snapshot -f raw -d x r.img",
        "snapshot -c x r.img",
        "snapshot -h",
    ] {
        same_masked(&pair, &words(args));
    }
}

/// Images made by qemu-img, amended through both tools.
fn amend_fixtures() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let q = qemu_img();
    let data = ["-c", "write -P 7 0 300000", "-c", "write -z 1M 128k", "-c", "write -P 9 3M 64k"];
    for (name, opts) in [
        ("v3.qcow2", "compat=1.1"),
        ("v2.qcow2", "compat=0.10"),
        ("small.qcow2", "cluster_size=4k,refcount_bits=8"),
        ("lazy.qcow2", "lazy_refcounts=on"),
        ("snap.qcow2", "compat=1.1"),
    ] {
        must(d, q, &["create", "-q", "-f", "qcow2", "-o", opts, name, "64M"]);
        let mut args = data.to_vec();
        args.push(name);
        must(d, qemu_io(), &args);
    }
    must(d, q, &words("snapshot -c s snap.qcow2"));
    must(d, qemu_io(), &["-c", "write -z 0 64k", "-c", "write -P 3 200000 1000", "snap.qcow2"]);
    must(d, q, &words("create -q -f qcow2 -b v3.qcow2 -F qcow2 overlay.qcow2"));
    must(d, q, &words("create -q -f raw r.img 1M"));
    dir
}

#[test]
fn amend_sequences_match_qemu() {
    let fixtures = amend_fixtures();
    let sequences: &[(&str, &[&str])] = &[
        ("v3.qcow2", &["-p -o compat=0.10", "-p -o compat=1.1", "-o lazy_refcounts=on", "-p -o refcount_bits=8"]),
        ("v3.qcow2", &["-o refcount_bits=1", "-o refcount_bits=64", "-p -o compat=0.10,refcount_bits=16"]),
        ("v3.qcow2", &["-o size=128M", "-o size=1000", "-o size=32M", "-o size=0", "-o compat=v2"]),
        ("v2.qcow2", &["-o lazy_refcounts=on", "-o refcount_bits=8", "-p -o compat=v3,lazy_refcounts=on"]),
        ("small.qcow2", &["-p -o refcount_bits=2", "-o refcount_bits=16", "-p -o compat=0.10"]),
        ("lazy.qcow2", &["-o compat=0.10", "-o lazy_refcounts=off", "-p -q -o compat=0.10"]),
        ("snap.qcow2", &["-o refcount_bits=8", "-p -o lazy_refcounts=on", "-o size=128M", "-o compat=0.10"]),
        (
            "overlay.qcow2",
            &["-o backing_file=v3.qcow2", "-o backing_file=v3.qcow2,backing_fmt=qcow2", "-o backing_fmt=raw"],
        ),
    ];
    for (image, steps) in sequences {
        let pair = Pair::from(fixtures.path());
        for step in *steps {
            let mut args = vec!["amend"];
            args.extend(words(step));
            args.push(image);
            pair.same_output(&args);
            pair.same_output(&["check", image]);
        }
        pair.same_output(&["info", image]);
        pair.same_files(&[image]);
    }
    // Shrinking an image that has snapshots.
    let pair = Pair::from(fixtures.path());
    pair.same_output(&words("amend -o size=32M snap.qcow2"));
    pair.same_output(&words("check snap.qcow2"));
    same_content(&pair, "snap.qcow2");
    pair.same_files(&["amend -o size=32M snap.qcow2"]);

    // Downgrading expands a zero cluster that the snapshot shares: qemu-img
    // 10 writes the zeros into the shared cluster (the snapshot's content
    // changes) and sets COPIED on it; oxqcow zeroes a new cluster. Same
    // output, same active layer, and the snapshot keeps its content.
    let pair = Pair::from(fixtures.path());
    must(&pair.ox, qemu_img(), &words("convert -l s -O raw snap.qcow2 before.raw"));
    pair.same_output(&words("amend -p -o compat=0.10 snap.qcow2"));
    must(&pair.ox, qemu_img(), &words("convert -l s -O raw snap.qcow2 after.raw"));
    let check = run_in(&pair.ox, qemu_img(), &["check", "snap.qcow2"]);
    assert_eq!(check.code, 0, "{check:?}");
    assert!(std::fs::read(pair.ox.join("before.raw")).unwrap() == std::fs::read(pair.ox.join("after.raw")).unwrap());
    let (q, o) = (pair.qemu.join("snap.qcow2"), pair.ox.join("snap.qcow2"));
    let cmp = run_in(&pair.ox, qemu_img(), &["compare", q.to_str().unwrap(), o.to_str().unwrap()]);
    assert_eq!(cmp.code, 0, "{cmp:?}");

    let pair = Pair::from(fixtures.path());
    for args in [
        "amend",
        "amend v3.qcow2",
        "amend -o help",
        "amend -o help v3.qcow2",
        "amend -p -o help v3.qcow2",
        "amend -f qcow2 -o help",
        "amend -f raw -o help",
        "amend -f foo -o help",
        "amend -o compat=2 v3.qcow2",
        "amend -p -o compat=2 v3.qcow2",
        "amend -o cluster_size=4k v3.qcow2",
        "amend -o preallocation=full v3.qcow2",
        "amend -o compression_type=zstd v3.qcow2",
        "amend -o encrypt.format=luks v3.qcow2",
        "amend -o cluster_size=4k,foo=1 v3.qcow2",
        "amend -o nocow=on v3.qcow2",
        "amend -o foo=bar v3.qcow2",
        "amend -p -o foo=1 v3.qcow2",
        "amend -o lazy_refcounts=maybe v3.qcow2",
        "amend -o refcount_bits=3 v3.qcow2",
        "amend -o refcount_bits=abc v3.qcow2",
        "amend -o size=abc v3.qcow2",
        "amend -o backing_file=x v3.qcow2",
        "amend -o data_file=x v3.qcow2",
        "amend -o data_file_raw=on v3.qcow2",
        "amend -o encrypt.state=active v3.qcow2",
        "amend -o refcount_bits=3,data_file=x v3.qcow2",
        "amend -o compat=0.10,lazy_refcounts=on v3.qcow2",
        "amend -f raw -o size=2M r.img",
        "amend -o size=2M r.img",
        "amend -t foo -o compat=1.1 v3.qcow2",
        "amend -o compat=1.1 v3.qcow2 extra",
        "amend -o compat=1.1 nonexistent.qcow2",
        "amend -o ,foo v3.qcow2",
        "amend --o x v3.qcow2",
        "amend --f x v3.qcow2",
        "amend --object foo -o compat=1.1 v3.qcow2",
        "amend --image-opts -o compat=0.10 driver=qcow2,file.filename=v3.qcow2",
        "amend -h",
    ] {
        pair.same_output(&words(args));
    }
    pair.same_files(&["amend error cases"]);
}

#[test]
fn convert_and_measure_from_snapshots_match_qemu() {
    let pair = Pair::new();
    for d in [&pair.qemu, &pair.ox] {
        must(d, qemu_img(), &words("create -q -f qcow2 a.qcow2 64M"));
        must(d, qemu_io(), &["-c", "write -P 1 0 1M", "a.qcow2"]);
        must(d, qemu_img(), &words("snapshot -c s1 a.qcow2"));
        must(d, qemu_io(), &["-c", "write -P 2 0 512k", "-c", "write -z 2M 64k", "a.qcow2"]);
        // The snapshots are read through the active size, as in QEMU.
        must(d, qemu_img(), &words("resize -q a.qcow2 128M"));
        must(d, qemu_img(), &words("snapshot -c s2 a.qcow2"));
        must(d, qemu_io(), &["-c", "write -P 3 100M 1M", "a.qcow2"]);
        must(d, qemu_img(), &words("create -q -f raw r.img 1M"));
    }
    for l in [
        "s1",
        "1",
        "s2",
        "snapshot.name=s1",
        "snapshot.id=1",
        "snapshot.id=2,snapshot.name=s2",
        "snapshot.id=1,snapshot.name=s2",
        "nope",
        "snapshot.name=nope",
        "snapshot.id=",
        "snapshot.foo=1",
    ] {
        // measure reads the same snapshot views (and fails the same way).
        pair.same_output(&["measure", "-l", l, "-O", "qcow2", "a.qcow2"]);
        pair.same_output(&["measure", "-l", l, "-O", "raw", "--output=json", "a.qcow2"]);
        for fmt in ["raw", "qcow2"] {
            let out = format!("out.{fmt}");
            pair.same_output(&["convert", "-l", l, "-O", fmt, "a.qcow2", &out]);
            pair.same_file_names(&["convert", "-l", l]);
            if pair.qemu.join(&out).exists() {
                let (q, o) = (pair.qemu.join(&out), pair.ox.join(&out));
                let cmp = run_in(&pair.ox, qemu_img(), &["compare", q.to_str().unwrap(), o.to_str().unwrap()]);
                assert_eq!(cmp.code, 0, "-l {l} -O {fmt}: {cmp:?}");
                if fmt == "raw" {
                    assert!(std::fs::read(&q).unwrap() == std::fs::read(&o).unwrap(), "-l {l}: raw output differs");
                }
                for d in [&pair.qemu, &pair.ox] {
                    std::fs::remove_file(d.join(&out)).unwrap();
                }
            }
        }
    }
    for args in [
        "convert -l s1 -O raw a.qcow2 a.qcow2 out.raw",
        "convert -l s1 -O raw r.img out.raw",
        "measure -l s1 r.img",
        "measure -l s1 --size 1G",
    ] {
        pair.same_output(&words(args));
    }
}
