//! Reading a remote object through range requests, shared by the HTTP(S)
//! and the object store backends: bytes past the object's end read as
//! zeros, small reads fetch `readahead` bytes more and keep them in a few
//! buffers (QEMU's curl driver keeps one per request state), large reads
//! are split into range requests that run in parallel.

use std::io;
use std::sync::Mutex;

/// How many readahead buffers are kept (QEMU's `CURL_NUM_STATES`).
const CACHE_SLOTS: usize = 8;
/// The most bytes the readahead buffers hold together: a large
/// `readahead` is still fetched (as QEMU fetches it) but kept only while
/// it fits.
const CACHE_BYTES: usize = 64 << 20;
/// Reads at least this long are not cached but fetched directly, split
/// into parallel range requests of at least the backend's piece size
/// (the HTTP backend's is this one).
pub(crate) const PIECE: usize = 512 * 1024;
/// The most range requests one read runs at once.
pub(crate) const MAX_PIECES: usize = 4;

/// An object read by byte ranges.
pub(crate) trait RangeFetch: Sync {
    /// The object's length, as it was when opened.
    fn object_len(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset`, all inside the object, with
    /// one request.
    fn fetch(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

/// A readahead buffer: bytes of the object from `start`.
struct Cached {
    start: u64,
    data: Vec<u8>,
    /// When it was last used, for eviction.
    used: u64,
}

#[derive(Default)]
struct Cache {
    slots: Vec<Cached>,
    clock: u64,
}

/// The readahead buffers of one open object, and how it is read.
pub(crate) struct RangedReader {
    readahead: u64,
    piece: usize,
    cache: Mutex<Cache>,
}

impl RangedReader {
    /// A reader fetching `readahead` bytes beyond each small read, and
    /// large reads in parallel pieces of at least `piece` bytes.
    pub(crate) fn new(readahead: u64, piece: usize) -> RangedReader {
        RangedReader { readahead, piece, cache: Mutex::new(Cache::default()) }
    }

    /// [`crate::Storage::read_at`] of the object `src` fetches.
    pub(crate) fn read_at(&self, src: &impl RangeFetch, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let len = src.object_len();
        let inside = len.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (data, past_end) = buf.split_at_mut(inside);
        past_end.fill(0);
        if data.is_empty() || self.cached(data, offset) {
            return Ok(());
        }
        if data.len() >= PIECE {
            return fetch_parallel(src, data, offset, self.piece);
        }
        let want = (data.len() as u64 + self.readahead).min(len - offset) as usize;
        let mut ahead = Vec::new();
        ahead.try_reserve_exact(want).map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
        ahead.resize(want, 0);
        src.fetch(&mut ahead, offset)?;
        data.copy_from_slice(&ahead[..data.len()]);
        self.remember(offset, ahead);
        Ok(())
    }

    /// Copies `buf.len()` bytes at `offset` from a readahead buffer that
    /// holds them all; false when none does.
    fn cached(&self, buf: &mut [u8], offset: u64) -> bool {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.clock += 1;
        let now = cache.clock;
        let end = offset + buf.len() as u64;
        let Some(slot) = cache.slots.iter_mut().find(|c| c.start <= offset && end <= c.start + c.data.len() as u64)
        else {
            return false;
        };
        let at = (offset - slot.start) as usize;
        buf.copy_from_slice(&slot.data[at..at + buf.len()]);
        slot.used = now;
        true
    }

    fn remember(&self, start: u64, data: Vec<u8>) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.clock += 1;
        let used = cache.clock;
        if data.len() > CACHE_BYTES {
            return;
        }
        while cache.slots.len() >= CACHE_SLOTS
            || cache.slots.iter().map(|c| c.data.len()).sum::<usize>() + data.len() > CACHE_BYTES
        {
            if let Some(oldest) = cache.slots.iter().enumerate().min_by_key(|(_, c)| c.used).map(|(i, _)| i) {
                cache.slots.swap_remove(oldest);
            }
        }
        cache.slots.push(Cached { start, data, used });
    }
}

/// Reads a large range as parallel range requests.
fn fetch_parallel(src: &impl RangeFetch, buf: &mut [u8], offset: u64, piece: usize) -> io::Result<()> {
    let pieces = (buf.len() / piece).clamp(1, MAX_PIECES);
    // The whole object is asked for whole: an HTTP server may answer that
    // with all of it (200), which no piece could use.
    if pieces == 1 || (offset == 0 && buf.len() as u64 == src.object_len()) {
        return src.fetch(buf, offset);
    }
    let piece = buf.len().div_ceil(pieces);
    std::thread::scope(|s| {
        let handles: Vec<_> = buf
            .chunks_mut(piece)
            .enumerate()
            .map(|(i, chunk)| s.spawn(move || src.fetch(chunk, offset + (i * piece) as u64)))
            .collect();
        // The first failure in offset order, after every piece ended.
        let mut result = Ok(());
        for h in handles {
            let r = h.join().unwrap_or_else(|_| Err(io::Error::other("a range request's thread panicked")));
            if result.is_ok() {
                result = r;
            }
        }
        result
    })
}
