//! Opening an image as qemu-io does (for `io`, and `bench`, which takes
//! the same flags): qemu-io's open flags (`-r -s -n -t -i -d -U`),
//! `-o`/`--image-opts` option strings, format probing with QEMU's raw
//! warning, and `-s`'s throwaway overlay (a qcow2 image in memory whose
//! backing image is the file, so nothing reaches the file).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use oxqcow::backing::BackingPolicy;
use oxqcow::options::CacheMode;
use oxqcow::{
    supported_format, BlockDevice, Children, CreateOptions, FileStorage, Image, ImageFormat, MemoryStorage,
    OpenOptions, Probed, Qcow2, Storage,
};

use oxqcow_nbd::client::NbdAddress;

use crate::app::forbid_backing::backing_policy;
use crate::app::http::{http_name, open_http, take_http};
use crate::app::image::{connect_nbd, host_filename, null_by_name, shown_name, take_nbd_driver, take_null};
use crate::app::messages::{describe, errno_text, io_error_text, open_messages, warn_probed_raw};
use crate::app::object::{object_name, open_object, take_object};
use crate::app::rbd::{is_rbd_name, open_rbd_name, take_rbd};

/// How to open an image: qemu-io's flags plus driver options.
#[derive(Clone, Debug)]
pub struct OpenSpec {
    /// Open read-only.
    pub read_only: bool,
    /// Write into a throwaway overlay (`-s`).
    pub snapshot: bool,
    /// `-U`: share the image with writers (only allowed read-only).
    pub force_share: bool,
    /// `cache.direct`: bypass the host page cache (the engine always uses
    /// buffered I/O, which gives the same content).
    pub direct: bool,
    /// Flush after every write (qemu-io's default `writethrough` cache mode).
    pub writethrough: bool,
    /// `cache=unsafe`: ignore flushes.
    pub no_flush: bool,
    /// `aio=native`, which QEMU allows only with `cache.direct`.
    pub native_aio: bool,
    /// Pass discard requests to the host file (`-d unmap`, qemu-io's default).
    pub unmap: bool,
    /// `-C`: reads copy what the image does not allocate itself into it.
    pub copy_on_read: bool,
    /// `key=value` options from `-o`, `-f` or `--image-opts`.
    pub options: Vec<(String, String)>,
}

impl OpenSpec {
    /// The defaults of qemu-io's command line and of its `open` command.
    pub fn for_command_line() -> OpenSpec {
        OpenSpec {
            read_only: false,
            snapshot: false,
            force_share: false,
            direct: false,
            writethrough: true,
            no_flush: false,
            native_aio: false,
            unmap: true,
            copy_on_read: false,
            options: Vec::new(),
        }
    }

    /// Applies one of the open flags shared by the command line and the
    /// `open` command; the error is the message to print.
    pub fn apply_flag(&mut self, flag: char, value: &str) -> Result<(), String> {
        match flag {
            'r' => self.read_only = true,
            's' => self.snapshot = true,
            'U' => self.force_share = true,
            'n' => {
                self.direct = true;
                self.writethrough = false;
                self.no_flush = false;
            }
            'k' => self.native_aio = true,
            'C' => self.copy_on_read = true,
            't' => self.set_cache(value).map_err(|()| format!("Invalid cache option: {value}"))?,
            'i' => self.set_aio(value).map_err(|()| format!("Invalid aio option: {value}"))?,
            'd' => self.set_discard(value).map_err(|()| format!("Invalid discard option: {value}"))?,
            other => return Err(format!("unexpected open flag '{other}'")),
        }
        Ok(())
    }

    fn set_cache(&mut self, mode: &str) -> Result<(), ()> {
        let (direct, writethrough, no_flush) = match mode {
            "off" | "none" => (true, false, false),
            "directsync" => (true, true, false),
            "writeback" => (false, false, false),
            "unsafe" => (false, false, true),
            "writethrough" => (false, true, false),
            _ => return Err(()),
        };
        self.direct = direct;
        self.writethrough = writethrough;
        self.no_flush = no_flush;
        Ok(())
    }

    fn set_aio(&mut self, mode: &str) -> Result<(), ()> {
        self.native_aio = match mode {
            "native" => true,
            "threads" | "io_uring" => false,
            _ => return Err(()),
        };
        Ok(())
    }

    fn set_discard(&mut self, mode: &str) -> Result<(), ()> {
        self.unmap = match mode {
            "off" | "ignore" => false,
            "on" | "unmap" => true,
            _ => return Err(()),
        };
        Ok(())
    }
}

impl OpenSpec {
    /// The engine's cache mode for these flags.
    pub fn cache_mode(&self) -> CacheMode {
        match (self.no_flush, self.direct, self.writethrough) {
            (true, _, _) => CacheMode::Unsafe,
            (false, true, true) => CacheMode::DirectSync,
            (false, true, false) => CacheMode::None,
            (false, false, true) => CacheMode::Writethrough,
            (false, false, false) => CacheMode::Writeback,
        }
    }
}

/// An open image.
pub struct Opened {
    /// The image (for `-s`, the in-memory overlay).
    pub image: Image,
    /// Discard requests reach the image (QEMU's `BDRV_O_UNMAP`); without
    /// it, discards do nothing and zero writes may not unmap.
    pub unmap: bool,
    /// Reads copy into the image what it does not allocate (`-C`).
    pub copy_on_read: bool,
    /// The driver of a null device opened as the node itself (`json:{"driver":
    /// "null-co"}`, `-f null-co`), which `info` names as QEMU does.
    pub null_node: Option<String>,
}

impl Opened {
    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.image.is_read_only()
    }

    /// Reads at guest `offset`; with copy-on-read, first copies what the
    /// image does not allocate itself (from its backing image, or zeros)
    /// into it, over whole (sub)clusters as QEMU's copy-on-read does; zeros
    /// are written as zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> oxqcow::Result<()> {
        if self.copy_on_read && !buf.is_empty() {
            if let Some(q) = self.image.as_qcow2() {
                let unit = q.geometry().subcluster_size();
                let size = self.image.len();
                let start = offset / unit * unit;
                let end = (offset + buf.len() as u64).div_ceil(unit).saturating_mul(unit).min(size);
                if start < end {
                    self.copy_unallocated(start, end)?;
                }
            }
        }
        self.image.read_at(buf, offset)
    }

    fn copy_unallocated(&self, start: u64, end: u64) -> oxqcow::Result<()> {
        // QEMU's bounce buffer bounds each copy the same way.
        const PIECE: u64 = 1 << 20;
        let mut pos = start;
        for e in self.image.block_status(start, end - start)? {
            let e_end = pos + e.length;
            if !(e.present && e.depth == 0) {
                while pos < e_end {
                    let n = PIECE.min(e_end - pos);
                    let mut bounce = vec![0u8; n as usize];
                    self.image.read_at(&mut bounce, pos)?;
                    if bounce.iter().all(|&b| b == 0) {
                        self.image.write_zeroes_at(pos, n, false)?;
                    } else {
                        self.image.write_at(&bounce, pos)?;
                    }
                    pos += n;
                }
            }
            pos = e_end;
        }
        Ok(())
    }

    /// Flushes (unless `cache=unsafe`) and closes.
    pub fn close(self) -> Result<(), String> {
        crate::app::image::close_image(self.image).map_err(|e| describe(&e))
    }
}

fn parse_bool(key: &str, value: &str) -> Result<bool, String> {
    oxqcow::options::parse_bool(key, value).map_err(|e| describe(&e))
}

/// Opens an image as qemu-io's `openfile` does. `name` is the file name
/// given on the command line (`None` when the options carry it). The
/// error is the text after "can't open device NAME: ".
pub fn open(spec: &OpenSpec, name: Option<&str>, secrets: &HashMap<String, Vec<u8>>) -> Result<Opened, String> {
    let mut spec = spec.clone();
    let mut options = std::mem::take(&mut spec.options);
    // A `json:` name sets options as `-o` does (before them); another name
    // is a host file's, prefix stripped.
    let mut path = match name.map(|n| (n, n.strip_prefix("json:"))) {
        Some((_, Some(text))) => {
            let mut json = oxqcow::names::parse_json_name(text)?;
            json.append(&mut options);
            options = json;
            None
        }
        Some((n, None)) => match null_by_name(n)? {
            Some(null) => {
                let format = options.iter().find(|(k, _)| k == "driver").map(|(_, v)| v.as_str());
                let format = format.map(ImageFormat::from_name).transpose().map_err(|e| describe(&e))?;
                let o = OpenOptions { format, read_only: spec.read_only, ..OpenOptions::new() };
                let image = Image::open_storage(null, &o).map_err(|e| describe(&e))?;
                if o.format.is_none() && !o.read_only {
                    warn_probed_raw(n);
                }
                return Ok(Opened { image, unmap: spec.unmap, copy_on_read: spec.copy_on_read, null_node: None });
            }
            // An NBD name stays whole: it is connected to below.
            None if NbdAddress::parse(n).is_some()
                || http_name(n).is_some()
                || is_rbd_name(n)
                || object_name(n).is_some() =>
            {
                Some(n.to_string())
            }
            None => Some(host_filename(n)?),
        },
        None => None,
    };
    // The null devices QEMU's null-co and null-aio drivers open: the
    // node itself, or the image's data file.
    if let Some(null) = take_null(&mut options, "")? {
        let driver = null.driver_name().to_string();
        let o = OpenOptions { format: Some(ImageFormat::Raw), read_only: spec.read_only, ..OpenOptions::new() };
        let image = Image::open_storage(null, &o).map_err(|e| describe(&e))?;
        return Ok(Opened { image, unmap: spec.unmap, copy_on_read: spec.copy_on_read, null_node: Some(driver) });
    }
    // An HTTP(S) object as the node itself, read as raw.
    if let Some(http) = take_http(&mut options, "")? {
        let storage = open_http(&http, spec.read_only || spec.snapshot)?;
        let o = OpenOptions { format: Some(ImageFormat::Raw), read_only: true, ..OpenOptions::new() };
        let image = Image::open_storage(storage, &o).map_err(|e| describe(&e))?;
        return Ok(Opened { image, unmap: spec.unmap, copy_on_read: spec.copy_on_read, null_node: None });
    }
    let lookup = |id: &str| secrets.get(id).cloned().ok_or_else(|| format!("No secret with id '{id}'"));
    // An RBD image as the node itself, read as raw.
    if let Some(storage) = take_rbd(&mut options, "", spec.read_only || spec.snapshot, &lookup)? {
        let o = OpenOptions { format: Some(ImageFormat::Raw), read_only: spec.read_only, ..OpenOptions::new() };
        let image = Image::open_storage(storage, &o).map_err(|e| describe(&e))?;
        return Ok(Opened { image, unmap: spec.unmap, copy_on_read: spec.copy_on_read, null_node: None });
    }
    // An object in an object store, the same way.
    if let Some(object) = take_object(&mut options, "")? {
        let storage = open_object(&object, spec.read_only || spec.snapshot)?;
        let o = OpenOptions { format: Some(ImageFormat::Raw), read_only: true, ..OpenOptions::new() };
        let image = Image::open_storage(storage, &o).map_err(|e| describe(&e))?;
        return Ok(Opened { image, unmap: spec.unmap, copy_on_read: spec.copy_on_read, null_node: None });
    }
    let data_file = take_null(&mut options, "data-file.")?;
    let mut file_child = match take_http(&mut options, "file.")? {
        Some(http) => Some(open_http(&http, spec.read_only || spec.snapshot)?),
        None => match take_rbd(&mut options, "file.", spec.read_only || spec.snapshot, &lookup)? {
            Some(rbd) => Some(rbd),
            None => match take_object(&mut options, "file.")? {
                Some(object) => Some(open_object(&object, spec.read_only || spec.snapshot)?),
                None => take_null(&mut options, "file.")?,
            },
        },
    };
    // Raw nodes with `offset`/`size`: windows the engine puts over the file.
    let raw_windows = oxqcow::options::take_raw_windows(&mut options)?;
    // A format as the file's driver: that image, opened from the `file.*`
    // options, is this one's file (QEMU's nested format nodes).
    let nested = options.iter().any(|(k, v)| k == "file.driver" && ImageFormat::from_name(v).is_ok());
    if nested {
        let (inner, rest): (Vec<_>, Vec<_>) = options.into_iter().partition(|(k, _)| k.starts_with("file."));
        options = rest;
        let inner_options = inner.into_iter().map(|(k, v)| (k["file.".len()..].to_string(), v)).collect();
        let inner_spec = OpenSpec { options: inner_options, snapshot: false, ..spec.clone() };
        let opened = open(&inner_spec, None, secrets)?;
        file_child = Some(Arc::new(oxqcow::image::ImageStorage(opened.image)));
    }
    if path.is_none() && file_child.is_some() {
        path = Some(String::new());
    }
    // `driver=nbd`: the export, read as raw (QEMU's protocol node).
    let mut nbd_driver = None;
    if let Some(addr) = take_nbd_driver(&mut options)? {
        options.push(("driver".into(), "raw".into()));
        path = Some(addr.to_name());
        // Connected to below, whole: its name may not say all of it
        // (`x-dirty-bitmap`).
        nbd_driver = Some(addr);
    }
    let mut driver: Option<String> = None;
    let mut runtime: Vec<(String, String)> = Vec::new();
    let mut passphrase = None;
    let mut backing_passphrase = None;
    let mut key_secret = None;
    for (key, value) in options {
        match key.as_str() {
            "driver" => driver = Some(value),
            "file.filename" | "filename" => {
                if path.is_none() {
                    path = Some(value);
                }
            }
            "file" => {
                if path.is_none() {
                    path = Some(value);
                }
            }
            "file.driver" => {
                if value != "file" {
                    return Err(format!("protocol driver '{value}' is not supported by oxqcow (only 'file' is)"));
                }
            }
            "aio" | "file.aio" => spec.set_aio(&value).map_err(|()| format!("Invalid aio option: {value}"))?,
            "discard" => spec.set_discard(&value).map_err(|()| format!("Invalid discard option: {value}"))?,
            "read-only" => spec.read_only = parse_bool(&key, &value)?,
            "force-share" => spec.force_share = parse_bool(&key, &value)?,
            "cache.direct" | "file.cache.direct" => spec.direct = parse_bool(&key, &value)?,
            "cache.no-flush" | "file.cache.no-flush" => spec.no_flush = parse_bool(&key, &value)?,
            "encrypt.key-secret" | "backing.encrypt.key-secret" | "key-secret" => {
                let Some(secret) = secrets.get(&value) else {
                    return Err(format!("No secret with id '{value}'"));
                };
                let slot = match key.as_str() {
                    "encrypt.key-secret" => &mut passphrase,
                    "key-secret" => &mut key_secret,
                    _ => &mut backing_passphrase,
                };
                *slot = Some(secret.clone());
            }
            "encrypt.format" => {}
            // Names for QMP, which oxqcow has no use for; `reopen` keeps
            // them unchanged as QEMU's does.
            k if NODE_NAMES.contains(&k) => check_node_name(&value)?,
            _ => runtime.push((key, value)),
        }
    }
    // `driver=file` is the protocol layer alone: the bytes as they are.
    let protocol_only = driver.as_deref() == Some("file");
    let Some(path) = path else {
        return Err(match driver {
            Some(_) => "A block device must be specified for \"file\"".into(),
            None => "Must specify either driver or file".into(),
        });
    };
    if spec.copy_on_read && spec.read_only {
        return Err("Can't use copy-on-read on read-only device".into());
    }
    if spec.force_share && !spec.read_only {
        return Err("force-share=on can only be used with read-only images".into());
    }
    if spec.native_aio && !spec.direct {
        return Err("aio=native was specified, but it requires cache.direct=on, which was not specified.".into());
    }
    let explicit = match driver.as_deref() {
        None => None,
        Some("file") => Some(ImageFormat::Raw),
        Some(d) => Some(ImageFormat::from_name(d).map_err(|e| describe(&e))?),
    };
    // An NBD export is the image's file: connected to once, and probed
    // and opened through that connection.
    let shown = shown_name(&path);
    if file_child.is_none() {
        if let Some(addr) = nbd_driver.map(Ok).or_else(|| NbdAddress::parse(&path)) {
            file_child = Some(Arc::new(connect_nbd(&addr?, spec.read_only || spec.snapshot)?));
        } else if let Some(http) = http_name(&path) {
            file_child = Some(open_http(&http, spec.read_only || spec.snapshot)?);
        } else if is_rbd_name(&path) {
            file_child = Some(open_rbd_name(&path, spec.read_only || spec.snapshot)?);
        } else if let Some(object) = object_name(&path) {
            file_child = Some(open_object(&object, spec.read_only || spec.snapshot)?);
        }
    }
    let probed = if let Some(file) = &file_child {
        oxqcow::probe(&**file, None).map_err(|e| describe(&e))?
    } else {
        let storage = FileStorage::open(Path::new(&path), false)
            .map_err(|e| format!("Could not open '{path}': {}", io_error_text(&e)))?;
        if storage.file().metadata().is_ok_and(|m| m.is_dir()) {
            // QEMU's read-write open fails in open(2); read-only it checks.
            return Err(if spec.read_only || spec.snapshot {
                format!("'file' driver requires '{path}' to be a regular file")
            } else {
                format!("Could not open '{path}': Is a directory")
            });
        }
        let mut seen: Arc<dyn oxqcow::Storage> = Arc::new(storage);
        for w in raw_windows.iter().rev() {
            seen = Arc::new(oxqcow::storage::WindowStorage::new(seen, w.offset, w.size)?);
        }
        oxqcow::probe(&*seen, Some(Path::new(&path))).map_err(|e| describe(&e))?
    };
    if explicit == Some(ImageFormat::Qcow2) && probed != Probed::Qcow2 {
        return Err("Image is not in qcow2 format".into());
    }
    // A format named on the command line is used as named (raw opens any
    // file); a probed one must be one oxqcow implements.
    let format = match explicit {
        Some(f) => f,
        None => supported_format(probed).map_err(|e| describe(&e))?,
    };
    let format_name = if protocol_only { "file" } else { format.name() };

    // Left unset when probed, so that the engine guards a probed raw
    // image's first sector.
    let mut opts = OpenOptions { format: explicit, raw_windows, ..OpenOptions::new() };
    opts.read_only = spec.read_only || spec.snapshot;
    opts.discard_passthrough = spec.unmap;
    opts.unmap = spec.unmap;
    opts.cache = spec.cache_mode();
    opts.force_share = spec.force_share;
    opts.passphrase = passphrase;
    opts.backing_passphrase = backing_passphrase;
    opts.key_secret = key_secret;
    opts.messages = Some(open_messages());
    if protocol_only {
        opts.backing = BackingPolicy::Ignore;
    }
    // `oxqcow --forbid-backing io ...` refuses images with backing files.
    opts.backing = backing_policy(opts.backing);
    opts.protocols = crate::app::backing_protocols::protocols();
    overlap_conflict(&runtime)?;
    for (key, value) in &runtime {
        let unsupported = || format!("Block format '{format_name}' does not support the option '{key}'");
        if format != ImageFormat::Qcow2 && oxqcow::options::is_qcow2_option(key) {
            return Err(unsupported());
        }
        if let Err(e) = opts.apply_qemu_option(key, value) {
            let msg = describe(&e);
            return Err(if msg.starts_with("Invalid parameter") { unsupported() } else { msg });
        }
    }
    let children = Children { file: file_child, data_file };
    let image = Image::open_with_children(Path::new(&path), &opts, children).map_err(|e| match &e {
        oxqcow::Error::Io { op: "opening the image", source, .. } => {
            format!("Could not open '{path}': {}", io_error_text(source))
        }
        _ => describe(&e),
    })?;
    // QEMU warns (and guards sector 0) only when the probed image is writable.
    if explicit.is_none() && format == ImageFormat::Raw && !opts.read_only {
        warn_probed_raw(&shown);
    }
    let image = if spec.snapshot { temporary_overlay(image, &opts, spec.read_only)? } else { image };
    Ok(Opened { image, unmap: spec.unmap, copy_on_read: spec.copy_on_read, null_node: None })
}

/// The node-name options qemu-io accepts: the image's, its file's and its
/// backing image's.
const NODE_NAMES: &[&str] = &["node-name", "file.node-name", "backing.node-name"];

/// QEMU's rule for node names (`id_wellformed`): a letter, then letters,
/// digits, '-', '.' and '_'.
fn check_node_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let well_formed = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
    if well_formed {
        Ok(())
    } else {
        Err(format!("Invalid node-name: '{name}'"))
    }
}

/// QEMU refuses `overlap-check` and `overlap-check.template` naming
/// different modes, before it looks at either value.
fn overlap_conflict(runtime: &[(String, String)]) -> Result<(), String> {
    let get = |k: &str| runtime.iter().rev().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    match (get("overlap-check"), get("overlap-check.template")) {
        (Some(mode), Some(template)) if mode != template => Err(format!(
            "Conflicting values for qcow2 options 'overlap-check' ('{mode}') and 'overlap-check.template' ('{template}')"
        )),
        _ => Ok(()),
    }
}

/// Whether opening a `format` image takes option `key`: what `reopen`
/// may change (any other option, QEMU says, cannot be changed).
pub fn takes_option(format: ImageFormat, key: &str) -> bool {
    const GENERIC: &[&str] = &[
        "read-only",
        "auto-read-only",
        "force-share",
        "discard",
        "aio",
        "file.aio",
        "cache.direct",
        "file.cache.direct",
        "cache.no-flush",
        "file.cache.no-flush",
        "encrypt.key-secret",
        "backing.encrypt.key-secret",
        "encrypt.format",
    ];
    if GENERIC.contains(&key) {
        return true;
    }
    if format != ImageFormat::Qcow2 && oxqcow::options::is_qcow2_option(key) {
        return false;
    }
    // The engine names the options it does not know "Invalid parameter".
    !matches!(OpenOptions::new().apply_qemu_option(key, ""),
        Err(oxqcow::Error::InvalidArgument(m)) if m.starts_with("Invalid parameter"))
}

/// `-s`: a qcow2 overlay in memory over the image, which is open read-only.
fn temporary_overlay(base: Image, base_opts: &OpenOptions, read_only: bool) -> Result<Image, String> {
    let fail = |e: oxqcow::Error| format!("Could not create temporary overlay: {}", errno_text(&e));
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    Qcow2::create(storage.clone(), &CreateOptions::qcow2(base.len())).and_then(Qcow2::close).map_err(fail)?;
    let opts = OpenOptions { read_only, cache: base_opts.cache, ..OpenOptions::new() };
    let overlay = Qcow2::open_with_backing(storage, &opts, Some(Arc::new(base))).map_err(fail)?;
    overlay.set_cache_mode(opts.cache).map_err(fail)?;
    Ok(Image::Qcow2(overlay))
}
