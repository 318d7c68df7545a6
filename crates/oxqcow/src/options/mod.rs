//! Typed options for opening and creating images, and the parser for QEMU's
//! option strings (`-o key=value,...`) that the command line shares.

mod amend;
mod backing;
mod encryption;
pub mod overlap;
mod raw_window;

use crate::error::{Error, Result};
pub use amend::{check_refcount_bits, AmendOptions};
pub use backing::{BackingGate, BackingPolicy, ProtocolOpener};
pub use encryption::{Encryption, EncryptionFormat, KeyslotChange, LuksParams};
pub use raw_window::{take_raw_windows, RawWindow};

/// Image formats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    /// qcow2.
    #[default]
    Qcow2,
    /// A flat image.
    Raw,
    /// A LUKS1 encrypted volume (QEMU's `luks` driver).
    Luks,
    /// qcow version 1 (read only).
    Qcow,
}

impl ImageFormat {
    /// The format's name as QEMU spells it.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
            ImageFormat::Luks => "luks",
            ImageFormat::Qcow => "qcow",
        }
    }
    /// Parses a format name.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "qcow2" => Ok(ImageFormat::Qcow2),
            "raw" => Ok(ImageFormat::Raw),
            "luks" => Ok(ImageFormat::Luks),
            "qcow" => Ok(ImageFormat::Qcow),
            other => Err(Error::InvalidArgument(format!("Unknown driver '{other}'"))),
        }
    }
}

/// How much of a new image (or of the new part of a grown one) to allocate up front.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Preallocation {
    /// Nothing.
    #[default]
    Off,
    /// Metadata (L2 tables and data cluster mappings), file left sparse.
    Metadata,
    /// Metadata and host space reserved with `fallocate`.
    Falloc,
    /// Metadata and zeros written to every data cluster.
    Full,
}

impl Preallocation {
    /// Parses QEMU's names.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "off" => Ok(Preallocation::Off),
            "metadata" => Ok(Preallocation::Metadata),
            "falloc" => Ok(Preallocation::Falloc),
            "full" => Ok(Preallocation::Full),
            other => Err(Error::InvalidArgument(format!("Parameter 'preallocation' does not accept value '{other}'"))),
        }
    }
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            Preallocation::Off => "off",
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
        }
    }
}

/// QEMU's cache modes (`-t`/`-T`, `cache=`). Data always goes through
/// the host page cache here; the modes differ in when it is forced to disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheMode {
    /// Flushes make writes durable (the default).
    #[default]
    Writeback,
    /// Every write is durable when it returns.
    Writethrough,
    /// Like writeback, bypassing the host's page cache (O_DIRECT).
    None,
    /// Like writethrough, bypassing the host's page cache.
    DirectSync,
    /// Flushes are ignored: fast, and nothing is guaranteed after a crash
    /// (qemu-img convert's default for its target).
    Unsafe,
}

impl CacheMode {
    /// Parses QEMU's names (`off` is `none`).
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "writeback" => Ok(CacheMode::Writeback),
            "writethrough" => Ok(CacheMode::Writethrough),
            "none" | "off" => Ok(CacheMode::None),
            "directsync" => Ok(CacheMode::DirectSync),
            "unsafe" => Ok(CacheMode::Unsafe),
            other => Err(Error::InvalidArgument(format!("Invalid cache option: {other}"))),
        }
    }
    /// Whether each write must be made durable before it returns.
    pub fn writes_through(self) -> bool {
        matches!(self, CacheMode::Writethrough | CacheMode::DirectSync)
    }
    /// Whether requests bypass the host's page cache (QEMU's `cache.direct`).
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::DirectSync)
    }
    /// This mode with `cache.direct` set as given. `unsafe` stays as it is:
    /// ignoring flushes is what matters of it, and its direct variant is
    /// not one of the modes.
    pub fn with_direct(self, direct: bool) -> Self {
        match (self, direct) {
            (CacheMode::Writeback, true) => CacheMode::None,
            (CacheMode::Writethrough, true) => CacheMode::DirectSync,
            (CacheMode::None, false) => CacheMode::Writeback,
            (CacheMode::DirectSync, false) => CacheMode::Writethrough,
            (mode, _) => mode,
        }
    }
    /// This mode with `cache.no-flush` set as given (on: `unsafe`).
    pub fn with_no_flush(self, no_flush: bool) -> Self {
        match (self, no_flush) {
            (_, true) => CacheMode::Unsafe,
            (CacheMode::Unsafe, false) => CacheMode::Writeback,
            (mode, false) => mode,
        }
    }
}

/// What writes of all-zero buffers become (QEMU's generic `detect-zeroes`
/// option): left alone, zero writes, or zero writes that may unmap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DetectZeroes {
    /// Written as data (the default).
    #[default]
    Off,
    /// Written as zero writes that keep the space allocated.
    On,
    /// Written as zero writes that may give the space back; needs
    /// `discard=unmap`.
    Unmap,
}

impl DetectZeroes {
    /// Parses QEMU's names, with its message for any other.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "off" => Ok(DetectZeroes::Off),
            "on" => Ok(DetectZeroes::On),
            "unmap" => Ok(DetectZeroes::Unmap),
            other => Err(Error::InvalidArgument(format!("invalid parameter value: {other}"))),
        }
    }

    /// For a write of `buf`: `Some(may_unmap)` when it is to become a zero
    /// write, `None` when it is written as it is.
    pub fn zero_write(self, buf: &[u8]) -> Option<bool> {
        if self == DetectZeroes::Off || buf.is_empty() || !is_zero(buf) {
            return None;
        }
        Some(self == DetectZeroes::Unmap)
    }
}

/// Whether a buffer is all zeros (64 bytes at a time, which vectorizes).
fn is_zero(b: &[u8]) -> bool {
    let mut blocks = b.chunks_exact(64);
    blocks.by_ref().all(|block| block.iter().fold(0u8, |acc, &x| acc | x) == 0)
        && blocks.remainder().iter().all(|&x| x == 0)
}

/// QEMU's default `cache-clean-interval` on Linux, in seconds: cached
/// metadata tables unused for that long are dropped.
pub const DEFAULT_CACHE_CLEAN_INTERVAL: u64 = 600;

/// A line QEMU prints on stderr while it opens or runs a qcow2 image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageMessage<'a> {
    /// The bitmaps extension was left by a program without bitmap support
    /// and is dropped: QEMU's warning (the text after "warning: "), which
    /// it follows with "Some clusters may be leaked, run 'qemu-img check
    /// -r' on the image file to fix." (no newline).
    StaleBitmaps(&'a str),
    /// One line of the repair a dirty image (lazy refcounts) gets when it
    /// is opened read-write, as `check -r all` prints it.
    Repair(&'a str),
    /// An inconsistency met while the image runs and worked around (a
    /// COPIED flag its refcount contradicts), worded as `qemu-img check`
    /// reports it.
    Inconsistency(&'a str),
    /// A corruption found while the image runs, as QEMU's
    /// `qcow2_signal_corruption` prints it (the whole line): "qcow2:
    /// Marking image as corrupt: ...; further corruption events will be
    /// suppressed" on a writable image. Only the first is reported.
    Corruption(&'a str),
    /// Persistent bitmaps that could not be stored when the image was
    /// inactivated or closed (QEMU's "Lost persistent bitmaps during
    /// inactivation of node ...: REASON"): the reason. Sent at every
    /// attempt: a close after a failed inactivation tries again.
    BitmapsLost(&'a str),
}

/// Receives the [`ImageMessage`]s of an open image as they happen.
pub type ImageMessages = std::sync::Arc<dyn Fn(ImageMessage<'_>) + Send + Sync>;

/// Options for opening an image.
#[derive(Clone, Default)]
pub struct OpenOptions {
    /// Open read-only.
    pub read_only: bool,
    /// Cache mode.
    pub cache: CacheMode,
    /// The format; probed from the first bytes when `None`.
    pub format: Option<ImageFormat>,
    /// L2 table cache size in bytes (`l2-cache-size`).
    pub l2_cache_size: Option<u64>,
    /// Size of the L2 cache's entries (`l2-cache-entry-size`): a power of
    /// two from 512 bytes to the cluster size; the cache holds slices of L2
    /// tables that big. QEMU's default: the cluster size, or 4 KiB when the
    /// cache cannot cover the whole disk.
    pub l2_cache_entry_size: Option<u64>,
    /// Seconds after which cached metadata tables that were not used are
    /// dropped (`cache-clean-interval`; 0 never,
    /// [`DEFAULT_CACHE_CLEAN_INTERVAL`] when unset).
    pub cache_clean_interval: Option<u64>,
    /// Refcount block cache size in bytes (`refcount-cache-size`).
    pub refcount_cache_size: Option<u64>,
    /// Combined cache size in bytes (`cache-size`).
    pub cache_size: Option<u64>,
    /// Punch holes in the host file for clusters freed by discard requests
    /// (`pass-discard-request`).
    pub discard_passthrough: bool,
    /// Discard requests and unmapping zero writes keep the host clusters
    /// allocated (zero clusters that still own them) instead of freeing
    /// them (`discard-no-unref`; version 3 images only).
    pub discard_no_unref: bool,
    /// What writes of all-zero buffers become (`detect-zeroes`).
    pub detect_zeroes: DetectZeroes,
    /// Discard requests reach the image (`discard=unmap`, QEMU's
    /// `BDRV_O_UNMAP`); `detect-zeroes=unmap` needs it.
    pub unmap: bool,
    /// Open read-only, without an error, when the file cannot be opened
    /// for writing (`auto-read-only`).
    pub auto_read_only: bool,
    /// Open for repair: accept the corrupt and dirty bits without the
    /// automatic refcount rebuild (what `check -r` needs).
    pub repair: bool,
    /// Override the image's lazy refcounts setting for this session
    /// (`lazy-refcounts`).
    pub lazy_refcounts: Option<bool>,
    /// What to do with backing files the image names.
    pub backing: BackingPolicy,
    /// Open the content of this internal snapshot (id or name) instead of
    /// the active layer; read-only (`convert -l`, `qemu-io -l`). As in
    /// QEMU, the guest size stays the active layer's.
    pub snapshot: Option<String>,
    /// Punch holes for clusters freed by deleting snapshots
    /// (`pass-discard-snapshot`, on unless set to false).
    pub pass_discard_snapshot: Option<bool>,
    /// Punch holes for clusters freed by anything but discard requests and
    /// snapshot deletion, e.g. copy on write (`pass-discard-other`, off).
    pub pass_discard_other: bool,
    /// Share the image with writers (qemu-img's `-U`, `force-share`); only
    /// for read-only opens.
    pub force_share: bool,
    /// Take QEMU-compatible image locks (on unless set to false, like
    /// QEMU's `file.locking`).
    pub locking: Option<bool>,
    /// Metadata overlap checks (`overlap-check`, default `cached`); a mask
    /// of the templates in [`overlap`].
    pub overlap_check: Option<u32>,
    /// The `overlap-check*` options as given, which set `overlap_check`.
    pub overlap: overlap::OverlapOptions,
    /// The external data file to use instead of the one the image header
    /// names (QEMU's `data-file` runtime option); only for images that
    /// have one. Not passed down to backing files.
    pub data_file: Option<std::path::PathBuf>,
    /// Raw nodes between the image and its file (QEMU's `raw` driver with
    /// `offset`/`size`, `file.driver=raw`), outermost first: the image
    /// sees the file through these windows. Not passed down.
    pub raw_windows: Vec<RawWindow>,
    /// The passphrase of an encrypted image (the bytes of the secret QEMU's
    /// `encrypt.key-secret` names). Opening an encrypted image for data
    /// without it fails; `Qcow2::inspect` needs none.
    pub passphrase: Option<Vec<u8>>,
    /// The passphrase of the backing image (QEMU's
    /// `backing.encrypt.key-secret`).
    pub backing_passphrase: Option<Vec<u8>>,
    /// The file to open as the backing image instead of the one the
    /// header names (QEMU's `backing.file.filename`; relative to the
    /// working directory, as QEMU takes it). Not passed down.
    pub backing_file: Option<std::path::PathBuf>,
    /// The format of the backing image, instead of the one the header
    /// records or the probe finds (QEMU's `backing.driver`). Not passed
    /// down.
    pub backing_format: Option<ImageFormat>,
    /// The passphrase of a luks image (the secret the luks driver's own
    /// option, `key-secret`, names). Each format takes only its own
    /// option: a qcow2 image refuses this one, a luks image `passphrase`.
    /// Not passed down to backing files.
    pub key_secret: Option<Vec<u8>>,
    /// Open for metadata only (QEMU's `BDRV_O_NO_IO`, as `qemu-img create`
    /// opens a backing file for its size): an encrypted image of any
    /// layer whose secret is not given opens anyway, and reading or
    /// writing its guest data fails. Passed down to backing files.
    pub no_io: bool,
    /// The most PBKDF2 work one unlock attempt of a LUKS header may cost,
    /// in SHA-256 HMACs (see [`oxqcow_format::luks::pbkdf2_work`]); a
    /// header whose active key slots would cost more is refused before
    /// any PBKDF2 runs. [`oxqcow_format::luks::MAX_UNLOCK_WORK`] (some
    /// 25 s on a fast machine) when unset; a program that opens images
    /// from strangers may want less. QEMU has no such bound. Passed down
    /// to backing files.
    pub max_unlock_work: Option<u64>,
    /// Where the lines QEMU prints while opening and running the image go,
    /// in QEMU's order, as they happen (a repair can find billions of problems, so they are
    /// not collected). Without it the repair keeps the first
    /// [`crate::MAX_KEPT_MESSAGES`] in [`crate::Qcow2::open_repair`] and
    /// the warning is [`crate::Qcow2::stale_bitmaps_warning`]. Not passed
    /// down to backing files.
    pub messages: Option<ImageMessages>,
    /// Opens backing file names that name a protocol rather than a host
    /// file (see [`ProtocolOpener`]); without it every name is a file.
    /// Passed down to backing files.
    pub protocols: Option<std::sync::Arc<dyn ProtocolOpener>>,
}

/// Passphrases are shown only as present or absent: options get logged.
impl std::fmt::Debug for OpenOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Destructured without `..`, so a new field cannot be left out.
        let OpenOptions {
            read_only,
            cache,
            format,
            l2_cache_size,
            l2_cache_entry_size,
            cache_clean_interval,
            refcount_cache_size,
            cache_size,
            discard_passthrough,
            discard_no_unref,
            detect_zeroes,
            unmap,
            auto_read_only,
            repair,
            lazy_refcounts,
            backing,
            snapshot,
            pass_discard_snapshot,
            pass_discard_other,
            force_share,
            locking,
            overlap_check,
            overlap,
            data_file,
            raw_windows,
            passphrase,
            backing_passphrase,
            backing_file,
            backing_format,
            key_secret,
            no_io,
            max_unlock_work,
            messages,
            protocols,
        } = self;
        let secret = |p: &Option<Vec<u8>>| p.as_ref().map(|_| "<redacted>");
        f.debug_struct("OpenOptions")
            .field("read_only", read_only)
            .field("cache", cache)
            .field("format", format)
            .field("l2_cache_size", l2_cache_size)
            .field("l2_cache_entry_size", l2_cache_entry_size)
            .field("cache_clean_interval", cache_clean_interval)
            .field("refcount_cache_size", refcount_cache_size)
            .field("cache_size", cache_size)
            .field("discard_passthrough", discard_passthrough)
            .field("discard_no_unref", discard_no_unref)
            .field("detect_zeroes", detect_zeroes)
            .field("unmap", unmap)
            .field("auto_read_only", auto_read_only)
            .field("repair", repair)
            .field("lazy_refcounts", lazy_refcounts)
            .field("backing", backing)
            .field("snapshot", snapshot)
            .field("pass_discard_snapshot", pass_discard_snapshot)
            .field("pass_discard_other", pass_discard_other)
            .field("force_share", force_share)
            .field("locking", locking)
            .field("overlap_check", overlap_check)
            .field("overlap", overlap)
            .field("data_file", data_file)
            .field("raw_windows", raw_windows)
            .field("passphrase", &secret(passphrase))
            .field("backing_passphrase", &secret(backing_passphrase))
            .field("backing_file", backing_file)
            .field("backing_format", backing_format)
            .field("key_secret", &secret(key_secret))
            .field("no_io", no_io)
            .field("max_unlock_work", max_unlock_work)
            .field("messages", &messages.as_ref().map(|_| "<sink>"))
            .field("protocols", protocols)
            .finish()
    }
}

impl OpenOptions {
    /// Default options: read-write, format probed.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets read-only.
    pub fn read_only(mut self, ro: bool) -> Self {
        self.read_only = ro;
        self
    }
    /// Sets the format.
    pub fn format(mut self, format: ImageFormat) -> Self {
        self.format = Some(format);
        self
    }
    /// Sets the backing file policy.
    pub fn backing(mut self, policy: BackingPolicy) -> Self {
        self.backing = policy;
        self
    }
    /// The PBKDF2 work bound of a LUKS unlock ([`Self::max_unlock_work`]),
    /// or the default.
    pub fn unlock_work_limit(&self) -> u64 {
        self.max_unlock_work.unwrap_or(oxqcow_format::luks::MAX_UNLOCK_WORK)
    }
    /// Applies one QEMU runtime option (`l2-cache-size=1M`, ...).
    pub fn apply_qemu_option(&mut self, key: &str, value: &str) -> Result<()> {
        match key {
            "l2-cache-size" => self.l2_cache_size = Some(size_option(key, value)?),
            "l2-cache-entry-size" => self.l2_cache_entry_size = Some(size_option(key, value)?),
            "cache-clean-interval" => self.cache_clean_interval = Some(number_option(key, value)?),
            "discard-no-unref" => self.discard_no_unref = parse_bool(key, value)?,
            "detect-zeroes" => self.detect_zeroes = DetectZeroes::from_name(value)?,
            "discard" => {
                self.unmap = match value {
                    "ignore" | "off" => false,
                    "unmap" | "on" => true,
                    other => return Err(Error::InvalidArgument(format!("Invalid discard option: {other}"))),
                };
                self.discard_passthrough = self.unmap;
            }
            "auto-read-only" => self.auto_read_only = parse_bool(key, value)?,
            "cache.direct" => self.cache = self.cache.with_direct(parse_bool(key, value)?),
            "cache.no-flush" => self.cache = self.cache.with_no_flush(parse_bool(key, value)?),
            "refcount-cache-size" => self.refcount_cache_size = Some(size_option(key, value)?),
            "cache-size" => self.cache_size = Some(size_option(key, value)?),
            "pass-discard-request" => self.discard_passthrough = parse_bool(key, value)?,
            "pass-discard-snapshot" => self.pass_discard_snapshot = Some(parse_bool(key, value)?),
            "pass-discard-other" => self.pass_discard_other = parse_bool(key, value)?,
            "lazy-refcounts" => self.lazy_refcounts = Some(parse_bool(key, value)?),
            "read-only" => self.read_only = parse_bool(key, value)?,
            "cache" => self.cache = CacheMode::from_name(value)?,
            "force-share" => self.force_share = parse_bool(key, value)?,
            "file.locking" | "locking" => {
                self.locking = Some(match value {
                    "auto" => true,
                    v => parse_bool(key, v)?,
                })
            }
            k if k.starts_with("overlap-check") => {
                self.overlap.apply(k, value)?;
                self.overlap_check = Some(self.overlap.mask()?);
            }
            "driver" => self.format = Some(ImageFormat::from_name(value)?),
            "data-file" | "data-file.filename" => self.data_file = Some(value.into()),
            "data-file.driver" if value == "file" => {}
            "backing.driver" => self.backing_format = Some(ImageFormat::from_name(value)?),
            "backing.file.filename" | "backing.filename" => {
                let path = std::path::absolute(value)
                    .map_err(|e| Error::InvalidArgument(format!("Could not open backing file '{value}': {e}")))?;
                self.backing_file = Some(path);
            }
            "backing.file.driver" if value == "file" => {}
            _ => return Err(Error::InvalidArgument(format!("Invalid parameter '{key}'"))),
        }
        Ok(())
    }
}

/// qcow2 compatibility level.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compat {
    /// Version 2 (`compat=0.10`).
    V2,
    /// Version 3 (`compat=1.1`).
    #[default]
    V3,
}

impl Compat {
    /// The header version.
    pub fn version(self) -> u32 {
        match self {
            Compat::V2 => 2,
            Compat::V3 => 3,
        }
    }
    /// QEMU's name ("0.10" or "1.1").
    pub fn name(self) -> &'static str {
        match self {
            Compat::V2 => "0.10",
            Compat::V3 => "1.1",
        }
    }
}

/// Compression algorithm for compressed clusters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate ("zlib" in QEMU's options).
    #[default]
    Zlib,
    /// zstd.
    Zstd,
}

impl CompressionType {
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// Options for creating an image.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// The format.
    pub format: ImageFormat,
    /// Guest size in bytes (rounded up to 512 as QEMU does).
    pub size: u64,
    /// Compatibility level.
    pub compat: Compat,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Lazy refcounts.
    pub lazy_refcounts: bool,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Preallocation mode.
    pub preallocation: Preallocation,
    /// Extended L2 entries.
    pub extended_l2: bool,
    /// Compression type.
    pub compression_type: CompressionType,
    /// Backing file name to record.
    pub backing_file: Option<String>,
    /// Backing file format to record.
    pub backing_format: Option<String>,
    /// External data file.
    pub data_file: Option<String>,
    /// External data file is raw.
    pub data_file_raw: bool,
    /// Whether `size` was given (the backing file supplies it otherwise).
    pub size_given: bool,
    /// Do not open the backing file to check it (qemu-img's `-u`).
    pub unsafe_backing: bool,
    /// Cache mode of the new image as it is returned open.
    pub cache: CacheMode,
    /// Encrypt the new image (`encrypt.format` and `encrypt.key-secret`).
    pub encryption: Option<Encryption>,
    /// Opens a backing file named by protocol, to check it and take its
    /// size (see [`OpenOptions::protocols`]).
    pub protocols: Option<std::sync::Arc<dyn ProtocolOpener>>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            format: ImageFormat::Qcow2,
            size: 0,
            compat: Compat::V3,
            cluster_size: 65536,
            lazy_refcounts: false,
            refcount_bits: 16,
            preallocation: Preallocation::Off,
            extended_l2: false,
            compression_type: CompressionType::Zlib,
            backing_file: None,
            backing_format: None,
            data_file: None,
            data_file_raw: false,
            size_given: false,
            unsafe_backing: false,
            cache: CacheMode::Writeback,
            encryption: None,
            protocols: None,
        }
    }
}

impl CreateOptions {
    /// A qcow2 image of `size` bytes with QEMU's defaults.
    pub fn qcow2(size: u64) -> Self {
        CreateOptions { size, size_given: true, ..Default::default() }
    }
    /// A raw image of `size` bytes.
    pub fn raw(size: u64) -> Self {
        CreateOptions { format: ImageFormat::Raw, size, size_given: true, ..Default::default() }
    }
    /// Sets the cluster size.
    pub fn cluster_size(mut self, bytes: u64) -> Self {
        self.cluster_size = bytes;
        self
    }
    /// Sets the compatibility level.
    pub fn compat(mut self, compat: Compat) -> Self {
        self.compat = compat;
        self
    }
    /// Sets the refcount width.
    pub fn refcount_bits(mut self, bits: u32) -> Self {
        self.refcount_bits = bits;
        self
    }
    /// Sets lazy refcounts.
    pub fn lazy_refcounts(mut self, on: bool) -> Self {
        self.lazy_refcounts = on;
        self
    }
    /// Sets the preallocation mode.
    pub fn preallocation(mut self, mode: Preallocation) -> Self {
        self.preallocation = mode;
        self
    }
    /// Records a backing file and its format.
    pub fn backing(mut self, file: &str, format: &str) -> Self {
        self.backing_file = Some(file.to_string());
        self.backing_format = Some(format.to_string());
        self
    }

    /// Applies one QEMU creation option (`cluster_size=4k`, `compat=0.10`, ...).
    pub fn apply_qemu_option(&mut self, key: &str, value: &str) -> Result<()> {
        let qcow2_only = |s: &Self| -> Result<()> {
            if s.format != ImageFormat::Qcow2 {
                return Err(Error::InvalidArgument(format!("Invalid parameter '{key}'")));
            }
            Ok(())
        };
        match key {
            "size" => {
                self.size = size_option(key, value)?;
                self.size_given = true;
            }
            "preallocation" => self.preallocation = Preallocation::from_name(value)?,
            "compat" => {
                qcow2_only(self)?;
                self.compat = match value {
                    "0.10" | "v2" => Compat::V2,
                    "1.1" | "v3" => Compat::V3,
                    other => return Err(Error::InvalidArgument(format!("Invalid compatibility level: '{other}'"))),
                }
            }
            "cluster_size" => {
                qcow2_only(self)?;
                self.cluster_size = size_option(key, value)?;
            }
            "lazy_refcounts" => {
                qcow2_only(self)?;
                self.lazy_refcounts = parse_bool(key, value)?;
            }
            "refcount_bits" => {
                qcow2_only(self)?;
                self.refcount_bits = value.parse().map_err(|_| {
                    Error::InvalidArgument(format!("Parameter 'refcount_bits' expects a number, got '{value}'"))
                })?;
            }
            "extended_l2" => {
                qcow2_only(self)?;
                self.extended_l2 = parse_bool(key, value)?;
            }
            "compression_type" => {
                qcow2_only(self)?;
                self.compression_type = match value {
                    "zlib" => CompressionType::Zlib,
                    "zstd" => CompressionType::Zstd,
                    other => {
                        return Err(Error::InvalidArgument(format!(
                            "Parameter 'compression-type' does not accept value '{other}'"
                        )))
                    }
                }
            }
            "backing_file" => {
                qcow2_only(self)?;
                self.backing_file = Some(value.to_string());
            }
            "backing_fmt" => {
                qcow2_only(self)?;
                self.backing_format = Some(value.to_string());
            }
            "data_file" => {
                qcow2_only(self)?;
                self.data_file = Some(value.to_string());
            }
            "data_file_raw" => {
                qcow2_only(self)?;
                self.data_file_raw = parse_bool(key, value)?;
            }
            _ => return Err(Error::InvalidArgument(format!("Invalid parameter '{key}'"))),
        }
        Ok(())
    }

    /// Applies a whole option string such as `cluster_size=4k,compat=0.10`.
    pub fn apply_option_string(&mut self, s: &str) -> Result<()> {
        for (k, v) in crate::qemu_syntax::split_options(s) {
            self.apply_qemu_option(&k, &v)?;
        }
        Ok(())
    }
}

/// Parses a boolean as QEMU does (on/off, yes/no, true/false).
pub fn parse_bool(key: &str, value: &str) -> Result<bool> {
    crate::qemu_syntax::parse_bool_option(key, value).map_err(Error::InvalidArgument)
}

/// Whether `key` is a runtime option only qcow2 has, which raw refuses as
/// QEMU's raw driver does.
pub fn is_qcow2_option(key: &str) -> bool {
    key.starts_with("overlap-check")
        || key.starts_with("encrypt.")
        || matches!(
            key,
            "l2-cache-size"
                | "l2-cache-entry-size"
                | "refcount-cache-size"
                | "cache-size"
                | "cache-clean-interval"
                | "pass-discard-request"
                | "pass-discard-snapshot"
                | "pass-discard-other"
                | "lazy-refcounts"
                | "discard-no-unref"
        )
}

/// A number-typed option value as QemuOpts reads one (`qemu_strtou64`
/// with base 0: decimal, `0x` hex or `0` octal; a minus sign wraps, as
/// `strtoull` does), with QEMU's message naming `key`.
fn number_option(key: &str, value: &str) -> Result<u64> {
    let bad = || Error::InvalidArgument(format!("Parameter '{key}' expects a number"));
    let t = value.trim_start();
    let (negative, t) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let n = if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16)
    } else if t.len() > 1 && t.starts_with('0') {
        u64::from_str_radix(&t[1..], 8)
    } else {
        t.parse::<u64>()
    }
    .map_err(|_| bad())?;
    Ok(if negative { n.wrapping_neg() } else { n })
}

/// A size as QEMU's `qemu_strtosz` reads it ([`crate::qemu_syntax::qemu_strtosz`]),
/// as an engine error.
pub(crate) fn parse_size(s: &str) -> Result<u64> {
    crate::qemu_syntax::qemu_strtosz(s).map_err(|_| Error::InvalidArgument(format!("Invalid size '{s}'")))
}

/// A size-typed option value, with QEMU's messages naming `key`.
fn size_option(key: &str, value: &str) -> Result<u64> {
    crate::qemu_syntax::parse_size_option(key, value).map_err(Error::InvalidArgument)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_options() {
        let mut o = CreateOptions::qcow2(1 << 20);
        o.apply_option_string("cluster_size=512,refcount_bits=1,compat=1.1,preallocation=metadata").unwrap();
        assert_eq!(o.cluster_size, 512);
        assert_eq!(o.refcount_bits, 1);
        assert_eq!(o.preallocation, Preallocation::Metadata);
        assert!(o.apply_qemu_option("nonsense", "1").is_err());
        assert!(o.apply_qemu_option("compat", "2.0").is_err());
        let mut r = CreateOptions::raw(0);
        assert!(r.apply_qemu_option("cluster_size", "4k").is_err());
    }
}

#[cfg(test)]
mod debug_tests {
    use super::OpenOptions;

    #[test]
    fn debug_output_hides_passphrases() {
        let opts = OpenOptions { passphrase: Some(b"hunter2".to_vec()), ..OpenOptions::new() };
        let shown = format!("{opts:?}");
        assert!(!shown.contains("hunter2") && !shown.contains("104, 117"), "{shown}");
        assert!(shown.contains("passphrase: Some(\"<redacted>\")"), "{shown}");
    }
}
