//! An object on a web server as read-only storage, read as QEMU's curl
//! driver reads it (`http://`, `https://`; `driver=http|https` with
//! `url`, `readahead`, `timeout`, `sslverify`, `cookie`, `username` and a
//! password): a HEAD request gives the length and must show byte-range
//! support, every read is a range GET.
//!
//! Unlike QEMU, the object is pinned: the validator the HEAD request saw
//! (a strong ETag, else Last-Modified) is sent with every range request
//! (`If-Match`, `If-Unmodified-Since`) and compared with the one each
//! answer carries, and each answer's `Content-Range` must name the
//! object's length, so a read of an object that changed since it was
//! opened fails instead of mixing two versions of it.
//!
//! Small reads fetch `readahead` bytes more and keep the result in a few
//! buffers (QEMU keeps one per request state); large reads are split into
//! range requests that run in parallel, over the agent's pool of
//! keep-alive connections (`ranged.rs`, shared with the object store
//! backend).

use std::io::{self, Read};
use std::time::{Duration, Instant};

use ureq::tls::{parse_pem, PemItem, RootCerts, TlsConfig};

use super::ranged::{RangeFetch, RangedReader, MAX_PIECES, PIECE};
use super::Storage;

/// QEMU's default `readahead`: 256 KiB.
pub const DEFAULT_READAHEAD: u64 = 256 * 1024;
/// QEMU's default `timeout`, in seconds.
pub const DEFAULT_TIMEOUT: u64 = 5;
/// The largest `timeout` QEMU accepts (`CURL_TIMEOUT_MAX`).
const MAX_TIMEOUT: u64 = 10000;
/// The system's CA bundle (Debian's `ca-certificates`), which curl uses.
const SYSTEM_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// What QEMU's curl driver is told when it opens an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpOptions {
    /// `http` or `https`: the driver, which the URL's scheme must match.
    pub driver: String,
    /// The object's URL.
    pub url: Option<String>,
    /// Bytes read beyond a small read, for the reads that follow.
    pub readahead: u64,
    /// Seconds one request may take (0: no limit).
    pub timeout: u64,
    /// Verify the server's certificate and name (`https`).
    pub sslverify: bool,
    /// The `Cookie` header sent with every request.
    pub cookie: Option<String>,
    /// The user name for HTTP basic authentication.
    pub username: Option<String>,
    /// The password for HTTP basic authentication (from `password-secret`).
    pub password: Option<String>,
}

impl HttpOptions {
    /// QEMU's defaults for `driver` (`http` or `https`).
    pub fn new(driver: &str) -> HttpOptions {
        HttpOptions {
            driver: driver.to_string(),
            url: None,
            readahead: DEFAULT_READAHEAD,
            timeout: DEFAULT_TIMEOUT,
            sslverify: true,
            cookie: None,
            username: None,
            password: None,
        }
    }

    /// The options an image name opens (`http://...`, `https://...`).
    pub fn from_url(url: &str) -> HttpOptions {
        let driver = if url.starts_with("https://") { "https" } else { "http" };
        HttpOptions { url: Some(url.to_string()), ..HttpOptions::new(driver) }
    }

    /// Applies one of the driver's options given as text; `Ok(false)` when
    /// `key` is not one of them. The secrets (`password-secret`,
    /// `cookie-secret`) are the caller's to look up.
    pub fn apply(&mut self, key: &str, value: &str) -> Result<bool, String> {
        match key {
            "url" => self.url = Some(value.to_string()),
            "readahead" => self.readahead = crate::qemu_syntax::parse_size_option(key, value)?,
            "timeout" => self.timeout = crate::qemu_syntax::parse_number_option(key, value)?,
            "sslverify" => self.sslverify = crate::qemu_syntax::parse_bool_option(key, value)?,
            "cookie" => self.cookie = Some(value.to_string()),
            "username" => self.username = Some(value.to_string()),
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The checks QEMU's `curl_open` makes before connecting, with its
    /// messages; the URL on success.
    pub fn check(&self) -> Result<&str, String> {
        if self.readahead & 0x1ff != 0 {
            return Err(format!("HTTP_READAHEAD_SIZE {} is not a multiple of 512", self.readahead));
        }
        if self.timeout > MAX_TIMEOUT {
            return Err("timeout parameter is too large or negative".into());
        }
        let Some(url) = self.url.as_deref() else {
            return Err("curl block driver requires an 'url' option".into());
        };
        let driver = &self.driver;
        if !url.starts_with(&format!("{driver}://")) {
            return Err(format!(
                "{driver} curl driver cannot handle the URL '{url}' (does not start with '{driver}://')"
            ));
        }
        Ok(url)
    }
}

/// What pins the object opened: the validators its HEAD answer carried.
#[derive(Clone, Debug, Default)]
struct Pin {
    /// A strong ETag (a weak one cannot be sent in `If-Match`).
    etag: Option<String>,
    last_modified: Option<String>,
}

/// An object on an HTTP(S) server, read with range requests.
pub struct HttpStorage {
    agent: ureq::Agent,
    driver: &'static str,
    url: String,
    len: u64,
    pin: Pin,
    cookie: Option<String>,
    authorization: Option<String>,
    reader: RangedReader,
}

/// The message of a read or open that failed, in curl's words where
/// curl has some (QEMU shows curl's error buffer).
fn failure(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

/// The host and port of `url`, for curl's connection message.
fn host_port(url: &str) -> (String, u16) {
    let (scheme, rest) = url.split_once("://").unwrap_or(("http", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    let default = if scheme == "https" { 443 } else { 80 };
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (h, after) = v6.split_once(']').unwrap_or((v6, ""));
            (h, after.strip_prefix(':'))
        }
        None => match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    (host.to_string(), port.and_then(|p| p.parse().ok()).unwrap_or(default))
}

/// curl's words for a request that failed before a status arrived.
fn transport_failure(url: &str, e: ureq::Error, started: Instant) -> io::Error {
    let ms = started.elapsed().as_millis();
    let (host, port) = host_port(url);
    let msg = match e {
        ureq::Error::Timeout(_) => format!("Operation timed out after {ms} milliseconds"),
        ureq::Error::HostNotFound => format!("Could not resolve host: {host}"),
        ureq::Error::Io(io) if io.kind() == io::ErrorKind::TimedOut => {
            format!("Operation timed out after {ms} milliseconds")
        }
        ureq::Error::Io(io)
            if matches!(io.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::HostUnreachable) =>
        {
            format!("Failed to connect to {host} port {port} after {ms} ms: Couldn't connect to server")
        }
        ureq::Error::ConnectionFailed => {
            format!("Failed to connect to {host} port {port} after {ms} ms: Couldn't connect to server")
        }
        e if bad_certificate(&e) => certificate_failure(),
        other => other.to_string(),
    };
    failure(msg)
}

/// Whether a request failed on the server's certificate: rustls's error,
/// however deep the errors around it nest it.
fn bad_certificate(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut at = Some(e);
    while let Some(err) = at {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return matches!(tls, rustls::Error::InvalidCertificate(_));
        }
        // ureq's error gives no source: its I/O error is taken out by hand.
        at = match err.downcast_ref::<ureq::Error>() {
            Some(ureq::Error::Io(io)) => Some(io),
            Some(ureq::Error::Rustls(tls)) => Some(tls),
            _ => match err.downcast_ref::<io::Error>().and_then(io::Error::get_ref) {
                Some(inner) => Some(inner),
                None => err.source(),
            },
        };
    }
    false
}

/// curl's words (with GnuTLS, as Debian builds QEMU's, which verifies
/// against the system's trust store) for a server certificate that does
/// not verify.
fn certificate_failure() -> String {
    "server certificate verification failed. CAfile: none CRLfile: none".into()
}

/// One header's value as text.
fn header(resp: &ureq::http::Response<ureq::Body>, name: &str) -> Option<String> {
    resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// Standard base64 (RFC 4648) of `input`, for the basic authorization.
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The root certificates an `https` server is verified against: the
/// bundle `SSL_CERT_FILE` names, else the system's, else Mozilla's.
fn root_certs() -> io::Result<RootCerts> {
    let named = std::env::var_os("SSL_CERT_FILE");
    let path = match &named {
        Some(p) => std::path::PathBuf::from(p),
        None if std::path::Path::new(SYSTEM_CA_FILE).exists() => SYSTEM_CA_FILE.into(),
        None => return Ok(RootCerts::WebPki),
    };
    let pem = std::fs::read(&path)
        .map_err(|e| failure(format!("error reading CA certificates from '{}': {e}", path.display())))?;
    let certs: Vec<_> = parse_pem(&pem)
        .filter_map(|item| match item {
            Ok(PemItem::Certificate(c)) => Some(c.to_owned()),
            _ => None,
        })
        .collect();
    Ok(RootCerts::from(certs))
}

/// Whether an `Accept-Ranges` value says byte ranges, as QEMU reads it:
/// `bytes` and nothing else but white space.
fn accepts_byte_ranges(value: &str) -> bool {
    value.trim() == "bytes"
}

/// A `Content-Range: bytes FIRST-LAST/TOTAL` value.
fn content_range(value: &str) -> Option<(u64, u64, u64)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    Some((first.trim().parse().ok()?, last.trim().parse().ok()?, total.trim().parse().ok()?))
}

impl HttpStorage {
    /// Opens the object `opts` name (checked as QEMU checks them): a HEAD
    /// request for its length, its validators and its byte-range support.
    /// Errors carry QEMU's message without its "CURL: Error opening file: "
    /// prefix, which [`HttpStorage::open_error`] adds.
    pub fn open(opts: &HttpOptions) -> Result<HttpStorage, String> {
        let url = opts.check()?.to_string();
        let opening = |e: io::Error| Self::open_error(&e.to_string());
        let mut tls = TlsConfig::builder().disable_verification(!opts.sslverify);
        if opts.sslverify && opts.driver == "https" {
            tls = tls.root_certs(root_certs().map_err(opening)?);
        }
        let timeout = (opts.timeout > 0).then(|| Duration::from_secs(opts.timeout));
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(timeout)
            .max_idle_connections_per_host(4 * MAX_PIECES)
            .tls_config(tls.build())
            .build()
            .into();
        let authorization = opts.username.as_ref().map(|user| {
            let pass = opts.password.as_deref().unwrap_or("");
            format!("Basic {}", base64(format!("{user}:{pass}").as_bytes()))
        });
        let mut storage = HttpStorage {
            agent,
            driver: if opts.driver == "https" { "https" } else { "http" },
            url,
            len: 0,
            pin: Pin::default(),
            cookie: opts.cookie.clone(),
            authorization,
            reader: RangedReader::new(opts.readahead, PIECE),
        };
        storage.head().map_err(opening)?;
        Ok(storage)
    }

    /// QEMU's message for an object that cannot be opened, around `why`.
    pub fn open_error(why: &str) -> String {
        format!("CURL: Error opening file: {why}")
    }

    /// The object's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn request(
        &self,
        req: ureq::RequestBuilder<ureq::typestate::WithoutBody>,
    ) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        let mut req = req;
        if let Some(c) = &self.cookie {
            req = req.header("Cookie", c);
        }
        if let Some(a) = &self.authorization {
            req = req.header("Authorization", a);
        }
        req
    }

    /// The HEAD request of opening.
    fn head(&mut self) -> io::Result<()> {
        let started = Instant::now();
        let resp =
            self.request(self.agent.head(&self.url)).call().map_err(|e| transport_failure(&self.url, e, started))?;
        let status = resp.status().as_u16();
        if status >= 400 {
            return Err(failure(format!("The requested URL returned error: {status}")));
        }
        let len = header(&resp, "content-length").and_then(|v| v.trim().parse::<u64>().ok());
        let Some(len) = len else {
            return Err(failure("Server didn't report file size."));
        };
        if !header(&resp, "accept-ranges").is_some_and(|v| accepts_byte_ranges(&v)) {
            return Err(failure("Server does not support 'range' (byte ranges)."));
        }
        self.len = len;
        self.pin = Pin {
            etag: header(&resp, "etag").filter(|e| !e.starts_with("W/")),
            last_modified: header(&resp, "last-modified"),
        };
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` (inside the object) with one
    /// range request, checking that the answer is that range of the
    /// object opened.
    fn fetch(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let last = offset + buf.len() as u64 - 1;
        let mut req = self.request(self.agent.get(&self.url)).header("Range", format!("bytes={offset}-{last}"));
        if let Some(etag) = &self.pin.etag {
            req = req.header("If-Match", etag);
        } else if let Some(lm) = &self.pin.last_modified {
            req = req.header("If-Unmodified-Since", lm);
        }
        let started = Instant::now();
        let mut resp = req.call().map_err(|e| transport_failure(&self.url, e, started))?;
        let status = resp.status().as_u16();
        let changed = |what: String| failure(format!("{} changed since it was opened ({what})", self.url));
        // A server may answer a range that is the whole object with all
        // of it (200); any other 200 is the whole object for a part.
        let whole = offset == 0 && buf.len() as u64 == self.len;
        match status {
            206 => {}
            200 if whole => {}
            412 => return Err(changed("412 Precondition Failed".into())),
            200 => return Err(failure("Server does not support 'range' (byte ranges).")),
            s if s >= 400 => return Err(failure(format!("The requested URL returned error: {s}"))),
            s => return Err(failure(format!("unexpected HTTP status {s} for bytes {offset}-{last}"))),
        }
        if let (Some(pinned), Some(now)) = (&self.pin.etag, header(&resp, "etag")) {
            if *pinned != now {
                return Err(changed(format!("ETag {pinned} is now {now}")));
            }
        }
        if let (Some(pinned), Some(now)) = (&self.pin.last_modified, header(&resp, "last-modified")) {
            if *pinned != now {
                return Err(changed(format!("Last-Modified {pinned} is now {now}")));
            }
        }
        let range = header(&resp, "content-range").unwrap_or_default();
        let length = header(&resp, "content-length").and_then(|v| v.trim().parse::<u64>().ok());
        match content_range(&range) {
            _ if status == 200 && length != Some(self.len) => {
                return Err(changed(format!("its length {} is now {}", self.len, length.unwrap_or(0))));
            }
            _ if status == 200 => {}
            Some((first, l, total)) if first == offset && l == last && total == self.len => {}
            Some((_, _, total)) if total != self.len => {
                return Err(changed(format!("its length {} is now {total}", self.len)));
            }
            _ => {
                return Err(failure(format!("bytes {offset}-{last} asked, Content-Range '{range}' answered")));
            }
        }
        let mut body = resp.body_mut().with_config().limit(buf.len() as u64 + 1).reader();
        // ureq reports its own timeouts inside the I/O error.
        let timed_out = |e: io::Error| {
            let ureq_timeout = e.get_ref().and_then(|i| i.downcast_ref::<ureq::Error>());
            if e.kind() == io::ErrorKind::TimedOut || matches!(ureq_timeout, Some(ureq::Error::Timeout(_))) {
                failure(format!("Operation timed out after {} milliseconds", started.elapsed().as_millis()))
            } else {
                failure(format!("reading bytes {offset}-{last}: {e}"))
            }
        };
        body.read_exact(buf).map_err(timed_out)?;
        Ok(())
    }
}

impl RangeFetch for HttpStorage {
    fn object_len(&self) -> u64 {
        self.len
    }

    fn fetch(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        HttpStorage::fetch(self, buf, offset)
    }
}

impl Storage for HttpStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.reader.read_at(self, buf, offset)
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(read_only())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.len)
    }

    fn set_len(&self, _len: u64) -> io::Result<()> {
        Err(read_only())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn driver_name(&self) -> &str {
        self.driver
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}

/// The curl driver's refusal of writes.
pub const NO_WRITES: &str = "curl driver does not support writes";

fn read_only() -> io::Error {
    io::Error::new(io::ErrorKind::ReadOnlyFilesystem, NO_WRITES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked_as_qemu_checks_them() {
        let mut o = HttpOptions::new("http");
        assert_eq!(o.check().unwrap_err(), "curl block driver requires an 'url' option");
        o.apply("url", "https://h/x").unwrap();
        assert_eq!(
            o.check().unwrap_err(),
            "http curl driver cannot handle the URL 'https://h/x' (does not start with 'http://')"
        );
        let mut o = HttpOptions::from_url("https://h/x");
        assert_eq!(o.check(), Ok("https://h/x"));
        o.apply("readahead", "1000").unwrap();
        assert_eq!(o.check().unwrap_err(), "HTTP_READAHEAD_SIZE 1000 is not a multiple of 512");
        o.apply("readahead", "1k").unwrap();
        o.apply("timeout", "-1").unwrap();
        assert_eq!(o.check().unwrap_err(), "timeout parameter is too large or negative");
        assert_eq!(o.apply("timeout", "x").unwrap_err(), "Parameter 'timeout' expects a number");
        assert_eq!(o.apply("sslverify", "maybe").unwrap_err(), "Parameter 'sslverify' expects 'on' or 'off'");
        assert_eq!(o.apply("bogus", "1"), Ok(false));
    }

    #[test]
    fn headers_are_read_as_qemu_and_http_say() {
        assert!(accepts_byte_ranges("bytes"));
        assert!(accepts_byte_ranges(" bytes  "));
        assert!(!accepts_byte_ranges("none"));
        assert!(!accepts_byte_ranges("bytes, x"));
        assert_eq!(content_range("bytes 0-511/4096"), Some((0, 511, 4096)));
        assert_eq!(content_range("bytes */4096"), None);
        assert_eq!(base64(b"user:pass"), "dXNlcjpwYXNz");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"a"), "YQ==");
        assert_eq!(host_port("http://127.0.0.1:1/a"), ("127.0.0.1".into(), 1));
        assert_eq!(host_port("https://u:p@[::1]/a"), ("::1".into(), 443));
        assert_eq!(host_port("http://example.org"), ("example.org".into(), 80));
    }
}
