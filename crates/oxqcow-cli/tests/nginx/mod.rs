//! An nginx for tests: started on 127.0.0.1 with its own configuration
//! (byte ranges on, off (`max_ranges 0`), without validators, behind basic
//! authentication, throttled, cookies, and over TLS with a certificate made
//! here), serving the files tests put in its `www`. Shared by `http.rs` and
//! `protocol_backing.rs`.
#![allow(dead_code)] // each test binary uses a different part

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// nginx, from PATH or Debian's /usr/sbin; the test fails without it.
pub fn nginx_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
        .expect("nginx is required by this test (apt-get install nginx)")
}

/// A port nobody listens on at the moment.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// An nginx serving `www` (the files tests put there) under several
/// locations, killed when dropped.
pub struct Nginx {
    child: Child,
    dir: tempfile::TempDir,
    pub port: u16,
    pub tls_port: u16,
    /// The CA that signed the TLS server's certificate, as PEM.
    pub ca_file: PathBuf,
}

impl Nginx {
    pub fn start() -> Nginx {
        let nginx = nginx_binary();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for sub in ["www", "logs", "tmp"] {
            std::fs::create_dir(d.join(sub)).unwrap();
        }
        std::fs::write(d.join("htpasswd"), "user:{PLAIN}right\n").unwrap();
        let (ca, cert, key) = certificates();
        std::fs::write(d.join("ca.pem"), ca).unwrap();
        std::fs::write(d.join("cert.pem"), cert).unwrap();
        std::fs::write(d.join("key.pem"), key).unwrap();
        let (port, tls_port) = (free_port(), free_port());
        let p = d.display();
        let conf = format!(
            "daemon off;\nmaster_process off;\npid {p}/nginx.pid;\nerror_log {p}/logs/error.log;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n\
               access_log {p}/logs/access.log;\n\
               client_body_temp_path {p}/tmp; proxy_temp_path {p}/tmp; fastcgi_temp_path {p}/tmp;\n\
               uwsgi_temp_path {p}/tmp; scgi_temp_path {p}/tmp;\n\
               server {{\n\
                 listen 127.0.0.1:{port};\n\
                 listen 127.0.0.1:{tls_port} ssl;\n\
                 ssl_certificate {p}/cert.pem; ssl_certificate_key {p}/key.pem;\n\
                 root {p}/www;\n\
                 location /norange/ {{ alias {p}/www/; max_ranges 0; }}\n\
                 location /noetag/ {{ alias {p}/www/; etag off; }}\n\
                 location /novalidator/ {{ alias {p}/www/; etag off; add_header Last-Modified \"\"; }}\n\
                 location /auth/ {{ alias {p}/www/; auth_basic \"images\"; auth_basic_user_file {p}/htpasswd; }}\n\
                 location /liar/ {{ alias {p}/www/; max_ranges 0; add_header Accept-Ranges bytes; }}\n\
                 location /slow/ {{ alias {p}/www/; limit_rate 1k; }}\n\
                 location /cookie/ {{ alias {p}/www/; if ($cookie_session != \"s3cret\") {{ return 403; }} }}\n\
               }}\n\
             }}\n"
        );
        std::fs::write(d.join("nginx.conf"), conf).unwrap();
        let child = Command::new(&nginx)
            .arg("-c")
            .arg(d.join("nginx.conf"))
            .arg("-p")
            .arg(d)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", nginx.display()));
        let mut server = Nginx { child, ca_file: d.join("ca.pem"), dir, port, tls_port };
        server.wait_listening();
        server
    }

    fn wait_listening(&mut self) {
        for _ in 0..500 {
            if let Some(status) = self.child.try_wait().unwrap() {
                let log = std::fs::read_to_string(self.dir.path().join("logs/error.log")).unwrap_or_default();
                panic!("nginx exited ({status}): {log}");
            }
            let up = |port| TcpStream::connect(("127.0.0.1", port)).is_ok();
            if up(self.port) && up(self.tls_port) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("nginx did not start listening");
    }

    pub fn www(&self, name: &str) -> PathBuf {
        self.dir.path().join("www").join(name)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }

    pub fn tls_url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}/{path}", self.tls_port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CA, and a certificate it signed for 127.0.0.1 with its key (PEM).
pub fn certificates() -> (String, String, String) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(DnType::CommonName, "oxqcow test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let server = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = server.signed_by(&key, &Issuer::from_params(&ca, &ca_key)).unwrap().pem();
    (ca_pem, cert, key.serialize_pem())
}
