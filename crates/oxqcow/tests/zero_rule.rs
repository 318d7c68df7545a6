//! The one rule for zeroing without writing data (`Qcow2::zeroes_by_metadata`,
//! used by NBD's fast zero, the FUSE export's hole punching and qemu-io's
//! `write -z -n`) agrees with QEMU's: for each request, qemu-io's
//! `write -z -n` succeeds exactly where the rule says yes.

use std::path::Path;
use std::process::Command;

use oxqcow::{Image, OpenOptions};

fn qemu(args: &[&str]) -> std::process::Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{} must be installed (apt-get install qemu-utils): {e}", args[0]))
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Whether `qemu-io -c 'write -z -n OFFSET LEN'` succeeds on a copy of `image`.
fn qemu_zeroes_without_fallback(image: &Path, offset: u64, len: u64) -> bool {
    let copy = image.with_extension("copy");
    std::fs::copy(image, &copy).unwrap();
    let cmd = format!("write -z -n {offset} {len}");
    let out = qemu(&["qemu-io", "-f", "qcow2", "-c", &cmd, p(&copy)]);
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    !text.contains("failed")
}

#[test]
fn zeroing_without_writing_data_is_decided_as_qemu_decides() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &[(u64, u64)])] = &[
        // Partial clusters with and without data; whole clusters; the disk's end.
        ("compat=1.1", &[(0, 65536), (4096, 4096), (65536 + 512, 1024), (0, 4096), (1024, 131072), (1015808, 32768)]),
        // Version 2 has no zero flag.
        ("compat=0.10", &[(0, 65536), (65536, 65536)]),
        // Subclusters of 2 KiB: partial subclusters decide.
        ("extended_l2=on", &[(2048, 2048), (4096 + 512, 512), (512, 512), (0, 65536), (65536 + 1024, 1024)]),
    ];
    for (options, requests) in cases {
        let path = dir.path().join("img.qcow2");
        let o = format!("{options},cluster_size=64k");
        assert!(qemu(&["qemu-img", "create", "-q", "-f", "qcow2", "-o", &o, p(&path), "1M"]).status.success());
        assert!(qemu(&["qemu-io", "-c", "write -P 1 0 2k", p(&path)]).status.success());
        let image = Image::open(&path, &OpenOptions::new().read_only(true)).unwrap();
        let q = image.as_qcow2().unwrap();
        for &(offset, len) in *requests {
            let ours = q.zeroes_by_metadata(offset, len).unwrap();
            let theirs = qemu_zeroes_without_fallback(&path, offset, len);
            assert_eq!(ours, theirs, "{options}: write -z -n {offset} {len}");
        }
    }
}
