//! `rebase`: changes the backing file of an image, as `qemu-img rebase`
//! does, on top of the library's [`oxqcow::chain_ops::rebase`].
//!
//! Safe mode (the default) first copies into the image every range whose
//! content would change, so the guest sees the same disk on the new backing
//! file (`-b ""`: on no backing file at all); `-u` only rewrites the header.
//! A relative new backing file name is taken from the image's directory,
//! as QEMU takes it.
//!
//! Unlike qemu-img, which copies the data and only then refuses to record a
//! backing file without its format, a missing `-F` is refused before
//! anything is written.

use std::path::Path;

use oxqcow::backing::{resolve_backing_path, BackingPolicy};
use oxqcow::chain_ops::RebaseOptions;
use oxqcow::{CacheMode, ImageFormat, OpenOptions};

use crate::app::ctx::Ctx;
use crate::app::forbid_backing::FORBID_BACKING;
use crate::app::image::{chain_filenames, open_image};
use crate::app::messages::describe;

use crate::app::getopt::{HasArg, Opt};
use crate::app::progress::Progress;
use crate::app::CommonOpts;

/// qemu-img's `IO_BUF_SIZE`: rebase reports progress once per this many bytes.
const IO_BUF_SIZE: u64 = 2 << 20;

const SPEC: &[Opt] = &[
    Opt::both('h', "help", HasArg::No),
    Opt::long("object", HasArg::Required),
    Opt::long("image-opts", HasArg::No),
    Opt::both('U', "force-share", HasArg::No),
    Opt::both('q', "quiet", HasArg::No),
    Opt::both('p', "progress", HasArg::No),
    Opt::both('f', "format", HasArg::Required),
    Opt::both('t', "cache", HasArg::Required),
    Opt::both('b', "backing", HasArg::Required),
    Opt::both('F', "backing-format", HasArg::Required),
    Opt::both('T', "backing-cache", HasArg::Required),
    Opt::both('u', "backing-unsafe", HasArg::No),
    Opt::both('c', "compress", HasArg::No),
    Opt::long(FORBID_BACKING, HasArg::No),
];

fn help(prog: &str) {
    print!(
        "Usage:\n\
         Change backing file of the image.  Usage:\n\n  \
         {prog} rebase [-f FMT | --image-opts] [-t CACHE] [-q] [-U] [-p]\n        \
         [-b BACKING_FILENAME [-F BACKING_FMT] [-T BACKING_CACHE]] [-u]\n        \
         [--object OBJDEF] [-c] FILENAME\n\
         Rebases FILENAME on top of BACKING_FILENAME or no backing file\n\n\
         Arguments:\n  \
         -h, --help\n     print this help and exit\n  \
         -q, --quiet\n     quiet operation\n  \
         -p, --progress\n     show progress indicator\n  \
         -f, --format FMT\n     specify FILENAME format explicitly\n  \
         --image-opts\n     indicates that FILENAME is a complete image specification\n     \
         instead of a file name (incompatible with --format)\n  \
         -t, --cache CACHE\n     cache mode for FILENAME (writeback)\n  \
         -b, --backing BACKING_FILENAME|\"\"\n     rebase onto this file (or no backing file)\n  \
         -F, --backing-format BACKING_FMT\n     specify format for BACKING_FILENAME\n  \
         -T, --backing-cache CACHE\n     BACKING_FILENAME cache mode (writeback)\n  \
         -u, --backing-unsafe\n     do not fail if BACKING_FILENAME can not be read\n  \
         -c, --compress\n     compress image (when image supports this)\n  \
         -U, --force-share\n     open image in shared mode for concurrent access\n  \
         --object OBJDEF\n     QEMU user-creatable object (eg encryption key)\n  \
         --forbid-backing\n     refuse images that name a backing file (oxqcow)\n  \
         FILENAME\n     image file name (or specification with --image-opts)\n"
    );
}

/// Runs `rebase`.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    let prog = &ctx.prog;
    let parsed = match ctx.getopt("rebase", args, SPEC) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let mut common = CommonOpts::default();
    let mut backing: Option<String> = None;
    let mut backing_fmt: Option<String> = None;
    let mut compress = false;
    let mut unsafe_mode = false;
    for (key, value) in parsed.opts {
        let v = value.unwrap_or_default();
        match key.as_str() {
            "h" => {
                help(prog);
                return 0;
            }
            "b" => backing = Some(v),
            "F" => backing_fmt = Some(v),
            "u" => unsafe_mode = true,
            "c" => compress = true,
            // -U is accepted and recorded, and changes nothing here.
            _ => {
                if let Err(msg) = common.consume(&key, &v) {
                    return ctx.fail(&msg);
                }
            }
        }
    }
    let (format, image_opts) = (common.format.clone(), common.image_opts);
    let progress = common.show_progress();
    let (cache, src_cache) = (common.cache_or("writeback"), common.source_cache_or("writeback"));
    let [filename] = parsed.operands.as_slice() else {
        return ctx.usage_error("rebase", "Expecting one image file name");
    };
    if !unsafe_mode && backing.is_none() {
        return ctx.usage_error("rebase", "Must specify backing file (-b) or use unsafe mode (-u)");
    }
    // QEMU takes any driver's name here; the file-posix ones name a
    // host file read as it is.
    if let Some(f) = backing_fmt.as_deref() {
        if !oxqcow::image::is_host_driver(f) && ImageFormat::from_name(f).is_err() {
            return ctx.fail(&format!("Invalid format name: '{f}'"));
        }
    }
    let backing_format = backing_fmt.as_deref();
    let Ok(cache_mode) = CacheMode::from_name(&cache) else {
        return ctx.fail(&format!("Invalid cache option: {cache}"));
    };
    let Ok(backing_cache) = CacheMode::from_name(&src_cache) else {
        return ctx.fail(&format!("Invalid source cache option: {src_cache}"));
    };
    // `-b ""` means no backing file.
    let backing = backing.filter(|b| !b.is_empty());
    let shown = backing.as_deref().unwrap_or("(null)");

    // Unsafe mode never reads the old backing file.
    let policy = if unsafe_mode { BackingPolicy::Ignore } else { BackingPolicy::Follow };
    let opened = if image_opts {
        if format.is_some() {
            return ctx.fail("--image-opts and --format are mutually exclusive");
        }
        crate::app::image::parse_image_opts(filename).and_then(|(path, fmt, opts)| {
            crate::app::image::open_image_as(&path, filename, fmt.as_deref(), opts.backing(policy))
                .map(|image| (image, path))
        })
    } else {
        open_image(filename, format.as_deref(), OpenOptions::new().backing(policy)).map(|i| (i, filename.clone()))
    };
    let (image, filename) = match opened {
        Ok(i) => i,
        Err(msg) => return ctx.fail(&msg),
    };
    let filename = &filename;
    if format.is_none() && image.format() == oxqcow::ImageFormat::Raw {
        crate::app::messages::warn_probed_raw(filename);
    }
    if compress && image.as_qcow2().is_none() {
        return ctx.fail("Compression not supported for this file format");
    }
    if image.as_qcow2().is_none() {
        return ctx.fail(&format!("Could not change the backing file to '{shown}': Operation not supported"));
    }
    if let (Some(name), true) = (&backing, crate::app::forbid_backing::backing_forbidden()) {
        return ctx.fail(&format!(
            "'{filename}' would have a backing file ('{name}') and opening backing files is forbidden"
        ));
    }
    if backing.is_some() && backing_format.is_none() {
        return ctx.fail(&format!("Could not change the backing file to '{shown}': backing format must be specified"));
    }
    if let (Some(name), Some(fmt), false) = (&backing, backing_fmt.as_deref(), unsafe_mode) {
        if let Err(code) = check_new_backing(ctx, filename, name, fmt) {
            return code;
        }
    }
    // The library opens the images itself.
    drop(image);

    let new_backing = backing.as_deref().map(|b| (b, backing_format));
    let protocols = crate::app::backing_protocols::protocols();
    let opts = RebaseOptions { unsafe_mode, cache: cache_mode, backing_cache, compress, protocols };
    match rebase(filename, new_backing, opts, progress) {
        // Lost bitmaps were reported as the image closed, and do not fail
        // qemu-img rebase.
        Ok(()) | Err(oxqcow::Error::BitmapsLost(_)) => 0,
        Err(e) => ctx.fail(&format!("Could not change the backing file to '{shown}': {}", describe(&e))),
    }
}

/// Opens the new backing file (with its own chain) to check it, and
/// refuses a chain that would loop back to the image; on failure, the
/// exit code.
fn check_new_backing(ctx: &Ctx, filename: &str, name: &str, fmt: &str) -> Result<(), i32> {
    let path = resolve_backing_path(Path::new(filename), name);
    let path_str = crate::app::image::backing_filename(filename, name);
    let fail = |why: &str| ctx.fail(&format!("Could not open new backing file '{name}': {why}"));
    let fmt = if oxqcow::image::is_host_driver(fmt) {
        oxqcow::image::check_host_file(fmt, &path).map_err(|e| fail(&describe(&e)))?;
        "raw"
    } else {
        fmt
    };
    let new = match open_image(&path_str, Some(fmt), OpenOptions::new().read_only(true)) {
        Ok(i) => i,
        Err(msg) => {
            let prefix = format!("Could not open '{path_str}': ");
            return Err(fail(msg.strip_prefix(&prefix).unwrap_or(&msg)));
        }
    };
    let me = std::fs::canonicalize(filename).ok();
    let loops = chain_filenames(&new, &path_str)
        .iter()
        .any(|layer| std::fs::canonicalize(layer).ok().is_some_and(|p| Some(p) == me));
    if loops {
        return Err(fail(&format!("'{filename}' would become its own backing file")));
    }
    Ok(())
}

/// The library's rebase, with qemu-img's progress display (`-p`).
fn rebase(
    filename: &str,
    new_backing: Option<(&str, Option<&str>)>,
    opts: RebaseOptions,
    progress: bool,
) -> oxqcow::Result<()> {
    let unsafe_mode = opts.unsafe_mode;
    let display = Progress::new(progress, 2.0);
    display.print(0.0, 100);
    // qemu-img reports once per IO_BUF_SIZE bytes walked.
    let mut reported = 0u64;
    let mut on_progress = |done: u64, total: u64| {
        while reported < total && (done >= reported + IO_BUF_SIZE || done == total) {
            let n = IO_BUF_SIZE.min(total - reported);
            display.print(n as f32 / total as f32 * 100.0, 100);
            reported += n;
        }
    };
    let res = oxqcow::chain_ops::rebase(Path::new(filename), new_backing, opts, &mut on_progress);
    if unsafe_mode && res.is_ok() {
        display.print(100.0, 0);
    }
    display.end();
    res
}
