//! Helpers shared by the tests that drive oxqcow's servers (`serve`,
//! `serve_tls`, `mount`) together with outside programs: finding and
//! running tools, qemu-img checks, bounded waits. A missing tool fails the
//! test and names the package that has it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
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
