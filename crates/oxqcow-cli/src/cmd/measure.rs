//! `measure`: how large a new image would be (`qemu-img measure`), for a
//! given size or for converting an existing image. The arithmetic lives in
//! the library ([`oxqcow::measure`]); this module parses and prints.

use oxqcow::measure::{
    data_bytes, luks_payload_offset, measure_luks, measure_qcow2, measure_raw, Measurement, Qcow2Layout,
};
use oxqcow::{BlockDevice, Compat, Encryption, EncryptionFormat, Image, ImageFormat, OpenOptions, Preallocation};
use serde_json::{json, Map, Value};

use crate::app::ctx::Ctx;
use crate::app::getopt::{HasArg, Opt};
use crate::app::image::{open_image, parse_image_opts};
use crate::app::imgopts::{self, ImgOpts};
use crate::app::messages::describe;
use crate::app::numbers::cvtnum;
use crate::app::output::{print_json, OutputFormat};
use crate::app::snapshot_param::SnapshotParam;
use crate::app::CommonOpts;

/// In qemu-img's order, which ambiguity messages list.
const SPEC: &[Opt] = &[
    Opt::both('h', "help", HasArg::No),
    Opt::both('O', "target-format", HasArg::Required),
    Opt::both('o', "options", HasArg::Required),
    Opt::long("object", HasArg::Required),
    Opt::long("output", HasArg::Required),
    Opt::both('f', "format", HasArg::Required),
    Opt::long("image-opts", HasArg::No),
    Opt::both('l', "snapshot", HasArg::Required),
    Opt::both('s', "size", HasArg::Required),
    Opt::both('U', "force-share", HasArg::No),
];

const HELP: &str = "\
Calculate the file size a new image needs.  Usage:

  PROG measure [-f FMT | --image-opts] [-o OPTIONS] [-O OUTPUT_FMT]
       [--output human|json] [--object OBJDEF] (--size SIZE | FILENAME)

  -O, --target-format FMT     format of the new image (default raw)
  -o, --options OPTIONS       creation options of the new image
  -s, --size SIZE             measure an empty image of SIZE bytes
  FILENAME                    measure a copy of this image
  -f, --format FMT            format of FILENAME (probed when omitted)
  --image-opts                FILENAME is an option string (driver=...,file.filename=...)
  -l, --snapshot SNAPSHOT     measure this internal snapshot of FILENAME
  --output human|json         output format (default human)
  -U, --force-share           open FILENAME in shared mode
";

/// Runs `measure`.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    let p = match ctx.getopt("measure", args, SPEC) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let mut common = CommonOpts::default();
    let mut out_fmt = "raw".to_string();
    let mut options: Option<String> = None;
    let mut output = OutputFormat::Human;
    let mut size: Option<u64> = None;
    let mut snapshot: Option<SnapshotParam> = None;
    for (key, value) in p.opts {
        let value = value.unwrap_or_default();
        match key.as_str() {
            "h" => {
                print!("{}", HELP.replace("PROG", &ctx.prog));
                return 0;
            }
            "O" => out_fmt = value,
            "o" => {
                if let Err(msg) = imgopts::accumulate(&mut options, &value) {
                    return ctx.fail(&msg);
                }
            }
            "output" => match OutputFormat::parse(&value) {
                Ok(o) => output = o,
                Err(msg) => return ctx.usage_error("measure", &msg),
            },
            "l" => match SnapshotParam::parse(&value) {
                Ok(p) => snapshot = Some(p),
                Err(key) => {
                    ctx.error(&format!("Invalid parameter '{key}'"));
                    return ctx.fail(&format!("Failed in parsing snapshot param '{value}'"));
                }
            },
            "s" => match cvtnum("image size", &value, 0, i64::MAX as u64) {
                Ok(n) => size = Some(n),
                Err(msg) => return ctx.fail(&msg),
            },
            _ => {
                if let Err(msg) = common.consume(&key, &value) {
                    return ctx.fail(&msg);
                }
            }
        }
    }
    let (fmt, image_opts, force_share) = (common.format, common.image_opts, common.force_share);
    let filename = match p.operands.as_slice() {
        [] => None,
        [one] => Some(one.clone()),
        _ => return ctx.fail("At most one filename argument is allowed."),
    };
    if filename.is_none() && (image_opts || fmt.is_some() || snapshot.is_some()) {
        return ctx.fail("--image-opts, -f, and -l require a filename argument.");
    }
    if filename.is_some() && size.is_some() {
        return ctx.fail("--size N cannot be used together with a filename.");
    }
    if filename.is_none() && size.is_none() {
        return ctx.fail("Either --size N or one filename must be specified.");
    }
    let source = match &filename {
        None => None,
        Some(name) => match open_source(name, image_opts, fmt.as_deref(), force_share, snapshot.as_ref()) {
            Ok(i) => Some(i),
            Err(msg) => return ctx.fail(&msg),
        },
    };
    let format = match imgopts::format_from_name(&out_fmt) {
        Ok(f) => f,
        Err(msg) => return ctx.fail(&msg),
    };
    let mut opts = ImgOpts::new(format);
    if let Some(o) = &options {
        if let Err(msg) = opts.parse(o) {
            ctx.error(&msg);
            return ctx.fail(&format!("Invalid options for file format '{out_fmt}'"));
        }
    }
    if let Some(n) = size {
        opts.set_number("size", n);
    }
    let result = match format {
        ImageFormat::Raw => {
            Ok((measure_raw(opts.get_number("size").unwrap_or(0), source.as_ref().map(source_len)), None))
        }
        ImageFormat::Qcow2 => measure_qcow2_target(&opts, source.as_ref()),
        ImageFormat::Luks => measure_luks_target(&opts, source.as_ref()),
        ImageFormat::Qcow => Err(format!("Block driver '{out_fmt}' does not support size measurement")),
    };
    let (m, bitmaps) = match result {
        Ok(r) => r,
        Err(msg) => return ctx.fail(&msg),
    };
    match output {
        OutputFormat::Human => {
            println!("required size: {}", m.required);
            println!("fully allocated size: {}", m.fully_allocated);
            if let Some(b) = bitmaps {
                println!("bitmaps size: {b}");
            }
        }
        OutputFormat::Json => {
            let mut v = Map::new();
            v.insert("required".into(), json!(m.required));
            v.insert("fully-allocated".into(), json!(m.fully_allocated));
            if let Some(b) = bitmaps {
                v.insert("bitmaps".into(), json!(b));
            }
            print_json(&Value::Object(v));
        }
    }
    0
}

/// Opens the image to measure (read-only, `-U` shared), on its `-l`
/// snapshot when one is given.
fn open_source(
    name: &str,
    image_opts: bool,
    fmt: Option<&str>,
    force_share: bool,
    snapshot: Option<&SnapshotParam>,
) -> Result<Image, String> {
    let image = if image_opts {
        let (path, f, mut o) = parse_image_opts(name)?;
        o.force_share |= force_share;
        crate::app::image::open_image_as(&path, name, f.as_deref(), o.read_only(true))?
    } else {
        let mut o = OpenOptions::new().read_only(true);
        o.force_share = force_share;
        open_image(name, fmt, o)?
    };
    match snapshot {
        Some(p) => p.load(image, name, fmt),
        None => Ok(image),
    }
}

/// A source's length as QEMU's block layer reports it: in whole sectors.
fn source_len(image: &Image) -> u64 {
    image.len().div_ceil(512) * 512
}

/// luks's measurement (QEMU's `block_crypto_measure`): its options are
/// checked as creation checks them, the secret included.
fn measure_luks_target(opts: &ImgOpts, source: Option<&Image>) -> Result<(Measurement, Option<u64>), String> {
    let size = match source {
        Some(image) => source_len(image),
        None => opts.get_number("size").unwrap_or(0),
    };
    match opts.to_create_options()?.encryption {
        Some(Encryption { format: EncryptionFormat::Luks(params), .. }) => Ok((measure_luks(&params, size), None)),
        _ => Err("Parameter 'key-secret' is required for cipher".into()),
    }
}

/// qcow2's measurement (QEMU's `qcow2_measure`), with its option checks in
/// its order and the bitmap size when both images can carry bitmaps.
fn measure_qcow2_target(opts: &ImgOpts, source: Option<&Image>) -> Result<(Measurement, Option<u64>), String> {
    let bool_opt = |k: &str| opts.get_str(k).is_some_and(|v| matches!(v, "on" | "yes" | "true" | "y"));
    let mut layout = Qcow2Layout {
        cluster_size: opts.get_number("cluster_size").unwrap_or(65536),
        extended_l2: bool_opt("extended_l2"),
        ..Default::default()
    };
    // Cluster size first, then the compatibility level, then refcounts.
    layout.validate().map_err(|e| describe(&e))?;
    if let Some(c) = opts.get_str("compat") {
        layout.compat = match c {
            "0.10" => Compat::V2,
            "1.1" => Compat::V3,
            other => return Err(format!("Invalid compatibility level: '{other}'")),
        };
    }
    if let Some(bits) = opts.get_number("refcount_bits") {
        layout.refcount_bits = u32::try_from(bits).unwrap_or(u32::MAX);
    }
    layout.validate().map_err(|e| describe(&e))?;
    let prealloc = match opts.get_str("preallocation") {
        None => Preallocation::Off,
        Some(p) => Preallocation::from_name(p).map_err(|_| format!("invalid parameter value: {p}"))?,
    };
    let cs = layout.cluster_size;
    // A LUKS header takes whole clusters of its own (QEMU's
    // qcrypto_block_calculate_payload_offset, rounded up to clusters).
    let luks_bytes = match opts.encryption()? {
        Some(Encryption { format: EncryptionFormat::Luks(p), .. }) => luks_payload_offset(&p).div_ceil(cs) * cs,
        _ => 0,
    };
    let (virtual_size, data) = match source {
        None => (opts.get_number("size").unwrap_or(0), None),
        Some(image) => {
            let len = source_len(image);
            let data = if opts.is_set("backing_file") {
                // The new image's backing file may share nothing with the
                // source: count every cluster.
                len.div_ceil(cs) * cs
            } else {
                data_bytes(image, cs).map_err(|e| format!("Unable to get block status: {}", describe(&e)))?
            };
            (len, Some(data))
        }
    };
    let mut m = measure_qcow2(virtual_size, data, &layout, prealloc).map_err(|e| describe(&e))?;
    m.required += luks_bytes;
    m.fully_allocated += luks_bytes;
    let bitmaps = match source {
        Some(Image::Qcow2(q)) if layout.compat == Compat::V3 && q.info().version >= 3 => {
            Some(oxqcow::bitmap::bitmaps_size(&q.bitmaps(), q.len(), cs))
        }
        _ => None,
    };
    Ok((m, bitmaps))
}
