//! `oxqcow mount` through the real kernel FUSE: images made and verified
//! by QEMU's qemu-img and qemu-io, the mounted file used by ordinary tools
//! (dd, python's os module, util-linux's fallocate and losetup, mkfs.ext4,
//! e2fsck).
//!
//! Every mount is a `Mounted` guard: dropping it (a failed assertion
//! included) unmounts with `fusermount3 -u`, then `umount -l`, and kills
//! the server, so no mount outlives its test. Every command that touches
//! the mounted file runs under `timeout`, so a server that stops answering
//! fails the test instead of hanging it. /dev/fuse, fusermount3 (fuse3)
//! and QEMU's tools are required: a test fails and says what is missing.
//! Waits are bounded and fail loudly; nothing asserts on time.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

mod external;
use external::{assert_clean, qemu_img, require, run, run_ok, OXQCOW, WAIT};

/// Bound, in seconds, on any one command that touches a mounted file.
const TIMEOUT: &str = "120";

fn require_fuse() {
    assert!(Path::new("/dev/fuse").exists(), "/dev/fuse is required by this test (modprobe fuse)");
    require("fusermount3", "fuse3");
}

/// Runs a command on the mounted file, bounded by `timeout`.
fn bounded(program: &str, args: &[&str]) -> Output {
    let mut all = vec![TIMEOUT, program];
    all.extend_from_slice(args);
    run("timeout", &all)
}

fn bounded_ok(program: &str, args: &[&str]) -> String {
    let mut all = vec![TIMEOUT, program];
    all.extend_from_slice(args);
    run_ok("timeout", &all)
}

/// Runs a python3 script (arguments in `sys.argv[1:]`) on the mounted file.
fn py(script: &str, args: &[&str]) -> String {
    require("python3", "python3");
    let mut all = vec!["-c", script];
    all.extend_from_slice(args);
    bounded_ok("python3", &all)
}

/// Runs qemu-io commands on a qcow2 image; every read pattern must verify.
fn qemu_io(image: &Path, cmds: &[&str]) -> String {
    external::qemu_io(&["-f", "qcow2", image.to_str().unwrap()], cmds)
}

/// The guest disk as qemu-img sees it.
fn qemu_raw(dir: &Path, image: &Path) -> Vec<u8> {
    let raw = dir.join("qemu-view.raw");
    qemu_img(&["convert", "-U", "-O", "raw", image.to_str().unwrap(), raw.to_str().unwrap()]);
    let bytes = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    bytes
}

/// `qemu-img map --output=json` as (start, length, zero, data) runs.
fn qemu_map(image: &Path) -> Vec<(u64, u64, bool, bool)> {
    let out = qemu_img(&["map", "-U", "--output=json", image.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["zero"].as_bool().unwrap(),
                e["data"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// The runs `qemu-img map` says hold data, adjacent ones merged.
fn qemu_data_runs(image: &Path) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (start, len, _, data) in qemu_map(image) {
        if !data {
            continue;
        }
        match runs.last_mut() {
            Some(last) if last.0 + last.1 == start => last.1 += len,
            _ => runs.push((start, len)),
        }
    }
    runs
}

/// Whether qemu-img map says every byte of the range reads as zeros and
/// none of it is stored as data.
fn map_says_zero(image: &Path, offset: u64, len: u64) -> bool {
    qemu_map(image)
        .iter()
        .filter(|(s, l, _, _)| s + l > offset && *s < offset + len)
        .all(|&(_, _, zero, data)| zero && !data)
}

fn wait_child(child: &mut Child) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if start.elapsed() > WAIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("oxqcow mount did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether a FUSE file system is mounted at `path` (from mountinfo, which
/// never touches the mount itself).
fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = path.to_str().unwrap();
    info.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        f.len() > 4 && f[4] == want && l.contains(" - fuse")
    })
}

/// A running `oxqcow mount`; dropping it unmounts and stops it.
struct Mounted {
    child: Option<Child>,
    point: PathBuf,
}

impl Mounted {
    fn new(args: &[&str], image: &Path, point: &Path) -> Mounted {
        require_fuse();
        let point = point.canonicalize().unwrap();
        let child = Command::new(OXQCOW)
            .arg("mount")
            .args(args)
            .arg(image)
            .arg(&point)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut m = Mounted { child: Some(child), point };
        let start = Instant::now();
        while !is_mounted(&m.point) {
            let child = m.child.as_mut().unwrap();
            if child.try_wait().unwrap().is_some() {
                let out = m.child.take().unwrap().wait_with_output().unwrap();
                panic!(
                    "oxqcow mount {args:?} exited before mounting ({}):\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            assert!(start.elapsed() < WAIT, "oxqcow mount {args:?} did not mount {}", m.point.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    fn path(&self) -> &str {
        self.point.to_str().unwrap()
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Unmounts with fusermount3 (retrying while the kernel still holds the
    /// file, e.g. a loop device being released) and returns the server's
    /// exit status and stderr once it exited.
    fn unmount(self) -> (ExitStatus, String) {
        let start = Instant::now();
        loop {
            let o = run("fusermount3", &["-u", self.path()]);
            if o.status.success() {
                break;
            }
            assert!(
                start.elapsed() < WAIT,
                "fusermount3 -u {} keeps failing: {}",
                self.path(),
                String::from_utf8_lossy(&o.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self.finish()
    }

    /// Waits for the server to exit by itself (after an unmount or signal).
    fn finish(mut self) -> (ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        let status = wait_child(&mut child);
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            std::io::Read::read_to_string(&mut e, &mut err).unwrap();
        }
        assert!(!is_mounted(&self.point), "{} is still mounted after the server exited", self.point.display());
        (status, err)
    }

    /// Unmounts and expects a clean exit.
    fn unmount_ok(self) {
        let (status, err) = self.unmount();
        assert!(status.success(), "oxqcow mount exited with {status}:\n{err}");
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if is_mounted(&self.point) {
            let ok = run("fusermount3", &["-u", self.path()]).status.success();
            if !ok {
                let _ = run("umount", &["-l", self.path()]);
            }
        }
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A scratch directory.
struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Dir {
        Dir { dir: tempfile::tempdir().unwrap() }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    /// A qcow2 image made by qemu-img.
    fn image(&self, name: &str, size: &str, extra: &[&str]) -> PathBuf {
        let p = self.path(name);
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        args.extend_from_slice(extra);
        args.push(p.to_str().unwrap());
        args.push(size);
        qemu_img(&args);
        p
    }
    /// An empty regular file to mount over.
    fn point(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, b"").unwrap();
        p
    }
}

const MIB: u64 = 1 << 20;

#[test]
fn reads_match_qemu_img_convert_through_a_backing_chain() {
    let d = Dir::new();
    let base = d.image("base.qcow2", "16M", &[]);
    qemu_io(&base, &["write -P 0x11 0 4M", "write -P 0x22 8M 1M", "write -c -P 0x33 12M 64k"]);
    let top = d.image("top.qcow2", "16M", &["-F", "qcow2", "-b", base.to_str().unwrap()]);
    qemu_io(&top, &["write -P 0x44 1M 100k", "write -z 2M 64k", "write -P 0x55 15M 4097", "discard 8M 64k"]);
    let expected = qemu_raw(d.dir.path(), &top);
    let point = d.point("disk");
    let m = Mounted::new(&["-r"], &top, &point);
    let meta = std::fs::metadata(&point).unwrap();
    assert!(meta.is_file());
    assert_eq!(meta.len(), 16 * MIB);
    assert_eq!(meta.permissions().mode() & 0o777, 0o400, "a read-only export is r--------");
    // Read with odd sizes so that requests straddle clusters and the end.
    let out = bounded("dd", &[&format!("if={}", m.path()), "bs=77777", "status=none"]);
    assert!(out.status.success(), "dd: {}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout == expected, "the mounted file differs from qemu-img convert's output");
    // Short reads at the end of the disk, nothing past it.
    let tail = py(
        "import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); \
         print(len(os.pread(fd, 100, 16*2**20 - 10)), len(os.pread(fd, 100, 17*2**20)))",
        &[m.path()],
    );
    assert_eq!(tail.trim(), "10 0");
    m.unmount_ok();
}

#[test]
fn writes_reach_the_image() {
    let d = Dir::new();
    let img = d.image("w.qcow2", "8M", &[]);
    qemu_io(&img, &["write -P 0x61 0 2M"]);
    let point = d.point("disk");
    let m = Mounted::new(&["-f", "qcow2"], &img, &point);
    assert_eq!(std::fs::metadata(&point).unwrap().permissions().mode() & 0o777, 0o600);
    // dd with its own block size, over allocated and unallocated clusters.
    let pattern = d.path("pattern");
    std::fs::write(&pattern, vec![0x7au8; 3 * 65536]).unwrap();
    bounded_ok(
        "dd",
        &[
            &format!("if={}", pattern.display()),
            &format!("of={}", m.path()),
            "bs=65536",
            "seek=24",
            "conv=notrunc",
            "status=none",
        ],
    );
    // Unaligned writes, one of them crossing the end of the disk: it is
    // cut short there, and a write past the end fails with EIO.
    let out = py(
        "import os,sys; fd=os.open(sys.argv[1], os.O_RDWR)\n\
         print(os.pwrite(fd, b'\\x5b' * 1000, 3*2**20 + 12345))\n\
         print(os.pwrite(fd, b'\\x5c' * 300, 8*2**20 - 100))\n\
         try:\n    os.pwrite(fd, b'x', 8*2**20)\nexcept OSError as e:\n    print(e.errno)\n\
         os.fsync(fd)",
        &[m.path()],
    );
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["1000", "100", "5"]);
    m.unmount_ok();
    qemu_io(
        &img,
        &[
            "read -P 0x61 0 1572864",
            "read -P 0x7a 1572864 196608",
            "read -P 0x61 1769472 327680",
            "read -P 0x0 2M 1060921",
            "read -P 0x5b 3158073 1000",
            "read -P 0x5c 8388508 100",
        ],
    );
    assert_eq!(qemu_raw(d.dir.path(), &img).len() as u64, 8 * MIB, "the disk did not grow");
    assert_clean(&img);
}

#[test]
fn punch_hole_and_zero_range_become_zero_clusters() {
    require("fallocate", "util-linux");
    let d = Dir::new();
    let img = d.image("z.qcow2", "8M", &[]);
    qemu_io(&img, &["write -P 0x42 0 8M"]);
    let unmap = d.image("u.qcow2", "8M", &[]);
    qemu_io(&unmap, &["write -P 0x42 0 8M"]);
    let point = d.point("disk");
    let m = Mounted::new(&[], &img, &point);
    // fallocate -p is PUNCH_HOLE|KEEP_SIZE, -z is ZERO_RANGE.
    bounded_ok("fallocate", &["-p", "-o", "1M", "-l", "1M", m.path()]);
    bounded_ok("fallocate", &["-z", "-o", "3M", "-l", "512K", m.path()]);
    // ZERO_RANGE over part of a cluster writes zeros as data.
    bounded_ok("fallocate", &["-z", "-o", "5000", "-l", "3000", m.path()]);
    // A hole cannot be punched into part of a cluster that holds data.
    let errno = py(
        "import ctypes,os,sys; libc=ctypes.CDLL(None, use_errno=True); fd=os.open(sys.argv[1], os.O_RDWR)\n\
         r=libc.fallocate(fd, 3, ctypes.c_long(100), ctypes.c_long(1000)); print(r, ctypes.get_errno())",
        &[m.path()],
    );
    assert_eq!(errno.trim(), "-1 95", "punching part of a data cluster must fail with EOPNOTSUPP");
    // Past the end with KEEP_SIZE: cut at the end of the disk.
    bounded_ok("fallocate", &["-p", "-o", "7M", "-l", "4M", m.path()]);
    m.unmount_ok();
    assert!(map_says_zero(&img, MIB, MIB), "{:?}", qemu_map(&img));
    assert!(map_says_zero(&img, 3 * MIB, 512 * 1024), "{:?}", qemu_map(&img));
    assert!(map_says_zero(&img, 7 * MIB, MIB), "{:?}", qemu_map(&img));
    assert!(!map_says_zero(&img, 0, 65536), "the partial zero range must stay data");
    qemu_io(
        &img,
        &[
            "read -P 0x42 0 5000",
            "read -P 0 5000 3000",
            "read -P 0x42 8000 1040576",
            "read -P 0 1M 1M",
            "read -P 0x42 2M 1M",
            "read -P 0 3M 512K",
            "read -P 0x42 3670016 3670016",
            "read -P 0 7M 1M",
        ],
    );
    assert_clean(&img);

    // With --discard=unmap the punched clusters give their host clusters back.
    let before = std::fs::metadata(&unmap).unwrap().len();
    let m = Mounted::new(&["--discard=unmap"], &unmap, &point);
    bounded_ok("fallocate", &["-p", "-o", "0", "-l", "4M", m.path()]);
    m.unmount_ok();
    let map = qemu_img(&["map", "--output=json", unmap.to_str().unwrap()]);
    let first: serde_json::Value = serde_json::from_str::<serde_json::Value>(&map).unwrap()[0].clone();
    assert_eq!(first["length"].as_u64(), Some(4 * MIB), "{map}");
    assert_eq!(first["zero"].as_bool(), Some(true), "{map}");
    assert!(first.get("offset").is_none(), "unmapped zero clusters have no host offset: {map}");
    qemu_io(&unmap, &["read -P 0 0 4M", "read -P 0x42 4M 4M"]);
    assert_clean(&unmap);
    let check = qemu_img(&["check", "--output=json", unmap.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&check).unwrap();
    assert!(
        v["allocated-clusters"].as_u64().unwrap() * 65536 <= 4 * MIB,
        "the punched clusters are still allocated: {check} (file was {before} bytes)"
    );
}

#[test]
fn seek_data_and_hole_match_qemu_img_map() {
    let d = Dir::new();
    let base = d.image("base.qcow2", "32M", &[]);
    qemu_io(&base, &["write -P 1 20M 3M"]);
    let img = d.image("s.qcow2", "32M", &["-F", "qcow2", "-b", base.to_str().unwrap()]);
    qemu_io(
        &img,
        &["write -P 2 0 64k", "write -P 3 1M 200k", "write -z 1088k 64k", "write -c -P 4 8M 64k", "write -P 5 31M 1M"],
    );
    let expected = qemu_data_runs(&img);
    assert!(expected.len() >= 5, "the image should have several data runs: {expected:?}");
    let point = d.point("disk");
    let m = Mounted::new(&["-r"], &img, &point);
    // Walk the file with SEEK_DATA/SEEK_HOLE, as cp --sparse=auto does.
    let out = py(
        "import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); size=os.fstat(fd).st_size; pos=0\n\
         while pos < size:\n\
         \x20   try:\n        start=os.lseek(fd, pos, os.SEEK_DATA)\n    except OSError:\n        break\n\
         \x20   end=os.lseek(fd, start, os.SEEK_HOLE); print(start, end-start); pos=end\n\
         for off in (size, size + 1):\n\
         \x20   for how in (os.SEEK_DATA, os.SEEK_HOLE):\n\
         \x20       try:\n            print('at', off, how, os.lseek(fd, off, how))\n\
         \x20       except OSError as e:\n            print('at', off, how, 'errno', e.errno)",
        &[m.path()],
    );
    m.unmount_ok();
    let mut seen = Vec::new();
    let mut edges = Vec::new();
    for line in out.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if w[0] == "at" {
            edges.push(w[1..].join(" "));
        } else {
            seen.push((w[0].parse::<u64>().unwrap(), w[1].parse::<u64>().unwrap()));
        }
    }
    assert_eq!(seen, expected, "SEEK_DATA/SEEK_HOLE runs differ from qemu-img map's data runs");
    let size = 32 * MIB;
    // At the end: no data (ENXIO), a hole at the end itself, ENXIO past it.
    assert_eq!(
        edges,
        [
            format!("{size} 3 errno 6"),
            format!("{size} 4 {size}"),
            format!("{} 3 errno 6", size + 1),
            format!("{} 4 errno 6", size + 1)
        ]
    );
}

#[test]
fn read_only_export_refuses_writes() {
    require("fallocate", "util-linux");
    let d = Dir::new();
    let img = d.image("r.qcow2", "4M", &[]);
    qemu_io(&img, &["write -P 0x21 0 1M"]);
    let copy = d.path("copy.qcow2");
    std::fs::copy(&img, &copy).unwrap();
    let point = d.point("disk");
    let m = Mounted::new(&["-r"], &img, &point);
    let out = py(
        "import os,sys; fd=os.open(sys.argv[1], os.O_RDWR)\n\
         for name, f in (('write', lambda: os.pwrite(fd, b'x', 0)), ('truncate', lambda: os.ftruncate(fd, 2**20)),\n\
         \x20             ('chmod', lambda: os.chmod(sys.argv[1], 0o600))):\n\
         \x20   try:\n        f(); print(name, 'ok')\n    except OSError as e:\n        print(name, e.errno)",
        &[m.path()],
    );
    // EACCES for data and size, EROFS for a write permission, as QEMU.
    assert_eq!(out.lines().collect::<Vec<_>>(), ["write 13", "truncate 13", "chmod 30"]);
    let o = bounded("fallocate", &["-p", "-o", "0", "-l", "64K", m.path()]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("Permission denied"), "{o:?}");
    // Others may read the image meanwhile with -U.
    qemu_img(&["info", "-U", img.to_str().unwrap()]);
    m.unmount_ok();
    let cmp = qemu_img(&["compare", img.to_str().unwrap(), copy.to_str().unwrap()]);
    assert!(cmp.contains("Images are identical"), "{cmp}");
    assert_eq!(std::fs::read(&img).unwrap(), std::fs::read(&copy).unwrap(), "a read-only mount changed the file");
}

#[test]
fn truncate_resizes_and_growable_writes_grow() {
    let d = Dir::new();
    let img = d.image("t.qcow2", "4M", &[]);
    qemu_io(&img, &["write -P 0x31 0 4M"]);
    let point = d.point("disk");
    let m = Mounted::new(&[], &img, &point);
    let out = py(
        "import os,sys; fd=os.open(sys.argv[1], os.O_RDWR)\n\
         os.ftruncate(fd, 6*2**20); print(os.fstat(fd).st_size)\n\
         os.ftruncate(fd, 3*2**20); print(os.fstat(fd).st_size)\n\
         try:\n    os.ftruncate(fd, 3*2**20 + 100)\nexcept OSError as e:\n    print('errno', e.errno)",
        &[m.path()],
    );
    assert_eq!(out.lines().collect::<Vec<_>>(), ["6291456", "3145728", "errno 22"]);
    m.unmount_ok();
    let info = qemu_img(&["info", "--output=json", img.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["virtual-size"].as_u64(), Some(3 * MIB));
    assert_clean(&img);

    let m = Mounted::new(&["--growable"], &img, &point);
    let out = py(
        "import os,sys; fd=os.open(sys.argv[1], os.O_RDWR)\n\
         print(os.pwrite(fd, b'\\x77' * 4096, 5*2**20)); print(os.fstat(fd).st_size)",
        &[m.path()],
    );
    assert_eq!(out.lines().collect::<Vec<_>>(), ["4096", "5246976"]);
    m.unmount_ok();
    qemu_io(&img, &["read -P 0x31 0 3M", "read -P 0 3M 2M", "read -P 0x77 5M 4096"]);
    assert_clean(&img);
}

#[test]
fn directory_mount_point_shows_one_file_named_after_the_image() {
    let d = Dir::new();
    let img = d.image("disk image.qcow2", "2M", &[]);
    qemu_io(&img, &["write -P 0x66 64k 64k"]);
    let expected = qemu_raw(d.dir.path(), &img);
    let point = d.path("mnt");
    std::fs::create_dir(&point).unwrap();
    // With --image-opts the file is named after file.filename.
    let opts = format!("driver=qcow2,file.filename={}", img.display());
    let m = Mounted::new(&["-r", "--object", "secret,id=s0,data=x", "--image-opts"], Path::new(&opts), &point);
    let names: Vec<String> =
        std::fs::read_dir(&point).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(names, ["disk image.qcow2"]);
    let file = point.join("disk image.qcow2");
    let out = bounded("cat", &[file.to_str().unwrap()]);
    assert!(out.status.success() && out.stdout == expected, "the file in the directory differs");
    assert!(!point.join("other").exists());
    m.unmount_ok();
}

#[test]
fn a_termination_signal_unmounts_and_flushes() {
    let d = Dir::new();
    let img = d.image("sig.qcow2", "4M", &[]);
    let point = d.point("disk");
    for signal in ["TERM", "INT"] {
        let m = Mounted::new(&[], &img, &point);
        py("import os,sys; fd=os.open(sys.argv[1], os.O_WRONLY); os.pwrite(fd, b'\\x99' * 70000, 123456)", &[m.path()]);
        run_ok("kill", &[&format!("-{signal}"), &m.pid().to_string()]);
        let (status, err) = m.finish();
        assert!(status.success(), "SIG{signal}: exit {status}:\n{err}");
        qemu_io(&img, &["read -P 0x99 123456 70000", "read -P 0 0 123456"]);
        assert_clean(&img);
    }
}

/// The acceptance test of the issue: a file system on a loop device on the
/// mounted file, written, unmounted, and found intact by QEMU and e2fsck.
#[test]
fn ext4_on_a_loop_device_over_the_mounted_file() {
    for (tool, package) in [("losetup", "mount"), ("mkfs.ext4", "e2fsprogs"), ("e2fsck", "e2fsprogs")] {
        require(tool, package);
    }
    assert!(Path::new("/dev/loop-control").exists(), "/dev/loop-control is required (modprobe loop)");
    let d = Dir::new();
    let img = d.image("fs.qcow2", "64M", &[]);
    let point = d.point("disk");
    let fs_dir = d.path("fs");
    std::fs::create_dir(&fs_dir).unwrap();
    let m = Mounted::new(&["-f", "qcow2"], &img, &point);

    /// Detaches the loop device and unmounts the ext4 even on failure.
    struct Loop {
        dev: String,
        fs: PathBuf,
    }
    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = run("umount", &[self.fs.to_str().unwrap()]);
            let _ = run("losetup", &["-d", &self.dev]);
            // A busy loop device is detached lazily, when its last user (a
            // udev probe, say) lets go; until then it holds the mounted
            // file and fusermount3 -u fails. Wait for it to go.
            let start = Instant::now();
            while start.elapsed() < WAIT {
                // `losetup DEV` fails once DEV is detached.
                if !run("losetup", &[&self.dev]).status.success() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    let dev = bounded_ok("losetup", &["-f", "--show", m.path()]).trim().to_string();
    let lp = Loop { dev: dev.clone(), fs: fs_dir.clone() };
    bounded_ok("mkfs.ext4", &["-q", &dev]);
    bounded_ok("mount", &[&dev, fs_dir.to_str().unwrap()]);
    let mut data = Vec::with_capacity(5 << 20);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while data.len() < 5 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(fs_dir.join("big"), &data).unwrap();
    std::fs::create_dir(fs_dir.join("sub")).unwrap();
    for i in 0..50 {
        std::fs::write(fs_dir.join("sub").join(format!("f{i}")), format!("file {i}\n").repeat(i + 1)).unwrap();
    }
    bounded_ok("sync", &[]);
    // A raw copy of the disk taken while it is mounted, through the FUSE
    // file, once the ext4 is unmounted and its writes are down.
    bounded_ok("umount", &[fs_dir.to_str().unwrap()]);
    let copy = d.path("copy.raw");
    bounded_ok("cp", &[m.path(), copy.to_str().unwrap()]);
    drop(lp);
    m.unmount_ok();

    assert_clean(&img);
    let cmp = qemu_img(&["compare", "-F", "raw", img.to_str().unwrap(), copy.to_str().unwrap()]);
    assert!(cmp.contains("Images are identical"), "{cmp}");
    let raw = d.path("check.raw");
    qemu_img(&["convert", "-O", "raw", img.to_str().unwrap(), raw.to_str().unwrap()]);
    let fsck = run("e2fsck", &["-fn", raw.to_str().unwrap()]);
    assert!(fsck.status.success(), "e2fsck -fn found problems:\n{}", String::from_utf8_lossy(&fsck.stdout));
    // And the files are there: read them back through a fresh read-only mount.
    let m = Mounted::new(&["-r"], &img, &point);
    let dev = bounded_ok("losetup", &["-f", "--show", "-r", m.path()]).trim().to_string();
    let lp = Loop { dev: dev.clone(), fs: fs_dir.clone() };
    bounded_ok("mount", &["-o", "ro,noload", &dev, fs_dir.to_str().unwrap()]);
    assert!(std::fs::read(fs_dir.join("big")).unwrap() == data, "big file differs");
    assert_eq!(std::fs::read_to_string(fs_dir.join("sub/f7")).unwrap(), "file 7\n".repeat(8));
    drop(lp);
    m.unmount_ok();
}

#[test]
fn command_line_errors() {
    let d = Dir::new();
    let img = d.image("e.qcow2", "1M", &[]);
    let ox = |args: &[&str]| {
        let o = Command::new(OXQCOW).arg("mount").args(args).output().unwrap();
        (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let missing = d.path("nowhere");
    let (code, err) = ox(&[img.to_str().unwrap(), missing.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains(&format!("Failed to stat '{}': No such file or directory", missing.display())), "{err}");
    let (code, err) = ox(&[img.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("Expecting an image and a mount point"), "{err}");
    let point = d.point("disk");
    let (code, err) = ox(&["-U", img.to_str().unwrap(), point.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--force-share/-U can only be used with --read-only/-r"), "{err}");
    let (code, err) = ox(&["--busy-poll=sometimes", img.to_str().unwrap(), point.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("Parameter 'busy-poll' does not accept value 'sometimes'"), "{err}");
    let absent = d.path("absent.qcow2");
    let (code, err) = ox(&[absent.to_str().unwrap(), point.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("Could not open"), "{err}");
    assert!(!is_mounted(&point.canonicalize().unwrap()));
    let o = Command::new(OXQCOW).args(["mount", "--help"]).output().unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("MOUNTPOINT is either an existing regular file"));
}

#[test]
fn daemonize_returns_once_mounted_and_writes_the_pid_file() {
    require_fuse();
    let d = Dir::new();
    let img = d.image("bg.qcow2", "4M", &[]);
    let point = d.point("disk").canonicalize().unwrap();
    let pidfile = d.path("pid");

    /// Unmounts even when an assertion fails.
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            if is_mounted(&self.0) && !run("fusermount3", &["-u", self.0.to_str().unwrap()]).status.success() {
                let _ = run("umount", &["-l", self.0.to_str().unwrap()]);
            }
        }
    }
    let o = Command::new(OXQCOW)
        .args(["mount", "--daemonize", "--pidfile", pidfile.to_str().unwrap(), img.to_str().unwrap()])
        .arg(&point)
        .output()
        .unwrap();
    let guard = Unmount(point.clone());
    assert!(o.status.success(), "mount --daemonize: {}", String::from_utf8_lossy(&o.stderr));
    // Mounted before the parent returned: no waiting here.
    assert!(is_mounted(&point), "--daemonize returned before the file was mounted");
    let pid = std::fs::read_to_string(&pidfile).unwrap().trim().to_string();
    assert!(Path::new(&format!("/proc/{pid}")).exists(), "no process {pid}");
    py(
        "import os,sys; fd=os.open(sys.argv[1], os.O_WRONLY); os.pwrite(fd, b'\\x3c' * 5000, 4096)",
        &[point.to_str().unwrap()],
    );
    run_ok("fusermount3", &["-u", point.to_str().unwrap()]);
    drop(guard);
    let start = Instant::now();
    let gone =
        || std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.split(' ').nth(2) == Some("Z"));
    while !gone() || pidfile.exists() {
        assert!(start.elapsed() < WAIT, "the daemon {pid} did not exit and remove its pid file");
        std::thread::sleep(Duration::from_millis(20));
    }
    qemu_io(&img, &["read -P 0x3c 4096 5000", "read -P 0 0 4096"]);
    assert_clean(&img);

    // A failure before mounting is the parent's exit status and message.
    let missing = d.path("missing.qcow2");
    let o =
        Command::new(OXQCOW).args(["mount", "--daemonize", missing.to_str().unwrap()]).arg(&point).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("Could not open"), "{o:?}");
    assert!(!is_mounted(&point));
}

#[test]
fn concurrent_writers_through_the_mount() {
    let d = Dir::new();
    let img = d.image("c.qcow2", "32M", &["-o", "cluster_size=4k"]);
    let point = d.point("disk");
    let m = Mounted::new(&["--threads", "8"], &img, &point);
    // 8 threads, each writing its own pattern into every 8th 20 KiB slot
    // (slots straddle clusters, so neighbours allocate the same clusters).
    py(
        "import os,sys,threading; fd=os.open(sys.argv[1], os.O_WRONLY)\n\
         def w(t):\n    for i in range(t, 1600, 8):\n        os.pwrite(fd, bytes([t + 1]) * 20480, i * 20480)\n\
         ts=[threading.Thread(target=w, args=(t,)) for t in range(8)]\n\
         [t.start() for t in ts]; [t.join() for t in ts]; os.fsync(fd)",
        &[m.path()],
    );
    m.unmount_ok();
    let raw = qemu_raw(d.dir.path(), &img);
    for (i, slot) in raw.chunks(20480).enumerate() {
        let want = if i < 1600 { (i % 8) as u8 + 1 } else { 0 };
        assert!(slot.iter().all(|&b| b == want), "slot {i} should hold {want}");
    }
    assert_clean(&img);
}

/// Names of the threads of `pid` that read FUSE requests (fuser names them
/// `fuser-N`).
fn serving_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter(|t| {
            let comm = std::fs::read_to_string(t.as_ref().unwrap().path().join("comm")).unwrap_or_default();
            comm.starts_with("fuser-")
        })
        .count()
}

/// Guards the default of one serving thread: with four (the old default)
/// the kernel handed each request of a one-at-a-time stream to another
/// thread, and every round trip paid a cross-CPU wakeup.
#[test]
fn one_thread_serves_unless_told_otherwise() {
    let d = Dir::new();
    let img = d.image("t.qcow2", "4M", &[]);
    let point = d.point("disk");
    // The file is mounted before the server starts its threads: a stat,
    // which only a running thread answers, then a bounded wait for the
    // expected count, which must then hold.
    let settled = |m: &Mounted, want: usize| {
        std::fs::metadata(m.path()).unwrap();
        let start = Instant::now();
        while serving_threads(m.pid()) < want {
            assert!(start.elapsed() < WAIT, "{} serving threads, not {want}", serving_threads(m.pid()));
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(200));
        serving_threads(m.pid())
    };
    let m = Mounted::new(&[], &img, &point);
    assert_eq!(settled(&m, 1), 1);
    m.unmount_ok();
    let m = Mounted::new(&["--threads", "3"], &img, &point);
    assert_eq!(settled(&m, 3), 3);
    m.unmount_ok();
}

/// Guards the serving thread's kept read buffer: a read never shows what
/// an earlier, larger read left in it (unallocated and zero clusters read
/// as zeros after data, a short read at the end of the disk has only its
/// own bytes). O_DIRECT makes the kernel pass each read on at its size.
#[test]
fn reads_after_larger_reads_show_only_their_own_bytes() {
    let d = Dir::new();
    let img = d.image("b.qcow2", "4M", &[]);
    qemu_io(&img, &["write -P 0x11 0 1M", "write -z 2M 1M", "write -P 0x22 3M 1M"]);
    let point = d.point("disk");
    let m = Mounted::new(&["-r"], &img, &point);
    let out = py(
        "import mmap,os,sys; fd=os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)\n\
         def rd(n, off):\n    b=mmap.mmap(-1, n); k=os.preadv(fd, [b], off); return sorted(set(bytes(b[:k]))), k\n\
         print(rd(1 << 20, 0)); print(rd(4096, 1 << 20)); print(rd(65536, 2 << 20))\n\
         print(rd(1 << 20, 3 << 20)); print(rd(1 << 20, (4 << 20) - 8192))",
        &[m.path()],
    );
    m.unmount_ok();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines, ["([17], 1048576)", "([0], 4096)", "([0], 65536)", "([34], 1048576)", "([34], 8192)"]);
}

/// fsync of the mounted file makes everything written before it reach the
/// image, metadata included, while the file stays mounted: QEMU (sharing
/// the image read-only) reads the data and finds the image clean. 4 KiB
/// writes one at a time, sequential and scattered, as programs write.
#[test]
fn fsync_through_the_mount_reaches_the_image_while_mounted() {
    let d = Dir::new();
    let img = d.image("f.qcow2", "16M", &[]);
    let point = d.point("disk");
    let m = Mounted::new(&[], &img, &point);
    py(
        "import os,sys; fd=os.open(sys.argv[1], os.O_WRONLY)\n\
         for i in range(256):\n    os.pwrite(fd, bytes([0x31]) * 4096, i * 4096)\n\
         for i in range(64):\n    os.pwrite(fd, bytes([0x32]) * 4096, (4 << 20) + (i * 37 % 64) * 135168)\n\
         os.fsync(fd)",
        &[m.path()],
    );
    let out = qemu_img(&["check", "-U", "-f", "qcow2", img.to_str().unwrap()]);
    assert!(out.contains("No errors were found on the image."), "after fsync, while mounted:\n{out}");
    let mut reads = vec!["read -P 0x31 0 1M".to_string(), "read -P 0 1M 3M".to_string()];
    reads.extend((0..64u64).map(|i| format!("read -P 0x32 {} 4096", (4 << 20) + i * 135168)));
    let reads: Vec<&str> = reads.iter().map(String::as_str).collect();
    external::qemu_io(&["-U", "-r", "-f", "qcow2", img.to_str().unwrap()], &reads);
    m.unmount_ok();
    assert_clean(&img);
}

/// Write-only opens bypass the kernel's page cache (a third less copying
/// for dd or cp into the file) only while no open reads through it, and
/// every reader sees each write once it returned. Pages of the FUSE file
/// in the page cache are counted with cachestat(2).
#[test]
fn write_only_opens_bypass_the_page_cache_and_readers_stay_coherent() {
    let d = Dir::new();
    let img = d.image("wo.qcow2", "8M", &[]);
    qemu_io(&img, &["write -P 0x41 0 8M"]);
    let point = d.point("disk");
    let common = "import ctypes,os,sys\n\
         libc=ctypes.CDLL(None, use_errno=True)\n\
         def cached(fd, off, n):\n\
         \x20   rng=(ctypes.c_uint64 * 2)(off, n); st=(ctypes.c_uint64 * 5)()\n\
         \x20   assert libc.syscall(451, fd, ctypes.byref(rng), ctypes.byref(st), 0) == 0, ctypes.get_errno()\n\
         \x20   return st[0]\n\
         M=1 << 20\n";
    // A writer alone: past the cache; a reader opened meanwhile too, and it
    // sees every write.
    let m = Mounted::new(&[], &img, &point);
    let out = py(
        &format!(
            "{common}w=os.open(sys.argv[1], os.O_WRONLY)\n\
             os.pwrite(w, b'\\x42' * M, 0); print(cached(w, 0, M))\n\
             r=os.open(sys.argv[1], os.O_RDONLY)\n\
             print(set(os.pread(r, M, 0)), cached(r, 0, M))\n\
             os.pwrite(w, b'\\x43' * 4096, 8192); print(set(os.pread(r, 4096, 8192)))\n\
             os.close(r); os.fsync(w); os.close(w)"
        ),
        &[m.path()],
    );
    m.unmount_ok();
    assert_eq!(out.lines().collect::<Vec<_>>(), ["0", "{66} 0", "{67}"]);
    // A reader first: the writer goes through the cache, and the reader
    // sees its writes.
    let m = Mounted::new(&[], &img, &point);
    let out = py(
        &format!(
            "{common}r=os.open(sys.argv[1], os.O_RDONLY)\n\
             print(set(os.pread(r, M, 2 * M)), cached(r, 2 * M, M) > 0)\n\
             w=os.open(sys.argv[1], os.O_WRONLY)\n\
             os.pwrite(w, b'\\x44' * M, 2 * M); print(set(os.pread(r, M, 2 * M)))\n\
             os.close(w); os.close(r)"
        ),
        &[m.path()],
    );
    m.unmount_ok();
    assert_eq!(out.lines().collect::<Vec<_>>(), ["{65} True", "{68}"]);
    qemu_io(
        &img,
        &["read -P 0x42 0 8192", "read -P 0x43 8192 4096", "read -P 0x42 12288 1036288", "read -P 0x41 1M 1M"],
    );
    qemu_io(&img, &["read -P 0x44 2M 1M", "read -P 0x41 3M 5M"]);
    assert_clean(&img);
}

/// Whether the server's /dev/fuse open file is set to non-blocking reads
/// (the O_NONBLOCK bit, 04000, of the octal `flags:` line of its fdinfo).
fn device_nonblocking(pid: u32) -> bool {
    let mut found = None;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let fd = fd.unwrap();
        if std::fs::read_link(fd.path()).is_ok_and(|t| t == Path::new("/dev/fuse")) {
            let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_str().unwrap()))
                .unwrap_or_default();
            let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).expect("fdinfo without flags");
            let nonblocking = u32::from_str_radix(flags.trim(), 8).unwrap() & 0o4000 != 0;
            found = Some(found.unwrap_or(false) || nonblocking);
        }
    }
    found.expect("the server holds no /dev/fuse descriptor")
}

/// A stream of requests (a write and an fsync, which the kernel always
/// passes on) from a child process, until `stop` exists (at least one).
fn request_stream(file: &str, stop: &Path) -> Child {
    Command::new("timeout")
        .args([TIMEOUT, "python3", "-c"])
        .arg(
            "import os,sys; fd=os.open(sys.argv[1], os.O_RDWR)\n\
             while True:\n    os.pwrite(fd, b'x' * 4096, 0); os.fsync(fd)\n    if os.path.exists(sys.argv[2]): break",
        )
        .args([file, stop.to_str().unwrap()])
        .spawn()
        .unwrap()
}

/// Busy polling (`--busy-poll`): while requests keep coming the server
/// reads /dev/fuse without blocking, and once they stop it goes back to
/// sleeping reads; with `--busy-poll=off` it never polls. The data written
/// meanwhile reaches the image either way.
#[test]
fn busy_polls_while_requests_come_and_sleeps_when_quiet() {
    require("python3", "python3");
    let d = Dir::new();
    let img = d.image("p.qcow2", "4M", &[]);
    let point = d.point("disk");
    let stop = d.path("stop");
    let wait_for = |what: &str, cond: &dyn Fn() -> bool| {
        let start = Instant::now();
        while !cond() {
            assert!(start.elapsed() < WAIT, "{what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    };

    let m = Mounted::new(&["--busy-poll=on"], &img, &point);
    let pid = m.pid();
    wait_for("an idle mount must sleep on the device", &|| !device_nonblocking(pid));
    let mut stream = request_stream(m.path(), &stop);
    wait_for("the server never polled during a stream of requests", &|| device_nonblocking(pid));
    std::fs::write(&stop, b"").unwrap();
    assert!(wait_child(&mut stream).success());
    wait_for("the server kept polling after the requests stopped", &|| !device_nonblocking(pid));
    m.unmount_ok();
    qemu_io(&img, &["read -P 0x78 0 4096"]);
    assert_clean(&img);

    std::fs::remove_file(&stop).unwrap();
    qemu_io(&img, &["write -P 0 0 4096"]);
    let m = Mounted::new(&["--busy-poll=off"], &img, &point);
    let pid = m.pid();
    let mut stream = request_stream(m.path(), &stop);
    for _ in 0..200 {
        assert!(!device_nonblocking(pid), "--busy-poll=off polled");
        std::thread::sleep(Duration::from_millis(1));
    }
    std::fs::write(&stop, b"").unwrap();
    assert!(wait_child(&mut stream).success());
    m.unmount_ok();
    qemu_io(&img, &["read -P 0x78 0 4096"]);
    assert_clean(&img);
}
