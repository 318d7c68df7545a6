//! `oxqcow serve` with real NBD clients: QEMU's qemu-img and qemu-io over
//! `nbd+unix://` and `nbd://`, libnbd's nbdinfo and nbdcopy, fio's nbd
//! engine, several clients at once, socket activation and `--fork`
//! (hand-written clients are in `serve_raw.rs`). After every test the image
//! must pass `qemu-img check`.
//!
//! Tools come from Debian's qemu-utils, libnbd-bin and fio (installed by
//! .ci/run); a test that needs a missing tool fails and says which. Every
//! test has its own directory, socket path and port, so tests run in
//! parallel. Waits (for a socket to appear, a process to end) are bounded
//! and fail loudly; nothing asserts on time.

use std::path::Path;
use std::process::Command;

mod external;
use external::*;

#[test]
fn qemu_io_reads_and_writes_over_a_unix_socket() {
    let d = Dir::new();
    let img = d.image("disk.qcow2", "96M");
    let srv = Server::unix(&d.path("s.sock"), &["-f", "qcow2", "-t", img.to_str().unwrap()]);
    let uri = srv.uri();
    qemu_io(
        &["-f", "raw", &uri],
        &[
            "write -P 0xa1 0 1M",
            "write -P 0xa2 10M 64k",
            "write -P 0xa3 1000 3000",
            "aio_write -P 0xa4 20M 128k",
            "aio_write -P 0xa5 30M 4k",
            "aio_flush",
            "write -z 10M 4k",
            "write -z -u 40M 2M",
            "discard 50M 1M",
            "flush",
            "read -P 0xa1 0 1000",
            "read -P 0xa3 1000 3000",
            "read -P 0xa1 4000 1044576",
            "read -P 0 10M 4k",
            "read -P 0xa2 10489856 61440",
            "read -P 0xa4 20M 128k",
            "read -P 0xa5 30M 4k",
        ],
    );
    srv.stop();
    // The data is in the file, as QEMU reads it.
    qemu_io(
        &["-f", "qcow2", img.to_str().unwrap()],
        &["read -P 0xa3 1000 3000", "read -P 0xa2 10489856 61440", "read -P 0xa4 20M 128k", "read -P 0 40M 2M"],
    );
    assert_clean(&img);
}

#[test]
fn qemu_img_map_convert_and_compare_over_tcp() {
    let d = Dir::new();
    let img = d.image("disk.qcow2", "16M");
    populate(&img);
    let local = map_runs(&qemu_img(&["map", "--output=json", "-f", "qcow2", img.to_str().unwrap()]));
    let srv = Server::tcp(&["-r", "-f", "qcow2", img.to_str().unwrap()]);
    let uri = srv.uri();
    let remote = map_runs(&qemu_img(&["map", "--output=json", "-f", "raw", &uri]));
    assert_eq!(remote, local, "qemu-img map over NBD disagrees with the local map");
    let copy = d.s("copy.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", &uri, &copy]);
    assert_eq!(
        qemu_img(&["compare", "-f", "raw", "-F", "qcow2", &uri, &copy]),
        "Images are identical.\n",
        "compare over NBD"
    );
    // The converted copy keeps the holes the server reported.
    assert_eq!(map_runs(&qemu_img(&["map", "--output=json", &copy])), local);
    qemu_io(&["-r", "-f", "raw", &uri], &["read -P 0x33 7340032 4096", "read -P 0x44 12M 2M", "read -P 0 5M 1M"]);
    srv.stop();
    assert_eq!(
        qemu_img(&["compare", "-f", "qcow2", "-F", "qcow2", img.to_str().unwrap(), &copy]),
        "Images are identical.\n"
    );
    assert_clean(&img);
    assert_clean(Path::new(&copy));
}

#[test]
fn qemu_io_writes_over_tcp() {
    let d = Dir::new();
    let img = d.image("disk.qcow2", "32M");
    let srv = Server::tcp(&["-f", "qcow2", "-x", "named", img.to_str().unwrap()]);
    let uri = srv.uri_named("named");
    qemu_io(&["-f", "raw", &uri], &["write -P 0x5a 1M 3M", "flush", "read -P 0x5a 1M 3M", "read -P 0 0 1M"]);
    // The wrong export name is refused.
    let o = run("qemu-io", &["-f", "raw", "-c", "read 0 512", &srv.uri_named("other")]);
    assert!(!o.status.success(), "a wrong export name was accepted");
    srv.stop();
    qemu_io(&["-f", "qcow2", img.to_str().unwrap()], &["read -P 0x5a 1M 3M"]);
    assert_clean(&img);
}

/// nbdinfo against qemu-nbd and against oxqcow serve on the same socket
/// path and the same image prints the same thing.
fn nbdinfo_both(d: &Dir, img: &Path, server_args: &[&str], nbdinfo_args: &[&str]) -> (String, String) {
    require("nbdinfo", "libnbd-bin");
    require("qemu-nbd", "qemu-utils");
    let sock = d.path("cmp.sock");
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let mut args: Vec<&str> = nbdinfo_args.to_vec();
    args.push(&uri);
    let mut qargs = vec!["-k", sock.to_str().unwrap()];
    qargs.extend_from_slice(server_args);
    qargs.push(img.to_str().unwrap());
    let mut q = Command::new("qemu-nbd").args(&qargs).spawn().expect("starting qemu-nbd");
    wait_until("qemu-nbd's socket", || sock.exists());
    let theirs = run_ok("nbdinfo", &args);
    let _ = q.kill();
    let _ = q.wait();
    let _ = std::fs::remove_file(&sock);
    let mut oargs: Vec<&str> = server_args.to_vec();
    oargs.push(img.to_str().unwrap());
    let srv = Server::unix(&sock, &oargs);
    let ours = run_ok("nbdinfo", &args);
    srv.stop();
    (theirs, ours)
}

#[test]
fn nbdinfo_matches_qemu_nbd() {
    let d = Dir::new();
    let img = d.image("disk.qcow2", "16M");
    populate(&img);
    for (server, info) in [
        (&["-f", "qcow2", "-t", "-A", "-D", "a description"][..], &[][..]),
        (&["-f", "qcow2", "-t", "-A", "-r", "-e", "3"][..], &[][..]),
        (&["-f", "qcow2", "-t", "-A", "-D", "listed"][..], &["--list"][..]),
        (&["-f", "qcow2", "-t", "-A"][..], &["--map"][..]),
        (&["-f", "qcow2", "-t", "-A"][..], &["--map=qemu:allocation-depth"][..]),
        (&["-f", "qcow2", "-t", "-A"][..], &["--json"][..]),
        // Without -A qemu-nbd offers no qemu:allocation-depth (oxqcow
        // offered it always).
        (&["-f", "qcow2", "-t", "-D", "listed"][..], &["--list"][..]),
        (&["-f", "qcow2", "-t"][..], &["--json"][..]),
    ] {
        let (theirs, ours) = nbdinfo_both(&d, &img, server, info);
        assert_eq!(ours, theirs, "nbdinfo {info:?} differs (server flags {server:?})");
    }
    assert_clean(&img);
}

#[test]
fn nbdinfo_maps_allocation_depth_of_a_backing_chain() {
    let d = Dir::new();
    let base = d.image("base.qcow2", "8M");
    qemu_io(&["-f", "qcow2", base.to_str().unwrap()], &["write -P 1 0 2M", "write -P 2 6M 1M"]);
    let top = d.s("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", &top]);
    qemu_io(&["-f", "qcow2", &top], &["write -P 3 1M 2M", "write -z 6M 512k"]);
    let (theirs, ours) =
        nbdinfo_both(&d, Path::new(&top), &["-f", "qcow2", "-t", "-A"], &["--map=qemu:allocation-depth"]);
    assert_eq!(ours, theirs);
    assert!(ours.contains("backing depth 2"), "no backing extent in:\n{ours}");
    let (theirs, ours) = nbdinfo_both(&d, Path::new(&top), &["-f", "qcow2", "-t"], &["--map"]);
    assert_eq!(ours, theirs);
    assert_clean(Path::new(&top));
    assert_clean(&base);
}

#[test]
fn nbdcopy_both_directions() {
    require("nbdcopy", "libnbd-bin");
    let d = Dir::new();
    let img = d.image("disk.qcow2", "24M");
    populate(&img);
    let srv = Server::unix(&d.path("s.sock"), &["-f", "qcow2", "-t", img.to_str().unwrap()]);
    let out = d.s("out.raw");
    run_ok("nbdcopy", &[&srv.uri(), &out]);
    assert_eq!(
        qemu_img(&["compare", "-U", "-f", "qcow2", "-F", "raw", img.to_str().unwrap(), &out]),
        "Images are identical.\n"
    );
    // And back: a different raw image written over the export.
    let src = d.s("src.raw");
    qemu_img(&["create", "-q", "-f", "raw", &src, "24M"]);
    qemu_io(&["-f", "raw", &src], &["write -P 0x77 2M 5M", "write -P 0x78 20M 4k"]);
    run_ok("nbdcopy", &[&src, &srv.uri()]);
    srv.stop();
    assert_eq!(
        qemu_img(&["compare", "-f", "qcow2", "-F", "raw", img.to_str().unwrap(), &src]),
        "Images are identical.\n"
    );
    assert_clean(&img);
}

#[test]
fn fio_verified_random_writes() {
    require("fio", "fio");
    let d = Dir::new();
    let img = d.image("disk.qcow2", "128M");
    let srv = Server::unix(&d.path("s.sock"), &["-f", "qcow2", "-t", img.to_str().unwrap()]);
    let uri = format!("--uri={}", srv.uri());
    let out = run_ok(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--size=64M",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            // No verify state file in the working directory.
            "--verify_state_save=0",
            "--randrepeat=0",
        ],
    );
    assert!(out.contains("WRITE:") && out.contains("READ:"), "fio did not write and verify:\n{out}");
    let unaligned = run_ok(
        "fio",
        &[
            "--name=mixed",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bsrange=512-256k",
            "--size=32M",
            "--offset=64M",
            "--iodepth=32",
            "--verify=md5",
            "--do_verify=1",
            "--verify_fatal=1",
            // No verify state file in the working directory.
            "--verify_state_save=0",
        ],
    );
    assert!(unaligned.contains("READ:"), "fio did not verify:\n{unaligned}");
    srv.stop();
    assert_clean(&img);
}

#[test]
fn several_clients_at_once() {
    require("nbdinfo", "libnbd-bin");
    let d = Dir::new();
    let img = d.image("disk.qcow2", "96M");
    let srv = Server::unix(&d.path("s.sock"), &["-f", "qcow2", "-t", "-e", "4", img.to_str().unwrap()]);
    let uri = srv.uri();
    assert!(run_ok("nbdinfo", &[&uri]).contains("can_multi_conn: true"));
    let clients: Vec<_> = (0..4u64)
        .map(|i| {
            let uri = uri.clone();
            std::thread::spawn(move || {
                let w = format!("write -P {} {}M 4M", 0x10 + i, i * 8);
                let a = format!("aio_write -P {} {}M 1M", 0x20 + i, i * 8 + 5);
                let r = format!("read -P {} {}M 4M", 0x10 + i, i * 8);
                qemu_io(&["-f", "raw", &uri], &[&w, &a, "aio_flush", &r]);
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    srv.stop();
    for i in 0..4u64 {
        let r = format!("read -P {} {}M 4M", 0x10 + i, i * 8);
        let a = format!("read -P {} {}M 1M", 0x20 + i, i * 8 + 5);
        qemu_io(&["-f", "qcow2", img.to_str().unwrap()], &[&r, &a]);
    }
    assert_clean(&img);
}

#[test]
fn exits_after_the_last_client_unless_persistent() {
    let d = Dir::new();
    let img = d.image("disk.qcow2", "8M");
    let srv = Server::unix(&d.path("s.sock"), &["-f", "qcow2", img.to_str().unwrap()]);
    qemu_io(&["-f", "raw", &srv.uri()], &["write -P 9 0 64k"]);
    srv.wait_exit();
    assert!(!d.path("s.sock").exists(), "the socket was left behind");
    qemu_io(&["-f", "qcow2", img.to_str().unwrap()], &["read -P 9 0 64k"]);
    assert_clean(&img);
}

#[test]
fn socket_activation() {
    require("nbdinfo", "libnbd-bin");
    let d = Dir::new();
    let img = d.image("disk.qcow2", "8M");
    populate_small(&img);
    // nbdinfo starts the server with LISTEN_PID/LISTEN_FDS and a socket on fd 3.
    let out = run_ok("nbdinfo", &["--map", "--", "[", OXQCOW, "serve", "-f", "qcow2", img.to_str().unwrap(), "]"]);
    assert_eq!(
        out.lines().next().map(|l| l.split_whitespace().collect::<Vec<_>>()),
        Some(vec!["0", "65536", "0", "data"])
    );
    assert_clean(&img);
}

#[test]
fn fork_and_pid_file() {
    require("nbdinfo", "libnbd-bin");
    let d = Dir::new();
    let img = d.image("disk.qcow2", "8M");
    let (sock, pid_file) = (d.s("s.sock"), d.s("pid"));
    // The parent returns once the server listens.
    let o = run(
        OXQCOW,
        &["serve", "--fork", "--pid-file", &pid_file, "-k", &sock, "-t", "-f", "qcow2", img.to_str().unwrap()],
    );
    assert!(o.status.success(), "serve --fork: {}", String::from_utf8_lossy(&o.stderr));
    assert!(Path::new(&sock).exists(), "no socket once the parent returned");
    let pid = std::fs::read_to_string(&pid_file).unwrap().trim().to_string();
    let uri = format!("nbd+unix:///?socket={sock}");
    qemu_io(&["-f", "raw", &uri], &["write -P 3 0 1M"]);
    assert!(run_ok("nbdinfo", &[&uri]).contains("export-size: 8388608"));
    run_ok("kill", &["-TERM", &pid]);
    wait_until("the forked server to exit", || !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(&pid));
    wait_until("the pid file to go", || !Path::new(&pid_file).exists());
    assert!(!Path::new(&sock).exists());
    qemu_io(&["-f", "qcow2", img.to_str().unwrap()], &["read -P 3 0 1M"]);
    assert_clean(&img);
    // A child that fails reports through the parent's exit status.
    let o = run(OXQCOW, &["serve", "--fork", "-k", &sock, "-f", "qcow2", &d.s("missing.qcow2")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("Failed to blk_new_open"));
}

#[test]
fn command_line_errors_like_qemu_nbd() {
    let d = Dir::new();
    let img = d.image("disk.qcow2", "1M");
    let i = img.to_str().unwrap();
    for (args, msg) in [
        (vec!["serve"], "Invalid number of arguments"),
        (vec!["serve", "-e", "x", i], "Invalid shared device number 'x'"),
        (vec!["serve", "-k", "rel.sock", i], "socket path must be absolute"),
        (vec!["serve", "--discard=foo", i], "Invalid discard mode `foo'"),
        (vec!["serve", "--cache=foo", i], "Invalid cache mode `foo'"),
        (vec!["serve", "--detect-zeroes=unmap", i], "not allowed without setting discard operation to unmap"),
        (vec!["serve", "--image-opts", "-f", "qcow2", i], "--image-opts and -f are mutually exclusive"),
        (vec!["serve", "-f", "qcow2", &d.s("nope.qcow2")], "Failed to blk_new_open"),
        (vec!["serve", "--tls-creds=x", i], "Failed to get TLS creds: No TLS credentials with id 'x'"),
        (vec!["serve", "-o", "512", i], "not supported"),
        (vec!["serve", "--object", "tls-creds-x509,id=t", i], "Missing 'dir' property value"),
        (vec!["serve", "--object", "authz-simple,id=a,identity=x", i], "not supported"),
        (vec!["serve", "-U", i], "--read-only"),
    ] {
        let o = run(OXQCOW, &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(msg), "{args:?}: expected '{msg}' in: {err}");
    }
    assert_clean(&img);
}

// ---------------------------------------------------------------------------
// Hostile clients, speaking raw bytes.
