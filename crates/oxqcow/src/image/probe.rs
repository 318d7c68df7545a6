//! Which format a file is, from its first bytes (and, for formats QEMU
//! probes by name or trailer, its name and last sector): every format QEMU
//! probes is recognised, and those the engine does not implement are
//! refused instead of being opened as raw (see `oxqcow_format::probe`).

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use oxqcow_format::probe::{probe_head, probe_trailer, Probed, PROBE_LEN, TRAILER_LEN};

use crate::error::{Error, Result};
use crate::options::ImageFormat;
use crate::storage::Storage;

/// Names the format of the image in `storage` as QEMU's probe does (see
/// [`oxqcow_format::probe`]): the first 512 bytes and `file_name` (the name
/// the file is opened by; a name ending in `.dmg` is a dmg image to QEMU),
/// and, when those say raw, oxqcow's look at the last sector for the
/// formats whose only signature is a trailer. An empty file is raw.
pub fn probe(storage: &dyn Storage, file_name: Option<&Path>) -> Result<Probed> {
    let len = storage.len().map_err(Error::io("probing the image format", 0))?;
    if len == 0 {
        return Ok(Probed::Raw);
    }
    let mut head = [0u8; PROBE_LEN];
    storage.read_at(&mut head, 0).map_err(Error::io("probing the image format", 0))?;
    let probed = probe_head(&head, file_name.map(|p| p.as_os_str().as_bytes()));
    if probed != Probed::Raw || len < TRAILER_LEN as u64 {
        return Ok(probed);
    }
    let mut tail = [0u8; TRAILER_LEN];
    let at = len - TRAILER_LEN as u64;
    storage.read_at(&mut tail, at).map_err(Error::io("probing the image format", at))?;
    Ok(probe_trailer(&tail).unwrap_or(Probed::Raw))
}

/// The format oxqcow opens the image in `storage` with, when the caller
/// does not name one: what [`probe`] finds, if oxqcow implements it. Any
/// other format it recognises is refused ([`Error::UnsupportedFormat`]),
/// never opened as raw: its metadata would be read as guest data and
/// writes would overwrite it. Naming the format raw opens it as raw.
pub fn probe_format(storage: &dyn Storage, file_name: Option<&Path>) -> Result<ImageFormat> {
    supported_format(probe(storage, file_name)?)
}

/// The implemented format a probe result maps to.
pub fn supported_format(probed: Probed) -> Result<ImageFormat> {
    match probed {
        Probed::Qcow2 => Ok(ImageFormat::Qcow2),
        Probed::Raw => Ok(ImageFormat::Raw),
        Probed::Luks => Ok(ImageFormat::Luks),
        Probed::Qcow => Ok(ImageFormat::Qcow),
        other => Err(Error::UnsupportedFormat(other.name())),
    }
}
