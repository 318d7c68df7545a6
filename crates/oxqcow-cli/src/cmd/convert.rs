//! `convert`: copies one or more images (concatenated) into a new or an
//! existing image, possibly of another format, as `qemu-img convert` does.
//!
//! The source is walked by block status: runs that read as zeros are never
//! read, and on a fresh target (which reads as zeros already) never written.
//! Data runs are read in chunks of at most 2 MiB and scanned for runs of
//! zeros at least `-S` bytes long, which are skipped too, so holes stay
//! holes. `-m N` workers take chunks in order and read them in parallel;
//! unless `-W` is given they write them in order, so a qcow2 target gets
//! its clusters laid out as a sequential copy would.
//!
//! Sources that are overlays are read through their backing chains.
//!
//! `-c` compresses every data cluster of a qcow2 target (deflate or zstd as
//! `-o compression_type` says). Chunks are then whole target clusters, and
//! the workers (`-m`, by default one per core) each compress their own
//! chunk in parallel: compression runs in `write_compressed` outside the
//! engine's locks, so compressed chunks are written as soon as they are
//! ready, in any order (the content does not depend on the order; only the
//! host layout does). Clusters that read as zeros stay holes.
//!
//! `-B BACKING` (with `-F FMT`) makes the target an overlay of BACKING, and
//! only what differs from BACKING is written: every chunk is compared with
//! BACKING's content cluster by cluster, and clusters that read the same
//! stay unallocated in the target (zero clusters where the source reads
//! zeros over BACKING data).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use oxqcow::backing::resolve_backing_path;
use oxqcow::{BlockDevice, CacheMode, CreateOptions, Image, ImageFormat, OpenOptions, Preallocation};

use crate::app::ctx::Ctx;
use crate::app::forbid_backing::{backing_forbidden, FORBID_BACKING};
use crate::app::getopt::{self, HasArg, Opt};
use crate::app::image::{is_cache_mode, open_image};
use crate::app::messages::{describe, os_error, strerror};
use crate::app::numbers::cvtnum;
use crate::app::progress::Progress;
use crate::app::snapshot_param::SnapshotParam;
use crate::app::status::StatusCursor;
use crate::app::CommonOpts;

/// qemu-img's `IO_BUF_SIZE`: the largest chunk read and written at once.
const IO_BUF_SIZE: u64 = 2 << 20;
/// The largest zero run handed to the target in one request.
const MAX_ZERO_CHUNK: u64 = 1 << 30;
/// QEMU's sector, the unit of zero detection.
const SECTOR: u64 = 512;
/// qemu-img's `MAX_COROUTINES`.
const MAX_WORKERS: u64 = 16;
/// qemu-img's default number of coroutines.
const DEFAULT_WORKERS: u64 = 8;
/// qemu-img's `MAX_BUF_SECTORS`: the largest `-S`, in sectors.
const MAX_SPARSE_SECTORS: u64 = 32768;
/// Default `-S`: 4 KiB of zeros make a hole.
const DEFAULT_MIN_SPARSE: u64 = 4096;

const LONGS: &[Opt] = &[
    Opt::alias("help", HasArg::No, "h"),
    Opt::alias("quiet", HasArg::No, "q"),
    Opt::alias("progress", HasArg::No, "p"),
    Opt::alias("source-format", HasArg::Required, "f"),
    Opt::alias("source-image-opts", HasArg::No, "image-opts"),
    Opt::alias("image-opts", HasArg::No, "image-opts"),
    Opt::alias("source-snapshot", HasArg::Required, "l"),
    Opt::alias("source-cache", HasArg::Required, "T"),
    Opt::alias("target-format", HasArg::Required, "O"),
    Opt::alias("target-image-opts", HasArg::No, "target-image-opts"),
    Opt::alias("target-options", HasArg::Required, "o"),
    Opt::alias("compress", HasArg::No, "c"),
    Opt::alias("target-cache", HasArg::Required, "t"),
    Opt::alias("backing", HasArg::Required, "B"),
    Opt::alias("backing-format", HasArg::Required, "F"),
    Opt::alias("no-create", HasArg::No, "n"),
    Opt::alias("target-is-zero", HasArg::No, "target-is-zero"),
    Opt::alias("sparse-size", HasArg::Required, "S"),
    Opt::alias("bitmaps", HasArg::No, "bitmaps"),
    Opt::alias("skip-broken-bitmaps", HasArg::No, "skip-broken-bitmaps"),
    Opt::alias("force-share", HasArg::No, "U"),
    Opt::alias("rate", HasArg::Required, "r"),
    Opt::alias("parallel", HasArg::Required, "m"),
    Opt::alias("copy-range-offloading", HasArg::No, "C"),
    Opt::alias("salvage", HasArg::No, "salvage"),
    Opt::alias("oob-writes", HasArg::No, "W"),
    Opt::alias("object", HasArg::Required, "object"),
    Opt::long(FORBID_BACKING, HasArg::No),
];

fn help(prog: &str) {
    print!(
        "Usage:\n\
         Copy one image to another with optional format conversion.  Usage:\n\n  \
         {prog} convert [-f SRC_FMT] [-T SRC_CACHE] [-o TGT_OPTS] [-t TGT_CACHE] [-n]\n        \
         [-O TGT_FMT] [-c] [-B BACKING_FILENAME [-F BACKING_FMT]] [-S SPARSE_SIZE]\n        \
         [-m NUM] [-W] [-r RATE] [--salvage] [-C] [-p] [-q] [-U] [--forbid-backing]\n        \
         SRC_FILENAME [SRC_FILENAME2 [...]] TGT_FILENAME\n\n\
         Arguments:\n  \
         -h, --help\n     print this help and exit\n  \
         -q, --quiet\n     quiet operations\n  \
         -p, --progress\n     show operation progress\n  \
         -f, --source-format SRC_FMT\n     specify SRC_FILENAME source image format explicitly\n  \
         -T, --source-cache SRC_CACHE\n     source image(s) cache mode (writeback)\n  \
         -O, --target-format TGT_FMT\n     specify TGT_FILENAME image format (default is raw)\n  \
         -o, --target-options TGT_OPTS\n     TARGET_FMT-specific options\n  \
         -c, --compress\n     create compressed output image (qcow2 only; -o compression_type=zlib|zstd)\n  \
         -t, --target-cache TGT_CACHE\n     cache mode when opening output image (unsafe)\n  \
         -B, --backing BACKING_FILENAME\n     create output to be a CoW on top of BACKING_FILENAME\n     \
         (only what differs from it is written)\n  \
         -F, --backing-format BACKING_FMT\n     specify BACKING_FILENAME image format explicitly\n  \
         -n, --no-create\n     omit target volume creation\n  \
         --target-is-zero\n     the existing target (-n) reads as zeros already\n  \
         -S, --sparse-size SPARSE_SIZE\n     runs of zeros at least this long stay holes (default 4k; 0 allocates everything)\n  \
         -U, --force-share\n     open images in shared mode for concurrent access\n  \
         -m, --parallel NUM_COROUTINES\n     specify parallelism (default 8; with -c, one per core)\n  \
         -W, --oob-writes\n     enable out-of-order writes to improve performance\n  \
         -r, --rate RATE\n     I/O rate limit, in bytes per second\n  \
         --salvage\n     copy unreadable source sectors as zeros (with a warning) instead of failing\n  \
         -C, --copy-range-offloading\n     copy data as it is, between raw files inside the kernel (copy_file_range)\n  \
         --forbid-backing\n     refuse images that name a backing file (oxqcow)\n  \
         SRC_FILENAME\n     source image file name\n  \
         TGT_FILENAME\n     target (output) image file name\n"
    );
}

/// The parsed command line.
struct Args {
    src_fmt: Option<String>,
    snapshot: Option<SnapshotParam>,
    out_fmt: Option<String>,
    options: Option<String>,
    cache: String,
    src_cache: String,
    skip_create: bool,
    target_is_zero: bool,
    progress: bool,
    quiet: bool,
    /// `-m`; `None`: the default.
    workers: Option<usize>,
    in_order: bool,
    compress: bool,
    /// `--bitmaps`: copy the source's persistent bitmaps.
    bitmaps: bool,
    /// `--skip-broken-bitmaps`: leave inconsistent bitmaps out.
    skip_broken_bitmaps: bool,
    /// `-B`.
    backing: Option<String>,
    /// `-F`.
    backing_fmt: Option<String>,
    /// `-S` in bytes; 0 disables zero detection.
    min_sparse: u64,
    /// `-r` in bytes per second; 0: no limit.
    rate: u64,
    /// `--salvage`: unreadable source sectors are copied as zeros.
    salvage: bool,
    /// `-C`: copy offloading (copy_file_range between raw files); data is
    /// copied as it is, without looking for zeros in it.
    copy_range: bool,
    /// Whether `-S` was given.
    sparse_given: bool,
    sources: Vec<String>,
    target: String,
    /// `--image-opts`: sources are option strings.
    image_opts: bool,
    /// `-U`: sources are opened in shared mode.
    force_share: bool,
    /// `--target-image-opts`: the target is an option string (needs `-n`).
    target_image_opts: bool,
}

/// Runs `convert`.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    let prog = &ctx.prog;
    let parsed = match getopt::parse_declared(prog, "convert", args, ":hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:", LONGS) {
        Ok(p) => p,
        Err(msg) => {
            eprintln!("{msg}");
            return 1;
        }
    };
    let mut a = Args {
        src_fmt: None,
        snapshot: None,
        out_fmt: None,
        options: None,
        cache: "unsafe".into(),
        src_cache: "writeback".into(),
        skip_create: false,
        target_is_zero: false,
        progress: false,
        quiet: false,
        workers: None,
        in_order: true,
        compress: false,
        bitmaps: false,
        skip_broken_bitmaps: false,
        backing: None,
        backing_fmt: None,
        min_sparse: DEFAULT_MIN_SPARSE,
        rate: 0,
        salvage: false,
        copy_range: false,
        sparse_given: false,
        sources: Vec::new(),
        target: String::new(),
        image_opts: false,
        force_share: false,
        target_image_opts: false,
    };
    let mut common = CommonOpts::default();
    for (key, value) in parsed.opts {
        let v = value.unwrap_or_default();
        match key.as_str() {
            "h" => {
                help(prog);
                return 0;
            }
            "O" => a.out_fmt = Some(v),
            "o" => {
                a.options = Some(match a.options.take() {
                    Some(old) => format!("{old},{v}"),
                    None => v,
                })
            }
            "n" => a.skip_create = true,
            "target-is-zero" => a.target_is_zero = true,
            "W" => a.in_order = false,
            "m" => match cvtnum("number of coroutines", &v, 1, MAX_WORKERS) {
                Ok(n) => a.workers = Some(n as usize),
                Err(msg) => return ctx.fail(&msg),
            },
            "S" => match cvtnum("buffer size for sparse output", &v, 0, i64::MAX as u64) {
                Ok(n) if n % SECTOR == 0 && n / SECTOR <= MAX_SPARSE_SECTORS => {
                    a.min_sparse = n;
                    a.sparse_given = true;
                }
                Ok(_) => {
                    return ctx.fail(&format!(
                        "Invalid buffer size for sparse output specified. Valid sizes are multiples of {SECTOR} up \
                         to {}. Select 0 to disable sparse detection (fully allocates output).",
                        MAX_SPARSE_SECTORS * SECTOR
                    ))
                }
                Err(msg) => return ctx.fail(&msg),
            },
            "c" => a.compress = true,
            "B" => a.backing = Some(v),
            "F" => a.backing_fmt = Some(v),
            "l" => match SnapshotParam::parse(&v) {
                Ok(p) => a.snapshot = Some(p),
                Err(key) => {
                    ctx.error(&format!("Invalid parameter '{key}'"));
                    return ctx.fail(&format!("Failed in parsing snapshot param '{v}'"));
                }
            },
            "C" => a.copy_range = true,
            "r" => match cvtnum("rate limit", &v, 0, i64::MAX as u64) {
                Ok(n) => a.rate = n,
                Err(msg) => return ctx.fail(&msg),
            },
            "bitmaps" => a.bitmaps = true,
            "skip-broken-bitmaps" => a.skip_broken_bitmaps = true,
            "target-image-opts" => a.target_image_opts = true,
            "salvage" => a.salvage = true,
            _ => {
                if let Err(msg) = common.consume(&key, &v) {
                    return ctx.fail(&msg);
                }
            }
        }
    }
    a.src_fmt = common.format;
    a.cache = common.cache.unwrap_or(a.cache);
    a.src_cache = common.source_cache.unwrap_or(a.src_cache);
    (a.progress, a.quiet) = (common.progress, common.quiet);
    (a.image_opts, a.force_share) = (common.image_opts, common.force_share);
    if a.skip_broken_bitmaps && !a.bitmaps {
        return ctx.fail("Use of --skip-broken-bitmaps requires --bitmaps");
    }
    if a.copy_range && a.compress {
        return ctx.fail("Cannot enable copy offloading when -c is used");
    }
    if a.copy_range && a.sparse_given {
        return ctx.fail("Cannot enable copy offloading when -S is used");
    }
    if a.target_image_opts && !a.skip_create {
        return ctx.fail("--target-image-opts requires use of -n flag");
    }
    if a.target_is_zero && !a.skip_create {
        return ctx.fail("--target-is-zero requires use of -n flag");
    }
    if parsed.operands.len() < 2 {
        return ctx.fail("Must specify image file name");
    }
    let (target, sources) = parsed.operands.split_last().expect("two operands at least");
    a.target = target.clone();
    a.sources = sources.to_vec();
    if a.sources.len() > 1 && a.snapshot.is_some() {
        return ctx.fail("No support for concatenating multiple snapshot");
    }
    if a.sources.len() > 1 && a.backing.is_some() {
        return ctx
            .fail("Having a backing file for the target makes no sense when concatenating multiple input images");
    }
    if a.skip_create && a.options.is_some() {
        return ctx.fail("-o has no effect when skipping image creation");
    }
    if !is_cache_mode(&a.src_cache) {
        return ctx.fail(&format!("Invalid source cache option: {}", a.src_cache));
    }
    if a.quiet {
        a.progress = false;
    }
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

/// One source image and where it starts in the concatenated whole.
struct Source {
    image: Image,
    start: u64,
    len: u64,
}

/// What the target's backing file is, for `-B`.
struct TargetBacking {
    /// The name recorded in the target's header.
    name: String,
    /// Its format (`-F`).
    format: String,
}

/// The target's backing file from `-B`/`-F` and `-o backing_file`/`backing_fmt`,
/// checked as qemu-img checks them.
fn target_backing(a: &Args, opts: &mut CreateOptions, format: ImageFormat) -> Result<Option<TargetBacking>, String> {
    if let Some(b) = &a.backing {
        if format != ImageFormat::Qcow2 {
            return Err(format!("Backing file not supported for file format '{}'", format.name()));
        }
        opts.backing_file = Some(b.clone());
    }
    if let Some(f) = &a.backing_fmt {
        if format == ImageFormat::Qcow2 {
            opts.backing_format = Some(f.clone());
        }
    }
    let Some(name) = opts.backing_file.clone() else {
        if opts.backing_format.is_some() || (a.backing_fmt.is_some() && !a.skip_create) {
            return Err(format!(
                "{}: error while converting {}: Backing format cannot be used without backing file",
                a.target,
                format.name()
            ));
        }
        return Ok(None);
    };
    let Some(fmt) = opts.backing_format.clone() else {
        return Err("Use of backing file requires explicit backing format".into());
    };
    if ImageFormat::from_name(&fmt).is_err() {
        return Err(format!(
            "{}: error while converting {}: Unknown backing file format '{fmt}'",
            a.target,
            format.name()
        ));
    }
    if backing_forbidden() {
        return Err(format!(
            "'{}' would have a backing file ('{name}') and opening backing files is forbidden",
            a.target
        ));
    }
    Ok(Some(TargetBacking { name, format: fmt }))
}

fn convert(ctx: &Ctx, a: &Args, progress: &Progress) -> Result<(), String> {
    let mut sources = Vec::with_capacity(a.sources.len());
    let mut total = 0u64;
    for name in &a.sources {
        let (image, _) =
            crate::app::image::open_operand(name, a.image_opts, a.src_fmt.as_deref(), true, a.force_share)?;
        let image = match &a.snapshot {
            Some(p) => p.load(image, name, a.src_fmt.as_deref())?,
            None => image,
        };
        image
            .set_cache_mode(CacheMode::from_name(&a.src_cache).map_err(|e| describe(&e))?)
            .map_err(|e| format!("Could not open '{name}': {}", describe(&e)))?;
        let len = image.len();
        sources.push(Source { image, start: total, len });
        total = total.checked_add(len).ok_or("the sources are too large together")?;
    }
    if a.bitmaps {
        check_source_bitmaps(&sources, a.skip_broken_bitmaps)?;
    }
    let out_fmt = a.out_fmt.as_deref().unwrap_or("raw");
    let format = ImageFormat::from_name(out_fmt).map_err(|_| format!("Unknown file format '{out_fmt}'"))?;

    let mut opts = match format {
        ImageFormat::Qcow2 => CreateOptions::qcow2(total),
        ImageFormat::Raw => CreateOptions::raw(total),
    };
    if let Some(o) = &a.options {
        // The encryption options are read as create reads them (secrets by
        // id, QEMU's messages); the rest are the library's.
        let (enc, rest): (Vec<_>, Vec<_>) = crate::app::imgopts::split_options(o)
            .into_iter()
            .partition(|(k, _)| k == "encryption" || k.starts_with("encrypt."));
        if format == ImageFormat::Qcow2 && !enc.is_empty() {
            let mut io = crate::app::imgopts::ImgOpts::new(format);
            for (k, v) in &enc {
                io.set(k, v)?;
            }
            opts.encryption = io.encryption()?;
        }
        let o = if format == ImageFormat::Qcow2 {
            rest.iter().map(|(k, v)| format!("{k}={}", v.replace(',', ",,"))).collect::<Vec<_>>().join(",")
        } else {
            o.clone()
        };
        opts.apply_option_string(&o).map_err(|e| {
            let msg = describe(&e);
            // qcow2 itself checks the compression type, when creating.
            if msg.starts_with("Parameter 'compression-type'") {
                format!("{}: error while converting {out_fmt}: {msg}", a.target)
            } else {
                msg
            }
        })?;
    }
    opts.size = total;
    opts.size_given = true;
    let backing = if a.skip_create && a.backing.is_none() { None } else { target_backing(a, &mut opts, format)? };
    if a.compress {
        if format != ImageFormat::Qcow2 {
            return Err("Compression not supported for this file format".into());
        }
        if opts.encryption.is_some() {
            return Err("Compression and encryption not supported at the same time".into());
        }
        if opts.preallocation != Preallocation::Off {
            return Err("Compression and preallocation not supported at the same time".into());
        }
    }

    let target = if a.skip_create {
        None
    } else {
        // Like qemu-img, create without looking at the backing file; opening
        // the new image below reports a backing file that cannot be opened.
        opts.unsafe_backing = true;
        let image = Image::create(Path::new(&a.target), &opts).map_err(|e| {
            let why = match &e {
                oxqcow::Error::Io { op: "creating the image", source, .. } => {
                    format!("Could not create '{}': {}", a.target, os_error(source))
                }
                other => describe(other),
            };
            format!("{}: error while converting {out_fmt}: {why}", a.target)
        })?;
        if backing.is_some() {
            image.close().map_err(|e| format!("error while closing the target: {}", strerror(&e)))?;
            None
        } else {
            Some(image)
        }
    };
    if !is_cache_mode(&a.cache) {
        return Err(format!("Invalid cache option: {}", a.cache));
    }
    let target = match target {
        Some(t) => t,
        // Like qemu-img, which opens the target with unmap allowed: clusters
        // freed by zeroing give their space back to the host.
        None if a.target_image_opts => {
            if a.out_fmt.is_some() {
                return Err("--image-opts and --format are mutually exclusive".into());
            }
            let (path, fmt, mut opts) = crate::app::image::parse_image_opts(&a.target)?;
            opts.discard_passthrough = true;
            crate::app::image::open_image_as(&path, &a.target, fmt.as_deref(), opts)?
        }
        None => {
            let mut opts = OpenOptions::new();
            opts.discard_passthrough = true;
            open_image(&a.target, Some(out_fmt), opts)?
        }
    };
    if a.bitmaps && target.as_qcow2().is_none_or(|q| q.header().version < 3) {
        return Err(format!("Format driver '{out_fmt}' does not support bitmaps"));
    }
    if a.skip_create && target.len() < total {
        return Err("output file is smaller than input file".into());
    }
    // The image the target's unallocated clusters read from.
    let backing_image: Option<Arc<Image>> = match &backing {
        None => None,
        Some(b) if !a.skip_create => match target.as_qcow2().and_then(|q| q.backing()) {
            Some(image) => Some(image.clone()),
            None => return Err(format!("Could not open '{}': the backing file was not opened", a.target)),
        },
        // With -n, the existing target is trusted to be an overlay of -B.
        Some(b) => {
            let path = resolve_backing_path(Path::new(&a.target), &b.name);
            let shown = path.to_string_lossy().into_owned();
            Some(Arc::new(open_image(&shown, Some(&b.format), OpenOptions::new().read_only(true))?))
        }
    };
    let cluster = target.as_qcow2().map_or(SECTOR, |q| q.geometry().cluster_size());
    if a.compress && target.as_qcow2().is_none() {
        return Err("Compression not supported for this file format".into());
    }
    let workers = a.workers.unwrap_or_else(|| {
        if a.compress {
            // Compression is CPU bound: one worker per core.
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            // qemu-img's 8 requests in flight are coroutines in one thread;
            // here each worker is a thread, and more threads than cores
            // only add switching to a copy bound by memory bandwidth.
            std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, DEFAULT_WORKERS as usize)
        }
    });
    // qemu-img's default target cache is "unsafe": no flush until the end,
    // and none at the end either.
    target
        .set_cache_mode(CacheMode::from_name(&a.cache).map_err(|e| describe(&e))?)
        .map_err(|e| format!("Could not open '{}': {}", a.target, describe(&e)))?;

    let job = Job {
        sources: &sources,
        target: &target,
        backing: backing_image.as_deref(),
        total,
        target_len: target.len(),
        cluster,
        compress: a.compress,
        min_sparse: a.min_sparse,
        alignment: alignment(a.min_sparse),
        has_zero_init: !a.skip_create || a.target_is_zero,
        // Compressed chunks are written as soon as they are compressed. A
        // raw target's bytes do not depend on the order of the writes (only
        // a qcow2 target's cluster layout does), so chunks go out as soon
        // as they are read: waiting for turns cost a third of the time.
        in_order: a.in_order && !a.compress && format != ImageFormat::Raw,
        progress,
        data_total: if a.progress { count_data(&sources, a.min_sparse)? } else { 0 },
        rate: crate::app::ratelimit::RateLimit::new(a.rate),
        salvage: a.salvage.then_some(Salvage { prog: &ctx.prog, quiet: a.quiet }),
        copy_range: a.copy_range,
    };
    job.run(workers.max(1))?;
    if a.compress && target.as_qcow2().is_some_and(|q| q.has_data_file()) {
        // qemu-img ends a compressed conversion with an empty compressed
        // write (to align the file end), which such targets refuse; it
        // fails without a message. (With any data to copy, the first
        // compressed write failed already, with one.)
        return Err(String::new());
    }
    drop(backing_image);
    if a.bitmaps {
        copy_bitmaps(ctx, &sources[0].image, &target, a.skip_broken_bitmaps)?;
    }
    target.flush().map_err(|e| format!("error while flushing the target: {}", strerror(&e)))?;
    target.close().map_err(|e| format!("error while closing the target: {}", strerror(&e)))?;
    Ok(())
}

/// qemu-img's `convert_check_bitmaps`: one qcow2 (v3) source whose
/// bitmaps are all consistent, unless broken ones are to be skipped.
fn check_source_bitmaps(sources: &[Source], skip_broken: bool) -> Result<(), String> {
    if sources.len() > 1 {
        return Err("Copying bitmaps only possible with single source".into());
    }
    let Some(q) = sources[0].image.as_qcow2().filter(|q| q.header().version >= 3) else {
        return Err("Source lacks bitmap support".into());
    };
    if skip_broken {
        return Ok(());
    }
    // QEMU walks its bitmap list, newest (last loaded) first.
    match q.bitmaps().iter().rev().find(|b| b.in_use) {
        Some(b) => Err(format!(
            "Cannot copy inconsistent bitmap '{}'\nTry --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it",
            b.name
        )),
        None => Ok(()),
    }
}

/// qemu-img's `convert_copy_bitmaps`: each bitmap is added to the target
/// (same granularity, same enabled state) and filled from the source.
fn copy_bitmaps(ctx: &Ctx, source: &Image, target: &Image, skip_broken: bool) -> Result<(), String> {
    let (Some(src), Some(dst)) = (source.as_qcow2(), target.as_qcow2()) else { return Ok(()) };
    for b in src.bitmaps().iter().rev() {
        if b.in_use {
            if skip_broken {
                ctx.error(&format!("warning: Skipping inconsistent bitmap '{}'", b.name));
            }
            continue;
        }
        dst.bitmap_add(&b.name, Some(b.granularity), b.auto)
            .map_err(|e| format!("Failed to create bitmap {}: {}", b.name, describe(&e)))?;
        let filled = src.bitmap_contents(&b.name).and_then(|bits| dst.bitmap_merge(&b.name, &bits));
        if let Err(e) = filled {
            let _ = dst.bitmap_remove(&b.name);
            return Err(format!("Failed to populate bitmap {}: {}", b.name, describe(&e)));
        }
    }
    Ok(())
}

/// qemu-img's write alignment for zero detection, in bytes: the sparse size
/// rounded down to a power of two, at least one sector.
fn alignment(min_sparse: u64) -> u64 {
    let sectors = min_sparse / SECTOR;
    let pow2 = if sectors == 0 { 1 } else { 1u64 << (63 - sectors.leading_zeros()) };
    pow2.max(1) * SECTOR
}

/// Bytes the copy will read and write as data, for the progress display
/// (qemu-img's `allocated_sectors`).
fn count_data(sources: &[Source], min_sparse: u64) -> Result<u64, String> {
    let mut n = 0;
    for s in sources {
        let mut cur = StatusCursor::new(&s.image);
        let mut off = 0;
        while off < s.len {
            let e = cur.at(off).map_err(|e| status_error(off, &e))?;
            if !e.zero || min_sparse == 0 {
                n += e.length;
            }
            off += e.length;
        }
    }
    Ok(n)
}

fn status_error(offset: u64, e: &oxqcow::Error) -> String {
    format!("error while reading block status at offset {offset}: {}", strerror(e))
}

/// What one chunk of the copy is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Read from the source, then written (less its zero runs).
    Data,
    /// Reads as zeros in the source.
    Zero,
    /// Reads as zeros in the source but must be written as data (`-S 0`).
    ZeroAsData,
}

/// A chunk of the copy, numbered in order. Offsets are in the target (the
/// sources concatenated).
#[derive(Clone, Copy, Debug)]
struct Chunk {
    index: u64,
    offset: u64,
    len: u64,
    kind: Kind,
}

/// Hands out chunks front to back.
struct Planner<'a> {
    cursors: Vec<StatusCursor<'a>>,
    sources: &'a [Source],
    pos: u64,
    source: usize,
    next_index: u64,
    /// Chunks start and end on multiples of this (the cluster size when
    /// compressing: compressed writes cover whole clusters), except at the
    /// end of the whole; 0 when chunks follow the sources' status exactly.
    align: u64,
}

impl Planner<'_> {
    fn next(&mut self, total: u64, min_sparse: u64) -> Result<Option<Chunk>, String> {
        while self.source < self.sources.len() {
            let s = &self.sources[self.source];
            if self.pos < s.start + s.len {
                break;
            }
            self.source += 1;
        }
        if self.pos >= total || self.source >= self.sources.len() {
            return Ok(None);
        }
        let s = &self.sources[self.source];
        let src_offset = self.pos - s.start;
        let e = self.cursors[self.source].at(src_offset).map_err(|e| status_error(src_offset, &e))?;
        // End of the run in target offsets (a run never crosses a source).
        let run_end = self.pos + e.length.min(s.len - src_offset);
        let (kind, end) = if self.align == 0 {
            let (kind, cap) = match (e.zero, min_sparse) {
                (false, _) => (Kind::Data, IO_BUF_SIZE),
                (true, 0) => (Kind::ZeroAsData, IO_BUF_SIZE),
                (true, _) => (Kind::Zero, MAX_ZERO_CHUNK),
            };
            (kind, run_end.min(self.pos + cap))
        } else {
            let align = self.align;
            let zero_end = if run_end == total { total } else { run_end / align * align };
            if e.zero && min_sparse != 0 && zero_end > self.pos {
                (Kind::Zero, zero_end.min(self.pos + MAX_ZERO_CHUNK))
            } else {
                // Data, or zeros too short to fill a cluster: whole clusters
                // of data, read across runs (and sources) as needed.
                (Kind::Data, run_end.div_ceil(align).saturating_mul(align).min(self.pos + IO_BUF_SIZE).min(total))
            }
        };
        let chunk = Chunk { index: self.next_index, offset: self.pos, len: end - self.pos, kind };
        self.next_index += 1;
        self.pos = end;
        Ok(Some(chunk))
    }
}

/// The copy, shared by the workers.
struct Job<'a> {
    sources: &'a [Source],
    target: &'a Image,
    /// The target's backing image (`-B`): only what differs from it is written.
    backing: Option<&'a Image>,
    total: u64,
    /// The target's size (the sources' size rounded up to a sector).
    target_len: u64,
    /// The granularity of comparisons with the backing image and of
    /// compressed writes: the target's cluster size.
    cluster: u64,
    compress: bool,
    min_sparse: u64,
    alignment: u64,
    has_zero_init: bool,
    in_order: bool,
    progress: &'a Progress,
    data_total: u64,
    /// `-r`: the data chunks read are paced to this rate.
    rate: Option<crate::app::ratelimit::RateLimit>,
    /// `--salvage`.
    salvage: Option<Salvage<'a>>,
    /// `-C`.
    copy_range: bool,
}

/// `--salvage`: a source read that fails is retried one sector at a time,
/// and the sectors that still fail are copied as zeros, each with a warning
/// (unless quiet), as qemu-img does.
struct Salvage<'a> {
    prog: &'a str,
    quiet: bool,
}

impl Salvage<'_> {
    /// Reads `buf.len()` bytes of `image` at `offset` sector by sector.
    fn read(&self, image: &Image, buf: &mut [u8], offset: u64) {
        for (i, sector) in buf.chunks_mut(SECTOR as usize).enumerate() {
            let at = offset + i as u64 * SECTOR;
            if let Err(e) = image.read_at(sector, at) {
                if !self.quiet {
                    eprintln!("{}: warning: error while reading offset {at}: {}", self.prog, strerror(&e));
                }
                sector.fill(0);
            }
        }
    }
}

/// Shared state of the workers.
struct Shared<'a> {
    planner: Mutex<Planner<'a>>,
    /// Index of the chunk whose turn it is to write (in-order mode), and
    /// the data bytes done so far (progress).
    turn: Mutex<(u64, u64)>,
    turn_changed: Condvar,
    failed: AtomicBool,
    error: Mutex<Option<String>>,
}

impl Shared<'_> {
    fn fail(&self, msg: String) {
        let mut e = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if e.is_none() {
            *e = Some(msg);
        }
        self.failed.store(true, Ordering::Release);
        drop(e);
        let _t = self.turn.lock().unwrap_or_else(|p| p.into_inner());
        self.turn_changed.notify_all();
    }
}

/// What to do with one cluster-sized piece of a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    /// Nothing: the target reads the same already.
    Skip,
    /// Make it read as zeros.
    Zero,
    /// Write the data.
    Write,
}

impl Job<'_> {
    fn run(&self, workers: usize) -> Result<(), String> {
        let cursors = self.sources.iter().map(|s| StatusCursor::new(&s.image)).collect();
        let align = if self.compress { self.cluster } else { 0 };
        let shared = Shared {
            planner: Mutex::new(Planner { cursors, sources: self.sources, pos: 0, source: 0, next_index: 0, align }),
            turn: Mutex::new((0, 0)),
            turn_changed: Condvar::new(),
            failed: AtomicBool::new(false),
            error: Mutex::new(None),
        };
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| self.worker(&shared));
            }
        });
        match shared.error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(msg) => Err(msg),
            None => Ok(()),
        }
    }

    fn worker(&self, shared: &Shared<'_>) {
        // A compressed chunk may be extended to the end of the target, past
        // the end of the sources, by less than a cluster.
        let mut backing_store = vec![0u8; (IO_BUF_SIZE + self.cluster + PAGE) as usize];
        let buf = page_aligned(&mut backing_store, (IO_BUF_SIZE + self.cluster) as usize);
        let mut base = Vec::new();
        loop {
            if shared.failed.load(Ordering::Acquire) {
                return;
            }
            let next = shared.planner.lock().unwrap_or_else(|p| p.into_inner()).next(self.total, self.min_sparse);
            let chunk = match next {
                Ok(Some(c)) => c,
                Ok(None) => return,
                Err(msg) => return shared.fail(msg),
            };
            let data = &mut buf[..if chunk.kind == Kind::Zero { 0 } else { chunk.len as usize }];
            let mut offloaded = false;
            match chunk.kind {
                Kind::Data => {
                    if let Some(r) = &self.rate {
                        r.pace(chunk.len);
                    }
                    if self.copy_range {
                        match self.offload(&chunk) {
                            Ok(done) => offloaded = done,
                            Err(msg) => return shared.fail(msg),
                        }
                    }
                    if !offloaded {
                        if let Err(msg) = self.read_sources(data, chunk.offset) {
                            return shared.fail(msg);
                        }
                    }
                }
                Kind::ZeroAsData => data.fill(0),
                Kind::Zero => {}
            }
            // What the target shows there now, read before waiting for the turn.
            if let (Some(b), false) = (self.backing, data.is_empty()) {
                base.resize(data.len(), 0);
                if let Err(e) = read_clipped(b, &mut base, chunk.offset) {
                    return shared.fail(format!(
                        "error while reading the backing file at byte {}: {}",
                        chunk.offset,
                        strerror(&e)
                    ));
                }
            }
            if self.in_order && !self.wait_turn(shared, chunk.index) {
                return;
            }
            let res = if offloaded { Ok(()) } else { self.write_chunk(&chunk, data, &mut base) };
            {
                let mut t = shared.turn.lock().unwrap_or_else(|p| p.into_inner());
                if self.in_order {
                    t.0 += 1;
                    shared.turn_changed.notify_all();
                }
                if chunk.kind != Kind::Zero && res.is_ok() {
                    t.1 += chunk.len;
                    if self.data_total > 0 {
                        // Under the lock, so the display only moves forward.
                        let percent = (100.0 * t.1 as f64 / self.data_total as f64).min(100.0);
                        self.progress.print(percent as f32, 0);
                    }
                }
            }
            if let Err(msg) = res {
                return shared.fail(msg);
            }
        }
    }

    /// `-C`: copies a data chunk from a raw source file to a raw target
    /// file inside the kernel; false when that cannot be done (other
    /// formats, file systems without copy_file_range), and the chunk is
    /// then copied through memory.
    fn offload(&self, chunk: &Chunk) -> Result<bool, String> {
        let Image::Raw(target) = self.target else { return Ok(false) };
        let end = chunk.offset + chunk.len;
        let Some(s) = self.sources.iter().find(|s| chunk.offset >= s.start && end <= s.start + s.len) else {
            return Ok(false);
        };
        let Image::Raw(source) = &s.image else { return Ok(false) };
        source
            .copy_range_to(target, chunk.offset - s.start, chunk.offset, chunk.len)
            .map_err(|e| format!("error while writing at byte {}: {}", chunk.offset, strerror(&e)))
    }

    /// Reads `buf.len()` bytes of the concatenated sources at `offset`;
    /// past their end the target reads zeros.
    fn read_sources(&self, buf: &mut [u8], offset: u64) -> Result<(), String> {
        let mut done = 0usize;
        for s in self.sources {
            let at = offset + done as u64;
            if done == buf.len() {
                break;
            }
            if at >= s.start + s.len {
                continue;
            }
            let n = (s.start + s.len - at).min((buf.len() - done) as u64) as usize;
            let piece = &mut buf[done..done + n];
            if let Err(e) = s.image.read_at(piece, at - s.start) {
                match &self.salvage {
                    Some(salvage) => salvage.read(&s.image, piece, at - s.start),
                    None => return Err(format!("error while reading at byte {at}: {}", strerror(&e))),
                }
            }
            done += n;
        }
        buf[done..].fill(0);
        Ok(())
    }

    /// Waits until chunk `index` may write; false when the copy failed.
    fn wait_turn(&self, shared: &Shared<'_>, index: u64) -> bool {
        let mut t = shared.turn.lock().unwrap_or_else(|p| p.into_inner());
        while t.0 != index {
            if shared.failed.load(Ordering::Acquire) {
                return false;
            }
            t = shared.turn_changed.wait(t).unwrap_or_else(|p| p.into_inner());
        }
        !shared.failed.load(Ordering::Acquire)
    }

    /// Writes one chunk. `base` holds the backing image's content of the
    /// chunk (with `-B`; scratch space otherwise).
    fn write_chunk(&self, chunk: &Chunk, data: &mut [u8], base: &mut Vec<u8>) -> Result<(), String> {
        if chunk.kind == Kind::Zero {
            return match self.backing {
                Some(b) => self.zero_over_backing(b, chunk.offset, chunk.len, base),
                None => self.zero(chunk.offset, chunk.len),
            };
        }
        if self.compress || self.backing.is_some() {
            return self.write_by_cluster(chunk.offset, data, base);
        }
        // With -C data is copied as it is, as qemu-img's copy offloading
        // does, without looking for zeros in it.
        if self.min_sparse == 0 || self.copy_range || chunk.len % SECTOR != 0 || chunk.offset % SECTOR != 0 {
            return self.write(chunk.offset, data);
        }
        let min = self.min_sparse / SECTOR;
        let align = self.alignment / SECTOR;
        let mut sector = chunk.offset / SECTOR;
        let mut rest = &data[..];
        while !rest.is_empty() {
            let n_sectors = rest.len() as u64 / SECTOR;
            let (is_data, n) = allocated_sectors_min(rest, n_sectors, min, sector, align);
            let bytes = (n * SECTOR) as usize;
            let offset = sector * SECTOR;
            if is_data {
                self.write(offset, &rest[..bytes])?;
            } else {
                self.zero(offset, bytes as u64)?;
            }
            sector += n;
            rest = &rest[bytes..];
        }
        Ok(())
    }

    /// Writes a chunk cluster by cluster: clusters that read the same as
    /// the backing image are skipped, clusters of zeros are zeroed (or left
    /// as holes), the rest written (compressed with `-c`), runs of equal
    /// treatment in one request.
    fn write_by_cluster(&self, offset: u64, data: &[u8], base: &[u8]) -> Result<(), String> {
        let cs = self.cluster;
        // A compressed write of the last cluster covers it up to the end of
        // the target, which may lie past the end of the sources.
        let mut padded = Vec::new();
        let data = if self.compress && offset + data.len() as u64 == self.total && self.target_len > self.total {
            padded.extend_from_slice(data);
            padded.resize((self.target_len - offset) as usize, 0);
            &padded[..]
        } else {
            data
        };
        let mut run: Option<(Action, usize)> = None;
        let mut at = 0usize;
        while at < data.len() {
            let piece_end = (((offset + at as u64) / cs + 1) * cs - offset).min(data.len() as u64) as usize;
            let piece = &data[at..piece_end];
            let action = match self.backing {
                Some(_) => {
                    let b = base.get(at..piece_end).unwrap_or(&[]);
                    if piece.len() == b.len() && piece == b || b.is_empty() && is_zero(piece) {
                        Action::Skip
                    } else if is_zero(piece) && self.min_sparse != 0 {
                        Action::Zero
                    } else {
                        Action::Write
                    }
                }
                None if is_zero(piece) && self.min_sparse != 0 => Action::Zero,
                None => Action::Write,
            };
            match run {
                Some((a, _)) if a == action => {}
                Some((a, start)) => {
                    self.apply(a, offset + start as u64, &data[start..at])?;
                    run = Some((action, at));
                }
                None => run = Some((action, at)),
            }
            at = piece_end;
        }
        if let Some((a, start)) = run {
            self.apply(a, offset + start as u64, &data[start..])?;
        }
        Ok(())
    }

    fn apply(&self, action: Action, offset: u64, data: &[u8]) -> Result<(), String> {
        match action {
            Action::Skip => Ok(()),
            Action::Zero if self.backing.is_some() => self
                .target
                .write_zeroes_at(offset, data.len() as u64, false)
                .map_err(|e| format!("error while writing at byte {offset}: {}", strerror(&e))),
            Action::Zero => self.zero(offset, data.len() as u64),
            Action::Write if self.compress => {
                let q = self.target.as_qcow2().expect("compression needs a qcow2 target");
                q.write_compressed(data, offset).map_err(|e| {
                    // QEMU's -ENOTSUP (e.g. a target with an external data file).
                    let why = if e.kind() == oxqcow::ErrorKind::Unsupported {
                        "Operation not supported".to_string()
                    } else {
                        strerror(&e)
                    };
                    format!("error while writing at byte {offset}: {why}")
                })
            }
            Action::Write => self.write(offset, data),
        }
    }

    /// Makes a range that reads as zeros in the source read as zeros in
    /// the target too, where the backing image has anything else.
    fn zero_over_backing(&self, b: &Image, offset: u64, len: u64, buf: &mut Vec<u8>) -> Result<(), String> {
        let blen = b.len();
        let end = (offset + len).min(blen);
        if offset >= end {
            return Ok(());
        }
        let err =
            |at: u64, e: oxqcow::Error| format!("error while reading the backing file at byte {at}: {}", strerror(&e));
        let extents = b.block_status(offset, end - offset).map_err(|e| err(offset, e))?;
        for e in extents.iter().filter(|e| !e.zero) {
            let mut at = e.offset;
            while at < e.offset + e.length {
                let n = (e.offset + e.length - at).min(IO_BUF_SIZE);
                buf.resize(n as usize, 0);
                b.read_at(buf, at).map_err(|x| err(at, x))?;
                let zeros = vec![0u8; n as usize];
                self.write_by_cluster(at, &zeros, buf)?;
                at += n;
            }
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), String> {
        self.target
            .write_at(data, offset)
            .map_err(|e| format!("error while writing at byte {offset}: {}", strerror(&e)))
    }

    /// Makes a target range read as zeros: nothing to do on a target that
    /// starts zeroed; otherwise only where it does not read as zeros yet.
    fn zero(&self, offset: u64, len: u64) -> Result<(), String> {
        if self.has_zero_init || len == 0 {
            return Ok(());
        }
        let err = |e: oxqcow::Error| format!("error while writing at byte {offset}: {}", strerror(&e));
        for e in self.target.block_status(offset, len).map_err(err)? {
            if !e.zero {
                self.target.write_zeroes_at(e.offset, e.length, true).map_err(err)?;
            }
        }
        Ok(())
    }
}

/// Reads `buf.len()` bytes at `offset` of an image that may be shorter:
/// what lies past its end reads as zeros.
fn read_clipped(image: &Image, buf: &mut [u8], offset: u64) -> oxqcow::Result<()> {
    let n = image.len().saturating_sub(offset).min(buf.len() as u64) as usize;
    if n > 0 {
        image.read_at(&mut buf[..n], offset)?;
    }
    buf[n..].fill(0);
    Ok(())
}

/// qemu-img's `is_allocated_sectors`: the length of the run of sectors
/// starting `buf` that are all zero or all nonzero, and whether it is data.
/// Run ends are moved to `align` boundaries (in sectors) where that avoids a
/// read-modify-write of a partial block: a short zero run that ends
/// unaligned becomes data, and a data run is extended to the next boundary.
fn allocated_sectors(buf: &[u8], n: u64, sector_num: u64, align: u64) -> (bool, u64) {
    if n == 0 {
        return (false, 0);
    }
    let sector = |i: u64| &buf[(i * SECTOR) as usize..((i + 1) * SECTOR) as usize];
    let mut zero = is_zero(sector(0));
    let mut i = 1;
    while i < n && is_zero(sector(i)) == zero {
        i += 1;
    }
    if i == n {
        return (!zero, i);
    }
    let tail = (sector_num + i) & (align - 1);
    if tail != 0 {
        if zero && i <= tail {
            // The next sector is data and the partial block will be written
            // anyway: write these zeros with it.
            zero = false;
        }
        if !zero {
            i = (i + align - tail).min(n);
        } else {
            i -= tail;
        }
    }
    (!zero, i)
}

/// qemu-img's `is_allocated_sectors_min`: like [`allocated_sectors`], but
/// once the buffer starts with data, zero runs shorter than `min` sectors
/// are written as data rather than splitting the write.
fn allocated_sectors_min(buf: &[u8], n: u64, min: u64, sector_num: u64, align: u64) -> (bool, u64) {
    let min = min.min(n);
    let (data, first) = allocated_sectors(buf, n, sector_num, align);
    if !data {
        return (false, first);
    }
    let mut used = first;
    let mut checked = first;
    while checked < n {
        let at = (checked * SECTOR) as usize;
        let (data, len) = allocated_sectors(&buf[at..], n - checked, sector_num + checked, align);
        checked += len;
        if data {
            used = checked;
        } else if len >= min {
            break;
        }
    }
    (true, used)
}

/// Page size for buffer alignment.
const PAGE: u64 = 4096;

/// The page-aligned `len` bytes inside `store` (which has a page to
/// spare). The kernel copies between the page cache and a page-aligned
/// buffer at about twice the speed of a misaligned one, and QEMU's I/O
/// buffers are page-aligned too.
fn page_aligned(store: &mut [u8], len: usize) -> &mut [u8] {
    let skip = store.as_ptr().align_offset(PAGE as usize);
    &mut store[skip..skip + len]
}

/// Whether a buffer is all zeros (64 bytes at a time, which vectorizes).
fn is_zero(b: &[u8]) -> bool {
    let mut blocks = b.chunks_exact(64);
    for block in &mut blocks {
        if block.iter().fold(0u8, |acc, &x| acc | x) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(pattern: &[(u64, bool)]) -> Vec<u8> {
        let mut v = Vec::new();
        for &(sectors, data) in pattern {
            v.extend(std::iter::repeat_n(u8::from(data), (sectors * SECTOR) as usize));
        }
        v
    }

    #[test]
    fn zero_runs_are_aligned() {
        // 1 data sector, 15 zeros, 16 data: with 8-sector alignment the data
        // run grows to sector 8 and the zero run covers sectors 8..16.
        let b = buf(&[(1, true), (15, false), (16, true)]);
        assert_eq!(allocated_sectors(&b, 32, 0, 8), (true, 8));
        assert_eq!(allocated_sectors(&b[8 * 512..], 24, 8, 8), (false, 8));
        // A short leading zero run ending unaligned is written as data.
        let b = buf(&[(3, false), (5, true)]);
        assert_eq!(allocated_sectors(&b, 8, 0, 8), (true, 8));
    }

    #[test]
    fn short_zero_runs_do_not_split_writes() {
        let b = buf(&[(8, true), (8, false), (8, true), (32, false)]);
        // min 16: the 8-sector zero run is written with the data; the
        // 32-sector run ends the write.
        assert_eq!(allocated_sectors_min(&b, 56, 16, 0, 8), (true, 24));
        // min 8: the first zero run already ends the write.
        assert_eq!(allocated_sectors_min(&b, 56, 8, 0, 8), (true, 8));
        let zeros = buf(&[(16, false)]);
        assert_eq!(allocated_sectors_min(&zeros, 16, 8, 0, 8), (false, 16));
    }

    #[test]
    fn alignment_is_a_power_of_two() {
        assert_eq!(alignment(4096), 4096);
        assert_eq!(alignment(6144), 4096);
        assert_eq!(alignment(512), 512);
        assert_eq!(alignment(0), 512);
    }
}
