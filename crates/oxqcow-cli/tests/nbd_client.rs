//! The NBD client: images named `nbd+unix://`, `nbd://` and `nbd:` are
//! exports of a real NBD server (qemu-nbd, and `oxqcow serve`), usable by
//! qemu-img's subcommands and by `oxqcow io` as QEMU's nbd driver makes
//! them: the same output and messages as qemu-img, the same bytes as
//! qemu-io reads and writes.

mod common;
mod nbd_server;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::Scratch;
use nbd_server::Server;

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

/// A base with data in its first half and an overlay with data across the
/// middle: every depth `qemu:allocation-depth` tells apart (0, 1, 2).
fn overlay_chain(s: &Scratch) {
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    s.qemu_io("qcow2", "base.qcow2", &["write -P 1 0 2M"]);
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", "4M"]);
    s.qemu_io("qcow2", "top.qcow2", &["write -P 2 1M 2M"]);
}

/// The nbd driver's `x-dirty-bitmap=CONTEXT` reads block status from that
/// context instead of `base:allocation`, its two low bits taken as QEMU
/// takes them (bit 0 "hole": no data, bit 1 "zero"; allocation depths past
/// 2 fold into 2), over qemu-nbd and `oxqcow serve`, through
/// `--image-opts` and `json:` names, in map and in `oxqcow io`'s map; a
/// context the server lacks fails the open as QEMU's does. Before, the
/// option was ignored and base:allocation reported.
#[test]
fn x_dirty_bitmap_reads_the_named_context() {
    let s = Scratch::new();
    overlay_chain(&s);
    for ours in [false, true] {
        let server = Server::unix(&s.path("top.qcow2"), ours, &["-r", "-f", "qcow2", "-A"]);
        let sock = server.socket.display().to_string();
        let opts = format!("driver=nbd,server.type=unix,server.path={sock}");
        let depth = format!("{opts},x-dirty-bitmap=qemu:allocation-depth");
        let missing = format!("{opts},x-dirty-bitmap=qemu:dirty-bitmap:nope");
        let json = format!(r#"json:{{"driver":"nbd","path":"{sock}","x-dirty-bitmap":"qemu:allocation-depth"}}"#);
        let o = s.assert_same(&["map", "--output=json", "--image-opts", &depth]);
        assert!(o.stdout.contains(r#""present": false"#), "the local layer reads as a hole: {}", o.stdout);
        s.assert_same(&["map", "--output=json", "--image-opts", &opts]);
        s.assert_same(&["map", "--image-opts", &depth]);
        s.assert_same(&["map", "--output=json", &json]);
        let o = s.assert_same(&["map", "--image-opts", &missing]);
        assert_eq!(o.code, 1);
        let cmds = ["-r", "--image-opts", "-c", "map", depth.as_str()];
        let dir = s.path("");
        let (o, q) = (our_io(&dir, &cmds), qemu_io(&dir, &cmds));
        assert_eq!((o.code, o.stdout), (q.code, q.stdout), "oxqcow io map over x-dirty-bitmap");
    }
    // A dirty bitmap: its set bits read as holes.
    s.qemu_ok(&["bitmap", "--add", "top.qcow2", "b0"]);
    s.qemu_io("qcow2", "top.qcow2", &["write -P 3 512k 64k"]);
    for ours in [false, true] {
        let server = Server::unix(&s.path("top.qcow2"), ours, &["-r", "-f", "qcow2", "-B", "b0"]);
        let bitmap = format!(
            "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:b0",
            server.socket.display()
        );
        let o = s.assert_same(&["map", "--output=json", "--image-opts", &bitmap]);
        assert!(o.stdout.contains(r#""start": 524288, "length": 65536"#), "{}", o.stdout);
    }
}

/// `qemu-nbd` as a link to oxqcow, in `dir`.
fn our_qemu_nbd(dir: &Path) -> PathBuf {
    let link = dir.join("qemu-nbd");
    if !link.exists() {
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_oxqcow"), &link).unwrap();
    }
    link
}

fn run_tool(tool: &Path, args: &[&str]) -> common::Out {
    let o = Command::new(tool).args(args).output().unwrap_or_else(|e| panic!("{} is required: {e}", tool.display()));
    common::Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// `qemu-nbd --list` (`-L`), oxqcow's and QEMU's, against qemu-nbd and
/// `oxqcow serve` exports of several kinds (read-only with allocation
/// depth; named, described, shared, with a bitmap; over TCP): the same
/// lines ("exports available", size, flags with their names, block sizes,
/// "transaction size: 64-bit" from extended headers, the meta contexts),
/// and the same refusals. Before, `-L` was refused as unsupported, and
/// `oxqcow serve` refused extended headers (flags without
/// block-status-payload, "transaction size: 32-bit").
#[test]
fn list_prints_what_qemu_nbd_prints() {
    let s = Scratch::new();
    overlay_chain(&s);
    s.qemu_ok(&["bitmap", "--add", "base.qcow2", "b0"]);
    let ours = our_qemu_nbd(&s.path(""));
    let theirs = Path::new("qemu-nbd");
    // The bitmap is exported read-only: a writable server killed at the
    // end would leave it marked in use.
    let exports: [(&str, &[&str]); 3] = [
        ("top.qcow2", &["-r", "-f", "qcow2", "-A"]),
        ("top.qcow2", &["-f", "qcow2", "-x", "disk", "-D", "a disk", "-e", "2"]),
        ("base.qcow2", &["-r", "-f", "qcow2", "-B", "b0", "-x", "b"]),
    ];
    for (image, extra) in exports {
        for serve_ours in [false, true] {
            let server = Server::unix(&s.path(image), serve_ours, extra);
            let sock = server.socket.display().to_string();
            let args = ["-L", "-k", sock.as_str()];
            let (o, q) = (run_tool(&ours, &args), run_tool(theirs, &args));
            assert_eq!(q.code, 0, "{q:?}");
            assert!(q.stdout.contains("transaction size: 64-bit"), "{}", q.stdout);
            assert_eq!(o, q, "oxqcow's -L differs from qemu-nbd's against {extra:?} (oxqcow serve: {serve_ours})");
        }
    }
    // Over TCP, by host and port.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_oxqcow"))
        .args(["serve", "-t", "-r", "-f", "qcow2", "-b", "127.0.0.1", "-p", &port])
        .arg(s.path("top.qcow2"))
        .spawn()
        .unwrap();
    let args = ["--list", "-b", "127.0.0.1", "-p", port.as_str()];
    let mut q = run_tool(theirs, &args);
    for _ in 0..500 {
        if q.code == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        q = run_tool(theirs, &args);
    }
    assert_eq!(run_tool(&ours, &args), q);
    let _ = child.kill();
    let _ = child.wait();
    // Refusals, in qemu-nbd's words and order.
    let missing = s.path("nope.sock").display().to_string();
    for args in [
        vec!["-L", "-k", missing.as_str()],
        vec!["-L", "-k", missing.as_str(), "top.qcow2"],
        vec!["-L", "-k", missing.as_str(), "-x", "e"],
        vec!["-L", "-k", missing.as_str(), "-f", "raw"],
        vec!["-L", "-k", missing.as_str(), "-A"],
        vec!["-L", "-k", missing.as_str(), "--fork"],
        vec!["-L", "-k", missing.as_str(), "--tls-hostname=h"],
    ] {
        let (o, q) = (run_tool(&ours, &args), run_tool(theirs, &args));
        assert_eq!(q.code, 1, "{args:?}: {q:?}");
        assert_eq!(o, q, "{args:?}");
    }
}

/// A 48 MiB image of data runs, zeros and holes, spread so that convert's
/// workers read and write different parts at once.
fn image_for_converts(s: &Scratch, name: &str) {
    s.qemu_ok(&["create", "-q", "-f", "qcow2", name, "48M"]);
    let path = s.path(name);
    let cmds = ["write -P 1 0 5M", "write -P 2 7M 3M", "write -z 12M 4M", "write -P 3 20M 10M", "write -P 4 40M 64k"];
    let mut args = vec!["-f", "qcow2"];
    for c in &cmds {
        args.extend(["-c", c]);
    }
    args.push(path.to_str().unwrap());
    let o = qemu_io(&s.path(""), &args);
    assert_eq!(o.code, 0, "{o:?}");
}

/// Converts out of an export and into one with convert's parallel workers
/// (`-m 8` and the default), which share the client's one connection with
/// several requests in flight (issue 12: the client used to send one
/// request at a time): to qcow2 and raw, against qemu-nbd and
/// `oxqcow serve`, the copies as qemu-img compare sees them.
#[test]
fn parallel_converts_share_one_connection() {
    let s = Scratch::new();
    image_for_converts(&s, "src.qcow2");
    for ours in [false, true] {
        let server = Server::unix(&s.path("src.qcow2"), ours, &["-r", "-f", "qcow2"]);
        let uri = server.uri();
        for workers in [&[][..], &["-m", "8"][..], &["-m", "8", "-W"][..]] {
            for fmt in ["qcow2", "raw"] {
                let out = format!("out.{fmt}");
                let _ = std::fs::remove_file(s.path(&out));
                let args = [&["convert"][..], workers, &["-O", fmt, &uri, &out][..]].concat();
                let o = s.ours(&args);
                assert_eq!(o.code, 0, "{args:?} (oxqcow serve: {ours}): {o:?}");
                s.qemu_ok(&["compare", "-f", "qcow2", "-F", fmt, "src.qcow2", &out]);
            }
        }
        drop(server);
        let _ = std::fs::remove_file(s.path("t.qcow2"));
        s.qemu_ok(&["create", "-q", "-f", "qcow2", "t.qcow2", "48M"]);
        let server = Server::unix(&s.path("t.qcow2"), ours, &["-f", "qcow2"]);
        let uri = server.uri();
        let o = s.ours(&["convert", "-n", "-m", "8", "-W", "-O", "raw", "src.qcow2", &uri]);
        assert_eq!(o.code, 0, "convert into the export (oxqcow serve: {ours}): {o:?}");
        s.qemu_ok(&["compare", "-F", "raw", "src.qcow2", &uri]);
        drop(server);
        s.qemu_ok(&["compare", "src.qcow2", "t.qcow2"]);
    }
}

/// Waits for `child`, killing it and failing the test when it hangs.
fn wait_or_hang(child: &mut Child, what: &str) -> std::process::Output {
    for _ in 0..1200 {
        if child.try_wait().unwrap().is_some() {
            let mut out = std::process::Output { status: child.wait().unwrap(), stdout: vec![], stderr: vec![] };
            use std::io::Read;
            child.stderr.take().unwrap().read_to_end(&mut out.stderr).unwrap();
            return out;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = child.kill();
    panic!("{what} hung after its server was killed");
}

/// The bytes allocated to `path` on the host.
fn host_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

/// A server killed with requests in flight: convert fails as qemu-img does
/// ("error while reading at byte N: Input/output error", or "writing" for
/// a target export; exit code 1) instead of hanging or panicking. The
/// copy is paced (`-r`) so that the kill lands in its middle; the server
/// is killed once the copy's first data has landed.
#[test]
fn a_server_killed_mid_convert_fails_the_convert() {
    let s = Scratch::new();
    image_for_converts(&s, "src.qcow2");
    for ours in [false, true] {
        for into_export in [false, true] {
            let _ = std::fs::remove_file(s.path("t.qcow2"));
            let _ = std::fs::remove_file(s.path("out.raw"));
            s.qemu_ok(&["create", "-q", "-f", "qcow2", "t.qcow2", "48M"]);
            let exported = if into_export { "t.qcow2" } else { "src.qcow2" };
            let mut server = Server::unix(&s.path(exported), ours, &["-f", "qcow2"]);
            let uri = server.uri();
            let args: Vec<&str> = if into_export {
                vec!["convert", "-n", "-r", "4M", "-O", "raw", "src.qcow2", &uri]
            } else {
                vec!["convert", "-r", "4M", "-O", "raw", &uri, "out.raw"]
            };
            let mut child = Command::new(env!("CARGO_BIN_EXE_oxqcow"))
                .args(&args)
                .current_dir(s.path(""))
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            // The copy's first data: the export's image grows, or the
            // output file gets blocks.
            let landed = if into_export { s.path("t.qcow2") } else { s.path("out.raw") };
            let start = host_bytes(&landed);
            for _ in 0..600 {
                if host_bytes(&landed) > start + (1 << 20) || child.try_wait().unwrap().is_some() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            server.child.kill().unwrap();
            let o = wait_or_hang(&mut child, "convert");
            let err = String::from_utf8_lossy(&o.stderr);
            let verb = if into_export { "writing" } else { "reading" };
            let line = err.lines().next().unwrap_or("");
            assert!(
                line.starts_with(&format!("oxqcow: error while {verb} at byte "))
                    && line.ends_with(": Input/output error"),
                "oxqcow serve: {ours}, into the export: {into_export}: {err}"
            );
            assert_eq!(o.status.code(), Some(1), "{err}");
            assert!(!err.contains("panicked"), "{err}");
        }
    }
}
