//! Regression tests for operations that lost data or refused to work on
//! images in use, each side by side with qemu-img: creating over an image
//! another process holds, `-U` on every reading subcommand, internal
//! snapshots of overlays, and `info` opening files an image names.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::Scratch;

/// `qemu-io [args] image`, waiting on stdin, once it holds the image.
fn qemu_io_holding(dir: &Path, args: &[&str], image: &str) -> Child {
    let mut child = Command::new("qemu-io")
        .args(args)
        .arg(image)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-io is required by this test (apt-get install qemu-utils)");
    // Once it answers a command it has the image open, and locked.
    writeln!(child.stdin.as_mut().unwrap(), "length").unwrap();
    let mut buf = [0u8; 64];
    let n = child.stdout.as_mut().unwrap().read(&mut buf).unwrap();
    assert!(n > 0, "qemu-io did not open {image}");
    child
}

fn release(mut holder: Child) {
    drop(holder.stdin.take());
    holder.wait().unwrap();
}

fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().ino()
}

/// `create` over an image another process holds used to print the lock
/// error and then unlink the file (`create -f qcow2`) or truncate it
/// (`create -f raw -o preallocation=metadata`) anyway.
#[test]
fn create_over_an_image_in_use_changes_nothing() {
    let s = Scratch::new();
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "held.qcow2", "1M"]);
    s.qemu_io("qcow2", "held.qcow2", &["write -P 7 0 64k"]);
    std::fs::write(s.path("held.raw"), vec![9u8; 100_000]).unwrap();
    let before = (std::fs::read(s.path("held.qcow2")).unwrap(), inode(&s.path("held.qcow2")));
    let raw_before = std::fs::read(s.path("held.raw")).unwrap();

    let qcow2_holder = qemu_io_holding(s.dir.path(), &[], "held.qcow2");
    for args in [
        &["create", "-f", "qcow2", "held.qcow2", "1M"][..],
        &["create", "-f", "raw", "held.qcow2", "1M"],
        &["create", "-f", "raw", "-o", "preallocation=metadata", "held.qcow2", "1M"],
        &["create", "-f", "qcow2", "-o", "preallocation=full", "held.qcow2", "1M"],
    ] {
        let out = s.assert_same(args);
        assert_eq!(out.code, 1, "{args:?}: {out:?}");
        assert!(out.stderr.contains("Failed to get \"write\" lock"), "{args:?}: {out:?}");
        assert_eq!((std::fs::read(s.path("held.qcow2")).unwrap(), inode(&s.path("held.qcow2"))), before);
    }
    release(qcow2_holder);
    s.qemu_io("qcow2", "held.qcow2", &["read -P 7 0 64k"]);

    // A raw image that a writer shares with other writers: qemu-img's raw
    // creation takes it and empties it (its qcow2 creation too, before
    // failing on the lock); oxqcow takes the locks of the image it makes
    // before it truncates, and refuses.
    let raw_holder = qemu_io_holding(s.dir.path(), &["-f", "raw"], "held.raw");
    for args in [
        &["create", "-f", "qcow2", "held.raw", "1M"][..],
        &["create", "-f", "raw", "held.raw", "1M"],
        &["create", "-f", "raw", "-o", "preallocation=metadata", "held.raw", "1M"],
    ] {
        let out = s.ours(args);
        assert_eq!(out.code, 1, "{args:?}: {out:?}");
        assert!(
            out.stderr.ends_with(
                ": held.raw: Failed to get shared \"write\" lock\nIs another process using the image [held.raw]?\n"
            ),
            "{args:?}: {out:?}"
        );
        assert_eq!(std::fs::read(s.path("held.raw")).unwrap(), raw_before, "{args:?}");
    }
    release(raw_holder);
}

/// A creation that fails after the file was locked has already emptied
/// it, as QEMU's does (a raw file stays, empty).
#[test]
fn failed_creation_after_the_lock_empties_the_file_like_qemu() {
    let s = Scratch::new();
    for dir in ["q", "o"] {
        std::fs::create_dir(s.path(dir)).unwrap();
        std::fs::write(s.path(&format!("{dir}/old.raw")), b"old bytes").unwrap();
    }
    let q = s.qemu(&["create", "-f", "raw", "-o", "preallocation=metadata", "q/old.raw", "1M"]);
    let o = s.ours(&["create", "-f", "raw", "-o", "preallocation=metadata", "o/old.raw", "1M"]);
    assert_eq!((o.code, o.stderr.replace("o/", "q/")), (q.code, q.stderr), "{o:?}");
    assert_eq!(q.code, 1);
    assert_eq!(std::fs::read(s.path("o/old.raw")).unwrap(), std::fs::read(s.path("q/old.raw")).unwrap());
}

/// `-U` was ignored by info, check, map, compare, convert and measure:
/// they failed with 'Failed to get shared "write" lock' while another
/// process wrote the image or its backing file. `bitmap` opens no backing
/// file at all, as qemu-img's.
#[test]
fn force_share_reads_images_in_use() {
    let s = Scratch::new();
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
    s.qemu_io("qcow2", "base.qcow2", &["write -P 1 0 1M"]);
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"]);
    s.qemu_io("qcow2", "top.qcow2", &["write -P 2 0 64k"]);
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top2.qcow2"]);
    s.qemu_ok(&["bitmap", "--add", "top.qcow2", "b0"]);
    s.qemu_ok(&["bitmap", "--add", "top2.qcow2", "b1"]);

    let holder = qemu_io_holding(s.dir.path(), &[], "base.qcow2");
    let reading: &[&[&str]] = &[
        &["info", "top.qcow2"],
        &["info", "--backing-chain", "top.qcow2"],
        &["info", "base.qcow2"],
        &["check", "top.qcow2"],
        &["map", "--output=json", "top.qcow2"],
        &["compare", "top.qcow2", "top2.qcow2"],
        &["measure", "-O", "qcow2", "top.qcow2"],
        &["convert", "-O", "raw", "top.qcow2", "out.raw"],
    ];
    for args in reading {
        // Without -U both refuse the same way (but `info` of the overlay,
        // which does not open the held base)...
        let out = s.assert_same(args);
        if *args != ["info", "top.qcow2"] {
            assert_ne!(out.code, 0, "{args:?} read an image in use without -U");
            assert!(out.stderr.contains("Failed to get shared \"write\" lock"), "{args:?}: {out:?}");
        }
        // ... with it both read.
        let mut shared = args.to_vec();
        shared.insert(1, "-U");
        let (q, o) = (s.qemu(&shared), s.ours(&shared));
        assert_eq!(o.code, q.code, "{shared:?}: qemu-img {q:?}, oxqcow {o:?}");
        assert!(o.code == 0 || (args[0] == "compare" && o.code == 1), "{shared:?}: {o:?}");
        assert_eq!(o.stderr, q.stderr, "{shared:?}");
        assert_eq!(o.stdout, q.stdout, "{shared:?}");
    }
    // Bitmaps are the image's own: the held base is not opened.
    s.ours_ok(&["bitmap", "--add", "top.qcow2", "b2"]);
    s.ours_ok(&["bitmap", "--merge", "b1", "-b", "top2.qcow2", "-F", "qcow2", "top.qcow2", "b0"]);
    release(holder);
    s.assert_clean("top.qcow2");
    let info = s.qemu_ok(&["info", "top.qcow2"]).stdout;
    assert!(info.contains("name: b0") && info.contains("name: b2"), "{info}");
}

/// Loading an internal snapshot of an image with a backing file failed
/// ("Can't find the snapshot"): the snapshot was looked for in every layer.
#[test]
fn snapshots_of_overlays_load() {
    let s = Scratch::new();
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
    s.qemu_io("qcow2", "base.qcow2", &["write -P 1 0 1M"]);
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"]);
    s.qemu_io("qcow2", "top.qcow2", &["write -P 2 0 64k"]);
    s.qemu_ok(&["snapshot", "-c", "s1", "top.qcow2"]);
    s.qemu_io("qcow2", "top.qcow2", &["write -P 3 0 128k"]);

    s.qemu_ok(&["convert", "-l", "s1", "-O", "raw", "top.qcow2", "q.raw"]);
    s.ours_ok(&["convert", "-l", "snapshot.name=s1", "-O", "raw", "top.qcow2", "o.raw"]);
    assert_eq!(std::fs::read(s.path("o.raw")).unwrap(), std::fs::read(s.path("q.raw")).unwrap());
    s.qemu_io("raw", "o.raw", &["read -P 2 0 64k", "read -P 1 64k 960k"]);
    s.assert_same(&["measure", "-l", "s1", "-O", "qcow2", "top.qcow2"]);

    // The same snapshot exported read-only.
    let sock = s.path("nbd.sock");
    let mut server = Command::new(env!("CARGO_BIN_EXE_oxqcow"))
        .args(["serve", "-r", "-l", "s1", "-f", "qcow2", "-k"])
        .arg(&sock)
        .arg(s.path("top.qcow2"))
        .spawn()
        .unwrap();
    for _ in 0..500 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri])
        .arg(s.path("nbd.raw"))
        .output()
        .expect("qemu-img is required by this test");
    let _ = server.kill();
    let _ = server.wait();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(s.path("nbd.raw")).unwrap(), std::fs::read(s.path("q.raw")).unwrap());
}

/// `info` without `--backing-chain` opened the backing and data files an
/// image names (it hung when one was a FIFO); `--backing-chain` had no
/// depth limit and found loops by comparing names, so `./a` naming itself
/// as `./a` was followed until the name grew too long.
#[test]
fn info_opens_only_what_it_describes() {
    let s = Scratch::new();
    let fifo = s.path("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "-u", "-b", "fifo", "-F", "raw", "backed.qcow2", "1M"]);
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "-o", "data_file=data.raw", "data.qcow2", "1M"]);
    std::fs::remove_file(s.path("data.raw")).unwrap();
    std::os::unix::fs::symlink("fifo", s.path("data.raw")).unwrap();
    for image in ["backed.qcow2", "data.qcow2"] {
        // A hang fails the test through `timeout`'s exit code.
        let out = Command::new("timeout")
            .args(["20", env!("CARGO_BIN_EXE_oxqcow"), "info", "--output=json", image])
            .current_dir(s.dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{image}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout), s.qemu_ok(&["info", "--output=json", image]).stdout);
    }

    // Names that spell one file differently.
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "-u", "-b", "./self.qcow2", "-F", "qcow2", "self.qcow2", "1M"]);
    let out = s.ours(&["info", "--backing-chain", "self.qcow2"]);
    assert_eq!(out.code, 1);
    assert_eq!(out.stderr, "qemu-img: Backing file './self.qcow2' creates an infinite loop.\n");
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "-u", "-b", "link.qcow2", "-F", "qcow2", "x.qcow2", "1M"]);
    std::fs::hard_link(s.path("x.qcow2"), s.path("link.qcow2")).unwrap();
    for args in [&["info", "--backing-chain", "x.qcow2"][..], &["map", "x.qcow2"]] {
        let out = s.ours(args);
        assert_eq!(out.code, 1, "{args:?}");
        assert!(out.stderr.contains("Backing file 'link.qcow2' creates an infinite loop."), "{args:?}: {out:?}");
    }

    // A chain deeper than the limit: the top alone is described as QEMU
    // describes it, the chain stops at the limit.
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "l0.qcow2", "1M"]);
    for i in 1..=300 {
        let (below, this) = (format!("l{}.qcow2", i - 1), format!("l{i}.qcow2"));
        s.qemu_ok(&["create", "-q", "-f", "qcow2", "-u", "-b", &below, "-F", "qcow2", &this, "1M"]);
    }
    s.assert_same(&["info", "--output=json", "l300.qcow2"]);
    let out = s.ours(&["info", "--backing-chain", "l300.qcow2"]);
    assert_eq!(out.code, 1);
    assert_eq!(out.stderr, "qemu-img: Backing file chain deeper than 256 images at 'l44.qcow2'\n");
    s.assert_same(&["info", "--backing-chain", "--output=json", "l200.qcow2"]);
}

/// `discard` on a compat=0.10 overlay made the clusters unallocated, which
/// exposed the backing file's data; QEMU keeps the data (version 2 cannot
/// say "zeros"). The same through `io`, an NBD client's TRIM, and after
/// `write -z -u`.
#[test]
fn discard_on_a_version_2_overlay_keeps_the_data() {
    let s = Scratch::new();
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "-o", "compat=0.10", "base.qcow2", "1M"]);
    s.qemu_io("qcow2", "base.qcow2", &["write -P 1 0 1M"]);
    let overlay = |name: &str| {
        s.qemu_ok(&["create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "base.qcow2", "-F", "qcow2", name]);
        s.qemu_io("qcow2", name, &["write -P 2 0 256k"]);
    };
    overlay("q.qcow2");
    overlay("o.qcow2");
    overlay("nbd.qcow2");
    let cmds = ["-c", "discard 0 128k", "-c", "write -z -u 128k 64k", "-c", "read -P 2 0 128k"];
    let q = Command::new("qemu-io").args(cmds).arg("q.qcow2").current_dir(s.dir.path()).output().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_oxqcow"))
        .arg("io")
        .args(cmds)
        .arg("o.qcow2")
        .current_dir(s.dir.path())
        .output()
        .unwrap();
    assert!(q.status.success() && o.status.success());
    assert!(!String::from_utf8_lossy(&o.stdout).contains("fail"), "{}", String::from_utf8_lossy(&o.stdout));
    assert_eq!(std::fs::read(s.path("o.qcow2")).unwrap(), std::fs::read(s.path("q.qcow2")).unwrap());

    let sock = s.path("nbd.sock");
    let mut server = Command::new(env!("CARGO_BIN_EXE_oxqcow"))
        .args(["serve", "-f", "qcow2", "-k"])
        .arg(&sock)
        .arg(s.path("nbd.qcow2"))
        .spawn()
        .unwrap();
    for _ in 0..500 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "discard 0 128k", "-c", "read -P 2 0 128k", &uri])
        .output()
        .expect("qemu-io is required by this test");
    server.wait().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("fail"), "{}", String::from_utf8_lossy(&out.stdout));
    s.qemu_io("qcow2", "nbd.qcow2", &["read -P 2 0 256k", "read -P 1 256k 768k"]);
    s.assert_clean("nbd.qcow2");
}

/// One write into a compressed cluster that did not inflate poisoned a
/// whole export: every later write and flush on every connection failed,
/// the image got the corrupt bit, and a write acknowledged before was lost
/// at shutdown. Now only that request fails, as with qemu-nbd.
#[test]
fn unreadable_compressed_data_fails_only_its_nbd_request() {
    let s = Scratch::new();
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "img.qcow2", "1M"]);
    s.qemu_io("qcow2", "img.qcow2", &["write -c -P 1 0 64k"]);
    let mut bytes = std::fs::read(s.path("img.qcow2")).unwrap();
    let word = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l2 = (word(&bytes, 0x30000) & 0x00ff_ffff_ffff_fe00) as usize;
    assert_ne!(word(&bytes, l2) & 1 << 62, 0, "guest cluster 0 is compressed");
    let host = (word(&bytes, l2) & ((1 << 54) - 1)) as usize;
    let end = bytes.len().min(host + 512);
    bytes[host..end].fill(0xff);
    std::fs::write(s.path("img.qcow2"), bytes).unwrap();

    let sock = s.path("nbd.sock");
    let mut server = Command::new(env!("CARGO_BIN_EXE_oxqcow"))
        .args(["serve", "-t", "-f", "qcow2", "-k"])
        .arg(&sock)
        .arg(s.path("img.qcow2"))
        .spawn()
        .unwrap();
    for _ in 0..500 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let cmds = ["-c", "write -P 3 256k 4k", "-c", "write -P 4 512 512", "-c", "write -P 5 320k 4k", "-c", "flush"];
    let out = Command::new("qemu-io").args(["-f", "raw"]).args(cmds).arg(&uri).output().expect("qemu-io is required");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("wrote 4096/4096 bytes at offset 262144"), "{text}");
    assert!(text.contains("write failed: Input/output error"), "{text}");
    assert!(text.contains("wrote 4096/4096 bytes at offset 327680"), "{text}");
    assert!(!text.contains("flush failed"), "{text}");
    // Acknowledged and not flushed by the client: the server's close keeps it.
    let out = Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 6 384k 4k", &uri]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = Command::new("kill").arg(server.id().to_string()).status();
    server.wait().unwrap();

    assert!(s.qemu_ok(&["info", "img.qcow2"]).stdout.contains("corrupt: false"));
    s.assert_clean("img.qcow2");
    s.qemu_io("qcow2", "img.qcow2", &["read -P 3 256k 4k", "read -P 5 320k 4k", "read -P 6 384k 4k"]);
}
