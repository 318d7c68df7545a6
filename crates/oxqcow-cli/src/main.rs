//! The `oxqcow` command: `qemu-img` compatible subcommands plus `io` (a
//! `qemu-io` subset), `serve` (qemu-nbd) and `mount` (a FUSE export). Each
//! lives in its own module with a `run(ctx, args) -> exit code` entry
//! point; this file only takes the global options and dispatches.
#![forbid(unsafe_code)]

// Standard output goes through `app::stdout`, buffered as QEMU's stdio
// buffers it; these shadow the standard macros in every module below.
macro_rules! print {
    ($($arg:tt)*) => { $crate::app::stdout::write(format_args!($($arg)*)) };
}
macro_rules! println {
    () => { $crate::app::stdout::write(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::app::stdout::write(format_args!("{}\n", format_args!($($arg)*))) };
}

mod app;
mod cmd;
mod export;
mod io;

use app::Ctx;

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn usage(ctx: &Ctx) -> String {
    format!(
        "{prog} version {QEMU} (oxqcow {VERSION})\n\
         usage: {prog} [standard options] command [command options]\n\
         QEMU disk image utility, qemu-img compatible\n\n\
         Command syntax: see '{prog} COMMAND --help'.\n\
         Commands: create, info, check, map, compare, convert, commit, rebase, resize, measure, snapshot, amend,\n          \
         bitmap, dd, bench, io, serve, mount\n\n\
         Global options (before the command):\n  \
         --forbid-backing\n     refuse every image that names a backing file or an external data file\n     \
         instead of opening that file (for images from untrusted sources)\n",
        prog = ctx.prog,
        QEMU = app::version::QEMU_INTERFACE,
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let ctx = Ctx::from_argv0(args.first().map(String::as_str).unwrap_or("oxqcow"));
    let rest = &args[1.min(args.len())..];
    // Busybox style: a link named after a QEMU tool is that tool. The
    // command word may still follow (`exec -a qemu-io oxqcow io ...`).
    let (tool, rest) = match (ctx.prog.as_str(), rest.first().map(String::as_str)) {
        ("qemu-io", Some("io")) | ("qemu-nbd", Some("serve")) => (ctx.prog.as_str(), &rest[1..]),
        ("qemu-io" | "qemu-nbd" | "qemu-storage-daemon", _) => (ctx.prog.as_str(), rest),
        _ => ("qemu-img", rest),
    };
    let serves = matches!(tool, "qemu-nbd" | "qemu-storage-daemon")
        || matches!(rest.first().map(String::as_str), Some("serve" | "mount"));
    if !serves {
        oxqcow_nbd::sys::default_sigpipe();
    }
    let code = match tool {
        "qemu-io" => io::run(&ctx, rest),
        "qemu-nbd" => export::serve::run(&ctx, rest),
        "qemu-storage-daemon" => export::qsd::run(&ctx, rest),
        _ => run(&ctx, rest),
    };
    app::stdout::flush();
    std::process::exit(code);
}

fn run(ctx: &Ctx, args: &[String]) -> i32 {
    let mut args = args;
    // Global options before the command, as qemu-img takes them.
    while let Some(first) = args.first() {
        match first.as_str() {
            "-V" | "--version" => {
                print!("{}", app::version::text(&ctx.prog));
                return 0;
            }
            "-h" | "--help" => {
                print!("{}", usage(ctx));
                return 0;
            }
            "-T" | "--trace" => args = &args[2.min(args.len())..],
            "--forbid-backing" => {
                app::forbid_backing::forbid_backing();
                args = &args[1..];
            }
            t if t.starts_with("--trace=") || (t.starts_with("-T") && t.len() > 2) => args = &args[1..],
            _ => break,
        }
    }
    let Some(command) = args.first() else {
        return ctx.usage_error_global("Not enough arguments");
    };
    let rest = &args[1..];
    match command.as_str() {
        // Subcommands register here: "name" => cmd::name::run(ctx, rest),
        "amend" => cmd::amend::run(ctx, rest),
        "bench" => cmd::bench::run(ctx, rest),
        "bitmap" => cmd::bitmap::run(ctx, rest),
        "check" => cmd::check::run(ctx, rest),
        "commit" => cmd::commit::run(ctx, rest),
        "compare" => cmd::compare::run(ctx, rest),
        "convert" => cmd::convert::run(ctx, rest),
        "create" => cmd::create::run(ctx, rest),
        "dd" => cmd::dd::run(ctx, rest),
        "info" => cmd::info::run(ctx, rest),
        "io" => io::run(ctx, rest),
        "map" => cmd::map::run(ctx, rest),
        "measure" => cmd::measure::run(ctx, rest),
        "mount" => export::mount::run(ctx, rest),
        "rebase" => cmd::rebase::run(ctx, rest),
        "resize" => cmd::resize::run(ctx, rest),
        "snapshot" => cmd::snapshot::run(ctx, rest),
        "serve" => export::serve::run(ctx, rest),
        other => ctx.usage_error_global(&format!("Command not found: {other}")),
    }
}
