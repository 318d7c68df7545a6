//! The formats besides qcow2 and raw against QEMU: the standalone luks
//! format (create, open with `key-secret`, read and write, convert in and
//! out, info, measure, resize, check and their errors) and qcow version 1
//! (read: convert, compare, info and map of images qemu-img made, plain,
//! with a backing file, compressed and AES-encrypted). PBKDF2 runs with
//! `iter-time=10` to stay fast.

mod common;

use common::{Out, Scratch};

const SECRET: &str = "secret,id=sec0,data=correct horse";
const OTHER: &str = "secret,id=sec1,data=battery staple";

/// `--image-opts` for a luks image unlocked with secret `sec`.
fn luks(image: &str, sec: &str) -> String {
    format!("driver=luks,file.filename={image},key-secret={sec}")
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `create -f luks` of a 4 MiB image with `extra` options.
fn create_luks(image: &str, extra: &str) -> Vec<String> {
    let o = format!("key-secret=sec0,iter-time=10{extra}");
    ["create", "-q", "-f", "luks", "--object", SECRET, "-o", &o, image, "4M"].map(String::from).to_vec()
}

/// `oxqcow io` or qemu-io on a luks image: every command must succeed and
/// every pattern check pass.
fn io(s: &Scratch, ours: bool, image: &str, cmds: &[&str]) {
    let spec = luks(image, "sec0");
    let mut a = vec!["--object", SECRET, "--image-opts", &spec];
    for c in cmds {
        a.push("-c");
        a.push(c);
    }
    let o = if ours {
        a.insert(0, "io");
        s.ours(&a)
    } else {
        let o = std::process::Command::new("qemu-io")
            .args(&a)
            .current_dir(s.dir.path())
            .output()
            .expect("qemu-io is required by this test");
        Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    };
    assert_eq!(o.code, 0, "io {a:?}: {o:?}");
    assert!(!o.stdout.contains("failed"), "io {a:?}: {}", o.stdout);
}

/// Writes covering whole sectors, partial sectors at both ends, one byte
/// inside a sector and zeros; and what they leave.
const WRITES: &[&str] = &[
    "write -P 0x5a 0 64k",
    "write -P 0x11 70000 1000",
    "write -P 0x22 3000 100",
    "write -P 0x66 5000 1",
    "write -z 1100k 64k",
    "write -P 0x44 4095k 1k",
];
const READS: &[&str] = &[
    "read -P 0x5a 0 3000",
    "read -P 0x22 3000 100",
    "read -P 0x5a 3100 1900",
    "read -P 0x66 5000 1",
    "read -P 0x5a 5001 60535",
    "read -P 0x11 70000 1000",
    "read -P 0 1100k 64k",
    "read -P 0x44 4095k 1k",
];

/// The image's info with what differs between two images of the same
/// settings (the UUID, the PBKDF2 iteration counts the host's speed sets,
/// the allocated bytes, the name) blanked.
fn stable_info(s: &Scratch, ours: bool, image: &str) -> String {
    let a = ["info", "--output=json", image];
    let o = if ours { s.ours_ok(&a) } else { s.qemu_ok(&a) };
    let mut v: serde_json::Value = serde_json::from_str(&o.stdout).expect("info json");
    fn blank(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m.iter_mut() {
                    if ["uuid", "iters", "master-key-iters", "actual-size", "filename"].contains(&k.as_str()) {
                        *x = serde_json::Value::Null;
                    } else {
                        blank(x);
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(blank),
            _ => {}
        }
    }
    blank(&mut v);
    v.to_string()
}

#[test]
fn luks_images_interoperate_with_qemu() {
    let s = Scratch::new();
    let settings = ["", ",cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256"];
    for (i, extra) in settings.iter().enumerate() {
        let (q, o) = (format!("q{i}.luks"), format!("o{i}.luks"));
        s.qemu_ok(&args(&create_luks(&q, extra)));
        s.ours_ok(&args(&create_luks(&o, extra)));
        assert_eq!(std::fs::metadata(s.path(&o)).unwrap().len(), std::fs::metadata(s.path(&q)).unwrap().len());
        // info needs no secret, and describes both images alike.
        assert_eq!(stable_info(&s, true, &q), stable_info(&s, false, &q), "{extra}");
        assert_eq!(stable_info(&s, true, &o), stable_info(&s, false, &q), "{extra}");
        s.assert_same(&["info", &q]);
        // Each tool writes, the other reads.
        io(&s, false, &q, WRITES);
        io(&s, true, &q, READS);
        io(&s, true, &o, WRITES);
        io(&s, false, &o, READS);
        // Converting out decrypts the same bytes.
        for (ours, raw) in [(true, "ours.raw"), (false, "theirs.raw")] {
            let spec = luks(&o, "sec0");
            let a = ["convert", "--object", SECRET, "--image-opts", &spec, "-O", "raw", raw];
            if ours {
                s.ours_ok(&a)
            } else {
                s.qemu_ok(&a)
            };
        }
        assert_eq!(std::fs::read(s.path("ours.raw")).unwrap(), std::fs::read(s.path("theirs.raw")).unwrap());
    }
}

/// Guards against a copy into a new luks image skipping the source's zero
/// runs: a luks image's unwritten sectors decrypt to noise, not zeros, so
/// its creation cannot stand for zeroing (QEMU's `has_zero_init` is false).
#[test]
fn convert_into_luks_writes_zeros() {
    let s = Scratch::new();
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "src.qcow2", "4M"]);
    s.qemu_io("qcow2", "src.qcow2", &["write -P 0x5a 1M 64k", "write -P 0x33 3000 10"]);
    s.ours_ok(&[
        "convert",
        "--object",
        SECRET,
        "-O",
        "luks",
        "-o",
        "key-secret=sec0,iter-time=10",
        "src.qcow2",
        "t.luks",
    ]);
    let spec = luks("t.luks", "sec0");
    let o = s.qemu(&["compare", "--object", SECRET, "--image-opts", "driver=qcow2,file.filename=src.qcow2", &spec]);
    assert_eq!((o.code, o.stdout.as_str()), (0, "Images are identical.\n"), "{o:?}");
}

#[test]
fn luks_errors_and_measurements_match_qemu() {
    let s = Scratch::new();
    for o in [
        "",
        "key-secret=nope",
        "key-secret=sec0,cipher-alg=foo",
        "key-secret=sec0,cipher-alg=sm4",
        "key-secret=sec0,cipher-mode=gcm",
        "key-secret=sec0,ivgen-alg=essiv,ivgen-hash-alg=sha1",
        "key-secret=sec0,iter-time=abc",
        "key-secret=sec0,detached-header=on",
        "key-secret=sec0,preallocation=foo",
        "key-secret=sec0,compat=1.1",
        "encrypt.key-secret=sec0",
    ] {
        let a = ["create", "-f", "luks", "--object", SECRET, "-o", o, "t.luks", "1M"];
        let out = s.assert_same(&a);
        assert_eq!(out.code, 1, "{o}");
        assert!(!s.path("t.luks").exists(), "{o} left an image behind");
    }
    s.qemu_ok(&args(&create_luks("l.luks", "")));
    let right = luks("l.luks", "sec0");
    let wrong = luks("l.luks", "sec1");
    let qcow2_spec = "driver=qcow2,file.filename=p.qcow2,key-secret=sec0";
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "p.qcow2", "1M"]);
    let with = |spec: &str, cmd: &[&str]| {
        let mut a: Vec<String> = cmd.iter().map(|c| c.to_string()).collect();
        a.extend(["--object", SECRET, "--object", OTHER, "--image-opts", spec].map(String::from));
        a
    };
    let theirs_luks = "driver=luks,file.filename=l.luks,encrypt.key-secret=sec0".to_string();
    for a in [
        // Without the secret only info opens it.
        vec!["map".to_string(), "l.luks".into()],
        vec!["convert".into(), "-O".into(), "raw".into(), "l.luks".into(), "x.raw".into()],
        with(&wrong, &["map"]),
        // Each format takes its own secret option only.
        with(&theirs_luks, &["map"]),
        with(qcow2_spec, &["map"]),
        // luks has no checker and no snapshots.
        vec!["check".into(), "-f".into(), "luks".into(), "l.luks".into()],
        with(&right, &["check"]),
        with(&right, &["snapshot", "-l"]),
        with(&right, &["snapshot", "-c", "s1"]),
        with(&right, &["map", "--output=json"]),
        with(&right, &["measure", "-O", "qcow2"]),
        vec!["measure".into(), "-O".into(), "luks".into(), "--size".into(), "10M".into()],
    ] {
        s.assert_same(&args(&a));
    }
    for o in [
        "key-secret=sec0",
        "key-secret=sec0,cipher-alg=aes-128",
        "key-secret=sec0,cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv",
        "key-secret=sec0,cipher-alg=twofish-256,hash-alg=sha512",
    ] {
        s.assert_same(&["measure", "--object", SECRET, "-O", "luks", "-o", o, "--size", "10M"]);
        s.assert_same(&["measure", "--object", SECRET, "-O", "luks", "-o", o, "p.qcow2"]);
    }
}

#[test]
fn luks_resize_matches_qemu() {
    let s = Scratch::new();
    s.qemu_ok(&args(&create_luks("base.luks", "")));
    let spec = luks("r.luks", "sec0");
    for size in ["6M", "+1M", "--shrink 512K", "1M", "-f luks 5M"] {
        let outcome = |ours: bool| {
            std::fs::copy(s.path("base.luks"), s.path("r.luks")).unwrap();
            let mut a = vec!["resize", "--object", SECRET];
            if !size.starts_with("-f") {
                a.extend(["--image-opts", &spec]);
            }
            a.extend(size.split(' '));
            if size.starts_with("-f") {
                a.insert(a.len() - 1, "r.luks");
            }
            let out = if ours { s.ours(&a) } else { s.qemu(&a) };
            (out, std::fs::metadata(s.path("r.luks")).unwrap().len(), stable_info(&s, false, "r.luks"))
        };
        assert_eq!(outcome(true), outcome(false), "{size}");
    }
}

/// qcow (version 1) images made by qemu-img, with what each holds.
fn make_qcow_images(s: &Scratch) {
    s.qemu_ok(&["create", "-q", "-f", "raw", "base.raw", "8M"]);
    s.qemu_io("raw", "base.raw", &["write -P 0x11 0 8M"]);
    s.qemu_ok(&["create", "-q", "-f", "qcow", "plain.qcow", "8M"]);
    s.qemu_io("qcow", "plain.qcow", &["write -P 0x5a 4k 100k", "write -z 1M 64k", "write -P 0x33 5M 1k"]);
    s.qemu_ok(&["create", "-q", "-f", "qcow", "-b", "base.raw", "-F", "raw", "backed.qcow"]);
    s.qemu_io("qcow", "backed.qcow", &["write -P 0x22 2M 64k"]);
    s.qemu_ok(&["create", "-q", "-f", "qcow", "packed.qcow", "8M"]);
    s.qemu_io("qcow", "packed.qcow", &["write -c -P 0x77 0 4k", "write -c -P 0x78 8k 4k", "write -P 0x79 1M 4k"]);
    // An odd size: the disk is its whole sectors.
    s.qemu_ok(&["create", "-q", "-f", "qcow", "odd.qcow", "1000001"]);
}

#[test]
fn qcow_v1_images_read_as_qemu_reads_them() {
    let s = Scratch::new();
    make_qcow_images(&s);
    for image in ["plain.qcow", "backed.qcow", "packed.qcow", "odd.qcow"] {
        s.qemu_ok(&["convert", "-O", "raw", image, "theirs.raw"]);
        s.ours_ok(&["convert", "-O", "raw", image, "ours.raw"]);
        assert_eq!(std::fs::read(s.path("ours.raw")).unwrap(), std::fs::read(s.path("theirs.raw")).unwrap(), "{image}");
        s.ours_ok(&["convert", "-O", "qcow2", image, "ours.qcow2"]);
        s.assert_identical("ours.qcow2", image);
        s.assert_clean("ours.qcow2");
        s.assert_same(&["info", image]);
        s.assert_same(&["info", "--output=json", image]);
        s.assert_same(&["map", "--output=json", image]);
        s.assert_same(&["compare", image, "theirs.raw"]);
        // Nothing to check, nothing to amend, no resizing.
        s.assert_same(&["check", image]);
        s.assert_same(&["resize", image, "16M"]);
    }
}

#[test]
fn encrypted_qcow_v1_images_decrypt_as_qemu_decrypts_them() {
    let s = Scratch::new();
    let o = "encrypt.format=aes,encrypt.key-secret=sec0";
    s.qemu_ok(&["create", "-q", "-f", "qcow", "--object", SECRET, "-o", o, "e.qcow", "8M"]);
    let spec = "driver=qcow,file.filename=e.qcow,encrypt.key-secret=sec0";
    let w = std::process::Command::new("qemu-io")
        .args(["--object", SECRET, "--image-opts", spec, "-c", "write -P 0x44 100k 300k"])
        .current_dir(s.dir.path())
        .output()
        .expect("qemu-io is required by this test");
    assert!(w.status.success(), "{w:?}");
    for (ours, raw) in [(true, "ours.raw"), (false, "theirs.raw")] {
        let a = ["convert", "--object", SECRET, "--image-opts", spec, "-O", "raw", raw];
        if ours {
            s.ours_ok(&a)
        } else {
            s.qemu_ok(&a)
        };
    }
    let ours = std::fs::read(s.path("ours.raw")).unwrap();
    assert_eq!(ours, std::fs::read(s.path("theirs.raw")).unwrap());
    assert!(ours[100 << 10..400 << 10].iter().all(|&b| b == 0x44));
    s.assert_same(&["info", "e.qcow"]);
    s.assert_same(&["convert", "-O", "raw", "e.qcow", "x.raw"]);
}

/// Guards against `backing.driver` and `backing.file.filename` being
/// refused ("does not support the option"): they name the backing image
/// in place of what the header records, in qemu-io and in qemu-img alike.
#[test]
fn backing_options_replace_the_recorded_backing_file() {
    let s = Scratch::new();
    for (name, byte) in [("b1.qcow2", "0x11"), ("b2.qcow2", "0x22")] {
        s.qemu_ok(&["create", "-q", "-f", "qcow2", name, "1M"]);
        s.qemu_io("qcow2", name, &[&format!("write -P {byte} 0 1M")]);
    }
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "-b", "b1.qcow2", "-F", "qcow2", "top.qcow2"]);
    s.qemu_io("qcow2", "top.qcow2", &["write -P 0x33 0 4k"]);
    for (spec, byte) in [
        ("driver=qcow2,file.filename=top.qcow2,backing.driver=qcow2,backing.file.filename=b2.qcow2", "0x22"),
        ("driver=qcow2,file.filename=top.qcow2,backing.file.filename=b2.qcow2", "0x22"),
        ("driver=qcow2,file.filename=top.qcow2,backing.driver=qcow2", "0x11"),
    ] {
        // The rest of the first cluster was copied from b1 on write.
        let read = format!("read -P {byte} 64k 960k");
        let a = ["io", "--image-opts", spec, "-c", "read -P 0x33 0 4k", "-c", &read];
        let o = s.ours_ok(&a);
        assert!(!o.stdout.contains("failed"), "{spec}: {}", o.stdout);
        s.ours_ok(&["convert", "--image-opts", spec, "-O", "raw", "ours.raw"]);
        s.qemu_ok(&["convert", "--image-opts", spec, "-O", "raw", "theirs.raw"]);
        assert_eq!(std::fs::read(s.path("ours.raw")).unwrap(), std::fs::read(s.path("theirs.raw")).unwrap(), "{spec}");
    }
    // Named raw, the backing qcow2 file is read as its bytes.
    let spec = "driver=qcow2,file.filename=top.qcow2,backing.driver=raw,backing.file.filename=b2.qcow2";
    s.ours_ok(&["convert", "--image-opts", spec, "-O", "raw", "ours.raw"]);
    s.qemu_ok(&["convert", "--image-opts", spec, "-O", "raw", "theirs.raw"]);
    assert_eq!(std::fs::read(s.path("ours.raw")).unwrap(), std::fs::read(s.path("theirs.raw")).unwrap());
}

/// Guards against `amend` of a luks image being refused as if it were raw
/// ("Format driver 'raw' does not support option amendment"): its key slot
/// options (qcow2's without the `encrypt.` prefix) change the slots as
/// qemu-img's do, with its messages, step after step.
#[test]
fn luks_amend_matches_qemu() {
    let s = Scratch::new();
    s.qemu_ok(&args(&create_luks("base.luks", "")));
    std::fs::copy(s.path("base.luks"), s.path("o.luks")).unwrap();
    std::fs::copy(s.path("base.luks"), s.path("q.luks")).unwrap();
    let steps = [
        ("foo=bar", "sec0"),
        ("size=2M", "sec0"),
        ("keyslot=1", "sec0"),
        ("state=bogus", "sec0"),
        ("iter-time=abc,state=active,new-secret=sec1", "sec0"),
        ("encrypt.state=active,encrypt.new-secret=sec1", "sec0"),
        ("state=active,new-secret=sec1,iter-time=10,keyslot=9", "sec0"),
        ("state=active,new-secret=sec1,iter-time=10,keyslot=5", "sec0"),
        ("state=inactive,keyslot=0", "sec1"),
        ("state=inactive,keyslot=5", "sec1"),
        ("state=inactive,old-secret=sec0", "sec1"),
    ];
    for (o, unlock) in steps {
        let mut outcomes = Vec::new();
        for (ours, name) in [(true, "o.luks"), (false, "q.luks")] {
            let spec = luks(name, unlock);
            let a = ["amend", "--object", SECRET, "--object", OTHER, "-o", o, "--image-opts", &spec];
            let out = if ours { s.ours(&a) } else { s.qemu(&a) };
            outcomes.push((out.code, out.stdout, out.stderr, stable_info(&s, false, name).replace(name, "")));
        }
        assert_eq!(outcomes[0], outcomes[1], "{o}");
    }
    // The slot left holds sec1: both tools unlock it with it alone.
    s.ours_ok(&["io", "--object", OTHER, "--image-opts", &luks("o.luks", "sec1"), "-c", "read 0 512"]);
    s.assert_same(&["amend", "-f", "luks", "-o", "help"]);
    s.assert_same(&["amend", "-f", "qcow", "-o", "help"]);
}

/// Guards against `commit --image-opts` on an encrypted chain failing with
/// "Parameter 'encrypt.key-secret' is required for cipher": the library
/// reopened the chain without the secrets the options give.
#[test]
fn commit_unlocks_an_encrypted_chain_with_image_opts() {
    let s = Scratch::new();
    let enc = |sec: &str| format!("encrypt.format=luks,encrypt.key-secret={sec},encrypt.iter-time=10");
    let objects = ["--object", SECRET, "--object", OTHER];
    s.qemu_ok(&[&["create", "-q", "-f", "qcow2"][..], &objects, &["-o", &enc("sec0"), "base.qcow2", "4M"]].concat());
    let o = enc("sec1");
    let b = ["-b", "base.qcow2", "-F", "qcow2", "top.qcow2"];
    s.qemu_ok(&[&["create", "-q", "-f", "qcow2"][..], &objects, &["-o", &o], &b].concat());
    let base = "driver=qcow2,file.filename=base.qcow2,encrypt.key-secret=sec0";
    let top = "driver=qcow2,file.filename=top.qcow2,encrypt.key-secret=sec1,backing.encrypt.key-secret=sec0";
    let qemu_io = |spec: &str, cmd: &str| {
        let o = std::process::Command::new("qemu-io")
            .args([&objects[..], &["--image-opts", spec, "-c", cmd]].concat())
            .current_dir(s.dir.path())
            .output()
            .expect("qemu-io is required by this test");
        let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(o.status.success() && !stdout.contains("failed"), "qemu-io {cmd}: {o:?}");
    };
    qemu_io(top, "write -P 0x9 64k 1M");
    let out = s.ours_ok(&[&["commit"][..], &objects, &["--image-opts", top]].concat());
    assert_eq!(out.stdout, "Image committed.\n");
    qemu_io(base, "read -P 0x9 64k 1M");
    qemu_io(top, "read -P 0x9 64k 1M");
}

/// Guards against `info --image-opts` naming an image opened with its
/// secret by its file name: QEMU names it `json:{...}` with the options
/// (members in its QDict order), as it does for every driver's "strong"
/// options; other runtime options leave the file name.
#[test]
fn info_names_images_opened_with_secrets_as_qemu_does() {
    let s = Scratch::new();
    let o = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10";
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "--object", SECRET, "-o", o, "e.qcow2", "1M"]);
    s.qemu_ok(&args(&create_luks("l.luks", "")));
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "p.qcow2", "1M"]);
    for spec in [
        "driver=qcow2,file.filename=e.qcow2,encrypt.key-secret=sec0",
        "driver=luks,file.filename=l.luks,key-secret=sec0",
        "driver=qcow2,file.filename=p.qcow2,l2-cache-size=1M",
    ] {
        let out = s.assert_same(&["info", "--object", SECRET, "--image-opts", spec]);
        assert_eq!(out.code, 0, "{spec}: {out:?}");
        s.assert_same(&["info", "--output=json", "--object", SECRET, "--image-opts", spec]);
    }
}
