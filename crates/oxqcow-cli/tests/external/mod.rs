//! Helpers shared by the tests that drive oxqcow's servers (`serve`,
//! `serve_tls`, `mount`) together with outside programs: finding and
//! running tools, qemu-img checks, bounded waits, a scratch directory and
//! a running `oxqcow serve` (`Dir`, `Server`). A missing tool fails the
//! test and names the package that has it.

#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The oxqcow binary under test.
pub const OXQCOW: &str = env!("CARGO_BIN_EXE_oxqcow");
/// Generous bound on waits for a server or mount to come up or go away.
pub const WAIT: Duration = Duration::from_secs(60);

/// Whether `tool` is on PATH (or in /sbin, /usr/sbin).
pub fn find_tool(tool: &str) -> bool {
    let dirs = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default();
    dirs.iter().chain([PathBuf::from("/sbin"), PathBuf::from("/usr/sbin")].iter()).any(|d| d.join(tool).is_file())
}

/// Fails the test unless `tool` (from Debian's `package`) is installed.
pub fn require(tool: &str, package: &str) {
    assert!(find_tool(tool), "{tool} is required by this test but is not installed (apt-get install {package})");
}

pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap_or_else(|e| panic!("running {program}: {e}"))
}

/// Runs a program that must succeed; its stdout.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let o = run(program, args);
    assert!(
        o.status.success(),
        "{program} {args:?} failed ({}):\n{}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn qemu_img(args: &[&str]) -> String {
    require("qemu-img", "qemu-utils");
    run_ok("qemu-img", args)
}

/// Runs qemu-io with `args` (options and the image or target) and one
/// `-c` per command; every read pattern must verify.
pub fn qemu_io(args: &[&str], cmds: &[&str]) -> String {
    require("qemu-io", "qemu-utils");
    let mut all: Vec<&str> = args.to_vec();
    for c in cmds {
        all.push("-c");
        all.push(c);
    }
    let out = run_ok("qemu-io", &all);
    assert!(!out.contains("fail") && !out.contains("error"), "qemu-io {all:?}:\n{out}");
    out
}

/// `qemu-img check` finds no errors and no leaks.
pub fn assert_clean(image: &Path) {
    let out = qemu_img(&["check", "-f", "qcow2", image.to_str().unwrap()]);
    assert!(out.contains("No errors were found on the image."), "qemu-img check {}:\n{out}", image.display());
}

/// Waits (at most [`WAIT`]) until `done`.
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < WAIT, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A scratch directory with one qcow2 image.
pub struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    pub fn new() -> Dir {
        Dir { dir: tempfile::tempdir().unwrap() }
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    pub fn s(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }
    /// A new qcow2 image of `size` made by qemu-img.
    pub fn image(&self, name: &str, size: &str) -> PathBuf {
        qemu_img(&["create", "-q", "-f", "qcow2", &self.s(name), size]);
        self.path(name)
    }
}

/// A running `oxqcow serve`.
pub struct Server {
    child: Option<Child>,
    socket: Option<PathBuf>,
    port: Option<u16>,
}

impl Server {
    /// Serves on a Unix socket `sock` with `args` (which name the image).
    pub fn unix(sock: &Path, args: &[&str]) -> Server {
        let mut all = vec!["serve", "-k", sock.to_str().unwrap()];
        all.extend_from_slice(args);
        let child = Command::new(OXQCOW).args(&all).stdin(Stdio::null()).spawn().expect("starting oxqcow serve");
        let mut s = Server { child: Some(child), socket: Some(sock.to_path_buf()), port: None };
        wait_until("the server's socket", || {
            s.assert_running();
            sock.exists()
        });
        s
    }

    /// Serves on 127.0.0.1 at a port of its own, persistently (`-t`: the
    /// probe that waits for the listener is a client too).
    pub fn tcp(args: &[&str]) -> Server {
        let port = free_port();
        let p = port.to_string();
        let mut all = vec!["serve", "-b", "127.0.0.1", "-p", &p, "-t"];
        all.extend_from_slice(args);
        let child = Command::new(OXQCOW).args(&all).stdin(Stdio::null()).spawn().expect("starting oxqcow serve");
        let mut s = Server { child: Some(child), socket: None, port: Some(port) };
        wait_until("the server's TCP port", || {
            s.assert_running();
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        s
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("oxqcow serve exited early: {status}");
        }
    }

    pub fn uri(&self) -> String {
        match (&self.socket, self.port) {
            (Some(s), _) => format!("nbd+unix:///?socket={}", s.display()),
            (None, Some(p)) => format!("nbd://127.0.0.1:{p}"),
            _ => unreachable!(),
        }
    }

    pub fn uri_named(&self, export: &str) -> String {
        match (&self.socket, self.port) {
            (Some(s), _) => format!("nbd+unix:///{export}?socket={}", s.display()),
            (None, Some(p)) => format!("nbd://127.0.0.1:{p}/{export}"),
            _ => unreachable!(),
        }
    }

    /// SIGTERM, then the exit status must be 0 and the socket gone.
    pub fn stop(mut self) {
        let mut child = self.child.take().unwrap();
        run_ok("kill", &["-TERM", &child.id().to_string()]);
        let status = wait_child(&mut child);
        assert!(status.success(), "oxqcow serve exited with {status} after SIGTERM");
        if let Some(s) = &self.socket {
            assert!(!s.exists(), "the socket {} was left behind", s.display());
        }
    }

    /// Waits for the server to exit on its own; it must exit with 0.
    pub fn wait_exit(mut self) {
        let mut child = self.child.take().unwrap();
        let status = wait_child(&mut child);
        assert!(status.success(), "oxqcow serve exited with {status}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn wait_child(child: &mut Child) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if start.elapsed() > WAIT {
            let _ = child.kill();
            panic!("oxqcow serve did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// qemu-img map's JSON as runs of (start, length, data, zero), adjacent
/// runs with the same flags merged: comparable whatever the offsets.
pub fn map_runs(json: &str) -> Vec<(u64, u64, bool, bool)> {
    let v: serde_json::Value = serde_json::from_str(json).expect("map json");
    let mut out: Vec<(u64, u64, bool, bool)> = Vec::new();
    for e in v.as_array().unwrap() {
        let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let (d, z) = (e["data"].as_bool().unwrap(), e["zero"].as_bool().unwrap());
        match out.last_mut() {
            Some(last) if last.2 == d && last.3 == z && last.0 + last.1 == s => last.1 += l,
            _ => out.push((s, l, d, z)),
        }
    }
    out
}

/// Fills an image with data, zeros and holes through qemu-io.
pub fn populate(image: &Path) {
    qemu_io(
        &["-f", "qcow2", image.to_str().unwrap()],
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 3M 512k",
            "write -z 5M 1M",
            "write -P 0x33 7340032 4096",
            "write -P 0x44 12M 2M",
        ],
    );
}

pub fn populate_small(image: &Path) {
    qemu_io(&["-f", "qcow2", image.to_str().unwrap()], &["write -P 1 0 64k"]);
}

pub fn is_zombie(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| s.contains(") Z ")).unwrap_or(true)
}
