//! QEMU's syntax for sizes and option strings, the one implementation the
//! whole workspace uses: sizes as `qemu_strtosz` reads them, size-typed
//! option values with QemuOpts' messages, and option strings split as
//! QemuOpts splits them (`util/qemu-option.c`).

/// Why a size did not parse (QEMU's `qemu_strtosz` results).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeError {
    /// Not a size.
    Invalid,
    /// A size, but not below 2^64 (or negative).
    Range,
}

/// Parses a size as QEMU's `qemu_strtosz`: decimal with an optional
/// fraction and a binary suffix (b, k/K, M, G, T, P, E; a fraction needs a
/// suffix other than b), or `0x` hex without fraction or suffix; leading
/// whitespace and `+` are allowed, nothing may follow.
pub fn qemu_strtosz(s: &str) -> Result<u64, SizeError> {
    let t = s.trim_start_matches(|c: char| c.is_ascii_whitespace());
    if let Some(negative) = t.strip_prefix('-') {
        // A negative number is out of range; a lone minus sign is junk.
        let number = negative.starts_with(|c: char| c.is_ascii_digit())
            || negative.strip_prefix('.').is_some_and(|f| f.starts_with(|c: char| c.is_ascii_digit()));
        return Err(if number { SizeError::Range } else { SizeError::Invalid });
    }
    let t = t.strip_prefix('+').unwrap_or(t);
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (int_part, rest) = t.split_at(digits);
    if int_part == "0" && (rest.starts_with('x') || rest.starts_with('X')) {
        let hex = &rest[1..];
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(SizeError::Invalid);
        }
        return u64::from_str_radix(hex, 16).map_err(|_| SizeError::Range);
    }
    let int: u64 = if int_part.is_empty() { 0 } else { int_part.parse().map_err(|_| SizeError::Range)? };
    let (frac_digits, rest) = match rest.strip_prefix('.') {
        Some(after) => {
            let n = after.bytes().take_while(u8::is_ascii_digit).count();
            (Some(&after[..n]), &after[n..])
        }
        None => (None, rest),
    };
    if int_part.is_empty() && frac_digits.is_none_or(str::is_empty) {
        return Err(SizeError::Invalid);
    }
    let shift = match rest {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return Err(SizeError::Invalid),
    };
    // The fraction as a 64-bit binary fixed-point number, as QEMU keeps it.
    let frac: u64 = match frac_digits {
        Some(d) if !d.is_empty() => {
            let f: f64 = format!("0.{d}").parse().map_err(|_| SizeError::Invalid)?;
            if f >= 1.0 {
                u64::MAX
            } else {
                let v = (f * 18_446_744_073_709_551_616.0) as u64;
                if v == 0 && f > 0.0 {
                    1
                } else {
                    v
                }
            }
        }
        _ => 0,
    };
    if shift == 0 {
        if frac != 0 {
            return Err(SizeError::Invalid);
        }
        return Ok(int);
    }
    // 64.64 fixed point times 2^shift, rounding 0.5 up.
    let whole = u128::from(int) << shift;
    let frac_scaled = u128::from(frac) << shift;
    let value = whole + (frac_scaled >> 64) + ((frac_scaled >> 63) & 1);
    u64::try_from(value).map_err(|_| SizeError::Range)
}

/// Parses a size-typed QemuOpts value (`cluster_size=64k`,
/// `l2-cache-size=1M`), with QEMU's messages naming the parameter.
pub fn parse_size_option(name: &str, value: &str) -> Result<u64, String> {
    match qemu_strtosz(value) {
        Ok(v) => Ok(v),
        Err(SizeError::Range) => Err(format!("Value '{value}' is out of range for parameter '{name}'")),
        Err(SizeError::Invalid) => Err(format!(
            "Parameter '{name}' expects a non-negative number below 2^64\n\
             Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
             and exabytes, respectively."
        )),
    }
}

/// Parses a number-typed QemuOpts value (`cache-clean-interval=600`) as
/// QEMU's `qemu_strtou64` reads it: decimal, `0x` hexadecimal or `0`
/// octal, and a leading `-` negating modulo 2^64 as `strtoull` does.
pub fn parse_number_option(name: &str, value: &str) -> Result<u64, String> {
    let expects = || format!("Parameter '{name}' expects a number");
    let (negative, t) = match value.as_bytes().first() {
        Some(b'-') => (true, &value[1..]),
        Some(b'+') => (false, &value[1..]),
        _ => (false, value),
    };
    let (radix, digits) = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => (16, hex),
        None if t.len() > 1 && t.starts_with('0') => (8, &t[1..]),
        None => (10, t),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(expects());
    }
    let v = u64::from_str_radix(digits, radix)
        .map_err(|_| format!("Value '{value}' is too large for parameter '{name}'"))?;
    Ok(if negative { v.wrapping_neg() } else { v })
}

/// Parses a bool-typed QemuOpts value as QEMU does (on/off, yes/no,
/// true/false, y/n).
pub fn parse_bool_option(name: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(format!("Parameter '{name}' expects 'on' or 'off'")),
    }
}

/// One `key=value` of an option string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionItem {
    /// The key (without a `no` that turned a flag off).
    pub key: String,
    /// The value; `on` or `off` for a flag.
    pub value: String,
    /// Given as a flag (`key` or `nokey`), a form QEMU warns is deprecated
    /// where it parses "noisily" (`--image-opts`, qemu-io's `-o`), except
    /// for `help` and `?`.
    pub flag: bool,
}

impl OptionItem {
    /// The flag as it was written (`key`, `nokey`), for QEMU's warning.
    pub fn as_written(&self) -> String {
        match self.value.as_str() {
            "off" => format!("no{}", self.key),
            _ => self.key.clone(),
        }
    }

    /// Whether QEMU warns about this item: a flag other than a help
    /// request (`nohelp` is warned about).
    pub fn deprecated_flag(&self) -> bool {
        self.flag && !(self.value == "on" && matches!(self.key.as_str(), "help" | "?"))
    }
}

/// Splits an option string into its items as QemuOpts does
/// (`get_opt_name_value`): a key runs to the first `=` or `,`; a value
/// runs to the next single `,` (`,,` is a literal comma); a key without
/// `=` is a flag, `key=on`, or `X=off` when the key is `noX` (so `no` is
/// `=off`); an empty item (a leading comma, two commas between keys) is
/// the flag `""`. A trailing comma ends the string.
pub fn option_items(s: &str) -> Vec<OptionItem> {
    items(s, None)
}

/// [`option_items`] with QEMU's implied first key (QemuOpts' `firstname`,
/// `implied_head`): a first item without `=` is the value of `implied`,
/// so `secret,id=s0` reads as `qom-type=secret,id=s0`.
pub fn option_items_implied(s: &str, implied: &str) -> Vec<OptionItem> {
    items(s, Some(implied))
}

fn items(s: &str, mut implied: Option<&str>) -> Vec<OptionItem> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while chars.peek().is_some() {
        let first = implied.take();
        let mut after_key = chars.clone();
        let mut key = String::new();
        while let Some(&c) = after_key.peek() {
            if c == '=' || c == ',' {
                break;
            }
            key.push(c);
            after_key.next();
        }
        if after_key.peek() == Some(&'=') {
            after_key.next();
            chars = after_key;
            out.push(OptionItem { key, value: value(&mut chars), flag: false });
            continue;
        }
        if let Some(name) = first {
            out.push(OptionItem { key: name.to_string(), value: value(&mut chars), flag: false });
            continue;
        }
        // At a ',' (or the end): skip it.
        chars = after_key;
        chars.next();
        let item = match key.strip_prefix("no") {
            Some(rest) => OptionItem { key: rest.to_string(), value: "off".into(), flag: true },
            None => OptionItem { key, value: "on".into(), flag: true },
        };
        out.push(item);
    }
    out
}

/// A value (QEMU's `get_opt_value`): up to the next single `,`, which is
/// consumed; `,,` is a literal comma.
fn value(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> String {
    let mut value = String::new();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                value.push(',');
                continue;
            }
            break;
        }
        value.push(c);
    }
    value
}

/// [`option_items`] as `(key, value)` pairs.
pub fn split_options(s: &str) -> Vec<(String, String)> {
    option_items(s).into_iter().map(|i| (i.key, i.value)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Guards `cache-clean-interval=-1`, which QEMU reads as 2^64-1 (and
    // then refuses as too big) rather than as a malformed number.
    #[test]
    fn numbers_as_qemu_strtou64_reads_them() {
        let n = |s: &str| parse_number_option("n", s);
        assert_eq!(n("600"), Ok(600));
        assert_eq!(n("0x10"), Ok(16));
        assert_eq!(n("010"), Ok(8));
        assert_eq!(n("0"), Ok(0));
        assert_eq!(n("-1"), Ok(u64::MAX));
        assert_eq!(n("abc"), Err("Parameter 'n' expects a number".into()));
        assert_eq!(n("5k"), Err("Parameter 'n' expects a number".into()));
        assert_eq!(
            n("99999999999999999999"),
            Err("Value '99999999999999999999' is too large for parameter 'n'".into())
        );
    }

    #[test]
    fn strtosz_like_qemu() {
        let ok = |s: &str| qemu_strtosz(s).unwrap();
        assert_eq!(ok("0"), 0);
        assert_eq!(ok("512"), 512);
        assert_eq!(ok("4k"), 4096);
        assert_eq!(ok("64K"), 65536);
        assert_eq!(ok("1G"), 1 << 30);
        assert_eq!(ok("1.5M"), 3 << 19);
        assert_eq!(ok("2T"), 2 << 40);
        assert_eq!(ok("0X10"), 16);
        assert_eq!(ok("1.k"), 1024);
        assert_eq!(ok(".5k"), 512);
        assert_eq!(ok("1.5K"), 1536);
        assert_eq!(ok(" 1k"), 1024);
        assert_eq!(ok("+1"), 1);
        assert_eq!(ok("010"), 10);
        assert_eq!(ok("1b"), 1);
        assert_eq!(ok("1.0000000001k"), 1024);
        assert_eq!(ok("7.99E"), 9_211_842_821_808_707_328);
        assert_eq!(ok("8E"), 1 << 63);
        for bad in ["0x1k", "0x", "1.5", "1.5b", "1k5", "1k ", "0.1", "1e3", "1kb", "1G.", "", "k", ".", "1x"] {
            assert_eq!(qemu_strtosz(bad), Err(SizeError::Invalid), "{bad}");
        }
        assert_eq!(qemu_strtosz("-1"), Err(SizeError::Range));
        assert_eq!(qemu_strtosz("-.5k"), Err(SizeError::Range));
        assert_eq!(qemu_strtosz("-x"), Err(SizeError::Invalid));
        assert_eq!(qemu_strtosz("-"), Err(SizeError::Invalid));
        assert_eq!(ok("0.1k"), 102);
        assert_eq!(ok("1e"), 1 << 60);
        assert_eq!(qemu_strtosz("16E"), Err(SizeError::Range));
        assert_eq!(qemu_strtosz("99999999999999999999"), Err(SizeError::Range));
    }

    #[test]
    fn size_options_with_qemu_messages() {
        assert_eq!(parse_size_option("cluster_size", "0x1000"), Ok(4096));
        assert_eq!(
            parse_size_option("l2-cache-size", "16E").unwrap_err(),
            "Value '16E' is out of range for parameter 'l2-cache-size'"
        );
        assert!(parse_size_option("size", "1x")
            .unwrap_err()
            .starts_with("Parameter 'size' expects a non-negative number below 2^64\n"));
    }

    #[test]
    fn splitting_like_qemu() {
        let pairs = |s: &str| split_options(s);
        let v = pairs("a=1,,2,lazy,nofoo,b=");
        let v: Vec<(&str, &str)> = v.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(v, [("a", "1,2"), ("lazy", "on"), ("foo", "off"), ("b", "")]);
        assert_eq!(pairs("cluster_size=4k,compat=0.10,lazy_refcounts")[2], ("lazy_refcounts".into(), "on".into()));
        assert_eq!(pairs("backing_file=a,,b"), [("backing_file".into(), "a,b".into())]);
        // Empty items and `no` alone are flags named "", as in QEMU.
        assert_eq!(pairs(",a=1"), [("".into(), "on".into()), ("a".into(), "1".into())]);
        assert_eq!(pairs("a=1,no"), [("a".into(), "1".into()), ("".into(), "off".into())]);
        // A trailing comma ends the string; `,,` inside a key does not escape.
        assert_eq!(pairs("a=1,"), [("a".into(), "1".into())]);
        assert_eq!(pairs("a,,b=1"), [("a".into(), "on".into()), ("".into(), "on".into()), ("b".into(), "1".into())]);
        assert_eq!(pairs("a=x=y"), [("a".into(), "x=y".into())]);
        assert!(pairs("").is_empty());
    }

    #[test]
    fn an_implied_first_key() {
        let pairs = |s: &str| -> Vec<(String, String)> {
            option_items_implied(s, "qom-type").into_iter().map(|i| (i.key, i.value)).collect()
        };
        assert_eq!(pairs("secret,id=s0"), [("qom-type".into(), "secret".into()), ("id".into(), "s0".into())]);
        assert_eq!(pairs("sec,,ret,id=s0")[0], ("qom-type".into(), "sec,ret".into()));
        assert_eq!(pairs("id=s0,secret"), [("id".into(), "s0".into()), ("secret".into(), "on".into())]);
        assert_eq!(pairs("nosecret"), [("qom-type".into(), "nosecret".into())]);
        assert_eq!(pairs(",id=s0"), [("qom-type".into(), "".into()), ("id".into(), "s0".into())]);
    }

    #[test]
    fn flags_and_their_warnings() {
        let items = option_items("read-only,noauto,help,?,no,nohelp,k=v");
        let shown: Vec<(String, bool)> = items.iter().map(|i| (i.as_written(), i.deprecated_flag())).collect();
        assert_eq!(
            shown,
            [
                ("read-only".into(), true),
                ("noauto".into(), true),
                ("help".into(), false),
                ("?".into(), false),
                ("no".into(), true),
                ("nohelp".into(), true),
                ("k".into(), false)
            ]
        );
    }
}
