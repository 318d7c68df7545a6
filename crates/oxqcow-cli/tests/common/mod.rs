//! Running `oxqcow` and the QEMU tools side by side on identical copies of
//! a set of files.
//!
//! `oxqcow` is run through a symlink named `qemu-img`, so that its messages
//! carry the same program name as qemu-img's and the outputs can be
//! compared byte for byte. Tests that need QEMU fail loudly when it is
//! missing: they must never pass by skipping.
#![allow(dead_code)] // each test binary uses a different part

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// What one run printed and returned.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

fn find_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("{name} is required for this test but was not found in PATH (install Debian's qemu-utils)");
}

/// The real qemu-img.
pub fn qemu_img() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| find_tool("qemu-img"))
}

/// The real qemu-io.
pub fn qemu_io() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| find_tool("qemu-io"))
}

/// A directory holding `oxqcow` under the name `qemu-img`.
fn oxqcow_dir() -> &'static Path {
    static P: OnceLock<tempfile::TempDir> = OnceLock::new();
    P.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_oxqcow"), dir.path().join("qemu-img")).unwrap();
        dir
    })
    .path()
}

/// `oxqcow` under the name `qemu-img`.
pub fn oxqcow() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| oxqcow_dir().join("qemu-img"))
}

/// Runs `tool args...` in `dir` (dates in UTC, as oxqcow prints them).
/// Both qemu-img and oxqcow are started by the bare name `qemu-img` found
/// through PATH, so that their argv[0], which they quote in usage hints, is
/// the same.
pub fn run_in(dir: &Path, tool: &Path, args: &[&str]) -> Outcome {
    let mut cmd = if tool == oxqcow() || tool == qemu_img() {
        let mut c = Command::new("qemu-img");
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
        dirs.insert(0, tool.parent().unwrap().to_path_buf());
        c.env("PATH", std::env::join_paths(dirs).unwrap());
        c
    } else {
        Command::new(tool)
    };
    let out = cmd
        .args(args)
        .current_dir(dir)
        .env("TZ", "UTC")
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", tool.display()));
    Outcome {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs a tool and insists that it succeeds.
pub fn must(dir: &Path, tool: &Path, args: &[&str]) -> Outcome {
    let o = run_in(dir, tool, args);
    assert_eq!(o.code, 0, "{} {args:?} failed: {}", tool.display(), o.stderr);
    o
}

/// A pair of directories holding identical files, one for each tool.
pub struct Pair {
    _root: tempfile::TempDir,
    pub qemu: PathBuf,
    pub ox: PathBuf,
}

impl Pair {
    /// Two empty directories.
    pub fn new() -> Pair {
        let root = tempfile::tempdir().unwrap();
        let qemu = root.path().join("qemu");
        let ox = root.path().join("ox");
        std::fs::create_dir(&qemu).unwrap();
        std::fs::create_dir(&ox).unwrap();
        Pair { _root: root, qemu, ox }
    }

    /// Two directories with copies of every file of `setup`.
    pub fn from(setup: &Path) -> Pair {
        let p = Pair::new();
        for entry in std::fs::read_dir(setup).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() {
                std::fs::copy(entry.path(), p.qemu.join(entry.file_name())).unwrap();
                std::fs::copy(entry.path(), p.ox.join(entry.file_name())).unwrap();
            }
        }
        p
    }

    /// Runs qemu-img and oxqcow with the same arguments.
    pub fn run(&self, args: &[&str]) -> (Outcome, Outcome) {
        (run_in(&self.qemu, qemu_img(), args), run_in(&self.ox, oxqcow(), args))
    }

    /// Runs both and asserts equal exit codes, stdout and stderr.
    pub fn same_output(&self, args: &[&str]) -> Outcome {
        let (q, o) = self.run(args);
        assert_eq!(o, q, "oxqcow and qemu-img differ for {args:?}");
        o
    }

    /// The files of each directory.
    pub fn files(&self) -> (BTreeMap<String, Vec<u8>>, BTreeMap<String, Vec<u8>>) {
        (read_dir(&self.qemu), read_dir(&self.ox))
    }

    /// Asserts that both directories hold the same files with the same bytes.
    pub fn same_files(&self, context: &[&str]) {
        let (q, o) = self.files();
        assert_eq!(o.keys().collect::<Vec<_>>(), q.keys().collect::<Vec<_>>(), "file sets differ after {context:?}");
        for (name, bytes) in &q {
            assert!(o[name] == *bytes, "{name} differs after {context:?} ({} vs {} bytes)", o[name].len(), bytes.len());
        }
    }

    /// Asserts the same file names and, per file, the same length.
    pub fn same_file_names(&self, context: &[&str]) {
        let (q, o) = self.files();
        assert_eq!(o.keys().collect::<Vec<_>>(), q.keys().collect::<Vec<_>>(), "file sets differ after {context:?}");
    }
}

fn read_dir(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap())
        })
        .collect()
}

/// Writes `bytes` at `offset` of a file.
pub fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

/// Splits a command line on spaces.
pub fn words(s: &str) -> Vec<&str> {
    s.split(' ').filter(|w| !w.is_empty()).collect()
}
