//! Wrappers around QEMU's `qemu-img` and `qemu-io`, the reference the
//! interop and hostile-image tests compare against. A missing tool is a
//! test failure with a clear message, never a skip.

use std::path::Path;
use std::process::{Command, Output};

/// What a QEMU tool printed and how it exited.
#[derive(Debug)]
pub struct QemuOutput {
    /// Exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl QemuOutput {
    /// Whether the tool exited with 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
    /// Standard output and error together.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl From<Output> for QemuOutput {
    fn from(o: Output) -> Self {
        QemuOutput {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Runs `tool` with `args`; panics when the tool cannot be started.
pub fn run(tool: &str, args: &[&str]) -> QemuOutput {
    Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("{tool} is required by this test and could not be run ({e}); install it with `apt-get install qemu-utils`")
        })
        .into()
}

/// Runs `qemu-img` with `args`.
pub fn qemu_img(args: &[&str]) -> QemuOutput {
    run("qemu-img", args)
}

/// Runs `qemu-img` and panics unless it succeeds.
pub fn qemu_img_ok(args: &[&str]) -> QemuOutput {
    let out = qemu_img(args);
    assert!(out.success(), "qemu-img {} failed: {}", args.join(" "), out.text());
    out
}

/// Runs `qemu-io` on a qcow2 file with one `-c` per command; panics unless
/// it succeeds and no command reported a failure.
pub fn qemu_io_ok(path: &Path, commands: &[String]) -> QemuOutput {
    let mut args: Vec<&str> = vec!["-f", "qcow2"];
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    let p = path.to_str().expect("utf-8 path");
    args.push(p);
    let out = run("qemu-io", &args);
    let text = out.text();
    assert!(
        out.success() && !text.contains("failed") && !text.contains("error"),
        "qemu-io {commands:?} on {p} failed: {text}"
    );
    out
}

/// `qemu-img check` on a qcow2 file.
pub fn check(path: &Path) -> QemuOutput {
    qemu_img(&["check", "-f", "qcow2", path.to_str().expect("utf-8 path")])
}

/// Panics unless `qemu-img check` finds the image clean (exit 0: no
/// corruption, no leak).
pub fn assert_check_clean(path: &Path) {
    let out = check(path);
    assert!(out.success(), "qemu-img check {} is not clean (exit {:?}): {}", path.display(), out.code, out.text());
}

/// `qemu-img convert -O raw`.
pub fn convert_to_raw(src: &Path, dst: &Path) {
    qemu_img_ok(&["convert", "-f", "qcow2", "-O", "raw", src.to_str().unwrap(), dst.to_str().unwrap()]);
}

/// `qemu-img compare` of two images with formats `fa` and `fb`.
pub fn compare(a: &Path, fa: &str, b: &Path, fb: &str) -> QemuOutput {
    qemu_img(&["compare", "-f", fa, "-F", fb, a.to_str().unwrap(), b.to_str().unwrap()])
}
