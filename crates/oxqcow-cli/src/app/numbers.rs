//! Numbers on the command line as QEMU reads them: sizes with suffixes
//! (`qemu_strtosz`), C integers (`strtoul` base 0), and qemu-img's
//! `cvtnum` range checks with its messages.

/// qemu-img's `cvtnum_full`: a size with an optional suffix, between `min`
/// and `max`, with qemu-img's messages naming the value as `name`.
pub fn cvtnum(name: &str, value: &str, min: u64, max: u64) -> Result<u64, String> {
    let range = || format!("Invalid {name} specified. Must be between {min} and {max}.");
    if value.trim_start().starts_with('-') {
        return Err(range());
    }
    let n = oxqcow::options::parse_size(value).map_err(|_| format!("Invalid {name} specified: '{value}'."))?;
    if n < min || n > max {
        return Err(range());
    }
    Ok(n)
}

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

/// An integer as C's `strtoul(s, &end, 0)` reads it with nothing allowed
/// after it: decimal, `0x` hexadecimal or `0` octal, optionally signed.
/// Negative values (other than zero) and overflow are out of range.
pub fn strtoul0(s: &str) -> Result<u64, SizeError> {
    let t = s.trim_start_matches(|c: char| c.is_ascii_whitespace());
    let (negative, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let hex = (t.starts_with("0x") || t.starts_with("0X")) && t[2..].starts_with(|c: char| c.is_ascii_hexdigit());
    let (radix, digits) = if hex {
        (16, &t[2..])
    } else if t.starts_with('0') {
        (8, t)
    } else {
        (10, t)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(SizeError::Invalid);
    }
    let v = u64::from_str_radix(digits, radix).map_err(|_| SizeError::Range)?;
    if negative && v != 0 {
        return Err(SizeError::Range);
    }
    Ok(v)
}

/// Parses a size operand as qemu-img's `cvtnum` does, with its messages
/// ("Invalid image size specified: 'x'." / "... Must be between ...").
pub fn parse_size_operand(what: &str, s: &str) -> Result<u64, String> {
    match qemu_strtosz(s) {
        Ok(v) if v <= i64::MAX as u64 => Ok(v),
        Err(SizeError::Invalid) => Err(format!("Invalid {what} specified: '{s}'.")),
        _ => Err(format!("Invalid {what} specified. Must be between 0 and {}.", i64::MAX)),
    }
}

/// Parses a size-typed QemuOpts value (`-o cluster_size=...`), with QEMU's
/// messages.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strtosz_like_qemu() {
        let ok = |s: &str| qemu_strtosz(s).unwrap();
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
        for bad in ["0x1k", "0x", "1.5", "1.5b", "1k5", "1k ", "0.1", "1e3", "1kb", "1G.", "", "k", "."] {
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
        assert_eq!(
            parse_size_operand("image size", "8E").unwrap_err(),
            "Invalid image size specified. Must be between 0 and 9223372036854775807."
        );
    }

    #[test]
    fn strtoul_like_c() {
        assert_eq!(strtoul0("10"), Ok(10));
        assert_eq!(strtoul0("010"), Ok(8));
        assert_eq!(strtoul0("0x10"), Ok(16));
        assert_eq!(strtoul0(" +7"), Ok(7));
        assert_eq!(strtoul0("-0"), Ok(0));
        assert_eq!(strtoul0("-1"), Err(SizeError::Range));
        assert_eq!(strtoul0("99999999999999999999"), Err(SizeError::Range));
        for bad in ["1k", "08", "0x", "", "1.0", "x", "-"] {
            assert_eq!(strtoul0(bad), Err(SizeError::Invalid), "{bad}");
        }
    }
}
