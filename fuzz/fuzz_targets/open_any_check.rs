//! The input is an image file of any format: probe it as `qemu-img info`
//! without `-f` does, open it read-only, read what block status reports,
//! check qcow2. Reaches the qcow (v1) reader and the LUKS header parser,
//! which `open_read_check` (qcow2 only) does not. The body lives in the
//! testkit so that `cargo test` runs it over the seeds too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = oxqcow_testkit::probe::open_any_check(data);
});
