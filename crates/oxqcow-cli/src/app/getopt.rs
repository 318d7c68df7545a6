//! Command-line parsing with GNU `getopt_long` semantics, as qemu-img uses
//! it: options and operands may be interleaved, `--` ends the options, short
//! options cluster (`-qf qcow2`, `-fqcow2`), long options take `=value` or
//! the next argument and may be abbreviated to any unique prefix. Errors
//! carry glibc's wording so that messages match qemu-img's.

/// Whether an option takes an argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HasArg {
    /// A flag.
    No,
    /// Takes a value (`-f FMT`, `--format FMT`, `--format=FMT`).
    Required,
}

/// One option a command accepts.
#[derive(Clone, Copy, Debug)]
pub struct Opt {
    /// Long name without the dashes, if any.
    pub long: Option<&'static str>,
    /// Short letter, if any.
    pub short: Option<char>,
    /// Argument requirement.
    pub arg: HasArg,
    /// The key reported for it, when not the default (see [`Opt::key`]).
    pub alias_of: Option<&'static str>,
}

impl Opt {
    /// An option with both a short and a long spelling.
    pub const fn both(short: char, long: &'static str, arg: HasArg) -> Opt {
        Opt { long: Some(long), short: Some(short), arg, alias_of: None }
    }
    /// A long-only option.
    pub const fn long(long: &'static str, arg: HasArg) -> Opt {
        Opt { long: Some(long), short: None, arg, alias_of: None }
    }
    /// A short-only option.
    pub const fn short(short: char, arg: HasArg) -> Opt {
        Opt { long: None, short: Some(short), arg, alias_of: None }
    }
    /// A long option reported under another option's key (qemu-img's
    /// `--source-image-opts` means `--image-opts`, `--a-format` means `-f`).
    pub const fn alias(long: &'static str, arg: HasArg, key: &'static str) -> Opt {
        Opt { long: Some(long), short: None, arg, alias_of: Some(key) }
    }
    /// The name the parse result reports: the alias target, else the short
    /// letter when there is one, else the long name.
    pub fn key(&self) -> String {
        match (self.alias_of, self.short, self.long) {
            (Some(k), _, _) => k.to_string(),
            (None, Some(c), _) => c.to_string(),
            (None, None, Some(l)) => l.to_string(),
            (None, None, None) => String::new(),
        }
    }
}

/// Parses a command line declared the way qemu-img declares it: a getopt
/// short option string (`"hf:U"`, a leading `:` allowed) and long options
/// given as aliases of keys. Errors carry glibc's line naming `prog cmd`
/// and the "Try ... --help" hint.
pub fn parse_declared(prog: &str, cmd: &str, args: &[String], short: &str, longs: &[Opt]) -> Result<Parsed, String> {
    let mut spec = short_options(short);
    spec.extend_from_slice(longs);
    parse(&format!("{prog} {cmd}"), args, &spec).map_err(|e| format!("{e}\nTry '{prog} {cmd} --help' for more info"))
}

/// The options of a getopt short option string (`"hf:U"`: a colon after a
/// letter means it takes a value; a leading `:` is allowed).
pub fn short_options(short: &str) -> Vec<Opt> {
    let mut spec: Vec<Opt> = Vec::new();
    let mut chars = short.trim_start_matches(':').chars().peekable();
    while let Some(c) = chars.next() {
        let arg = if chars.peek() == Some(&':') {
            chars.next();
            HasArg::Required
        } else {
            HasArg::No
        };
        spec.push(Opt::short(c, arg));
    }
    spec
}

/// The options (in order) and the operands of a command line.
#[derive(Debug, Default)]
pub struct Parsed {
    /// `(key, value)` pairs; `key` as [`Opt::key`].
    pub opts: Vec<(String, Option<String>)>,
    /// Operands, in order.
    pub operands: Vec<String>,
}

/// Parses `args` against `spec`. `prog` prefixes error messages the way
/// glibc prefixes them with argv[0] ("qemu-img info: ...").
pub fn parse(prog: &str, args: &[String], spec: &[Opt]) -> Result<Parsed, String> {
    match parse_until_error(prog, args, spec) {
        (parsed, None) => Ok(parsed),
        (_, Some(error)) => Err(error),
    }
}

/// Like [`parse`], but keeps the options that came before a malformed one:
/// programs that act on each option as getopt returns it (qemu-io) report
/// a bad value in an earlier option before the malformed later one.
pub fn parse_until_error(prog: &str, args: &[String], spec: &[Opt]) -> (Parsed, Option<String>) {
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
            let opt = match find_long(prog, arg, name, spec) {
                Ok(opt) => opt,
                Err(e) => return (out, Some(e)),
            };
            let long = opt.long.unwrap_or(name);
            let value = match (opt.arg, inline) {
                (HasArg::No, Some(_)) => {
                    return (out, Some(format!("{prog}: option '--{long}' doesn't allow an argument")))
                }
                (HasArg::No, None) => None,
                (HasArg::Required, Some(v)) => Some(v),
                (HasArg::Required, None) => {
                    let Some(v) = args.get(i) else {
                        return (out, Some(format!("{prog}: option '--{long}' requires an argument")));
                    };
                    i += 1;
                    Some(v.clone())
                }
            };
            out.opts.push((opt.key(), value));
            continue;
        }
        if arg.len() > 1 && arg.starts_with('-') {
            let chars: Vec<char> = arg.chars().skip(1).collect();
            let mut k = 0;
            while k < chars.len() {
                let c = chars[k];
                k += 1;
                let Some(opt) = spec.iter().find(|o| o.short == Some(c)) else {
                    return (out, Some(format!("{prog}: invalid option -- '{c}'")));
                };
                match opt.arg {
                    HasArg::No => out.opts.push((opt.key(), None)),
                    HasArg::Required => {
                        let value = if k < chars.len() {
                            chars[k..].iter().collect()
                        } else if let Some(v) = args.get(i) {
                            i += 1;
                            v.clone()
                        } else {
                            return (out, Some(format!("{prog}: option requires an argument -- '{c}'")));
                        };
                        out.opts.push((opt.key(), Some(value)));
                        break;
                    }
                }
            }
            continue;
        }
        out.operands.push(arg.clone());
    }
    (out, None)
}

/// oxqcow's own long options, which qemu-img does not have: they match only
/// when spelled out, so that every abbreviation qemu-img accepts keeps its
/// meaning (`--form=qcow2` stays `--format`, not ambiguous with
/// `--forbid-backing`).
const EXACT_ONLY: &[&str] = &[crate::app::forbid_backing::FORBID_BACKING];

fn find_long<'a>(prog: &str, arg: &str, name: &str, spec: &'a [Opt]) -> Result<&'a Opt, String> {
    if let Some(exact) = spec.iter().find(|o| o.long == Some(name)) {
        return Ok(exact);
    }
    let candidates: Vec<&Opt> =
        spec.iter().filter(|o| o.long.is_some_and(|l| l.starts_with(name) && !EXACT_ONLY.contains(&l))).collect();
    match candidates.as_slice() {
        [] => Err(format!("{prog}: unrecognized option '{arg}'")),
        [one] => Ok(one),
        // Like glibc: prefixes of several names meaning the same option are fine.
        [first, rest @ ..] if rest.iter().all(|o| o.key() == first.key() && o.arg == first.arg) => Ok(first),
        many => {
            let names: Vec<String> = many.iter().map(|o| format!("'--{}'", o.long.unwrap_or_default())).collect();
            Err(format!("{prog}: option '{arg}' is ambiguous; possibilities: {}", names.join(" ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &[Opt] = &[
        Opt::both('f', "format", HasArg::Required),
        Opt::short('q', HasArg::No),
        Opt::long("output", HasArg::Required),
        Opt::long("object", HasArg::Required),
        Opt::both('h', "help", HasArg::No),
    ];

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn interleaved_and_clustered() {
        let p = parse("p", &args(&["x", "-qfqcow2", "--out=json", "y", "--format", "raw", "--", "-z"]), SPEC).unwrap();
        assert_eq!(p.operands, args(&["x", "y", "-z"]));
        let keys: Vec<(&str, Option<&str>)> = p.opts.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
        assert_eq!(keys, vec![("q", None), ("f", Some("qcow2")), ("output", Some("json")), ("f", Some("raw"))]);
    }

    #[test]
    fn glibc_messages() {
        assert_eq!(parse("p", &args(&["-z"]), SPEC).unwrap_err(), "p: invalid option -- 'z'");
        assert_eq!(parse("p", &args(&["-f"]), SPEC).unwrap_err(), "p: option requires an argument -- 'f'");
        assert_eq!(parse("p", &args(&["--foo=1"]), SPEC).unwrap_err(), "p: unrecognized option '--foo=1'");
        assert_eq!(parse("p", &args(&["--output"]), SPEC).unwrap_err(), "p: option '--output' requires an argument");
        assert_eq!(parse("p", &args(&["--help=x"]), SPEC).unwrap_err(), "p: option '--help' doesn't allow an argument");
        assert_eq!(
            parse("p", &args(&["--o=json"]), SPEC).unwrap_err(),
            "p: option '--o=json' is ambiguous; possibilities: '--output' '--object'"
        );
    }

    #[test]
    fn own_options_match_only_spelled_out() {
        let spec = &[
            Opt::both('f', "format", HasArg::Required),
            Opt::long("force-share", HasArg::No),
            Opt::long(crate::app::forbid_backing::FORBID_BACKING, HasArg::No),
        ];
        let p = parse("p", &args(&["--form=qcow2", "--forbid-backing"]), spec).unwrap();
        let keys: Vec<(&str, Option<&str>)> = p.opts.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
        assert_eq!(keys, vec![("f", Some("qcow2")), ("forbid-backing", None)]);
        assert_eq!(
            parse("p", &args(&["--fo=x"]), spec).unwrap_err(),
            "p: option '--fo=x' is ambiguous; possibilities: '--format' '--force-share'"
        );
        assert_eq!(parse("p", &args(&["--forbid"]), spec).unwrap_err(), "p: unrecognized option '--forbid'");
    }

    #[test]
    fn options_before_an_error_are_kept() {
        let (p, err) = parse_until_error("p", &args(&["-fraw", "-q", "-z", "-q"]), SPEC);
        let keys: Vec<&str> = p.opts.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, vec!["f", "q"]);
        assert_eq!(err.as_deref(), Some("p: invalid option -- 'z'"));
        assert_eq!(
            short_options("P:q").iter().map(|o| (o.short, o.arg)).collect::<Vec<_>>(),
            [(Some('P'), HasArg::Required), (Some('q'), HasArg::No)]
        );
    }

    #[test]
    fn lone_dash_is_an_operand() {
        let p = parse("p", &args(&["-"]), SPEC).unwrap();
        assert_eq!(p.operands, args(&["-"]));
    }
}
