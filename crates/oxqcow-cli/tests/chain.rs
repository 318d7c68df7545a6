//! Backing chains against QEMU: `map` and `compare` on chains, `convert`
//! from chained sources and onto a backing file (`-B`), `commit` and
//! `rebase` run by both tools on copies of the same 3-deep chains (raw and
//! qcow2 layers mixed), and `--forbid-backing`.

mod common;

use common::{Out, Scratch};

/// The layers of the test chains, top first.
const LAYERS: &[&str] = &["top.qcow2", "mid.qcow2", "base"];

/// Builds a 3-deep chain in `dir`: `base` (raw, or a qcow2 image with
/// compressed clusters when `qcow2_base`), `mid.qcow2` (4 KiB clusters, or
/// a version 2 image) and `top.qcow2` (larger than the rest). Some data in
/// the upper layers repeats what lies below, zeros cover backing data, and
/// the top grows past its backing file.
fn chain(s: &Scratch, dir: &str, qcow2_base: bool) {
    std::fs::create_dir_all(s.path(dir)).unwrap();
    let p = |name: &str| format!("{dir}/{name}");
    let base = p("base");
    let base_fmt = if qcow2_base { "qcow2" } else { "raw" };
    if qcow2_base {
        common::random_raw(&s.path(&format!("{dir}/seed.raw")), 4 << 20, 21);
        s.qemu_io("raw", &p("seed.raw"), &["write -P 1 0 1M", "write -P 2 3M 512k", "write -P 0 2M 64k"]);
        s.qemu_ok(&["convert", "-c", "-f", "raw", "-O", "qcow2", &p("seed.raw"), &base]);
        std::fs::remove_file(s.path(&p("seed.raw"))).unwrap();
    } else {
        s.qemu_ok(&["create", "-q", "-f", "raw", &base, "4M"]);
        s.qemu_io("raw", &base, &["write -P 1 0 1M", "write -P 2 3M 512k", "write -P 0 2M 64k"]);
    }
    let mid_opts = if qcow2_base { "compat=0.10" } else { "cluster_size=4k" };
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "-o", mid_opts, "-b", "base", "-F", base_fmt, &p("mid.qcow2")]);
    s.qemu_io(
        "qcow2",
        &p("mid.qcow2"),
        &["write -P 3 512k 1M", "write -z 3M 64k", "write -P 1 0 64k", "write -P 7 3900k 12k"],
    );
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", &p("top.qcow2"), "6M"]);
    s.qemu_io(
        "qcow2",
        &p("top.qcow2"),
        &[
            "write -P 4 1M 64k",
            "write -P 5 5M 64k",
            "write -z 128k 64k",
            "write -P 3 512k 64k",
            "write -P 6 3100k 4k",
            "write -z 3200k 256k",
        ],
    );
}

/// What an image allocates where (qemu-img's map without host offsets,
/// runs of the same kind merged).
fn allocation(s: &Scratch, image: &str) -> Vec<(u64, u64, String)> {
    let map = s.qemu_ok(&["map", "-U", "--output=json", image]).stdout;
    let extents: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    let mut runs: Vec<(u64, u64, String)> = Vec::new();
    for e in extents {
        let kind = format!(
            "depth {} present {} zero {} data {} compressed {}",
            e["depth"], e["present"], e["zero"], e["data"], e["compressed"]
        );
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        match runs.last_mut() {
            Some(last) if last.2 == kind && last.0 + last.1 == start => last.1 += len,
            _ => runs.push((start, len, kind)),
        }
    }
    runs
}

/// An image's map (qemu-img's JSON) without host offsets.
fn own_map(s: &Scratch, image: &str) -> String {
    let map = s.qemu_ok(&["map", "--output=json", image]).stdout;
    let mut extents: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    for e in &mut extents {
        e.as_object_mut().unwrap().remove("offset");
    }
    serde_json::to_string_pretty(&extents).unwrap()
}

/// The bytes of an image's own compressed and uncompressed data clusters
/// (from qemu-img's map).
fn compressed_bytes(s: &Scratch, image: &str) -> (u64, u64) {
    let map = s.qemu_ok(&["map", "--output=json", image]).stdout;
    let extents: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    let (mut compressed, mut plain) = (0, 0);
    for e in extents.iter().filter(|e| e["depth"] == 0 && e["data"] == true) {
        let len = e["length"].as_u64().unwrap();
        if e["compressed"] == true {
            compressed += len;
        } else {
            plain += len;
        }
    }
    (compressed, plain)
}

/// Both chain flavours, each in its own directory.
const CHAINS: &[(&str, bool)] = &[("rawbase", false), ("qbase", true)];

/// Bytes of a file.
fn bytes(s: &Scratch, name: &str) -> Vec<u8> {
    std::fs::read(s.path(name)).unwrap()
}

#[test]
fn map_on_chains_matches_qemu() {
    let s = Scratch::new();
    for &(dir, qbase) in CHAINS {
        chain(&s, dir, qbase);
        let abs = s.path(&format!("{dir}/top.qcow2")).to_string_lossy().into_owned();
        for image in [format!("{dir}/top.qcow2"), format!("{dir}/mid.qcow2"), abs] {
            for output in ["--output=human", "--output=json"] {
                s.assert_same(&["map", output, &image]);
                s.assert_same(&["map", output, "--start-offset", "1M", "--max-length", "3M", &image]);
            }
        }
        // A flat copy maps at depth 0 only.
        s.ours_ok(&["convert", "-O", "qcow2", &format!("{dir}/top.qcow2"), &format!("{dir}/flat.qcow2")]);
        s.assert_same(&["map", "--output=json", &format!("{dir}/flat.qcow2")]);
    }
    // The human map of the raw-based chain names all three files.
    let out = s.ours_ok(&["map", "rawbase/top.qcow2"]).stdout;
    for layer in ["rawbase/top.qcow2", "rawbase/mid.qcow2", "rawbase/base"] {
        assert!(out.lines().any(|l| l.ends_with(layer)), "{layer} missing from {out}");
    }
    // A missing layer is reported as qemu-img reports it.
    std::fs::rename(s.path("rawbase/base"), s.path("rawbase/base.away")).unwrap();
    let o = s.assert_same(&["map", "rawbase/top.qcow2"]);
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("Could not open backing file: Could not open backing file: "), "{o:?}");
    s.assert_same(&["compare", "rawbase/top.qcow2", "rawbase/top.qcow2"]);
}

#[test]
fn compare_on_chains_matches_qemu() {
    let s = Scratch::new();
    for &(dir, qbase) in CHAINS {
        chain(&s, dir, qbase);
        let f = |n: &str| format!("{dir}/{n}");
        s.qemu_ok(&["convert", "-O", "raw", &f("top.qcow2"), &f("flat.raw")]);
        s.qemu_ok(&["convert", "-O", "qcow2", &f("top.qcow2"), &f("flat.qcow2")]);
        let pairs = [
            (f("top.qcow2"), f("flat.raw")),
            (f("top.qcow2"), f("flat.qcow2")),
            (f("top.qcow2"), f("top.qcow2")),
            (f("top.qcow2"), f("mid.qcow2")),
            (f("mid.qcow2"), f("base")),
            (f("mid.qcow2"), f("top.qcow2")),
        ];
        for (a, b) in &pairs {
            for strict in [false, true] {
                let mut args = vec!["compare"];
                if strict {
                    args.push("-s");
                }
                args.extend([a.as_str(), b.as_str()]);
                s.assert_same(&args);
            }
        }
    }
}

#[test]
fn convert_reads_through_chains() {
    let s = Scratch::new();
    for &(dir, qbase) in CHAINS {
        chain(&s, dir, qbase);
        let f = |n: &str| format!("{dir}/{n}");
        s.qemu_ok(&["convert", "-O", "raw", &f("top.qcow2"), &f("q.raw")]);
        for (fmt, out) in [("raw", f("o.raw")), ("qcow2", f("o.qcow2"))] {
            s.ours_ok(&["convert", "-O", fmt, &f("top.qcow2"), &out]);
            s.assert_identical(&f("q.raw"), &out);
        }
        assert_eq!(bytes(&s, &f("q.raw")), bytes(&s, &f("o.raw")));
        s.assert_clean(&f("o.qcow2"));
        s.assert_same(&["map", "--output=json", &f("o.qcow2")]);
    }
}

/// Guest offsets of the clusters (of `cs` bytes) the image at `name`
/// allocates itself (depth 0, present), from qemu-img's map.
fn own_clusters(s: &Scratch, name: &str, cs: u64) -> Vec<u64> {
    let o = s.qemu_ok(&["map", "--output=json", name]).stdout;
    let v: serde_json::Value = serde_json::from_str(&o).unwrap();
    let mut out = Vec::new();
    for e in v.as_array().unwrap() {
        if e["depth"] == 0 && e["present"] == true {
            let start = e["start"].as_u64().unwrap();
            let end = start + e["length"].as_u64().unwrap();
            let mut c = start / cs * cs;
            while c < end {
                out.push(c);
                c += cs;
            }
        }
    }
    out.dedup();
    out
}

/// Checks that `target` (an overlay of `backing`) reads as `source` and
/// allocates exactly the clusters where `source` differs from `backing`.
fn check_overlay(s: &Scratch, source: &str, backing: &str, target: &str, cs: u64) {
    s.assert_identical(source, target);
    s.assert_clean(target);
    let src_raw = format!("{target}.src.raw");
    let bk_raw = format!("{target}.bk.raw");
    s.qemu_ok(&["convert", "-O", "raw", source, &src_raw]);
    s.qemu_ok(&["convert", "-O", "raw", backing, &bk_raw]);
    let src = bytes(s, &src_raw);
    let mut bk = bytes(s, &bk_raw);
    bk.resize(src.len(), 0);
    let differing: Vec<u64> = (0..src.len() as u64)
        .step_by(cs as usize)
        .filter(|&c| {
            let end = (c + cs).min(src.len() as u64) as usize;
            src[c as usize..end] != bk[c as usize..end]
        })
        .collect();
    assert!(!differing.is_empty());
    assert_eq!(own_clusters(s, target, cs), differing, "{target} allocates other clusters than those that differ");
}

#[test]
fn convert_onto_a_backing_file_writes_only_differences() {
    let s = Scratch::new();
    for &(dir, qbase) in CHAINS {
        chain(&s, dir, qbase);
        let f = |n: &str| format!("{dir}/{n}");
        s.qemu_ok(&["convert", "-O", "raw", &f("top.qcow2"), &f("flat.raw")]);
        // From a flat copy, from the chain itself, compressed, with one worker,
        // with 4 KiB clusters, and onto the base two levels down.
        let cases: &[(&[&str], &str, &str, u64)] = &[
            (&[], "flat.raw", "mid.qcow2", 65536),
            (&[], "top.qcow2", "mid.qcow2", 65536),
            (&["-c"], "flat.raw", "mid.qcow2", 65536),
            (&["-m", "1", "-o", "cluster_size=4k"], "top.qcow2", "mid.qcow2", 4096),
            (&["-c", "-o", "compression_type=zstd,cluster_size=4k"], "top.qcow2", "base", 4096),
            (&["-W", "-S", "0"], "flat.raw", "base", 65536),
            (&["-o", "compat=0.10"], "flat.raw", "mid.qcow2", 65536),
        ];
        for (i, (extra, src, backing, cs)) in cases.iter().enumerate() {
            let target = f(&format!("b{i}.qcow2"));
            let fmt = if *backing == "base" && !qbase { "raw" } else { "qcow2" };
            let mut args = vec!["convert", "-O", "qcow2", "-B", backing, "-F", fmt];
            args.extend_from_slice(extra);
            let source = f(src);
            args.extend([source.as_str(), target.as_str()]);
            s.ours_ok(&args);
            check_overlay(&s, &f("flat.raw"), &f(backing), &target, *cs);
            let info = s.qemu_ok(&["info", "--output=json", &target]).stdout;
            let v: serde_json::Value = serde_json::from_str(&info).unwrap();
            assert_eq!(v["backing-filename"], *backing, "{info}");
            assert_eq!(v["backing-filename-format"], fmt, "{info}");
        }
        // Into an existing overlay (-n): the same result.
        s.qemu_ok(&["create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", &f("n.qcow2"), "6M"]);
        s.ours_ok(&["convert", "-n", "-O", "qcow2", "-B", "mid.qcow2", "-F", "qcow2", &f("flat.raw"), &f("n.qcow2")]);
        check_overlay(&s, &f("flat.raw"), &f("mid.qcow2"), &f("n.qcow2"), 65536);
        // qemu-img's result reads the same.
        s.qemu_ok(&["convert", "-O", "qcow2", "-B", "mid.qcow2", "-F", "qcow2", &f("flat.raw"), &f("q.qcow2")]);
        s.assert_identical(&f("q.qcow2"), &f("b0.qcow2"));
    }
}

#[test]
fn convert_backing_errors_match_qemu() {
    let s = Scratch::new();
    chain(&s, "c", false);
    s.qemu_ok(&["convert", "-O", "raw", "c/top.qcow2", "flat.raw"]);
    for args in [
        &["convert", "-O", "qcow2", "-B", "c/mid.qcow2", "flat.raw", "x"][..],
        &["convert", "-O", "raw", "-B", "c/mid.qcow2", "-F", "qcow2", "flat.raw", "x"],
        &["convert", "-O", "qcow2", "-B", "c/mid.qcow2", "-F", "qcow2", "flat.raw", "flat.raw", "x"],
        &["convert", "-O", "qcow2", "-F", "qcow2", "flat.raw", "x"],
        &["convert", "-O", "qcow2", "-B", "nothere.qcow2", "-F", "qcow2", "flat.raw", "x"],
        &["convert", "-O", "qcow2", "-o", "backing_file=c/mid.qcow2", "flat.raw", "x"],
    ] {
        let out = s.assert_same(args);
        assert_eq!(out.code, 1, "{args:?} should fail");
        let _ = std::fs::remove_file(s.path("x"));
    }
}

/// Runs `args` (where `{d}` stands for the chain directory) with qemu-img
/// on the chain in `q/` and with oxqcow on the copy in `o/`, asserts the
/// same exit code and messages, then that every layer reads the same in
/// both directories and that the qcow2 layers are clean. Returns oxqcow's
/// output.
fn same_on_copies(s: &Scratch, qbase: bool, args: &[&str]) -> Out {
    for dir in ["q", "o"] {
        let _ = std::fs::remove_dir_all(s.path(dir));
        chain(s, dir, qbase);
    }
    s.qemu_ok(&["convert", "-O", "raw", "q/top.qcow2", "before.raw"]);
    let with = |d: &str| -> Vec<String> { args.iter().map(|a| a.replace("{d}", d)).collect() };
    let (qa, oa) = (with("q"), with("o"));
    let q = s.qemu(&qa.iter().map(String::as_str).collect::<Vec<_>>());
    let o = s.ours(&oa.iter().map(String::as_str).collect::<Vec<_>>());
    let strip = |t: &str| {
        // Progress lines differ (qemu-img's come from its block job); the
        // rest must not.
        t.split('\n').map(|l| l.rsplit('\r').next().unwrap_or(l)).collect::<Vec<_>>().join("\n").replace("o/", "q/")
    };
    assert_eq!(o.code, q.code, "{args:?}: ours {o:?}, qemu-img {q:?}");
    assert_eq!(strip(&o.stdout), strip(&q.stdout), "{args:?}");
    assert_eq!(o.stderr.replace("o/", "q/"), q.stderr, "{args:?}");
    for layer in LAYERS {
        let (qf, of) = (format!("q/{layer}"), format!("o/{layer}"));
        let base_fmt = if qbase { "qcow2" } else { "raw" };
        let fmt = if *layer == "base" { base_fmt } else { "qcow2" };
        let c = s.qemu(&["compare", "-f", fmt, "-F", fmt, &qf, &of]);
        assert_eq!(c.stdout, "Images are identical.\n", "{args:?}: {layer} differs: {c:?}");
        if fmt == "qcow2" {
            s.assert_clean(&of);
        }
        let (qi, oi) =
            (s.qemu_ok(&["info", "-U", "--output=json", &qf]), s.qemu_ok(&["info", "-U", "--output=json", &of]));
        let field = |out: &str, key: &str| serde_json::from_str::<serde_json::Value>(out).unwrap()[key].clone();
        for key in ["backing-filename", "backing-filename-format", "virtual-size"] {
            assert_eq!(field(&oi.stdout, key), field(&qi.stdout, key), "{args:?}: {layer} {key}");
        }
    }
    o
}

#[test]
fn commit_matches_qemu() {
    let s = Scratch::new();
    for &(_, qbase) in CHAINS {
        for args in [
            &["commit", "{d}/top.qcow2"][..],
            &["commit", "-d", "{d}/top.qcow2"],
            &["commit", "-q", "{d}/mid.qcow2"],
            &["commit", "-b", "base", "{d}/top.qcow2"],
            &["commit", "-b", "mid.qcow2", "-p", "{d}/top.qcow2"],
            &["commit", "--base=base", "--drop", "-t", "none", "-r", "1G", "{d}/top.qcow2"],
            &["commit", "-f", "qcow2", "{d}/top.qcow2"],
        ] {
            let o = same_on_copies(&s, qbase, args);
            assert_eq!(o.code, 0);
            // Committing keeps what the top image shows.
            s.assert_identical("before.raw", "o/top.qcow2");
            // Every layer allocates what qemu-img's does (zeros past the
            // end of a shorter layer are committed as zero clusters); only
            // the order of the host clusters may differ.
            for layer in ["top.qcow2", "mid.qcow2"].iter().chain(qbase.then_some(&"base")) {
                let (q, o) = (allocation(&s, &format!("q/{layer}")), allocation(&s, &format!("o/{layer}")));
                assert_eq!(o, q, "{args:?}: {layer}");
            }
        }
        for args in [
            &["commit", "{d}/base"][..],
            &["commit", "-f", "raw", "{d}/top.qcow2"],
            &["commit", "-b", "nothere", "{d}/top.qcow2"],
            &["commit", "-b", "top.qcow2", "{d}/top.qcow2"],
            &["commit", "-b", "{d}/base", "{d}/top.qcow2"],
            &["commit", "{d}/nothere.qcow2"],
            &["commit", "-t", "bogus", "{d}/top.qcow2"],
            &["commit", "-r", "abc", "{d}/top.qcow2"],
            &["commit", "-r", "-1", "{d}/top.qcow2"],
            &["commit"],
            &["commit", "{d}/top.qcow2", "{d}/mid.qcow2"],
            &["commit", "-x", "{d}/top.qcow2"],
        ] {
            let o = same_on_copies(&s, qbase, args);
            assert_eq!(o.code, 1, "{args:?}");
            assert_eq!(o.stdout, "");
        }
    }
}

#[test]
fn rebase_matches_qemu() {
    let s = Scratch::new();
    for &(_, qbase) in CHAINS {
        let base_fmt = if qbase { "qcow2" } else { "raw" };
        for args in [
            &["rebase", "-b", "base", "-F", base_fmt, "{d}/top.qcow2"][..],
            &["rebase", "-b", "", "{d}/top.qcow2"],
            &["rebase", "-b", "", "{d}/mid.qcow2"],
            &["rebase", "-q", "-b", "base", "-F", base_fmt, "{d}/mid.qcow2"],
            &["rebase", "-p", "-b", "base", "-F", base_fmt, "{d}/top.qcow2"],
        ] {
            let o = same_on_copies(&s, qbase, args);
            assert_eq!(o.code, 0, "{args:?}");
            // Safe mode keeps what the image shows.
            s.assert_identical("before.raw", "o/top.qcow2");
            // And allocates as qemu-img does: clusters copied whole.
            let image = args[args.len() - 1].replace("{d}/", "");
            assert_eq!(own_map(&s, &format!("o/{image}")), own_map(&s, &format!("q/{image}")), "{args:?}");
        }
        // -c: what is copied in goes in compressed, where it fills whole
        // clusters the image does not hold yet.
        for args in [
            &["rebase", "-c", "-b", "", "{d}/top.qcow2"][..],
            &["rebase", "-c", "-b", "", "{d}/mid.qcow2"],
            &["rebase", "--compress", "-b", "base", "-F", base_fmt, "{d}/top.qcow2"],
        ] {
            assert_eq!(same_on_copies(&s, qbase, args).code, 0, "{args:?}");
            s.assert_identical("before.raw", "o/top.qcow2");
            let image = args[args.len() - 1].replace("{d}/", "");
            let (q, o) = (compressed_bytes(&s, &format!("q/{image}")), compressed_bytes(&s, &format!("o/{image}")));
            assert_eq!(o, q, "{args:?}: compressed and uncompressed data bytes");
            assert!(o.0 > 0, "{args:?}: nothing was compressed");
        }
        if !qbase {
            let o = same_on_copies(&s, qbase, &["rebase", "-c", "-f", "raw", "-b", "", "{d}/base"]);
            assert_eq!(o.code, 1);
        }
        for args in [
            &["rebase", "-u", "-b", "base", "-F", base_fmt, "{d}/top.qcow2"][..],
            &["rebase", "-u", "-b", "", "{d}/top.qcow2"],
            &["rebase", "-u", "{d}/top.qcow2"],
            &["rebase", "--backing-unsafe", "--backing=mid.qcow2", "--backing-format=qcow2", "{d}/top.qcow2"],
        ] {
            assert_eq!(same_on_copies(&s, qbase, args).code, 0, "{args:?}");
        }
        for args in [
            &["rebase", "{d}/top.qcow2"][..],
            &["rebase", "-b", "base", "{d}/top.qcow2"],
            &["rebase", "-u", "-b", "base", "{d}/top.qcow2"],
            &["rebase", "-b", "nothere.qcow2", "-F", "qcow2", "{d}/top.qcow2"],
            &["rebase", "-b", "base", "-F", "bogus", "{d}/top.qcow2"],
            &["rebase", "-b", "base", "-F", base_fmt, "{d}/nothere.qcow2"],
            &["rebase", "-u", "-f", "raw", "-b", "x", "-F", "raw", "{d}/top.qcow2"],
            &["rebase", "-u", "-f", "raw", "{d}/top.qcow2"],
            &["rebase", "-t", "bogus", "-b", "base", "-F", base_fmt, "{d}/top.qcow2"],
            &["rebase", "-T", "bogus", "-b", "base", "-F", base_fmt, "{d}/top.qcow2"],
            &["rebase", "-b", "base", "-F", base_fmt],
            &["rebase", "-z", "{d}/top.qcow2"],
        ] {
            let o = same_on_copies(&s, qbase, args);
            assert_eq!(o.code, 1, "{args:?}");
        }
        // A chain that would loop is refused (qemu-img fails on its own
        // image lock there, so only the outcome is compared).
        for dir in ["q", "o"] {
            let _ = std::fs::remove_dir_all(s.path(dir));
            chain(&s, dir, qbase);
        }
        for (new, fmt, image) in [("top.qcow2", "qcow2", "mid.qcow2"), ("mid.qcow2", "qcow2", "mid.qcow2")] {
            let q = s.qemu(&["rebase", "-b", new, "-F", fmt, &format!("q/{image}")]);
            let o = s.ours(&["rebase", "-b", new, "-F", fmt, &format!("o/{image}")]);
            assert_eq!((o.code, q.code), (1, 1), "{o:?} {q:?}");
            let want = format!("qemu-img: Could not open new backing file '{new}': ");
            assert!(o.stderr.starts_with(&want), "{o:?}");
        }
        s.assert_identical("q/top.qcow2", "o/top.qcow2");
        s.assert_same(&["map", "--output=json", "o/mid.qcow2"]);
    }
}

#[test]
fn forbid_backing_refuses_images_with_backing_files() {
    let s = Scratch::new();
    chain(&s, "c", false);
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "solo.qcow2", "6M"]);
    let refused = |args: &[&str]| {
        let o = s.ours(args);
        // compare's exit code for images it cannot open is 2.
        let code = if args.contains(&"compare") { 2 } else { 1 };
        assert_eq!(o.code, code, "{args:?} was not refused: {o:?}");
        assert_eq!(o.stdout, "", "{args:?}");
        assert_eq!(o.stderr.lines().count(), 1, "{args:?}: {o:?}");
        assert!(o.stderr.contains("forbidden"), "{args:?}: {o:?}");
    };
    for args in [
        &["--forbid-backing", "map", "c/top.qcow2"][..],
        &["map", "--forbid-backing", "--output=json", "c/top.qcow2"],
        &["--forbid-backing", "compare", "solo.qcow2", "c/mid.qcow2"],
        &["compare", "--forbid-backing", "c/top.qcow2", "solo.qcow2"],
        &["convert", "--forbid-backing", "-O", "raw", "c/top.qcow2", "x"],
        &["--forbid-backing", "convert", "-O", "qcow2", "-B", "c/mid.qcow2", "-F", "qcow2", "solo.qcow2", "x"],
        &["--forbid-backing", "commit", "c/top.qcow2"],
        &["rebase", "--forbid-backing", "-u", "-b", "", "c/top.qcow2"],
        &["rebase", "--forbid-backing", "-b", "c/base", "-F", "raw", "solo.qcow2"],
        &["--forbid-backing", "info", "--backing-chain", "c/top.qcow2"],
        &["--forbid-backing", "check", "c/top.qcow2"],
        &["--forbid-backing", "io", "-c", "read 0 512", "c/top.qcow2"],
    ] {
        refused(args);
        assert!(!s.path("x").exists(), "{args:?} created the target");
    }
    // Nothing was changed, and images without backing files still work.
    s.assert_same(&["map", "--output=json", "c/top.qcow2"]);
    let info = s.qemu_ok(&["info", "--output=json", "c/top.qcow2"]).stdout;
    assert!(info.contains("\"backing-filename\": \"mid.qcow2\""), "{info}");
    assert!(!s.qemu_ok(&["info", "--output=json", "solo.qcow2"]).stdout.contains("backing"));
    s.ours_ok(&["--forbid-backing", "map", "solo.qcow2"]);
    s.ours_ok(&["convert", "--forbid-backing", "-O", "qcow2", "solo.qcow2", "y.qcow2"]);
    assert_eq!(s.ours_ok(&["compare", "--forbid-backing", "solo.qcow2", "y.qcow2"]).stdout, "Images are identical.\n");
    // The flag is oxqcow's own: qemu-img's abbreviations keep their meaning.
    s.assert_same(&["map", "--form=qcow2", "--output=json", "solo.qcow2"]);
    s.assert_same(&["map", "--fo=qcow2", "--output=json", "solo.qcow2"]);
    let o = s.ours(&["map", "--forbid", "solo.qcow2"]);
    assert_eq!(o.code, 1, "{o:?}");
}

/// Regression: on an image whose chain loops, building the error message
/// walked the chain again without loop detection and never returned.
#[test]
fn chain_loops_are_reported_not_followed() {
    let s = Scratch::new();
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "l1.qcow2", "1M"]);
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "-u", "-b", "l1.qcow2", "-F", "qcow2", "l2.qcow2", "1M"]);
    s.qemu_ok(&["rebase", "-u", "-b", "l2.qcow2", "-F", "qcow2", "l1.qcow2"]);
    for args in [
        &["map", "l1.qcow2"][..],
        &["convert", "l1.qcow2", "x.raw"],
        &["commit", "l2.qcow2"],
        &["rebase", "-b", "", "l1.qcow2"],
    ] {
        let o = s.ours(args);
        assert_eq!(o.code, 1, "{args:?}: {o:?}");
        assert_eq!(o.stderr.lines().count(), 1, "{args:?}: {o:?}");
        assert!(o.stderr.contains("loop"), "{args:?}: {o:?}");
    }
    assert_eq!(s.ours(&["compare", "l1.qcow2", "l1.qcow2"]).code, 2);
    // Unsafe mode does not follow the chain, so it can break the loop.
    s.ours_ok(&["rebase", "-u", "-b", "", "l1.qcow2"]);
    s.ours_ok(&["map", "l2.qcow2"]);
}

/// Zeros in the top image are committed as plain zero clusters (no host
/// cluster behind them), as QEMU's commit unmaps: the base's map equals
/// qemu-img's, byte for byte of the JSON.
#[test]
fn commit_unmaps_zeros_in_the_base() {
    let s = Scratch::new();
    for who in ["q", "o"] {
        let (base, top) = (format!("{who}-base.qcow2"), format!("{who}-top.qcow2"));
        s.qemu_ok(&["create", "-q", "-f", "qcow2", &base, "1M"]);
        s.qemu_io("qcow2", &base, &["write -P 1 0 1M"]);
        s.qemu_ok(&["create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &top]);
        s.qemu_io("qcow2", &top, &["write -z 0 128k", "write -z -u 256k 128k"]);
        if who == "q" {
            s.qemu_ok(&["commit", &top]);
        } else {
            s.ours_ok(&["commit", &top]);
        }
    }
    let q = s.qemu_ok(&["map", "--output=json", "q-base.qcow2"]).stdout;
    let o = s.qemu_ok(&["map", "--output=json", "o-base.qcow2"]).stdout;
    assert_eq!(o, q);
    s.assert_clean("o-base.qcow2");
}
