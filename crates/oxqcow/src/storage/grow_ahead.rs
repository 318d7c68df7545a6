//! Growing a file in large steps while it keeps the length it would have
//! grown to by small ones: the storage a writable qcow2 image's file is
//! opened through.
//!
//! The qcow2 allocator extends the file over every run of clusters it hands
//! out (`Refcounts::cover_allocated`). Done exactly, that is a length query
//! and a truncate per run. [`GrowAhead`] keeps the length it reports
//! itself (the end of the furthest write or extension: what the file would
//! be without the reserve) and, when an extension passes the file's real
//! end, truncates the file further than asked, so that the next extensions
//! cost nothing. The reserve reads as zeros, holds no blocks (the truncate
//! makes a hole) and is cut off at every [`Storage::sync`] and when the
//! storage is dropped, so a flushed or closed image has the length QEMU
//! gives it. A crash may leave the reserve: free clusters past the last one
//! in use, which check accepts (their refcount is 0 and nothing refers to
//! them).
//!
//! Writes hold a shared gate and record their end before they start;
//! growing the reserve and cutting it off take the gate exclusively and
//! never go below the recorded end, so neither removes a write, whoever
//! calls them (`set_len` sets the length asked for, as on any storage).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use super::{Run, Storage};

/// A storage whose growth runs ahead of its length.
pub struct GrowAhead {
    inner: Arc<dyn Storage>,
    /// The length reported: the end of the furthest write, extension or
    /// truncation.
    len: AtomicU64,
    /// A length `inner` is known to have (set under the exclusive gate);
    /// the reserve ends there when it is more than `len`.
    reserved: AtomicU64,
    /// Shared by every request that may change what lies where; exclusive
    /// for changes of the real length.
    gate: RwLock<()>,
}

impl GrowAhead {
    /// `inner` with its current length.
    pub fn new(inner: Arc<dyn Storage>) -> io::Result<GrowAhead> {
        let len = inner.len()?;
        Ok(GrowAhead { inner, len: AtomicU64::new(len), reserved: AtomicU64::new(len), gate: RwLock::new(()) })
    }

    fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that the storage reaches `end` now.
    fn reach(&self, end: u64) {
        self.len.fetch_max(end, Ordering::AcqRel);
    }

    /// Cuts the reserve off: the real length becomes the reported one.
    fn trim(&self) -> io::Result<()> {
        let _excl = self.gate.write().unwrap_or_else(|p| p.into_inner());
        let len = self.len.load(Ordering::Acquire);
        if self.reserved.load(Ordering::Acquire) > len {
            self.inner.set_len(len)?;
            self.reserved.store(len, Ordering::Release);
        }
        Ok(())
    }
}

impl Drop for GrowAhead {
    fn drop(&mut self) {
        // Best effort: a close flushes (and so trims) before this; what is
        // left after a failed flush is free clusters at worst.
        let _ = self.trim();
    }
}

impl Storage for GrowAhead {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let _g = self.shared();
        self.reach(offset.saturating_add(buf.len() as u64));
        self.inner.write_at(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.len.load(Ordering::Acquire))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let _excl = self.gate.write().unwrap_or_else(|p| p.into_inner());
        self.inner.set_len(len)?;
        self.len.store(len, Ordering::Release);
        self.reserved.store(len, Ordering::Release);
        Ok(())
    }

    fn extend_to(&self, end: u64, ahead: u64) -> io::Result<()> {
        {
            let _g = self.shared();
            if self.reserved.load(Ordering::Acquire) >= end {
                // The file is that long already (the reserve cannot be cut
                // while the gate is held).
                self.reach(end);
                return Ok(());
            }
        }
        let _excl = self.gate.write().unwrap_or_else(|p| p.into_inner());
        if self.reserved.load(Ordering::Acquire) < end {
            // No write is in flight, and none ended past `len`: growing to
            // at least that never cuts one. (A write that reached `end`
            // is not trusted to have done it: it may have failed.)
            let to = end.saturating_add(ahead).max(self.len.load(Ordering::Acquire));
            self.inner.set_len(to)?;
            self.reserved.store(to, Ordering::Release);
        }
        self.reach(end);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.trim()?;
        self.inner.sync()
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let _g = self.shared();
        self.inner.punch_hole(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let _g = self.shared();
        self.reach(offset.saturating_add(len));
        self.inner.write_zeroes(offset, len)
    }

    fn write_zeroes_fast(&self, offset: u64, len: u64) -> io::Result<bool> {
        let _g = self.shared();
        let done = self.inner.write_zeroes_fast(offset, len)?;
        if done {
            self.reach(offset.saturating_add(len));
        }
        Ok(done)
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let _g = self.shared();
        self.reach(offset.saturating_add(len));
        self.inner.allocate(offset, len)
    }

    fn data_runs(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64, bool)>> {
        self.inner.data_runs(offset, len)
    }

    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Run>> {
        self.inner.allocation(offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let _g = self.shared();
        self.inner.discard(offset, len)
    }

    fn driver_name(&self) -> &str {
        self.inner.driver_name()
    }

    // `host_file` stays `None`: a copy into the file past this storage
    // would not be seen growing it.

    fn copy_range(&self, dst: &dyn Storage, offset: u64, dst_offset: u64, len: u64) -> io::Result<bool> {
        self.inner.copy_range(dst, offset, dst_offset, len)
    }

    fn set_direct(&self, direct: bool) -> io::Result<()> {
        self.inner.set_direct(direct)
    }

    fn set_ignore_sync(&self, ignore: bool) {
        self.inner.set_ignore_sync(ignore)
    }

    fn cluster_size(&self) -> Option<u64> {
        self.inner.cluster_size()
    }

    fn protocol_snapshots(&self) -> io::Result<Vec<(String, u64)>> {
        self.inner.protocol_snapshots()
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        self.inner.allocated_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;

    #[test]
    fn grows_ahead_and_gives_the_reserve_back_at_sync() {
        let mem = Arc::new(MemoryStorage::from_bytes(vec![1; 100]));
        let g = GrowAhead::new(mem.clone()).unwrap();
        g.extend_to(1000, 4000).unwrap();
        assert_eq!(g.len().unwrap(), 1000);
        assert_eq!(mem.len().unwrap(), 5000);
        // Inside the reserve: nothing changes on the medium.
        g.extend_to(3000, 4000).unwrap();
        g.write_at(&[7; 10], 3500).unwrap();
        assert_eq!((g.len().unwrap(), mem.len().unwrap()), (3510, 5000));
        g.sync().unwrap();
        assert_eq!(mem.len().unwrap(), 3510);
        // Past the reserve: a new one.
        g.extend_to(3600, 100).unwrap();
        assert_eq!(mem.len().unwrap(), 3700);
        drop(g);
        assert_eq!(mem.len().unwrap(), 3600);
        let bytes = mem.to_bytes();
        assert_eq!(&bytes[..100], &[1; 100][..]);
        assert!(bytes[100..3500].iter().all(|&b| b == 0));
        assert_eq!(&bytes[3500..3510], &[7; 10][..]);
    }

    /// Memory that refuses writes.
    struct Refusing(MemoryStorage);

    impl Storage for Refusing {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.0.read_at(buf, offset)
        }
        fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::EIO))
        }
        fn len(&self) -> io::Result<u64> {
            self.0.len()
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.0.set_len(len)
        }
        fn sync(&self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A write counts in the length before it is issued (so that a cut
    /// never removes it); one that failed must not stand in for an
    /// extension, which would leave an allocated cluster past the end.
    #[test]
    fn a_failed_write_past_the_end_does_not_extend_the_file() {
        let inner = Arc::new(Refusing(MemoryStorage::new()));
        let g = GrowAhead::new(inner.clone()).unwrap();
        assert!(g.write_at(&[1; 10], 5000).is_err());
        g.extend_to(3000, 0).unwrap();
        assert!(inner.len().unwrap() >= 3000, "the file ends at {}", inner.len().unwrap());
    }

    #[test]
    fn a_truncation_drops_the_reserve() {
        let mem = Arc::new(MemoryStorage::new());
        let g = GrowAhead::new(mem.clone()).unwrap();
        g.extend_to(10, 90).unwrap();
        g.set_len(50).unwrap();
        g.sync().unwrap();
        assert_eq!((g.len().unwrap(), mem.len().unwrap()), (50, 50));
    }
}
