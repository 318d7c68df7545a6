//! Running `oxqcow` and the QEMU tools side by side on identical copies of
//! a set of files (`Pair`), or in one scratch directory (`Scratch`).
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

/// Runs `tool args...` in `dir`, in a time zone 5:30 east of UTC (so dates
/// show that both tools print local time).
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
        .env("TZ", "IST-5:30")
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
        let (q, mut o) = self.run(args);
        o.stdout = same_allocation(&o.stdout, &q.stdout);
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

/// `ours` with each JSON `"actual-size"` taken from `theirs` where the two
/// differ by at most two 4 KiB blocks. Two files with the same content and
/// the same holes, written one after the other in two directories, can
/// still differ there: ext4 counts the blocks of a file's extent tree in
/// its size on disk, and how many a file needs depends on how fragmented
/// the free space was while it was written (seen under load). Anything
/// larger is a real difference in what was allocated, and still fails.
pub fn same_allocation(ours: &str, theirs: &str) -> String {
    const KEY: &str = "\"actual-size\": ";
    const SLACK: u64 = 8192;
    let numbers = |s: &str| -> Vec<(usize, usize, u64)> {
        let mut out = Vec::new();
        let mut from = 0;
        while let Some(i) = s[from..].find(KEY) {
            let start = from + i + KEY.len();
            let len = s[start..].bytes().take_while(u8::is_ascii_digit).count();
            out.push((start, start + len, s[start..start + len].parse().unwrap_or(0)));
            from = start + len;
        }
        out
    };
    let (a, b) = (numbers(ours), numbers(theirs));
    if a.len() != b.len() {
        return ours.to_string();
    }
    let mut out = ours.to_string();
    for (&(start, end, x), &(_, _, y)) in a.iter().zip(&b).rev() {
        if x != y && x.abs_diff(y) <= SLACK {
            out.replace_range(start..end, &y.to_string());
        }
    }
    out
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

/// Output of one command.
#[derive(Debug, PartialEq, Eq)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// A scratch directory holding images and a `qemu-img` symlink to the
/// oxqcow binary, so that both tools print the same program name.
pub struct Scratch {
    pub dir: tempfile::TempDir,
    ours: PathBuf,
}

fn require(tool: &str) {
    let ok = Command::new(tool).arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    assert!(ok, "{tool} is required by this test but could not be run (install qemu-utils)");
}

impl Scratch {
    pub fn new() -> Scratch {
        require("qemu-img");
        require("qemu-io");
        let dir = tempfile::tempdir().expect("temp dir");
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let ours = bin.join("qemu-img");
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_oxqcow"), &ours).unwrap();
        Scratch { dir, ours }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn run(&self, program: &Path, args: &[&str]) -> Out {
        let o = Command::new(program)
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", program.display()));
        Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// Runs qemu-img.
    pub fn qemu(&self, args: &[&str]) -> Out {
        self.run(Path::new("qemu-img"), args)
    }

    /// Runs oxqcow, started as `qemu-img` through PATH so that its argv[0]
    /// (which usage hints quote) is the same as qemu-img's.
    pub fn ours(&self, args: &[&str]) -> Out {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
        dirs.insert(0, self.ours.parent().unwrap().to_path_buf());
        let o = Command::new("qemu-img")
            .args(args)
            .env("PATH", std::env::join_paths(dirs).unwrap())
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.ours.display()));
        Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// Runs qemu-img with `args`, which must succeed.
    pub fn qemu_ok(&self, args: &[&str]) -> Out {
        let o = self.qemu(args);
        assert_eq!(o.code, 0, "qemu-img {args:?} failed: {o:?}");
        o
    }

    /// Runs oxqcow with `args`, which must succeed.
    pub fn ours_ok(&self, args: &[&str]) -> Out {
        let o = self.ours(args);
        assert_eq!(o.code, 0, "oxqcow {args:?} failed: {o:?}");
        o
    }

    /// Runs qemu-io commands on an image.
    pub fn qemu_io(&self, fmt: &str, image: &str, cmds: &[&str]) {
        let mut args = vec!["-f", fmt];
        for c in cmds {
            args.push("-c");
            args.push(c);
        }
        args.push(image);
        let o = self.run(Path::new("qemu-io"), &args);
        assert_eq!(o.code, 0, "qemu-io {args:?} failed: {o:?}");
        assert!(!o.stdout.contains("failed"), "qemu-io {args:?}: {}", o.stdout);
    }

    /// Runs the same command with both tools and asserts identical stdout,
    /// stderr and exit code.
    pub fn assert_same(&self, args: &[&str]) -> Out {
        let q = self.qemu(args);
        let o = self.ours(args);
        assert_eq!(o, q, "oxqcow and qemu-img differ for {args:?}");
        o
    }

    /// `qemu-img check` must find no errors and no leaks.
    pub fn assert_clean(&self, image: &str) {
        let o = self.qemu(&["check", image]);
        assert_eq!(o.code, 0, "qemu-img check {image}: {o:?}");
        assert!(o.stdout.contains("No errors were found on the image."), "qemu-img check {image}: {o:?}");
    }

    /// `qemu-img compare` must call the images identical.
    pub fn assert_identical(&self, a: &str, b: &str) {
        let o = self.qemu(&["compare", a, b]);
        assert_eq!(o.code, 0, "qemu-img compare {a} {b}: {o:?}");
        assert_eq!(o.stdout, "Images are identical.\n");
    }

    /// Bytes qemu-img map reports as data (allocated, not zero).
    pub fn data_bytes(&self, image: &str) -> u64 {
        let o = self.qemu_ok(&["map", "--output=json", image]);
        let v: serde_json::Value = serde_json::from_str(&o.stdout).expect("map json");
        v.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["data"] == true && e["zero"] == false)
            .map(|e| e["length"].as_u64().unwrap())
            .sum()
    }

    /// Bytes of `[offset, offset + len)` that qemu-img map reports as data.
    pub fn data_bytes_in(&self, image: &str, offset: u64, len: u64) -> u64 {
        let o = self.qemu_ok(&["map", "--output=json", image]);
        let v: serde_json::Value = serde_json::from_str(&o.stdout).expect("map json");
        v.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["data"] == true && e["zero"] == false)
            .map(|e| {
                let start = e["start"].as_u64().unwrap();
                let end = start + e["length"].as_u64().unwrap();
                end.min(offset + len).saturating_sub(start.max(offset))
            })
            .sum()
    }

    /// Host bytes allocated to a file.
    pub fn allocated(&self, name: &str) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(self.path(name)).unwrap().blocks() * 512
    }
}

/// A small deterministic generator (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next() as u8 | 1;
        }
    }
}

/// Writes a sparse raw image of `size` bytes with random data, zero runs
/// written as data, data with zero runs inside, and holes left unwritten.
pub fn random_raw(path: &Path, size: u64, seed: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut rng = Rng::new(seed);
    let lens = [1u64, 511, 512, 4096, 8192, 65536, 200_000];
    for _ in 0..(size >> 18).max(8) {
        let len = lens[rng.below(lens.len() as u64) as usize];
        let off = rng.below(size - len) / 512 * 512 + if rng.below(4) == 0 { 100 } else { 0 };
        let len = len.min(size - off);
        let mut buf = vec![0u8; len as usize];
        match rng.below(10) {
            0..=4 => rng.fill(&mut buf),
            5..=7 => {} // zeros written as data
            _ => {
                rng.fill(&mut buf);
                let z = rng.below(len) as usize;
                let zl = (len as usize - z).min(20_000);
                buf[z..z + zl].fill(0);
            }
        }
        f.write_all_at(&buf, off).unwrap();
    }
}
