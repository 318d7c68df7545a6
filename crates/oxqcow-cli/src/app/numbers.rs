//! Numbers on the command line as qemu-img reads them: qemu-img's `cvtnum`
//! (a size, [`oxqcow::qemu_syntax::qemu_strtosz`], in a range, with its
//! messages) and C integers (`strtoul` base 0).

use oxqcow::qemu_syntax::{qemu_strtosz, SizeError};

/// qemu-img's `cvtnum_full`: a size with an optional suffix, between `min`
/// and `max`, with qemu-img's messages naming the value as `name`.
pub fn cvtnum(name: &str, value: &str, min: u64, max: u64) -> Result<u64, String> {
    match qemu_strtosz(value) {
        Err(SizeError::Invalid) => Err(format!("Invalid {name} specified: '{value}'.")),
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("Invalid {name} specified. Must be between {min} and {max}.")),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cvtnum_like_qemu_img() {
        // qemu-img's cvtnum_full: qemu_strtosz, then the range.
        assert_eq!(cvtnum("start offset", "0x10000", 0, i64::MAX as u64), Ok(65536));
        assert_eq!(cvtnum("start offset", " 1k", 0, i64::MAX as u64), Ok(1024));
        let invalid = |v: &str| format!("Invalid start offset specified: '{v}'.");
        let range = "Invalid start offset specified. Must be between 0 and 9223372036854775807.";
        for v in ["1k ", "-x", "1.5", "0x", ""] {
            assert_eq!(cvtnum("start offset", v, 0, i64::MAX as u64).unwrap_err(), invalid(v), "{v}");
        }
        for v in ["-1", "99999999999999999999", "8E"] {
            assert_eq!(cvtnum("start offset", v, 0, i64::MAX as u64).unwrap_err(), range, "{v}");
        }
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
