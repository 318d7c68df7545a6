//! Command line parsing as qemu-img does it: GNU `getopt_long` with its
//! argument permutation (options may follow operands until `--`), clustered
//! short flags (`-pq`), attached values (`-fqcow2`, `--output=json`),
//! unambiguous long-option prefixes (`--out=json`), and glibc's error lines
//! ("qemu-img map: invalid option -- 'z'") followed by qemu-img's hint.

/// Whether an option takes a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HasArg {
    /// A flag.
    No,
    /// Takes a value (`--name=value` or `--name value`).
    Required,
}

/// One long option: its name, whether it takes a value, and the key the
/// parser reports for it (the equivalent short option's letter, or the long
/// name itself when there is none).
#[derive(Clone, Copy, Debug)]
pub struct LongOpt {
    /// Name without the leading dashes.
    pub name: &'static str,
    /// Whether it takes a value.
    pub arg: HasArg,
    /// The key reported in [`Parsed::opts`].
    pub key: &'static str,
}

/// Shorthand for a [`LongOpt`].
pub const fn long(name: &'static str, arg: HasArg, key: &'static str) -> LongOpt {
    LongOpt { name, arg, key }
}

/// What the command line said, in order.
#[derive(Debug, Default)]
pub struct Parsed {
    /// `(key, value)` pairs: the key is the short letter as a string, or a
    /// long option's own key.
    pub opts: Vec<(String, Option<String>)>,
    /// The non-option arguments.
    pub operands: Vec<String>,
}

/// Parses `args` (without the command name) against a getopt short option
/// string (`"hf:U"`: a letter followed by `:` takes a value) and long
/// options. On error, returns the complete message (glibc's line and the
/// hint line), ready to print on stderr.
pub fn parse(prog: &str, cmd: &str, args: &[String], short: &str, longs: &[LongOpt]) -> Result<Parsed, String> {
    let hint = format!("Try '{prog} {cmd} --help' for more info");
    let who = format!("{prog} {cmd}");
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
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (body, None),
            };
            let opt = match find_long(longs, name) {
                Ok(o) => o,
                Err(LongLookup::Unknown) => return Err(format!("{who}: unrecognized option '--{name}'\n{hint}")),
                Err(LongLookup::Ambiguous(names)) => {
                    let list: Vec<String> = names.iter().map(|n| format!("'--{n}'")).collect();
                    return Err(format!(
                        // glibc names the whole argument, value included.
                        "{who}: option '--{body}' is ambiguous; possibilities: {}\n{hint}",
                        list.join(" ")
                    ));
                }
            };
            let value = match (opt.arg, inline) {
                (HasArg::No, Some(_)) => {
                    return Err(format!("{who}: option '--{}' doesn't allow an argument\n{hint}", opt.name))
                }
                (HasArg::No, None) => None,
                (HasArg::Required, Some(v)) => Some(v),
                (HasArg::Required, None) => {
                    let Some(v) = args.get(i) else {
                        return Err(format!("{who}: option '--{}' requires an argument\n{hint}", opt.name));
                    };
                    i += 1;
                    Some(v.clone())
                }
            };
            out.opts.push((opt.key.to_string(), value));
            continue;
        }
        if arg.len() < 2 || !arg.starts_with('-') {
            out.operands.push(arg.clone());
            continue;
        }
        // A cluster of short options.
        let chars: Vec<char> = arg[1..].chars().collect();
        let mut k = 0;
        while k < chars.len() {
            let c = chars[k];
            k += 1;
            match short_arg(short, c) {
                None => return Err(format!("{who}: invalid option -- '{c}'\n{hint}")),
                Some(HasArg::No) => out.opts.push((c.to_string(), None)),
                Some(HasArg::Required) => {
                    let value = if k < chars.len() {
                        let v: String = chars[k..].iter().collect();
                        k = chars.len();
                        v
                    } else if let Some(v) = args.get(i) {
                        i += 1;
                        v.clone()
                    } else {
                        return Err(format!("{who}: option requires an argument -- '{c}'\n{hint}"));
                    };
                    out.opts.push((c.to_string(), Some(value)));
                }
            }
        }
    }
    Ok(out)
}

fn short_arg(short: &str, c: char) -> Option<HasArg> {
    if c == ':' {
        return None;
    }
    let mut it = short.trim_start_matches(':').chars().peekable();
    while let Some(x) = it.next() {
        let takes = it.peek() == Some(&':');
        if takes {
            it.next();
        }
        if x == c {
            return Some(if takes { HasArg::Required } else { HasArg::No });
        }
    }
    None
}

/// oxqcow's own long options, which qemu-img does not have: they match only
/// when spelled out, so that every abbreviation qemu-img accepts keeps its
/// meaning (`--form=qcow2` stays `--format`, not ambiguous with
/// `--forbid-backing`).
const EXACT_ONLY: &[&str] = &[crate::common::FORBID_BACKING];

enum LongLookup {
    Unknown,
    Ambiguous(Vec<&'static str>),
}

fn find_long<'a>(longs: &'a [LongOpt], name: &str) -> Result<&'a LongOpt, LongLookup> {
    if name.is_empty() {
        return Err(LongLookup::Unknown);
    }
    if let Some(o) = longs.iter().find(|o| o.name == name) {
        return Ok(o);
    }
    let matches: Vec<&LongOpt> =
        longs.iter().filter(|o| o.name.starts_with(name) && !EXACT_ONLY.contains(&o.name)).collect();
    match matches.as_slice() {
        [] => Err(LongLookup::Unknown),
        [one] => Ok(one),
        many => {
            // Prefixes of several names that all mean the same option are fine.
            let first = many[0];
            if many.iter().all(|o| o.key == first.key && o.arg == first.arg) {
                Ok(first)
            } else {
                Err(LongLookup::Ambiguous(many.iter().map(|o| o.name).collect()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    const LONGS: &[LongOpt] = &[
        long("help", HasArg::No, "h"),
        long("output", HasArg::Required, "output"),
        long("start-offset", HasArg::Required, "start-offset"),
        long("force-share", HasArg::No, "U"),
    ];

    #[test]
    fn permutes_and_clusters() {
        let p =
            parse("q", "map", &v(&["a", "-Uffmt", "--out=json", "--start-offset", "5", "b"]), "hf:U", LONGS).unwrap();
        assert_eq!(p.operands, v(&["a", "b"]));
        let keys: Vec<_> = p.opts.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
        assert_eq!(keys, vec![("U", None), ("f", Some("fmt")), ("output", Some("json")), ("start-offset", Some("5"))]);
    }

    #[test]
    fn double_dash_ends_options() {
        let p = parse("q", "map", &v(&["--", "-U"]), "U", LONGS).unwrap();
        assert_eq!(p.operands, v(&["-U"]));
        assert!(p.opts.is_empty());
    }

    #[test]
    fn own_options_match_only_spelled_out() {
        let longs = &[long("format", HasArg::Required, "f"), long("forbid-backing", HasArg::No, "forbid-backing")];
        let p = parse("q", "map", &v(&["--for=qcow2", "--forbid-backing"]), "f:", longs).unwrap();
        let keys: Vec<_> = p.opts.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
        assert_eq!(keys, vec![("f", Some("qcow2")), ("forbid-backing", None)]);
        let e =
            parse("q", "map", &v(&["--fo=x"]), "f:", &[longs[0], long("force-share", HasArg::No, "U")]).unwrap_err();
        assert!(
            e.starts_with("q map: option '--fo=x' is ambiguous; possibilities: '--format' '--force-share'\n"),
            "{e}"
        );
        let e = parse("q", "map", &v(&["--forbid"]), "f:", longs).unwrap_err();
        assert!(e.starts_with("q map: unrecognized option '--forbid'\n"), "{e}");
    }

    #[test]
    fn glibc_messages() {
        let e = parse("q", "map", &v(&["-z"]), "hf:U", LONGS).unwrap_err();
        assert_eq!(e, "q map: invalid option -- 'z'\nTry 'q map --help' for more info");
        let e = parse("q", "map", &v(&["-f"]), "hf:U", LONGS).unwrap_err();
        assert_eq!(e, "q map: option requires an argument -- 'f'\nTry 'q map --help' for more info");
        let e = parse("q", "map", &v(&["--foo"]), "hf:U", LONGS).unwrap_err();
        assert!(e.starts_with("q map: unrecognized option '--foo'\n"));
        let e = parse("q", "map", &v(&["--output"]), "hf:U", LONGS).unwrap_err();
        assert!(e.starts_with("q map: option '--output' requires an argument\n"));
        let e = parse("q", "map", &v(&["--help=x"]), "hf:U", LONGS).unwrap_err();
        assert!(e.starts_with("q map: option '--help' doesn't allow an argument\n"));
    }
}
