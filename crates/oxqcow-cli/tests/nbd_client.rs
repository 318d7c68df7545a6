//! The NBD client: images named `nbd+unix://`, `nbd://` and `nbd:` are
//! exports of a real NBD server (qemu-nbd, and `oxqcow serve`), usable by
//! qemu-img's subcommands and by `oxqcow io` as QEMU's nbd driver makes
//! them: the same output and messages as qemu-img, the same bytes as
//! qemu-io reads and writes.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::Scratch;

/// A server exporting one image, killed when dropped.
struct Server {
    child: Child,
    _sockdir: tempfile::TempDir,
    socket: PathBuf,
}

impl Server {
    /// `qemu-nbd` (or `oxqcow serve` when `ours`) on a unix socket, with
    /// `extra` flags, persistent so that many clients can come and go.
    fn unix(image: &Path, ours: bool, extra: &[&str]) -> Server {
        let sockdir = tempfile::tempdir().unwrap();
        let socket = sockdir.path().join("nbd.sock");
        let mut cmd = if ours {
            let mut c = Command::new(env!("CARGO_BIN_EXE_oxqcow"));
            c.arg("serve");
            c
        } else {
            Command::new("qemu-nbd")
        };
        let child = cmd
            .args(["-t", "-k"])
            .arg(&socket)
            .args(extra)
            .arg(image)
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-nbd is required by this test (install qemu-utils)");
        wait_for(&socket);
        Server { child, _sockdir: sockdir, socket }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for(socket: &Path) {
    for _ in 0..500 {
        if socket.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("the NBD server did not create {}", socket.display());
}

fn qemu_io(dir: &Path, args: &[&str]) -> common::Out {
    let o = Command::new("qemu-io").args(args).current_dir(dir).output().expect("qemu-io is required");
    common::Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn our_io(dir: &Path, args: &[&str]) -> common::Out {
    let o = Command::new(env!("CARGO_BIN_EXE_oxqcow")).arg("io").args(args).current_dir(dir).output().unwrap();
    common::Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// Lines of qemu-io output without the timing lines, which differ.
fn without_timings(s: &str) -> String {
    s.lines().filter(|l| !l.contains(" ops; ")).collect::<Vec<_>>().join("\n")
}

fn image_with_data(s: &Scratch, name: &str) {
    s.qemu_ok(&["create", "-q", "-f", "qcow2", name, "16M"]);
    let path = s.path(name);
    let o = qemu_io(
        &s.path(""),
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 5 0 64k",
            "-c",
            "write -P 9 3M 1M",
            "-c",
            "write -z 8M 1M",
            path.to_str().unwrap(),
        ],
    );
    assert_eq!(o.code, 0, "{o:?}");
}

/// info, map, compare and check give qemu-img's output for every spelling
/// of the export's name, over qemu-nbd and over `oxqcow serve`.
#[test]
fn subcommands_read_exports_as_qemu_img_does() {
    let s = Scratch::new();
    image_with_data(&s, "a.qcow2");
    for ours in [false, true] {
        let server = Server::unix(&s.path("a.qcow2"), ours, &["-r", "-f", "qcow2"]);
        let legacy = format!("nbd:unix:{}", server.socket.display());
        for name in [server.uri(), legacy] {
            for args in [
                vec!["info", name.as_str()],
                vec!["info", "--output=json", name.as_str()],
                vec!["map", "--output=json", name.as_str()],
                vec!["map", name.as_str()],
                vec!["compare", "-F", "qcow2", name.as_str(), "a.qcow2"],
                vec!["check", name.as_str()],
            ] {
                s.assert_same(&args);
            }
        }
    }
}

/// `--image-opts driver=nbd,...` names the same export, with qemu-img's
/// output.
#[test]
fn image_opts_name_exports() {
    let s = Scratch::new();
    image_with_data(&s, "a.qcow2");
    let server = Server::unix(&s.path("a.qcow2"), false, &["-r", "-f", "qcow2", "-x", "disk"]);
    let opts = format!("driver=nbd,server.type=unix,server.path={},export=disk", server.socket.display());
    for args in [
        // The protocol node is described alone, as QEMU describes it.
        vec!["info", "--image-opts", opts.as_str()],
        vec!["info", "--output=json", "--image-opts", opts.as_str()],
        vec!["info", "--image-opts", "driver=file,filename=a.qcow2"],
        vec!["map", "--output=json", "--image-opts", opts.as_str()],
        vec!["compare", "--image-opts", opts.as_str(), "driver=qcow2,file.filename=a.qcow2"],
    ] {
        s.assert_same(&args);
    }
    let o = s.ours(&["info", "--image-opts", "driver=nbd,server.type=unix,export=disk"]);
    assert_eq!(o.code, 1, "a unix server needs its path: {o:?}");
    // qemu-io reads the export through the same options.
    let cmds = ["-r", "--image-opts", "-c", "read -P 5 0 64k", "-c", "read -P 9 3M 1M", opts.as_str()];
    let ours = our_io(&s.path(""), &cmds);
    let theirs = qemu_io(&s.path(""), &cmds);
    assert_eq!(ours.code, 0, "{ours:?}");
    assert_eq!(without_timings(&ours.stdout), without_timings(&theirs.stdout));
}

/// Writes through the export land in the image: qemu-io reads back what
/// `oxqcow io` wrote, and a convert into the export (`-n`) copies an image.
#[test]
fn writes_and_converts_reach_the_image() {
    let s = Scratch::new();
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "t.qcow2", "16M"]);
    let server = Server::unix(&s.path("t.qcow2"), false, &["-f", "qcow2"]);
    let uri = server.uri();
    let dir = s.path("");
    let ours = our_io(
        &dir,
        &["-f", "raw", "-c", "write -P 7 1M 64k", "-c", "write -z 2M 1M", "-c", "discard 4M 64k", "-c", "flush", &uri],
    );
    assert_eq!(ours.code, 0, "{ours:?}");
    let theirs = qemu_io(&dir, &["-f", "raw", "-c", "read -P 7 1M 64k", "-c", "read -P 0 2M 1M", &uri]);
    assert!(!theirs.stdout.contains("failed") && theirs.code == 0, "{theirs:?}");
    // Reads agree both ways, as qemu-io prints them.
    let cmds = ["-f", "raw", "-c", "read -v 1048576 32", "-c", "read -P 7 1M 64k", &uri];
    assert_eq!(without_timings(&our_io(&dir, &cmds).stdout), without_timings(&qemu_io(&dir, &cmds).stdout));

    image_with_data(&s, "src.qcow2");
    let o = s.ours(&["convert", "-n", "-O", "raw", "src.qcow2", &uri]);
    assert_eq!(o.code, 0, "{o:?}");
    s.assert_same(&["compare", "-F", "raw", "src.qcow2", &uri]);
    // And out of it into a new image, holes kept as holes.
    let o = s.ours(&["convert", "-O", "qcow2", &uri, "copy.qcow2"]);
    assert_eq!(o.code, 0, "{o:?}");
    s.qemu_ok(&["compare", "-F", "raw", "copy.qcow2", &uri]);
    assert!(s.data_bytes("copy.qcow2") <= 2 << 20, "holes were copied as data");
    drop(server);
    s.assert_clean("t.qcow2");
    s.assert_clean("copy.qcow2");
}

/// TCP exports by name, as `nbd://HOST:PORT/NAME` and `nbd:HOST:PORT:exportname=NAME`.
#[test]
fn tcp_exports_by_name() {
    let s = Scratch::new();
    image_with_data(&s, "a.qcow2");
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let mut child = Command::new("qemu-nbd")
        .args(["-t", "-r", "-f", "qcow2", "-b", "127.0.0.1", "-p", &port, "-x", "disk"])
        .arg(s.path("a.qcow2"))
        .spawn()
        .expect("qemu-nbd is required by this test");
    let uri = format!("nbd://127.0.0.1:{port}/disk");
    let mut up = false;
    for _ in 0..500 {
        if std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_ok() {
            up = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(up, "qemu-nbd did not listen");
    for args in [
        vec!["info", uri.as_str()],
        vec!["map", "--output=json", uri.as_str()],
        vec!["compare", "-F", "qcow2", uri.as_str(), "a.qcow2"],
    ] {
        s.assert_same(&args);
    }
    let legacy = format!("nbd:127.0.0.1:{port}:exportname=disk");
    s.assert_same(&["compare", "-F", "qcow2", &legacy, "a.qcow2"]);
    let _ = child.kill();
    let _ = child.wait();
}

/// Connection and negotiation failures in QEMU's words, and a read-only
/// export refused for writing as QEMU refuses it.
#[test]
fn failures_are_worded_as_qemus() {
    let s = Scratch::new();
    image_with_data(&s, "a.qcow2");
    let server = Server::unix(&s.path("a.qcow2"), false, &["-r", "-f", "qcow2"]);
    let missing = format!("nbd+unix:///?socket={}", s.path("nope.sock").display());
    let unknown = format!("nbd+unix:///other?socket={}", server.socket.display());
    for name in [&missing, &unknown] {
        s.assert_same(&["info", name]);
        s.assert_same(&["map", name]);
    }
    let dir = s.path("");
    let ours = our_io(&dir, &["-f", "raw", "-c", "write 0 512", &server.uri()]);
    let theirs = qemu_io(&dir, &["-f", "raw", "-c", "write 0 512", &server.uri()]);
    assert_eq!(ours.code, theirs.code);
    assert_eq!(
        ours.stderr.replace("oxqcow:", "qemu-io:"),
        theirs.stderr,
        "a read-only export is refused for writing as QEMU refuses it"
    );
}
