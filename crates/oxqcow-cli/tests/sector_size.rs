//! A qcow2 disk whose header size is not a multiple of 512 bytes, seen by
//! every command as QEMU sees it: rounded down to whole sectors, the tail
//! not addressable. (Raw files round up instead, as QEMU's file layer
//! does; `map.rs` covers that.)
//!
//! Guards against issue 9 item 11: such a size was exposed byte-exact, so
//! `info`, `convert`, `io`, `map` and the NBD export showed a disk QEMU
//! does not have.

mod common;

use std::path::Path;
use std::process::Command;

use common::{patch, Scratch};

/// Sizes a header may record, and the disk QEMU makes of each.
const SIZES: [(u64, u64); 4] = [(1000, 512), (66_000, 65_536), (1_048_676, 1_048_576), (1, 0)];

/// A 2 MiB qcow2 image with data up to 2 MiB, its header size then set to
/// `size` (its L1 table covers any size up to 512 MiB).
fn crafted(s: &Scratch, name: &str, size: u64) {
    s.qemu_ok(&["create", "-q", "-f", "qcow2", name, "2M"]);
    s.qemu_io("qcow2", name, &["write -P 7 0 2M"]);
    patch(&s.path(name), 24, &size.to_be_bytes());
}

fn qemu_io_lines(program: &Path, io: bool, dir: &Path, image: &str, cmds: &[String]) -> (Option<i32>, String) {
    let mut cmd = Command::new(program);
    if io {
        cmd.arg("io");
    }
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let o = cmd.arg(image).current_dir(dir).output().unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.contains("ops; ")).collect();
    (o.status.code(), lines.join("\n"))
}

#[test]
fn a_partial_last_sector_is_not_part_of_the_disk() {
    let s = Scratch::new();
    for (size, disk) in SIZES {
        let name = format!("s{size}.qcow2");
        crafted(&s, &name, size);
        s.assert_same(&["info", &name]);
        s.assert_same(&["info", "--output=json", &name]);
        s.assert_same(&["map", "--output=json", &name]);
        s.assert_same(&["measure", "-O", "qcow2", &name]);
        s.assert_same(&["check", &name]);
        s.assert_same(&["compare", &name, &name]);
        let info = s.ours_ok(&["info", "--output=json", &name]).stdout;
        assert!(info.contains(&format!("\"virtual-size\": {disk},")), "{name}: {info}");

        s.ours_ok(&["convert", "-O", "raw", &name, "ours.raw"]);
        s.qemu_ok(&["convert", "-O", "raw", &name, "qemu.raw"]);
        let ours = std::fs::read(s.path("ours.raw")).unwrap();
        assert_eq!(ours.len() as u64, disk, "{name}");
        assert_eq!(ours, std::fs::read(s.path("qemu.raw")).unwrap(), "{name}");
        s.ours_ok(&["convert", "-O", "qcow2", &name, "ours.qcow2"]);
        s.assert_same(&["info", "--output=json", "ours.qcow2"]);
        s.assert_identical(&name, "ours.qcow2");
        s.assert_same(&["compare", &name, "ours.raw"]);

        // Reads and writes at the end of the disk, on two copies.
        std::fs::copy(s.path(&name), s.path("q.qcow2")).unwrap();
        std::fs::copy(s.path(&name), s.path("o.qcow2")).unwrap();
        let last = disk.saturating_sub(512);
        let cmds: Vec<String> = vec![
            "length".into(),
            format!("read -P 7 0 {disk}"),
            format!("read {disk} 8"),
            format!("read {} 16", disk.saturating_sub(8)),
            format!("write -P 9 {last} {}", disk - last),
            format!("write -P 9 {disk} 1"),
            format!("read -P 9 {last} {}", disk - last),
        ];
        let theirs = qemu_io_lines(Path::new("qemu-io"), false, s.dir.path(), "q.qcow2", &cmds);
        let ours = qemu_io_lines(Path::new(env!("CARGO_BIN_EXE_oxqcow")), true, s.dir.path(), "o.qcow2", &cmds);
        assert_eq!(ours, theirs, "{name}");
        s.assert_identical("q.qcow2", "o.qcow2");
    }
}

#[test]
fn the_nbd_export_has_the_size_qemu_nbd_gives() {
    let s = Scratch::new();
    let nbdinfo = |server: &[&str]| {
        let out = Command::new("nbdinfo")
            .args(["--size", "--", "["])
            .args(server)
            .arg("]")
            .current_dir(s.dir.path())
            .output()
            .expect("nbdinfo is required by this test (apt-get install libnbd-bin)");
        assert!(out.status.success(), "nbdinfo {server:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    for (size, disk) in SIZES {
        let name = format!("s{size}.qcow2");
        crafted(&s, &name, size);
        let theirs = nbdinfo(&["qemu-nbd", "-r", "-f", "qcow2", &name]);
        let ours = nbdinfo(&[env!("CARGO_BIN_EXE_oxqcow"), "serve", "-r", "-f", "qcow2", &name]);
        assert_eq!(ours, theirs, "{name}");
        assert_eq!(ours, disk.to_string(), "{name}");
    }
}

/// What QEMU writes back when it rewrites the header (amend, bitmaps) is
/// the disk it sees; a snapshot records that size too, and applying a
/// snapshot whose recorded size is not whole sectors fails as in QEMU.
#[test]
fn rewritten_headers_and_snapshots_record_the_rounded_size() {
    let s = Scratch::new();
    let header_size = |name: &str| {
        let bytes = std::fs::read(s.path(name)).unwrap();
        u64::from_be_bytes(bytes[24..32].try_into().unwrap())
    };
    for (tool, name) in [("qemu", "q.qcow2"), ("ours", "o.qcow2")] {
        crafted(&s, name, 1000);
        let args = ["amend", "-o", "lazy_refcounts=on", name];
        if tool == "qemu" {
            s.qemu_ok(&args)
        } else {
            s.ours_ok(&args)
        };
        let args = ["bitmap", "--add", name, "b0"];
        if tool == "qemu" {
            s.qemu_ok(&args)
        } else {
            s.ours_ok(&args)
        };
    }
    assert_eq!(header_size("o.qcow2"), header_size("q.qcow2"));
    assert_eq!(header_size("o.qcow2"), 512);

    crafted(&s, "sn.qcow2", 1000);
    s.ours_ok(&["snapshot", "-c", "s1", "sn.qcow2"]);
    let bytes = std::fs::read(s.path("sn.qcow2")).unwrap();
    let table = u64::from_be_bytes(bytes[64..72].try_into().unwrap()) as usize;
    // The first entry's extra data: vm_state_size_large, then disk_size.
    let disk_size = u64::from_be_bytes(bytes[table + 48..table + 56].try_into().unwrap());
    assert_eq!(disk_size, 512, "the snapshot's disk size");

    for name in ["sa-q.qcow2", "sa-o.qcow2"] {
        s.qemu_ok(&["create", "-q", "-f", "qcow2", name, "1M"]);
        s.qemu_ok(&["snapshot", "-c", "s1", name]);
        let bytes = std::fs::read(s.path(name)).unwrap();
        let table = u64::from_be_bytes(bytes[64..72].try_into().unwrap());
        patch(&s.path(name), table + 48, &1000u64.to_be_bytes());
    }
    let before = std::fs::read(s.path("sa-o.qcow2")).unwrap();
    let q = s.qemu(&["snapshot", "-a", "s1", "sa-q.qcow2"]);
    let o = s.ours(&["snapshot", "-a", "s1", "sa-o.qcow2"]);
    assert_eq!(o, q);
    assert_eq!(std::fs::read(s.path("sa-o.qcow2")).unwrap(), before, "a refused apply changed the image");
}
