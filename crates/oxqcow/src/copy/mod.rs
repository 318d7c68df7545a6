//! Copying images into an image as `qemu-img convert` copies them: the
//! copy loop behind `oxqcow convert`, for any caller.
//!
//! [`copy`] reads one or more source images (concatenated) into a target
//! image. The sources are walked by block status ([`StatusCursor`]): runs
//! that read as zeros are never read, and on a target that reads as zeros
//! already ([`CopyOptions::target_is_zero`]) never written. Data runs are
//! read in chunks of at most 2 MiB and scanned for runs of zeros at least
//! [`CopyOptions::min_sparse`] bytes long, which are skipped too, so holes
//! stay holes. Worker threads take chunks in order and read them in
//! parallel; with [`CopyOptions::in_order`] they write them in order, so a
//! qcow2 target gets its clusters laid out as a sequential copy would.
//! Sources that are overlays are read through their backing chains.
//!
//! [`CopyOptions::compress`] compresses every data cluster of a qcow2
//! target. Chunks are then whole target clusters, and each worker
//! compresses its own chunk: compression runs in `write_compressed`
//! outside the engine's locks, so compressed chunks are written as soon as
//! they are ready, in any order (the content does not depend on the order;
//! only the host layout does). Clusters that read as zeros stay holes.
//!
//! With a `backing` image (the target's backing file, `convert -B`) only
//! what differs from it is written: every chunk is compared with the
//! backing image's content cluster by cluster, and clusters that read the
//! same stay unallocated in the target (zero clusters where the source
//! reads zeros over backing data).
//!
//! The caller sees the copy through [`Hooks`]: a pace before each data
//! chunk is read (a [`RateLimit`]), progress, and the sectors
//! [`CopyOptions::salvage`] copied as zeros.

mod job;
mod plan;
pub mod ratelimit;
pub mod status;
#[cfg(test)]
mod tests;
mod zeros;

pub use ratelimit::RateLimit;
pub use status::{Flags, StatusCursor};

use crate::error::Error;
use crate::image::{BlockDevice, Image};
use crate::options::ImageFormat;

/// qemu-img's `IO_BUF_SIZE`: the largest chunk read and written at once.
const IO_BUF_SIZE: u64 = 2 << 20;
/// The largest zero run handed to the target in one request.
const MAX_ZERO_CHUNK: u64 = 1 << 30;
/// QEMU's sector, the unit of zero detection.
const SECTOR: u64 = 512;
/// qemu-img's default number of coroutines: the most workers a copy
/// without compression starts by default.
const DEFAULT_WORKERS: usize = 8;

/// How to copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyOptions {
    /// Worker threads; `None`: for a compressed copy, which is CPU bound,
    /// one per core; otherwise one per core but at least 2 and at most 8
    /// (qemu-img's 8 requests in flight are coroutines in one thread, and
    /// more threads than cores only add switching to a copy bound by
    /// memory bandwidth).
    pub workers: Option<usize>,
    /// Write chunks in order (qemu-img's default; `convert -W` turns it
    /// off), so that a qcow2 target's clusters are laid out as a sequential
    /// copy lays them. Only a qcow2 target without compression waits for
    /// turns: a raw target's bytes do not depend on the order of the
    /// writes, and compressed chunks are written as soon as they are
    /// ready (for raw targets waiting for turns cost a third of the time).
    pub in_order: bool,
    /// Compress every data cluster (`convert -c`); the target must be qcow2.
    pub compress: bool,
    /// Runs of zeros at least this many bytes long (on the 512-byte sector
    /// grid) are not written as data (`convert -S`, default 4096); 0 writes
    /// everything, zeros too, as data.
    pub min_sparse: u64,
    /// The target reads as zeros already (a new image, `convert
    /// --target-is-zero`), so zeros are not written at all.
    pub target_is_zero: bool,
    /// A source read that fails is retried one sector at a time, and the
    /// sectors that still fail are copied as zeros, each reported to
    /// [`Hooks::unreadable`] (`convert --salvage`).
    pub salvage: bool,
    /// Copy data chunks between raw files inside the kernel
    /// (`copy_file_range`, `convert -C`), as they are: no zero detection
    /// in them. Chunks that cannot be copied so go through memory.
    pub copy_range: bool,
    /// The target is written front to back (a new object uploaded while it
    /// is written): chunks are written in guest order whatever the target
    /// and `in_order` say, so a raw or luks target's bytes come in order,
    /// and a qcow2 target's clusters are allocated in order (its tables
    /// laid out ahead by [`crate::Qcow2::reserve_for_copy`]), each just
    /// before it is written. Compressed chunks are not kept waiting: each
    /// compressed write allocates its bytes as it writes them.
    pub front_to_back: bool,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            workers: None,
            in_order: true,
            compress: false,
            min_sparse: 4096,
            target_is_zero: false,
            salvage: false,
            front_to_back: false,
            copy_range: false,
        }
    }
}

/// Told the length of a data chunk before it is read.
pub type PaceHook<'a> = &'a (dyn Fn(u64) + Sync);
/// Told the data bytes done and in all.
pub type ProgressHook<'a> = &'a (dyn Fn(u64, u64) + Sync);
/// Told the offset of a sector copied as zeros, and why it was unreadable.
pub type UnreadableHook<'a> = &'a (dyn Fn(u64, &Error) + Sync);

/// Called while a copy runs, from its worker threads.
#[derive(Clone, Copy, Default)]
pub struct Hooks<'a> {
    /// Before a data chunk is read, with its length in bytes: a rate limit
    /// sleeps here ([`RateLimit::pace`]).
    pub before_read: Option<PaceHook<'a>>,
    /// After each chunk that holds data: the bytes copied as data so far,
    /// and the data bytes in all as [`data_bytes`] counts them (which walks
    /// the sources' block status once more before the copy starts, only
    /// when this hook is given; never called when that is 0). Calls are
    /// serialised and `done` never goes backwards; it may end above the
    /// total, since compressed chunks are whole clusters.
    pub progress: Option<ProgressHook<'a>>,
    /// With [`CopyOptions::salvage`]: a sector of a source that could not
    /// be read and was copied as zeros, by its offset in that source.
    pub unreadable: Option<UnreadableHook<'a>>,
}

/// What a copy was doing when it failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyStep {
    /// Checking the job before anything was copied.
    Start,
    /// Asking a source for its block status.
    BlockStatus,
    /// Reading a source.
    Read,
    /// Reading the target's backing image.
    ReadBacking,
    /// Writing to the target, or making a range of it read as zeros.
    Write,
    /// Writing compressed clusters to the target.
    WriteCompressed,
}

/// Why a copy failed: the step, the offset (in the concatenated sources,
/// which is the target's offset, except for [`CopyStep::BlockStatus`]:
/// the offset in the source asked) and the engine's error.
#[derive(Debug, thiserror::Error)]
#[error("{step:?} at byte {offset}: {error}")]
pub struct CopyError {
    /// What was being done.
    pub step: CopyStep,
    /// Where.
    pub offset: u64,
    /// The engine's error.
    #[source]
    pub error: Error,
}

impl CopyError {
    fn new(step: CopyStep, offset: u64, error: Error) -> CopyError {
        CopyError { step, offset, error }
    }
}

/// One source and where it starts in the concatenated whole.
struct Source<'a> {
    image: &'a Image,
    start: u64,
    len: u64,
}

fn sources<'a>(images: &[&'a Image]) -> Result<Vec<Source<'a>>, CopyError> {
    let mut out = Vec::with_capacity(images.len());
    let mut total = 0u64;
    for &image in images {
        let len = image.len();
        out.push(Source { image, start: total, len });
        total = total.checked_add(len).ok_or_else(|| {
            let e = Error::InvalidArgument("the sources are too large together".into());
            CopyError::new(CopyStep::Start, 0, e)
        })?;
    }
    Ok(out)
}

/// The data bytes a copy of `images` reads and writes (qemu-img's
/// `allocated_sectors`): everything but runs that read as zeros, which
/// count too when `min_sparse` is 0.
pub fn data_bytes(images: &[&Image], min_sparse: u64) -> Result<u64, CopyError> {
    let mut n = 0;
    for_each_data_run(images, min_sparse, |_, len| n += len)?;
    Ok(n)
}

/// Calls `f` with the offset (in `images` concatenated) and the length of
/// each run a copy reads and writes as data, front to back: the runs
/// [`data_bytes`] counts.
pub fn for_each_data_run(images: &[&Image], min_sparse: u64, mut f: impl FnMut(u64, u64)) -> Result<(), CopyError> {
    for s in sources(images)? {
        let mut cur = StatusCursor::new(s.image);
        let mut off = 0;
        while off < s.len {
            let e = cur.at(off).map_err(|e| CopyError::new(CopyStep::BlockStatus, off, e))?;
            if !e.zero || min_sparse == 0 {
                f(s.start + off, e.length);
            }
            off += e.length;
        }
    }
    Ok(())
}

/// Copies `images`, concatenated, to the start of `target`, which must be
/// at least as large. `backing` is the image the target's unallocated
/// clusters read from (its backing file): only what differs from it is
/// written. On failure the copy stops; what was written stays.
pub fn copy(
    images: &[&Image],
    target: &Image,
    backing: Option<&Image>,
    options: &CopyOptions,
    hooks: &Hooks<'_>,
) -> Result<(), CopyError> {
    let sources = sources(images)?;
    let total = sources.last().map_or(0, |s| s.start + s.len);
    let invalid = |msg: &str| Err(CopyError::new(CopyStep::Start, 0, Error::InvalidArgument(msg.into())));
    if target.len() < total {
        return invalid("the target is smaller than the sources");
    }
    if options.compress && target.as_qcow2().is_none() {
        return invalid("compressed copies need a qcow2 target");
    }
    let workers = options.workers.unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if options.compress {
            cores
        } else {
            cores.clamp(2, DEFAULT_WORKERS)
        }
    });
    let data_total = match hooks.progress {
        Some(_) => data_bytes(images, options.min_sparse)?,
        None => 0,
    };
    let job = job::Job {
        sources: &sources,
        target,
        backing,
        total,
        target_len: target.len(),
        cluster: target.as_qcow2().map_or(SECTOR, |q| q.geometry().cluster_size()),
        compress: options.compress,
        min_sparse: options.min_sparse,
        alignment: zeros::alignment(options.min_sparse),
        has_zero_init: options.target_is_zero,
        in_order: match options.front_to_back {
            true => !options.compress,
            false => options.in_order && !options.compress && target.format() != ImageFormat::Raw,
        },
        data_total,
        salvage: options.salvage,
        copy_range: options.copy_range,
        hooks,
    };
    job.run(workers.max(1))
}
