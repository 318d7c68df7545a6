//! The workers of one copy: each takes the next chunk from the planner,
//! reads it, waits for its turn when writes go in order, and writes it
//! (less its zero runs, cluster by cluster against a backing image, or
//! compressed).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

use super::plan::{Chunk, Kind, Planner};
use super::status::StatusCursor;
use super::zeros::{allocated_sectors_min, is_zero};
use super::{CopyError, CopyStep, Hooks, Source, IO_BUF_SIZE, SECTOR};
use crate::error::Error;
use crate::image::{BlockDevice, Image};

/// Page size for buffer alignment.
const PAGE: u64 = 4096;

/// The copy, shared by the workers.
pub(super) struct Job<'a> {
    pub sources: &'a [Source<'a>],
    pub target: &'a Image,
    /// The target's backing image: only what differs from it is written.
    pub backing: Option<&'a Image>,
    pub total: u64,
    /// The target's size (at least the sources' size; a new image's is
    /// rounded up to a sector).
    pub target_len: u64,
    /// The granularity of comparisons with the backing image and of
    /// compressed writes: the target's cluster size.
    pub cluster: u64,
    pub compress: bool,
    pub min_sparse: u64,
    /// Zero runs end on multiples of this many bytes where that spares the
    /// target a read-modify-write.
    pub alignment: u64,
    pub has_zero_init: bool,
    pub in_order: bool,
    /// Data bytes in all, for progress (0 without a progress hook).
    pub data_total: u64,
    pub salvage: bool,
    pub copy_range: bool,
    pub hooks: &'a Hooks<'a>,
}

/// Shared state of the workers.
struct Shared<'a> {
    planner: Mutex<Planner<'a>>,
    /// Index of the chunk whose turn it is to write (in-order mode), and
    /// the data bytes done so far (progress).
    turn: Mutex<(u64, u64)>,
    turn_changed: Condvar,
    failed: AtomicBool,
    /// The failure of the chunk earliest in the copy, with its index.
    error: Mutex<Option<(u64, CopyError)>>,
}

impl Shared<'_> {
    /// Records the failure of chunk `index` and stops the copy. Of several
    /// failures the one earliest in the copy is kept, whichever came first
    /// in time: workers compressing in parallel may fail in any order, and
    /// the error reported must not depend on it.
    fn fail(&self, index: u64, error: CopyError) {
        let mut e = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if e.as_ref().is_none_or(|(first, _)| index < *first) {
            *e = Some((index, error));
        }
        self.failed.store(true, Ordering::Release);
        drop(e);
        let _t = self.turn.lock().unwrap_or_else(|p| p.into_inner());
        self.turn_changed.notify_all();
    }
}

/// What to do with one cluster-sized piece of a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    /// Nothing: the target reads the same already.
    Skip,
    /// Make it read as zeros.
    Zero,
    /// Write the data.
    Write,
}

impl Job<'_> {
    /// Runs the copy on `workers` threads.
    pub fn run(&self, workers: usize) -> Result<(), CopyError> {
        let cursors = self.sources.iter().map(|s| StatusCursor::new(s.image)).collect();
        let align = if self.compress { self.cluster } else { 0 };
        let shared = Shared {
            planner: Mutex::new(Planner { cursors, sources: self.sources, pos: 0, source: 0, next_index: 0, align }),
            turn: Mutex::new((0, 0)),
            turn_changed: Condvar::new(),
            failed: AtomicBool::new(false),
            error: Mutex::new(None),
        };
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| self.worker(&shared));
            }
        });
        match shared.error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    fn worker(&self, shared: &Shared<'_>) {
        // A compressed chunk may be extended to the end of the target, past
        // the end of the sources, by less than a cluster.
        let mut backing_store = vec![0u8; (IO_BUF_SIZE + self.cluster + PAGE) as usize];
        let buf = page_aligned(&mut backing_store, (IO_BUF_SIZE + self.cluster) as usize);
        let mut base = Vec::new();
        loop {
            if shared.failed.load(Ordering::Acquire) {
                return;
            }
            let next = {
                let mut planner = shared.planner.lock().unwrap_or_else(|p| p.into_inner());
                planner.next(self.total, self.min_sparse).map_err(|e| (planner.next_index, e))
            };
            let chunk = match next {
                Ok(Some(c)) => c,
                Ok(None) => return,
                Err((index, e)) => return shared.fail(index, e),
            };
            let fail = |e: CopyError| shared.fail(chunk.index, e);
            let data = &mut buf[..if chunk.kind == Kind::Zero { 0 } else { chunk.len as usize }];
            let mut offloaded = false;
            match chunk.kind {
                Kind::Data => {
                    if let Some(pace) = self.hooks.before_read {
                        pace(chunk.len);
                    }
                    if self.copy_range {
                        match self.offload(&chunk) {
                            Ok(done) => offloaded = done,
                            Err(e) => return fail(e),
                        }
                    }
                    if !offloaded {
                        if let Err(e) = self.read_sources(data, chunk.offset) {
                            return fail(e);
                        }
                    }
                }
                Kind::ZeroAsData => data.fill(0),
                Kind::Zero => {}
            }
            // What the target shows there now, read before waiting for the turn.
            if let (Some(b), false) = (self.backing, data.is_empty()) {
                base.resize(data.len(), 0);
                if let Err(e) = read_clipped(b, &mut base, chunk.offset) {
                    return fail(CopyError::new(CopyStep::ReadBacking, chunk.offset, e));
                }
            }
            if self.in_order && !self.wait_turn(shared, chunk.index) {
                return;
            }
            let res = if offloaded { Ok(()) } else { self.write_chunk(&chunk, data, &mut base) };
            {
                let mut t = shared.turn.lock().unwrap_or_else(|p| p.into_inner());
                if self.in_order {
                    t.0 += 1;
                    shared.turn_changed.notify_all();
                }
                if chunk.kind != Kind::Zero && res.is_ok() {
                    t.1 += chunk.len;
                    if let (Some(progress), true) = (self.hooks.progress, self.data_total > 0) {
                        // Under the lock, so that progress only moves forward.
                        progress(t.1, self.data_total);
                    }
                }
            }
            if let Err(e) = res {
                return fail(e);
            }
        }
    }

    /// Copy offloading: copies a data chunk from a raw source file to a raw
    /// target file inside the kernel; false when that cannot be done (other
    /// formats, file systems without copy_file_range), and the chunk is
    /// then copied through memory.
    fn offload(&self, chunk: &Chunk) -> Result<bool, CopyError> {
        let Image::Raw(target) = self.target else { return Ok(false) };
        let end = chunk.offset + chunk.len;
        let Some(s) = self.sources.iter().find(|s| chunk.offset >= s.start && end <= s.start + s.len) else {
            return Ok(false);
        };
        let Image::Raw(source) = s.image else { return Ok(false) };
        source
            .copy_range_to(target, chunk.offset - s.start, chunk.offset, chunk.len)
            .map_err(|e| CopyError::new(CopyStep::Write, chunk.offset, e))
    }

    /// Reads `buf.len()` bytes of the concatenated sources at `offset`;
    /// past their end the target reads zeros.
    fn read_sources(&self, buf: &mut [u8], offset: u64) -> Result<(), CopyError> {
        let mut done = 0usize;
        for s in self.sources {
            let at = offset + done as u64;
            if done == buf.len() {
                break;
            }
            if at >= s.start + s.len {
                continue;
            }
            let n = (s.start + s.len - at).min((buf.len() - done) as u64) as usize;
            let piece = &mut buf[done..done + n];
            if let Err(e) = s.image.read_at(piece, at - s.start) {
                if !self.salvage {
                    return Err(CopyError::new(CopyStep::Read, at, e));
                }
                self.salvage(s.image, piece, at - s.start);
            }
            done += n;
        }
        buf[done..].fill(0);
        Ok(())
    }

    /// Salvage: reads `buf.len()` bytes of `image` at `offset` sector by
    /// sector; sectors that cannot be read are zeros, each reported.
    fn salvage(&self, image: &Image, buf: &mut [u8], offset: u64) {
        for (i, sector) in buf.chunks_mut(SECTOR as usize).enumerate() {
            let at = offset + i as u64 * SECTOR;
            if let Err(e) = image.read_at(sector, at) {
                if let Some(report) = self.hooks.unreadable {
                    report(at, &e);
                }
                sector.fill(0);
            }
        }
    }

    /// Waits until chunk `index` may write; false when the copy failed.
    fn wait_turn(&self, shared: &Shared<'_>, index: u64) -> bool {
        let mut t = shared.turn.lock().unwrap_or_else(|p| p.into_inner());
        while t.0 != index {
            if shared.failed.load(Ordering::Acquire) {
                return false;
            }
            t = shared.turn_changed.wait(t).unwrap_or_else(|p| p.into_inner());
        }
        !shared.failed.load(Ordering::Acquire)
    }

    /// Writes one chunk. `base` holds the backing image's content of the
    /// chunk (with a backing image; scratch space otherwise).
    fn write_chunk(&self, chunk: &Chunk, data: &mut [u8], base: &mut Vec<u8>) -> Result<(), CopyError> {
        if chunk.kind == Kind::Zero {
            return match self.backing {
                Some(b) => self.zero_over_backing(b, chunk.offset, chunk.len, base),
                None => self.zero(chunk.offset, chunk.len),
            };
        }
        if self.compress || self.backing.is_some() {
            return self.write_by_cluster(chunk.offset, data, base);
        }
        // With copy offloading data is copied as it is, as qemu-img's
        // does, without looking for zeros in it.
        if self.min_sparse == 0 || self.copy_range || chunk.len % SECTOR != 0 || chunk.offset % SECTOR != 0 {
            return self.write(chunk.offset, data);
        }
        let min = self.min_sparse / SECTOR;
        let align = self.alignment / SECTOR;
        let mut sector = chunk.offset / SECTOR;
        let mut rest = &data[..];
        while !rest.is_empty() {
            let n_sectors = rest.len() as u64 / SECTOR;
            let (is_data, n) = allocated_sectors_min(rest, n_sectors, min, sector, align);
            let bytes = (n * SECTOR) as usize;
            let offset = sector * SECTOR;
            if is_data {
                self.write(offset, &rest[..bytes])?;
            } else {
                self.zero(offset, bytes as u64)?;
            }
            sector += n;
            rest = &rest[bytes..];
        }
        Ok(())
    }

    /// Writes a chunk cluster by cluster: clusters that read the same as
    /// the backing image are skipped, clusters of zeros are zeroed (or left
    /// as holes), the rest written (compressed when compressing), runs of
    /// equal treatment in one request.
    fn write_by_cluster(&self, offset: u64, data: &[u8], base: &[u8]) -> Result<(), CopyError> {
        let cs = self.cluster;
        // A compressed write of the last cluster covers it up to the end of
        // the target, which may lie past the end of the sources.
        let mut padded = Vec::new();
        let data = if self.compress && offset + data.len() as u64 == self.total && self.target_len > self.total {
            padded.extend_from_slice(data);
            padded.resize((self.target_len - offset) as usize, 0);
            &padded[..]
        } else {
            data
        };
        let mut run: Option<(Action, usize)> = None;
        let mut at = 0usize;
        while at < data.len() {
            let piece_end = (((offset + at as u64) / cs + 1) * cs - offset).min(data.len() as u64) as usize;
            let piece = &data[at..piece_end];
            let action = match self.backing {
                Some(_) => {
                    let b = base.get(at..piece_end).unwrap_or(&[]);
                    if piece.len() == b.len() && piece == b || b.is_empty() && is_zero(piece) {
                        Action::Skip
                    } else if is_zero(piece) && self.min_sparse != 0 {
                        Action::Zero
                    } else {
                        Action::Write
                    }
                }
                None if is_zero(piece) && self.min_sparse != 0 => Action::Zero,
                None => Action::Write,
            };
            match run {
                Some((a, _)) if a == action => {}
                Some((a, start)) => {
                    self.apply(a, offset + start as u64, &data[start..at])?;
                    run = Some((action, at));
                }
                None => run = Some((action, at)),
            }
            at = piece_end;
        }
        if let Some((a, start)) = run {
            self.apply(a, offset + start as u64, &data[start..])?;
        }
        Ok(())
    }

    fn apply(&self, action: Action, offset: u64, data: &[u8]) -> Result<(), CopyError> {
        match action {
            Action::Skip => Ok(()),
            Action::Zero if self.backing.is_some() => self
                .target
                .write_zeroes_at(offset, data.len() as u64, false)
                .map_err(|e| CopyError::new(CopyStep::Write, offset, e)),
            Action::Zero => self.zero(offset, data.len() as u64),
            Action::Write if self.compress => {
                let Some(q) = self.target.as_qcow2() else {
                    let e = Error::InvalidArgument("compressed copies need a qcow2 target".into());
                    return Err(CopyError::new(CopyStep::WriteCompressed, offset, e));
                };
                q.write_compressed(data, offset).map_err(|e| CopyError::new(CopyStep::WriteCompressed, offset, e))
            }
            Action::Write => self.write(offset, data),
        }
    }

    /// Makes a range that reads as zeros in the source read as zeros in
    /// the target too, where the backing image has anything else.
    fn zero_over_backing(&self, b: &Image, offset: u64, len: u64, buf: &mut Vec<u8>) -> Result<(), CopyError> {
        let blen = b.len();
        let end = (offset + len).min(blen);
        if offset >= end {
            return Ok(());
        }
        let err = |at: u64, e: Error| CopyError::new(CopyStep::ReadBacking, at, e);
        let extents = b.block_status(offset, end - offset).map_err(|e| err(offset, e))?;
        for e in extents.iter().filter(|e| !e.zero) {
            let mut at = e.offset;
            while at < e.offset + e.length {
                let n = (e.offset + e.length - at).min(IO_BUF_SIZE);
                buf.resize(n as usize, 0);
                b.read_at(buf, at).map_err(|x| err(at, x))?;
                let zeros = vec![0u8; n as usize];
                self.write_by_cluster(at, &zeros, buf)?;
                at += n;
            }
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), CopyError> {
        self.target.write_at(data, offset).map_err(|e| CopyError::new(CopyStep::Write, offset, e))
    }

    /// Makes a target range read as zeros: nothing to do on a target that
    /// starts zeroed; otherwise the whole range is zeroed with unmapping
    /// allowed, whatever it reads as now, as qemu-img's `convert_co_write`
    /// does: a version 3 qcow2 target gets zero clusters even where it was
    /// unallocated (`map` shows them present), an overlay of version 2
    /// gets zeros written as data over its backing file.
    fn zero(&self, offset: u64, len: u64) -> Result<(), CopyError> {
        if self.has_zero_init || len == 0 {
            return Ok(());
        }
        self.target.write_zeroes_at(offset, len, true).map_err(|e| CopyError::new(CopyStep::Write, offset, e))
    }
}

/// Reads `buf.len()` bytes at `offset` of an image that may be shorter:
/// what lies past its end reads as zeros.
fn read_clipped(image: &Image, buf: &mut [u8], offset: u64) -> crate::Result<()> {
    let n = image.len().saturating_sub(offset).min(buf.len() as u64) as usize;
    if n > 0 {
        image.read_at(&mut buf[..n], offset)?;
    }
    buf[n..].fill(0);
    Ok(())
}

/// The page-aligned `len` bytes inside `store` (which has a page to
/// spare). The kernel copies between the page cache and a page-aligned
/// buffer at about twice the speed of a misaligned one, and QEMU's I/O
/// buffers are page-aligned too.
fn page_aligned(store: &mut [u8], len: usize) -> &mut [u8] {
    let skip = store.as_ptr().align_offset(PAGE as usize);
    &mut store[skip..skip + len]
}
