//! `amend`: change options of an existing image (`qemu-img amend`).
//!
//! The flow is qemu-img's: options are required, `-o help` lists the amend
//! options, the image is opened read-write, then the option string is
//! type-checked against the amend options (and, when that fails but the
//! creation options accept it, the hint that the option is for creation
//! only), then the library amends in QEMU's order. `-p` prints qemu's
//! progress lines around the library's status reports.

use oxqcow::options::{AmendOptions, KeyslotChange};
use oxqcow::qemu_syntax::{parse_size_option, split_options};
use oxqcow::{Compat, Image, ImageFormat};

use crate::app::ctx::Ctx;
use crate::app::getopt::{HasArg, Opt};
use crate::app::image::is_cache_mode;
use crate::app::imgopts::{self, OptDesc, OptType};
use crate::app::messages::describe;
use crate::app::progress::Progress;
use crate::app::CommonOpts;

/// In qemu-img's order, which ambiguity messages list.
const SPEC: &[Opt] = &[
    Opt::both('h', "help", HasArg::No),
    Opt::both('q', "quiet", HasArg::No),
    Opt::both('p', "progress", HasArg::No),
    Opt::long("object", HasArg::Required),
    Opt::both('f', "format", HasArg::Required),
    Opt::long("image-opts", HasArg::No),
    Opt::both('t', "cache", HasArg::Required),
    Opt::both('o', "options", HasArg::Required),
    Opt::long("force", HasArg::No),
];

/// qemu-img 10's help text, word for word (its `-o` line is missing there too).
const HELP: &str = "\
Usage:
Update format-specific options of the image.  Usage:

  qemu-img amend [-f FMT | --image-opts] [t CACHE] [--force] [-p] [-q]
        [--object OBJDEF -o OPTIONS FILENAME

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operation
  -p, --progres
     show progress
  -f, --format FMT
     specify FILENAME format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
   instead of a file name (incompatible with --format)
  -t, --cache CACHE
     cache mode for FILENAME (writeback)
  --force
     allow certain unsafe operations

";

/// qcow2's amend options (`qcow2_amend_opts`), in QEMU's list order:
/// the LUKS ones first, then the common ones.
const AMEND_OPTS: &[OptDesc] = &[
    OptDesc::new("encrypt.state", OptType::Str, "Select new state of affected keyslots (active/inactive)"),
    OptDesc::new("encrypt.keyslot", OptType::Number, "Select a single keyslot to modify explicitly"),
    OptDesc::new("encrypt.old-secret", OptType::Str, "Select all keyslots that match this password"),
    OptDesc::new(
        "encrypt.new-secret",
        OptType::Str,
        "New secret to set in the matching keyslots. Empty string to erase",
    ),
    OptDesc::new("encrypt.iter-time", OptType::Number, "Time to spend in PBKDF in milliseconds"),
    OptDesc::new("size", OptType::Size, "Virtual disk size"),
    OptDesc::new("compat", OptType::Str, "Compatibility level (v2 [0.10] or v3 [1.1])"),
    OptDesc::new("backing_file", OptType::Str, "File name of a base image"),
    OptDesc::new("backing_fmt", OptType::Str, "Image format of the base image"),
    OptDesc::new("data_file", OptType::Str, "File name of an external data file"),
    OptDesc::new("data_file_raw", OptType::Bool, "The external data file must stay valid as a raw image"),
    OptDesc::new("lazy_refcounts", OptType::Bool, "Postpone refcount updates"),
    OptDesc::new("refcount_bits", OptType::Number, "Width of a reference count entry in bits"),
];

/// luks's amend options (QEMU's `block_crypto_amend_opts_luks`): qcow2's
/// key slot options without their `encrypt.` prefix.
const LUKS_AMEND_OPTS: &[OptDesc] = &[
    OptDesc::new("state", OptType::Str, "Select new state of affected keyslots (active/inactive)"),
    OptDesc::new("keyslot", OptType::Number, "Select a single keyslot to modify explicitly"),
    OptDesc::new("old-secret", OptType::Str, "Select all keyslots that match this password"),
    OptDesc::new("new-secret", OptType::Str, "New secret to set in the matching keyslots. Empty string to erase"),
    OptDesc::new("iter-time", OptType::Number, "Time to spend in PBKDF in milliseconds"),
];

/// Runs `amend`.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    let p = match ctx.getopt("amend", args, SPEC) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let mut options: Option<String> = None;
    let mut common = CommonOpts::default();
    let mut force = false;
    for (key, value) in p.opts {
        let value = value.unwrap_or_default();
        match key.as_str() {
            "h" => {
                print!("{HELP}");
                return 0;
            }
            "o" => {
                if let Err(msg) = imgopts::accumulate(&mut options, &value) {
                    return ctx.fail(&msg);
                }
            }
            "force" => force = true,
            _ => {
                if let Err(msg) = common.consume(&key, &value) {
                    return ctx.fail(&msg);
                }
            }
        }
    }
    let Some(options) = options else {
        return ctx.usage_error("amend", "Must specify options (-o)");
    };
    let bar = Progress::new(common.show_progress(), 1.0);
    let flags = Flags { image_opts: common.image_opts, force };
    let cache = common.cache_or("writeback");
    let code = amend(ctx, &options, common.format, &cache, flags, &p.operands, &bar);
    bar.end();
    code
}

/// `--image-opts` and `--force`.
struct Flags {
    image_opts: bool,
    force: bool,
}

fn amend(
    ctx: &Ctx,
    options: &str,
    fmt: Option<String>,
    cache: &str,
    flags: Flags,
    operands: &[String],
    bar: &Progress,
) -> i32 {
    let Flags { image_opts, force } = flags;
    let help = imgopts::has_help_option(options);
    if let (Some(f), true) = (&fmt, help) {
        return print_amend_help(ctx, f);
    }
    let [filename] = operands else {
        return ctx.fail("Expecting one image file name");
    };
    if !is_cache_mode(cache) {
        return ctx.fail(&format!("Invalid cache option: {cache}"));
    }
    let image = match crate::app::image::open_operand_for_writing(filename, image_opts, fmt)
        .and_then(|image| crate::app::image::apply_cache_mode(&image, cache, filename).map(|()| image))
    {
        Ok(i) => i,
        Err(msg) => return ctx.fail(&msg),
    };
    if help {
        return print_amend_help(ctx, image.format().name());
    }
    if let Image::Luks(l) = &image {
        if let Err(msg) = check_types(options, ImageFormat::Luks, LUKS_AMEND_OPTS) {
            return ctx.fail(&msg);
        }
        bar.print(0.0, 0);
        let result = keyslot_change(&split_options(options), "", force)
            .and_then(|c| l.amend_encryption(&c).map_err(|e| describe(&e)));
        bar.print(100.0, 0);
        if let Err(msg) = result {
            return ctx.fail(&msg);
        }
        if let Err(e) = crate::app::image::close_image(image) {
            return ctx.fail(&describe(&e));
        }
        return 0;
    }
    let Image::Qcow2(q) = &image else {
        return ctx.fail(&format!("Format driver '{}' does not support option amendment", image.format().name()));
    };
    if let Err(msg) = check_types(options, ImageFormat::Qcow2, AMEND_OPTS) {
        return ctx.fail(&msg);
    }
    bar.print(0.0, 0);
    let result = to_amend_options(options, &q.info()).and_then(|(o, keyslots)| {
        let mut status = |done: u64, total: u64| bar.print(100.0f32 * done as f32 / total as f32, 0);
        q.amend(&o, &mut status).map_err(|e| describe(&e))?;
        match keyslots {
            Some(change) => keyslot_change(&change, "encrypt.", force)
                .and_then(|c| q.amend_encryption(&c).map_err(|e| describe(&e))),
            None => Ok(()),
        }
    });
    bar.print(100.0, 0);
    if let Err(msg) = result {
        return ctx.fail(&msg);
    }
    if let Err(e) = crate::app::image::close_image(image) {
        return ctx.fail(&describe(&e));
    }
    0
}

/// qemu-img's `print_amend_option_help`.
fn print_amend_help(ctx: &Ctx, format: &str) -> i32 {
    match format {
        "qcow2" | "luks" => {
            let opts = if format == "qcow2" { AMEND_OPTS } else { LUKS_AMEND_OPTS };
            let mut list: Vec<&OptDesc> = opts.iter().collect();
            list.sort_by_key(|d| d.name);
            println!("Amend options for '{format}':");
            for d in list {
                println!("{}", d.help_line());
            }
            0
        }
        "raw" | "qcow" => ctx.fail(&format!("Format driver '{format}' does not support option amendment")),
        other => ctx.fail(&format!("Unknown file format '{other}'")),
    }
}

/// `qemu_opts_do_parse` against the amend options; when that fails but the
/// creation options would take the string, QEMU adds a hint.
fn check_types(options: &str, format: ImageFormat, amend_opts: &[OptDesc]) -> Result<(), String> {
    for (key, value) in split_options(options) {
        let err = match amend_opts.iter().find(|d| d.name == key) {
            Some(d) => match d.check(&value) {
                Ok(()) => continue,
                Err(e) => e,
            },
            None => format!("Invalid parameter '{key}'"),
        };
        if imgopts::parses_with_create_opts(format, amend_opts, options) {
            return Err(format!("{err}\nThis option is only supported for image creation"));
        }
        return Err(err);
    }
    Ok(())
}

/// One `key=value` of an option string.
type KeyValue = (String, String);

/// The typed options (already type-checked), with QEMU's messages for
/// values its amend code refuses, in the order of its option list.
fn to_amend_options(options: &str, info: &oxqcow::Qcow2Info) -> Result<(AmendOptions, Option<Vec<KeyValue>>), String> {
    let pairs = split_options(options);
    let last = |k: &str| pairs.iter().rev().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    let mut o = AmendOptions { encryption: pairs.iter().any(|(k, _)| k.starts_with("encrypt.")), ..Default::default() };
    let mut keyslots = None;
    if o.encryption && info.crypt_method == 2 {
        // Key slot changes, made after the other amendments.
        keyslots = Some(pairs.iter().filter(|(k, _)| k.starts_with("encrypt.")).cloned().collect());
        o.encryption = false;
    }
    if o.encryption {
        return Err(if info.crypt_method == 0 {
            "Can't amend encryption options - encryption not present".into()
        } else {
            "Only LUKS encryption options can be amended".into()
        });
    }
    if let Some(v) = last("size") {
        o.size = Some(parse_size_option("size", &v)?);
    }
    if let Some(v) = last("compat") {
        o.compat = Some(Compat::from_amend_name(&v).map_err(|e| describe(&e))?);
    }
    o.backing_file = last("backing_file");
    o.backing_format = last("backing_fmt");
    o.data_file = last("data_file");
    if o.data_file.is_some() && info.data_file.is_none() {
        return Err("data-file can only be set for images that use an external data file".into());
    }
    if let Some(v) = last("data_file_raw") {
        let raw = imgopts::parse_bool("data_file_raw", &v)?;
        if raw && !info.data_file_raw {
            return Err("data-file-raw cannot be set on existing images".into());
        }
        o.data_file_raw = Some(raw);
    }
    if let Some(v) = last("lazy_refcounts") {
        o.lazy_refcounts = Some(imgopts::parse_bool("lazy_refcounts", &v)?);
    }
    if let Some(v) = last("refcount_bits") {
        let bits = imgopts::parse_number("refcount_bits", &v)?;
        let bits = u32::try_from(bits).unwrap_or(0);
        oxqcow::options::check_refcount_bits(bits).map_err(|e| describe(&e))?;
        o.refcount_bits = Some(bits);
    }
    Ok((o, keyslots))
}

/// The LUKS key slot change the amend options named `PREFIX<name>` ask
/// for (`encrypt.` for qcow2, none for luks), with QEMU's messages
/// (`QCryptoBlockAmendOptionsLUKS`).
fn keyslot_change(pairs: &[(String, String)], prefix: &str, force: bool) -> Result<KeyslotChange, String> {
    let last = |k: &str| {
        let k = format!("{prefix}{k}");
        pairs.iter().rev().find(|(key, _)| *key == k).map(|(_, v)| v.clone())
    };
    let state = match last("state").as_deref() {
        None => return Err("Parameter 'state' is missing".into()),
        Some("active") => true,
        Some("inactive") => false,
        Some(other) => return Err(format!("Parameter 'state' does not accept value '{other}'")),
    };
    let keyslot = match last("keyslot") {
        None => None,
        Some(v) => {
            let n = imgopts::parse_number("keyslot", &v)?;
            if n >= 8 {
                return Err(format!("Invalid keyslot {n} specified, must be between 0 and 7"));
            }
            Some(n as usize)
        }
    };
    let secret = |k: &str| last(k).map(|id| crate::app::secrets::lookup(&id)).transpose();
    let old_secret = secret("old-secret")?;
    let new_secret = secret("new-secret")?;
    if state {
        if old_secret.is_some() {
            return Err("'old-secret' must not be given when activating keyslots".into());
        }
        let Some(new_secret) = new_secret else {
            return Err("'new-secret' is required to activate a keyslot".into());
        };
        let iter_time_ms = match last("iter-time") {
            Some(v) => imgopts::parse_number("iter-time", &v)?,
            None => 2000,
        };
        Ok(KeyslotChange::Activate { keyslot, new_secret, iter_time_ms, force })
    } else {
        if new_secret.is_some() {
            return Err("'new-secret' must not be given when erasing keyslots".into());
        }
        Ok(KeyslotChange::Erase { keyslot, old_secret, force })
    }
}
