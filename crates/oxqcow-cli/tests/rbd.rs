//! Ceph RBD images (QEMU's rbd driver) against a real single-node cluster
//! that this test binary starts once with `scripts/ceph-cluster.sh` (one
//! mon, one mgr, one memstore OSD, cephx on, on 127.0.0.1) and stops at the
//! end, whatever the cases did. qemu-img and qemu-io with their rbd driver
//! (qemu-block-extra) are the oracle: what oxqcow writes must read back
//! identically through them and the other way round, and their messages are
//! compared where they fail the same way. The binary has its own `main`
//! (`harness = false`) so that the cluster is started once and always
//! stopped; it fails loudly when Ceph's tools are missing.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::Scratch;

/// The cluster the cases share.
struct Cluster {
    dir: tempfile::TempDir,
    conf: String,
    keyring: String,
    mon_host: String,
    key: String,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/ceph-cluster.sh")
}

impl Cluster {
    fn start() -> Cluster {
        for tool in ["ceph-mon", "ceph-osd", "ceph-mgr", "rbd"] {
            let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output();
            assert!(
                found.is_ok_and(|o| o.status.success()),
                "{tool} is required by the RBD tests (apt-get install ceph-mon ceph-osd ceph-mgr radosgw ceph-common)"
            );
        }
        let dir = tempfile::Builder::new().prefix("oxrbd").tempdir_in("/tmp").unwrap();
        let out = Command::new("bash").arg(script()).arg("start").arg(dir.path()).output().unwrap();
        assert!(out.status.success(), "scripts/ceph-cluster.sh start failed: {}", String::from_utf8_lossy(&out.stderr));
        let env = String::from_utf8(out.stdout).unwrap();
        let var = |name: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("{name} missing from the cluster's env: {env}"))
                .to_string()
        };
        Cluster {
            conf: var("CEPH_CONF"),
            keyring: var("CEPH_KEYRING"),
            mon_host: var("CEPH_MON_HOST"),
            key: var("CEPH_KEY"),
            dir,
        }
    }

    fn stop(&self) {
        let _ = Command::new("bash").arg(script()).arg("stop").arg(self.dir.path()).status();
    }

    /// `rbd:rbd/IMAGE:conf=...`, the name both tools open.
    fn name(&self, image: &str) -> String {
        format!("rbd:rbd/{image}:conf={}", self.conf)
    }

    /// Runs Ceph's `rbd` tool, which must succeed; its standard output.
    fn rbd(&self, args: &[&str]) -> String {
        let out = Command::new("rbd").arg("--conf").arg(&self.conf).args(args).output().unwrap();
        assert!(out.status.success(), "rbd {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    fn images(&self) -> Vec<String> {
        self.rbd(&["ls", "rbd"]).lines().map(String::from).collect()
    }
}

/// A qcow2 image with data in a few places, zeros, and unallocated space.
fn source(s: &Scratch) -> String {
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "src.qcow2", "40M"]);
    s.qemu_io(
        "qcow2",
        "src.qcow2",
        &["write -P 0xab 1M 3M", "write -P 0xcd 20M 64k", "write -z 24M 1M", "write -P 0x01 39M 1M"],
    );
    "src.qcow2".into()
}

/// convert -O raw into RBD and back: qemu-img reads what oxqcow wrote as the
/// source, and maps it as oxqcow maps it.
fn convert_into_rbd_and_back(c: &Cluster) {
    let s = Scratch::new();
    let src = source(&s);
    let vol = c.name("conv");
    s.ours_ok(&["convert", "-O", "raw", &src, &vol]);
    s.qemu_ok(&["compare", "-f", "qcow2", "-F", "raw", &src, &vol]);
    let theirs = s.qemu_ok(&["map", "--output=json", "-f", "raw", &vol]);
    let ours = s.ours_ok(&["map", "--output=json", "-f", "raw", &vol]);
    assert_eq!(ours.stdout, theirs.stdout);
    s.assert_same(&["info", &vol]);
    s.assert_same(&["info", "--output=json", &vol]);
    // A probed raw image opened for writing: QEMU's warning, naming the node.
    s.assert_same(&["resize", &vol, "40M"]);
    // The data written shows as data, the rest as holes (diff iteration).
    assert!(ours.stdout.contains("\"data\": true"), "{}", ours.stdout);
    assert!(ours.stdout.contains("\"zero\": true, \"data\": false"), "{}", ours.stdout);
    // Back, and qemu-img's own copy into RBD read by oxqcow.
    s.ours_ok(&["convert", "-f", "raw", "-O", "qcow2", &vol, "back.qcow2"]);
    s.assert_identical(&src, "back.qcow2");
    s.assert_clean("back.qcow2");
    let theirs_vol = c.name("conv-qemu");
    s.qemu_ok(&["convert", "-O", "raw", &src, &theirs_vol]);
    let o = s.ours_ok(&["compare", "-f", "raw", "-F", "raw", &vol, &theirs_vol]);
    assert_eq!(o.stdout, "Images are identical.\n");
    // `-n` into the existing image (zeroing what the source has as zeros),
    // then compared by both tools.
    s.qemu_io("raw", &theirs_vol, &["write -P 0xee 0 8M"]);
    s.ours_ok(&["convert", "-n", "-O", "raw", &src, &theirs_vol]);
    s.assert_same(&["compare", "-f", "qcow2", "-F", "raw", &src, &theirs_vol]);
    // An image that exists already: qemu-img's message, and it is left alone.
    let before = s.qemu_ok(&["map", "--output=json", "-f", "raw", &vol]).stdout;
    s.assert_same(&["convert", "-O", "raw", &src, &vol]);
    assert_eq!(s.qemu_ok(&["map", "--output=json", "-f", "raw", &vol]).stdout, before);
}

/// A qcow2 image stored on RBD: created and written by oxqcow, checked and
/// read by QEMU; written by QEMU, read and checked by oxqcow.
fn qcow2_on_rbd(c: &Cluster) {
    let s = Scratch::new();
    let img = c.name("q-ours");
    s.ours_ok(&["create", "-q", "-f", "qcow2", &img, "32M"]);
    let o = s.ours_ok(&["io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0x11 5M 64k", &img]);
    assert!(!o.stdout.contains("failed"), "{o:?}");
    s.assert_clean(&img);
    s.qemu_io("qcow2", &img, &["read -P 0x5a 0 1M", "read -P 0x11 5M 64k", "read -P 0 1M 4M"]);
    let info = s.qemu_ok(&["info", "--output=json", &img]).stdout;
    assert!(info.contains("\"format\": \"qcow2\"") && info.contains("\"virtual-size\": 33554432"), "{info}");

    let img = c.name("q-qemu");
    s.qemu_ok(&["create", "-q", "-f", "qcow2", &img, "32M"]);
    s.qemu_io("qcow2", &img, &["write -P 0x33 3M 2M", "write -c -P 0x44 10M 64k"]);
    let o = s.ours_ok(&["io", "-f", "qcow2", "-c", "read -P 0x33 3M 2M", "-c", "read -P 0x44 10M 64k", &img]);
    assert!(!o.stdout.contains("failed"), "{o:?}");
    let o = s.ours_ok(&["check", "-f", "qcow2", &img]);
    assert!(o.stdout.contains("No errors were found on the image."), "{o:?}");
    // info names the nodes by their `json:` names and shows the object size
    // as the file's cluster size, as QEMU does.
    s.assert_same(&["info", &img]);
    s.assert_same(&["info", "--output=json", &img]);
    // A qcow2 image converted onto RBD by oxqcow.
    let src = source(&s);
    let img = c.name("q-conv");
    s.ours_ok(&["convert", "-O", "qcow2", &src, &img]);
    s.assert_clean(&img);
    s.assert_identical(&src, &img);
}

/// Discards give objects back; both tools then map the image alike.
fn discard_and_map(c: &Cluster) {
    let s = Scratch::new();
    let img = c.name("disc");
    s.ours_ok(&["create", "-q", "-f", "raw", &img, "24M"]);
    let o = s.ours_ok(&[
        "io",
        "-f",
        "raw",
        "-c",
        "write -P 0x77 0 12M",
        "-c",
        "discard 4M 4M",
        "-c",
        "write -z 8M 4M",
        &img,
    ]);
    assert!(!o.stdout.contains("failed"), "{o:?}");
    s.qemu_io("raw", &img, &["read -P 0x77 0 4M", "read -P 0 4M 8M", "read -P 0 12M 12M"]);
    let theirs = s.qemu_ok(&["map", "--output=json", "-f", "raw", &img]);
    let ours = s.ours_ok(&["map", "--output=json", "-f", "raw", &img]);
    assert_eq!(ours.stdout, theirs.stdout);
    assert!(
        ours.stdout.starts_with(
            "[{ \"start\": 0, \"length\": 4194304, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true"
        ),
        "{}",
        ours.stdout
    );
}

/// resize grows and (with --shrink) shrinks the RBD image.
fn resize(c: &Cluster) {
    let s = Scratch::new();
    let img = c.name("rsz");
    s.ours_ok(&["create", "-q", "-f", "raw", &img, "8M"]);
    s.ours_ok(&["io", "-f", "raw", "-c", "write -P 0x42 7M 1M", &img]);
    s.ours_ok(&["resize", "-f", "raw", &img, "20M"]);
    assert!(c.rbd(&["info", "rbd/rsz"]).contains("size 20 MiB"));
    s.qemu_io("raw", &img, &["read -P 0x42 7M 1M", "read -P 0 8M 12M"]);
    s.ours_ok(&["resize", "-f", "raw", "--shrink", &img, "4M"]);
    let info = s.qemu_ok(&["info", "--output=json", "-f", "raw", &img]).stdout;
    assert!(info.contains("\"virtual-size\": 4194304"), "{info}");
}

/// A snapshot (`@snap`) reads as it was taken and refuses writes.
fn snapshot(c: &Cluster) {
    let s = Scratch::new();
    let img = c.name("snp");
    s.ours_ok(&["create", "-q", "-f", "raw", &img, "8M"]);
    s.ours_ok(&["io", "-f", "raw", "-c", "write -P 0x10 0 1M", &img]);
    c.rbd(&["snap", "create", "rbd/snp@s1"]);
    s.ours_ok(&["io", "-f", "raw", "-c", "write -P 0x20 0 1M", &img]);
    let snap = format!("rbd:rbd/snp@s1:conf={}", c.conf);
    let o = s.ours_ok(&["io", "-r", "-f", "raw", "-c", "read -P 0x10 0 1M", &snap]);
    assert!(!o.stdout.contains("failed"), "{o:?}");
    s.ours_ok(&["convert", "-f", "raw", "-O", "raw", &snap, "snap.raw"]);
    s.qemu_ok(&["compare", "-f", "raw", "-F", "raw", "snap.raw", &snap]);
    let o = s.ours(&["io", "-f", "raw", "-c", "write 0 4k", &snap]);
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("rbd snapshots are read-only"), "{o:?}");
    // info lists the RBD image's snapshots under both nodes, as QEMU does.
    for name in [&img, &snap] {
        let o = s.assert_same(&["info", name]);
        assert!(o.stdout.contains("Snapshot list:"), "{o:?}");
        s.assert_same(&["info", "--output=json", name]);
    }
    // A snapshot that does not exist: QEMU's message.
    let none = format!("rbd:rbd/snp@nope:conf={}", c.conf);
    s.assert_same(&["info", "-f", "raw", &none]);
}

/// `--image-opts driver=rbd,...`, a `json:` name with an rbd file, and the
/// key from `key-secret` with a configuration that has no keyring.
fn options_and_secrets(c: &Cluster) {
    let s = Scratch::new();
    let img = c.name("opts");
    s.ours_ok(&["create", "-q", "-f", "qcow2", &img, "4M"]);
    s.ours_ok(&["io", "-f", "qcow2", "-c", "write -P 0x66 0 64k", &img]);
    let opts = format!("driver=qcow2,file.driver=rbd,file.pool=rbd,file.image=opts,file.conf={}", c.conf);
    let o = s.ours_ok(&["io", "--image-opts", "-c", "read -P 0x66 0 64k", &opts]);
    assert!(!o.stdout.contains("failed"), "{o:?}");
    let json = format!(
        r#"json:{{"driver":"qcow2","file":{{"driver":"rbd","pool":"rbd","image":"opts","conf":"{}"}}}}"#,
        c.conf
    );
    s.ours_ok(&["convert", "-O", "raw", &json, "opts.raw"]);
    // info names these images as QEMU names them; an rbd node named alone is
    // described alone.
    let node = format!(r#"json:{{"driver":"rbd","pool":"rbd","image":"opts","conf":"{}"}}"#, c.conf);
    for args in [&["info", "--image-opts", opts.as_str()][..], &["info", &json], &["info", "--output=json", &node]] {
        s.assert_same(args);
    }
    s.qemu_ok(&["compare", "-f", "raw", "-F", "qcow2", "opts.raw", &img]);
    // A configuration naming the monitors only: the key must come from the secret.
    let bare = s.path("bare.conf");
    std::fs::write(&bare, format!("[global]\nmon host = {}\n", c.mon_host)).unwrap();
    let bare = bare.to_str().unwrap();
    let with_key = |key: &str| {
        vec![
            "--object".to_string(),
            format!("secret,id=k,data={key}"),
            "-c".into(),
            "read -P 0x66 0 64k".into(),
            "--image-opts".into(),
            format!("driver=qcow2,file.driver=rbd,file.pool=rbd,file.image=opts,file.conf={bare},file.user=admin,file.key-secret=k"),
        ]
    };
    let args = with_key(&c.key);
    let o = s.ours_ok(&["io"].into_iter().chain(args.iter().map(String::as_str)).collect::<Vec<_>>());
    assert!(!o.stdout.contains("failed"), "{o:?}");
    let wrong = "AQBKohZrAAAAABAAqGOGc7m0u7Sg1fYpGS1cHQ==";
    let args = with_key(wrong);
    let o = s.ours(&["io"].into_iter().chain(args.iter().map(String::as_str)).collect::<Vec<_>>());
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("error connecting: Permission denied"), "{o:?}");
}

/// The other subcommands on RBD: dd into a new RBD image, measure, internal
/// snapshots, bitmaps and amend of a qcow2 image stored on RBD, each checked
/// by qemu-img.
fn other_subcommands(c: &Cluster) {
    let s = Scratch::new();
    let src = source(&s);
    s.qemu_ok(&["convert", "-O", "raw", &src, "src.raw"]);
    let dd = c.name("dd");
    s.ours_ok(&["dd", "-f", "raw", "-O", "raw", "bs=1M", "if=src.raw", &format!("of={dd}")]);
    s.qemu_ok(&["compare", "-f", "raw", "-F", "raw", "src.raw", &dd]);
    let img = c.name("subs");
    s.ours_ok(&["convert", "-O", "qcow2", &src, &img]);
    let theirs = s.qemu_ok(&["measure", "-O", "qcow2", "-f", "qcow2", &img]);
    let ours = s.ours_ok(&["measure", "-O", "qcow2", "-f", "qcow2", &img]);
    assert_eq!(ours.stdout, theirs.stdout);
    s.ours_ok(&["snapshot", "-c", "s1", "-f", "qcow2", &img]);
    s.ours_ok(&["io", "-f", "qcow2", "-c", "write -P 0x99 1M 64k", &img]);
    s.ours_ok(&["bitmap", "--add", "-f", "qcow2", &img, "b0"]);
    s.ours_ok(&["amend", "-f", "qcow2", "-o", "lazy_refcounts=on", &img]);
    s.assert_clean(&img);
    let list = s.qemu_ok(&["snapshot", "-l", "-f", "qcow2", &img]).stdout;
    assert!(list.contains("s1"), "{list}");
    let info = s.qemu_ok(&["info", "-f", "qcow2", &img]).stdout;
    assert!(info.contains("name: b0") && info.contains("lazy refcounts: true"), "{info}");
    s.qemu_io("qcow2", &img, &["read -P 0x99 1M 64k", "read -P 0xab 2M 1M"]);
    // Applying a snapshot needs no active bitmap (QEMU's rule).
    s.ours_ok(&["bitmap", "--remove", "-f", "qcow2", &img, "b0"]);
    s.ours_ok(&["snapshot", "-a", "s1", "-f", "qcow2", &img]);
    s.assert_identical(&src, &img);
}

/// `serve` exports a qcow2 image stored on RBD; qemu-img reads it over NBD.
fn serve(c: &Cluster) {
    let s = Scratch::new();
    let src = source(&s);
    let img = c.name("served");
    s.ours_ok(&["convert", "-O", "qcow2", &src, &img]);
    let sock = s.path("nbd.sock");
    let mut server = Command::new(env!("CARGO_BIN_EXE_oxqcow"))
        .args(["serve", "-r", "-f", "qcow2", "-k"])
        .arg(&sock)
        .arg(&img)
        .spawn()
        .unwrap();
    // The socket appears once the image is open; a server that died says so.
    for _ in 0..2400 {
        if sock.exists() {
            break;
        }
        if let Some(status) = server.try_wait().unwrap() {
            panic!("oxqcow serve exited: {status}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let o = s.qemu(&["compare", "-f", "qcow2", "-F", "raw", &src, &uri]);
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(o.stdout, "Images are identical.\n");
}

/// `mount` shows an RBD image as a file through FUSE: it reads as the
/// source, a write through the file lands in the RBD image.
fn mount(c: &Cluster) {
    use std::io::{Seek, SeekFrom, Write};
    let s = Scratch::new();
    let src = source(&s);
    s.qemu_ok(&["convert", "-O", "raw", &src, "src.raw"]);
    let img = c.name("mnt");
    s.ours_ok(&["convert", "-O", "raw", &src, &img]);
    let point = s.path("point");
    std::fs::File::create(&point).unwrap();
    let pidfile = s.path("pid");
    let o = Command::new(env!("CARGO_BIN_EXE_oxqcow"))
        .args(["mount", "--daemonize", "--pidfile"])
        .arg(&pidfile)
        .args(["-f", "raw", &img])
        .arg(&point)
        .output()
        .unwrap();
    assert!(o.status.success(), "mount: {}", String::from_utf8_lossy(&o.stderr));
    let pid = std::fs::read_to_string(&pidfile).unwrap().trim().to_string();
    let seen = std::fs::read(&point);
    let written = std::fs::OpenOptions::new().write(true).open(&point).and_then(|mut f| {
        f.seek(SeekFrom::Start(8 << 20))?;
        f.write_all(&[0x5c; 65536])?;
        f.sync_all()
    });
    let unmounted = Command::new("fusermount3").arg("-u").arg(&point).status().unwrap();
    assert!(unmounted.success(), "fusermount3 -u failed");
    // The server flushes and closes the image once unmounted.
    let gone = (0..2400).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        !Path::new(&format!("/proc/{pid}")).exists()
    });
    assert!(gone, "oxqcow mount did not exit after the unmount");
    assert!(seen.unwrap() == std::fs::read(s.path("src.raw")).unwrap(), "the mounted file differs from the source");
    written.unwrap();
    s.qemu_io("raw", &img, &["read -P 0x5c 8M 64k", "read -P 0xab 1M 3M"]);
}

/// Wrong credentials, no such pool, no such image, a bad option: QEMU's
/// messages; a refused connection fails instead of waiting (QEMU waits for
/// librados's 300 s); a failed convert leaves no image behind.
fn errors(c: &Cluster) {
    let s = Scratch::new();
    for name in [
        format!("rbd:rbd/nope:conf={}", c.conf),
        format!("rbd:nopool/x:conf={}", c.conf),
        format!("rbd:rbd/x:conf={}:id=nobody", c.conf),
        format!("rbd:rbd/x:conf={}:key=AQBKohZrAAAAABAAqGOGc7m0u7Sg1fYpGS1cHQ==", c.conf),
        format!("rbd:rbd/x:conf={}:no_such_option=1", c.conf),
        format!("rbd:rbd/x:conf={}:novalue", c.conf),
        "rbd:rbd/x:conf=/nonexistent/ceph.conf".to_string(),
        "rbd:justapool".to_string(),
    ] {
        let o = s.assert_same(&["info", &name]);
        assert_eq!(o.code, 1, "{o:?}");
    }
    let src = source(&s);
    let o = s.ours(&["convert", "-O", "raw", &src, &format!("rbd:rbd/denied:conf={}:id=nobody", c.conf)]);
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("error connecting: Permission denied"), "{o:?}");
    assert!(!c.images().contains(&"denied".to_string()));
    let refused = format!("rbd:rbd/x:mon_host=127.0.0.1\\:1:id=admin:keyring={}", c.keyring);
    let o = s.ours(&["info", &refused]);
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("error connecting: Connection timed out"), "{o:?}");
}

/// The OSD goes away in the middle of a convert into RBD (held back by
/// `-r`, so it is still copying when the image appears): the convert fails
/// with an error instead of hanging (librados's request timeouts). Runs
/// last: the cluster cannot store data afterwards.
fn osd_gone(c: &Cluster) {
    let s = Scratch::new();
    let src = source(&s);
    let vol = c.name("gone");
    let mut convert = Command::new(env!("CARGO_BIN_EXE_oxqcow"))
        .args(["convert", "-r", "512k", "-O", "raw", &src, &vol])
        .current_dir(s.dir.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    while !c.images().contains(&"gone".to_string()) {
        assert!(convert.try_wait().unwrap().is_none(), "the convert ended before the image appeared");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let pid = std::fs::read_to_string(c.dir.path().join("run/osd.0.pid")).unwrap();
    let status = Command::new("kill").args(["-KILL", pid.trim()]).status().unwrap();
    assert!(status.success());
    let out = convert.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Connection timed out"), "{stderr}");
}

/// The storage itself: writes and zero writes past the end grow the image
/// (as QEMU's rbd driver grows it), a punched hole keeps its length, reads
/// past the end are zeros, allocation comes from diff iteration, and a
/// read-only open refuses writes.
fn storage(c: &Cluster) {
    use oxqcow::Storage;
    use oxqcow_rbd::{RbdOptions, RbdStorage};
    let o = RbdOptions::from_filename(&c.name("raw-storage")).unwrap();
    oxqcow_rbd::create(&o, 4 << 20).unwrap();
    let st = RbdStorage::open(&o, false).unwrap();
    assert_eq!(st.len().unwrap(), 4 << 20);
    st.write_at(&[7u8; 4096], (4 << 20) - 2048).unwrap();
    assert_eq!(st.len().unwrap(), (4 << 20) + 2048);
    st.write_zeroes(12 << 20, 4096).unwrap();
    assert_eq!(st.len().unwrap(), (12 << 20) + 4096);
    st.punch_hole(12 << 20, 1 << 20).unwrap();
    assert_eq!(st.len().unwrap(), (12 << 20) + 4096);
    let mut buf = vec![1u8; 8192];
    st.read_at(&mut buf, (12 << 20) - 4096).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    st.read_at(&mut buf[..4096], (4 << 20) - 2048).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 7));
    let runs = st.data_runs(0, st.len().unwrap()).unwrap();
    assert_eq!(runs.first(), Some(&(0, 8 << 20, true)), "{runs:?}");
    assert!(runs.iter().all(|r| r.2 == (r.0 < 8 << 20)), "{runs:?}");
    st.sync().unwrap();
    drop(st);
    let ro = RbdStorage::open(&o, true).unwrap();
    assert_eq!(ro.write_at(&[0], 0).unwrap_err().raw_os_error(), Some(libc::EROFS));
}

/// A named case run against the shared cluster.
type Case = (&'static str, fn(&Cluster));

fn main() {
    let cases: &[Case] = &[
        ("storage", storage),
        ("convert_into_rbd_and_back", convert_into_rbd_and_back),
        ("qcow2_on_rbd", qcow2_on_rbd),
        ("discard_and_map", discard_and_map),
        ("resize", resize),
        ("snapshot", snapshot),
        ("options_and_secrets", options_and_secrets),
        ("other_subcommands", other_subcommands),
        ("serve", serve),
        ("mount", mount),
        ("errors", errors),
        ("osd_gone", osd_gone),
    ];
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let selected: Vec<_> =
        cases.iter().filter(|(n, _)| filter.is_empty() || filter.iter().any(|f| n.contains(f.as_str()))).collect();
    if selected.is_empty() {
        println!("running 0 tests");
        return;
    }
    let cluster = Cluster::start();
    let mut failed = Vec::new();
    for (name, case) in &selected {
        println!("test {name} ...");
        match catch_unwind(AssertUnwindSafe(|| case(&cluster))) {
            Ok(()) => println!("test {name} ... ok"),
            Err(_) => {
                println!("test {name} ... FAILED");
                failed.push(*name);
            }
        }
    }
    cluster.stop();
    drop(cluster);
    if !failed.is_empty() {
        eprintln!("failed: {failed:?}");
        std::process::exit(1);
    }
    println!("test result: ok. {} passed", selected.len());
}
