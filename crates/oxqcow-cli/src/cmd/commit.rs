//! `commit`: copies what an overlay holds into its backing file (or, with
//! `-b`, into any image further down its chain), as `qemu-img commit` does,
//! on top of the library's [`oxqcow::chain_ops::commit`].
//!
//! Without `-d` (and without `-b`, which implies `-d`) the overlay is
//! emptied afterwards, so it reads as its backing file. `-r` limits the
//! copy to that many bytes per second.

use std::path::Path;

use oxqcow::backing::resolve_backing_path;
use oxqcow::Image;

use crate::app::ctx::Ctx;
use crate::app::forbid_backing::FORBID_BACKING;
use crate::app::getopt::{HasArg, Opt};
use crate::app::image::is_cache_mode;
use crate::app::messages::describe;
use crate::app::numbers::cvtnum;
use crate::app::progress::Progress;
use crate::app::CommonOpts;

const SPEC: &[Opt] = &[
    Opt::both('h', "help", HasArg::No),
    Opt::long("object", HasArg::Required),
    Opt::long("image-opts", HasArg::No),
    Opt::both('q', "quiet", HasArg::No),
    Opt::both('p', "progress", HasArg::No),
    Opt::both('f', "format", HasArg::Required),
    Opt::both('t', "cache", HasArg::Required),
    Opt::both('d', "drop", HasArg::No),
    Opt::both('b', "base", HasArg::Required),
    Opt::both('r', "rate", HasArg::Required),
    Opt::long(FORBID_BACKING, HasArg::No),
];

fn help(prog: &str) {
    print!(
        "Usage:\n\
         Commit image to its backing file.  Usage:\n\n  \
         {prog} commit [-f FMT | --image-opts] [-t CACHE_MODE] [-b BASE_IMG] [-d]\n        \
         [-r RATE] [--object OBJDEF] FILENAME\n\n\
         Arguments:\n  \
         -h, --help\n     print this help and exit\n  \
         -q, --quiet\n     quiet operations\n  \
         -p, --progress\n     show operation progress\n  \
         -f, --format FMT\n     specify FILENAME image format explicitly\n  \
         --image-opts\n     indicates that FILENAME is a complete image specification\n     \
         instead of a file name (incompatible with --format)\n  \
         -t, --cache CACHE_MODE image cache mode (writeback)\n  \
         -d, --drop\n     skip emptying FILENAME on completion\n  \
         -b, --base BASE_IMG\n     image in the backing chain to which to commit changes\n     \
         instead of the previous one (implies --drop)\n  \
         -r, --rate RATE\n     I/O rate limit\n  \
         --object OBJDEF\n     QEMU user-creatable object (eg encryption key)\n  \
         --forbid-backing\n     refuse images that name a backing file (oxqcow; commit then always fails)\n  \
         FILENAME\n     name of the image file to operate on\n"
    );
}

/// Runs `commit`.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    let prog = &ctx.prog;
    let parsed = match ctx.getopt("commit", args, SPEC) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let mut common = CommonOpts::default();
    let mut base = None;
    let mut keep_top = false;
    let mut rate = 0u64;
    for (key, value) in parsed.opts {
        let v = value.unwrap_or_default();
        match key.as_str() {
            "h" => {
                help(prog);
                return 0;
            }
            "b" => {
                base = Some(v);
                // -b implies -d: the images above the base stay valid.
                keep_top = true;
            }
            "d" => keep_top = true,
            "r" => match cvtnum("rate limit", &v, 0, i64::MAX as u64) {
                Ok(n) => rate = n,
                Err(msg) => return ctx.fail(&msg),
            },
            _ => {
                if let Err(msg) = common.consume(&key, &v) {
                    return ctx.fail(&msg);
                }
            }
        }
    }
    let (format, cache, quiet) = (common.format.clone(), common.cache_or("writeback"), common.quiet);
    let [filename] = parsed.operands.as_slice() else {
        return ctx.usage_error("commit", "Expecting one image file name");
    };
    if !is_cache_mode(&cache) {
        return ctx.fail(&format!("Invalid cache option: {cache}"));
    }
    // The secrets (and backing options) of --image-opts unlock the chain
    // the library reopens.
    let open_opts = match common.image_opts {
        true => match crate::app::image::parse_image_opts(filename) {
            Ok((_, _, o)) => o,
            Err(msg) => return ctx.fail(&msg),
        },
        false => oxqcow::OpenOptions::default(),
    };
    // The base's lost bitmaps are reported as its close finds them.
    let open_opts = oxqcow::OpenOptions {
        messages: Some(crate::app::messages::open_messages()),
        protocols: crate::app::backing_protocols::protocols(),
        ..open_opts
    };
    let (image, filename) =
        match crate::app::image::open_operand(filename, common.image_opts, format.as_deref(), false, false) {
            Ok(i) => i,
            Err(msg) => return ctx.fail(&msg),
        };
    let filename = &filename;
    if let Err(msg) = crate::app::image::apply_cache_mode(&image, &cache, filename) {
        return ctx.fail(&msg);
    }
    if format.is_none() && image.format() == oxqcow::ImageFormat::Raw {
        crate::app::messages::warn_probed_raw(filename);
    }
    let layers = chain(&image, filename);
    if layers.len() < 2 {
        return ctx.fail("Image does not have a backing file");
    }
    let base_path = match &base {
        None => None,
        Some(b) => match find_in_chain(&layers, b) {
            Some(i) => Some(layers[i].path.clone()),
            None => return ctx.fail(&format!("Did not find '{b}' in the backing chain of '{filename}'")),
        },
    };
    // The library opens the chain itself.
    drop(image);

    let display = Progress::new(common.show_progress(), 1.0);
    display.print(0.0, 100);
    let limit = oxqcow::copy::RateLimit::new(rate);
    let mut on_progress = |done: u64, total: u64| {
        if total > 0 {
            display.print((done as f64 / total as f64 * 100.0) as f32, 0);
        }
        if let Some(l) = &limit {
            l.pace_total(done);
        }
    };
    let res = oxqcow::chain_ops::commit_with(
        Path::new(filename),
        &open_opts,
        base_path.as_deref().map(Path::new),
        keep_top,
        &mut on_progress,
    );
    match res {
        Ok(()) => {
            display.print(100.0, 0);
            display.end();
            if !quiet {
                println!("Image committed.");
            }
            0
        }
        Err(e @ oxqcow::Error::BitmapsLost(_)) => {
            display.end();
            ctx.fail(&format!("Error while closing the image: {}", crate::app::messages::errno_text(&e)))
        }
        Err(e) => {
            display.end();
            ctx.fail(&describe(&e))
        }
    }
}

/// One layer of an open chain.
struct Layer {
    /// The file, as QEMU names it.
    path: String,
    /// The backing file name as the layer above records it (`None` for the
    /// top).
    recorded: Option<String>,
}

/// The layers of an open image's chain, top first.
fn chain(image: &Image, filename: &str) -> Vec<Layer> {
    let mut layers = vec![Layer { path: filename.to_string(), recorded: None }];
    let mut layer = image;
    while let Some(q) = layer.as_qcow2() {
        let (Some(name), Some(backing)) = (q.info().backing_file, q.backing()) else { break };
        let path = crate::app::image::backing_filename(&layers.last().expect("never empty").path, &name);
        layers.push(Layer { path, recorded: Some(name) });
        layer = backing;
    }
    layers
}

/// Which layer below the top `name` means, as QEMU finds a backing image:
/// the name recorded by the layer above, or (relative names taken from the
/// directory of the layer above) the same file.
fn find_in_chain(layers: &[Layer], name: &str) -> Option<usize> {
    let same_file = |a: &Path, b: &Path| match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    };
    (1..layers.len()).find(|&i| {
        let layer = &layers[i];
        let wanted = resolve_backing_path(Path::new(&layers[i - 1].path), name);
        layer.recorded.as_deref() == Some(name) || same_file(&wanted, Path::new(&layer.path))
    })
}
