//! `convert`'s command line: qemu-img's options, in its order of
//! checks and with its messages.

use crate::app::ctx::Ctx;
use crate::app::forbid_backing::FORBID_BACKING;
use crate::app::getopt::{self, HasArg, Opt, Parsed};
use crate::app::image::is_cache_mode;
use crate::app::imgopts;
use crate::app::numbers::cvtnum;
use crate::app::snapshot_param::SnapshotParam;
use crate::app::CommonOpts;

/// QEMU's sector: `-S` is counted in them.
const SECTOR: u64 = 512;
/// qemu-img's `MAX_COROUTINES`: the most `-m` allows.
const MAX_WORKERS: u64 = 16;
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
pub struct Args {
    pub src_fmt: Option<String>,
    pub snapshot: Option<SnapshotParam>,
    pub out_fmt: Option<String>,
    pub options: Option<String>,
    pub cache: String,
    pub src_cache: String,
    pub skip_create: bool,
    pub target_is_zero: bool,
    pub progress: bool,
    pub quiet: bool,
    /// `-m`; `None`: the default.
    pub workers: Option<usize>,
    pub in_order: bool,
    pub compress: bool,
    /// `--bitmaps`: copy the source's persistent bitmaps.
    pub bitmaps: bool,
    /// `--skip-broken-bitmaps`: leave inconsistent bitmaps out.
    pub skip_broken_bitmaps: bool,
    /// `-B`.
    pub backing: Option<String>,
    /// `-F`.
    pub backing_fmt: Option<String>,
    /// `-S` in bytes; 0 disables zero detection.
    pub min_sparse: u64,
    /// `-r` in bytes per second; 0: no limit.
    pub rate: u64,
    /// `--salvage`: unreadable source sectors are copied as zeros.
    pub salvage: bool,
    /// `-C`: copy offloading (copy_file_range between raw files); data is
    /// copied as it is, without looking for zeros in it.
    pub copy_range: bool,
    /// Whether `-S` was given.
    pub sparse_given: bool,
    pub sources: Vec<String>,
    pub target: String,
    /// `--image-opts`: sources are option strings.
    pub image_opts: bool,
    /// `-U`: sources are opened in shared mode.
    pub force_share: bool,
    /// `--target-image-opts`: the target is an option string (needs `-n`).
    pub target_image_opts: bool,
}

/// Parses `convert`'s command line; on error prints qemu-img's message and
/// returns the exit code.
pub fn parse(ctx: &Ctx, args: &[String]) -> Result<Args, i32> {
    let prog = &ctx.prog;
    let parsed = match getopt::parse_declared(prog, "convert", args, ":hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:", LONGS) {
        Ok(p) => p,
        Err(msg) => {
            eprintln!("{msg}");
            return Err(1);
        }
    };
    let mut a = options(ctx, &parsed)?;
    let fail = |msg: &str| Err(ctx.fail(msg));
    if a.skip_broken_bitmaps && !a.bitmaps {
        return fail("Use of --skip-broken-bitmaps requires --bitmaps");
    }
    if a.copy_range && a.compress {
        return fail("Cannot enable copy offloading when -c is used");
    }
    if a.copy_range && a.sparse_given {
        return fail("Cannot enable copy offloading when -S is used");
    }
    if a.target_image_opts && !a.skip_create {
        return fail("--target-image-opts requires use of -n flag");
    }
    if a.target_is_zero && !a.skip_create {
        return fail("--target-is-zero requires use of -n flag");
    }
    let Some((target, sources)) = parsed.operands.split_last().filter(|(_, s)| !s.is_empty()) else {
        return fail("Must specify image file name");
    };
    a.target = target.clone();
    a.sources = sources.to_vec();
    if a.sources.len() > 1 && a.snapshot.is_some() {
        return fail("No support for concatenating multiple snapshot");
    }
    if a.sources.len() > 1 && a.backing.is_some() {
        return fail("Having a backing file for the target makes no sense when concatenating multiple input images");
    }
    if a.skip_create && a.options.is_some() {
        return fail("-o has no effect when skipping image creation");
    }
    if !is_cache_mode(&a.src_cache) {
        return fail(&format!("Invalid source cache option: {}", a.src_cache));
    }
    if a.quiet {
        a.progress = false;
    }
    Ok(a)
}

/// The options, as they come (`-h` prints the help and ends with 0).
fn options(ctx: &Ctx, parsed: &Parsed) -> Result<Args, i32> {
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
    for (key, value) in &parsed.opts {
        let v = value.clone().unwrap_or_default();
        match key.as_str() {
            "h" => {
                help(&ctx.prog);
                return Err(0);
            }
            "O" => a.out_fmt = Some(v),
            "o" => {
                if let Err(msg) = imgopts::accumulate(&mut a.options, &v) {
                    return Err(ctx.fail(&msg));
                }
            }
            "n" => a.skip_create = true,
            "target-is-zero" => a.target_is_zero = true,
            "W" => a.in_order = false,
            "m" => match cvtnum("number of coroutines", &v, 1, MAX_WORKERS) {
                Ok(n) => a.workers = Some(n as usize),
                Err(msg) => return Err(ctx.fail(&msg)),
            },
            "S" => match cvtnum("buffer size for sparse output", &v, 0, i64::MAX as u64) {
                Ok(n) if n % SECTOR == 0 && n / SECTOR <= MAX_SPARSE_SECTORS => {
                    a.min_sparse = n;
                    a.sparse_given = true;
                }
                Ok(_) => {
                    return Err(ctx.fail(&format!(
                        "Invalid buffer size for sparse output specified. Valid sizes are multiples of {SECTOR} up \
                         to {}. Select 0 to disable sparse detection (fully allocates output).",
                        MAX_SPARSE_SECTORS * SECTOR
                    )))
                }
                Err(msg) => return Err(ctx.fail(&msg)),
            },
            "c" => a.compress = true,
            "B" => a.backing = Some(v),
            "F" => a.backing_fmt = Some(v),
            "l" => match SnapshotParam::parse(&v) {
                Ok(p) => a.snapshot = Some(p),
                Err(key) => {
                    ctx.error(&format!("Invalid parameter '{key}'"));
                    return Err(ctx.fail(&format!("Failed in parsing snapshot param '{v}'")));
                }
            },
            "C" => a.copy_range = true,
            "r" => match cvtnum("rate limit", &v, 0, i64::MAX as u64) {
                Ok(n) => a.rate = n,
                Err(msg) => return Err(ctx.fail(&msg)),
            },
            "bitmaps" => a.bitmaps = true,
            "skip-broken-bitmaps" => a.skip_broken_bitmaps = true,
            "target-image-opts" => a.target_image_opts = true,
            "salvage" => a.salvage = true,
            _ => {
                if let Err(msg) = common.consume(key, &v) {
                    return Err(ctx.fail(&msg));
                }
            }
        }
    }
    a.src_fmt = common.format;
    a.cache = common.cache.unwrap_or(a.cache);
    a.src_cache = common.source_cache.unwrap_or(a.src_cache);
    (a.progress, a.quiet) = (common.progress, common.quiet);
    (a.image_opts, a.force_share) = (common.image_opts, common.force_share);
    Ok(a)
}
