//! The tools' standard output is buffered as C's stdio buffers QEMU's (in
//! blocks on a pipe, by lines on a terminal) and standard error is not, so
//! when both go to one pipe the order of the lines is QEMU's: compared
//! with qemu-io and qemu-img on the same image, both streams in one pipe.

use std::process::Command;

/// Runs `tool args...` through bash with standard error joined to
/// standard output (one pipe), under the name `qemu-io`; what came out.
fn joined(tool: &[&str], args: &[&str], dir: &std::path::Path) -> String {
    joined_as("qemu-io", tool, args, dir)
}

/// [`joined`] under the name `name`.
fn joined_as(name: &str, tool: &[&str], args: &[&str], dir: &std::path::Path) -> String {
    let out = Command::new("bash")
        .arg("-c")
        .arg(r#"name=$1; shift; exec -a "$name" "$@" 2>&1"#)
        .arg("bash")
        .arg(name)
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

// Guards against qemu-img's standard output written line by line: with
// both streams in one pipe, check's "Check failed" (stderr) comes before
// its report (stdout, written at exit), and create's "Formatting" line
// (which QEMU flushes) before the error that follows it.
#[test]
fn qemu_img_output_is_buffered_as_qemu_img_buffers_it() {
    let dir = tempfile::tempdir().unwrap();
    let run = |cmd: &[&str]| {
        let o = Command::new("qemu-img").args(cmd).current_dir(dir.path()).output();
        assert!(o.is_ok_and(|o| o.status.success()), "qemu-img is required for this test (install qemu-utils)");
    };
    run(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "a.qcow2", "64k"]);
    let io = Command::new("qemu-io").args(["-c", "write -q -P 1 0 4k", "a.qcow2"]).current_dir(dir.path()).output();
    assert!(io.is_ok_and(|o| o.status.success()), "qemu-io is required for this test (install qemu-utils)");
    // A refcount table entry past QEMU's largest request: check errors.
    let path = dir.path().join("a.qcow2");
    let mut bytes = std::fs::read(&path).unwrap();
    let reftable = u64::from_be_bytes(bytes[48..56].try_into().unwrap()) as usize;
    bytes[reftable..reftable + 8].fill(0xff);
    std::fs::write(&path, &bytes).unwrap();
    let ours = [env!("CARGO_BIN_EXE_oxqcow")];
    for args in
        [&["check", "a.qcow2"][..], &["create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=4k", "b.qcow2", "1M"]]
    {
        let theirs = joined_as("qemu-img", &["qemu-img"], args, dir.path());
        assert!(theirs.contains("Check failed\n") || theirs.starts_with("Formatting 'b.qcow2'"), "{theirs}");
        assert_eq!(joined_as("qemu-img", &ours, args, dir.path()), theirs, "{args:?}");
    }
}
