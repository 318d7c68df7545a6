//! What every subcommand shares: the program name for messages, error
//! printing in qemu-img's style, opening images with qemu-img's error text,
//! the backing file policy, and size formatting.
//!
//! # `--forbid-backing`
//!
//! An image from a stranger can name any file as its backing file, and
//! opening the image would hand that file's content to whoever reads it.
//! With `--forbid-backing` (given before the subcommand, `oxqcow
//! --forbid-backing info x.qcow2`, or as an option of a subcommand that
//! declares it) no backing file is ever opened: every image whose header
//! names one is refused with an error, whatever the subcommand. The flag is
//! process-wide: [`open_image`] applies it to every image it opens, so a
//! subcommand gets it by opening images through [`open_image`] (or by
//! asking [`backing_policy`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use oxqcow::backing::{resolve_backing_path, BackingPolicy};
use oxqcow::{Image, ImageFormat, OpenOptions};

/// The name of the flag that forbids backing files, without dashes.
pub const FORBID_BACKING: &str = "forbid-backing";

/// Set once `--forbid-backing` was seen.
static BACKING_FORBIDDEN: AtomicBool = AtomicBool::new(false);

/// Forbids opening backing files for the rest of the process.
pub fn forbid_backing() {
    BACKING_FORBIDDEN.store(true, Ordering::Release);
}

/// Whether `--forbid-backing` was given.
pub fn backing_forbidden() -> bool {
    BACKING_FORBIDDEN.load(Ordering::Acquire)
}

/// The policy for backing files named by images: `wanted` unless
/// `--forbid-backing` was given.
pub fn backing_policy(wanted: BackingPolicy) -> BackingPolicy {
    if backing_forbidden() {
        BackingPolicy::Forbid
    } else {
        wanted
    }
}

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
/// ("Could not open 'PATH': REASON", with one "Could not open backing file: "
/// for every backing level the failure is down the chain). Backing files
/// are followed as `opts.backing` says, unless `--forbid-backing` was given.
pub fn open_image(path: &str, format: Option<&str>, opts: OpenOptions) -> Result<Image, String> {
    let mut opts = opts;
    opts.backing = backing_policy(opts.backing);
    if Path::new(path).is_dir() {
        return Err(format!("Could not open '{path}': 'file' driver requires '{path}' to be a regular file"));
    }
    if let Some(f) = format {
        opts.format =
            Some(ImageFormat::from_name(f).map_err(|e| format!("Could not open '{path}': {}", describe(&e)))?);
    }
    Image::open(Path::new(path), &opts).map_err(|e| {
        // Under Forbid or Ignore no backing file was opened, so the failure
        // is the top image's (or the refusal itself).
        let follows = !matches!(opts.backing, BackingPolicy::Forbid | BackingPolicy::Ignore);
        if let Some(msg) = follows.then(|| chain_failure(path, opts.format)).flatten() {
            return msg;
        }
        match &e {
            // QEMU's file layer names the file again: "Could not open 'x':
            // Could not open 'x': No such file or directory".
            oxqcow::Error::Io { op: "opening the image", .. } => {
                format!("Could not open '{path}': Could not open '{path}': {}", describe(&e))
            }
            _ => format!("Could not open '{path}': {}", describe(&e)),
        }
    })
}

/// When the image at `path` opens alone but a file down its backing chain
/// does not, qemu-img's message for it: "Could not open 'top': Could not
/// open backing file: [Could not open backing file: ...]REASON". `None`
/// when the top image itself is the problem.
fn chain_failure(path: &str, format: Option<ImageFormat>) -> Option<String> {
    let alone = |p: &Path, f: Option<ImageFormat>| {
        Image::open(
            p,
            &OpenOptions { read_only: true, format: f, backing: BackingPolicy::Ignore, ..Default::default() },
        )
    };
    let top = alone(Path::new(path), format).ok()?;
    let mut prefix = format!("Could not open '{path}': ");
    let mut layer_path = PathBuf::from(path);
    let mut layer = top;
    // A chain that loops or is too deep is the engine's own error to report.
    for _ in 0..oxqcow::backing::MAX_CHAIN_DEPTH {
        let info = layer.as_qcow2()?.info();
        let name = info.backing_file?;
        prefix.push_str("Could not open backing file: ");
        if name.starts_with("json:") {
            return Some(format!("{prefix}json: pseudo-filenames are not supported as backing files"));
        }
        let next = resolve_backing_path(&layer_path, &name);
        let next_format = match info.backing_format.as_deref().map(ImageFormat::from_name) {
            None => None,
            Some(Ok(f)) => Some(f),
            Some(Err(_)) => {
                let f = info.backing_format.unwrap_or_default();
                return Some(format!("{prefix}Unknown driver '{f}'"));
            }
        };
        layer = match alone(&next, next_format) {
            Ok(l) => l,
            Err(e) => {
                let shown = next.display();
                return Some(match &e {
                    oxqcow::Error::Io { op: "opening the image", .. } => {
                        format!("{prefix}Could not open '{shown}': {}", describe(&e))
                    }
                    _ => format!("{prefix}{}", describe(&e)),
                });
            }
        };
        layer_path = next;
    }
    None
}

/// The file names of the layers of an open image's backing chain, top
/// first, as QEMU names them: each backing file name is taken relative to
/// the directory of the image that names it (`chain/top.qcow2` backed by
/// `base.qcow2` gives `chain/base.qcow2`).
pub fn chain_filenames(image: &Image, filename: &str) -> Vec<String> {
    let mut names = vec![filename.to_string()];
    let mut layer = image;
    while let Some(q) = layer.as_qcow2() {
        let (Some(name), Some(backing)) = (q.info().backing_file, q.backing()) else { break };
        let last = names.last().expect("never empty");
        names.push(resolve_backing_path(Path::new(last), &name).to_string_lossy().into_owned());
        layer = backing;
    }
    names
}

/// The warning QEMU prints when it opens a file for writing whose format
/// it had to guess as raw.
pub fn warn_probed_raw(path: &str) {
    eprintln!(
        "WARNING: Image format was not specified for '{path}' and probing guessed raw.\n         \
         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be \
         restricted.\n         Specify the 'raw' format explicitly to remove the restrictions."
    );
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
