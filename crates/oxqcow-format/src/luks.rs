//! The LUKS1 header that a LUKS-encrypted qcow2 image (`crypt_method` 2)
//! keeps in the clusters its full disk encryption extension points at.
//!
//! This module owns the 592-byte LUKS1 partition header (cryptsetup's
//! on-disk format 1.2.1): its fields, the names of the algorithms it may
//! spell, the eight key slots, and every check QEMU's `block-luks.c` makes
//! on them, plus the bounds oxqcow adds so that a hostile header can
//! neither make us allocate in proportion to a number it chose nor run
//! PBKDF2 for hours: key sizes come from a short list, stripes must be
//! 4000, all key material must lie inside the area the qcow2 extension
//! allots, and the PBKDF2 work of one unlock attempt is bounded by
//! [`MAX_UNLOCK_WORK`] ([`LuksHeader::check_unlock_work`], which the
//! engine asks before it unlocks; parsing accepts any count, so that
//! `info` shows such a header as QEMU does).
//! No cryptography happens here: the engine's `crypt` module does that.

use crate::error::FormatError;

/// Size of the LUKS1 header proper (without key material).
pub const HEADER_SIZE: usize = 592;
/// LUKS sectors are 512 bytes.
pub const SECTOR_SIZE: u64 = 512;
/// Number of key slots.
pub const NUM_KEY_SLOTS: usize = 8;
/// Anti-forensic stripes per key slot (the only value LUKS1 writes and QEMU accepts).
pub const STRIPES: u32 = 4000;
/// Key material starts at 4 KiB; slot areas are aligned to it.
pub const KEY_SLOT_OFFSET: u64 = 4096;
/// Bytes of the master key digest.
pub const DIGEST_LEN: usize = 20;
/// Bytes of every PBKDF2 salt.
pub const SALT_LEN: usize = 32;
/// Bytes of the UUID field.
pub const UUID_LEN: usize = 40;
/// Key slot state: in use.
pub const KEY_SLOT_ENABLED: u32 = 0x00AC_71F3;
/// Key slot state: free.
pub const KEY_SLOT_DISABLED: u32 = 0x0000_DEAD;
/// QEMU's floor for PBKDF2 iterations of a key slot and of the master key digest.
pub const MIN_ITERATIONS: u32 = 1000;
/// oxqcow's bound on the PBKDF2 work of one unlock attempt, in SHA-256
/// HMAC computations ([`pbkdf2_work`]). A wrong passphrase makes an unlock
/// try every active key slot: PBKDF2 of the passphrase with the slot's
/// iterations, then PBKDF2 of the candidate key with the master key
/// digest's. QEMU bounds neither count (each may reach 2^32 - 1; eight
/// slots of 100 million SHA-512 iterations ran 290 s here). The bound is
/// what the default `iter-time` (2 s per slot, an eighth of that for the
/// digest) gives all eight slots on a fast machine (a 2023 Xeon with SHA
/// extensions): 155 million HMACs as qemu-img 10 calibrates it (8.6
/// million SHA-256 iterations for a 64-byte key, two HMACs each, and 2.1
/// million for the digest), 194 million as oxqcow does (RustCrypto's
/// SHA-256 is faster: 10.8 and 2.8 million), with room for faster
/// machines. A hostile header then costs at most some 25 s of PBKDF2 there.
pub const MAX_UNLOCK_WORK: u64 = 250_000_000;
/// oxqcow's ceiling for the area the qcow2 extension reserves for the LUKS
/// header and its key material: eight slots of 64-byte keys with 4000
/// stripes need 2 MiB, so 64 MiB is generous and still bounds allocations.
pub const MAX_HEADER_AREA: u64 = 64 << 20;

const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";

/// A cipher algorithm (the block cipher and its key size): the ones QEMU's
/// LUKS driver maps to LUKS cipher names (`qcrypto_block_luks_cipher_name_map`),
/// less SM4, which QEMU builds without nettle's SM4 do not offer either.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CipherAlg {
    /// AES with a 128-bit key.
    Aes128,
    /// AES with a 192-bit key.
    Aes192,
    /// AES with a 256-bit key.
    Aes256,
    /// CAST5 (CAST-128) with a 128-bit key; its blocks are 8 bytes.
    Cast5,
    /// Serpent with a 128-bit key.
    Serpent128,
    /// Serpent with a 192-bit key.
    Serpent192,
    /// Serpent with a 256-bit key.
    Serpent256,
    /// Twofish with a 128-bit key.
    Twofish128,
    /// Twofish with a 192-bit key.
    Twofish192,
    /// Twofish with a 256-bit key.
    Twofish256,
}

impl CipherAlg {
    /// Every algorithm, in QEMU's enum order.
    pub const ALL: [CipherAlg; 10] = [
        CipherAlg::Aes128,
        CipherAlg::Aes192,
        CipherAlg::Aes256,
        CipherAlg::Cast5,
        CipherAlg::Serpent128,
        CipherAlg::Serpent192,
        CipherAlg::Serpent256,
        CipherAlg::Twofish128,
        CipherAlg::Twofish192,
        CipherAlg::Twofish256,
    ];

    /// QEMU's name (`aes-256`, `cast5-128`).
    pub fn name(self) -> &'static str {
        match self {
            CipherAlg::Aes128 => "aes-128",
            CipherAlg::Aes192 => "aes-192",
            CipherAlg::Aes256 => "aes-256",
            CipherAlg::Cast5 => "cast5-128",
            CipherAlg::Serpent128 => "serpent-128",
            CipherAlg::Serpent192 => "serpent-192",
            CipherAlg::Serpent256 => "serpent-256",
            CipherAlg::Twofish128 => "twofish-128",
            CipherAlg::Twofish192 => "twofish-192",
            CipherAlg::Twofish256 => "twofish-256",
        }
    }

    /// Parses QEMU's name.
    pub fn from_name(name: &str) -> Option<CipherAlg> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }

    /// The block cipher's name in the LUKS header's `cipher_name`, which
    /// leaves the key size to `key_bytes`.
    pub fn luks_name(self) -> &'static str {
        match self {
            CipherAlg::Aes128 | CipherAlg::Aes192 | CipherAlg::Aes256 => "aes",
            CipherAlg::Cast5 => "cast5",
            CipherAlg::Serpent128 | CipherAlg::Serpent192 | CipherAlg::Serpent256 => "serpent",
            CipherAlg::Twofish128 | CipherAlg::Twofish192 | CipherAlg::Twofish256 => "twofish",
        }
    }

    /// The algorithm a LUKS header names with `cipher_name` and a key of
    /// `key_len` bytes (for XTS, half of `key_bytes`).
    pub fn from_luks(cipher_name: &str, key_len: u32) -> Option<CipherAlg> {
        Self::ALL.into_iter().find(|a| a.luks_name() == cipher_name && a.key_len() as u32 == key_len)
    }

    /// Key length in bytes of the block cipher alone.
    pub fn key_len(self) -> usize {
        match self {
            CipherAlg::Aes128 | CipherAlg::Cast5 | CipherAlg::Serpent128 | CipherAlg::Twofish128 => 16,
            CipherAlg::Aes192 | CipherAlg::Serpent192 | CipherAlg::Twofish192 => 24,
            CipherAlg::Aes256 | CipherAlg::Serpent256 | CipherAlg::Twofish256 => 32,
        }
    }

    /// Block length in bytes.
    pub fn block_len(self) -> usize {
        match self {
            CipherAlg::Cast5 => 8,
            _ => 16,
        }
    }
}

/// A block cipher mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CipherMode {
    /// ECB: each block alone; no IV, so the IV generator goes unused.
    Ecb,
    /// CBC.
    Cbc,
    /// XTS (the key is two cipher keys; 16-byte blocks only).
    Xts,
    /// CTR: the IV is the initial big-endian counter block of each sector.
    Ctr,
}

impl CipherMode {
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            CipherMode::Ecb => "ecb",
            CipherMode::Cbc => "cbc",
            CipherMode::Xts => "xts",
            CipherMode::Ctr => "ctr",
        }
    }

    /// Parses QEMU's name.
    pub fn from_name(name: &str) -> Option<CipherMode> {
        Some(match name {
            "ecb" => CipherMode::Ecb,
            "cbc" => CipherMode::Cbc,
            "xts" => CipherMode::Xts,
            "ctr" => CipherMode::Ctr,
            _ => return None,
        })
    }

    /// Master key length for `alg` in this mode (XTS takes two keys).
    pub fn key_bytes(self, alg: CipherAlg) -> u32 {
        alg.key_len() as u32 * if self == CipherMode::Xts { 2 } else { 1 }
    }
}

/// Whether QEMU can run `alg` in `mode`: XTS needs 16-byte blocks, which
/// CAST5 lacks (QEMU's cipher back ends refuse it when the cipher is made,
/// so creating or unlocking such an image fails, while `info` still shows
/// its header).
pub fn check_mode(alg: CipherAlg, mode: CipherMode) -> Result<(), String> {
    if mode == CipherMode::Xts && alg.block_len() != 16 {
        return Err(format!("Unsupported cipher mode {}", mode.name()));
    }
    Ok(())
}

/// An IV generator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IvGenAlg {
    /// The sector number, truncated to 32 bits, little endian.
    Plain,
    /// The sector number, 64 bits little endian.
    Plain64,
    /// The 64-bit sector number encrypted with a key hashed from the master key.
    Essiv,
}

impl IvGenAlg {
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            IvGenAlg::Plain => "plain",
            IvGenAlg::Plain64 => "plain64",
            IvGenAlg::Essiv => "essiv",
        }
    }

    /// Parses QEMU's name.
    pub fn from_name(name: &str) -> Option<IvGenAlg> {
        Some(match name {
            "plain" => IvGenAlg::Plain,
            "plain64" => IvGenAlg::Plain64,
            "essiv" => IvGenAlg::Essiv,
            _ => return None,
        })
    }
}

/// A hash algorithm (for PBKDF2, the anti-forensic diffuser and ESSIV).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashAlg {
    /// SHA-1.
    Sha1,
    /// SHA-224.
    Sha224,
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl HashAlg {
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            HashAlg::Sha1 => "sha1",
            HashAlg::Sha224 => "sha224",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha384 => "sha384",
            HashAlg::Sha512 => "sha512",
        }
    }

    /// Parses QEMU's name.
    pub fn from_name(name: &str) -> Option<HashAlg> {
        Some(match name {
            "sha1" => HashAlg::Sha1,
            "sha224" => HashAlg::Sha224,
            "sha256" => HashAlg::Sha256,
            "sha384" => HashAlg::Sha384,
            "sha512" => HashAlg::Sha512,
            _ => return None,
        })
    }

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            HashAlg::Sha1 => 20,
            HashAlg::Sha224 => 28,
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    /// The cost of one HMAC with this hash, in SHA-256 HMACs. SHA-384 and
    /// SHA-512 ran at under a quarter of SHA-256's rate on CPUs with SHA
    /// extensions (nettle: 1.96 against 8.7 million a second; RustCrypto:
    /// 2.4 against 10.8); without them SHA-512 is the faster one, and the
    /// bound only errs towards less time.
    pub fn hmac_cost(self) -> u64 {
        match self {
            HashAlg::Sha1 | HashAlg::Sha224 | HashAlg::Sha256 => 1,
            HashAlg::Sha384 | HashAlg::Sha512 => 4,
        }
    }
}

/// The work of PBKDF2 with `hash`, `iterations` and an output of `out_len`
/// bytes, in SHA-256 HMACs: every iteration runs one HMAC per output block
/// of the digest's length (a 64-byte key from SHA-1 takes four).
pub fn pbkdf2_work(hash: HashAlg, iterations: u32, out_len: usize) -> u64 {
    u64::from(iterations) * out_len.div_ceil(hash.digest_len()) as u64 * hash.hmac_cost()
}

/// The cipher ESSIV encrypts sector numbers with: dm-crypt keys it with the
/// whole digest of the master key, so the key size follows the digest
/// length, not the data cipher; QEMU picks that size in the data cipher's
/// family and refuses families (CAST5) or sizes it lacks
/// (`qcrypto_block_luks_essiv_cipher`).
pub fn essiv_cipher(cipher: CipherAlg, hash: HashAlg) -> Result<CipherAlg, String> {
    let len = hash.digest_len();
    if len == cipher.key_len() {
        return Ok(cipher);
    }
    let family = match cipher.luks_name() {
        "aes" => "AES",
        "serpent" => "Serpent",
        "twofish" => "Twofish",
        _ => return Err(format!("Cipher {} not supported with essiv", cipher.name())),
    };
    CipherAlg::from_luks(cipher.luks_name(), len as u32)
        .ok_or_else(|| format!("No {family} cipher with key size {len} available"))
}

/// One key slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeySlot {
    /// Whether the slot holds a key.
    pub active: bool,
    /// PBKDF2 iterations of the passphrase.
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: [u8; SALT_LEN],
    /// Where the slot's key material starts, in 512-byte sectors from the
    /// start of the LUKS header.
    pub key_offset_sector: u32,
    /// Anti-forensic stripes.
    pub stripes: u32,
}

/// A parsed and validated LUKS1 header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LuksHeader {
    /// Cipher and key size.
    pub cipher_alg: CipherAlg,
    /// Cipher mode.
    pub cipher_mode: CipherMode,
    /// IV generator.
    pub ivgen_alg: IvGenAlg,
    /// The hash named after `:` in the mode string (used by ESSIV only).
    pub ivgen_hash_alg: Option<HashAlg>,
    /// Hash of PBKDF2 and the anti-forensic diffuser.
    pub hash_alg: HashAlg,
    /// Where the encrypted payload would start, in sectors (qcow2 keeps its
    /// payload in its own clusters; this marks the end of the key material).
    pub payload_offset_sector: u32,
    /// Master key length in bytes (twice the cipher key for XTS).
    pub key_bytes: u32,
    /// PBKDF2 digest of the master key.
    pub master_key_digest: [u8; DIGEST_LEN],
    /// Salt of that digest.
    pub master_key_salt: [u8; SALT_LEN],
    /// Iterations of that digest.
    pub master_key_iterations: u32,
    /// The UUID as stored (ASCII, NUL padded).
    pub uuid: [u8; UUID_LEN],
    /// The key slots.
    pub slots: [KeySlot; NUM_KEY_SLOTS],
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn c_field<'a>(b: &'a [u8], what: &str) -> Result<&'a str, FormatError> {
    let end =
        b.iter().position(|&c| c == 0).ok_or_else(|| luks(format!("LUKS header {what} is not NUL terminated")))?;
    std::str::from_utf8(&b[..end]).map_err(|_| luks(format!("LUKS header {what} is not valid UTF-8")))
}

fn luks(msg: String) -> FormatError {
    FormatError::Luks(msg)
}

impl LuksHeader {
    /// Bytes of one slot's anti-forensic key material.
    pub fn split_key_len(&self) -> usize {
        self.key_bytes as usize * STRIPES as usize
    }

    /// Sectors one slot's key material area spans (rounded up to 4 KiB, as
    /// cryptsetup lays slots out).
    pub fn split_key_sectors(key_bytes: u32, stripes: u32) -> u64 {
        let sectors = (u64::from(key_bytes) * u64::from(stripes)).div_ceil(SECTOR_SIZE);
        sectors.div_ceil(KEY_SLOT_OFFSET / SECTOR_SIZE) * (KEY_SLOT_OFFSET / SECTOR_SIZE)
    }

    /// The PBKDF2 work of trying `slot` ([`pbkdf2_work`]): the slot key
    /// from the passphrase, then the digest of the candidate master key.
    pub fn slot_work(&self, slot: &KeySlot) -> u64 {
        pbkdf2_work(self.hash_alg, slot.iterations, self.key_bytes as usize)
            + pbkdf2_work(self.hash_alg, self.master_key_iterations, DIGEST_LEN)
    }

    /// The PBKDF2 work of an unlock attempt that tries every active slot
    /// (a wrong passphrase), or an error naming the slot at which it
    /// passes `limit` (in SHA-256 HMACs; [`MAX_UNLOCK_WORK`] unless the
    /// caller chose another). The engine asks before any PBKDF2 runs.
    pub fn check_unlock_work(&self, limit: u64) -> Result<u64, FormatError> {
        let mut total = 0;
        for (i, slot) in self.slots.iter().enumerate().filter(|(_, s)| s.active) {
            total += self.slot_work(slot);
            if total > limit {
                return Err(luks(format!(
                    "Keyslot {i} iteration count {} (master key iteration count {}, hash {}) brings the PBKDF2 \
                     work of an unlock to {total} SHA-256 HMACs, over oxqcow's limit of {limit}",
                    slot.iterations,
                    self.master_key_iterations,
                    self.hash_alg.name()
                )));
            }
        }
        Ok(total)
    }

    /// The payload offset in bytes (QEMU's `payload-offset`).
    pub fn payload_offset(&self) -> u64 {
        u64::from(self.payload_offset_sector) * SECTOR_SIZE
    }

    /// The UUID as text.
    pub fn uuid_str(&self) -> String {
        let end = self.uuid.iter().position(|&c| c == 0).unwrap_or(UUID_LEN);
        String::from_utf8_lossy(&self.uuid[..end]).into_owned()
    }

    /// The mode string as stored (`xts-plain64`, `cbc-essiv:sha256`).
    pub fn cipher_mode_spec(&self) -> String {
        match self.ivgen_hash_alg {
            Some(h) => format!("{}-{}:{}", self.cipher_mode.name(), self.ivgen_alg.name(), h.name()),
            None => format!("{}-{}", self.cipher_mode.name(), self.ivgen_alg.name()),
        }
    }

    /// The cipher ESSIV uses, when the IV generator is ESSIV.
    pub fn essiv_cipher(&self) -> Option<CipherAlg> {
        match (self.ivgen_alg, self.ivgen_hash_alg) {
            (IvGenAlg::Essiv, Some(h)) => essiv_cipher(self.cipher_alg, h).ok(),
            _ => None,
        }
    }

    /// Parses and validates the header at the start of `bytes`. `area_len`
    /// is the length the qcow2 extension reserves: every slot's key material
    /// must lie inside it. The checks follow QEMU's order and messages
    /// (`qcrypto_block_luks_check_header` and `..._parse_header`), with
    /// oxqcow's bounds after them.
    pub fn parse(bytes: &[u8], area_len: u64) -> Result<LuksHeader, FormatError> {
        if bytes.len() < HEADER_SIZE {
            return Err(FormatError::Truncated {
                what: "LUKS header",
                needed: HEADER_SIZE as u64,
                available: bytes.len() as u64,
            });
        }
        let b = &bytes[..HEADER_SIZE];
        if b[..6] != MAGIC {
            return Err(luks("Volume is not in LUKS format".into()));
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 1 {
            return Err(luks(format!("LUKS version {version} is not supported")));
        }
        let cipher_name = c_field(&b[8..40], "cipher name")?;
        let cipher_mode_str = c_field(&b[40..72], "cipher mode")?;
        let hash_spec = c_field(&b[72..104], "hash spec")?;
        let payload_offset_sector = be32(b, 104);
        let key_bytes = be32(b, 108);
        let mut master_key_digest = [0u8; DIGEST_LEN];
        master_key_digest.copy_from_slice(&b[112..132]);
        let mut master_key_salt = [0u8; SALT_LEN];
        master_key_salt.copy_from_slice(&b[132..164]);
        let master_key_iterations = be32(b, 164);
        let mut uuid = [0u8; UUID_LEN];
        uuid.copy_from_slice(&b[168..208]);
        let mut slots =
            [KeySlot { active: false, iterations: 0, salt: [0; SALT_LEN], key_offset_sector: 0, stripes: 0 };
                NUM_KEY_SLOTS];
        let mut states = [0u32; NUM_KEY_SLOTS];
        for (i, slot) in slots.iter_mut().enumerate() {
            let s = &b[208 + i * 48..208 + (i + 1) * 48];
            states[i] = be32(s, 0);
            slot.active = states[i] == KEY_SLOT_ENABLED;
            slot.iterations = be32(s, 4);
            slot.salt.copy_from_slice(&s[8..40]);
            slot.key_offset_sector = be32(s, 40);
            slot.stripes = be32(s, 44);
        }

        let header_sectors = KEY_SLOT_OFFSET.div_ceil(SECTOR_SIZE);
        if u64::from(payload_offset_sector) < header_sectors {
            return Err(luks("LUKS payload is overlapping with the header".into()));
        }
        if master_key_iterations == 0 {
            return Err(luks("LUKS key iteration count is zero".into()));
        }
        for (i, slot) in slots.iter().enumerate() {
            if slot.stripes != STRIPES {
                return Err(luks(format!("Keyslot {i} is corrupted (stripes {} != {STRIPES})", slot.stripes)));
            }
            if states[i] != KEY_SLOT_ENABLED && states[i] != KEY_SLOT_DISABLED {
                return Err(luks(format!("Keyslot {i} state (active/disable) is corrupted")));
            }
            if slot.active && slot.iterations == 0 {
                return Err(luks(format!("Keyslot {i} iteration count is zero")));
            }
            if u64::from(slot.key_offset_sector) < header_sectors {
                return Err(luks(format!("Keyslot {i} is overlapping with the LUKS header")));
            }
        }

        // The algorithms, as QEMU parses them: "<mode>-<ivgen>[:<ivhash>]".
        let Some((mode_name, ivgen_spec)) = cipher_mode_str.split_once('-') else {
            return Err(luks(format!("Unexpected cipher mode string format '{cipher_mode_str}'")));
        };
        let (ivgen_name, ivhash_name) = match ivgen_spec.split_once(':') {
            Some((g, h)) => (g, Some(h)),
            None => (ivgen_spec, None),
        };
        let ivgen_hash_alg = match ivhash_name {
            Some(h) => Some(HashAlg::from_name(h).ok_or_else(|| luks(format!("Hash algorithm '{h}' not supported")))?),
            None => None,
        };
        let cipher_mode =
            CipherMode::from_name(mode_name).ok_or_else(|| luks(format!("Cipher mode '{mode_name}' not supported")))?;
        let alg_key = if cipher_mode == CipherMode::Xts { key_bytes / 2 } else { key_bytes };
        let cipher_alg = CipherAlg::from_luks(cipher_name, alg_key)
            .filter(|_| cipher_mode != CipherMode::Xts || key_bytes % 2 == 0)
            .ok_or_else(|| luks(format!("Algorithm '{cipher_name}' with key size {alg_key} bytes not supported")))?;
        let hash_alg =
            HashAlg::from_name(hash_spec).ok_or_else(|| luks(format!("Hash algorithm '{hash_spec}' not supported")))?;
        let ivgen_alg = IvGenAlg::from_name(ivgen_name)
            .ok_or_else(|| luks(format!("IV generator '{ivgen_name}' not supported")))?;
        if ivgen_alg == IvGenAlg::Essiv {
            let Some(h) = ivgen_hash_alg else {
                return Err(luks("Missing IV generator hash specification".into()));
            };
            essiv_cipher(cipher_alg, h).map_err(luks)?;
        }

        // Now that key_bytes is known to be small, the slot areas can be
        // computed without overflow.
        let slot_sectors = Self::split_key_sectors(key_bytes, STRIPES);
        for (i, slot) in slots.iter().enumerate() {
            let start = u64::from(slot.key_offset_sector);
            if start + slot_sectors > u64::from(payload_offset_sector) {
                return Err(luks(format!("Keyslot {i} is overlapping with the encrypted payload")));
            }
            for (j, other) in slots.iter().enumerate().skip(i + 1) {
                let o = u64::from(other.key_offset_sector);
                if start < o + slot_sectors && o < start + slot_sectors {
                    return Err(luks(format!("Keyslots {i} and {j} are overlapping in the header")));
                }
            }
        }
        let payload = u64::from(payload_offset_sector) * SECTOR_SIZE;
        if payload > area_len {
            return Err(luks(format!(
                "LUKS payload offset {payload} lies past the end of the encryption header area ({area_len} bytes)"
            )));
        }
        Ok(LuksHeader {
            cipher_alg,
            cipher_mode,
            ivgen_alg,
            ivgen_hash_alg,
            hash_alg,
            payload_offset_sector,
            key_bytes,
            master_key_digest,
            master_key_salt,
            master_key_iterations,
            uuid,
            slots,
        })
    }

    /// The 592 header bytes.
    pub fn serialize(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[..6].copy_from_slice(&MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        let name = self.cipher_alg.luks_name();
        b[8..8 + name.len()].copy_from_slice(name.as_bytes());
        let mode = self.cipher_mode_spec();
        b[40..40 + mode.len()].copy_from_slice(mode.as_bytes());
        let hash = self.hash_alg.name();
        b[72..72 + hash.len()].copy_from_slice(hash.as_bytes());
        b[104..108].copy_from_slice(&self.payload_offset_sector.to_be_bytes());
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.master_key_digest);
        b[132..164].copy_from_slice(&self.master_key_salt);
        b[164..168].copy_from_slice(&self.master_key_iterations.to_be_bytes());
        b[168..208].copy_from_slice(&self.uuid);
        for (i, slot) in self.slots.iter().enumerate() {
            let s = &mut b[208 + i * 48..208 + (i + 1) * 48];
            let state = if slot.active { KEY_SLOT_ENABLED } else { KEY_SLOT_DISABLED };
            s[0..4].copy_from_slice(&state.to_be_bytes());
            s[4..8].copy_from_slice(&slot.iterations.to_be_bytes());
            s[8..40].copy_from_slice(&slot.salt);
            s[40..44].copy_from_slice(&slot.key_offset_sector.to_be_bytes());
            s[44..48].copy_from_slice(&slot.stripes.to_be_bytes());
        }
        b
    }

    /// A header laid out as cryptsetup and QEMU lay it out: slots one after
    /// another from 4 KiB, each area rounded up to 4 KiB, the payload after
    /// the last. Slots start inactive; digests and salts are the caller's.
    pub fn layout(
        cipher_alg: CipherAlg,
        cipher_mode: CipherMode,
        ivgen_alg: IvGenAlg,
        ivgen_hash_alg: Option<HashAlg>,
        hash_alg: HashAlg,
        uuid: &str,
    ) -> LuksHeader {
        let key_bytes = cipher_mode.key_bytes(cipher_alg);
        let slot_sectors = Self::split_key_sectors(key_bytes, STRIPES) as u32;
        let first = (KEY_SLOT_OFFSET / SECTOR_SIZE) as u32;
        let mut slots =
            [KeySlot { active: false, iterations: 0, salt: [0; SALT_LEN], key_offset_sector: 0, stripes: STRIPES };
                NUM_KEY_SLOTS];
        for (i, s) in slots.iter_mut().enumerate() {
            s.key_offset_sector = first + slot_sectors * i as u32;
        }
        let mut uuid_bytes = [0u8; UUID_LEN];
        let n = uuid.len().min(UUID_LEN - 1);
        uuid_bytes[..n].copy_from_slice(&uuid.as_bytes()[..n]);
        LuksHeader {
            cipher_alg,
            cipher_mode,
            ivgen_alg,
            ivgen_hash_alg,
            hash_alg,
            payload_offset_sector: first + slot_sectors * NUM_KEY_SLOTS as u32,
            key_bytes,
            master_key_digest: [0; DIGEST_LEN],
            master_key_salt: [0; SALT_LEN],
            master_key_iterations: 0,
            uuid: uuid_bytes,
            slots,
        }
    }
}

#[cfg(test)]
mod tests;
