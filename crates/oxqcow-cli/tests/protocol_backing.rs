//! Backing files named by protocol in an image header: overlays on an
//! HTTP base served by nginx and on NBD bases served by qemu-nbd and by
//! `oxqcow serve` over a unix socket. Before the engine's protocol opener
//! (`OpenOptions::protocols`) every recorded name was resolved as a host
//! file, so none of these overlays could be created or opened. qemu-img
//! (with its curl and nbd drivers) is the oracle: the overlays oxqcow makes
//! and writes compare equal to qemu-img's, `info --backing-chain` and
//! `map` print what qemu-img prints, and overlays qemu-img made read back
//! identically through oxqcow.

mod common;
mod nbd_server;
mod nginx;

use std::path::PathBuf;
use std::process::Command;

use common::Scratch;
use nbd_server::Server;
use nginx::{free_port, Nginx};

/// How the NBD bases are served: read only, for several clients at once.
const QCOW2_READ_ONLY: &[&str] = &["-e", "16", "-r", "-f", "qcow2"];

/// A base image with data in two places, made by qemu-img and qemu-io.
fn make_base(s: &Scratch) -> PathBuf {
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
    s.qemu_io("qcow2", "base.qcow2", &["write -P 0x5a 0 3M", "write -P 0x11 10M 1M", "write -z 20M 64k"]);
    s.path("base.qcow2")
}

/// Runs `oxqcow io` (qemu-io) in the scratch directory.
fn ours_io(s: &Scratch, args: &[&str]) {
    let o = Command::new(env!("CARGO_BIN_EXE_oxqcow"))
        .arg("io")
        .args(args)
        .current_dir(s.dir.path())
        .output()
        .expect("running oxqcow io");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && !stdout.contains("failed"), "oxqcow io {args:?}: {o:?}");
}

/// An overlay on `backing` (format `fmt`) made and written by oxqcow,
/// another made and written by qemu-img and qemu-io: equal as guest disks,
/// described and mapped alike by both tools, and each read back by the
/// other tool with the same bytes.
fn overlays_match(s: &Scratch, backing: &str, fmt: &str) {
    let writes = ["write -P 0x77 1M 64k", "write -z 10M 128k", "write -P 0x42 63M 4k"];
    // No size: it is the backing file's.
    s.ours_ok(&["create", "-q", "-f", "qcow2", "-b", backing, "-F", fmt, "ours.qcow2"]);
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "-b", backing, "-F", fmt, "theirs.qcow2"]);
    let mut args = vec!["-f", "qcow2"];
    for w in &writes {
        args.extend(["-c", w]);
    }
    ours_io(s, &[args.as_slice(), &["ours.qcow2"]].concat());
    s.qemu_io("qcow2", "theirs.qcow2", &writes);
    let same = s.qemu_ok(&["compare", "ours.qcow2", "theirs.qcow2"]);
    assert_eq!(same.stdout, "Images are identical.\n");
    s.ours_ok(&["compare", "ours.qcow2", "theirs.qcow2"]);
    for image in ["ours.qcow2", "theirs.qcow2"] {
        s.assert_same(&["info", "--backing-chain", image]);
        s.assert_same(&["info", "--backing-chain", "--output=json", image]);
        s.assert_same(&["map", "--output=json", image]);
        s.assert_same(&["map", image]);
    }
    // The overlay qemu-img made, read whole through oxqcow, and oxqcow's
    // read whole through qemu-img.
    s.ours_ok(&["convert", "-O", "raw", "theirs.qcow2", "theirs.raw"]);
    s.qemu_ok(&["convert", "-m", "1", "-O", "raw", "ours.qcow2", "ours.raw"]);
    assert!(std::fs::read(s.path("ours.raw")).unwrap() == std::fs::read(s.path("theirs.raw")).unwrap());
    // convert -B: a new overlay on the same base, holding only what differs.
    s.ours_ok(&["convert", "-O", "qcow2", "-B", backing, "-F", fmt, "theirs.qcow2", "converted.qcow2"]);
    assert_eq!(s.qemu_ok(&["compare", "converted.qcow2", "theirs.qcow2"]).stdout, "Images are identical.\n");
    s.assert_same(&["map", "--output=json", "converted.qcow2"]);
    std::fs::remove_file(s.path("converted.qcow2")).unwrap();
    // qemu-io's reads of oxqcow's overlay: what was written, and the base.
    ours_io(
        s,
        &["-r", "-c", "read -P 0x77 1M 64k", "-c", "read -P 0x5a 0 1M", "-c", "read -P 0 10M 128k", "theirs.qcow2"],
    );
}

#[test]
fn overlays_on_an_http_base() {
    let s = Scratch::new();
    let web = Nginx::start();
    std::fs::copy(make_base(&s), web.www("base.qcow2")).unwrap();
    overlays_match(&s, &web.url("base.qcow2"), "qcow2");
}

#[test]
fn overlays_on_an_nbd_base_served_by_qemu_nbd() {
    let s = Scratch::new();
    let server = Server::unix(&make_base(&s), false, QCOW2_READ_ONLY);
    let socket = server.socket.display().to_string();
    overlays_match(&s, &format!("nbd+unix:///?socket={socket}"), "raw");
    // QEMU's older spelling of the same export.
    std::fs::remove_file(s.path("ours.qcow2")).unwrap();
    std::fs::remove_file(s.path("theirs.qcow2")).unwrap();
    overlays_match(&s, &format!("nbd:unix:{socket}"), "raw");
}

#[test]
fn overlays_on_an_nbd_base_served_by_oxqcow_serve() {
    let s = Scratch::new();
    let server = Server::unix(&make_base(&s), true, QCOW2_READ_ONLY);
    overlays_match(&s, &server.uri(), "raw");
}

/// A backing server that cannot be reached fails the open with QEMU's
/// "Could not open backing file: ..." in front of the driver's reason.
#[test]
fn an_unreachable_backing_server_fails_as_in_qemu() {
    let s = Scratch::new();
    let sock = s.path("gone.sock").display().to_string();
    let nbd = format!("nbd+unix:///?socket={sock}");
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "-u", "-b", &nbd, "-F", "raw", "nbd.qcow2", "1M"]);
    let o = s.assert_same(&["map", "nbd.qcow2"]);
    assert!(o.stderr.contains("Could not open backing file: "), "{o:?}");
    let http = format!("http://127.0.0.1:{}/base.qcow2", free_port());
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "-u", "-b", &http, "-F", "qcow2", "http.qcow2", "1M"]);
    let o = s.ours(&["map", "http.qcow2"]);
    assert_eq!(o.code, 1);
    assert!(o.stderr.starts_with("qemu-img: Could not open 'http.qcow2': Could not open backing file: "), "{o:?}");
}

/// An `rbd:` backing file name from a header may set no Ceph option but
/// `id`: `conf` (or `log_file`, `keyring`, ...) would let the image's
/// author point librados at files of their choosing. Refused before any
/// connection, naming the option.
#[test]
fn rbd_header_names_with_ceph_options_are_refused() {
    let s = Scratch::new();
    for (name, option) in [("rbd:pool/img:conf=/etc/shadow", "conf"), ("rbd:pool/img:id=a:log_file=/tmp/x", "log_file")]
    {
        s.qemu_ok(&["create", "-q", "-f", "qcow2", "-u", "-b", name, "-F", "raw", "rbd.qcow2", "1M"]);
        for args in [vec!["map", "rbd.qcow2"], vec!["convert", "-O", "raw", "rbd.qcow2", "out.raw"]] {
            let o = s.ours(&args);
            assert_eq!(o.code, 1, "{args:?}: {o:?}");
            assert!(
                o.stderr.contains(&format!("The option '{option}' of the rbd backing file name '{name}' is refused")),
                "{args:?}: {o:?}"
            );
        }
    }
}

/// `rebase -u` records a protocol name as it is, and the overlay then
/// reads its data from there.
#[test]
fn unsafe_rebase_onto_an_nbd_base() {
    let s = Scratch::new();
    let server = Server::unix(&make_base(&s), false, QCOW2_READ_ONLY);
    let nbd = server.uri();
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "top.qcow2", "64M"]);
    s.ours_ok(&["rebase", "-u", "-b", &nbd, "-F", "raw", "top.qcow2"]);
    s.assert_same(&["info", "--backing-chain", "top.qcow2"]);
    ours_io(&s, &["-r", "-c", "read -P 0x11 10M 1M", "top.qcow2"]);
}

/// A chain base (nbd) <- mid <- top: oxqcow creates the layers (mid's
/// base opened through the protocol while top is created), commits top
/// into mid as qemu-img does, and the results compare equal.
#[test]
fn commit_into_a_layer_over_an_nbd_base() {
    let s = Scratch::new();
    let server = Server::unix(&make_base(&s), false, QCOW2_READ_ONLY);
    let nbd = server.uri();
    for (tool_ours, dir) in [(true, "ours"), (false, "theirs")] {
        std::fs::create_dir(s.path(dir)).unwrap();
        let mid = format!("{dir}/mid.qcow2");
        let top = format!("{dir}/top.qcow2");
        let create_mid = ["create", "-q", "-f", "qcow2", "-b", &nbd, "-F", "raw", &mid];
        let create_top = ["create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", &top];
        let writes = ["write -P 0x21 2M 1M", "write -z 10M 64k"];
        if tool_ours {
            s.ours_ok(&create_mid);
            s.ours_ok(&create_top);
            ours_io(&s, &["-c", writes[0], "-c", writes[1], &top]);
            s.ours_ok(&["commit", "-q", &top]);
        } else {
            s.qemu_ok(&create_mid);
            s.qemu_ok(&create_top);
            s.qemu_io("qcow2", &top, &writes);
            s.qemu_ok(&["commit", "-q", &top]);
        }
    }
    assert_eq!(s.qemu_ok(&["compare", "ours/mid.qcow2", "theirs/mid.qcow2"]).stdout, "Images are identical.\n");
    let map =
        |tool: fn(&Scratch, &[&str]) -> common::Out, image: &str| tool(&s, &["map", "--output=json", image]).stdout;
    assert_eq!(map(Scratch::ours_ok, "ours/mid.qcow2"), map(Scratch::qemu_ok, "theirs/mid.qcow2"));
    assert_eq!(
        map(Scratch::ours_ok, "ours/top.qcow2"),
        map(Scratch::qemu_ok, "theirs/top.qcow2").replace("theirs/", "ours/")
    );
}

/// Safe rebase onto an NBD base (the new backing file opened through the
/// protocol) and off it again (the old one read through it), as qemu-img
/// rebases: the same guest disk and the same allocation.
#[test]
fn safe_rebase_onto_and_off_an_nbd_base() {
    let s = Scratch::new();
    let server = Server::unix(&make_base(&s), false, QCOW2_READ_ONLY);
    let nbd = server.uri();
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "blank.qcow2", "64M"]);
    s.qemu_io("qcow2", "blank.qcow2", &["write -P 0x33 9M 2M"]);
    for (ours, dir) in [(true, "ours"), (false, "theirs")] {
        std::fs::create_dir(s.path(dir)).unwrap();
        let top = format!("{dir}/top.qcow2");
        s.qemu_ok(&["create", "-q", "-f", "qcow2", "-b", "../blank.qcow2", "-F", "qcow2", &top]);
        s.qemu_io("qcow2", &top, &["write -P 0x44 1M 64k"]);
        let run = if ours { Scratch::ours_ok } else { Scratch::qemu_ok };
        run(&s, &["rebase", "-q", "-b", &nbd, "-F", "raw", &top]);
        std::fs::copy(s.path(&top), s.path(&format!("{dir}/on-nbd.qcow2"))).unwrap();
        run(&s, &["rebase", "-q", "-b", "", &top]);
    }
    for name in ["on-nbd.qcow2", "top.qcow2"] {
        let (a, b) = (format!("ours/{name}"), format!("theirs/{name}"));
        assert_eq!(s.qemu_ok(&["compare", &a, &b]).stdout, "Images are identical.\n", "{name}");
        let map = |image: &str| s.qemu_ok(&["map", "--output=json", image]).stdout;
        assert_eq!(map(&a), map(&b), "{name}");
    }
}

/// An overlay on an HTTPS base (nginx with a certificate of the test's own
/// CA, trusted through `SSL_CERT_FILE`): created without a size, written,
/// and read back with the base's data under the overlay's.
#[test]
fn an_overlay_on_an_https_base() {
    let s = Scratch::new();
    let web = Nginx::start();
    std::fs::copy(make_base(&s), web.www("base.qcow2")).unwrap();
    let url = web.tls_url("base.qcow2");
    let run = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_oxqcow"))
            .args(args)
            .env("SSL_CERT_FILE", &web.ca_file)
            .current_dir(s.dir.path())
            .output()
            .expect("running oxqcow");
        assert!(o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("failed"), "{args:?}: {o:?}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    run(&["create", "-q", "-f", "qcow2", "-b", &url, "-F", "qcow2", "over.qcow2"]);
    run(&["io", "-c", "write -P 0x66 1M 64k", "over.qcow2"]);
    run(&[
        "io",
        "-r",
        "-c",
        "read -P 0x66 1M 64k",
        "-c",
        "read -P 0x5a 0 1M",
        "-c",
        "read -P 0x11 10M 1M",
        "over.qcow2",
    ]);
    let info = run(&["info", "--backing-chain", "over.qcow2"]);
    assert!(info.contains(&format!("backing file: {url}")) && info.contains(&format!("image: {url}")), "{info}");
    // Without the CA the base cannot be trusted, and the overlay cannot open.
    let o = s.ours(&["map", "over.qcow2"]);
    assert!(o.code == 1 && o.stderr.contains("Could not open backing file: "), "{o:?}");
}
