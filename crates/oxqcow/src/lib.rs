//! oxqcow: a qcow2 disk image engine.
//!
//! Open or create qcow2 (v2 and v3) and raw images and use them from many
//! threads at once: [`Image`] / [`Qcow2`] / [`Raw`] take `&self` for every
//! I/O call (`read_at`, `write_at`, `write_zeroes_at`, `discard`, `flush`,
//! `block_status`), and the metadata lock is never held across guest data
//! I/O. See ARCHITECTURE.md for the design and the crash-safety rules.
// Unsafe code is denied everywhere but in `lock`, whose byte-range OFD locks
// need one fcntl call that no safe crate offers.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod amend;
pub mod backing;
pub mod bitmap;
mod cache;
pub mod chain_ops;
pub mod check;
pub mod compress;
pub mod copy;
pub mod crypt;
pub mod cursor;
pub mod data_file;
pub mod dirty;
pub mod error;
pub mod image;
mod lock;
pub mod mapping;
pub mod measure;
pub mod options;
pub mod overlap;
mod qcow2;
pub mod qemu_syntax;
pub mod raw;
mod refcount;
mod resize;
mod serialise;
mod snapshot;
pub mod storage;
mod write;

pub use bitmap::BitmapInfo;
pub use check::{CheckReport, RepairMode, MAX_KEPT_MESSAGES};
pub use cursor::ImageCursor;
pub use dirty::DirtyBitmap;
pub use error::{Error, ErrorKind, Result};
pub use image::{probe, probe_format, supported_format, BlockDevice, Image};
pub use mapping::Extent;
pub use options::{
    CacheMode, Compat, CompressionType, CreateOptions, Encryption, EncryptionFormat, ImageFormat, ImageMessage,
    ImageMessages, OpenOptions, Preallocation,
};
pub use oxqcow_format as format;
pub use oxqcow_format::probe::Probed;
pub use qcow2::{Qcow2, Qcow2Info};
pub use raw::Raw;
pub use storage::{FileStorage, MemoryStorage, Storage};

impl Qcow2 {
    /// Checks the image's consistency, repairing what `repair` allows. The
    /// report keeps the first [`check::MAX_KEPT_MESSAGES`] message lines.
    pub fn check(&self, repair: Option<RepairMode>) -> Result<CheckReport> {
        check::collected(|out| self.check_with(repair, out))
    }

    /// [`Qcow2::check`], handing each message line to `out` as it is found
    /// (QEMU prints them on stderr as it goes); the report keeps none.
    pub fn check_with(&self, repair: Option<RepairMode>, out: &mut dyn FnMut(&str)) -> Result<CheckReport> {
        if repair.is_some() && self.is_read_only() {
            return Err(Error::ReadOnly);
        }
        self.exclusive(|m, st| check::check(m, st, repair, out))
    }
}
