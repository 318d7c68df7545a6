//! Host storage: where image bytes live.
//!
//! The trait is deliberately small (positional read and write, length,
//! sync, hole punching) so that a test backend can model crashes exactly:
//! everything the engine does to the host goes through these calls.

mod file;
mod grow_ahead;
#[cfg(feature = "http")]
pub mod http;
pub(crate) mod lock;
mod memory;
mod null;
#[cfg(feature = "s3")]
pub mod object;
#[cfg(feature = "s3")]
pub mod object_writer;
#[cfg(any(feature = "http", feature = "s3"))]
mod ranged;
mod window;

use std::io;

pub use file::FileStorage;
pub(crate) use grow_ahead::GrowAhead;
#[cfg(feature = "http")]
pub use http::{HttpOptions, HttpStorage};
pub use memory::MemoryStorage;
pub use null::NullStorage;
#[cfg(feature = "s3")]
pub use object::{ObjectOptions, ObjectStorage};
#[cfg(feature = "s3")]
pub use object_writer::ObjectWriter;
pub use window::WindowStorage;

/// The allocation of a run of storage bytes, as a protocol reports it
/// (QEMU's block status of a protocol node).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// Where the run starts.
    pub offset: u64,
    /// Its length.
    pub len: u64,
    /// Stored as data (not a hole).
    pub data: bool,
    /// Reads as zeros.
    pub zero: bool,
}

/// Byte-addressed host storage, shared between threads.
pub trait Storage: Send + Sync {
    /// Reads `buf.len()` bytes at `offset`; bytes past the end read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, extending the storage if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the storage is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncates or extends (with zeros).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes the storage at least `end` bytes long (never shorter). A
    /// storage may reserve up to `ahead` bytes more, which read as zeros,
    /// do not count in [`Storage::len`] and are given back at the next
    /// [`Storage::sync`] (the storage of a writable qcow2 image), so that a file that grows by many
    /// small steps is extended by few calls.
    fn extend_to(&self, end: u64, ahead: u64) -> io::Result<()> {
        let _ = ahead;
        if self.len()? < end {
            self.set_len(end)?;
        }
        Ok(())
    }
    /// Makes every completed write durable.
    fn sync(&self) -> io::Result<()>;
    /// Deallocates a range; it reads as zeros afterwards. The length is kept.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len)
    }
    /// Makes a range read as zeros, preferably without writing them.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let chunk = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len() as u64);
            self.write_at(&chunk[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }
    /// Zeroes a range only if the storage can do it without writing the
    /// zeros (`fallocate` zero-range); returns whether it did. Callers fall
    /// back to writing zeros themselves.
    fn write_zeroes_fast(&self, offset: u64, len: u64) -> io::Result<bool> {
        let _ = (offset, len);
        Ok(false)
    }
    /// Reserves space for a range without changing its content, extending the
    /// length if the range ends past it (`fallocate` mode 0).
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        if self.len()? < end {
            self.set_len(end)?;
        }
        Ok(())
    }
    /// Splits `[offset, offset + len)` into runs of data (`true`) and holes
    /// (`false`), as far as the storage knows; the default says "all data".
    fn data_runs(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64, bool)>> {
        Ok(vec![(offset, len, true)])
    }
    /// [`Storage::data_runs`] with what each run reads as: a hole reads
    /// as zeros unless the storage says otherwise (an NBD export's hole
    /// without its zero flag, a null device that does not read zeros).
    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Run>> {
        Ok(self
            .data_runs(offset, len)?
            .into_iter()
            .map(|(offset, len, data)| Run { offset, len, data, zero: !data })
            .collect())
    }
    /// Tells the storage a range is no longer needed (a raw image's
    /// discard); what it then reads is up to the storage. The default
    /// punches a hole.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.punch_hole(offset, len)
    }
    /// The name of QEMU's protocol driver that shows bytes this way, for
    /// `info` ("file", "nbd", "null-co", ...).
    fn driver_name(&self) -> &str {
        "file"
    }
    /// The host file behind the storage, if it is one.
    fn host_file(&self) -> Option<&std::fs::File> {
        None
    }
    /// Copies `len` bytes at `offset` to `dst_offset` of `dst` without
    /// passing them through memory (`copy_file_range`), when both are host
    /// files that allow it and the source holds the whole range; false
    /// otherwise (part may have been copied).
    fn copy_range(&self, dst: &dyn Storage, offset: u64, dst_offset: u64, len: u64) -> io::Result<bool> {
        let _ = (dst, offset, dst_offset, len);
        Ok(false)
    }
    /// Cache modes `none` and `directsync`: bypass the host's page cache
    /// where the storage can (QEMU's `cache.direct`); an error when it
    /// cannot at all.
    fn set_direct(&self, direct: bool) -> io::Result<()> {
        let _ = direct;
        Ok(())
    }
    /// Cache mode `unsafe`: make [`Storage::sync`] a no-op (or not).
    fn set_ignore_sync(&self, ignore: bool) {
        let _ = ignore;
    }
    /// The allocation unit the storage reports as QEMU's protocol driver
    /// reports it (`bdrv_get_info`'s cluster size: an RBD image's object
    /// size), shown by `info`; `None` when it has none.
    fn cluster_size(&self) -> Option<u64> {
        None
    }
    /// The storage's own snapshots, name and size, as QEMU's protocol driver
    /// lists them (an RBD image's), shown by `info`; none by default.
    fn protocol_snapshots(&self) -> io::Result<Vec<(String, u64)>> {
        Ok(Vec::new())
    }
    /// Bytes the storage occupies on the host (for `disk size` in info).
    fn allocated_bytes(&self) -> io::Result<u64> {
        self.len()
    }
}

/// Empties a storage that will hold a new image; one already empty is not
/// truncated again (see [`FileStorage::empty`] for why that matters).
pub(crate) fn empty(storage: &dyn Storage) -> io::Result<()> {
    if storage.is_empty()? {
        return Ok(());
    }
    storage.set_len(0)
}
