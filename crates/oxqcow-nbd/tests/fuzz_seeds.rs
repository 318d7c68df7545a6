//! Runs the fuzz drivers over the committed seeds (fuzz/seeds/) and over
//! deterministic mutations of them, so that every `cargo test` exercises
//! the parsers the fuzzer exercises, on inputs real clients send and on
//! broken variants: none may panic.

use std::path::PathBuf;

use oxqcow::storage::Run;
use oxqcow_nbd::fuzzing::{drive_client, drive_requests, drive_session, drive_tls_session};
use oxqcow_nbd::proto;

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds").join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading seeds in {}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    assert!(out.len() >= 4, "expected the committed seeds in {}", dir.display());
    out
}

/// xorshift64*: the same mutations on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(5) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = [0, 0xff, 0x7f, 0x80][rng.below(4)];
            }
            2 => {
                let cut = rng.below(v.len() + 1);
                v.truncate(cut);
            }
            3 if !v.is_empty() => {
                // Overwrite a 32-bit field with an extreme value.
                let i = rng.below(v.len());
                let word = [0u32, 1, 0x7fff_ffff, 0xffff_ffff, 0x0200_0001][rng.below(5)].to_be_bytes();
                for (k, b) in word.iter().enumerate() {
                    if let Some(x) = v.get_mut(i + k) {
                        *x = *b;
                    }
                }
            }
            _ => {
                let i = rng.below(v.len() + 1);
                let extra: Vec<u8> = (0..rng.below(16)).map(|_| rng.next() as u8).collect();
                v.splice(i..i, extra);
            }
        }
    }
    v
}

#[test]
fn session_seeds_negotiate_and_mutations_do_not_panic() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for (name, seed) in seeds("nbd_session") {
        let out = drive_session(&seed);
        assert_eq!(&out[..18], &proto::greeting()[..], "{name}: greeting");
        assert!(out.len() > 18, "{name}: the server answered nothing after the greeting");
        for _ in 0..300 {
            let m = mutate(&mut rng, &seed);
            let _ = drive_session(&m);
        }
    }
}

#[test]
fn session_seeds_inside_tls_and_mutations_do_not_panic() {
    let mut rng = Rng(0x5151_7e57_0bad_cafe);
    for (name, seed) in seeds("nbd_session") {
        // The client flags, STARTTLS, then the seed's options as if decrypted.
        let Some((flags, options)) = seed.split_at_checked(4) else { continue };
        let mut tls = flags.to_vec();
        tls.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        tls.extend_from_slice(&proto::opt::STARTTLS.to_be_bytes());
        tls.extend_from_slice(&0u32.to_be_bytes());
        tls.extend_from_slice(options);
        let out = drive_tls_session(&tls);
        let mut expected = proto::greeting().to_vec();
        expected.extend(starttls_ack());
        assert!(out.starts_with(&expected), "{name}: STARTTLS was not acknowledged");
        // Inside TLS the seed is answered as without TLS (but for a second
        // STARTTLS, which the hostile seed sends).
        if !name.starts_with("hostile") {
            expected.extend_from_slice(&drive_session(&seed)[18..]);
            assert!(out == expected, "{name}: answered differently inside TLS");
        }
        for _ in 0..100 {
            let m = mutate(&mut rng, &tls);
            let _ = drive_tls_session(&m);
        }
    }
}

fn starttls_ack() -> Vec<u8> {
    let mut v = proto::OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&proto::opt::STARTTLS.to_be_bytes());
    v.extend_from_slice(&proto::rep::ACK.to_be_bytes());
    v.extend_from_slice(&0u32.to_be_bytes());
    v
}

#[test]
fn request_seeds_get_replies_and_mutations_do_not_panic() {
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    for (name, seed) in seeds("nbd_requests") {
        let out = drive_requests(&seed);
        let simple = proto::SIMPLE_REPLY_MAGIC.to_be_bytes();
        let structured = proto::STRUCTURED_REPLY_MAGIC.to_be_bytes();
        let extended = proto::EXTENDED_REPLY_MAGIC.to_be_bytes();
        assert!(
            [simple, structured, extended].iter().any(|m| out.starts_with(m)),
            "{name}: no reply to the first request"
        );
        for _ in 0..300 {
            let m = mutate(&mut rng, &seed);
            let _ = drive_requests(&m);
        }
    }
}

#[test]
fn qemu_img_seed_reads_back_its_write() {
    // The seed writes 512 bytes of 0xab at 4096, then reads 128 KiB from 0
    // with extended headers: the data chunk must carry the bytes.
    let (_, seed) = seeds("nbd_session").into_iter().find(|(n, _)| n == "qemu-img").unwrap();
    let out = drive_session(&seed);
    let pattern = [0xabu8; 512];
    assert!(out.windows(512).any(|w| w == pattern), "the written bytes were not read back");
}

/// The seeds that open an export answer every request the driver's client
/// sends; what it made of them is what the seed says.
#[test]
fn client_seeds_are_understood_and_mutations_do_not_panic() {
    let mut rng = Rng(0xc11e_47ff_0000_5eed);
    let disk = 1u64 << 20;
    let read = {
        let mut v = vec![0x5a; 8192];
        v.resize(16384, 0);
        v
    };
    for (name, seed) in seeds("nbd_client") {
        let run = drive_client(&seed);
        let disc_compact = [proto::REQUEST_MAGIC.to_be_bytes().as_slice(), &[0, 0, 0, 2]].concat();
        let disc_extended = [proto::EXTENDED_REQUEST_MAGIC.to_be_bytes().as_slice(), &[0, 0, 0, 2]].concat();
        // The last request sent is NBD_CMD_DISC, in a 28-byte compact or a
        // 32-byte extended header.
        let disconnected = |sent: &[u8]| {
            let tail = |n: usize| sent.get(sent.len().saturating_sub(n)..).unwrap_or_default();
            tail(28).starts_with(&disc_compact) || tail(32).starts_with(&disc_extended)
        };
        let run_of = |offset, len, data, zero| Run { offset, len, data, zero };
        match name.as_str() {
            "extended" | "structured" | "simple" => {
                assert_eq!(run.size, Some(disk), "{name}: size");
                assert_eq!(run.read.as_deref(), Some(read.as_slice()), "{name}: read");
                assert_eq!(run.wrote, Some(()), "{name}: writes");
                let status = run.status.clone().unwrap_or_else(|| panic!("{name}: no block status"));
                if name == "simple" {
                    // No status context: all data, as QEMU's client says.
                    assert_eq!(status, vec![run_of(0, disk, true, false)], "{name}");
                } else {
                    assert_eq!(status, vec![run_of(0, 65536, true, false), run_of(65536, disk - 65536, false, true)]);
                }
                assert!(disconnected(&run.sent), "{name}: the session did not end with NBD_CMD_DISC");
            }
            "allocation-depth" => {
                // Depths past 2 fold into 2, as QEMU reads the context.
                let status = run.status.clone().expect("allocation-depth: no block status");
                assert_eq!(
                    status,
                    vec![
                        run_of(0, 4096, true, false),
                        run_of(4096, 4096, false, false),
                        run_of(8192, disk - 8192, true, true)
                    ]
                );
            }
            "list" => {
                let listed = run.listed.clone().expect("list: nothing listed");
                let names: Vec<_> = listed.iter().map(|e| (e.name.as_str(), e.description.as_str())).collect();
                assert_eq!(names, [("", "the default"), ("disk", "")]);
                assert!(listed.iter().all(|e| e.size == disk && e.extended && e.contexts.len() == 2));
                assert_eq!(listed[0].block_sizes, Some((1, 4096, 32 << 20)));
                assert_ne!(listed[1].flags & proto::transmission_flags::READ_ONLY, 0);
            }
            "read-error" => {
                assert!(run.read.is_none(), "read-error: the error chunk was not reported");
                assert_eq!(run.wrote, Some(()), "read-error: an errno must not break the connection");
            }
            "hostile" => {
                assert_eq!(run.size, Some(disk));
                assert!(run.status.is_none() && run.read.is_none() && run.wrote.is_none(), "hostile: {run:?}");
            }
            other => panic!("a client seed this test does not know: {other}"),
        }
        for _ in 0..300 {
            let m = mutate(&mut rng, &seed);
            let _ = drive_client(&m);
        }
    }
}
