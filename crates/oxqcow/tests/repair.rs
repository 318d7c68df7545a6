//! Check and repair on damaged images: oxqcow's counts match qemu-img
//! check's, and after oxqcow's repair qemu-img finds the image clean with
//! its content unchanged.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use oxqcow::{
    BlockDevice, CreateOptions, Image, ImageMessage, MemoryStorage, OpenOptions, Qcow2, RepairMode, MAX_KEPT_MESSAGES,
};

fn qemu(args: &[&str]) -> std::process::Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{} must be installed (apt-get install qemu-utils): {e}", args[0]))
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn qemu_counts(path: &Path) -> (u64, u64) {
    let out = qemu(&["qemu-img", "check", "--output=json", p(path)]);
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |k: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(&format!("\"{k}\"")))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().trim_end_matches(',').parse::<u64>().unwrap_or_else(|e| panic!("{k}: {e}: {text}")))
            .unwrap_or(0)
    };
    (field("corruptions"), field("leaks"))
}

fn read_all(path: &Path) -> Vec<u8> {
    let img = Image::open(path, &OpenOptions { read_only: true, repair: true, ..Default::default() }).unwrap();
    let mut buf = vec![0u8; img.len() as usize];
    img.read_at(&mut buf, 0).unwrap();
    buf
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Damages a fresh 64k-cluster image (header 0, reftable 1, refblock 2,
/// L1 3, L2 4, data 5..) in one way.
fn damaged(dir: &Path, name: &str, damage: impl FnOnce(&mut Vec<u8>)) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.qcow2"));
    assert!(qemu(&["qemu-img", "create", "-q", "-f", "qcow2", p(&path), "4M"]).status.success());
    assert!(qemu(&[
        "qemu-io",
        "-c",
        "write -P 5 0 200000",
        "-c",
        "write -P 6 1000000 70000",
        "-c",
        "discard 65536 65536",
        p(&path)
    ])
    .status
    .success());
    let mut bytes = std::fs::read(&path).unwrap();
    damage(&mut bytes);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn verdicts_and_repairs_match_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let refblock = 0x20000usize;
    type Damage = Box<dyn FnOnce(&mut Vec<u8>)>;
    let cases: Vec<(&str, Damage, RepairMode)> = vec![
        // Refcount of cluster 6 (freed by the discard) raised: one leak.
        (
            "leak",
            Box::new(move |b| b[refblock + 12..refblock + 14].copy_from_slice(&1u16.to_be_bytes())),
            RepairMode::Leaks,
        ),
        // Refcount of the first data cluster dropped to 0: corruption.
        (
            "low",
            Box::new(move |b| b[refblock + 10..refblock + 12].copy_from_slice(&0u16.to_be_bytes())),
            RepairMode::All,
        ),
        // Refcount of the L2 table raised to 2: leak plus a COPIED mismatch.
        (
            "high",
            Box::new(move |b| b[refblock + 8..refblock + 10].copy_from_slice(&2u16.to_be_bytes())),
            RepairMode::All,
        ),
        // COPIED cleared on a data cluster with refcount 1.
        (
            "copied",
            Box::new(|b| {
                let l2 = (u64_at(b, 0x30000) & 0x00ff_ffff_ffff_fe00) as usize;
                let e = u64_at(b, l2) & !(1 << 63);
                b[l2..l2 + 8].copy_from_slice(&e.to_be_bytes());
            }),
            RepairMode::All,
        ),
        // Refcount table entry with reserved bits: the structures are rebuilt.
        ("reftable", Box::new(|b| b[0x10000..0x10008].copy_from_slice(&0x20100u64.to_be_bytes())), RepairMode::All),
        // Refcount table entry unaligned.
        ("unaligned", Box::new(|b| b[0x10000..0x10008].copy_from_slice(&0x20200u64.to_be_bytes())), RepairMode::All),
    ];
    for (name, damage, mode) in cases {
        let path = damaged(dir.path(), name, damage);
        let want = qemu_counts(&path);
        // QEMU's repair of a copy tells how many problems a repair fixes.
        let copy = dir.path().join(format!("{name}-qemu.qcow2"));
        std::fs::copy(&path, &copy).unwrap();
        let flag = if mode == RepairMode::All { "all" } else { "leaks" };
        let out = qemu(&["qemu-img", "check", "-r", flag, "--output=json", p(&copy)]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let fixed = |k: &str| {
            text.lines()
                .find(|l| l.trim_start().starts_with(&format!("\"{k}\"")))
                .and_then(|l| l.split(':').nth(1))
                .map_or(0, |v| v.trim().trim_end_matches(',').parse::<u64>().unwrap())
        };
        let before = read_all(&path);
        let img = Image::open(&path, &OpenOptions { repair: true, ..Default::default() }).unwrap();
        let report = img.check(None).unwrap();
        assert_eq!((report.corruptions, report.leaks), want, "{name}: {:?}", report.messages);
        let repaired = img.check(Some(mode)).unwrap();
        assert_eq!((repaired.corruptions, repaired.leaks), (0, 0), "{name}: {:?}", repaired.messages);
        if out.status.success() {
            assert_eq!(
                (repaired.leaks_fixed, repaired.corruptions_fixed),
                (fixed("leaks-fixed"), fixed("corruptions-fixed")),
                "{name}"
            );
        } else {
            // QEMU's rebuild puts a new block on the cluster the broken
            // table entry names and fails its overlap check; ours avoids it.
            assert!(repaired.corruptions_fixed > 0, "{name}: {:?}", repaired.messages);
        }
        img.close().unwrap();
        assert_eq!(qemu_counts(&path), (0, 0), "{name}: qemu-img check after our repair");
        assert!(read_all(&path) == before, "{name}: content changed by the repair");
    }
}

/// An image whose 65536 L1 entries all name the L2 table of guest
/// cluster 0, which maps eight data clusters, with 1-bit refcounts: every
/// reference after the first overflows, two message lines each.
fn one_l2_table_named_65536_times(lazy_and_dirty: bool) -> Arc<MemoryStorage> {
    let st = Arc::new(MemoryStorage::new());
    let opts = CreateOptions::qcow2(2 << 30).cluster_size(512).refcount_bits(1).lazy_refcounts(lazy_and_dirty);
    let q = Qcow2::create(st.clone(), &opts).unwrap();
    q.write_at(&[1u8; 4096], 0).unwrap();
    q.close().unwrap();
    let mut b = st.to_bytes();
    let l1 = u64_at(&b, 40) as usize;
    let first = b[l1..l1 + 8].to_vec();
    for i in 1..65536 {
        b[l1 + i * 8..l1 + i * 8 + 8].copy_from_slice(&first);
    }
    if lazy_and_dirty {
        b[79] |= 1;
    }
    Arc::new(MemoryStorage::from_bytes(b))
}

/// Guards against issue 9, item 7: the check kept every line it found (a
/// line per reference: 1179630 here, billions for larger tables), until
/// memory ran out. Collected reports keep the first MAX_KEPT_MESSAGES and
/// count the rest; a sink gets every line.
#[test]
fn collected_check_messages_are_capped() {
    const LINES: u64 = 1_179_630;
    let st = one_l2_table_named_65536_times(false);
    let q = Qcow2::open(st.clone(), &OpenOptions::new().read_only(true)).unwrap();
    let r = q.check(None).unwrap();
    assert_eq!(r.corruptions, LINES / 2);
    assert_eq!(r.messages.len(), MAX_KEPT_MESSAGES);
    assert_eq!(r.messages_dropped, LINES - MAX_KEPT_MESSAGES as u64);
    assert_eq!(r.messages[0], "ERROR: overflow cluster offset=0x80600");
    let mut seen = 0u64;
    let streamed = q.check_with(None, &mut |_| seen += 1).unwrap();
    assert_eq!((seen, streamed.messages.len(), streamed.corruptions), (LINES, 0, LINES / 2));

    // The repair at a read-write open of the dirty image: capped without a
    // sink, every line (in order) with one.
    let st = one_l2_table_named_65536_times(true);
    let bytes = st.to_bytes();
    let q = Qcow2::open(st, &OpenOptions::new()).unwrap();
    let repair = q.open_repair().expect("the dirty image was repaired at open");
    assert_eq!((repair.messages.len(), repair.messages_dropped), (MAX_KEPT_MESSAGES, LINES - MAX_KEPT_MESSAGES as u64));
    let lines = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = lines.clone();
    let sink: oxqcow::ImageMessages = Arc::new(move |m| {
        assert!(matches!(m, ImageMessage::Repair(_)), "{m:?}");
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    });
    let opts = OpenOptions { messages: Some(sink), ..OpenOptions::new() };
    let q = Qcow2::open(Arc::new(MemoryStorage::from_bytes(bytes)), &opts).unwrap();
    assert_eq!(lines.load(std::sync::atomic::Ordering::Relaxed), LINES);
    assert!(q.open_repair().unwrap().messages.is_empty());
}

// Guards against an image with too much extra data in a snapshot table
// entry being refused by the open meant for checking it: QEMU's check
// opens it, says what is wrong, and its -r all keeps the entry with its
// extra data cut to 1 KiB, after which the image opens normally.
#[test]
fn snapshot_extra_data_past_the_limit_is_checked_and_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.qcow2");
    assert!(qemu(&["qemu-img", "create", "-q", "-f", "qcow2", p(&path), "16M"]).status.success());
    for name in ["a", "b"] {
        assert!(qemu(&["qemu-img", "snapshot", "-c", name, p(&path)]).status.success());
    }
    let bytes = std::fs::read(&path).unwrap();
    let table = u64::from_be_bytes(bytes[64..72].try_into().unwrap());
    let plain = OpenOptions { read_only: true, ..Default::default() };
    assert_eq!(Image::open(&path, &plain).unwrap().len(), 16 << 20);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&1500u32.to_be_bytes(), table + 36).unwrap();
    }
    let err = Image::open(&path, &plain).err().expect("the open must refuse the table");
    assert_eq!(
        err.to_string(),
        "Too much extra metadata in snapshot table entry 0\nYou can force-remove this extra metadata with qemu-img check -r all"
    );
    let img = Image::open(&path, &OpenOptions { repair: true, ..Default::default() }).unwrap();
    let report = img.check(None).unwrap();
    assert_eq!(report.error.as_deref(), Some("File too large"));
    assert!(report.error_report.as_deref().unwrap().starts_with("ERROR failed to read the snapshot table: Too much"));
    let repaired = img.check(Some(RepairMode::All)).unwrap();
    assert_eq!(repaired.messages[0], "Discarding too much extra metadata in snapshot table entry 0 (1500 > 1024)");
    assert!(repaired.corruptions_fixed >= 1 && repaired.corruptions == 0, "{repaired:?}");
    img.close().unwrap();
    let reopened = Image::open(&path, &plain).unwrap();
    let Image::Qcow2(q) = &reopened else { panic!("qcow2 expected") };
    // The entry keeps 1 KiB of extra data; its id and name were read past
    // the extra data it claimed (inside the next entry), as QEMU reads them.
    let extra: Vec<_> = q.snapshots().into_iter().map(|s| 24 + s.unknown_extra.len()).collect();
    assert_eq!(extra, [1024, 24]);
    assert_eq!(qemu_counts(&path), (0, 0));
}

// Guards a divergence from QEMU 10 that keeps a user's snapshots: its
// `check -r all` opens the image without reading the snapshot table, and
// when the image has persistent bitmaps the open rewrites the header with
// that empty table, so the repair then frees every cluster only the
// snapshots used ("4 leaked clusters, 2 corruptions" repaired on a healthy
// image). oxqcow's repair of such an image finds nothing, changes nothing
// and keeps the snapshot and what it holds.
#[test]
fn repair_of_an_image_with_bitmaps_keeps_its_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.qcow2");
    assert!(qemu(&["qemu-img", "create", "-q", "-f", "qcow2", p(&path), "1M"]).status.success());
    assert!(qemu(&["qemu-io", "-c", "write -P 1 0 64k", p(&path)]).status.success());
    assert!(qemu(&["qemu-img", "snapshot", "-c", "s1", p(&path)]).status.success());
    assert!(qemu(&["qemu-io", "-c", "write -P 2 0 64k", p(&path)]).status.success());
    assert!(qemu(&["qemu-img", "bitmap", "--add", p(&path), "b0"]).status.success());
    let img = Image::open(&path, &OpenOptions { repair: true, ..Default::default() }).unwrap();
    let report = img.check(Some(RepairMode::All)).unwrap();
    assert_eq!(
        (report.corruptions, report.leaks, report.corruptions_fixed, report.leaks_fixed),
        (0, 0, 0, 0),
        "{:?}",
        report.messages
    );
    img.close().unwrap();
    assert_eq!(qemu_counts(&path), (0, 0));
    let list = qemu(&["qemu-img", "snapshot", "-l", p(&path)]);
    assert!(String::from_utf8_lossy(&list.stdout).contains(" s1 "), "{}", String::from_utf8_lossy(&list.stdout));
    let snap = OpenOptions { read_only: true, snapshot: Some("s1".into()), ..Default::default() };
    let mut buf = vec![0u8; 65536];
    Image::open(&path, &snap).unwrap().read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 1), "the snapshot's data changed");
    Image::open(&path, &OpenOptions { read_only: true, ..Default::default() }).unwrap().read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 2), "the active layer's data changed");
}

// Guards against check judging references against the file's exact
// length: QEMU's block layer counts a file in 512-byte sectors, so a file
// cut 2 bytes past a sector boundary is as long as that whole sector to
// its check. An L1 table 8 bytes into the cluster after the end is then a
// missing refcount only, not a region "exceeding the end of the file by
// one cluster or more", and the image end offset counts its cluster.
#[test]
fn check_counts_the_file_in_whole_sectors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.qcow2");
    assert!(qemu(&["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", p(&path), "32k"])
        .status
        .success());
    // Header, refcount table, refcount block; the L1 table at 0x600 is cut.
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(1030).unwrap();
    let img = Image::open(&path, &OpenOptions { read_only: true, repair: true, ..Default::default() }).unwrap();
    let report = img.check(None).unwrap();
    assert_eq!((report.corruptions, report.leaks), qemu_counts(&path));
    assert_eq!(report.messages, ["ERROR cluster 3 refcount=0 reference=1"]);
    let json = String::from_utf8(qemu(&["qemu-img", "check", "--output=json", p(&path)]).stdout).unwrap();
    assert!(json.contains(&format!("\"image-end-offset\": {},", report.image_end_offset)), "{json}");
}

// Guards against check reading a refcount block a broken table entry puts
// past the end of QEMU's block layer (0xffff_ffff_ffff_ffff here) as
// zeros: QEMU cannot read it ("Can't get refcount for cluster N:
// Input/output error", a check error per cluster, no corruption), and its
// repair then rebuilds the refcount structure; oxqcow's verdict, messages
// and repaired file are qemu-img's.
#[test]
fn refcount_blocks_qemu_cannot_read_are_check_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours.qcow2");
    let theirs = dir.path().join("theirs.qcow2");
    assert!(qemu(&["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", p(&ours), "64k"])
        .status
        .success());
    assert!(qemu(&["qemu-io", "-c", "write -P 1 0 4k", p(&ours)]).status.success());
    let mut bytes = std::fs::read(&ours).unwrap();
    let reftable = u64_at(&bytes, 48) as usize;
    bytes[reftable..reftable + 8].fill(0xff);
    std::fs::write(&ours, &bytes).unwrap();
    std::fs::write(&theirs, &bytes).unwrap();
    let out = qemu(&["qemu-img", "check", p(&theirs)]);
    let theirs_lines: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.starts_with("qemu-img:"))
        .map(String::from)
        .collect();
    let img = Image::open(&ours, &OpenOptions { repair: true, ..Default::default() }).unwrap();
    let report = img.check(None).unwrap();
    assert_eq!(report.messages, theirs_lines);
    assert_eq!((report.corruptions, report.leaks), qemu_counts(&theirs));
    assert!(report.check_errors > 0 && report.messages[1] == "Can't get refcount for cluster 0: Input/output error");
    img.check(Some(RepairMode::All)).unwrap();
    img.close().unwrap();
    assert!(qemu(&["qemu-img", "check", "-r", "all", p(&theirs)]).status.success());
    assert!(std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap(), "the repaired files differ");
    assert_eq!(qemu_counts(&ours), (0, 0));
}
