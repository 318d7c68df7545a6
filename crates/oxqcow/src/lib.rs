//! oxqcow: a qcow2 disk image engine.
//!
//! Open or create qcow2 (v2 and v3), raw and luks images, read qcow (v1)
//! images, and use them from many threads at once: [`Image`] / [`Qcow2`] /
//! [`Raw`] / [`Luks`] / [`Qcow`] take `&self` for every
//! I/O call (`read_at`, `write_at`, `write_zeroes_at`, `discard`, `flush`,
//! `block_status`), and the metadata lock is never held across guest data
//! I/O. See ARCHITECTURE.md for the design and the crash-safety rules.
// Unsafe code is denied everywhere but in `lock`, whose byte-range OFD locks
// need one fcntl call that no safe crate offers.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod chain_ops;
pub mod compress;
pub mod copy;
pub mod crypt;
pub mod cursor;
pub mod dirty;
pub mod error;
mod extent;
pub mod image;
pub mod luks;
pub mod measure;
pub mod names;
pub mod options;
pub mod qcow;
mod qcow2;
pub mod qemu_syntax;
pub mod raw;
pub mod storage;

pub use image::{backing, data_file};
pub use qcow2::meta::{amend, bitmap, check, mapping, overlap};

pub use bitmap::BitmapInfo;
pub use check::{CheckReport, RepairMode, MAX_KEPT_MESSAGES};
pub use cursor::ImageCursor;
pub use dirty::DirtyBitmap;
pub use error::{Error, ErrorKind, Result};
pub use extent::Extent;
pub use image::{probe, probe_format, supported_format, BlockDevice, Children, Image};
pub use luks::Luks;
pub use options::{
    CacheMode, Compat, CompressionType, CreateOptions, DetectZeroes, Encryption, EncryptionFormat, ImageFormat,
    ImageMessage, ImageMessages, OpenOptions, Preallocation,
};
pub use oxqcow_format as format;
pub use oxqcow_format::probe::Probed;
pub use qcow::Qcow;
pub use qcow2::{Qcow2, Qcow2Info};
pub use raw::Raw;
pub use storage::{FileStorage, MemoryStorage, NullStorage, Storage};
