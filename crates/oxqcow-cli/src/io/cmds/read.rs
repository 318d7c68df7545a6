//! The reading commands: `read`, `readv` and `aio_read`.

use crate::app::messages::errno_text;
use crate::io::cmds::args::{
    buffer, cmd, image, iovec_len, num, opened, parse_args, pattern, read_failed, read_vmstate, sector_aligned, timed,
    CmdInfo, MAX_REQUEST,
};
use crate::io::report::{dump, report};
use crate::io::session::{CmdResult, Failed, Session};

const READ_HELP: &str = "
 reads a range of bytes from the given offset

 Example:
 'read -v 512 1k' - dumps 1 kilobyte read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 -b, -- read from the VM state rather than the virtual disk (not supported)
 -C, -- report statistics in a machine parsable format
 -l, -- length for pattern verification (only with -P)
 -p, -- ignored for backwards compatibility
 -P, -- use a pattern to verify read data
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -s, -- start offset for pattern verification (only with -P)
 -v, -- dump buffer to standard output

";

const READV_HELP: &str = "
 reads a range of bytes from the given offset into multiple buffers

 Example:
 'readv -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 Uses multiple iovec buffers if more than one byte range is specified.
 -C, -- report statistics in a machine parsable format
 -P, -- use a pattern to verify read data
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -v, -- dump buffer to standard output

";

const AIO_READ_HELP: &str = "
 asynchronously reads a range of bytes from the given offset

 Example:
 'aio_read -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 The read is performed asynchronously and the aio_flush command must be
 used to ensure all outstanding aio requests have been completed.
 Note that due to its asynchronous nature, this command will be
 considered successful once the request is submitted, independently
 of potential I/O errors or pattern mismatches.
 -C, -- report statistics in a machine parsable format
 -i, -- treat request as invalid, for exercising stats
 -P, -- use a pattern to verify read data
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -v, -- dump buffer to standard output

";

/// `read`.
pub const READ: CmdInfo = CmdInfo {
    help: Some(READ_HELP),
    ..cmd(
        "read",
        Some("r"),
        2,
        None,
        Some("[-abCqrv] [-P pattern [-s off] [-l len]] off len"),
        "reads a number of bytes at a specified offset",
        read,
    )
};

/// `readv`.
pub const READV: CmdInfo = CmdInfo {
    help: Some(READV_HELP),
    ..cmd(
        "readv",
        None,
        2,
        None,
        Some("[-Cqrv] [-P pattern] off len [len..]"),
        "reads a number of bytes at a specified offset",
        |s, info, argv| readv(s, info, argv, false),
    )
};

/// `aio_read`.
pub const AIO_READ: CmdInfo = CmdInfo {
    help: Some(AIO_READ_HELP),
    ..cmd(
        "aio_read",
        None,
        2,
        None,
        Some("[-Ciqrv] [-P pattern] off len [len..]"),
        "asynchronously reads a number of bytes",
        |s, info, argv| readv(s, info, argv, true),
    )
};

fn read(s: &mut Session, info: &CmdInfo, argv: &[String]) -> CmdResult {
    let p = parse_args(argv, "bCl:pP:qrs:v");
    let (mut vm_state, mut machine, mut quiet, mut verbose) = (false, false, false, false);
    let (mut pat, mut pat_off, mut pat_len) = (None, None, None);
    for (c, v) in &p.opts {
        match (*c, v) {
            ('b', _) => vm_state = true,
            ('C', _) => machine = true,
            ('l', v) => pat_len = Some(num(v)?),
            ('P', v) => pat = Some(pattern(v)?),
            ('q', _) => quiet = true,
            ('s', v) => pat_off = Some(num(v)?),
            ('v', _) => verbose = true,
            _ => {} // -p and -r change nothing here
        }
    }
    p.check(info)?;
    let [off_arg, len_arg] = p.operands.as_slice() else { return info.usage() };
    let offset = num(off_arg)?;
    let count = num(len_arg)?;
    if count > MAX_REQUEST {
        println!("length cannot exceed {MAX_REQUEST}, given {len_arg}");
        return Err(Failed);
    }
    if pat.is_none() && (pat_len.is_some() || pat_off.is_some()) {
        return info.usage();
    }
    let pat_off = pat_off.unwrap_or(0);
    let pat_len = pat_len.map_or(i128::from(count) - i128::from(pat_off), i128::from);
    if pat_len < 0 || pat_len + i128::from(pat_off) > i128::from(count) {
        println!("pattern verification range exceeds end of read data");
        return Err(Failed);
    }
    if vm_state {
        sector_aligned(offset, count)?;
    }
    let mut buf = buffer(count, 0xab)?;
    let (res, t) =
        timed(|| if vm_state { read_vmstate(image(s), &mut buf, offset) } else { opened(s).read_at(&mut buf, offset) });
    res.map_err(|e| read_failed("read", &e))?;
    let mut ret = Ok(());
    if let Some(p) = pat {
        let range = &buf[pat_off as usize..(pat_off as usize + pat_len as usize)];
        if range.iter().any(|&b| b != p) {
            println!("Pattern verification failed at offset {}, {pat_len} bytes", offset + pat_off);
            ret = Err(Failed);
        }
    }
    if quiet {
        return ret;
    }
    if verbose {
        print!("{}", dump(&buf, offset));
    }
    print!("{}", report("read", t, offset, count, count, 1, machine));
    ret
}

/// `readv` and `aio_read`; the latter counts as done once submitted, so
/// request failures and pattern mismatches do not fail it.
fn readv(s: &mut Session, info: &CmdInfo, argv: &[String], aio: bool) -> CmdResult {
    let optstring = if aio { "CiP:qrv" } else { "CP:qrv" };
    let p = parse_args(argv, optstring);
    let (mut machine, mut quiet, mut verbose, mut pat) = (false, false, false, None);
    for (c, v) in &p.opts {
        match (*c, v) {
            ('C', _) => machine = true,
            ('i', _) => {
                println!("injecting invalid read request");
                return Ok(());
            }
            ('P', v) => pat = Some(pattern(v)?),
            ('q', _) => quiet = true,
            ('v', _) => verbose = true,
            _ => {}
        }
    }
    p.check(info)?;
    if p.operands.len() < 2 {
        return info.usage();
    }
    let offset = num(&p.operands[0])?;
    let count = iovec_len(&p.operands[1..])?;
    let mut buf = buffer(count, 0xab)?;
    let (res, t) = timed(|| opened(s).read_at(&mut buf, offset));
    let done = if aio { Ok(()) } else { Err(Failed) };
    if let Err(e) = res {
        println!("readv failed: {}", errno_text(&e));
        return done;
    }
    let mut ret = Ok(());
    if let Some(p) = pat {
        if buf.iter().any(|&b| b != p) {
            println!("Pattern verification failed at offset {offset}, {count} bytes");
            ret = done;
        }
    }
    if quiet {
        return ret;
    }
    if verbose {
        print!("{}", dump(&buf, offset));
    }
    print!("{}", report("read", t, offset, count, count, 1, machine));
    ret
}
