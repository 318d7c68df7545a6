//! `bitmap`: add, remove, clear, enable, disable and merge persistent dirty
//! bitmaps (`qemu-img bitmap`).
//!
//! As in qemu-img: the actions run in the order given, on one bitmap of one
//! image opened read-write; the first failure stops with "Operation OP on
//! bitmap NAME failed: ..." and exit code 1. `--merge SOURCE` reads bitmap
//! SOURCE of the same image, or of `-b SOURCE_FILE` (opened read-only).
//! Changes are stored when the image is closed, as QEMU stores bitmaps.

use oxqcow::backing::BackingPolicy;
use oxqcow::{DirtyBitmap, Image, OpenOptions};

use crate::app::ctx::Ctx;
use crate::app::getopt::{HasArg, Opt};
use crate::app::image::{open_image, parse_image_opts};
use crate::app::messages::{describe, errno_text};
use crate::app::numbers::cvtnum;
use crate::app::CommonOpts;

/// In qemu-img's order, which ambiguity messages list.
const SPEC: &[Opt] = &[
    Opt::both('h', "help", HasArg::No),
    Opt::long("object", HasArg::Required),
    Opt::long("image-opts", HasArg::No),
    Opt::long("add", HasArg::No),
    Opt::long("remove", HasArg::No),
    Opt::long("clear", HasArg::No),
    Opt::long("enable", HasArg::No),
    Opt::long("disable", HasArg::No),
    Opt::long("merge", HasArg::Required),
    Opt::both('g', "granularity", HasArg::Required),
    Opt::both('b', "source-file", HasArg::Required),
    Opt::both('F', "source-format", HasArg::Required),
    Opt::both('f', "format", HasArg::Required),
];

/// qemu-img 10's help text, word for word.
const HELP: &str = "\
Usage:
Perform modifications of the persistent bitmap in the image.  Usage:

  qemu-img bitmap ( --merge SOURCE | --add | --remove | --clear |
                --enable | --disable ).. [-f FMT | --image-opts]
        [ -b SRC_FILENAME [-F SOURCE_FMT]] [-g SIZE[KMGTPE]] [--object OBJDEF]
        FILENAME BITMAP

Arguments:
  -h, --help
     print this help and exit
  -f, --format FMT
     specify FILENAME format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  --add
     creates BITMAP, enables to record future edits
   -g, --granularity SIZE[KMGTPE]
     sets non-default bitmap granularity for --add to this size
  --remove
     removes BITMAP
  --clear
     clears BITMAP
  --enable, --disable
     starts and stops recording future edits to BITMAP
  --merge SRC_FILENAME
     merges contents of SRC_FILENAME bitmap into BITMAP
   -b, --source-file SRC_FILENAME
     select alternative source file for --merge
   -F, --source-format SRC_FMT
     specify format for SRC_FILENAME explicitly

";

#[derive(Clone, Debug, PartialEq, Eq)]
enum Action {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

impl Action {
    fn name(&self) -> &'static str {
        match self {
            Action::Add => "add",
            Action::Remove => "remove",
            Action::Clear => "clear",
            Action::Enable => "enable",
            Action::Disable => "disable",
            Action::Merge(_) => "merge",
        }
    }
}

/// Runs `bitmap`.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    let p = match ctx.getopt("bitmap", args, SPEC) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let mut common = CommonOpts::default();
    let (mut src_file, mut src_fmt): (Option<String>, Option<String>) = (None, None);
    let mut granularity: u64 = 0;
    let mut actions = Vec::new();
    for (key, value) in p.opts {
        let value = value.unwrap_or_default();
        match key.as_str() {
            "h" => {
                print!("{HELP}");
                return 0;
            }
            "b" => src_file = Some(value),
            "F" => src_fmt = Some(value),
            "g" => match cvtnum("granularity", &value, 0, i64::MAX as u64) {
                Ok(g) => granularity = g,
                Err(msg) => return ctx.fail(&msg),
            },
            "add" => actions.push(Action::Add),
            "remove" => actions.push(Action::Remove),
            "clear" => actions.push(Action::Clear),
            "enable" => actions.push(Action::Enable),
            "disable" => actions.push(Action::Disable),
            "merge" => actions.push(Action::Merge(value)),
            _ => {
                if let Err(msg) = common.consume(&key, &value) {
                    return ctx.fail(&msg);
                }
            }
        }
    }
    if actions.is_empty() {
        return ctx.fail("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge");
    }
    if granularity != 0 && !actions.contains(&Action::Add) {
        return ctx.fail("granularity only supported with --add");
    }
    if src_fmt.is_some() && src_file.is_none() {
        return ctx.fail("-F only supported with -b");
    }
    if src_file.is_some() && !actions.iter().any(|a| matches!(a, Action::Merge(_))) {
        return ctx.fail("Merge bitmap source file only supported with --merge");
    }
    let [filename, bitmap] = p.operands.as_slice() else {
        return ctx.fail("Expecting filename and bitmap name");
    };
    if common.image_opts && common.format.is_some() {
        return ctx.fail("--image-opts and --format are mutually exclusive");
    }
    let (path, format, opts) = if common.image_opts {
        match parse_image_opts(filename) {
            Ok(v) => v,
            Err(msg) => return ctx.fail(&msg),
        }
    } else {
        (filename.clone(), common.format, OpenOptions::new())
    };
    // Bitmaps live in the image itself: as qemu-img (BDRV_O_NO_BACKING),
    // neither image's backing file is opened, so a base another process
    // holds does not stand in the way.
    let image = match open_image(&path, format.as_deref(), opts.backing(BackingPolicy::Ignore)) {
        Ok(i) => i,
        Err(msg) => return ctx.fail(&msg),
    };
    let source = match &src_file {
        None => None,
        Some(f) => {
            let o = OpenOptions::new().read_only(true).backing(BackingPolicy::Ignore);
            match open_image(f, src_fmt.as_deref(), o) {
                Ok(i) => Some(i),
                Err(msg) => return ctx.fail(&msg),
            }
        }
    };
    let mut code = 0;
    for action in &actions {
        if let Err(msg) = apply(&image, source.as_ref(), action, bitmap, granularity) {
            code = ctx.fail(&format!("Operation {} on bitmap {bitmap} failed: {msg}", action.name()));
            break;
        }
    }
    // As qemu-img: the images are inactivated first, so that a failure
    // (bitmaps that cannot be stored) is known and fails the command, then
    // closed, which tries a failed inactivation again.
    let source_inactivated = source.as_ref().map_or(Ok(()), Image::inactivate);
    if let Err(e) = image.inactivate().and(source_inactivated) {
        code = ctx.fail(&format!("Error while closing the image: {}", errno_text(&e)));
    }
    drop(source);
    // Its failure was reported by the sink (bitmaps lost again) or is the
    // one just reported.
    let _ = image.close();
    code
}

/// Runs one action as qemu-img's QMP commands do.
fn apply(image: &Image, source: Option<&Image>, action: &Action, name: &str, granularity: u64) -> Result<(), String> {
    let Image::Qcow2(q) = image else {
        // Raw images cannot store persistent bitmaps.
        return match action {
            Action::Add => {
                Err(format!("Can't store persistent bitmaps to {}: Operation not supported", oxqcow::bitmap::NODE_NAME))
            }
            _ => Err(format!("Dirty bitmap '{name}' not found")),
        };
    };
    let err = |e: oxqcow::Error| describe(&e);
    match action {
        Action::Add => {
            // QMP takes the granularity as a 32-bit number; 0 means "default".
            let g = granularity as u32;
            let g = if granularity == 0 { None } else { Some(u64::from(g)) };
            q.bitmap_add(name, g, true).map_err(err)
        }
        Action::Remove => q.bitmap_remove(name).map_err(err),
        Action::Clear => q.bitmap_clear(name).map_err(err),
        Action::Enable => q.bitmap_set_enabled(name, true).map_err(err),
        Action::Disable => q.bitmap_set_enabled(name, false).map_err(err),
        Action::Merge(src) => {
            // The target is checked before the source, as QEMU does.
            q.bitmap_contents(name).map_err(err)?;
            let bits: DirtyBitmap = match source.unwrap_or(image) {
                Image::Qcow2(s) => s.bitmap_contents(src).map_err(err)?,
                _ => return Err(format!("Dirty bitmap '{src}' not found")),
            };
            q.bitmap_merge(name, &bits).map_err(err)
        }
    }
}
