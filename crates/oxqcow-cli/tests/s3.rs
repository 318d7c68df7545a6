//! Objects in S3 as images, against a real radosgw: a single-node Ceph
//! cluster started once for this test binary by the project's
//! `scripts/ceph-cluster.sh` (and stopped by a watcher when the binary
//! exits). QEMU has no S3 driver, so qemu-img judges what oxqcow wrote
//! after oxqcow downloads it byte for byte (`convert -f raw -O raw`).
//! Each test uses its own bucket, made by a small SigV4-signed request
//! (`Cluster::request`), which also lists a bucket's unfinished multipart
//! uploads (`object_store` does neither).

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::sync::{Arc, Mutex};

use common::{Out, Scratch};
use oxqcow::storage::{ObjectOptions, ObjectStorage};
use oxqcow::Storage;

/// The cluster's S3 endpoint and user.
struct Cluster {
    endpoint: String,
    region: String,
    access_key: String,
    secret_key: String,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/ceph-cluster.sh")
}

/// The cluster, started on first use; a watcher outside this process
/// stops it and removes its directory once the test binary has exited.
fn cluster() -> &'static Cluster {
    static C: OnceLock<Cluster> = OnceLock::new();
    C.get_or_init(|| {
        // A start can lose a race for the random ports it picks (other
        // clusters run on this machine): one more try before failing.
        let mut failures = String::new();
        let mut attempts = 0;
        let (dir, out) = loop {
            attempts += 1;
            let dir = tempfile::Builder::new().prefix("oxqcow-ceph-").tempdir().unwrap().keep();
            let out = Command::new("bash").arg(script()).arg("start").arg(&dir).output().unwrap();
            if out.status.success() {
                break (dir, out);
            }
            let _ = Command::new("bash").arg(script()).arg("stop").arg(&dir).status();
            let _ = std::fs::remove_dir_all(&dir);
            failures += &format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(
                attempts < 2,
                "scripts/ceph-cluster.sh could not start a cluster, twice (it needs Debian's ceph-mon, \
                 ceph-osd, ceph-mgr, radosgw and ceph-common): {failures}"
            );
        };
        let watch = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; bash '{script}' stop '{dir}'; rm -rf '{dir}'",
            pid = std::process::id(),
            script = script().display(),
            dir = dir.display()
        );
        // `setsid -f` leaves the watcher in its own session, outside the
        // test harness's process group, and returns at once.
        let watcher = Command::new("setsid")
            .args(["-f", "bash", "-c", &watch])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        assert!(matches!(watcher, Ok(s) if s.success()), "starting the cluster's watcher: {watcher:?}");
        let env = String::from_utf8_lossy(&out.stdout).into_owned();
        let get = |name: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("{name} missing from the cluster's env: {env}"))
                .to_string()
        };
        Cluster {
            endpoint: get("S3_ENDPOINT"),
            region: get("S3_REGION"),
            access_key: get("S3_ACCESS_KEY"),
            secret_key: get("S3_SECRET_KEY"),
        }
    })
}

impl Cluster {
    /// The environment the AWS tools read, pointing at this cluster.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_REGION", self.region.clone()),
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }

    /// A request to radosgw signed with AWS Signature Version 4 (no body,
    /// `UNSIGNED-PAYLOAD`), over a plain TCP connection: the HTTP status
    /// and the rest of the answer. `target` is a path with an optional
    /// query of `name=value` pairs in canonical order.
    fn request(&self, method: &str, target: &str) -> (u16, String) {
        let host = self.endpoint.strip_prefix("http://").expect("an http endpoint");
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let now = jiff::Timestamp::now();
        let stamp = now.strftime("%Y%m%dT%H%M%SZ").to_string();
        let day = &stamp[..8];
        let scope = format!("{day}/{}/s3/aws4_request", self.region);
        let signed_headers = "host;x-amz-content-sha256;x-amz-date";
        let canonical = format!(
            "{method}\n{path}\n{query}\nhost:{host}\nx-amz-content-sha256:UNSIGNED-PAYLOAD\n\
             x-amz-date:{stamp}\n\n{signed_headers}\nUNSIGNED-PAYLOAD"
        );
        let to_sign = format!("AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{}", hex(&sha256(canonical.as_bytes())));
        let mut key = hmac(format!("AWS4{}", self.secret_key).as_bytes(), day.as_bytes());
        for part in [self.region.as_str(), "s3", "aws4_request"] {
            key = hmac(&key, part.as_bytes());
        }
        let signature = hex(&hmac(&key, to_sign.as_bytes()));
        let mut conn = TcpStream::connect(host).unwrap();
        write!(
            conn,
            "{method} {target} HTTP/1.1\r\nHost: {host}\r\nx-amz-content-sha256: UNSIGNED-PAYLOAD\r\n\
             x-amz-date: {stamp}\r\nAuthorization: AWS4-HMAC-SHA256 Credential={}/{scope}, \
             SignedHeaders={signed_headers}, Signature={signature}\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n",
            self.access_key
        )
        .unwrap();
        let mut answer = String::new();
        conn.read_to_string(&mut answer).unwrap();
        let status = answer.split(' ').nth(1).and_then(|s| s.parse().ok());
        (status.unwrap_or_else(|| panic!("{method} {target}: {answer}")), answer)
    }

    /// Makes a new bucket for one test.
    fn bucket(&self, name: &str) -> String {
        let (code, body) = self.request("PUT", &format!("/{name}"));
        assert_eq!(code, 200, "creating bucket {name}: {body}");
        name.to_string()
    }

    /// Whether `key` exists in `bucket`.
    fn exists(&self, bucket: &str, key: &str) -> bool {
        let (code, body) = self.request("HEAD", &format!("/{bucket}/{key}"));
        assert!(code == 200 || code == 404, "HEAD {bucket}/{key}: {code} {body}");
        code == 200
    }

    /// The unfinished multipart uploads of `bucket` (their `<Upload>`
    /// entries).
    fn pending_uploads(&self, bucket: &str) -> usize {
        let (code, body) = self.request("GET", &format!("/{bucket}?uploads="));
        assert_eq!(code, 200, "listing uploads of {bucket}: {body}");
        body.matches("<Upload>").count()
    }
}

/// Runs oxqcow in the scratch directory with `env` added.
fn ox_env(s: &Scratch, env: &[(&str, String)], args: &[&str]) -> Out {
    let o = Command::new(env!("CARGO_BIN_EXE_oxqcow"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .current_dir(s.dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// Runs oxqcow against the cluster.
fn ox(s: &Scratch, args: &[&str]) -> Out {
    ox_env(s, &cluster().env(), args)
}

fn ox_ok(s: &Scratch, args: &[&str]) -> Out {
    let o = ox(s, args);
    assert_eq!(o.code, 0, "oxqcow {args:?}: {o:?}");
    o
}

/// A 64 MiB qcow2 image with data in several places (some of it past the
/// first 8 MiB upload part), written by qemu-io.
fn make_source(s: &Scratch) -> String {
    s.qemu_ok(&["create", "-f", "qcow2", "src.qcow2", "64M"]);
    s.qemu_io(
        "qcow2",
        "src.qcow2",
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 9M 3M",
            "write -P 0x33 40M 64k",
            "write -z 41M 1M",
            "write -P 0x44 63M 1M",
        ],
    );
    "src.qcow2".into()
}

// The object written by convert is the image: qemu-img finds the
// downloaded copy clean and identical to the source, for qcow2 (a single
// part) and raw (a multipart upload of several parts).
#[test]
fn convert_writes_objects_qemu_img_accepts_and_reads_them_back() {
    let s = Scratch::new();
    let c = cluster();
    let b = c.bucket("convert");
    let src = make_source(&s);
    for (fmt, key) in [("qcow2", "disk.qcow2"), ("raw", "disk.raw")] {
        let url = format!("s3://{b}/{key}");
        ox_ok(&s, &["convert", "-O", fmt, &src, &url]);
        assert!(c.exists(&b, key));
        // The object's bytes, downloaded.
        let copy = format!("copy-{key}");
        ox_ok(&s, &["convert", "-f", "raw", "-O", "raw", &url, &copy]);
        if fmt == "qcow2" {
            s.assert_clean(&copy);
        } else {
            assert_eq!(std::fs::metadata(s.path(&copy)).unwrap().len(), 64 << 20);
        }
        s.assert_identical(&src, &copy);
        // And through the format: converted back to a local qcow2.
        let back = format!("back-{key}.qcow2");
        ox_ok(&s, &["convert", "-f", fmt, "-O", "qcow2", &url, &back]);
        s.assert_clean(&back);
        s.assert_identical(&src, &back);
    }
    assert_eq!(c.pending_uploads(&b), 0);
}

/// A 160 MiB raw image: each MiB noise, text or a hole, by turns.
fn make_big_source(s: &Scratch) -> String {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(s.path("big.raw")).unwrap();
    f.set_len(160 << 20).unwrap();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for mib in 0..160u64 {
        let chunk: Vec<u8> = match mib % 5 {
            0 => continue,
            1 | 3 => (0..1 << 20)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect(),
            _ => format!("line {mib} of some text that compresses well\n").into_bytes().repeat(32 << 10)[..1 << 20]
                .to_vec(),
        };
        f.write_all_at(&chunk, mib << 20).unwrap();
    }
    "big.raw".into()
}

/// The most disk space the process `pid`'s deleted files (its scratch
/// file) take while it runs, and how many times it was looked at.
fn watch_scratch(child: &mut std::process::Child) -> (u64, usize) {
    use std::os::unix::fs::MetadataExt;
    let (mut most, mut looks) = (0u64, 0usize);
    let fds = format!("/proc/{}/fd", child.id());
    while child.try_wait().unwrap().is_none() {
        if let Ok(entries) = std::fs::read_dir(&fds) {
            looks += 1;
            for e in entries.flatten() {
                let deleted = std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().ends_with("(deleted)"));
                if let (true, Ok(m)) = (deleted, std::fs::metadata(e.path())) {
                    most = most.max(m.blocks() * 512);
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    (most, looks)
}

// `convert` streams a new object: the parts go up while the image is
// written, so the scratch file holds the head and a few parts, never the
// image (watched through /proc while a rate-limited convert runs). For
// qcow2 (its tables laid out before the data: plain, compressed, 4 KiB
// clusters, zeros written as data) and raw, what arrives is the image: qemu-img finds it clean
// and identical to the source.
#[test]
fn convert_streams_objects_instead_of_staging_them() {
    let s = Scratch::new();
    let c = cluster();
    let b = c.bucket("streamed");
    let src = make_big_source(&s);
    let cases: [(&str, &[&str]); 5] = [
        ("disk.qcow2", &["-O", "qcow2"]),
        ("small.qcow2", &["-O", "qcow2", "-o", "cluster_size=4k", "-m", "4", "-W"]),
        ("packed.qcow2", &["-O", "qcow2", "-c"]),
        // Zeros written as data: every cluster is allocated (with 4 KiB
        // clusters a refcount block covers 8 MiB, so the holes count).
        ("full.qcow2", &["-O", "qcow2", "-o", "cluster_size=4k", "-S", "0"]),
        ("disk.raw", &["-O", "raw"]),
    ];
    for (key, opts) in cases {
        let url = format!("s3://{b}/{key}");
        let mut child = Command::new(env!("CARGO_BIN_EXE_oxqcow"))
            .arg("convert")
            .args(["-f", "raw", "-r", "48M"])
            .args(opts)
            .args([src.as_str(), url.as_str()])
            .envs(c.env())
            .current_dir(s.dir.path())
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (most, looks) = watch_scratch(&mut child);
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "convert {opts:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(looks >= 10, "{key}: the convert was watched only {looks} times");
        assert!(most > 0, "{key}: no scratch file seen");
        assert!(most <= 48 << 20, "{key}: the scratch file took {most} bytes of a 160 MiB image");
        let copy = format!("copy-{key}");
        ox_ok(&s, &["convert", "-f", "raw", "-O", "raw", &url, &copy]);
        if key.ends_with(".qcow2") {
            s.assert_clean(&copy);
        }
        s.assert_identical(&src, &copy);
        std::fs::remove_file(s.path(&copy)).unwrap();
        let (code, body) = c.request("DELETE", &format!("/{b}/{key}"));
        assert_eq!(code, 204, "deleting {key}: {body}");
    }
    assert_eq!(c.pending_uploads(&b), 0);
}

// Every reading command takes an object: what it prints is what it
// prints for the same bytes in a local file (the downloaded copy).
#[test]
fn reading_commands_read_objects() {
    let s = Scratch::new();
    let c = cluster();
    let b = c.bucket("reading");
    let src = make_source(&s);
    let url = format!("s3://{b}/disk.qcow2");
    ox_ok(&s, &["convert", "-c", "-O", "qcow2", &src, &url]);
    ox_ok(&s, &["convert", "-f", "raw", "-O", "raw", &url, "copy.qcow2"]);
    for args in [
        vec!["map", "--output=json"],
        vec!["map"],
        vec!["check"],
        vec!["measure", "-O", "qcow2"],
        vec!["compare", "src.qcow2"],
    ] {
        let on = |name: &str| {
            let mut a = args.clone();
            a.insert(if args[0] == "compare" { 1 } else { args.len() }, name);
            ox(&s, &a)
        };
        let remote = on(&url);
        let local = on("copy.qcow2");
        assert_eq!(remote.code, local.code, "{args:?}: {remote:?} / {local:?}");
        assert_eq!(remote.stdout.replace(&url, "copy.qcow2"), local.stdout, "{args:?}");
    }
    let info = ox_ok(&s, &["info", &url]);
    assert!(info.stdout.contains("file format: qcow2"), "{info:?}");
    assert!(info.stdout.contains("virtual size: 64 MiB (67108864 bytes)"), "{info:?}");
    // io reads the patterns qemu-io wrote; dd copies.
    let io = ox_ok(&s, &["io", "-r", "-c", "read -P 0x22 9M 3M", "-c", "read -P 0x44 63M 1M", &url]);
    assert!(!io.stdout.contains("fail") && !io.stderr.contains("fail"), "{io:?}");
    ox_ok(&s, &["dd", "-O", "raw", &format!("if={url}"), "of=dd.raw", "bs=1M"]);
    s.assert_identical(&src, "dd.raw");
    // serve -r exports it; qemu-img reads the export (its one client: the
    // server then exits).
    let sock = s.path("nbd.sock");
    let mut server = Command::new(env!("CARGO_BIN_EXE_oxqcow"))
        .args(["serve", "-r", "-k"])
        .arg(&sock)
        .arg(&url)
        .envs(c.env())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..300 {
        if sock.exists() || server.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let export = format!("nbd+unix:///?socket={}", sock.display());
    let o = s.qemu(&["compare", "-f", "qcow2", "-F", "raw", &src, &export]);
    let _ = server.kill();
    server.wait().unwrap();
    assert_eq!(o.stdout, "Images are identical.\n", "{o:?}");
    // The same object as a node with options: `--image-opts` and `json:`,
    // the endpoint and credentials given there instead of the environment.
    let opts = format!(
        "driver=qcow2,file.driver=s3,file.url={url},file.endpoint={},file.access_key_id={},\
         file.secret_access_key={},file.region={},file.allow_http=true,file.readahead=64k",
        c.endpoint, c.access_key, c.secret_key, c.region
    );
    let o = ox_env(&s, &[], &["compare", "--image-opts", &opts, "driver=qcow2,file.filename=copy.qcow2"]);
    assert_eq!(o.stdout, "Images are identical.\n", "{o:?}");
    let json = format!(
        r#"json:{{"driver":"raw","file":{{"driver":"s3","url":"{url}","endpoint":"{}","access_key_id":"{}","secret_access_key":"{}","allow_http":"true"}}}}"#,
        c.endpoint, c.access_key, c.secret_key
    );
    ox_env(&s, &[], &["convert", "-O", "raw", &json, "json.qcow2"]);
    s.assert_identical(&src, "json.qcow2");
}

// Guards against silent failures and hangs: each way of failing to reach
// an object is reported in a few clear words, and nothing is left behind.
#[test]
fn unreachable_objects_fail_with_clear_messages() {
    let s = Scratch::new();
    let c = cluster();
    let b = c.bucket("errors");
    let src = make_source(&s);
    let url = format!("s3://{b}/disk.qcow2");
    ox_ok(&s, &["convert", "-O", "qcow2", &src, &url]);
    let missing = format!("s3://{b}/missing.qcow2");
    let o = ox(&s, &["info", &missing]);
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains(&format!("Could not open '{missing}': {missing}: no such object")), "{o:?}");
    let o = ox(&s, &["info", "s3://no-such-bucket/disk.qcow2"]);
    assert!(o.stderr.contains("no such object"), "{o:?}");
    // Wrong credentials, for reading and for writing.
    let mut wrong = c.env();
    wrong[3].1 = "not-the-secret".into();
    let o = ox_env(&s, &wrong, &["info", &url]);
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("access denied") || o.stderr.contains("credentials were refused"), "{o:?}");
    let target = format!("s3://{b}/denied.qcow2");
    let o = ox_env(&s, &wrong, &["convert", "-O", "qcow2", &src, &target]);
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains(&format!("Could not create '{target}'")), "{o:?}");
    assert!(!c.exists(&b, "denied.qcow2"));
    // A refused connection: a port nothing listens on.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut refused = c.env();
    refused[0].1 = format!("http://127.0.0.1:{port}");
    let o = ox_env(&s, &refused, &["info", &url]);
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("Could not open") && o.stderr.contains("error sending request"), "{o:?}");
    let o = ox_env(&s, &refused, &["convert", "-O", "raw", &src, &target]);
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains(&format!("Could not create '{target}'")), "{o:?}");
    // A server that never answers (the kernel completes the connections
    // into the listener's backlog, nobody reads them): requests time out.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let opts = format!(
        "driver=s3,url={url},endpoint=http://127.0.0.1:{port},allow_http=true,timeout=1,access_key_id=a,secret_access_key=b"
    );
    let o = ox_env(&s, &[], &["info", "--image-opts", &opts]);
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("timed out") || o.stderr.contains("timeout"), "{o:?}");
    drop(silent);
    assert_eq!(c.pending_uploads(&b), 0);
}

// Objects cannot be rewritten in place: every write but convert's new
// object is refused, saying so, and the object is left as it was.
#[test]
fn writes_to_objects_are_refused() {
    let s = Scratch::new();
    let c = cluster();
    let b = c.bucket("refused");
    let src = make_source(&s);
    let url = format!("s3://{b}/disk.qcow2");
    ox_ok(&s, &["convert", "-O", "qcow2", &src, &url]);
    let of = format!("of={url}");
    let sock = s.path("unused.sock").to_string_lossy().into_owned();
    let refusals: Vec<Vec<&str>> = vec![
        vec!["io", "-c", "write 0 512", &url],
        vec!["create", "-f", "qcow2", &url, "1M"],
        vec!["resize", &url, "128M"],
        vec!["snapshot", "-c", "s1", &url],
        vec!["amend", "-o", "lazy_refcounts=on", &url],
        vec!["check", "-r", "all", &url],
        vec!["convert", "-n", "-O", "qcow2", &src, &url],
        vec!["dd", "-O", "raw", "if=src.qcow2", &of],
        vec!["serve", "-k", &sock, &url],
    ];
    for args in refusals {
        let o = ox(&s, &args);
        assert_ne!(o.code, 0, "{args:?}: {o:?}");
        assert!(o.stderr.contains("cannot be rewritten in place"), "{args:?}: {o:?}");
    }
    ox_ok(&s, &["convert", "-f", "raw", "-O", "raw", &url, "copy.qcow2"]);
    s.assert_clean("copy.qcow2");
    s.assert_identical(&src, "copy.qcow2");
}

// Guards against mixing two versions of an object: every range request
// is pinned to the ETag seen when the object was opened.
#[test]
fn an_object_replaced_during_a_read_fails_the_read() {
    let s = Scratch::new();
    let c = cluster();
    let b = c.bucket("replaced");
    let src = make_source(&s);
    let url = format!("s3://{b}/disk.raw");
    ox_ok(&s, &["convert", "-O", "raw", &src, &url]);
    let mut opts = ObjectOptions::from_url(&url);
    for (k, v) in [
        ("endpoint", c.endpoint.as_str()),
        ("region", c.region.as_str()),
        ("access_key_id", c.access_key.as_str()),
        ("secret_access_key", c.secret_key.as_str()),
        ("allow_http", "true"),
    ] {
        opts.apply(k, v).unwrap();
    }
    let storage = ObjectStorage::open(&opts).unwrap();
    let mut buf = vec![0u8; 4096];
    storage.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x11));
    // Replaced by other bytes of the same length.
    s.qemu_io("qcow2", "src.qcow2", &["write -P 0x55 9M 1M"]);
    ox_ok(&s, &["convert", "-O", "raw", &src, &url]);
    let err = storage.read_at(&mut buf, 9 << 20).expect_err("a read of the replaced object succeeded");
    assert!(err.to_string().contains(&format!("{url} changed since it was opened")), "{err}");
    // Parallel range reads fail the same way.
    let mut big = vec![0u8; 4 << 20];
    let err = storage.read_at(&mut big, 8 << 20).expect_err("a large read of the replaced object succeeded");
    assert!(err.to_string().contains("changed since it was opened"), "{err}");
    // Deleted.
    let storage = ObjectStorage::open(&opts).unwrap();
    storage.read_at(&mut buf, 0).unwrap();
    assert_eq!(c.request("DELETE", &format!("/{b}/disk.raw")).0, 204);
    let err = storage.read_at(&mut buf, 20 << 20).expect_err("a read of the deleted object succeeded");
    assert!(err.to_string().contains("changed since it was opened (404 Not Found)"), "{err}");
}

// Nothing half-written: a convert that fails midway (a source that
// cannot be read past its first clusters) leaves no object at a new key,
// the old object at an existing one, and no unfinished upload.
#[test]
fn a_convert_that_fails_midway_leaves_nothing() {
    let s = Scratch::new();
    let c = cluster();
    let b = c.bucket("midway");
    let src = make_source(&s);
    s.qemu_ok(&["convert", "-O", "qcow2", &src, "broken.qcow2"]);
    break_l2_entry(&s.path("broken.qcow2"), 40 << 20);
    let fresh = format!("s3://{b}/fresh.raw");
    let o = ox(&s, &["convert", "-O", "raw", "broken.qcow2", &fresh]);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.stderr.contains("error while reading"), "{o:?}");
    assert!(!c.exists(&b, "fresh.raw"));
    let old = format!("s3://{b}/old.raw");
    ox_ok(&s, &["convert", "-O", "raw", &src, &old]);
    let o = ox(&s, &["convert", "-O", "raw", "broken.qcow2", &old]);
    assert_eq!(o.code, 1, "{o:?}");
    ox_ok(&s, &["convert", "-f", "raw", "-O", "raw", &old, "old.raw"]);
    s.assert_identical(&src, "old.raw");
    assert_eq!(c.pending_uploads(&b), 0);
}

/// Sets a reserved bit in the L2 entry of the cluster at `guest` of a
/// qcow2 image with 64 KiB clusters, so that reading it fails.
fn break_l2_entry(path: &Path, guest: u64) {
    let bytes = std::fs::read(path).unwrap();
    let be = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
    let l1 = be(40) as usize;
    let l2 = (be(l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let entry = l2 + 8 * ((guest >> 16) as usize % 8192);
    assert_ne!(be(entry), 0, "the cluster at {guest} is not allocated");
    common::patch(path, entry as u64, &(be(entry) | 0x2).to_be_bytes());
}

/// A TCP relay to radosgw that goes away for good once `budget` bytes
/// went through it in the watched direction (`to_server` or back): its
/// connections are cut and new ones refused, as a server that stops
/// mid-transfer. Returns its port.
fn vanishing_relay(server: &str, budget: u64, to_server: bool) -> u16 {
    let server = server.strip_prefix("http://").unwrap().to_string();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let moved = Arc::new(AtomicU64::new(0));
    let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { break };
            if moved.load(Ordering::SeqCst) >= budget {
                // Gone: the listener closes with this thread.
                break;
            }
            let Ok(upstream) = TcpStream::connect(&server) else { break };
            conns.lock().unwrap().extend([client.try_clone().unwrap(), upstream.try_clone().unwrap()]);
            for (from, to, watched) in [
                (client.try_clone().unwrap(), upstream.try_clone().unwrap(), to_server),
                (upstream, client, !to_server),
            ] {
                let (moved, conns) = (moved.clone(), conns.clone());
                std::thread::spawn(move || pump(from, to, watched.then_some((&*moved, budget)), &conns));
            }
        }
    });
    port
}

/// Copies `from` into `to` until either ends; a watched direction counts
/// its bytes and cuts every connection when the budget is spent.
fn pump(mut from: TcpStream, mut to: TcpStream, watch: Option<(&AtomicU64, u64)>, conns: &Mutex<Vec<TcpStream>>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some((moved, budget)) = watch {
            if moved.fetch_add(n as u64, Ordering::SeqCst) + n as u64 >= budget {
                for c in conns.lock().unwrap().iter() {
                    let _ = c.shutdown(Shutdown::Both);
                }
                break;
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

// Nothing half-written when the server goes away mid-convert: reading
// the source from it fails the convert and the new object's upload (to
// a server still there) is aborted; a server lost while the parts go up
// leaves no object at the key either.
#[test]
fn a_server_that_goes_away_mid_convert_leaves_no_object() {
    let s = Scratch::new();
    let c = cluster();
    let b = c.bucket("vanishing");
    let src = make_source(&s);
    let url = format!("s3://{b}/disk.raw");
    ox_ok(&s, &["convert", "-O", "raw", &src, &url]);
    // The source through a relay that dies after 5 MiB of answers.
    let port = vanishing_relay(&c.endpoint, 5 << 20, false);
    let opts = format!("driver=raw,file.driver=s3,file.url={url},file.endpoint=http://127.0.0.1:{port}");
    let target = format!("s3://{b}/copy.qcow2");
    let o = ox(&s, &["convert", "--image-opts", &opts, "-O", "qcow2", &target]);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.stderr.contains("error while reading"), "{o:?}");
    assert!(!c.exists(&b, "copy.qcow2"));
    assert_eq!(c.pending_uploads(&b), 0);
    // The target's server lost after 20 MiB of parts went up: the object
    // never appears (the abort cannot reach the server either: the
    // unfinished upload stays there until the bucket's lifecycle rules
    // or an operator remove it). Also guards against SIGPIPE, whose
    // default action the CLI restores, killing the process from a write
    // to a closed connection (it did in about one run of three, hence
    // three runs).
    for attempt in 0..3 {
        let port = vanishing_relay(&c.endpoint, 20 << 20, true);
        let mut env = c.env();
        env[0].1 = format!("http://127.0.0.1:{port}");
        let key = format!("lost{attempt}.raw");
        let o = ox_env(&s, &env, &["convert", "-O", "raw", &src, &format!("s3://{b}/{key}")]);
        assert_eq!(o.code, 1, "{o:?}");
        assert!(o.stderr.contains("error while uploading"), "{o:?}");
        assert!(!c.exists(&b, &key));
    }
}

fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

/// HMAC-SHA256 (RFC 2104).
fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&sha256(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = sha256(&[pad(0x36), msg.to_vec()].concat());
    sha256(&[pad(0x5c), inner.to_vec()].concat())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn hmac_matches_rfc_4231() {
    // RFC 4231, test case 2: the signing above rests on it.
    assert_eq!(
        hex(&hmac(b"Jefe", b"what do ya want for nothing?")),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
}
