//! The long-running exports: `serve` (qemu-nbd, over the oxqcow-nbd
//! crate), `mount` (a FUSE file, as QEMU's FUSE export) and what both
//! share (`daemon`: opening the exported image, forking into the
//! background). They import `app/` and each other, never `cmd/` or `io/`
//! (`tests/layers.rs` checks it).

pub mod daemon;
pub mod mount;
pub mod qsd;
pub mod serve;
