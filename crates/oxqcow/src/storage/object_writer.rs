//! A new object in an object store, uploaded while an image is written
//! into it (what `convert ... s3://BUCKET/KEY` writes through).
//!
//! An object cannot be changed once written, and a multipart upload's
//! parts cannot be changed once sent; but parts may be sent in any order,
//! and the object is only made, from all of them, when the upload is
//! completed. So the storage has two regions:
//!
//! - the head (`[0, head_end)`): the bytes a writer rewrites until the end
//!   (a qcow2 image's header, tables and refcounts, all laid out before
//!   the data by `Qcow2::reserve_for_copy`). Kept in a scratch file and
//!   sent last, as the first parts (numbered when the stream starts, each
//!   one to two part sizes long); it is at least [`PART_SIZE`] long, as
//!   every part but the last must be at least 5 MiB.
//! - the stream (`[head_end, ...)`): bytes written front to back, each
//!   once. A part is sent as soon as the furthest write is [`LAG`] bytes
//!   past its end and no write in progress touches it; its bytes are then
//!   dropped from the scratch file. A write, read or truncation into a
//!   part already sent fails (it would mean the image was not written
//!   front to back), and so does the upload with it.
//!
//! So the scratch file holds the head and a few parts, not the image, and
//! the upload runs along with the conversion. In memory are only the parts
//! on their way ([`UPLOAD_CONCURRENCY`] at most), in buffers that are
//! reused rather than freed: freed buffers of this size raise glibc's mmap
//! threshold, and the heap then kept ~30 MiB more than was in use. The object appears when
//! [`ObjectWriter::finish`] completes the upload; dropped before that,
//! the upload is aborted and the key keeps what it held.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use object_store::multipart::PartId;
use object_store::{MultipartId, PutPayload};
use tokio::task::JoinHandle;

use super::file::FileStorage;
use super::object::{ObjectOptions, Remote};
use super::Storage;

/// The size of the stream's parts when nothing larger is needed (and the
/// least size of the head).
pub const PART_SIZE: u64 = 8 << 20;
/// S3's limit on the parts of one upload.
const MAX_PARTS: u64 = 10_000;
/// Parts sent at once; each holds its bytes in memory until it is sent.
const UPLOAD_CONCURRENCY: usize = 4;
/// How far the furthest write must be past a part's end before the part
/// is sent: room for writes that complete out of order.
const LAG: u64 = 16 << 20;

/// A new object being written; see the module documentation.
pub struct ObjectWriter {
    remote: Remote,
    id: MultipartId,
    scratch: FileStorage,
    buffers: BufferPool,
    state: Mutex<Stream>,
}

/// Where the upload stands.
struct Stream {
    /// The image's length.
    len: u64,
    /// Where the stream begins; `None` until [`ObjectWriter::stream`]
    /// (everything is head until then).
    head_end: Option<u64>,
    /// The size of the stream's parts.
    part_size: u64,
    /// The stream's bytes below this were sent (or are being sent).
    sent_to: u64,
    /// The end of the furthest write.
    high: u64,
    /// Writes (and zeroings) in progress: their ranges.
    writing: Vec<(u64, u64)>,
    /// How many parts the head takes (numbered first, sent last).
    head_parts: usize,
    /// The parts sent, by index (the head's first, sent last).
    parts: Vec<Option<PartId>>,
    /// Parts on their way, oldest first.
    in_flight: VecDeque<(usize, JoinHandle<object_store::Result<PartId>>)>,
    /// The first failure; everything fails after it.
    failed: Option<String>,
    /// The upload was completed.
    done: bool,
}

impl Stream {
    fn new() -> Stream {
        Stream {
            len: 0,
            head_end: None,
            part_size: PART_SIZE,
            sent_to: 0,
            high: 0,
            writing: Vec::new(),
            head_parts: 1,
            parts: vec![None],
            in_flight: VecDeque::new(),
            failed: None,
            done: false,
        }
    }

    /// Numbers the parts of a head `head` bytes long, the stream's to
    /// follow them in parts of `part_size`.
    fn number_head(&mut self, head: u64, part_size: u64) {
        self.part_size = part_size;
        self.head_parts = head_ranges(head, part_size).len();
        self.parts = vec![None; self.head_parts];
    }

    /// At the end, for an object of `len` bytes whose head is `head`
    /// long: while no part of the stream is numbered yet, the head's parts
    /// are numbered afresh for its final length (the whole image when the
    /// stream never started, or one shorter than the head), with parts
    /// large enough for everything still to send.
    fn renumber_for(&mut self, len: u64, head: u64) {
        if self.parts.len() == self.head_parts {
            let size = self.part_size.max(part_size(len));
            self.number_head(head, size);
        }
    }
}

impl ObjectWriter {
    /// Starts a multipart upload at the key `opts` name (so that a wrong
    /// endpoint, bucket or credentials fail before any work) and makes
    /// the scratch file (in `$TMPDIR`, unlinked from the start).
    pub fn start(opts: &ObjectOptions) -> Result<ObjectWriter, String> {
        let remote = Remote::connect(opts)?;
        ObjectWriter::on(remote)
    }

    fn on(remote: Remote) -> Result<ObjectWriter, String> {
        let id =
            remote.run(remote.multipart.create_multipart(&remote.path)).map_err(|e| remote.failure(e).to_string())?;
        let scratch = tempfile::tempfile().map_err(|e| format!("Could not create a scratch file: {e}"))?;
        let state = Mutex::new(Stream::new());
        Ok(ObjectWriter { remote, id, scratch: FileStorage::from_file(scratch), buffers: BufferPool::default(), state })
    }

    /// The object's URL.
    pub fn url(&self) -> &str {
        &self.remote.url
    }

    /// Starts the stream past every byte written so far (and at least
    /// [`PART_SIZE`] in), for an object expected to be about
    /// `expected_len` bytes long (which sizes the parts so that S3's
    /// 10000 are enough). What was written before is the head: the
    /// writer may rewrite it until the end.
    pub fn stream(&self, expected_len: u64) {
        let mut st = self.lock();
        if st.head_end.is_some() {
            return;
        }
        let head_end = st.high.max(PART_SIZE);
        st.head_end = Some(head_end);
        st.sent_to = head_end;
        st.number_head(head_end, part_size(expected_len.max(head_end)));
    }

    /// Sends what is left and completes the upload: the object appears
    /// whole, or not at all.
    pub fn finish(self) -> Result<(), String> {
        let mut st = self.lock();
        if let Some(why) = &st.failed {
            return Err(why.clone());
        }
        let len = st.len;
        let head = st.head_end.map_or(len, |h| h.min(len));
        st.renumber_for(len, head);
        let sent = (|| {
            if st.head_end.is_some() {
                while st.sent_to < len {
                    let (from, to) = (st.sent_to, (st.sent_to + st.part_size).min(len));
                    self.send_tail(&mut st, from, to)?;
                }
            }
            for (index, (from, to)) in head_ranges(head, st.part_size).into_iter().enumerate() {
                self.send(&mut st, index, from, to)?;
            }
            while !st.in_flight.is_empty() {
                self.settle_oldest(&mut st)?;
            }
            Ok::<_, io::Error>(())
        })();
        sent.map_err(|e| e.to_string())?;
        let parts: Vec<PartId> = st.parts.iter().map(|p| p.clone().expect("every part was sent")).collect();
        let completed = self.remote.run(self.remote.multipart.complete_multipart(&self.remote.path, &self.id, parts));
        match completed {
            Ok(_) => {
                st.done = true;
                Ok(())
            }
            Err(e) => Err(format!("error while uploading {}", self.remote.failure(e))),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Stream> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fails unless `[offset, end)` may be `done` (written, read, cut):
    /// it must not reach into a part sent already.
    fn check(&self, st: &Stream, offset: u64, end: u64, done: &str) -> io::Result<()> {
        if let Some(why) = &st.failed {
            return Err(io::Error::other(why.clone()));
        }
        match st.head_end {
            Some(head) if head < st.sent_to && end > head && offset < st.sent_to => Err(io::Error::other(format!(
                "{} is uploaded while it is written, front to back: bytes {offset}-{} cannot be {done}, \
                 bytes {head}-{} were sent already",
                self.remote.url,
                end.max(offset + 1) - 1,
                st.sent_to - 1
            ))),
            _ => Ok(()),
        }
    }

    /// Runs `op` on the scratch file for a write of `[offset, end)`,
    /// then sends the parts it completed.
    fn write_with(&self, offset: u64, end: u64, op: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        {
            let mut st = self.lock();
            self.check(&st, offset, end, "written")?;
            st.writing.push((offset, end));
        }
        let result = op();
        let mut st = self.lock();
        if let Some(i) = st.writing.iter().position(|&w| w == (offset, end)) {
            st.writing.swap_remove(i);
        }
        result?;
        st.len = st.len.max(end);
        st.high = st.high.max(end);
        self.send_ready(&mut st)
    }

    /// Sends every part of the stream the writes are well past.
    fn send_ready(&self, st: &mut Stream) -> io::Result<()> {
        if st.head_end.is_none() {
            return Ok(());
        }
        loop {
            let (from, to) = (st.sent_to, st.sent_to + st.part_size);
            if st.high < to + LAG || st.writing.iter().any(|&(offset, _)| offset < to) {
                return Ok(());
            }
            self.send_tail(st, from, to)?;
        }
    }

    /// Sends `[from, to)` of the stream as its next part and drops it
    /// from the scratch file.
    fn send_tail(&self, st: &mut Stream, from: u64, to: u64) -> io::Result<()> {
        let index = st.parts.len();
        if index as u64 >= MAX_PARTS {
            return Err(self.fail(
                st,
                format!("the object grew past {MAX_PARTS} parts of {} bytes (the most an upload has)", st.part_size),
            ));
        }
        st.parts.push(None);
        st.sent_to = to;
        self.send(st, index, from, to)?;
        // Only frees space: the bytes are in the part now.
        let _ = self.scratch.punch_hole(from, to - from);
        Ok(())
    }

    /// Sends `[from, to)` of the scratch file as part `index`, first
    /// waiting for the oldest part on its way when too many are.
    fn send(&self, st: &mut Stream, index: usize, from: u64, to: u64) -> io::Result<()> {
        while st.in_flight.len() >= UPLOAD_CONCURRENCY {
            self.settle_oldest(st)?;
        }
        let mut part = self.buffers.take((to - from) as usize);
        if let Err(e) = self.scratch.read_at(&mut part.bytes, from) {
            return Err(self.fail(st, format!("reading the scratch file at byte {from}: {e}")));
        }
        let payload = PutPayload::from(Bytes::from_owner(part));
        let (store, path, id) = (self.remote.multipart.clone(), self.remote.path.clone(), self.id.clone());
        let upload = self.remote.runtime.spawn(async move { store.put_part(&path, &id, index, payload).await });
        st.in_flight.push_back((index, upload));
        Ok(())
    }

    /// Waits for the oldest part on its way.
    fn settle_oldest(&self, st: &mut Stream) -> io::Result<()> {
        let Some((index, upload)) = st.in_flight.pop_front() else { return Ok(()) };
        match self.remote.run(upload) {
            Ok(Ok(part)) => {
                st.parts[index] = Some(part);
                Ok(())
            }
            Ok(Err(e)) => Err(self.fail(st, self.remote.failure(e).to_string())),
            Err(e) => Err(self.fail(st, format!("{}: {e}", self.remote.url))),
        }
    }

    /// Records the first failure, which every later request returns.
    fn fail(&self, st: &mut Stream, why: String) -> io::Error {
        let why = st.failed.get_or_insert_with(|| format!("error while uploading {why}"));
        io::Error::other(why.clone())
    }
}

impl Storage for ObjectWriter {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(&self.lock(), offset, offset + buf.len() as u64, "read")?;
        self.scratch.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_with(offset, offset + buf.len() as u64, || self.scratch.write_at(buf, offset))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_with(offset, offset + len, || self.scratch.write_zeroes(offset, len))
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let st = self.lock();
        self.check(&st, offset, offset + len, "zeroed")?;
        self.scratch.punch_hole(offset, len)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = self.lock();
        if len < st.len {
            self.check(&st, len, st.len, "cut off")?;
        }
        self.scratch.set_len(len)?;
        st.len = len;
        st.high = st.high.min(len);
        Ok(())
    }

    /// Nothing is durable before the upload completes; a failed part is
    /// reported here too.
    fn sync(&self) -> io::Result<()> {
        match &self.lock().failed {
            Some(why) => Err(io::Error::other(why.clone())),
            None => Ok(()),
        }
    }

    fn driver_name(&self) -> &str {
        self.remote.scheme
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}

impl Drop for ObjectWriter {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if st.done {
            return;
        }
        for (_, upload) in st.in_flight.drain(..) {
            upload.abort();
        }
        let _ = self.remote.run(self.remote.multipart.abort_multipart(&self.remote.path, &self.id));
    }
}

/// The head's parts: `[0, head)` cut into pieces of `part_size`, the last
/// one taking the rest (so each is one to two part sizes long), or one
/// piece when the head is shorter than a part.
fn head_ranges(head: u64, part_size: u64) -> Vec<(u64, u64)> {
    let count = (head / part_size).max(1);
    (0..count).map(|i| (i * part_size, if i + 1 == count { head } else { (i + 1) * part_size })).collect()
}

/// Buffers for parts on their way, kept for reuse: a part's buffer comes
/// back when the upload lets go of it.
#[derive(Clone, Default)]
struct BufferPool(Arc<Mutex<Vec<Vec<u8>>>>);

/// A part's bytes, owned by the upload until it is done with them.
struct PartBuffer {
    bytes: Vec<u8>,
    pool: BufferPool,
}

impl BufferPool {
    /// A buffer of `len` zeroed bytes.
    fn take(&self, len: usize) -> PartBuffer {
        let mut bytes = self.0.lock().unwrap_or_else(|p| p.into_inner()).pop().unwrap_or_default();
        bytes.clear();
        bytes.resize(len, 0);
        PartBuffer { bytes, pool: self.clone() }
    }
}

impl AsRef<[u8]> for PartBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for PartBuffer {
    fn drop(&mut self) {
        let mut pool = self.pool.0.lock().unwrap_or_else(|p| p.into_inner());
        // Never more than can be on their way at once, plus the one read.
        if pool.len() <= UPLOAD_CONCURRENCY {
            pool.push(std::mem::take(&mut self.bytes));
        }
    }
}

/// The part size for an object of about `len` bytes: [`PART_SIZE`], or
/// more when that would need more than [`MAX_PARTS`] parts (whole MiB,
/// with room for the head).
fn part_size(len: u64) -> u64 {
    let needed = len.div_ceil(MAX_PARTS - 1).next_multiple_of(1 << 20);
    needed.max(PART_SIZE)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use object_store::memory::InMemory;
    use object_store::ObjectStoreExt;

    use super::*;

    /// A writer on an in-memory store, and the store.
    fn writer() -> (ObjectWriter, Arc<InMemory>) {
        let store = Arc::new(InMemory::new());
        let remote = Remote::in_memory(store.clone(), "disk.img");
        (ObjectWriter::on(remote).unwrap(), store)
    }

    fn object(store: &InMemory) -> Option<Vec<u8>> {
        let path = object_store::path::Path::from("disk.img");
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async { Some(store.get(&path).await.ok()?.bytes().await.unwrap().to_vec()) })
    }

    fn pattern(offset: u64, len: usize) -> Vec<u8> {
        (offset..offset + len as u64).map(|p| (p / 4096 * 7 + p % 251) as u8).collect()
    }

    #[test]
    fn parts_are_sent_while_the_image_is_written_and_the_head_last() {
        let (w, store) = writer();
        // A head written before the stream starts, and rewritten after.
        w.write_at(&[1u8; 4096], 0).unwrap();
        w.set_len(200 << 20).unwrap();
        w.stream(100 << 20);
        let mut sent_before_the_end = 0;
        let mut at = PART_SIZE;
        while at < 100 << 20 {
            w.write_at(&pattern(at, 1 << 20), at).unwrap();
            at += 1 << 20;
            let st = w.lock();
            sent_before_the_end = st.parts.len() - 1;
            // The scratch file holds the head and a few parts, not the image.
            let used = std::os::unix::fs::MetadataExt::blocks(&w.scratch.file().metadata().unwrap()) * 512;
            assert!(used <= PART_SIZE + LAG + 2 * PART_SIZE, "{used} bytes of scratch at {at}");
        }
        assert!(sent_before_the_end >= 8, "{sent_before_the_end} parts sent");
        w.write_at(&[2u8; 512], 512).unwrap();
        // A sent byte cannot change, nor be read back.
        let err = w.write_at(&[3u8; 512], PART_SIZE).unwrap_err();
        assert!(err.to_string().contains("is uploaded while it is written"), "{err}");
        w.set_len(at).unwrap();
        w.finish().unwrap();
        let got = object(&store).expect("the object was made");
        assert_eq!(got.len() as u64, 100 << 20);
        assert_eq!(got[..512], [1u8; 512]);
        assert_eq!(got[512..1024], [2u8; 512]);
        assert!(got[4096..PART_SIZE as usize].iter().all(|&b| b == 0));
        assert!(got[PART_SIZE as usize..] == pattern(PART_SIZE, got.len() - PART_SIZE as usize)[..]);
    }

    #[test]
    fn a_small_object_is_one_part_and_a_dropped_writer_makes_none() {
        let (w, store) = writer();
        w.write_at(b"hello", 3).unwrap();
        w.stream(8);
        w.finish().unwrap();
        assert_eq!(object(&store).unwrap(), b"\0\0\0hello");

        let (w, store) = writer();
        w.stream(64 << 20);
        w.write_at(&pattern(0, 48 << 20), 0).unwrap();
        drop(w);
        assert_eq!(object(&store), None);
    }

    #[test]
    fn parts_stay_within_s3_s_limits() {
        assert_eq!(part_size(0), PART_SIZE);
        assert_eq!(part_size(10 << 30), PART_SIZE);
        // 1 TiB needs parts of at least 110 MB: 105 MiB whole.
        assert_eq!(part_size(1 << 40), 105 << 20);
        assert!(part_size(5 << 40).checked_mul(MAX_PARTS - 1).unwrap() >= 5 << 40);
    }

    /// Guards the part count at the end: a streamed image whose stream
    /// has sent nothing yet (its data was all in the head, the rest of a
    /// large disk unwritten) must not be renumbered with parts sized for
    /// the head alone, or the zeros still to send would need more parts
    /// than S3 allows.
    #[test]
    fn parts_numbered_at_the_end_cover_the_whole_object() {
        for (len, head_end, expected) in
            [(1u64 << 40, PART_SIZE, 100u64 << 20), (200 << 30, 3 * PART_SIZE, 200 << 30), (1 << 40, 0, 0)]
        {
            let mut st = Stream::new();
            st.len = len;
            if head_end > 0 {
                st.head_end = Some(head_end);
                st.sent_to = head_end;
                st.number_head(head_end, part_size(expected.max(head_end)));
            }
            let head = st.head_end.map_or(len, |h| h.min(len));
            st.renumber_for(len, head);
            let tail_parts = (len - head).div_ceil(st.part_size);
            assert!(
                st.head_parts as u64 + tail_parts <= MAX_PARTS,
                "{len} bytes: {} + {tail_parts} parts",
                st.head_parts
            );
            assert_eq!(st.parts.len(), st.head_parts);
            assert!(head_ranges(head, st.part_size).iter().all(|&(a, b)| b - a <= 2 * st.part_size));
        }
    }

    #[test]
    fn the_head_is_cut_into_parts_of_one_to_two_part_sizes() {
        let p = PART_SIZE;
        assert_eq!(head_ranges(0, p), [(0, 0)]);
        assert_eq!(head_ranges(4096, p), [(0, 4096)]);
        assert_eq!(head_ranges(p, p), [(0, p)]);
        assert_eq!(head_ranges(2 * p - 1, p), [(0, 2 * p - 1)]);
        assert_eq!(head_ranges(2 * p, p), [(0, p), (p, 2 * p)]);
        assert_eq!(head_ranges(5 * p + 7, p), [(0, p), (p, 2 * p), (2 * p, 3 * p), (3 * p, 4 * p), (4 * p, 5 * p + 7)]);
    }

    /// The largest buffer the writer's pool kept, and how many it kept.
    fn pool_use(pool: &BufferPool) -> (usize, usize) {
        let kept = pool.0.lock().unwrap();
        (kept.iter().map(Vec::capacity).max().unwrap_or(0), kept.len())
    }

    /// Guards memory: an image written without a stream (all of it head,
    /// as with 512-byte clusters) used to be read into memory whole as one
    /// part; a long head is sent in several parts, numbered before the
    /// stream's.
    #[test]
    fn a_long_head_goes_in_several_parts_and_memory_holds_a_few() {
        let (w, store) = writer();
        let len = 5 * PART_SIZE + 12345;
        w.write_at(&pattern(0, len as usize), 0).unwrap();
        let pool = w.buffers.clone();
        w.finish().unwrap();
        assert!(object(&store).unwrap() == pattern(0, len as usize));
        let (largest, kept) = pool_use(&pool);
        assert!(largest < 2 * PART_SIZE as usize && kept <= UPLOAD_CONCURRENCY + 1, "{largest} bytes, {kept} buffers");

        let (w, store) = writer();
        let head = 2 * PART_SIZE + 4096;
        w.write_at(&pattern(0, head as usize), 0).unwrap();
        w.stream(100 << 20);
        {
            let st = w.lock();
            assert_eq!((st.head_parts, st.parts.len()), (2, 2));
        }
        let mut at = head;
        while at < 100 << 20 {
            w.write_at(&pattern(at, 1 << 20), at).unwrap();
            at += 1 << 20;
        }
        w.write_at(&[9u8; 512], PART_SIZE + 512).unwrap();
        let pool = w.buffers.clone();
        w.finish().unwrap();
        let got = object(&store).unwrap();
        assert_eq!(got.len() as u64, at);
        assert_eq!(got[(PART_SIZE + 512) as usize..(PART_SIZE + 1024) as usize], [9u8; 512]);
        let mut want = pattern(0, at as usize);
        want[(PART_SIZE + 512) as usize..(PART_SIZE + 1024) as usize].fill(9);
        assert!(got == want);
        let (largest, kept) = pool_use(&pool);
        assert!(largest < 2 * PART_SIZE as usize && kept <= UPLOAD_CONCURRENCY + 1, "{largest} bytes, {kept} buffers");
    }
}
