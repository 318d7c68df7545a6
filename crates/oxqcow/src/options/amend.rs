//! What `amend` may change on an existing image, parsed from QEMU's option
//! string with qemu-img's refusals.

use super::{parse_bool, parse_size, Compat};
use crate::error::{Error, Result};

/// The options `amend` may change. `None` leaves a setting as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AmendOptions {
    /// Compatibility level.
    pub compat: Option<Compat>,
    /// Lazy refcounts.
    pub lazy_refcounts: Option<bool>,
    /// Refcount width in bits.
    pub refcount_bits: Option<u32>,
    /// New guest size (0, like absent, leaves the size alone as in QEMU).
    pub size: Option<u64>,
    /// Backing file: may only repeat the current one (use rebase to change it).
    pub backing_file: Option<String>,
    /// Backing format: may only repeat the current one.
    pub backing_format: Option<String>,
    /// External data file name: only for images that have one.
    pub data_file: Option<String>,
    /// Whether the external data file is raw: cannot be turned on.
    pub data_file_raw: Option<bool>,
    /// Whether any `encrypt.*` option was given (only LUKS images take them).
    pub encryption: bool,
}

/// Options qemu-img accepts at creation only.
const CREATE_ONLY: &[&str] =
    &["cluster_size", "preallocation", "extended_l2", "compression_type", "encryption", "encrypt.format"];

/// The `encrypt.*` options qcow2 can amend (on LUKS images).
const ENCRYPT_AMEND: &[&str] =
    &["encrypt.state", "encrypt.keyslot", "encrypt.old-secret", "encrypt.new-secret", "encrypt.iter-time"];

impl AmendOptions {
    /// Parses a QEMU option string (`compat=0.10,lazy_refcounts=off`).
    pub fn parse(s: &str) -> Result<AmendOptions> {
        let mut o = AmendOptions::default();
        for (k, v) in crate::qemu_syntax::split_options(s) {
            match k.as_str() {
                "compat" => o.compat = Some(Compat::from_amend_name(&v)?),
                "lazy_refcounts" => o.lazy_refcounts = Some(parse_bool(&k, &v)?),
                "refcount_bits" => {
                    let bits: u32 = v.parse().map_err(|_| {
                        Error::InvalidArgument(format!("Parameter 'refcount_bits' expects a number, got '{v}'"))
                    })?;
                    check_refcount_bits(bits)?;
                    o.refcount_bits = Some(bits);
                }
                "size" => o.size = Some(parse_size(&v)?),
                "backing_file" => o.backing_file = Some(v),
                "backing_fmt" => o.backing_format = Some(v),
                "data_file" => o.data_file = Some(v),
                "data_file_raw" => o.data_file_raw = Some(parse_bool(&k, &v)?),
                key if ENCRYPT_AMEND.contains(&key) => o.encryption = true,
                key if CREATE_ONLY.contains(&key) || key.starts_with("encrypt.") => {
                    return Err(Error::InvalidArgument(format!(
                        "Invalid parameter '{key}'\nThis option is only supported for image creation"
                    )))
                }
                key => return Err(Error::InvalidArgument(format!("Invalid parameter '{key}'"))),
            }
        }
        Ok(o)
    }
}

impl Compat {
    /// Parses a `compat=` value as amend and create take it.
    pub fn from_amend_name(v: &str) -> Result<Compat> {
        match v {
            "0.10" | "v2" => Ok(Compat::V2),
            "1.1" | "v3" => Ok(Compat::V3),
            other => Err(Error::InvalidArgument(format!("Unknown compatibility level {other}"))),
        }
    }
}

/// QEMU's refcount width rule.
pub fn check_refcount_bits(bits: u32) -> Result<()> {
    if bits == 0 || bits > 64 || !bits.is_power_of_two() {
        return Err(Error::InvalidArgument("Refcount width must be a power of two and may not exceed 64 bits".into()));
    }
    Ok(())
}
