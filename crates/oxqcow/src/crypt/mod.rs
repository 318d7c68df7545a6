//! Encryption of guest data: the cipher state of an open encrypted image,
//! LUKS key slot unlocking and creation, and legacy qcow AES.
//!
//! This module owns every cryptographic step so that the rest of the engine
//! only calls [`Crypt::encrypt`] and [`Crypt::decrypt`] on whole 512-byte
//! sectors. The LUKS header itself is parsed and validated by the format
//! crate (`oxqcow_format::luks`); here it is used:
//!
//! - unlocking (QEMU's `qcrypto_block_luks_load_key`): PBKDF2 of the
//!   passphrase with the slot's salt and iterations gives the slot key, which
//!   decrypts the slot's key material (sector by sector from sector 0, with
//!   the image's own cipher mode and IV generator); the anti-forensic merge
//!   of the 4000 stripes gives a candidate master key, accepted when PBKDF2 of
//!   it matches the header's digest;
//! - data: each 512-byte sector is encrypted with the IV generator fed with
//!   the sector number. qcow2 numbers sectors by the *host* offset for LUKS
//!   and by the *guest* offset for legacy AES (QEMU's `crypt_physical_offset`),
//!   which the caller chooses with [`Crypt::uses_host_offset`].
//!
//! Ciphers are RustCrypto's `aes`, `serpent`, `twofish` and `cast5` block
//! ciphers in `xts-mode`'s XTS, `cbc`'s CBC, and ECB and CTR written here
//! over the block cipher trait; PBKDF2 is `pbkdf2` over `hmac` with
//! `sha1`/`sha2`.

mod cipher;
mod luks;

use oxqcow_format::header::{crypt, CryptoExtension, Header};
use oxqcow_format::luks::{self as luks_format, LuksHeader};

use crate::error::{Error, Result};
use crate::options::OpenOptions;
use crate::storage::Storage;
use cipher::SectorCrypt;
pub(crate) use luks::amend_keyslots;
pub use luks::create_luks;
use luks::try_slot;

/// Sector size of both encryption formats.
pub const SECTOR: u64 = 512;

/// The cipher state of an open encrypted image.
pub struct Crypt {
    /// `None` for an image opened without its secret for its metadata
    /// alone (QEMU's `BDRV_O_NO_IO`): every sector operation fails.
    sectors: Option<SectorCrypt>,
    /// LUKS numbers sectors by host offset, legacy AES by guest offset.
    host_offsets: bool,
    /// The LUKS master key (kept to fill new key slots); empty for AES.
    master_key: Vec<u8>,
}

impl std::fmt::Debug for Crypt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Crypt").field("host_offsets", &self.host_offsets).finish_non_exhaustive()
    }
}

impl Crypt {
    /// Legacy qcow AES (`crypt_method` 1): AES-128-CBC keyed with the first
    /// 16 bytes of the passphrase (zero padded), plain64 IVs of guest sectors
    /// (QEMU's `qcrypto_block_qcow_init`).
    pub fn legacy_aes(passphrase: &[u8]) -> Crypt {
        let mut key = [0u8; 16];
        let n = passphrase.len().min(16);
        key[..n].copy_from_slice(&passphrase[..n]);
        Crypt { sectors: Some(SectorCrypt::legacy_aes(&key)), host_offsets: false, master_key: Vec::new() }
    }

    /// The state of an encrypted image opened without its secret, for its
    /// metadata alone (QEMU's `BDRV_O_NO_IO`, e.g. the backing file
    /// `qemu-img create` opens for its size): reading or writing guest data
    /// fails instead of returning ciphertext. `host_offsets` as for the
    /// image's format.
    pub fn locked(host_offsets: bool) -> Crypt {
        Crypt { sectors: None, host_offsets, master_key: Vec::new() }
    }

    /// Unlocks a LUKS header with `passphrase`, trying every active slot in
    /// order. `read` reads bytes of the header area (offset relative to the
    /// LUKS header). Returns the cipher state and the slot that opened.
    /// A header whose slots would make the attempt run more PBKDF2 than
    /// `max_work` ([`luks_format::MAX_UNLOCK_WORK`] by default) is refused
    /// before any runs.
    pub fn unlock_luks(
        header: &LuksHeader,
        passphrase: &[u8],
        read: &dyn Fn(u64, &mut [u8]) -> Result<()>,
        max_work: u64,
    ) -> Result<(Crypt, usize)> {
        header.check_unlock_work(max_work)?;
        for (i, slot) in header.slots.iter().enumerate() {
            if !slot.active {
                continue;
            }
            if let Some(key) = try_slot(header, slot, passphrase, read)? {
                let sectors = SectorCrypt::for_luks(header, &key)?;
                return Ok((Crypt { sectors: Some(sectors), host_offsets: true, master_key: key }, i));
            }
        }
        Err(Error::InvalidArgument("Invalid password, cannot unlock any keyslot".into()))
    }

    /// The LUKS master key (`None` for legacy AES), which new key slots
    /// store.
    pub(crate) fn luks_master_key(&self) -> Option<&[u8]> {
        (!self.master_key.is_empty()).then_some(&self.master_key[..])
    }

    /// Whether sectors are numbered by host offset (LUKS) rather than guest
    /// offset (legacy AES).
    pub fn uses_host_offset(&self) -> bool {
        self.host_offsets
    }

    fn sectors(&self, buf: &[u8], offset: u64) -> Result<&SectorCrypt> {
        let Some(sectors) = &self.sectors else {
            return Err(Error::InvalidArgument(
                "the encrypted image was opened without its key, for its metadata only".into(),
            ));
        };
        if offset % SECTOR != 0 || buf.len() as u64 % SECTOR != 0 {
            return Err(Error::InvalidArgument(format!(
                "encrypted I/O must cover whole 512-byte sectors (offset {offset}, length {})",
                buf.len()
            )));
        }
        Ok(sectors)
    }

    /// Encrypts `buf` in place; `offset` (a multiple of 512) numbers its
    /// first sector.
    pub fn encrypt(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.sectors(buf, offset)?.run(buf, offset / SECTOR, true);
        Ok(())
    }

    /// Decrypts `buf` in place; `offset` (a multiple of 512) numbers its
    /// first sector.
    pub fn decrypt(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.sectors(buf, offset)?.run(buf, offset / SECTOR, false);
        Ok(())
    }
}

/// Reads and validates the LUKS header an image's extension points at.
pub fn read_luks_header(storage: &dyn Storage, ext: &CryptoExtension) -> Result<LuksHeader> {
    let mut buf = vec![0u8; luks_format::HEADER_SIZE];
    storage.read_at(&mut buf, ext.offset).map_err(Error::io("reading the LUKS header", ext.offset))?;
    Ok(LuksHeader::parse(&buf, ext.length)?)
}

/// The cipher state for an image with this header, or `None` when it is
/// not encrypted, opened with `opts.passphrase` within
/// `opts.max_unlock_work`. Without a passphrase an encrypted image is
/// refused with QEMU's message, unless `opts.no_io` (then it is
/// [`Crypt::locked`]).
pub(crate) fn open_image(storage: &dyn Storage, header: &Header, opts: &OpenOptions) -> Result<Option<Crypt>> {
    if header.crypt_method == crypt::NONE {
        return Ok(None);
    }
    // A broken LUKS header is reported as such, with or without a passphrase.
    let luks = match header.extensions.crypto {
        Some(ext) if header.crypt_method == crypt::LUKS => Some((ext, read_luks_header(storage, &ext)?)),
        _ => None,
    };
    let Some(passphrase) = opts.passphrase.as_deref() else {
        if opts.no_io {
            return Ok(Some(Crypt::locked(header.crypt_method == crypt::LUKS)));
        }
        return Err(Error::InvalidArgument("Parameter 'encrypt.key-secret' is required for cipher".into()));
    };
    let Some((ext, luks)) = luks else {
        return Ok(Some(Crypt::legacy_aes(passphrase)));
    };
    let read = |offset: u64, buf: &mut [u8]| -> Result<()> {
        // Bounded by the header's checks: material lies inside the area.
        let at = ext.offset + offset;
        storage.read_at(buf, at).map_err(Error::io("reading LUKS key material", at))
    };
    Ok(Some(Crypt::unlock_luks(&luks, passphrase, &read, opts.unlock_work_limit())?.0))
}
