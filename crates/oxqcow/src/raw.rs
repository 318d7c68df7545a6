//! The raw format: the guest disk is the file, byte for byte; and, for a
//! file whose format was probed, QEMU's guard on its first sector.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use oxqcow_format::probe::{probe_head, Probed, PROBE_LEN};

use crate::error::{Error, Result};
use crate::extent::{push_extent, Extent};
use crate::options::{DetectZeroes, Preallocation};
use crate::storage::Storage;

/// The unit QEMU sizes disks in.
const SECTOR_SIZE: u64 = 512;

/// An open raw image.
pub struct Raw {
    storage: Arc<dyn Storage>,
    size: AtomicU64,
    read_only: bool,
    /// Cache mode writethrough: every write request ends with a sync.
    writethrough: AtomicBool,
    /// The format was probed rather than named (QEMU's `bs->probed`):
    /// writes must not make the first sector probe as another format.
    probed: bool,
    /// Held by a write to the probed sector from its check until its data
    /// is written, so that two partial writes cannot together build a
    /// signature that neither check saw.
    probe_sector: Mutex<()>,
    /// What writes of all-zero buffers become (`detect-zeroes`).
    detect_zeroes: DetectZeroes,
}

impl Raw {
    /// Opens raw storage.
    pub fn open(storage: Arc<dyn Storage>, read_only: bool) -> Result<Raw> {
        let len = storage.len().map_err(Error::io("reading the file length", 0))?;
        // QEMU counts disks in whole sectors: a file of 1000 bytes is a disk
        // of 1024 whose last 24 bytes read as zeros (and map as a hole).
        let size = len.div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
        Ok(Raw::new(storage, size, read_only))
    }

    fn new(storage: Arc<dyn Storage>, size: u64, read_only: bool) -> Raw {
        Raw {
            storage,
            size: AtomicU64::new(size),
            read_only,
            writethrough: AtomicBool::new(false),
            probed: false,
            probe_sector: Mutex::new(()),
            detect_zeroes: DetectZeroes::Off,
        }
    }

    /// Marks the image as one whose format was probed, not named. QEMU
    /// then refuses (EPERM, here [`Error::ReadOnly`]) a write after which
    /// the first sector would probe as another format: the next probing
    /// open would trust guest-written bytes as that format's header
    /// (CVE-2008-2004), e.g. a backing file name pointing at a host file.
    pub fn probed(mut self) -> Raw {
        self.probed = true;
        self
    }

    /// Sets what writes of all-zero buffers become (`detect-zeroes`).
    pub fn with_detect_zeroes(mut self, mode: DetectZeroes) -> Raw {
        self.detect_zeroes = mode;
        self
    }

    /// Creates a raw image of `size` bytes.
    pub fn create(storage: Arc<dyn Storage>, size: u64, prealloc: Preallocation) -> Result<Raw> {
        crate::storage::empty(&*storage).map_err(Error::io("truncating the new image", 0))?;
        let raw = Raw::new(storage, 0, false);
        raw.resize(size, prealloc)?;
        Ok(raw)
    }

    /// The host storage.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Disk size in bytes.
    pub fn len(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Whether the disk is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn check(&self, offset: u64, len: u64, write: bool) -> Result<()> {
        if write && self.read_only {
            return Err(Error::ReadOnly);
        }
        let size = self.len();
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(Error::OutOfBounds { offset, len, size });
        }
        Ok(())
    }

    /// Reads at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64, false)?;
        self.storage.read_at(buf, offset).map_err(Error::io("reading", offset))
    }

    /// Writes at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if let Some(may_unmap) = self.detect_zeroes.zero_write(buf) {
            return self.write_zeroes_at(offset, buf.len() as u64, may_unmap);
        }
        self.check(offset, buf.len() as u64, true)?;
        let guard = self.guard_probe_sector(buf, offset)?;
        self.storage.write_at(buf, offset).map_err(Error::io("writing", offset))?;
        drop(guard);
        self.write_through()
    }

    /// For a probed image, refuses a write that would make the first
    /// sector (as it will read afterwards) probe as anything but raw, as
    /// QEMU's raw driver does; the returned lock is to be held until the
    /// write is done. QEMU checks writes only: zero writes and discards can
    /// leave zeros, which its probes do not look for.
    fn guard_probe_sector(&self, buf: &[u8], offset: u64) -> Result<Option<MutexGuard<'_, ()>>> {
        if !self.probed || offset >= PROBE_LEN as u64 || buf.is_empty() {
            return Ok(None);
        }
        let lock = self.probe_sector.lock().unwrap_or_else(|e| e.into_inner());
        let mut sector = [0u8; PROBE_LEN];
        self.storage.read_at(&mut sector, 0).map_err(Error::io("reading the first sector", 0))?;
        let start = offset as usize;
        let n = buf.len().min(PROBE_LEN - start);
        sector[start..start + n].copy_from_slice(&buf[..n]);
        if probe_head(&sector, None) != Probed::Raw {
            return Err(Error::ReadOnly);
        }
        Ok(Some(lock))
    }

    /// Copies `len` bytes at `offset` of this image to `dst_offset` of
    /// `dst` inside the host kernel (`copy_file_range`: qemu-img convert's
    /// copy offloading), when both are host files that allow it. Returns
    /// false when they do not, or when the range reaches past the end of
    /// this image's file (which reads as zeros there); the caller then
    /// copies the range itself, over whatever part was copied.
    pub fn copy_range_to(&self, dst: &Raw, offset: u64, dst_offset: u64, len: u64) -> Result<bool> {
        self.check(offset, len, false)?;
        dst.check(dst_offset, len, true)?;
        // Writes to a probed first sector go through the guard of write_at.
        if dst.probed && dst_offset < PROBE_LEN as u64 {
            return Ok(false);
        }
        let copied =
            self.storage.copy_range(&*dst.storage, offset, dst_offset, len).map_err(Error::io("copying", offset))?;
        if copied {
            dst.write_through()?;
        }
        Ok(copied)
    }

    fn write_through(&self) -> Result<()> {
        if self.writethrough.load(Ordering::Relaxed) {
            self.flush()?;
        }
        Ok(())
    }

    /// Applies a cache mode (see `Qcow2::set_cache_mode`).
    pub fn set_cache_mode(&self, mode: crate::options::CacheMode) -> Result<()> {
        self.storage.set_ignore_sync(mode == crate::options::CacheMode::Unsafe);
        self.writethrough.store(mode.writes_through(), Ordering::Relaxed);
        self.storage.set_direct(mode.direct()).map_err(Error::io("opening the image file for direct I/O", 0))
    }

    /// Zeroes a range, punching a hole when `may_unmap`.
    pub fn write_zeroes_at(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check(offset, len, true)?;
        let r = if may_unmap { self.storage.punch_hole(offset, len) } else { self.storage.write_zeroes(offset, len) };
        r.map_err(Error::io("zeroing", offset))?;
        self.write_through()
    }

    /// Zeroes a range without writing zeros (QEMU's `BDRV_REQ_NO_FALLBACK`):
    /// a hole punched when `may_unmap`, else the host file's zero-range
    /// call. `false` when the file system cannot do it that way; nothing
    /// was changed then.
    pub fn write_zeroes_no_fallback(&self, offset: u64, len: u64, may_unmap: bool) -> Result<bool> {
        self.check(offset, len, true)?;
        if may_unmap {
            self.storage.punch_hole(offset, len).map_err(Error::io("zeroing", offset))?;
        } else if !self.storage.write_zeroes_fast(offset, len).map_err(Error::io("zeroing", offset))? {
            return Ok(false);
        }
        self.write_through()?;
        Ok(true)
    }

    /// Discards a range (punches a hole).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len, true)?;
        self.storage.discard(offset, len).map_err(Error::io("discarding", offset))?;
        self.write_through()
    }

    /// Syncs the file.
    pub fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.storage.sync().map_err(Error::io("syncing", 0))
    }

    /// Data and holes of the file.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check(offset, len, false)?;
        let runs = self.storage.allocation(offset, len).map_err(Error::io("querying allocation", offset))?;
        let mut out = Vec::new();
        for r in runs {
            // A run that is neither data nor zeros (a null device without
            // read-zeroes) is unknown to the protocol: QEMU reports it
            // not present, without an offset.
            let known = r.data || r.zero;
            push_extent(
                &mut out,
                Extent {
                    offset: r.offset,
                    length: r.len,
                    present: known,
                    zero: r.zero,
                    data: r.data,
                    compressed: false,
                    host_offset: known.then_some(r.offset),
                    depth: 0,
                },
            );
        }
        Ok(out)
    }

    /// Changes the size.
    pub fn resize(&self, new_size: u64, prealloc: Preallocation) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let old = self.len();
        if new_size > old && prealloc == Preallocation::Metadata {
            // Refused before the file changes, as QEMU's file driver does.
            return Err(Error::InvalidArgument("Unsupported preallocation mode: metadata".into()));
        }
        let old_file_len = self.storage.len().map_err(Error::io("reading the file length", 0))?;
        self.storage.set_len(new_size).map_err(Error::io("resizing", new_size))?;
        if new_size > old {
            match prealloc {
                // QEMU writes the first block of a file that grows from
                // nothing, to help later alignment probing; the file then
                // shows that block allocated, as QEMU's does.
                Preallocation::Off if old_file_len == 0 => {
                    let n = if new_size < 4096 { 512 } else { 4096 };
                    self.storage.write_at(&vec![0u8; n], 0).map_err(Error::io("allocating the first block", 0))?
                }
                Preallocation::Off | Preallocation::Metadata => {}
                Preallocation::Falloc => {
                    self.storage.allocate(old, new_size - old).map_err(Error::io("preallocating", old))?
                }
                Preallocation::Full => {
                    let zeros = vec![0u8; 1 << 20];
                    let mut pos = old;
                    while pos < new_size {
                        let n = (new_size - pos).min(zeros.len() as u64);
                        self.storage.write_at(&zeros[..n as usize], pos).map_err(Error::io("preallocating", pos))?;
                        pos += n;
                    }
                }
            }
        }
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }
}
