//! The `secret` objects, kept by id, and the `encrypt.*` open options that
//! name them. [`crate::app::objects`] parses their `--object` definitions.
//!
//! qemu-img takes passphrases only through secret objects
//! (`--object secret,id=sec0,data=...` or `file=PATH`, optionally
//! `format=base64`) and image options naming them
//! (`encrypt.key-secret=sec0`). Secrets are process-wide, as QEMU's object
//! tree is: every subcommand defines its `--object`s through
//! [`crate::app::objects::define`] and resolves ids when it opens or
//! creates images.

use std::collections::BTreeMap;
use std::sync::Mutex;

use oxqcow::OpenOptions;

static SECRETS: Mutex<BTreeMap<String, Vec<u8>>> = Mutex::new(BTreeMap::new());

/// Keeps secret `id`; false (and nothing kept) when a secret has that id.
pub fn insert(id: String, value: Vec<u8>) -> bool {
    let mut secrets = SECRETS.lock().unwrap_or_else(|p| p.into_inner());
    if secrets.contains_key(&id) {
        return false;
    }
    secrets.insert(id, value);
    true
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

/// Applies a secret open option (qcow2's and qcow's `encrypt.key-secret=ID`,
/// `backing.encrypt.key-secret=ID`, `encrypt.format=...`; luks's
/// `key-secret=ID`). `Ok(false)` when `key` is not one of them.
pub fn apply_open_option(opts: &mut OpenOptions, key: &str, value: &str) -> Result<bool, String> {
    match key {
        "encrypt.key-secret" => opts.passphrase = Some(lookup(value)?),
        "key-secret" => opts.key_secret = Some(lookup(value)?),
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
}
