//! `info`: describe an image (`qemu-img info`).
//!
//! The facts are gathered once into qemu's `BlockGraphInfo` shape as a JSON
//! value (keys inserted in QAPI schema order); `--output=json` prints it
//! and the human output is rendered from the same value, including the
//! "Format specific information" section, which qemu-img dumps from the
//! same dictionary in the same order.

use std::path::Path;

use oxqcow::backing::BackingPolicy;
use oxqcow::format::luks::LuksHeader;
use oxqcow::format::qcow::QcowHeader;
use oxqcow::format::SnapshotEntry;
use oxqcow::{probe_format, FileStorage, Image, ImageFormat, Luks, OpenOptions, Qcow, Qcow2, Qcow2Info, Storage};
use serde_json::{json, Map, Value};

use crate::app::ctx::Ctx;
use crate::app::getopt::{HasArg, Opt};
use crate::app::image::open_image;
use crate::app::output::{print_json, size_to_str, OutputFormat};
use crate::app::snapshot_table::{snapshot_header, snapshot_line};
use crate::app::CommonOpts;

const SPEC: &[Opt] = &[
    // In qemu-img's order, which ambiguity messages list.
    Opt::both('h', "help", HasArg::No),
    Opt::both('f', "format", HasArg::Required),
    Opt::long("output", HasArg::Required),
    Opt::both('b', "backing-chain", HasArg::No),
    Opt::long("object", HasArg::Required),
    Opt::long("image-opts", HasArg::No),
    Opt::both('U', "force-share", HasArg::No),
];

const HELP: &str = "\
Display information about an image.  Usage:

  PROG info [-f FMT | --image-opts] [-b] [-U] [--object OBJDEF]
        [--output human|json] FILENAME

  -f, --format FMT        format of FILENAME (probed when omitted)
  --image-opts            FILENAME is an option string (driver=...,file.filename=...)
  -b, --backing-chain     describe the whole backing chain
  -U, --force-share       open the image in shared mode
  --object OBJDEF         QEMU user-creatable object (eg encryption key)
  --output human|json     output format (default human)
";

/// Runs `info`.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    let p = match ctx.getopt("info", args, SPEC) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let mut common = CommonOpts::default();
    let mut output = OutputFormat::Human;
    let mut chain = false;
    for (key, value) in p.opts {
        let value = value.unwrap_or_default();
        match key.as_str() {
            "h" => {
                print!("{}", HELP.replace("PROG", &ctx.prog));
                return 0;
            }
            "b" => chain = true,
            "output" => match OutputFormat::parse(&value) {
                Ok(o) => output = o,
                Err(msg) => return ctx.usage_error("info", &msg),
            },
            _ => {
                if let Err(msg) = common.consume(&key, &value) {
                    return ctx.fail(&msg);
                }
            }
        }
    }
    let (fmt, image_opts, force_share) = (common.format, common.image_opts, common.force_share);
    let [filename] = p.operands.as_slice() else {
        return ctx.usage_error("info", "Expecting one image file name");
    };
    if image_opts && fmt.is_some() {
        return ctx.fail("--image-opts and --format are mutually exclusive");
    }
    let (path, format, opts) = if image_opts {
        match crate::app::image::parse_image_opts_no_io(filename) {
            Ok(v) => v,
            Err(msg) => return ctx.fail(&msg),
        }
    } else {
        // The image is named as QEMU names the node: without a `file:`
        // prefix, and by its file's name when a `json:` name says no more
        // than the format and the file.
        match plain_json(filename) {
            Some((path, json_fmt)) => (path, json_fmt.or(fmt), OpenOptions::new()),
            None => {
                let host = crate::app::image::host_filename(filename).unwrap_or_else(|_| filename.clone());
                (host, fmt, OpenOptions::new())
            }
        }
    };
    let mut infos = Vec::new();
    let first_path = path.clone();
    let (mut path, mut format, mut opts) = (path, format, opts.read_only(true));
    opts.force_share |= force_share;
    let mut layers = oxqcow::backing::Chain::new();
    loop {
        if let Err(e) = layers.enter(Path::new(&path)) {
            return ctx.fail(&crate::app::messages::describe(&e));
        }
        let source = match open_source(&path, format.as_deref(), opts) {
            Ok(s) => s,
            // `--image-opts` of an HTTP(S) object open as a `json:` name;
            // the message names the options as given.
            Err(msg) if image_opts && infos.is_empty() && path.starts_with("json:") => {
                return ctx.fail(&msg.replacen(&format!("'{path}'"), &format!("'{filename}'"), 1))
            }
            Err(msg) => return ctx.fail(&msg),
        };
        let mut info = match graph_info(&path, &source) {
            Ok(v) => v,
            Err(msg) => return ctx.fail(&msg),
        };
        // A protocol node opened by its driver is described alone (an rbd
        // node named by a `json:` name too).
        let rbd_node_alone =
            path.starts_with("json:") && crate::app::rbd::rbd_node(&path).is_some_and(|(_, format)| format.is_none());
        if infos.is_empty() && (rbd_node_alone || image_opts && crate::app::image::image_opts_protocol(filename)) {
            if let Some(file) = info.pointer("/children/0/info").cloned() {
                info = file;
            }
        }
        let backing = info.get("full-backing-filename").and_then(Value::as_str).map(String::from);
        let backing_format = info.get("backing-filename-format").and_then(Value::as_str).map(String::from);
        infos.push(info);
        match backing {
            // --forbid-backing: the header is described, its backing file never opened.
            Some(b) if chain && crate::app::forbid_backing::backing_forbidden() => {
                return ctx.fail(&format!(
                    "Could not open '{b}': '{path}' has a backing file and opening backing files is forbidden"
                ));
            }
            Some(b) if chain => {
                path = b;
                format = backing_format;
                opts = OpenOptions::new().read_only(true);
                opts.force_share = force_share;
            }
            _ => break,
        }
    }
    let probed = infos[0].get("format").and_then(Value::as_str).map(String::from);
    if let Some((top, file)) = http_json_filenames(&first_path, probed) {
        infos[0]["filename"] = json!(top);
        if let Some(child) = infos[0].pointer_mut("/children/0/info/filename") {
            *child = json!(file);
        }
    }
    // An RBD image: its format node named by its rbd node (which
    // `shown_name` gave the file), as QEMU names them.
    let format = infos[0].get("format").and_then(Value::as_str).unwrap_or("raw").to_string();
    if let Some(top) = crate::app::rbd::rbd_image_json(&first_path, &format) {
        infos[0]["filename"] = json!(top);
    }
    if image_opts {
        if let Some(name) = strong_json_filename(filename, &infos[0]) {
            infos[0]["filename"] = json!(name);
        }
    }
    match (output, chain) {
        (OutputFormat::Json, false) => print_json(&infos[0]),
        (OutputFormat::Json, true) => print_json(&Value::Array(infos)),
        (OutputFormat::Human, _) => {
            let text: Vec<String> = infos.iter().map(|i| human(i, 0, "/")).collect();
            print!("{}", text.join("\n"));
        }
    }
    0
}

/// The name QEMU gives an image opened with options that change what it
/// reads (a driver's "strong" runtime options: the secret, qcow2's and
/// qcow's `encrypt.key-secret`, luks's `key-secret`): `json:` and the
/// options as a JSON object, members in QEMU's QDict order; `None` without
/// such an option (the file name stands).
fn strong_json_filename(spec: &str, info: &Value) -> Option<String> {
    let format = info.get("format")?.as_str()?;
    let strong = if format == "luks" { "key-secret" } else { "encrypt.key-secret" };
    let pairs = oxqcow::qemu_syntax::split_options(spec);
    let secret = pairs.iter().rev().find(|(k, _)| k == strong)?.1.clone();
    let file = info.get("children")?.get(0)?.get("info")?.get("filename")?.as_str()?;
    let file_obj = crate::app::qjson::qdict_compact(vec![
        ("driver", json!("file").to_string()),
        ("filename", json!(file).to_string()),
    ]);
    let top = crate::app::qjson::qdict_compact(vec![
        ("driver", json!(format).to_string()),
        ("file", file_obj),
        (strong, json!(secret).to_string()),
    ]);
    Some(format!("json:{top}"))
}

/// The names QEMU gives an image on an HTTP(S) object opened from a
/// `json:` name with options that change what it reads (the curl driver's
/// strong options: `sslverify`, `cookie`, `username`, the secrets), as
/// `json:` objects of those options, the URL and the driver: the image's
/// (in its format as given, else as `probed`) and its file's (the same
/// for the protocol node alone). `None` otherwise.
fn http_json_filenames(name: &str, probed: Option<String>) -> Option<(String, String)> {
    const STRONG: &[&str] = &["url", "sslverify", "cookie", "cookie-secret", "username", "password-secret"];
    crate::app::http::plain_url(name).is_none().then_some(())?;
    let options = oxqcow::names::parse_json_name(name.strip_prefix("json:")?).ok()?;
    if !crate::app::http::names_http(&options) {
        return None;
    }
    let nested = options.iter().any(|(k, v)| k == "file.driver" && crate::app::http::is_http_driver(v));
    let prefix = if nested { "file." } else { "" };
    let mut members = Vec::new();
    let mut format = None;
    for (k, v) in &options {
        match k.strip_prefix(prefix) {
            Some(key) if key == "driver" || STRONG.contains(&key) => members.push((key, json!(v).to_string())),
            _ if k == "driver" => format = Some(v.clone()),
            _ => {}
        }
    }
    let file = format!("json:{}", crate::app::qjson::qdict_compact(members));
    let top = match format.or(probed) {
        Some(f) if nested => {
            format!(
                "json:{}",
                crate::app::qjson::qdict_compact(vec![
                    ("driver", json!(f).to_string()),
                    ("file", file[5..].to_string())
                ])
            )
        }
        _ => file.clone(),
    };
    Some((top, file))
}

/// QEMU's block layer reports lengths in whole sectors.
/// The file name and format of a `json:` name that sets nothing but the
/// format driver and a host file (`{"driver": "qcow2", "file": {"filename":
/// "x"}}`), which QEMU names the image by.
fn plain_json(name: &str) -> Option<(String, Option<String>)> {
    let options = oxqcow::names::parse_json_name(name.strip_prefix("json:")?).ok()?;
    let mut path = None;
    let mut format = None;
    for (k, v) in options {
        match k.as_str() {
            "file.filename" | "filename" | "file" => path = Some(crate::app::image::host_filename(&v).ok()?),
            "file.driver" if v == "file" => {}
            "driver" if v != "file" => format = Some(v),
            _ => return None,
        }
    }
    Some((path?, format))
}

fn sectors_up(bytes: u64) -> u64 {
    bytes.div_ceil(512) * 512
}

/// What `info` describes: an open image, or what a header says: of a
/// qcow2 image that is encrypted, names an external data file or a backing
/// file `--forbid-backing` refuses, and of every luks and qcow image (whose
/// opening would need a secret, or the backing file).
// One value per described image: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
enum Source {
    Open(Image),
    Header { storage: FileStorage, info: Qcow2Info, snapshots: Vec<SnapshotEntry> },
    Luks { storage: FileStorage, header: LuksHeader },
    Qcow { storage: FileStorage, header: QcowHeader, backing_file: Option<String> },
}

/// Opens one layer for `info` as qemu-img opens it (`BDRV_O_NO_BACKING |
/// BDRV_O_NO_IO`): no file the header names is opened, neither the backing
/// file (each layer of `--backing-chain` is opened alone, so a deep chain
/// costs one open per layer) nor the external data file, and no secret is
/// needed. An image whose header names a data file, or that is encrypted,
/// is described from its header alone; so is one whose backing file
/// `--forbid-backing` refuses.
fn open_source(path: &str, format: Option<&str>, mut opts: OpenOptions) -> Result<Source, String> {
    opts.backing = BackingPolicy::Ignore;
    if let Some(source) = header_source(path, format, opts.force_share) {
        return source;
    }
    let header_only = || -> Option<(FileStorage, Qcow2Info, Vec<SnapshotEntry>)> {
        let storage = FileStorage::open(Path::new(path), false).ok()?;
        let qcow2 = match format {
            Some(f) => f == "qcow2",
            None => probe_format(&storage, Some(Path::new(path))).ok() == Some(ImageFormat::Qcow2),
        };
        if !qcow2 {
            return None;
        }
        let (info, snapshots) = Qcow2::inspect(&storage).ok()?;
        Some((storage, info, snapshots))
    };
    // Decided before opening: opening would open the data file, which may
    // be anything (a FIFO blocks the open forever).
    if let Some((storage, info, snapshots)) = header_only() {
        if info.data_file.is_some() || info.has_data_file || info.crypt_method != 0 {
            storage
                .lock_image(Path::new(path), true, opts.force_share)
                .map_err(|e| format!("Could not open '{path}': {}", crate::app::messages::describe(&e)))?;
            return Ok(Source::Header { storage, info, snapshots });
        }
    }
    let err = match open_image(path, format, opts.clone()) {
        Ok(image) => return Ok(Source::Open(image)),
        Err(msg) => msg,
    };
    match header_only() {
        Some((storage, info, snapshots))
            if info.backing_file.is_some() && crate::app::forbid_backing::backing_forbidden() =>
        {
            storage
                .lock_image(Path::new(path), true, opts.force_share)
                .map_err(|e| format!("Could not open '{path}': {}", crate::app::messages::describe(&e)))?;
            Ok(Source::Header { storage, info, snapshots })
        }
        _ => Err(err),
    }
}

/// A luks or qcow image, described from its header under a shared lock;
/// `None` for other formats, or when the file cannot be opened (opening
/// it as an image then says why).
fn header_source(path: &str, format: Option<&str>, force_share: bool) -> Option<Result<Source, String>> {
    let storage = FileStorage::open(Path::new(path), false).ok()?;
    let format = match format {
        Some(f) => ImageFormat::from_name(f).ok()?,
        None => probe_format(&storage, Some(Path::new(path))).ok()?,
    };
    if !matches!(format, ImageFormat::Luks | ImageFormat::Qcow) {
        return None;
    }
    let fail = |e: oxqcow::Error| format!("Could not open '{path}': {}", crate::app::messages::describe(&e));
    Some((|| {
        storage.lock_image(Path::new(path), true, force_share).map_err(fail)?;
        if format == ImageFormat::Luks {
            let header = Luks::inspect(&storage).map_err(fail)?;
            return Ok(Source::Luks { storage, header });
        }
        let (header, backing_file) = Qcow::read_header(&storage).map_err(fail)?;
        Ok(Source::Qcow { storage, header, backing_file })
    })())
}

/// The image as qemu's `BlockGraphInfo`, keys in QAPI order.
fn graph_info(path: &str, source: &Source) -> Result<Value, String> {
    let storage: &dyn Storage = match source {
        Source::Open(image) => &**image.storage(),
        Source::Header { storage, .. } | Source::Luks { storage, .. } | Source::Qcow { storage, .. } => storage,
    };
    let file_len = storage.len().map_err(|e| format!("Could not get the file length of '{path}': {e}"))?;
    // An NBD export is named as QEMU names it.
    let shown = crate::app::image::shown_name(path);
    let path = shown.as_str();
    let allocated = storage.allocated_bytes().ok();
    let host_file = storage.driver_name() == "file";
    let protocol_is_rbd = storage.driver_name() == "rbd";
    let file = protocol_node(path, storage, file_len, allocated);

    let mut top = Map::new();
    top.insert("filename".into(), json!(path));
    let (qi, snapshots) = match source {
        Source::Open(Image::Raw(raw)) => {
            top.insert("format".into(), json!("raw"));
            if host_file || protocol_is_rbd {
                top.insert("dirty-flag".into(), json!(false));
            }
            // QEMU's raw driver reports its file's cluster size and snapshots.
            if let Some(cs) = storage.cluster_size() {
                top.insert("cluster-size".into(), json!(cs));
            }
            if let Some(snaps) = protocol_snapshot_list(storage) {
                top.insert("snapshots".into(), snaps);
            }
            if let Some(a) = allocated {
                top.insert("actual-size".into(), json!(a));
            }
            top.insert("virtual-size".into(), json!(sectors_up(raw.len())));
            top.insert("children".into(), json!([{"name": "file", "info": Value::Object(file)}]));
            return Ok(Value::Object(top));
        }
        Source::Luks { header, .. } => {
            top.insert("format".into(), json!("luks"));
            top.insert("dirty-flag".into(), json!(false));
            if let Some(a) = allocated {
                top.insert("actual-size".into(), json!(a));
            }
            top.insert("virtual-size".into(), json!(sectors_up(file_len - header.payload_offset())));
            top.insert("encrypted".into(), json!(true));
            top.insert("format-specific".into(), json!({"type": "luks", "data": Value::Object(luks_info(header))}));
            top.insert("children".into(), json!([{"name": "file", "info": Value::Object(file)}]));
            return Ok(Value::Object(top));
        }
        Source::Qcow { header, backing_file, .. } => {
            top.insert("format".into(), json!("qcow"));
            top.insert("dirty-flag".into(), json!(false));
            if let Some(a) = allocated {
                top.insert("actual-size".into(), json!(a));
            }
            top.insert("virtual-size".into(), json!(header.disk_size()));
            top.insert("cluster-size".into(), json!(header.cluster_size()));
            if header.crypt_method != 0 {
                top.insert("encrypted".into(), json!(true));
            }
            if let Some(b) = backing_file {
                top.insert("backing-filename".into(), json!(b));
                top.insert("full-backing-filename".into(), json!(full_backing_path(path, b)));
            }
            top.insert("children".into(), json!([{"name": "file", "info": Value::Object(file)}]));
            return Ok(Value::Object(top));
        }
        // Described from their headers above, never opened here.
        Source::Open(Image::Luks(_) | Image::Qcow(_)) => unreachable!("luks and qcow images are read as headers"),
        Source::Open(Image::Qcow2(q)) => (q.info(), q.snapshots()),
        Source::Header { info, snapshots, .. } => (info.clone(), snapshots.clone()),
    };
    top.insert("format".into(), json!("qcow2"));
    top.insert("dirty-flag".into(), json!(qi.dirty));
    if let Some(a) = allocated {
        top.insert("actual-size".into(), json!(a));
    }
    top.insert("virtual-size".into(), json!(qi.size));
    top.insert("cluster-size".into(), json!(qi.cluster_size));
    if qi.crypt_method != 0 {
        top.insert("encrypted".into(), json!(true));
    }
    if let Some(b) = &qi.backing_file {
        top.insert("backing-filename".into(), json!(b));
        top.insert("full-backing-filename".into(), json!(full_backing_path(path, b)));
        if let Some(f) = &qi.backing_format {
            top.insert("backing-filename-format".into(), json!(f));
        }
    }
    let snapshots = snapshot_list(&snapshots);
    if !snapshots.is_empty() {
        top.insert("snapshots".into(), Value::Array(snapshots));
    }
    let data = qcow2_specific(&qi);
    top.insert("format-specific".into(), json!({"type": "qcow2", "data": Value::Object(data)}));
    top.insert("children".into(), json!([{"name": "file", "info": Value::Object(file)}]));
    Ok(Value::Object(top))
}

/// The protocol node under an image (its file: a host file, an NBD
/// export, a null device), keys in QAPI order.
fn protocol_node(path: &str, storage: &dyn Storage, file_len: u64, allocated: Option<u64>) -> Map<String, Value> {
    // Another protocol than a host file (a null device) has no
    // format-specific facts and no dirty flag to report, at either level.
    let protocol = storage.driver_name();
    let host_file = protocol == "file";
    let mut file = Map::new();
    file.insert("filename".into(), json!(path));
    file.insert("format".into(), json!(protocol));
    // QEMU's rbd driver, like the file driver, has format-specific facts
    // (none), a dirty flag and a length in whole sectors; it also reports
    // the image's object size.
    let rbd = protocol == "rbd";
    if host_file || rbd {
        file.insert("dirty-flag".into(), json!(false));
    }
    if let Some(a) = allocated {
        file.insert("actual-size".into(), json!(a));
    }
    file.insert("virtual-size".into(), json!(if host_file || rbd { sectors_up(file_len) } else { file_len }));
    if let Some(cs) = storage.cluster_size() {
        file.insert("cluster-size".into(), json!(cs));
    }
    if let Some(snaps) = protocol_snapshot_list(storage) {
        file.insert("snapshots".into(), snaps);
    }
    if host_file || rbd {
        file.insert("format-specific".into(), json!({"type": protocol, "data": {}}));
    }
    file.insert("children".into(), json!([]));
    file
}

/// A protocol's own snapshots (an RBD image's) as QEMU's rbd driver lists
/// them: the name as id and name, the image size as VM state size, times
/// zero; `None` when it has none.
fn protocol_snapshot_list(storage: &dyn Storage) -> Option<Value> {
    let snaps = storage.protocol_snapshots().ok().filter(|s| !s.is_empty())?;
    Some(Value::Array(
        snaps
            .into_iter()
            .map(|(name, size)| {
                json!({"id": name, "name": name, "vm-state-size": size, "date-sec": 0, "date-nsec": 0,
                       "vm-clock-sec": 0, "vm-clock-nsec": 0, "icount": 0})
            })
            .collect(),
    ))
}

/// The snapshots as `SnapshotInfo` objects.
fn snapshot_list(snapshots: &[SnapshotEntry]) -> Vec<Value> {
    snapshots
        .iter()
        .map(|s| {
            let mut m = Map::new();
            m.insert("id".into(), json!(s.id));
            m.insert("name".into(), json!(s.name));
            m.insert("vm-state-size".into(), json!(s.vm_state_size_large.unwrap_or(u64::from(s.vm_state_size))));
            m.insert("date-sec".into(), json!(s.date_sec));
            m.insert("date-nsec".into(), json!(s.date_nsec));
            m.insert("vm-clock-sec".into(), json!(s.vm_clock_nsec / 1_000_000_000));
            m.insert("vm-clock-nsec".into(), json!(s.vm_clock_nsec % 1_000_000_000));
            if let Some(ic) = s.icount.filter(|&i| i != u64::MAX) {
                m.insert("icount".into(), json!(ic));
            }
            Value::Object(m)
        })
        .collect()
}

/// qcow2's format-specific information (`ImageInfoSpecificQCow2`).
fn qcow2_specific(qi: &Qcow2Info) -> Map<String, Value> {
    let mut data = Map::new();
    if qi.version == 2 {
        data.insert("compat".into(), json!("0.10"));
        data.insert("refcount-bits".into(), json!(qi.refcount_bits));
    } else {
        data.insert("compat".into(), json!("1.1"));
        // QEMU shows the name when the header has one, and the raw flag
        // when the image uses a data file (incompatible bit 2).
        if let Some(df) = &qi.data_file {
            data.insert("data-file".into(), json!(df));
        }
        if qi.has_data_file {
            data.insert("data-file-raw".into(), json!(qi.data_file_raw));
        }
        data.insert("extended-l2".into(), json!(qi.extended_l2));
        data.insert("lazy-refcounts".into(), json!(qi.lazy_refcounts));
        data.insert("corrupt".into(), json!(qi.corrupt));
        data.insert("refcount-bits".into(), json!(qi.refcount_bits));
        if !qi.bitmaps.is_empty() {
            let list: Vec<Value> = qi
                .bitmaps
                .iter()
                .map(|b| {
                    let mut flags = Vec::new();
                    if b.in_use {
                        flags.push(json!("in-use"));
                    }
                    if b.auto {
                        flags.push(json!("auto"));
                    }
                    json!({"flags": flags, "name": b.name, "granularity": b.granularity})
                })
                .collect();
            data.insert("bitmaps".into(), Value::Array(list));
        }
    }
    data.insert("compression-type".into(), json!(qi.compression_type));
    if let Some(e) = encrypt_info(qi) {
        data.insert("encrypt".into(), e);
    }
    data
}

/// The `encrypt` member of qcow2's format-specific information
/// (`QCryptoBlockInfo`).
fn encrypt_info(qi: &Qcow2Info) -> Option<Value> {
    match qi.crypt_method {
        1 => Some(json!({"format": "aes"})),
        2 => {
            let mut m = Map::new();
            m.insert("format".into(), json!("luks"));
            m.extend(luks_info(qi.luks.as_ref()?));
            Some(Value::Object(m))
        }
        _ => None,
    }
}

/// A LUKS header as QEMU describes it (`QCryptoBlockInfoLUKS`): the luks
/// format's format-specific information, and qcow2's `encrypt` member.
fn luks_info(h: &LuksHeader) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("cipher-alg".into(), json!(h.cipher_alg.name()));
    m.insert("cipher-mode".into(), json!(h.cipher_mode.name()));
    m.insert("ivgen-alg".into(), json!(h.ivgen_alg.name()));
    if let (oxqcow::format::luks::IvGenAlg::Essiv, Some(ih)) = (h.ivgen_alg, h.ivgen_hash_alg) {
        m.insert("ivgen-hash-alg".into(), json!(ih.name()));
    }
    m.insert("hash-alg".into(), json!(h.hash_alg.name()));
    m.insert("detached-header".into(), json!(false));
    m.insert("payload-offset".into(), json!(h.payload_offset()));
    m.insert("master-key-iters".into(), json!(h.master_key_iterations));
    m.insert("uuid".into(), json!(h.uuid_str()));
    let slots: Vec<Value> = h
        .slots
        .iter()
        .map(|s| {
            let mut o = Map::new();
            o.insert("active".into(), json!(s.active));
            if s.active {
                o.insert("iters".into(), json!(s.iterations));
                o.insert("stripes".into(), json!(s.stripes));
            }
            o.insert("key-offset".into(), json!(u64::from(s.key_offset_sector) * 512));
            Value::Object(o)
        })
        .collect();
    m.insert("slots".into(), Value::Array(slots));
    m
}

/// Where QEMU looks for a backing file: relative names are relative to the
/// directory of the image naming them.
fn full_backing_path(image: &str, backing: &str) -> String {
    if backing.starts_with('/') || crate::app::backing_protocols::is_protocol_name(backing) {
        return backing.to_string();
    }
    match image.rfind('/') {
        Some(i) => format!("{}{backing}", &image[..=i]),
        None => backing.to_string(),
    }
}

/// qemu-img's human rendering of a `BlockGraphInfo` (`dump_human_image_info`).
fn human(info: &Value, indentation: usize, path: &str) -> String {
    let ind = "    ".repeat(indentation);
    let get = |k: &str| info.get(k);
    let s = |k: &str| get(k).and_then(Value::as_str).unwrap_or_default().to_string();
    let n = |k: &str| get(k).and_then(Value::as_u64);
    let children = get("children").and_then(Value::as_array).cloned().unwrap_or_default();
    let protocol = indentation > 0 && children.is_empty();
    let mut out = String::new();
    let size = n("virtual-size").unwrap_or(0);
    let disk = n("actual-size").map_or_else(|| "unavailable".to_string(), size_to_str);
    let (l1, l2, l3) =
        if protocol { ("filename", "protocol type", "file length") } else { ("image", "file format", "virtual size") };
    out += &format!("{ind}{l1}: {}\n", s("filename"));
    out += &format!("{ind}{l2}: {}\n", s("format"));
    out += &format!("{ind}{l3}: {} ({size} bytes)\n", size_to_str(size));
    out += &format!("{ind}disk size: {disk}\n");
    if get("encrypted").and_then(Value::as_bool) == Some(true) {
        out += &format!("{ind}encrypted: yes\n");
    }
    if let Some(cs) = n("cluster-size") {
        out += &format!("{ind}cluster_size: {cs}\n");
    }
    if get("dirty-flag").and_then(Value::as_bool) == Some(true) {
        out += &format!("{ind}cleanly shut down: no\n");
    }
    if get("backing-filename").is_some() {
        let b = s("backing-filename");
        out += &format!("{ind}backing file: {b}");
        match get("full-backing-filename").and_then(Value::as_str) {
            None => out += " (cannot determine actual path)",
            Some(full) if full != b => out += &format!(" (actual path: {full})"),
            _ => {}
        }
        out += "\n";
        if get("backing-filename-format").is_some() {
            out += &format!("{ind}backing file format: {}\n", s("backing-filename-format"));
        }
    }
    if let Some(snaps) = get("snapshots").and_then(Value::as_array) {
        out += &format!("{ind}Snapshot list:\n{ind}{}\n", snapshot_header());
        for sn in snaps {
            out += &format!("{ind}{}\n", snapshot_line(sn));
        }
    }
    if let Some(data) = get("format-specific").and_then(|f| f.get("data")).and_then(Value::as_object) {
        if !data.is_empty() {
            out += &format!("{ind}Format specific information:\n");
            dump_dict(&mut out, indentation + 1, data);
        }
    }
    for child in &children {
        let name = child.get("name").and_then(Value::as_str).unwrap_or_default();
        out += &format!("{ind}Child node '{path}{name}':\n");
        if let Some(ci) = child.get("info") {
            out += &human(ci, indentation + 1, &format!("{path}{name}/"));
        }
    }
    out
}

/// QEMU's `dump_qdict`: `key: value` lines in QDict order, dashes in keys
/// shown as spaces, nested containers indented.
fn dump_dict(out: &mut String, indentation: usize, dict: &Map<String, Value>) {
    for (key, value) in crate::app::qjson::qdict_order(dict) {
        let composite = value.is_object() || value.is_array();
        out.push_str(&format!("{}{}:", "    ".repeat(indentation), key.replace('-', " ")));
        out.push_str(if composite { "\n" } else { " " });
        dump_value(out, indentation + 1, value);
        if !composite {
            out.push('\n');
        }
    }
}

fn dump_value(out: &mut String, indentation: usize, v: &Value) {
    match v {
        Value::Object(m) => dump_dict(out, indentation, m),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let composite = item.is_object() || item.is_array();
                out.push_str(&format!("{}[{i}]:{}", "    ".repeat(indentation), if composite { '\n' } else { ' ' }));
                dump_value(out, indentation + 1, item);
                if !composite {
                    out.push('\n');
                }
            }
        }
        Value::String(s) => out.push_str(s),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::Null => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_specific_section_in_qemu_order() {
        let data = json!({"compat": "1.1", "extended-l2": false, "lazy-refcounts": false, "corrupt": false,
                          "refcount-bits": 16, "compression-type": "zlib"});
        let mut out = String::new();
        dump_dict(&mut out, 1, data.as_object().unwrap());
        assert_eq!(
            out,
            "    compat: 1.1\n    compression type: zlib\n    lazy refcounts: false\n    refcount bits: 16\n    \
             corrupt: false\n    extended l2: false\n"
        );
    }
}
