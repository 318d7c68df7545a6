//! The commands that describe the image: `alloc`, `map`, `length` and
//! `info`.

use oxqcow::{BlockDevice, Image};

use crate::app::block_status::status_up_to_error;

use crate::app::messages::errno_text;
use crate::io::cmds::args::{cmd, image, num, opened, CmdInfo};
use crate::io::report::human_size;
use crate::io::session::{CmdResult, Failed, Session};

/// `alloc`.
pub const ALLOC: CmdInfo =
    cmd("alloc", Some("a"), 1, Some(2), Some("offset [count]"), "checks if offset is allocated in the file", alloc);

/// `info`.
pub const INFO: CmdInfo = cmd("info", Some("i"), 0, Some(0), None, "prints information about the current file", info);

/// `length`.
pub const LENGTH: CmdInfo = cmd("length", Some("l"), 0, Some(0), None, "gets the length of the current file", length);

/// `map`.
pub const MAP: CmdInfo = cmd("map", None, 0, Some(0), Some(""), "prints the allocated areas of a file", map);

/// Runs of `[offset, offset + len)` as (length, allocated in this image),
/// merged as qemu-io merges `bdrv_is_allocated` answers, up to the first
/// sector whose status cannot be read; then also the error.
fn allocation(img: &Image, offset: u64, len: u64) -> (Vec<(u64, bool)>, Option<oxqcow::Error>) {
    let mut runs: Vec<(u64, bool)> = Vec::new();
    // Ask in bounded pieces so huge images need bounded memory.
    const PIECE: u64 = 1 << 40;
    let mut pos = offset;
    while pos < offset + len {
        let n = PIECE.min(offset + len - pos);
        let extents = match status_up_to_error(img, pos, n) {
            Ok(extents) if !extents.is_empty() => extents,
            Ok(_) => return (runs, Some(oxqcow::Error::Corrupt("block status described nothing".into()))),
            Err(e) => return (runs, Some(e)),
        };
        for e in extents {
            let allocated = e.present && e.depth == 0;
            match runs.last_mut() {
                Some((l, a)) if *a == allocated => *l += e.length,
                _ => runs.push((e.length, allocated)),
            }
            pos = e.offset + e.length;
        }
    }
    (runs, None)
}

fn alloc(s: &mut Session, _: &CmdInfo, argv: &[String]) -> CmdResult {
    let start = num(&argv[1])?;
    let mut count = match argv.get(2) {
        Some(arg) => num(arg)?,
        None => 512,
    };
    let img = image(s);
    let size = img.len();
    count = if start >= size { 0 } else { count.min(size - start) };
    let runs = match allocation(img, start, count) {
        (runs, None) => runs,
        (_, Some(e)) => {
            println!("is_allocated failed: {}", errno_text(&e));
            return Err(Failed);
        }
    };
    let allocated: u64 = runs.iter().filter(|r| r.1).map(|r| r.0).sum();
    println!("{allocated}/{count} bytes allocated at offset {}", human_size(start as f64));
    Ok(())
}

fn map(s: &mut Session, _: &CmdInfo, _: &[String]) -> CmdResult {
    let img = image(s);
    // The runs before a failure are printed, then the failure.
    let (runs, failure) = allocation(img, 0, img.len());
    let mut offset = 0u64;
    for (len, allocated) in runs {
        println!(
            "{} (0x{len:x}) bytes {} at offset {} (0x{offset:x})",
            human_size(len as f64),
            if allocated { "    allocated" } else { "not allocated" },
            human_size(offset as f64)
        );
        offset += len;
    }
    match failure {
        None => Ok(()),
        Some(e) => {
            s.ctx.error(&format!("Failed to get allocation status: {}", errno_text(&e)));
            Err(Failed)
        }
    }
}

fn length(s: &mut Session, _: &CmdInfo, _: &[String]) -> CmdResult {
    println!("{}", human_size(image(s).len() as f64));
    Ok(())
}

fn info(s: &mut Session, _: &CmdInfo, _: &[String]) -> CmdResult {
    // A null device has no driver information to give: QEMU names the
    // node (a null node twice, as its info names the node and the driver
    // below it) and the command fails without a message.
    if let Some(driver) = &opened(s).null_node {
        println!("format name: {driver}\nformat name: {driver}");
        return Err(Failed);
    }
    let img = image(s);
    println!("format name: {}", img.format().name());
    if img.storage().driver_name().starts_with("null") {
        return Err(Failed);
    }
    let Some(q) = img.as_qcow2() else {
        println!("cluster size: 0 bytes\nvm state offset: 0 bytes");
        return Ok(());
    };
    let info = q.info();
    let cs = info.cluster_size;
    let l2_entries = cs / if info.extended_l2 { 16 } else { 8 };
    // The VM state lives right after the disk, at the next L1 entry.
    let per_l1 = u128::from(cs) * u128::from(l2_entries);
    let vm_state = u128::from(img.len()).div_ceil(per_l1) * per_l1;
    println!("cluster size: {}", human_size(cs as f64));
    println!("vm state offset: {}", human_size(vm_state as f64));
    println!("Format specific information:");
    let v3 = info.version >= 3;
    println!("    compat: {}", if v3 { "1.1" } else { "0.10" });
    println!("    compression type: {}", info.compression_type);
    if v3 {
        println!("    lazy refcounts: {}", info.lazy_refcounts);
    }
    println!("    refcount bits: {}", info.refcount_bits);
    if let Some(data_file) = &info.data_file {
        println!("    data file: {data_file}");
        println!("    data file raw: {}", info.data_file_raw);
    }
    if v3 {
        println!("    corrupt: {}", info.corrupt);
        println!("    extended l2: {}", info.extended_l2);
    }
    Ok(())
}
