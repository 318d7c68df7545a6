//! How engine and host errors read: QEMU's wording for errno values and
//! engine errors, the warnings QEMU prints while it opens images, and the
//! lines an open image reports as it runs.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use oxqcow::{ImageMessage, ImageMessages};

/// Prints what QEMU prints while opening and running an image, as it
/// happens: the warning (at every open) for a bitmaps extension that a
/// program without bitmap support left behind, the lines of the repair a
/// dirty image (lazy refcounts) gets when it is opened read-write,
/// inconsistencies met and worked around later, and the corruption that
/// stops the image.
pub fn open_messages() -> ImageMessages {
    let node = generated_node_name();
    Arc::new(move |m| match m {
        ImageMessage::StaleBitmaps(why) => {
            let prog = prog_name();
            // QEMU prints the second line with error_printf, without a newline.
            let _ = write!(
                std::io::stderr().lock(),
                "{prog}: warning: {why}\nSome clusters may be leaked, run 'qemu-img check -r' on the image file to fix."
            );
        }
        ImageMessage::Repair(line) | ImageMessage::Inconsistency(line) | ImageMessage::Corruption(line) => {
            stderr_line(line)
        }
        ImageMessage::BitmapsLost(why) => {
            let prog = prog_name();
            stderr_line(&format!("{prog}: Lost persistent bitmaps during inactivation of node '{node}': {why}"))
        }
    })
}

/// A name for an image opened without a node name, in the form of QEMU's
/// generated ones (`id_generate`): `#block`, a counter, two random digits.
fn generated_node_name() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed) + 1;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("#block{n}{:02}", (nanos ^ std::process::id()) % 100)
}

/// The program name as invoked (the basename of argv[0]), for messages
/// printed where no [`crate::app::ctx::Ctx`] is at hand.
pub fn prog_name() -> String {
    let argv0 = std::env::args().next().unwrap_or_default();
    Path::new(&argv0).file_name().and_then(|s| s.to_str()).unwrap_or("oxqcow").to_string()
}

/// One line on stderr, as QEMU's check prints each problem it finds (there
/// can be billions, so they are never collected). A failed write is
/// ignored, as QEMU ignores fprintf's: the check or repair goes on.
pub fn stderr_line(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// qemu's `strerror`-like text for an engine error.
pub fn strerror(e: &oxqcow::Error) -> String {
    match e {
        oxqcow::Error::Io { source, .. } => os_error(source),
        other => describe(other),
    }
}

/// The C library's text for a host error ("No such file or directory"),
/// without Rust's " (os error N)" suffix.
pub fn os_error(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(cut) => text[..cut].to_string(),
        None => text,
    }
}

/// The message for an engine error, with host I/O errors described the way
/// QEMU describes errno values.
pub fn describe(e: &oxqcow::Error) -> String {
    match e {
        // Worded completely by the engine, as QEMU words it.
        oxqcow::Error::Io { op: oxqcow::data_file::OPENING, source, .. } => source.to_string(),
        oxqcow::Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            "No such file or directory".to_string()
        }
        oxqcow::Error::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied => {
            "Permission denied".to_string()
        }
        other => other.to_string(),
    }
}

/// The text of a host error as C's `strerror` gives it.
pub fn io_error_text(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(_) => os_error(e),
        None => "Input/output error".into(),
    }
}

/// The `strerror` text QEMU would report for a failed request.
pub fn errno_text(e: &oxqcow::Error) -> String {
    use oxqcow::ErrorKind as K;
    match e {
        oxqcow::Error::Io { source, .. } => io_error_text(source),
        _ => match e.kind() {
            K::InvalidArgument => "Invalid argument",
            K::Unsupported => "Operation not supported",
            K::ReadOnly => "Operation not permitted",
            K::Locked => "Resource temporarily unavailable",
            K::NoSpace => "File too large",
            K::Io | K::InvalidFormat | K::Corrupt | K::OutOfBounds | K::Failed => "Input/output error",
        }
        .into(),
    }
}

/// The warning QEMU prints when a probed raw image is opened for writing.
pub fn warn_probed_raw(path: &str) {
    eprintln!(
        "WARNING: Image format was not specified for '{path}' and probing guessed raw.\n         \
         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         \
         Specify the 'raw' format explicitly to remove the restrictions."
    );
}
