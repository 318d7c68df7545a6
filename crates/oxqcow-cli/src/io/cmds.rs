//! The qemu-io commands: argument handling in qemu-io's order (so the same
//! mistake gets the same message), the request, and the report.

use std::time::{Duration, Instant};

use oxqcow::{BlockDevice, Image, ImageFormat, Preallocation};

use super::report::{dump, human_size, report};
use super::{CmdInfo, CmdResult, Failed, Session};
use crate::app::getopt;
use crate::app::io_open::{split_options, OpenSpec};
use crate::app::messages::{describe, errno_text, io_error_text};
use crate::app::numbers::{qemu_strtosz, strtoul0, SizeError};

/// QEMU's limit on one request (`BDRV_REQUEST_MAX_BYTES`: `INT_MAX`
/// rounded down to whole sectors).
pub const MAX_REQUEST: u64 = 2_147_483_136;

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

const WRITE_HELP: &str = "
 writes a range of bytes from the given offset

 Example:
 'write 512 1k' - writes 1 kilobyte at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 -b, -- write to the VM state rather than the virtual disk (not supported)
 -c, -- write compressed data with blk_write_compressed
 -C, -- report statistics in a machine parsable format
 -f, -- use Force Unit Access semantics
 -n, -- with -z, don't allow slow fallback
 -p, -- ignored for backwards compatibility
 -P, -- use different pattern to fill file
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -s, -- use a pattern file to fill the write buffer
 -u, -- with -z, allow unmapping
 -z, -- write zeroes using blk_pwrite_zeroes

";

const WRITEV_HELP: &str = "
 writes a range of bytes from the given offset source from multiple buffers

 Example:
 'writev 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 -C, -- report statistics in a machine parsable format
 -f, -- use Force Unit Access semantics
 -P, -- use different pattern to fill file
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer

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

const AIO_WRITE_HELP: &str = "
 asynchronously writes a range of bytes from the given offset source
 from multiple buffers

 Example:
 'aio_write 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 The write is performed asynchronously and the aio_flush command must be
 used to ensure all outstanding aio requests have been completed.
 Note that due to its asynchronous nature, this command will be
 considered successful once the request is submitted, independently
 of potential I/O errors or pattern mismatches.
 -C, -- report statistics in a machine parsable format
 -f, -- use Force Unit Access semantics
 -i, -- treat request as invalid, for exercising stats
 -P, -- use different pattern to fill file
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -u, -- with -z, allow unmapping
 -z, -- write zeroes using blk_aio_pwrite_zeroes

";

const DISCARD_HELP: &str = "
 discards a range of bytes from the given offset

 Example:
 'discard 512 1k' - discards 1 kilobyte from 512 bytes into the file

 Discards a segment of the currently open file.
 -C, -- report statistics in a machine parsable format
 -q, -- quiet mode, do not show I/O statistics

";

const OPEN_HELP: &str = "
 opens a new file in the requested mode

 Example:
 'open -n -o driver=raw /tmp/data' - opens raw data file read-write, uncached

 Opens a file for subsequent use by all of the other qemu-io commands.
 -r, -- open file read-only
 -s, -- use snapshot file
 -C, -- use copy-on-read (not supported)
 -n, -- disable host cache, short for -t none
 -U, -- force shared permissions
 -k, -- use kernel AIO implementation (Linux only, prefer use of -i)
 -i, -- use AIO mode (threads, native or io_uring)
 -t, -- use the given cache mode for the image
 -d, -- use the given discard mode for the image
 -o, -- options to be given to the block driver
";

const fn cmd(
    name: &'static str,
    alt: Option<&'static str>,
    argmin: usize,
    argmax: Option<usize>,
    args: Option<&'static str>,
    oneline: &'static str,
) -> CmdInfo {
    CmdInfo { name, alt, argmin, argmax, no_file: false, writes: false, args, oneline, help: None }
}

/// The supported commands, sorted by name as qemu-io lists them.
static COMMANDS: &[CmdInfo] = &[
    cmd("aio_flush", None, 0, Some(0), None, "completes all outstanding aio requests"),
    CmdInfo {
        help: Some(AIO_READ_HELP),
        ..cmd(
            "aio_read",
            None,
            2,
            None,
            Some("[-Ciqrv] [-P pattern] off len [len..]"),
            "asynchronously reads a number of bytes",
        )
    },
    CmdInfo {
        writes: true,
        help: Some(AIO_WRITE_HELP),
        ..cmd(
            "aio_write",
            None,
            2,
            None,
            Some("[-Cfiqruz] [-P pattern] off len [len..]"),
            "asynchronously writes a number of bytes",
        )
    },
    cmd("alloc", Some("a"), 1, Some(2), Some("offset [count]"), "checks if offset is allocated in the file"),
    cmd("close", Some("c"), 0, Some(0), None, "close the current open file"),
    CmdInfo {
        writes: true,
        help: Some(DISCARD_HELP),
        ..cmd("discard", Some("d"), 2, None, Some("[-Cq] off len"), "discards a number of bytes at a specified offset")
    },
    cmd("flush", Some("f"), 0, Some(0), None, "flush all in-core file state to disk"),
    CmdInfo { no_file: true, ..cmd("help", Some("?"), 0, Some(1), Some("[command]"), "help for one or all commands") },
    cmd("info", Some("i"), 0, Some(0), None, "prints information about the current file"),
    cmd("length", Some("l"), 0, Some(0), None, "gets the length of the current file"),
    cmd("map", None, 0, Some(0), Some(""), "prints the allocated areas of a file"),
    CmdInfo {
        no_file: true,
        help: Some(OPEN_HELP),
        ..cmd(
            "open",
            Some("o"),
            1,
            None,
            Some("[-rsCnkU] [-t cache] [-d discard] [-o options] [path]"),
            "open the file specified by path",
        )
    },
    CmdInfo { no_file: true, ..cmd("quit", Some("q"), 0, None, None, "exit the program") },
    CmdInfo {
        help: Some(READ_HELP),
        ..cmd(
            "read",
            Some("r"),
            2,
            None,
            Some("[-abCqrv] [-P pattern [-s off] [-l len]] off len"),
            "reads a number of bytes at a specified offset",
        )
    },
    CmdInfo {
        help: Some(READV_HELP),
        ..cmd(
            "readv",
            None,
            2,
            None,
            Some("[-Cqrv] [-P pattern] off len [len..]"),
            "reads a number of bytes at a specified offset",
        )
    },
    CmdInfo {
        writes: true,
        ..cmd(
            "truncate",
            Some("t"),
            1,
            Some(3),
            Some("[-m prealloc_mode] off"),
            "truncates the current file at the given offset",
        )
    },
    CmdInfo {
        writes: true,
        help: Some(WRITE_HELP),
        ..cmd(
            "write",
            Some("w"),
            2,
            None,
            Some("[-bcCfnqruz] [-P pattern | -s source_file] off len"),
            "writes a number of bytes at a specified offset",
        )
    },
    CmdInfo {
        writes: true,
        help: Some(WRITEV_HELP),
        ..cmd(
            "writev",
            None,
            2,
            None,
            Some("[-Cfqr] [-P pattern] off len [len..]"),
            "writes a number of bytes at a specified offset",
        )
    },
];

/// Looks a command up by name or alias.
pub fn find(name: &str) -> Option<&'static CmdInfo> {
    COMMANDS.iter().find(|c| c.name == name || c.alt == Some(name))
}

/// Runs a command whose argument count and permissions were checked.
pub fn run(s: &mut Session, info: &'static CmdInfo, argv: &[String]) -> CmdResult {
    match info.name {
        "read" => read(s, info, argv),
        "readv" => readv(s, info, argv, false),
        "aio_read" => readv(s, info, argv, true),
        "write" => write(s, info, argv),
        "writev" => writev(s, info, argv, false),
        "aio_write" => writev(s, info, argv, true),
        "aio_flush" => Ok(()),
        "flush" => flush(s),
        "discard" => discard(s, info, argv),
        "alloc" => alloc(s, argv),
        "map" => map(s),
        "length" => {
            println!("{}", human_size(image(s).len() as f64));
            Ok(())
        }
        "info" => info_cmd(s),
        "truncate" => truncate(s, info, argv),
        "open" => open_cmd(s, info, argv),
        "close" => s.close_image(),
        "quit" => {
            s.quit = true;
            Ok(())
        }
        "help" => help(argv),
        other => unreachable!("command {other} is in the table but not dispatched"),
    }
}

fn image<'s>(s: &'s Session) -> &'s Image {
    &s.image.as_ref().expect("commands that need an image are only run with one open").image
}

/// A number argument, with qemu-io's message when it does not parse.
fn num(arg: &str) -> Result<u64, Failed> {
    let parsed = qemu_strtosz(arg).and_then(|v| if v > i64::MAX as u64 { Err(SizeError::Range) } else { Ok(v) });
    parsed.map_err(|e| {
        match e {
            SizeError::Invalid => {
                println!("Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {arg}")
            }
            SizeError::Range => println!("Parsing error: argument too large -- {arg}"),
        }
        Failed
    })
}

/// A pattern byte as C's `strtol(arg, &end, 0)` reads it: decimal, `0x`
/// hexadecimal or `0` octal, optionally signed, nothing after it.
fn pattern(arg: &str) -> Result<u8, Failed> {
    match strtoul0(arg).map(u8::try_from) {
        Ok(Ok(v)) => Ok(v),
        _ => {
            println!("{arg} is not a valid pattern byte");
            Err(Failed)
        }
    }
}

/// A command's options (letters, in order, up to a malformed one), its
/// operands, and glibc's message for the malformed option if any.
struct Args {
    opts: Vec<(char, String)>,
    operands: Vec<String>,
    error: Option<String>,
}

/// Parses a command's arguments as qemu-io's getopt loop sees them; the
/// program name in messages is the command as typed.
fn parse_args(argv: &[String], short: &str) -> Args {
    let (parsed, error) = getopt::parse_until_error(&argv[0], &argv[1..], &getopt::short_options(short));
    let opts = parsed.opts.into_iter().map(|(k, v)| (k.chars().next().unwrap_or('?'), v.unwrap_or_default())).collect();
    Args { opts, operands: parsed.operands, error }
}

impl Args {
    /// After the options the command took: a malformed option ends it with
    /// the usage line, as qemu-io's getopt loop does.
    fn check(&self, info: &CmdInfo) -> CmdResult {
        match &self.error {
            Some(msg) => {
                eprintln!("{msg}");
                info.usage()
            }
            None => Ok(()),
        }
    }
}

fn read_failed(op: &str, e: &oxqcow::Error) -> Failed {
    println!("{op} failed: {}", errno_text(e));
    Failed
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let r = f();
    (r, start.elapsed())
}

/// A buffer of `len` bytes of `fill`; huge requests that cannot be
/// allocated fail like QEMU's allocation would, without aborting.
fn buffer(len: u64, fill: u8) -> Result<Vec<u8>, Failed> {
    let mut v = Vec::new();
    if v.try_reserve_exact(len as usize).is_err() {
        println!("Cannot allocate memory for a {len}-byte buffer");
        return Err(Failed);
    }
    v.resize(len as usize, fill);
    Ok(v)
}

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
        return vm_state_unsupported();
    }
    let mut buf = buffer(count, 0xab)?;
    let (res, t) = timed(|| image(s).read_at(&mut buf, offset));
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

fn sector_aligned(offset: u64, count: u64) -> CmdResult {
    if offset % 512 != 0 {
        println!("{offset} is not a sector-aligned value for 'offset'");
        return Err(Failed);
    }
    if count % 512 != 0 {
        println!("{count} is not a sector-aligned value for 'count'");
        return Err(Failed);
    }
    Ok(())
}

fn vm_state_unsupported() -> CmdResult {
    println!("-b: the VM state area is not supported by oxqcow");
    Err(Failed)
}

/// The lengths of a vectored request: their sum, with qemu-io's checks.
fn iovec_len(args: &[String]) -> Result<u64, Failed> {
    let mut total = 0u64;
    for arg in args {
        let len = num(arg)?;
        if len > MAX_REQUEST {
            println!("Argument '{arg}' exceeds maximum size {MAX_REQUEST}");
            return Err(Failed);
        }
        if total > MAX_REQUEST - len {
            println!("The total number of bytes exceed the maximum size {MAX_REQUEST}");
            return Err(Failed);
        }
        total += len;
    }
    Ok(total)
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
    let (res, t) = timed(|| image(s).read_at(&mut buf, offset));
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

/// `-f` (FUA): the write is durable when it completes. (Writethrough
/// cache modes make every write so in the engine.)
fn after_write(s: &Session, fua: bool) -> oxqcow::Result<()> {
    if fua {
        image(s).flush()?;
    }
    Ok(())
}

fn write(s: &mut Session, info: &CmdInfo, argv: &[String]) -> CmdResult {
    let p = parse_args(argv, "bcCfnpP:qrs:uz");
    let (mut vm_state, mut compressed, mut machine, mut fua, mut no_fallback) = (false, false, false, false, false);
    let (mut quiet, mut registered, mut unmap, mut zero) = (false, false, false, false);
    let (mut pat, mut source) = (None, None);
    for (c, v) in &p.opts {
        match (*c, v) {
            ('b', _) => vm_state = true,
            ('c', _) => compressed = true,
            ('C', _) => machine = true,
            ('f', _) => fua = true,
            ('n', _) => no_fallback = true,
            ('P', v) => pat = Some(pattern(v)?),
            ('q', _) => quiet = true,
            ('r', _) => registered = true,
            ('s', v) => source = Some(v.clone()),
            ('u', _) => unmap = true,
            ('z', _) => zero = true,
            _ => {}
        }
    }
    p.check(info)?;
    let [off_arg, len_arg] = p.operands.as_slice() else { return info.usage() };
    let refuse = |msg: &str| {
        println!("{msg}");
        Err(Failed)
    };
    if vm_state && zero {
        return refuse("-b and -z cannot be specified at the same time");
    }
    if fua && (vm_state || compressed) {
        return refuse("-f and -b or -c cannot be specified at the same time");
    }
    if no_fallback && !zero {
        return refuse("-n requires -z to be specified");
    }
    if unmap && !zero {
        return refuse("-u requires -z to be specified");
    }
    if u8::from(zero) + u8::from(pat.is_some()) + u8::from(source.is_some()) > 1 {
        return refuse("Only one of -z, -P, and -s can be specified at the same time");
    }
    let offset = num(off_arg)?;
    let count = num(len_arg)?;
    if count > MAX_REQUEST && !no_fallback {
        println!("length cannot exceed {MAX_REQUEST} without -n, given {len_arg}");
        return Err(Failed);
    }
    if zero && registered {
        return refuse("cannot combine zero write with registered I/O buffer");
    }
    if vm_state || compressed {
        sector_aligned(offset, count)?;
    }
    let buf = if zero {
        Vec::new()
    } else if let Some(file) = &source {
        buffer_from_file(file, count)?
    } else {
        buffer(count, pat.unwrap_or(0xcd))?
    };
    if vm_state {
        return vm_state_unsupported();
    }
    let (res, t) = timed(|| {
        let img = image(s);
        if zero {
            if no_fallback {
                fast_zero_possible(img, offset, count)?;
            }
            img.write_zeroes_at(offset, count, may_unmap(s, unmap))?;
        } else if compressed {
            write_compressed(img, &buf, offset)?;
        } else {
            img.write_at(&buf, offset)?;
        }
        after_write(s, fua)
    });
    res.map_err(|e| read_failed("write", &e))?;
    if !quiet {
        print!("{}", report("wrote", t, offset, count, count, 1, machine));
    }
    Ok(())
}

/// `write -s FILE`: the file's bytes, repeated to fill the request.
fn buffer_from_file(file: &str, count: u64) -> Result<Vec<u8>, Failed> {
    let data = std::fs::read(file).map_err(|e| {
        eprintln!("{file}: {}", io_error_text(&e));
        Failed
    })?;
    if data.is_empty() {
        eprintln!("{file}: file is empty");
        return Err(Failed);
    }
    let mut buf = buffer(0, 0)?;
    if buf.try_reserve_exact(count as usize).is_err() {
        println!("Cannot allocate memory for a {count}-byte buffer");
        return Err(Failed);
    }
    while (buf.len() as u64) < count {
        let n = (count as usize - buf.len()).min(data.len());
        buf.extend_from_slice(&data[..n]);
    }
    Ok(buf)
}

/// `write -z -n`: QEMU zeroes without falling back to writing zeros only
/// where qcow2 can set zero flags, i.e. on version 3 images, for clusters
/// the request covers whole and for partial clusters that already read
/// as zeros without holding data.
fn fast_zero_possible(img: &Image, offset: u64, count: u64) -> oxqcow::Result<()> {
    let Some(q) = img.as_qcow2() else { return Ok(()) };
    let not_supported = || oxqcow::Error::Unsupported("zeroing without fallback".into());
    let info = q.info();
    if info.version < 3 {
        return Err(not_supported());
    }
    let (cs, size) = (info.cluster_size, img.len());
    let end = offset.checked_add(count).filter(|&e| e <= size).ok_or(oxqcow::Error::OutOfBounds {
        offset,
        len: count,
        size,
    })?;
    let mut partial = Vec::new();
    if offset % cs != 0 {
        partial.push(offset - offset % cs);
    }
    if end % cs != 0 && end != size {
        partial.push(end - end % cs);
    }
    for start in partial {
        let len = cs.min(size - start);
        if !img.block_status(start, len)?.iter().all(|e| e.zero && !e.data) {
            return Err(not_supported());
        }
    }
    Ok(())
}

/// `write -c`: whole clusters compressed (qcow2 only). QEMU fails
/// misaligned requests with EINVAL and writes over allocated clusters
/// with EIO.
fn write_compressed(img: &Image, buf: &[u8], offset: u64) -> oxqcow::Result<()> {
    let Some(q) = img.as_qcow2() else {
        return Err(oxqcow::Error::Unsupported("compressed writes on raw images".into()));
    };
    let cs = q.info().cluster_size;
    let end = offset + buf.len() as u64;
    if end > img.len() {
        return Err(oxqcow::Error::OutOfBounds { offset, len: buf.len() as u64, size: img.len() });
    }
    if buf.is_empty() {
        return Ok(());
    }
    if offset % cs != 0 || (end % cs != 0 && end != img.len()) {
        return Err(oxqcow::Error::InvalidArgument("compressed writes must cover whole clusters".into()));
    }
    q.write_compressed(buf, offset).map_err(|e| match e.kind() {
        // The only refusal left is a cluster that already holds data.
        oxqcow::ErrorKind::InvalidArgument => oxqcow::Error::Corrupt(e.to_string()),
        _ => e,
    })
}

/// `writev` and `aio_write` (whose failures do not fail the command).
fn writev(s: &mut Session, info: &CmdInfo, argv: &[String], aio: bool) -> CmdResult {
    let optstring = if aio { "CfiP:qruz" } else { "CfP:qr" };
    let p = parse_args(argv, optstring);
    let (mut machine, mut fua, mut quiet, mut registered, mut unmap, mut zero) =
        (false, false, false, false, false, false);
    let mut pat = None;
    for (c, v) in &p.opts {
        match (*c, v) {
            ('C', _) => machine = true,
            ('f', _) => fua = true,
            ('i', _) => {
                println!("injecting invalid write request");
                return Ok(());
            }
            ('P', v) => pat = Some(pattern(v)?),
            ('q', _) => quiet = true,
            ('r', _) => registered = true,
            ('u', _) => unmap = true,
            ('z', _) => zero = true,
            _ => {}
        }
    }
    p.check(info)?;
    if p.operands.len() < 2 {
        return info.usage();
    }
    let refuse = |msg: &str| {
        println!("{msg}");
        Err(Failed)
    };
    if zero && p.operands.len() != 2 {
        return refuse("-z supports only a single length parameter");
    }
    if unmap && !zero {
        return refuse("-u requires -z to be specified");
    }
    // qemu-io 10 means to refuse -z with -P here but never notices -P
    // (its check reads a flag that aio_write does not set): -P is ignored.
    if zero && registered {
        return refuse("cannot combine zero write with registered I/O buffer");
    }
    let offset = num(&p.operands[0])?;
    let (res, count, t) = if zero {
        let count = num(&p.operands[1])?;
        let (res, t) = timed(|| {
            if count > MAX_REQUEST {
                return Err(oxqcow::Error::OutOfBounds { offset, len: count, size: image(s).len() });
            }
            image(s).write_zeroes_at(offset, count, may_unmap(s, unmap))?;
            after_write(s, fua)
        });
        (res, count, t)
    } else {
        let count = iovec_len(&p.operands[1..])?;
        let buf = buffer(count, pat.unwrap_or(0xcd))?;
        let (res, t) = timed(|| {
            image(s).write_at(&buf, offset)?;
            after_write(s, fua)
        });
        (res, count, t)
    };
    if let Err(e) = res {
        println!("{} failed: {}", if aio { "aio_write" } else { "writev" }, errno_text(&e));
        return if aio { Ok(()) } else { Err(Failed) };
    }
    if !quiet {
        print!("{}", report("wrote", t, offset, count, count, 1, machine));
    }
    Ok(())
}

fn flush(s: &mut Session) -> CmdResult {
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

/// Fails like the block layer's request check when a range leaves the disk.
fn in_range(img: &Image, offset: u64, len: u64) -> oxqcow::Result<()> {
    let size = img.len();
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(oxqcow::Error::OutOfBounds { offset, len, size }),
    }
}

/// Zero writes may unmap only when the image was opened with discard on.
fn may_unmap(s: &Session, requested: bool) -> bool {
    requested && s.image.as_ref().is_some_and(|i| i.unmap)
}

/// Runs of `[offset, offset + len)` as (length, allocated in this image),
/// merged as qemu-io merges `bdrv_is_allocated` answers.
fn allocation(img: &Image, offset: u64, len: u64) -> oxqcow::Result<Vec<(u64, bool)>> {
    let mut runs: Vec<(u64, bool)> = Vec::new();
    // Ask in bounded pieces so huge images need bounded memory.
    const PIECE: u64 = 1 << 40;
    let mut pos = offset;
    while pos < offset + len {
        let n = PIECE.min(offset + len - pos);
        for e in img.block_status(pos, n)? {
            let allocated = e.present && e.depth == 0;
            match runs.last_mut() {
                Some((l, a)) if *a == allocated => *l += e.length,
                _ => runs.push((e.length, allocated)),
            }
        }
        pos += n;
    }
    Ok(runs)
}

fn alloc(s: &mut Session, argv: &[String]) -> CmdResult {
    let start = num(&argv[1])?;
    let mut count = match argv.get(2) {
        Some(arg) => num(arg)?,
        None => 512,
    };
    let img = image(s);
    let size = img.len();
    count = if start >= size { 0 } else { count.min(size - start) };
    let runs = allocation(img, start, count).map_err(|e| {
        println!("is_allocated failed: {}", errno_text(&e));
        Failed
    })?;
    let allocated: u64 = runs.iter().filter(|r| r.1).map(|r| r.0).sum();
    println!("{allocated}/{count} bytes allocated at offset {}", human_size(start as f64));
    Ok(())
}

fn map(s: &mut Session) -> CmdResult {
    let img = image(s);
    let runs = allocation(img, 0, img.len()).map_err(|e| {
        s.ctx.error(&format!("Failed to get allocation status: {}", errno_text(&e)));
        Failed
    })?;
    let mut offset = 0u64;
    for (len, allocated) in runs {
        println!(
            "{} (0x{len:x}) bytes {} at offset {} (0x{offset:x})",
            human_size(len as f64),
            if allocated { "    allocated" } else { "not allocated" },
            human_size(offset as f64)
        );
        offset += len;
    }
    Ok(())
}

fn info_cmd(s: &mut Session) -> CmdResult {
    let img = image(s);
    println!("format name: {}", img.format().name());
    let Some(q) = img.as_qcow2() else {
        println!("cluster size: 0 bytes\nvm state offset: 0 bytes");
        return Ok(());
    };
    let info = q.info();
    let cs = info.cluster_size;
    let l2_entries = cs / if info.extended_l2 { 16 } else { 8 };
    // The VM state lives right after the disk, at the next L1 entry.
    let per_l1 = u128::from(cs) * u128::from(l2_entries);
    let vm_state = u128::from(img.len()).div_ceil(per_l1) * per_l1;
    println!("cluster size: {}", human_size(cs as f64));
    println!("vm state offset: {}", human_size(vm_state as f64));
    println!("Format specific information:");
    let v3 = info.version >= 3;
    println!("    compat: {}", if v3 { "1.1" } else { "0.10" });
    println!("    compression type: {}", info.compression_type);
    if v3 {
        println!("    lazy refcounts: {}", info.lazy_refcounts);
    }
    println!("    refcount bits: {}", info.refcount_bits);
    if let Some(data_file) = &info.data_file {
        println!("    data file: {data_file}");
        println!("    data file raw: {}", info.data_file_raw);
    }
    if v3 {
        println!("    corrupt: {}", info.corrupt);
        println!("    extended l2: {}", info.extended_l2);
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
        ImageFormat::Raw => {
            if prealloc == Preallocation::Metadata {
                return fail("Unsupported preallocation mode: metadata".into());
            }
            if new_size < old_size && prealloc != Preallocation::Off {
                return fail("Preallocation can't be used for shrinking an image".into());
            }
        }
    }
    img.resize(new_size, prealloc).or_else(|e| fail(describe(&e)))
}

fn open_cmd(s: &mut Session, info: &CmdInfo, argv: &[String]) -> CmdResult {
    let p = parse_args(argv, "snCro:ki:t:d:U");
    let mut spec = OpenSpec::for_command_line();
    for (c, v) in &p.opts {
        let (c, v) = (*c, v.as_str());
        if c == 'o' {
            if s.image_opts {
                println!("--image-opts and 'open -o' are mutually exclusive");
                return Err(Failed);
            }
            match split_options(&s.ctx.prog, v) {
                Ok(o) => spec.options.extend(o),
                Err(msg) => {
                    s.ctx.error(&msg);
                    return Err(Failed);
                }
            }
        } else if let Err(msg) = spec.apply_flag(c, v) {
            s.ctx.error(&msg);
            return Err(Failed);
        }
    }
    p.check(info)?;
    let mut operands = p.operands.as_slice();
    if s.image_opts && operands.len() == 1 {
        match split_options(&s.ctx.prog, &operands[0]) {
            Ok(o) => spec.options.extend(o),
            Err(msg) => {
                s.ctx.error(&msg);
                return Err(Failed);
            }
        }
        operands = &[];
    }
    match operands {
        [path] => s.open(spec, Some(path)),
        [] => s.open(spec, None),
        _ => info.usage(),
    }
}

fn help_line(name: &str, c: &CmdInfo) {
    match c.args {
        Some(args) => println!("{name} {args} -- {}", c.oneline),
        None => println!("{name} -- {}", c.oneline),
    }
}

fn help(argv: &[String]) -> CmdResult {
    let Some(name) = argv.get(1) else {
        for c in COMMANDS {
            help_line(c.name, c);
        }
        println!("\nUse 'help commandname' for extended help.");
        return Ok(());
    };
    let Some(c) = find(name) else {
        println!("command {name} not found");
        return Err(Failed);
    };
    help_line(name, c);
    if let Some(h) = c.help {
        print!("{h}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_as_strtol_reads_them() {
        assert_eq!(pattern("0x12").ok(), Some(0x12));
        assert_eq!(pattern("255").ok(), Some(255));
        assert_eq!(pattern("010").ok(), Some(8));
        assert_eq!(pattern("0").ok(), Some(0));
        assert_eq!(pattern("-0").ok(), Some(0));
        assert!(pattern("0x100").is_err());
        assert!(pattern("-1").is_err());
        assert!(pattern("abc").is_err());
        assert!(pattern("0x1g").is_err());
        assert!(pattern("08").is_err());
        assert!(pattern("0x").is_err());
    }
}
