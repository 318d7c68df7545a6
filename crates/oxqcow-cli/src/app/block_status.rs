//! Block status as QEMU's tools walk it: one run of clusters at a time,
//! printing what they learnt before the run that fails.

use oxqcow::{BlockDevice, Extent};

/// The extents of `[offset, offset + len)`, or of the part before the
/// first sector whose status cannot be read (they may cover less than
/// asked). qemu-img's and qemu-io's maps ask for one run of clusters at a
/// time and print what they learnt before the run that fails, so a window
/// that fails is halved until the failure is found; the error comes once
/// the window's first sector fails.
pub fn status_up_to_error(image: &dyn BlockDevice, offset: u64, len: u64) -> oxqcow::Result<Vec<Extent>> {
    const SECTOR: u64 = 512;
    let mut len = len;
    loop {
        match image.block_status(offset, len) {
            Ok(extents) => return Ok(extents),
            Err(e) if len <= SECTOR => return Err(e),
            Err(_) => len = (len / 2).next_multiple_of(SECTOR).min(len - SECTOR),
        }
    }
}
