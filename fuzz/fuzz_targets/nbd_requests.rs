//! Drives the NBD request parser and every command with arbitrary bytes,
//! starting in the transmission phase (the first byte picks structured
//! replies, metadata contexts, read-only and discard): no input may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = oxqcow_nbd::fuzzing::drive_requests(data);
});
