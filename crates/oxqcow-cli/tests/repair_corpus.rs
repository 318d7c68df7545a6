//! A corpus of damaged images, made by patching bytes of images qemu-img
//! and qemu-io create, each checked and repaired by `oxqcow check` and by
//! `qemu-img check` on identical copies: the plain check (human and JSON)
//! must print the same lines and exit with the same code, and so must
//! `check -r leaks` and `check -r all`; after both repairs `qemu-img check`
//! of each result and `qemu-img compare` against the undamaged original
//! must agree.
//!
//! The few cases where oxqcow deliberately differs are marked, with the
//! reason, and checked for what oxqcow does instead.

mod common;

use std::path::Path;

use common::{must, patch, qemu_img, qemu_io, run_in, words, Outcome, Pair, Rng};

/// Layout of the 64 KiB-cluster bases: header 0, refcount table 0x10000,
/// refcount block 0x20000 (16-bit entries), L1 0x30000, L2 0x40000.
const RB: u64 = 0x20000;

fn be16(v: u16) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}
fn be64(v: u64) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

/// Builds the undamaged base images.
fn bases() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let q = qemu_img();
    // plain: data clusters 5, 7, 8, 9; cluster 6 freed by the discard.
    must(d, q, &words("create -q -f qcow2 plain.qcow2 64M"));
    must(d, qemu_io(), &["-c", "write -P 1 0 256k", "-c", "write -P 2 1M 64k", "-c", "discard 64k 64k", "plain.qcow2"]);
    // snap: plain plus a snapshot (L1 at 0x60000, table at 0xa0000) and
    // writes after it (shared clusters 7..9, COW copies).
    std::fs::copy(d.join("plain.qcow2"), d.join("snap.qcow2")).unwrap();
    must(d, q, &words("snapshot -c s1 snap.qcow2"));
    must(d, qemu_io(), &["-c", "write -P 3 0 64k", "-c", "write -P 4 2M 64k", "snap.qcow2"]);
    // cmpz: compressed clusters packed into cluster 5.
    must(d, q, &words("create -q -f raw src.raw 4M"));
    must(d, qemu_io(), &["-f", "raw", "-c", "write -P 5 0 1M", "-c", "write -P 9 2M 64k", "src.raw"]);
    must(d, q, &words("convert -c -O qcow2 src.raw cmpz.qcow2"));
    // v2: version 2 with a snapshot.
    must(d, q, &words("create -q -f qcow2 -o compat=0.10 v2.qcow2 64M"));
    must(d, qemu_io(), &["-c", "write -P 1 0 256k", "-c", "write -P 2 1M 64k", "-c", "discard 64k 64k", "v2.qcow2"]);
    must(d, q, &words("snapshot -c s v2.qcow2"));
    // rb1: 1-bit refcounts, 4 KiB clusters (L2 at 0x4000, data 0x5000..).
    must(d, q, &words("create -q -f qcow2 -o refcount_bits=1,cluster_size=4k rb1.qcow2 1M"));
    must(d, qemu_io(), &["-c", "write -P 1 0 16k", "rb1.qcow2"]);
    // bitmap: a persistent bitmap (directory, table and data clusters).
    must(d, q, &words("create -q -f qcow2 bitmap.qcow2 64M"));
    must(d, q, &words("bitmap --add bitmap.qcow2 bm"));
    must(d, qemu_io(), &["-c", "write -P 1 0 256k", "bitmap.qcow2"]);
    // lazy: lazy refcounts.
    must(d, q, &words("create -q -f qcow2 -o lazy_refcounts=on lazy.qcow2 64M"));
    must(d, qemu_io(), &["-c", "write -P 1 0 256k", "lazy.qcow2"]);
    dir
}

/// What oxqcow does differently from qemu-img 10 on a case, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Known {
    /// Same output, same exit codes, same repaired images.
    Same,
    /// qemu-img's `-r all` fails (its rebuild or its COPIED repair trips
    /// its own overlap check on a structure the damage left behind and
    /// marks the image corrupt); oxqcow's repair completes.
    OursRepairs,
}

/// Bytes written over an image: (offset, bytes).
type Patches = Vec<(u64, Vec<u8>)>;

struct Case {
    name: &'static str,
    base: &'static str,
    patches: Patches,
    known: Known,
}

fn case(name: &'static str, base: &'static str, patches: Patches) -> Case {
    Case { name, base, patches, known: Known::Same }
}

fn cases() -> Vec<Case> {
    let sn = 0xa0000; // snap.qcow2's snapshot table
    let mut v = vec![
        // Leaked clusters.
        case("leak", "plain.qcow2", vec![(RB + 2 * 6, be16(1))]),
        case("leak_header", "plain.qcow2", vec![(RB, be16(2))]),
        case("v2_leak", "v2.qcow2", vec![(RB + 2 * 10, be16(2))]),
        case("compressed_leak", "cmpz.qcow2", vec![(RB + 2 * 5, be16(18))]),
        // Refcount zero for used clusters: the structures are rebuilt.
        case("zero_data", "plain.qcow2", vec![(RB + 2 * 5, be16(0))]),
        case("zero_l2", "plain.qcow2", vec![(RB + 2 * 4, be16(0))]),
        case("zero_l1", "plain.qcow2", vec![(RB + 2 * 3, be16(0))]),
        case("zero_refblock", "plain.qcow2", vec![(RB + 2 * 2, be16(0))]),
        case("zero_table_entry", "plain.qcow2", vec![(0x10000, be64(0))]),
        // Refcount too low (but not zero) for shared clusters.
        case("low_shared", "snap.qcow2", vec![(RB + 2 * 7, be16(1))]),
        case("v2_low_shared", "v2.qcow2", vec![(RB + 2 * 4, be16(1))]),
        case("compressed_low", "cmpz.qcow2", vec![(RB + 2 * 5, be16(16))]),
        // Refcount too high.
        case("high_data", "plain.qcow2", vec![(RB + 2 * 5, be16(2))]),
        case("high_l2", "plain.qcow2", vec![(RB + 2 * 4, be16(2))]),
        // Two L2 entries naming one cluster (refcount 1, two references).
        case("double_reference", "plain.qcow2", vec![(0x40010, be64(0x8000_0000_0005_0000))]),
        case("double_reference_1bit", "rb1.qcow2", vec![(0x4008, be64(0x8000_0000_0000_5000))]),
        // Wrong COPIED flags on L1 and L2 entries.
        case("copied_l1_cleared", "plain.qcow2", vec![(0x30000, be64(0x40000))]),
        case("copied_l2_cleared", "plain.qcow2", vec![(0x40000, be64(0x50000))]),
        case("copied_set_on_shared", "snap.qcow2", vec![(0xb0000 + 16, be64(0x8000_0000_0007_0000))]),
        case("copied_set_on_compressed", "cmpz.qcow2", vec![(0x40000, be64(0xC000_0000_0005_0000))]),
        // Unaligned and past-the-end L2 and data offsets.
        case("l2_unaligned", "plain.qcow2", vec![(0x30000, be64(0x8000_0000_0004_0200))]),
        case("l2_past_eof", "plain.qcow2", vec![(0x30000, be64(0x8000_0000_0100_0000))]),
        case("l2_is_header", "plain.qcow2", vec![(0x30000, be64(0x8000_0000_0000_0000))]),
        case("l2_is_refblock", "plain.qcow2", vec![(0x30000, be64(0x8000_0000_0002_0000))]),
        case("data_unaligned", "plain.qcow2", vec![(0x40000, be64(0x8000_0000_0005_0200))]),
        case("data_past_eof", "plain.qcow2", vec![(0x40000, be64(0x8000_0000_0100_0000))]),
        case("prealloc_zero_unaligned", "plain.qcow2", vec![(0x40000, be64(0x8000_0000_0005_0201))]),
        case("v2_zero_flag", "v2.qcow2", vec![(0x40000, be64(0x50001))]),
        // Refcount block offsets past the end of the file.
        case("refblock_past_eof", "plain.qcow2", vec![(0x10000, be64(0x100_0000))]),
        // Reserved bits in L1 and L2 entries.
        case("l1_reserved_bits", "plain.qcow2", vec![(0x30000, be64(0x8000_0000_0004_0001))]),
        case("l2_reserved_bits", "plain.qcow2", vec![(0x40000, be64(0x8000_0000_0005_0100))]),
        // Broken snapshot table entries.
        case("snapshot_l1_unaligned", "snap.qcow2", vec![(sn, be64(0x60200))]),
        case("snapshot_incomplete", "snap.qcow2", vec![(sn + 36, 0u32.to_be_bytes().to_vec())]),
        case("snapshot_count_too_high", "snap.qcow2", vec![(60, 2u32.to_be_bytes().to_vec())]),
        case("snapshot_name_too_long", "snap.qcow2", vec![(sn + 14, be16(0xffff))]),
        // Snapshot tables the open refuses: the check reads them itself,
        // reports them and with -r all drops what is past QEMU's limits.
        case("snapshot_extra_data_too_large", "snap.qcow2", vec![(sn + 36, 2000u32.to_be_bytes().to_vec())]),
        case("v2_snapshot_extra_data_too_large", "v2.qcow2", vec![(sn + 36, 0x10000u32.to_be_bytes().to_vec())]),
        case("snapshot_count_huge", "snap.qcow2", vec![(60, 70000u32.to_be_bytes().to_vec())]),
        case("snapshot_count_over_limit", "v2.qcow2", vec![(60, 65537u32.to_be_bytes().to_vec())]),
        case("snapshot_table_unaligned", "snap.qcow2", vec![(64, be64(0xa0100))]),
        case("snapshot_table_past_eof", "snap.qcow2", vec![(64, be64(0x1000_0000))]),
        // Header flags.
        case("corrupt_bit", "plain.qcow2", vec![(79, vec![2])]),
        case("corrupt_bit_and_leak", "plain.qcow2", vec![(79, vec![2]), (RB + 2 * 6, be16(1))]),
        case("dirty_bit_and_leak", "lazy.qcow2", vec![(79, vec![1]), (RB + 2 * 6, be16(2))]),
    ];
    let mut known = vec![
        // Refcount table entries with reserved bits or unaligned: qemu-img
        // rebuilds onto the block the entry names and fails.
        Case {
            name: "reftable_reserved_bits",
            base: "plain.qcow2",
            patches: vec![(0x10000, be64(0x20100))],
            known: Known::OursRepairs,
        },
        Case {
            name: "refblock_unaligned",
            base: "plain.qcow2",
            patches: vec![(0x10000, be64(0x20200))],
            known: Known::OursRepairs,
        },
        // A snapshot L1 size beyond 32 MiB: qemu-img's COPIED repair trips
        // over the huge "inactive L1 table" in its overlap check.
        Case {
            name: "snapshot_l1_too_large",
            base: "snap.qcow2",
            patches: vec![(sn + 8, 0x0100_0000u32.to_be_bytes().to_vec())],
            known: Known::OursRepairs,
        },
    ];
    v.append(&mut known);
    v
}

fn qemu_img_in(dir: &Path, args: &[&str]) -> Outcome {
    run_in(dir, qemu_img(), args)
}

/// Copies `from` to `to` in both directories of the pair.
fn copy_both(pair: &Pair, from: &str, to: &str) {
    for d in [&pair.qemu, &pair.ox] {
        std::fs::copy(d.join(from), d.join(to)).unwrap();
    }
}

#[test]
fn damaged_images_check_and_repair_like_qemu() {
    let bases = bases();
    for c in cases() {
        let pair = Pair::new();
        for d in [&pair.qemu, &pair.ox] {
            std::fs::copy(bases.path().join(c.base), d.join("orig.qcow2")).unwrap();
            std::fs::copy(bases.path().join(c.base), d.join("x.qcow2")).unwrap();
            for (offset, bytes) in &c.patches {
                patch(&d.join("x.qcow2"), *offset, bytes);
            }
        }
        let ctx = c.name;
        pair.same_output(&["check", "x.qcow2"]);
        pair.same_output(&["check", "--output=json", "x.qcow2"]);
        for mode in ["leaks", "all"] {
            copy_both(&pair, "x.qcow2", "r.qcow2");
            let args = ["check", "-r", mode, "r.qcow2"];
            let (q, o) = pair.run(&args);
            let after_q = qemu_img_in(&pair.qemu, &["check", "r.qcow2"]);
            let after_o = qemu_img_in(&pair.ox, &["check", "r.qcow2"]);
            let cmp_q = qemu_img_in(&pair.qemu, &["compare", "orig.qcow2", "r.qcow2"]);
            let cmp_o = qemu_img_in(&pair.ox, &["compare", "orig.qcow2", "r.qcow2"]);
            if c.known == Known::OursRepairs && mode == "all" {
                assert_eq!(q.code, 1, "{ctx}: qemu-img's repair was expected to fail: {q:?}");
                assert_ne!(o.code, 1, "{ctx}: oxqcow's repair failed: {o:?}");
                assert!(o.stdout.contains("Double checking the fixed image now..."), "{ctx}: {o:?}");
                assert!(
                    !after_o.stdout.contains("leaked clusters were found") && after_o.code != 1,
                    "{ctx}: qemu-img check after oxqcow's repair: {after_o:?}"
                );
                assert_eq!(cmp_o.code, 0, "{ctx}: content changed by oxqcow's repair: {cmp_o:?}");
                continue;
            }
            assert_eq!(o, q, "{ctx}: oxqcow and qemu-img differ for {args:?}");
            assert_eq!(after_o, after_q, "{ctx}: qemu-img check after -r {mode}");
            assert_eq!(cmp_o, cmp_q, "{ctx}: qemu-img compare after -r {mode}");
            // The JSON report of a repair carries the fixed counts.
            copy_both(&pair, "x.qcow2", "j.qcow2");
            pair.same_output(&["check", "-r", mode, "--output=json", "j.qcow2"]);
        }
    }
}

/// Every check exit code qemu-img documents, on images whose verdict is
/// known: 0 clean, 2 corruptions, 3 leaks only, 1 check failed, 63 raw.
#[test]
fn exit_codes_and_quiet_like_qemu() {
    let bases = bases();
    let pair = Pair::from(bases.path());
    for d in [&pair.qemu, &pair.ox] {
        std::fs::copy(d.join("plain.qcow2"), d.join("leak.qcow2")).unwrap();
        patch(&d.join("leak.qcow2"), RB + 12, &be16(1));
        std::fs::copy(d.join("plain.qcow2"), d.join("bad.qcow2")).unwrap();
        patch(&d.join("bad.qcow2"), RB + 10, &be16(0));
        std::fs::copy(d.join("plain.qcow2"), d.join("unreadable.qcow2")).unwrap();
        patch(&d.join("unreadable.qcow2"), 0x10000, &be64(0x20200));
    }
    for args in [
        "check plain.qcow2",
        "check -q leak.qcow2",
        "check bad.qcow2",
        "check -q bad.qcow2",
        "check unreadable.qcow2",
        "check --output=json unreadable.qcow2",
        "check -r leaks bad.qcow2",
        "check -q -r leaks leak.qcow2",
        "check -f raw plain.qcow2",
        "check bitmap.qcow2",
        "check --output=json bitmap.qcow2",
        "check -r foo plain.qcow2",
        "check -U -r all plain.qcow2",
    ] {
        pair.same_output(&words(args));
    }
}

/// A dirty image (lazy refcounts) opened read-write is repaired first, as
/// `check -r all` repairs it, with the check's lines on stderr.
#[test]
fn dirty_images_are_repaired_when_opened_like_qemu() {
    let bases = bases();
    let damages: [(&str, Patches); 3] = [
        ("leak", vec![(79, vec![1]), (RB + 2 * 6, be16(2))]),
        ("zero_refcount", vec![(79, vec![1]), (RB + 2 * 5, be16(0))]),
        ("clean", vec![(79, vec![1])]),
    ];
    for (name, patches) in damages {
        let pair = Pair::new();
        for d in [&pair.qemu, &pair.ox] {
            std::fs::copy(bases.path().join("lazy.qcow2"), d.join("x.qcow2")).unwrap();
            for (offset, bytes) in &patches {
                patch(&d.join("x.qcow2"), *offset, bytes);
            }
        }
        pair.same_output(&["check", "x.qcow2"]);
        pair.same_output(&["resize", "x.qcow2", "128M"]);
        pair.same_output(&["check", "x.qcow2"]);
        pair.same_output(&["info", "x.qcow2"]);
        pair.same_files(&[name]);
    }
}

/// Small bases whose metadata fills the first clusters, so that random
/// damage hits tables: 512-byte clusters with a snapshot, compressed
/// clusters and zero clusters; 64-bit lazy refcounts; version 2; 4 KiB
/// clusters with a persistent bitmap.
fn small_bases() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let q = qemu_img();
    must(d, q, &words("create -q -f qcow2 -o cluster_size=512 c512.qcow2 64k"));
    must(d, qemu_io(), &["-c", "write -P 1 0 6k", "-c", "write -z 8k 1k", "-c", "write -c -P 2 16k 512", "c512.qcow2"]);
    must(d, q, &words("snapshot -c s c512.qcow2"));
    must(d, qemu_io(), &["-c", "write -P 3 1k 2k", "-c", "discard 40k 1k", "c512.qcow2"]);
    must(d, q, &words("create -q -f qcow2 -o cluster_size=512,refcount_bits=64,lazy_refcounts=on r64.qcow2 64k"));
    must(d, qemu_io(), &["-c", "write -P 1 0 5k", "-c", "write -P 2 60k 1k", "r64.qcow2"]);
    must(d, q, &words("create -q -f qcow2 -o cluster_size=512,compat=0.10 v2.qcow2 64k"));
    must(d, qemu_io(), &["-c", "write -P 1 0 3k", "v2.qcow2"]);
    must(d, q, &words("snapshot -c s v2.qcow2"));
    must(d, qemu_io(), &["-c", "write -P 2 0 1k", "v2.qcow2"]);
    must(d, q, &words("create -q -f qcow2 -o cluster_size=4k bitmap.qcow2 1M"));
    must(d, q, &words("bitmap --add bitmap.qcow2 bm"));
    must(d, qemu_io(), &["-c", "write -P 1 0 20k", "bitmap.qcow2"]);
    dir
}

/// Random damage, as a fuzzer makes it: a few bytes or big-endian words
/// overwritten in the first 4 KiB (header and the first tables), bits
/// flipped anywhere, sometimes the file cut short. `oxqcow check` must
/// print what `qemu-img check` prints (human and JSON, stdout and stderr)
/// and exit with its code, on every one.
#[test]
fn randomly_damaged_images_check_like_qemu() {
    const WORDS: [u64; 8] = [0, 1, 0x200, 0xffff_ffff, 1 << 31, 1 << 62, u64::MAX, 0x1_0000];
    let bases = small_bases();
    let mut rng = Rng::new(0xc4ec_0001);
    for base in ["c512.qcow2", "r64.qcow2", "v2.qcow2", "bitmap.qcow2"] {
        let original = std::fs::read(bases.path().join(base)).unwrap();
        for n in 0..40 {
            let mut bytes = original.clone();
            for _ in 0..1 + rng.below(3) {
                let span = if rng.below(3) < 2 { bytes.len().min(4096) } else { bytes.len() } as u64;
                let at = rng.below(span) as usize;
                match rng.below(4) {
                    0 => bytes[at] ^= 1 << rng.below(8),
                    1 => bytes[at] = rng.next() as u8,
                    2 => {
                        let word = WORDS[rng.below(WORDS.len() as u64) as usize].to_be_bytes();
                        let at = at.min(bytes.len() - 8) & !7;
                        bytes[at..at + 8].copy_from_slice(&word);
                    }
                    _ => {
                        let cut = rng.below(bytes.len() as u64) as usize;
                        bytes.truncate(cut.max(512));
                    }
                }
            }
            let pair = Pair::new();
            for d in [&pair.qemu, &pair.ox] {
                std::fs::write(d.join("x.qcow2"), &bytes).unwrap();
            }
            let (q, o) = pair.run(&["check", "x.qcow2"]);
            let (qj, oj) = pair.run(&["check", "--output=json", "x.qcow2"]);
            if o != q || oj != qj {
                let keep = std::env::temp_dir().join(format!("oxqcow-check-diff-{base}-{n}"));
                std::fs::write(&keep, &bytes).unwrap();
                assert_eq!(o, q, "{base} damage {n} (kept as {})", keep.display());
                assert_eq!(oj, qj, "{base} damage {n} (kept as {})", keep.display());
            }
        }
    }
}
