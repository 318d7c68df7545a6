//! QEMU's `null-co` and `null-aio` protocols: a device of a given size
//! that forgets what is written to it.

use std::io;

use super::{Run, Storage};

/// A null device: writes are dropped, reads give zeros.
///
/// QEMU leaves a read's buffer as it was unless `read-zeroes` is set;
/// here a read always gives zeros, so nothing the process held before
/// shows through. Block status follows `read-zeroes` as QEMU reports it:
/// with it the device is one zero run, without it nothing is allocated.
#[derive(Debug)]
pub struct NullStorage {
    size: u64,
    read_zeroes: bool,
    driver: &'static str,
}

impl NullStorage {
    /// A null device of `size` bytes; `driver` is `null-co` or `null-aio`.
    pub fn new(size: u64, read_zeroes: bool, driver: &'static str) -> NullStorage {
        NullStorage { size, read_zeroes, driver }
    }
}

impl Storage for NullStorage {
    fn read_at(&self, buf: &mut [u8], _offset: u64) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.size)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if len == self.size {
            return Ok(());
        }
        Err(io::Error::new(io::ErrorKind::Unsupported, "Image format driver does not support resize"))
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn punch_hole(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Run>> {
        Ok(vec![Run { offset, len, data: false, zero: self.read_zeroes }])
    }
    fn driver_name(&self) -> &str {
        self.driver
    }
    fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(0)
    }
}
