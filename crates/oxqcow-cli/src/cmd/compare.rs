//! `compare`: whether two images have the same content, as `qemu-img
//! compare` decides it and with its messages and exit codes (0 identical,
//! 1 different, 2 could not open, 3 block status failed, 4 read failed).
//!
//! Runs that read as zeros on both sides are never read; a run allocated on
//! one side only is read on that side alone and must be all zeros.
//!
//! Images are compared as the guest sees them: backing chains are read
//! through (and, in strict mode, the allocation status compared is that of
//! the whole chain, as qemu-img's is).

use oxqcow::{BlockDevice, Image};

use crate::app::ctx::Ctx;
use crate::app::forbid_backing::FORBID_BACKING;
use crate::app::getopt::{self, HasArg, Opt};
use crate::app::image::is_cache_mode;
use crate::app::messages::strerror;
use crate::app::progress::Progress;
use crate::app::CommonOpts;
use oxqcow::copy::StatusCursor;

/// qemu-img's `IO_BUF_SIZE`: the most read from each image at once.
const IO_BUF_SIZE: u64 = 2 << 20;
/// Data runs are compared in units of this many bytes (qemu's sectors).
const SECTOR: usize = 512;

const LONGS: &[Opt] = &[
    Opt::alias("help", HasArg::No, "h"),
    Opt::alias("object", HasArg::Required, "object"),
    Opt::alias("image-opts", HasArg::No, "image-opts"),
    Opt::alias("force-share", HasArg::No, "U"),
    Opt::alias("quiet", HasArg::No, "q"),
    Opt::alias("progress", HasArg::No, "p"),
    Opt::alias("a-format", HasArg::Required, "f"),
    Opt::alias("b-format", HasArg::Required, "F"),
    Opt::alias("strict", HasArg::No, "s"),
    Opt::alias("cache", HasArg::Required, "T"),
    Opt::long(FORBID_BACKING, HasArg::No),
];

fn help(prog: &str) {
    print!(
        "Usage:\n\
         Check if two images have the same contents.  Usage:\n\n  \
         {prog} compare [-f FMT] [-F FMT] [-s] [-T CACHE] [-U] FILENAME1 FILENAME2\n\n\
         Arguments:\n  \
         -h, --help\n     print this help and exit\n  \
         -q, --quiet\n     quiet operation\n  \
         -p, --progress\n     show operation progress\n  \
         -f, --a-format FMT\n     specify FILENAME1 image format explicitly\n  \
         -F, --b-format FMT\n     specify FILENAME2 image format explicitly\n  \
         -s, --strict\n     strict mode, also check if sizes are equal\n  \
         -T, --cache CACHE_MODE\n     images caching mode (writeback)\n  \
         -U, --force-share\n     open images in shared mode for concurrent access\n  \
         --forbid-backing\n     refuse images that name a backing file (oxqcow)\n  \
         FILENAME1, FILENAME2\n     image files to compare\n"
    );
}

struct Args {
    fmt1: Option<String>,
    fmt2: Option<String>,
    cache: String,
    quiet: bool,
    strict: bool,
    image_opts: bool,
    force_share: bool,
    file1: String,
    file2: String,
}

/// Runs `compare`.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    let prog = &ctx.prog;
    let parsed = match getopt::parse_declared(prog, "compare", args, ":hf:F:T:pqsU", LONGS) {
        Ok(p) => p,
        Err(msg) => {
            eprintln!("{msg}");
            return 1;
        }
    };
    let mut common = CommonOpts::default();
    let (mut fmt2, mut strict) = (None, false);
    for (key, value) in parsed.opts {
        let value = value.unwrap_or_default();
        match key.as_str() {
            "h" => {
                help(prog);
                return 0;
            }
            "F" => fmt2 = Some(value),
            "s" => strict = true,
            _ => {
                if let Err(msg) = common.consume(&key, &value) {
                    return ctx.fail(&msg);
                }
            }
        }
    }
    let [file1, file2] = parsed.operands.as_slice() else {
        return ctx.fail(&format!("Expecting two image file names\nTry '{prog} compare --help' for more info"));
    };
    let progress = Progress::new(common.show_progress(), 2.0);
    let a = Args {
        cache: common.source_cache_or("writeback"),
        fmt1: common.format,
        fmt2,
        quiet: common.quiet,
        strict,
        image_opts: common.image_opts,
        force_share: common.force_share,
        file1: file1.clone(),
        file2: file2.clone(),
    };
    let code = compare(ctx, &a, &progress);
    progress.end();
    code
}

/// A failure with qemu-img's exit code.
struct Fail(i32, String);

fn compare(ctx: &Ctx, a: &Args, progress: &Progress) -> i32 {
    if !is_cache_mode(&a.cache) {
        ctx.error(&format!("Invalid source cache option: {}", a.cache));
        return 2;
    }
    let open = |file: &str, fmt: &Option<String>| {
        let (image, _) = crate::app::image::open_operand(file, a.image_opts, fmt.as_deref(), true, a.force_share)?;
        crate::app::image::apply_cache_mode(&image, &a.cache, file)?;
        Ok::<_, String>(image)
    };
    let img1 = match open(&a.file1, &a.fmt1) {
        Ok(i) => i,
        Err(msg) => {
            ctx.error(&msg);
            return 2;
        }
    };
    let img2 = match open(&a.file2, &a.fmt2) {
        Ok(i) => i,
        Err(msg) => {
            ctx.error(&msg);
            return 2;
        }
    };
    match compare_images(a, &img1, &img2, progress) {
        Ok(Some(msg)) => {
            if !a.quiet {
                println!("{msg}");
            }
            1
        }
        Ok(None) => {
            if !a.quiet {
                println!("Images are identical.");
            }
            0
        }
        Err(Fail(code, msg)) => {
            ctx.error(&msg);
            code
        }
    }
}

/// Compares; `Ok(Some(message))` when the images differ.
fn compare_images(a: &Args, img1: &Image, img2: &Image, progress: &Progress) -> Result<Option<String>, Fail> {
    let mut cur1 = StatusCursor::new(img1);
    let mut cur2 = StatusCursor::new(img2);
    let (size1, size2) = (cur1.size(), cur2.size());
    let total = size1.min(size2);
    let progress_base = size1.max(size2);
    let mut buf1 = vec![0u8; IO_BUF_SIZE as usize];
    let mut buf2 = vec![0u8; IO_BUF_SIZE as usize];
    let step = |chunk: u64| progress.print(chunk as f32 / progress_base as f32 * 100.0, 100);

    progress.print(0.0, 100);
    if a.strict && size1 != size2 {
        return Ok(Some("Strict mode: Image size mismatch!".into()));
    }

    let mut offset = 0u64;
    while offset < total {
        let e1 = cur1.at(offset).map_err(|_| Fail(3, format!("Sector allocation test failed for {}", a.file1)))?;
        let e2 = cur2.at(offset).map_err(|_| Fail(3, format!("Sector allocation test failed for {}", a.file2)))?;
        let mut chunk = e1.length.min(e2.length);
        if a.strict && cur1.flags(&e1) != cur2.flags(&e2) {
            return Ok(Some(format!("Strict mode: Offset {offset} block status mismatch!")));
        }
        if e1.zero && e2.zero {
            // Both read as zeros: nothing to read.
        } else if e1.present == e2.present {
            if e1.present {
                chunk = chunk.min(IO_BUF_SIZE);
                let n = chunk as usize;
                read(img1, &mut buf1[..n], offset, &a.file1)?;
                read(img2, &mut buf2[..n], offset, &a.file2)?;
                if let Some(at) = first_differing_sector(&buf1[..n], &buf2[..n]) {
                    return Ok(Some(format!("Content mismatch at offset {}!", offset + at as u64)));
                }
            }
        } else {
            chunk = chunk.min(IO_BUF_SIZE);
            let (img, file) = if e1.present { (img1, &a.file1) } else { (img2, &a.file2) };
            if let Some(msg) = check_empty(img, offset, chunk, file, &mut buf1)? {
                return Ok(Some(msg));
            }
        }
        offset += chunk;
        step(chunk);
    }

    if size1 != size2 {
        if !a.quiet {
            println!("Warning: Image size mismatch!");
        }
        let (img, cur, file) = if size1 > size2 { (img1, &mut cur1, &a.file1) } else { (img2, &mut cur2, &a.file2) };
        while offset < progress_base {
            let e = cur.at(offset).map_err(|_| Fail(3, format!("Sector allocation test failed for {file}")))?;
            let mut chunk = e.length;
            if e.present && !e.zero {
                chunk = chunk.min(IO_BUF_SIZE);
                if let Some(msg) = check_empty(img, offset, chunk, file, &mut buf1)? {
                    return Ok(Some(msg));
                }
            }
            offset += chunk;
            step(chunk);
        }
    }
    Ok(None)
}

fn read(img: &Image, buf: &mut [u8], offset: u64, file: &str) -> Result<(), Fail> {
    img.read_at(buf, offset)
        .map_err(|e| Fail(4, format!("Error while reading offset {offset} of {file}: {}", strerror(&e))))
}

/// qemu-img's `check_empty_sectors`: the run must read as zeros; the
/// message names the start of the first 512-byte piece (counted from the
/// start of the run) holding a nonzero byte.
fn check_empty(img: &Image, offset: u64, len: u64, file: &str, buf: &mut [u8]) -> Result<Option<String>, Fail> {
    let buf = &mut buf[..len as usize];
    read(img, buf, offset, file)?;
    Ok(first_nonzero_sector(buf).map(|i| format!("Content mismatch at offset {}!", offset + i as u64)))
}

/// qemu-img's `find_nonzero`: where the first 512-byte piece with a nonzero
/// byte starts.
fn first_nonzero_sector(buf: &[u8]) -> Option<usize> {
    buf.chunks(SECTOR).position(|c| c.iter().any(|&b| b != 0)).map(|i| i * SECTOR)
}

/// qemu-img's `compare_buffers` in sector units: the offset of the first
/// 512-byte sector that differs, if any.
fn first_differing_sector(a: &[u8], b: &[u8]) -> Option<usize> {
    a.chunks(SECTOR).zip(b.chunks(SECTOR)).position(|(x, y)| x != y).map(|i| i * SECTOR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differing_sector_granularity() {
        let a = vec![0u8; 2048];
        let mut b = a.clone();
        assert_eq!(first_differing_sector(&a, &b), None);
        b[1500] = 1;
        assert_eq!(first_differing_sector(&a, &b), Some(1024));
        b[3] = 1;
        assert_eq!(first_differing_sector(&a, &b), Some(0));
        assert_eq!(first_nonzero_sector(&a), None);
        assert_eq!(first_nonzero_sector(&b[4..]), Some(1024));
    }
}
