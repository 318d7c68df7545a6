//! HTTP(S) objects as images (QEMU's curl driver, read only), served by a
//! real nginx that each test starts on 127.0.0.1 with its own
//! configuration: byte ranges on, off (`max_ranges 0`), without
//! validators, behind basic authentication, throttled, and over TLS with
//! a certificate made here. qemu-img's curl driver (qemu-block-extra, run
//! with `-m 1`) is the oracle for outputs and messages.

mod common;
mod nginx;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use common::{Out, Scratch};
use nginx::{free_port, Nginx};
use oxqcow::storage::{HttpOptions, HttpStorage};
use oxqcow::Storage;

/// A qcow2 image with data in two places, made by qemu-img and qemu-io.
fn make_image(s: &Scratch, name: &str) -> PathBuf {
    s.qemu_ok(&["create", "-q", "-f", "qcow2", name, "64M"]);
    s.qemu_io("qcow2", name, &["write -P 0x5a 0 3M", "write -P 0x11 10M 1M", "write -z 20M 64k"]);
    s.path(name)
}

/// An image placed in nginx's document root.
fn served_image(s: &Scratch, web: &Nginx) -> PathBuf {
    let local = make_image(s, "a.qcow2");
    std::fs::copy(&local, web.www("a.qcow2")).unwrap();
    local
}

/// curl's connection messages carry the milliseconds they took.
fn without_timings(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find(" after ") {
        out.push_str(&rest[..at + 7]);
        rest = &rest[at + 7..];
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        out.push('N');
        rest = &rest[digits..];
    }
    out.push_str(rest);
    out
}

fn assert_same(s: &Scratch, args: &[&str]) -> Out {
    let (ours, theirs) = (s.ours(args), s.qemu(args));
    assert_eq!(
        (ours.code, &ours.stdout, without_timings(&ours.stderr)),
        (theirs.code, &theirs.stdout, without_timings(&theirs.stderr)),
        "{args:?}"
    );
    ours
}

#[test]
fn reading_commands_print_what_qemu_img_prints() {
    let s = Scratch::new();
    let web = Nginx::start();
    let local = served_image(&s, &web);
    let url = web.url("a.qcow2");
    let local = local.to_str().unwrap();
    for args in [
        vec!["info", url.as_str()],
        vec!["info", "--output=json", &url],
        vec!["info", "-f", "raw", &url],
        vec!["map", "--output=json", &url],
        vec!["map", &url],
        vec!["check", &url],
        vec!["compare", local, &url],
        vec!["compare", "-s", &url, local],
        vec!["measure", "-O", "qcow2", &url],
    ] {
        assert_same(&s, &args);
    }
    let opts = format!("driver=qcow2,file.driver=http,file.url={url},file.readahead=64k,file.timeout=30");
    assert_same(&s, &["map", "--output=json", "--image-opts", &opts]);
    assert_same(&s, &["info", "--image-opts", &format!("driver=http,url={url}")]);
    let json = format!(r#"json:{{"driver":"qcow2","file":{{"driver":"http","url":"{url}"}}}}"#);
    assert_same(&s, &["info", &json]);
    assert_same(&s, &["compare", local, &json]);
    // Options that change what is read name the image by a `json:` object
    // of them, in QEMU's member order; readahead and timeout do not.
    for spec in [
        format!("driver=qcow2,file.driver=http,file.url={url},file.readahead=64k,file.cookie=a=b,file.username=u"),
        format!("driver=http,url={url},sslverify=off,timeout=3"),
    ] {
        assert_same(&s, &["info", "--image-opts", &spec]);
        assert_same(&s, &["info", "--output=json", "--image-opts", &spec]);
    }
    let json = format!(r#"json:{{"file.driver":"http","file.url":"{url}","file.cookie":"a=b"}}"#);
    assert_same(&s, &["info", &json]);
}

// Also guards the block status of a qcow2 image on a file whose
// allocation is unknown: convert failed ("error while reading block
// status at offset 0: unsupported") before it counted as not preallocated.
#[test]
fn convert_and_dd_copy_the_same_bytes_as_qemu_img() {
    let s = Scratch::new();
    let web = Nginx::start();
    served_image(&s, &web);
    let url = web.url("a.qcow2");
    s.qemu_ok(&["convert", "-m", "1", "-O", "raw", &url, "theirs.raw"]);
    s.ours_ok(&["convert", "-O", "raw", &url, "ours.raw"]);
    s.assert_identical("ours.raw", "theirs.raw");
    // More parallel requests than qemu-img's driver can take.
    s.ours_ok(&["convert", "-m", "16", "-O", "qcow2", &url, "ours.qcow2"]);
    s.qemu_ok(&["compare", "ours.qcow2", "theirs.raw"]);
    // The object's own bytes, through the protocol node alone.
    s.ours_ok(&["convert", "-O", "raw", "--image-opts", &format!("driver=http,url={url}"), "bytes.raw"]);
    assert_eq!(std::fs::read(s.path("bytes.raw")).unwrap(), std::fs::read(web.www("a.qcow2")).unwrap());
    let (of1, of2) = (format!("of={}", s.path("dd1").display()), format!("of={}", s.path("dd2").display()));
    let ifu = format!("if={url}");
    s.qemu_ok(&["dd", "-O", "raw", "bs=64k", "count=200", &ifu, &of1]);
    s.ours_ok(&["dd", "-O", "raw", "bs=64k", "count=200", &ifu, &of2]);
    s.assert_identical("dd1", "dd2");
}

fn io(args: &[&str]) -> Out {
    let o = Command::new(common::oxqcow()).arg("io").args(args).output().unwrap();
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn qemu_io(args: &[&str]) -> Out {
    let o = Command::new("qemu-io").args(args).output().expect("qemu-io is required");
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// qemu-io's timing line differs from run to run.
fn without_rates(out: &str) -> String {
    out.lines().filter(|l| !l.contains("ops/sec")).collect::<Vec<_>>().join("\n")
}

#[test]
fn io_reads_and_writes_are_refused_as_qemu_refuses_them() {
    let s = Scratch::new();
    let web = Nginx::start();
    served_image(&s, &web);
    let url = web.url("a.qcow2");
    let args = ["-r", "-c", "read -P 0x5a 0 3M", "-c", "read -P 0x11 10M 1M", "-c", "read -P 0 20M 64k", &url];
    let (ours, theirs) = (io(&args), qemu_io(&args));
    assert_eq!((ours.code, without_rates(&ours.stdout)), (theirs.code, without_rates(&theirs.stdout)));
    assert!(ours.stdout.contains("read 1048576/1048576 bytes at offset 10485760"), "{ours:?}");
    // A read-write open: qemu-io's and qemu-img's words.
    let (ours, theirs) = (io(&["-c", "quit", &url]), qemu_io(&["-c", "quit", &url]));
    // (after the program name, which is the symlink's here)
    let message = |o: &Out| o.stderr.split_once(": ").map(|(_, m)| m.to_string());
    assert_eq!(message(&ours), message(&theirs));
    assert_ne!(ours.code, 0);
    for args in [vec!["resize", url.as_str(), "+1M"], vec!["snapshot", "-c", "s", &url], vec!["commit", &url]] {
        assert_same(&s, &args);
    }
}

#[test]
fn servers_without_byte_ranges_are_refused() {
    let s = Scratch::new();
    let web = Nginx::start();
    served_image(&s, &web);
    let out = assert_same(&s, &["info", &web.url("norange/a.qcow2")]);
    assert!(out.stderr.contains("Server does not support 'range' (byte ranges)."), "{out:?}");
}

/// A server that says it serves byte ranges and answers every range with
/// the whole object: a read of the whole object takes it, a read of a
/// part fails rather than read the wrong bytes.
#[test]
fn whole_object_answers_serve_only_whole_object_reads() {
    let s = Scratch::new();
    let web = Nginx::start();
    served_image(&s, &web);
    let expected = std::fs::read(web.www("a.qcow2")).unwrap();
    let storage = HttpStorage::open(&HttpOptions::from_url(&web.url("liar/a.qcow2"))).unwrap();
    let mut whole = vec![0u8; expected.len()];
    storage.read_at(&mut whole, 0).unwrap();
    assert!(whole == expected);
    let mut part = vec![0u8; 4096];
    let err = storage.read_at(&mut part, 8192).expect_err("a part read from a whole-object answer");
    assert_eq!(err.to_string(), "Server does not support 'range' (byte ranges).");
}

#[test]
fn open_errors_are_qemu_s() {
    let s = Scratch::new();
    let web = Nginx::start();
    served_image(&s, &web);
    let url = web.url("a.qcow2");
    let refused = format!("http://127.0.0.1:{}/a.qcow2", free_port());
    for args in [
        vec!["info".to_string(), web.url("missing.qcow2")],
        vec!["info".into(), refused],
        vec!["info".into(), web.url("auth/a.qcow2")],
        vec!["info".into(), "--image-opts".into(), format!("driver=http,url={url},readahead=1000")],
        vec!["info".into(), "--image-opts".into(), format!("driver=http,url={url},readahead=-1")],
        vec!["info".into(), "--image-opts".into(), format!("driver=http,url={url},timeout=100000")],
        vec!["info".into(), "--image-opts".into(), format!("driver=http,url={url},timeout=x")],
        vec!["info".into(), "--image-opts".into(), format!("driver=http,url={url},sslverify=maybe")],
        vec!["info".into(), "--image-opts".into(), format!("driver=https,url={url}")],
        vec!["info".into(), "--image-opts".into(), "driver=http,readahead=64k".into()],
        vec!["info".into(), "--image-opts".into(), format!("driver=http,url={url},bogus=1")],
        vec!["info".into(), "--image-opts".into(), format!("driver=http,url={url},cookie=a,cookie-secret=b")],
        vec!["info".into(), "--image-opts".into(), format!("driver=http,url={url},password-secret=nope")],
        vec!["convert".into(), "-O".into(), "raw".into(), "a.qcow2".into(), web.url("new.raw")],
        vec!["convert".into(), "-n".into(), "-O".into(), "qcow2".into(), "a.qcow2".into(), url.clone()],
        vec!["create".into(), "-f".into(), "qcow2".into(), web.url("new.qcow2"), "1M".into()],
        vec!["amend".into(), "-o".into(), "compat=0.10".into(), url.clone()],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = assert_same(&s, &args);
        assert_ne!(out.code, 0, "{args:?}");
    }
}

#[test]
fn credentials_come_from_secret_objects() {
    let s = Scratch::new();
    let web = Nginx::start();
    served_image(&s, &web);
    let url = web.url("auth/a.qcow2");
    for (password, works) in [("right", true), ("wrong", false)] {
        let object = format!("secret,id=pw,data={password}");
        let opts = format!("driver=qcow2,file.driver=http,file.url={url},file.username=user,file.password-secret=pw");
        let out = assert_same(&s, &["map", "--output=json", "--object", &object, "--image-opts", &opts]);
        assert_eq!(out.code == 0, works, "{out:?}");
        if !works {
            assert!(out.stderr.contains("The requested URL returned error: 401"), "{out:?}");
        }
    }
}

#[test]
fn cookies_are_sent_as_given_or_from_a_secret() {
    let s = Scratch::new();
    let web = Nginx::start();
    served_image(&s, &web);
    let url = web.url("cookie/a.qcow2");
    for (cookie, works) in
        [("file.cookie=session=s3cret", true), ("file.cookie-secret=c", true), ("file.cookie=session=x", false)]
    {
        let opts = format!("driver=qcow2,file.driver=http,file.url={url},{cookie}");
        let out = assert_same(
            &s,
            &["map", "--output=json", "--object", "secret,id=c,data=session=s3cret", "--image-opts", &opts],
        );
        assert_eq!(out.code == 0, works, "{cookie}: {out:?}");
    }
    assert!(assert_same(&s, &["info", &url]).stderr.contains("The requested URL returned error: 403"));
}

/// Rewrites a served file with other bytes and a later modification
/// time, as a new upload of the object would.
fn replace_object(path: &Path, mtime_shift: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    for b in bytes.iter_mut().skip(1 << 20).take(4096) {
        *b ^= 0xff;
    }
    std::fs::write(path, &bytes).unwrap();
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now() + Duration::from_secs(mtime_shift)).unwrap();
}

/// Runs `oxqcow io -r` on `name`, reading `first` before `change` runs and
/// `second` after it; returns what the second read printed.
fn read_across_a_change(name: &str, first: &str, second: &str, change: impl FnOnce()) -> String {
    let mut child = Command::new(common::oxqcow())
        .args(["io", "-r", "-f", "raw", name])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    writeln!(stdin, "{first}").unwrap();
    let mut line = String::new();
    loop {
        line.clear();
        assert_ne!(stdout.read_line(&mut line).unwrap(), 0, "io ended before the first read finished");
        if line.contains("bytes at offset") {
            break;
        }
    }
    change();
    writeln!(stdin, "{second}").unwrap();
    drop(stdin);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let out = child.wait_with_output().unwrap();
    rest + &String::from_utf8_lossy(&out.stderr)
}

/// The library's storage on `url`: `read` before `change` runs, `again`
/// after; the error of the second read.
fn storage_across_a_change(url: &str, read: u64, again: u64, change: impl FnOnce()) -> String {
    let storage = HttpStorage::open(&HttpOptions::from_url(url)).unwrap();
    let mut buf = vec![0u8; 4096];
    storage.read_at(&mut buf, read).unwrap();
    change();
    storage.read_at(&mut buf, again).expect_err("a read of the changed object succeeded").to_string()
}

// Guards against mixing two versions of an object: QEMU's curl driver
// reads whatever the server holds at each read.
#[test]
fn an_object_that_changes_between_reads_fails_the_read() {
    let s = Scratch::new();
    let web = Nginx::start();
    served_image(&s, &web);
    let path = web.www("a.qcow2");
    // Pinned by its ETag, then by Last-Modified alone; reads past the
    // readahead of the first.
    for location in ["", "noetag/"] {
        std::fs::copy(s.path("a.qcow2"), &path).unwrap();
        let url = web.url(&format!("{location}a.qcow2"));
        let err = storage_across_a_change(&url, 0, 1 << 20, || replace_object(&path, 100));
        assert!(err.contains("changed since it was opened (412 Precondition Failed)"), "{location}: {err}");
    }
    // Without validators, a shrunk object answers 416, a deleted one 404.
    let url = web.url("novalidator/a.qcow2");
    std::fs::copy(s.path("a.qcow2"), &path).unwrap();
    let err = storage_across_a_change(&url, 0, 4 << 20, || {
        std::fs::File::options().write(true).open(&path).unwrap().set_len(1 << 20).unwrap()
    });
    assert_eq!(err, "The requested URL returned error: 416");
    std::fs::copy(s.path("a.qcow2"), &path).unwrap();
    let err = storage_across_a_change(&url, 0, 4 << 20, || std::fs::remove_file(&path).unwrap());
    assert_eq!(err, "The requested URL returned error: 404");
    // The same object grown: its length in Content-Range differs.
    std::fs::copy(s.path("a.qcow2"), &path).unwrap();
    let err = storage_across_a_change(&url, 0, 2 << 20, || {
        std::fs::File::options().append(true).open(&path).unwrap().write_all(&[1; 4096]).unwrap()
    });
    assert!(err.contains("changed since it was opened (its length"), "{err}");
    // qemu-io's words for the failed read, as QEMU's for any curl failure.
    std::fs::copy(s.path("a.qcow2"), &path).unwrap();
    let out = read_across_a_change(&web.url("a.qcow2"), "read 0 4k", "read 1M 4k", || replace_object(&path, 200));
    assert!(out.contains("read failed: Input/output error"), "{out}");
    assert!(!out.contains("read 4096/4096 bytes at offset 1048576"), "{out}");
}

#[test]
fn slow_and_silent_servers_time_out() {
    let s = Scratch::new();
    let web = Nginx::start();
    served_image(&s, &web);
    // A throttled server: the HEAD request is answered, the data trickles.
    let opts = format!("driver=raw,file.driver=http,file.url={},file.timeout=1", web.url("slow/a.qcow2"));
    let out = io(&["-r", "--image-opts", "-c", "read 0 1M", &opts]);
    assert!(out.stderr.contains("Operation timed out after"), "{out:?}");
    assert!(!out.stdout.contains("read 1048576/1048576"), "{out:?}");
    // A peer that accepts and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = std::thread::spawn(move || silent.accept().map(|(conn, _)| conn));
    let opts = format!("driver=http,url=http://127.0.0.1:{port}/a.qcow2,timeout=1");
    let out = s.ours(&["info", "--image-opts", &opts]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("CURL: Error opening file: Operation timed out after"), "{out:?}");
    drop(held.join().unwrap());
}

#[test]
fn https_verifies_the_server_unless_told_not_to() {
    let s = Scratch::new();
    let web = Nginx::start();
    served_image(&s, &web);
    let url = web.tls_url("a.qcow2");
    // The system's CA bundle does not know the test's CA: curl's words.
    let out = assert_same(&s, &["info", &url]);
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("server certificate verification failed"), "{out:?}");
    // `SSL_CERT_FILE` names the CA to trust.
    let o = Command::new(common::oxqcow())
        .args(["convert", "-O", "raw", &url])
        .arg(s.path("trusted.raw"))
        .env("SSL_CERT_FILE", &web.ca_file)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // sslverify=off, against qemu-img's curl driver.
    let opts = format!("driver=qcow2,file.driver=https,file.url={url},file.sslverify=off");
    s.qemu_ok(&["convert", "-m", "1", "-O", "raw", "--image-opts", &opts, "theirs.raw"]);
    s.ours_ok(&["convert", "-O", "raw", "--image-opts", &opts, "ours.raw"]);
    s.assert_identical("ours.raw", "theirs.raw");
    s.assert_identical("trusted.raw", "theirs.raw");
    assert_same(&s, &["map", "--output=json", "--image-opts", &opts]);
}

#[test]
fn serve_exports_an_http_image_read_only() {
    let s = Scratch::new();
    let web = Nginx::start();
    served_image(&s, &web);
    let url = web.url("a.qcow2");
    let sock = s.path("nbd.sock");
    let mut server =
        Command::new(common::oxqcow()).args(["serve", "-r", "-t", "-k"]).arg(&sock).arg(&url).spawn().unwrap();
    for _ in 0..500 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let nbd = format!("nbd+unix:///?socket={}", sock.display());
    let copied = s.qemu(&["convert", "-f", "raw", "-O", "raw", &nbd, "served.raw"]);
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(copied.code, 0, "{copied:?}");
    s.qemu_ok(&["compare", "-f", "raw", "-F", "qcow2", "served.raw", "a.qcow2"]);
    // Without -r: the curl driver's refusal.
    let out = Command::new(common::oxqcow()).args(["serve", "-t", "-k"]).arg(s.path("rw.sock")).arg(&url).output();
    let out = out.unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("curl driver does not support writes"));
}

#[test]
fn mount_shows_an_http_image_read_only() {
    let s = Scratch::new();
    let web = Nginx::start();
    served_image(&s, &web);
    let url = web.url("a.qcow2");
    s.qemu_ok(&["convert", "-O", "raw", "a.qcow2", "expected.raw"]);
    let disk = s.path("disk");
    std::fs::write(&disk, b"").unwrap();
    let mut mount = Command::new(common::oxqcow()).args(["mount", "-r", &url]).arg(&disk).spawn().unwrap();
    let mut mounted = false;
    for _ in 0..500 {
        if std::fs::metadata(&disk).is_ok_and(|m| m.len() == 64 << 20) {
            mounted = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let same = mounted && std::fs::read(&disk).ok() == std::fs::read(s.path("expected.raw")).ok();
    let unmounted = Command::new("fusermount3").arg("-u").arg(&disk).status();
    let _ = mount.wait();
    assert!(mounted, "the FUSE mount did not appear (needs /dev/fuse and fusermount3)");
    assert!(unmounted.is_ok_and(|st| st.success()), "fusermount3 -u failed");
    assert!(same, "the mounted disk differs from the image");
    // Without -r: the curl driver's refusal.
    let out = Command::new(common::oxqcow()).args(["mount", &url]).arg(&disk).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("curl driver does not support writes"), "{out:?}");
}

/// Many threads reading ranges of every size at once (cached, fetched
/// with readahead, split into parallel requests) get the object's bytes:
/// QEMU's curl driver hangs now and then on parallel reads.
#[test]
fn concurrent_reads_of_every_size_get_the_object_s_bytes() {
    let s = Scratch::new();
    let web = Nginx::start();
    served_image(&s, &web);
    let expected = std::fs::read(web.www("a.qcow2")).unwrap();
    let storage = HttpStorage::open(&HttpOptions::from_url(&web.url("a.qcow2"))).unwrap();
    let len = expected.len() as u64;
    std::thread::scope(|scope| {
        for t in 0..8u64 {
            let (storage, expected) = (&storage, &expected);
            scope.spawn(move || {
                let mut rng = common::Rng::new(t + 1);
                for _ in 0..40 {
                    let size = [512, 4096, 65536, 300 << 10, 1 << 20, 3 << 20][rng.below(6) as usize];
                    let offset = rng.below(len + 4096) & !511;
                    let mut buf = vec![0xeeu8; size];
                    storage.read_at(&mut buf, offset).unwrap();
                    let inside = len.saturating_sub(offset).min(size as u64) as usize;
                    let at = offset.min(len) as usize;
                    assert_eq!(&buf[..inside], &expected[at..at + inside], "{size} bytes at {offset}");
                    assert!(buf[inside..].iter().all(|&b| b == 0), "past the end at {offset}");
                }
            });
        }
    });
}

#[test]
fn a_server_that_goes_away_fails_the_read() {
    let s = Scratch::new();
    let web = Nginx::start();
    served_image(&s, &web);
    let storage = HttpStorage::open(&HttpOptions::from_url(&web.url("a.qcow2"))).unwrap();
    let mut buf = vec![0u8; 4096];
    storage.read_at(&mut buf, 0).unwrap();
    drop(web);
    let err = storage.read_at(&mut buf, 2 << 20).expect_err("a read from a stopped server succeeded");
    assert!(!err.to_string().is_empty());
}
