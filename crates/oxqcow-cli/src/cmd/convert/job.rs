//! The copy itself, handed to the library ([`oxqcow::copy`]): the options
//! from the command line, the hooks that pace it (`-r`), show progress
//! (`-p`) and warn about salvaged sectors (`--salvage`), and qemu-img's
//! messages for its failures.

use oxqcow::copy::{copy, CopyError, CopyOptions, CopyStep, Hooks, RateLimit};
use oxqcow::{ErrorKind, Image};

use super::args::Args;
use crate::app::ctx::Ctx;
use crate::app::messages::{describe, strerror};
use crate::app::progress::Progress;

/// Copies `sources` into `target` (whose unallocated clusters read from
/// `backing`) as the command line says, `front_to_back` when the target
/// must be (see [`CopyOptions::front_to_back`]).
pub fn run(
    ctx: &Ctx,
    a: &Args,
    sources: &[Image],
    target: &Image,
    backing: Option<&Image>,
    progress: &Progress,
    front_to_back: bool,
) -> Result<(), String> {
    let rate = RateLimit::new(a.rate);
    let pace = |bytes: u64| {
        if let Some(r) = &rate {
            r.pace(bytes);
        }
    };
    let show = |done: u64, total: u64| {
        let percent = (100.0 * done as f64 / total as f64).min(100.0);
        progress.print(percent as f32, 0);
    };
    let warn = |offset: u64, e: &oxqcow::Error| {
        if !a.quiet {
            eprintln!("{}: warning: error while reading offset {offset}: {}", ctx.prog, strerror(e));
        }
    };
    let hooks = Hooks {
        before_read: rate.is_some().then_some(&pace as &(dyn Fn(u64) + Sync)),
        progress: a.progress.then_some(&show as &(dyn Fn(u64, u64) + Sync)),
        unreadable: Some(&warn),
    };
    let options = CopyOptions {
        workers: a.workers,
        in_order: a.in_order,
        compress: a.compress,
        min_sparse: a.min_sparse,
        // A new image reads as zeros, unless its format cannot say so (a
        // luks image's unwritten sectors decrypt to noise).
        target_is_zero: (!a.skip_create && target.has_zero_init()) || a.target_is_zero,
        salvage: a.salvage,
        copy_range: a.copy_range,
        front_to_back,
    };
    let images: Vec<&Image> = sources.iter().collect();
    copy(&images, target, backing, &options, &hooks).map_err(|e| message(&e))
}

/// qemu-img's message for a failed copy.
fn message(e: &CopyError) -> String {
    let (at, why) = (e.offset, strerror(&e.error));
    match e.step {
        CopyStep::Start => describe(&e.error),
        CopyStep::BlockStatus => format!("error while reading block status at offset {at}: {why}"),
        CopyStep::Read => format!("error while reading at byte {at}: {why}"),
        CopyStep::ReadBacking => format!("error while reading the backing file at byte {at}: {why}"),
        CopyStep::Write => format!("error while writing at byte {at}: {why}"),
        // QEMU's -ENOTSUP (e.g. a target with an external data file).
        CopyStep::WriteCompressed if e.error.kind() == ErrorKind::Unsupported => {
            format!("error while writing at byte {at}: Operation not supported")
        }
        CopyStep::WriteCompressed => format!("error while writing at byte {at}: {why}"),
    }
}
