//! Backing files: the one gate through which an image may open the files
//! its header names.
//!
//! An image from a stranger can name any path as its backing file; opening
//! it hands that file's bytes to whoever reads the image. So the caller
//! decides ([`BackingPolicy`]): follow names (with format probing only when
//! the image records no format, as QEMU does), refuse images that have a
//! backing file, open images alone, or ask a [`BackingGate`] for every file.
//! Chains are followed with loop detection and a depth limit; a `json:`
//! pseudo-filename opens the node its options describe (a format over a
//! file, possibly through raw windows).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::image::Image;
use crate::options::{ImageFormat, OpenOptions};

/// Longest backing chain followed. QEMU has no limit (a 20000-deep chain
/// ran for minutes there); 256 layers is far beyond any real use.
pub const MAX_CHAIN_DEPTH: usize = 256;

pub use crate::options::{BackingGate, BackingPolicy};

/// Resolves a backing file name as QEMU does: relative names are relative
/// to the directory of the image that names them.
pub fn resolve_backing_path(overlay: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match overlay.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(p),
        _ => p.to_path_buf(),
    }
}

/// The files of a backing chain being walked, top first: every walk over a
/// chain (opening one, listing its layers, `info --backing-chain`) goes
/// through one, so that loops and overlong chains are refused alike.
///
/// A loop is recognised by file identity (device and inode), not by name:
/// relative names can spell one file in endless ways (`./a`, `././a`, a
/// hard link), so comparing names would follow such a chain until the
/// depth limit, or forever without one.
#[derive(Default)]
pub struct Chain {
    files: Vec<FileIdentity>,
}

#[derive(PartialEq, Eq)]
enum FileIdentity {
    Inode {
        dev: u64,
        ino: u64,
    },
    /// A file whose metadata cannot be read: its opening will fail and
    /// report why, so the name is identity enough until then.
    Name(PathBuf),
}

impl FileIdentity {
    fn of(path: &Path) -> FileIdentity {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(path) {
            Ok(m) => FileIdentity::Inode { dev: m.dev(), ino: m.ino() },
            Err(_) => FileIdentity::Name(path.to_path_buf()),
        }
    }
}

impl Chain {
    /// An empty chain.
    pub fn new() -> Chain {
        Chain::default()
    }

    /// How many layers were entered.
    pub fn depth(&self) -> usize {
        self.files.len()
    }

    /// Records `path` as the next layer down; refuses a file already in
    /// the chain (with `qemu-img info --backing-chain`'s message) and a
    /// layer past [`MAX_CHAIN_DEPTH`].
    pub fn enter(&mut self, path: &Path) -> Result<()> {
        let id = FileIdentity::of(path);
        if self.files.contains(&id) {
            return Err(Error::InvalidArgument(format!("Backing file '{}' creates an infinite loop.", path.display())));
        }
        if self.files.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::InvalidArgument(format!(
                "Backing file chain deeper than {MAX_CHAIN_DEPTH} images at '{}'",
                path.display()
            )));
        }
        self.files.push(id);
        Ok(())
    }
}

/// Opens the backing file `name` (with recorded format `format`) of the
/// image at `overlay`, through the policy of `opts`. A `json:{...}` name
/// sets the backing node's options itself (its file name is taken as
/// given, relative to the working directory, as QEMU takes it).
pub(crate) fn open_backing(
    overlay: &Path,
    name: &str,
    format: Option<&str>,
    opts: &OpenOptions,
    chain: &mut Chain,
) -> Result<Option<Arc<Image>>> {
    if matches!(opts.backing, BackingPolicy::Ignore) {
        return Ok(None);
    }
    if matches!(opts.backing, BackingPolicy::Forbid) {
        return Err(Error::InvalidArgument(format!(
            "'{}' has a backing file ('{name}') and opening backing files is forbidden",
            overlay.display()
        )));
    }
    let mut backing_opts = backing_options(opts);
    if let Some(opener) = opts.protocols.as_ref().filter(|p| p.takes(name)) {
        return open_protocol_backing(overlay, opener.as_ref(), name, format, opts, backing_opts, chain).map(Some);
    }
    let (path, format) = match name.strip_prefix("json:") {
        Some(text) => {
            let (path, driver) = json_node(text, &mut backing_opts)?;
            (path, driver.or(format.map(str::to_string)))
        }
        None => (resolve_backing_path(overlay, name), format.map(str::to_string)),
    };
    // QEMU's file-posix drivers named as the backing format are the
    // backing node themselves: the file's bytes, as raw shows them.
    let host_driver = format.as_deref().filter(|f| crate::image::is_host_driver(f));
    let format = match format.as_deref() {
        Some(_) if host_driver.is_some() => Some(ImageFormat::Raw),
        Some(f) => Some(
            ImageFormat::from_name(f)
                .map_err(|_| Error::Unsupported(format!("backing file format '{f}' (of '{}')", path.display())))?,
        ),
        None => None,
    };
    match (&opts.backing, format) {
        (BackingPolicy::FollowWithoutProbing, None) => {
            return Err(Error::InvalidArgument(format!(
                "'{}' names backing file '{name}' without its format, and probing is not allowed",
                overlay.display()
            )))
        }
        (BackingPolicy::Gate(gate), f) => gate.check(&path, f)?,
        _ => {}
    }
    if let Some(driver) = host_driver {
        crate::image::check_host_file(driver, &path)?;
    }
    backing_opts.format = format;
    let image = Image::open_in_chain(&path, &backing_opts, chain, Default::default()).map_err(|e| match e {
        Error::Io { op: "opening the image", offset, source } => Error::Io {
            op: "opening the backing file",
            offset,
            source: std::io::Error::new(
                source.kind(),
                format!("Could not open backing file '{}': {source}", path.display()),
            ),
        },
        other => other,
    })?;
    Ok(Some(Arc::new(image)))
}

/// [`open_backing`] for a name the caller's [`ProtocolOpener`] takes: the
/// same policy (the gate sees the name), the storage from the opener, and
/// QEMU's "Could not open backing file" when it cannot be reached.
fn open_protocol_backing(
    overlay: &Path,
    opener: &dyn crate::options::ProtocolOpener,
    name: &str,
    format: Option<&str>,
    opts: &OpenOptions,
    mut backing_opts: OpenOptions,
    chain: &mut Chain,
) -> Result<Arc<Image>> {
    let format = format
        .map(|f| {
            ImageFormat::from_name(f)
                .map_err(|_| Error::Unsupported(format!("backing file format '{f}' (of '{name}')")))
        })
        .transpose()?;
    match (&opts.backing, format) {
        (BackingPolicy::FollowWithoutProbing, None) => {
            return Err(Error::InvalidArgument(format!(
                "'{}' names backing file '{name}' without its format, and probing is not allowed",
                overlay.display()
            )))
        }
        (BackingPolicy::Gate(gate), f) => gate.check(Path::new(name), f)?,
        _ => {}
    }
    chain.enter(Path::new(name))?;
    // QEMU's words: "Could not open backing file: REASON", the reason
    // being the protocol driver's own.
    let storage = match opener.open_backing(name) {
        Some(Ok(storage)) => storage,
        Some(Err(e)) => return Err(Error::InvalidArgument(format!("Could not open backing file: {e}"))),
        None => {
            return Err(Error::InvalidArgument(format!("Could not open backing file: Unknown protocol in '{name}'")))
        }
    };
    backing_opts.format = format;
    Ok(Arc::new(Image::open_storage(storage, &backing_opts)?))
}

/// The options a backing file opens with: the overlay's, read-only,
/// without what belongs to the overlay alone.
fn backing_options(opts: &OpenOptions) -> OpenOptions {
    let mut backing_opts = opts.clone();
    backing_opts.read_only = true;
    backing_opts.repair = false;
    // An explicit data file, the raw windows over the file, and the
    // internal snapshot to read belong to the image they were given for
    // (QEMU's `bdrv_snapshot_load_tmp` loads the snapshot of the top
    // image; its backing file reads as it is).
    backing_opts.data_file = None;
    backing_opts.raw_windows = Vec::new();
    backing_opts.snapshot = None;
    // As in QEMU, the overlay's secret is not the backing file's: that one
    // comes from `backing.encrypt.key-secret`.
    backing_opts.passphrase = opts.backing_passphrase.clone();
    backing_opts.backing_passphrase = None;
    backing_opts.key_secret = None;
    backing_opts.backing_file = None;
    backing_opts.backing_format = None;
    // Backing files open read-only (no repair); their stale-bitmap warning
    // is not printed (only the top image's).
    backing_opts.messages = None;
    backing_opts
}

/// Reads a `json:{...}` node name (`text` after the prefix): the file it
/// names, its driver if it names one, and its raw windows (into `opts`).
/// A header's name comes from whoever made the image, so it may say no
/// more than a plain name and a backing format would (plus windows onto
/// that file): any other option is refused, and the file goes through the
/// caller's backing policy like any other name.
pub(crate) fn json_node(text: &str, opts: &mut OpenOptions) -> Result<(PathBuf, Option<String>)> {
    let mut options = crate::names::parse_json_name(text).map_err(Error::InvalidArgument)?;
    opts.raw_windows = crate::options::take_raw_windows(&mut options).map_err(Error::InvalidArgument)?;
    let mut path = None;
    let mut driver = None;
    for (key, value) in options {
        match key.as_str() {
            "driver" => driver = Some(value),
            "file.filename" | "filename" | "file" => match crate::names::parse_image_name(&value) {
                Ok(crate::names::ImageName::File { filename, .. }) => path = Some(PathBuf::from(filename)),
                Ok(_) => return Err(Error::Unsupported(format!("'{value}' as a file in a json: backing file name"))),
                Err(e) => return Err(Error::InvalidArgument(e)),
            },
            "file.driver" if value == "file" => {}
            "file.driver" => return Err(Error::InvalidArgument(format!("Unknown protocol '{value}'"))),
            _ => {
                return Err(Error::Unsupported(format!(
                    "the option '{key}' in a json: backing file name (only a file, its format and raw windows)"
                )))
            }
        }
    }
    let path = path.ok_or_else(|| Error::InvalidArgument("A block device must be specified for \"file\"".into()))?;
    Ok((path, driver))
}
