//! QEMU-style argument parsing for `io` and `bench`: a GNU `getopt_long`
//! emulation that hands options back one at a time, in order (qemu-io acts
//! on each option as getopt returns it, so an error in `-P 300` is reported
//! before a later unknown option), and QEMU's `qemu_strtosz` size parser.

/// Whether an option takes a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HasArg {
    /// A flag.
    No,
    /// Takes a value (`-f FMT`, `-fFMT`, `--format FMT`, `--format=FMT`).
    Yes,
}

/// A long option: its name, whether it takes a value, and the key getopt
/// returns for it (a short option letter, or a private code for long-only
/// options).
#[derive(Clone, Copy, Debug)]
pub struct LongOpt {
    /// Name without the leading dashes.
    pub name: &'static str,
    /// Value requirement.
    pub arg: HasArg,
    /// What the parser reports when it is found.
    pub key: char,
}

/// One step of the parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// An option with its value.
    Opt(char, Option<String>),
    /// A malformed option; the message is glibc's, prefixed with the
    /// program name. Parsing stops here.
    Error(String),
}

/// The options of a command line in order (stopping after the first
/// error) and its operands.
#[derive(Debug, Default)]
pub struct Parsed {
    /// Options as getopt returns them.
    pub items: Vec<Item>,
    /// Non-option arguments, in order (GNU getopt permutes them to the end).
    pub operands: Vec<String>,
}

/// Parses `args` (without the program name) as GNU `getopt_long` would
/// with the short option string `short` (`"c:f:r"`: a colon after a letter
/// means it takes a value) and the long options `long`. `prog` prefixes
/// error messages as argv[0] does for glibc.
pub fn getopt(prog: &str, args: &[String], short: &str, long: &[LongOpt]) -> Parsed {
    let mut out = Parsed::default();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if arg == "--" {
            out.operands.extend(args[i..].iter().cloned());
            break;
        }
        if let Some(body) = arg.strip_prefix("--") {
            match long_option(prog, body, long, args, &mut i) {
                Ok(item) => out.items.push(item),
                Err(msg) => {
                    out.items.push(Item::Error(msg));
                    return out;
                }
            }
            continue;
        }
        if arg.len() < 2 || !arg.starts_with('-') {
            out.operands.push(arg.clone());
            continue;
        }
        // A cluster of short options: "-qv", "-P0x12", "-P 0x12".
        let letters: Vec<char> = arg[1..].chars().collect();
        let mut j = 0;
        while j < letters.len() {
            let c = letters[j];
            j += 1;
            match short_spec(short, c) {
                None => {
                    out.items.push(Item::Error(format!("{prog}: invalid option -- '{c}'")));
                    return out;
                }
                Some(HasArg::No) => out.items.push(Item::Opt(c, None)),
                Some(HasArg::Yes) => {
                    if j < letters.len() {
                        out.items.push(Item::Opt(c, Some(letters[j..].iter().collect())));
                    } else if let Some(v) = args.get(i) {
                        i += 1;
                        out.items.push(Item::Opt(c, Some(v.clone())));
                    } else {
                        out.items.push(Item::Error(format!("{prog}: option requires an argument -- '{c}'")));
                        return out;
                    }
                    break;
                }
            }
        }
    }
    out
}

fn short_spec(short: &str, c: char) -> Option<HasArg> {
    if c == ':' {
        return None;
    }
    let pos = short.find(c)?;
    Some(if short[pos + c.len_utf8()..].starts_with(':') { HasArg::Yes } else { HasArg::No })
}

fn long_option(prog: &str, body: &str, long: &[LongOpt], args: &[String], i: &mut usize) -> Result<Item, String> {
    let (name, inline) = match body.split_once('=') {
        Some((n, v)) => (n, Some(v.to_string())),
        None => (body, None),
    };
    // An exact match wins; otherwise a unique prefix is accepted, as glibc does.
    let opt = match long.iter().find(|o| o.name == name) {
        Some(o) => o,
        None => {
            let candidates: Vec<&LongOpt> = long.iter().filter(|o| o.name.starts_with(name)).collect();
            match candidates.as_slice() {
                [one] => one,
                [] => return Err(format!("{prog}: unrecognized option '--{name}'")),
                many => {
                    // Prefixes of options that all mean the same thing are not ambiguous.
                    let first = many[0];
                    if many.iter().all(|o| o.key == first.key && o.arg == first.arg) {
                        first
                    } else {
                        let list: Vec<String> = many.iter().map(|o| format!("'--{}'", o.name)).collect();
                        return Err(format!(
                            "{prog}: option '--{name}' is ambiguous; possibilities: {}",
                            list.join(" ")
                        ));
                    }
                }
            }
        }
    };
    match (opt.arg, inline) {
        (HasArg::No, Some(_)) => Err(format!("{prog}: option '--{}' doesn't allow an argument", opt.name)),
        (HasArg::No, None) => Ok(Item::Opt(opt.key, None)),
        (HasArg::Yes, Some(v)) => Ok(Item::Opt(opt.key, Some(v))),
        (HasArg::Yes, None) => match args.get(*i) {
            Some(v) => {
                *i += 1;
                Ok(Item::Opt(opt.key, Some(v.clone())))
            }
            None => Err(format!("{prog}: option '--{}' requires an argument", opt.name)),
        },
    }
}

/// Why a size did not parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeError {
    /// Not a number, or junk after it (`EINVAL`).
    Invalid,
    /// Negative or too large (`ERANGE`).
    Range,
}

/// Parses a size as QEMU 10's `qemu_strtosz`: a decimal number (or `0x`
/// hexadecimal, without fraction or suffix), optionally with a fraction,
/// and an optional binary suffix `B K M G T P E` (either case; a fraction
/// needs a suffix other than `B`). Negative numbers are out of range.
pub fn strtosz(s: &str) -> Result<u64, SizeError> {
    let t = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (sign_minus, digits_at) = match t.as_bytes().first() {
        Some(b'-') => (true, 1),
        Some(b'+') => (false, 1),
        _ => (false, 0),
    };
    let body = &t[digits_at..];
    let int_len = body.bytes().take_while(u8::is_ascii_digit).count();
    let rest = &body[int_len..];
    if sign_minus && (int_len > 0 || rest.starts_with('.')) {
        return Err(SizeError::Range);
    }
    let mut val: u64 = 0;
    let mut frac: u64 = 0; // 0.64 fixed point
    let mut tail: &str;
    if int_len > 0 {
        val = body[..int_len].parse::<u64>().map_err(|_| SizeError::Range)?;
        tail = rest;
        if val == 0 && (tail.starts_with('x') || tail.starts_with('X')) {
            // Hexadecimal: reparse, no fraction and no suffix allowed.
            let hex = &tail[1..];
            let hex_len = hex.bytes().take_while(u8::is_ascii_hexdigit).count();
            if hex_len == 0 {
                // strtoull stops after the "0": the "x" is junk.
                return Err(SizeError::Invalid);
            }
            val = u64::from_str_radix(&hex[..hex_len], 16).map_err(|_| SizeError::Range)?;
            let after = &hex[hex_len..];
            if after.starts_with('.') || suffix_shift(after).is_some() || !after.is_empty() {
                return Err(SizeError::Invalid);
            }
            return Ok(val);
        }
        if let Some(after_dot) = tail.strip_prefix('.') {
            let frac_len = after_dot.bytes().take_while(u8::is_ascii_digit).count();
            frac = fraction_bits(&after_dot[..frac_len]);
            if frac == u64::MAX {
                // The fraction rounded up to one whole unit.
                val = val.checked_add(1).ok_or(SizeError::Range)?;
                frac = 0;
            }
            tail = &after_dot[frac_len..];
        }
    } else if let Some(after_dot) = rest.strip_prefix('.') {
        let frac_len = after_dot.bytes().take_while(u8::is_ascii_digit).count();
        if frac_len == 0 {
            return Err(SizeError::Invalid);
        }
        frac = fraction_bits(&after_dot[..frac_len]);
        if frac == u64::MAX {
            val = 1;
            frac = 0;
        }
        tail = &after_dot[frac_len..];
    } else {
        return Err(SizeError::Invalid);
    }
    let (shift, tail) = match suffix_shift(tail) {
        Some(shift) => (shift, &tail[1..]),
        None => (0, tail),
    };
    if !tail.is_empty() {
        return Err(SizeError::Invalid);
    }
    if shift == 0 {
        if frac != 0 {
            return Err(SizeError::Invalid);
        }
        return Ok(val);
    }
    let mul = 1u128 << shift;
    let whole = u128::from(val) * mul;
    let part = u128::from(frac) * mul;
    // 64.64 fixed point times the multiplier, rounding half up.
    let total = whole + (part >> 64) + ((part >> 63) & 1);
    u64::try_from(total).map_err(|_| SizeError::Range)
}

/// The first byte of `s` as a size suffix: the shift it stands for.
fn suffix_shift(s: &str) -> Option<u32> {
    Some(match s.as_bytes().first()? {
        b'b' | b'B' => 0,
        b'k' | b'K' => 10,
        b'm' | b'M' => 20,
        b'g' | b'G' => 30,
        b't' | b'T' => 40,
        b'p' | b'P' => 50,
        b'e' | b'E' => 60,
        _ => return None,
    })
}

/// Decimal fraction digits as a 0.64 fixed-point value; `u64::MAX` when
/// they round to one. Any nonzero fraction gives a nonzero value.
fn fraction_bits(digits: &str) -> u64 {
    if digits.is_empty() {
        return 0;
    }
    let f: f64 = format!("0.{digits}").parse().unwrap_or(0.0);
    if f >= 1.0 {
        return u64::MAX;
    }
    let bits = f * 18_446_744_073_709_551_616.0;
    if bits >= 18_446_744_073_709_551_615.0 {
        return u64::MAX;
    }
    let v = bits as u64;
    if v == 0 && f > 0.0 {
        1
    } else {
        v
    }
}

/// qemu-img/qemu-io's `cvtnum`: a size that must also fit in an `int64_t`.
pub fn cvtnum(s: &str) -> Result<u64, SizeError> {
    let v = strtosz(s)?;
    if v > i64::MAX as u64 {
        return Err(SizeError::Range);
    }
    Ok(v)
}

/// An integer as C's `strtoul(s, &end, 0)` reads it with nothing allowed
/// after it: decimal, `0x` hexadecimal or `0` octal, optionally signed.
/// Negative values (other than zero) and overflow are out of range.
pub fn strtoul0(s: &str) -> Result<u64, SizeError> {
    let t = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let hex =
        (t.starts_with("0x") || t.starts_with("0X")) && t[2..].bytes().next().is_some_and(|b| b.is_ascii_hexdigit());
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
    if neg && v != 0 {
        return Err(SizeError::Range);
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn sizes_as_qemu_parses_them() {
        assert_eq!(strtosz("0"), Ok(0));
        assert_eq!(strtosz("512"), Ok(512));
        assert_eq!(strtosz("010"), Ok(10));
        assert_eq!(strtosz("0x10"), Ok(16));
        assert_eq!(strtosz("+1"), Ok(1));
        assert_eq!(strtosz("1b"), Ok(1));
        assert_eq!(strtosz("4k"), Ok(4096));
        assert_eq!(strtosz("1.5k"), Ok(1536));
        assert_eq!(strtosz("0.1k"), Ok(102));
        assert_eq!(strtosz("1.0"), Ok(1));
        assert_eq!(strtosz("1.k"), Ok(1024));
        assert_eq!(strtosz(".5k"), Ok(512));
        assert_eq!(strtosz("1e"), Ok(1 << 60));
        assert_eq!(strtosz("1.5"), Err(SizeError::Invalid));
        assert_eq!(strtosz("x"), Err(SizeError::Invalid));
        assert_eq!(strtosz(""), Err(SizeError::Invalid));
        assert_eq!(strtosz("1kib"), Err(SizeError::Invalid));
        assert_eq!(strtosz("0x10k"), Err(SizeError::Invalid));
        assert_eq!(strtosz("0x"), Err(SizeError::Invalid));
        assert_eq!(strtosz("1 "), Err(SizeError::Invalid));
        assert_eq!(strtosz("-1"), Err(SizeError::Range));
        assert_eq!(strtosz("99999999999999999999"), Err(SizeError::Range));
        assert_eq!(strtosz("16E"), Err(SizeError::Range));
        assert_eq!(cvtnum("8E"), Err(SizeError::Range));
        assert_eq!(cvtnum("7E"), Ok(7 << 60));
    }

    #[test]
    fn integers_as_strtoul_reads_them() {
        assert_eq!(strtoul0("10"), Ok(10));
        assert_eq!(strtoul0("010"), Ok(8));
        assert_eq!(strtoul0("0x10"), Ok(16));
        assert_eq!(strtoul0("0"), Ok(0));
        assert_eq!(strtoul0("-0"), Ok(0));
        assert_eq!(strtoul0("-1"), Err(SizeError::Range));
        assert_eq!(strtoul0("99999999999999999999"), Err(SizeError::Range));
        assert_eq!(strtoul0("1k"), Err(SizeError::Invalid));
        assert_eq!(strtoul0("08"), Err(SizeError::Invalid));
        assert_eq!(strtoul0("0x"), Err(SizeError::Invalid));
        assert_eq!(strtoul0(""), Err(SizeError::Invalid));
        assert_eq!(strtoul0("1.0"), Err(SizeError::Invalid));
    }

    #[test]
    fn getopt_in_order_with_permutation() {
        let p = getopt("read", &args(&["0", "-qP", "0x12", "1", "-v"]), "P:qv", &[]);
        assert_eq!(p.items, vec![Item::Opt('q', None), Item::Opt('P', Some("0x12".into())), Item::Opt('v', None)]);
        assert_eq!(p.operands, args(&["0", "1"]));
        let p = getopt("read", &args(&["-P1", "-x", "-q"]), "P:q", &[]);
        assert_eq!(p.items, vec![Item::Opt('P', Some("1".into())), Item::Error("read: invalid option -- 'x'".into())]);
        let p = getopt("read", &args(&["-P"]), "P:q", &[]);
        assert_eq!(p.items, vec![Item::Error("read: option requires an argument -- 'P'".into())]);
        let p = getopt("read", &args(&["--", "-1"]), "P:q", &[]);
        assert!(p.items.is_empty());
        assert_eq!(p.operands, args(&["-1"]));
    }

    #[test]
    fn getopt_long_options() {
        let long = [
            LongOpt { name: "format", arg: HasArg::Yes, key: 'f' },
            LongOpt { name: "force-share", arg: HasArg::No, key: 'U' },
            LongOpt { name: "cache", arg: HasArg::Yes, key: 't' },
        ];
        let p = getopt("p", &args(&["--format=raw", "--cache", "none", "--forc", "x"]), "f:Ut:", &long);
        assert_eq!(
            p.items,
            vec![Item::Opt('f', Some("raw".into())), Item::Opt('t', Some("none".into())), Item::Opt('U', None)]
        );
        let p = getopt("p", &args(&["--fo"]), "", &long);
        assert_eq!(
            p.items,
            vec![Item::Error("p: option '--fo' is ambiguous; possibilities: '--format' '--force-share'".into())]
        );
        let p = getopt("p", &args(&["--bogus"]), "", &long);
        assert_eq!(p.items, vec![Item::Error("p: unrecognized option '--bogus'".into())]);
        let p = getopt("p", &args(&["--force-share=1"]), "", &long);
        assert_eq!(p.items, vec![Item::Error("p: option '--force-share' doesn't allow an argument".into())]);
        let p = getopt("p", &args(&["--cache"]), "", &long);
        assert_eq!(p.items, vec![Item::Error("p: option '--cache' requires an argument".into())]);
    }
}
