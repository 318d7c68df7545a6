//! Runs the body of the `open_read_check` fuzz target (fuzz/) in a normal
//! `cargo test`: over the seed corpus (valid images of several geometries
//! made by the library, which must probe clean), over seeded random byte
//! mutations of each seed (any error is fine, a panic is not), and over
//! every input the fuzzer ever crashed on (fuzz/regressions/). The same
//! for the write-path body of the `open_write_check` target, and for the
//! `open_any_check` target's body over its committed seeds (qcow v1 and
//! LUKS files made by qemu-img, fuzz/seeds/open_any_check/).
//!
//! FUZZ_MUTATIONS sets the number of mutations per seed (default 300).

use oxqcow_testkit::prng::Prng;
use oxqcow_testkit::probe::{mutate, open_any_check, open_read_check, open_write_check, seed_images, Stage, Verdict};

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

fn any_format_seeds() -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/open_any_check");
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
