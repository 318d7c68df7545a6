//! TLS for the NBD client (`tls-creds=ID` with a `tls-creds-x509` object of
//! `endpoint=client`): the credentials, and STARTTLS on a connection before
//! any other option, as QEMU's client starts it.
//!
//! Credentials come from QEMU's file names in the object's directory:
//! `ca-cert.pem` (required), and `client-cert.pem` with `client-key.pem`
//! when the server wants a client certificate. The server's certificate
//! is checked against the CA and against the host name: `tls-hostname`,
//! else the TCP host; a Unix socket without `tls-hostname` has none, and
//! QEMU then refuses ("No hostname for certificate validation").
//! After the handshake the session runs through the server's relay
//! thread (`crate::tls::relay`), so that the client's reading and writing
//! halves are plain sockets, used by different threads at once.

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore};

use super::{option_error, read_option_reply, send_option, Socket};
use crate::proto::{opt, rep};
use crate::tls::CA_CERT;

/// The client certificate's file name in a `tls-creds-x509` directory.
pub const CLIENT_CERT: &str = "client-cert.pem";
/// The client key's file name.
pub const CLIENT_KEY: &str = "client-key.pem";

/// Client credentials: the rustls configuration every connection uses.
#[derive(Clone, Debug)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
}

fn read_file(dir: &Path, name: &str) -> Result<Option<(String, Vec<u8>)>, String> {
    let path = dir.join(name);
    let shown = path.display().to_string();
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some((shown, bytes))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("Unable to access credentials {shown}: {}", crate::tls::strerror(&e))),
    }
}

impl TlsClient {
    /// Loads client credentials from `dir`, with QEMU's messages naming
    /// the file at fault.
    pub fn load_x509(dir: &Path) -> Result<TlsClient, String> {
        let ca_path = dir.join(CA_CERT);
        let Some((ca_shown, ca_pem)) = read_file(dir, CA_CERT)? else {
            return Err(format!("Unable to access credentials {}: No such file or directory", ca_path.display()));
        };
        let ca_list = || format!("Unable to import CA certificate list {ca_shown}");
        let ca: Result<Vec<CertificateDer<'static>>, _> = CertificateDer::pem_slice_iter(&ca_pem).collect();
        let ca = ca.ok().filter(|c| !c.is_empty()).ok_or_else(ca_list)?;
        let mut roots = RootCertStore::empty();
        for c in ca {
            roots.add(c).map_err(|_| ca_list())?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("Cannot set up TLS: {e}"))?
            .with_root_certificates(roots);
        let config = match (read_file(dir, CLIENT_CERT)?, read_file(dir, CLIENT_KEY)?) {
            (Some((cert_path, cert_pem)), Some((key_path, key_pem))) => {
                let cert_and_key =
                    |reason: &str| format!("Cannot load certificate '{cert_path}' & key '{key_path}': {reason}");
                let chain: Result<Vec<CertificateDer<'static>>, _> =
                    CertificateDer::pem_slice_iter(&cert_pem).collect();
                let chain = chain.ok().filter(|c| !c.is_empty()).ok_or_else(|| {
                    format!("Unable to import client certificate {cert_path}: Base64 unexpected header error.")
                })?;
                let key = PrivateKeyDer::from_pem_slice(&key_pem)
                    .map_err(|_| cert_and_key("The requested data were not available."))?;
                builder.with_client_auth_cert(chain, key).map_err(|e| cert_and_key(&e.to_string()))?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(TlsClient { config: Arc::new(config) })
    }
}

/// Asks for TLS (NBD_OPT_STARTTLS) right after the greeting and runs the
/// handshake, checking the server's certificate for `hostname`; the rest
/// of the connection runs through a relay (`crate::tls::relay`), over the
/// returned socket in clear.
pub(super) fn start(mut s: Socket, tls: &TlsClient, hostname: Option<&str>) -> io::Result<Socket> {
    let Some(hostname) = hostname else {
        return Err(io::Error::other("No hostname for certificate validation"));
    };
    let name = ServerName::try_from(hostname.to_string())
        .map_err(|_| io::Error::other(format!("Certificate does not match the hostname {hostname}")))?;
    send_option(&mut s, opt::STARTTLS, &[])?;
    loop {
        let (kind, d) = read_option_reply(&mut s, opt::STARTTLS)?;
        match kind {
            rep::ACK => break,
            k if k & (1 << 31) != 0 => return Err(option_error(k, &d, opt::STARTTLS, "")),
            _ => {}
        }
    }
    let mut conn = ClientConnection::new(Arc::clone(&tls.config), name).map_err(io::Error::other)?;
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut s) {
            return Err(handshake_error(e, hostname));
        }
    }
    // The relay takes its own handle; this one closes with `s`.
    let (clear, relay) = crate::tls::relay(Connection::Client(conn), s.stream().try_clone()?)?;
    Ok(Socket::relayed(clear, relay))
}

/// A failed handshake in QEMU's words where they differ from rustls's.
fn handshake_error(e: io::Error, hostname: &str) -> io::Error {
    let name_mismatch = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()).is_some_and(|r| {
        matches!(
            r,
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName | rustls::CertificateError::NotValidForNameContext { .. }
            )
        )
    });
    if name_mismatch {
        return io::Error::other(format!("Certificate does not match the hostname {hostname}"));
    }
    e
}
