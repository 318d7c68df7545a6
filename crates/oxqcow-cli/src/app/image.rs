//! Opening images as qemu-img opens them: file names and `--image-opts`
//! option strings, qemu-img's "Could not open" messages (down the backing
//! chain), cache modes, and the names QEMU gives the layers of a chain.

use std::path::{Path, PathBuf};

use oxqcow::backing::{resolve_backing_path, BackingPolicy};
use oxqcow::{Image, ImageFormat, OpenOptions};

use crate::app::forbid_backing::backing_policy;
use crate::app::messages::{describe, open_messages, prog_name, strerror, warn_probed_raw};
use crate::app::qemu_opts::split_noisily;

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
    for (key, value) in split_noisily(&prog_name(), spec) {
        match key.as_str() {
            "file.filename" | "filename" => path = Some(value),
            "driver" => format = Some(value),
            "file.driver" if value == "file" => {}
            "file.driver" => return Err(fail(format!("Unknown protocol '{value}'"))),
            k if !io && k.ends_with("key-secret") => {}
            _ if crate::app::secrets::apply_open_option(&mut opts, &key, &value).map_err(fail)? => {}
            _ => opts.apply_qemu_option(&key, &value).map_err(|e| fail(describe(&e)))?,
        }
    }
    let Some(path) = path else {
        return Err(fail("A block device must be specified for \"file\"".to_string()));
    };
    Ok((path, format, opts))
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
