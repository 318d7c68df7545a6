//! The qcow2 on-disk format: bytes in, validated typed values out, and back.
//!
//! This crate owns every byte layout of a qcow2 image: the header and its
//! extensions, L1/L2 table entries, refcount table entries and refcount
//! blocks of any width, compressed cluster descriptors, the snapshot table,
//! the bitmap directory and bitmap tables, and the LUKS1 header of encrypted
//! images (and of the luks format); the header and table entries of qcow
//! version 1 images (`qcow`); and the signatures by which QEMU recognises every format it
//! probes ([`probe`]).
//! It does no I/O and keeps no state; the engine (`oxqcow`) reads bytes from
//! storage and hands them here, so that no logic module ever slices bytes.
//! Every size read from disk is bounded here (see [`limits`]) before anything
//! is allocated or computed from it.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bitmap;
pub mod error;
pub mod header;
pub mod limits;
pub mod luks;
pub mod probe;
pub mod qcow;
pub mod refcount;
pub mod snapshot;
pub mod table;
pub mod types;

pub use bitmap::{BitmapDirEntry, BitmapTableEntry};
pub use error::FormatError;
pub use header::{Extensions, FeatureName, FeatureType, Header, UnknownExtension};
pub use refcount::{RefcountBlock, RefcountTableEntry};
pub use snapshot::{SnapshotEntry, SnapshotRepair, SnapshotTable};
pub use table::{CompressedDescriptor, L1Entry, L2Bitmap, L2Entry, L2Mapping, Subcluster};
pub use types::{Geometry, GuestCluster, GuestOffset, HostCluster, HostOffset};
