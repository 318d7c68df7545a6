//! `std::io::{Read, Write, Seek}` over any [`BlockDevice`].

use std::io::{self, Read, Seek, SeekFrom, Write};

use crate::image::BlockDevice;

/// A byte cursor over a disk image. Reads and writes stop at the end of the disk.
pub struct ImageCursor<'a, D: BlockDevice + ?Sized> {
    device: &'a D,
    position: u64,
}

impl<'a, D: BlockDevice + ?Sized> ImageCursor<'a, D> {
    /// A cursor at offset 0.
    pub fn new(device: &'a D) -> Self {
        ImageCursor { device, position: 0 }
    }
    /// The current offset.
    pub fn position(&self) -> u64 {
        self.position
    }
}

fn to_io(e: crate::Error) -> io::Error {
    io::Error::other(e)
}

impl<D: BlockDevice + ?Sized> Read for ImageCursor<'_, D> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (self.device.len().saturating_sub(self.position)).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.device.read_at(&mut buf[..n], self.position).map_err(to_io)?;
        self.position += n as u64;
        Ok(n)
    }
}

impl<D: BlockDevice + ?Sized> Write for ImageCursor<'_, D> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = (self.device.len().saturating_sub(self.position)).min(buf.len() as u64) as usize;
        if n == 0 && !buf.is_empty() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "end of disk"));
        }
        self.device.write_at(&buf[..n], self.position).map_err(to_io)?;
        self.position += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.device.flush().map_err(to_io)
    }
}

impl<D: BlockDevice + ?Sized> Seek for ImageCursor<'_, D> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let new = match pos {
            SeekFrom::Start(o) => Some(o),
            SeekFrom::End(d) => self.device.len().checked_add_signed(d),
            SeekFrom::Current(d) => self.position.checked_add_signed(d),
        };
        self.position = new.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        Ok(self.position)
    }
}
