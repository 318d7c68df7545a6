//! Corruption met at run time, reported and handled as QEMU does: the
//! damaged images are made by qemu-img and qemu-io, patched the same way
//! for both tools, then read, written, mapped or amended by QEMU's tools
//! and by oxqcow under their names, with standard error joined to standard
//! output in one pipe. The lines, their order, the exit codes and the
//! files afterwards (the corrupt bit) must be the same.

mod common;

use std::path::Path;
use std::process::Command;

use common::{must, patch, qemu_img, qemu_io, Pair};

/// Runs `tool args...` in `dir` with both streams in one pipe: QEMU's
/// tool when `qemu`, else oxqcow under the tool's name.
fn joined(dir: &Path, qemu: bool, tool: &str, args: &[&str]) -> (i32, String) {
    let mut cmd = Command::new("bash");
    cmd.arg("-c").arg(r#"name=$1; shift; exec -a "$name" "$@" 2>&1"#).arg("bash").arg(tool);
    if qemu {
        cmd.arg(if tool == "qemu-io" { qemu_io() } else { qemu_img() });
    } else {
        cmd.arg(env!("CARGO_BIN_EXE_oxqcow"));
    }
    let out = cmd.args(args).current_dir(dir).output().expect("bash runs");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs both tools on their copy and asserts the same output and exit
/// code; returns QEMU's output. qemu-io's timing lines differ by nature
/// and are left out.
fn same(p: &Pair, tool: &str, args: &[&str]) -> String {
    let drop_timing = |(code, out): (i32, String)| {
        let lines: Vec<&str> = out.lines().filter(|l| !(l.contains(" ops; ") && l.ends_with(" ops/sec)"))).collect();
        (code, lines.join("\n"))
    };
    let theirs = drop_timing(joined(&p.qemu, true, tool, args));
    let ours = drop_timing(joined(&p.ox, false, tool, args));
    assert_eq!(ours, theirs, "oxqcow and QEMU differ for {tool} {args:?}");
    theirs.1
}

fn u64_at(path: &Path, offset: u64) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    let at = offset as usize;
    u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// A 64 MiB image with data in its first two clusters, made by QEMU in a
/// directory of its own; `extra` are more qemu-img create options.
fn written_image(extra: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["t.qcow2", "64M"]);
    must(dir.path(), qemu_img(), &args);
    must(dir.path(), qemu_io(), &["-c", "write -q 0 128k", "t.qcow2"]);
    dir
}

/// Where the first L1 entry and the first L2 entry of `t.qcow2` are.
fn table_entries(dir: &Path) -> (u64, u64) {
    let image = dir.join("t.qcow2");
    let l1 = u64_at(&image, 40);
    let l2 = u64_at(&image, l1) & 0x00ff_ffff_ffff_fe00;
    (l1, l2)
}

/// Picks the offset to damage from (first L1 entry, first L2 entry).
type Target = fn(u64, u64) -> u64;

/// The image `written_image` made, with `bytes` written at the offset
/// `at` picks, in two copies.
fn damaged(extra: &[&str], at: Target, bytes: u64) -> Pair {
    let setup = written_image(extra);
    let (l1, l2) = table_entries(setup.path());
    patch(&setup.path().join("t.qcow2"), at(l1, l2), &bytes.to_be_bytes());
    Pair::from(setup.path())
}

// Guards against the engine's own wording (and an extra detail) where
// QEMU's qcow2_get_host_offset has a message, and against an image that
// is not marked corrupt after a read met the corruption.
#[test]
fn unaligned_table_and_cluster_offsets_are_reported_in_qemus_words() {
    let cases: [(&str, Target, u64); 2] =
        [("L1 entry", |l1, _| l1, 0x8000_0000_0004_2a00), ("L2 entry", |_, l2| l2, 0x8000_0000_0005_2a00)];
    for (what, at, bytes) in cases {
        let p = damaged(&[], at, bytes);
        let out = same(&p, "qemu-io", &["-c", "read 0 64k", "t.qcow2"]);
        assert!(out.contains("Marking image as corrupt") && out.contains(" unaligned ("), "{what}: {out}");
        p.same_files(&[what, "read"]);
        // Read-only: reported once, not marked.
        let p = damaged(&[], at, bytes);
        let out = same(&p, "qemu-io", &["-r", "-c", "read 0 64k", "-c", "read 0 64k", "t.qcow2"]);
        assert_eq!(out.matches("Image is corrupt").count(), 1, "{what}: {out}");
        p.same_files(&[what, "read-only read"]);
    }
}

// Guards against writes into a cluster of the image's own (COPIED) that
// QEMU refuses in `handle_copied`: the message names the guest offset and
// whether the cluster was a preallocated zero cluster.
#[test]
fn writes_into_unaligned_clusters_are_reported_in_qemus_words() {
    for (entry, write) in [(0x8000_0000_0005_2a00u64, "write 4k 4k"), (0x8000_0000_0005_2a01, "write 0 64k")] {
        let p = damaged(&[], |_, l2| l2, entry);
        let out = same(&p, "qemu-io", &["-c", write, "t.qcow2"]);
        assert!(out.contains("cluster offset 0x52a00 unaligned (guest offset: "), "{out}");
        p.same_files(&[write]);
    }
}

// Guards against a downgrade that skipped an unaligned L1 entry (and so
// succeeded where QEMU fails) and against the engine's wording of an
// unaligned preallocated zero cluster met while expanding zero clusters.
#[test]
fn downgrades_stop_at_unaligned_tables_as_qemu_does() {
    let cases: [(Target, u64); 2] = [(|l1, _| l1, 0x8000_0000_0004_2a00), (|_, l2| l2, 0x8000_0000_0005_2a01)];
    for (at, bytes) in cases {
        let p = damaged(&[], at, bytes);
        let out = same(&p, "qemu-img", &["amend", "-o", "compat=0.10", "t.qcow2"]);
        assert!(out.ends_with("Failed to turn zero into data clusters: Input/output error"), "{out}");
        p.same_files(&["amend"]);
    }
}

// Guards against the zero flag of a version 2 image read as zeros or
// reported in the engine's words.
#[test]
fn zero_flags_in_version_2_images_are_corruption() {
    let p = damaged(&["-o", "compat=0.10"], |_, l2| l2, 0x8000_0000_0005_0001);
    let out = same(&p, "qemu-io", &["-c", "read 0 64k", "t.qcow2"]);
    assert!(out.contains("Zero cluster entry found in pre-v3 image (L2 offset: 0x40000, L2 index: 0)"), "{out}");
    p.same_files(&["read"]);
}

// Guards against the two spellings of QEMU's "Invalid cluster entry
// found" being merged into one (its read path has two spaces before the
// parenthesis, its write path one) and against added detail.
#[test]
fn invalid_subcluster_bitmaps_are_reported_as_qemu_reports_them() {
    for cmd in ["read 64k 4k", "write 64k 4k"] {
        let setup = written_image(&["-o", "extended_l2=on"]);
        let (_, l2) = table_entries(setup.path());
        // Entry 1: a subcluster both allocated and zero.
        patch(&setup.path().join("t.qcow2"), l2 + 16 + 8, &0x0000_0001_ffff_ffffu64.to_be_bytes());
        let p = Pair::from(setup.path());
        let out = same(&p, "qemu-io", &["-c", cmd, "t.qcow2"]);
        assert!(out.contains("Invalid cluster entry found"), "{out}");
        p.same_files(&[cmd]);
    }
}

// Guards against `map` failing as a whole at the first window holding a
// damaged entry: qemu-img prints the extents before it, then
// "Could not read file metadata: Input/output error" after the corruption
// report, and stops; qemu-io's map prints its runs up to the damage.
#[test]
fn map_prints_what_lies_before_a_damaged_entry() {
    let setup = tempfile::tempdir().unwrap();
    must(setup.path(), qemu_img(), &["create", "-q", "-f", "qcow2", "t.qcow2", "1G"]);
    must(
        setup.path(),
        qemu_io(),
        &["-c", "write -q 0 64k", "-c", "write -q 128k 64k", "-c", "write -q 600M 64k", "t.qcow2"],
    );
    let image = setup.path().join("t.qcow2");
    let l1 = u64_at(&image, 40);
    let second_l2 = u64_at(&image, l1 + 8) & 0x00ff_ffff_ffff_fe00;
    let entry_at = second_l2 + (600 - 512) * 1024 * 1024 / 65536 * 8;
    patch(&image, entry_at, &(u64_at(&image, entry_at) | 0x200).to_be_bytes());
    let p = Pair::from(setup.path());
    for output in ["--output=human", "--output=json"] {
        let out = same(&p, "qemu-img", &["map", output, "t.qcow2"]);
        // The report, the error and the three extents before the damage.
        assert!(out.contains("Could not read file metadata: Input/output error") && out.lines().count() >= 5, "{out}");
    }
    // qemu-io's map prints the runs up to the damage, the last one cut there.
    let out = same(&p, "qemu-io", &["-r", "-c", "map", "t.qcow2"]);
    assert!(out.contains("Failed to get allocation status: Input/output error") && out.lines().count() >= 6, "{out}");
    p.same_files(&["map"]);
}

/// Refcount structures of a new 64 MiB image with 64 KiB clusters, as
/// qemu-img lays them out.
const REFCOUNT_TABLE: u64 = 0x10000;
const REFCOUNT_BLOCK: u64 = 0x20000;

// Guards against a placeholder ("allocation of cluster at offset 0") where
// QEMU's allocator, misled by zeroed refcounts into handing out the
// header's cluster, is stopped in the words of whatever it was allocating:
// an L2 table or a compressed cluster (checked for offset 0 by name), a
// data cluster (the overlap check of its write), or the refcount block it
// then needs (the overlap check of the block's write).
#[test]
fn allocations_misled_to_the_header_are_refused_as_qemu_refuses_them() {
    struct Case {
        prepare: &'static [&'static str],
        zeroed: (u64, usize),
        then: &'static str,
        says: &'static str,
    }
    let cases = [
        Case {
            prepare: &[],
            zeroed: (REFCOUNT_BLOCK, 8),
            then: "write 0 64k",
            says: "allocation of L2 table at offset 0",
        },
        Case {
            prepare: &["write -q 64k 64k"],
            zeroed: (REFCOUNT_BLOCK, 8),
            then: "write -c 0 64k",
            says: "allocation of compressed cluster at offset 0",
        },
        Case {
            prepare: &["write -q 0 64k"],
            zeroed: (REFCOUNT_BLOCK, 2),
            then: "write 64k 64k",
            says: "(overlaps with qcow2_header)",
        },
        Case { prepare: &[], zeroed: (REFCOUNT_TABLE, 8), then: "write 0 64k", says: "(overlaps with refcount table)" },
    ];
    for case in cases {
        let setup = tempfile::tempdir().unwrap();
        must(setup.path(), qemu_img(), &["create", "-q", "-f", "qcow2", "t.qcow2", "64M"]);
        for cmd in case.prepare {
            must(setup.path(), qemu_io(), &["-c", cmd, "t.qcow2"]);
        }
        let (at, len) = case.zeroed;
        patch(&setup.path().join("t.qcow2"), at, &vec![0; len]);
        let p = Pair::from(setup.path());
        let out = same(&p, "qemu-io", &["-c", case.then, "t.qcow2"]);
        assert!(out.contains(case.says), "{}: {out}", case.then);
        p.same_files(&[case.then]);
    }
}

// Guards against check refusing to open an image whose header gives its
// refcount table no clusters: QEMU's open for check skips that test (the
// normal open refuses the image, in both), so that the refcounts can be
// rebuilt.
#[test]
fn check_repairs_a_refcount_table_of_no_clusters() {
    let setup = written_image(&[]);
    must(setup.path(), qemu_img(), &["snapshot", "-c", "s1", "t.qcow2"]);
    must(setup.path(), qemu_io(), &["-c", "write -q -P 5 64k 192k", "t.qcow2"]);
    patch(&setup.path().join("t.qcow2"), 56, &[0; 4]);
    let p = Pair::from(setup.path());
    let out = same(&p, "qemu-io", &["-c", "read 0 64k", "t.qcow2"]);
    assert!(out.contains("Image does not contain a reference count table"), "{out}");
    let out = same(&p, "qemu-img", &["check", "t.qcow2"]);
    assert!(out.contains("ERROR cluster 0 refcount=0 reference=1"), "{out}");
    let out = same(&p, "qemu-img", &["check", "-r", "all", "t.qcow2"]);
    assert!(out.contains("No errors were found on the image."), "{out}");
    p.same_files(&["check -r all"]);
}

// Guards against read-only opens refusing an image whose refcount table
// or snapshot table runs past the end of the file (a truncated copy):
// QEMU reads the missing part as zeros, so info, map, convert and
// snapshot -l work on it. A read-write open still refuses it (QEMU's
// allocator would take the clusters those zeros call free).
#[test]
fn read_only_opens_take_tables_past_the_end_of_the_file() {
    let setup = written_image(&[]);
    must(setup.path(), qemu_img(), &["snapshot", "-c", "s1", "t.qcow2"]);
    must(setup.path(), qemu_io(), &["-c", "write -q -P 9 1M 64k", "t.qcow2"]);
    let image = setup.path().join("t.qcow2");
    let len = std::fs::metadata(&image).unwrap().len();
    let past_end = len.next_multiple_of(65536);
    // (header field, what it names)
    for (field, what) in [(48u64, "refcount table"), (64, "snapshot table")] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(&image, dir.path().join("t.qcow2")).unwrap();
        patch(&dir.path().join("t.qcow2"), field, &past_end.to_be_bytes());
        let p = Pair::from(dir.path());
        for args in [
            &["info", "t.qcow2"][..],
            &["map", "--output=json", "t.qcow2"],
            &["snapshot", "-l", "t.qcow2"],
            &["convert", "-O", "raw", "t.qcow2", "t.raw"],
            &["check", "t.qcow2"],
        ] {
            same(&p, "qemu-img", args);
        }
        p.same_files(&[what]);
        let (q, o) = (
            joined(&p.qemu, true, "qemu-io", &["-c", "write 0 4k", "t.qcow2"]),
            joined(&p.ox, false, "qemu-io", &["-c", "write 0 4k", "t.qcow2"]),
        );
        assert_ne!(q.0 + o.0, 0, "{what}: a write must fail in both: {q:?} {o:?}");
    }
}

// Guards against read-only opens refusing an image for a damaged refcount
// table entry (a block outside the image, reserved bits): QEMU opens it
// and only what needs the block fails, so info, map, convert and check
// work. (A read-write open still refuses it: see `Refcounts::load`.)
#[test]
fn read_only_opens_take_damaged_refcount_table_entries() {
    for entry in [0x00ff_ffff_0000_0000u64, 0x10_0000_0000, 0x0000_0000_0002_0001] {
        let setup = written_image(&[]);
        patch(&setup.path().join("t.qcow2"), REFCOUNT_TABLE + 8, &entry.to_be_bytes());
        let p = Pair::from(setup.path());
        for args in [
            &["info", "t.qcow2"][..],
            &["map", "--output=json", "t.qcow2"],
            &["convert", "-O", "raw", "t.qcow2", "t.raw"],
            &["check", "t.qcow2"],
        ] {
            same(&p, "qemu-img", args);
        }
        p.same_files(&[&format!("{entry:#x}")]);
    }
}

// Guards against the open for check and read-only opens refusing a
// refcount table placed on the header ("Reference count table at offset
// 0x0 overlaps the image header"): QEMU opens such an image, so info and
// map work and check reports what it finds. Read-write opens still refuse
// it. `check -r all` repairs it (QEMU's repair also grows the file to
// 4 GiB; oxqcow's does not, so only the result's consistency is compared).
#[test]
fn a_refcount_table_on_the_header_is_read_and_repaired() {
    let setup = written_image(&[]);
    patch(&setup.path().join("t.qcow2"), 48, &0u64.to_be_bytes());
    let p = Pair::from(setup.path());
    for args in [&["info", "t.qcow2"][..], &["map", "--output=json", "t.qcow2"], &["check", "t.qcow2"]] {
        same(&p, "qemu-img", args);
    }
    let (code, out) = joined(&p.ox, false, "qemu-io", &["-c", "write 0 4k", "t.qcow2"]);
    assert!(code != 0 && out.contains("overlaps the image header"), "{out}");
    let (code, out) = joined(&p.ox, false, "qemu-img", &["check", "-r", "all", "t.qcow2"]);
    assert!(code == 0 && out.contains("No errors were found on the image."), "{out}");
    must(&p.ox, qemu_img(), &["check", "t.qcow2"]);
    let o = must(&p.ox, qemu_img(), &["compare", "-f", "qcow2", "-F", "qcow2", "t.qcow2", "../qemu/t.qcow2"]);
    assert_eq!(o.stdout, "Images are identical.\n");
}
