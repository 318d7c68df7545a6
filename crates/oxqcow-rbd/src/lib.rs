//! Ceph RBD images as oxqcow storage (QEMU's `rbd` protocol driver), through
//! librbd and librados: `options.rs` reads the names and options that name
//! an image, `storage.rs` connects, creates and opens images and implements
//! [`oxqcow::Storage`] on them (allocation from librbd's diff iteration),
//! `sys.rs` declares the C functions. `sys.rs` and `storage.rs` hold the
//! workspace's RBD unsafe code, each block with its reason.

mod options;
mod storage;
mod sys;

pub use options::RbdOptions;
pub use storage::{create, RbdStorage};
