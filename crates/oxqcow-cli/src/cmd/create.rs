//! `create`: make a new image (`qemu-img create`).
//!
//! Follows qemu-img's order: options are parsed and type-checked, the
//! backing file (if any) is opened for its size and format, the
//! "Formatting ..." line is printed, then the options are validated and the
//! image is written. A failed creation removes the file, as qemu-img does.

use std::path::{Path, PathBuf};

use oxqcow::measure::{check_virtual_size, Qcow2Layout};
use oxqcow::{BlockDevice, ErrorKind, Image, ImageFormat, OpenOptions};

use crate::app::ctx::Ctx;
use crate::app::getopt::{HasArg, Opt};
use crate::app::image::{host_filename, open_image};
use crate::app::imgopts::{self, ImgOpts};
use crate::app::messages::describe;
use crate::app::numbers::cvtnum;
use crate::app::CommonOpts;

/// In qemu-img's order, which ambiguity messages list.
const SPEC: &[Opt] = &[
    Opt::both('h', "help", HasArg::No),
    Opt::both('q', "quiet", HasArg::No),
    Opt::long("object", HasArg::Required),
    Opt::both('f', "format", HasArg::Required),
    Opt::both('o', "options", HasArg::Required),
    Opt::both('b', "backing", HasArg::Required),
    Opt::both('F', "backing-format", HasArg::Required),
    Opt::both('u', "backing-unsafe", HasArg::No),
];

const HELP: &str = "\
Create and format a new image file.  Usage:

  PROG create [-f FMT] [-o FMT_OPTS] [-b BACKING_FILENAME [-F BACKING_FMT]]
        [--object OBJDEF] [-u] FILENAME [SIZE[bkKMGTPE]]

  -q, --quiet                 print nothing on success
  -f, --format FMT            format of the new image (qcow2 or raw; default raw)
  -o, --options FMT_OPTS      format options ('-o help' lists them)
  -b, --backing BACKING_FILENAME
                              image to stack the new one on
  -F, --backing-format BACKING_FMT
                              format of BACKING_FILENAME
  -u, --backing-unsafe        do not open the backing image
  --object OBJDEF             QEMU user-creatable object (eg encryption key)
  SIZE                        size with an optional suffix (powers of 1024);
                              taken from the backing image when omitted
";

/// Runs `create`.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    let p = match ctx.getopt("create", args, SPEC) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let mut common = CommonOpts::default();
    let mut options: Option<String> = None;
    let (mut backing, mut backing_fmt) = (None, None);
    let mut unsafe_backing = false;
    for (key, value) in p.opts {
        let value = value.unwrap_or_default();
        match key.as_str() {
            "h" => {
                print!("{}", HELP.replace("PROG", &ctx.prog));
                return 0;
            }
            "o" => {
                if let Err(msg) = imgopts::accumulate(&mut options, &value) {
                    return ctx.fail(&msg);
                }
            }
            "b" => backing = Some(value),
            "F" => backing_fmt = Some(value),
            "u" => unsafe_backing = true,
            _ => {
                if let Err(msg) = common.consume(&key, &value) {
                    return ctx.fail(&msg);
                }
            }
        }
    }
    let (fmt, quiet) = (common.format.unwrap_or_else(|| "raw".to_string()), common.quiet);
    let mut operands = p.operands.into_iter();
    let filename = operands.next();
    if let Some(o) = &options {
        if imgopts::has_help_option(o) {
            return match imgopts::format_from_name(&fmt) {
                Ok(format) => {
                    imgopts::print_help(format, filename.is_some());
                    0
                }
                Err(msg) => ctx.fail(&msg),
            };
        }
    }
    let Some(filename) = filename else {
        return ctx.usage_error("create", "Expecting image file name");
    };
    let size = match operands.next().map(|s| cvtnum("image size", &s, 0, i64::MAX as u64)).transpose() {
        Ok(s) => s,
        Err(msg) => return ctx.fail(&msg),
    };
    if let Some(extra) = operands.next() {
        return ctx.usage_error("create", &format!("Unexpected argument: {extra}"));
    }
    let req = Request { filename: &filename, fmt: &fmt, options, size, backing, backing_fmt, quiet, unsafe_backing };
    match create(&req) {
        Ok(()) => 0,
        Err(msg) => ctx.fail(&format!("{filename}: {msg}")),
    }
}

struct Request<'a> {
    filename: &'a str,
    fmt: &'a str,
    options: Option<String>,
    size: Option<u64>,
    backing: Option<String>,
    backing_fmt: Option<String>,
    quiet: bool,
    unsafe_backing: bool,
}

/// Everything after argument parsing (qemu's `bdrv_img_create`); errors
/// are returned without the file name prefix.
fn create(req: &Request) -> Result<(), String> {
    let format = imgopts::format_from_name(req.fmt)?;
    if let Some(refusal) = crate::app::http::no_creation(req.filename) {
        return Err(refusal);
    }
    if let Some(refusal) = crate::app::object::no_creation(req.filename) {
        return Err(refusal);
    }
    let mut opts = ImgOpts::new(format);
    if let Some(o) = &req.options {
        opts.parse(o)?;
    }
    match (opts.is_set("size"), req.size) {
        (false, Some(n)) => opts.set_number("size", n),
        (true, Some(_)) => return Err("The image size must be specified only once".into()),
        _ => {}
    }
    if let Some(b) = &req.backing {
        if format != ImageFormat::Qcow2 {
            return Err(format!("Backing file not supported for file format '{}'", req.fmt));
        }
        opts.set("backing_file", b)?;
    }
    if let Some(f) = &req.backing_fmt {
        if format != ImageFormat::Qcow2 {
            return Err(format!("Backing file format not supported for file format '{}'", req.fmt));
        }
        opts.set("backing_fmt", f)?;
    }
    if let Some(backing) = opts.get_str("backing_file") {
        if backing == req.filename {
            return Err("Error: Trying to create an image with the same filename as the backing file".into());
        }
        if backing.is_empty() {
            return Err("Expected backing file name, got empty string".into());
        }
        let backing_fmt = opts.get_str("backing_fmt").map(String::from);
        if !req.unsafe_backing {
            let path = backing_path(&host_filename(req.filename)?, backing);
            let shown = path.to_string_lossy();
            // For its size only: an encrypted chain opens without its
            // secrets, as qemu-img opens it (`BDRV_O_NO_IO`).
            let only_size = OpenOptions { no_io: true, ..OpenOptions::new().read_only(true) };
            let image = open_image(&shown, backing_fmt.as_deref(), only_size).map_err(|msg| {
                // Here QEMU names the file once, not once per layer.
                let doubled = format!("Could not open '{shown}': ");
                // A `json:` name has no file of its own to name.
                let once = backing.starts_with("json:");
                let msg = msg.strip_prefix(&doubled).filter(|m| once || m.starts_with(&doubled)).unwrap_or(&msg);
                format!("{msg}\nCould not open backing image.")
            })?;
            if backing_fmt.is_none() {
                return Err(format!(
                    "Backing file specified without backing format\nDetected format of {}.",
                    image.format().name()
                ));
            }
            if !opts.is_set("size") {
                opts.set_number("size", image.len());
            }
        } else if backing_fmt.is_none() {
            return Err("Backing file specified without backing format".into());
        }
    }
    if !opts.is_set("size") {
        return Err("Image creation needs a size parameter".into());
    }
    if !req.quiet {
        println!("Formatting '{}', fmt={} {}", req.filename, req.fmt, opts.summary());
        // bdrv_img_create flushes it, so it comes before any error.
        crate::app::stdout::flush();
    }
    let mut create_opts = opts.to_create_options()?;
    create_opts.unsafe_backing = req.unsafe_backing;
    create_opts.validate().map_err(|e| describe(&e))?;
    if format == ImageFormat::Qcow2 {
        let layout = Qcow2Layout {
            cluster_size: create_opts.cluster_size,
            refcount_bits: create_opts.refcount_bits,
            extended_l2: create_opts.extended_l2,
            compat: create_opts.compat,
        };
        if check_virtual_size(create_opts.size, &layout).is_err() {
            return Err(too_large(req.fmt));
        }
    }
    if crate::app::rbd::is_rbd_name(req.filename) {
        let storage = crate::app::rbd::create_rbd_name(req.filename)?;
        return Image::create_storage(storage, &create_opts).and_then(Image::close).map_err(|e| describe(&e));
    }
    let host = host_filename(req.filename).map_err(|m| format!("Could not create '{}': {m}", req.filename))?;
    let path = Path::new(&host);
    // The library removes what a failed qcow2 creation left behind, and
    // never a file it could not lock.
    if let Err(e) = Image::create(path, &create_opts).and_then(Image::close) {
        return Err(match &e {
            oxqcow::Error::Io { source, .. } if source.raw_os_error() == Some(27) => too_large(req.fmt), // EFBIG
            oxqcow::Error::Io { op: "creating the image", .. } => {
                format!("Could not create '{}': {}", req.filename, describe(&e))
            }
            _ if e.kind() == ErrorKind::NoSpace => too_large(req.fmt),
            _ => describe(&e),
        });
    }
    Ok(())
}

fn too_large(fmt: &str) -> String {
    let hint = if fmt == "qcow2" { " (try using a larger cluster size)" } else { "" };
    format!("The image size is too large for file format '{fmt}'{hint}")
}

/// A relative backing file name is relative to the new image's directory.
fn backing_path(image: &str, backing: &str) -> PathBuf {
    let b = Path::new(backing);
    // A `json:` name says everything itself (its file names are taken
    // from the working directory).
    if b.is_absolute() || backing.starts_with("json:") || crate::app::backing_protocols::is_protocol_name(backing) {
        return b.to_path_buf();
    }
    match Path::new(image).parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(b),
        _ => b.to_path_buf(),
    }
}
