//! Drives the NBD handshake of a server that requires TLS (options refused
//! before STARTTLS, the negotiation and requests after it, the input
//! playing the decrypted stream) against an in-memory qcow2 image: no
//! input may panic or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = oxqcow_nbd::fuzzing::drive_tls_session(data);
});
