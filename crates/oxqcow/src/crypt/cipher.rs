//! The ciphers of encrypted images: one sector cipher per mode (XTS, CBC,
//! ECB, CTR) over any block cipher chosen at run time, and the IV
//! generators (plain, plain64, essiv). Everything here is pure: bytes in,
//! bytes out, sector by sector.

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

use super::SECTOR;
use crate::error::{Error, Result};

/// The widest IV any mode takes: one 16-byte block. Ciphers with 8-byte
/// blocks use the first half, as QEMU's IV generators fill `niv` bytes.
pub(super) type Iv = [u8; 16];

/// What every block cipher here offers; the key length is checked when a
/// value is made (`KeyInit::new_from_slice`), so Serpent, Twofish and CAST5
/// serve all their key sizes with one type each.
pub(super) trait Block:
    BlockCipherEncrypt + BlockCipherDecrypt + KeyInit + Clone + Send + Sync + 'static
{
}
impl<T: BlockCipherEncrypt + BlockCipherDecrypt + KeyInit + Clone + Send + Sync + 'static> Block for T {}

/// Something built from a block cipher type chosen at run time: the one
/// `match` on [`CipherAlg`] ([`with_cipher`]) calls `block16` for ciphers
/// with 16-byte blocks, which XTS needs, and `any_block` for CAST5's 8.
pub(super) trait WithCipher {
    type Out;
    fn block16<C: Block + BlockSizeUser<BlockSize = U16>>(self, alg: CipherAlg) -> Self::Out;
    /// Builds for any block size (also what `block16` falls back to).
    fn any_block<C: Block>(self, alg: CipherAlg) -> Self::Out;
}

pub(super) fn with_cipher<W: WithCipher>(alg: CipherAlg, w: W) -> W::Out {
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
pub(super) fn keyed<C: KeyInit>(alg: CipherAlg, key: &[u8]) -> Result<C> {
    C::new_from_slice(key)
        .map_err(|_| Error::InvalidArgument(format!("Cipher {} cannot take a key of {} bytes", alg.name(), key.len())))
}

/// The first block of `iv` as the cipher's block type.
pub(super) fn iv_block<N: ArraySize>(iv: &Iv) -> Array<u8, N> {
    let mut b = Array::<u8, N>::default();
    let n = b.len();
    b.copy_from_slice(&iv[..n]);
    b
}

/// One sector's cipher operation; `sector` is a whole number of blocks.
pub(super) trait SectorCipher: Send + Sync {
    fn encrypt(&self, sector: &mut [u8], iv: &Iv);
    fn decrypt(&self, sector: &mut [u8], iv: &Iv);
    /// Whether the mode takes an IV at all (QEMU's `niv` is 0 for ECB and
    /// its IV generator is then never run).
    fn uses_iv(&self) -> bool {
        true
    }
}

pub(super) struct XtsSectors<C>(Xts128<C>);

impl<C: Block + BlockSizeUser<BlockSize = U16>> SectorCipher for XtsSectors<C> {
    fn encrypt(&self, sector: &mut [u8], iv: &Iv) {
        self.0.encrypt_sector(sector, Array(*iv));
    }
    fn decrypt(&self, sector: &mut [u8], iv: &Iv) {
        self.0.decrypt_sector(sector, Array(*iv));
    }
}

pub(super) struct CbcSectors<C>(C);

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
pub(super) struct EcbSectors<C>(C);

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
pub(super) struct CtrSectors<C>(C);

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
pub(super) struct SectorCipherFor<'a> {
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

pub(super) fn sector_cipher(alg: CipherAlg, mode: CipherMode, key: &[u8]) -> Result<Box<dyn SectorCipher>> {
    with_cipher(alg, SectorCipherFor { mode, key })
}

/// ESSIV's cipher: encrypts the little-endian sector number, zero padded
/// to one block of its own, in ECB mode (QEMU's `qcrypto_ivgen_essiv_calculate`).
pub(super) trait EssivCipher: Send + Sync {
    fn iv(&self, sector: u64) -> Iv;
}

pub(super) struct Essiv<C>(C);

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

pub(super) struct EssivFor<'a>(&'a [u8]);

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
pub(super) enum IvGen {
    Plain,
    Plain64,
    /// The sector number encrypted with a key hashed from the master key.
    Essiv(Box<dyn EssivCipher>),
}

impl IvGen {
    pub(super) fn new(alg: IvGenAlg, essiv: Option<(CipherAlg, HashAlg)>, key: &[u8]) -> Result<IvGen> {
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
pub(super) struct SectorCrypt {
    cipher: Box<dyn SectorCipher>,
    ivgen: IvGen,
}

impl SectorCrypt {
    /// Legacy qcow AES: AES-128-CBC with plain64 IVs.
    pub(super) fn legacy_aes(key: &[u8; 16]) -> SectorCrypt {
        SectorCrypt { cipher: Box::new(CbcSectors(Aes128::new(key.into()))), ivgen: IvGen::Plain64 }
    }

    /// The data cipher of a LUKS header keyed with `key` (the master key,
    /// or a slot key for its key material). Fails with QEMU's message for
    /// a mode the cipher lacks (CAST5 in XTS).
    pub(super) fn for_luks(h: &LuksHeader, key: &[u8]) -> Result<SectorCrypt> {
        let essiv = h.essiv_cipher().zip(h.ivgen_hash_alg);
        Ok(SectorCrypt {
            cipher: sector_cipher(h.cipher_alg, h.cipher_mode, key)?,
            ivgen: IvGen::new(h.ivgen_alg, essiv, key)?,
        })
    }

    pub(super) fn run(&self, buf: &mut [u8], first_sector: u64, encrypt: bool) {
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

pub(super) fn digest(hash: HashAlg, parts: &[&[u8]]) -> Vec<u8> {
    pub(super) fn run<D: Digest>(parts: &[&[u8]]) -> Vec<u8> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
