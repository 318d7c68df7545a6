//! Backing files named by protocol in an image header (`http(s)://...`,
//! `nbd://...`, `nbd+unix:///...?socket=...`, `nbd:unix:...`, `rbd:...`,
//! `s3://...`, `gs://...`, `az://...`): the engine's [`ProtocolOpener`]
//! that the CLI puts on every image it opens, backed by the same openers
//! as image names on the command line, always read-only.
//!
//! A header's name comes from whoever made the image. HTTP, NBD and object
//! store names only say where to read from (QEMU opens http and nbd backing
//! files too); an `rbd:` name's `:key=value` options are Ceph configuration
//! options (`conf` names a file to read, others log files to write), so
//! from a header only `id` is taken.

use std::sync::Arc;

use oxqcow::options::ProtocolOpener;
use oxqcow::Storage;
use oxqcow_nbd::client::{NbdAddress, NbdClient};

use crate::app::http::{http_name, open_http};
use crate::app::object::{object_name, open_object};
use crate::app::rbd::{is_rbd_name, open_rbd_name};

/// The CLI's protocols for backing files.
#[derive(Debug)]
struct CliProtocols;

impl ProtocolOpener for CliProtocols {
    fn takes(&self, name: &str) -> bool {
        is_protocol_name(name)
    }

    fn open_backing(&self, name: &str) -> Option<oxqcow::Result<Arc<dyn Storage>>> {
        let opened = if let Some(addr) = NbdAddress::parse(name) {
            addr.and_then(|a| connect_nbd(&a, true)).map(|c| Arc::new(c) as Arc<dyn Storage>)
        } else if let Some(http) = http_name(name) {
            open_http(&http, true)
        } else if is_rbd_name(name) {
            header_rbd_options(name).and_then(|()| open_rbd_name(name, true))
        } else if let Some(object) = object_name(name) {
            open_object(&object, true)
        } else {
            return None;
        };
        Some(opened.map_err(oxqcow::Error::InvalidArgument))
    }
}

/// Connects to the export at `addr` for an image opened `read_only` or
/// not; a read-only export is refused for writing with QEMU's words.
pub fn connect_nbd(addr: &NbdAddress, read_only: bool) -> Result<NbdClient, String> {
    let tls = addr.tls_creds.as_deref().map(crate::app::tlscreds::client_creds).transpose()?;
    let client = NbdClient::connect(addr, tls.as_ref()).map_err(|e| e.to_string())?;
    if client.is_read_only() && !read_only {
        return Err("Could not open image: Permission denied".into());
    }
    Ok(client)
}

/// Whether a backing file name names one of the protocols the CLI opens.
pub fn is_protocol_name(name: &str) -> bool {
    NbdAddress::parse(name).is_some() || http_name(name).is_some() || is_rbd_name(name) || object_name(name).is_some()
}

/// The opener every `OpenOptions` and `CreateOptions` the CLI builds
/// carries.
pub fn protocols() -> Option<Arc<dyn ProtocolOpener>> {
    Some(Arc::new(CliProtocols))
}

/// Refuses an `rbd:` backing file name whose `:key=value` options go
/// beyond `id` (the cephx user): any other would be a Ceph configuration
/// option chosen by the image's author (`conf`, `log_file`, `keyring`, ...).
fn header_rbd_options(name: &str) -> Result<(), String> {
    for key in rbd_option_keys(name) {
        if key != "id" {
            return Err(format!(
                "The option '{key}' of the rbd backing file name '{name}' is refused: \
                 a backing file name from an image header may set only 'id'"
            ));
        }
    }
    Ok(())
}

/// The keys of the `:key=value` options of an `rbd:` name, read as QEMU's
/// `qemu_rbd_parse_filename` reads them (a backslash escapes the next
/// character; the options start at the first unescaped ':' after the pool).
fn rbd_option_keys(name: &str) -> Vec<String> {
    let rest = name.strip_prefix("rbd:").unwrap_or(name);
    // Split at unescaped ':' and unescape each part.
    let mut parts = vec![String::new()];
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    parts.last_mut().expect("never empty").push(n);
                }
            }
            ':' => parts.push(String::new()),
            _ => parts.last_mut().expect("never empty").push(c),
        }
    }
    parts.into_iter().skip(1).map(|p| p.split('=').next().unwrap_or_default().to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rbd_header_names_set_only_id() {
        assert!(header_rbd_options("rbd:pool/img").is_ok());
        assert!(header_rbd_options("rbd:pool/img@snap:id=admin").is_ok());
        assert!(header_rbd_options("rbd:pool/a\\:b:id=x").is_ok());
        let e = header_rbd_options("rbd:pool/img:id=x:conf=/etc/passwd").unwrap_err();
        assert!(e.contains("'conf'"), "{e}");
        let e = header_rbd_options("rbd:pool/img:log_file=/tmp/x").unwrap_err();
        assert!(e.contains("'log_file'"), "{e}");
    }
}
