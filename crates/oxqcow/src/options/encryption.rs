//! How an image is encrypted: the format and passphrase of a new image,
//! the parameters of a new LUKS header, and key slot changes.

use oxqcow_format::luks::{CipherAlg, CipherMode, HashAlg, IvGenAlg};

/// How a new image is encrypted.
#[derive(Clone, Debug)]
pub enum EncryptionFormat {
    /// Legacy qcow AES-CBC (`encrypt.format=aes`, crypt_method 1).
    Aes,
    /// LUKS1 in the image (`encrypt.format=luks`, crypt_method 2).
    Luks(LuksParams),
}

/// Encryption of a new image: the format and the passphrase.
#[derive(Clone)]
pub struct Encryption {
    /// The format and its parameters.
    pub format: EncryptionFormat,
    /// The passphrase bytes.
    pub passphrase: Vec<u8>,
}

impl std::fmt::Debug for Encryption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The passphrase stays out of debug output.
        f.debug_struct("Encryption").field("format", &self.format).finish_non_exhaustive()
    }
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
