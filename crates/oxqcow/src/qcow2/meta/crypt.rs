//! Encryption as the metadata sees it: setting up a new image's
//! encryption (the LUKS header area is allocated like any cluster).

use oxqcow_format::header::{crypt, CryptoExtension};

use super::Meta;
use crate::error::{Error, Result};
use crate::storage::Storage;

impl Meta {
    /// Makes a new (still empty) image encrypted: legacy AES only marks the
    /// header; LUKS allocates clusters for the header area, writes it there
    /// (the rest of its last cluster zeroed) and points the extension at it
    /// (QEMU's `qcow2_set_up_encryption` and `qcow2_crypto_hdr_init_func`).
    pub(crate) fn set_up_encryption(&mut self, st: &dyn Storage, enc: &crate::options::Encryption) -> Result<()> {
        match &enc.format {
            crate::options::EncryptionFormat::Aes => self.header.crypt_method = crypt::AES,
            crate::options::EncryptionFormat::Luks(params) => {
                let (mut area, _) = crate::crypt::create_luks(params, &enc.passphrase)?;
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
