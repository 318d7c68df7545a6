//! A check that finds a problem per reference must not keep what it finds.
//!
//! Guards against issue 9, item 7: `check` collected every message line
//! in memory, so an image whose 65536 L1 entries all name one L2 table
//! (a million refcount overflows, two lines each) made it use 180 MB here,
//! and gigabytes for larger tables, until the allocator aborted it,
//! printing nothing; a read-write open of such an image with the dirty
//! bit set (whose repair QEMU runs at open) did the same. QEMU prints each
//! line as it finds it, in under 10 MB.
//!
//! The image: 512-byte clusters, 1-bit refcounts (every reference after
//! the first overflows), 65536 L1 entries that all name the L2 table of
//! guest cluster 0, which maps eight data clusters: 1179630 lines, 106 MB.
//! oxqcow runs in a child under a 128 MiB address-space limit; QEMU runs
//! beside it on an identical copy, and the two stderr streams are compared
//! line by line as they arrive (neither is stored), then exit codes,
//! stdout and the resulting files.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::{must, qemu_img, qemu_io, Pair};

/// Address space oxqcow may use (`ulimit -v`, KiB): ten times what it
/// needs for this image, well below what keeping the lines took.
const LIMIT_KIB: u64 = 128 * 1024;

/// Makes `name` in `dir`: the image described in the module comment,
/// with lazy refcounts and the dirty bit when `dirty`.
fn craft(dir: &Path, name: &str, dirty: bool) {
    let lazy = if dirty { ",lazy_refcounts=on" } else { "" };
    let opts = format!("cluster_size=512,refcount_bits=1{lazy}");
    must(dir, qemu_img(), &["create", "-q", "-f", "qcow2", "-o", &opts, name, "2G"]);
    must(dir, qemu_io(), &["-c", "write -P 1 0 4k", name]);
    let path = dir.join(name);
    let mut b = std::fs::read(&path).unwrap();
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l1 = be64(&b, 40) as usize;
    let l1_size = u32::from_be_bytes(b[36..40].try_into().unwrap()) as usize;
    assert_eq!(l1_size, 65536, "2G of 512-byte clusters needs 65536 L1 entries");
    let first = b[l1..l1 + 8].to_vec();
    assert_ne!(be64(&first, 0), 0, "guest cluster 0 has an L2 table");
    for i in 1..l1_size {
        b[l1 + i * 8..l1 + i * 8 + 8].copy_from_slice(&first);
    }
    if dirty {
        // Incompatible feature bit 0, as a crash with lazy refcounts leaves it.
        b[79] |= 1;
    }
    std::fs::write(&path, b).unwrap();
}

fn spawn(mut cmd: Command, dir: &Path) -> Child {
    cmd.current_dir(dir).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.spawn().unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"))
}

/// Runs `qemu` and `ours` (each in its own directory of `pair`) at once
/// and asserts that they print the same stderr, line for line, the same
/// stdout, and exit alike. Returns the number of stderr lines.
fn same_streams(pair: &Pair, qemu: Command, ours: Command) -> usize {
    let what = format!("{ours:?}");
    let mut q = spawn(qemu, &pair.qemu);
    let mut o = spawn(ours, &pair.ox);
    let mut q_err = BufReader::new(q.stderr.take().unwrap());
    let mut o_err = BufReader::new(o.stderr.take().unwrap());
    let (mut ql, mut ol) = (String::new(), String::new());
    let mut lines = 0;
    loop {
        ql.clear();
        ol.clear();
        let qn = q_err.read_line(&mut ql).unwrap();
        let on = o_err.read_line(&mut ol).unwrap();
        assert_eq!(ol, ql, "{what}: stderr line {} differs", lines + 1);
        if qn == 0 && on == 0 {
            break;
        }
        lines += 1;
    }
    let stdout = |c: &mut Child| {
        let mut s = String::new();
        c.stdout.take().unwrap().read_to_string(&mut s).unwrap();
        s
    };
    let (q_out, o_out) = (stdout(&mut q), stdout(&mut o));
    let (q_code, o_code) = (q.wait().unwrap().code(), o.wait().unwrap().code());
    assert_eq!((o_code, o_out), (q_code, q_out), "{what}: exit code or stdout differ");
    lines
}

/// oxqcow's `args` in a child under [`LIMIT_KIB`] and a timeout.
fn ours_limited(args: &[&str]) -> Command {
    let mut c = Command::new("timeout");
    c.args(["600", "sh", "-c", &format!("ulimit -v {LIMIT_KIB}; exec \"$0\" \"$@\""), env!("CARGO_BIN_EXE_oxqcow")]);
    c.args(args);
    c
}

fn tool(program: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

#[test]
fn check_of_one_l2_table_named_65536_times_streams_its_messages() {
    let setup = tempfile::tempdir().unwrap();
    craft(setup.path(), "shared.qcow2", false);
    let pair = Pair::from(setup.path());
    let args = ["check", "shared.qcow2"];
    let lines = same_streams(&pair, tool(qemu_img(), &args), ours_limited(&args));
    assert_eq!(lines, 1_179_630, "two lines per overflowing reference");
    // The repair (which keeps every count it cannot fix) with the JSON
    // summary: the lines still go to stderr, and the files end equal.
    let args = ["check", "-r", "all", "--output=json", "shared.qcow2"];
    assert_eq!(same_streams(&pair, tool(qemu_img(), &args), ours_limited(&args)), lines);
    pair.same_files(&args);
}

#[test]
fn read_write_open_of_a_dirty_image_streams_the_repair() {
    let setup = tempfile::tempdir().unwrap();
    craft(setup.path(), "dirty.qcow2", true);
    let pair = Pair::from(setup.path());
    // QEMU repairs a dirty image when it opens it read-write, printing
    // the lines of `check -r all` (here the overflows it cannot fix),
    // then runs the command.
    let cmds = ["-c", "read -q -P 1 0 4k", "-c", "write -q -P 2 4k 512", "dirty.qcow2"];
    let ours: Vec<&str> = ["io"].iter().chain(&cmds).copied().collect();
    let lines = same_streams(&pair, tool(qemu_io(), &cmds), ours_limited(&ours));
    assert_eq!(lines, 1_179_630);
    pair.same_files(&cmds);
}
