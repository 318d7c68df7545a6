//! Drives the NBD handshake and the transmission phase with arbitrary client
//! bytes against an in-memory qcow2 image: no input may panic or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = oxqcow_nbd::fuzzing::drive_session(data);
});
