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

use aes::cipher::array::ArraySize;
use aes::cipher::consts::U16;
use aes::cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, BlockModeDecrypt, BlockModeEncrypt, InnerIvInit};
use aes::cipher::{BlockSizeUser, KeyInit};
use aes::{Aes128, Aes192, Aes256};
use cast5::Cast5;
use oxqcow_format::luks::{self, CipherAlg, CipherMode, HashAlg, IvGenAlg, LuksHeader};
use serpent::Serpent;
use sha1::Digest;
use twofish::Twofish;
use xts_mode::Xts128;

use oxqcow_format::header::{crypt, CryptoExtension, Header};

use crate::error::{Error, Result};
use crate::storage::Storage;

/// Sector size of both encryption formats.
pub const SECTOR: u64 = 512;

/// The widest IV any mode takes: one 16-byte block. Ciphers with 8-byte
/// blocks use the first half, as QEMU's IV generators fill `niv` bytes.
type Iv = [u8; 16];

/// What every block cipher here offers; the key length is checked when a
/// value is made (`KeyInit::new_from_slice`), so Serpent, Twofish and CAST5
/// serve all their key sizes with one type each.
trait Block: BlockCipherEncrypt + BlockCipherDecrypt + KeyInit + Clone + Send + Sync + 'static {}
impl<T: BlockCipherEncrypt + BlockCipherDecrypt + KeyInit + Clone + Send + Sync + 'static> Block for T {}

/// Something built from a block cipher type chosen at run time: the one
/// `match` on [`CipherAlg`] ([`with_cipher`]) calls `block16` for ciphers
/// with 16-byte blocks, which XTS needs, and `any_block` for CAST5's 8.
trait WithCipher {
    type Out;
    fn block16<C: Block + BlockSizeUser<BlockSize = U16>>(self, alg: CipherAlg) -> Self::Out;
    /// Builds for any block size (also what `block16` falls back to).
    fn any_block<C: Block>(self, alg: CipherAlg) -> Self::Out;
}

fn with_cipher<W: WithCipher>(alg: CipherAlg, w: W) -> W::Out {
    match alg {
        CipherAlg::Aes128 => w.block16::<Aes128>(alg),
        CipherAlg::Aes192 => w.block16::<Aes192>(alg),
        CipherAlg::Aes256 => w.block16::<Aes256>(alg),
        CipherAlg::Serpent128 | CipherAlg::Serpent192 | CipherAlg::Serpent256 => w.block16::<Serpent>(alg),
        CipherAlg::Twofish128 | CipherAlg::Twofish192 | CipherAlg::Twofish256 => w.block16::<Twofish>(alg),
        CipherAlg::Cast5 => w.any_block::<Cast5>(alg),
    }
}

/// A cipher keyed with `key`, or an error naming the algorithm and the
/// length (the format crate ties key lengths to algorithms, so this is a
/// guard, not a path any header reaches).
fn keyed<C: KeyInit>(alg: CipherAlg, key: &[u8]) -> Result<C> {
    C::new_from_slice(key)
        .map_err(|_| Error::InvalidArgument(format!("Cipher {} cannot take a key of {} bytes", alg.name(), key.len())))
}

/// The first block of `iv` as the cipher's block type.
fn iv_block<N: ArraySize>(iv: &Iv) -> Array<u8, N> {
    let mut b = Array::<u8, N>::default();
    let n = b.len();
    b.copy_from_slice(&iv[..n]);
    b
}

/// One sector's cipher operation; `sector` is a whole number of blocks.
trait SectorCipher: Send + Sync {
    fn encrypt(&self, sector: &mut [u8], iv: &Iv);
    fn decrypt(&self, sector: &mut [u8], iv: &Iv);
    /// Whether the mode takes an IV at all (QEMU's `niv` is 0 for ECB and
    /// its IV generator is then never run).
    fn uses_iv(&self) -> bool {
        true
    }
}

struct XtsSectors<C>(Xts128<C>);

impl<C: Block + BlockSizeUser<BlockSize = U16>> SectorCipher for XtsSectors<C> {
    fn encrypt(&self, sector: &mut [u8], iv: &Iv) {
        self.0.encrypt_sector(sector, Array(*iv));
    }
    fn decrypt(&self, sector: &mut [u8], iv: &Iv) {
        self.0.decrypt_sector(sector, Array(*iv));
    }
}

struct CbcSectors<C>(C);

impl<C: Block> SectorCipher for CbcSectors<C> {
    fn encrypt(&self, sector: &mut [u8], iv: &Iv) {
        let (blocks, _) = Array::slice_as_chunks_mut(sector);
        cbc::Encryptor::<C>::inner_iv_init(self.0.clone(), &iv_block(iv)).encrypt_blocks(blocks);
    }
    fn decrypt(&self, sector: &mut [u8], iv: &Iv) {
        let (blocks, _) = Array::slice_as_chunks_mut(sector);
        cbc::Decryptor::<C>::inner_iv_init(self.0.clone(), &iv_block(iv)).decrypt_blocks(blocks);
    }
}

/// ECB is the block cipher applied to each block alone.
struct EcbSectors<C>(C);

impl<C: Block> SectorCipher for EcbSectors<C> {
    fn encrypt(&self, sector: &mut [u8], _iv: &Iv) {
        let (blocks, _) = Array::slice_as_chunks_mut(sector);
        self.0.encrypt_blocks(blocks);
    }
    fn decrypt(&self, sector: &mut [u8], _iv: &Iv) {
        let (blocks, _) = Array::slice_as_chunks_mut(sector);
        self.0.decrypt_blocks(blocks);
    }
    fn uses_iv(&self) -> bool {
        false
    }
}

/// CTR as nettle's `ctr_crypt` (QEMU's back end here) does it: the IV is
/// the first counter block, incremented as one big-endian number the width
/// of the block and wrapping at its top. Written out rather than taken from
/// the `ctr` crate, whose counters refuse to wrap (an ESSIV IV can start a
/// 128-bit counter anywhere) and whose 64-bit flavour only counts in the
/// low half of a 16-byte block.
struct CtrSectors<C>(C);

impl<C: Block> SectorCipher for CtrSectors<C> {
    fn encrypt(&self, sector: &mut [u8], iv: &Iv) {
        let mut counter = iv_block::<C::BlockSize>(iv);
        let (blocks, _) = Array::<u8, C::BlockSize>::slice_as_chunks_mut(sector);
        for block in blocks {
            let mut pad = counter.clone();
            self.0.encrypt_block(&mut pad);
            block.iter_mut().zip(pad.iter()).for_each(|(b, k)| *b ^= k);
            for byte in counter.iter_mut().rev() {
                *byte = byte.wrapping_add(1);
                if *byte != 0 {
                    break;
                }
            }
        }
    }
    fn decrypt(&self, sector: &mut [u8], iv: &Iv) {
        self.encrypt(sector, iv);
    }
}

/// Builds the sector cipher for a mode and key.
struct SectorCipherFor<'a> {
    mode: CipherMode,
    key: &'a [u8],
}

impl WithCipher for SectorCipherFor<'_> {
    type Out = Result<Box<dyn SectorCipher>>;

    fn block16<C: Block + BlockSizeUser<BlockSize = U16>>(self, alg: CipherAlg) -> Self::Out {
        if self.mode != CipherMode::Xts {
            return self.any_block::<C>(alg);
        }
        let (a, b) = self.key.split_at(self.key.len() / 2);
        Ok(Box::new(XtsSectors(Xts128::new(keyed::<C>(alg, a)?, keyed::<C>(alg, b)?))))
    }

    fn any_block<C: Block>(self, alg: CipherAlg) -> Self::Out {
        luks::check_mode(alg, self.mode).map_err(Error::InvalidArgument)?;
        let c = keyed::<C>(alg, self.key)?;
        Ok(match self.mode {
            CipherMode::Ecb => Box::new(EcbSectors(c)),
            CipherMode::Cbc => Box::new(CbcSectors(c)),
            CipherMode::Ctr => Box::new(CtrSectors(c)),
            // Refused by `check_mode` above; XTS with 16-byte blocks is
            // built in `block16`.
            CipherMode::Xts => return Err(Error::InvalidArgument("Unsupported cipher mode xts".into())),
        })
    }
}

fn sector_cipher(alg: CipherAlg, mode: CipherMode, key: &[u8]) -> Result<Box<dyn SectorCipher>> {
    with_cipher(alg, SectorCipherFor { mode, key })
}

/// ESSIV's cipher: encrypts the little-endian sector number, zero padded
/// to one block of its own, in ECB mode (QEMU's `qcrypto_ivgen_essiv_calculate`).
trait EssivCipher: Send + Sync {
    fn iv(&self, sector: u64) -> Iv;
}

struct Essiv<C>(C);

impl<C: Block> EssivCipher for Essiv<C> {
    fn iv(&self, sector: u64) -> Iv {
        let mut data = Array::<u8, C::BlockSize>::default();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&sector.to_le_bytes()[..n]);
        self.0.encrypt_block(&mut data);
        let mut iv = [0u8; 16];
        let n = data.len().min(16);
        iv[..n].copy_from_slice(&data[..n]);
        iv
    }
}

struct EssivFor<'a>(&'a [u8]);

impl WithCipher for EssivFor<'_> {
    type Out = Result<Box<dyn EssivCipher>>;
    fn block16<C: Block + BlockSizeUser<BlockSize = U16>>(self, alg: CipherAlg) -> Self::Out {
        self.any_block::<C>(alg)
    }
    fn any_block<C: Block>(self, alg: CipherAlg) -> Self::Out {
        Ok(Box::new(Essiv(keyed::<C>(alg, self.0)?)))
    }
}

/// The IV of each sector.
enum IvGen {
    Plain,
    Plain64,
    /// The sector number encrypted with a key hashed from the master key.
    Essiv(Box<dyn EssivCipher>),
}

impl IvGen {
    fn new(alg: IvGenAlg, essiv: Option<(CipherAlg, HashAlg)>, key: &[u8]) -> Result<IvGen> {
        Ok(match (alg, essiv) {
            (IvGenAlg::Plain, _) => IvGen::Plain,
            (IvGenAlg::Plain64, _) | (IvGenAlg::Essiv, None) => IvGen::Plain64,
            (IvGenAlg::Essiv, Some((cipher, hash))) => {
                // The digest is exactly the ESSIV cipher's key: the format
                // crate chose that cipher by the digest length.
                IvGen::Essiv(with_cipher(cipher, EssivFor(&digest(hash, &[key])))?)
            }
        })
    }

    fn iv(&self, sector: u64) -> Iv {
        let mut iv = [0u8; 16];
        match self {
            IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvGen::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            IvGen::Essiv(c) => iv = c.iv(sector),
        }
        iv
    }
}

/// A cipher with its IV generator: encrypts runs of 512-byte sectors.
struct SectorCrypt {
    cipher: Box<dyn SectorCipher>,
    ivgen: IvGen,
}

impl SectorCrypt {
    /// The data cipher of a LUKS header keyed with `key` (the master key,
    /// or a slot key for its key material). Fails with QEMU's message for
    /// a mode the cipher lacks (CAST5 in XTS).
    fn for_luks(h: &LuksHeader, key: &[u8]) -> Result<SectorCrypt> {
        let essiv = h.essiv_cipher().zip(h.ivgen_hash_alg);
        Ok(SectorCrypt {
            cipher: sector_cipher(h.cipher_alg, h.cipher_mode, key)?,
            ivgen: IvGen::new(h.ivgen_alg, essiv, key)?,
        })
    }

    fn run(&self, buf: &mut [u8], first_sector: u64, encrypt: bool) {
        let uses_iv = self.cipher.uses_iv();
        for (i, sector) in buf.chunks_mut(SECTOR as usize).enumerate() {
            let iv = if uses_iv { self.ivgen.iv(first_sector + i as u64) } else { [0; 16] };
            if encrypt {
                self.cipher.encrypt(sector, &iv);
            } else {
                self.cipher.decrypt(sector, &iv);
            }
        }
    }
}

fn digest(hash: HashAlg, parts: &[&[u8]]) -> Vec<u8> {
    fn run<D: Digest>(parts: &[&[u8]]) -> Vec<u8> {
        let mut d = D::new();
        for p in parts {
            d.update(p);
        }
        d.finalize().to_vec()
    }
    match hash {
        HashAlg::Sha1 => run::<sha1::Sha1>(parts),
        HashAlg::Sha224 => run::<sha2::Sha224>(parts),
        HashAlg::Sha256 => run::<sha2::Sha256>(parts),
        HashAlg::Sha384 => run::<sha2::Sha384>(parts),
        HashAlg::Sha512 => run::<sha2::Sha512>(parts),
    }
}

/// PBKDF2-HMAC with `hash`.
pub(crate) fn pbkdf2(hash: HashAlg, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
    match hash {
        HashAlg::Sha1 => pbkdf2::pbkdf2_hmac::<sha1::Sha1>(password, salt, iterations, out),
        HashAlg::Sha224 => pbkdf2::pbkdf2_hmac::<sha2::Sha224>(password, salt, iterations, out),
        HashAlg::Sha256 => pbkdf2::pbkdf2_hmac::<sha2::Sha256>(password, salt, iterations, out),
        HashAlg::Sha384 => pbkdf2::pbkdf2_hmac::<sha2::Sha384>(password, salt, iterations, out),
        HashAlg::Sha512 => pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password, salt, iterations, out),
    }
}

/// The anti-forensic diffuser: each digest-sized block `i` of `block`
/// becomes H(be32(i) || block_i), the last one truncated.
fn diffuse(hash: HashAlg, block: &mut [u8]) {
    let dl = hash.digest_len();
    for (i, chunk) in block.chunks_mut(dl).enumerate() {
        let d = digest(hash, &[&(i as u32).to_be_bytes(), chunk]);
        let n = chunk.len();
        chunk.copy_from_slice(&d[..n]);
    }
}

/// Joins `stripes` stripes of `key_len` bytes into the key (LUKS AFmerge).
fn af_merge(hash: HashAlg, key_len: usize, stripes: usize, split: &[u8]) -> Vec<u8> {
    let mut block = vec![0u8; key_len];
    for s in split.chunks(key_len).take(stripes - 1) {
        block.iter_mut().zip(s).for_each(|(b, x)| *b ^= x);
        diffuse(hash, &mut block);
    }
    let last = &split[(stripes - 1) * key_len..stripes * key_len];
    block.iter_mut().zip(last).for_each(|(b, x)| *b ^= x);
    block
}

/// Splits `key` into `stripes` stripes (LUKS AFsplit), all but the last random.
fn af_split(hash: HashAlg, key: &[u8], stripes: usize) -> Result<Vec<u8>> {
    let n = key.len();
    let mut out = vec![0u8; n * stripes];
    random_bytes(&mut out[..n * (stripes - 1)])?;
    let mut block = vec![0u8; n];
    for s in out[..n * (stripes - 1)].chunks(n) {
        block.iter_mut().zip(s).for_each(|(b, x)| *b ^= x);
        diffuse(hash, &mut block);
    }
    for (o, (b, k)) in out[n * (stripes - 1)..].iter_mut().zip(block.iter().zip(key)) {
        *o = b ^ k;
    }
    Ok(out)
}

/// Fills `buf` from the kernel's random source.
pub(crate) fn random_bytes(buf: &mut [u8]) -> Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .map_err(Error::io("reading random bytes", 0))
}

/// A random (version 4) UUID in its text form.
fn random_uuid() -> Result<String> {
    let mut b = [0u8; 16];
    random_bytes(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..]))
}

/// The cipher state of an open encrypted image.
pub struct Crypt {
    sectors: SectorCrypt,
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
        Crypt {
            sectors: SectorCrypt { cipher: Box::new(CbcSectors(Aes128::new(&key.into()))), ivgen: IvGen::Plain64 },
            host_offsets: false,
            master_key: Vec::new(),
        }
    }

    /// Unlocks a LUKS header with `passphrase`, trying every active slot in
    /// order. `read` reads bytes of the header area (offset relative to the
    /// LUKS header). Returns the cipher state and the slot that opened.
    /// A header whose slots would make the attempt run more PBKDF2 than
    /// [`luks::MAX_UNLOCK_WORK`] is refused before any runs.
    pub fn unlock_luks(
        header: &LuksHeader,
        passphrase: &[u8],
        read: &dyn Fn(u64, &mut [u8]) -> Result<()>,
    ) -> Result<(Crypt, usize)> {
        header.check_unlock_work()?;
        for (i, slot) in header.slots.iter().enumerate() {
            if !slot.active {
                continue;
            }
            if let Some(key) = try_slot(header, slot, passphrase, read)? {
                let sectors = SectorCrypt::for_luks(header, &key)?;
                return Ok((Crypt { sectors, host_offsets: true, master_key: key }, i));
            }
        }
        Err(Error::InvalidArgument("Invalid password, cannot unlock any keyslot".into()))
    }

    /// Whether sectors are numbered by host offset (LUKS) rather than guest
    /// offset (legacy AES).
    pub fn uses_host_offset(&self) -> bool {
        self.host_offsets
    }

    fn check(buf: &[u8], offset: u64) -> Result<()> {
        if offset % SECTOR != 0 || buf.len() as u64 % SECTOR != 0 {
            return Err(Error::InvalidArgument(format!(
                "encrypted I/O must cover whole 512-byte sectors (offset {offset}, length {})",
                buf.len()
            )));
        }
        Ok(())
    }

    /// Encrypts `buf` in place; `offset` (a multiple of 512) numbers its
    /// first sector.
    pub fn encrypt(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Self::check(buf, offset)?;
        self.sectors.run(buf, offset / SECTOR, true);
        Ok(())
    }

    /// Decrypts `buf` in place; `offset` (a multiple of 512) numbers its
    /// first sector.
    pub fn decrypt(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Self::check(buf, offset)?;
        self.sectors.run(buf, offset / SECTOR, false);
        Ok(())
    }
}

/// Reads and validates the LUKS header an image's extension points at.
pub fn read_luks_header(storage: &dyn Storage, ext: &CryptoExtension) -> Result<LuksHeader> {
    let mut buf = vec![0u8; luks::HEADER_SIZE];
    storage.read_at(&mut buf, ext.offset).map_err(Error::io("reading the LUKS header", ext.offset))?;
    Ok(LuksHeader::parse(&buf, ext.length)?)
}

/// The cipher state for an image with this header, or `None` when it is
/// not encrypted. Without a passphrase an encrypted image is refused with
/// QEMU's message.
pub(crate) fn open_image(storage: &dyn Storage, header: &Header, passphrase: Option<&[u8]>) -> Result<Option<Crypt>> {
    if header.crypt_method == crypt::NONE {
        return Ok(None);
    }
    // A broken LUKS header is reported as such, with or without a passphrase.
    let luks = match header.extensions.crypto {
        Some(ext) if header.crypt_method == crypt::LUKS => Some((ext, read_luks_header(storage, &ext)?)),
        _ => None,
    };
    let Some(passphrase) = passphrase else {
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
    Ok(Some(Crypt::unlock_luks(&luks, passphrase, &read)?.0))
}

/// Tries one slot: the master key when the passphrase opens it.
fn try_slot(
    h: &LuksHeader,
    slot: &luks::KeySlot,
    passphrase: &[u8],
    read: &dyn Fn(u64, &mut [u8]) -> Result<()>,
) -> Result<Option<Vec<u8>>> {
    let key_len = h.key_bytes as usize;
    let mut slot_key = vec![0u8; key_len];
    pbkdf2(h.hash_alg, passphrase, &slot.salt, slot.iterations, &mut slot_key);
    // Whole sectors, so the cipher sees complete sectors as it did when the
    // material was written.
    let len = (h.split_key_len() as u64).div_ceil(SECTOR) * SECTOR;
    let mut split = vec![0u8; len as usize];
    read(u64::from(slot.key_offset_sector) * SECTOR, &mut split)?;
    SectorCrypt::for_luks(h, &slot_key)?.run(&mut split, 0, false);
    let key = af_merge(h.hash_alg, key_len, slot.stripes as usize, &split);
    let mut check = [0u8; luks::DIGEST_LEN];
    pbkdf2(h.hash_alg, &key, &h.master_key_salt, h.master_key_iterations, &mut check);
    Ok((check == h.master_key_digest).then_some(key))
}

/// Parameters of a new LUKS header (`encrypt.*` options of create).
#[derive(Clone, Debug)]
pub struct LuksParams {
    /// Cipher and key size (default aes-256).
    pub cipher_alg: CipherAlg,
    /// Mode (default xts).
    pub cipher_mode: CipherMode,
    /// IV generator (default plain64).
    pub ivgen_alg: IvGenAlg,
    /// IV hash (ESSIV; defaults to sha256 there).
    pub ivgen_hash_alg: Option<HashAlg>,
    /// PBKDF2 and diffuser hash (default sha256).
    pub hash_alg: HashAlg,
    /// Milliseconds of PBKDF2 per key (default 2000).
    pub iter_time_ms: u64,
}

impl Default for LuksParams {
    fn default() -> Self {
        LuksParams {
            cipher_alg: CipherAlg::Aes256,
            cipher_mode: CipherMode::Xts,
            ivgen_alg: IvGenAlg::Plain64,
            ivgen_hash_alg: None,
            hash_alg: HashAlg::Sha256,
            iter_time_ms: 2000,
        }
    }
}

/// This thread's CPU time in milliseconds (what QEMU's calibration
/// measures, so that a busy machine does not skew it).
fn thread_cpu_ms() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as u64 * 1000 + t.tv_nsec as u64 / 1_000_000
}

/// Shortest calibration run. QEMU's `qcrypto_pbkdf2_count_iters` grows the
/// count the same way until one run takes over 500 ms of CPU; a fifth of
/// that measures the rate as well and makes creating an image (two
/// calibrations) take a fraction of a second instead of seconds.
const CALIBRATION_MS: u64 = 100;

/// How many PBKDF2 iterations `hash` runs per second of this thread's CPU
/// time for an output of one digest (QEMU's `qcrypto_pbkdf2_count_iters`).
fn iterations_per_second(hash: HashAlg, password: &[u8], salt: &[u8]) -> Result<u64> {
    let mut out = vec![0u8; hash.digest_len()];
    let mut iterations: u64 = 1 << 15;
    loop {
        if iterations > u64::from(u32::MAX) {
            return Err(Error::InvalidArgument(format!("PBKDF iterations {iterations} too large to scale")));
        }
        let start = thread_cpu_ms();
        pbkdf2(hash, password, salt, iterations as u32, &mut out);
        let ms = thread_cpu_ms() - start;
        if ms > CALIBRATION_MS {
            return Ok(iterations * 1000 / ms);
        }
        iterations = if ms < CALIBRATION_MS / 5 { iterations * 10 } else { iterations * 2 * CALIBRATION_MS / ms };
    }
}

/// Iterations for `iter_time_ms` of PBKDF2 with an output of `out_len`
/// bytes, divided by `divisor`, at least QEMU's minimum.
fn calibrated(hash: HashAlg, pw: &[u8], salt: &[u8], out_len: usize, iter_time_ms: u64, divisor: u64) -> Result<u32> {
    iterations_for(iterations_per_second(hash, pw, salt)?, hash, out_len, iter_time_ms, divisor)
}

/// [`calibrated`] at `one_block_per_sec` iterations a second with a
/// one-digest output. QEMU measures with the output it will derive (the
/// key for a slot, 20 bytes for the digest); each further digest-sized
/// block of it runs all iterations again, so a 64-byte key from SHA-256
/// gets half the iterations of the same time with one block.
fn iterations_for(
    one_block_per_sec: u64,
    hash: HashAlg,
    out_len: usize,
    iter_time_ms: u64,
    divisor: u64,
) -> Result<u32> {
    let per_sec = one_block_per_sec / out_len.div_ceil(hash.digest_len()) as u64;
    let iters = per_sec.checked_mul(iter_time_ms).map(|v| v / 1000 / divisor).ok_or_else(|| {
        Error::InvalidArgument(format!("PBKDF iterations {per_sec} too large to scale: Numerical result out of range"))
    })?;
    if iters > u64::from(u32::MAX) {
        return Err(Error::InvalidArgument(format!(
            "PBKDF iterations {iters} larger than {}: Numerical result out of range",
            u32::MAX
        )));
    }
    Ok((iters as u32).max(luks::MIN_ITERATIONS))
}

/// A new LUKS header area: the header, slot 0 holding the master key under
/// `passphrase`, the other slots inactive. Returns the area's bytes (as
/// long as the payload offset) and the cipher state for the data.
pub fn create_luks(params: &LuksParams, passphrase: &[u8]) -> Result<(Vec<u8>, Crypt)> {
    let ivgen_hash = match params.ivgen_alg {
        IvGenAlg::Essiv => Some(params.ivgen_hash_alg.unwrap_or(HashAlg::Sha256)),
        _ => params.ivgen_hash_alg,
    };
    if let (IvGenAlg::Essiv, Some(h)) = (params.ivgen_alg, ivgen_hash) {
        luks::essiv_cipher(params.cipher_alg, h).map_err(Error::InvalidArgument)?;
    }
    luks::check_mode(params.cipher_alg, params.cipher_mode).map_err(Error::InvalidArgument)?;
    let key_len = params.cipher_mode.key_bytes(params.cipher_alg);
    if (u64::from(key_len) * u64::from(luks::STRIPES)) % SECTOR != 0 {
        // qemu-img 10 aborts on an assertion opening such an image (its key
        // material is not a whole number of sectors): an image QEMU cannot
        // open is not made, though one made elsewhere is read.
        return Err(Error::Unsupported(format!(
            "LUKS images with {}-bit keys in mode {}: QEMU cannot open them (use xts or another key size)",
            key_len * 8,
            params.cipher_mode.name()
        )));
    }
    let mut h = LuksHeader::layout(
        params.cipher_alg,
        params.cipher_mode,
        params.ivgen_alg,
        ivgen_hash,
        params.hash_alg,
        &random_uuid()?,
    );
    let key_len = h.key_bytes as usize;
    let mut master = vec![0u8; key_len];
    random_bytes(&mut master)?;
    random_bytes(&mut h.master_key_salt)?;
    h.master_key_iterations = calibrated(
        h.hash_alg,
        &master,
        &h.master_key_salt,
        luks::DIGEST_LEN,
        params.iter_time_ms,
        // cryptsetup's (and QEMU's) eighth for the digest.
        8,
    )?;
    pbkdf2(h.hash_alg, &master, &h.master_key_salt, h.master_key_iterations, &mut h.master_key_digest);
    let mut area = vec![0u8; h.payload_offset() as usize];
    set_slot(&mut h, &mut area, 0, &master, passphrase, params.iter_time_ms)?;
    area[..luks::HEADER_SIZE].copy_from_slice(&h.serialize());
    let crypt = Crypt { sectors: SectorCrypt::for_luks(&h, &master)?, host_offsets: true, master_key: master };
    Ok((area, crypt))
}

/// Fills key slot `index` with `master` under `passphrase`: fresh salt,
/// calibrated iterations, split and encrypted key material written into
/// `area` (the whole header area).
fn set_slot(
    h: &mut LuksHeader,
    area: &mut [u8],
    index: usize,
    master: &[u8],
    passphrase: &[u8],
    iter_time_ms: u64,
) -> Result<()> {
    let key_len = h.key_bytes as usize;
    let mut salt = [0u8; luks::SALT_LEN];
    random_bytes(&mut salt)?;
    let iterations = calibrated(h.hash_alg, passphrase, &salt, key_len, iter_time_ms, 1)?;
    // Never a header oxqcow would refuse to unlock.
    let mut with_slot = h.clone();
    with_slot.slots[index].active = true;
    with_slot.slots[index].iterations = iterations;
    with_slot
        .check_unlock_work()
        .map_err(|e| Error::InvalidArgument(format!("{e} (use a shorter encrypt.iter-time)")))?;
    let mut slot_key = vec![0u8; key_len];
    pbkdf2(h.hash_alg, passphrase, &salt, iterations, &mut slot_key);
    let mut split = af_split(h.hash_alg, master, luks::STRIPES as usize)?;
    split.resize((split.len() as u64).div_ceil(SECTOR) as usize * SECTOR as usize, 0);
    SectorCrypt::for_luks(h, &slot_key)?.run(&mut split, 0, true);
    let at = (u64::from(h.slots[index].key_offset_sector) * SECTOR) as usize;
    area[at..at + split.len()].copy_from_slice(&split);
    let slot = &mut h.slots[index];
    slot.active = true;
    slot.iterations = iterations;
    slot.salt = salt;
    slot.stripes = luks::STRIPES;
    Ok(())
}

impl crate::qcow2::meta::Meta {
    /// Makes a new (still empty) image encrypted: legacy AES only marks the
    /// header; LUKS allocates clusters for the header area, writes it there
    /// (the rest of its last cluster zeroed) and points the extension at it
    /// (QEMU's `qcow2_set_up_encryption` and `qcow2_crypto_hdr_init_func`).
    pub(crate) fn set_up_encryption(&mut self, st: &dyn Storage, enc: &crate::options::Encryption) -> Result<()> {
        match &enc.format {
            crate::options::EncryptionFormat::Aes => self.header.crypt_method = crypt::AES,
            crate::options::EncryptionFormat::Luks(params) => {
                let (mut area, _) = create_luks(params, &enc.passphrase)?;
                let length = area.len() as u64;
                let cs = self.geometry.cluster_size();
                let clusters = length.div_ceil(cs);
                let offset = self.alloc_clusters(st, clusters)?;
                area.resize((clusters * cs) as usize, 0);
                st.write_at(&area, offset).map_err(Error::io("writing the LUKS header", offset))?;
                self.header.crypt_method = crypt::LUKS;
                self.header.extensions.crypto = Some(CryptoExtension { offset, length });
            }
        }
        self.write_header(st)
    }
}

/// A key slot change (`qemu-img amend -o encrypt.state=...`).
#[derive(Clone, Debug)]
pub enum KeyslotChange {
    /// Put the master key into a slot under a new passphrase.
    Activate {
        /// The slot; the first inactive one when `None`.
        keyslot: Option<usize>,
        /// The new passphrase.
        new_secret: Vec<u8>,
        /// Milliseconds of PBKDF2 (2000 by default).
        iter_time_ms: u64,
        /// Overwrite an active slot.
        force: bool,
    },
    /// Erase slots: the one given, or every one the old passphrase opens.
    Erase {
        /// The slot to erase.
        keyslot: Option<usize>,
        /// Erase the slots this passphrase opens.
        old_secret: Option<Vec<u8>>,
        /// Allow erasing the last active slot.
        force: bool,
    },
}

impl crate::qcow2::Qcow2 {
    /// Adds or erases LUKS key slots with qemu-img amend's rules and
    /// messages (QEMU's `qcrypto_block_luks_amend_options`). Key material
    /// is written before the header that activates it; an erased slot is
    /// deactivated in the header before its material is overwritten with
    /// random bytes.
    pub fn amend_encryption(&self, change: &KeyslotChange) -> Result<()> {
        if self.is_read_only() {
            return Err(Error::ReadOnly);
        }
        let Some(crypt) = self.crypt().filter(|c| !c.master_key.is_empty()) else {
            return Err(Error::InvalidArgument("Only LUKS encryption options can be amended".into()));
        };
        self.exclusive(|m, st| {
            let ext = m.header.extensions.crypto.expect("LUKS images have the extension");
            let mut h = read_luks_header(st, &ext)?;
            let invalid = |msg: String| Err(Error::InvalidArgument(msg));
            let write_header = |h: &LuksHeader| -> Result<()> {
                st.write_at(&h.serialize(), ext.offset).map_err(Error::io("writing the LUKS header", ext.offset))?;
                st.sync().map_err(Error::io("syncing the LUKS header", ext.offset))
            };
            let material_len = (h.split_key_len() as u64).div_ceil(SECTOR) * SECTOR;
            match change {
                KeyslotChange::Activate { keyslot, new_secret, iter_time_ms, force } => {
                    let index = match keyslot {
                        Some(i) if h.slots[*i].active && !force => {
                            return invalid(format!("Refusing to overwrite active keyslot {i} - please erase it first"))
                        }
                        Some(i) => *i,
                        None => match h.slots.iter().position(|s| !s.active) {
                            Some(i) => i,
                            None => return invalid("Can't add a keyslot - all keyslots are in use".into()),
                        },
                    };
                    let at = u64::from(h.slots[index].key_offset_sector) * SECTOR;
                    let mut area = vec![0u8; (at + material_len) as usize];
                    set_slot(&mut h, &mut area, index, &crypt.master_key, new_secret, *iter_time_ms)?;
                    // An overwritten active slot is first taken out of use.
                    if *force {
                        let mut off = h.clone();
                        off.slots[index] = read_luks_header(st, &ext)?.slots[index];
                        off.slots[index].active = false;
                        write_header(&off)?;
                    }
                    let pos = ext.offset + at;
                    st.write_at(&area[at as usize..], pos).map_err(Error::io("writing LUKS key material", pos))?;
                    st.sync().map_err(Error::io("syncing LUKS key material", pos))?;
                    write_header(&h)
                }
                KeyslotChange::Erase { keyslot, old_secret, force } => {
                    // Trying the old secret runs PBKDF2 over the slots.
                    h.check_unlock_work()?;
                    let active = h.slots.iter().filter(|s| s.active).count();
                    let read = |offset: u64, buf: &mut [u8]| -> Result<()> {
                        let at = ext.offset + offset;
                        st.read_at(buf, at).map_err(Error::io("reading LUKS key material", at))
                    };
                    let targets: Vec<usize> = match (keyslot, old_secret) {
                        (Some(i), old) => {
                            if !h.slots[*i].active {
                                return invalid(format!("Given keyslot {i} is already erased (inactive) "));
                            }
                            if let Some(old) = old {
                                if try_slot(&h, &h.slots[*i], old, &read)?.is_none() {
                                    return invalid(format!(
                                        "Given keyslot {i} doesn't contain the given old password for erase operation"
                                    ));
                                }
                            }
                            if active == 1 && !force {
                                return invalid(format!(
                                    "Attempt to erase the only active keyslot {i} which will erase all the data in \
                                     the image irreversibly - refusing operation"
                                ));
                            }
                            vec![*i]
                        }
                        (None, Some(old)) => {
                            let mut hits = Vec::new();
                            for (i, s) in h.slots.iter().enumerate() {
                                if s.active && try_slot(&h, s, old, &read)?.is_some() {
                                    hits.push(i);
                                }
                            }
                            if hits.is_empty() {
                                return invalid("No keyslots match given (old) password for erase operation".into());
                            }
                            if hits.len() == active && !force {
                                return invalid(
                                    "All the active keyslots match the (old) password that was given and erasing \
                                     them will erase all the data in the image irreversibly - refusing operation"
                                        .into(),
                                );
                            }
                            hits
                        }
                        (None, None) => {
                            return invalid(
                                "To erase keyslot(s), either explicit keyslot index or the password currently \
                                 contained in them must be given"
                                    .into(),
                            )
                        }
                    };
                    for i in targets {
                        h.slots[i].active = false;
                        h.slots[i].iterations = 0;
                        h.slots[i].salt = [0; luks::SALT_LEN];
                        write_header(&h)?;
                        let mut junk = vec![0u8; material_len as usize];
                        random_bytes(&mut junk)?;
                        let pos = ext.offset + u64::from(h.slots[i].key_offset_sector) * SECTOR;
                        st.write_at(&junk, pos).map_err(Error::io("erasing LUKS key material", pos))?;
                        st.sync().map_err(Error::io("syncing LUKS key material", pos))?;
                    }
                    Ok(())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards against slots that took twice their `iter-time` to unlock:
    /// the rate was measured with a 32-byte output whatever the key, so a
    /// 64-byte key from SHA-256 (two blocks) got twice QEMU's iterations,
    /// and the digest from SHA-1 (one block) half of them.
    #[test]
    fn calibration_counts_the_output_blocks_as_qemu_does() {
        let at = |hash, out_len, ms, divisor| iterations_for(10_000_000, hash, out_len, ms, divisor).unwrap();
        assert_eq!(at(HashAlg::Sha256, 64, 2000, 1), 10_000_000);
        assert_eq!(at(HashAlg::Sha256, 32, 2000, 1), 20_000_000);
        assert_eq!(at(HashAlg::Sha1, 64, 2000, 1), 5_000_000);
        assert_eq!(at(HashAlg::Sha1, luks::DIGEST_LEN, 2000, 8), 2_500_000);
        assert_eq!(at(HashAlg::Sha512, 64, 2000, 1), 20_000_000);
        assert_eq!(at(HashAlg::Sha256, 64, 0, 1), luks::MIN_ITERATIONS);
        let too_many = iterations_for(10_000_000, HashAlg::Sha256, 32, 1000 * 1000, 1).unwrap_err();
        assert_eq!(
            too_many.to_string(),
            "PBKDF iterations 10000000000 larger than 4294967295: Numerical result out of range"
        );
    }

    #[test]
    fn af_split_and_merge_are_inverse() {
        let key: Vec<u8> = (0..64u8).collect();
        for hash in [HashAlg::Sha1, HashAlg::Sha256, HashAlg::Sha512] {
            let split = af_split(hash, &key, 4000).unwrap();
            assert_eq!(af_merge(hash, 64, 4000, &split), key);
        }
    }

    #[test]
    fn xts_plain64_known_answer() {
        // IEEE 1619 XTS-AES-128 vector 2: key1 = 0x11.., key2 = 0x22..,
        // data unit 0x3333333333, plaintext 32 bytes of 0x44.
        let mut key = [0x11u8; 32];
        key[16..].fill(0x22);
        let c = sector_cipher(CipherAlg::Aes128, CipherMode::Xts, &key).unwrap();
        let mut data = [0x44u8; 32];
        c.encrypt(&mut data, &IvGen::Plain64.iv(0x33_3333_3333));
        let want = [
            0xc4, 0x54, 0x18, 0x5e, 0x6a, 0x16, 0x93, 0x6e, 0x39, 0x33, 0x40, 0x38, 0xac, 0xef, 0x83, 0x8b, 0xfb, 0x18,
            0x6f, 0xff, 0x74, 0x80, 0xad, 0xc4, 0x28, 0x93, 0x82, 0xec, 0xd6, 0xd3, 0x94, 0xf0,
        ];
        assert_eq!(data, want);
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// Encrypts the sector 0, 1, .., 255, 0, .. with `alg`/`mode` and
    /// `iv`, checks its first and last 16 bytes and SHA-256 against values
    /// OpenSSL computed (`openssl enc -nopad`; CAST5's CTR as its ECB over
    /// the counter blocks), and that decryption restores it.
    fn sector_known_answer(alg: CipherAlg, mode: CipherMode, key: &str, iv: &str, want: [&str; 3]) {
        let plain: Vec<u8> = (0..512).map(|i| i as u8).collect();
        let mut ivb = [0u8; 16];
        let iv = hex(iv);
        ivb[..iv.len()].copy_from_slice(&iv);
        let c = sector_cipher(alg, mode, &hex(key)).unwrap();
        let mut data = plain.clone();
        c.encrypt(&mut data, &ivb);
        assert_eq!(data[..16], hex(want[0])[..], "{alg:?} {mode:?} first block");
        assert_eq!(data[496..], hex(want[1])[..], "{alg:?} {mode:?} last block");
        assert_eq!(digest(HashAlg::Sha256, &[&data]), hex(want[2]), "{alg:?} {mode:?} sector");
        c.decrypt(&mut data, &ivb);
        assert_eq!(data, plain);
    }

    #[test]
    fn ecb_known_answers_ignore_the_iv() {
        for iv in ["", "0123456789abcdef0123456789abcdef"] {
            sector_known_answer(
                CipherAlg::Aes128,
                CipherMode::Ecb,
                "000102030405060708090a0b0c0d0e0f",
                iv,
                [
                    "0a940bb5416ef045f1c39458c653ea5a",
                    "66a7c7e8345231489751de073316adad",
                    "3632e6dba290ea4158bb5ee391f61a738f26444cbc246612380f6df28c28c1c3",
                ],
            );
            sector_known_answer(
                CipherAlg::Cast5,
                CipherMode::Ecb,
                "0123456712345678234567893456789a",
                iv,
                [
                    "258f9cdaf543b4ac925bc50fc16e5b7c",
                    "939ed26ce0fecb2fc20565ef037b8537",
                    "065d55e390d6705ab4a1db60adeddd19941cbb847ea143aa24b311fa92fff54f",
                ],
            );
        }
        let c = sector_cipher(CipherAlg::Aes128, CipherMode::Ecb, &[0; 16]).unwrap();
        assert!(!c.uses_iv());
    }

    #[test]
    fn ctr_known_answers_carry_and_wrap_across_the_block() {
        // SP 800-38A's CTR key and initial counter: the counter carries
        // out of its last byte at the second block.
        sector_known_answer(
            CipherAlg::Aes128,
            CipherMode::Ctr,
            "2b7e151628aed2a6abf7158809cf4f3c",
            "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff",
            [
                "ec8ddd709c657ab7fadb1c7ee693afeb",
                "088cf0f91e657a4343d8dfcc1237fd69",
                "cb65fb34266f99d9a02612a2e15bad0d3b7cc3557f588ce0dc1cbcc820acc8e5",
            ],
        );
        // The 128-bit counter wraps to zero after its 16th block.
        sector_known_answer(
            CipherAlg::Aes128,
            CipherMode::Ctr,
            "2b7e151628aed2a6abf7158809cf4f3c",
            "fffffffffffffffffffffffffffffff0",
            [
                "6ba0cb0027e59039065182a85d390e70",
                "a3d6b5d3447035f12df1130685d59cb0",
                "44200e326042a9f2045c212c66c25e827bf1aa62d9cecb721cd9546598871018",
            ],
        );
        // CAST5 counts in its 8-byte block (RFC 2144's key), wrapping too;
        // the second half of the IV is unused.
        sector_known_answer(
            CipherAlg::Cast5,
            CipherMode::Ctr,
            "0123456712345678234567893456789a",
            "ffffffffffffffe0aaaaaaaaaaaaaaaa",
            [
                "a5c7baf6cbfa4e7134a230d5b2ba2b12",
                "5f16c289c687fb9a9fa6da300be25b1f",
                "c29481fc2434065cf6b6b867f1271b4795fc04b305fbc8a610b28818bb421d48",
            ],
        );
    }

    #[test]
    fn cast5_has_no_xts() {
        let e = sector_cipher(CipherAlg::Cast5, CipherMode::Xts, &[0; 32]).err().unwrap();
        assert_eq!(e.to_string(), "Unsupported cipher mode xts");
    }

    #[test]
    fn essiv_iv_is_the_sector_number_encrypted_in_ecb() {
        // ESSIV with serpent-256 (sha256 of a serpent-128 key): the IV is
        // serpent-256-ECB, keyed with the digest, of le64(sector) || 0^8.
        let key = [7u8; 16];
        let g = IvGen::new(IvGenAlg::Essiv, Some((CipherAlg::Serpent256, HashAlg::Sha256)), &key).unwrap();
        let ecb = sector_cipher(CipherAlg::Serpent256, CipherMode::Ecb, &digest(HashAlg::Sha256, &[&key])).unwrap();
        let mut want = [0u8; 16];
        want[..8].copy_from_slice(&0x1234_5678_9abc_u64.to_le_bytes());
        ecb.encrypt(&mut want, &[0; 16]);
        assert_eq!(g.iv(0x1234_5678_9abc), want);
    }

    #[test]
    fn plain_ivgen_truncates_to_32_bits() {
        assert_eq!(IvGen::Plain.iv(0x1_0000_0002)[..8], [2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(IvGen::Plain64.iv(0x1_0000_0002)[..8], [2, 0, 0, 0, 1, 0, 0, 0]);
    }

    #[test]
    fn created_header_unlocks_only_with_its_passphrase() {
        let params = LuksParams {
            cipher_alg: CipherAlg::Aes128,
            cipher_mode: CipherMode::Cbc,
            ivgen_alg: IvGenAlg::Essiv,
            iter_time_ms: 1,
            ..Default::default()
        };
        let (area, crypt) = create_luks(&params, b"secret").unwrap();
        let h = LuksHeader::parse(&area, area.len() as u64).unwrap();
        assert_eq!(h.cipher_mode_spec(), "cbc-essiv:sha256");
        let read = |o: u64, b: &mut [u8]| {
            b.copy_from_slice(&area[o as usize..o as usize + b.len()]);
            Ok(())
        };
        let (opened, slot) = Crypt::unlock_luks(&h, b"secret", &read).unwrap();
        assert_eq!(slot, 0);
        let mut a = vec![7u8; 1024];
        crypt.encrypt(&mut a, 4096).unwrap();
        assert_ne!(a, vec![7u8; 1024]);
        opened.decrypt(&mut a, 4096).unwrap();
        assert_eq!(a, vec![7u8; 1024]);
        let e = Crypt::unlock_luks(&h, b"wrong", &read).unwrap_err();
        assert_eq!(e.to_string(), "Invalid password, cannot unlock any keyslot");
    }
}
