//! Runs the body of the `open_read_check` fuzz target (fuzz/) in a normal
//! `cargo test`: over the seed corpus (valid images of several geometries
//! made by the library, which must probe clean), over seeded random byte
//! mutations of each seed (any error is fine, a panic is not), and over
//! every input the fuzzer ever crashed on (fuzz/regressions/). The same
//! for the write-path body of the `open_write_check` target.
//!
//! FUZZ_MUTATIONS sets the number of mutations per seed (default 300).

use oxqcow_testkit::prng::Prng;
use oxqcow_testkit::probe::{mutate, open_read_check, open_write_check, seed_images, Verdict};

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
