//! Test helpers for oxqcow (not published).
//!
//! - [`model`]: a flat `Vec<u8>` reference model of a disk with qcow2's
//!   discard rules, image configurations (geometries), and the operations
//!   the model tests apply to both an image and the model.
//! - [`workload`]: random operation sequences (proptest strategies) and the
//!   harness that applies them and compares after every step.
//! - [`crash`]: the crash harness (workload runner, durability tracker,
//!   verification of what survives).
//! - [`faulty`]: a fault-injecting [`oxqcow::Storage`] that counts host
//!   writes and syncs and stops at a chosen write, with two crash models
//!   (torn write with everything earlier persisted; only synced data
//!   persisted).
//! - [`probe`]: open + read every extent + check on untrusted bytes,
//!   bounded; the body of the fuzz target and of the `oxqcow-probe` binary,
//!   plus the seed corpus and its mutator.
//! - [`qemu`]: `qemu-img` / `qemu-io` wrappers that panic with a clear
//!   message when QEMU's tools are missing (tests never skip).
//! - [`prng`]: a tiny seeded PRNG so runs are reproducible.

pub mod crash;
pub mod faulty;
pub mod model;
pub mod prng;
pub mod probe;
pub mod qemu;
pub mod workload;

/// A temporary directory for image files: on tmpfs (`/dev/shm`) when the
/// machine has one, where syncs cost nothing, else the system default.
pub fn scratch_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new().prefix("oxqcow-test-").tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().expect("creating a temporary directory")
}
