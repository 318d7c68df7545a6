//! What every qemu-io command shares: its description ([`CmdInfo`]), its
//! arguments as qemu-io's getopt loop parses them, qemu-io's number and
//! pattern syntax with its messages, and request buffers.

use std::time::{Duration, Instant};

use oxqcow::qemu_syntax::{qemu_strtosz, SizeError};
use oxqcow::{BlockDevice, Image};

use crate::app::getopt;
use crate::app::messages::errno_text;
use crate::app::numbers::strtoul0;
use crate::io::session::{CmdResult, Failed, Session};

/// QEMU's limit on one request (`BDRV_REQUEST_MAX_BYTES`: `INT_MAX`
/// rounded down to whole sectors).
pub const MAX_REQUEST: u64 = 2_147_483_136;

/// Runs one command whose argument count and permissions were checked.
pub type RunFn = fn(&mut Session, &CmdInfo, &[String]) -> CmdResult;

/// One qemu-io command: its names, argument count bounds, help text and
/// the function that runs it.
pub struct CmdInfo {
    /// Name.
    pub name: &'static str,
    /// Short alias.
    pub alt: Option<&'static str>,
    /// Fewest arguments.
    pub argmin: usize,
    /// Most arguments (`None`: no limit).
    pub argmax: Option<usize>,
    /// Runs without an open image.
    pub no_file: bool,
    /// Needs write permission on the image.
    pub writes: bool,
    /// The argument synopsis (`None`: the command takes none).
    pub args: Option<&'static str>,
    /// One-line description.
    pub oneline: &'static str,
    /// Extended help.
    pub help: Option<&'static str>,
    /// What runs it.
    pub run: RunFn,
}

impl CmdInfo {
    /// The usage line qemu-io prints when a command's arguments are wrong.
    pub fn usage(&self) -> CmdResult {
        println!("{} {} -- {}", self.name, self.args.unwrap_or(""), self.oneline);
        Err(Failed)
    }
}

/// A command description with the common defaults (needs an open image,
/// writes nothing, no extended help).
pub const fn cmd(
    name: &'static str,
    alt: Option<&'static str>,
    argmin: usize,
    argmax: Option<usize>,
    args: Option<&'static str>,
    oneline: &'static str,
    run: RunFn,
) -> CmdInfo {
    CmdInfo { name, alt, argmin, argmax, no_file: false, writes: false, args, oneline, help: None, run }
}

/// The open image (commands that need one only run with one open).
pub fn image<'s>(s: &'s Session) -> &'s Image {
    &s.image.as_ref().expect("commands that need an image are only run with one open").image
}

/// The open image with how it was opened (for reads, which copy on read
/// with `-C`).
pub fn opened<'s>(s: &'s Session) -> &'s crate::app::io_open::Opened {
    s.image.as_ref().expect("commands that need an image are only run with one open")
}

/// A number argument, with qemu-io's message when it does not parse.
pub fn num(arg: &str) -> Result<u64, Failed> {
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
pub fn pattern(arg: &str) -> Result<u8, Failed> {
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
pub struct Args {
    pub opts: Vec<(char, String)>,
    pub operands: Vec<String>,
    error: Option<String>,
}

/// Parses a command's arguments as qemu-io's getopt loop sees them; the
/// program name in messages is the command as typed.
pub fn parse_args(argv: &[String], short: &str) -> Args {
    let (parsed, error) = getopt::parse_until_error(&argv[0], &argv[1..], &getopt::short_options(short));
    let opts = parsed.opts.into_iter().map(|(k, v)| (k.chars().next().unwrap_or('?'), v.unwrap_or_default())).collect();
    Args { opts, operands: parsed.operands, error }
}

impl Args {
    /// After the options the command took: a malformed option ends it with
    /// the usage line, as qemu-io's getopt loop does.
    pub fn check(&self, info: &CmdInfo) -> CmdResult {
        match &self.error {
            Some(msg) => {
                eprintln!("{msg}");
                info.usage()
            }
            None => Ok(()),
        }
    }
}

/// Prints qemu-io's line for a failed request (`OP failed: REASON`).
pub fn read_failed(op: &str, e: &oxqcow::Error) -> Failed {
    println!("{op} failed: {}", errno_text(e));
    Failed
}

/// Runs `f`, measuring how long it takes (qemu-io's statistics).
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let r = f();
    (r, start.elapsed())
}

/// A buffer of `len` bytes of `fill`; huge requests that cannot be
/// allocated fail like QEMU's allocation would, without aborting.
pub fn buffer(len: u64, fill: u8) -> Result<Vec<u8>, Failed> {
    let mut v = Vec::new();
    if v.try_reserve_exact(len as usize).is_err() {
        println!("Cannot allocate memory for a {len}-byte buffer");
        return Err(Failed);
    }
    v.resize(len as usize, fill);
    Ok(v)
}

/// qemu-io's check that a VM state or compressed request covers whole
/// sectors.
pub fn sector_aligned(offset: u64, count: u64) -> CmdResult {
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

/// `read -b`: the VM state area, which only qcow2 has (QEMU's other
/// drivers answer ENOTSUP).
pub fn read_vmstate(img: &Image, buf: &mut [u8], pos: u64) -> oxqcow::Result<()> {
    match img.as_qcow2() {
        Some(q) => q.read_vmstate(buf, pos),
        None => Err(oxqcow::Error::Unsupported("the VM state area".into())),
    }
}

/// `write -b`: the VM state area, which only qcow2 has.
pub fn write_vmstate(img: &Image, buf: &[u8], pos: u64) -> oxqcow::Result<()> {
    match img.as_qcow2() {
        Some(q) => q.write_vmstate(buf, pos),
        None => Err(oxqcow::Error::Unsupported("the VM state area".into())),
    }
}

/// The lengths of a vectored request: their sum, with qemu-io's checks.
pub fn iovec_len(args: &[String]) -> Result<u64, Failed> {
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

/// Zero writes may unmap only when the image was opened with discard on.
pub fn may_unmap(s: &Session, requested: bool) -> bool {
    requested && s.image.as_ref().is_some_and(|i| i.unmap)
}

/// Fails like the block layer's request check when a range leaves the disk.
pub fn in_range(img: &Image, offset: u64, len: u64) -> oxqcow::Result<()> {
    let size = img.len();
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(oxqcow::Error::OutOfBounds { offset, len, size }),
    }
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
