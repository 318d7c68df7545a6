//! Objects on web servers as images, named as QEMU's curl driver names
//! them: `http://...` and `https://...` file names, and `driver=http` or
//! `driver=https` nodes (`--image-opts`, `json:{...}`, as the image itself
//! or as its `file`) with the driver's options; the secrets
//! `password-secret` and `cookie-secret` are looked up among `--object
//! secret`s. Read only: an open for writing is refused with QEMU's words.

use std::sync::Arc;

use oxqcow::storage::http::{HttpOptions, HttpStorage, NO_WRITES};
use oxqcow::Storage;

use crate::app::node_options::take_node;
use crate::app::secrets;

/// Whether `driver` is one of the curl driver's protocols oxqcow reads.
pub fn is_http_driver(driver: &str) -> bool {
    matches!(driver, "http" | "https")
}

/// The options an `http://` or `https://` image name opens; `None` for
/// other names.
pub fn http_name(name: &str) -> Option<HttpOptions> {
    match oxqcow::names::parse_image_name(name) {
        Ok(oxqcow::names::ImageName::Protocol { driver, .. }) if is_http_driver(driver) => {
            Some(HttpOptions::from_url(name))
        }
        _ => None,
    }
}

/// Takes the options under `prefix` (`""` for the node itself, `file.` for
/// an image's file) out of `options` when `{prefix}driver` is `http` or
/// `https`, and reads them as the curl driver does (secrets looked up,
/// QEMU's checks and messages).
pub fn take_http(options: &mut Vec<(String, String)>, prefix: &str) -> Result<Option<HttpOptions>, String> {
    let Some((driver, mine)) = take_node(options, prefix, is_http_driver) else { return Ok(None) };
    let mut http = HttpOptions::new(&driver);
    let mut cookie_secret = None;
    for (k, value) in mine {
        let k = k.as_str();
        match k {
            "password-secret" => http.password = Some(secret_text(&value)?),
            "cookie-secret" => cookie_secret = Some(value),
            "proxy-username" | "proxy-password-secret" => {
                return Err(format!("the curl driver's option '{k}' is not supported by oxqcow"))
            }
            _ if http.apply(k, &value)? => {}
            _ => return Err(format!("Block protocol '{driver}' doesn't support the option '{k}'")),
        }
    }
    if let Some(id) = cookie_secret {
        if http.cookie.is_some() {
            return Err("curl driver cannot handle both cookie and cookie secret".into());
        }
        http.cookie = Some(secret_text(&id)?);
    }
    http.check()?;
    Ok(Some(http))
}

/// A secret as the curl driver takes it: UTF-8 text.
fn secret_text(id: &str) -> Result<String, String> {
    String::from_utf8(secrets::lookup(id)?).map_err(|_| format!("Data from secret {id} is not valid UTF-8"))
}

/// Opens the object `opts` name for an image opened `read_only` or not:
/// QEMU's refusal of writes, else the HEAD request's verdict.
pub fn open_http(opts: &HttpOptions, read_only: bool) -> Result<Arc<dyn Storage>, String> {
    if !read_only {
        return Err(NO_WRITES.into());
    }
    Ok(Arc::new(HttpStorage::open(opts)?))
}

/// QEMU's refusal to create an image named `name` when it names an
/// HTTP(S) object.
pub fn no_creation(name: &str) -> Option<String> {
    http_name(name).map(|h| format!("Protocol driver '{}' does not support image creation", h.driver))
}

/// Whether flattened image options open an HTTP(S) object anywhere (the
/// node itself or its file): `--image-opts` then passes them on whole as
/// a `json:` name, which carries the driver's options where a file name
/// could not.
pub fn names_http(options: &[(String, String)]) -> bool {
    options.iter().any(|(k, v)| (k == "driver" || k == "file.driver") && is_http_driver(v))
}

/// The name QEMU gives an image named by a `json:{...}` name that opens an
/// HTTP(S) object with nothing but options that leave its bytes alone (a
/// format, `readahead`, `timeout`, `sslverify=on`): the object's URL (its
/// `bdrv_refresh_filename`). `None` for other names; those keep the name
/// as given.
pub fn plain_url(name: &str) -> Option<String> {
    let options = oxqcow::names::parse_json_name(name.strip_prefix("json:")?).ok()?;
    if !names_http(&options) {
        return None;
    }
    let mut url = None;
    for (k, v) in &options {
        let key = k.strip_prefix("file.").unwrap_or(k);
        match key {
            "url" => url = Some(v.clone()),
            "driver" | "readahead" | "timeout" => {}
            "sslverify" if oxqcow::qemu_syntax::parse_bool_option(key, v) == Ok(true) => {}
            _ => return None,
        }
    }
    url
}

/// Flattened options as a `json:{...}` name that gives them back.
pub fn json_name(options: &[(String, String)]) -> String {
    let members: serde_json::Map<String, serde_json::Value> =
        options.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
    format!("json:{}", serde_json::Value::Object(members))
}
