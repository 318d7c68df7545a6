//! The process's standard output, buffered as C's stdio buffers QEMU's
//! tools': line by line on a terminal, in blocks of 4096 bytes (glibc's
//! buffer for a pipe or a file) otherwise. What goes to standard error
//! (unbuffered) in between therefore comes out before it when both streams
//! go to one pipe or file, as from qemu-img, qemu-io and qemu-nbd: `qemu-img
//! check 2>&1` shows "Check failed" above the report, `map` an error above
//! the extents it printed first. Every `print!` of the crate lands here
//! (main.rs shadows the standard macros); the buffer is written out when
//! the process ends, at qemu-io's prompts, with each progress line, before
//! a fork and before `sigraise`. `abort` loses it, as abort(3) loses QEMU's.

use std::io::{IsTerminal, Write};
use std::sync::{Mutex, OnceLock};

/// glibc's stdio buffer size for a pipe or a regular file (`st_blksize`).
const BLOCK: usize = 4096;

static PENDING: Mutex<Vec<u8>> = Mutex::new(Vec::new());

fn on_terminal() -> bool {
    static TTY: OnceLock<bool> = OnceLock::new();
    *TTY.get_or_init(|| std::io::stdout().is_terminal())
}

fn emit(bytes: &[u8]) {
    // A closed pipe ends the process by SIGPIPE (restored in main), as it
    // ends QEMU's tools; other failures are ignored, as printf's are.
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(bytes);
    let _ = out.flush();
}

/// What `print!` and `println!` write.
pub fn write(args: std::fmt::Arguments<'_>) {
    let mut pending = PENDING.lock().unwrap_or_else(|e| e.into_inner());
    let _ = pending.write_fmt(args);
    drain_full(&mut pending);
}

/// The buffered standard output as a writer, for code that streams into
/// one; it never fails, as `write` never does.
pub struct Stdout;

impl Write for Stdout {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let mut pending = PENDING.lock().unwrap_or_else(|e| e.into_inner());
        pending.extend_from_slice(bytes);
        drain_full(&mut pending);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        flush();
        Ok(())
    }
}

/// Writes out what stdio would write by now: the complete lines on a
/// terminal, the full blocks otherwise.
fn drain_full(pending: &mut Vec<u8>) {
    if on_terminal() {
        if let Some(end) = pending.iter().rposition(|&b| b == b'\n') {
            emit(&pending[..=end]);
            pending.drain(..=end);
        }
        return;
    }
    while pending.len() >= BLOCK {
        emit(&pending[..BLOCK]);
        pending.drain(..BLOCK);
    }
}

/// Writes out everything buffered (C's `fflush(stdout)`).
pub fn flush() {
    let mut pending = PENDING.lock().unwrap_or_else(|e| e.into_inner());
    emit(&pending);
    pending.clear();
}
