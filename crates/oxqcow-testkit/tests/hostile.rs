//! Hostile and damaged images: each case damages one field of a valid image
//! that qemu-img made, then
//! - runs `oxqcow-probe` (open read-only, read every allocated extent,
//!   check) in a child process under a 2 GiB address-space limit and a
//!   generous timeout: it must exit normally with a clean refusal (an open
//!   error, a read error, or check findings), never panic, abort on an
//!   allocation, or hang;
//! - asks `qemu-img info` and `qemu-img check` for their verdict, asserts
//!   QEMU 10 answers as recorded in the table (HOSTILE.md lists the
//!   messages; invalid subcluster bitmaps of extended L2 entries are
//!   among the cases), and where QEMU refuses to open the image, oxqcow must
//!   refuse at open too. Where QEMU accepts what the spec forbids
//!   (header_length 105), oxqcow is stricter.

use std::path::{Path, PathBuf};
use std::process::Command;

use oxqcow_testkit::qemu;

/// What QEMU does with a damaged image.
#[derive(Clone, Copy, Debug)]
enum Qemu {
    /// `qemu-img info` fails with this message.
    RefusesOpen(&'static str),
    /// `info` works; `check` reports corruption (exit 2) with this message.
    CheckFinds(&'static str),
    /// `info` and `check` accept it; reading the first 64 KiB with qemu-io
    /// fails with this message.
    ReadFails(&'static str),
    /// Both accept it.
    Accepts,
}

struct Base {
    plain: Vec<u8>,
    snap: Vec<u8>,
    /// 64 KiB of compressed data at guest offset 0.
    compressed: Vec<u8>,
    /// An overlay naming `plain` as its backing file.
    overlay: Vec<u8>,
    /// Extended L2 entries (64 KiB clusters): data in cluster 0, a
    /// compressed cluster 2, zero subclusters in cluster 4.
    ext: Vec<u8>,
}

impl Base {
    fn field(&self, at: usize, width: usize) -> u64 {
        be(&self.plain, at, width)
    }
    fn l1(&self) -> usize {
        self.field(40, 8) as usize
    }
    fn reftable(&self) -> usize {
        self.field(48, 8) as usize
    }
    fn l2(&self) -> usize {
        (be(&self.plain, self.l1(), 8) & 0x00ff_ffff_ffff_fe00) as usize
    }
}

fn be(b: &[u8], at: usize, width: usize) -> u64 {
    b[at..at + width].iter().fold(0, |acc, &x| acc << 8 | u64::from(x))
}

fn put(mut b: Vec<u8>, at: usize, width: usize, v: u64) -> Vec<u8> {
    b[at..at + width].copy_from_slice(&v.to_be_bytes()[8 - width..]);
    b
}

fn make_base(dir: &Path) -> Base {
    let p = dir.join("base.qcow2");
    let ps = p.to_str().unwrap();
    qemu::qemu_img_ok(&["create", "-q", "-f", "qcow2", ps, "1M"]);
    qemu::qemu_io_ok(&p, &["write -P 1 0 64k".into(), "write -P 2 512k 4k".into()]);
    let plain = std::fs::read(&p).unwrap();
    qemu::qemu_img_ok(&["snapshot", "-c", "s1", ps]);
    let snap = std::fs::read(&p).unwrap();
    let c = dir.join("compressed.qcow2");
    qemu::qemu_img_ok(&["create", "-q", "-f", "qcow2", c.to_str().unwrap(), "1M"]);
    qemu::qemu_io_ok(&c, &["write -c -P 7 0 64k".into(), "write -P 1 128k 64k".into()]);
    let compressed = std::fs::read(&c).unwrap();
    let o = dir.join("overlay.qcow2");
    qemu::qemu_img_ok(&["create", "-q", "-f", "qcow2", "-b", ps, "-F", "qcow2", o.to_str().unwrap()]);
    let overlay = std::fs::read(&o).unwrap();
    let e = dir.join("extended.qcow2");
    qemu::qemu_img_ok(&["create", "-q", "-f", "qcow2", "-o", "extended_l2=on", e.to_str().unwrap(), "1M"]);
    qemu::qemu_io_ok(&e, &["write -P 1 0 4k".into(), "write -c -P 7 128k 64k".into(), "write -z 256k 64k".into()]);
    let ext = std::fs::read(&e).unwrap();
    let base = Base { plain, snap, compressed, overlay, ext };
    // The layout the cases rely on: 64 KiB clusters, header extensions
    // from offset 112 (the feature name table first).
    assert_eq!(base.field(20, 4), 16);
    assert_eq!(base.field(100, 4), 112);
    assert_eq!(base.field(112, 4), 0x6803_f857);
    assert_eq!(be(&base.snap, 60, 4), 1);
    base
}

type Case = (&'static str, Vec<u8>, Qemu);

fn cases(b: &Base) -> Vec<Case> {
    const COPIED: u64 = 1 << 63;
    let p = || b.plain.clone();
    let (l1, rt, l2) = (b.l1(), b.reftable(), b.l2());
    let snaps_at = be(&b.snap, 64, 8) as usize;
    let c = &b.compressed;
    let c_l2 = (be(c, be(c, 40, 8) as usize, 8) & 0x00ff_ffff_ffff_fe00) as usize;
    let c_entry = be(c, c_l2, 8);
    assert_eq!(c_entry >> 62, 1, "the first cluster is compressed");
    // 64 KiB clusters: the compressed host offset is in bits 0..=53.
    let c_data = (c_entry & ((1 << 54) - 1)) as usize;
    let x = || b.ext.clone();
    let x_l2 = (be(&b.ext, be(&b.ext, 40, 8) as usize, 8) & 0x00ff_ffff_ffff_fe00) as usize;
    // The subcluster bitmap of extended L2 entry `i`.
    let bitmap = |i: usize| x_l2 + i * 16 + 8;
    assert_eq!(be(&b.ext, bitmap(0), 8), 0x3, "cluster 0 has its first 4 KiB (two subclusters) allocated");
    let mut garbage = c.clone();
    garbage[c_data..c_data + 64].fill(0xff);
    vec![
        ("bad magic", put(p(), 0, 4, 0x5858_5858), Qemu::RefusesOpen("Image is not in qcow2 format")),
        ("version 1", put(p(), 4, 4, 1), Qemu::RefusesOpen("Unsupported qcow2 version 1")),
        ("version 4", put(p(), 4, 4, 4), Qemu::RefusesOpen("Unsupported qcow2 version 4")),
        ("cluster_bits 8", put(p(), 20, 4, 8), Qemu::RefusesOpen("Unsupported cluster size: 2^8")),
        ("cluster_bits 22", put(p(), 20, 4, 22), Qemu::RefusesOpen("Unsupported cluster size: 2^22")),
        ("cluster_bits 63", put(p(), 20, 4, 63), Qemu::RefusesOpen("Unsupported cluster size: 2^63")),
        ("huge l1_size", put(p(), 36, 4, 0x7fff_ffff), Qemu::RefusesOpen("Active L1 table too large")),
        (
            "huge refcount_table_clusters",
            put(p(), 56, 4, 0xffff_ffff),
            Qemu::RefusesOpen("Reference count table too large"),
        ),
        ("huge nb_snapshots", put(p(), 60, 4, 0xffff_ffff), Qemu::RefusesOpen("Snapshot table too large")),
        (
            "unaligned L1 offset",
            put(p(), 40, 8, l1 as u64 + 0x200),
            Qemu::RefusesOpen("Active L1 table offset invalid"),
        ),
        ("L1 offset past EOF", put(p(), 40, 8, 1 << 40), Qemu::CheckFinds("exceeding the end of the file")),
        (
            "unaligned refcount table offset",
            put(p(), 48, 8, rt as u64 + 0x200),
            Qemu::RefusesOpen("Reference count table offset invalid"),
        ),
        ("refcount table offset past EOF", put(p(), 48, 8, 1 << 40), Qemu::CheckFinds("exceeding the end of the file")),
        (
            "unaligned snapshot table offset",
            put(b.snap.clone(), 64, 8, snaps_at as u64 + 0x200),
            Qemu::RefusesOpen("Snapshot table offset invalid"),
        ),
        (
            "snapshot table offset past EOF",
            put(b.snap.clone(), 64, 8, 1 << 40),
            Qemu::CheckFinds("snapshot table entry 0 is incomplete"),
        ),
        ("refcount_order 7", put(p(), 96, 4, 7), Qemu::RefusesOpen("Reference count entry width too large")),
        ("header_length 96", put(p(), 100, 4, 96), Qemu::RefusesOpen("qcow2 header too short")),
        // The spec demands a multiple of 8; QEMU accepts it, we do not.
        ("header_length 105", put(p(), 100, 4, 105), Qemu::Accepts),
        ("extension length near 2^32", put(p(), 116, 4, 0xffff_fff0), Qemu::RefusesOpen("Header extension too large")),
        (
            "extension length past the cluster",
            put(p(), 116, 4, 0x10000),
            Qemu::RefusesOpen("Header extension too large"),
        ),
        ("size near 2^63", put(p(), 24, 8, (1 << 63) - 512), Qemu::RefusesOpen("Image is too big")),
        (
            "L1 entry with reserved low bits",
            put(p(), l1, 8, be(&b.plain, l1, 8) | 2),
            Qemu::CheckFinds("L1 entry with reserved bits set"),
        ),
        (
            "L1 entry with reserved high bits",
            put(p(), l1, 8, be(&b.plain, l1, 8) | 1 << 56),
            Qemu::CheckFinds("L1 entry with reserved bits set"),
        ),
        ("L1 entry past EOF", put(p(), l1, 8, COPIED | 1 << 40), Qemu::CheckFinds("exceeding the end of the file")),
        (
            "L2 entry with reserved bits",
            put(p(), l2, 8, be(&b.plain, l2, 8) | 2),
            Qemu::CheckFinds("l2 entry with reserved bits set"),
        ),
        ("L2 entry past EOF", put(p(), l2, 8, COPIED | 1 << 40), Qemu::CheckFinds("exceeding the end of the file")),
        (
            "L2 entry inside the header cluster",
            put(p(), l2, 8, COPIED | 0x200),
            Qemu::CheckFinds("Data cluster is not properly aligned"),
        ),
        (
            "L2 entry at the refcount table",
            put(p(), l2, 8, COPIED | rt as u64),
            Qemu::CheckFinds("refcount=1 reference=2"),
        ),
        (
            "refcount table entry past EOF",
            put(p(), rt, 8, 1 << 40),
            Qemu::CheckFinds("refcount block 0 is outside image"),
        ),
        (
            "compressed cluster past EOF",
            put(c.clone(), c_l2, 8, 1 << 62 | 1 << 40),
            Qemu::CheckFinds("exceeding the end of the file"),
        ),
        ("compressed data that does not inflate", garbage, Qemu::ReadFails("Input/output error")),
        (
            "unknown incompatible feature",
            put(p(), 72, 8, 1 << 40),
            Qemu::RefusesOpen("Unsupported qcow2 feature(s): Unknown incompatible feature"),
        ),
        ("crypt_method 3", put(p(), 32, 4, 3), Qemu::RefusesOpen("Unsupported encryption method 3")),
        (
            "backing file name past the header cluster",
            put(put(b.overlay.clone(), 8, 8, 65530), 16, 4, 100),
            Qemu::RefusesOpen("Backing file name too long"),
        ),
        (
            "backing file name too long",
            put(b.overlay.clone(), 16, 4, 2000),
            Qemu::RefusesOpen("Backing file name too long"),
        ),
        (
            "snapshot L1 table past EOF",
            put(b.snap.clone(), snaps_at, 8, 1 << 40),
            Qemu::CheckFinds("exceeding the end of the file"),
        ),
        (
            "subcluster both allocated and zero",
            put(x(), bitmap(0), 8, 0x1_0000_0003),
            Qemu::CheckFinds("Allocated cluster has corrupted subcluster allocation bitmap"),
        ),
        (
            "allocated subcluster without a host cluster",
            put(x(), bitmap(1), 8, 1),
            Qemu::CheckFinds("Unallocated cluster has non-zero subcluster allocation map"),
        ),
        (
            "compressed cluster with a subcluster bitmap",
            put(x(), bitmap(2), 8, 0x8000_0000),
            Qemu::CheckFinds("compressed cluster 2 with non-zero subcluster allocation bitmap"),
        ),
        (
            "extended L2 with 256-byte subclusters",
            put(x(), 20, 4, 13),
            Qemu::RefusesOpen("Unsupported subcluster size: 256"),
        ),
        (
            "snapshot L1 table too large",
            put(b.snap.clone(), snaps_at + 8, 4, 0x7fff_ffff),
            Qemu::CheckFinds("L1 table is too large"),
        ),
    ]
}

/// Runs the probe binary on `file` under a 2 GiB address-space limit.
fn probe(file: &Path) -> (Option<i32>, String) {
    let bin = env!("CARGO_BIN_EXE_oxqcow-probe");
    let out = Command::new("timeout")
        .args(["300", "sh", "-c", "ulimit -v 2097152; exec \"$0\" \"$1\""])
        .arg(bin)
        .arg(file)
        .output()
        .expect("running timeout/sh (coreutils) for the probe");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text.trim().to_string())
}

fn qemu_verdict(file: &Path) -> (qemu::QemuOutput, qemu::QemuOutput) {
    let f = file.to_str().unwrap();
    (qemu::qemu_img(&["info", "-f", "qcow2", f]), qemu::qemu_img(&["check", "-f", "qcow2", f]))
}

#[test]
fn hostile_headers_and_tables_are_refused_cleanly() {
    let dir = oxqcow_testkit::scratch_dir();
    let base = make_base(dir.path());
    // Controls: the undamaged images probe clean, here and in QEMU.
    for (name, bytes) in [("plain", &base.plain), ("with snapshot", &base.snap)] {
        let f = dir.path().join("control.qcow2");
        std::fs::write(&f, bytes).unwrap();
        let (code, text) = probe(&f);
        assert_eq!(code, Some(0), "control image ({name}) must probe clean: {text}");
        qemu::assert_check_clean(&f);
    }
    let mut failures = Vec::new();
    let mut report = Vec::new();
    for (i, (name, bytes, expected)) in cases(&base).into_iter().enumerate() {
        let f: PathBuf = dir.path().join(format!("case{i}.qcow2"));
        std::fs::write(&f, &bytes).unwrap();
        let (code, ours) = probe(&f);
        let (info, check) = qemu_verdict(&f);
        report.push(format!("{name}: oxqcow {ours} | qemu info {:?} check {:?}", info.code, check.code));
        match code {
            Some(1) => {}
            Some(0) => failures.push(format!("{name}: oxqcow accepted the image: {ours}")),
            Some(124) => failures.push(format!("{name}: the probe hung (killed after 300 s)")),
            other => failures.push(format!("{name}: the probe crashed (exit {other:?}): {ours}")),
        }
        match expected {
            Qemu::RefusesOpen(msg) => {
                if info.success() || !info.stderr.contains(msg) {
                    failures.push(format!("{name}: expected qemu-img info to fail with '{msg}': {}", info.text()));
                }
                if !ours.starts_with("refused at Open") {
                    failures.push(format!("{name}: QEMU refuses to open it, oxqcow must too: {ours}"));
                }
            }
            Qemu::CheckFinds(msg) => {
                if !info.success() || check.code != Some(2) || !check.text().contains(msg) {
                    failures.push(format!(
                        "{name}: expected qemu-img info to work and check to report '{msg}' (exit 2): info {:?}, check {:?}: {}",
                        info.code,
                        check.code,
                        check.text()
                    ));
                }
            }
            Qemu::ReadFails(msg) => {
                let read = qemu::run("qemu-io", &["-f", "qcow2", "-r", "-c", "read 0 64k", f.to_str().unwrap()]);
                if !info.success() || !check.success() || read.success() || !read.text().contains(msg) {
                    failures.push(format!(
                        "{name}: expected info and check to pass and qemu-io read to fail with '{msg}': info {:?}, check {:?}, read: {}",
                        info.code,
                        check.code,
                        read.text()
                    ));
                }
            }
            Qemu::Accepts => {
                if !info.success() || !check.success() {
                    failures.push(format!("{name}: expected QEMU to accept it: {}{}", info.text(), check.text()));
                }
            }
        }
    }
    println!("{}", report.join("\n"));
    assert!(failures.is_empty(), "{} problems:\n{}", failures.len(), failures.join("\n"));
}
