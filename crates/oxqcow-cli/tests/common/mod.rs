//! Helpers for running `oxqcow` next to qemu-img and qemu-io on the same
//! images. Tests that need QEMU's tools fail loudly when they are missing.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::Command;

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

    /// Runs oxqcow (invoked as `qemu-img`).
    pub fn ours(&self, args: &[&str]) -> Out {
        self.run(&self.ours, args)
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
