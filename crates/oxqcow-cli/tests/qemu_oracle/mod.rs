//! Running oxqcow and QEMU's tools side by side: both on copies of one
//! image, outputs normalised (timings, file names, program names) so they
//! can be compared line for line. A missing QEMU tool fails the test.

#![allow(dead_code)] // each test binary uses its own part of this module

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The oxqcow binary under test.
pub fn oxqcow() -> &'static str {
    env!("CARGO_BIN_EXE_oxqcow")
}

/// Panics with a clear message unless `tool` runs.
pub fn require(tool: &str) {
    match Command::new(tool).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status() {
        Ok(s) if s.success() => {}
        other => panic!(
            "{tool} is required by this test (the oracle oxqcow is compared with) but could not be run ({other:?}); \
             install QEMU's tools (Debian: qemu-utils)"
        ),
    }
}

/// What a command printed and how it exited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
}

/// Runs `program args`, feeding `stdin` when given (else /dev/null).
pub fn run(program: &str, args: &[String], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    if let Some(input) = stdin {
        use std::io::Write;
        child.stdin.take().expect("piped stdin").write_all(input.as_bytes()).expect("write stdin");
    }
    let out = child.wait_with_output().expect("wait");
    Output {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        code: out.status.code().unwrap_or(-1),
    }
}

/// Runs oxqcow with `args` (the first being the subcommand).
pub fn ox(args: &[&str]) -> Output {
    run(oxqcow(), &strings(args), None)
}

/// Runs a QEMU tool.
pub fn qemu(tool: &str, args: &[&str]) -> Output {
    require(tool);
    run(tool, &strings(args), None)
}

/// Owned copies of `args`.
pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// `qemu-img create -q ARGS`, which must succeed.
pub fn create(args: &[&str]) {
    let mut all = vec!["create", "-q"];
    all.extend_from_slice(args);
    let out = qemu("qemu-img", &all);
    assert_eq!(out.code, 0, "qemu-img create {args:?} failed: {}", out.stderr);
}

/// A scratch directory with two copies of an image: one for QEMU, one for oxqcow.
pub struct Pair {
    /// Keeps the directory alive.
    pub dir: tempfile::TempDir,
    /// The image QEMU works on.
    pub qemu: PathBuf,
    /// The image oxqcow works on.
    pub ours: PathBuf,
}

impl Pair {
    /// Creates two images with `qemu-img create -f FORMAT [-o OPTS] IMG SIZE`.
    pub fn new(format: &str, opts: Option<&str>, size: &str) -> Pair {
        let dir = tempfile::tempdir().expect("tempdir");
        let qemu = dir.path().join("qemu.img");
        let ours = dir.path().join("ours.img");
        // Two creations rather than a copy: copying may change which parts
        // of the file are allocated on the host, which raw images show.
        for image in [&qemu, &ours] {
            let path = image.to_str().expect("utf-8 path");
            match opts {
                Some(o) => create(&["-f", format, "-o", o, path, size]),
                None => create(&["-f", format, path, size]),
            }
        }
        Pair { dir, qemu, ours }
    }

    /// Path of a file in the scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Replaces the `IMG` placeholder in each argument with `image`.
pub fn with_image(args: &[&str], image: &Path) -> Vec<String> {
    let p = image.to_str().expect("utf-8 path");
    args.iter().map(|a| a.replace("IMG", p)).collect()
}

/// Output with what legitimately differs between the tools removed: the
/// timing line after each request, the timing fields of `-C` lines, the
/// image's path and the program name.
pub fn normalize(out: &Output, image: Option<&Path>, tool: &str) -> Output {
    let fix_names = |s: &str| {
        let mut s = s.to_string();
        if let Some(img) = image {
            s = s.replace(img.to_str().expect("utf-8 path"), "IMG");
        }
        // Usage hints name argv[0] as invoked (our full path, QEMU's bare
        // name), other messages its base name.
        let prog = Path::new(oxqcow()).file_name().and_then(|n| n.to_str()).expect("binary name").to_string();
        s.replace(oxqcow(), "PROG").replace(&prog, "PROG").replace(tool, "PROG")
    };
    let stdout = out
        .stdout
        .lines()
        .filter(|l| !is_timing_line(l))
        .map(|l| normalize_machine_line(l).unwrap_or_else(|| l.to_string()))
        .map(|l| if l.starts_with("Run completed in ") { "Run completed in T seconds.".into() } else { l })
        .map(|l| fix_names(&l))
        .collect::<Vec<_>>()
        .join("\n");
    Output { stdout, stderr: fix_names(&out.stderr), code: out.code }
}

/// qemu-io's "64 KiB, 1 ops; 00.00 sec (19.189 MiB/sec and 307.0274 ops/sec)".
/// In interactive mode the line may follow a prompt.
pub fn is_timing_line(l: &str) -> bool {
    l.contains(" ops; ") && l.ends_with(" ops/sec)")
}

/// A `-C` line "bytes,ops,H:MM:SS.ss,rate,rate" with its timings masked.
fn normalize_machine_line(l: &str) -> Option<String> {
    let f: Vec<&str> = l.split(',').collect();
    if f.len() != 5 || f[0].parse::<u64>().is_err() || f[1].parse::<u64>().is_err() || !f[2].contains(':') {
        return None;
    }
    Some(format!("{},{},TIME,RATE,RATE", f[0], f[1]))
}

/// Asserts two images have the same guest content (`qemu-img compare`).
pub fn assert_same_content(a: &Path, b: &Path, context: &str) {
    let out = qemu("qemu-img", &["compare", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{context}: images differ: {}{}", out.stdout, out.stderr);
}

/// Asserts `qemu-img check` finds nothing wrong (no corruption, no leaks).
pub fn assert_check_clean(image: &Path, context: &str) {
    let out = qemu("qemu-img", &["check", image.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{context}: qemu-img check is not clean:\n{}{}", out.stdout, out.stderr);
}

/// `qemu-img map --output=json` without host offsets (which may differ).
pub fn guest_map(image: &Path) -> String {
    let out = qemu("qemu-img", &["map", "--output=json", image.to_str().unwrap()]);
    assert_eq!(out.code, 0, "qemu-img map failed: {}", out.stderr);
    out.stdout
        .lines()
        .map(|l| match l.find(", \"offset\":") {
            Some(at) => format!("{}}}", &l[..at]),
            None => l.trim_end_matches([',', ']']).to_string(),
        })
        .map(|l| l.trim_start_matches('[').trim_end_matches(',').to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs `qemu-io ARGS` on one copy and `oxqcow io ARGS` on the other
/// (`IMG` in an argument stands for the image, `stdin` is fed to both)
/// and asserts the same stdout, stderr and exit code (timings aside).
pub fn compare_io_stdin(pair: &Pair, args: &[&str], stdin: Option<&str>) -> Output {
    require("qemu-io");
    let theirs = run("qemu-io", &with_image(args, &pair.qemu), stdin);
    let mut ox_args = vec!["io".to_string()];
    ox_args.extend(with_image(args, &pair.ours));
    let ours = run(oxqcow(), &ox_args, stdin);
    let t = normalize(&theirs, Some(&pair.qemu), "qemu-io");
    let o = normalize(&ours, Some(&pair.ours), "qemu-io");
    assert_eq!(
        o.stdout, t.stdout,
        "stdout differs for {args:?}\n--- qemu-io:\n{}\n--- oxqcow:\n{}",
        t.stdout, o.stdout
    );
    assert_eq!(o.stderr, t.stderr, "stderr differs for {args:?}");
    assert_eq!(o.code, t.code, "exit code differs for {args:?}; qemu-io said:\n{}{}", theirs.stdout, theirs.stderr);
    ours
}

/// [`compare_io_stdin`] without input.
pub fn compare_io(pair: &Pair, args: &[&str]) -> Output {
    compare_io_stdin(pair, args, None)
}
