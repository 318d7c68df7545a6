//! What every subcommand shares: the program name for messages, error
//! printing in qemu-img's style, opening images with qemu-img's error text,
//! and size formatting.

use std::path::Path;

use oxqcow::{Image, ImageFormat, OpenOptions};

/// The invocation context.
pub struct Ctx {
    /// The program name as invoked (basename of argv[0]), prefixed to errors.
    pub prog: String,
}

impl Ctx {
    /// Builds the context from argv[0].
    pub fn from_argv0(argv0: &str) -> Ctx {
        let prog = Path::new(argv0).file_name().and_then(|s| s.to_str()).unwrap_or("oxqcow").to_string();
        Ctx { prog }
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

/// Opens an image as qemu-img does, returning qemu-img's message on failure
/// ("Could not open 'PATH': REASON").
pub fn open_image(path: &str, format: Option<&str>, opts: OpenOptions) -> Result<Image, String> {
    let mut opts = opts;
    if Path::new(path).is_dir() {
        return Err(format!("Could not open '{path}': 'file' driver requires '{path}' to be a regular file"));
    }
    if let Some(f) = format {
        opts.format =
            Some(ImageFormat::from_name(f).map_err(|e| format!("Could not open '{path}': {}", describe(&e)))?);
    }
    Image::open(Path::new(path), &opts).map_err(|e| match &e {
        // QEMU's file layer names the file again: "Could not open 'x':
        // Could not open 'x': No such file or directory".
        oxqcow::Error::Io { op: "opening the image", .. } => {
            format!("Could not open '{path}': Could not open '{path}': {}", describe(&e))
        }
        _ => format!("Could not open '{path}': {}", describe(&e)),
    })
}

/// qemu-img's `cvtnum_full`: a size with an optional suffix, between `min`
/// and `max`, with qemu-img's messages naming the value as `name`.
pub fn cvtnum(name: &str, value: &str, min: u64, max: u64) -> Result<u64, String> {
    let range = || format!("Invalid {name} specified. Must be between {min} and {max}.");
    if value.trim_start().starts_with('-') {
        return Err(range());
    }
    let n = oxqcow::options::parse_size(value).map_err(|_| format!("Invalid {name} specified: '{value}'."))?;
    if n < min || n > max {
        return Err(range());
    }
    Ok(n)
}

/// Whether `mode` is one of QEMU's cache modes (`-t`/`-T`).
pub fn is_cache_mode(mode: &str) -> bool {
    matches!(mode, "none" | "off" | "writeback" | "writethrough" | "directsync" | "unsafe")
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
        oxqcow::Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            "No such file or directory".to_string()
        }
        oxqcow::Error::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied => {
            "Permission denied".to_string()
        }
        other => other.to_string(),
    }
}
