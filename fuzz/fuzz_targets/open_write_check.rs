//! The input is an image file: open it read-write, write, zero, discard,
//! flush, check, close, then probe the result read-only. Errors are fine;
//! panics, aborts on huge allocations and hangs are bugs. The body lives
//! in the testkit so that `cargo test` runs it over a mutated seed corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = oxqcow_testkit::probe::open_write_check(data);
});
