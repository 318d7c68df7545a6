//! The commands that act on the qemu-io process rather than the image:
//! `sleep`, `sigraise` and `abort` (which tests use to stop qemu-io where
//! a crash would), and blkdebug's breakpoint commands, which fail as
//! QEMU's do on an image without a blkdebug layer (oxqcow has none).

use std::io::Write;
use std::time::Duration;

use crate::io::cmds::args::{cmd, num, CmdInfo};
use crate::io::session::{CmdResult, Failed, Session};

/// Linux's `NSIG`, the bound qemu-io checks signal numbers against.
const NSIG: u64 = 65;

/// `sleep`.
pub const SLEEP: CmdInfo = CmdInfo {
    no_file: true,
    ..cmd("sleep", None, 1, Some(1), None, "waits for the given value in milliseconds", sleep)
};

const SIGRAISE_HELP: &str = "
 raises the given signal

 Example:
 'sigraise 15' - raises SIGTERM

 Invokes raise(signal), where \"signal\" is the mandatory integer argument
 given to sigraise.

";

/// `sigraise`.
pub const SIGRAISE: CmdInfo = CmdInfo {
    no_file: true,
    help: Some(SIGRAISE_HELP),
    ..cmd("sigraise", None, 1, Some(1), Some("signal"), "raises a signal", sigraise)
};

/// `abort`.
pub const ABORT: CmdInfo = CmdInfo {
    no_file: true,
    ..cmd("abort", None, 0, Some(0), None, "simulate a program crash using abort(3)", |_, _, _| std::process::abort())
};

/// `break`.
pub const BREAK: CmdInfo = cmd(
    "break",
    None,
    2,
    Some(2),
    Some("event tag"),
    "sets a breakpoint on event and tags the stopped request as tag",
    |_, _, _| unsupported("Could not set breakpoint"),
);

/// `remove_break`.
pub const REMOVE_BREAK: CmdInfo =
    cmd("remove_break", None, 1, Some(1), Some("tag"), "remove a breakpoint by tag", |_, _, argv| {
        unsupported(&format!("Could not remove breakpoint {}", argv[1]))
    });

/// `resume`.
pub const RESUME: CmdInfo =
    cmd("resume", None, 1, Some(1), Some("tag"), "resumes the request tagged as tag", |_, _, _| {
        unsupported("Could not resume request")
    });

/// `wait_break`: QEMU waits forever for a request no breakpoint can stop;
/// oxqcow says so instead of hanging.
pub const WAIT_BREAK: CmdInfo =
    cmd("wait_break", None, 1, Some(1), Some("tag"), "waits for the suspension of a request", |_, _, argv| {
        unsupported(&format!("Request tagged as {} can never be suspended without blkdebug", argv[1]))
    });

fn unsupported(what: &str) -> CmdResult {
    println!("{what}: Operation not supported");
    Err(Failed)
}

/// Both streams, as qemu-io flushes them before raising a signal (which
/// may end the process without Rust's buffers being written).
fn flush() {
    crate::app::stdout::flush();
    let _ = std::io::stderr().flush();
}

fn sleep(_: &mut Session, _: &CmdInfo, argv: &[String]) -> CmdResult {
    // C's strtol(arg, &end, 0) with nothing left after the number.
    let Ok(ms) = crate::app::numbers::strtoul0(&argv[1]) else {
        println!("{} is not a valid number", argv[1]);
        return Err(Failed);
    };
    std::thread::sleep(Duration::from_millis(ms));
    Ok(())
}

fn sigraise(_: &mut Session, _: &CmdInfo, argv: &[String]) -> CmdResult {
    let sig = num(&argv[1])?;
    if sig > NSIG {
        println!("signal argument '{}' is too large to be a valid signal", argv[1]);
        return Err(Failed);
    }
    flush();
    // raise(3)'s own failure (a number no signal has) is ignored by qemu-io.
    let _ = oxqcow_nbd::sys::raise(sig as i32);
    Ok(())
}
