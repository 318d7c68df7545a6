//! The qemu-io commands, one file per family (`read`, `write`, `discard`:
//! flush, discard and truncate, `status`: alloc, map, length and info,
//! `open`: open, reopen, close and quit, `process`: sleep, sigraise, abort
//! and the breakpoint commands), with argument handling in qemu-io's
//! order (so the same mistake gets the same message), the request, and
//! the report. This file holds the table of commands, the parsing of a
//! command line and `help`.

mod args;
mod discard;
mod open;
mod process;
mod read;
mod status;
mod write;

use args::{cmd, CmdInfo};

use crate::io::session::{CmdResult, Failed, Session};

/// `help`.
const HELP: CmdInfo = CmdInfo {
    no_file: true,
    ..cmd("help", Some("?"), 0, Some(1), Some("[command]"), "help for one or all commands", help)
};

/// The supported commands, sorted by name as qemu-io lists them.
static COMMANDS: &[CmdInfo] = &[
    process::ABORT,
    discard::AIO_FLUSH,
    read::AIO_READ,
    write::AIO_WRITE,
    status::ALLOC,
    process::BREAK,
    open::CLOSE,
    discard::DISCARD,
    discard::FLUSH,
    HELP,
    status::INFO,
    status::LENGTH,
    status::MAP,
    open::OPEN,
    open::QUIT,
    read::READ,
    read::READV,
    process::REMOVE_BREAK,
    open::REOPEN,
    process::RESUME,
    process::SIGRAISE,
    process::SLEEP,
    discard::TRUNCATE,
    process::WAIT_BREAK,
    write::WRITE,
    write::WRITEV,
];

/// Looks a command up by name or alias.
pub fn find(name: &str) -> Option<&'static CmdInfo> {
    COMMANDS.iter().find(|c| c.name == name || c.alt == Some(name))
}

/// Parses and runs one command line.
pub fn run_line(s: &mut Session, line: &str) -> CmdResult {
    let argv: Vec<String> = line.split(' ').filter(|w| !w.is_empty()).map(str::to_string).collect();
    let Some(name) = argv.first() else { return Ok(()) };
    let Some(info) = find(name) else {
        eprintln!("command \"{name}\" not found");
        return Err(Failed);
    };
    if !info.no_file && s.image.is_none() {
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
            Some(max) => {
                eprintln!("bad argument count {argc} to {name}, expected between {} and {max} arguments", info.argmin)
            }
        }
        return Err(Failed);
    }
    if info.writes && s.image.as_ref().is_some_and(|i| i.read_only()) {
        s.ctx.error("Block node is read-only");
        return Err(Failed);
    }
    (info.run)(s, info, &argv)
}

fn help_line(name: &str, c: &CmdInfo) {
    match c.args {
        Some(args) => println!("{name} {args} -- {}", c.oneline),
        None => println!("{name} -- {}", c.oneline),
    }
}

fn help(_: &mut Session, _: &CmdInfo, argv: &[String]) -> CmdResult {
    let Some(name) = argv.get(1) else {
        for c in COMMANDS {
            help_line(c.name, c);
        }
        println!("\nUse 'help commandname' for extended help.");
        return Ok(());
    };
    let Some(c) = find(name) else {
        println!("command {name} not found");
        return Err(Failed);
    };
    help_line(name, c);
    if let Some(h) = c.help {
        print!("{h}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_sorted_and_names_are_unique() {
        let names: Vec<&str> = COMMANDS.iter().map(|c| c.name).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(names, sorted);
        for c in COMMANDS {
            assert_eq!(find(c.name).map(|f| f.name), Some(c.name));
            if let Some(alt) = c.alt {
                assert_eq!(find(alt).map(|f| f.name), Some(c.name), "{alt}");
            }
        }
    }
}
