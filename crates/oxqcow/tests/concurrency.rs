//! Requests that share a cluster without overlapping must not undo each
//! other when they run at once.

use std::sync::{Arc, Barrier};

use oxqcow::{BlockDevice, Compat, CreateOptions, Encryption, EncryptionFormat, Image, ImageFormat, MemoryStorage};

const CLUSTER: u64 = 64 << 10;

/// Regression: a zero write over part of a cluster decided from a block
/// status taken before it locked anything that the whole cluster read as
/// zeros, then turned the whole cluster into a zero cluster. A write to the
/// other part of the cluster that landed in between was lost (found by
/// nbdcopy through `oxqcow serve`: data, then a hole starting inside the
/// same cluster).
#[test]
fn partial_zero_write_beside_a_concurrent_write_keeps_the_data() {
    for compat in [Compat::V3, Compat::V2] {
        for may_unmap in [false, true] {
            for round in 0..200u64 {
                let opts = CreateOptions::qcow2(16 * CLUSTER).compat(compat);
                let img = Arc::new(Image::create_storage(Arc::new(MemoryStorage::new()), &opts).unwrap());
                let cluster = (round % 16) * CLUSTER;
                let pattern = vec![0x5au8 ^ round as u8 | 1; 4096];
                let start = Arc::new(Barrier::new(2));
                let writer = {
                    let (img, start, pattern) = (Arc::clone(&img), Arc::clone(&start), pattern.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        img.write_at(&pattern, cluster).unwrap();
                    })
                };
                start.wait();
                img.write_zeroes_at(cluster + 4096, CLUSTER - 4096, may_unmap).unwrap();
                writer.join().unwrap();
                let mut back = vec![0u8; CLUSTER as usize];
                img.read_at(&mut back, cluster).unwrap();
                assert_eq!(&back[..4096], &pattern[..], "{compat:?} may_unmap={may_unmap} round {round}: data lost");
                assert!(back[4096..].iter().all(|&b| b == 0), "{compat:?} round {round}: zeros lost");
                let report = img.check(None).unwrap();
                assert_eq!(report.corruptions, 0, "{compat:?} round {round}: {report:?}");
            }
        }
    }
}

/// Threads that own interleaved 4 KiB stripes of every cluster write data
/// and zeros into their own stripes at random, all at once; every stripe
/// must end as its owner left it, and the image must check clean.
#[test]
fn interleaved_writers_and_zeroers_keep_each_others_data() {
    const THREADS: u64 = 4;
    const STRIPE: u64 = 4096;
    const DISK: u64 = 32 * CLUSTER;
    for compat in [Compat::V3, Compat::V2] {
        let opts = CreateOptions::qcow2(DISK).compat(compat);
        let img = Arc::new(Image::create_storage(Arc::new(MemoryStorage::new()), &opts).unwrap());
        let start = Arc::new(Barrier::new(THREADS as usize));
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let (img, start) = (Arc::clone(&img), Arc::clone(&start));
                std::thread::spawn(move || {
                    // The last byte each stripe of this thread holds (0 = zeros).
                    let mut model = vec![0u8; (DISK / STRIPE / THREADS) as usize];
                    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (t + 1);
                    start.wait();
                    for op in 0..400u64 {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        let slot = (rng % model.len() as u64) as usize;
                        let offset = (slot as u64 * THREADS + t) * STRIPE;
                        if rng % 3 == 0 {
                            img.write_zeroes_at(offset, STRIPE, op % 2 == 0).unwrap();
                            model[slot] = 0;
                        } else {
                            let byte = (rng >> 32) as u8 | 1;
                            img.write_at(&[byte; STRIPE as usize], offset).unwrap();
                            model[slot] = byte;
                        }
                    }
                    (t, model)
                })
            })
            .collect();
        for w in workers {
            let (t, model) = w.join().unwrap();
            for (slot, &byte) in model.iter().enumerate() {
                let offset = (slot as u64 * THREADS + t) * STRIPE;
                let mut back = vec![0u8; STRIPE as usize];
                img.read_at(&mut back, offset).unwrap();
                assert!(back.iter().all(|&b| b == byte), "{compat:?}: stripe at {offset} lost its {byte:#x}");
            }
        }
        let report = img.check(None).unwrap();
        assert_eq!(report.corruptions, 0, "{compat:?}: {report:?}");
    }
}

/// Threads that own interleaved 64-byte pieces of every 512-byte sector of
/// an encrypted image write them at once. Encryption works on whole
/// sectors, so each write reads, patches and rewrites its sector; the
/// rewrites must not carry a stale copy of the other threads' bytes. The
/// pieces start 32 bytes into a sector, so the last thread's span two
/// sectors; some pieces are zeroed.
#[test]
fn partial_sector_writers_on_an_encrypted_image_keep_each_others_bytes() {
    partial_sector_writers(ImageFormat::Qcow2);
}

/// The same on a luks image, whose partial-sector writes have their own
/// read-patch-write path.
#[test]
fn partial_sector_writers_on_a_luks_image_keep_each_others_bytes() {
    partial_sector_writers(ImageFormat::Luks);
}

fn partial_sector_writers(format: ImageFormat) {
    const THREADS: u64 = 8;
    const PIECE: u64 = 64;
    const SECTORS: u64 = 64;
    const DISK: u64 = 4 * CLUSTER;
    let luks = oxqcow::options::LuksParams { iter_time_ms: 10, ..Default::default() };
    let opts = CreateOptions {
        format,
        encryption: Some(Encryption { format: EncryptionFormat::Luks(luks), passphrase: b"secret".to_vec() }),
        ..CreateOptions::qcow2(DISK)
    };
    let img = Arc::new(Image::create_storage(Arc::new(MemoryStorage::new()), &opts).unwrap());
    // The sectors straddle a cluster boundary, so first writes also race
    // to allocate.
    let base = CLUSTER - SECTORS / 2 * 512;
    let start = Arc::new(Barrier::new(THREADS as usize));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (img, start) = (Arc::clone(&img), Arc::clone(&start));
            std::thread::spawn(move || {
                let mut model = vec![0u8; SECTORS as usize];
                let mut rng = 0x2545_f491_4f6c_dd1du64 ^ (t + 1);
                start.wait();
                for op in 0..20 * SECTORS {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let sector = rng % SECTORS;
                    let offset = base + 32 + sector * 512 + t * PIECE;
                    let byte = (rng >> 32) as u8 | 1;
                    if op % 7 == 0 {
                        img.write_zeroes_at(offset, PIECE, false).unwrap();
                        model[sector as usize] = 0;
                    } else {
                        img.write_at(&[byte; PIECE as usize], offset).unwrap();
                        model[sector as usize] = byte;
                    }
                }
                (t, model)
            })
        })
        .collect();
    for w in workers {
        let (t, model) = w.join().unwrap();
        for (sector, &byte) in model.iter().enumerate() {
            let offset = base + 32 + sector as u64 * 512 + t * PIECE;
            let mut back = vec![0u8; PIECE as usize];
            img.read_at(&mut back, offset).unwrap();
            assert!(back.iter().all(|&b| b == byte), "thread {t}'s bytes at {offset} lost their {byte:#x}: {back:?}");
        }
    }
    if format == ImageFormat::Qcow2 {
        let report = img.check(None).unwrap();
        assert!(report.corruptions == 0 && report.leaks == 0, "{report:?}");
    }
}
