//! `--object` definitions (the parser every subcommand shares), the
//! `secret` objects, and the `encrypt.*` open options that name them.
//! TLS credentials objects are parsed here and kept by
//! [`crate::tlscreds`].
//!
//! qemu-img takes passphrases only through secret objects
//! (`--object secret,id=sec0,data=...` or `file=PATH`, optionally
//! `format=base64`) and image options naming them
//! (`encrypt.key-secret=sec0`). Secrets are process-wide, as QEMU's object
//! tree is: every subcommand defines its `--object`s here and resolves ids
//! when it opens or creates images.

use std::collections::BTreeMap;
use std::sync::Mutex;

use oxqcow::OpenOptions;

use crate::common::os_error;

static SECRETS: Mutex<BTreeMap<String, Vec<u8>>> = Mutex::new(BTreeMap::new());

/// Checks an `--object` definition as qemu-img's `user_creatable_process_cmdline`
/// does, with QEMU's messages, and keeps the object for later lookups:
/// `secret` (`id`, and `data` or `file`, optional `format=raw|base64`)
/// here, TLS credentials in [`crate::tlscreds`].
pub fn define(spec: &str) -> Result<(), String> {
    // An implied first key: a leading token without '=' is the type.
    let (mut qom_type, rest) = match spec.split_once(',') {
        Some((first, rest)) if !first.contains('=') => (Some(first.to_string()), rest),
        None if !spec.contains('=') => (Some(spec.to_string()), ""),
        _ => (None, spec),
    };
    let mut params = Vec::new();
    for (k, v) in crate::imgopts::split_options(rest) {
        if k == "qom-type" {
            qom_type = Some(v);
        } else {
            params.push((k, v));
        }
    }
    let Some(qom_type) = qom_type.filter(|t| !t.is_empty()) else {
        return Err("Parameter 'qom-type' is missing".into());
    };
    let tls = crate::tlscreds::handles(&qom_type);
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
        if exists(&id) {
            return Err(duplicate());
        }
        params.retain(|(k, _)| k != "id");
        return crate::tlscreds::define(&qom_type, &id, &params);
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
    let value = if base64 { decode_base64(&raw)? } else { raw };
    if crate::tlscreds::exists(&id) {
        return Err(duplicate());
    }
    let mut secrets = SECRETS.lock().unwrap_or_else(|p| p.into_inner());
    if secrets.contains_key(&id) {
        return Err(duplicate());
    }
    secrets.insert(id, value);
    Ok(())
}

/// Whether a secret named `id` exists.
pub fn exists(id: &str) -> bool {
    SECRETS.lock().unwrap_or_else(|p| p.into_inner()).contains_key(id)
}

/// The bytes of secret `id`, with QEMU's message when there is none.
pub fn lookup(id: &str) -> Result<Vec<u8>, String> {
    let secrets = SECRETS.lock().unwrap_or_else(|p| p.into_inner());
    secrets.get(id).cloned().ok_or_else(|| format!("No secret with id '{id}'"))
}

/// Applies an `encrypt.*` open option (`encrypt.key-secret=ID`,
/// `backing.encrypt.key-secret=ID`, `encrypt.format=...`). `Ok(false)`
/// when `key` is not one of them.
pub fn apply_open_option(opts: &mut OpenOptions, key: &str, value: &str) -> Result<bool, String> {
    match key {
        "encrypt.key-secret" => opts.passphrase = Some(lookup(value)?),
        "backing.encrypt.key-secret" => opts.backing_passphrase = Some(lookup(value)?),
        // The header says which format the image uses; QEMU checks the
        // option against it only to refuse a mismatch.
        "encrypt.format" if matches!(value, "luks" | "aes") => {}
        "encrypt.format" => return Err(format!("Parameter 'encrypt.format' does not accept value '{value}'")),
        _ => return Ok(false),
    }
    Ok(true)
}

/// Standard base64 (RFC 4648, padding optional), as glib decodes secrets.
pub fn decode_base64(input: &[u8]) -> Result<Vec<u8>, String> {
    let bad = || "Unable to decode base64 data".to_string();
    let mut out = Vec::with_capacity(input.len() / 4 * 3);
    let mut acc = 0u32;
    let mut bits = 0;
    for &c in input.iter().filter(|c| !c.is_ascii_whitespace()) {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return Err(bad()),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_like_glib() {
        assert_eq!(decode_base64(b"YWJj").unwrap(), b"abc");
        assert_eq!(decode_base64(b"YWJjZA==").unwrap(), b"abcd");
        assert_eq!(decode_base64(b"YWJjZGU=").unwrap(), b"abcde");
        assert!(decode_base64(b"YW*j").is_err());
    }

    #[test]
    fn secrets_are_defined_once_and_looked_up() {
        define("secret,id=t1,data=pw").unwrap();
        define("qom-type=secret,id=t2,data=cHc=,format=base64").unwrap();
        assert_eq!(lookup("t1").unwrap(), b"pw");
        assert_eq!(lookup("t2").unwrap(), b"pw");
        assert_eq!(lookup("nope").unwrap_err(), "No secret with id 'nope'");
        assert!(define("secret,id=t1,data=x").unwrap_err().contains("duplicate"));
        assert_eq!(define("secret,id=t3").unwrap_err(), "Either 'file' or 'data' must be provided");
    }
}
