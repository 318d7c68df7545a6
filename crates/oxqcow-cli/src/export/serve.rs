//! `serve`: export an image over NBD with qemu-nbd's flags and messages.
//!
//! This module parses the command line, opens the image and the listening
//! sockets, and hands them to `oxqcow_nbd::Server`; the protocol and the
//! connection handling live in the oxqcow-nbd crate. Order of work, as
//! qemu-nbd: parse, fork (`--fork`, before any thread exists), block the
//! termination signals, open the image, listen, write the pid file, tell
//! the parent we are up, serve, flush, clean up. With `--tls-creds`, every
//! client must start TLS (see `oxqcow_nbd::tls`). `-L`/`--list` makes it a
//! client instead: it prints what a server exports, in qemu-nbd's format
//! (the asking is `oxqcow_nbd::client::list_exports`).

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use oxqcow::{BlockDevice, CacheMode, OpenOptions};
use oxqcow_nbd::client::{list_exports, NbdServer};
use oxqcow_nbd::sys::{self, TerminationSignals};
use oxqcow_nbd::{DetectZeroes, Export, ExportOptions, Listener, Server, ServerOptions, TlsServer};

use crate::app::ctx::Ctx;
use crate::app::getopt::{HasArg, Opt};
use crate::app::snapshot_param::SnapshotParam;
use crate::app::CommonOpts;
use crate::export::daemon::{fork_daemon, open_export_image};

/// qemu-nbd's options, in its order.
const SPEC: &[Opt] = &[
    Opt::both('h', "help", HasArg::No),
    Opt::both('V', "version", HasArg::No),
    Opt::both('b', "bind", HasArg::Required),
    Opt::both('p', "port", HasArg::Required),
    Opt::both('k', "socket", HasArg::Required),
    Opt::both('o', "offset", HasArg::Required),
    Opt::both('r', "read-only", HasArg::No),
    Opt::both('A', "allocation-depth", HasArg::No),
    Opt::both('B', "bitmap", HasArg::Required),
    Opt::both('c', "connect", HasArg::Required),
    Opt::both('d', "disconnect", HasArg::No),
    Opt::both('L', "list", HasArg::No),
    Opt::both('s', "snapshot", HasArg::No),
    Opt::both('l', "load-snapshot", HasArg::Required),
    Opt::both('n', "nocache", HasArg::No),
    Opt::long("cache", HasArg::Required),
    Opt::long("aio", HasArg::Required),
    Opt::long("discard", HasArg::Required),
    Opt::long("detect-zeroes", HasArg::Required),
    Opt::both('e', "shared", HasArg::Required),
    Opt::both('f', "format", HasArg::Required),
    Opt::both('t', "persistent", HasArg::No),
    Opt::both('v', "verbose", HasArg::No),
    Opt::long("object", HasArg::Required),
    Opt::long("export-name", HasArg::Required),
    Opt::short('x', HasArg::Required),
    Opt::both('D', "description", HasArg::Required),
    Opt::long("tls-creds", HasArg::Required),
    Opt::long("tls-hostname", HasArg::Required),
    Opt::long("tls-authz", HasArg::Required),
    Opt::long("image-opts", HasArg::No),
    Opt::both('T', "trace", HasArg::Required),
    Opt::long("fork", HasArg::No),
    Opt::long("pid-file", HasArg::Required),
    Opt::long("selinux-label", HasArg::Required),
    Opt::long("handshake-limit", HasArg::Required),
    Opt::both('U', "force-share", HasArg::No),
];

const HELP: &str = "\
Usage: PROG serve [OPTIONS] FILE
Export a disk image over NBD (qemu-nbd compatible).

  -h, --help                display this help and exit
  -V, --version             output version information and exit

Connection properties:
  -p, --port=PORT           port to listen on (default `10809')
  -b, --bind=IFACE          interface to bind to (default `0.0.0.0')
  -k, --socket=PATH         path to the unix socket
  -e, --shared=NUM          device can be shared by NUM clients (default '1', 0 for unlimited)
  -t, --persistent          don't exit on the last connection
  -v, --verbose             accepted for compatibility
  -x, --export-name=NAME    expose export by name (default is empty string)
  -D, --description=TEXT    export a human-readable description
      --handshake-limit=N   limit client's handshake to N seconds (default 10, 0 for none)
  Socket activation (LISTEN_PID/LISTEN_FDS) is used when the variables name this process.

Exposing the image:
  -A, --allocation-depth    expose the allocation depth
  -B, --bitmap=NAME         expose a persistent dirty bitmap

General purpose options:
  --object type,id=ID,...   define a 'secret' object (for encrypt.key-secret) or
                            TLS credentials: tls-creds-x509,id=ID,dir=DIR,
                            endpoint=server[,verify-peer=on|off]
      --tls-creds=ID        use id of an earlier --object to provide TLS
  -T, --trace ...           accepted for compatibility
  --fork                    fork off the server process and exit the parent
                            once the server is running
  --pid-file=PATH           store the server's process ID in the given file

Block device options:
  -f, --format=FORMAT       set image format (raw, qcow2)
  -r, --read-only           export read-only
  -U, --force-share         open the image in shared mode (with -r)
  -l, --load-snapshot=SNAPSHOT_PARAM
                            load an internal snapshot inside FILE and export it
                            as a read-only device, SNAPSHOT_PARAM format is
                            'snapshot.id=[ID],snapshot.name=[NAME]', or
                            '[ID_OR_NAME]'
  -n, --nocache             disable host cache
      --cache=MODE          set cache mode used to access the disk image, the
                            valid options are: 'none', 'writeback' (default),
                            'writethrough', 'directsync' and 'unsafe'
      --aio=MODE            accepted for compatibility (native, io_uring or threads)
      --discard=MODE        set discard mode (ignore, unmap)
      --detect-zeroes=MODE  set detect-zeroes mode (off, on, unmap)
      --image-opts          treat FILE as a full set of image options

Listing exports:
  -L, --list                list the exports of the server at -k PATH, or at
                            -b HOST (default 0.0.0.0) and -p PORT

Not supported: -o/--offset, -s/--snapshot, -c/--connect,
-d/--disconnect, --tls-authz, tls-creds-psk, SELinux labels.
";

/// qemu-nbd's default port.
const DEFAULT_PORT: &str = "10809";
/// Worker threads serving requests of every client.
const WORKERS: usize = 8;

/// Everything the command line decided.
struct Config {
    file: String,
    format: Option<String>,
    image_opts: bool,
    open: OpenOptions,
    socket: Option<String>,
    bind: Option<String>,
    port: Option<String>,
    shared: usize,
    persistent: bool,
    fork: bool,
    pid_file: Option<String>,
    handshake_limit: Option<Duration>,
    export: ExportOptions,
    tls: Option<TlsServer>,
    /// `-L`: list a server's exports instead of serving.
    list: bool,
    /// With `-L`: the id of the client TLS credentials, and the host name
    /// the server's certificate must carry.
    list_tls: Option<String>,
    tls_hostname: Option<String>,
}

/// Runs `serve`.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    let cfg = match parse(ctx, args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if cfg.list {
        return list(ctx, &cfg);
    }
    let activated = match sys::activated_listeners() {
        Ok(a) => a,
        Err(msg) => return ctx.fail(&format!("Socket activation failed: {msg}")),
    };
    if activated.is_some() {
        let clash = if cfg.socket.is_some() {
            Some("Unix socket can't be set when using socket activation")
        } else if cfg.bind.is_some() {
            Some("The interface can't be set when using socket activation")
        } else if cfg.port.is_some() {
            Some("TCP port number can't be set when using socket activation")
        } else {
            None
        };
        if let Some(msg) = clash {
            return ctx.fail(msg);
        }
    }
    // The parent waits on this socket for the child's word that it serves.
    let mut ready: Option<UnixStream> = None;
    if cfg.fork {
        match fork_daemon(ctx, "Failed to fork") {
            Ok(to_parent) => ready = Some(to_parent),
            Err(code) => return code,
        }
    }
    // Before any thread exists, so that every thread inherits the mask and
    // only the waiting thread below receives them.
    let signals = match TerminationSignals::block() {
        Ok(s) => s,
        Err(e) => return ctx.fail(&format!("Failed to block signals: {e}")),
    };
    serve(ctx, cfg, activated, signals, ready.as_mut())
}

fn serve(
    ctx: &Ctx,
    cfg: Config,
    activated: Option<Vec<Listener>>,
    signals: TerminationSignals,
    ready: Option<&mut UnixStream>,
) -> i32 {
    let read_only = cfg.export.read_only;
    let image = match open_export_image(&cfg.file, cfg.image_opts, cfg.format.as_deref(), &cfg.open) {
        Ok(opened) => Arc::new(opened.image),
        Err(msg) => return ctx.fail(&format!("Failed to blk_new_open '{}': {msg}", cfg.file)),
    };
    let mut export_opts = cfg.export.clone();
    export_opts.read_only = read_only || image.is_read_only();
    let export = match Export::new(Arc::clone(&image), export_opts) {
        Ok(e) => e,
        Err(msg) => return ctx.fail(&msg),
    };
    let listeners = match activated {
        Some(l) => l,
        None => match listen(&cfg) {
            Ok(l) => l,
            Err(msg) => return ctx.fail(&msg),
        },
    };
    if let Some(p) = &cfg.pid_file {
        if let Err(e) = std::fs::write(p, format!("{}\n", std::process::id())) {
            return ctx.fail(&format!("Failed to write pid file '{p}': {}", crate::app::messages::os_error(&e)));
        }
    }
    let opts = ServerOptions {
        shared: cfg.shared,
        persistent: cfg.persistent,
        handshake_limit: cfg.handshake_limit,
        workers: WORKERS,
        tls: cfg.tls.clone(),
    };
    let server = Server::new(export, listeners, opts);
    let stop = server.shutdown_handle();
    let waiter = std::thread::Builder::new().name("signals".into()).spawn(move || {
        if signals.wait().is_ok() {
            stop.shutdown();
        }
    });
    if waiter.is_err() {
        return ctx.fail("Failed to start the signal thread");
    }
    if let Some(r) = ready {
        // Up and listening: release the parent, and leave its terminal.
        let _ = r.write_all(b"R");
        let _ = sys::stdio_to_null(&[0, 1, 2]);
    }
    let result = server.run();
    if let Some(p) = &cfg.pid_file {
        let _ = std::fs::remove_file(p);
    }
    let closed = match Arc::try_unwrap(image) {
        Ok(img) => img.close(),
        // No connection holds it once the server ran (see `Server::run`);
        // should one ever, what it wrote is flushed at least.
        Err(shared) => oxqcow::BlockDevice::flush(&*shared),
    };
    match result.and(closed) {
        Ok(()) => 0,
        Err(e) => ctx.fail(&format!("Failed to flush the image: {e}")),
    }
}

/// qemu-nbd's names of the transmission flags, by bit.
const FLAG_NAMES: [(u16, &str); 12] = [
    (1, "readonly"),
    (2, "flush"),
    (3, "fua"),
    (4, "rotational"),
    (5, "trim"),
    (6, "zeroes"),
    (7, "df"),
    (8, "multi"),
    (9, "resize"),
    (10, "cache"),
    (11, "fast-zero"),
    (12, "block-status-payload"),
];

/// `-L`: connects to the server the socket options name and prints its
/// exports as qemu-nbd does.
fn list(ctx: &Ctx, cfg: &Config) -> i32 {
    let server = match &cfg.socket {
        Some(path) => NbdServer::Unix(path.clone()),
        None => {
            let host = cfg.bind.as_deref().unwrap_or("0.0.0.0");
            let port_text = cfg.port.as_deref().unwrap_or(DEFAULT_PORT);
            let Ok(port) = port_text.parse() else {
                return ctx.fail(&format!(
                    "address resolution failed for {host}:{port_text}: Servname not supported for ai_socktype"
                ));
            };
            let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
            NbdServer::Tcp { host, port }
        }
    };
    let tls = match cfg.list_tls.as_deref().map(crate::app::tlscreds::client_creds).transpose() {
        Ok(t) => t,
        Err(msg) => return ctx.fail(&format!("Failed to get TLS creds: {msg}")),
    };
    // The certificate names the host: --tls-hostname, else -b's host.
    let hostname = cfg.tls_hostname.clone().or_else(|| match &server {
        NbdServer::Tcp { host, .. } => Some(host.clone()),
        NbdServer::Unix(_) => None,
    });
    let exports = match list_exports(&server, tls.as_ref(), hostname.as_deref()) {
        Ok(e) => e,
        Err(e) => return ctx.fail(&e.to_string()),
    };
    let mut out = format!("exports available: {}\n", exports.len());
    for e in &exports {
        out += &format!(" export: '{}'\n", e.name);
        if !e.description.is_empty() {
            out += &format!("  description: {}\n", e.description);
        }
        if e.flags & oxqcow_nbd::proto::transmission_flags::HAS_FLAGS != 0 {
            out += &format!("  size:  {}\n  flags: {:#x} (", e.size, e.flags);
            for (bit, name) in FLAG_NAMES {
                if e.flags & (1 << bit) != 0 {
                    out += &format!(" {name}");
                }
            }
            out += " )\n";
        }
        if let Some((min, opt, max)) = e.block_sizes.filter(|b| b.0 != 0) {
            out += &format!("  min block: {min}\n  opt block: {opt}\n  max block: {max}\n");
        }
        out += &format!("  transaction size: {}\n", if e.extended { "64-bit" } else { "32-bit" });
        if !e.contexts.is_empty() {
            out += &format!("  available meta contexts: {}\n", e.contexts.len());
            for c in &e.contexts {
                out += &format!("   {c}\n");
            }
        }
    }
    print!("{out}");
    0
}

fn listen(cfg: &Config) -> Result<Vec<Listener>, String> {
    if let Some(path) = &cfg.socket {
        return Listener::bind_unix(Path::new(path))
            .map(|l| vec![l])
            .map_err(|e| format!("Failed to bind socket to {path}: {}", crate::app::messages::os_error(&e)));
    }
    let host = cfg.bind.as_deref().unwrap_or("0.0.0.0");
    let port_text = cfg.port.as_deref().unwrap_or(DEFAULT_PORT);
    let resolution =
        || format!("address resolution failed for {host}:{port_text}: Servname not supported for ai_socktype");
    let port: u16 = port_text.parse().map_err(|_| resolution())?;
    // Brackets around IPv6 literals are qemu's spelling; the resolver wants none.
    let host_plain = host.trim_start_matches('[').trim_end_matches(']');
    Listener::bind_tcp(host_plain, port)
        .map_err(|e| format!("Failed to find an available port: {}", crate::app::messages::os_error(&e)))
}

fn parse(ctx: &Ctx, args: &[String]) -> Result<Config, i32> {
    // qemu-nbd prefixes both lines of an option error with its name.
    let p = crate::app::getopt::parse(&ctx.invoked_as("serve"), args, SPEC).map_err(|msg| {
        eprintln!("{msg}");
        ctx.error(&format!("Try `{} --help' for more information.", ctx.invoked_as("serve")));
        1
    })?;
    let mut cfg = Config {
        file: String::new(),
        format: None,
        image_opts: false,
        open: OpenOptions::new(),
        socket: None,
        bind: None,
        port: None,
        shared: 1,
        persistent: false,
        fork: false,
        pid_file: None,
        handshake_limit: Some(Duration::from_secs(10)),
        export: ExportOptions::default(),
        tls: None,
        list: false,
        list_tls: None,
        tls_hostname: None,
    };
    // Options that describe the served image, which -L refuses.
    let mut per_device = false;
    let (mut tls_creds, mut tls_authz, mut tls_hostname) = (None, None, None);
    let mut detect = DetectZeroes::Off;
    let fail = |msg: String| Err(ctx.fail(&msg));
    // -f, --image-opts, -U and --object; serve's -t, -p and -T are its own.
    let mut common = CommonOpts::default();
    for (key, value) in p.opts {
        let v = value.unwrap_or_default();
        per_device |= matches!(
            key.as_str(),
            "x" | "export-name"
                | "D"
                | "o"
                | "c"
                | "d"
                | "f"
                | "l"
                | "s"
                | "B"
                | "A"
                | "aio"
                | "discard"
                | "cache"
                | "n"
        );
        match key.as_str() {
            "h" => {
                print!("{}", HELP.replace("PROG", &ctx.prog));
                return Err(0);
            }
            "V" => {
                print!("{}", crate::app::version::nbd_text(&ctx.prog));
                return Err(0);
            }
            "b" => cfg.bind = Some(v),
            "p" => cfg.port = Some(v),
            "k" => {
                if !v.starts_with('/') {
                    return fail("socket path must be absolute".into());
                }
                cfg.socket = Some(v);
            }
            "r" => cfg.open.read_only = true,
            "A" => cfg.export.allocation_depth = true,
            "v" | "T" => {}
            "n" => cfg.open.cache = CacheMode::None,
            "cache" => match CacheMode::from_name(&v) {
                Ok(m) => cfg.open.cache = m,
                Err(_) => return fail(format!("Invalid cache mode `{v}'")),
            },
            "aio" if !matches!(v.as_str(), "threads" | "native" | "io_uring") => {
                return fail(format!("Invalid aio mode '{v}'"))
            }
            "discard" => match v.as_str() {
                "ignore" | "off" => cfg.open.discard_passthrough = false,
                "unmap" | "on" => cfg.open.discard_passthrough = true,
                _ => return fail(format!("Invalid discard mode `{v}'")),
            },
            "detect-zeroes" => {
                detect = match v.as_str() {
                    "off" => DetectZeroes::Off,
                    "on" => DetectZeroes::On,
                    "unmap" => DetectZeroes::Unmap,
                    _ => return fail(format!("Failed to parse detect_zeroes mode: invalid parameter value: {v}")),
                }
            }
            "e" => match v.trim().parse::<i64>() {
                Ok(n) if (0..=i64::from(i32::MAX)).contains(&n) => cfg.shared = n as usize,
                _ => return fail(format!("Invalid shared device number '{v}'")),
            },
            "t" => cfg.persistent = true,
            "export-name" | "x" => {
                if v.len() > oxqcow_nbd::proto::MAX_STRING {
                    return fail(format!("export name '{v}' too long"));
                }
                cfg.export.name = v;
            }
            "D" => {
                if v.len() > oxqcow_nbd::proto::MAX_STRING {
                    return fail(format!("description '{v}' too long"));
                }
                cfg.export.description = v;
            }
            "l" => {
                let param = match SnapshotParam::parse(&v) {
                    Ok(p) => p,
                    Err(key) => {
                        ctx.error(&format!("Invalid parameter '{key}'"));
                        return fail(format!("Failed in parsing snapshot param `{v}'"));
                    }
                };
                cfg.open.snapshot = Some(snapshot_id_or_name(param).map_err(|m| ctx.fail(&m))?);
                cfg.open.read_only = true;
            }
            "fork" => cfg.fork = true,
            "pid-file" => cfg.pid_file = Some(v),
            "handshake-limit" => match v.trim().parse::<u32>() {
                Ok(0) => cfg.handshake_limit = None,
                Ok(n) => cfg.handshake_limit = Some(Duration::from_secs(u64::from(n))),
                Err(_) => return fail(format!("Invalid handshake limit '{v}'")),
            },
            "tls-creds" => tls_creds = Some(v),
            "tls-authz" => tls_authz = Some(v),
            "tls-hostname" => tls_hostname = Some(v),
            "selinux-label" => return fail("SELinux support not enabled in this binary".into()),
            "o" => return fail("-o/--offset is not supported".into()),
            "s" => return fail("-s/--snapshot is not supported".into()),
            "B" => cfg.export.bitmap = Some(v),
            "c" | "d" => return fail("-c/--connect and -d/--disconnect (kernel NBD devices) are not supported".into()),
            "L" => cfg.list = true,
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
    if cfg.list {
        if !p.operands.is_empty() {
            return fail("List mode is incompatible with a file name".into());
        }
        if per_device {
            return fail("List mode is incompatible with per-device settings".into());
        }
        if cfg.fork {
            return fail("List mode is incompatible with forking".into());
        }
    } else if p.operands.len() != 1 {
        ctx.error("Invalid number of arguments");
        eprintln!("Try `{} --help' for more information.", ctx.invoked_as("serve"));
        return Err(1);
    }
    cfg.file = p.operands.first().cloned().unwrap_or_default();
    // qemu-nbd's checks, in its order.
    match tls_creds {
        Some(id) if cfg.list => {
            if tls_authz.is_some() {
                return fail("TLS authorization is incompatible with export list".into());
            }
            cfg.list_tls = Some(id);
            cfg.tls_hostname = tls_hostname;
            return Ok(cfg);
        }
        Some(id) => {
            if tls_hostname.is_some() {
                return fail("TLS hostname is only supported with export list".into());
            }
            match crate::app::tlscreds::server_creds(&id) {
                Ok(creds) => cfg.tls = Some(creds),
                Err(msg) => return fail(format!("Failed to get TLS creds: {msg}")),
            }
            if tls_authz.is_some() {
                return fail("--tls-authz is not supported by oxqcow (TLS authorization is not implemented)".into());
            }
        }
        None if tls_authz.is_some() => return fail("--tls-authz is not permitted without --tls-creds".into()),
        None if tls_hostname.is_some() => return fail("--tls-hostname is not permitted without --tls-creds".into()),
        None if cfg.list => return Ok(cfg),
        None => {}
    }
    cfg.export.read_only = cfg.open.read_only;
    cfg.export.discard = cfg.open.discard_passthrough;
    cfg.export.detect_zeroes = detect;
    cfg.export.multi_conn = cfg.shared != 1;
    cfg.export.writethrough = cfg.open.cache.writes_through();
    if detect == DetectZeroes::Unmap && !cfg.export.discard {
        return fail("setting detect-zeroes to unmap is not allowed without setting discard operation to unmap".into());
    }
    if cfg.open.force_share && !cfg.open.read_only {
        return fail("--force-share/-U can only be used with --read-only/-r".into());
    }
    Ok(cfg)
}

/// The snapshot `-l` names: a bare id or name, else the id of
/// `snapshot.id=ID,snapshot.name=NAME` when given, else the name.
fn snapshot_id_or_name(param: SnapshotParam) -> Result<String, String> {
    match param {
        SnapshotParam::IdOrName(s) => Ok(s),
        SnapshotParam::Exact { id, name } => id
            .or(name)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| "Failed to load snapshot: Can't find snapshot".to_string()),
    }
}
