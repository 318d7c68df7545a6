//! `mount`: the guest disk of an image as one regular file, through the
//! kernel's FUSE (what qemu-storage-daemon's `--export type=fuse` does).
//!
//! This module parses the command line, opens the image (with `export/daemon.rs`,
//! as `serve` does), mounts the file system of `mount/filesystem.rs`, serves it from
//! several threads until the file is unmounted, then flushes and closes the
//! image. Order of work: parse, check the mount point, fork
//! (`--daemonize`, before any thread exists), block the termination
//! signals (before any thread exists too, so that only the waiting thread
//! receives them), open the image, mount, write the pid file, tell the
//! parent we are up, serve, close.
//!
//! A termination signal unmounts the file (lazily, as `umount -l` would):
//! the process ends once nothing holds it open any more, so a loop device
//! still attached to it keeps it served rather than losing its writes.

mod busy_poll;
mod filesystem;

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use fuser::{Config as FuseConfig, MountOption, Session, SessionACL};
use oxqcow::{CacheMode, Image, OpenOptions};
use oxqcow_nbd::sys::{self, TerminationSignals};

use crate::app::ctx::Ctx;
use crate::app::getopt::{HasArg, Opt};
use crate::app::messages::os_error;
use crate::app::CommonOpts;
use crate::export::daemon::{fork_daemon, open_export_image};
use busy_poll::BusyPoll;
use filesystem::{DiskFs, ExportConfig, Layout};

const SPEC: &[Opt] = &[
    Opt::both('h', "help", HasArg::No),
    Opt::long("object", HasArg::Required),
    Opt::long("image-opts", HasArg::No),
    Opt::both('f', "format", HasArg::Required),
    Opt::both('r', "read-only", HasArg::No),
    Opt::both('U', "force-share", HasArg::No),
    Opt::both('n', "nocache", HasArg::No),
    Opt::long("cache", HasArg::Required),
    Opt::long("discard", HasArg::Required),
    Opt::long("growable", HasArg::No),
    Opt::long("allow-other", HasArg::Required),
    Opt::long("threads", HasArg::Required),
    Opt::long("busy-poll", HasArg::Required),
    Opt::long("daemonize", HasArg::No),
    Opt::long("pidfile", HasArg::Required),
];

const HELP: &str = "\
Usage: PROG mount [OPTIONS] IMAGE MOUNTPOINT
Export the guest disk of IMAGE as one regular file through FUSE, with the
semantics of qemu-storage-daemon's FUSE export (--export type=fuse).

MOUNTPOINT is either an existing regular file, which the disk is mounted
over (as QEMU does), or an existing directory, which then shows one file
named after IMAGE. The command runs in the foreground (unless --daemonize)
until the file is unmounted (fusermount3 -u MOUNTPOINT, umount MOUNTPOINT) or it receives
SIGTERM, SIGINT or SIGHUP, which unmount it lazily: it exits once nothing
holds the file open. Either way it flushes and closes the image before it
exits (status 0 when that succeeded).

The file supports read, write, fsync (an image flush; every close flushes
too), fallocate (PUNCH_HOLE|KEEP_SIZE zeroes without writing data and fails
with EOPNOTSUPP where that is impossible, ZERO_RANGE writes zeroes, plain
allocation only grows the disk at its end), lseek SEEK_DATA/SEEK_HOLE from
the image's allocation, truncate (resizes the image) and chmod. Its size is
the disk size; writes stop at the end of the disk unless --growable. As
with QEMU, opening the file with O_TRUNC (dd without conv=notrunc) resizes
the disk to 0 bytes. A write-only open bypasses the kernel's page cache
while no open reads through it; opens that read while such a writer is
open bypass it too (shared mmap of them fails with ENODEV).

  -h, --help                display this help and exit
  --object type,id=ID,...   define a 'secret' object (for encrypt.key-secret=ID
                            in --image-opts)
  --image-opts              treat IMAGE as a full set of image options
  -f, --format=FORMAT       image format (raw, qcow2); probed if not given
  -r, --read-only           export read-only (writes fail with EACCES)
  -U, --force-share         open the image in shared mode (with -r)
  -n, --nocache             same as --cache=none
      --cache=MODE          'none', 'writeback' (default), 'writethrough',
                            'directsync' or 'unsafe'
      --discard=MODE        ignore (default) or unmap: whether punched holes
                            give host space back
      --growable            writes past the end grow the disk
      --allow-other=MODE    on, off or auto (default: on if the mount allows it)
      --threads=N           threads serving requests (default 1, as QEMU)
      --busy-poll=MODE      on, off or auto (default: on with 2 or more CPUs):
                            while requests keep coming, a serving thread
                            polls for the next instead of sleeping (a busy
                            CPU, and round trips two to three times faster)
      --daemonize           run in the background; exit once the file is mounted
                            (0), or with the error that prevented it
      --pidfile=PATH        write the serving process's ID to PATH once mounted
                            (removed at exit)
";

/// Threads serving FUSE requests unless `--threads` says otherwise. One, as
/// QEMU's export serves them: the kernel hands each request to the reader
/// that has waited longest, so with several threads a stream of requests
/// one at a time (a program's read/write calls) hops to another thread,
/// often on another CPU, for every request, and each round trip pays a
/// wakeup of a sleeping thread; one thread serves the stream alone (and,
/// busy polling, without sleeping between its requests). More threads
/// only help requests that really run at once.
const DEFAULT_THREADS: usize = 1;
/// More is never useful: the kernel has that many requests in flight at most.
const MAX_THREADS: usize = 64;

/// Whether `--busy-poll=auto` polls: only where a CPU is left for the
/// program using the file, which a polling thread would otherwise compete
/// with for its only CPU.
fn busy_poll_by_default() -> bool {
    std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AllowOther {
    On,
    Off,
    Auto,
}

struct Config {
    file: String,
    format: Option<String>,
    image_opts: bool,
    open: OpenOptions,
    mountpoint: String,
    growable: bool,
    allow_other: AllowOther,
    threads: usize,
    busy_poll: bool,
    daemonize: bool,
    pidfile: Option<String>,
}

/// Runs `mount`.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    let cfg = match parse(ctx, args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let meta = match std::fs::metadata(&cfg.mountpoint) {
        Ok(m) => m,
        Err(e) => return ctx.fail(&format!("Failed to stat '{}': {}", cfg.mountpoint, os_error(&e))),
    };
    if !meta.is_file() && !meta.is_dir() {
        return ctx.fail(&format!("'{}' is not a regular file", cfg.mountpoint));
    }
    // The parent waits on this socket for the child's word that it serves.
    let mut ready: Option<UnixStream> = None;
    if cfg.daemonize {
        match fork_daemon(ctx, "Failed to daemonize") {
            Ok(to_parent) => ready = Some(to_parent),
            Err(code) => return code,
        }
    }
    let signals = match TerminationSignals::block() {
        Ok(s) => s,
        Err(e) => return ctx.fail(&format!("Failed to block signals: {e}")),
    };
    let opened = match open_export_image(&cfg.file, cfg.image_opts, cfg.format.as_deref(), &cfg.open) {
        Ok(o) => o,
        Err(msg) => return ctx.fail(&msg),
    };
    let layout = if meta.is_dir() {
        match Path::new(&opened.path).file_name() {
            Some(name) => Layout::Dir(name.to_os_string()),
            None => return ctx.fail(&format!("'{}' names no file to show in '{}'", opened.path, cfg.mountpoint)),
        }
    } else {
        Layout::File
    };
    let image = Arc::new(opened.image);
    let export = ExportConfig {
        layout,
        writable: !oxqcow::BlockDevice::is_read_only(&*image),
        growable: cfg.growable,
        may_unmap: cfg.open.discard_passthrough,
        allow_other: false,
        host_path: opened.path.clone().into(),
    };
    let poll = Arc::new(BusyPoll::default());
    let session = match mount(&cfg, &image, export, &poll) {
        Ok(s) => s,
        Err(e) => {
            let _ = close(image);
            return ctx.fail(&format!("Failed to mount FUSE session to export: {}", os_error(&e)));
        }
    };
    if cfg.busy_poll {
        // Without a duplicate the mount is served as well, only sleeping
        // between requests.
        if let Ok(device) = session.as_fd().try_clone_to_owned() {
            poll.attach(device);
        }
    }
    if let Some(p) = &cfg.pidfile {
        if let Err(e) = std::fs::write(p, format!("{}\n", std::process::id())) {
            drop(session);
            let _ = close(image);
            return ctx.fail(&format!("Failed to write pid file '{p}': {}", os_error(&e)));
        }
    }
    if let Some(r) = ready.as_mut() {
        // Mounted: release the parent, and leave its terminal.
        let _ = r.write_all(b"R");
        let _ = sys::stdio_to_null(&[0, 1, 2]);
    }
    let code = serve(ctx, session, image, signals, poll);
    if let Some(p) = &cfg.pidfile {
        let _ = std::fs::remove_file(p);
    }
    code
}

/// Mounts, trying `allow_other` first under `auto` (it needs root or
/// `user_allow_other` in /etc/fuse.conf), as QEMU does.
fn mount(
    cfg: &Config,
    image: &Arc<Image>,
    export: ExportConfig,
    poll: &Arc<BusyPoll>,
) -> std::io::Result<Session<DiskFs>> {
    let attempt = |allow_other: bool| {
        let mut fuse = FuseConfig::default();
        // QEMU's export mounts with default_permissions: the kernel checks
        // the file's mode, and chmod means something.
        fuse.mount_options = vec![MountOption::FSName("oxqcow".into()), MountOption::DefaultPermissions];
        // No writeback cache (QEMU sets none either): the kernel would take
        // writes past the end of a disk that cannot grow, and acknowledge
        // writes before the image has them whatever its cache mode.
        fuse.acl = if allow_other { SessionACL::All } else { SessionACL::Owner };
        fuse.n_threads = Some(cfg.threads);
        // One kernel channel per thread: requests are read in parallel.
        fuse.clone_fd = cfg.threads > 1;
        let fs = DiskFs::new(Arc::clone(image), ExportConfig { allow_other, ..export.clone() }, Arc::clone(poll));
        Session::new(fs, &cfg.mountpoint, &fuse)
    };
    match cfg.allow_other {
        AllowOther::On => attempt(true),
        AllowOther::Off => attempt(false),
        AllowOther::Auto => attempt(true).or_else(|_| attempt(false)),
    }
}

fn serve(
    ctx: &Ctx,
    mut session: Session<DiskFs>,
    image: Arc<Image>,
    signals: TerminationSignals,
    poll: Arc<BusyPoll>,
) -> i32 {
    let mut unmounter = session.unmount_callable();
    let waiter = std::thread::Builder::new().name("signals".into()).spawn(move || {
        if signals.wait().is_ok() {
            let _ = unmounter.unmount();
        }
    });
    if waiter.is_err() {
        let _ = session.unmount();
        let _ = close(image);
        return ctx.fail("Failed to start the signal thread");
    }
    let watcher = std::thread::Builder::new().name("busy-poll".into()).spawn({
        let poll = Arc::clone(&poll);
        move || poll.watch()
    });
    if watcher.is_err() {
        // Nobody would ever stop the polling: serve sleeping instead.
        poll.stop();
    }
    let served = session.run();
    poll.stop();
    if let Ok(w) = watcher {
        let _ = w.join();
    }
    let closed = close(image);
    if let Err(e) = served {
        return ctx.fail(&format!("FUSE session failed: {}", os_error(&e)));
    }
    match closed {
        Ok(()) => 0,
        Err(e) => ctx.fail(&format!("Failed to flush the image: {e}")),
    }
}

/// Flushes and closes the image once the file system let go of it.
fn close(image: Arc<Image>) -> oxqcow::Result<()> {
    match Arc::try_unwrap(image) {
        Ok(img) => img.close(),
        // Some request thread still holds it (it cannot, once the session
        // ended); flush what it wrote at least.
        Err(shared) => oxqcow::BlockDevice::flush(&*shared),
    }
}

fn parse(ctx: &Ctx, args: &[String]) -> Result<Config, i32> {
    let p = ctx.getopt("mount", args, SPEC)?;
    let mut cfg = Config {
        file: String::new(),
        format: None,
        image_opts: false,
        open: OpenOptions::new(),
        mountpoint: String::new(),
        growable: false,
        allow_other: AllowOther::Auto,
        threads: DEFAULT_THREADS,
        busy_poll: busy_poll_by_default(),
        daemonize: false,
        pidfile: None,
    };
    let fail = |msg: String| Err(ctx.fail(&msg));
    let mut common = CommonOpts::default();
    for (key, value) in p.opts {
        let v = value.unwrap_or_default();
        match key.as_str() {
            "h" => {
                print!("{}", HELP.replace("PROG", &ctx.prog));
                return Err(0);
            }
            "r" => cfg.open.read_only = true,
            "n" => cfg.open.cache = CacheMode::None,
            "cache" => match CacheMode::from_name(&v) {
                Ok(m) => cfg.open.cache = m,
                Err(_) => return fail(format!("Invalid cache mode '{v}'")),
            },
            "discard" => match v.as_str() {
                "ignore" | "off" => cfg.open.discard_passthrough = false,
                "unmap" | "on" => cfg.open.discard_passthrough = true,
                _ => return fail(format!("Invalid discard mode '{v}'")),
            },
            "growable" => cfg.growable = true,
            "allow-other" => {
                cfg.allow_other = match v.as_str() {
                    "on" => AllowOther::On,
                    "off" => AllowOther::Off,
                    "auto" => AllowOther::Auto,
                    _ => return fail(format!("Parameter 'allow-other' does not accept value '{v}'")),
                }
            }
            "busy-poll" => {
                cfg.busy_poll = match v.as_str() {
                    "on" => true,
                    "off" => false,
                    "auto" => busy_poll_by_default(),
                    _ => return fail(format!("Parameter 'busy-poll' does not accept value '{v}'")),
                }
            }
            "daemonize" => cfg.daemonize = true,
            "pidfile" => cfg.pidfile = Some(v),
            "threads" => match v.trim().parse::<usize>() {
                Ok(n) if (1..=MAX_THREADS).contains(&n) => cfg.threads = n,
                _ => return fail(format!("Invalid number of threads '{v}' (1 to {MAX_THREADS})")),
            },
            _ => {
                if let Err(msg) = common.consume(&key, &v) {
                    return fail(msg);
                }
            }
        }
    }
    cfg.format = common.format;
    cfg.image_opts = common.image_opts;
    cfg.open.force_share = common.force_share;
    if cfg.image_opts && cfg.format.is_some() {
        return fail("--image-opts and -f are mutually exclusive".into());
    }
    if cfg.open.force_share && !cfg.open.read_only {
        return fail("--force-share/-U can only be used with --read-only/-r".into());
    }
    if cfg.growable && cfg.open.read_only {
        return fail("--growable needs a writable export".into());
    }
    if p.operands.len() != 2 {
        return Err(ctx.usage_error("mount", "Expecting an image and a mount point"));
    }
    cfg.file = p.operands[0].clone();
    cfg.mountpoint = p.operands[1].clone();
    Ok(cfg)
}
