//! The FUSE file system behind `oxqcow mount`: the guest disk as one
//! regular file, with the semantics of QEMU's FUSE export
//! (`block/export/fuse.c`, as qemu-storage-daemon's `--export type=fuse`
//! serves it).
//!
//! This module owns the mapping from FUSE requests to engine calls and the
//! answers QEMU gives: which requests are refused with which errno, short
//! reads at the end of the disk, what each `fallocate` mode becomes, how
//! `lseek` finds data and holes, which attributes may change. Mounting,
//! signals and the command line are `mount.rs`'s.
//!
//! Requests come from several kernel channels at once (fuser's worker
//! threads); the engine's `Image` takes `&self` for all I/O. Size changes
//! hold `size_lock` exclusively and every other request holds it shared,
//! so that a request clamped to the size it saw never meets a smaller disk.

use std::cell::RefCell;
use std::ffi::{OsStr, OsString};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, OpenAccMode,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyWrite,
    Request, TimeOrNow, WriteFlags,
};
use oxqcow::{BlockDevice, Error as EngineError, ErrorKind, Image, Preallocation};

use super::busy_poll::BusyPoll;

/// How long the kernel may cache attributes and names (QEMU: 1 second).
const TTL: Duration = Duration::from_secs(1);
/// The directory holding the file, when the mount point is a directory.
const DIR_INO: INodeNo = INodeNo::ROOT;
/// The disk file's inode when a directory holds it.
const FILE_IN_DIR_INO: INodeNo = INodeNo(2);
/// The largest read served, as QEMU's export bounds its bounce buffer (the
/// kernel asks for far less; this only keeps a bogus request from
/// allocating gigabytes).
const MAX_READ: u32 = 64 << 20;
/// Reads up to this size reuse the serving thread's buffer (the kernel asks
/// for at most 1 MiB at a time, its default `max_pages`).
const KEPT_READ_BUFFER: usize = 1 << 20;
/// Block status is asked for in windows of this size, so that a seek over
/// a huge fragmented disk never holds all of its extents at once.
const STATUS_WINDOW: u64 = 1 << 30;

/// Where the disk file appears.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    /// The mount point is a regular file and becomes the disk (QEMU's way).
    File,
    /// The mount point is a directory that shows one file of this name.
    Dir(OsString),
}

/// What the command line decided about the export.
#[derive(Clone, Debug)]
pub struct ExportConfig {
    /// Where the file appears.
    pub layout: Layout,
    /// Writes allowed (not `-r`).
    pub writable: bool,
    /// Writes past the end grow the disk (QEMU's `growable`).
    pub growable: bool,
    /// Punched holes may give host clusters back (`--discard=unmap`).
    pub may_unmap: bool,
    /// Mounted with `allow_other`: other users may be given access.
    pub allow_other: bool,
    /// Host file of the image, for `st_blocks`.
    pub host_path: PathBuf,
}

/// Owner and permissions of the disk file; `chmod`/`chown` change them
/// for the life of the mount only, as in QEMU.
#[derive(Clone, Copy, Debug)]
struct Owner {
    mode: u32,
    uid: u32,
    gid: u32,
}

/// The file system: one image, one file.
pub struct DiskFs {
    image: Arc<Image>,
    cfg: ExportConfig,
    owner: Mutex<Owner>,
    size_lock: RwLock<()>,
    opens: Mutex<Opens>,
    /// Told of every request that a program's I/O stream makes.
    poll: Arc<BusyPoll>,
}

/// How one open of the disk file is served, kept in its file handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
enum OpenWay {
    /// Write-only, through the kernel's page cache.
    CachedWriter = 0,
    /// Reads (and maybe writes) through the kernel's page cache.
    CachedReader = 1,
    /// Write-only, past the page cache (FOPEN_DIRECT_IO).
    DirectWriter = 2,
    /// Reads (and maybe writes) past the page cache.
    DirectReader = 3,
}

impl OpenWay {
    fn fopen_flags(self) -> FopenFlags {
        match self {
            OpenWay::CachedWriter | OpenWay::CachedReader => FopenFlags::empty(),
            OpenWay::DirectWriter | OpenWay::DirectReader => FopenFlags::FOPEN_DIRECT_IO,
        }
    }
}

/// Which opens bypass the kernel's page cache. A write-only open does when
/// no open that reads through the cache exists: through the cache each of
/// its writes would be copied into pages of the FUSE file and out of them
/// again to us, while direct the kernel hands us the writer's own pages
/// (dd or cp into the file: a third less work per byte), and it can never
/// read back what it wrote. The kernel drops the cached pages of a direct
/// write's range before sending it, but a read through the cache racing
/// with it could bring the old bytes back after that; so while a direct
/// writer is open, opens that read bypass the cache too (no readahead,
/// and shared mmap fails with ENODEV), and while a cached reader is open a
/// writer goes through the cache. A release the kernel has not sent yet
/// only errs on the cached side for writers and on the direct side for
/// readers, both coherent.
#[derive(Debug, Default)]
struct Opens {
    cached_readers: usize,
    direct_writers: usize,
}

impl Opens {
    fn open(&mut self, flags: OpenFlags) -> OpenWay {
        let reads = flags.acc_mode() != OpenAccMode::O_WRONLY;
        if reads {
            if self.direct_writers > 0 {
                return OpenWay::DirectReader;
            }
            self.cached_readers += 1;
            return OpenWay::CachedReader;
        }
        if self.cached_readers > 0 {
            return OpenWay::CachedWriter;
        }
        self.direct_writers += 1;
        OpenWay::DirectWriter
    }

    fn release(&mut self, fh: u64) {
        if fh == OpenWay::CachedReader as u64 {
            self.cached_readers = self.cached_readers.saturating_sub(1);
        } else if fh == OpenWay::DirectWriter as u64 {
            self.direct_writers = self.direct_writers.saturating_sub(1);
        }
    }
}

impl DiskFs {
    /// A file system exporting `image`.
    pub fn new(image: Arc<Image>, cfg: ExportConfig, poll: Arc<BusyPoll>) -> DiskFs {
        let mode = if cfg.writable { 0o600 } else { 0o400 };
        let owner = Owner { mode, uid: rustix::process::getuid().as_raw(), gid: rustix::process::getgid().as_raw() };
        DiskFs {
            image,
            cfg,
            owner: Mutex::new(owner),
            size_lock: RwLock::new(()),
            opens: Mutex::new(Opens::default()),
            poll,
        }
    }

    fn file_ino(&self) -> INodeNo {
        match self.cfg.layout {
            Layout::File => INodeNo::ROOT,
            Layout::Dir(_) => FILE_IN_DIR_INO,
        }
    }

    fn is_dir(&self, ino: INodeNo) -> bool {
        matches!(self.cfg.layout, Layout::Dir(_)) && ino == DIR_INO
    }

    fn owner(&self) -> Owner {
        *self.owner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `stat` of the disk file: QEMU reports the host file's allocation
    /// (the disk size when that is unknown), a block size of 1 (the
    /// request alignment of an image without O_DIRECT) and "now" for
    /// every time.
    fn file_attr(&self) -> FileAttr {
        let size = self.image.len();
        let allocated = std::fs::metadata(&self.cfg.host_path).map(|m| m.blocks()).unwrap_or(0);
        let blocks = if allocated == 0 { size.div_ceil(512) } else { allocated };
        let o = self.owner();
        let now = now();
        FileAttr {
            ino: self.file_ino(),
            size,
            blocks,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind: FileType::RegularFile,
            perm: (o.mode & 0o7777) as u16,
            nlink: 1,
            uid: o.uid,
            gid: o.gid,
            rdev: 0,
            blksize: 1,
            flags: 0,
        }
    }

    /// The directory holding the file: as accessible as the file is, plus
    /// search permission where there is read permission.
    fn dir_attr(&self) -> FileAttr {
        let o = self.owner();
        let read = o.mode & 0o444;
        let now = now();
        FileAttr {
            ino: DIR_INO,
            size: 0,
            blocks: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind: FileType::Directory,
            perm: (read | (read >> 2)) as u16,
            nlink: 2,
            uid: o.uid,
            gid: o.gid,
            rdev: 0,
            blksize: 512,
            flags: 0,
        }
    }

    fn read_guard(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.size_lock.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the disk size, holding out every other request meanwhile.
    fn resize(&self, size: u64, prealloc: Preallocation) -> Result<(), Errno> {
        let _g = self.size_lock.write().unwrap_or_else(|p| p.into_inner());
        self.resize_locked(size, prealloc)
    }

    fn resize_locked(&self, size: u64, prealloc: Preallocation) -> Result<(), Errno> {
        if size == self.image.len() {
            return Ok(());
        }
        self.image.resize(size, prealloc).map_err(|e| errno_of(&e))
    }

    fn fallocate_inner(&self, offset: u64, length: u64, mode: i32) -> Result<(), Errno> {
        if !self.cfg.writable {
            return Err(Errno::EACCES);
        }
        let end = offset.checked_add(length).ok_or(Errno::EINVAL)?;
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        if mode == 0 {
            // Allocation is only possible at the end of the disk, by growing
            // it with preallocation; inside the disk QEMU has nothing to do
            // it with.
            let _g = self.size_lock.write().unwrap_or_else(|p| p.into_inner());
            let size = self.image.len();
            if offset < size {
                return Err(Errno::EOPNOTSUPP);
            }
            if offset > size {
                self.resize_locked(offset, Preallocation::Off)?;
            }
            return self.resize_locked(end, Preallocation::Falloc);
        }
        if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
            if !keep_size {
                return Err(Errno::EINVAL);
            }
            let _g = self.read_guard();
            let Some(length) = clamp_keep_size(offset, length, self.image.len())? else { return Ok(()) };
            // Zeroing that would have to write zeros is refused, not done
            // slowly (QEMU's BDRV_REQ_NO_FALLBACK): a partial qcow2 cluster
            // holding data cannot become a hole.
            return match self.image.write_zeroes_no_fallback(offset, length, self.cfg.may_unmap) {
                Ok(true) => Ok(()),
                Ok(false) => Err(Errno::EOPNOTSUPP),
                Err(e) => Err(errno_of(&e)),
            };
        }
        if mode & libc::FALLOC_FL_ZERO_RANGE != 0 {
            if keep_size {
                let _g = self.read_guard();
                let Some(length) = clamp_keep_size(offset, length, self.image.len())? else { return Ok(()) };
                return self.image.write_zeroes_at(offset, length, false).map_err(|e| errno_of(&e));
            }
            let _g = self.size_lock.write().unwrap_or_else(|p| p.into_inner());
            if end > self.image.len() {
                self.resize_locked(end, Preallocation::Off)?;
            }
            if length == 0 {
                return Ok(());
            }
            return self.image.write_zeroes_at(offset, length, false).map_err(|e| errno_of(&e));
        }
        Err(Errno::EOPNOTSUPP)
    }

    /// `lseek` with SEEK_DATA or SEEK_HOLE over the engine's block status:
    /// data is what some layer stores as data (zero clusters, unallocated
    /// clusters without backing data and holes in raw files are holes), as
    /// QEMU's `BDRV_BLOCK_DATA` says. The end of the disk is a hole.
    fn seek(&self, offset: i64, whence: i32) -> Result<i64, Errno> {
        let data = match whence {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            _ => return Err(Errno::EINVAL),
        };
        let mut pos = u64::try_from(offset).map_err(|_| Errno::ENXIO)?;
        let _g = self.read_guard();
        let size = self.image.len();
        while pos < size {
            let window = (size - pos).min(STATUS_WINDOW);
            let extents = self.image.block_status(pos, window).map_err(|e| errno_of(&e))?;
            let start = pos;
            for e in &extents {
                if e.length == 0 || e.offset + e.length <= pos {
                    continue;
                }
                if e.data == data {
                    return i64::try_from(pos.max(e.offset)).map_err(|_| Errno::EOVERFLOW);
                }
                pos = e.offset + e.length;
            }
            // Guards against an engine answer that covers nothing.
            if pos == start {
                return Err(Errno::ENXIO);
            }
        }
        if pos > size || data {
            return Err(Errno::ENXIO);
        }
        i64::try_from(pos).map_err(|_| Errno::EOVERFLOW)
    }
}

/// The time every timestamp shows: now, in whole seconds (QEMU's
/// `time(NULL)`).
fn now() -> SystemTime {
    let secs = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

thread_local! {
    /// The serving thread's read buffer, kept between requests.
    static READ_BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on a buffer of `n` bytes whose content is undefined (the
/// engine's `read_at` fills all of it). Up to `KEPT_READ_BUFFER` bytes it is
/// the thread's kept buffer: a fresh one per request costs a zeroed
/// allocation, and from 128 KiB (the kernel's readahead requests) that is an
/// mmap with a page fault per page and an munmap, every request.
fn with_read_buffer<R>(n: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    if n > KEPT_READ_BUFFER {
        return f(&mut vec![0u8; n]);
    }
    READ_BUFFER.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < n {
                buf.resize(n, 0);
            }
            f(&mut buf[..n])
        }
        // Not reentrant in practice; a fresh buffer keeps it correct anyway.
        Err(_) => f(&mut vec![0u8; n]),
    })
}

/// With KEEP_SIZE a range is cut at the end of the disk; `None` when
/// nothing of it is left. Past the end QEMU's length goes negative and
/// the request fails with EIO.
fn clamp_keep_size(offset: u64, length: u64, size: u64) -> Result<Option<u64>, Errno> {
    if offset > size {
        return Err(Errno::EIO);
    }
    let length = length.min(size - offset);
    Ok((length > 0).then_some(length))
}

/// The errno for an engine error: the host's own errno when the host
/// failed, else the closest one.
fn errno_of(e: &EngineError) -> Errno {
    match e.kind() {
        ErrorKind::OutOfBounds | ErrorKind::InvalidArgument => Errno::EINVAL,
        ErrorKind::NoSpace => Errno::ENOSPC,
        ErrorKind::ReadOnly => Errno::EACCES,
        ErrorKind::Unsupported => Errno::ENOTSUP,
        ErrorKind::Io => match e {
            EngineError::Io { source, .. } => source.raw_os_error().map_or(Errno::EIO, Errno::from_i32),
            _ => Errno::EIO,
        },
        _ => Errno::EIO,
    }
}

fn reply_result(reply: ReplyEmpty, r: Result<(), Errno>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for DiskFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match &self.cfg.layout {
            Layout::Dir(file) if parent == DIR_INO && name == file.as_os_str() => {
                reply.entry(&TTL, &self.file_attr(), Generation(0))
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.poll.request();
        if ino == self.file_ino() {
            reply.attr(&TTL, &self.file_attr());
        } else if self.is_dir(ino) {
            reply.attr(&TTL, &self.dir_attr());
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    /// Only the size and the permissions may change (and the owner with
    /// `allow_other`), and permissions only as far as they grant access
    /// that exists: no group/other bits without `allow_other`, no write
    /// bits on a read-only export. Anything else (times included) is
    /// ENOTSUP, as in QEMU.
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        crtime: Option<SystemTime>,
        chgtime: Option<SystemTime>,
        bkuptime: Option<SystemTime>,
        flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if ino != self.file_ino() {
            return reply.error(if self.is_dir(ino) { Errno::EPERM } else { Errno::ENOENT });
        }
        let owner_change = uid.is_some() || gid.is_some();
        let others = atime.is_some()
            || mtime.is_some()
            || ctime.is_some()
            || crtime.is_some()
            || chgtime.is_some()
            || bkuptime.is_some()
            || flags.is_some();
        if others || (owner_change && !self.cfg.allow_other) {
            return reply.error(Errno::ENOTSUP);
        }
        if let Some(m) = mode {
            if !self.cfg.allow_other && m & 0o077 != 0 {
                return reply.error(Errno::EPERM);
            }
            if !self.cfg.writable && m & 0o222 != 0 {
                return reply.error(Errno::EROFS);
            }
        }
        if let Some(s) = size {
            if !self.cfg.writable {
                return reply.error(Errno::EACCES);
            }
            if let Err(e) = self.resize(s, Preallocation::Off) {
                return reply.error(e);
            }
        }
        {
            let mut o = self.owner.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(m) = mode {
                o.mode = m & 0o7777;
            }
            if let Some(u) = uid {
                o.uid = u;
            }
            if let Some(g) = gid {
                o.gid = g;
            }
        }
        reply.attr(&TTL, &self.file_attr());
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino == self.file_ino() {
            let way = self.opens.lock().unwrap_or_else(|p| p.into_inner()).open(flags);
            reply.opened(FileHandle(way as u64), way.fopen_flags());
        } else if self.is_dir(ino) {
            reply.error(Errno::EISDIR);
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    /// Reads stop at the end of the disk (short reads, as files have).
    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.poll.request();
        if ino != self.file_ino() {
            return reply.error(Errno::EISDIR);
        }
        if size > MAX_READ {
            return reply.error(Errno::EINVAL);
        }
        let _g = self.read_guard();
        let disk = self.image.len();
        if offset >= disk {
            return reply.data(&[]);
        }
        let n = u64::from(size).min(disk - offset) as usize;
        with_read_buffer(n, |buf| match self.image.read_at(buf, offset) {
            Ok(()) => reply.data(buf),
            Err(e) => reply.error(errno_of(&e)),
        });
    }

    /// Writes stop at the end of the disk (a short write), unless the
    /// export is growable; a write starting at or past the end fails with
    /// EIO, as QEMU's does.
    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.poll.request();
        if ino != self.file_ino() {
            return reply.error(Errno::EISDIR);
        }
        if !self.cfg.writable {
            return reply.error(Errno::EACCES);
        }
        let Some(end) = offset.checked_add(data.len() as u64) else { return reply.error(Errno::EINVAL) };
        if self.cfg.growable && end > self.image.len() {
            // Grown under the exclusive lock; the write itself then runs
            // with the others (a concurrent shrink is caught below).
            let _g = self.size_lock.write().unwrap_or_else(|p| p.into_inner());
            if end > self.image.len() {
                if let Err(e) = self.resize_locked(end, Preallocation::Off) {
                    return reply.error(e);
                }
            }
        }
        let _g = self.read_guard();
        let disk = self.image.len();
        if offset >= disk {
            return reply.error(Errno::EIO);
        }
        let n = (end.min(disk) - offset) as usize;
        match self.image.write_at(&data[..n], offset) {
            Ok(()) => reply.written(n as u32),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    /// Every `close` flushes the image, as QEMU's export does.
    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        self.poll.request();
        reply_result(reply, self.image.flush().map_err(|e| errno_of(&e)));
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if ino == self.file_ino() {
            self.opens.lock().unwrap_or_else(|p| p.into_inner()).release(fh.0);
        }
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.poll.request();
        reply_result(reply, self.image.flush().map_err(|e| errno_of(&e)));
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let Layout::Dir(name) = &self.cfg.layout else { return reply.error(Errno::ENOTDIR) };
        if ino != DIR_INO {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (DIR_INO, FileType::Directory, OsStr::new(".")),
            (DIR_INO, FileType::Directory, OsStr::new("..")),
            (FILE_IN_DIR_INO, FileType::RegularFile, name.as_os_str()),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            // The offset given with an entry is where the next call resumes.
            if reply.add(*ino, i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.poll.request();
        if ino != self.file_ino() {
            return reply.error(Errno::EISDIR);
        }
        reply_result(reply, self.fallocate_inner(offset, length, mode));
    }

    fn lseek(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        self.poll.request();
        if ino != self.file_ino() {
            return reply.error(Errno::EISDIR);
        }
        match self.seek(offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_only_opens_bypass_the_cache_only_while_no_cached_reader_is_open() {
        let ro = OpenFlags(libc::O_RDONLY);
        let wo = OpenFlags(libc::O_WRONLY);
        let rw = OpenFlags(libc::O_RDWR);
        let mut o = Opens::default();
        let w = o.open(wo);
        assert_eq!(w, OpenWay::DirectWriter);
        // Readers meanwhile bypass the cache too, and do not count.
        assert_eq!(o.open(ro), OpenWay::DirectReader);
        assert_eq!(o.open(rw), OpenWay::DirectReader);
        o.release(OpenWay::DirectReader as u64);
        o.release(w as u64);
        let r = o.open(rw);
        assert_eq!(r, OpenWay::CachedReader);
        assert_eq!(o.open(wo), OpenWay::CachedWriter);
        o.release(OpenWay::CachedWriter as u64);
        o.release(r as u64);
        assert_eq!(o.open(wo), OpenWay::DirectWriter);
        assert_eq!(OpenWay::DirectWriter.fopen_flags(), FopenFlags::FOPEN_DIRECT_IO);
        assert_eq!(OpenWay::CachedReader.fopen_flags(), FopenFlags::empty());
    }

    #[test]
    fn keep_size_clamps_at_the_end_and_fails_past_it() {
        assert_eq!(clamp_keep_size(0, 100, 1000), Ok(Some(100)));
        assert_eq!(clamp_keep_size(950, 100, 1000), Ok(Some(50)));
        assert_eq!(clamp_keep_size(1000, 100, 1000), Ok(None));
        assert_eq!(clamp_keep_size(1001, 100, 1000), Err(Errno::EIO));
    }

    #[test]
    fn engine_errors_become_errnos() {
        let io = EngineError::Io { op: "writing", offset: 0, source: std::io::Error::from_raw_os_error(libc::ENOSPC) };
        assert_eq!(errno_of(&io), Errno::ENOSPC);
        assert_eq!(errno_of(&EngineError::OutOfBounds { offset: 1, len: 2, size: 0 }), Errno::EINVAL);
        assert_eq!(errno_of(&EngineError::ReadOnly), Errno::EACCES);
        assert_eq!(errno_of(&EngineError::Corrupt("x".into())), Errno::EIO);
    }
}
