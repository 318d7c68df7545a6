//! What names an RBD image, as QEMU's rbd driver reads it: the legacy file
//! name `rbd:pool[/namespace]/image[@snapshot][:key=value...]` (backslash
//! escapes; `conf` and `id` are the driver's, every other pair is a Ceph
//! configuration option) and the driver's options (`pool`, `namespace`,
//! `image`, `snapshot`, `conf`, `user`, `auth-client-required`,
//! `server.N.host`/`server.N.port`, the key from `key-secret`), with QEMU's
//! messages.

/// The options of one RBD image node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RbdOptions {
    /// The pool.
    pub pool: String,
    /// The RADOS namespace in the pool (`""`: the default one).
    pub namespace: String,
    /// The image.
    pub image: String,
    /// A snapshot of the image, opened read only.
    pub snapshot: Option<String>,
    /// The Ceph configuration file (`None`: librados's default places,
    /// failure to find one ignored).
    pub conf: Option<String>,
    /// The cephx id (`admin` for `client.admin`); `None`: librados's default.
    pub user: Option<String>,
    /// The cephx key (base64), from `key-secret`.
    pub key: Option<String>,
    /// `auth_client_required` (`cephx`, `none`).
    pub auth_client_required: Option<String>,
    /// Monitor addresses from `server.N.*`, as `mon_host` takes them.
    pub mon_host: Option<String>,
    /// Further Ceph configuration options from a legacy file name, in order.
    pub conf_pairs: Vec<(String, String)>,
}

/// Splits at the first `delim` not escaped by a backslash: the token and
/// what follows the delimiter (`None` without one), as QEMU's
/// `qemu_rbd_next_tok`.
fn next_tok(s: &str, delim: char) -> (&str, Option<&str>) {
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        if c == '\\' {
            chars.next();
        } else if c == delim {
            return (&s[..i], Some(&s[i + 1..]));
        }
    }
    (s, None)
}

/// Drops the backslashes of escapes (`\:` is `:`), as `qemu_rbd_unescape`.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether `s` holds `c` outside escapes.
fn has_unescaped(s: &str, c: char) -> bool {
    next_tok(s, c).1.is_some()
}

impl RbdOptions {
    /// Reads a legacy `rbd:` file name as QEMU's `qemu_rbd_parse_filename`.
    pub fn from_filename(name: &str) -> Result<RbdOptions, String> {
        let Some(rest) = name.strip_prefix("rbd:") else {
            return Err("File name must start with 'rbd:'".into());
        };
        let mut o = RbdOptions::default();
        let (pool, rest) = next_tok(rest, '/');
        let Some(rest) = rest else { return Err("Pool name is required".into()) };
        o.pool = unescape(pool);
        let (image, mut pairs) = if has_unescaped(rest, '@') {
            let (image, rest) = next_tok(rest, '@');
            let (snap, rest) = next_tok(rest.unwrap_or(""), ':');
            o.snapshot = Some(unescape(snap));
            (image, rest)
        } else {
            next_tok(rest, ':')
        };
        let image = if has_unescaped(image, '/') {
            let (ns, image) = next_tok(image, '/');
            o.namespace = unescape(ns);
            image.unwrap_or("")
        } else {
            image
        };
        o.image = unescape(image);
        while let Some(p) = pairs {
            let (key, rest) = next_tok(p, '=');
            let key = unescape(key);
            let Some(rest) = rest else { return Err(format!("conf option {key} has no value")) };
            let (value, rest) = next_tok(rest, ':');
            let value = unescape(value);
            match key.as_str() {
                "conf" => o.conf = Some(value),
                "id" => o.user = Some(value),
                _ => o.conf_pairs.push((key, value)),
            }
            pairs = rest;
        }
        Ok(o)
    }

    /// Reads the driver's options (`--image-opts driver=rbd,...`, a
    /// `json:{"driver":"rbd",...}` name), without `driver` and with the key
    /// of `key-secret` already looked up (`key`).
    pub fn from_options(options: &[(String, String)], key: Option<String>) -> Result<RbdOptions, String> {
        let mut o = RbdOptions { key, ..RbdOptions::default() };
        let (mut pool, mut image) = (None, None);
        let mut servers: Vec<(usize, Option<String>, Option<String>)> = Vec::new();
        for (k, v) in options {
            match k.as_str() {
                "pool" => pool = Some(v.clone()),
                "image" => image = Some(v.clone()),
                "namespace" => o.namespace = v.clone(),
                "snapshot" => o.snapshot = Some(v.clone()),
                "conf" => o.conf = Some(v.clone()),
                "user" => o.user = Some(v.clone()),
                "auth-client-required" => o.auth_client_required = Some(v.clone()),
                _ => {
                    let server = k.strip_prefix("server.").and_then(|s| s.split_once('.'));
                    let Some((n, field @ ("host" | "port"))) = server else {
                        return Err(format!("Parameter '{k}' is unexpected"));
                    };
                    let n: usize = n.parse().map_err(|_| format!("Parameter '{k}' is unexpected"))?;
                    let i = match servers.iter().position(|s| s.0 == n) {
                        Some(i) => i,
                        None => {
                            servers.push((n, None, None));
                            servers.len() - 1
                        }
                    };
                    if field == "host" {
                        servers[i].1 = Some(v.clone());
                    } else {
                        servers[i].2 = Some(v.clone());
                    }
                }
            }
        }
        o.pool = pool.ok_or("Parameter 'pool' is missing")?;
        o.image = image.ok_or("Parameter 'image' is missing")?;
        servers.sort_by_key(|s| s.0);
        let mut hosts = Vec::new();
        for (n, host, port) in servers {
            let host = host.ok_or(format!("Parameter 'server.{n}.host' is missing"))?;
            let port = port.ok_or(format!("Parameter 'server.{n}.port' is missing"))?;
            // An IPv6 address goes in brackets before its port, as QEMU builds it.
            hosts.push(if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") });
        }
        if !hosts.is_empty() {
            o.mon_host = Some(hosts.join(";"));
        }
        Ok(o)
    }

    /// The options as a `json:{...}` object's members, in QEMU's order of
    /// the rbd node (`pool`, `image`, then the rest as set).
    pub fn to_options(&self) -> Vec<(String, String)> {
        let mut out = vec![("pool".to_string(), self.pool.clone()), ("image".to_string(), self.image.clone())];
        if let Some(s) = &self.snapshot {
            out.push(("snapshot".into(), s.clone()));
        }
        if let Some(c) = &self.conf {
            out.push(("conf".into(), c.clone()));
        }
        out.push(("namespace".into(), self.namespace.clone()));
        if let Some(u) = &self.user {
            out.push(("user".into(), u.clone()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_names_split_as_qemu_splits_them() {
        let o =
            RbdOptions::from_filename("rbd:p/ns/img@snap:conf=/e/c\\:x.conf:id=admin:mon_host=1.2.3.4\\:6789").unwrap();
        assert_eq!(o.pool, "p");
        assert_eq!(o.namespace, "ns");
        assert_eq!(o.image, "img");
        assert_eq!(o.snapshot.as_deref(), Some("snap"));
        assert_eq!(o.conf.as_deref(), Some("/e/c:x.conf"));
        assert_eq!(o.user.as_deref(), Some("admin"));
        assert_eq!(o.conf_pairs, vec![("mon_host".to_string(), "1.2.3.4:6789".to_string())]);
        let o = RbdOptions::from_filename("rbd:p/img").unwrap();
        assert_eq!((o.pool.as_str(), o.namespace.as_str(), o.image.as_str(), o.snapshot), ("p", "", "img", None));
    }

    #[test]
    fn bad_legacy_names_get_qemu_messages() {
        assert_eq!(RbdOptions::from_filename("rbd:pool").unwrap_err(), "Pool name is required");
        assert_eq!(RbdOptions::from_filename("rbd:").unwrap_err(), "Pool name is required");
        assert_eq!(RbdOptions::from_filename("rbd:p/i:conf=x:foo").unwrap_err(), "conf option foo has no value");
    }

    #[test]
    fn driver_options_are_checked_as_qapi_checks_them() {
        let kv = |v: &[(&str, &str)]| v.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
        let o = RbdOptions::from_options(
            &kv(&[
                ("pool", "p"),
                ("image", "i"),
                ("server.0.host", "::1"),
                ("server.0.port", "1"),
                ("server.1.host", "h"),
                ("server.1.port", "2"),
            ]),
            None,
        )
        .unwrap();
        assert_eq!(o.mon_host.as_deref(), Some("[::1]:1;h:2"));
        assert_eq!(RbdOptions::from_options(&kv(&[("image", "i")]), None).unwrap_err(), "Parameter 'pool' is missing");
        assert_eq!(
            RbdOptions::from_options(&kv(&[("pool", "p"), ("image", "i"), ("bogus", "1")]), None).unwrap_err(),
            "Parameter 'bogus' is unexpected"
        );
    }
}
