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
//! Ciphers are RustCrypto's `aes`, `xts-mode` and `cbc`; PBKDF2 is `pbkdf2`
//! over `hmac` with `sha1`/`sha2`.

use aes::cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, BlockModeDecrypt, BlockModeEncrypt, InnerIvInit};
use aes::cipher::{BlockSizeUser, KeyInit};
use aes::{Aes128, Aes192, Aes256};
use oxqcow_format::luks::{self, CipherAlg, CipherMode, HashAlg, IvGenAlg, LuksHeader};
use sha1::Digest;
use xts_mode::Xts128;

use oxqcow_format::header::{crypt, CryptoExtension, Header};

use crate::error::{Error, Result};
use crate::storage::Storage;

/// Sector size of both encryption formats.
pub const SECTOR: u64 = 512;

/// AES with any of its key sizes, chosen at run time.
#[derive(Clone)]
enum Aes {
    A128(Aes128),
    A192(Aes192),
    A256(Aes256),
}

impl Aes {
    fn new(alg: CipherAlg, key: &[u8]) -> Aes {
        match alg {
            CipherAlg::Aes128 => Aes::A128(Aes128::new_from_slice(key).expect("key length checked")),
            CipherAlg::Aes192 => Aes::A192(Aes192::new_from_slice(key).expect("key length checked")),
            CipherAlg::Aes256 => Aes::A256(Aes256::new_from_slice(key).expect("key length checked")),
        }
    }

    fn encrypt_block(&self, block: &mut [u8; 16]) {
        let b = Array::slice_as_mut_array(block.as_mut_slice()).expect("16 bytes");
        match self {
            Aes::A128(c) => c.encrypt_block(b),
            Aes::A192(c) => c.encrypt_block(b),
            Aes::A256(c) => c.encrypt_block(b),
        }
    }
}

/// One sector's cipher operation for any block cipher with 16-byte blocks.
trait SectorCipher: Send + Sync {
    fn encrypt(&self, sector: &mut [u8], iv: [u8; 16]);
    fn decrypt(&self, sector: &mut [u8], iv: [u8; 16]);
}

struct XtsSectors<C>(Xts128<C>);

impl<C> SectorCipher for XtsSectors<C>
where
    C: BlockCipherEncrypt + BlockCipherDecrypt + BlockSizeUser<BlockSize = aes::cipher::consts::U16> + Send + Sync,
{
    fn encrypt(&self, sector: &mut [u8], iv: [u8; 16]) {
        self.0.encrypt_sector(sector, Array(iv));
    }
    fn decrypt(&self, sector: &mut [u8], iv: [u8; 16]) {
        self.0.decrypt_sector(sector, Array(iv));
    }
}

struct CbcSectors<C>(C);

impl<C> SectorCipher for CbcSectors<C>
where
    C: BlockCipherEncrypt
        + BlockCipherDecrypt
        + BlockSizeUser<BlockSize = aes::cipher::consts::U16>
        + Clone
        + Send
        + Sync,
{
    fn encrypt(&self, sector: &mut [u8], iv: [u8; 16]) {
        let (blocks, _) = Array::slice_as_chunks_mut(sector);
        cbc::Encryptor::<C>::inner_iv_init(self.0.clone(), &Array(iv)).encrypt_blocks(blocks);
    }
    fn decrypt(&self, sector: &mut [u8], iv: [u8; 16]) {
        let (blocks, _) = Array::slice_as_chunks_mut(sector);
        cbc::Decryptor::<C>::inner_iv_init(self.0.clone(), &Array(iv)).decrypt_blocks(blocks);
    }
}

fn sector_cipher(alg: CipherAlg, mode: CipherMode, key: &[u8]) -> Box<dyn SectorCipher> {
    fn xts<C: KeyInit + BlockSizeUser<BlockSize = aes::cipher::consts::U16>>(key: &[u8]) -> Xts128<C> {
        let (a, b) = key.split_at(key.len() / 2);
        Xts128::new(
            C::new_from_slice(a).expect("key length checked"),
            C::new_from_slice(b).expect("key length checked"),
        )
    }
    fn one<C: KeyInit>(key: &[u8]) -> C {
        C::new_from_slice(key).expect("key length checked")
    }
    match (mode, alg) {
        (CipherMode::Xts, CipherAlg::Aes128) => Box::new(XtsSectors(xts::<Aes128>(key))),
        (CipherMode::Xts, CipherAlg::Aes192) => Box::new(XtsSectors(xts::<Aes192>(key))),
        (CipherMode::Xts, CipherAlg::Aes256) => Box::new(XtsSectors(xts::<Aes256>(key))),
        (CipherMode::Cbc, CipherAlg::Aes128) => Box::new(CbcSectors(one::<Aes128>(key))),
        (CipherMode::Cbc, CipherAlg::Aes192) => Box::new(CbcSectors(one::<Aes192>(key))),
        (CipherMode::Cbc, CipherAlg::Aes256) => Box::new(CbcSectors(one::<Aes256>(key))),
    }
}

/// The IV of each sector.
enum IvGen {
    Plain,
    Plain64,
    /// The sector number encrypted with a key hashed from the master key.
    Essiv(Box<Aes>),
}

impl IvGen {
    fn new(alg: IvGenAlg, essiv: Option<(CipherAlg, HashAlg)>, key: &[u8]) -> IvGen {
        match (alg, essiv) {
            (IvGenAlg::Plain, _) => IvGen::Plain,
            (IvGenAlg::Plain64, _) | (IvGenAlg::Essiv, None) => IvGen::Plain64,
            (IvGenAlg::Essiv, Some((cipher, hash))) => IvGen::Essiv(Box::new(Aes::new(cipher, &digest(hash, &[key])))),
        }
    }

    fn iv(&self, sector: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        match self {
            IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvGen::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            IvGen::Essiv(c) => {
                iv[..8].copy_from_slice(&sector.to_le_bytes());
                c.encrypt_block(&mut iv);
            }
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
    fn for_luks(h: &LuksHeader, key: &[u8]) -> SectorCrypt {
        let essiv = h.essiv_cipher().zip(h.ivgen_hash_alg);
        SectorCrypt {
            cipher: sector_cipher(h.cipher_alg, h.cipher_mode, key),
            ivgen: IvGen::new(h.ivgen_alg, essiv, key),
        }
    }

    fn run(&self, buf: &mut [u8], first_sector: u64, encrypt: bool) {
        for (i, sector) in buf.chunks_mut(SECTOR as usize).enumerate() {
            let iv = self.ivgen.iv(first_sector + i as u64);
            if encrypt {
                self.cipher.encrypt(sector, iv);
            } else {
                self.cipher.decrypt(sector, iv);
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
            sectors: SectorCrypt {
                cipher: sector_cipher(CipherAlg::Aes128, CipherMode::Cbc, &key),
                ivgen: IvGen::Plain64,
            },
            host_offsets: false,
            master_key: Vec::new(),
        }
    }

    /// Unlocks a LUKS header with `passphrase`, trying every active slot in
    /// order. `read` reads bytes of the header area (offset relative to the
    /// LUKS header). Returns the cipher state and the slot that opened.
    pub fn unlock_luks(
        header: &LuksHeader,
        passphrase: &[u8],
        read: &dyn Fn(u64, &mut [u8]) -> Result<()>,
    ) -> Result<(Crypt, usize)> {
        for (i, slot) in header.slots.iter().enumerate() {
            if !slot.active {
                continue;
            }
            if let Some(key) = try_slot(header, slot, passphrase, read)? {
                let sectors = SectorCrypt::for_luks(header, &key);
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
    if header.size % SECTOR != 0 {
        return Err(Error::Unsupported(format!(
            "encrypted images whose size ({}) is not a multiple of 512 bytes",
            header.size
        )));
    }
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
    SectorCrypt::for_luks(h, &slot_key).run(&mut split, 0, false);
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
/// time (QEMU's `qcrypto_pbkdf2_count_iters`, with a 32-byte output).
fn iterations_per_second(hash: HashAlg, password: &[u8], salt: &[u8]) -> Result<u64> {
    let mut out = [0u8; 32];
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

/// Iterations for `iter_time_ms` of PBKDF2, divided by `divisor`, at
/// least QEMU's minimum.
fn calibrated(hash: HashAlg, pw: &[u8], salt: &[u8], iter_time_ms: u64, divisor: u64) -> Result<u32> {
    let per_sec = iterations_per_second(hash, pw, salt)?;
    let iters = per_sec.checked_mul(iter_time_ms).map(|v| v / 1000 / divisor).ok_or_else(|| {
        Error::InvalidArgument(format!("PBKDF iterations {per_sec} too large to scale: Numerical result out of range"))
    })?;
    if iters > u64::from(u32::MAX) {
        return Err(Error::InvalidArgument(format!(
            "PBKDF iterations {iters} larger than {}: Numerical result out of range",
            u32::MAX
        )));
    }
    // Never more than oxqcow opens again (see `MAX_PBKDF2_ITERATIONS`).
    Ok((iters as u32).clamp(luks::MIN_ITERATIONS, luks::MAX_PBKDF2_ITERATIONS))
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
        params.iter_time_ms,
        // cryptsetup's (and QEMU's) eighth for the digest.
        8,
    )?;
    pbkdf2(h.hash_alg, &master, &h.master_key_salt, h.master_key_iterations, &mut h.master_key_digest);
    let mut area = vec![0u8; h.payload_offset() as usize];
    set_slot(&mut h, &mut area, 0, &master, passphrase, params.iter_time_ms)?;
    area[..luks::HEADER_SIZE].copy_from_slice(&h.serialize());
    let crypt = Crypt { sectors: SectorCrypt::for_luks(&h, &master), host_offsets: true, master_key: master };
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
    let iterations = calibrated(h.hash_alg, passphrase, &salt, iter_time_ms, 1)?;
    let mut slot_key = vec![0u8; key_len];
    pbkdf2(h.hash_alg, passphrase, &salt, iterations, &mut slot_key);
    let mut split = af_split(h.hash_alg, master, luks::STRIPES as usize)?;
    split.resize((split.len() as u64).div_ceil(SECTOR) as usize * SECTOR as usize, 0);
    SectorCrypt::for_luks(h, &slot_key).run(&mut split, 0, true);
    let at = (u64::from(h.slots[index].key_offset_sector) * SECTOR) as usize;
    area[at..at + split.len()].copy_from_slice(&split);
    let slot = &mut h.slots[index];
    slot.active = true;
    slot.iterations = iterations;
    slot.salt = salt;
    slot.stripes = luks::STRIPES;
    Ok(())
}

impl crate::qcow2::Meta {
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
        let c = sector_cipher(CipherAlg::Aes128, CipherMode::Xts, &key);
        let mut data = [0x44u8; 32];
        c.encrypt(&mut data, IvGen::Plain64.iv(0x33_3333_3333));
        let want = [
            0xc4, 0x54, 0x18, 0x5e, 0x6a, 0x16, 0x93, 0x6e, 0x39, 0x33, 0x40, 0x38, 0xac, 0xef, 0x83, 0x8b, 0xfb, 0x18,
            0x6f, 0xff, 0x74, 0x80, 0xad, 0xc4, 0x28, 0x93, 0x82, 0xec, 0xd6, 0xd3, 0x94, 0xf0,
        ];
        assert_eq!(data, want);
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
