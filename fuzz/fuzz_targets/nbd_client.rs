//! Plays a server to oxqcow's NBD client with arbitrary bytes: listing,
//! negotiation, then reads, block status and writes. No input may panic,
//! hang or make the client allocate what the server asks for.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = oxqcow_nbd::fuzzing::drive_client(data);
});
