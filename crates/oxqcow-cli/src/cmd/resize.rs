//! `resize`: change an image's virtual size (`qemu-img resize`).
//!
//! The size is the last argument, taken before option parsing so that
//! `-1G` is a size and not an option, as qemu-img does.

use oxqcow::qemu_syntax::parse_size_option;
use oxqcow::{Image, ImageFormat, Preallocation};

use crate::app::ctx::Ctx;
use crate::app::getopt::{HasArg, Opt};
use crate::app::messages::describe;
use crate::app::CommonOpts;

/// In qemu-img's order, which ambiguity messages list.
const SPEC: &[Opt] = &[
    Opt::both('h', "help", HasArg::No),
    Opt::long("object", HasArg::Required),
    Opt::long("image-opts", HasArg::No),
    Opt::long("preallocation", HasArg::Required),
    Opt::long("shrink", HasArg::No),
    Opt::both('f', "format", HasArg::Required),
    Opt::both('q', "quiet", HasArg::No),
];

const HELP: &str = "\
Resize an image.  Usage:

  PROG resize [-f FMT | --image-opts] [--preallocation PREALLOC] [--shrink]
        [--object OBJDEF] [-q] FILENAME [+-]SIZE[bkKMGTPE]

  -q, --quiet                 print nothing on success
  -f, --format FMT            format of FILENAME (probed when omitted)
  --image-opts                FILENAME is an option string (driver=...,file.filename=...)
  --shrink                    allow making the image smaller (data past the new end is lost)
  --preallocation PREALLOC    off, metadata, falloc or full, for the new area
  --object OBJDEF             QEMU user-creatable object (eg encryption key)
  [+-]SIZE                    new size, or the amount to grow (+) or shrink (-) by
";

/// Runs `resize`.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        print!("{}", HELP.replace("PROG", &ctx.prog));
        return 0;
    }
    let Some((size_arg, rest)) = args.split_last() else {
        return ctx.usage_error("resize", "Expecting image file name and size");
    };
    let p = match ctx.getopt("resize", rest, SPEC) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let mut common = CommonOpts::default();
    let mut prealloc = Preallocation::Off;
    let mut shrink = false;
    for (key, value) in p.opts {
        let value = value.unwrap_or_default();
        match key.as_str() {
            "shrink" => shrink = true,
            "preallocation" => match Preallocation::from_name(&value) {
                Ok(p) => prealloc = p,
                Err(_) => return ctx.fail(&format!("Invalid preallocation mode '{value}'")),
            },
            _ => {
                if let Err(msg) = common.consume(&key, &value) {
                    return ctx.fail(&msg);
                }
            }
        }
    }
    let (fmt, image_opts, quiet) = (common.format, common.image_opts, common.quiet);
    let [filename] = p.operands.as_slice() else {
        return ctx.usage_error("resize", "Expecting image file name and size");
    };
    let (relative, amount) = match size_arg.as_bytes().first() {
        Some(b'+') => (1i128, &size_arg[1..]),
        Some(b'-') => (-1i128, &size_arg[1..]),
        _ => (0i128, size_arg.as_str()),
    };
    let n = match parse_size_option("size", amount) {
        Ok(n) => n,
        Err(msg) => return ctx.fail(&msg),
    };
    let image = match crate::app::image::open_operand_for_writing(filename, image_opts, fmt) {
        Ok(i) => i,
        Err(msg) => return ctx.fail(&msg),
    };
    let current = match &image {
        // QEMU's block layer sizes raw images in whole sectors.
        Image::Raw(r) => r.len().div_ceil(512) * 512,
        other => oxqcow::BlockDevice::len(other),
    };
    let total = if relative != 0 { i128::from(current) + relative * i128::from(n) } else { i128::from(n) };
    // QEMU computes in signed 64 bits.
    if total <= 0 || total > i128::from(i64::MAX) {
        return ctx.fail("New image size must be positive");
    }
    let total = total as u64;
    if total <= current && prealloc != Preallocation::Off {
        return ctx.fail("Preallocation can only be used for growing images");
    }
    if total < current && !shrink {
        ctx.error("Use the --shrink option to perform a shrink operation.");
        ctx.error(
            "warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing \
             such an operation, make sure there is no important data there.",
        );
        return 1;
    }
    if image.format() == ImageFormat::Qcow2 && total % 512 != 0 {
        return ctx.fail("The new size must be a multiple of 512");
    }
    if let Err(e) = image.resize(total, prealloc).and_then(|()| crate::app::image::close_image(image)) {
        return ctx.fail(&describe(&e));
    }
    if !quiet {
        println!("Image resized.");
    }
    0
}
