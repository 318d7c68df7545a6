//! External data files (`-o data_file=NAME[,data_file_raw=on]`) against
//! qemu-img and qemu-io: creation byte for byte, images written by either
//! tool read identically by the other, info/map/check/measure output,
//! resize, amend, snapshots and compressed writes refused as QEMU refuses
//! them, hostile headers, the backing-file gate and locking.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::{patch, Pair, Scratch};
use oxqcow::backing::{BackingGate, BackingPolicy};
use oxqcow::{BlockDevice, Image, ImageFormat, OpenOptions};

/// A workload touching every kind of cluster a data file image can have:
/// data, zero clusters with and without unmapping (cluster 0 included,
/// whose host offset is 0), discards, partial clusters and the last one.
const WORKLOAD: &[&str] = &[
    "write -P 0xaa 0 256k",
    "discard 0 64k",
    "write -z 64k 64k",
    "write -z -u 128k 64k",
    "write -P 5 300k 10k",
    "write -z 310k 2k",
    "write -P 6 640k 192k",
    "discard 704k 64k",
    "write -P 7 1020k 4k",
    "write -z -u 0 64k",
];

fn io_args<'a>(cmds: &[&'a str], image: &'a str) -> Vec<&'a str> {
    let mut args = vec!["io", "-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(image);
    args
}

/// A crafted copy of `src` whose data file extension holds `name` (`None`:
/// no extension, the incompatible bit stays).
fn with_data_file_name(s: &Scratch, src: &str, dst: &str, name: Option<&[u8]>) {
    let mut bytes = std::fs::read(s.path(src)).unwrap();
    let magic = 0x4441_5441u32.to_be_bytes();
    let at = bytes.windows(4).position(|w| w == magic).expect("data file extension");
    let old_len = u32::from_be_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
    let rest: Vec<u8> = bytes[at + 8 + old_len.div_ceil(8) * 8..4096].to_vec();
    let mut area = Vec::new();
    if let Some(n) = name {
        area.extend_from_slice(&magic);
        area.extend_from_slice(&(n.len() as u32).to_be_bytes());
        area.extend_from_slice(n);
        area.resize(area.len() + (8 - n.len() % 8) % 8, 0);
    }
    area.extend_from_slice(&rest);
    area.resize(4096 - at, 0);
    bytes[at..4096].copy_from_slice(&area);
    std::fs::write(s.path(dst), bytes).unwrap();
}

#[test]
fn create_matches_qemu_img_byte_for_byte() {
    for opts in [
        "data_file=d.raw",
        "data_file=d.raw,data_file_raw=on",
        "data_file=d.raw,preallocation=metadata",
        "data_file=d.raw,preallocation=falloc",
        "data_file=d.raw,data_file_raw=on,preallocation=full",
        "data_file=d.raw,cluster_size=4096,data_file_raw=on",
    ] {
        let p = Pair::new();
        p.same_output(&["create", "-f", "qcow2", "-o", opts, "a.qcow2", "3M"]);
        p.same_files(&[opts]);
        for args in [
            &["info", "a.qcow2"][..],
            &["info", "--output=json", "a.qcow2"],
            &["check", "a.qcow2"],
            &["check", "--output=json", "a.qcow2"],
            &["map", "a.qcow2"],
            &["map", "--output=json", "a.qcow2"],
            // The data file's holes too.
            &["map", "-f", "raw", "--output=json", "d.raw"],
        ] {
            p.same_output(args);
        }
    }
}

#[test]
fn qemu_written_images_read_the_same() {
    for raw in ["off", "on"] {
        let s = Scratch::new();
        let opts = format!("data_file=d.raw,data_file_raw={raw}");
        s.qemu_ok(&["create", "-q", "-f", "qcow2", "-o", &opts, "a.qcow2", "1M"]);
        s.qemu_io("qcow2", "a.qcow2", WORKLOAD);
        for args in [
            &["info", "a.qcow2"][..],
            &["info", "--output=json", "a.qcow2"],
            &["check", "a.qcow2"],
            &["map", "a.qcow2"],
            &["map", "--output=json", "a.qcow2"],
            &["measure", "-O", "qcow2", "a.qcow2"],
            &["measure", "-O", "qcow2", "-o", "data_file=x.raw", "a.qcow2"],
        ] {
            s.assert_same(args);
        }
        s.qemu_ok(&["convert", "-O", "raw", "a.qcow2", "q.raw"]);
        s.ours_ok(&["convert", "-O", "raw", "a.qcow2", "o.raw"]);
        assert_eq!(std::fs::read(s.path("q.raw")).unwrap(), std::fs::read(s.path("o.raw")).unwrap(), "raw {raw}");
        s.assert_same(&["compare", "a.qcow2", "q.raw"]);
        if raw == "on" {
            // QEMU keeps a raw data file equal to the disk.
            assert_eq!(std::fs::read(s.path("d.raw")).unwrap(), std::fs::read(s.path("q.raw")).unwrap());
        }
    }
}

#[test]
fn oxqcow_written_images_match_qemu_io_ones() {
    for raw in ["off", "on"] {
        let s = Scratch::new();
        s.qemu_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file=dq.raw,data_file_raw={raw}"),
            "q.qcow2",
            "1M",
        ]);
        s.qemu_io("qcow2", "q.qcow2", WORKLOAD);
        s.ours_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file=do.raw,data_file_raw={raw}"),
            "o.qcow2",
            "1M",
        ]);
        let out = s.ours_ok(&io_args(WORKLOAD, "o.qcow2"));
        assert!(!out.stdout.contains("failed"), "{}", out.stdout);
        s.assert_clean("o.qcow2");
        s.assert_identical("q.qcow2", "o.qcow2");
        let q_map = s.qemu_ok(&["map", "--output=json", "q.qcow2"]).stdout;
        let o_map = s.qemu_ok(&["map", "--output=json", "o.qcow2"]).stdout;
        assert_eq!(o_map, q_map, "raw {raw}: qemu-img map of both images");
        // The same metadata (but for the data file's name) and the same
        // data file, holes included.
        let (q, o) = (std::fs::read(s.path("q.qcow2")).unwrap(), std::fs::read(s.path("o.qcow2")).unwrap());
        assert_eq!(q.len(), o.len());
        let differing: Vec<usize> = (0..q.len()).filter(|&i| q[i] != o[i]).collect();
        assert_eq!(differing.len(), 1, "raw {raw}: only the 'q'/'o' of the name may differ: {differing:?}");
        assert_eq!(std::fs::read(s.path("dq.raw")).unwrap(), std::fs::read(s.path("do.raw")).unwrap());
        let dq = s.qemu_ok(&["map", "-f", "raw", "--output=json", "dq.raw"]).stdout;
        let dox = s.qemu_ok(&["map", "-f", "raw", "--output=json", "do.raw"]).stdout;
        assert_eq!(dox, dq, "raw {raw}: holes of the data files");
        if raw == "on" {
            s.qemu_ok(&["convert", "-O", "raw", "o.qcow2", "o.raw"]);
            assert_eq!(std::fs::read(s.path("do.raw")).unwrap(), std::fs::read(s.path("o.raw")).unwrap());
            s.assert_identical("o.qcow2", "do.raw");
        }
    }
}

#[test]
fn convert_into_a_data_file_image() {
    let s = Scratch::new();
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "src.qcow2", "2M"]);
    s.qemu_io("qcow2", "src.qcow2", &["write -P 1 0 100k", "write -P 2 1M 64k", "write -z 1536k 64k"]);
    for raw in ["off", "on"] {
        let opts = format!("data_file=q-{raw}.raw,data_file_raw={raw}");
        s.qemu_ok(&["convert", "-O", "qcow2", "-o", &opts, "src.qcow2", &format!("q-{raw}.qcow2")]);
        let opts = format!("data_file=o-{raw}.raw,data_file_raw={raw}");
        s.ours_ok(&["convert", "-O", "qcow2", "-o", &opts, "src.qcow2", &format!("o-{raw}.qcow2")]);
        let (q, o) = (format!("q-{raw}.qcow2"), format!("o-{raw}.qcow2"));
        s.assert_clean(&o);
        s.assert_identical(&o, "src.qcow2");
        assert_eq!(
            s.qemu_ok(&["map", "--output=json", &o]).stdout,
            s.qemu_ok(&["map", "--output=json", &q]).stdout,
            "raw {raw}"
        );
        assert_eq!(
            std::fs::read(s.path(&format!("q-{raw}.raw"))).unwrap(),
            std::fs::read(s.path(&format!("o-{raw}.raw"))).unwrap()
        );
    }
    // Compressed clusters cannot live in a data file: qemu-img's errors.
    s.assert_same(&["convert", "-c", "-O", "qcow2", "-o", "data_file=c.raw", "src.qcow2", "c.qcow2"]);
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "empty.qcow2", "1M"]);
    s.assert_same(&["convert", "-c", "-O", "qcow2", "-o", "data_file=c.raw", "empty.qcow2", "c.qcow2"]);
}

/// Runs the same command sequence with both tools on copies of the same
/// files and compares every output and the files at the end.
#[test]
fn resize_amend_snapshot_as_qemu_img() {
    let p = Pair::new();
    let steps: &[&[&str]] = &[
        &["create", "-q", "-f", "qcow2", "-o", "data_file=d1.raw", "f.qcow2", "1M"],
        &["create", "-q", "-f", "qcow2", "-o", "data_file=d2.raw,data_file_raw=on", "b.qcow2", "1M"],
        &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"],
        &["amend", "-o", "data_file_raw=on", "f.qcow2"],
        &["amend", "-o", "data_file=x.raw", "a.qcow2"],
        &["amend", "-o", "compat=0.10", "b.qcow2"],
        &["snapshot", "-c", "s1", "b.qcow2"],
        &["snapshot", "-l", "b.qcow2"],
        &["resize", "b.qcow2", "2M"],
        &["resize", "f.qcow2", "3M"],
        &["map", "--output=json", "b.qcow2"],
        &["resize", "--preallocation=full", "f.qcow2", "4M"],
        &["map", "--output=json", "f.qcow2"],
        &["resize", "--shrink", "b.qcow2", "512K"],
        &["resize", "--shrink", "f.qcow2", "1536K"],
        &["map", "--output=json", "b.qcow2"],
        &["check", "f.qcow2"],
        &["check", "b.qcow2"],
        &["amend", "-o", "data_file_raw=off", "b.qcow2"],
        &["info", "--output=json", "b.qcow2"],
        &["amend", "-o", "data_file=new.raw", "f.qcow2"],
        &["info", "f.qcow2"],
        &["check", "f.qcow2"],
    ];
    for args in steps {
        p.same_output(args);
    }
    p.same_files(&["after resize and amend"]);
}

#[test]
fn hostile_data_file_names() {
    let s = Scratch::new();
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "-o", "data_file=d.raw", "a.qcow2", "1M"]);
    with_data_file_name(&s, "a.qcow2", "empty.qcow2", Some(b""));
    with_data_file_name(&s, "a.qcow2", "missing.qcow2", Some(b"missing.raw"));
    with_data_file_name(&s, "a.qcow2", "none.qcow2", None);
    // The name runs past the header cluster.
    std::fs::copy(s.path("a.qcow2"), s.path("long.qcow2")).unwrap();
    let at = std::fs::read(s.path("a.qcow2")).unwrap().windows(4).position(|w| w == b"DATA").unwrap();
    patch(&s.path("long.qcow2"), at as u64 + 4, &70000u32.to_be_bytes());
    // The raw bit without a data file.
    std::fs::copy(s.path("a.qcow2"), s.path("rawbit.qcow2")).unwrap();
    patch(&s.path("rawbit.qcow2"), 72, &0u64.to_be_bytes());
    patch(&s.path("rawbit.qcow2"), 88, &2u64.to_be_bytes());
    for image in ["empty.qcow2", "missing.qcow2", "none.qcow2", "rawbit.qcow2"] {
        s.assert_same(&["check", image]);
        s.assert_same(&["map", image]);
        s.assert_same(&["info", image]);
        s.assert_same(&["compare", image, image]);
    }
    // QEMU's words exactly: scripts match them.
    s.assert_same(&["check", "long.qcow2"]);

    // json: names are refused before anything is opened (QEMU would take
    // the name as a file name).
    with_data_file_name(&s, "a.qcow2", "json.qcow2", Some(br#"json:{"driver":"file","filename":"d.raw"}"#));
    let o = s.ours(&["check", "json.qcow2"]);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.stderr.contains("json: pseudo-filenames as data files"), "{o:?}");
}

/// Records every file the gate is asked about, and refuses them all.
struct Recorder(std::sync::Mutex<Vec<(std::path::PathBuf, Option<ImageFormat>)>>);

impl BackingGate for Recorder {
    fn check(&self, path: &Path, format: Option<ImageFormat>) -> oxqcow::Result<()> {
        self.0.lock().unwrap().push((path.to_path_buf(), format));
        Err(oxqcow::Error::InvalidArgument(format!("refused {}", path.display())))
    }
}

#[test]
fn data_files_go_through_the_backing_gate() {
    let s = Scratch::new();
    std::fs::create_dir(s.path("sub")).unwrap();
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "-o", "data_file=d.raw", "sub/a.qcow2", "1M"]);
    for args in [&["check", "sub/a.qcow2"][..], &["map", "sub/a.qcow2"], &["io", "-c", "read 0 1", "sub/a.qcow2"]] {
        let mut all = vec!["--forbid-backing"];
        all.extend_from_slice(args);
        let o = s.ours(&all);
        assert_eq!(o.code, 1, "{args:?}: {o:?}");
        assert!(o.stderr.contains("has an external data file ('d.raw')"), "{args:?}: {o:?}");
    }
    // The header still describes itself.
    let o = s.ours_ok(&["--forbid-backing", "info", "sub/a.qcow2"]);
    assert!(o.stdout.contains("data file: d.raw"), "{o:?}");

    // A caller's gate sees the resolved file, as raw, and can refuse it.
    let gate = Arc::new(Recorder(Default::default()));
    let opts = OpenOptions { read_only: true, backing: BackingPolicy::Gate(gate.clone()), ..Default::default() };
    let err = Image::open(&s.path("sub/a.qcow2"), &opts).err().expect("the gate refuses");
    assert!(err.to_string().contains("refused"), "{err}");
    let asked = gate.0.lock().unwrap().clone();
    assert_eq!(asked, vec![(s.path("sub").join("d.raw"), Some(ImageFormat::Raw))]);
}

#[test]
fn explicit_data_file_overrides_the_header() {
    let s = Scratch::new();
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "-o", "data_file=d.raw", "a.qcow2", "1M"]);
    s.qemu_io("qcow2", "a.qcow2", &["write -P 3 0 64k"]);
    std::fs::rename(s.path("d.raw"), s.path("moved.raw")).unwrap();
    let spec = format!(
        "driver=qcow2,file.filename={},data-file.filename={}",
        s.path("a.qcow2").display(),
        s.path("moved.raw").display()
    );
    for tool in ["qemu-io", env!("CARGO_BIN_EXE_oxqcow")] {
        let mut cmd = Command::new(tool);
        if tool != "qemu-io" {
            cmd.arg("io");
        }
        let o = cmd.args(["--image-opts", "-c", "read -P 3 0 64k", &spec]).output().unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success() && stdout.starts_with("read 65536/65536"), "{tool}: {o:?}");
    }
    // The library option, and its refusal for images without a data file.
    let opts = OpenOptions { read_only: true, data_file: Some(s.path("moved.raw")), ..Default::default() };
    let img = Image::open(&s.path("a.qcow2"), &opts).unwrap();
    let mut buf = vec![0u8; 65536];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 3));
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "plain.qcow2", "1M"]);
    let err = Image::open(&s.path("plain.qcow2"), &opts).err().expect("refused");
    assert_eq!(err.to_string(), "'data-file' can only be set for images with an external data file");
}

#[test]
fn the_data_file_is_locked_as_qemu_locks_it() {
    let s = Scratch::new();
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "-o", "data_file=d.raw", "a.qcow2", "1M"]);
    // What QEMU says when qemu-nbd holds the image (it forks once the
    // image is open, so its locks are in place)...
    let resize_raw = ["resize", "-f", "raw", "d.raw", "2M"];
    let pid_file = s.path("nbd.pid");
    let o = Command::new("qemu-nbd")
        .args(["--fork", "-f", "qcow2", "-k"])
        .arg(s.path("nbd.sock"))
        .arg("--pid-file")
        .arg(&pid_file)
        .arg("a.qcow2")
        .current_dir(s.dir.path())
        .output()
        .expect("qemu-nbd is required (install qemu-utils)");
    assert!(o.status.success(), "{o:?}");
    let by_qemu = s.qemu(&resize_raw);
    let pid = std::fs::read_to_string(&pid_file).unwrap().trim().to_string();
    assert!(Command::new("kill").arg(&pid).status().unwrap().success());
    // Wait for it to exit (and drop its locks). Forked, it is not our
    // child: where nobody reaps orphans it stays a zombie, which holds no
    // locks, so a zombie counts as gone (waiting for /proc to forget it
    // hung this test there).
    let alive = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| stat.rsplit(") ").next().is_some_and(|rest| !rest.starts_with('Z')))
    };
    // SIGTERM lets it exit cleanly; a machine loaded enough to delay that
    // past 30 s (seen once) gets SIGKILL, which drops the locks as well:
    // what QEMU said was recorded while it held them.
    let mut waited = 0;
    while alive() {
        std::thread::sleep(std::time::Duration::from_millis(20));
        waited += 1;
        if waited == 1500 {
            assert!(Command::new("kill").args(["-KILL", &pid]).status().unwrap().success() || !alive());
        }
        assert!(waited < 3000, "qemu-nbd {pid} did not exit within 30 s of SIGKILL");
    }
    assert_eq!(by_qemu.code, 1, "{by_qemu:?}");
    assert!(by_qemu.stderr.contains("Failed to get \"resize\" lock"), "{by_qemu:?}");
    // ... and when oxqcow holds it.
    let img = Image::open(&s.path("a.qcow2"), &OpenOptions::new()).unwrap();
    assert_eq!(s.qemu(&resize_raw), by_qemu);
    // Readers and writers of the data file itself are still welcome, as
    // with QEMU (only "resize" is not shared).
    s.qemu_io("raw", "d.raw", &["read 0 512"]);
    drop(img);
    // Read-only with force-share takes no unshared lock at all.
    let ro = Image::open(&s.path("a.qcow2"), &OpenOptions { read_only: true, force_share: true, ..Default::default() })
        .unwrap();
    s.qemu_ok(&resize_raw);
    drop(ro);
}
