//! Opening untrusted bytes: open read-only, read every extent block status
//! reports, run check. Bounded in reads and block-status work so a hostile
//! image cannot turn the probe itself into a hang; every error is a fine
//! outcome, a panic is a bug. This is the body of the `open_read_check`
//! fuzz target and of the `oxqcow-probe` binary the hostile-image test runs
//! under a memory limit.

use std::sync::Arc;

use oxqcow::backing::BackingPolicy;
use oxqcow::options::{AmendOptions, Preallocation};
use oxqcow::Storage;
use oxqcow::{
    BlockDevice, CheckReport, Compat, CreateOptions, Image, ImageFormat, MemoryStorage, OpenOptions, Qcow2, RepairMode,
};

use crate::model::pattern;
use crate::prng::Prng;

/// Bounds on the work a probe does.
#[derive(Clone, Copy, Debug)]
pub struct ProbeLimits {
    /// Guest bytes read at most.
    pub max_read_bytes: u64,
    /// Block-status calls at most.
    pub max_status_calls: u64,
    /// Guest clusters one block-status call covers at most.
    pub status_window_clusters: u64,
}

impl Default for ProbeLimits {
    fn default() -> Self {
        ProbeLimits { max_read_bytes: 64 << 20, max_status_calls: 64, status_window_clusters: 1 << 16 }
    }
}

/// Which step refused the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Opening.
    Open,
    /// Block status or reading data.
    Read,
    /// Running check (an error, not findings).
    Check,
}

/// The outcome of a probe.
#[derive(Debug)]
pub enum Verdict {
    /// Every step ran; `report` is what check found.
    Checked {
        /// Guest bytes read.
        bytes_read: u64,
        /// The check report.
        report: CheckReport,
    },
    /// A step returned an error.
    Refused {
        /// The step.
        stage: Stage,
        /// The error message.
        message: String,
    },
}

impl Verdict {
    /// Whether the image was accepted everywhere and check found nothing.
    pub fn is_clean(&self) -> bool {
        matches!(self, Verdict::Checked { report, .. }
            if report.corruptions == 0 && report.leaks == 0 && report.check_errors == 0)
    }

    /// One line describing the outcome.
    pub fn describe(&self) -> String {
        match self {
            Verdict::Checked { bytes_read, report } => format!(
                "checked: read {bytes_read} bytes; {} corruptions, {} leaks, {} check errors{}",
                report.corruptions,
                report.leaks,
                report.check_errors,
                report.messages.first().map(|m| format!("; first: {m}")).unwrap_or_default()
            ),
            Verdict::Refused { stage, message } => format!("refused at {stage:?}: {message}"),
        }
    }
}

/// Opens `storage` read-only as qcow2 (backing files ignored), reads every
/// extent block status reports within `limits`, and runs check.
pub fn probe_storage(storage: Arc<dyn Storage>, limits: ProbeLimits) -> Verdict {
    let opts = OpenOptions::new().read_only(true).format(ImageFormat::Qcow2).backing(BackingPolicy::Ignore);
    probe_with(storage, &opts, limits)
}

/// Opens `storage` with `opts`, reads every extent block status reports
/// within `limits` (unless `opts.no_io`), and runs check on qcow2 images
/// (other formats have none: their report is empty).
fn probe_with(storage: Arc<dyn Storage>, opts: &OpenOptions, limits: ProbeLimits) -> Verdict {
    let image = match Image::open_storage(storage, opts) {
        Ok(i) => i,
        Err(e) => return Verdict::Refused { stage: Stage::Open, message: e.to_string() },
    };
    let bytes_read = if opts.no_io { Ok(0) } else { read_extents(&image, limits) };
    let bytes_read = match bytes_read {
        Ok(n) => n,
        Err(e) => return Verdict::Refused { stage: Stage::Read, message: e.to_string() },
    };
    if image.as_qcow2().is_none() {
        return Verdict::Checked { bytes_read, report: CheckReport::default() };
    }
    match image.check(None) {
        Ok(report) => Verdict::Checked { bytes_read, report },
        Err(e) => Verdict::Refused { stage: Stage::Check, message: e.to_string() },
    }
}

/// The `open_any_check` fuzz target body: `data` is an image file of any
/// format oxqcow opens, found as `qemu-img info` without `-f` finds it
/// (qcow2, qcow, luks, raw; others refused). qcow, raw and qcow2 images are
/// read and checked as [`probe_storage`] does. A LUKS image is opened as
/// `info` opens it, without its passphrase: header and key slots parsed
/// and validated, no unlocking (whose PBKDF2 cost the header's bound on
/// iterations keeps to seconds: too slow for a fuzzer, and covered by the
/// LUKS unit tests).
pub fn open_any_check(data: &[u8]) -> Verdict {
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(data.to_vec()));
    let format = match oxqcow::probe_format(&*storage, None) {
        Ok(f) => f,
        Err(e) => return Verdict::Refused { stage: Stage::Open, message: e.to_string() },
    };
    let mut opts = OpenOptions::new().read_only(true).format(format).backing(BackingPolicy::Ignore);
    opts.no_io = format == ImageFormat::Luks;
    probe_with(storage, &opts, ProbeLimits::default())
}

/// Reads the data extents of `image` through block status; returns the
/// bytes read.
fn read_extents(image: &Image, limits: ProbeLimits) -> oxqcow::Result<u64> {
    let size = image.len();
    let cluster = image.as_qcow2().map_or(65536, |q| q.geometry().cluster_size());
    let window = limits.status_window_clusters.saturating_mul(cluster);
    let mut budget = limits.max_read_bytes;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    let mut calls = 0;
    while pos < size && calls < limits.max_status_calls && budget > 0 {
        calls += 1;
        let len = (size - pos).min(window);
        for e in image.block_status(pos, len)? {
            if e.zero && !e.data {
                continue;
            }
            let mut at = e.offset;
            let end = e.offset + e.length;
            while at < end && budget > 0 {
                let n = (end - at).min(buf.len() as u64).min(budget);
                image.read_at(&mut buf[..n as usize], at)?;
                at += n;
                budget -= n;
            }
        }
        pos += len;
    }
    // Reading is bounded; so is one read of the last bytes of the disk.
    if size > 0 {
        image.read_at(&mut buf[..1], size - 1)?;
    }
    Ok(limits.max_read_bytes - budget)
}

/// The fuzz target body: `data` is an image file.
pub fn open_read_check(data: &[u8]) -> Verdict {
    probe_storage(Arc::new(MemoryStorage::from_bytes(data.to_vec())), ProbeLimits::default())
}

/// In-memory storage that refuses to grow past a limit (an I/O error, not
/// an allocation of whatever size a hostile image asks for).
pub struct BoundedStorage {
    inner: MemoryStorage,
    limit: u64,
}

impl BoundedStorage {
    /// `bytes`, growing to at most `limit` bytes.
    pub fn new(bytes: Vec<u8>, limit: u64) -> Self {
        BoundedStorage { inner: MemoryStorage::from_bytes(bytes), limit }
    }

    fn fits(&self, end: Option<u64>) -> std::io::Result<()> {
        match end {
            Some(e) if e <= self.limit => Ok(()),
            _ => Err(std::io::Error::other(format!("storage limit of {} bytes reached", self.limit))),
        }
    }
}

impl Storage for BoundedStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.fits(offset.checked_add(buf.len() as u64))?;
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.fits(Some(len))?;
        self.inner.set_len(len)
    }
    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.fits(offset.checked_add(len))?;
        self.inner.write_zeroes(offset, len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.fits(offset.checked_add(len))?;
        self.inner.punch_hole(offset, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.fits(offset.checked_add(len))?;
        self.inner.allocate(offset, len)
    }
}

/// A second fuzz body for the write path: open `data` read-write (growing
/// the file to at most 64 MiB past its size), write, zero, discard,
/// flush, check and close, then open the result read-only and probe it.
/// Every error is fine; a panic is a bug. Returns the final probe's
/// verdict, `None` when the image did not open for writing.
pub fn open_write_check(data: &[u8]) -> Option<Verdict> {
    let storage = Arc::new(BoundedStorage::new(data.to_vec(), data.len() as u64 + (64 << 20)));
    let opts = OpenOptions::new().format(ImageFormat::Qcow2).backing(BackingPolicy::Ignore);
    let dynamic: Arc<dyn Storage> = storage.clone();
    let image = Image::open_storage(dynamic, &opts).ok()?;
    exercise_writes(image);
    let after: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(storage.inner.to_bytes()));
    Some(probe_storage(after, ProbeLimits::default()))
}

/// The passphrase of the `open_secret_check` seeds.
pub const FUZZ_SECRET: &[u8] = b"fuzz";

/// The PBKDF2 work (in SHA-256 HMACs) an `open_secret_check` input may make
/// an unlock run: a few milliseconds. The seeds' headers, made with the
/// shortest `iter-time`, need 1000 to 8000 per key slot; a mutated count
/// beyond this is refused before any PBKDF2 runs, as an image over
/// oxqcow's default bound is.
pub const FUZZ_UNLOCK_WORK: u64 = 100_000;

/// The fuzz body for encrypted images (LUKS, qcow2 with LUKS or AES, qcow
/// with AES): `data` is probed for its format and unlocked with
/// [`FUZZ_SECRET`], so that PBKDF2, the anti-forensic merge, the key
/// slot's decryption with whatever cipher the header names, and the
/// encrypted read, write and copy-on-write paths all see hostile bytes.
/// Then as [`open_write_check`]: writes, close, and a read-only probe of
/// the result (unlocked again). Every error is fine; a panic is a bug.
/// `None` when the image did not open for writing.
pub fn open_secret_check(data: &[u8]) -> Option<Verdict> {
    let storage = Arc::new(BoundedStorage::new(data.to_vec(), data.len() as u64 + (64 << 20)));
    let format = oxqcow::probe_format(&*storage, None).ok()?;
    let dynamic: Arc<dyn Storage> = storage.clone();
    let image = Image::open_storage(dynamic, &secret_options(format, false)).ok()?;
    exercise_writes(image);
    let after: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(storage.inner.to_bytes()));
    Some(probe_with(after, &secret_options(format, true), ProbeLimits::default()))
}

/// Options that unlock an image of `format` with [`FUZZ_SECRET`] (each
/// format takes its own option), within [`FUZZ_UNLOCK_WORK`].
pub fn secret_options(format: ImageFormat, read_only: bool) -> OpenOptions {
    let mut opts = OpenOptions::new().read_only(read_only).format(format).backing(BackingPolicy::Ignore);
    match format {
        ImageFormat::Luks => opts.key_secret = Some(FUZZ_SECRET.to_vec()),
        _ => opts.passphrase = Some(FUZZ_SECRET.to_vec()),
    }
    opts.max_unlock_work = Some(FUZZ_UNLOCK_WORK);
    opts
}

/// What [`open_repair_check`] saw.
#[derive(Debug)]
pub struct RepairRun {
    /// `check -r all`'s report, or its error.
    pub repair: Result<CheckReport, String>,
    /// A plain check right after a repair that returned a report.
    pub recheck: Option<Result<CheckReport, String>>,
    /// The maintenance operations that failed, with their errors.
    pub refused: Vec<String>,
    /// The read-only probe of the file after the repair and the
    /// maintenance operations, closed.
    pub after: Verdict,
}

/// The fuzz body for repair and maintenance: open `data` read-write for
/// repair (growing the file to at most 64 MiB past its size), run `check
/// -r all` and a check after it, then what `qemu-img snapshot`, `resize`,
/// `amend` and `bitmap` do: create, apply and delete an internal snapshot
/// around a write, grow and shrink, change the refcount width and back,
/// add and remove a bitmap; close, and probe the result read-only. Every
/// error is fine; a panic is a bug. `None` when the image did not open.
pub fn open_repair_check(data: &[u8]) -> Option<RepairRun> {
    let storage = Arc::new(BoundedStorage::new(data.to_vec(), data.len() as u64 + (64 << 20)));
    let mut opts = OpenOptions::new().format(ImageFormat::Qcow2).backing(BackingPolicy::Ignore);
    opts.repair = true;
    let dynamic: Arc<dyn Storage> = storage.clone();
    let image = Image::open_storage(dynamic, &opts).ok()?;
    let repair = image.check(Some(RepairMode::All)).map_err(|e| e.to_string());
    let recheck = repair.is_ok().then(|| image.check(None).map_err(|e| e.to_string()));
    let mut refused = image.as_qcow2().map(|q| maintain(q, image.len())).unwrap_or_default();
    if let Err(e) = image.close() {
        refused.push(format!("close: {e}"));
    }
    let after: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(storage.inner.to_bytes()));
    Some(RepairRun { repair, recheck, refused, after: probe_storage(after, ProbeLimits::default()) })
}

/// The maintenance operations of [`open_repair_check`] on an image of
/// `size` guest bytes, each tried whatever the others did (the image may
/// be hostile); returns the failures.
fn maintain(q: &Qcow2, size: u64) -> Vec<String> {
    let cs = q.geometry().cluster_size();
    let mut refused = Vec::new();
    let mut step = |what: &str, result: oxqcow::Result<()>| {
        if let Err(e) = result {
            refused.push(format!("{what}: {e}"));
        }
    };
    step("snapshot create", q.snapshot_create("fuzz").map(drop));
    if size > 0 {
        step("write", q.write_at(&pattern(3, size / 2, 3000.min(size - size / 2)), size / 2));
    }
    step("snapshot apply", q.snapshot_apply("fuzz"));
    step("snapshot delete", q.snapshot_delete("fuzz"));
    step("grow", q.resize(size.saturating_add(3 * cs), Preallocation::Off));
    step("shrink", q.resize(size, Preallocation::Off));
    let bits = q.geometry().refcount_bits();
    for width in [if bits == 16 { 4 } else { 16 }, bits] {
        let amend = AmendOptions { refcount_bits: Some(width), ..Default::default() };
        step(&format!("amend refcount_bits={width}"), q.amend(&amend, &mut |_, _| {}));
    }
    step("bitmap add", q.bitmap_add("fuzz", None, true));
    if size > 0 {
        step("write", q.write_at(&[7; 512][..512.min(size) as usize], 0));
    }
    step("bitmap remove", q.bitmap_remove("fuzz"));
    step("flush", q.flush());
    refused
}

/// Writes, zeroes, discards and flushes at spread offsets of `image`, runs
/// check, and closes it; errors are ignored (the image may be
/// hostile).
fn exercise_writes(image: Image) {
    let size = image.len();
    let cs = image.as_qcow2().map_or(512, |q| q.geometry().cluster_size());
    if size > 0 {
        let at = |frac: u64| size / 8 * frac;
        let _ = image.write_at(&pattern(1, 0, 4096.min(size)), 0);
        let _ = image.write_at(&pattern(2, at(3), 700.min(size - at(3))), at(3));
        let _ = image.write_zeroes_at(at(5), (2 * cs).min(size - at(5)), false);
        let _ = image.write_zeroes_at(at(6), (2 * cs).min(size - at(6)), true);
        let _ = image.discard(at(4), (3 * cs).min(size - at(4)));
        let _ = image.write_at(&[9], size - 1);
        let _ = image.flush();
        let _ = image.check(None);
    }
    let _ = image.close();
}

/// Valid images of several geometries, made by the library and small
/// enough to fuzz: data, zero clusters, discards, compressed clusters and
/// an internal snapshot.
pub fn seed_images() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let configs: [(&str, u64, u32, Compat, bool); 6] = [
        ("c512-r16-v3", 512, 16, Compat::V3, false),
        ("c512-r16-v2", 512, 16, Compat::V2, false),
        ("c512-r1-v3", 512, 1, Compat::V3, false),
        ("c512-r64-v3-lazy", 512, 64, Compat::V3, true),
        ("c4k-r16-v3", 4096, 16, Compat::V3, false),
        ("c1k-r4-v3", 1024, 4, Compat::V3, false),
    ];
    for (name, cs, rb, compat, lazy) in configs {
        let storage = Arc::new(MemoryStorage::new());
        let opts =
            CreateOptions::qcow2(64 * cs + 512).cluster_size(cs).refcount_bits(rb).compat(compat).lazy_refcounts(lazy);
        let img = Image::create_storage(storage.clone(), &opts).expect("seed image");
        img.write_at(&pattern(1, 100, 3 * cs), 100).expect("seed write");
        img.write_zeroes_at(cs, cs, false).expect("seed zero write");
        img.discard(2 * cs, cs).expect("seed discard");
        img.write_at(&pattern(2, 40 * cs, 10), 40 * cs).expect("seed write");
        let q = img.as_qcow2().expect("qcow2");
        q.write_compressed(&[7u8; 1024 * 4][..cs as usize], 8 * cs).expect("seed compressed write");
        // Snapshots share clusters: they need refcounts above 1.
        if cs == 512 && rb > 1 {
            q.snapshot_create("s1").expect("seed snapshot");
            img.write_at(&pattern(3, 0, 700), 0).expect("seed write");
        }
        img.write_at(&[9], img.len() - 1).expect("seed write");
        img.close().expect("seed close");
        out.push((name.to_string(), storage.to_bytes()));
    }
    out.push(("c16k-extl2-zstd-bitmap".to_string(), subcluster_seed()));
    out
}

/// A seed with the structures of later QEMU versions: extended L2 entries
/// (allocated, zero and unallocated subclusters in one cluster), a zstd
/// compressed cluster and a persistent dirty bitmap with set bits.
fn subcluster_seed() -> Vec<u8> {
    const CS: u64 = 16 << 10;
    let storage = Arc::new(MemoryStorage::new());
    let opts = CreateOptions {
        extended_l2: true,
        compression_type: oxqcow::CompressionType::Zstd,
        ..CreateOptions::qcow2(16 * CS + 512).cluster_size(CS)
    };
    let img = Image::create_storage(storage.clone(), &opts).expect("seed image");
    let q = img.as_qcow2().expect("qcow2");
    q.bitmap_add("b0", Some(4096), true).expect("seed bitmap");
    img.write_at(&pattern(4, 1000, 3000), 1000).expect("seed write");
    img.write_zeroes_at(8192, 1024, false).expect("seed zero write");
    img.write_at(&pattern(5, 3 * CS + 512, 2 * CS), 3 * CS + 512).expect("seed write");
    img.discard(4 * CS, CS).expect("seed discard");
    q.write_compressed(&[3u8; CS as usize], 8 * CS).expect("seed compressed write");
    img.write_at(&[9], img.len() - 1).expect("seed write");
    img.close().expect("seed close");
    storage.to_bytes()
}

/// Applies a few random byte-level mutations: flipped bits, overwritten
/// bytes and big-endian words with boundary values, truncation.
pub fn mutate(bytes: &mut Vec<u8>, rng: &mut Prng) {
    const WORDS: [u64; 10] =
        [0, 1, 0x200, 0xffff_ffff, 0x7fff_ffff, 1 << 31, 1 << 62, u64::MAX, 0x8000_0000_0000_0000, 0x1_0000];
    if bytes.is_empty() {
        return;
    }
    for _ in 0..rng.range(1, 5) {
        // Bias towards the header and the first metadata clusters.
        let span = if rng.chance(2, 3) { (bytes.len() as u64).min(2048) } else { bytes.len() as u64 };
        let at = rng.below(span) as usize;
        match rng.below(5) {
            0 => bytes[at] ^= 1 << rng.below(8),
            1 => bytes[at] = rng.next_u64() as u8,
            2 | 3 => {
                let width = if rng.chance(1, 2) { 4 } else { 8 };
                let w = WORDS[rng.below(WORDS.len() as u64) as usize].to_be_bytes();
                let at = at & !(width - 1);
                let end = (at + width).min(bytes.len());
                bytes[at..end].copy_from_slice(&w[8 - width..8 - width + end - at]);
            }
            _ => {
                let keep = rng.below(bytes.len() as u64) as usize;
                bytes.truncate(keep.max(1));
            }
        }
    }
}
