//! qemu-io's standard output, buffered as C's stdio buffers QEMU's: line
//! by line on a terminal, in blocks of 4096 bytes (glibc's buffer for a
//! pipe or a file) otherwise, so that what goes to standard error in
//! between (unbuffered) comes out before it, as it does from qemu-io when
//! both streams go to one pipe. The buffer is written out when qemu-io
//! ends, at every prompt and before `sigraise`; `abort` loses it, as
//! abort(3) loses QEMU's.

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
    // ends qemu-io; other failures are ignored, as printf's are.
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(bytes);
    let _ = out.flush();
}

/// What `print!` and `println!` write inside `io/`.
pub fn write(args: std::fmt::Arguments<'_>) {
    let mut pending = PENDING.lock().unwrap_or_else(|e| e.into_inner());
    let _ = pending.write_fmt(args);
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
