//! Storage on a host file, with positional I/O from many threads.
//!
//! With cache modes `none` and `directsync` (QEMU's `cache.direct=on`) the
//! file is also opened a second time with `O_DIRECT`, and every request
//! whose offset, length and memory meet the file's direct I/O alignment
//! bypasses the page cache through that descriptor. The rest (a header
//! field, a partial sector of guest data) goes through the first one: the
//! kernel keeps the two coherent (direct I/O writes back and drops the
//! cached pages it overlaps), and byte-granular buffered writes need no
//! read-modify-write of whole blocks, so concurrent writers of different
//! bytes of one block cannot undo each other. Aligned requests whose
//! memory is not aligned are copied through an aligned buffer.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use rustix::fs::{FallocateFlags, OFlags, SeekFrom};

use super::Storage;

/// A host file.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    /// Cache mode `unsafe`: syncs are skipped.
    ignore_sync: AtomicBool,
    /// The `O_DIRECT` descriptor, opened by the first
    /// [`Storage::set_direct`]`(true)`.
    direct: OnceLock<Direct>,
    /// Whether requests use `direct` (cache modes can change while open).
    direct_on: AtomicBool,
}

/// The file opened with `O_DIRECT`, and the alignment its requests need.
#[derive(Debug)]
struct Direct {
    file: File,
    /// Alignment of the memory of a request.
    mem_align: usize,
    /// Alignment of a request's offset and length.
    offset_align: u64,
}

impl Direct {
    fn opens(file: &File) -> io::Result<Direct> {
        let flags = rustix::fs::fcntl_getfl(file)?;
        let writable = flags.intersects(OFlags::WRONLY | OFlags::RDWR);
        // A new open file description of the same file: O_DIRECT on the
        // first would also apply to every unaligned request.
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(file));
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(OFlags::DIRECT.bits() as i32)
            .open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("the file system does not support O_DIRECT: {e}")))?;
        // Linux 6.1 reports the alignments; before, the logical block size
        // of nearly every device is at most 4 KiB.
        let (mut mem_align, mut offset_align) = (4096u64, 4096u64);
        if let Ok(st) =
            rustix::fs::statx(&direct, "", rustix::fs::AtFlags::EMPTY_PATH, rustix::fs::StatxFlags::DIOALIGN)
        {
            if st.stx_mask & rustix::fs::StatxFlags::DIOALIGN.bits() != 0 && st.stx_dio_offset_align != 0 {
                mem_align = u64::from(st.stx_dio_mem_align.max(1));
                offset_align = u64::from(st.stx_dio_offset_align);
            }
        }
        if !mem_align.is_power_of_two() || !offset_align.is_power_of_two() || offset_align > 1 << 20 {
            return Err(io::Error::other(format!(
                "unusable direct I/O alignment (memory {mem_align}, offset {offset_align})"
            )));
        }
        Ok(Direct { file: direct, mem_align: mem_align as usize, offset_align })
    }

    /// Whether a request at `offset` of `len` bytes can go through the
    /// direct descriptor (its memory may still need a bounce buffer).
    fn fits(&self, offset: u64, len: usize) -> bool {
        len != 0 && offset % self.offset_align == 0 && len as u64 % self.offset_align == 0
    }

    /// Whether `buf` can be handed to the direct descriptor as it is.
    fn mem_aligned(&self, buf: &[u8]) -> bool {
        buf.as_ptr() as usize % self.mem_align == 0
    }

    /// A zeroed buffer of `len` bytes whose start meets the memory alignment.
    fn bounce<'a>(&self, store: &'a mut Vec<u8>, len: usize) -> &'a mut [u8] {
        store.resize(len + self.mem_align, 0);
        let skip = store.as_ptr().align_offset(self.mem_align);
        &mut store[skip..skip + len]
    }
}

impl Drop for FileStorage {
    fn drop(&mut self) {
        // Release QEMU's lock bytes explicitly: closing the descriptor may
        // not end the open file description (see `lock::unlock`).
        crate::storage::lock::unlock(&self.file);
    }
}

impl FileStorage {
    /// Opens an existing file.
    pub fn open(path: &Path, writable: bool) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new().read(true).write(writable).open(path)?;
        Ok(FileStorage::from_file(file))
    }

    /// Creates a file, or opens an existing one without truncating it: the
    /// caller locks it first and truncates after (QEMU does the same, so
    /// that creating over an image in use fails without destroying it).
    pub fn create(path: &Path) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        Ok(FileStorage::from_file(file))
    }

    /// Wraps an open file.
    pub fn from_file(file: File) -> Self {
        FileStorage {
            file,
            ignore_sync: AtomicBool::new(false),
            direct: OnceLock::new(),
            direct_on: AtomicBool::new(false),
        }
    }

    /// The direct descriptor, when requests use it.
    fn direct(&self) -> Option<&Direct> {
        if self.direct_on.load(Ordering::Relaxed) {
            self.direct.get()
        } else {
            None
        }
    }

    /// Empties the file for a new image written through this storage.
    ///
    /// ext4 (with its default `auto_da_alloc`) marks a file truncated to
    /// length 0 as "being replaced" and, on the next close of any of its
    /// descriptors, writes back every dirty page before returning: a
    /// conversion that filled the page cache would spend a third of its
    /// time in the final close. So an empty file is left alone, and after
    /// emptying a non-empty one a second descriptor is opened and closed at
    /// once, which clears the mark while nothing is dirty yet (QEMU gets the
    /// same effect by closing and reopening a new image after creating it).
    /// The locks are per open file description, so they stay in place.
    pub fn empty(&self, path: &Path) -> io::Result<()> {
        if self.file.metadata()?.len() == 0 {
            return Ok(());
        }
        self.file.set_len(0)?;
        // Only a hint to the filesystem: the file is empty either way.
        drop(File::open(path));
        Ok(())
    }

    /// Takes QEMU's image locks on this file for an open that is read-only
    /// or not and shares writers or not (`-U`), as [`crate::Image::open`]
    /// takes them; they last as long as this storage.
    pub fn lock_image(&self, path: &Path, read_only: bool, force_share: bool) -> crate::Result<()> {
        crate::storage::lock::lock(
            &self.file,
            crate::storage::lock::LockSet::for_open(read_only, force_share),
            &path.display().to_string(),
        )
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// Reads `buf.len()` bytes at `offset` of `file`, zeros past its end.
/// Returns how many bytes came from the file when a read came up short of
/// the end of `buf` (the end of the file, or for a direct descriptor a
/// tail it cannot read); the rest is left to the caller.
fn read_full(file: &File, buf: &mut [u8], offset: u64, stop_short: bool) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                if stop_short && done < buf.len() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        if let Some(d) = self.direct().filter(|d| d.fits(offset, buf.len())) {
            done = if d.mem_aligned(buf) {
                read_full(&d.file, buf, offset, true)?
            } else {
                let mut store = Vec::new();
                let bounce = d.bounce(&mut store, buf.len());
                let n = read_full(&d.file, bounce, offset, true)?;
                buf[..n].copy_from_slice(&bounce[..n]);
                n
            };
        }
        // Whatever the direct read left (at the end of the file) comes
        // through the page cache, as do unaligned requests.
        let n = read_full(&self.file, &mut buf[done..], offset + done as u64, false)?;
        buf[done + n..].fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self.direct().filter(|d| d.fits(offset, buf.len())) {
            Some(d) if d.mem_aligned(buf) => d.file.write_all_at(buf, offset),
            Some(d) => {
                let mut store = Vec::new();
                let bounce = d.bounce(&mut store, buf.len());
                bounce.copy_from_slice(buf);
                d.file.write_all_at(bounce, offset)
            }
            None => self.file.write_all_at(buf, offset),
        }
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn sync(&self) -> io::Result<()> {
        if self.ignore_sync.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&self.file, flags, offset, len) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP) | Err(rustix::io::Errno::NOSYS) => {
                self.write_zeroes_by_writing(offset, len)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        match rustix::fs::fallocate(&self.file, FallocateFlags::ZERO_RANGE, offset, len) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP) | Err(rustix::io::Errno::NOSYS) | Err(rustix::io::Errno::INVAL) => {
                self.write_zeroes_by_writing(offset, len)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn write_zeroes_fast(&self, offset: u64, len: u64) -> io::Result<bool> {
        match rustix::fs::fallocate(&self.file, FallocateFlags::ZERO_RANGE, offset, len) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::OPNOTSUPP) | Err(rustix::io::Errno::NOSYS) | Err(rustix::io::Errno::INVAL) => {
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        match rustix::fs::fallocate(&self.file, FallocateFlags::empty(), offset, len) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP) | Err(rustix::io::Errno::NOSYS) => {
                if self.len()? < offset + len {
                    self.set_len(offset + len)?;
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn data_runs(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64, bool)>> {
        let end = offset + len;
        let file_len = self.len()?;
        let mut runs = Vec::new();
        let mut pos = offset;
        while pos < end {
            if pos >= file_len {
                runs.push((pos, end - pos, false));
                break;
            }
            let data = match rustix::fs::seek(&self.file, SeekFrom::Data(pos)) {
                Ok(d) => d,
                Err(rustix::io::Errno::NXIO) => file_len,
                Err(_) => return Ok(vec![(offset, len, true)]),
            };
            if data > pos {
                let hole_end = data.min(end);
                runs.push((pos, hole_end - pos, false));
                pos = hole_end;
                continue;
            }
            let hole = match rustix::fs::seek(&self.file, SeekFrom::Hole(pos)) {
                Ok(h) => h,
                Err(_) => file_len,
            };
            let data_end = hole.min(end).max(pos + 1);
            runs.push((pos, data_end - pos, true));
            pos = data_end;
        }
        Ok(runs)
    }

    fn set_ignore_sync(&self, ignore: bool) {
        self.ignore_sync.store(ignore, Ordering::Relaxed);
    }

    fn host_file(&self) -> Option<&File> {
        Some(&self.file)
    }

    fn copy_range(&self, dst: &dyn Storage, offset: u64, dst_offset: u64, len: u64) -> io::Result<bool> {
        let Some(out) = dst.host_file() else { return Ok(false) };
        let (mut from, mut to) = (offset, dst_offset);
        let end = offset + len;
        while from < end {
            let want = usize::try_from(end - from).unwrap_or(usize::MAX).min(1 << 30);
            match rustix::fs::copy_file_range(&self.file, Some(&mut from), out, Some(&mut to), want) {
                // The end of the source file: what lies past it reads as
                // zeros, which the caller writes.
                Ok(0) => return Ok(false),
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => {}
                Err(
                    rustix::io::Errno::XDEV
                    | rustix::io::Errno::INVAL
                    | rustix::io::Errno::NOSYS
                    | rustix::io::Errno::OPNOTSUPP
                    | rustix::io::Errno::BADF,
                ) => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }

    fn set_direct(&self, direct: bool) -> io::Result<()> {
        if direct && self.direct.get().is_none() {
            let d = Direct::opens(&self.file)?;
            // Another thread may have won the race; either descriptor works.
            let _ = self.direct.set(d);
        }
        self.direct_on.store(direct, Ordering::Relaxed);
        Ok(())
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        let st = rustix::fs::fstat(&self.file)?;
        Ok(st.st_blocks as u64 * 512)
    }
}

impl FileStorage {
    fn write_zeroes_by_writing(&self, offset: u64, len: u64) -> io::Result<()> {
        let chunk = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len() as u64);
            self.write_at(&chunk[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_drops_the_old_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 10_000]).unwrap();
        let s = FileStorage::create(&path).unwrap();
        assert_eq!(s.len().unwrap(), 10_000);
        s.empty(&path).unwrap();
        assert_eq!(s.len().unwrap(), 0);
        s.write_at(b"new", 0).unwrap();
        drop(s);
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
    }
}
