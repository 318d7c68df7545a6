//! The luks and qcow (version 1) formats in the engine: a luks image keeps
//! what was written through unaligned requests across a reopen, never
//! stores plaintext and refuses the wrong passphrase or option; a qcow
//! image with hostile tables gives errors, never panics, and is never
//! written.

use std::sync::Arc;

use oxqcow::format::qcow::{QcowHeader, COMPRESSED};
use oxqcow::options::LuksParams;
use oxqcow::{
    BlockDevice, CreateOptions, Encryption, EncryptionFormat, Image, ImageFormat, MemoryStorage, OpenOptions, Storage,
};

fn luks_options(size: u64) -> CreateOptions {
    let params = LuksParams { iter_time_ms: 10, ..Default::default() };
    CreateOptions {
        format: ImageFormat::Luks,
        size,
        size_given: true,
        encryption: Some(Encryption { format: EncryptionFormat::Luks(params), passphrase: b"secret".to_vec() }),
        ..Default::default()
    }
}

fn open_luks(storage: &Arc<MemoryStorage>, key: Option<&[u8]>, passphrase: Option<&[u8]>) -> oxqcow::Result<Image> {
    let opts = OpenOptions {
        format: Some(ImageFormat::Luks),
        key_secret: key.map(<[u8]>::to_vec),
        passphrase: passphrase.map(<[u8]>::to_vec),
        ..Default::default()
    };
    Image::open_storage(storage.clone() as Arc<dyn Storage>, &opts)
}

#[test]
fn luks_keeps_unaligned_writes_across_a_reopen() {
    const SIZE: u64 = 1 << 20;
    let storage = Arc::new(MemoryStorage::new());
    let img = Image::create_storage(storage.clone() as Arc<dyn Storage>, &luks_options(SIZE)).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    img.write_zeroes_at(0, SIZE, true).unwrap();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..300 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let len = 1 + rng % 3000;
        let offset = (rng >> 20) % (SIZE - len);
        let byte = (rng >> 40) as u8 | 1;
        img.write_at(&vec![byte; len as usize], offset).unwrap();
        model[offset as usize..(offset + len) as usize].fill(byte);
    }
    img.close().unwrap();
    // The plaintext of the model never reaches the file.
    let bytes = storage.to_bytes();
    assert!(!bytes.windows(64).any(|w| w.iter().all(|&b| b == w[0] && b != 0)), "plaintext runs in the file");
    let img = open_luks(&storage, Some(b"secret"), None).unwrap();
    assert_eq!(img.len(), SIZE);
    let mut back = vec![0u8; SIZE as usize];
    // Read back in odd pieces too.
    for (i, chunk) in back.chunks_mut(777).enumerate() {
        img.read_at(chunk, i as u64 * 777).unwrap();
    }
    assert!(back == model, "the data read back differs from what was written");
}

#[test]
fn luks_refuses_wrong_secrets_and_foreign_options() {
    let storage = Arc::new(MemoryStorage::new());
    Image::create_storage(storage.clone() as Arc<dyn Storage>, &luks_options(65536)).unwrap().close().unwrap();
    let msg = |r: oxqcow::Result<Image>| r.err().expect("refused").to_string();
    assert_eq!(msg(open_luks(&storage, None, None)), "Parameter 'key-secret' is required for cipher");
    assert_eq!(msg(open_luks(&storage, Some(b"wrong"), None)), "Invalid password, cannot unlock any keyslot");
    assert_eq!(
        msg(open_luks(&storage, Some(b"secret"), Some(b"secret"))),
        "Block format 'luks' does not support the option 'encrypt.key-secret'"
    );
    // Truncated inside the header area: no payload, refused, no panic.
    let short = Arc::new(MemoryStorage::from_bytes(storage.to_bytes()[..4096].to_vec()));
    assert!(open_luks(&short, Some(b"secret"), None).is_err());
}

/// A qcow image of `size` bytes, 4 KiB clusters and 512-entry L2 tables,
/// its L1 table at 48 with `l1`, then whatever `tail` holds at 4096.
fn qcow_image(size: u64, l1: &[u64], tail: &[(u64, Vec<u8>)]) -> Arc<MemoryStorage> {
    let header = QcowHeader {
        backing_file_offset: 0,
        backing_file_size: 0,
        mtime: 0,
        size,
        cluster_bits: 12,
        l2_bits: 9,
        crypt_method: 0,
        l1_table_offset: 48,
        l1_entries: 0,
    };
    let mut bytes = header.serialize().to_vec();
    for e in l1 {
        bytes.extend_from_slice(&e.to_be_bytes());
    }
    for (at, data) in tail {
        let end = *at as usize + data.len();
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[*at as usize..end].copy_from_slice(data);
    }
    Arc::new(MemoryStorage::from_bytes(bytes))
}

fn l2(entries: &[(usize, u64)]) -> Vec<u8> {
    let mut t = vec![0u8; 512 * 8];
    for &(i, e) in entries {
        t[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
    }
    t
}

/// Sector aligned, below `i64::MAX`, but no cluster or table fits there.
const FAR: u64 = 0x7fff_ffff_ffff_fe00;

fn open_qcow(storage: &Arc<MemoryStorage>, read_only: bool) -> oxqcow::Result<Image> {
    let opts = OpenOptions { format: Some(ImageFormat::Qcow), read_only, ..Default::default() };
    Image::open_storage(storage.clone() as Arc<dyn Storage>, &opts)
}

#[test]
fn block_status_of_a_huge_sparse_qcow_image() {
    // 4 TiB of 4 KiB clusters, only the first L2 table allocated (after
    // the 16 MiB L1 table). Block status takes an unallocated L1 entry's
    // span as one run; it once walked the billion clusters one by one
    // (10 s here; qemu-img map takes 5 minutes on such an image).
    let size = 4u64 << 40;
    let (table, data) = (17u64 << 20, (17u64 << 20) + 4096);
    let storage = qcow_image(size, &[table], &[(table, l2(&[(1, data)])), (data, vec![0xab; 4096])]);
    let img = open_qcow(&storage, true).unwrap();
    let runs: Vec<_> = img.block_status(0, size).unwrap().iter().map(|e| (e.offset, e.length, e.data)).collect();
    assert_eq!(runs, [(0, 4096, false), (4096, 4096, true), (8192, size - 8192, false)]);
    // Inside an L2 table and across the end of its span.
    let runs: Vec<_> = img.block_status(4000, 3 << 20).unwrap().iter().map(|e| (e.offset, e.length, e.data)).collect();
    assert_eq!(runs, [(4000, 96, false), (4096, 4096, true), (8192, (3 << 20) + 4000 - 8192, false)]);
}

#[test]
fn hostile_qcow_tables_give_errors() {
    // An L1 table that ends past the end of the file reads as zeros there,
    // as QEMU's file layer reads it, and a huge disk costs no memory.
    let img = open_qcow(&qcow_image(1 << 40, &[], &[]), true).unwrap();
    let mut buf = vec![1u8; 4096];
    img.read_at(&mut buf, (1 << 40) - 4096).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    // One good cluster, one unaligned, one past every file offset, one
    // compressed cluster of garbage, one L2 table past every file offset
    // (offsets merely past the end of the file read as zeros, as in QEMU).
    let table = l2(&[(0, 8192), (1, 8193), (2, FAR), (3, COMPRESSED | (100 << (63 - 12)) | 12288)]);
    let storage =
        qcow_image(4 << 20, &[4096, FAR], &[(4096, table), (8192, vec![0xab; 4096]), (12288, vec![0xff; 200])]);
    let img = open_qcow(&storage, false).unwrap();
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0xab));
    for at in [4096, 8192, 12288, 2 << 20] {
        let e = img.read_at(&mut buf, at).expect_err(&format!("the hostile entry for {at} is refused"));
        assert!(!e.to_string().is_empty());
    }
    // Never written, whatever was asked.
    let before = storage.to_bytes();
    assert!(img.write_at(&buf, 0).is_err());
    assert!(img.write_zeroes_at(0, 4096, true).is_err());
    assert!(img.discard(0, 4096).is_err());
    assert_eq!(storage.to_bytes(), before);
    // Header fields QEMU refuses, with its messages.
    let msg = |s: &Arc<MemoryStorage>| open_qcow(s, true).err().expect("refused").to_string();
    assert_eq!(msg(&qcow_image(1, &[], &[])), "Image size is too small (must be at least 2 bytes)");
    assert_eq!(msg(&qcow_image(1 << 62, &[], &[])), "Image too large");
}

/// `max_unlock_work` bounds the PBKDF2 an open may run, for luks and for
/// LUKS-encrypted qcow2 alike: under the image's cost the open is refused
/// before any PBKDF2 (naming the slot, its counts and the bound); at it,
/// the image opens.
#[test]
fn unlock_work_bound_is_the_openers_choice() {
    let luks = Arc::new(MemoryStorage::new());
    Image::create_storage(luks.clone() as Arc<dyn Storage>, &luks_options(65536)).unwrap().close().unwrap();
    let qcow2 = Arc::new(MemoryStorage::new());
    let encryption = luks_options(0).encryption;
    let opts = CreateOptions { encryption, ..CreateOptions::qcow2(65536) };
    Image::create_storage(qcow2.clone() as Arc<dyn Storage>, &opts).unwrap().close().unwrap();
    for (storage, format) in [(luks, ImageFormat::Luks), (qcow2, ImageFormat::Qcow2)] {
        let header = match format {
            ImageFormat::Luks => oxqcow::Luks::inspect(&*storage).unwrap(),
            _ => oxqcow::Qcow2::inspect(&*storage).unwrap().0.luks.unwrap(),
        };
        let cost = header.check_unlock_work(u64::MAX).unwrap();
        let slot = header.slots[0];
        let open = |max: Option<u64>| {
            let mut opts = OpenOptions { format: Some(format), max_unlock_work: max, ..Default::default() };
            match format {
                ImageFormat::Luks => opts.key_secret = Some(b"secret".to_vec()),
                _ => opts.passphrase = Some(b"secret".to_vec()),
            }
            Image::open_storage(storage.clone() as Arc<dyn Storage>, &opts)
        };
        assert_eq!(
            open(Some(cost - 1)).err().expect("refused").to_string(),
            format!(
                "Keyslot 0 iteration count {} (master key iteration count {}, hash sha256) brings the PBKDF2 \
                 work of an unlock to {cost} SHA-256 HMACs, over oxqcow's limit of {}",
                slot.iterations,
                header.master_key_iterations,
                cost - 1
            ),
            "{format:?}"
        );
        assert_eq!(open(Some(cost)).expect("opens at its cost").len(), 65536);
        assert_eq!(open(None).expect("opens with the default bound").len(), 65536);
    }
}
