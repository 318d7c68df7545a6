//! The commands that flush, discard and resize: `flush`, `aio_flush`,
//! `discard` and `truncate`.

use oxqcow::{BlockDevice, ImageFormat, Preallocation};

use crate::app::messages::describe;
use crate::io::cmds::args::{cmd, image, in_range, num, parse_args, read_failed, timed, CmdInfo, MAX_REQUEST};
use crate::io::report::report;
use crate::io::session::{CmdResult, Failed, Session};

const DISCARD_HELP: &str = "
 discards a range of bytes from the given offset

 Example:
 'discard 512 1k' - discards 1 kilobyte from 512 bytes into the file

 Discards a segment of the currently open file.
 -C, -- report statistics in a machine parsable format
 -q, -- quiet mode, do not show I/O statistics

";

/// `aio_flush`: requests complete before the next command here, so
/// nothing is outstanding.
pub const AIO_FLUSH: CmdInfo =
    cmd("aio_flush", None, 0, Some(0), None, "completes all outstanding aio requests", |_, _, _| Ok(()));

/// `flush`.
pub const FLUSH: CmdInfo = cmd("flush", Some("f"), 0, Some(0), None, "flush all in-core file state to disk", flush);

/// `discard`.
pub const DISCARD: CmdInfo = CmdInfo {
    writes: true,
    help: Some(DISCARD_HELP),
    ..cmd(
        "discard",
        Some("d"),
        2,
        None,
        Some("[-Cq] off len"),
        "discards a number of bytes at a specified offset",
        discard,
    )
};

/// `truncate`.
pub const TRUNCATE: CmdInfo = CmdInfo {
    writes: true,
    ..cmd(
        "truncate",
        Some("t"),
        1,
        Some(3),
        Some("[-m prealloc_mode] off"),
        "truncates the current file at the given offset",
        truncate,
    )
};

fn flush(s: &mut Session, _: &CmdInfo, _: &[String]) -> CmdResult {
    image(s).flush().map_err(|_| Failed)
}

fn discard(s: &mut Session, info: &CmdInfo, argv: &[String]) -> CmdResult {
    let p = parse_args(argv, "Cq");
    let (mut machine, mut quiet) = (false, false);
    for (c, v) in &p.opts {
        match (*c, v) {
            ('C', _) => machine = true,
            ('q', _) => quiet = true,
            _ => {}
        }
    }
    p.check(info)?;
    let [off_arg, len_arg] = p.operands.as_slice() else { return info.usage() };
    let offset = num(off_arg)?;
    let bytes = num(len_arg)?;
    if bytes > MAX_REQUEST {
        println!("length cannot exceed {MAX_REQUEST}, given {len_arg}");
        return Err(Failed);
    }
    // With discard=ignore QEMU drops discard requests before the format.
    let unmap = s.image.as_ref().is_some_and(|i| i.unmap);
    let (res, t) = timed(|| if unmap { image(s).discard(offset, bytes) } else { in_range(image(s), offset, bytes) });
    res.map_err(|e| read_failed("discard", &e))?;
    if !quiet {
        print!("{}", report("discard", t, offset, bytes, bytes, 1, machine));
    }
    Ok(())
}

fn truncate(s: &mut Session, info: &CmdInfo, argv: &[String]) -> CmdResult {
    let p = parse_args(argv, "m:");
    let mut prealloc = Preallocation::Off;
    for (c, v) in &p.opts {
        if *c == 'm' {
            prealloc = match Preallocation::from_name(v) {
                Ok(m) => m,
                Err(_) => {
                    s.ctx.error(&format!("Invalid preallocation mode '{v}'"));
                    return Err(Failed);
                }
            };
        }
    }
    p.check(info)?;
    let Some(arg) = p.operands.first() else { return info.usage() };
    let new_size = num(arg)?;
    let img = image(s);
    let fail = |msg: String| {
        s.ctx.error(&msg);
        Err(Failed)
    };
    let old_size = img.len();
    match img.format() {
        ImageFormat::Qcow2 => {
            if new_size % 512 != 0 {
                return fail("The new size must be a multiple of 512".into());
            }
            if new_size < old_size && prealloc != Preallocation::Off {
                return fail("Preallocation can't be used for shrinking an image".into());
            }
            let q = img.as_qcow2().expect("a qcow2 image");
            let cs = u128::from(q.info().cluster_size);
            let per_l1 = cs * (cs / 8);
            // QEMU's L1 limit: 32 MiB of entries.
            if u128::from(new_size).div_ceil(per_l1) > (32 << 20) / 8 {
                return fail("Failed to grow the L1 table: File too large".into());
            }
        }
        // A luks image's payload is resized in the file, as raw is.
        ImageFormat::Raw | ImageFormat::Luks => {
            if prealloc == Preallocation::Metadata {
                return fail("Unsupported preallocation mode: metadata".into());
            }
            if new_size < old_size && prealloc != Preallocation::Off {
                return fail("Preallocation can't be used for shrinking an image".into());
            }
        }
        ImageFormat::Qcow => {}
    }
    img.resize(new_size, prealloc).or_else(|e| fail(describe(&e)))
}
