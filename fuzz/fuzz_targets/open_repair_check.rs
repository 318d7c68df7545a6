//! The input is a qcow2 image file: open it for repair, run `check -r all`
//! and a check after it, then create, apply and delete a snapshot around
//! a write, grow and shrink, change the refcount width and back, add and
//! remove a bitmap, close, and probe the result. The body lives in the
//! testkit so that `cargo test` runs it over the seeds too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = oxqcow_testkit::probe::open_repair_check(data);
});
