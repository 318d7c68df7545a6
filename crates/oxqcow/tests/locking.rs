//! Image locks interoperate with QEMU's: one writer at a time, readers
//! alongside readers, -U (force share) to read an image in use.

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use oxqcow::{CreateOptions, ErrorKind, Image, OpenOptions};

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Starts `qemu-io [args] image` waiting on stdin, and waits until it holds the image.
fn qemu_io_holding(args: &[&str], path: &Path) -> Child {
    let mut child = Command::new("qemu-io")
        .args(args)
        .arg(p(path))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-io must be installed (apt-get install qemu-utils)");
    // Once it answers a command it has the image open (and locked).
    let stdin = child.stdin.as_mut().unwrap();
    writeln!(stdin, "length").unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut buf = [0u8; 64];
    let n = std::io::Read::read(&mut out, &mut buf).unwrap();
    assert!(n > 0, "qemu-io did not answer");
    child
}

fn finish(mut child: Child) {
    drop(child.stdin.take());
    child.wait().unwrap();
}

fn qemu_img_info(path: &Path, force: bool) -> std::process::Output {
    let mut cmd = Command::new("qemu-img");
    cmd.arg("info");
    if force {
        cmd.arg("-U");
    }
    cmd.arg(p(path)).output().expect("qemu-img must be installed")
}

#[test]
fn qemu_writer_excludes_oxqcow_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.qcow2");
    Image::create(&path, &CreateOptions::qcow2(1 << 20)).unwrap().close().unwrap();

    let writer = qemu_io_holding(&[], &path);
    let e = Image::open(&path, &OpenOptions::new()).err().expect("second writer");
    assert_eq!(e.kind(), ErrorKind::Locked);
    assert!(e.to_string().starts_with("Failed to get \"write\" lock"), "{e}");
    let e = Image::open(&path, &OpenOptions::new().read_only(true)).err().expect("reader while writing");
    assert!(e.to_string().starts_with("Failed to get shared \"write\" lock"), "{e}");
    let shared = OpenOptions { read_only: true, force_share: true, ..Default::default() };
    Image::open(&path, &shared).expect("-U reads an image in use");
    // Creating over an image in use fails and destroys nothing.
    assert!(Image::create(&path, &CreateOptions::qcow2(1 << 20)).is_err());
    finish(writer);

    let ours = Image::open(&path, &OpenOptions::new()).unwrap();
    let out = qemu_img_info(&path, false);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Failed to get shared \"write\" lock"));
    assert!(qemu_img_info(&path, true).status.success(), "qemu-img info -U works while we write");
    let out = Command::new("qemu-io").args(["-c", "read 0 512"]).arg(p(&path)).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("Failed to get \"write\" lock"));
    drop(ours);

    // Readers share.
    let reader = qemu_io_holding(&["-r"], &path);
    let r1 = Image::open(&path, &OpenOptions::new().read_only(true)).expect("two readers");
    assert!(Image::open(&path, &OpenOptions::new()).is_err(), "no writer while reading");
    drop(r1);
    finish(reader);
    assert!(Image::open(&path, &OpenOptions { force_share: true, ..Default::default() }).is_err());
}
