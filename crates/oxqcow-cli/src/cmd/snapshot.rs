//! `snapshot`: list, create, apply and delete internal snapshots
//! (`qemu-img snapshot`).
//!
//! As in qemu-img: one action at most (listing when none is given), `-c`
//! records the date with microsecond precision and an instruction count of
//! 0, `-a` finds the snapshot by id and then by name, `-d` by name only, and
//! every failure exits with 1. One deliberate difference: qemu-img 10
//! declares `--create`, `--apply` and `--delete` without their argument and
//! crashes on them; here they take the snapshot name like their short forms.

use oxqcow::format::SnapshotEntry;
use oxqcow::{Image, ImageFormat, OpenOptions};

use crate::app::ctx::Ctx;
use crate::app::getopt::{HasArg, Opt};
use crate::app::image::parse_image_opts;
use crate::app::messages::{describe, strerror, warn_probed_raw};
use crate::app::snapshot_table::{snapshot_header, snapshot_row};
use crate::app::CommonOpts;

/// In qemu-img's order, which ambiguity messages list.
const SPEC: &[Opt] = &[
    Opt::both('h', "help", HasArg::No),
    Opt::both('q', "quiet", HasArg::No),
    Opt::long("object", HasArg::Required),
    Opt::both('f', "format", HasArg::Required),
    Opt::long("image-opts", HasArg::No),
    Opt::both('U', "force-share", HasArg::No),
    Opt::both('l', "list", HasArg::No),
    Opt::both('a', "apply", HasArg::Required),
    Opt::both('c', "create", HasArg::Required),
    Opt::both('d', "delete", HasArg::Required),
];

/// qemu-img 10's help text, word for word.
const HELP: &str = "\
Usage:
List or manipulate snapshots within image.  Usage:

  qemu-img snapshot [-f FMT | --image-opts] [-l | -a|-c|-d SNAPSHOT]
        [-U] [--object OBJDEF] FILENAME

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
      quiet operations
  -f, --format FMT
      specify FILENAME format explicitly
  --image-opts
      indicates that FILENAME is a complete image specification
   instead of a file name (incompatible with --format)
  -U, --force-share
      open image in shared mode for concurrent access
  --object OBJDEF
      QEMU user-creatable object (eg encryption key)
  Operation, one of:
    -l, --list
       list snapshots in FILENAME (the default)
    -c, --create SNAPSHOT
       create named snapshot
    -a, --apply SNAPSHOT
       apply named snapshot to the base
    -d, --delete SNAPSHOT
       delete named snapshot
  FILENAME - image file name (or specification with --image-opts)

";

/// QEMU keeps snapshot names in a 256-byte buffer (`QEMUSnapshotInfo.name`).
const MAX_NAME_BYTES: usize = 255;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Action {
    List,
    Create(String),
    Apply(String),
    Delete(String),
}

/// Runs `snapshot`.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    let p = match ctx.getopt("snapshot", args, SPEC) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let mut common = CommonOpts::default();
    let mut action: Option<Action> = None;
    for (key, value) in p.opts {
        let value = value.unwrap_or_default();
        let chosen = match key.as_str() {
            "h" => {
                print!("{HELP}");
                return 0;
            }
            "l" => Some(Action::List),
            "a" => Some(Action::Apply(value)),
            "c" => Some(Action::Create(value)),
            "d" => Some(Action::Delete(value)),
            // -q too: nothing is printed but the list and errors.
            _ => match common.consume(&key, &value) {
                Ok(_) => None,
                Err(msg) => return ctx.fail(&msg),
            },
        };
        if let Some(a) = chosen {
            if action.is_some() {
                return ctx.usage_error("snapshot", "Cannot mix '-l', '-a', '-c', '-d'");
            }
            action = Some(a);
        }
    }
    let [filename] = p.operands.as_slice() else {
        return ctx.usage_error("snapshot", "Expecting one image file name");
    };
    let (fmt, image_opts, force_share) = (common.format, common.image_opts, common.force_share);
    let action = action.unwrap_or(Action::List);
    if image_opts && fmt.is_some() {
        return ctx.fail("--image-opts and --format are mutually exclusive");
    }
    let (path, format, mut opts) = if image_opts {
        match parse_image_opts(filename) {
            Ok(v) => v,
            Err(msg) => return ctx.fail(&msg),
        }
    } else {
        (filename.clone(), fmt, OpenOptions::new())
    };
    let read_only = action == Action::List;
    if force_share && !read_only {
        return ctx.fail(&format!("Could not open '{path}': force-share=on can only be used with read-only images"));
    }
    opts.read_only = opts.read_only || read_only;
    opts.force_share = force_share;
    let image = match crate::app::image::open_image_as(&path, filename, format.as_deref(), opts) {
        Ok(i) => i,
        Err(msg) => return ctx.fail(&msg),
    };
    if !read_only && format.is_none() && image.format() == ImageFormat::Raw {
        warn_probed_raw(&path);
    }
    let code = perform(ctx, &image, action);
    if let Err(e) = crate::app::image::close_image(image) {
        if code == 0 {
            return ctx.fail(&describe(&e));
        }
    }
    code
}

/// Runs the action on the open image; the exit code.
fn perform(ctx: &Ctx, image: &Image, action: Action) -> i32 {
    match (image, action) {
        (Image::Qcow2(q), Action::List) => {
            let snapshots = q.snapshots();
            if !snapshots.is_empty() {
                println!("Snapshot list:\n{}", snapshot_header());
                for sn in &snapshots {
                    println!("{}", line(sn));
                }
            }
            0
        }
        (Image::Qcow2(q), Action::Create(name)) => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            let template = SnapshotEntry {
                name: truncate_name(&name),
                date_sec: now.as_secs() as u32,
                date_nsec: now.subsec_micros() * 1000,
                icount: Some(0),
                ..Default::default()
            };
            match q.snapshot_create_with(&template) {
                Ok(_) => 0,
                Err(e) => ctx.fail(&format!("Could not create snapshot '{name}': {}", errno_text(&e))),
            }
        }
        (Image::Qcow2(q), Action::Apply(name)) => {
            let known = q.snapshots().iter().any(|s| s.id == name || s.name == name);
            if q.has_bitmaps() {
                // bdrv_snapshot_goto refuses before looking the snapshot up.
                ctx.fail(&format!("Could not apply snapshot '{name}': Device has active dirty bitmaps"))
            } else if !known {
                ctx.fail(&format!(
                    "Could not apply snapshot '{name}': Failed to load snapshot: No such file or directory"
                ))
            } else {
                match q.snapshot_apply(&name) {
                    Ok(()) => 0,
                    // QEMU first resizes the disk to the snapshot's size; that
                    // resize reports its own error, the apply then fails.
                    Err(oxqcow::Error::InvalidArgument(msg)) if msg.starts_with("The new size") => {
                        ctx.error(&msg);
                        ctx.fail(&format!(
                            "Could not apply snapshot '{name}': Failed to load snapshot: Invalid argument"
                        ))
                    }
                    Err(e) => ctx.fail(&format!("Could not apply snapshot '{name}': {}", describe(&e))),
                }
            }
        }
        (Image::Qcow2(q), Action::Delete(name)) => {
            // qemu-img looks the name up (bdrv_snapshot_find matches names
            // only), then deletes that entry by its id and name.
            match q.snapshots().into_iter().find(|s| s.name == name) {
                None => ctx.fail(&format!("Could not delete snapshot '{name}': snapshot not found")),
                Some(sn) => match q.snapshot_delete(&sn.id) {
                    Ok(()) => 0,
                    Err(e) => ctx.fail(&format!("Could not delete snapshot '{name}': {}", describe(&e))),
                },
            }
        }
        // Formats without snapshots fall back to the file, as QEMU's do.
        (_, Action::List) => 0,
        (_, Action::Create(name)) => ctx.fail(&format!("Could not create snapshot '{name}': Operation not supported")),
        (_, Action::Apply(name)) => {
            ctx.fail(&format!("Could not apply snapshot '{name}': Block driver does not support snapshots"))
        }
        (_, Action::Delete(name)) => ctx.fail(&format!("Could not delete snapshot '{name}': snapshot not found")),
    }
}

/// A table line for one snapshot, as `bdrv_snapshot_dump` prints it.
pub fn line(sn: &SnapshotEntry) -> String {
    snapshot_row(&sn.id, &sn.name, sn.vm_state_bytes(), u64::from(sn.date_sec), sn.vm_clock_nsec, sn.icount)
}

/// The name as QEMU keeps it: at most 255 bytes (cut at a character
/// boundary here, where C would cut inside a character).
fn truncate_name(name: &str) -> String {
    let mut end = name.len().min(MAX_NAME_BYTES);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_string()
}

/// The errno text qemu-img prints for a failed `bdrv_snapshot_create`
/// (`strerror(-ret)`): the engine's messages start with it.
fn errno_text(e: &oxqcow::Error) -> String {
    match e {
        oxqcow::Error::NoSpace(_) => "File too large".to_string(),
        oxqcow::Error::InvalidArgument(m) if m.starts_with("File exists") => "File exists".to_string(),
        oxqcow::Error::InvalidArgument(_) => "Invalid argument".to_string(),
        oxqcow::Error::Unsupported(_) => "Operation not supported".to_string(),
        oxqcow::Error::ReadOnly => "Permission denied".to_string(),
        other => strerror(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_cut_like_qemu() {
        assert_eq!(truncate_name(&"n".repeat(300)).len(), 255);
        assert_eq!(truncate_name("short"), "short");
        assert_eq!(truncate_name(&"é".repeat(200)).len(), 254);
    }
}
