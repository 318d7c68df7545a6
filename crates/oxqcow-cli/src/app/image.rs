//! Opening images as qemu-img opens them: file names and `--image-opts`
//! option strings, qemu-img's "Could not open" messages (down the backing
//! chain), cache modes, and the names QEMU gives the layers of a chain.

use std::path::{Path, PathBuf};

use oxqcow::backing::{resolve_backing_path, BackingPolicy};
use oxqcow::names::ImageName;
use std::sync::Arc;

use oxqcow::{Children, Image, ImageFormat, OpenOptions, Storage};
use oxqcow_nbd::client::NbdAddress;

pub use crate::app::backing_protocols::connect_nbd;
use crate::app::backing_protocols::{is_protocol_name, protocols};
use crate::app::forbid_backing::backing_policy;
use crate::app::http::{http_name, json_name, names_http, open_http, take_http};
use crate::app::messages::{describe, open_messages, prog_name, strerror, warn_probed_raw};
use crate::app::object::{names_object, object_name, open_object, take_object};
use crate::app::qemu_opts::split_noisily;
use crate::app::rbd::{is_rbd_name, names_rbd, open_rbd_name, take_rbd};

/// Opens the image an NBD server exports (at `addr`, as parsed), as
/// QEMU's nbd protocol driver does: its format probed or given, a
/// read-only export refused for writing. The reason on failure, without
/// the "Could not open" that callers put in front.
pub fn open_nbd(addr: Result<NbdAddress, String>, opts: &OpenOptions) -> Result<Image, String> {
    let client = connect_nbd(&addr?, opts.read_only)?;
    // A qcow2 image on an export that names a backing file is refused by
    // `open_storage`: there is no directory to resolve the name against.
    Image::open_storage(Arc::new(client), opts).map_err(|e| describe(&e))
}

/// The name QEMU shows for an image named `name`: an NBD export's in
/// QEMU's URI form (a `json:{"driver":"nbd",...}` name's too: QEMU
/// rebuilds the name of an nbd node from its address alone), an HTTP(S)
/// object's `json:` name that says no more than its URL as that URL, any
/// other as given.
pub fn shown_name(name: &str) -> String {
    if let Some(url) = crate::app::http::plain_url(name) {
        return url;
    }
    if let Some(node) = crate::app::rbd::rbd_node_json(name) {
        return format!("json:{node}");
    }
    if let Some(Ok(addr)) = NbdAddress::parse(name) {
        return addr.display_name();
    }
    let json = name.strip_prefix("json:").and_then(|text| oxqcow::names::parse_json_name(text).ok());
    if let Some(Ok(Some(addr))) = json.map(|mut options| take_nbd_driver(&mut options)) {
        return addr.display_name();
    }
    name.to_string()
}

/// With `driver=nbd` among `options`: the export they name (QEMU's nbd
/// protocol node), `driver` and the address options taken out of them.
pub fn take_nbd_driver(options: &mut Vec<(String, String)>) -> Result<Option<NbdAddress>, String> {
    let driver = options.iter().rev().find(|(k, _)| k == "driver").map(|(_, v)| v.as_str());
    if driver != Some("nbd") {
        return Ok(None);
    }
    options.retain(|(k, _)| k != "driver");
    NbdAddress::from_options(options).map(Some)
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

/// The host file an image name names, as QEMU reads the name: a `file:`
/// (`host_device:`, `host_cdrom:`) prefix is stripped (`file:a:b` is
/// `./a:b`), a colon after a slash is part of the file name, and a name
/// another protocol parses is refused with QEMU's message or, for the
/// protocols QEMU has and oxqcow does not open here, a plain one.
pub fn host_filename(name: &str) -> Result<String, String> {
    match oxqcow::names::parse_image_name(name)? {
        ImageName::File { filename, .. } => Ok(filename),
        ImageName::Json(_) => Err("json: pseudo-filenames are not supported here by oxqcow".into()),
        ImageName::Protocol { driver, .. } => Err(format!("the '{driver}' protocol is not supported by oxqcow")),
    }
}

/// The null device a `null-co://` or `null-aio://` name opens (the only
/// file names QEMU's null drivers take; any other is refused with its
/// message); `None` for other names.
pub fn null_by_name(name: &str) -> Result<Option<Arc<dyn Storage>>, String> {
    match oxqcow::names::parse_image_name(name) {
        Ok(ImageName::Protocol { driver, .. }) if oxqcow::image::is_null_driver(driver) => {
            if name != format!("{driver}://") {
                return Err(format!("The only allowed filename for this driver is '{driver}://'"));
            }
            oxqcow::image::open_null(driver, &[]).map(Some).map_err(|e| describe(&e))
        }
        _ => Ok(None),
    }
}

/// Takes the options under `prefix` (`file.`, `data-file.`, or `""` for
/// the node itself) out of `options` when they name a null device
/// (`null-co`, `null-aio`), and opens it.
pub fn take_null(options: &mut Vec<(String, String)>, prefix: &str) -> Result<Option<Arc<dyn Storage>>, String> {
    let key = format!("{prefix}driver");
    let Some(driver) = options.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone()) else { return Ok(None) };
    if !oxqcow::image::is_null_driver(&driver) {
        return Ok(None);
    }
    let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(options).into_iter().partition(|(k, _)| k.starts_with(prefix));
    *options = rest;
    let mine: Vec<(String, String)> =
        mine.into_iter().filter(|(k, _)| *k != key).map(|(k, v)| (k[prefix.len()..].to_string(), v)).collect();
    oxqcow::image::open_null(&driver, &mine).map(Some).map_err(|e| describe(&e))
}

/// Opens a `json:{...}` image name: a null device itself, or an image
/// whose file and data file may be null devices, with the runtime options
/// the name sets. Errors name the image as given.
fn open_json(name: &str, options: Vec<(String, String)>, opts: OpenOptions) -> Result<Image, String> {
    let fail = |m: String| format!("Could not open '{name}': {m}");
    let mut options = options;
    // `"driver":"nbd"`: the export is the node, its bytes as they are.
    if let Some(addr) = take_nbd_driver(&mut options).map_err(fail)? {
        let (_, _, json_opts) = image_opts_from(options, true).map_err(fail)?;
        let o = OpenOptions {
            format: Some(ImageFormat::Raw),
            read_only: opts.read_only,
            force_share: opts.force_share,
            ..json_opts
        };
        return open_nbd(Ok(addr), &o).map_err(fail);
    }
    if let Some(null) = take_null(&mut options, "").map_err(fail)? {
        let o = OpenOptions { format: Some(ImageFormat::Raw), read_only: opts.read_only, ..OpenOptions::new() };
        return Image::open_storage(null, &o).map_err(|e| fail(describe(&e)));
    }
    // An HTTP(S) object as the node itself: its bytes, as raw reads them.
    if let Some(http) = take_http(&mut options, "").map_err(fail)? {
        let o = OpenOptions { format: Some(ImageFormat::Raw), read_only: opts.read_only, ..OpenOptions::new() };
        let storage = open_http(&http, opts.read_only).map_err(fail)?;
        return Image::open_storage(storage, &o).map_err(|e| fail(describe(&e)));
    }
    // An RBD image as the node itself: its bytes, as raw reads them.
    if let Some(storage) = take_rbd(&mut options, "", opts.read_only, &crate::app::secrets::lookup).map_err(fail)? {
        let o = OpenOptions { format: Some(ImageFormat::Raw), read_only: opts.read_only, ..OpenOptions::new() };
        return Image::open_storage(storage, &o).map_err(|e| fail(describe(&e)));
    }
    // An object in an object store, the same way.
    if let Some(object) = take_object(&mut options, "").map_err(fail)? {
        let o = OpenOptions { format: Some(ImageFormat::Raw), read_only: opts.read_only, ..OpenOptions::new() };
        let storage = open_object(&object, opts.read_only).map_err(fail)?;
        return Image::open_storage(storage, &o).map_err(|e| fail(describe(&e)));
    }
    let file = match take_http(&mut options, "file.").map_err(fail)? {
        Some(http) => Some(open_http(&http, opts.read_only).map_err(fail)?),
        None => match take_rbd(&mut options, "file.", opts.read_only, &crate::app::secrets::lookup).map_err(fail)? {
            Some(rbd) => Some(rbd),
            None => match take_object(&mut options, "file.").map_err(fail)? {
                Some(object) => Some(open_object(&object, opts.read_only).map_err(fail)?),
                None => take_null(&mut options, "file.").map_err(fail)?,
            },
        },
    };
    let children = Children { file, data_file: take_null(&mut options, "data-file.").map_err(fail)? };
    let (path, format, json_opts) = image_opts_from(options, true).map_err(fail)?;
    let path = match (path, &children.file) {
        (Some(p), _) => p,
        (None, Some(_)) => String::new(),
        (None, None) => return Err(fail("A block device must be specified for \"file\"".into())),
    };
    let mut o = OpenOptions { read_only: opts.read_only, force_share: opts.force_share, ..json_opts };
    o.backing = backing_policy(opts.backing);
    o.protocols = protocols();
    o.messages = opts.messages.or_else(|| Some(open_messages()));
    if let Some(f) = format {
        o.format = Some(ImageFormat::from_name(&f).map_err(|e| fail(describe(&e)))?);
    }
    Image::open_with_children(Path::new(&path), &o, children).map_err(|e| match &e {
        oxqcow::Error::Io { op: "opening the image", .. } => fail(format!("Could not open '{path}': {}", describe(&e))),
        _ => fail(describe(&e)),
    })
}

fn open_image_inner(name: &str, format: Option<&str>, opts: OpenOptions) -> Result<Image, String> {
    if let Some(text) = name.strip_prefix("json:") {
        let options = oxqcow::names::parse_json_name(text).map_err(|m| format!("Could not open '{name}': {m}"))?;
        return open_json(name, options, opts);
    }
    let fail = |m: String| format!("Could not open '{name}': {m}");
    if let Some(null) = null_by_name(name).map_err(fail)? {
        let format = format.map(ImageFormat::from_name).transpose().map_err(|e| fail(describe(&e)))?;
        let o = OpenOptions { format, read_only: opts.read_only, ..OpenOptions::new() };
        return Image::open_storage(null, &o).map_err(|e| fail(describe(&e)));
    }
    let mut opts = opts;
    opts.backing = backing_policy(opts.backing);
    opts.protocols = protocols();
    opts.messages.get_or_insert_with(open_messages);
    if let Some(addr) = NbdAddress::parse(name) {
        opts.format = format.map(ImageFormat::from_name).transpose().map_err(|e| fail(describe(&e)))?;
        return open_nbd(addr, &opts).map_err(fail);
    }
    if let Some(http) = http_name(name) {
        opts.format = format.map(ImageFormat::from_name).transpose().map_err(|e| fail(describe(&e)))?;
        let storage = open_http(&http, opts.read_only).map_err(fail)?;
        // As on an NBD export, a backing file the image names is refused.
        return Image::open_storage(storage, &opts).map_err(|e| fail(describe(&e)));
    }
    if is_rbd_name(name) {
        opts.format = format.map(ImageFormat::from_name).transpose().map_err(|e| fail(describe(&e)))?;
        let storage = open_rbd_name(name, opts.read_only).map_err(fail)?;
        return Image::open_storage(storage, &opts).map_err(|e| fail(describe(&e)));
    }
    if let Some(object) = object_name(name) {
        opts.format = format.map(ImageFormat::from_name).transpose().map_err(|e| fail(describe(&e)))?;
        let storage = open_object(&object, opts.read_only).map_err(fail)?;
        return Image::open_storage(storage, &opts).map_err(|e| fail(describe(&e)));
    }
    let host = host_filename(name).map_err(fail)?;
    let path = host.as_str();
    if Path::new(path).is_dir() {
        return Err(format!("Could not open '{name}': 'file' driver requires '{path}' to be a regular file"));
    }
    if let Some(f) = format {
        opts.format =
            Some(ImageFormat::from_name(f).map_err(|e| format!("Could not open '{name}': {}", describe(&e)))?);
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
                format!("Could not open '{name}': Could not open '{path}': {}", describe(&e))
            }
            _ => format!("Could not open '{name}': {}", describe(&e)),
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
            // The engine opened it and reports its own failure.
            return None;
        }
        if let Some(opened) = protocols().and_then(|p| p.open_backing(&name)) {
            // A protocol's reason is its driver's own, as QEMU's; a
            // protocol layer names no further backing file it could open.
            return opened.err().map(|e| format!("{prefix}{}", describe(&e)));
        }
        let next = resolve_backing_path(&layer_path, &name);
        let next_format = match info.backing_format.as_deref().map(ImageFormat::from_name) {
            None => None,
            // A file-posix driver reads the host file as raw does.
            Some(Err(_)) if info.backing_format.as_deref().is_some_and(oxqcow::image::is_host_driver) => {
                Some(ImageFormat::Raw)
            }
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
    let mut names = vec![shown_name(filename)];
    let mut layer = image;
    while let Some(q) = layer.as_qcow2() {
        let (Some(name), Some(backing)) = (q.info().backing_file, q.backing()) else { break };
        let last = names.last().expect("never empty");
        names.push(backing_filename(last, &name));
        layer = backing;
    }
    names
}

/// The name QEMU gives the backing file `name` recorded by the image named
/// `overlay`: a protocol's name as it is, a file's relative to the
/// overlay's directory.
pub fn backing_filename(overlay: &str, name: &str) -> String {
    if is_protocol_name(name) {
        return shown_name(name);
    }
    resolve_backing_path(Path::new(overlay), name).to_string_lossy().into_owned()
}

/// Closes an image as qemu-img's `blk_unref` does: persistent bitmaps
/// that cannot be stored were reported by the image's message sink ("Lost
/// persistent bitmaps during inactivation ...") and do not fail the
/// command (only `commit` and `bitmap` learn of it, by inactivating
/// first); any other failure is returned.
pub fn close_image(image: Image) -> oxqcow::Result<()> {
    match image.close() {
        Err(oxqcow::Error::BitmapsLost(_)) => Ok(()),
        r => r,
    }
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
    if !spec.contains('=') {
        return Err(fail(format!("Cannot find device='{spec}' nor node-name='{spec}'")));
    }
    let mut options = split_noisily(&prog_name(), spec);
    // `driver=nbd`: the export is the image, read as raw (QEMU's protocol
    // node); what is left are the generic options.
    if let Some(addr) = take_nbd_driver(&mut options).map_err(fail)? {
        let (_, _, opts) = image_opts_from(options, io).map_err(fail)?;
        return Ok((addr.to_name(), Some("raw".into()), opts));
    }
    // An HTTP(S) object: its options go on whole, as a `json:` name.
    if names_http(&options) || names_rbd(&options) || names_object(&options) {
        return Ok((json_name(&options), None, OpenOptions::new()));
    }
    let (path, format, opts) = image_opts_from(options, io).map_err(fail)?;
    // `driver=file`: the protocol node alone, its bytes as they are.
    let format = format.map(|f| if f == "file" { "raw".to_string() } else { f });
    let Some(path) = path else {
        return Err(fail("A block device must be specified for \"file\"".to_string()));
    };
    Ok((path, format, opts))
}

/// Whether an `--image-opts` string opens a protocol node (`driver=file`,
/// `driver=nbd`, `driver=http`) rather than a format on top of one: qemu-img info then
/// describes that node alone.
pub fn image_opts_protocol(spec: &str) -> bool {
    let options = oxqcow::qemu_syntax::split_options(spec);
    options.iter().rev().find(|(k, _)| k == "driver").is_some_and(|(_, v)| {
        matches!(v.as_str(), "file" | "nbd" | "http" | "https" | "rbd") || crate::app::object::is_object_driver(v)
    })
}

/// The file name, the format and the open options that flattened image
/// options (an `--image-opts` string's, a `json:` name's) set.
fn image_opts_from(
    options: Vec<(String, String)>,
    io: bool,
) -> Result<(Option<String>, Option<String>, OpenOptions), String> {
    let mut options = options;
    let mut opts = OpenOptions::new();
    opts.raw_windows = oxqcow::options::take_raw_windows(&mut options)?;
    let mut path = None;
    let mut format = None;
    // Options no driver takes, and qcow2's, which raw does not take: QEMU
    // names the format that refuses them, so they are judged at the end.
    let mut unknown = None;
    let mut qcow2_keys = Vec::new();
    for (key, value) in options {
        match key.as_str() {
            "file.filename" | "filename" | "file" => path = Some(host_filename(&value)?),
            "driver" => format = Some(value),
            "file.driver" if value == "file" => {}
            "file.driver" => return Err(format!("Unknown protocol '{value}'")),
            k if !io && k.ends_with("key-secret") => {}
            _ if crate::app::secrets::apply_open_option(&mut opts, &key, &value)? => {}
            _ => match opts.apply_qemu_option(&key, &value) {
                Err(e) if describe(&e).starts_with("Invalid parameter") => {
                    unknown.get_or_insert(key);
                }
                Err(e) => return Err(describe(&e)),
                Ok(()) if oxqcow::options::is_qcow2_option(&key) => qcow2_keys.push(key),
                Ok(()) => {}
            },
        }
    }
    if let Some(rest) = unknown.as_deref().and_then(|k| k.strip_prefix("file.")) {
        return Err(format!("Block protocol 'file' doesn't support the option '{rest}'"));
    }
    let refused = unknown.or_else(|| qcow2_keys.into_iter().next());
    if let Some(key) = refused {
        let probed = || {
            let file = oxqcow::FileStorage::open(Path::new(path.as_deref()?), false).ok()?;
            let probed = oxqcow::probe(&file, None).ok()?;
            oxqcow::supported_format(probed).ok().map(|f| f.name().to_string())
        };
        match format.clone().or_else(probed) {
            Some(f) if f != "qcow2" || !oxqcow::options::is_qcow2_option(&key) => {
                return Err(format!("Block format '{f}' does not support the option '{key}'"))
            }
            Some(_) => {}
            None => return Err(format!("Invalid parameter '{key}'")),
        }
    }
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
        // An RBD image is named by its node's `json:` name, as QEMU names it.
        warn_probed_raw(&crate::app::rbd::rbd_node_json(&path).map_or(path, |node| format!("json:{node}")));
    }
    Ok(image)
}
