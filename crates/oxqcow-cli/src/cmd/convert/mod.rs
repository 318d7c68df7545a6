//! `convert`: copies one or more images (concatenated) into a new or an
//! existing image, possibly of another format, as `qemu-img convert` does.
//!
//! `args.rs` reads the command line, `setup.rs` opens the sources and
//! creates or opens the target (with `-o`, `-B`/`-F`, `-c`, `-n`), and
//! `job.rs` runs the copy, which is the library's [`oxqcow::copy`]: block
//! status walked so that zeros are neither read nor written, zero detection
//! inside data (`-S`), `-m` workers writing in order unless `-W`, `-c`
//! compression, only what differs from `-B`'s image written. Sources that
//! are overlays are read through their backing chains.

mod args;
mod job;
mod setup;

use oxqcow::{BlockDevice, CacheMode};

use crate::app::ctx::Ctx;
use crate::app::messages::{describe, strerror};
use crate::app::progress::Progress;
use args::Args;

/// Runs `convert`.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    let a = match args::parse(ctx, args) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let progress = Progress::new(a.progress, 1.0);
    progress.print(0.0, 100);
    let code = match convert(ctx, &a, &progress) {
        Ok(()) => {
            progress.print(100.0, 0);
            0
        }
        Err(msg) if msg.is_empty() => 1,
        Err(msg) => ctx.fail(&msg),
    };
    progress.end();
    code
}

fn convert(ctx: &Ctx, a: &Args, progress: &Progress) -> Result<(), String> {
    let (sources, total) = setup::open_sources(a)?;
    if a.bitmaps {
        setup::check_source_bitmaps(&sources, a.skip_broken_bitmaps)?;
    }
    let out_fmt = a.out_fmt.as_deref().unwrap_or("raw");
    let (_, mut opts, backing) = setup::create_options(a, out_fmt, total)?;
    // A new object is uploaded while it is written, and completed at the
    // end; any early return drops it, which aborts the upload.
    let (target, object) = setup::target(a, out_fmt, &mut opts, backing.is_some())?;
    if a.bitmaps && target.as_qcow2().is_none_or(|q| q.header().version < 3) {
        return Err(format!("Format driver '{out_fmt}' does not support bitmaps"));
    }
    if a.skip_create && target.len() < total {
        return Err("output file is smaller than input file".into());
    }
    let backing_image = setup::backing_image(a, &target, backing.as_ref())?;
    if a.compress && target.as_qcow2().is_none() {
        return Err("Compression not supported for this file format".into());
    }
    // qemu-img's default target cache is "unsafe": no flush until the end,
    // and none at the end either.
    target
        .set_cache_mode(CacheMode::from_name(&a.cache).map_err(|e| describe(&e))?)
        .map_err(|e| format!("Could not open '{}': {}", a.target, describe(&e)))?;
    if let Some(object) = &object {
        object.prepare(&target, &sources, total, a.min_sparse)?;
    }
    // An object is uploaded while it is written: front to back.
    job::run(ctx, a, &sources, &target, backing_image.as_deref(), progress, object.is_some())?;
    if a.compress && target.as_qcow2().is_some_and(|q| q.has_data_file()) {
        // qemu-img ends a compressed conversion with an empty compressed
        // write (to align the file end), which such targets refuse; it
        // fails without a message. (With any data to copy, the first
        // compressed write failed already, with one.)
        return Err(String::new());
    }
    drop(backing_image);
    if a.bitmaps {
        setup::copy_bitmaps(ctx, &sources[0], &target, a.skip_broken_bitmaps)?;
    }
    target.flush().map_err(|e| format!("error while flushing the target: {}", strerror(&e)))?;
    crate::app::image::close_image(target).map_err(|e| format!("error while closing the target: {}", strerror(&e)))?;
    match object {
        Some(object) => object.finish(),
        None => Ok(()),
    }
}
