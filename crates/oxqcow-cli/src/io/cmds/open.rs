//! The commands that open, reopen and close images, and `quit`.

use crate::app::io_open::{takes_option, OpenSpec};
use crate::app::qemu_opts::split_noisily;
use crate::io::cmds::args::{cmd, parse_args, CmdInfo};
use crate::io::session::{CmdResult, Failed, Session};

const OPEN_HELP: &str = "
 opens a new file in the requested mode

 Example:
 'open -n -o driver=raw /tmp/data' - opens raw data file read-write, uncached

 Opens a file for subsequent use by all of the other qemu-io commands.
 -r, -- open file read-only
 -s, -- use snapshot file
 -C, -- use copy-on-read
 -n, -- disable host cache, short for -t none
 -U, -- force shared permissions
 -k, -- use kernel AIO implementation (Linux only, prefer use of -i)
 -i, -- use AIO mode (threads, native or io_uring)
 -t, -- use the given cache mode for the image
 -d, -- use the given discard mode for the image
 -o, -- options to be given to the block driver
";

/// `open`.
pub const OPEN: CmdInfo = CmdInfo {
    no_file: true,
    help: Some(OPEN_HELP),
    ..cmd(
        "open",
        Some("o"),
        1,
        None,
        Some("[-rsCnkU] [-t cache] [-d discard] [-o options] [path]"),
        "open the file specified by path",
        open,
    )
};

/// `close`.
pub const CLOSE: CmdInfo =
    cmd("close", Some("c"), 0, Some(0), None, "close the current open file", |s, _, _| s.close_image());

const REOPEN_HELP: &str = "
 Changes the open options of an already opened image

 Example:
 'reopen -o lazy-refcounts=on' - activates lazy refcount writeback on a qcow2 image

 -r, -- Reopen the image read-only
 -w, -- Reopen the image read-write
 -c, -- Change the cache mode to the given value
 -o, -- Changes block driver options (cf. 'open' command)
";

/// `reopen`.
pub const REOPEN: CmdInfo = CmdInfo {
    help: Some(REOPEN_HELP),
    ..cmd(
        "reopen",
        None,
        0,
        None,
        Some("[(-r|-w)] [-c cache] [-o options]"),
        "reopens an image with new options",
        reopen,
    )
};

/// `quit`.
pub const QUIT: CmdInfo = CmdInfo {
    no_file: true,
    ..cmd("quit", Some("q"), 0, None, None, "exit the program", |s, _, _| {
        s.quit = true;
        Ok(())
    })
};

fn open(s: &mut Session, info: &CmdInfo, argv: &[String]) -> CmdResult {
    let p = parse_args(argv, "snCro:ki:t:d:U");
    let mut spec = OpenSpec::for_command_line();
    for (c, v) in &p.opts {
        let (c, v) = (*c, v.as_str());
        if c == 'o' {
            if s.image_opts {
                println!("--image-opts and 'open -o' are mutually exclusive");
                return Err(Failed);
            }
            spec.options.extend(split_noisily(&s.ctx.prog, v));
        } else if let Err(msg) = spec.apply_flag(c, v) {
            s.ctx.error(&msg);
            return Err(Failed);
        }
    }
    p.check(info)?;
    let mut operands = p.operands.as_slice();
    if s.image_opts && operands.len() == 1 {
        spec.options.extend(split_noisily(&s.ctx.prog, &operands[0]));
        operands = &[];
    }
    match operands {
        [path] => s.open(spec, Some(path)),
        [] => s.open(spec, None),
        _ => info.usage(),
    }
}

/// `reopen`: the image is opened again with its old options updated by
/// the new ones; when that fails, it goes on with the old ones, as
/// QEMU's transactional reopen leaves it.
fn reopen(s: &mut Session, info: &CmdInfo, argv: &[String]) -> CmdResult {
    let p = parse_args(argv, "c:o:rw");
    let mut cache: Option<&str> = None;
    let mut read_only: Option<bool> = None;
    let mut options: Vec<(String, String)> = Vec::new();
    for (c, v) in &p.opts {
        match c {
            'c' => {
                if OpenSpec::for_command_line().apply_flag('t', v).is_err() {
                    s.ctx.error(&format!("Invalid cache option: {v}"));
                    return Err(Failed);
                }
                cache = Some(v);
            }
            'o' => options.extend(split_noisily(&s.ctx.prog, v)),
            _ => {
                if read_only.is_some() {
                    s.ctx.error("Only one -r/-w option may be given");
                    return Err(Failed);
                }
                read_only = Some(*c == 'r');
            }
        }
    }
    p.check(info)?;
    if !p.operands.is_empty() {
        return info.usage();
    }
    let fail = |s: &Session, msg: &str| {
        s.ctx.error(msg);
        Err(Failed)
    };
    let has = |k: &str| options.iter().any(|(key, _)| key == k);
    if has("read-only") && read_only.is_some() {
        return fail(s, "Cannot set both -r/-w and 'read-only'");
    }
    if (has("cache.direct") || has("cache.no-flush")) && cache.is_some() {
        return fail(s, "Cannot set both -c and the cache options");
    }
    for (key, value) in &options {
        if matches!(key.as_str(), "read-only" | "auto-read-only" | "cache.direct" | "cache.no-flush")
            && !matches!(value.as_str(), "on" | "off")
        {
            return fail(s, &format!("Parameter '{key}' expects 'on' or 'off'"));
        }
    }
    // qemu-io keeps its write permission unless -r drops it, so a node
    // made read-only by option alone is refused (QEMU names the node; an
    // unnamed one gets a generated name, '#blockNNN').
    let to_read_only = options.iter().rev().find(|(k, _)| k == "read-only").is_some_and(|(_, v)| v == "on");
    if to_read_only && read_only.is_none() && s.image.as_ref().is_some_and(|i| !i.read_only()) {
        let named = s
            .opened_with
            .as_ref()
            .and_then(|(spec, _)| spec.options.iter().find(|(k, _)| k == "node-name").map(|(_, v)| v.clone()));
        let node = named.unwrap_or_else(|| "#block0".into());
        return fail(s, &format!("Read-only block node '{node}' cannot support read-write users"));
    }
    // Recorded with every image the session opens.
    let Some((old_spec, name)) = s.opened_with.clone() else { return fail(s, "no file open, try 'help open'") };
    if old_spec.snapshot {
        return fail(s, "reopen of an image opened with -s is not supported by oxqcow");
    }
    let img = &s.image.as_ref().expect("an image is open").image;
    let mut new_spec = old_spec.clone();
    let mut given = Vec::new();
    for (key, value) in options {
        let (child, base) = match key.split_once('.') {
            Some((c @ ("file" | "backing"), rest)) => (c, rest),
            _ => ("", key.as_str()),
        };
        let changed = match base {
            "node-name" => old_spec.options.iter().all(|(k, v)| *k != key || *v != value),
            "driver" => {
                let current = match child {
                    "file" => Some("file".to_string()),
                    "backing" => img.as_qcow2().and_then(|q| q.backing()).map(|b| b.format().name().to_string()),
                    _ => Some(img.format().name().to_string()),
                };
                current.as_deref() != Some(value.as_str())
            }
            _ => !takes_option(img.format(), &key),
        };
        if changed {
            return fail(s, &format!("Cannot change the option '{base}'"));
        }
        if !matches!(base, "node-name" | "driver") {
            given.push((key, value));
        }
    }
    join_options(&mut new_spec.options, given);
    // The flags replace what options said before (qemu-io turns them into
    // these options).
    if let Some(ro) = read_only {
        new_spec.options.retain(|(k, _)| k != "read-only");
        new_spec.read_only = ro;
    }
    if let Some(mode) = cache {
        new_spec.options.retain(|(k, _)| !matches!(k.as_str(), "cache.direct" | "cache.no-flush"));
        new_spec.apply_flag('t', mode).expect("the cache mode was checked");
    }
    s.close_image()?;
    if let Err(msg) = s.open_as(new_spec, name.as_deref()) {
        s.ctx.error(&msg);
        if let Err(again) = s.open_as(old_spec, name.as_deref()) {
            s.ctx.error(&again);
        }
        return Err(Failed);
    }
    Ok(())
}

/// Joins the options a reopen gives with those kept from before, as
/// QEMU's qcow2 driver joins them: a new overlap mode replaces every old
/// overlap option, a new total cache size the old partial sizes, and an
/// old total cache size is dropped unless given again.
fn join_options(old: &mut Vec<(String, String)>, new: Vec<(String, String)>) {
    let has = |k: &str| new.iter().any(|(key, _)| key == k);
    if has("overlap-check") || has("overlap-check.template") {
        old.retain(|(k, _)| !k.starts_with("overlap-check"));
    }
    if has("cache-size") {
        old.retain(|(k, _)| k != "l2-cache-size" && k != "refcount-cache-size");
    } else {
        old.retain(|(k, _)| k != "cache-size");
    }
    for (key, value) in new {
        old.retain(|(k, _)| *k != key);
        old.push((key, value));
    }
}
