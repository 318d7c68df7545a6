//! `dd`: copy an image's bytes into a new image, dd style (`qemu-img dd`).
//!
//! The operands (`bs=`, `count=`, `skip=`, `if=`, `of=`) and the output
//! size follow qemu-img's arithmetic exactly, including its quirk that
//! `count` bounds the input *before* `skip` is taken off, so
//! `count=3 skip=1` copies two blocks. Every byte is written, holes
//! included: `dd` is a plain copy, not `convert`.

use std::path::Path;

use oxqcow::qemu_syntax::SizeError;
use oxqcow::{BlockDevice, CreateOptions, Image, ImageFormat, OpenOptions};

use crate::app::ctx::Ctx;
use crate::app::getopt::{HasArg, Opt};
use crate::app::image::{open_image, parse_image_opts};
use crate::app::messages::{describe, os_error, strerror};
use crate::app::numbers::{cvtnum, strtoul0};
use crate::app::CommonOpts;

/// In qemu-img's order, which ambiguity messages list.
const SPEC: &[Opt] = &[
    Opt::both('h', "help", HasArg::No),
    Opt::both('f', "format", HasArg::Required),
    Opt::long("image-opts", HasArg::No),
    Opt::both('O', "output-format", HasArg::Required),
    Opt::long("object", HasArg::Required),
    Opt::both('U', "force-share", HasArg::No),
];

const HELP: &str = "\
Copy input to output with optional format conversion.  Usage:

  PROG dd [-f FMT|--image-opts] [-O OUTPUT_FMT] [-U]
        [bs=BLOCK_SIZE] [count=BLOCKS] [skip=BLOCKS] if=INPUT of=OUTPUT

  -h, --help                  print this help and exit
  -f, --format FMT            format of INPUT (probed when omitted)
  --image-opts                INPUT is an option string (driver=...,file.filename=...)
  -O, --output-format FMT     format of OUTPUT (default raw)
  -U, --force-share           open INPUT in shared mode for concurrent access
  --object OBJDEF             QEMU user-creatable object (eg encryption key)
  bs=BLOCK_SIZE[kKMGTP]       size of an I/O block (default 512)
  count=BLOCKS                number of blocks to copy (default the whole INPUT)
  skip=BLOCKS                 number of blocks of INPUT to skip
  if=INPUT                    input file name (or option string with --image-opts)
  of=OUTPUT                   output file name to create
";

/// The operands, as qemu-img keeps them.
struct Operands {
    block_size: u64,
    count: Option<u64>,
    skip: Option<u64>,
    input: Option<String>,
    output: Option<String>,
}

/// A block count as qemu-img reads it (`strtol` base 0: decimal, `0x`, `0`
/// octal; no size suffix), with its messages.
fn blocks(name: &str, value: &str) -> Result<u64, String> {
    match strtoul0(value) {
        Ok(n) if n <= i64::MAX as u64 => Ok(n),
        Err(SizeError::Invalid) => Err(format!("Invalid {name} specified: '{value}'.")),
        _ => Err(format!("Invalid {name} specified. Must be between 0 and {}.", i64::MAX)),
    }
}

fn parse_operands(args: &[String]) -> Result<Operands, String> {
    let mut ops = Operands { block_size: 512, count: None, skip: None, input: None, output: None };
    for arg in args {
        let Some((key, value)) = arg.split_once('=') else {
            return Err(format!("unrecognized operand {arg}"));
        };
        match key {
            "bs" => ops.block_size = cvtnum("bs", value, 1, i32::MAX as u64)?,
            "count" => ops.count = Some(blocks("count", value)?),
            "skip" => ops.skip = Some(blocks("skip", value)?),
            "if" => ops.input = Some(value.to_string()),
            "of" => ops.output = Some(value.to_string()),
            _ => return Err(format!("unrecognized operand {key}")),
        }
    }
    Ok(ops)
}

/// Input bytes `[start, end)` to copy: `count` caps the input size, then
/// `skip` starts inside that (a skip past it copies nothing, and `start`
/// is then `None`: qemu-img warns).
fn copy_range(input_len: u64, ops: &Operands) -> (Option<u64>, u64) {
    let bs = ops.block_size;
    let mut end = input_len;
    if let Some(count) = ops.count {
        if let Some(bytes) = count.checked_mul(bs).filter(|&b| b < end) {
            end = bytes;
        }
    }
    let start = match ops.skip {
        Some(skip) => skip.checked_mul(bs).filter(|&s| s <= end),
        None => Some(0),
    };
    (start, end)
}

/// Runs `dd`.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    let p = match ctx.getopt("dd", args, SPEC) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let mut common = CommonOpts::default();
    let mut out_fmt = "raw".to_string();
    for (key, value) in p.opts {
        let value = value.unwrap_or_default();
        match key.as_str() {
            "h" => {
                print!("{}", HELP.replace("PROG", &ctx.prog));
                return 0;
            }
            "O" => out_fmt = value,
            // --object too: an --image-opts input may name a secret.
            _ => {
                if let Err(msg) = common.consume(&key, &value) {
                    return ctx.fail(&msg);
                }
            }
        }
    }
    let (fmt, image_opts, force_share) = (common.format, common.image_opts, common.force_share);
    let ops = match parse_operands(&p.operands) {
        Ok(o) => o,
        Err(msg) => return ctx.fail(&msg),
    };
    let (Some(input), Some(output)) = (&ops.input, &ops.output) else {
        return ctx.fail("Must specify both input and output files");
    };
    if image_opts && fmt.is_some() {
        return ctx.fail("--image-opts and --format are mutually exclusive");
    }
    match dd(ctx, input, output, fmt, &out_fmt, image_opts, force_share, &ops) {
        Ok(()) => 0,
        Err(msg) => ctx.fail(&msg),
    }
}

#[allow(clippy::too_many_arguments)]
fn dd(
    ctx: &Ctx,
    input: &str,
    output: &str,
    fmt: Option<String>,
    out_fmt: &str,
    image_opts: bool,
    force_share: bool,
    ops: &Operands,
) -> Result<(), String> {
    let (path, format, opts) =
        if image_opts { parse_image_opts(input)? } else { (input.to_string(), fmt, OpenOptions::new()) };
    let mut opts = opts.read_only(true);
    opts.force_share = force_share;
    let source = open_image(&path, format.as_deref(), opts)?;
    let out_format = ImageFormat::from_name(out_fmt).map_err(|_| "Unknown file format".to_string())?;
    // QEMU's block layer sizes raw images in whole sectors.
    let input_len = match &source {
        Image::Raw(r) => r.len().div_ceil(512) * 512,
        other => other.len(),
    };
    let (start, end) = copy_range(input_len, ops);
    let start = start.unwrap_or_else(|| {
        ctx.error(&format!("{input}: cannot skip to specified offset"));
        end
    });
    let mut create = match out_format {
        ImageFormat::Raw => CreateOptions::raw(end - start),
        // A luks target fails for want of a secret, as qemu-img dd's does
        // (it takes no creation options).
        format => CreateOptions { format, ..CreateOptions::qcow2(end - start) },
    };
    create.size_given = true;
    if let Some(refusal) = crate::app::object::no_creation(output) {
        return Err(refusal);
    }
    let target = if crate::app::rbd::is_rbd_name(output) {
        crate::app::rbd::create_rbd_name(output)
            .and_then(|storage| Image::create_storage(storage, &create).map_err(|e| describe(&e)))
            .map_err(|why| format!("{output}: error while creating output image: {why}"))
    } else {
        Image::create(Path::new(output), &create).map_err(|e| {
            let why = match &e {
                oxqcow::Error::Io { op: "creating the image", source, .. } => {
                    format!("Could not create '{output}': {}", os_error(source))
                }
                other => describe(other),
            };
            format!("{output}: error while creating output image: {why}")
        })
    }?;
    let mut buf = vec![0u8; ops.block_size.min(end - start).max(1) as usize];
    let mut pos = start;
    while pos < end {
        let n = (end - pos).min(buf.len() as u64) as usize;
        source
            .read_at(&mut buf[..n], pos)
            .map_err(|e| format!("error while reading from input image file: {}", strerror(&e)))?;
        target
            .write_at(&buf[..n], pos - start)
            .map_err(|e| format!("error while writing to output image file: {}", strerror(&e)))?;
        pos += n as u64;
    }
    crate::app::image::close_image(target)
        .map_err(|e| format!("error while closing the output image: {}", strerror(&e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(bs: u64, count: Option<u64>, skip: Option<u64>) -> Operands {
        Operands { block_size: bs, count, skip, input: None, output: None }
    }

    #[test]
    fn count_bounds_the_input_before_skip() {
        assert_eq!(copy_range(1 << 20, &ops(65536, Some(3), Some(1))), (Some(65536), 196608));
        assert_eq!(copy_range(1 << 20, &ops(512, None, None)), (Some(0), 1 << 20));
        assert_eq!(copy_range(1 << 20, &ops(512, Some(0), None)), (Some(0), 0));
        // A count past the input copies the whole input.
        assert_eq!(copy_range(1000, &ops(512, Some(4), None)), (Some(0), 1000));
        // A skip to the end copies nothing; past it (or overflowing), qemu-img warns.
        assert_eq!(copy_range(1 << 20, &ops(512, None, Some(2048))), (Some(1 << 20), 1 << 20));
        assert_eq!(copy_range(1 << 20, &ops(512, None, Some(4096))), (None, 1 << 20));
        assert_eq!(copy_range(1 << 20, &ops(1 << 30, None, Some(u64::MAX / 2))), (None, 1 << 20));
    }

    #[test]
    fn operands_are_checked_as_qemu_img_checks_them() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(parse_operands(&args(&["foo=1"])).err().unwrap(), "unrecognized operand foo");
        assert_eq!(parse_operands(&args(&["if"])).err().unwrap(), "unrecognized operand if");
        assert_eq!(
            parse_operands(&args(&["bs=0"])).err().unwrap(),
            "Invalid bs specified. Must be between 1 and 2147483647."
        );
        assert_eq!(parse_operands(&args(&["count=1k"])).err().unwrap(), "Invalid count specified: '1k'.");
        assert_eq!(
            parse_operands(&args(&["skip=-1"])).err().unwrap(),
            "Invalid skip specified. Must be between 0 and 9223372036854775807."
        );
        let o = parse_operands(&args(&["bs=1k", "count=010", "skip=0x2", "if=a", "of=b"])).unwrap();
        assert_eq!((o.block_size, o.count, o.skip), (1024, Some(8), Some(2)));
    }
}
