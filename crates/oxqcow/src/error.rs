//! The engine's one error type.
//!
//! Every variant says what was wrong and where: host I/O errors carry the
//! operation and offset, format errors the field and value, corruption the
//! offset of the damaged structure.

use std::io;

use oxqcow_format::FormatError;
use thiserror::Error;

/// A stable classification of errors, for callers that branch on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The host storage failed.
    Io,
    /// The image bytes are not a valid image of the format.
    InvalidFormat,
    /// The image uses something this version does not implement.
    Unsupported,
    /// The image's metadata is inconsistent.
    Corrupt,
    /// A request reaches past the end of the disk.
    OutOfBounds,
    /// The image was opened read-only.
    ReadOnly,
    /// A caller-supplied value is invalid.
    InvalidArgument,
    /// A table would exceed its size limit.
    NoSpace,
    /// An earlier metadata write failed; the image refuses writes until reopened.
    Failed,
    /// Another user holds a conflicting image lock.
    Locked,
}

/// Errors of the oxqcow engine.
#[derive(Debug, Error)]
pub enum Error {
    /// The host storage failed.
    #[error("{op} at offset {offset}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Host offset.
        offset: u64,
        /// The host error.
        #[source]
        source: io::Error,
    },
    /// The image is not valid.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// Not implemented yet.
    #[error("not supported yet: {0}")]
    Unsupported(String),
    /// Probing found an image format oxqcow does not implement (named as
    /// QEMU names it). The text is what QEMU says when a probe finds a
    /// format whose driver its build leaves out of the driver whitelist:
    /// oxqcow is such a build, with qcow2 and raw whitelisted.
    #[error("Driver '{0}' is not whitelisted")]
    UnsupportedFormat(&'static str),
    /// Inconsistent metadata.
    #[error("{0}")]
    Corrupt(String),
    /// Request outside the disk.
    #[error("request at offset {offset} with length {len} is past the end of the disk ({size} bytes)")]
    OutOfBounds {
        /// Guest offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Disk size.
        size: u64,
    },
    /// Write to a read-only image.
    #[error("Image is read-only")]
    ReadOnly,
    /// Bad caller input.
    #[error("{0}")]
    InvalidArgument(String),
    /// A table would grow past its limit.
    #[error("{0}")]
    NoSpace(String),
    /// Another process (or open) holds a conflicting lock.
    #[error("{0}")]
    Locked(String),
    /// Persistent bitmaps could not be stored at close (QEMU's "Lost
    /// persistent bitmaps during inactivation"): the reason, as QEMU words
    /// it. The image stays open, so that closing it tries again.
    #[error("{0}")]
    BitmapsLost(String),
    /// Sticky failure after a failed metadata write.
    #[error("an earlier metadata update failed ({0}); reopen the image")]
    Failed(String),
}

impl Error {
    /// The classification of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } => ErrorKind::Io,
            Error::Format(_) => ErrorKind::InvalidFormat,
            Error::Unsupported(_) | Error::UnsupportedFormat(_) => ErrorKind::Unsupported,
            Error::Corrupt(_) => ErrorKind::Corrupt,
            Error::OutOfBounds { .. } => ErrorKind::OutOfBounds,
            Error::ReadOnly => ErrorKind::ReadOnly,
            // QEMU's inactivation fails with EINVAL.
            Error::InvalidArgument(_) | Error::BitmapsLost(_) => ErrorKind::InvalidArgument,
            Error::NoSpace(_) => ErrorKind::NoSpace,
            Error::Failed(_) => ErrorKind::Failed,
            Error::Locked(_) => ErrorKind::Locked,
        }
    }

    pub(crate) fn io(op: &'static str, offset: u64) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io { op, offset, source }
    }
}

/// Result with the engine's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
