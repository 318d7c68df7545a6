//! LUKS key handling: PBKDF2 and the anti-forensic split, unlocking a key
//! slot, calibrating iteration counts, creating a header area and amending
//! its key slots. The header itself is parsed and validated by the format
//! crate (`oxqcow_format::luks`).

use oxqcow_format::header::CryptoExtension;
use oxqcow_format::luks::{self, HashAlg, IvGenAlg, LuksHeader};

use super::cipher::{digest, SectorCrypt};
use super::{read_luks_header, Crypt, SECTOR};
use crate::error::{Error, Result};
use crate::options::{KeyslotChange, LuksParams};
use crate::storage::Storage;

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

/// Tries one slot: the master key when the passphrase opens it.
pub(super) fn try_slot(
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
    let crypt = Crypt { sectors: Some(SectorCrypt::for_luks(&h, &master)?), host_offsets: true, master_key: master };
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
        .check_unlock_work(luks::MAX_UNLOCK_WORK)
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

/// Adds or erases LUKS key slots of the header area `ext` points at, with
/// qemu-img amend's rules and messages (QEMU's
/// `qcrypto_block_luks_amend_options`). Key material is written before the
/// header that activates it; an erased slot is deactivated in the header
/// before its material is overwritten with random bytes.
pub(crate) fn amend_keyslots(
    st: &dyn Storage,
    ext: CryptoExtension,
    master_key: &[u8],
    change: &KeyslotChange,
) -> Result<()> {
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
            set_slot(&mut h, &mut area, index, master_key, new_secret, *iter_time_ms)?;
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
            h.check_unlock_work(luks::MAX_UNLOCK_WORK)?;
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use oxqcow_format::luks::{CipherAlg, CipherMode};

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
        let (opened, slot) = Crypt::unlock_luks(&h, b"secret", &read, luks::MAX_UNLOCK_WORK).unwrap();
        assert_eq!(slot, 0);
        let mut a = vec![7u8; 1024];
        crypt.encrypt(&mut a, 4096).unwrap();
        assert_ne!(a, vec![7u8; 1024]);
        opened.decrypt(&mut a, 4096).unwrap();
        assert_eq!(a, vec![7u8; 1024]);
        let e = Crypt::unlock_luks(&h, b"wrong", &read, luks::MAX_UNLOCK_WORK).unwrap_err();
        assert_eq!(e.to_string(), "Invalid password, cannot unlock any keyslot");
    }
}
