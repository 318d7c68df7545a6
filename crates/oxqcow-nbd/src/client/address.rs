//! QEMU's names for an NBD export: the URIs (`nbd://`, `nbd+tcp://`,
//! `nbd+unix://`), the older `nbd:` syntax and the nbd driver's options,
//! read into one [`NbdAddress`], and the name QEMU shows for it. Pure: no
//! connection is made here.

/// The NBD port.
pub const DEFAULT_PORT: u16 = 10809;

/// Where an export is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdServer {
    /// A TCP host and port.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// A unix socket.
    Unix(String),
}

/// An export's address: its server and its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdAddress {
    /// The server.
    pub server: NbdServer,
    /// The export's name (empty: the default export).
    pub export: String,
    /// The nbd driver's `x-dirty-bitmap`: block status read from this
    /// metadata context instead of `base:allocation` (only through the
    /// driver's options, as QEMU takes it).
    pub x_dirty_bitmap: Option<String>,
    /// The nbd driver's `tls-creds`: the id of the `tls-creds-x509` object
    /// (endpoint client) the connection starts TLS with.
    pub tls_creds: Option<String>,
    /// The nbd driver's `tls-hostname`: the name the server's certificate
    /// must carry (else the TCP host).
    pub tls_hostname: Option<String>,
}

impl NbdAddress {
    /// Reads QEMU's NBD image names: `nbd://HOST[:PORT][/EXPORT]`,
    /// `nbd+tcp://...`, `nbd+unix:///[EXPORT]?socket=PATH`,
    /// `nbd:unix:PATH[:exportname=NAME]` and
    /// `nbd:HOST:PORT[:exportname=NAME]`. `None` when `name` is not an NBD
    /// name at all; an error (QEMU's words) when it is one but malformed.
    pub fn parse(name: &str) -> Option<Result<NbdAddress, String>> {
        if let Some(rest) = name.strip_prefix("nbd+unix://") {
            return Some(parse_unix_uri(rest));
        }
        if let Some(rest) = name.strip_prefix("nbd://").or_else(|| name.strip_prefix("nbd+tcp://")) {
            return Some(parse_tcp_uri(rest));
        }
        if let Some(rest) = name.strip_prefix("nbd:") {
            return Some(parse_legacy(rest));
        }
        None
    }

    /// The export that QEMU's nbd driver options name (`--image-opts
    /// driver=nbd,server.type=unix,server.path=S,export=E`, or
    /// `server.type=inet,server.host=H,server.port=P`; the legacy `path`,
    /// `host` and `port` too). `options` are those other than `driver`;
    /// the ones this function does not know are left for the caller.
    pub fn from_options(options: &mut Vec<(String, String)>) -> Result<NbdAddress, String> {
        let mut take = |keys: &[&str]| {
            let mut found = None;
            options.retain(|(k, v)| {
                if keys.contains(&k.as_str()) {
                    found = Some(v.clone());
                    false
                } else {
                    true
                }
            });
            found
        };
        let kind = take(&["server.type"]);
        let path = take(&["server.path", "path"]);
        let host = take(&["server.host", "host"]);
        let port = take(&["server.port", "port"]);
        let export = take(&["export"]).unwrap_or_default();
        let x_dirty_bitmap = take(&["x-dirty-bitmap"]);
        let tls_creds = take(&["tls-creds"]);
        let tls_hostname = take(&["tls-hostname"]);
        let server = match (kind.as_deref(), path, host) {
            (Some("unix") | None, Some(path), None) => NbdServer::Unix(path),
            (Some("inet") | None, None, Some(host)) => {
                let port = match port {
                    Some(p) => p.parse().map_err(|_| format!("invalid port '{p}'"))?,
                    None => DEFAULT_PORT,
                };
                NbdServer::Tcp { host, port }
            }
            (Some("unix"), None, _) => return Err("Parameter 'server.path' is missing".into()),
            (Some("inet"), _, None) => return Err("Parameter 'server.host' is missing".into()),
            (Some(other), _, _) if other != "unix" && other != "inet" => {
                return Err(format!("Parameter 'server.type' does not accept value '{other}'"))
            }
            (None, None, None) => return Err("NBD server address missing".into()),
            _ => return Err("Cannot use 'path' and 'host' together".into()),
        };
        Ok(NbdAddress { server, export, x_dirty_bitmap, tls_creds, tls_hostname })
    }

    /// A name QEMU reads as this address: its `nbd:` syntax, which needs no
    /// escaping and [`NbdAddress::parse`] reads back; with `x-dirty-bitmap`,
    /// which only the driver's options carry, a `json:{...}` name of them.
    pub fn to_name(&self) -> String {
        let extra = [
            ("x-dirty-bitmap", &self.x_dirty_bitmap),
            ("tls-creds", &self.tls_creds),
            ("tls-hostname", &self.tls_hostname),
        ];
        if extra.iter().any(|(_, v)| v.is_some()) {
            let server = match &self.server {
                NbdServer::Unix(path) => format!(r#"{{"type":"unix","path":{}}}"#, json_string(path)),
                NbdServer::Tcp { host, port } => {
                    format!(r#"{{"type":"inet","host":{},"port":"{port}"}}"#, json_string(host))
                }
            };
            let mut name = format!(r#"json:{{"driver":"nbd","server":{server},"export":{}"#, json_string(&self.export));
            for (key, value) in extra {
                if let Some(v) = value {
                    name += &format!(r#","{key}":{}"#, json_string(v));
                }
            }
            return name + "}";
        }
        let server = match &self.server {
            NbdServer::Unix(path) => format!("unix:{path}"),
            NbdServer::Tcp { host, port } if host.contains(':') => format!("[{host}]:{port}"),
            NbdServer::Tcp { host, port } => format!("{host}:{port}"),
        };
        if self.export.is_empty() {
            format!("nbd:{server}")
        } else {
            format!("nbd:{server}:exportname={}", self.export)
        }
    }

    /// The host name the server's TLS certificate must carry:
    /// `tls-hostname`, else the TCP host; none for a Unix socket.
    pub fn tls_hostname(&self) -> Option<&str> {
        match (&self.tls_hostname, &self.server) {
            (Some(h), _) => Some(h),
            (None, NbdServer::Tcp { host, .. }) => Some(host),
            (None, NbdServer::Unix(_)) => None,
        }
    }

    /// The name QEMU shows for this export (`info`'s "image:" line).
    pub fn display_name(&self) -> String {
        match &self.server {
            NbdServer::Unix(path) if self.export.is_empty() => format!("nbd+unix://?socket={path}"),
            NbdServer::Unix(path) => format!("nbd+unix:///{}?socket={path}", self.export),
            NbdServer::Tcp { host, port } if self.export.is_empty() => format!("nbd://{host}:{port}"),
            NbdServer::Tcp { host, port } => format!("nbd://{host}:{port}/{}", self.export),
        }
    }
}

fn parse_unix_uri(rest: &str) -> Result<NbdAddress, String> {
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let export = path.strip_prefix('/').unwrap_or(path);
    if !path.is_empty() && !path.starts_with('/') {
        return Err("nbd+unix:// URIs take no host".into());
    }
    let mut socket = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("socket", v)) if socket.is_none() => socket = Some(percent_decode(v)),
            _ => return Err("unexpected query parameters".into()),
        }
    }
    let socket = socket.ok_or("missing socket parameter")?;
    Ok(NbdAddress {
        server: NbdServer::Unix(socket),
        export: percent_decode(export),
        x_dirty_bitmap: None,
        tls_creds: None,
        tls_hostname: None,
    })
}

fn parse_tcp_uri(rest: &str) -> Result<NbdAddress, String> {
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    if authority.contains('?') || path.contains('?') {
        return Err("unexpected query parameters".into());
    }
    let (host, port) = split_host_port(authority)?;
    if host.is_empty() {
        return Err("missing host".into());
    }
    Ok(NbdAddress {
        server: NbdServer::Tcp { host, port },
        export: percent_decode(path),
        x_dirty_bitmap: None,
        tls_creds: None,
        tls_hostname: None,
    })
}

fn split_host_port(authority: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or("invalid IPv6 address")?;
        (h, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(p) => p.parse().map_err(|_| format!("invalid port '{p}'"))?,
    };
    Ok((host.to_string(), port))
}

/// `nbd:unix:PATH[:exportname=NAME]` and `nbd:HOST:PORT[:exportname=NAME]`.
fn parse_legacy(rest: &str) -> Result<NbdAddress, String> {
    let (spec, export) = match rest.find(":exportname=") {
        Some(i) => (&rest[..i], rest[i + ":exportname=".len()..].to_string()),
        None => (rest, String::new()),
    };
    if let Some(path) = spec.strip_prefix("unix:") {
        if path.is_empty() {
            return Err("missing socket path".into());
        }
        return Ok(NbdAddress {
            server: NbdServer::Unix(path.to_string()),
            export,
            x_dirty_bitmap: None,
            tls_creds: None,
            tls_hostname: None,
        });
    }
    let (host, port) = split_host_port(spec)?;
    if host.is_empty() {
        return Err("missing host".into());
    }
    Ok(NbdAddress {
        server: NbdServer::Tcp { host, port },
        export,
        x_dirty_bitmap: None,
        tls_creds: None,
        tls_hostname: None,
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(path: &str, export: &str) -> NbdAddress {
        NbdAddress {
            server: NbdServer::Unix(path.into()),
            export: export.into(),
            x_dirty_bitmap: None,
            tls_creds: None,
            tls_hostname: None,
        }
    }

    fn tcp(host: &str, port: u16, export: &str) -> NbdAddress {
        NbdAddress {
            server: NbdServer::Tcp { host: host.into(), port },
            export: export.into(),
            x_dirty_bitmap: None,
            tls_creds: None,
            tls_hostname: None,
        }
    }

    #[test]
    fn qemu_names_parse() {
        let ok = |n: &str| NbdAddress::parse(n).unwrap().unwrap();
        assert_eq!(ok("nbd+unix:///?socket=/tmp/s"), unix("/tmp/s", ""));
        assert_eq!(ok("nbd+unix:///exp?socket=/tmp/s"), unix("/tmp/s", "exp"));
        assert_eq!(ok("nbd+unix://?socket=/tmp/a%20b"), unix("/tmp/a b", ""));
        assert_eq!(ok("nbd://localhost"), tcp("localhost", 10809, ""));
        assert_eq!(ok("nbd://127.0.0.1:1234/exp"), tcp("127.0.0.1", 1234, "exp"));
        assert_eq!(ok("nbd+tcp://[::1]:99/e"), tcp("::1", 99, "e"));
        assert_eq!(ok("nbd:unix:/tmp/s"), unix("/tmp/s", ""));
        assert_eq!(ok("nbd:unix:/tmp/s:exportname=x"), unix("/tmp/s", "x"));
        assert_eq!(ok("nbd:localhost:10810:exportname=a"), tcp("localhost", 10810, "a"));
        assert!(NbdAddress::parse("disk.qcow2").is_none());
        assert!(NbdAddress::parse("nbd+unix:///").unwrap().is_err());
        assert!(NbdAddress::parse("nbd://h:x").unwrap().is_err());
        assert!(NbdAddress::parse("nbd:unix:").unwrap().is_err());
    }

    #[test]
    fn driver_options_name_exports() {
        let opts = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut o = opts(&[("server.type", "unix"), ("server.path", "/s:x"), ("export", "e"), ("read-only", "on")]);
        let a = NbdAddress::from_options(&mut o).unwrap();
        assert_eq!(a, unix("/s:x", "e"));
        assert_eq!(o, opts(&[("read-only", "on")]), "unknown options are left");
        assert_eq!(NbdAddress::parse(&a.to_name()).unwrap().unwrap(), a);
        let a = NbdAddress::from_options(&mut opts(&[("server.host", "::1"), ("server.port", "99")])).unwrap();
        assert_eq!(a, tcp("::1", 99, ""));
        assert_eq!(NbdAddress::parse(&a.to_name()).unwrap().unwrap(), a);
        assert!(NbdAddress::from_options(&mut opts(&[("server.type", "unix")])).is_err());
        assert!(NbdAddress::from_options(&mut opts(&[])).is_err());
        let tls =
            NbdAddress::from_options(&mut opts(&[("path", "/s"), ("tls-creds", "t"), ("tls-hostname", "h")])).unwrap();
        assert_eq!((tls.tls_creds.as_deref(), tls.tls_hostname()), (Some("t"), Some("h")));
        assert!(tls.to_name().starts_with("json:"), "TLS settings survive the name");
        let mut o = opts(&[("path", "/s"), ("x-dirty-bitmap", "qemu:allocation-depth")]);
        let a = NbdAddress::from_options(&mut o).unwrap();
        assert_eq!(a.x_dirty_bitmap.as_deref(), Some("qemu:allocation-depth"));
        assert!(o.is_empty(), "x-dirty-bitmap is the driver's option");
    }

    #[test]
    fn display_names_are_qemus() {
        assert_eq!(unix("/s", "").display_name(), "nbd+unix://?socket=/s");
        assert_eq!(unix("/s", "e").display_name(), "nbd+unix:///e?socket=/s");
        assert_eq!(tcp("h", 10809, "").display_name(), "nbd://h:10809");
    }
}
