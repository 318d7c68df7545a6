//! Snapshot tables past QEMU's limits, built by the test on images
//! qemu-img creates: more than 65536 entries, a table that grows past
//! 64 MiB, entries with more than 1 KiB of extra data. An open refuses
//! them with QEMU's message and hint; `check` reads them itself and
//! reports them; `check -r all` drops what is past the limits and leaves
//! an image `qemu-img check` finds clean. Each step is run by qemu-img and
//! by oxqcow on identical copies and must print the same and exit alike;
//! after the repair, `info` and `snapshot -l` must agree too.

mod common;

use std::path::Path;

use common::{must, patch, qemu_img, words, Pair};

/// Where the built tables start: past everything a fresh image holds.
const TABLE: u64 = 1 << 20;
/// A fresh 64 KiB-cluster image's refcount block (16-bit entries).
const REFBLOCK: u64 = 0x20000;

/// Marks the clusters from `start` to `end` (bytes) as used in the first
/// refcount block, so that the built table is no leak.
fn allocate(path: &Path, start: u64, end: u64) {
    let (first, last) = (start >> 16, end.div_ceil(1 << 16));
    let counts: Vec<u8> = (first..last).flat_map(|_| [0, 1]).collect();
    patch(path, REFBLOCK + 2 * first, &counts);
}

/// Points the header at a table of `count` entries at [`TABLE`].
fn hook_up(path: &Path, count: u32) {
    patch(path, 60, &count.to_be_bytes());
    patch(path, 64, &TABLE.to_be_bytes());
}

/// The fixed part of an entry: id and name lengths, extra data size.
fn entry_header(id_len: u16, name_len: u16, extra: u32) -> Vec<u8> {
    let mut e = vec![0u8; 40];
    e[12..14].copy_from_slice(&id_len.to_be_bytes());
    e[14..16].copy_from_slice(&name_len.to_be_bytes());
    e[36..40].copy_from_slice(&extra.to_be_bytes());
    e
}

/// Runs the open, the check and each repair on copies of `x.qcow2` with
/// both tools; after `-r all`, both results must check clean and list the
/// same snapshots.
fn compare_repairs(pair: &Pair) {
    for args in ["info x.qcow2", "check x.qcow2", "check --output=json x.qcow2"] {
        let o = pair.same_output(&words(args));
        assert_ne!(o.code, 0, "{args}: the damage must be seen: {o:?}");
    }
    for mode in ["leaks", "all"] {
        for d in [&pair.qemu, &pair.ox] {
            std::fs::copy(d.join("x.qcow2"), d.join("r.qcow2")).unwrap();
        }
        pair.same_output(&["check", "-r", mode, "r.qcow2"]);
    }
    for d in [&pair.qemu, &pair.ox] {
        let after = must(d, qemu_img(), &words("check r.qcow2"));
        assert!(after.stdout.contains("No errors were found on the image."), "{after:?}");
    }
    pair.same_output(&words("snapshot -l r.qcow2"));
    pair.same_output(&words("info --output=json r.qcow2"));
}

fn fresh(pair: &Pair, opts: &str) {
    must(&pair.qemu, qemu_img(), &words(&format!("create -q -f qcow2 {opts} x.qcow2 64M")));
}

fn copy_to_ox(pair: &Pair) {
    std::fs::copy(pair.qemu.join("x.qcow2"), pair.ox.join("x.qcow2")).unwrap();
}

// Guards against refusing to check an image whose header counts more than
// 65536 snapshots: QEMU's check names the overhang and its -r all keeps
// the first 65536 entries (the rest of the table and what only the
// dropped entries used become leaks it repairs).
#[test]
fn too_many_snapshots_like_qemu() {
    let pair = Pair::new();
    // Version 2, where entries of 40 zero bytes are valid snapshots.
    fresh(&pair, "-o compat=0.10");
    let x = pair.qemu.join("x.qcow2");
    let count = 65536 + 700;
    hook_up(&x, count);
    let end = TABLE + 40 * u64::from(count);
    std::fs::OpenOptions::new().write(true).open(&x).unwrap().set_len(end).unwrap();
    // One of the dropped entries owns an L1 table (cluster 8) naming an L2
    // table (cluster 9).
    let mut owner = entry_header(0, 0, 0);
    owner[..8].copy_from_slice(&0x80000u64.to_be_bytes());
    owner[8..12].copy_from_slice(&1u32.to_be_bytes());
    patch(&x, TABLE + 40 * 65600, &owner);
    patch(&x, 0x80000, &0x8000_0000_0009_0000u64.to_be_bytes());
    allocate(&x, 0x80000, end);
    copy_to_ox(&pair);
    compare_repairs(&pair);
}

// Guards against refusing to check an image whose snapshot table grows
// past 64 MiB: QEMU's check says how many entries overhang, its -r all
// ends the table before the entry that crosses the limit.
#[test]
fn table_past_64_mib_like_qemu() {
    let pair = Pair::new();
    fresh(&pair, "");
    let x = pair.qemu.join("x.qcow2");
    // Entries with 65535-byte ids and names (NUL bytes: empty strings)
    // and 1 KiB of extra data.
    let size = 40 + 1024 + 2 * 65535 + 2;
    let count = (64 << 20) / size + 2;
    hook_up(&x, count as u32);
    let fixed = entry_header(0xffff, 0xffff, 1024);
    for i in 0..count {
        patch(&x, TABLE + i * size, &fixed);
    }
    let end = TABLE + count * size;
    std::fs::OpenOptions::new().write(true).open(&x).unwrap().set_len(end).unwrap();
    allocate(&x, TABLE, end);
    copy_to_ox(&pair);
    compare_repairs(&pair);
}

// Guards against refusing, with a text of our own, entries with more extra
// data than QEMU accepts: its open says "Too much extra metadata in
// snapshot table entry N" with a hint, and its -r all keeps the first
// 1 KiB of the extra data and rewrites the table.
#[test]
fn too_much_extra_data_like_qemu() {
    for (opts, extra) in [("", 0x10000u32), ("-o compat=0.10", 2000), ("", 0xffff_ffff)] {
        let pair = Pair::new();
        fresh(&pair, opts);
        for name in ["one", "two", "three"] {
            must(&pair.qemu, qemu_img(), &["snapshot", "-c", name, "x.qcow2"]);
        }
        let x = pair.qemu.join("x.qcow2");
        let bytes = std::fs::read(&x).unwrap();
        let be = |at: usize, n: usize| bytes[at..at + n].iter().fold(0u64, |v, &b| v << 8 | u64::from(b));
        // The second entry, after the first (padded to 8 bytes).
        let first = be(64, 8) as usize;
        let len = 40 + be(first + 36, 4) + be(first + 12, 2) + be(first + 14, 2);
        let second = first as u64 + len.div_ceil(8) * 8;
        patch(&x, second + 36, &extra.to_be_bytes());
        copy_to_ox(&pair);
        compare_repairs(&pair);
    }
}
