//! Runs the body of the `open_read_check` fuzz target (fuzz/) in a normal
//! `cargo test`: over the seed corpus (valid images of several geometries
//! made by the library, which must probe clean), over seeded random byte
//! mutations of each seed (any error is fine, a panic is not), and over
//! every input the fuzzer ever crashed on (fuzz/regressions/). The same
//! for the write-path body of the `open_write_check` target, and for the
//! `open_any_check` target's body over its committed seeds (qcow v1 and
//! LUKS files made by qemu-img, fuzz/seeds/open_any_check/), and for the
//! `open_secret_check` target's over its encrypted images
//! (fuzz/seeds/open_secret_check/), and for the `open_repair_check`
//! target's (repair, then snapshot, resize, amend and bitmap operations)
//! over the library's seeds.
//!
//! FUZZ_MUTATIONS sets the number of mutations per seed (default 300).

use std::sync::Arc;

use oxqcow::{BlockDevice, Image, MemoryStorage, Storage};
use oxqcow_testkit::prng::Prng;
use oxqcow_testkit::probe::{
    mutate, open_any_check, open_read_check, open_repair_check, open_secret_check, open_write_check, secret_options,
    seed_images, RepairRun, Stage, Verdict,
};

#[test]
fn seed_images_probe_clean() {
    for (name, bytes) in seed_images() {
        let v = open_read_check(&bytes);
        assert!(v.is_clean(), "seed {name}: {}", v.describe());
        let Verdict::Checked { bytes_read, .. } = v else { unreachable!() };
        assert!(bytes_read > 0, "seed {name}: nothing was read");
    }
}

#[test]
fn mutated_seed_images_never_panic() {
    let per_seed: u64 = std::env::var("FUZZ_MUTATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let mut refused = 0;
    let mut total = 0;
    for (i, (name, bytes)) in seed_images().into_iter().enumerate() {
        let mut rng = Prng::new(0xf022 + i as u64);
        for n in 0..per_seed {
            let mut input = bytes.clone();
            mutate(&mut input, &mut rng);
            // A panic here fails the test; name the input so it can be
            // reproduced (fuzz/regressions/ keeps such inputs).
            let result = std::panic::catch_unwind(|| open_read_check(&input));
            match result {
                Ok(v) => {
                    total += 1;
                    if !v.is_clean() {
                        refused += 1;
                    }
                }
                Err(_) => {
                    let path = std::env::temp_dir().join(format!("oxqcow-fuzz-{name}-{n}.qcow2"));
                    std::fs::write(&path, &input).unwrap();
                    panic!("seed {name}, mutation {n} panicked; input saved to {}", path.display());
                }
            }
        }
    }
    // The mutations must actually damage images, or this test proves nothing.
    assert!(refused * 4 > total, "only {refused} of {total} mutated images were refused or had findings");
}

#[test]
fn mutated_seed_images_survive_writes() {
    let per_seed: u64 = std::env::var("FUZZ_MUTATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(300) / 3;
    for (i, (name, bytes)) in seed_images().into_iter().enumerate() {
        let v = open_write_check(&bytes).expect("a seed opens for writing");
        assert!(v.is_clean(), "seed {name} after writes: {}", v.describe());
        let mut rng = Prng::new(0x3717e + i as u64);
        for n in 0..per_seed {
            let mut input = bytes.clone();
            mutate(&mut input, &mut rng);
            if std::panic::catch_unwind(|| open_write_check(&input)).is_err() {
                let path = std::env::temp_dir().join(format!("oxqcow-fuzz-write-{name}-{n}.qcow2"));
                std::fs::write(&path, &input).unwrap();
                panic!("seed {name}, mutation {n} panicked in the write path; input saved to {}", path.display());
            }
        }
    }
}

#[test]
fn fuzz_regressions_never_panic() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions");
    let Ok(entries) = std::fs::read_dir(&dir) else { return };
    for e in entries {
        let path = e.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let v = open_read_check(&bytes);
        println!("{}: {}", path.display(), v.describe());
        open_write_check(&bytes);
    }
}

/// The committed seeds of a fuzz target, by name.
fn committed_seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds").join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading seeds in {}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    assert!(out.len() >= 5, "expected the committed seeds in {}", dir.display());
    out
}

fn any_format_seeds() -> Vec<(String, Vec<u8>)> {
    committed_seeds("open_any_check")
}

#[test]
fn any_format_seeds_open_as_qemu_opens_them() {
    for (name, bytes) in any_format_seeds() {
        let v = open_any_check(&bytes);
        match name.as_str() {
            // qcow v1 images read (their backing file ignored).
            "qcow" | "qcow-compressed" | "qcow-backing" => {
                let Verdict::Checked { bytes_read, .. } = v else { panic!("seed {name}: {}", v.describe()) };
                assert!(bytes_read > 0, "seed {name}: nothing was read");
            }
            // QEMU opens AES-encrypted qcow images only with their key.
            "qcow-aes" => assert!(matches!(v, Verdict::Refused { stage: Stage::Open, .. }), "{}", v.describe()),
            // The header parses; the file ends before the payload, which
            // QEMU's luks driver refuses in these words.
            "luks-header" => match v {
                Verdict::Refused { stage: Stage::Open, message } => {
                    assert!(message.contains("Could not refresh total sector count"), "{message}")
                }
                v => panic!("seed {name}: {}", v.describe()),
            },
            other => panic!("a seed this test does not know: {other}"),
        }
    }
    // The qcow2 seeds probe as qcow2, and clean.
    for (name, bytes) in seed_images() {
        let v = open_any_check(&bytes);
        assert!(v.is_clean(), "seed {name}: {}", v.describe());
    }
}

#[test]
fn mutated_any_format_seeds_never_panic() {
    let per_seed: u64 = std::env::var("FUZZ_MUTATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    for (i, (name, bytes)) in any_format_seeds().into_iter().enumerate() {
        let mut rng = Prng::new(0xa11f + i as u64);
        for n in 0..per_seed {
            let mut input = bytes.clone();
            mutate(&mut input, &mut rng);
            if std::panic::catch_unwind(|| open_any_check(&input)).is_err() {
                let path = std::env::temp_dir().join(format!("oxqcow-fuzz-any-{name}-{n}"));
                std::fs::write(&path, &input).unwrap();
                panic!("seed {name}, mutation {n} panicked; input saved to {}", path.display());
            }
        }
    }
}

/// Every encrypted seed (made by qemu-img, written by qemu-io) unlocks with
/// the fuzz passphrase within the fuzz bound on PBKDF2, and reads back
/// what qemu-io wrote; the wrong passphrase is refused; the fuzz body's
/// writes leave it clean.
#[test]
fn encrypted_seeds_unlock_and_read_what_qemu_wrote() {
    let seeds = committed_seeds("open_secret_check");
    for prefix in ["luks-", "qcow2-luks-", "qcow2-aes", "qcow-aes"] {
        assert!(seeds.iter().any(|(n, _)| n.starts_with(prefix)), "no {prefix} seed");
    }
    for (name, bytes) in seeds {
        let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(bytes.clone()));
        let format = oxqcow::probe_format(&*storage, None).unwrap();
        let image = Image::open_storage(storage.clone(), &secret_options(format, true))
            .unwrap_or_else(|e| panic!("seed {name} does not unlock: {e}"));
        let mut buf = vec![0u8; 12 << 10];
        image.read_at(&mut buf[..4096], 0).unwrap();
        image.read_at(&mut buf[4096..], 40 << 10).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0x5a), "seed {name}: 0..4 KiB is not what qemu-io wrote");
        assert!(buf[4096..].iter().all(|&b| b == 0xa5), "seed {name}: 40..48 KiB is not what qemu-io wrote");
        drop(image);
        let mut wrong = secret_options(format, true);
        wrong.passphrase = wrong.passphrase.map(|_| b"wrong".to_vec());
        wrong.key_secret = wrong.key_secret.map(|_| b"wrong".to_vec());
        // A legacy AES key is the passphrase itself: any passphrase opens it.
        if name != "qcow2-aes" && name != "qcow-aes" {
            let e = Image::open_storage(storage, &wrong).err().unwrap_or_else(|| panic!("seed {name} opened"));
            assert_eq!(e.to_string(), "Invalid password, cannot unlock any keyslot", "seed {name}");
        }
        let v = open_secret_check(&bytes).unwrap_or_else(|| panic!("seed {name} does not open for writing"));
        assert!(v.is_clean(), "seed {name} after writes: {}", v.describe());
        let Verdict::Checked { bytes_read, .. } = v else { unreachable!() };
        assert!(bytes_read > 0, "seed {name}: nothing was read");
    }
}

#[test]
fn mutated_encrypted_seeds_never_panic() {
    // Every input runs PBKDF2 twice: fewer mutations than elsewhere.
    let per_seed: u64 = std::env::var("FUZZ_MUTATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(300) / 3;
    let mut unlocked = 0;
    for (i, (name, bytes)) in committed_seeds("open_secret_check").into_iter().enumerate() {
        let mut rng = Prng::new(0x5ec7e7 + i as u64);
        for n in 0..per_seed {
            let mut input = bytes.clone();
            mutate(&mut input, &mut rng);
            match std::panic::catch_unwind(|| open_secret_check(&input)) {
                Ok(v) => unlocked += u64::from(v.is_some()),
                Err(_) => {
                    let path = std::env::temp_dir().join(format!("oxqcow-fuzz-secret-{name}-{n}"));
                    std::fs::write(&path, &input).unwrap();
                    panic!("seed {name}, mutation {n} panicked; input saved to {}", path.display());
                }
            }
        }
    }
    // Some mutations must get past the unlock, or the encrypted paths
    // after it saw none of them.
    println!("{unlocked} mutated images unlocked");
    assert!(unlocked > 0, "no mutated encrypted image unlocked");
}

/// The maintenance operations a version 2 image refuses, as qemu-img does:
/// resizing with snapshots, other refcount widths, persistent bitmaps.
const V2_REFUSALS: [&str; 5] = [
    "grow: Can't resize a v2 image which has snapshots",
    "shrink: Can't resize a v2 image which has snapshots",
    "amend refcount_bits=4: Refcount widths other than 16 bits require compatibility level 1.1 or above \
     (use compat=1.1 or greater)",
    "bitmap add: Can't make bitmap 'fuzz' persistent in '#block101': Cannot store dirty bitmaps in qcow2 v2 files",
    "bitmap remove: Dirty bitmap 'fuzz' not found",
];

/// What 1-bit refcounts refuse: a snapshot (every cluster would be
/// referenced twice).
const R1_REFUSALS: [&str; 3] = [
    "snapshot create: refcount of cluster 5 would exceed the maximum 1 of 1-bit refcounts",
    "snapshot apply: Can't find the snapshot 'fuzz'",
    "snapshot delete: Can't find the snapshot 'fuzz'",
];

#[test]
fn seed_images_survive_repair_and_maintenance() {
    for (name, bytes) in seed_images() {
        let run = open_repair_check(&bytes).unwrap_or_else(|| panic!("seed {name} does not open for repair"));
        let fixed = run.repair.unwrap_or_else(|e| panic!("seed {name}: repair failed: {e}"));
        assert_eq!(
            (fixed.corruptions, fixed.leaks, fixed.corruptions_fixed, fixed.leaks_fixed),
            (0, 0, 0, 0),
            "{name}"
        );
        let recheck = run.recheck.expect("a recheck after the repair").unwrap();
        assert_eq!((recheck.corruptions, recheck.leaks, recheck.check_errors), (0, 0, 0), "{name}");
        let expected: &[&str] = if name.contains("-v2") {
            &V2_REFUSALS
        } else if name.contains("-r1-") {
            &R1_REFUSALS
        } else if name.contains("-bitmap") {
            // As qemu-img snapshot -a refuses it.
            &["snapshot apply: Device has active dirty bitmaps"]
        } else {
            &[]
        };
        assert_eq!(run.refused, expected, "seed {name}");
        assert!(run.after.is_clean(), "seed {name} after maintenance: {}", run.after.describe());
    }
}

/// Mutated images through repair and maintenance: no panic, and an image
/// the repair left consistent stays without corruptions through snapshot,
/// resize, amend and bitmap operations (leaks may appear: a refcount a
/// mutation left on a cluster past the end of the file is not compared,
/// as in QEMU, until the file grows over it).
#[test]
fn mutated_seed_images_survive_repair_and_maintenance() {
    let per_seed: u64 = std::env::var("FUZZ_MUTATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let mut consistent = 0;
    for (i, (name, bytes)) in seed_images().into_iter().enumerate() {
        let mut rng = Prng::new(0x4e9a1 + i as u64);
        for n in 0..per_seed {
            let mut input = bytes.clone();
            mutate(&mut input, &mut rng);
            let saved = || {
                let path = std::env::temp_dir().join(format!("oxqcow-fuzz-repair-{name}-{n}.qcow2"));
                std::fs::write(&path, &input).unwrap();
                path
            };
            let Ok(run) = std::panic::catch_unwind(|| open_repair_check(&input)) else {
                panic!("seed {name}, mutation {n} panicked; input saved to {}", saved().display());
            };
            let Some(RepairRun { recheck: Some(Ok(recheck)), after, .. }) = run else { continue };
            if recheck.corruptions != 0 || recheck.check_errors != 0 {
                continue;
            }
            consistent += 1;
            if let Verdict::Checked { report, .. } = &after {
                assert!(
                    report.corruptions == 0 && report.check_errors == 0,
                    "seed {name}, mutation {n}: consistent after repair, then {}; input saved to {}",
                    after.describe(),
                    saved().display()
                );
            }
        }
    }
    assert!(consistent > 0, "no mutated image was consistent after its repair");
}
