//! Backing chains against QEMU: reads fall through, COW copies from the
//! backing image, zero clusters and discards mask it, loops are refused.

use std::path::Path;
use std::process::Command;

use oxqcow::backing::BackingPolicy;
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

fn as_raw(dir: &Path, image: &Path) -> Vec<u8> {
    let raw = dir.join("flat.raw");
    run(&["qemu-img", "convert", "-O", "raw", p(image), p(&raw)]);
    std::fs::read(raw).unwrap()
}

fn read_all(img: &Image) -> Vec<u8> {
    let mut buf = vec![0u8; img.len() as usize];
    img.read_at(&mut buf, 0).unwrap();
    buf
}

/// raw base (1 MiB) <- qcow2 mid (2 MiB) <- qcow2 top (3 MiB).
fn chain(dir: &Path) -> std::path::PathBuf {
    let base = dir.join("base.raw");
    let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 253) as u8 + 1).collect();
    std::fs::write(&base, data).unwrap();
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    run(&["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", p(&mid), "2M"]);
    run(&[
        "qemu-io",
        "-c",
        "write -P 0x22 65536 100000",
        "-c",
        "write -z 300000 70000",
        "-c",
        "discard 655360 65536",
        p(&mid),
    ]);
    run(&["qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", p(&top), "3M"]);
    run(&["qemu-io", "-c", "write -P 0x33 1000 5000", "-c", "write -P 0x34 1500000 70000", p(&top)]);
    top
}

#[test]
fn three_deep_chain_reads_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let top = chain(dir.path());
    let img = Image::open(&top, &OpenOptions::new().read_only(true)).unwrap();
    assert!(read_all(&img) == as_raw(dir.path(), &top), "content differs from qemu-img convert");
    // Depth is reported per extent: base data is two levels down.
    let ext = img.block_status(0, 4096).unwrap();
    assert_eq!(ext[0].depth, 0);
    let ext = img.block_status(800_000, 4096).unwrap();
    assert_eq!(ext[0].depth, 2, "{ext:?}");
}

#[test]
fn overlay_writes_match_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let top = chain(dir.path());
    let ours = dir.path().join("ours.qcow2");
    let theirs = dir.path().join("theirs.qcow2");
    for f in [&ours, &theirs] {
        run(&["qemu-img", "create", "-q", "-f", "qcow2", "-b", p(&top), "-F", "qcow2", p(f)]);
    }
    let ops: &[(&str, u64, u64)] = &[
        ("write", 100, 300),
        ("write", 70_000, 200_000),
        ("zero", 400_000, 65536),
        ("zero", 500_000, 1000),
        ("discard", 655_360, 131_072),
        ("write", 3 * 1024 * 1024 - 1, 1),
        ("write", 1_000_000, 10),
    ];
    let img = Image::open(&ours, &OpenOptions::new()).unwrap();
    let mut cmds = Vec::new();
    for (i, &(op, off, len)) in ops.iter().enumerate() {
        let pattern = 0x40 + i as u8;
        match op {
            "write" => {
                img.write_at(&vec![pattern; len as usize], off).unwrap();
                cmds.push(format!("write -P {pattern} {off} {len}"));
            }
            "zero" => {
                img.write_zeroes_at(off, len, false).unwrap();
                cmds.push(format!("write -z {off} {len}"));
            }
            _ => {
                img.discard(off, len).unwrap();
                cmds.push(format!("discard {off} {len}"));
            }
        }
    }
    img.close().unwrap();
    let mut args = vec!["qemu-io".to_string()];
    for c in &cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(p(&theirs).into());
    run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    run(&["qemu-img", "check", p(&ours)]);
    run(&["qemu-img", "compare", p(&ours), p(&theirs)]);
}

#[test]
fn create_with_backing_takes_its_size_and_reads_through() {
    let dir = tempfile::tempdir().unwrap();
    let top = chain(dir.path());
    let new = dir.path().join("new.qcow2");
    let mut opts = CreateOptions::qcow2(0).backing("top.qcow2", "qcow2");
    opts.size_given = false;
    let img = Image::create(&new, &opts).unwrap();
    assert_eq!(img.len(), 3 << 20);
    assert!(read_all(&img) == as_raw(dir.path(), &top));
    // Growing past the backing file's end must not reveal anything: zeros.
    img.resize(4 << 20, oxqcow::Preallocation::Off).unwrap();
    img.close().unwrap();
    run(&["qemu-img", "check", p(&new)]);
    let info = run(&["qemu-img", "info", p(&new)]);
    assert!(info.contains("backing file: top.qcow2"), "{info}");
    let flat = as_raw(dir.path(), &new);
    let img = Image::open(&new, &OpenOptions::new().read_only(true)).unwrap();
    assert!(read_all(&img) == flat);
}

#[test]
fn loops_json_options_and_forbidden_backing_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    run(&["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "b.qcow2", "-F", "qcow2", p(&a), "1M"]);
    run(&["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", p(&b), "1M"]);
    let err = Image::open(&a, &OpenOptions::new().read_only(true)).err().expect("a loop must be refused");
    assert!(err.to_string().contains("loop"), "{err}");

    let j = dir.path().join("j.qcow2");
    run(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "json:{\"file.filename\":\"/etc/hostname\",\"file.locking\":\"off\"}",
        "-F",
        "raw",
        p(&j),
        "1M",
    ]);
    // A json: name may name a file, its format and raw windows, nothing
    // more: options beyond what a plain name says are refused.
    let err = Image::open(&j, &OpenOptions::new().read_only(true)).err().expect("json: options must be refused");
    assert!(err.to_string().contains("json:"), "{err}");
    // The file it names goes through the backing policy like any name.
    let named = dir.path().join("named.qcow2");
    let json = format!("json:{{\"driver\":\"raw\",\"file\":{{\"filename\":\"{}\"}}}}", p(&a));
    run(&["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", &json, "-F", "raw", p(&named), "1M"]);
    let forbid = OpenOptions::new().read_only(true).backing(BackingPolicy::Forbid);
    assert!(Image::open(&named, &forbid).is_err());
    let follow = Image::open(&named, &OpenOptions::new().read_only(true)).expect("a json: name of a file is followed");
    assert_eq!(follow.backing().map(|b| b.format()), Some(oxqcow::ImageFormat::Raw));

    let top = chain(dir.path());
    let forbid = OpenOptions::new().read_only(true).backing(BackingPolicy::Forbid);
    assert!(Image::open(&top, &forbid).is_err());
    let alone = OpenOptions::new().read_only(true).backing(BackingPolicy::Ignore);
    let img = Image::open(&top, &alone).unwrap();
    let mut buf = [1u8; 10];
    img.read_at(&mut buf, 900_000).unwrap();
    assert_eq!(buf, [0; 10], "ignored backing reads as zeros");

    // An image without a recorded backing format is not probed when probing is off.
    let np = dir.path().join("np.qcow2");
    run(&["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "base.raw", "-F", "raw", p(&np), "1M"]);
    // qemu-img no longer writes such images: drop the format extension by hand.
    let mut bytes = std::fs::read(&np).unwrap();
    let mut header = oxqcow::format::Header::parse(&bytes[..65536]).unwrap();
    header.extensions.backing_format = None;
    bytes[..65536].copy_from_slice(&header.serialize().unwrap());
    std::fs::write(&np, bytes).unwrap();
    assert!(Image::open(&np, &OpenOptions::new().read_only(true).backing(BackingPolicy::FollowWithoutProbing)).is_err());
    assert!(Image::open(&np, &OpenOptions::new().read_only(true)).is_ok());
}

/// Copies the chain files of `chain()` into `dst` (same names).
fn copy_chain(src: &Path, dst: &Path) {
    for f in ["base.raw", "mid.qcow2", "top.qcow2"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
}

#[test]
fn commit_matches_qemu() {
    for explicit_base in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("ours");
        let theirs = dir.path().join("theirs");
        std::fs::create_dir_all(&ours).unwrap();
        std::fs::create_dir_all(&theirs).unwrap();
        chain(dir.path());
        copy_chain(dir.path(), &ours);
        copy_chain(dir.path(), &theirs);
        let before = as_raw(dir.path(), &ours.join("top.qcow2"));
        if explicit_base {
            oxqcow::chain_ops::commit(&ours.join("top.qcow2"), Some(&ours.join("base.raw")), false, &mut |_, _| {})
                .unwrap();
            run(&["qemu-img", "commit", "-q", "-b", p(&theirs.join("base.raw")), p(&theirs.join("top.qcow2"))]);
        } else {
            oxqcow::chain_ops::commit(&ours.join("top.qcow2"), None, false, &mut |_, _| {}).unwrap();
            run(&["qemu-img", "commit", "-q", p(&theirs.join("top.qcow2"))]);
        }
        for f in ["base.raw", "mid.qcow2", "top.qcow2"] {
            let a = ours.join(f);
            let b = theirs.join(f);
            if f.ends_with("qcow2") {
                run(&["qemu-img", "check", p(&a)]);
            }
            // Compare each layer on its own, as a flat image.
            let fa = dir.path().join("fa.raw");
            let fb = dir.path().join("fb.raw");
            let fmt = if f.ends_with("raw") { "raw" } else { "qcow2" };
            for (src, dst) in [(&a, &fa), (&b, &fb)] {
                run(&["qemu-img", "convert", "-f", fmt, "-O", "raw", p(src), p(dst)]);
            }
            assert!(
                std::fs::read(&fa).unwrap() == std::fs::read(&fb).unwrap(),
                "{f} differs (explicit base: {explicit_base})"
            );
        }
        assert!(as_raw(dir.path(), &ours.join("top.qcow2")) == before, "the guest view must not change");
    }
}

#[test]
fn rebase_matches_qemu() {
    for (new_backing, unsafe_mode) in [(Some("base.raw"), false), (None, false), (Some("base.raw"), true)] {
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("ours");
        let theirs = dir.path().join("theirs");
        std::fs::create_dir_all(&ours).unwrap();
        std::fs::create_dir_all(&theirs).unwrap();
        chain(dir.path());
        copy_chain(dir.path(), &ours);
        copy_chain(dir.path(), &theirs);
        let target = new_backing.map(|n| (n, Some("raw")));
        let opts = oxqcow::chain_ops::RebaseOptions { unsafe_mode, ..Default::default() };
        oxqcow::chain_ops::rebase(&ours.join("top.qcow2"), target, opts, &mut |_, _| {}).unwrap();
        let mut args = vec!["qemu-img", "rebase", "-q"];
        if unsafe_mode {
            args.push("-u");
        }
        let b = new_backing.unwrap_or("");
        args.extend(["-b", b]);
        if new_backing.is_some() {
            args.extend(["-F", "raw"]);
        }
        let t = theirs.join("top.qcow2");
        args.push(p(&t));
        run(&args);
        run(&["qemu-img", "check", p(&ours.join("top.qcow2"))]);
        run(&["qemu-img", "compare", p(&ours.join("top.qcow2")), p(&theirs.join("top.qcow2"))]);
        let info_a = run(&["qemu-img", "info", "--output=json", p(&ours.join("top.qcow2"))]);
        let info_b = run(&["qemu-img", "info", "--output=json", p(&theirs.join("top.qcow2"))]);
        let backing_line = |s: &str| -> Vec<String> {
            s.lines().filter(|l| l.contains("\"backing-filename")).map(|l| l.trim().to_string()).collect()
        };
        assert_eq!(backing_line(&info_a), backing_line(&info_b));
    }
}

/// Regression: commit opened its target without the target's own backing
/// file, so zeros committed into a version 2 image (which has no zero flag)
/// discarded its clusters, and the guest saw the data of the image below
/// instead of zeros.
#[test]
fn commit_zeros_into_a_v2_image_with_a_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.raw");
    std::fs::write(&base, vec![0x5au8; 1 << 20]).unwrap();
    run(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "base.raw",
        "-F",
        "raw",
        p(&d.join("mid.qcow2")),
    ]);
    run(&["qemu-io", "-c", "write -P 0x11 0 128k", p(&d.join("mid.qcow2"))]);
    let top = d.join("top.qcow2");
    run(&["qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", p(&top)]);
    run(&["qemu-io", "-c", "write -z 0 64k", "-c", "write -z 512k 64k", p(&top)]);
    let before = as_raw(d, &top);
    assert!(before[..65536].iter().all(|&b| b == 0) && before[524288..589824].iter().all(|&b| b == 0));
    oxqcow::chain_ops::commit(&top, None, false, &mut |_, _| {}).unwrap();
    assert!(as_raw(d, &top) == before, "committed zeros must stay zeros");
    assert!(as_raw(d, &d.join("mid.qcow2")) == before, "the v2 image must read as the old top");
    run(&["qemu-img", "check", p(&d.join("mid.qcow2"))]);
}
