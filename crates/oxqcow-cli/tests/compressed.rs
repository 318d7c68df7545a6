//! `oxqcow convert -c` against QEMU: images oxqcow compresses pass
//! `qemu-img check`, compare equal to their source and map the same in
//! both tools; images QEMU compresses convert to the same content through
//! oxqcow; parallel and single-worker output agree; and the refusals are
//! qemu-img's.

mod common;

use common::Scratch;

/// A source with incompressible data, text, zeros written as data, holes,
/// and a size that is not a multiple of any cluster size.
fn source(s: &Scratch, name: &str, seed: u64) {
    use std::os::unix::fs::FileExt;
    let path = s.path(name);
    common::random_raw(&path, (6 << 20) + 12288 + 512, seed);
    let f = std::fs::File::options().write(true).open(&path).unwrap();
    let text: Vec<u8> =
        b"qcow2 cluster refcount table snapshot backing ".iter().cycle().take(300_000).copied().collect();
    f.write_all_at(&text, 1 << 20).unwrap();
    f.write_all_at(&text[..70_000], (4 << 20) + 4096).unwrap();
    // Zeros written as data over a whole megabyte.
    f.write_all_at(&vec![0u8; 1 << 20], 2 << 20).unwrap();
}

#[test]
fn compressed_images_pass_qemu_check_and_compare() {
    let s = Scratch::new();
    source(&s, "src.raw", 11);
    for ctype in ["zlib", "zstd"] {
        for cs in ["4k", "64k", "1M"] {
            let out = format!("c-{ctype}-{cs}.qcow2");
            let opts = format!("compression_type={ctype},cluster_size={cs}");
            s.ours_ok(&["convert", "-c", "-O", "qcow2", "-o", &opts, "src.raw", &out]);
            s.assert_clean(&out);
            s.assert_identical("src.raw", &out);
            // Both tools read the image's allocation the same way.
            s.assert_same(&["map", "--output=json", &out]);
            // Human map refuses compressed clusters, in both tools alike.
            s.assert_same(&["map", &out]);
            let info = s.qemu_ok(&["info", &out]).stdout;
            assert!(info.contains(&format!("compression type: {ctype}")), "{info}");
            let check = s.qemu_ok(&["check", "--output=json", &out]).stdout;
            let v: serde_json::Value = serde_json::from_str(&check).unwrap();
            assert!(v["compressed-clusters"].as_u64().unwrap() > 0, "{out}: {check}");
            // The megabyte of zeros stays a hole.
            assert_eq!(s.data_bytes_in(&out, 2 << 20, 1 << 20), 0, "{out} allocated zeros");
        }
    }
    // Compressing from a qcow2 source, and a version 2 target.
    s.qemu_ok(&["convert", "-O", "qcow2", "src.raw", "src.qcow2"]);
    s.ours_ok(&["convert", "-c", "-O", "qcow2", "-o", "compat=0.10", "src.qcow2", "v2.qcow2"]);
    s.assert_clean("v2.qcow2");
    s.assert_identical("src.raw", "v2.qcow2");
}

#[test]
fn compressed_output_does_not_depend_on_worker_count() {
    let s = Scratch::new();
    source(&s, "src.raw", 12);
    for ctype in ["zlib", "zstd"] {
        let o = format!("compression_type={ctype}");
        let one = format!("m1-{ctype}.qcow2");
        let many = format!("m8-{ctype}.qcow2");
        s.ours_ok(&["convert", "-c", "-m", "1", "-O", "qcow2", "-o", &o, "src.raw", &one]);
        s.ours_ok(&["convert", "-c", "-m", "8", "-W", "-O", "qcow2", "-o", &o, "src.raw", &many]);
        s.assert_clean(&one);
        s.assert_clean(&many);
        assert_eq!(s.qemu(&["compare", "-s", &one, &many]).code, 0, "{one} and {many} differ");
        s.assert_identical("src.raw", &many);
        // The same clusters are data in both (only the host layout may differ).
        let data = |name: &str| -> Vec<(u64, u64, bool)> {
            let o = s.qemu_ok(&["map", "--output=json", name]).stdout;
            let v: serde_json::Value = serde_json::from_str(&o).unwrap();
            v.as_array()
                .unwrap()
                .iter()
                .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["data"] == true))
                .collect()
        };
        assert_eq!(data(&one), data(&many));
    }
}

#[test]
fn qemu_compressed_images_convert_through_oxqcow() {
    let s = Scratch::new();
    source(&s, "src.raw", 13);
    for ctype in ["zlib", "zstd"] {
        for cs in ["4k", "64k", "2M"] {
            let q = format!("q-{ctype}-{cs}.qcow2");
            let opts = format!("compression_type={ctype},cluster_size={cs}");
            s.qemu_ok(&["convert", "-c", "-O", "qcow2", "-o", &opts, "src.raw", &q]);
            let raw = format!("{q}.raw");
            s.ours_ok(&["convert", "-O", "raw", &q, &raw]);
            s.assert_identical("src.raw", &raw);
            let re = format!("{q}.re.qcow2");
            s.ours_ok(&["convert", "-c", "-O", "qcow2", &q, &re]);
            s.assert_identical("src.raw", &re);
            s.assert_clean(&re);
            s.assert_same(&["map", "--output=json", &q]);
            s.assert_same(&["compare", &q, "src.raw"]);
        }
    }
}

#[test]
fn compressed_convert_into_existing_and_sparse_targets() {
    let s = Scratch::new();
    source(&s, "src.raw", 14);
    // -n into an empty qcow2 image; --target-is-zero too.
    for extra in [&[][..], &["--target-is-zero"]] {
        s.qemu_ok(&["create", "-q", "-f", "qcow2", "n.qcow2", "7M"]);
        let mut args = vec!["convert", "-n", "-c", "-O", "qcow2"];
        args.extend_from_slice(extra);
        args.extend(["src.raw", "n.qcow2"]);
        s.ours_ok(&args);
        s.assert_clean("n.qcow2");
        assert_eq!(
            s.qemu(&["compare", "src.raw", "n.qcow2"]).stdout,
            "Warning: Image size mismatch!\nImages are identical.\n"
        );
    }
    // -S 0 compresses everything, zeros included.
    s.ours_ok(&["convert", "-c", "-S", "0", "-O", "qcow2", "src.raw", "full.qcow2"]);
    s.assert_clean("full.qcow2");
    s.assert_identical("src.raw", "full.qcow2");
    let size = std::fs::metadata(s.path("src.raw")).unwrap().len();
    assert_eq!(s.data_bytes("full.qcow2"), size);
    // Progress runs from 0 to 100.
    let out = s.ours_ok(&["convert", "-c", "-p", "-O", "qcow2", "src.raw", "p.qcow2"]).stdout;
    assert!(out.starts_with("    (0.00/100%)\r") && out.ends_with("    (100.00/100%)\r\n"), "{out:?}");
}

#[test]
fn compressed_convert_refusals_match_qemu() {
    let s = Scratch::new();
    common::random_raw(&s.path("a.raw"), 1 << 20, 4);
    s.qemu_ok(&["create", "-q", "-f", "raw", "t.raw", "1M"]);
    for args in [
        &["convert", "-c", "a.raw", "x"][..],
        &["convert", "-c", "-O", "raw", "a.raw", "x"],
        &["convert", "-c", "-O", "qcow2", "-o", "preallocation=metadata", "a.raw", "x"],
        &["convert", "-c", "-O", "qcow2", "-o", "compression_type=lzo", "a.raw", "x"],
        &["convert", "-c", "-n", "a.raw", "t.raw"],
    ] {
        let out = s.assert_same(args);
        assert_eq!(out.code, 1, "{args:?} should fail");
        assert!(!s.path("x").exists(), "{args:?} created the target");
    }
}
