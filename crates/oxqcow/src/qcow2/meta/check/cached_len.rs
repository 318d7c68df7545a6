//! The image file as check sees it, its length remembered.

use std::sync::atomic::{AtomicU64, Ordering};

use super::*;

pub(super) const UNKNOWN_LEN: u64 = u64::MAX;

/// The image file with its length remembered until something changes it:
/// check asks for the length for every cluster it counts (as QEMU's check
/// asks its block layer, which keeps the length too), and a stat per
/// cluster made checking a large image several times slower than QEMU.
pub(super) struct CachedLen<'a> {
    pub(super) inner: &'a dyn Storage,
    pub(super) len: AtomicU64,
}

impl CachedLen<'_> {
    pub(super) fn changed(&self) {
        self.len.store(UNKNOWN_LEN, Ordering::Relaxed);
    }
}

impl Storage for CachedLen<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.changed();
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        match self.len.load(Ordering::Relaxed) {
            UNKNOWN_LEN => {
                // QEMU's block layer counts a file in 512-byte sectors
                // (`bdrv_getlength`): check judges references against the
                // length rounded up, and what lies past the true end reads
                // as zeros.
                let len = self.inner.len()?.next_multiple_of(512);
                self.len.store(len, Ordering::Relaxed);
                Ok(len)
            }
            len => Ok(len),
        }
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.changed();
        self.inner.set_len(len)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.inner.sync()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.changed();
        self.inner.punch_hole(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.changed();
        self.inner.write_zeroes(offset, len)
    }
    fn write_zeroes_fast(&self, offset: u64, len: u64) -> std::io::Result<bool> {
        self.changed();
        self.inner.write_zeroes_fast(offset, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.changed();
        self.inner.allocate(offset, len)
    }
    fn data_runs(&self, offset: u64, len: u64) -> std::io::Result<Vec<(u64, u64, bool)>> {
        self.inner.data_runs(offset, len)
    }
    fn set_ignore_sync(&self, ignore: bool) {
        self.inner.set_ignore_sync(ignore)
    }
    fn allocated_bytes(&self) -> std::io::Result<u64> {
        self.inner.allocated_bytes()
    }
}
