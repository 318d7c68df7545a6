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

    /// Prints "Try 'PROG COMMAND --help' for more info" and returns 1.
    pub fn try_help(&self, command: &str) -> i32 {
        eprintln!("Try '{} {command} --help' for more info", self.argv0);
        1
    }

    /// Parses a command's arguments; on error prints glibc's message and
    /// the help pointer, returning the exit code.
    pub fn getopt(&self, command: &str, args: &[String], spec: &[getopt::Opt]) -> Result<getopt::Parsed, i32> {
        getopt::parse(&format!("{} {command}", self.argv0), args, spec).map_err(|msg| {
            eprintln!("{msg}");
            self.try_help(command)
        })
    }
}
