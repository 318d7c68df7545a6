//! The invocation context: the program name every message starts with,
//! qemu-img's error and usage-error printing, and option parsing with
//! qemu-img's help pointer.

use std::path::Path;

use crate::app::getopt;

/// The invocation context.
pub struct Ctx {
    /// The program name as invoked (basename of argv[0]), prefixed to errors.
    pub prog: String,
    /// argv[0] itself, which qemu-img names in usage hints and option
    /// parsing errors ("Try '/usr/bin/qemu-img info --help' ...").
    pub argv0: String,
}

impl Ctx {
    /// Builds the context from argv[0].
    pub fn from_argv0(argv0: &str) -> Ctx {
        let prog = Path::new(argv0).file_name().and_then(|s| s.to_str()).unwrap_or("oxqcow").to_string();
        Ctx { prog, argv0: argv0.to_string() }
    }

    /// Prints `prog: msg` on stderr and returns exit code 1.
    pub fn fail(&self, msg: &str) -> i32 {
        self.error(msg);
        1
    }

    /// Prints `prog: msg` on stderr.
    pub fn error(&self, msg: &str) {
        eprintln!("{}: {}", self.prog, msg);
    }
}

impl Ctx {
    /// Reports a usage error as qemu-img's `error_exit` does: the message,
    /// then a pointer to the command's help. Returns exit code 1.
    pub fn usage_error(&self, command: &str, msg: &str) -> i32 {
        self.error(msg);
        self.try_help(command)
    }

    /// Reports an error of the command line as a whole as qemu-img's
    /// `error_exit` does: the message, then "Try 'ARGV0 --help' for more
    /// info". Returns exit code 1.
    pub fn usage_error_global(&self, msg: &str) -> i32 {
        self.error(msg);
        eprintln!("Try '{} --help' for more info", self.argv0);
        1
    }

    /// How `command` was invoked, as its messages name it: `argv0 command`,
    /// or `argv0` alone when oxqcow runs as the QEMU tool that command is
    /// (a link named qemu-io runs `io`, one named qemu-nbd runs `serve`).
    pub fn invoked_as(&self, command: &str) -> String {
        match (self.prog.as_str(), command) {
            ("qemu-io", "io") | ("qemu-nbd", "serve") => self.argv0.clone(),
            _ => format!("{} {command}", self.argv0),
        }
    }

    /// Prints "Try 'PROG COMMAND --help' for more info" and returns 1.
    pub fn try_help(&self, command: &str) -> i32 {
        eprintln!("Try '{} --help' for more info", self.invoked_as(command));
        1
    }

    /// Parses a command's arguments; on error prints glibc's message and
    /// the help pointer, returning the exit code.
    pub fn getopt(&self, command: &str, args: &[String], spec: &[getopt::Opt]) -> Result<getopt::Parsed, i32> {
        getopt::parse(&self.invoked_as(command), args, spec).map_err(|msg| {
            eprintln!("{msg}");
            self.try_help(command)
        })
    }
}
