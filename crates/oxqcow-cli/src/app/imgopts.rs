//! Image creation options (`-o key=value,...`) handled as qemu-img handles
//! them: the option list of the format followed by the file protocol's,
//! typed parsing with QEMU's messages, the "Formatting ..." line, `-o help`,
//! and the translation into the library's [`CreateOptions`].

use oxqcow::{Compat, CompressionType, CreateOptions, Encryption, EncryptionFormat, ImageFormat, Preallocation};

use oxqcow::qemu_syntax::{parse_size_option, split_options};

/// The type of an option's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptType {
    /// Any string.
    Str,
    /// on/off.
    Bool,
    /// An unsigned number (decimal, 0x hex or 0 octal).
    Number,
    /// A size with an optional suffix.
    Size,
}

impl OptType {
    fn help_name(self) -> &'static str {
        match self {
            OptType::Str => "str",
            OptType::Bool => "bool (on/off)",
            OptType::Number => "num",
            OptType::Size => "size",
        }
    }
}

/// One creation option.
#[derive(Debug)]
pub struct OptDesc {
    /// Name in option strings.
    pub name: &'static str,
    /// Value type.
    pub ty: OptType,
    /// One-line description for `-o help`.
    pub help: &'static str,
    /// Default printed in the "Formatting" line when the option is unset.
    pub default: Option<&'static str>,
}

const fn desc(name: &'static str, ty: OptType, help: &'static str, default: Option<&'static str>) -> OptDesc {
    OptDesc { name, ty, help, default }
}

const SIZE: OptDesc = desc("size", OptType::Size, "Virtual disk size", None);

/// qcow2's options, in QEMU's order (the "Formatting" line follows it).
const QCOW2_OPTS: &[OptDesc] = &[
    desc(
        "encryption",
        OptType::Bool,
        "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
        None,
    ),
    desc("encrypt.format", OptType::Str, "Encrypt the image, format choices: 'aes', 'luks'", None),
    desc("encrypt.key-secret", OptType::Str, "ID of secret providing qcow AES key or LUKS passphrase", None),
    desc("encrypt.cipher-alg", OptType::Str, "Name of encryption cipher algorithm", None),
    desc("encrypt.cipher-mode", OptType::Str, "Name of encryption cipher mode", None),
    desc("encrypt.ivgen-alg", OptType::Str, "Name of IV generator algorithm", None),
    desc("encrypt.ivgen-hash-alg", OptType::Str, "Name of IV generator hash algorithm", None),
    desc("encrypt.hash-alg", OptType::Str, "Name of encryption hash algorithm", None),
    desc("encrypt.iter-time", OptType::Number, "Time to spend in PBKDF in milliseconds", None),
    desc("cluster_size", OptType::Size, "qcow2 cluster size", Some("65536")),
    desc("extended_l2", OptType::Bool, "Extended L2 tables", Some("off")),
    desc("preallocation", OptType::Str, "Preallocation mode (allowed values: off, metadata, falloc, full)", None),
    desc("compression_type", OptType::Str, "Compression method used for image cluster compression", Some("zlib")),
    SIZE,
    desc("compat", OptType::Str, "Compatibility level (v2 [0.10] or v3 [1.1])", None),
    desc("backing_file", OptType::Str, "File name of a base image", None),
    desc("backing_fmt", OptType::Str, "Image format of the base image", None),
    desc("data_file", OptType::Str, "File name of an external data file", None),
    desc("data_file_raw", OptType::Bool, "The external data file must stay valid as a raw image", None),
    desc("lazy_refcounts", OptType::Bool, "Postpone refcount updates", Some("off")),
    desc("refcount_bits", OptType::Number, "Width of a reference count entry in bits", Some("16")),
];

/// raw's own options.
const RAW_OPTS: &[OptDesc] = &[SIZE];

/// luks's options, in QEMU's order (`block_crypto_create_opts_luks`).
const LUKS_OPTS: &[OptDesc] = &[
    SIZE,
    desc("key-secret", OptType::Str, "ID of the secret that provides the keyslot passphrase", None),
    desc("cipher-alg", OptType::Str, "Name of encryption cipher algorithm", None),
    desc("cipher-mode", OptType::Str, "Name of encryption cipher mode", None),
    desc("ivgen-alg", OptType::Str, "Name of IV generator algorithm", None),
    desc("ivgen-hash-alg", OptType::Str, "Name of IV generator hash algorithm", None),
    desc("hash-alg", OptType::Str, "Name of encryption hash algorithm", None),
    desc("iter-time", OptType::Number, "Time to spend in PBKDF in milliseconds", None),
    desc("detached-header", OptType::Bool, "Create a detached LUKS header", None),
];

/// qcow's options, in QEMU's order (oxqcow does not create qcow images,
/// but lists what qemu-img takes).
const QCOW_OPTS: &[OptDesc] = &[
    SIZE,
    desc("backing_file", OptType::Str, "File name of a base image", None),
    desc("backing_fmt", OptType::Str, "Format of the backing image", None),
    desc(
        "encryption",
        OptType::Bool,
        "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
        None,
    ),
    desc("encrypt.format", OptType::Str, "Encrypt the image, format choices: 'aes'", None),
    desc("encrypt.key-secret", OptType::Str, "ID of the secret that provides the AES encryption key", None),
];

/// The file protocol's options, appended to every format's.
const FILE_OPTS: &[OptDesc] = &[
    SIZE,
    desc("nocow", OptType::Bool, "Turn off copy-on-write (valid only on btrfs)", None),
    desc("preallocation", OptType::Str, "Preallocation mode (allowed values: off, falloc, full)", None),
    desc("extent_size_hint", OptType::Size, "Extent size hint for the image file, 0 to disable", None),
];

/// A format name qemu-img knows, as the options list needs it.
pub fn format_from_name(name: &str) -> Result<ImageFormat, String> {
    match name {
        "qcow2" => Ok(ImageFormat::Qcow2),
        "raw" => Ok(ImageFormat::Raw),
        "luks" => Ok(ImageFormat::Luks),
        "qcow" => Ok(ImageFormat::Qcow),
        other => Err(format!("Unknown file format '{other}'")),
    }
}

fn format_opts(format: ImageFormat) -> &'static [OptDesc] {
    match format {
        ImageFormat::Qcow2 => QCOW2_OPTS,
        ImageFormat::Raw => RAW_OPTS,
        ImageFormat::Luks => LUKS_OPTS,
        ImageFormat::Qcow => QCOW_OPTS,
    }
}

/// The format's list followed by the protocol's, first definition winning.
fn merged(format: ImageFormat) -> Vec<&'static OptDesc> {
    let mut out: Vec<&'static OptDesc> = Vec::new();
    for d in format_opts(format).iter().chain(FILE_OPTS) {
        if !out.iter().any(|o| o.name == d.name) {
            out.push(d);
        }
    }
    out
}

/// Whether qemu-img accepts `s` as one `-o` argument: not empty, no
/// leading comma, no unpaired trailing comma.
pub fn is_valid_option_list(s: &str) -> bool {
    if s.is_empty() || s.starts_with(',') {
        return false;
    }
    let trailing = s.len() - s.trim_end_matches(',').len();
    trailing % 2 == 0
}

/// Adds one `-o` argument to the accumulated list, as qemu-img does.
pub fn accumulate(options: &mut Option<String>, arg: &str) -> Result<(), String> {
    if !is_valid_option_list(arg) {
        return Err(format!("Invalid option list: {arg}"));
    }
    *options = Some(match options.take() {
        Some(old) => format!("{old},{arg}"),
        None => arg.to_string(),
    });
    Ok(())
}

/// Whether an option string asks for help (`help` or `?` as a key).
pub fn has_help_option(s: &str) -> bool {
    split_options(s).iter().any(|(k, v)| (k == "help" || k == "?") && v == "on")
}

/// Prints `-o help` for `format`, with the protocol's options when a file
/// name was given, as qemu-img's `print_block_option_help` does.
pub fn print_help(format: ImageFormat, with_filename: bool) {
    let mut list: Vec<&OptDesc> = if with_filename { merged(format) } else { format_opts(format).iter().collect() };
    list.sort_by_key(|d| d.name);
    if with_filename {
        println!("Supported options:");
    } else {
        println!("Supported {} options:", format.name());
    }
    for d in list {
        println!("  {:<22} - {}", format!("{}=<{}>", d.name, d.ty.help_name()), d.help);
    }
    if !with_filename {
        println!(
            "\nThe protocol level may support further options.\nSpecify the target filename to include those options."
        );
    }
}

/// Whether `s` parses against the format's creation options alone (not
/// the protocol's), as qemu-img's amend tries before hinting that an option
/// is only for image creation. `first` is tried first, its definitions
/// winning (QEMU appends the creation list to the amend list).
pub fn parses_with_create_opts(format: ImageFormat, first: &[OptDesc], s: &str) -> bool {
    let mut list: Vec<&OptDesc> = first.iter().collect();
    for d in format_opts(format) {
        if !list.iter().any(|o| o.name == d.name) {
            list.push(d);
        }
    }
    split_options(s).iter().all(|(k, v)| list.iter().find(|d| d.name == k).is_some_and(|d| d.check(v).is_ok()))
}

impl OptDesc {
    /// Type-checks a value with QEMU's messages.
    pub fn check(&self, value: &str) -> Result<(), String> {
        match self.ty {
            OptType::Str => Ok(()),
            OptType::Bool => parse_bool(self.name, value).map(|_| ()),
            OptType::Number => parse_number(self.name, value).map(|_| ()),
            OptType::Size => parse_size_option(self.name, value).map(|_| ()),
        }
    }

    /// A description of an option (for other commands' option lists).
    pub const fn new(name: &'static str, ty: OptType, help: &'static str) -> OptDesc {
        desc(name, ty, help, None)
    }

    /// The `-o help` line: `  name=<type>  - help`.
    pub fn help_line(&self) -> String {
        format!("  {:<22} - {}", format!("{}=<{}>", self.name, self.ty.help_name()), self.help)
    }
}

/// A parsed value.
#[derive(Clone, Debug)]
enum Parsed {
    Str,
    Bool(bool),
    Number(u64),
}

/// The options given for one image, typed and in the order they came.
pub struct ImgOpts {
    format: ImageFormat,
    descs: Vec<&'static OptDesc>,
    values: Vec<(&'static str, String, Parsed)>,
}

impl ImgOpts {
    /// An empty set for `format`.
    pub fn new(format: ImageFormat) -> ImgOpts {
        ImgOpts { format, descs: merged(format), values: Vec::new() }
    }

    /// Parses an option string into the set, type-checking each value with
    /// QEMU's messages ("Invalid parameter 'x'", "Parameter 'x' expects ...").
    pub fn parse(&mut self, s: &str) -> Result<(), String> {
        for (key, value) in split_options(s) {
            self.set(&key, &value)?;
        }
        Ok(())
    }

    /// Sets one option from its text.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let Some(d) = self.descs.iter().find(|d| d.name == key) else {
            return Err(format!("Invalid parameter '{key}'"));
        };
        let parsed = match d.ty {
            OptType::Str => Parsed::Str,
            OptType::Bool => Parsed::Bool(parse_bool(d.name, value)?),
            OptType::Number => Parsed::Number(parse_number(d.name, value)?),
            OptType::Size => Parsed::Number(parse_size_option(d.name, value)?),
        };
        self.values.push((d.name, value.to_string(), parsed));
        Ok(())
    }

    /// Sets a numeric option (the size operand).
    pub fn set_number(&mut self, key: &'static str, n: u64) {
        self.values.push((key, n.to_string(), Parsed::Number(n)));
    }

    fn get(&self, key: &str) -> Option<&(&'static str, String, Parsed)> {
        self.values.iter().rev().find(|(k, _, _)| *k == key)
    }

    /// Whether `key` was given.
    pub fn is_set(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// The text of a string option.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).map(|(_, v, _)| v.as_str())
    }

    /// The value of a numeric option.
    pub fn get_number(&self, key: &str) -> Option<u64> {
        match self.get(key) {
            Some((_, _, Parsed::Number(n))) => Some(*n),
            _ => None,
        }
    }

    fn get_bool(&self, key: &str) -> Option<bool> {
        match self.get(key) {
            Some((_, _, Parsed::Bool(b))) => Some(*b),
            _ => None,
        }
    }

    /// The options as qemu-img lists them after "Formatting 'x', fmt=F ":
    /// every option that is set or has a default, in list order.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        for d in &self.descs {
            let text = match self.get(d.name) {
                Some((_, raw, parsed)) => match (d.ty, parsed) {
                    (OptType::Str, _) => raw.replace(',', ",,"),
                    // Numbers print as signed 64-bit values, as QEMU's PRId64 does.
                    (OptType::Size | OptType::Number, Parsed::Number(n)) => (*n as i64).to_string(),
                    _ => raw.clone(),
                },
                None => match d.default {
                    Some(def) => def.to_string(),
                    None => continue,
                },
            };
            parts.push(format!("{}={}", d.name, text));
        }
        parts.join(" ")
    }

    /// Translates the options into the library's creation options, with the
    /// messages QEMU's creation code gives for values of the wrong kind.
    /// The size must have been set.
    pub fn to_create_options(&self) -> Result<CreateOptions, String> {
        let size = self.get_number("size").unwrap_or(0);
        let prealloc = self.get_str("preallocation");
        if self.format == ImageFormat::Raw {
            let mut o = CreateOptions::raw(size);
            if let Some(p) = prealloc {
                o.preallocation = match p {
                    "off" => Preallocation::Off,
                    "falloc" => Preallocation::Falloc,
                    "full" => Preallocation::Full,
                    // Refused by the raw driver after it took the file, as QEMU's
                    // file driver refuses it (the file is then empty).
                    "metadata" => Preallocation::Metadata,
                    other => return Err(format!("invalid parameter value: {other}")),
                };
            }
            return Ok(o);
        }
        if self.format == ImageFormat::Luks {
            return self.luks_create_options(size);
        }
        let mut o = CreateOptions::qcow2(size);
        // A backing file named by protocol is checked through the CLI's
        // openers (create, convert -B).
        o.protocols = crate::app::backing_protocols::protocols();
        if self.format == ImageFormat::Qcow {
            o.format = ImageFormat::Qcow;
            return Ok(o);
        }
        o.encryption = self.encryption()?;
        // Values of the wrong kind, in the order QEMU's QAPI visitor meets them.
        if let Some(v) = self.get_str("compat") {
            o.compat = match v {
                "0.10" | "v2" => Compat::V2,
                "1.1" | "v3" => Compat::V3,
                other => return Err(format!("Parameter 'version' does not accept value '{other}'")),
            };
        }
        if let Some(p) = prealloc {
            o.preallocation = Preallocation::from_name(p).map_err(|e| e.to_string())?;
        }
        if let Some(c) = self.get_str("compression_type") {
            o.compression_type = match c {
                "zlib" => CompressionType::Zlib,
                "zstd" => CompressionType::Zstd,
                other => return Err(format!("Parameter 'compression-type' does not accept value '{other}'")),
            };
        }
        o.backing_file = self.get_str("backing_file").map(String::from);
        o.backing_format = self.get_str("backing_fmt").map(String::from);
        o.data_file = self.get_str("data_file").map(String::from);
        o.data_file_raw = self.get_bool("data_file_raw").unwrap_or(false);
        o.extended_l2 = self.get_bool("extended_l2").unwrap_or(false);
        o.lazy_refcounts = self.get_bool("lazy_refcounts").unwrap_or(false);
        if let Some(cs) = self.get_number("cluster_size") {
            o.cluster_size = cs;
        }
        if let Some(bits) = self.get_number("refcount_bits") {
            // Anything past u32 is as invalid as 128 bits.
            o.refcount_bits = u32::try_from(bits).unwrap_or(u32::MAX);
        }
        Ok(o)
    }
}

impl ImgOpts {
    /// The `encryption` / `encrypt.*` options as QEMU's qcow2 creation
    /// reads them (`QCryptoBlockCreateOptions`), with its messages; the
    /// secret is looked up by id.
    pub fn encryption(&self) -> Result<Option<Encryption>, String> {
        let legacy = self.get_bool("encryption") == Some(true);
        let format = match (self.get_str("encrypt.format"), legacy) {
            (Some(_), true) => {
                return Err("'encrypt.format' and its alias 'encryption' can't be used at the same time".into())
            }
            (Some(f), false) => f,
            (None, true) => "aes",
            (None, false) => {
                let any = QCOW2_OPTS.iter().any(|d| d.name.starts_with("encrypt.") && self.is_set(d.name));
                return if any { Err("Parameter 'encrypt.format' is missing".into()) } else { Ok(None) };
            }
        };
        const LUKS_ONLY: [&str; 6] = [
            "encrypt.cipher-alg",
            "encrypt.cipher-mode",
            "encrypt.ivgen-alg",
            "encrypt.ivgen-hash-alg",
            "encrypt.hash-alg",
            "encrypt.iter-time",
        ];
        let mut unavailable = None;
        let format = match format {
            "aes" => {
                if let Some(k) = LUKS_ONLY.iter().find(|k| self.is_set(k)) {
                    return Err(format!("Parameter '{k}' is unexpected"));
                }
                EncryptionFormat::Aes
            }
            "luks" => {
                let (p, a) = self.luks_params("encrypt.")?;
                unavailable = a;
                EncryptionFormat::Luks(p)
            }
            other => return Err(format!("Parameter 'format' does not accept value '{other}'")),
        };
        let passphrase = secret(self.get_str("encrypt.key-secret"), "encrypt.")?;
        if let EncryptionFormat::Luks(p) = &format {
            check_luks_params(p, unavailable)?;
        }
        Ok(Some(Encryption { format, passphrase }))
    }

    /// The LUKS parameters of the options named `PREFIX<name>` (`encrypt.`
    /// for qcow2, none for luks), with QEMU's messages for values it does
    /// not know; and the name of a cipher QEMU knows but cannot use, which
    /// is refused once the secret is looked up, as
    /// `qcrypto_block_luks_create` does.
    fn luks_params(&self, prefix: &str) -> Result<(oxqcow::options::LuksParams, Option<&str>), String> {
        use oxqcow::format::luks::{CipherAlg, CipherMode, HashAlg, IvGenAlg};
        // QEMU's enum names; the hashes it knows that oxqcow cannot do yet
        // are refused as such.
        fn pick<T>(
            v: Option<&str>,
            name: &str,
            known: &[&str],
            parse: fn(&str) -> Option<T>,
        ) -> Result<Option<T>, String> {
            let Some(v) = v else { return Ok(None) };
            if let Some(t) = parse(v) {
                return Ok(Some(t));
            }
            if known.contains(&v) {
                return Err(format!("not supported yet: {name} '{v}'"));
            }
            Err(format!("Parameter '{name}' does not accept value '{v}'"))
        }
        const HASHES: &[&str] = &["md5", "ripemd160", "sm3"];
        let get = |name: &str| self.get_str(&format!("{prefix}{name}"));
        let mut p = oxqcow::options::LuksParams::default();
        let mut unavailable = None;
        // QAPI knows these names, but QEMU's LUKS has no cipher name for
        // them (and this QEMU build no SM4).
        match get("cipher-alg") {
            Some(a @ ("des" | "3des" | "sm4")) => unavailable = Some(a),
            a => {
                if let Some(a) = pick(a, "cipher-alg", &[], CipherAlg::from_name)? {
                    p.cipher_alg = a;
                }
            }
        }
        if let Some(m) = pick(get("cipher-mode"), "cipher-mode", &[], CipherMode::from_name)? {
            p.cipher_mode = m;
        }
        if let Some(g) = pick(get("ivgen-alg"), "ivgen-alg", &[], IvGenAlg::from_name)? {
            p.ivgen_alg = g;
        }
        p.ivgen_hash_alg = pick(get("ivgen-hash-alg"), "ivgen-hash-alg", HASHES, HashAlg::from_name)?;
        if let Some(h) = pick(get("hash-alg"), "hash-alg", HASHES, HashAlg::from_name)? {
            p.hash_alg = h;
        }
        if let Some(t) = self.get_number(&format!("{prefix}iter-time")) {
            p.iter_time_ms = t;
        }
        Ok((p, unavailable))
    }

    /// A luks image's creation options, checked in the order QEMU's luks
    /// driver checks them.
    fn luks_create_options(&self, size: u64) -> Result<CreateOptions, String> {
        let mut o = CreateOptions { format: ImageFormat::Luks, size, size_given: true, ..Default::default() };
        if let Some(p) = self.get_str("preallocation") {
            // QEMU's luks driver parses it first, as a bare enum value.
            o.preallocation = Preallocation::from_name(p).map_err(|_| format!("invalid parameter value: {p}"))?;
        }
        let (params, unavailable) = self.luks_params("")?;
        // QEMU 10's qemu-img cannot make detached headers: its option list
        // offers the option, its creation refuses it whatever the value.
        if self.is_set("detached-header") {
            return Err("Parameter 'detached-header' is unexpected".into());
        }
        let passphrase = secret(self.get_str("key-secret"), "")?;
        check_luks_params(&params, unavailable)?;
        o.encryption = Some(Encryption { format: EncryptionFormat::Luks(params), passphrase });
        Ok(o)
    }
}

/// The passphrase the secret option `PREFIXkey-secret` names, with QEMU's
/// messages.
fn secret(id: Option<&str>, prefix: &str) -> Result<Vec<u8>, String> {
    let Some(id) = id else {
        return Err(format!("Parameter '{prefix}key-secret' is required for cipher"));
    };
    crate::app::secrets::lookup(id)
}

/// Refuses LUKS parameters QEMU's creation refuses, with its messages.
fn check_luks_params(p: &oxqcow::options::LuksParams, unavailable: Option<&str>) -> Result<(), String> {
    use oxqcow::format::luks::{HashAlg, IvGenAlg};
    if let Some(a) = unavailable {
        return Err(format!("Algorithm '{a}' not supported"));
    }
    if let (IvGenAlg::Essiv, h) = (p.ivgen_alg, p.ivgen_hash_alg.unwrap_or(HashAlg::Sha256)) {
        oxqcow::format::luks::essiv_cipher(p.cipher_alg, h)?;
    }
    oxqcow::format::luks::check_mode(p.cipher_alg, p.cipher_mode)
}

/// QEMU's boolean option values.
pub fn parse_bool(name: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(format!("Parameter '{name}' expects 'on' or 'off'")),
    }
}

/// QEMU's number option values (`qemu_strtou64` with base 0: decimal, `0x`
/// hex, `0` octal, a sign wrapping around).
pub fn parse_number(name: &str, value: &str) -> Result<u64, String> {
    let invalid = || format!("Parameter '{name}' expects a number");
    let t = value.trim_start_matches(|c: char| c.is_ascii_whitespace());
    let (negative, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (16, h)
    } else if t.len() > 1 && t.starts_with('0') {
        (8, &t[1..])
    } else {
        (10, t)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(invalid());
    }
    let n = u64::from_str_radix(digits, radix)
        .map_err(|_| format!("Value '{value}' is too large for parameter '{name}'"))?;
    Ok(if negative { n.wrapping_neg() } else { n })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_lists_as_qemu_img_accepts_them() {
        assert!(has_help_option("cluster_size=4k,help"));
        assert!(has_help_option("?"));
        assert!(!has_help_option("help=off"));
        assert!(!is_valid_option_list(",a=1"));
        assert!(!is_valid_option_list("a=1,"));
        assert!(is_valid_option_list("a=1,,"));
        assert!(!is_valid_option_list(""));
    }

    #[test]
    fn formatting_line_like_qemu() {
        let mut o = ImgOpts::new(ImageFormat::Qcow2);
        o.parse("cluster_size=4k,lazy_refcounts=yes,backing_file=a,,b,refcount_bits=-1").unwrap();
        o.set_number("size", 1 << 30);
        assert_eq!(
            o.summary(),
            "cluster_size=4096 extended_l2=off compression_type=zlib size=1073741824 \
             backing_file=a,,b lazy_refcounts=yes refcount_bits=-1"
        );
        let mut r = ImgOpts::new(ImageFormat::Raw);
        r.parse("nocow=on,preallocation=off,extent_size_hint=0").unwrap();
        r.set_number("size", 1 << 20);
        assert_eq!(r.summary(), "size=1048576 nocow=on preallocation=off extent_size_hint=0");
        assert_eq!(r.parse("cluster_size=4k").unwrap_err(), "Invalid parameter 'cluster_size'");
    }

    #[test]
    fn typed_values() {
        let mut o = ImgOpts::new(ImageFormat::Qcow2);
        assert_eq!(o.parse("refcount_bits=abc").unwrap_err(), "Parameter 'refcount_bits' expects a number");
        assert_eq!(o.parse("lazy_refcounts=maybe").unwrap_err(), "Parameter 'lazy_refcounts' expects 'on' or 'off'");
        assert!(o
            .parse("cluster_size=abc")
            .unwrap_err()
            .starts_with("Parameter 'cluster_size' expects a non-negative"));
        assert_eq!(
            o.parse("refcount_bits=99999999999999999999").unwrap_err(),
            "Value '99999999999999999999' is too large for parameter 'refcount_bits'"
        );
        o.parse("refcount_bits=010,cluster_size=0x1000").unwrap();
        assert_eq!(o.get_number("refcount_bits"), Some(8));
        assert_eq!(o.get_number("cluster_size"), Some(4096));
    }
}
