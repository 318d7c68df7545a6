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
mod session;

use std::collections::HashMap;
use std::io::BufRead;

use crate::app::ctx::Ctx;
use crate::app::getopt::{self, HasArg, Opt};
use crate::app::io_open::OpenSpec;
use crate::app::qemu_opts::split_noisily;
use crate::app::stdout;
use session::Session;

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
         \x20 -C, --copy-on-read   enable copy-on-read\n\
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
    let mut session =
        Session { ctx, image: None, opened_with: None, image_opts: false, secrets: HashMap::new(), quit: false };
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
                print!("{}", crate::app::version::text(&ctx.prog));
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
            spec.options = split_noisily(&ctx.prog, file);
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
            stdout::flush();
            let Some(Ok(line)) = lines.next() else { break };
            failed |= cmds::run_line(&mut session, &line).is_err();
        }
    } else {
        for c in &commands {
            if session.quit {
                break;
            }
            failed |= cmds::run_line(&mut session, c).is_err();
        }
    }
    failed |= session.close_image().is_err();
    stdout::flush();
    i32::from(failed)
}
