//! Unit tests of the LUKS header parser and its limits.

use super::*;

fn sample() -> LuksHeader {
    let mut h = LuksHeader::layout(
        CipherAlg::Aes256,
        CipherMode::Xts,
        IvGenAlg::Plain64,
        None,
        HashAlg::Sha256,
        "4a250ce8-2ad6-4bc1-998c-64fc3c19b913",
    );
    h.master_key_iterations = 1000;
    h.slots[0].active = true;
    h.slots[0].iterations = 1000;
    h
}

#[test]
fn layout_matches_qemu() {
    let h = sample();
    // Offsets qemu-img info printed for an aes-256-xts image.
    assert_eq!(h.slots[0].key_offset_sector as u64 * 512, 4096);
    assert_eq!(h.slots[1].key_offset_sector as u64 * 512, 262144);
    assert_eq!(h.slots[7].key_offset_sector as u64 * 512, 1810432);
    assert_eq!(h.payload_offset(), 2068480);
    assert_eq!(h.key_bytes, 64);
}

#[test]
fn round_trip() {
    let h = sample();
    let bytes = h.serialize();
    assert_eq!(LuksHeader::parse(&bytes, h.payload_offset()).unwrap(), h);
    assert_eq!(h.cipher_mode_spec(), "xts-plain64");
}

#[test]
fn every_cipher_and_mode_round_trips_with_qemus_names() {
    for alg in CipherAlg::ALL {
        assert_eq!(CipherAlg::from_name(alg.name()), Some(alg));
        for mode in [CipherMode::Ecb, CipherMode::Cbc, CipherMode::Xts, CipherMode::Ctr] {
            assert_eq!(CipherMode::from_name(mode.name()), Some(mode));
            let mut h = LuksHeader::layout(alg, mode, IvGenAlg::Plain64, None, HashAlg::Sha256, "u");
            h.master_key_iterations = 1000;
            let bytes = h.serialize();
            assert_eq!(&bytes[8..8 + alg.luks_name().len() + 1], format!("{}\0", alg.luks_name()).as_bytes());
            assert_eq!(LuksHeader::parse(&bytes, h.payload_offset()).unwrap(), h, "{alg:?} {mode:?}");
            assert_eq!(h.key_bytes as usize, alg.key_len() * if mode == CipherMode::Xts { 2 } else { 1 });
        }
    }
    let h = LuksHeader::layout(CipherAlg::Cast5, CipherMode::Ctr, IvGenAlg::Plain, None, HashAlg::Sha1, "u");
    assert_eq!(h.cipher_mode_spec(), "ctr-plain");
    assert_eq!(CipherAlg::from_name("serpent"), None);
    assert_eq!(CipherAlg::from_name("sm4"), None);
}

#[test]
fn essiv_picks_the_digest_sized_cipher_of_the_same_family() {
    use CipherAlg::*;
    let pick = |c, h| essiv_cipher(c, h);
    assert_eq!(pick(Aes128, HashAlg::Sha256), Ok(Aes256));
    assert_eq!(pick(Serpent128, HashAlg::Sha256), Ok(Serpent256));
    assert_eq!(pick(Twofish256, HashAlg::Sha224), Err("No Twofish cipher with key size 28 available".into()));
    assert_eq!(pick(Serpent256, HashAlg::Sha512), Err("No Serpent cipher with key size 64 available".into()));
    assert_eq!(pick(Aes192, HashAlg::Sha1), Err("No AES cipher with key size 20 available".into()));
    assert_eq!(pick(Cast5, HashAlg::Sha256), Err("Cipher cast5-128 not supported with essiv".into()));
    assert_eq!(check_mode(Cast5, CipherMode::Xts), Err("Unsupported cipher mode xts".into()));
    assert_eq!(check_mode(Cast5, CipherMode::Ctr), Ok(()));
    assert_eq!(check_mode(Twofish192, CipherMode::Xts), Ok(()));
}

/// The header QEMU's defaults make: SHA-256, AES-256-XTS.
fn with_slots(active: usize, iterations: u32, digest_iterations: u32) -> LuksHeader {
    let mut h = sample();
    h.master_key_iterations = digest_iterations;
    for (i, s) in h.slots.iter_mut().enumerate() {
        s.active = i < active;
        s.iterations = if s.active { iterations } else { 0 };
    }
    h
}

#[test]
fn pbkdf2_work_counts_output_blocks_and_hash_cost() {
    assert_eq!(pbkdf2_work(HashAlg::Sha256, 1000, 64), 2000);
    assert_eq!(pbkdf2_work(HashAlg::Sha256, 1000, DIGEST_LEN), 1000);
    assert_eq!(pbkdf2_work(HashAlg::Sha1, 1000, 64), 4000);
    assert_eq!(pbkdf2_work(HashAlg::Sha1, 1000, 32), 2000);
    assert_eq!(pbkdf2_work(HashAlg::Sha512, 1000, 64), 4000);
    assert_eq!(pbkdf2_work(HashAlg::Sha384, 1000, 16), 4000);
    assert_eq!(pbkdf2_work(HashAlg::Sha1, u32::MAX, 64), 4 * u64::from(u32::MAX));
}

/// Guards against issue 9, item 12: counts just under the old per-field
/// cap (100 million) in all eight slots made one unlock attempt run
/// PBKDF2 for minutes.
#[test]
fn unlock_work_is_bounded() {
    // All eight slots as the default iter-time filled them on a fast
    // machine, by qemu-img (8.6 million iterations, digest 2.1 million)
    // and by oxqcow (10.8 and 2.8 million).
    let qemu_default = with_slots(8, 8_623_156, 2_085_359);
    assert_eq!(qemu_default.check_unlock_work(MAX_UNLOCK_WORK), Ok(8 * (2 * 8_623_156 + 2_085_359)));
    let oxqcow_default = with_slots(8, 10_761_246, 2_772_250);
    assert_eq!(oxqcow_default.check_unlock_work(MAX_UNLOCK_WORK), Ok(8 * (2 * 10_761_246 + 2_772_250)));
    // Eight slots of 100 million SHA-512 iterations: refused at the
    // first slot, by the field, value and limit.
    let mut h = with_slots(8, 100_000_000, 1000);
    h.hash_alg = HashAlg::Sha512;
    assert_eq!(
        h.check_unlock_work(MAX_UNLOCK_WORK).unwrap_err().to_string(),
        "Keyslot 0 iteration count 100000000 (master key iteration count 1000, hash sha512) brings the PBKDF2 \
         work of an unlock to 400004000 SHA-256 HMACs, over oxqcow's limit of 250000000"
    );
    // The sum over slots: one slot of 70 million (two HMACs each) fits,
    // the second passes the bound and is the one named.
    let mut h = with_slots(2, 70_000_000, 1000);
    assert!(h
        .check_unlock_work(MAX_UNLOCK_WORK)
        .unwrap_err()
        .to_string()
        .starts_with("Keyslot 1 iteration count 70000000 "));
    h.slots[1].active = false;
    assert_eq!(h.check_unlock_work(MAX_UNLOCK_WORK), Ok(140_001_000));
    // The digest is paid once per slot tried.
    let h = with_slots(3, 1000, 83_332_000);
    assert!(h.check_unlock_work(MAX_UNLOCK_WORK).unwrap_err().to_string().starts_with(
        "Keyslot 2 iteration count 1000 (master key iteration count 83332000, hash sha256) brings the PBKDF2 \
         work of an unlock to 250002000 "
    ));
    assert_eq!(with_slots(2, 1000, 83_332_000).check_unlock_work(MAX_UNLOCK_WORK), Ok(2 * (2000 + 83_332_000)));
    assert_eq!(with_slots(0, 0, u32::MAX).check_unlock_work(MAX_UNLOCK_WORK), Ok(0));
    // Parsing accepts any count (QEMU's info shows such headers).
    let h = with_slots(8, u32::MAX, u32::MAX);
    assert_eq!(LuksHeader::parse(&h.serialize(), h.payload_offset()), Ok(h));
}

fn err(bytes: &[u8], area: u64) -> String {
    LuksHeader::parse(bytes, area).unwrap_err().to_string()
}

#[test]
fn hostile_fields_give_clean_errors() {
    let h = sample();
    let area = h.payload_offset();
    let good = h.serialize();
    let put = |at: usize, v: u32| {
        let mut b = good.clone();
        b[at..at + 4].copy_from_slice(&v.to_be_bytes());
        b
    };
    assert_eq!(err(&put(108, 1 << 30), area), "Algorithm 'aes' with key size 536870912 bytes not supported");
    assert_eq!(err(&put(108, 40), area), "Algorithm 'aes' with key size 20 bytes not supported");
    assert_eq!(err(&put(164, 0), area), "LUKS key iteration count is zero");
    assert_eq!(err(&put(208 + 44, 1 << 31), area), "Keyslot 0 is corrupted (stripes 2147483648 != 4000)");
    assert_eq!(err(&put(208 + 48 + 40, u32::MAX), area), "Keyslot 1 is overlapping with the encrypted payload");
    assert_eq!(err(&put(208 + 48 + 40, 8), area), "Keyslots 0 and 1 are overlapping in the header");
    assert_eq!(err(&put(208 + 40, 1), area), "Keyslot 0 is overlapping with the LUKS header");
    assert_eq!(err(&put(208, 7), area), "Keyslot 0 state (active/disable) is corrupted");
    assert_eq!(err(&put(104, 4), area), "LUKS payload is overlapping with the header");
    assert!(err(&good, area - 512).contains("past the end of the encryption header area"));
    assert_eq!(err(&good[..100], area), "LUKS header is truncated: need 592 bytes, have 100");
    let mut b = good.clone();
    b[0] = b'X';
    assert_eq!(err(&b, area), "Volume is not in LUKS format");
    let mut b = good.clone();
    b[40..72].fill(b'x');
    assert_eq!(err(&b, area), "LUKS header cipher mode is not NUL terminated");
    let mut b = good.clone();
    b[40..72].fill(0);
    b[40..51].copy_from_slice(b"xts-foo:bar");
    assert_eq!(err(&b, area), "Hash algorithm 'bar' not supported");
    let mut b = good.clone();
    b[8..40].fill(0);
    b[8..11].copy_from_slice(b"sm4");
    assert_eq!(err(&b, area), "Algorithm 'sm4' with key size 32 bytes not supported");
    let mut b = good.clone();
    b[40..72].fill(0);
    b[40..51].copy_from_slice(b"gcm-plain64");
    assert_eq!(err(&b, area), "Cipher mode 'gcm' not supported");
    let mut b = good.clone();
    b[40..72].fill(0);
    b[40..43].copy_from_slice(b"xts");
    assert_eq!(err(&b, area), "Unexpected cipher mode string format 'xts'");
    // CAST5 in XTS parses (QEMU's info shows it); only its cipher fails.
    let mut b = good.clone();
    b[8..40].fill(0);
    b[8..13].copy_from_slice(b"cast5");
    b[108..112].copy_from_slice(&32u32.to_be_bytes());
    assert_eq!(LuksHeader::parse(&b, area).unwrap().cipher_alg, CipherAlg::Cast5);
    let mut b = good.clone();
    b[8..40].fill(0);
    b[8..15].copy_from_slice(b"serpent");
    b[40..72].fill(0);
    b[40..56].copy_from_slice(b"xts-essiv:sha512");
    assert_eq!(err(&b, area), "No Serpent cipher with key size 64 available");
    let mut b = good;
    b[40..72].fill(0);
    b[40..49].copy_from_slice(b"cbc-essiv");
    b[108..112].copy_from_slice(&32u32.to_be_bytes());
    assert_eq!(err(&b, area), "Missing IV generator hash specification");
}

/// A caller may choose its own bound (a program opening images from
/// strangers, or a fuzzer): the same sum, refused at the slot that passes it.
#[test]
fn unlock_work_bound_is_the_callers() {
    let h = with_slots(3, 1000, 1000);
    assert_eq!(h.check_unlock_work(9000), Ok(9000));
    assert_eq!(
        h.check_unlock_work(8999).unwrap_err().to_string(),
        "Keyslot 2 iteration count 1000 (master key iteration count 1000, hash sha256) brings the PBKDF2 \
         work of an unlock to 9000 SHA-256 HMACs, over oxqcow's limit of 8999"
    );
    assert!(h.check_unlock_work(2999).unwrap_err().to_string().starts_with("Keyslot 0 "));
}
