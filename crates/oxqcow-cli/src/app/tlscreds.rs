//! TLS credentials objects (`--object tls-creds-x509,id=ID,dir=DIR,...`),
//! as QEMU's `crypto/tlscredsx509.c` defines them, kept by id for
//! `serve --tls-creds ID` (server endpoint) and for the NBD client's
//! `tls-creds=ID` and `serve -L --tls-creds ID` (client endpoint).
//!
//! The shared `--object` parser ([`crate::app::objects::define`]) hands these
//! types here with the id checked. Server credentials are loaded when the
//! object is defined, as QEMU loads them when it completes the object, so
//! a broken directory fails at startup with QEMU's message naming the
//! file. `tls-creds-psk`, `tls-creds-anon` and `authz-*` objects are
//! refused: rustls has no external pre-shared keys nor anonymous
//! credentials, and authorization lists are not implemented.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use oxqcow_nbd::client::TlsClient;
use oxqcow_nbd::tls::TlsServer;

/// One `tls-creds-x509` object, loaded for its endpoint.
enum Creds {
    /// `endpoint=server`.
    Server(TlsServer),
    /// `endpoint=client` (QEMU's default).
    Client(TlsClient),
}

static CREDS: Mutex<BTreeMap<String, Creds>> = Mutex::new(BTreeMap::new());

/// Whether `qom_type` is a type this module answers for.
pub fn handles(qom_type: &str) -> bool {
    matches!(qom_type, "tls-creds-x509" | "tls-creds-psk" | "tls-creds-anon") || qom_type.starts_with("authz-")
}

/// Whether an object named `id` exists here.
pub fn exists(id: &str) -> bool {
    CREDS.lock().unwrap_or_else(|p| p.into_inner()).contains_key(id)
}

/// QEMU's boolean property values.
fn parse_bool(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(format!("Parameter '{key}' expects 'on' or 'off'")),
    }
}

/// Defines object `id` of type `qom_type` (one [`handles`] accepts) with
/// `params` (without `id`).
pub fn define(qom_type: &str, id: &str, params: &[(String, String)]) -> Result<(), String> {
    match qom_type {
        "tls-creds-x509" => {}
        "tls-creds-psk" => {
            return Err("tls-creds-psk is not supported by oxqcow (rustls has no external pre-shared keys): \
                        use tls-creds-x509"
                .into())
        }
        "tls-creds-anon" => return Err("tls-creds-anon is not supported by oxqcow: use tls-creds-x509".into()),
        other => return Err(format!("{other} is not supported by oxqcow (TLS authorization is not implemented)")),
    }
    let mut dir = None;
    let mut server = false;
    let mut verify_peer = true;
    for (k, v) in params {
        match k.as_str() {
            "dir" => dir = Some(v.clone()),
            "endpoint" => {
                server = match v.as_str() {
                    "server" => true,
                    "client" => false,
                    _ => return Err(format!("Parameter 'endpoint' does not accept value '{v}'")),
                }
            }
            "verify-peer" => verify_peer = parse_bool(k, v)?,
            // The certificates are always checked; rustls has no switch.
            "sanity-check" | "loaded" => {
                parse_bool(k, v)?;
            }
            "priority" => {
                return Err("Parameter 'priority': GnuTLS priority strings are not supported by oxqcow".into())
            }
            "passwordid" => {
                return Err("Parameter 'passwordid': encrypted private keys are not supported by oxqcow".into())
            }
            _ => return Err(format!("Parameter '{k}' is unexpected")),
        }
    }
    let Some(dir) = dir.filter(|d| !d.is_empty()) else { return Err("Missing 'dir' property value".into()) };
    let loaded = if server {
        Creds::Server(TlsServer::load_x509(Path::new(&dir), verify_peer)?)
    } else {
        // The CA certificate is required; the client's own certificate is
        // optional.
        Creds::Client(TlsClient::load_x509(Path::new(&dir))?)
    };
    CREDS.lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_string(), loaded);
    Ok(())
}

/// The server credentials of object `id`, with qemu-nbd's reasons (the
/// caller prefixes "Failed to get TLS creds: ").
pub fn server_creds(id: &str) -> Result<TlsServer, String> {
    let creds = CREDS.lock().unwrap_or_else(|p| p.into_inner());
    match creds.get(id) {
        Some(Creds::Server(s)) => Ok(s.clone()),
        Some(Creds::Client(_)) => Err("Expected TLS credentials for a server endpoint".into()),
        None if crate::app::secrets::exists(id) => Err(format!("Object with id '{id}' is not TLS credentials")),
        None => Err(format!("No TLS credentials with id '{id}'")),
    }
}

/// The client credentials of object `id`, with QEMU's reasons.
pub fn client_creds(id: &str) -> Result<TlsClient, String> {
    let creds = CREDS.lock().unwrap_or_else(|p| p.into_inner());
    match creds.get(id) {
        Some(Creds::Client(c)) => Ok(c.clone()),
        Some(Creds::Server(_)) => Err("Expected TLS credentials for a client endpoint".into()),
        None if crate::app::secrets::exists(id) => Err(format!("Object with id '{id}' is not TLS credentials")),
        None => Err(format!("No TLS credentials with id '{id}'")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_are_checked_as_qemu_does() {
        let p = |s: &[(&str, &str)]| s.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
        assert_eq!(
            define("tls-creds-x509", "c1", &p(&[("endpoint", "server")])).unwrap_err(),
            "Missing 'dir' property value"
        );
        assert_eq!(
            define("tls-creds-x509", "c1", &p(&[("dir", "/x"), ("endpoint", "bogus")])).unwrap_err(),
            "Parameter 'endpoint' does not accept value 'bogus'"
        );
        assert_eq!(
            define("tls-creds-x509", "c1", &p(&[("dir", "/x"), ("verify-peer", "maybe")])).unwrap_err(),
            "Parameter 'verify-peer' expects 'on' or 'off'"
        );
        assert_eq!(
            define("tls-creds-x509", "c1", &p(&[("dir", "/x"), ("bogus", "1")])).unwrap_err(),
            "Parameter 'bogus' is unexpected"
        );
        assert!(define("tls-creds-psk", "c1", &p(&[("dir", "/x")])).unwrap_err().contains("not supported"));
        assert_eq!(
            define("tls-creds-x509", "c1", &p(&[("dir", "/nonexistent-dir"), ("endpoint", "server")])).unwrap_err(),
            "Unable to access credentials /nonexistent-dir/ca-cert.pem: No such file or directory"
        );
        assert!(!exists("c1"));
        assert_eq!(server_creds("c1").unwrap_err(), "No TLS credentials with id 'c1'");
    }
}
