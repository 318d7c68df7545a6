//! The input is an image file: open it read-only, read every extent block
//! status reports (bounded), run check. Errors are fine; panics, aborts on
//! huge allocations and hangs are bugs. The body lives in the testkit so
//! that `cargo test` runs it over a mutated seed corpus too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = oxqcow_testkit::probe::open_read_check(data);
});
