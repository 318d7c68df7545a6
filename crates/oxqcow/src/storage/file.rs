//! Storage on a host file, with positional I/O from many threads.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{FallocateFlags, SeekFrom};

use super::Storage;

/// A host file.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    /// Cache mode `unsafe`: syncs are skipped.
    ignore_sync: AtomicBool,
}

impl Drop for FileStorage {
    fn drop(&mut self) {
        // Release QEMU's lock bytes explicitly: closing the descriptor may
        // not end the open file description (see `lock::unlock`).
        crate::lock::unlock(&self.file);
    }
}

impl FileStorage {
    /// Opens an existing file.
    pub fn open(path: &Path, writable: bool) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new().read(true).write(writable).open(path)?;
        Ok(FileStorage { file, ignore_sync: AtomicBool::new(false) })
    }

    /// Creates a file, or opens an existing one without truncating it: the
    /// caller locks it first and truncates after (QEMU does the same, so
    /// that creating over an image in use fails without destroying it).
    pub fn create(path: &Path) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        Ok(FileStorage { file, ignore_sync: AtomicBool::new(false) })
    }

    /// Wraps an open file.
    pub fn from_file(file: File) -> Self {
        FileStorage { file, ignore_sync: AtomicBool::new(false) }
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

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
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
