//! `--forbid-backing`: the process-wide switch that refuses every backing
//! file and external data file an image names.
//!
//! An image from a stranger can name any file as its backing file, and
//! opening the image would hand that file's content to whoever reads it.
//! With `--forbid-backing` (given before the subcommand, `oxqcow
//! --forbid-backing info x.qcow2`, or as an option of a subcommand that
//! declares it) no backing file is ever opened: every image whose header
//! names one is refused with an error, whatever the subcommand; the same
//! holds for external data files (their names are just as dangerous). The flag is
//! process-wide: [`crate::app::image::open_image`] applies it to every
//! image it opens, so a subcommand gets it by opening images through it
//! (or by asking [`backing_policy`]).

use std::sync::atomic::{AtomicBool, Ordering};

use oxqcow::backing::BackingPolicy;

/// The name of the flag that forbids backing files, without dashes.
pub const FORBID_BACKING: &str = "forbid-backing";

/// Set once `--forbid-backing` was seen.
static BACKING_FORBIDDEN: AtomicBool = AtomicBool::new(false);

/// Forbids opening backing files for the rest of the process.
pub fn forbid_backing() {
    BACKING_FORBIDDEN.store(true, Ordering::Release);
}

/// Whether `--forbid-backing` was given.
pub fn backing_forbidden() -> bool {
    BACKING_FORBIDDEN.load(Ordering::Acquire)
}

/// The policy for backing files named by images: `wanted` unless
/// `--forbid-backing` was given.
pub fn backing_policy(wanted: BackingPolicy) -> BackingPolicy {
    if backing_forbidden() {
        BackingPolicy::Forbid
    } else {
        wanted
    }
}
