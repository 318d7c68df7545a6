//! The input is an encrypted image (luks, or qcow2 or qcow with LUKS or
//! AES encryption): unlock it with the seeds' passphrase, PBKDF2 bounded
//! to milliseconds, then write, close, reopen and read. Reaches the key
//! slot's anti-forensic merge and decryption with whatever cipher a
//! mutated header names, and the encrypted read, write and copy-on-write
//! paths. The body lives in the testkit so that `cargo test` runs it over
//! the seeds too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = oxqcow_testkit::probe::open_secret_check(data);
});
