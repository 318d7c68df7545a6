//! What every subcommand shares: the program name for messages, error
//! printing in qemu-img's style, opening images with qemu-img's error text,
//! the backing file policy, and size formatting.
//!
//! # `--forbid-backing`
//!
//! An image from a stranger can name any file as its backing file, and
//! opening the image would hand that file's content to whoever reads it.
//! With `--forbid-backing` (given before the subcommand, `oxqcow
//! --forbid-backing info x.qcow2`, or as an option of a subcommand that
//! declares it) no backing file is ever opened: every image whose header
//! names one is refused with an error, whatever the subcommand; the same
//! holds for external data files (their names are just as dangerous). The flag is
//! process-wide: [`open_image`] applies it to every image it opens, so a
//! subcommand gets it by opening images through [`open_image`] (or by
//! asking [`backing_policy`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use oxqcow::backing::{resolve_backing_path, BackingPolicy};
use oxqcow::{Image, ImageFormat, ImageMessage, ImageMessages, OpenOptions};

/// The name of the flag that forbids backing files, without dashes.
pub const FORBID_BACKING: &str = "forbid-backing";

/// Set once `--forbid-backing` was seen.
static BACKING_FORBIDDEN: AtomicBool = AtomicBool::new(false);

/// Forbids opening backing files for the rest of the process.
pub fn forbid_backing() {
    BACKING_FORBIDDEN.store(true, Ordering::Release);
}

/// Whether `--forbid-backing` was given.
pub fn backing_forbidden() -> bool {
    BACKING_FORBIDDEN.load(Ordering::Acquire)
}

/// The policy for backing files named by images: `wanted` unless
/// `--forbid-backing` was given.
pub fn backing_policy(wanted: BackingPolicy) -> BackingPolicy {
    if backing_forbidden() {
        BackingPolicy::Forbid
    } else {
        wanted
    }
}

/// The invocation context.
pub struct Ctx {
    /// The program name as invoked (basename of argv[0]), prefixed to errors.
    pub prog: String,
    /// argv[0] itself, which qemu-img names in usage hints and option
    /// parsing errors ("Try '/usr/bin/qemu-img info --help' ...").
    pub argv0: String,
}

impl Ctx {
    /// Builds the context from argv[0].
    pub fn from_argv0(argv0: &str) -> Ctx {
        let prog = Path::new(argv0).file_name().and_then(|s| s.to_str()).unwrap_or("oxqcow").to_string();
        Ctx { prog, argv0: argv0.to_string() }
    }

    /// Prints `prog: msg` on stderr and returns exit code 1.
    pub fn fail(&self, msg: &str) -> i32 {
        self.error(msg);
        1
    }

    /// Prints `prog: msg` on stderr.
    pub fn error(&self, msg: &str) {
        eprintln!("{}: {}", self.prog, msg);
    }
}

/// Opens an image as qemu-img does, returning qemu-img's message on failure
/// ("Could not open 'PATH': REASON", with one "Could not open backing file: "
/// for every backing level the failure is down the chain). Backing files
/// are followed as `opts.backing` says, unless `--forbid-backing` was given.
pub fn open_image(path: &str, format: Option<&str>, opts: OpenOptions) -> Result<Image, String> {
    open_image_as(path, path, format, opts)
}

/// [`open_image`] for an image named on the command line as `shown` (an
/// `--image-opts` string), which qemu-img's open errors name.
pub fn open_image_as(path: &str, shown: &str, format: Option<&str>, opts: OpenOptions) -> Result<Image, String> {
    open_image_inner(path, format, opts).map_err(|msg| match msg.strip_prefix(&format!("Could not open '{path}': ")) {
        Some(rest) if shown != path => format!("Could not open '{shown}': {rest}"),
        _ => msg,
    })
}

fn open_image_inner(path: &str, format: Option<&str>, opts: OpenOptions) -> Result<Image, String> {
    let mut opts = opts;
    opts.backing = backing_policy(opts.backing);
    opts.messages.get_or_insert_with(open_messages);
    if Path::new(path).is_dir() {
        return Err(format!("Could not open '{path}': 'file' driver requires '{path}' to be a regular file"));
    }
    if let Some(f) = format {
        opts.format =
            Some(ImageFormat::from_name(f).map_err(|e| format!("Could not open '{path}': {}", describe(&e)))?);
    }
    let image = Image::open(Path::new(path), &opts).map_err(|e| {
        // Under Forbid or Ignore no backing file was opened, so the failure
        // is the top image's (or the refusal itself).
        let follows = !matches!(opts.backing, BackingPolicy::Forbid | BackingPolicy::Ignore);
        if let Some(msg) = follows.then(|| chain_failure(path, opts.format)).flatten() {
            return msg;
        }
        match &e {
            // QEMU's file layer names the file again: "Could not open 'x':
            // Could not open 'x': No such file or directory".
            oxqcow::Error::Io { op: "opening the image", .. } => {
                format!("Could not open '{path}': Could not open '{path}': {}", describe(&e))
            }
            _ => format!("Could not open '{path}': {}", describe(&e)),
        }
    })?;
    Ok(image)
}

/// Prints what QEMU prints while opening and running an image, as it
/// happens: the warning (at every open) for a bitmaps extension that a
/// program without bitmap support left behind, the lines of the repair a
/// dirty image (lazy refcounts) gets when it is opened read-write, and
/// inconsistencies met and worked around later.
pub fn open_messages() -> ImageMessages {
    Arc::new(|m| match m {
        ImageMessage::StaleBitmaps(why) => {
            let argv0 = std::env::args().next().unwrap_or_default();
            let prog = Path::new(&argv0).file_name().and_then(|s| s.to_str()).unwrap_or("oxqcow").to_string();
            // QEMU prints the second line with error_printf, without a newline.
            let _ = write!(
                std::io::stderr().lock(),
                "{prog}: warning: {why}\nSome clusters may be leaked, run 'qemu-img check -r' on the image file to fix."
            );
        }
        ImageMessage::Repair(line) | ImageMessage::Inconsistency(line) => stderr_line(line),
    })
}

/// One line on stderr, as QEMU's check prints each problem it finds (there
/// can be billions, so they are never collected). A failed write is
/// ignored, as QEMU ignores fprintf's: the check or repair goes on.
pub fn stderr_line(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// When the image at `path` opens alone but a file down its backing chain
/// does not, qemu-img's message for it: "Could not open 'top': Could not
/// open backing file: [Could not open backing file: ...]REASON". `None`
/// when the top image itself is the problem.
fn chain_failure(path: &str, format: Option<ImageFormat>) -> Option<String> {
    let alone = |p: &Path, f: Option<ImageFormat>| {
        Image::open(
            p,
            &OpenOptions { read_only: true, format: f, backing: BackingPolicy::Ignore, ..Default::default() },
        )
    };
    let top = alone(Path::new(path), format).ok()?;
    let mut prefix = format!("Could not open '{path}': ");
    let mut layer_path = PathBuf::from(path);
    let mut layer = top;
    // A chain that loops or is too deep is the engine's own error to report.
    for _ in 0..oxqcow::backing::MAX_CHAIN_DEPTH {
        let info = layer.as_qcow2()?.info();
        let name = info.backing_file?;
        prefix.push_str("Could not open backing file: ");
        if name.starts_with("json:") {
            return Some(format!("{prefix}json: pseudo-filenames are not supported as backing files"));
        }
        let next = resolve_backing_path(&layer_path, &name);
        let next_format = match info.backing_format.as_deref().map(ImageFormat::from_name) {
            None => None,
            Some(Ok(f)) => Some(f),
            Some(Err(_)) => {
                let f = info.backing_format.unwrap_or_default();
                return Some(format!("{prefix}Unknown driver '{f}'"));
            }
        };
        layer = match alone(&next, next_format) {
            Ok(l) => l,
            Err(e) => {
                let shown = next.display();
                return Some(match &e {
                    oxqcow::Error::Io { op: "opening the image", .. } => {
                        format!("{prefix}Could not open '{shown}': {}", describe(&e))
                    }
                    _ => format!("{prefix}{}", describe(&e)),
                });
            }
        };
        layer_path = next;
    }
    None
}

/// The file names of the layers of an open image's backing chain, top
/// first, as QEMU names them: each backing file name is taken relative to
/// the directory of the image that names it (`chain/top.qcow2` backed by
/// `base.qcow2` gives `chain/base.qcow2`).
pub fn chain_filenames(image: &Image, filename: &str) -> Vec<String> {
    let mut names = vec![filename.to_string()];
    let mut layer = image;
    while let Some(q) = layer.as_qcow2() {
        let (Some(name), Some(backing)) = (q.info().backing_file, q.backing()) else { break };
        let last = names.last().expect("never empty");
        names.push(resolve_backing_path(Path::new(last), &name).to_string_lossy().into_owned());
        layer = backing;
    }
    names
}

/// qemu-img's `cvtnum_full`: a size with an optional suffix, between `min`
/// and `max`, with qemu-img's messages naming the value as `name`.
pub fn cvtnum(name: &str, value: &str, min: u64, max: u64) -> Result<u64, String> {
    let range = || format!("Invalid {name} specified. Must be between {min} and {max}.");
    if value.trim_start().starts_with('-') {
        return Err(range());
    }
    let n = oxqcow::options::parse_size(value).map_err(|_| format!("Invalid {name} specified: '{value}'."))?;
    if n < min || n > max {
        return Err(range());
    }
    Ok(n)
}

/// Whether `mode` is one of QEMU's cache modes (`-t`/`-T`).
pub fn is_cache_mode(mode: &str) -> bool {
    matches!(mode, "none" | "off" | "writeback" | "writethrough" | "directsync" | "unsafe")
}

/// Applies a `-t`/`-T` cache mode (already checked by [`is_cache_mode`])
/// to an open image; the error is QEMU's for a file that cannot be opened
/// that way (direct I/O on a file system without it).
pub fn apply_cache_mode(image: &Image, mode: &str, name: &str) -> Result<(), String> {
    let mode = oxqcow::CacheMode::from_name(mode).map_err(|e| describe(&e))?;
    image.set_cache_mode(mode).map_err(|e| format!("Could not open '{name}': {}", strerror(&e)))
}

/// qemu's `strerror`-like text for an engine error.
pub fn strerror(e: &oxqcow::Error) -> String {
    match e {
        oxqcow::Error::Io { source, .. } => os_error(source),
        other => describe(other),
    }
}

/// The C library's text for a host error ("No such file or directory"),
/// without Rust's " (os error N)" suffix.
pub fn os_error(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(cut) => text[..cut].to_string(),
        None => text,
    }
}

/// Splits an `--image-opts` specification (`driver=qcow2,file.filename=x,
/// l2-cache-size=1M`) into the file name, the format and open options.
pub fn parse_image_opts(spec: &str) -> Result<(String, Option<String>, OpenOptions), String> {
    parse_image_opts_for(spec, true)
}

/// [`parse_image_opts`] for opens that read no guest data (qemu-img info's
/// `BDRV_O_NO_IO`): secrets are not looked up, so an unknown or missing
/// one is no error.
pub fn parse_image_opts_no_io(spec: &str) -> Result<(String, Option<String>, OpenOptions), String> {
    parse_image_opts_for(spec, false)
}

fn parse_image_opts_for(spec: &str, io: bool) -> Result<(String, Option<String>, OpenOptions), String> {
    let fail = |msg: String| format!("Could not open '{spec}': {msg}");
    let mut path = None;
    let mut format = None;
    let mut opts = OpenOptions::new();
    if !spec.contains('=') {
        return Err(fail(format!("Cannot find device='{spec}' nor node-name='{spec}'")));
    }
    for (key, value) in crate::imgopts::split_options(spec) {
        match key.as_str() {
            "file.filename" | "filename" => path = Some(value),
            "driver" => format = Some(value),
            "file.driver" if value == "file" => {}
            "file.driver" => return Err(fail(format!("Unknown protocol '{value}'"))),
            k if !io && k.ends_with("encrypt.key-secret") => {}
            _ if crate::secrets::apply_open_option(&mut opts, &key, &value).map_err(fail)? => {}
            _ => opts.apply_qemu_option(&key, &value).map_err(|e| fail(describe(&e)))?,
        }
    }
    let Some(path) = path else {
        return Err(fail("A block device must be specified for \"file\"".to_string()));
    };
    Ok((path, format, opts))
}

/// An image a long-running export serves (`serve`, `mount`), opened.
pub struct ExportImage {
    /// The image.
    pub image: Image,
    /// The host file it was opened from (`file.filename` with `--image-opts`).
    pub path: String,
}

/// Opens the image an export serves: FILE in the format `-f` names (probed
/// otherwise), or with `--image-opts` the image the option string describes.
/// The command line's open options go on top of the option string's: either
/// may ask for read-only, discard passthrough or force-share; the cache mode
/// and the snapshot come from the command line. Warns as QEMU does when a
/// probed raw image is opened for writing. The error is the bare message;
/// each command prefixes it its own way.
pub fn open_export_image(
    file: &str,
    image_opts: bool,
    format: Option<&str>,
    cli: &OpenOptions,
) -> Result<ExportImage, String> {
    let (path, format, mut open) = if image_opts {
        parse_image_opts(file)?
    } else {
        (file.to_string(), format.map(str::to_string), OpenOptions::new())
    };
    open.read_only = open.read_only || cli.read_only;
    open.cache = cli.cache;
    open.discard_passthrough = open.discard_passthrough || cli.discard_passthrough;
    open.force_share = open.force_share || cli.force_share;
    open.snapshot = cli.snapshot.clone();
    // Open errors name the option string with --image-opts, as QEMU's do.
    let image = open_image_as(&path, file, format.as_deref(), open.clone())?;
    if format.is_none() && image.format() == ImageFormat::Raw && !open.read_only {
        warn_probed_raw(&path);
    }
    Ok(ExportImage { image, path })
}

/// Forks a server into the background (`serve --fork`, `mount
/// --daemonize`), before any thread exists so that the child inherits no
/// lock held by a thread it does not have. In the child: a new session,
/// and `Ok` with the socket on which to tell the parent that it serves. In
/// the parent, and on failure (reported as `FAILURE: reason`): `Err` with
/// the exit code this process ends with.
pub fn fork_daemon(ctx: &Ctx, failure: &str) -> Result<std::os::unix::net::UnixStream, i32> {
    use oxqcow_nbd::sys::{self, Forked};
    let (parent_end, child_end) =
        std::os::unix::net::UnixStream::pair().map_err(|e| ctx.fail(&format!("{failure}: {e}")))?;
    match sys::fork() {
        Err(e) => Err(ctx.fail(&format!("{failure}: {e}"))),
        Ok(Forked::Parent(child)) => {
            drop(child_end);
            Err(wait_for_daemon(parent_end, child))
        }
        Ok(Forked::Child) => {
            drop(parent_end);
            sys::setsid();
            Ok(child_end)
        }
    }
}

/// The parent of a forked server (`serve --fork`, `mount --daemonize`):
/// exits 0 once the child says it serves (one byte on `from_child`), else
/// with the child's exit status (the child printed its error on the
/// shared stderr).
fn wait_for_daemon(mut from_child: std::os::unix::net::UnixStream, child: oxqcow_nbd::sys::ChildProcess) -> i32 {
    let mut byte = [0u8; 1];
    if matches!(std::io::Read::read(&mut from_child, &mut byte), Ok(1)) {
        return 0;
    }
    match child.wait() {
        Ok(0) | Err(_) => 1,
        Ok(code) => code,
    }
}

/// Opens an image operand: a file name (with `format`), or with
/// `image_opts` an option string naming the file, its format, secrets and
/// runtime options. `read_only` and `force_share` (`-U`) apply either way.
/// Returns the image and the file name.
pub fn open_operand(
    operand: &str,
    image_opts: bool,
    format: Option<&str>,
    read_only: bool,
    force_share: bool,
) -> Result<(Image, String), String> {
    if !image_opts {
        let mut opts = OpenOptions::new().read_only(read_only);
        opts.force_share = force_share;
        let image = open_image(operand, format, opts)?;
        return Ok((image, operand.to_string()));
    }
    if format.is_some() {
        return Err("--image-opts and --format are mutually exclusive".into());
    }
    let (path, fmt, mut opts) = parse_image_opts(operand)?;
    opts.force_share |= force_share;
    let image = open_image_as(&path, operand, fmt.as_deref(), opts.read_only(read_only))?;
    Ok((image, path))
}

/// Opens an image operand read-write (`amend`, `resize`): a file name in
/// `format` (probed when `None`), or with `image_opts` an option string.
/// Warns as QEMU does when a probed raw image is opened for writing.
pub fn open_operand_for_writing(operand: &str, image_opts: bool, format: Option<String>) -> Result<Image, String> {
    if image_opts && format.is_some() {
        return Err("--image-opts and --format are mutually exclusive".into());
    }
    let (path, format, opts) =
        if image_opts { parse_image_opts(operand)? } else { (operand.to_string(), format, OpenOptions::new()) };
    let image = open_image_as(&path, operand, format.as_deref(), opts.read_only(false))?;
    if format.is_none() && image.format() == ImageFormat::Raw {
        warn_probed_raw(&path);
    }
    Ok(image)
}

/// The header of a snapshot table, as qemu-img prints it.
pub fn snapshot_header() -> String {
    format!("{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}", "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT")
}

/// One snapshot line from a qemu `SnapshotInfo` JSON object (`id`, `name`,
/// `vm-state-size`, `date-sec`, `vm-clock-sec`, `vm-clock-nsec`, `icount`).
/// Dates are shown in the local time zone, as qemu-img shows them.
pub fn snapshot_line(sn: &serde_json::Value) -> String {
    let s = |k: &str| sn.get(k).and_then(serde_json::Value::as_str).unwrap_or_default().to_string();
    let n = |k: &str| sn.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    let icount = sn.get("icount").and_then(serde_json::Value::as_u64);
    snapshot_row(
        &s("id"),
        &s("name"),
        n("vm-state-size"),
        n("date-sec"),
        n("vm-clock-sec") * 1_000_000_000 + n("vm-clock-nsec"),
        icount,
    )
}

/// One line of qemu's `bdrv_snapshot_dump`: `%-7s %-16s %8s %19s %15s %10s`
/// (C pads by bytes, not characters), the instruction count left blank
/// when not recorded.
pub fn snapshot_row(
    id: &str,
    name: &str,
    vm_state_size: u64,
    date_sec: u64,
    vm_clock_nsec: u64,
    icount: Option<u64>,
) -> String {
    let secs = vm_clock_nsec / 1_000_000_000;
    let clock = format!(
        "{:04}:{:02}:{:02}.{:03}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        (vm_clock_nsec / 1_000_000) % 1000
    );
    let icount = icount.filter(|&i| i != u64::MAX).map(|i| i.to_string()).unwrap_or_default();
    format!(
        "{} {} {} {} {} {}",
        pad_bytes(id, 7, true),
        pad_bytes(name, 16, true),
        pad_bytes(&size_to_str(vm_state_size), 8, false),
        pad_bytes(&local_date(date_sec), 19, false),
        pad_bytes(&clock, 15, false),
        pad_bytes(&icount, 10, false)
    )
}

/// printf's `%-Ns` / `%Ns`: padding counts bytes.
fn pad_bytes(s: &str, width: usize, left: bool) -> String {
    let pad = " ".repeat(width.saturating_sub(s.len()));
    if left {
        format!("{s}{pad}")
    } else {
        format!("{pad}{s}")
    }
}

/// Defines an `--object` (see [`crate::secrets::define`]).
pub fn check_object(spec: &str) -> Result<(), String> {
    crate::secrets::define(spec)
}

/// `YYYY-MM-DD HH:MM:SS` for seconds since the epoch in the local time
/// zone (`TZ`, else /etc/localtime), as QEMU prints snapshot dates with
/// `localtime_r` (a date out of the calendar's range prints as its number
/// of seconds).
fn local_date(secs: u64) -> String {
    date_in(secs, &jiff::tz::TimeZone::system())
}

fn date_in(secs: u64, tz: &jiff::tz::TimeZone) -> String {
    match i64::try_from(secs).ok().and_then(|s| jiff::Timestamp::from_second(s).ok()) {
        Some(t) => t.to_zoned(tz.clone()).strftime("%Y-%m-%d %H:%M:%S").to_string(),
        None => secs.to_string(),
    }
}

/// The message for an engine error, with host I/O errors described the way
/// QEMU describes errno values.
pub fn describe(e: &oxqcow::Error) -> String {
    match e {
        // Worded completely by the engine, as QEMU words it.
        oxqcow::Error::Io { op: oxqcow::data_file::OPENING, source, .. } => source.to_string(),
        oxqcow::Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            "No such file or directory".to_string()
        }
        oxqcow::Error::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied => {
            "Permission denied".to_string()
        }
        other => other.to_string(),
    }
}

impl Ctx {
    /// Reports a usage error as qemu-img's `error_exit` does: the message,
    /// then a pointer to the command's help. Returns exit code 1.
    pub fn usage_error(&self, command: &str, msg: &str) -> i32 {
        self.error(msg);
        self.try_help(command)
    }

    /// Prints "Try 'PROG COMMAND --help' for more info" and returns 1.
    pub fn try_help(&self, command: &str) -> i32 {
        eprintln!("Try '{} {command} --help' for more info", self.argv0);
        1
    }

    /// Parses a command's arguments; on error prints glibc's message and
    /// the help pointer, returning the exit code.
    pub fn getopt(
        &self,
        command: &str,
        args: &[String],
        spec: &[crate::getopt::Opt],
    ) -> Result<crate::getopt::Parsed, i32> {
        crate::getopt::parse(&format!("{} {command}", self.argv0), args, spec).map_err(|msg| {
            eprintln!("{msg}");
            self.try_help(command)
        })
    }
}

/// `--output` formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    /// Text for people.
    Human,
    /// qemu-img's JSON.
    Json,
}

impl OutputFormat {
    /// Parses an `--output` value, with qemu-img's message on failure.
    pub fn parse(value: &str) -> Result<OutputFormat, String> {
        match value {
            "human" => Ok(OutputFormat::Human),
            "json" => Ok(OutputFormat::Json),
            other => Err(format!("--output expects 'human' or 'json' not '{other}'")),
        }
    }
}

/// Prints a JSON value the way qemu-img does, followed by a newline.
pub fn print_json(v: &serde_json::Value) {
    println!("{}", crate::qjson::to_string(v));
}

/// A size as QEMU's `size_to_str` writes it: three significant digits and a
/// binary unit, switching to the next unit from 1000 of the current one
/// ("0 B", "196 KiB", "1.5 MiB", "1 GiB").
pub fn size_to_str(bytes: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let scaled = bytes as f64 / (1000.0 / 1024.0);
    // frexp's exponent: scaled = m * 2^e with m in [0.5, 1).
    let e = if scaled == 0.0 { 0 } else { ((scaled.to_bits() >> 52) & 0x7ff) as i64 - 1022 };
    // C division truncates towards zero.
    let i = ((e - 1) / 10).clamp(0, SUFFIXES.len() as i64 - 1) as usize;
    let value = bytes as f64 / (1u64 << (i * 10)) as f64;
    format!("{} {}B", format_g3(value), SUFFIXES[i])
}

/// printf's `%.3g`.
fn format_g3(v: f64) -> String {
    const PRECISION: i32 = 3;
    if v == 0.0 {
        return "0".to_string();
    }
    let sci = format!("{:.*e}", (PRECISION - 1) as usize, v);
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let trim = |s: String| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    if !(-4..PRECISION).contains(&exp) {
        let m = trim(mantissa.to_string());
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{m}e{sign}{:02}", exp.abs())
    } else {
        trim(format!("{:.*}", (PRECISION - 1 - exp) as usize, v))
    }
}

/// Why a size did not parse (QEMU's `qemu_strtosz` results).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeError {
    /// Not a size.
    Invalid,
    /// A size, but not below 2^64 (or negative).
    Range,
}

/// Parses a size as QEMU's `qemu_strtosz`: decimal with an optional
/// fraction and a binary suffix (b, k/K, M, G, T, P, E; a fraction needs a
/// suffix other than b), or `0x` hex without fraction or suffix; leading
/// whitespace and `+` are allowed, nothing may follow.
pub fn qemu_strtosz(s: &str) -> Result<u64, SizeError> {
    let t = s.trim_start_matches(|c: char| c.is_ascii_whitespace());
    if let Some(negative) = t.strip_prefix('-') {
        // A negative number is out of range; a lone minus sign is junk.
        let number = negative.starts_with(|c: char| c.is_ascii_digit())
            || negative.strip_prefix('.').is_some_and(|f| f.starts_with(|c: char| c.is_ascii_digit()));
        return Err(if number { SizeError::Range } else { SizeError::Invalid });
    }
    let t = t.strip_prefix('+').unwrap_or(t);
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (int_part, rest) = t.split_at(digits);
    if int_part == "0" && (rest.starts_with('x') || rest.starts_with('X')) {
        let hex = &rest[1..];
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(SizeError::Invalid);
        }
        return u64::from_str_radix(hex, 16).map_err(|_| SizeError::Range);
    }
    let int: u64 = if int_part.is_empty() { 0 } else { int_part.parse().map_err(|_| SizeError::Range)? };
    let (frac_digits, rest) = match rest.strip_prefix('.') {
        Some(after) => {
            let n = after.bytes().take_while(u8::is_ascii_digit).count();
            (Some(&after[..n]), &after[n..])
        }
        None => (None, rest),
    };
    if int_part.is_empty() && frac_digits.is_none_or(str::is_empty) {
        return Err(SizeError::Invalid);
    }
    let shift = match rest {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return Err(SizeError::Invalid),
    };
    // The fraction as a 64-bit binary fixed-point number, as QEMU keeps it.
    let frac: u64 = match frac_digits {
        Some(d) if !d.is_empty() => {
            let f: f64 = format!("0.{d}").parse().map_err(|_| SizeError::Invalid)?;
            if f >= 1.0 {
                u64::MAX
            } else {
                let v = (f * 18_446_744_073_709_551_616.0) as u64;
                if v == 0 && f > 0.0 {
                    1
                } else {
                    v
                }
            }
        }
        _ => 0,
    };
    if shift == 0 {
        if frac != 0 {
            return Err(SizeError::Invalid);
        }
        return Ok(int);
    }
    // 64.64 fixed point times 2^shift, rounding 0.5 up.
    let whole = u128::from(int) << shift;
    let frac_scaled = u128::from(frac) << shift;
    let value = whole + (frac_scaled >> 64) + ((frac_scaled >> 63) & 1);
    u64::try_from(value).map_err(|_| SizeError::Range)
}

/// An integer as C's `strtoul(s, &end, 0)` reads it with nothing allowed
/// after it: decimal, `0x` hexadecimal or `0` octal, optionally signed.
/// Negative values (other than zero) and overflow are out of range.
pub fn strtoul0(s: &str) -> Result<u64, SizeError> {
    let t = s.trim_start_matches(|c: char| c.is_ascii_whitespace());
    let (negative, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let hex = (t.starts_with("0x") || t.starts_with("0X")) && t[2..].starts_with(|c: char| c.is_ascii_hexdigit());
    let (radix, digits) = if hex {
        (16, &t[2..])
    } else if t.starts_with('0') {
        (8, t)
    } else {
        (10, t)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(SizeError::Invalid);
    }
    let v = u64::from_str_radix(digits, radix).map_err(|_| SizeError::Range)?;
    if negative && v != 0 {
        return Err(SizeError::Range);
    }
    Ok(v)
}

/// Parses a size operand as qemu-img's `cvtnum` does, with its messages
/// ("Invalid image size specified: 'x'." / "... Must be between ...").
pub fn parse_size_operand(what: &str, s: &str) -> Result<u64, String> {
    match qemu_strtosz(s) {
        Ok(v) if v <= i64::MAX as u64 => Ok(v),
        Err(SizeError::Invalid) => Err(format!("Invalid {what} specified: '{s}'.")),
        _ => Err(format!("Invalid {what} specified. Must be between 0 and {}.", i64::MAX)),
    }
}

/// Parses a size-typed QemuOpts value (`-o cluster_size=...`), with QEMU's
/// messages.
pub fn parse_size_option(name: &str, value: &str) -> Result<u64, String> {
    match qemu_strtosz(value) {
        Ok(v) => Ok(v),
        Err(SizeError::Range) => Err(format!("Value '{value}' is out of range for parameter '{name}'")),
        Err(SizeError::Invalid) => Err(format!(
            "Parameter '{name}' expects a non-negative number below 2^64\n\
             Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
             and exabytes, respectively."
        )),
    }
}

/// The warning QEMU prints when a probed raw image is opened for writing.
pub fn warn_probed_raw(path: &str) {
    eprintln!(
        "WARNING: Image format was not specified for '{path}' and probing guessed raw.\n         \
         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         \
         Specify the 'raw' format explicitly to remove the restrictions."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_in_a_time_zone() {
        let utc = jiff::tz::TimeZone::UTC;
        assert_eq!(date_in(0, &utc), "1970-01-01 00:00:00");
        assert_eq!(date_in(1_795_539_009, &utc), "2026-11-24 16:50:09");
        assert_eq!(date_in(951_782_400, &utc), "2000-02-29 00:00:00");
        let paris = jiff::tz::TimeZone::posix("CET-1CEST,M3.5.0,M10.5.0/3").unwrap();
        assert_eq!(date_in(1_795_539_009, &paris), "2026-11-24 17:50:09");
    }

    #[test]
    fn sizes_as_qemu_prints_them() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(200_704), "196 KiB");
        assert_eq!(size_to_str(197_120), "192 KiB");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(3 << 19), "1.5 MiB");
        assert_eq!(size_to_str(1_331_200), "1.27 MiB");
        assert_eq!(size_to_str(999), "999 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(1023 * 1024), "0.999 MiB");
    }

    #[test]
    fn strtosz_like_qemu() {
        let ok = |s: &str| qemu_strtosz(s).unwrap();
        assert_eq!(ok("0X10"), 16);
        assert_eq!(ok("1.k"), 1024);
        assert_eq!(ok(".5k"), 512);
        assert_eq!(ok("1.5K"), 1536);
        assert_eq!(ok(" 1k"), 1024);
        assert_eq!(ok("+1"), 1);
        assert_eq!(ok("010"), 10);
        assert_eq!(ok("1b"), 1);
        assert_eq!(ok("1.0000000001k"), 1024);
        assert_eq!(ok("7.99E"), 9_211_842_821_808_707_328);
        for bad in ["0x1k", "0x", "1.5", "1.5b", "1k5", "1k ", "0.1", "1e3", "1kb", "1G.", "", "k", "."] {
            assert_eq!(qemu_strtosz(bad), Err(SizeError::Invalid), "{bad}");
        }
        assert_eq!(qemu_strtosz("-1"), Err(SizeError::Range));
        assert_eq!(qemu_strtosz("-.5k"), Err(SizeError::Range));
        assert_eq!(qemu_strtosz("-x"), Err(SizeError::Invalid));
        assert_eq!(qemu_strtosz("-"), Err(SizeError::Invalid));
        assert_eq!(ok("0.1k"), 102);
        assert_eq!(ok("1e"), 1 << 60);
        assert_eq!(qemu_strtosz("16E"), Err(SizeError::Range));
        assert_eq!(qemu_strtosz("99999999999999999999"), Err(SizeError::Range));
        assert_eq!(
            parse_size_operand("image size", "8E").unwrap_err(),
            "Invalid image size specified. Must be between 0 and 9223372036854775807."
        );
    }

    #[test]
    fn strtoul_like_c() {
        assert_eq!(strtoul0("10"), Ok(10));
        assert_eq!(strtoul0("010"), Ok(8));
        assert_eq!(strtoul0("0x10"), Ok(16));
        assert_eq!(strtoul0(" +7"), Ok(7));
        assert_eq!(strtoul0("-0"), Ok(0));
        assert_eq!(strtoul0("-1"), Err(SizeError::Range));
        assert_eq!(strtoul0("99999999999999999999"), Err(SizeError::Range));
        for bad in ["1k", "08", "0x", "", "1.0", "x", "-"] {
            assert_eq!(strtoul0(bad), Err(SizeError::Invalid), "{bad}");
        }
    }
}
