//! qemu-io's standard output is buffered as C's stdio buffers it (in
//! blocks on a pipe, by lines on a terminal) and its standard error is
//! not, so when both go to one pipe the order of the lines is QEMU's:
//! compared with qemu-io on the same image, both streams in one pipe.

use std::process::Command;

/// Runs `tool args...` through bash with standard error joined to
/// standard output (one pipe), under the name `qemu-io`; what came out.
fn joined(tool: &[&str], args: &[&str], dir: &std::path::Path) -> String {
    let out = Command::new("bash")
        .arg("-c")
        .arg(r#"exec -a qemu-io "$@" 2>&1"#)
        .arg("bash")
        .args(tool)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("bash runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !(l.contains(" ops; ") && l.ends_with(" ops/sec)")))
        .collect::<Vec<_>>()
        .join("\n")
}

// Guards against qemu-io's output being written line by line on a pipe:
// an error printed between two commands then came out between their
// reports, where qemu-io prints it before all of them.
#[test]
fn errors_come_before_buffered_output_on_one_pipe() {
    let qemu_io = Command::new("qemu-io").arg("--version").output();
    assert!(qemu_io.is_ok_and(|o| o.status.success()), "qemu-io is required for this test (install qemu-utils)");
    let dir = tempfile::tempdir().unwrap();
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "a.qcow2", "1M"])
        .current_dir(dir.path())
        .status()
        .expect("qemu-img runs");
    assert!(made.success());
    let args = ["-c", "read 0 64k", "-c", "open -o foo=bar a.qcow2", "-c", "read 0 64k", "a.qcow2"];
    let theirs = joined(&["qemu-io"], &args, dir.path());
    let ours = joined(&[env!("CARGO_BIN_EXE_oxqcow"), "io"], &args, dir.path());
    assert!(theirs.starts_with("qemu-io: file open already"), "{theirs}");
    assert_eq!(ours, theirs);
}
