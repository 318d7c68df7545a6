//! `oxqcow io`: a qemu-io subset. Parses qemu-io's options, opens the image,
//! then runs the `-c` commands in order (or the lines of standard input when
//! there are none), printing what qemu-io prints. The exit code is 1 when
//! any command failed, as in qemu-io.
//!
//! Requests run synchronously on the calling thread: `aio_read` and
//! `aio_write` complete (and print their report) before the next command,
//! which is one of the orders qemu-io itself may print them in.

mod cmds;
mod report;

use std::collections::HashMap;
use std::io::BufRead;

use crate::app::ctx::Ctx;
use crate::app::getopt::{self, HasArg, Opt};
use crate::app::io_open::{self as open, OpenSpec, Opened};

/// What `run` returns when a command failed; the command printed why.
#[derive(Debug)]
pub struct Failed;

/// The result of one command.
pub type CmdResult = Result<(), Failed>;

/// The state commands work on.
pub struct Session<'a> {
    ctx: &'a Ctx,
    /// The open image, if any.
    image: Option<Opened>,
    /// `--image-opts` was given: file names are option strings.
    image_opts: bool,
    /// Secrets defined with `--object secret,...`, by id.
    secrets: HashMap<String, Vec<u8>>,
    /// `quit` was run.
    quit: bool,
}

const MAIN_OPTIONS: &[Opt] = &[
    Opt::both('h', "help", HasArg::No),
    Opt::both('V', "version", HasArg::No),
    Opt::both('c', "cmd", HasArg::Required),
    Opt::both('f', "format", HasArg::Required),
    Opt::both('r', "read-only", HasArg::No),
    Opt::both('s', "snapshot", HasArg::No),
    Opt::both('n', "nocache", HasArg::No),
    Opt::both('C', "copy-on-read", HasArg::No),
    Opt::both('m', "misalign", HasArg::No),
    Opt::both('k', "native-aio", HasArg::No),
    Opt::both('d', "discard", HasArg::Required),
    Opt::both('t', "cache", HasArg::Required),
    Opt::both('i', "aio", HasArg::Required),
    Opt::both('T', "trace", HasArg::Required),
    Opt::long("object", HasArg::Required),
    Opt::long("image-opts", HasArg::No),
    Opt::both('U', "force-share", HasArg::No),
];

fn usage(prog: &str) -> String {
    format!(
        "Usage: {prog} io [OPTIONS]... [-c STRING]... [file]\n\
         QEMU Disk exerciser (oxqcow)\n\
         \n\
         \x20 --object OBJECTDEF   define an object such as 'secret' for\n\
         \x20                      passwords and/or encryption keys\n\
         \x20 --image-opts         treat file as option string\n\
         \x20 -c, --cmd STRING     execute command with its arguments\n\
         \x20                      from the given string\n\
         \x20 -f, --format FMT     specifies the block driver to use\n\
         \x20 -r, --read-only      export read-only\n\
         \x20 -s, --snapshot       use snapshot file\n\
         \x20 -n, --nocache        disable host cache, short for -t none\n\
         \x20 -C, --copy-on-read   enable copy-on-read (not supported)\n\
         \x20 -m, --misalign       misalign allocations for O_DIRECT\n\
         \x20 -k, --native-aio     use kernel AIO implementation\n\
         \x20                      (Linux only, prefer use of -i)\n\
         \x20 -i, --aio=MODE       use AIO mode (threads, native or io_uring)\n\
         \x20 -t, --cache=MODE     use the given cache mode for the image\n\
         \x20 -d, --discard=MODE   use the given discard mode for the image\n\
         \x20 -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]\n\
         \x20                      specify tracing options (accepted, ignored)\n\
         \x20 -U, --force-share    force shared permissions\n\
         \x20 -h, --help           display this help and exit\n\
         \x20 -V, --version        output version information and exit\n\
         \n\
         See '{prog} io -c help' for information on available commands.\n"
    )
}

/// Runs `oxqcow io ARGS`.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    let (parsed, error) = getopt::parse_until_error(&ctx.argv0, args, MAIN_OPTIONS);
    let mut spec = OpenSpec::for_command_line();
    let mut commands: Vec<String> = Vec::new();
    let mut format: Option<String> = None;
    let mut session = Session { ctx, image: None, image_opts: false, secrets: HashMap::new(), quit: false };
    for (key, value) in parsed.opts {
        let value = value.unwrap_or_default();
        let res = match key.as_str() {
            "c" => {
                commands.push(value);
                Ok(())
            }
            "f" => {
                format = Some(value);
                Ok(())
            }
            "h" => {
                print!("{}", usage(&ctx.prog));
                return 0;
            }
            "V" => {
                println!("{} io version {} (oxqcow)", ctx.prog, env!("CARGO_PKG_VERSION"));
                return 0;
            }
            "T" | "m" => Ok(()),
            "object" => session.add_object(&value),
            "image-opts" => {
                session.image_opts = true;
                Ok(())
            }
            other => spec.apply_flag(other.chars().next().unwrap_or('?'), &value),
        };
        if let Err(msg) = res {
            ctx.error(&msg);
            return 1;
        }
    }
    if let Some(msg) = error {
        eprintln!("{msg}");
        print!("{}", usage(&ctx.prog));
        return 1;
    }
    if parsed.operands.len() > 1 {
        print!("{}", usage(&ctx.prog));
        return 1;
    }
    if format.is_some() && session.image_opts {
        ctx.error("--image-opts and -f are mutually exclusive");
        return 1;
    }
    if let Some(file) = parsed.operands.first() {
        let res = if session.image_opts {
            spec.options = match open::split_options(&ctx.prog, file) {
                Ok(o) => o,
                Err(msg) => {
                    ctx.error(&msg);
                    return 1;
                }
            };
            session.open(spec, None)
        } else {
            if let Some(f) = format {
                spec.options.push(("driver".into(), f));
            }
            session.open(spec, Some(file))
        };
        if res.is_err() {
            return 1;
        }
    }
    let mut failed = false;
    if commands.is_empty() {
        // Interactive mode: one command a line from standard input, each
        // after a prompt, as qemu-io does even when stdin is not a terminal.
        let stdin = std::io::stdin();
        let mut lines = stdin.lock().lines();
        while !session.quit {
            print!("{}> ", ctx.prog);
            flush_stdout();
            let Some(Ok(line)) = lines.next() else { break };
            failed |= session.command(&line).is_err();
        }
    } else {
        for c in &commands {
            if session.quit {
                break;
            }
            failed |= session.command(c).is_err();
        }
    }
    failed |= session.close_image().is_err();
    flush_stdout();
    i32::from(failed)
}

fn flush_stdout() {
    use std::io::Write;
    let _ = std::io::stdout().flush();
}

/// One qemu-io command: its names, argument count bounds and help text.
pub struct CmdInfo {
    /// Name.
    pub name: &'static str,
    /// Short alias.
    pub alt: Option<&'static str>,
    /// Fewest arguments.
    pub argmin: usize,
    /// Most arguments (`None`: no limit).
    pub argmax: Option<usize>,
    /// Runs without an open image.
    pub no_file: bool,
    /// Needs write permission on the image.
    pub writes: bool,
    /// The argument synopsis (`None`: the command takes none).
    pub args: Option<&'static str>,
    /// One-line description.
    pub oneline: &'static str,
    /// Extended help.
    pub help: Option<&'static str>,
}

impl CmdInfo {
    /// The usage line qemu-io prints when a command's arguments are wrong.
    pub fn usage(&self) -> CmdResult {
        println!("{} {} -- {}", self.name, self.args.unwrap_or(""), self.oneline);
        Err(Failed)
    }
}

impl Session<'_> {
    /// Parses and runs one command line.
    pub fn command(&mut self, line: &str) -> CmdResult {
        let argv: Vec<String> = line.split(' ').filter(|w| !w.is_empty()).map(str::to_string).collect();
        let Some(name) = argv.first() else { return Ok(()) };
        let Some(info) = cmds::find(name) else {
            eprintln!("command \"{name}\" not found");
            return Err(Failed);
        };
        if !info.no_file && self.image.is_none() {
            eprintln!("no file open, try 'help open'");
            return Err(Failed);
        }
        let argc = argv.len() - 1;
        if argc < info.argmin || info.argmax.is_some_and(|max| argc > max) {
            match info.argmax {
                None => eprintln!("bad argument count {argc} to {name}, expected at least {} arguments", info.argmin),
                Some(max) if max == info.argmin => {
                    eprintln!("bad argument count {argc} to {name}, expected {max} arguments")
                }
                Some(max) => eprintln!(
                    "bad argument count {argc} to {name}, expected between {} and {max} arguments",
                    info.argmin
                ),
            }
            return Err(Failed);
        }
        if info.writes && self.image.as_ref().is_some_and(|i| i.read_only()) {
            self.ctx.error("Block node is read-only");
            return Err(Failed);
        }
        cmds::run(self, info, &argv)
    }

    /// Opens an image (`name` is `None` when the options name the file).
    fn open(&mut self, spec: OpenSpec, name: Option<&str>) -> CmdResult {
        if self.image.is_some() {
            self.ctx.error("file open already, try 'help close'");
            return Err(Failed);
        }
        match open::open(&spec, name, &self.secrets) {
            Ok(img) => {
                self.image = Some(img);
                Ok(())
            }
            Err(msg) => {
                match name {
                    Some(n) => self.ctx.error(&format!("can't open device {n}: {msg}")),
                    None => self.ctx.error(&format!("can't open: {msg}")),
                }
                Err(Failed)
            }
        }
    }

    /// Flushes and closes the open image.
    fn close_image(&mut self) -> CmdResult {
        match self.image.take() {
            Some(img) => img.close().map_err(|msg| {
                self.ctx.error(&msg);
                Failed
            }),
            None => Ok(()),
        }
    }

    /// Handles `--object`: secrets are kept for `encrypt.key-secret`,
    /// other object types are refused.
    fn add_object(&mut self, def: &str) -> Result<(), String> {
        let pairs = oxqcow::options::parse_option_list(def).map_err(|e| e.to_string())?;
        let mut kind = None;
        let mut props = HashMap::new();
        for (i, (k, v)) in pairs.into_iter().enumerate() {
            if i == 0 && v == "on" && !def.starts_with(&format!("{k}=")) {
                kind = Some(k);
            } else if k == "qom-type" {
                kind = Some(v);
            } else {
                props.insert(k, v);
            }
        }
        let Some(kind) = kind else { return Err("Parameter 'qom-type' is missing".into()) };
        if kind == "help" {
            println!("List of user creatable objects:\n  secret");
            std::process::exit(0);
        }
        const QEMU_TYPES: &[&str] = &[
            "authz-list",
            "authz-list-file",
            "authz-simple",
            "main-loop",
            "pr-manager-helper",
            "secret_keyring",
            "thread-context",
            "throttle-group",
            "tls-creds-anon",
            "tls-creds-psk",
            "tls-creds-x509",
        ];
        if QEMU_TYPES.contains(&kind.as_str()) {
            return Err(format!("object type '{kind}' is not supported by oxqcow (only 'secret' is)"));
        }
        if kind != "secret" {
            return Err(format!("Parameter 'qom-type' does not accept value '{kind}'"));
        }
        let Some(id) = props.remove("id") else { return Err("Parameter 'id' is missing".into()) };
        let data = match (props.remove("data"), props.remove("file")) {
            (Some(d), None) => d.into_bytes(),
            (None, Some(f)) => std::fs::read(&f)
                .map_err(|e| format!("Unable to read {f}: {}", crate::app::messages::io_error_text(&e)))?,
            (Some(_), Some(_)) => return Err("'data' and 'file' are mutually exclusive".into()),
            (None, None) => return Err("Either 'file' or 'data' must be provided".into()),
        };
        let data = match props.remove("format").as_deref() {
            None | Some("raw") => data,
            Some("base64") => crate::app::secrets::decode_base64(&data)?,
            Some(other) => return Err(format!("Parameter 'format' does not accept value '{other}'")),
        };
        if let Some(k) = props.keys().next() {
            return Err(format!("Parameter '{k}' is unexpected"));
        }
        if self.secrets.contains_key(&id) {
            return Err(format!("attempt to add duplicate property '{id}' to object (type 'container')"));
        }
        self.secrets.insert(id, data);
        Ok(())
    }
}
