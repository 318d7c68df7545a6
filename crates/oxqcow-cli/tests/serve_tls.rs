//! `oxqcow serve --tls-creds` with real TLS clients: libnbd's nbdinfo and
//! nbdcopy (`nbds+unix://`), QEMU's qemu-io and qemu-img with a
//! `tls-creds-x509` client object; plain clients refused; client
//! certificates checked (verify-peer); broken credential directories
//! refused at startup with qemu-nbd's messages (compared by running
//! qemu-nbd on the same directories).
//!
//! Certificates are made here with rcgen: a CA, a server certificate for
//! "localhost", client certificates (one revoked by a CRL), and a second
//! CA with a client certificate of its own. A test that needs a missing tool fails and
//! says which. Waits are bounded and fail loudly; nothing asserts on time.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SerialNumber,
};

mod external;
use external::{assert_clean, qemu_img, qemu_io, require, run, run_ok, wait_until, OXQCOW, WAIT};

/// A certificate authority that signs certificates for the tests.
struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca { params, key, pem }
    }

    /// A certificate and its key, for a server ("localhost") or a client.
    fn issue(&self, server: bool) -> (String, String) {
        self.issue_serial(server, None)
    }

    fn issue_serial(&self, server: bool, serial: Option<u64>) -> (String, String) {
        let names = if server { vec!["localhost".to_string()] } else { Vec::new() };
        let mut params = CertificateParams::new(names).unwrap();
        params.serial_number = serial.map(SerialNumber::from);
        params.distinguished_name.push(DnType::CommonName, if server { "localhost" } else { "client" });
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages =
            vec![if server { ExtendedKeyUsagePurpose::ServerAuth } else { ExtendedKeyUsagePurpose::ClientAuth }];
        let key = KeyPair::generate().unwrap();
        let issuer = Issuer::from_params(&self.params, &self.key);
        (params.signed_by(&key, &issuer).unwrap().pem(), key.serialize_pem())
    }

    /// A CRL revoking the certificate with serial number `serial`.
    fn crl(&self, serial: u64) -> String {
        let params = CertificateRevocationListParams {
            this_update: date_time_ymd(2020, 1, 1),
            next_update: date_time_ymd(4000, 1, 1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: vec![RevokedCertParams {
                serial_number: SerialNumber::from(serial),
                revocation_time: date_time_ymd(2021, 1, 1),
                reason_code: None,
                invalidity_date: None,
            }],
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params.signed_by(&Issuer::from_params(&self.params, &self.key)).unwrap().pem().unwrap()
    }
}

/// A scratch directory with credentials: `server/` (for oxqcow serve),
/// `client/` (a client the CA signed), `stranger/` (a client certificate
/// from another CA, with the right CA to check the server).
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("oxqcow test CA");
        let other = Ca::new("another CA");
        let write = |sub: &str, files: &[(&str, &str)]| {
            let d = dir.path().join(sub);
            std::fs::create_dir_all(&d).unwrap();
            for (name, text) in files {
                std::fs::write(d.join(name), text).unwrap();
            }
        };
        let (scert, skey) = ca.issue(true);
        write("server", &[("ca-cert.pem", &ca.pem), ("server-cert.pem", &scert), ("server-key.pem", &skey)]);
        let (ccert, ckey) = ca.issue(false);
        write("client", &[("ca-cert.pem", &ca.pem), ("client-cert.pem", &ccert), ("client-key.pem", &ckey)]);
        let (xcert, xkey) = other.issue(false);
        write("stranger", &[("ca-cert.pem", &ca.pem), ("client-cert.pem", &xcert), ("client-key.pem", &xkey)]);
        let (rcert, rkey) = ca.issue_serial(false, Some(4242));
        write("revoked", &[("ca-cert.pem", &ca.pem), ("client-cert.pem", &rcert), ("client-key.pem", &rkey)]);
        let crl = ca.crl(4242);
        write(
            "server-crl",
            &[("ca-cert.pem", &ca.pem), ("server-cert.pem", &scert), ("server-key.pem", &skey), ("ca-crl.pem", &crl)],
        );
        Setup { dir }
    }

    fn s(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }

    fn image(&self, name: &str, size: &str) -> PathBuf {
        qemu_img(&["create", "-q", "-f", "qcow2", &self.s(name), size]);
        self.dir.path().join(name)
    }

    /// The `--object` defining the server credentials.
    fn server_object(&self, extra: &str) -> String {
        format!("tls-creds-x509,id=tls0,dir={},endpoint=server{extra}", self.s("server"))
    }

    /// nbdinfo's TLS URI for `sock` with the client credentials in `creds`.
    fn uri(&self, sock: &str, creds: &str) -> String {
        format!("nbds+unix:///?socket={sock}&tls-certificates={}", self.s(creds))
    }
}

/// A running `oxqcow serve -t` on a Unix socket.
struct Server {
    child: Option<Child>,
    socket: PathBuf,
}

impl Server {
    fn start(sock: &str, args: &[&str]) -> Server {
        let mut all = vec!["serve", "-t", "-k", sock];
        all.extend_from_slice(args);
        let child = Command::new(OXQCOW).args(&all).stdin(Stdio::null()).spawn().expect("starting oxqcow serve");
        let mut s = Server { child: Some(child), socket: PathBuf::from(sock) };
        wait_until("the server's socket", || {
            s.assert_running();
            s.socket.exists()
        });
        s
    }

    /// Serves on 127.0.0.1 at a port of its own; returns the port.
    fn tcp(args: &[&str]) -> (Server, u16) {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let p = port.to_string();
        let mut all = vec!["serve", "-t", "-b", "127.0.0.1", "-p", &p];
        all.extend_from_slice(args);
        let child = Command::new(OXQCOW).args(&all).stdin(Stdio::null()).spawn().expect("starting oxqcow serve");
        let mut s = Server { child: Some(child), socket: PathBuf::new() };
        wait_until("the server's TCP port", || {
            s.assert_running();
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        (s, port)
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("oxqcow serve exited early: {status}");
        }
    }

    /// SIGTERM; the server must exit with 0.
    fn stop(mut self) {
        let mut child = self.child.take().unwrap();
        run_ok("kill", &["-TERM", &child.id().to_string()]);
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(start.elapsed() < WAIT, "oxqcow serve did not exit");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "oxqcow serve exited with {status} after SIGTERM");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn nbdinfo_and_nbdcopy_over_tls_and_plain_clients_refused() {
    require("nbdinfo", "libnbd-bin");
    require("nbdcopy", "libnbd-bin");
    let t = Setup::new();
    let img = t.image("disk.qcow2", "8M");
    let img_s = img.to_str().unwrap();
    qemu_io(&["-f", "qcow2", img_s], &["write -P 0x11 0 1M", "write -P 0x22 3M 512k", "write -z 5M 1M"]);
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", img_s, &t.s("expected.raw")]);
    let sock = t.s("nbd.sock");
    let object = t.server_object("");
    let server = Server::start(&sock, &["--object", &object, "--tls-creds", "tls0", "-f", "qcow2", img_s]);

    let info = run_ok("nbdinfo", &[&t.uri(&sock, "client")]);
    assert!(info.contains("with TLS"), "nbdinfo:\n{info}");
    assert!(info.contains("export-size: 8388608"), "nbdinfo:\n{info}");
    run_ok("nbdcopy", &[&t.uri(&sock, "client"), &t.s("copy.raw")]);
    assert!(
        std::fs::read(t.s("copy.raw")).unwrap() == std::fs::read(t.s("expected.raw")).unwrap(),
        "nbdcopy over TLS read different bytes"
    );

    // And the other way: 8 MiB of varied bytes written over TLS, more
    // than the relay buffers, read back the same.
    let upload: Vec<u8> = (0..8u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(t.s("upload.raw"), &upload).unwrap();
    run_ok("nbdcopy", &[&t.s("upload.raw"), &t.uri(&sock, "client")]);
    run_ok("nbdcopy", &[&t.uri(&sock, "client"), &t.s("back.raw")]);
    assert!(std::fs::read(t.s("back.raw")).unwrap() == upload, "nbdcopy over TLS wrote different bytes");

    // Without TLS: the server answers every option with NBD_REP_ERR_TLS_REQD.
    let plain = run("nbdinfo", &[&format!("nbd+unix:///?socket={sock}")]);
    assert!(!plain.status.success(), "a plain client was served by a TLS server");
    // The server is still there for the next client.
    run_ok("nbdinfo", &["--size", &t.uri(&sock, "client")]);
    server.stop();
    assert_clean(&img);
}

#[test]
fn qemu_io_and_qemu_img_over_tls() {
    let t = Setup::new();
    let img = t.image("disk.qcow2", "16M");
    let sock = t.s("nbd.sock");
    let object = t.server_object("");
    let server =
        Server::start(&sock, &["--object", &object, "--tls-creds", "tls0", "-f", "qcow2", img.to_str().unwrap()]);
    let client_object = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", t.s("client"));
    let target = format!("driver=nbd,server.type=unix,server.path={sock},tls-creds=tls0,tls-hostname=localhost");
    let args = ["--object", client_object.as_str(), "--image-opts", target.as_str()];
    qemu_io(&args, &["write -P 0x5a 0 1M", "write -P 0xa5 4M 64k", "write -z 8M 2M", "aio_write -P 0x3c 12M 256k"]);
    qemu_io(&args, &["read -P 0x5a 0 1M", "read -P 0xa5 4M 64k", "read -P 0 8M 2M", "read -P 0x3c 12M 256k"]);
    let info = qemu_img(&["info", "--object", &client_object, "--image-opts", &target]);
    assert!(info.contains("virtual size: 16 MiB"), "qemu-img info over TLS:\n{info}");
    server.stop();

    // Over TCP, the server certificate checked against the host name.
    let (server, port) =
        Server::tcp(&["--object", &object, "--tls-creds", "tls0", "-f", "qcow2", img.to_str().unwrap()]);
    let target = format!("driver=nbd,server.type=inet,server.host=localhost,server.port={port},tls-creds=tls0");
    let args = ["--object", client_object.as_str(), "--image-opts", target.as_str()];
    qemu_io(&args, &["read -P 0x5a 0 1M", "write -P 0x66 2M 3M", "read -P 0x66 2M 3M"]);
    server.stop();
    assert_clean(&img);
    qemu_io(
        &["-f", "qcow2", img.to_str().unwrap()],
        &["read -P 0x5a 0 1M", "read -P 0x66 2M 3M", "read -P 0x3c 12M 256k"],
    );
}

#[test]
fn client_certificates_are_checked_unless_verify_peer_is_off() {
    require("nbdinfo", "libnbd-bin");
    let t = Setup::new();
    let img = t.image("disk.qcow2", "1M");
    let sock = t.s("nbd.sock");
    let object = t.server_object("");
    let server =
        Server::start(&sock, &["--object", &object, "--tls-creds", "tls0", "-f", "qcow2", img.to_str().unwrap()]);
    let refused = run("nbdinfo", &[&t.uri(&sock, "stranger")]);
    assert!(!refused.status.success(), "a client certificate from another CA was accepted");
    run_ok("nbdinfo", &["--size", &t.uri(&sock, "client")]);
    server.stop();

    // With a CRL, a revoked client is refused and the others are served.
    let object = format!("tls-creds-x509,id=tls0,dir={},endpoint=server", t.s("server-crl"));
    let server =
        Server::start(&sock, &["--object", &object, "--tls-creds", "tls0", "-f", "qcow2", img.to_str().unwrap()]);
    let refused = run("nbdinfo", &[&t.uri(&sock, "revoked")]);
    assert!(!refused.status.success(), "a revoked client certificate was accepted");
    run_ok("nbdinfo", &["--size", &t.uri(&sock, "client")]);
    server.stop();
    // Without the CRL the same certificate is good.
    let object = t.server_object("");
    let server =
        Server::start(&sock, &["--object", &object, "--tls-creds", "tls0", "-f", "qcow2", img.to_str().unwrap()]);
    run_ok("nbdinfo", &["--size", &t.uri(&sock, "revoked")]);
    server.stop();

    let object = t.server_object(",verify-peer=off");
    let server =
        Server::start(&sock, &["--object", &object, "--tls-creds", "tls0", "-f", "qcow2", img.to_str().unwrap()]);
    assert_eq!(run_ok("nbdinfo", &["--size", &t.uri(&sock, "stranger")]).trim(), "1048576");
    server.stop();
    assert_clean(&img);
}

/// Runs a server command line that must fail at startup; returns its
/// message without the program name.
fn startup_error(program: &str, args: &[&str]) -> String {
    let mut cmd = Command::new("timeout");
    cmd.arg("30").arg(program);
    if program == OXQCOW {
        cmd.arg("serve");
    }
    let o = cmd.args(args).stdin(Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{program} {args:?} did not fail at startup:\n{err}");
    err.split_once(": ").map(|(_, m)| m.to_string()).unwrap_or(err)
}

#[test]
fn broken_credentials_fail_at_startup_as_in_qemu_nbd() {
    require("qemu-nbd", "qemu-utils");
    let t = Setup::new();
    let img = t.image("disk.qcow2", "1M");
    let img_s = img.to_str().unwrap().to_string();
    let server = t.dir.path().join("server");
    // A directory per breakage, each a copy of the good one.
    let broken = |name: &str, change: &dyn Fn(&Path)| {
        let d = t.dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
            std::fs::copy(server.join(f), d.join(f)).unwrap();
        }
        change(&d);
        d.to_str().unwrap().to_string()
    };
    let other_key = KeyPair::generate().unwrap().serialize_pem();
    let dirs = [
        t.s("nonexistent"),
        broken("no-key", &|d| std::fs::remove_file(d.join("server-key.pem")).unwrap()),
        broken("no-ca", &|d| std::fs::remove_file(d.join("ca-cert.pem")).unwrap()),
        broken("bad-cert", &|d| std::fs::write(d.join("server-cert.pem"), "garbage\n").unwrap()),
        broken("bad-ca", &|d| std::fs::write(d.join("ca-cert.pem"), "garbage\n").unwrap()),
        broken("bad-key", &|d| std::fs::write(d.join("server-key.pem"), "garbage\n").unwrap()),
        broken("other-key", &|d| std::fs::write(d.join("server-key.pem"), &other_key).unwrap()),
        broken("bad-dh", &|d| std::fs::write(d.join("dh-params.pem"), "garbage\n").unwrap()),
    ];
    let sock = t.s("nbd.sock");
    let mut cases: Vec<Vec<String>> = Vec::new();
    for d in &dirs {
        cases.push(vec!["--object".into(), format!("tls-creds-x509,id=tls0,dir={d},endpoint=server")]);
    }
    let good = t.s("server");
    cases.push(vec!["--object".into(), format!("tls-creds-x509,id=tls0,dir={good}")]);
    cases.push(vec!["--object".into(), format!("tls-creds-x509,id=tls0,dir={good},endpoint=server,verify-peer=maybe")]);
    cases.push(vec!["--object".into(), "tls-creds-x509,id=tls0,endpoint=server".into()]);
    cases.push(vec!["--object".into(), "secret,id=tls0,data=x".into()]);
    cases.push(vec![]);
    cases.push(vec![
        "--object".into(),
        format!("tls-creds-x509,id=tls0,dir={good},endpoint=server"),
        "--tls-hostname".into(),
        "localhost".into(),
    ]);
    for case in &cases {
        let mut args: Vec<&str> = case.iter().map(String::as_str).collect();
        args.extend_from_slice(&["--tls-creds", "tls0", "-k", &sock, "-f", "qcow2", &img_s]);
        let theirs = startup_error("qemu-nbd", &args);
        let ours = startup_error(OXQCOW, &args);
        assert_eq!(ours, theirs, "serve {args:?}");
    }
    for flag in ["--tls-authz", "--tls-hostname"] {
        let args = [flag, "x", "-k", &sock, "-f", "qcow2", &img_s];
        assert_eq!(startup_error(OXQCOW, &args), startup_error("qemu-nbd", &args), "serve {args:?}");
    }
    // What rustls cannot do is refused by name.
    let psk = format!("tls-creds-psk,id=tls0,dir={good},endpoint=server");
    let msg = startup_error(OXQCOW, &["--object", &psk, "--tls-creds", "tls0", &img_s]);
    assert!(msg.contains("tls-creds-psk is not supported"), "{msg}");
    let object = t.server_object("");
    let msg = startup_error(OXQCOW, &["--object", &object, "--tls-creds", "tls0", "--tls-authz", "a0", &img_s]);
    assert!(msg.contains("--tls-authz is not supported"), "{msg}");
    assert_clean(&img);
}

/// stdout, stderr (the program's name made "qemu-img") and exit code.
fn outcome(program: &str, args: &[&str]) -> (String, String, Option<i32>) {
    let o = run(program, args);
    let err = String::from_utf8_lossy(&o.stderr).replace("oxqcow:", "qemu-img:");
    (String::from_utf8_lossy(&o.stdout).into_owned(), err, o.status.code())
}

/// `qemu-img ARGS` and `oxqcow ARGS` give the same outcome.
fn assert_like_qemu_img(args: &[&str]) -> (String, String, Option<i32>) {
    let q = outcome("qemu-img", args);
    assert_eq!(outcome(OXQCOW, args), q, "oxqcow and qemu-img differ for {args:?}");
    q
}

/// The NBD client over TLS (`tls-creds=ID` with a client `tls-creds-x509`
/// object, `tls-hostname`), against `oxqcow serve` and qemu-nbd with TLS:
/// maps and messages as qemu-img's (no host name on a Unix socket, a
/// certificate for another host, TLS required but not asked for, TLS
/// asked of a server without it), writes with `oxqcow io` that qemu-io
/// reads back, and `serve -L --tls-creds` printing what `qemu-nbd -L`
/// prints. Before, `tls-creds` was refused ("not supported ... yet").
#[test]
fn nbd_client_over_tls_as_qemu() {
    require("qemu-nbd", "qemu-utils");
    let t = Setup::new();
    let img = t.image("disk.qcow2", "16M");
    let img_s = img.to_str().unwrap().to_string();
    qemu_io(&["-f", "qcow2", &img_s], &["write -P 0x5a 0 1M", "write -P 0xa5 4M 64k"]);
    let ours_nbd = t.dir.path().join("qemu-nbd");
    std::os::unix::fs::symlink(OXQCOW, &ours_nbd).unwrap();
    let ours_nbd = ours_nbd.to_str().unwrap().to_string();
    let client_object = format!("tls-creds-x509,id=c0,dir={},endpoint=client", t.s("client"));
    let object = t.server_object("");
    for qemu_server in [false, true] {
        // A socket of its own: a killed server leaves its file behind.
        let sock = t.s(if qemu_server { "qemu-tls.sock" } else { "tls.sock" });
        let args = ["--object", object.as_str(), "--tls-creds", "tls0", "-f", "qcow2", img_s.as_str()];
        let server = if qemu_server {
            let child = Command::new("qemu-nbd").args(["-t", "-k", &sock]).args(args).spawn().expect("qemu-nbd");
            let s = Server { child: Some(child), socket: PathBuf::from(&sock) };
            wait_until("qemu-nbd's socket", || s.socket.exists());
            s
        } else {
            Server::start(&sock, &args)
        };
        let base = format!("driver=nbd,server.type=unix,server.path={sock}");
        let tls = format!("{base},tls-creds=c0");
        let good = format!("{tls},tls-hostname=localhost");
        let wrong = format!("{tls},tls-hostname=other");
        let o = assert_like_qemu_img(&["map", "--output=json", "--object", &client_object, "--image-opts", &good]);
        assert_eq!(o.2, Some(0), "{o:?}");
        for target in [&tls, &wrong, &base] {
            let o = assert_like_qemu_img(&["map", "--object", &client_object, "--image-opts", target]);
            assert_eq!(o.2, Some(1), "{target}: {o:?}");
        }
        let io = ["--object", client_object.as_str(), "--image-opts", good.as_str(), "-c", "write -P 0x3c 8M 64k"];
        let o = run(OXQCOW, &[&["io"][..], &io[..]].concat());
        assert!(o.status.success(), "oxqcow io over TLS: {o:?}");
        qemu_io(&["--object", &client_object, "--image-opts", &good], &["read -P 0x3c 8M 64k", "read -P 0x5a 0 1M"]);
        // Convert's workers in flight at once on the one TLS connection
        // (the pipelined client; `oxqcow serve` encrypting replies in its
        // writer), the copy the same as qemu-img's.
        let (ours_out, qemu_out) = (t.s("ours-copy.raw"), t.s("qemu-copy.raw"));
        for (tool, out) in [(OXQCOW, &ours_out), ("qemu-img", &qemu_out)] {
            let args = ["convert", "-m", "8", "--object", &client_object, "--image-opts", &good, "-O", "raw", out];
            let o = run(tool, &args);
            assert!(o.status.success(), "{tool} convert over TLS: {o:?}");
        }
        assert!(std::fs::read(&ours_out).unwrap() == std::fs::read(&qemu_out).unwrap(), "the copies over TLS differ");
        let list = ["--object", client_object.as_str(), "--tls-creds", "c0", "-L", "-k", sock.as_str()];
        for extra in [&["--tls-hostname", "localhost"][..], &[][..]] {
            let args = [&list[..], extra].concat();
            let (o, q) = (run(&ours_nbd, &args), run("qemu-nbd", &args));
            assert_eq!(o.status.code(), q.status.code(), "-L {extra:?}");
            assert_eq!(String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&q.stdout), "-L {extra:?}");
            assert_eq!(String::from_utf8_lossy(&o.stderr), String::from_utf8_lossy(&q.stderr), "-L {extra:?}");
        }
        drop(server);
    }
    // TLS asked of a server that has none.
    let sock = t.s("plain.sock");
    let _server = Server::start(&sock, &["-r", "-f", "qcow2", &img_s]);
    let target = format!("driver=nbd,server.type=unix,server.path={sock},tls-creds=c0,tls-hostname=localhost");
    let o = assert_like_qemu_img(&["map", "--object", &client_object, "--image-opts", &target]);
    assert!(o.1.contains("starttls"), "{o:?}");
}
