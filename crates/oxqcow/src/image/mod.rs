//! One type for every format: [`Image`] opens qcow2, raw, luks or qcow
//! (version 1, read only), probing when the caller does not say and
//! refusing every other format the probe knows, and [`BlockDevice`] is
//! what convert, compare, the NBD server and the cursor adapter work
//! against.

pub mod backing;
pub mod data_file;
mod probe;

pub use probe::{probe, probe_format, supported_format};

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::extent::Extent;
use crate::image::backing::{open_backing, resolve_backing_path, BackingPolicy, Chain};
use crate::luks::Luks;
use crate::options::{CreateOptions, DetectZeroes, ImageFormat, OpenOptions, Preallocation};
use crate::qcow::Qcow;
use crate::qcow2::meta::check::{CheckReport, RepairMode};
use crate::qcow2::Qcow2;
use crate::raw::Raw;
use crate::storage::lock::LockSet;
use crate::storage::{FileStorage, Storage};

/// Byte-granular block I/O, safe from many threads at once.
pub trait BlockDevice: Send + Sync {
    /// Disk size in bytes.
    fn len(&self) -> u64;
    /// Whether the disk is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes a range read as zeros; with `may_unmap` storage may be released.
    fn write_zeroes_at(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()>;
    /// Tells the image a range is no longer needed.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// Makes completed writes durable.
    fn flush(&self) -> Result<()>;
    /// Allocation status of a range.
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>>;
    /// Whether writes are refused.
    fn is_read_only(&self) -> bool;
}

/// Storage a caller opened for an image itself, instead of the files
/// the image's name and header name (QEMU's `file` and `data-file`
/// children given as nodes: an NBD export, a null device, another image).
#[derive(Clone, Default)]
pub struct Children {
    /// The image's own bytes.
    pub file: Option<Arc<dyn Storage>>,
    /// The external data file of an image that has one.
    pub data_file: Option<Arc<dyn Storage>>,
}

/// Whether `driver` is one of QEMU's `file-posix` protocol drivers, which
/// show a host file's bytes as they are and may stand where a format is
/// named (`-f host_device`, a backing format of `host_device`).
pub fn is_host_driver(driver: &str) -> bool {
    matches!(driver, "file" | "host_device" | "host_cdrom")
}

/// Checks that `path` is a file QEMU's `file-posix` `driver` opens: a
/// regular file for `file`, a character or block device for
/// `host_device` and `host_cdrom`, with QEMU's messages. A path that
/// cannot be looked at is left for the open to report.
pub fn check_host_file(driver: &str, path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::metadata(path) else { return Ok(()) };
    let t = meta.file_type();
    let fits = match driver {
        "file" => t.is_file(),
        _ => t.is_char_device() || t.is_block_device(),
    };
    if fits {
        return Ok(());
    }
    let p = path.display();
    Err(Error::InvalidArgument(match driver {
        "file" => format!("'file' driver requires '{p}' to be a regular file"),
        d => format!("'{d}' driver requires '{p}' to be either a character or block device"),
    }))
}

/// An open image as the storage of another image (QEMU's format node as
/// another format's `file` child: `driver=qcow2,file.driver=qcow2`). Its
/// size is the inner image's virtual size, which only a resize changes.
pub struct ImageStorage(pub Image);

fn io_error(e: Error) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl Storage for ImageStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        // Past the end reads zeros, as storage does.
        let n = self.0.len().saturating_sub(offset).min(buf.len() as u64) as usize;
        if n > 0 {
            self.0.read_at(&mut buf[..n], offset).map_err(io_error)?;
        }
        buf[n..].fill(0);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_at(buf, offset).map_err(io_error)
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.0.len())
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        if len == self.0.len() {
            return Ok(());
        }
        Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "an image used as a file keeps its size"))
    }
    fn sync(&self) -> std::io::Result<()> {
        self.0.flush().map_err(io_error)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.discard(offset, len).map_err(io_error)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.write_zeroes_at(offset, len, false).map_err(io_error)
    }
    fn data_runs(&self, offset: u64, len: u64) -> std::io::Result<Vec<(u64, u64, bool)>> {
        let extents = self.0.block_status(offset, len).map_err(io_error)?;
        Ok(extents.into_iter().map(|e| (e.offset, e.length, e.data)).collect())
    }
    fn driver_name(&self) -> &str {
        self.0.format().name()
    }
}

/// Whether `driver` is one of QEMU's null protocol drivers.
pub fn is_null_driver(driver: &str) -> bool {
    matches!(driver, "null-co" | "null-aio")
}

/// QEMU's default size of a null device: 1 GiB.
const DEFAULT_NULL_SIZE: u64 = 1 << 30;

/// A null device as QEMU's `null-co`/`null-aio` `driver` opens it from its
/// options (`size`, default 1 GiB; `read-zeroes`, default off;
/// `latency-ns`, which changes no result here), with QEMU's message for
/// any other.
pub fn open_null(driver: &str, options: &[(String, String)]) -> Result<Arc<dyn Storage>> {
    let driver = match driver {
        "null-co" => "null-co",
        "null-aio" => "null-aio",
        d => return Err(Error::InvalidArgument(format!("Unknown driver '{d}'"))),
    };
    let mut size = DEFAULT_NULL_SIZE;
    let mut read_zeroes = false;
    for (k, v) in options {
        match k.as_str() {
            "size" => size = crate::qemu_syntax::parse_size_option(k, v).map_err(Error::InvalidArgument)?,
            "read-zeroes" => read_zeroes = crate::options::parse_bool(k, v)?,
            "latency-ns" => {}
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "Block protocol '{driver}' doesn't support the option '{k}'"
                )))
            }
        }
    }
    Ok(Arc::new(crate::storage::NullStorage::new(size, read_zeroes, driver)))
}

/// The options of QEMU's generic block layer that are refused whatever
/// the format, with its messages.
fn check_generic_options(opts: &OpenOptions) -> Result<()> {
    if opts.force_share && !opts.read_only {
        return Err(Error::InvalidArgument("force-share=on can only be used with read-only images".into()));
    }
    if opts.detect_zeroes == DetectZeroes::Unmap && !opts.unmap {
        return Err(Error::InvalidArgument(
            "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap".into(),
        ));
    }
    Ok(())
}

/// Opens and locks the image file at `path`; with `auto-read-only`, a
/// file that cannot be opened for writing is opened read-only (QEMU's
/// file driver does so on EACCES, EPERM and EROFS). Returns the storage
/// and whether it is read-only.
fn open_file(path: &Path, opts: &OpenOptions) -> Result<(Arc<dyn Storage>, bool)> {
    let mut read_only = opts.read_only;
    let file = match FileStorage::open(path, !read_only) {
        Err(e)
            if opts.auto_read_only
                && !read_only
                && matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM | libc::EROFS)) =>
        {
            read_only = true;
            FileStorage::open(path, false)
        }
        r => r,
    }
    .map_err(Error::io("opening the image", 0))?;
    if opts.locking.unwrap_or(true) {
        let set = LockSet::for_open(read_only, opts.force_share);
        crate::storage::lock::lock(file.file(), set, &path.display().to_string())?;
    }
    Ok((Arc::new(file), read_only))
}

/// `storage` as the raw nodes of `windows` (outermost first) show it.
fn apply_raw_windows(storage: Arc<dyn Storage>, windows: &[crate::options::RawWindow]) -> Result<Arc<dyn Storage>> {
    windows.iter().rev().try_fold(storage, |inner, w| {
        let window = crate::storage::WindowStorage::new(inner, w.offset, w.size).map_err(Error::InvalidArgument)?;
        Ok(Arc::new(window) as Arc<dyn Storage>)
    })
}

/// An open image of any supported format.
// One value per open image: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Image {
    /// qcow2.
    Qcow2(Qcow2),
    /// raw.
    Raw(Raw),
    /// luks.
    Luks(Luks),
    /// qcow (version 1), read only.
    Qcow(Qcow),
}

impl Image {
    /// Opens the image file at `path`, with its backing chain as
    /// `opts.backing` allows.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Image> {
        Image::open_with_children(path, opts, Children::default())
    }

    /// [`Image::open`], with the image's own bytes or its external data
    /// file taken from storage the caller opened (QEMU's `file` and
    /// `data-file` children given as nodes). With `children.file`, `path`
    /// only names the image: backing file names in its header are
    /// resolved against its directory.
    pub fn open_with_children(path: &Path, opts: &OpenOptions, children: Children) -> Result<Image> {
        let image = Image::open_in_chain(path, opts, &mut Chain::default(), children)?;
        image.set_cache_mode(opts.cache)?;
        Ok(image)
    }

    pub(crate) fn open_in_chain(
        path: &Path,
        opts: &OpenOptions,
        chain: &mut Chain,
        children: Children,
    ) -> Result<Image> {
        chain.enter(path)?;
        check_generic_options(opts)?;
        let (storage, read_only) = match children.file {
            Some(file) => (file, opts.read_only),
            None => open_file(path, opts)?,
        };
        let storage = apply_raw_windows(storage, &opts.raw_windows)?;
        let adjusted;
        let opts = if read_only == opts.read_only {
            opts
        } else {
            // `auto-read-only` found the file read-only: so is the image.
            adjusted = OpenOptions { read_only, ..opts.clone() };
            &adjusted
        };
        let format = match opts.format {
            Some(f) => f,
            None => probe_format(&*storage, Some(path))?,
        };
        let image = match format {
            ImageFormat::Raw => {
                let raw = Raw::open(storage, opts.read_only)?.with_detect_zeroes(opts.detect_zeroes);
                Image::Raw(if opts.format.is_none() { raw.probed() } else { raw })
            }
            ImageFormat::Luks => Image::Luks(Luks::open(storage, opts)?),
            ImageFormat::Qcow => {
                let (_, name) = Qcow::read_header(&*storage)?;
                // qcow records no backing format: the backing file is probed
                // unless `backing.driver` names it.
                let name = opts.backing_file.as_ref().map(|f| f.to_string_lossy().into_owned()).or(name);
                let format = opts.backing_format.map(ImageFormat::name);
                let backing = match &name {
                    Some(name) => open_backing(path, name, format, opts, chain)?,
                    None => None,
                };
                Image::Qcow(Qcow::open(storage, opts, backing)?)
            }
            ImageFormat::Qcow2 => Image::open_qcow2(path, storage, opts, chain, children.data_file)?,
        };
        check_secret_options(format, opts)?;
        Ok(image)
    }

    fn open_qcow2(
        path: &Path,
        storage: Arc<dyn Storage>,
        opts: &OpenOptions,
        chain: &mut Chain,
        data_file: Option<Arc<dyn Storage>>,
    ) -> Result<Image> {
        let header = crate::qcow2::read_header(&*storage, opts.repair)?;
        // QEMU opens the data file while opening the image, before the
        // backing chain.
        let data = match data_file {
            Some(d) if header.has_data_file() => Some(d),
            Some(_) => {
                return Err(Error::InvalidArgument(
                    "'data-file' can only be set for images with an external data file".into(),
                ))
            }
            None => crate::image::data_file::open_for(path, &header, opts)?,
        };
        // `backing.file.filename` and `backing.driver` take the place of
        // what the header records.
        let name = match &opts.backing_file {
            Some(file) => Some(file.to_string_lossy().into_owned()),
            None => header.backing_file.clone(),
        };
        let format = opts.backing_format.map(ImageFormat::name).or(header.extensions.backing_format.as_deref());
        let backing = match &name {
            Some(name) => open_backing(path, name, format, opts, chain)?,
            None => None,
        };
        Ok(Image::Qcow2(Qcow2::open_with(storage, opts, backing, data)?))
    }

    /// Opens an image on any storage. A qcow2 image that names a backing
    /// file needs [`Qcow2::open_with_backing`] (or `BackingPolicy::Ignore`).
    pub fn open_storage(storage: Arc<dyn Storage>, opts: &OpenOptions) -> Result<Image> {
        let format = match opts.format {
            Some(f) => f,
            None => probe_format(&*storage, None)?,
        };
        check_generic_options(opts)?;
        let image = match format {
            ImageFormat::Qcow2 => Image::Qcow2(Qcow2::open(storage, opts)?),
            ImageFormat::Raw => {
                let raw = Raw::open(storage, opts.read_only)?.with_detect_zeroes(opts.detect_zeroes);
                Image::Raw(if opts.format.is_none() { raw.probed() } else { raw })
            }
            ImageFormat::Luks => Image::Luks(Luks::open(storage, opts)?),
            ImageFormat::Qcow => Image::Qcow(Qcow::open(storage, opts, None)?),
        };
        check_secret_options(format, opts)?;
        Ok(image)
    }

    /// Creates an image file at `path` (replacing any file there) and opens
    /// it. A backing file is checked by opening it (unless
    /// `opts.unsafe_backing`), and gives the size when `opts.size_given` is
    /// false; its name is stored as given, relative names being relative to
    /// the new image's directory.
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<Image> {
        let mut opts = opts.clone();
        if let Some(name) = opts.backing_file.clone() {
            // For its size only: an encrypted chain opens without its
            // secrets, as QEMU opens it (`BDRV_O_NO_IO`).
            let mut only_size =
                OpenOptions { read_only: true, no_io: true, protocols: opts.protocols.clone(), ..Default::default() };
            let could_not_open = |e: Error| {
                Error::InvalidArgument(format!("Could not open '{name}': {e}\nCould not open backing image."))
            };
            if let Some(opener) = opts.protocols.clone().filter(|p| p.takes(&name)) {
                if !opts.unsafe_backing || !opts.size_given {
                    only_size.format = opts.backing_format.as_deref().map(ImageFormat::from_name).transpose()?;
                    let storage = match opener.open_backing(&name) {
                        Some(r) => r.map_err(could_not_open)?,
                        None => {
                            return Err(could_not_open(Error::InvalidArgument(format!("Unknown protocol '{name}'"))))
                        }
                    };
                    let backing = Image::open_storage(storage, &only_size).map_err(could_not_open)?;
                    if !opts.size_given {
                        opts.size = backing.len();
                        opts.size_given = true;
                    }
                }
                return Image::create_file(path, &opts);
            }
            let (backing_path, json_driver) = match name.strip_prefix("json:") {
                Some(text) => crate::image::backing::json_node(text, &mut only_size).map_err(could_not_open)?,
                None => (resolve_backing_path(path, &name), None),
            };
            if let (Ok(a), Ok(b)) = (std::fs::canonicalize(&backing_path), std::fs::canonicalize(path)) {
                if a == b {
                    return Err(Error::InvalidArgument(
                        "Error: Trying to create an image with the same filename as the backing file".into(),
                    ));
                }
            }
            if !opts.unsafe_backing || !opts.size_given {
                let format = json_driver.as_deref().or(opts.backing_format.as_deref());
                only_size.format = format.map(ImageFormat::from_name).transpose()?;
                let backing = Image::open(&backing_path, &only_size).map_err(could_not_open)?;
                if !opts.size_given {
                    opts.size = backing.len();
                    opts.size_given = true;
                }
            }
        }
        Image::create_file(path, &opts)
    }

    /// The part of [`Image::create`] after the backing file was checked.
    fn create_file(path: &Path, opts: &CreateOptions) -> Result<Image> {
        // QEMU creates the data file first: a data file in use stops the
        // creation before the image file is touched.
        let data = match (&opts.data_file, opts.format) {
            (Some(name), ImageFormat::Qcow2) => {
                opts.validate()?;
                Some(crate::image::data_file::create_for(path, name)?)
            }
            _ => None,
        };
        let storage = FileStorage::create(path).map_err(Error::io("creating the image", 0))?;
        // A file someone else holds is left exactly as it is: no truncation,
        // and no removal after the failure (it is their image).
        crate::storage::lock::lock(storage.file(), LockSet::for_open(false, false), &path.display().to_string())?;
        storage.empty(path).map_err(Error::io("truncating the new image", 0))?;
        let result = Image::format_locked(path, Arc::new(storage), data, opts);
        if result.is_err() && matches!(opts.format, ImageFormat::Qcow2 | ImageFormat::Luks) {
            // The file is ours now and holds nothing of its former content:
            // QEMU's qcow2 and luks drivers delete what a failed creation
            // left behind (its raw driver leaves the empty file).
            let _ = std::fs::remove_file(path);
        }
        result
    }

    /// The part of [`Image::create`] after the new file is locked and empty.
    fn format_locked(
        path: &Path,
        storage: Arc<dyn Storage>,
        data: Option<Arc<dyn Storage>>,
        opts: &CreateOptions,
    ) -> Result<Image> {
        if opts.backing_file.is_none() {
            let image = match data {
                Some(data) => Image::Qcow2(Qcow2::create_with_data_file(storage, data, opts)?),
                None => Image::create_storage(storage, opts)?,
            };
            image.set_cache_mode(opts.cache)?;
            return Ok(image);
        }
        // Reopen so that the backing chain is attached: the new image with
        // its own passphrase, a backing file without one for its metadata
        // (its secret is not known here).
        crate::qcow2::create_unattached(storage, data, opts)?.close()?;
        let policy = if opts.unsafe_backing { BackingPolicy::Ignore } else { BackingPolicy::Follow };
        let reopen = OpenOptions {
            cache: opts.cache,
            passphrase: opts.encryption.as_ref().map(|e| e.passphrase.clone()),
            no_io: true,
            protocols: opts.protocols.clone(),
            ..OpenOptions::new().backing(policy)
        };
        Image::open(path, &reopen)
    }

    /// Creates an image on any storage.
    pub fn create_storage(storage: Arc<dyn Storage>, opts: &CreateOptions) -> Result<Image> {
        Ok(match opts.format {
            ImageFormat::Qcow2 => Image::Qcow2(Qcow2::create(storage, opts)?),
            // QEMU sizes new raw files in whole sectors too.
            ImageFormat::Raw => Image::Raw(Raw::create(storage, opts.size.div_ceil(512) * 512, opts.preallocation)?),
            ImageFormat::Luks => Image::Luks(Luks::create(storage, opts)?),
            ImageFormat::Qcow => {
                return Err(Error::Unsupported("creating qcow (version 1) images; create qcow2 images".into()))
            }
        })
    }

    /// Applies a cache mode (see [`crate::options::CacheMode`]).
    pub fn set_cache_mode(&self, mode: crate::options::CacheMode) -> Result<()> {
        match self {
            Image::Qcow2(q) => q.set_cache_mode(mode),
            Image::Raw(r) => r.set_cache_mode(mode),
            Image::Luks(l) => l.set_cache_mode(mode),
            // Nothing is ever written.
            Image::Qcow(_) => Ok(()),
        }
    }

    /// The format.
    pub fn format(&self) -> ImageFormat {
        match self {
            Image::Qcow2(_) => ImageFormat::Qcow2,
            Image::Raw(_) => ImageFormat::Raw,
            Image::Luks(_) => ImageFormat::Luks,
            Image::Qcow(_) => ImageFormat::Qcow,
        }
    }

    /// The host storage.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        match self {
            Image::Qcow2(q) => q.storage(),
            Image::Raw(r) => r.storage(),
            Image::Luks(l) => l.storage(),
            Image::Qcow(q) => q.storage(),
        }
    }

    /// The qcow2 image, if it is one.
    pub fn as_qcow2(&self) -> Option<&Qcow2> {
        match self {
            Image::Qcow2(q) => Some(q),
            _ => None,
        }
    }

    /// The backing image, when the image has one and it was opened.
    pub fn backing(&self) -> Option<&Arc<Image>> {
        match self {
            Image::Qcow2(q) => q.backing(),
            Image::Qcow(q) => q.backing(),
            Image::Raw(_) | Image::Luks(_) => None,
        }
    }

    /// Whether a new image of this format reads as zeros (QEMU's
    /// `bdrv_has_zero_init`): a luks image's unwritten sectors decrypt to
    /// noise, so a copy into one writes its zeros.
    pub fn has_zero_init(&self) -> bool {
        !matches!(self, Image::Luks(_))
    }

    /// Zeroes a range only where that costs no data writes (QEMU's
    /// `BDRV_REQ_NO_FALLBACK`, used by NBD's fast zero and the FUSE export's
    /// hole punching); `Ok(false)` when zeros would have to be written, and
    /// nothing was changed then.
    ///
    /// qcow2: as [`Qcow2::zeroes_by_metadata`] decides. raw: the host file
    /// punches a hole or zeroes the range in place, if its file system can.
    pub fn write_zeroes_no_fallback(&self, offset: u64, len: u64, may_unmap: bool) -> Result<bool> {
        let q = match self {
            Image::Raw(r) => return r.write_zeroes_no_fallback(offset, len, may_unmap),
            Image::Qcow2(q) => q,
            // Zeros are ciphertext to write.
            Image::Luks(l) => return l.write_zeroes_no_fallback(offset, len),
            Image::Qcow(q) => return q.write_zeroes_at(offset, len, may_unmap).map(|()| false),
        };
        if q.is_read_only() {
            return Err(Error::ReadOnly);
        }
        if !q.zeroes_by_metadata(offset, len)? {
            return Ok(false);
        }
        q.write_zeroes_at(offset, len, may_unmap)?;
        Ok(true)
    }

    /// Changes the disk size.
    pub fn resize(&self, new_size: u64, prealloc: Preallocation) -> Result<()> {
        match self {
            Image::Qcow2(q) => q.resize(new_size, prealloc),
            Image::Raw(r) => r.resize(new_size, prealloc),
            Image::Luks(l) => l.resize(new_size, prealloc),
            Image::Qcow(q) => q.resize(),
        }
    }

    /// Checks the image (qcow2 only; other formats cannot be checked).
    pub fn check(&self, repair: Option<RepairMode>) -> Result<CheckReport> {
        match self {
            Image::Qcow2(q) => q.check(repair),
            other => Err(Error::Unsupported(format!("checking {} images", other.format().name()))),
        }
    }

    /// [`Image::check`], handing each message line to `out` as it is found.
    pub fn check_with(&self, repair: Option<RepairMode>, out: &mut dyn FnMut(&str)) -> Result<CheckReport> {
        match self {
            Image::Qcow2(q) => q.check_with(repair, out),
            other => Err(Error::Unsupported(format!("checking {} images", other.format().name()))),
        }
    }

    /// QEMU's inactivation of the image and of its backing chain (see
    /// [`Qcow2::inactivate`]); other formats flush. The first failure is
    /// returned, after every layer was tried.
    pub fn inactivate(&self) -> Result<()> {
        let own = match self {
            Image::Qcow2(q) => q.inactivate(),
            Image::Raw(_) | Image::Luks(_) | Image::Qcow(_) => self.flush(),
        };
        let below = self.backing().map_or(Ok(()), |b| b.inactivate());
        own.and(below)
    }

    /// Flushes and closes.
    pub fn close(self) -> Result<()> {
        match self {
            Image::Qcow2(q) => q.close(),
            Image::Raw(r) => r.flush(),
            Image::Luks(l) => l.flush(),
            Image::Qcow(q) => q.flush(),
        }
    }
}

macro_rules! delegate {
    ($self:ident, $inner:ident => $e:expr) => {
        match $self {
            Image::Qcow2($inner) => $e,
            Image::Raw($inner) => $e,
            Image::Luks($inner) => $e,
            Image::Qcow($inner) => $e,
        }
    };
}

impl BlockDevice for Image {
    fn len(&self) -> u64 {
        delegate!(self, i => i.len())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        delegate!(self, i => i.read_at(buf, offset))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        delegate!(self, i => i.write_at(buf, offset))
    }
    fn write_zeroes_at(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        delegate!(self, i => i.write_zeroes_at(offset, len, may_unmap))
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        delegate!(self, i => i.discard(offset, len))
    }
    fn flush(&self) -> Result<()> {
        delegate!(self, i => i.flush())
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        delegate!(self, i => i.block_status(offset, len))
    }
    fn is_read_only(&self) -> bool {
        delegate!(self, i => i.is_read_only())
    }
}

macro_rules! impl_block_device {
    ($t:ty) => {
        impl BlockDevice for $t {
            fn len(&self) -> u64 {
                <$t>::len(self)
            }
            fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
                <$t>::read_at(self, buf, offset)
            }
            fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
                <$t>::write_at(self, buf, offset)
            }
            fn write_zeroes_at(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
                <$t>::write_zeroes_at(self, offset, len, may_unmap)
            }
            fn discard(&self, offset: u64, len: u64) -> Result<()> {
                <$t>::discard(self, offset, len)
            }
            fn flush(&self) -> Result<()> {
                <$t>::flush(self)
            }
            fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
                <$t>::block_status(self, offset, len)
            }
            fn is_read_only(&self) -> bool {
                <$t>::is_read_only(self)
            }
        }
    };
}

impl_block_device!(Qcow2);
impl_block_device!(Raw);
impl_block_device!(Luks);
impl_block_device!(Qcow);

/// Each format takes only its own secret option, as QEMU's drivers do: the
/// other one is refused after the format's own open (QEMU's order: a
/// missing or wrong secret of its own is reported first).
fn check_secret_options(format: ImageFormat, opts: &OpenOptions) -> Result<()> {
    let stray = match format {
        ImageFormat::Luks if opts.key_secret.is_some() => opts.passphrase.as_ref().map(|_| "encrypt.key-secret"),
        ImageFormat::Luks => None,
        _ => opts.key_secret.as_ref().map(|_| "key-secret"),
    };
    match stray {
        Some(option) => Err(Error::InvalidArgument(format!(
            "Block format '{}' does not support the option '{option}'",
            format.name()
        ))),
        None => Ok(()),
    }
}
