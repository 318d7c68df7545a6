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
