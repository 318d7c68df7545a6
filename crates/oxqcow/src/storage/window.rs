//! QEMU's raw format node with `offset` and `size` as storage: a window
//! onto part of another storage. With a size, the window cannot grow:
//! writes reaching past it fail with ENOSPC, as QEMU's `raw_adjust_offset`
//! fails them, so that nothing leaks out of the range the user gave.

use std::io;

use super::{Run, Storage};

/// A window of `inner`: byte 0 is `inner`'s byte `offset`; with `size`,
/// the window ends there and keeps that length.
pub struct WindowStorage {
    inner: std::sync::Arc<dyn Storage>,
    offset: u64,
    size: Option<u64>,
}

fn no_space() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}

impl WindowStorage {
    /// The window of `inner` at `offset`, `size` bytes long (to the end of
    /// `inner` when `None`), checked as QEMU's `raw_apply_options` checks
    /// it, with its messages.
    pub fn new(inner: std::sync::Arc<dyn Storage>, offset: u64, size: Option<u64>) -> Result<WindowStorage, String> {
        let real = inner.len().map_err(|e| format!("Could not get image size: {e}"))?;
        if offset > real {
            return Err(format!("Offset ({offset}) cannot be greater than size of the containing file ({real})"));
        }
        if let Some(size) = size {
            if real - offset < size {
                // QEMU's text has the two spaces.
                return Err(format!(
                    "The sum of offset ({offset}) and size ({size}) has to be smaller or equal to the  \
                     actual size of the containing file ({real})"
                ));
            }
            if size % 512 != 0 {
                return Err("Specified size is not multiple of 512".into());
            }
        }
        Ok(WindowStorage { inner, offset, size })
    }

    /// Checks that `[offset, offset + len)` lies in a fixed-size window
    /// (anywhere in one without a size) and gives the inner offset.
    fn place_write(&self, offset: u64, len: u64) -> io::Result<u64> {
        if let Some(size) = self.size {
            if offset > size || len > size - offset {
                return Err(no_space());
            }
        }
        self.offset.checked_add(offset).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
    }
}

impl Storage for WindowStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // Past a fixed size reads zeros (QEMU's block layer zero-fills
        // reads past a node's end), never the bytes after the window.
        let inside = match self.size {
            Some(size) => size.saturating_sub(offset).min(buf.len() as u64) as usize,
            None => buf.len(),
        };
        let (head, tail) = buf.split_at_mut(inside);
        if !head.is_empty() {
            self.inner.read_at(head, self.offset + offset)?;
        }
        tail.fill(0);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let at = self.place_write(offset, buf.len() as u64)?;
        self.inner.write_at(buf, at)
    }
    fn len(&self) -> io::Result<u64> {
        // As QEMU's `raw_co_getlength`: the file may have shrunk since.
        let avail = self.inner.len()?.saturating_sub(self.offset);
        Ok(self.size.map_or(avail, |s| s.min(avail)))
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        match self.size {
            Some(size) if len == size => Ok(()),
            Some(_) => Err(io::Error::new(io::ErrorKind::Unsupported, "Cannot resize fixed-size raw disks")),
            None => self.inner.set_len(self.offset + len),
        }
    }
    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let at = self.place_write(offset, len)?;
        self.inner.punch_hole(at, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let at = self.place_write(offset, len)?;
        self.inner.write_zeroes(at, len)
    }
    fn write_zeroes_fast(&self, offset: u64, len: u64) -> io::Result<bool> {
        let at = self.place_write(offset, len)?;
        self.inner.write_zeroes_fast(at, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let at = self.place_write(offset, len)?;
        self.inner.allocate(at, len)
    }
    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Run>> {
        let runs = self.inner.allocation(self.offset + offset, len)?;
        Ok(runs.into_iter().map(|r| Run { offset: r.offset - self.offset, ..r }).collect())
    }
    fn data_runs(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64, bool)>> {
        let runs = self.inner.data_runs(self.offset + offset, len)?;
        Ok(runs.into_iter().map(|(o, l, d)| (o - self.offset, l, d)).collect())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let at = self.place_write(offset, len)?;
        self.inner.discard(at, len)
    }
    fn driver_name(&self) -> &str {
        self.inner.driver_name()
    }
    fn set_direct(&self, direct: bool) -> io::Result<()> {
        self.inner.set_direct(direct)
    }
    fn set_ignore_sync(&self, ignore: bool) {
        self.inner.set_ignore_sync(ignore)
    }
    fn allocated_bytes(&self) -> io::Result<u64> {
        self.inner.allocated_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;
    use std::sync::Arc;

    fn inner(len: usize) -> Arc<dyn Storage> {
        let m = MemoryStorage::new();
        m.write_at(&(0..len).map(|i| i as u8).collect::<Vec<_>>(), 0).unwrap();
        Arc::new(m)
    }

    #[test]
    fn a_fixed_window_reads_its_range_and_refuses_to_grow() {
        let w = WindowStorage::new(inner(4096), 512, Some(1024)).unwrap();
        assert_eq!(w.len().unwrap(), 1024);
        let mut buf = [0xffu8; 8];
        w.read_at(&mut buf, 1020).unwrap();
        // Bytes 1532..1536 of the inner storage, then zeros past the window.
        assert_eq!(buf, [252, 253, 254, 255, 0, 0, 0, 0]);
        w.write_at(&[1; 4], 1020).unwrap();
        let e = w.write_at(&[1; 8], 1020).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        assert!(w.set_len(2048).is_err());
    }

    #[test]
    fn windows_are_checked_as_qemu_checks_them() {
        let big = WindowStorage::new(inner(1024), 2048, None).err().unwrap();
        assert_eq!(big, "Offset (2048) cannot be greater than size of the containing file (1024)");
        let sum = WindowStorage::new(inner(1024), 512, Some(1024)).err().unwrap();
        assert!(sum.starts_with("The sum of offset (512) and size (1024) has to be smaller or equal to the  actual"));
        let odd = WindowStorage::new(inner(1024), 0, Some(1000)).err().unwrap();
        assert_eq!(odd, "Specified size is not multiple of 512");
    }
}
