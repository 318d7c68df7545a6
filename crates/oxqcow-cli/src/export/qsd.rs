//! `qemu-storage-daemon` (a link of that name): the block
//! node graph of `--blockdev` options and one `--export` of it, over NBD
//! (with `--nbd-server`) or FUSE, run by the same code as `serve` and
//! `mount`: the daemon's command line is translated into theirs.
//!
//! Supported: `--blockdev` nodes of the drivers `file`/`host_device`
//! (protocol) and any format oxqcow opens (`qcow2`, `raw`, ...) whose
//! `file` is a protocol node's name or an inline `file.filename`;
//! `--nbd-server addr.type=unix|inet[,max-connections=N]`; one `--export`
//! of `type=nbd` (`name`, `writable`, `bitmap`) or `type=fuse`
//! (`mountpoint`, `writable`, `growable`, `allow-other`); `--object`,
//! `--pidfile`, `--daemonize`. A QMP monitor (`--chardev`, `--monitor`),
//! several exports and the vhost-user/vduse exports are refused, saying so.

use std::collections::HashMap;

use oxqcow::qemu_syntax::split_options;

use crate::app::ctx::Ctx;

/// A block node: its driver and its other options, as given.
struct Node {
    driver: String,
    options: Vec<(String, String)>,
}

impl Node {
    fn get(&self, key: &str) -> Option<&str> {
        self.options.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// What the command line asked for.
#[derive(Default)]
struct Daemon {
    nodes: HashMap<String, Node>,
    exports: Vec<Vec<(String, String)>>,
    nbd_server: Option<Vec<(String, String)>>,
    objects: Vec<String>,
    pidfile: Option<String>,
    daemonize: bool,
}

const HELP: &str = "\
Usage: PROG [options]
QEMU storage daemon (oxqcow: one export, over NBD or FUSE)

  -h, --help             display this help and exit
  -V, --version          output version information and exit
  --blockdev [driver=]<driver>[,node-name=<N>][,read-only=on|off][,...]
  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,bitmap=<name>]
  --export [type=]fuse,id=<id>,node-name=<node-name>,mountpoint=<file>
           [,growable=on|off][,writable=on|off][,allow-other=on|off|auto]
  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>[,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>[,max-connections=<n>]
  --object <properties>  define a QOM object such as a secret
  --pidfile <path>       write process ID to a file after startup
  --daemonize            daemonize the process, and have the parent exit
                         once startup is complete
";

/// Runs the daemon.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    if args.iter().any(|a| a == "-V" || a == "--version") {
        print!("{}", crate::app::version::text(&ctx.prog));
        return 0;
    }
    let daemon = match parse(args) {
        Ok(Some(d)) => d,
        Ok(None) => {
            print!("{}", HELP.replace("PROG", &ctx.prog));
            return 0;
        }
        Err(msg) => return ctx.fail(&msg),
    };
    match translate(&daemon) {
        Ok(Command::Serve(a)) => super::serve::run(ctx, &a),
        Ok(Command::Mount(a)) => super::mount::run(ctx, &a),
        Err(msg) => ctx.fail(&msg),
    }
}

/// The daemon's options (`--name value` or `--name=value`); `Ok(None)` for
/// `--help`.
fn parse(args: &[String]) -> Result<Option<Daemon>, String> {
    let mut d = Daemon::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value =
            || inline.clone().or_else(|| it.next().cloned()).ok_or(format!("option '{name}' requires an argument"));
        match name {
            "-h" | "--help" => return Ok(None),
            "-T" | "--trace" => {
                value()?;
            }
            "--blockdev" => {
                let mut options = split_options(&with_implied(&value()?, "driver"));
                let driver = take(&mut options, "driver").ok_or("Parameter 'driver' is missing")?;
                let name = take(&mut options, "node-name").ok_or("A block device must be given a node-name")?;
                d.nodes.insert(name, Node { driver, options });
            }
            "--export" => d.exports.push(split_options(&with_implied(&value()?, "type"))),
            "--nbd-server" => d.nbd_server = Some(split_options(&value()?)),
            "--object" => d.objects.push(value()?),
            "--pidfile" => d.pidfile = Some(value()?),
            "--daemonize" => d.daemonize = true,
            "--chardev" | "--monitor" => return Err(format!("{name}: QMP monitors are not supported by oxqcow")),
            other if other.starts_with('-') => return Err(format!("unrecognized option '{other}'")),
            other => return Err(format!("Unexpected argument: {other}")),
        }
    }
    Ok(Some(d))
}

/// `value` with `key=` in front when its first item names no key (QEMU's
/// implied key: `--blockdev qcow2,...`, `--export nbd,...`).
fn with_implied(value: &str, key: &str) -> String {
    let first = value.split(',').next().unwrap_or_default();
    if first.contains('=') {
        value.to_string()
    } else {
        format!("{key}={value}")
    }
}

fn take(options: &mut Vec<(String, String)>, key: &str) -> Option<String> {
    let i = options.iter().position(|(k, _)| k == key)?;
    Some(options.remove(i).1)
}

/// The `serve` or `mount` command line the daemon's one export becomes.
enum Command {
    Serve(Vec<String>),
    Mount(Vec<String>),
}

fn translate(d: &Daemon) -> Result<Command, String> {
    let export = match d.exports.as_slice() {
        [] => return Err("No export given: oxqcow runs the storage daemon for one --export".into()),
        [one] => one,
        _ => return Err("Several exports: oxqcow runs the storage daemon for one --export only".into()),
    };
    let get = |key: &str| export.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    let node_name = get("node-name").ok_or("Parameter 'node-name' is missing")?;
    let (image_opts, node_read_only) = image_opts(d, &node_name)?;
    let writable = matches!(get("writable").as_deref(), Some("on" | "true" | "yes"));
    let mut args: Vec<String> = Vec::new();
    for o in &d.objects {
        args.extend(["--object".into(), o.clone()]);
    }
    args.push("--image-opts".into());
    if !writable || node_read_only {
        args.push("-r".into());
    }
    match get("type").as_deref() {
        Some("nbd") => {
            let server = d.nbd_server.as_ref().ok_or("NBD server not running")?;
            let sget = |key: &str| server.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
            // The daemon serves until it is stopped, whatever its clients do.
            args.push("-t".into());
            match sget("addr.type").as_deref() {
                Some("unix") => {
                    args.extend(["-k".into(), sget("addr.path").ok_or("Parameter 'addr.path' is missing")?])
                }
                Some("inet") => {
                    args.extend(["-b".into(), sget("addr.host").unwrap_or_else(|| "0.0.0.0".into())]);
                    args.extend(["-p".into(), sget("addr.port").ok_or("Parameter 'addr.port' is missing")?]);
                }
                other => return Err(format!("Unsupported NBD server address type '{}'", other.unwrap_or_default())),
            }
            args.extend(["-e".into(), sget("max-connections").unwrap_or_else(|| "0".into())]);
            args.extend(["-x".into(), get("name").unwrap_or_else(|| node_name.clone())]);
            if let Some(b) = get("bitmap") {
                args.extend(["-B".into(), b]);
            }
            if let Some(p) = &d.pidfile {
                args.extend(["--pid-file".into(), p.clone()]);
            }
            if d.daemonize {
                args.push("--fork".into());
            }
            args.push(image_opts);
            Ok(Command::Serve(args))
        }
        Some("fuse") => {
            if matches!(get("growable").as_deref(), Some("on" | "true" | "yes")) {
                args.push("--growable".into());
            }
            if let Some(a) = get("allow-other") {
                args.extend(["--allow-other".into(), a]);
            }
            if let Some(p) = &d.pidfile {
                args.extend(["--pidfile".into(), p.clone()]);
            }
            if d.daemonize {
                args.push("--daemonize".into());
            }
            args.push(image_opts);
            args.push(get("mountpoint").ok_or("Parameter 'mountpoint' is missing")?);
            Ok(Command::Mount(args))
        }
        Some(other) => Err(format!("Export type '{other}' is not supported by oxqcow (only nbd and fuse are)")),
        None => Err("Parameter 'type' is missing".into()),
    }
}

/// The `--image-opts` string of node `name` and whether the node is
/// read-only: a format node over a protocol node (by name or inline), or a
/// protocol node exported as it is (raw).
fn image_opts(d: &Daemon, name: &str) -> Result<(String, bool), String> {
    let node = d.nodes.get(name).ok_or_else(|| format!("Cannot find node '{name}'"))?;
    let read_only = |n: &Node| matches!(n.get("read-only"), Some("on" | "true" | "yes"));
    let protocol = |n: &Node| matches!(n.driver.as_str(), "file" | "host_device" | "host_cdrom");
    let mut items = Vec::new();
    let mut ro = read_only(node);
    if protocol(node) {
        let filename = node.get("filename").ok_or("Parameter 'filename' is missing")?;
        items.push(("driver".to_string(), "raw".to_string()));
        items.push(("file.filename".to_string(), filename.to_string()));
    } else {
        items.push(("driver".to_string(), node.driver.clone()));
        match node.get("file") {
            Some(child) if !child.contains('=') => {
                let file = d.nodes.get(child).ok_or_else(|| format!("Cannot find node '{child}'"))?;
                if !protocol(file) {
                    return Err(format!(
                        "Node '{child}' is a '{}' node: oxqcow takes one format over a file",
                        file.driver
                    ));
                }
                ro |= read_only(file);
                let filename = file.get("filename").ok_or("Parameter 'filename' is missing")?;
                items.push(("file.filename".to_string(), filename.to_string()));
            }
            _ => {}
        }
        for (k, v) in &node.options {
            if k != "file" && k != "read-only" && k != "file.driver" {
                items.push((k.clone(), v.clone()));
            }
        }
    }
    let escaped: Vec<String> = items.iter().map(|(k, v)| format!("{k}={}", v.replace(',', ",,"))).collect();
    Ok((escaped.join(","), ro))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn an_nbd_export_of_a_qcow2_node_over_a_file_node() {
        let d = parse(&strings(&[
            "--blockdev",
            "file,node-name=f0,filename=/tmp/a,,b.qcow2",
            "--blockdev=driver=qcow2,node-name=q0,file=f0",
            "--nbd-server",
            "addr.type=unix,addr.path=/tmp/s",
            "--export",
            "nbd,id=e0,node-name=q0,name=disk,writable=on",
        ]))
        .unwrap()
        .unwrap();
        let Command::Serve(args) = translate(&d).unwrap() else { panic!("not an NBD export") };
        assert_eq!(
            args,
            strings(&[
                "--image-opts",
                "-t",
                "-k",
                "/tmp/s",
                "-e",
                "0",
                "-x",
                "disk",
                "driver=qcow2,file.filename=/tmp/a,,b.qcow2"
            ])
        );
    }

    #[test]
    fn a_read_only_fuse_export_of_a_file_node() {
        let d = parse(&strings(&[
            "--blockdev",
            "driver=file,node-name=f0,filename=/tmp/r.raw",
            "--export",
            "type=fuse,id=e0,node-name=f0,mountpoint=/tmp/m",
            "--daemonize",
        ]))
        .unwrap()
        .unwrap();
        let Command::Mount(args) = translate(&d).unwrap() else { panic!("not a FUSE export") };
        assert_eq!(
            args,
            strings(&["--image-opts", "-r", "--daemonize", "driver=raw,file.filename=/tmp/r.raw", "/tmp/m"])
        );
    }

    #[test]
    fn what_is_not_supported_is_refused_by_name() {
        let e = |a: &[&str]| parse(&strings(a)).and_then(|d| translate(&d.unwrap()).map(|_| ())).unwrap_err();
        assert!(e(&["--monitor", "qmp"]).contains("QMP"));
        assert!(e(&["--blockdev", "file,node-name=f,filename=x"]).contains("No export"));
        assert!(e(&["--blockdev", "file,node-name=f,filename=x", "--export", "vhost-user-blk,id=e,node-name=f"])
            .contains("'vhost-user-blk' is not supported"));
    }
}
