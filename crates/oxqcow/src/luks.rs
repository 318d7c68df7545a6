//! The luks format (QEMU's `block/crypto.c`): a LUKS1 header area, then
//! the encrypted guest disk. The disk starts at the header's payload offset
//! and its 512-byte sectors are numbered from there (sector 0 is the first
//! payload sector), so the disk size is the file's length past the payload
//! offset, rounded up to whole sectors as QEMU's block layer counts it.
//!
//! The header is parsed and validated by the format crate
//! (`oxqcow_format::luks`), the key slots unlocked, created and amended by
//! [`crate::crypt`]: this module owns only the layout of the file and the
//! I/O on the payload. As in QEMU, nothing is known about which sectors
//! were written: every sector is data (a sector never written decrypts to
//! noise, not zeros), zero writes write encrypted zeros, discards do
//! nothing, and block status reports data without host offsets.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use oxqcow_format::header::CryptoExtension;
use oxqcow_format::luks::{self as luks_format, LuksHeader};

use crate::crypt::{Crypt, SECTOR};
use crate::error::{Error, Result};
use crate::extent::Extent;
use crate::options::{CacheMode, CreateOptions, EncryptionFormat, KeyslotChange, OpenOptions, Preallocation};
use crate::storage::Storage;

/// The most bytes encrypted or decrypted in one scratch buffer (QEMU's
/// `BLOCK_CRYPTO_MAX_IO_SIZE`).
const CHUNK: usize = 1 << 20;

/// QEMU's message for a missing passphrase; the luks driver's option is
/// `key-secret` (qcow2's is `encrypt.key-secret`).
const NO_SECRET: &str = "Parameter 'key-secret' is required for cipher";

/// An open luks image.
pub struct Luks {
    storage: Arc<dyn Storage>,
    /// The header as last written (amend changes key slots).
    header: Mutex<LuksHeader>,
    crypt: Crypt,
    /// Where the payload starts in the file.
    payload: u64,
    /// Disk size in bytes (a multiple of 512).
    size: AtomicU64,
    read_only: bool,
    /// Cache mode writethrough: every write request ends with a sync.
    writethrough: AtomicBool,
    /// Writes that cover whole sectors hold it shared; a write covering
    /// part of a sector reads, patches and rewrites the sector, and holds
    /// it exclusively, so no other write's bytes in that sector are lost
    /// (QEMU's serialising requests, made coarse: partial writes are rare).
    sectors: RwLock<()>,
}

impl std::fmt::Debug for Luks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Luks").field("payload", &self.payload).field("size", &self.len()).finish_non_exhaustive()
    }
}

/// Reads and validates the header at the start of `storage`. The payload
/// must lie inside the file (QEMU's `block_crypto_co_getlength` fails
/// otherwise, and its open with it).
fn read_header(storage: &dyn Storage) -> Result<(LuksHeader, u64)> {
    let file_len = storage.len().map_err(Error::io("reading the file length", 0))?;
    let mut buf = vec![0u8; luks_format::HEADER_SIZE];
    storage.read_at(&mut buf, 0).map_err(Error::io("reading the LUKS header", 0))?;
    // Every slot's key material lies before the payload (the parser checks
    // it), so bounding the payload by the file bounds every read.
    let header = LuksHeader::parse(&buf, u64::MAX)?;
    if header.payload_offset() > file_len {
        return Err(Error::Corrupt("Could not refresh total sector count: Input/output error".into()));
    }
    Ok((header, file_len))
}

fn extension(header: &LuksHeader) -> CryptoExtension {
    CryptoExtension { offset: 0, length: header.payload_offset() }
}

impl Luks {
    /// Opens a luks image with the passphrase `opts.key_secret` (without
    /// one only for its metadata, with `opts.no_io`).
    pub fn open(storage: Arc<dyn Storage>, opts: &OpenOptions) -> Result<Luks> {
        let (header, file_len) = read_header(&*storage)?;
        let payload = header.payload_offset();
        let size = (file_len - payload).div_ceil(SECTOR) * SECTOR;
        let Some(passphrase) = opts.key_secret.as_deref() else {
            if opts.no_io {
                return Ok(Luks::new(storage, header, Crypt::locked(false), size, opts.read_only));
            }
            return Err(Error::InvalidArgument(NO_SECRET.into()));
        };
        let read = |offset: u64, buf: &mut [u8]| -> Result<()> {
            storage.read_at(buf, offset).map_err(Error::io("reading LUKS key material", offset))
        };
        let (crypt, _) = Crypt::unlock_luks(&header, passphrase, &read, opts.unlock_work_limit())?;
        Ok(Luks::new(storage, header, crypt, size, opts.read_only))
    }

    fn new(storage: Arc<dyn Storage>, header: LuksHeader, crypt: Crypt, size: u64, read_only: bool) -> Luks {
        Luks {
            payload: header.payload_offset(),
            storage,
            header: Mutex::new(header),
            crypt,
            size: AtomicU64::new(size),
            read_only,
            writethrough: AtomicBool::new(false),
            sectors: RwLock::new(()),
        }
    }

    /// The header of a luks image, read without unlocking it (what
    /// `qemu-img info` shows: QEMU's `BDRV_O_NO_IO` open needs no secret).
    pub fn inspect(storage: &dyn Storage) -> Result<LuksHeader> {
        Ok(read_header(storage)?.0)
    }

    /// Creates a luks image of `opts.size` bytes (not rounded: QEMU makes
    /// the file exactly header plus size long, and the disk reads its last
    /// partial sector as a whole one) on empty storage, encrypted as
    /// `opts.encryption` says (LUKS parameters and passphrase).
    /// Preallocation applies to the whole file, header area included, as
    /// QEMU truncates the file to its full length before writing the header;
    /// `metadata` means `off` here, as in QEMU.
    pub fn create(storage: Arc<dyn Storage>, opts: &CreateOptions) -> Result<Luks> {
        let Some(enc) = &opts.encryption else {
            return Err(Error::InvalidArgument(NO_SECRET.into()));
        };
        let EncryptionFormat::Luks(params) = &enc.format else {
            return Err(Error::InvalidArgument("Parameter 'format' does not accept value 'aes'".into()));
        };
        let (area, crypt) = crate::crypt::create_luks(params, &enc.passphrase)?;
        let header = LuksHeader::parse(&area, area.len() as u64)?;
        let file_len = (area.len() as u64)
            .checked_add(opts.size)
            .filter(|&l| l <= i64::MAX as u64)
            .ok_or_else(|| Error::InvalidArgument("The requested file size is too large".into()))?;
        crate::storage::empty(&*storage).map_err(Error::io("truncating the new image", 0))?;
        let st = &*storage;
        st.set_len(file_len).map_err(Error::io("resizing", file_len))?;
        match opts.preallocation {
            Preallocation::Off | Preallocation::Metadata => {}
            Preallocation::Falloc => st.allocate(0, file_len).map_err(Error::io("preallocating", 0))?,
            Preallocation::Full => write_zeros(st, 0, file_len)?,
        }
        // Only what holds bytes is written, so the unused key slots stay
        // holes, as in QEMU's files.
        for (i, chunk) in area.chunks(4096).enumerate() {
            if chunk.iter().any(|&b| b != 0) {
                let at = (i * 4096) as u64;
                st.write_at(chunk, at).map_err(Error::io("writing the LUKS header", at))?;
            }
        }
        st.sync().map_err(Error::io("syncing the new image", 0))?;
        let size = opts.size.div_ceil(SECTOR) * SECTOR;
        Ok(Luks::new(storage, header, crypt, size, false))
    }

    /// The header as it is now.
    pub fn header(&self) -> LuksHeader {
        self.header.lock().unwrap_or_else(|p| p.into_inner()).clone()
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

    /// Reads and decrypts whole sectors into `buf` (guest offset `offset`).
    fn read_sectors(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let at = self.payload + offset;
        self.storage.read_at(buf, at).map_err(Error::io("reading", at))?;
        for (i, chunk) in buf.chunks_mut(CHUNK).enumerate() {
            self.crypt.decrypt(chunk, offset + (i * CHUNK) as u64)?;
        }
        Ok(())
    }

    /// Encrypts whole sectors of `data` (guest offset `offset`) in a
    /// scratch buffer, never the caller's, and writes them.
    fn write_sectors(&self, data: &[u8], offset: u64) -> Result<()> {
        let mut scratch = vec![0u8; data.len().min(CHUNK)];
        for (i, chunk) in data.chunks(CHUNK).enumerate() {
            let guest = offset + (i * CHUNK) as u64;
            let out = &mut scratch[..chunk.len()];
            out.copy_from_slice(chunk);
            self.crypt.encrypt(out, guest)?;
            let at = self.payload + guest;
            self.storage.write_at(out, at).map_err(Error::io("writing", at))?;
        }
        Ok(())
    }

    /// Reads at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64, false)?;
        if buf.is_empty() {
            return Ok(());
        }
        let start = offset / SECTOR * SECTOR;
        let end = (offset + buf.len() as u64).div_ceil(SECTOR) * SECTOR;
        if start == offset && end == offset + buf.len() as u64 {
            return self.read_sectors(buf, offset);
        }
        // Partial sectors at either end go through a sector-sized buffer;
        // the aligned middle is decrypted in place in the caller's buffer.
        let mut sector = [0u8; SECTOR as usize];
        let mut pos = offset;
        let mut done = 0usize;
        while done < buf.len() {
            let in_sector = (pos % SECTOR) as usize;
            let left = buf.len() - done;
            if in_sector == 0 && left >= SECTOR as usize {
                let n = left / SECTOR as usize * SECTOR as usize;
                self.read_sectors(&mut buf[done..done + n], pos)?;
                done += n;
                pos += n as u64;
                continue;
            }
            let n = (SECTOR as usize - in_sector).min(left);
            self.read_sectors(&mut sector, pos - in_sector as u64)?;
            buf[done..done + n].copy_from_slice(&sector[in_sector..in_sector + n]);
            done += n;
            pos += n as u64;
        }
        Ok(())
    }

    /// Writes at `offset`. A write covering part of a sector reads the
    /// sector, patches it and writes it back, as QEMU's block layer does
    /// for the 512-byte request alignment of encrypted images.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64, true)?;
        if buf.is_empty() {
            return Ok(());
        }
        let start = offset / SECTOR * SECTOR;
        let end = (offset + buf.len() as u64).div_ceil(SECTOR) * SECTOR;
        if start == offset && end == offset + buf.len() as u64 {
            let _shared = self.sectors.read().unwrap_or_else(|p| p.into_inner());
            self.write_sectors(buf, offset)?;
        } else {
            let _exclusive = self.sectors.write().unwrap_or_else(|p| p.into_inner());
            let write_end = offset + buf.len() as u64;
            // The partial first sector, then the whole sectors from the
            // caller's bytes, then the partial last sector.
            let mut whole_from = offset;
            if offset != start || write_end < start + SECTOR {
                self.patch_sector(start, offset, buf)?;
                whole_from = (start + SECTOR).min(write_end);
            }
            let whole_to = write_end / SECTOR * SECTOR;
            if whole_to > whole_from {
                let range = (whole_from - offset) as usize..(whole_to - offset) as usize;
                self.write_sectors(&buf[range], whole_from)?;
            }
            if write_end != whole_to && whole_to >= whole_from && whole_to != start {
                self.patch_sector(whole_to, offset, buf)?;
            }
        }
        self.write_through()
    }

    /// Rewrites the sector at `sector` with the bytes of `buf` (which
    /// starts at guest offset `offset`) that fall into it.
    fn patch_sector(&self, sector: u64, offset: u64, buf: &[u8]) -> Result<()> {
        let mut plain = [0u8; SECTOR as usize];
        self.read_sectors(&mut plain, sector)?;
        let from = offset.max(sector);
        let to = (offset + buf.len() as u64).min(sector + SECTOR);
        plain[(from - sector) as usize..(to - sector) as usize]
            .copy_from_slice(&buf[(from - offset) as usize..(to - offset) as usize]);
        self.write_sectors(&plain, sector)
    }

    fn write_through(&self) -> Result<()> {
        if self.writethrough.load(Ordering::Relaxed) {
            self.flush()?;
        }
        Ok(())
    }

    /// Applies a cache mode (see `Qcow2::set_cache_mode`).
    pub fn set_cache_mode(&self, mode: CacheMode) -> Result<()> {
        self.storage.set_ignore_sync(mode == CacheMode::Unsafe);
        self.writethrough.store(mode.writes_through(), Ordering::Relaxed);
        self.storage.set_direct(mode.direct()).map_err(Error::io("opening the image file for direct I/O", 0))
    }

    /// Makes a range read as zeros by writing encrypted zeros: the format
    /// has no other way (QEMU's block layer falls back to writing a zeroed
    /// buffer), so `may_unmap` changes nothing.
    pub fn write_zeroes_at(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        let _ = may_unmap;
        self.check(offset, len, true)?;
        let zeros = vec![0u8; len.min(CHUNK as u64) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64);
            self.write_at(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }

    /// Zeroing without writing zeros is impossible here (QEMU's
    /// `BDRV_REQ_NO_FALLBACK` fails): `Ok(false)`, nothing changed.
    pub fn write_zeroes_no_fallback(&self, offset: u64, len: u64) -> Result<bool> {
        self.check(offset, len, true)?;
        Ok(false)
    }

    /// Accepts a discard and does nothing, as QEMU does for a format
    /// without discard support: freeing payload sectors would make them
    /// read as noise, not as what the guest discarded.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len, true)
    }

    /// Syncs the file.
    pub fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.storage.sync().map_err(Error::io("syncing", 0))
    }

    /// Every sector is data, at no offset a reader could use (encrypted).
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check(offset, len, false)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        Ok(vec![Extent {
            offset,
            length: len,
            present: true,
            zero: false,
            data: true,
            compressed: false,
            host_offset: None,
            depth: 0,
        }])
    }

    /// Changes the disk size: the file becomes the payload offset plus the
    /// new size (QEMU's `block_crypto_co_truncate`), preallocated as the
    /// file layer preallocates (which refuses `metadata`).
    pub fn resize(&self, new_size: u64, prealloc: Preallocation) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let old_len = self.payload + self.len();
        let new_len = self
            .payload
            .checked_add(new_size)
            .filter(|&l| l <= i64::MAX as u64)
            .ok_or_else(|| Error::InvalidArgument("The requested file size is too large".into()))?;
        if new_len > old_len && prealloc == Preallocation::Metadata {
            return Err(Error::InvalidArgument("Unsupported preallocation mode: metadata".into()));
        }
        self.storage.set_len(new_len).map_err(Error::io("resizing", new_len))?;
        if new_len > old_len {
            match prealloc {
                Preallocation::Off | Preallocation::Metadata => {}
                Preallocation::Falloc => {
                    self.storage.allocate(old_len, new_len - old_len).map_err(Error::io("preallocating", old_len))?
                }
                Preallocation::Full => write_zeros(&*self.storage, old_len, new_len - old_len)?,
            }
        }
        self.size.store(new_size.div_ceil(SECTOR) * SECTOR, Ordering::Release);
        Ok(())
    }

    /// Adds or erases key slots with qemu-img amend's rules and messages
    /// (see [`crate::crypt`]), all writes excluded meanwhile.
    pub fn amend_encryption(&self, change: &KeyslotChange) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let Some(master) = self.crypt.luks_master_key() else {
            return Err(Error::InvalidArgument(NO_SECRET.into()));
        };
        let _exclusive = self.sectors.write().unwrap_or_else(|p| p.into_inner());
        let mut header = self.header.lock().unwrap_or_else(|p| p.into_inner());
        let result = crate::crypt::amend_keyslots(&*self.storage, extension(&header), master, change);
        // The header on disk is what counts, whether or not every step ran.
        if let Ok((h, _)) = read_header(&*self.storage) {
            *header = h;
        }
        result
    }
}

/// Writes zeros over `[offset, offset + len)` of the host file.
fn write_zeros(st: &dyn Storage, offset: u64, len: u64) -> Result<()> {
    let zeros = vec![0u8; len.min(CHUNK as u64) as usize];
    let mut pos = offset;
    while pos < offset + len {
        let n = (offset + len - pos).min(zeros.len() as u64);
        st.write_at(&zeros[..n as usize], pos).map_err(Error::io("preallocating", pos))?;
        pos += n;
    }
    Ok(())
}
