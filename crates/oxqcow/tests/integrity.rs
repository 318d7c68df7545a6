//! Run-time integrity: overlap checks refuse writes onto metadata, the
//! corrupt bit is set and honoured, as QEMU does.

use std::path::Path;
use std::process::Command;

use oxqcow::{BlockDevice, ErrorKind, Image, OpenOptions};

fn qemu(args: &[&str]) -> std::process::Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{} must be installed (apt-get install qemu-utils): {e}", args[0]))
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A 64k-cluster image whose first L2 entry is redirected to the cluster of
/// the active L1 table (cluster 3), COPIED set.
fn image_with_l2_entry_on_l1(path: &Path) {
    assert!(qemu(&["qemu-img", "create", "-q", "-f", "qcow2", p(path), "1M"]).status.success());
    assert!(qemu(&["qemu-io", "-c", "write -P 1 0 64k", p(path)]).status.success());
    let mut bytes = std::fs::read(path).unwrap();
    // L1 at 0x30000, its first entry points at the L2 table.
    let l2 = u64::from_be_bytes(bytes[0x30000..0x30008].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00;
    let at = l2 as usize;
    bytes[at..at + 8].copy_from_slice(&(0x30000u64 | 1 << 63).to_be_bytes());
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn write_onto_metadata_is_refused_and_marks_the_image_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours.qcow2");
    let theirs = dir.path().join("theirs.qcow2");
    image_with_l2_entry_on_l1(&ours);
    image_with_l2_entry_on_l1(&theirs);

    let img = Image::open(&ours, &OpenOptions::new()).unwrap();
    let err = img.write_at(&[0xff; 512], 0).expect_err("write onto the L1 table must be refused");
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(err.to_string().contains("overlaps with active L1 table"), "{err}");
    // Sticky: nothing else is written either.
    assert!(img.write_at(&[1; 512], 600_000).is_err());
    drop(img);

    // QEMU refuses the same write and marks its copy corrupt too.
    let out = qemu(&["qemu-io", "-c", "write -P 0xff 0 512", p(&theirs)]);
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Preventing invalid write on metadata (overlaps with active L1 table)"), "{text}");
    for f in [&ours, &theirs] {
        let info = String::from_utf8(qemu(&["qemu-img", "info", p(f)]).stdout).unwrap();
        assert!(info.contains("corrupt: true"), "{}: {info}", f.display());
    }

    // The L1 table was not touched.
    let bytes = std::fs::read(&ours).unwrap();
    assert_eq!(bytes[0x30000] & 0x80, 0x80);
    // A corrupt image opens read-only only.
    let e = Image::open(&ours, &OpenOptions::new()).err().expect("read-write open of a corrupt image");
    assert!(e.to_string().contains("Image is corrupt; cannot be opened read/write"), "{e}");
    let ro = Image::open(&ours, &OpenOptions::new().read_only(true)).unwrap();
    let mut buf = [0u8; 16];
    ro.read_at(&mut buf, 100_000).unwrap();
    // And the corrupt bit agrees with QEMU's refusal.
    let out = qemu(&["qemu-io", "-c", "write 0 512", p(&ours)]);
    assert!(!out.status.success() || String::from_utf8_lossy(&out.stderr).contains("corrupt"));
}

#[test]
fn overlap_check_none_lets_the_write_through() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.qcow2");
    image_with_l2_entry_on_l1(&path);
    let mut opts = OpenOptions::new();
    opts.apply_qemu_option("overlap-check", "none").unwrap();
    let img = Image::open(&path, &opts).unwrap();
    // Without checks the write lands on the L1 table, as QEMU's would.
    img.write_at(&[0; 8], 0).unwrap();
    drop(img);
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[0x30000..0x30008], &[0; 8]);
}

/// A 64k-cluster image with a compressed cluster at guest 0 whose data no
/// longer inflates, and data (pattern 2) at 128k.
fn image_with_broken_compressed_cluster(path: &Path) {
    assert!(qemu(&["qemu-img", "create", "-q", "-f", "qcow2", p(path), "1M"]).status.success());
    let io = qemu(&["qemu-io", "-c", "write -c -P 1 0 64k", "-c", "write -P 2 128k 64k", p(path)]);
    assert!(io.status.success());
    let mut bytes = std::fs::read(path).unwrap();
    let l2 = u64::from_be_bytes(bytes[0x30000..0x30008].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00;
    let entry = u64::from_be_bytes(bytes[l2 as usize..l2 as usize + 8].try_into().unwrap());
    assert_ne!(entry & 1 << 62, 0, "guest cluster 0 is compressed");
    // 64k clusters: the host offset is the low 62 - (16 - 8) bits.
    let host = (entry & ((1 << 54) - 1)) as usize;
    bytes[host..host + 512].fill(0xff);
    std::fs::write(path, bytes).unwrap();
}

/// One write into a compressed cluster that did not inflate used to poison
/// the image: the failed copy on write set the sticky failure and the
/// corrupt bit, every later write and flush failed, and writes acknowledged
/// before it were lost at close. QEMU fails only that request.
#[test]
fn unreadable_compressed_data_fails_only_its_request() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.qcow2");
    image_with_broken_compressed_cluster(&path);

    let img = Image::open(&path, &OpenOptions::new()).unwrap();
    img.write_at(&[3; 4096], 256 << 10).unwrap();
    let e = img.write_at(&[4; 512], 512).expect_err("the copy on write cannot read the cluster");
    assert_ne!(e.kind(), ErrorKind::Failed, "{e}");
    let mut buf = vec![0u8; 4096];
    img.read_at(&mut buf, 0).expect_err("the cluster does not inflate");
    img.write_at(&[5; 4096], 320 << 10).unwrap();
    img.flush().unwrap();
    // Acknowledged, never flushed by the caller: close must keep it.
    img.write_at(&[6; 4096], 384 << 10).unwrap();
    img.close().unwrap();

    let info = String::from_utf8(qemu(&["qemu-img", "info", p(&path)]).stdout).unwrap();
    assert!(info.contains("corrupt: false"), "{info}");
    let check = qemu(&["qemu-img", "check", p(&path)]);
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stdout));
    let out = qemu(&[
        "qemu-io",
        "-c",
        "read -P 2 128k 64k",
        "-c",
        "read -P 3 256k 4k",
        "-c",
        "read -P 5 320k 4k",
        "-c",
        "read -P 6 384k 4k",
        p(&path),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !text.contains("fail"), "{text}");
}

/// An image (64k clusters) whose 128k of data (pattern 1) an internal
/// snapshot shares, with COPIED wrongly set on the active first L2 entry
/// (`flag_l2`) or on the active L1 entry of the shared L2 table.
fn image_with_wrong_copied_flag(path: &Path, flag_l2: bool) {
    assert!(qemu(&["qemu-img", "create", "-q", "-f", "qcow2", p(path), "4M"]).status.success());
    assert!(qemu(&["qemu-io", "-c", "write -P 1 0 128k", p(path)]).status.success());
    assert!(qemu(&["qemu-img", "snapshot", "-c", "s1", p(path)]).status.success());
    let mut bytes = std::fs::read(path).unwrap();
    let word = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l1 = word(&bytes, 40) as usize;
    let at = if flag_l2 { (word(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize } else { l1 };
    let flagged = word(&bytes, at) | 1 << 63;
    bytes[at..at + 8].copy_from_slice(&flagged.to_be_bytes());
    std::fs::write(path, bytes).unwrap();
}

/// A write into a cluster whose entry says COPIED while the refcount says
/// 2 (shared with a snapshot) changed the snapshot in place, as QEMU's
/// does. The flag is now checked against the refcount before the first
/// in-place write: the write copies on write, the snapshot keeps its data,
/// and the mismatch is reported with `qemu-img check`'s line.
#[test]
fn a_wrong_copied_flag_does_not_let_a_write_change_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    for (flag_l2, write_at, line) in [
        (true, 0u64, "ERROR OFLAG_COPIED data cluster: l2_entry=8000000000050000 refcount=2"),
        (false, 1 << 20, "ERROR OFLAG_COPIED L2 cluster: l1_index=0 l1_entry=8000000000040000 refcount=2"),
    ] {
        let path = dir.path().join(format!("flag_l2_{flag_l2}.qcow2"));
        image_with_wrong_copied_flag(&path, flag_l2);
        let reported = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let sink = reported.clone();
        let opts = OpenOptions {
            messages: Some(std::sync::Arc::new(move |m| {
                if let oxqcow::ImageMessage::Inconsistency(l) = m {
                    sink.lock().unwrap().push(l.into());
                }
            })),
            ..OpenOptions::new()
        };
        let img = Image::open(&path, &opts).unwrap();
        img.write_at(&[2; 4096], write_at).unwrap();
        img.write_at(&[3; 4096], write_at + 8192).unwrap();
        img.close().unwrap();
        assert_eq!(*reported.lock().unwrap(), vec![line.to_string()], "reported once, as qemu-img check words it");

        let check = qemu(&["qemu-img", "check", p(&path)]);
        assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stdout));
        let snap = dir.path().join("snap.raw");
        let convert = qemu(&["qemu-img", "convert", "-l", "s1", "-O", "raw", p(&path), p(&snap)]);
        assert!(convert.status.success());
        let out = qemu(&["qemu-io", "-f", "raw", "-c", "read -P 1 0 128k", "-c", "read -P 0 1M 64k", p(&snap)]);
        assert!(!String::from_utf8_lossy(&out.stdout).contains("fail"), "the snapshot changed (flag_l2 {flag_l2})");
        let active = format!("read -P 2 {write_at} 4k");
        let out = qemu(&["qemu-io", "-c", &active, p(&path)]);
        assert!(!String::from_utf8_lossy(&out.stdout).contains("fail"), "the write was lost (flag_l2 {flag_l2})");
    }
}
