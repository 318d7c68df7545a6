//! External data files (incompatible feature bit 2, autoclear bit 1 "raw
//! external data", header extension 0x44415441 naming the file).
//!
//! This module owns the decisions that are particular to such images:
//! which file is opened as the data file (the header's name resolved like a
//! backing file name, or the caller's explicit choice) and through which
//! gate, how it is locked, and what happens to a data cluster that is freed.
//!
//! Guest data of these images lives in the data file at host offset ==
//! guest offset; metadata (L1, L2, refcounts) stays in the qcow2 file, and
//! data clusters are not refcounted there (QEMU takes their refcount to be
//! 1, which is why every L2 entry carries COPIED and why offset 0 is a
//! valid cluster). A freed data cluster has no refcount to drop: its space
//! is given back in the data file at once when the discard mode says so.
//! With `data_file_raw` the data file must read like the guest disk at all
//! times, so a freed cluster is always punched and zero writes write real
//! zeros there too.
//!
//! A data file name is as dangerous as a backing file name: an image from a
//! stranger can name any file, and reading the image hands out that file's
//! bytes (writing it overwrites them). So the caller's [`BackingPolicy`]
//! applies: `Forbid` refuses such images, a `Gate` is asked, and `json:`
//! names are refused always.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use oxqcow_format::header::Header;

use crate::error::{Error, Result};
use crate::image::backing::{resolve_backing_path, BackingPolicy};
use crate::options::{ImageFormat, OpenOptions};
use crate::storage::lock::LockSet;
use crate::storage::{FileStorage, Storage};

/// The `op` of the I/O error for a data file that cannot be opened or
/// created: its message is complete, as QEMU words it ("Could not open
/// 'NAME': REASON").
pub const OPENING: &str = "opening the data file";

/// The C library's text for an I/O error, without Rust's "(os error N)".
fn strerror(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// Decides which file the image at `image` uses as its data file and opens
/// it (read-only when `opts.read_only`), with QEMU's locks. `None` when the
/// header has no data file and the caller named none.
pub(crate) fn open_for(image: &Path, header: &Header, opts: &OpenOptions) -> Result<Option<Arc<dyn Storage>>> {
    let path = match (&opts.data_file, header.has_data_file()) {
        (Some(explicit), true) => explicit.clone(),
        (Some(_), false) => {
            return Err(Error::InvalidArgument(
                "'data-file' can only be set for images with an external data file".into(),
            ))
        }
        (None, false) => return Ok(None),
        (None, true) => {
            let Some(name) = header.extensions.data_file.as_deref() else {
                return Err(Error::InvalidArgument("'data-file' is required for this image".into()));
            };
            resolve_named(image, name, &opts.backing)?
        }
    };
    let file = FileStorage::open(&path, !opts.read_only).map_err(|e| Error::Io {
        op: OPENING,
        offset: 0,
        source: std::io::Error::new(e.kind(), format!("Could not open '{}': {}", path.display(), strerror(&e))),
    })?;
    if opts.locking.unwrap_or(true) {
        crate::storage::lock::lock(
            file.file(),
            LockSet::for_data_file(opts.read_only, opts.force_share),
            &path.display().to_string(),
        )?;
    }
    Ok(Some(Arc::new(file)))
}

/// Resolves the name an image header records, through the caller's policy.
fn resolve_named(image: &Path, name: &str, policy: &BackingPolicy) -> Result<PathBuf> {
    if name.is_empty() {
        // QEMU's file driver, handed the empty name.
        return Err(Error::InvalidArgument("The 'file' block driver requires a file name".into()));
    }
    if name.starts_with("json:") {
        return Err(Error::Unsupported(format!("json: pseudo-filenames as data files ('{name}')")));
    }
    if matches!(policy, BackingPolicy::Forbid) {
        return Err(Error::InvalidArgument(format!(
            "'{}' has an external data file ('{name}') and opening other files it names is forbidden",
            image.display()
        )));
    }
    let path = resolve_backing_path(image, name);
    if let BackingPolicy::Gate(gate) = policy {
        gate.check(&path, Some(ImageFormat::Raw))?;
    }
    Ok(path)
}

/// Creates (or opens without truncating) the data file named by `-o
/// data_file=NAME` next to the image at `image` (relative names are
/// relative to its directory) and locks it for writing.
pub(crate) fn create_for(image: &Path, name: &str) -> Result<Arc<dyn Storage>> {
    if name.starts_with("json:") {
        return Err(Error::Unsupported(format!("json: pseudo-filenames as data files ('{name}')")));
    }
    let path = resolve_backing_path(image, name);
    let file = FileStorage::create(&path).map_err(|e| Error::Io {
        op: OPENING,
        offset: 0,
        source: std::io::Error::new(e.kind(), format!("Could not create '{}': {}", path.display(), strerror(&e))),
    })?;
    crate::storage::lock::lock(file.file(), LockSet::for_data_file(false, false), &path.display().to_string())?;
    file.empty(&path).map_err(Error::io("truncating the data file", 0))?;
    // Sized by the image creation, which does that (and empties them) for
    // data files on any storage.
    Ok(Arc::new(file))
}
