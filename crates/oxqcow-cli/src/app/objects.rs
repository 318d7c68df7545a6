//! `--object` definitions, the parser every subcommand shares: QEMU's
//! `user_creatable_process_cmdline` checks and messages, one name space
//! for every object type (as QEMU's object tree), and each object handed
//! to the module that keeps its type (`secret` to [`secrets`], TLS
//! credentials to [`tlscreds`]).

use oxqcow::qemu_syntax::option_items_implied;

use crate::app::messages::os_error;
use crate::app::{secrets, tlscreds};

/// Checks an `--object` definition as qemu-img's `user_creatable_process_cmdline`
/// does, with QEMU's messages, and keeps the object for later lookups:
/// `secret` (`id`, and `data` or `file`, optional `format=raw|base64`)
/// in [`secrets`], TLS credentials in [`tlscreds`].
pub fn define(spec: &str) -> Result<(), String> {
    // An implied first key: a leading item without '=' is the type.
    let mut qom_type = None;
    let mut params = Vec::new();
    for item in option_items_implied(spec, "qom-type") {
        if item.key == "qom-type" {
            qom_type = Some(item.value);
        } else {
            params.push((item.key, item.value));
        }
    }
    let Some(qom_type) = qom_type.filter(|t| !t.is_empty()) else {
        return Err("Parameter 'qom-type' is missing".into());
    };
    let tls = tlscreds::handles(&qom_type);
    if qom_type != "secret" && !tls {
        return Err(format!("Parameter 'qom-type' does not accept value '{qom_type}'"));
    }
    let get = |k: &str| params.iter().rev().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    let Some(id) = get("id") else { return Err("Parameter 'id' is missing".into()) };
    let valid_id = id.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if !valid_id {
        return Err("Parameter 'id' expects an identifier\n\
                    Identifiers consist of letters, digits, '-', '.', '_', starting with a letter."
            .into());
    }
    // One name space for every object type, as QEMU's object tree.
    let duplicate = || format!("attempt to add duplicate property '{id}' to object (type 'container')");
    if tls {
        if secrets::exists(&id) {
            return Err(duplicate());
        }
        params.retain(|(k, _)| k != "id");
        return tlscreds::define(&qom_type, &id, &params);
    }
    if let Some((k, _)) =
        params.iter().find(|(k, _)| !matches!(k.as_str(), "id" | "data" | "file" | "format" | "keyid" | "iv"))
    {
        return Err(format!("Parameter '{k}' is unexpected"));
    }
    let base64 = match get("format").as_deref() {
        None | Some("raw") => false,
        Some("base64") => true,
        Some(f) => return Err(format!("Parameter 'format' does not accept value '{f}'")),
    };
    if get("keyid").is_some() || get("iv").is_some() {
        return Err("secrets encrypted with another secret (keyid, iv) are not supported by oxqcow".into());
    }
    let raw = match (get("data"), get("file")) {
        (None, None) => return Err("Either 'file' or 'data' must be provided".into()),
        (Some(_), Some(_)) => return Err("'data' and 'file' are mutually exclusive".into()),
        (None, Some(file)) => std::fs::read(&file).map_err(|e| {
            format!("Unable to read {file}: Failed to open file \u{201c}{file}\u{201d}: {}", os_error(&e))
        })?,
        (Some(d), None) => d.into_bytes(),
    };
    let value = if base64 { secrets::decode_base64(&raw)? } else { raw };
    if tlscreds::exists(&id) || !secrets::insert(id.clone(), value) {
        return Err(duplicate());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_defined_once_and_looked_up() {
        define("secret,id=t1,data=pw").unwrap();
        define("qom-type=secret,id=t2,data=cHc=,format=base64").unwrap();
        assert_eq!(secrets::lookup("t1").unwrap(), b"pw");
        assert_eq!(secrets::lookup("t2").unwrap(), b"pw");
        assert_eq!(secrets::lookup("nope").unwrap_err(), "No secret with id 'nope'");
        assert!(define("secret,id=t1,data=x").unwrap_err().contains("duplicate"));
        assert_eq!(define("secret,id=t3").unwrap_err(), "Either 'file' or 'data' must be provided");
    }
}
