//! Random workloads and the harness that applies them to an image and to
//! the reference model side by side.
//!
//! Operations are generated as [`OpSpec`]s, which say where to act as a
//! fraction of the disk (with a bias towards sector and cluster
//! boundaries) and are resolved into concrete [`Op`]s against the disk
//! size at the time they run, so a shrink earlier in the sequence never
//! makes a later operation invalid and proptest can shrink sequences freely.

use std::sync::Arc;

use oxqcow::{BlockDevice, Image, MemoryStorage, OpenOptions, Preallocation, Storage};
use proptest::prelude::*;

use crate::model::{pattern, ImageConfig, Model, Op};

/// Where an operation starts, relative to the disk size.
#[derive(Clone, Copy, Debug)]
pub struct Pos {
    /// Position as a fraction of the disk size, in 1/65536.
    pub frac: u16,
    /// 0: any byte; 1: sector aligned; 2: cluster aligned; 3: just before
    /// a cluster boundary.
    pub align: u8,
}

/// How long an operation is.
#[derive(Clone, Copy, Debug)]
pub enum Len {
    /// A few bytes (0 to 1999).
    Bytes(u16),
    /// About `n + 1` clusters, give or take `delta` bytes.
    Clusters(u8, i16),
    /// Up to the end of the disk.
    ToEnd,
}

/// An operation to generate; resolved with [`OpSpec::resolve`].
#[derive(Clone, Copy, Debug)]
pub enum OpSpec {
    /// A write.
    Write(Pos, Len, u8),
    /// A zero write.
    WriteZeroes(Pos, Len, bool),
    /// A discard.
    Discard(Pos, Len),
    /// A flush.
    Flush,
    /// A resize to a fraction of the largest size (in 1/65536), cluster
    /// aligned unless the flag says sector aligned; a grow preallocates
    /// as the last field selects (0 off, 1 metadata, 2 falloc, 3 full).
    Resize(u16, bool, u8),
    /// Close and reopen.
    Reopen,
    /// Reopen a copy taken after a flush, without closing.
    CrashReopen,
    /// Create a snapshot.
    SnapshotCreate,
    /// Revert to a snapshot.
    SnapshotApply(u8),
    /// Delete a snapshot.
    SnapshotDelete(u8),
}

impl OpSpec {
    /// The concrete operation on a disk of `size` bytes (at least 512)
    /// with clusters of `cs` bytes, growing to at most `max_size`.
    pub fn resolve(&self, size: u64, cs: u64, max_size: u64) -> Op {
        let place = |pos: Pos, len: Len| -> (u64, u64) {
            let base = u64::from(pos.frac) * size / 65536;
            let offset = match pos.align {
                0 => base,
                1 => base / 512 * 512,
                2 => base / cs * cs,
                _ => (base / cs * cs + cs).saturating_sub(1 + u64::from(pos.frac % 7)),
            }
            .min(size - 1);
            let room = size - offset;
            let len = match len {
                Len::Bytes(n) => u64::from(n % 2000),
                Len::Clusters(n, delta) => {
                    ((u64::from(n % 4) + 1) * cs).saturating_add_signed(i64::from(delta % 200)).max(1)
                }
                Len::ToEnd => room,
            };
            (offset, len.min(room))
        };
        match *self {
            OpSpec::Write(p, l, seed) => {
                let (offset, len) = place(p, l);
                Op::Write { offset, len, seed }
            }
            OpSpec::WriteZeroes(p, l, may_unmap) => {
                let (offset, len) = place(p, l);
                Op::WriteZeroes { offset, len, may_unmap }
            }
            OpSpec::Discard(p, l) => {
                let (offset, len) = place(p, l);
                Op::Discard { offset, len }
            }
            OpSpec::Flush => Op::Flush,
            OpSpec::Resize(frac, sector_aligned, mode) => {
                let raw = u64::from(frac) * max_size / 65536;
                let unit = if sector_aligned { 512 } else { cs };
                let new = (raw.div_ceil(unit) * unit).clamp(512, max_size);
                let prealloc = match mode % 4 {
                    _ if new <= size => Preallocation::Off,
                    1 => Preallocation::Metadata,
                    2 => Preallocation::Falloc,
                    3 => Preallocation::Full,
                    _ => Preallocation::Off,
                };
                Op::Resize { size: new, prealloc }
            }
            OpSpec::Reopen => Op::Reopen,
            OpSpec::CrashReopen => Op::CrashReopen,
            OpSpec::SnapshotCreate => Op::SnapshotCreate,
            OpSpec::SnapshotApply(i) => Op::SnapshotApply(i),
            OpSpec::SnapshotDelete(i) => Op::SnapshotDelete(i),
        }
    }
}

fn pos() -> impl Strategy<Value = Pos> {
    (any::<u16>(), 0u8..4).prop_map(|(frac, align)| Pos { frac, align })
}

fn len() -> impl Strategy<Value = Len> {
    prop_oneof![
        3 => any::<u16>().prop_map(Len::Bytes),
        4 => (any::<u8>(), any::<i16>()).prop_map(|(n, d)| Len::Clusters(n, d)),
        1 => Just(Len::ToEnd),
    ]
}

/// One random operation; writes dominate so images fill up.
pub fn op_spec() -> impl Strategy<Value = OpSpec> {
    prop_oneof![
        10 => (pos(), len(), any::<u8>()).prop_map(|(p, l, s)| OpSpec::Write(p, l, s)),
        3 => (pos(), len(), any::<bool>()).prop_map(|(p, l, u)| OpSpec::WriteZeroes(p, l, u)),
        3 => (pos(), len()).prop_map(|(p, l)| OpSpec::Discard(p, l)),
        2 => Just(OpSpec::Flush),
        2 => (any::<u16>(), any::<bool>(), any::<u8>()).prop_map(|(f, s, p)| OpSpec::Resize(f, s, p)),
        1 => Just(OpSpec::Reopen),
        1 => Just(OpSpec::CrashReopen),
        1 => Just(OpSpec::SnapshotCreate),
        1 => any::<u8>().prop_map(OpSpec::SnapshotApply),
        1 => any::<u8>().prop_map(OpSpec::SnapshotDelete),
    ]
}

/// A sequence of up to `max` operations.
pub fn op_specs(max: usize) -> impl Strategy<Value = Vec<OpSpec>> {
    prop::collection::vec(op_spec(), 1..=max)
}

/// Applies [`Op`]s to a qcow2 image in memory and to a [`Model`].
pub struct Harness {
    /// How the image was created.
    pub config: ImageConfig,
    /// The host bytes.
    pub storage: Arc<MemoryStorage>,
    /// The open image (always `Some` between calls).
    pub image: Option<Image>,
    /// The expected content.
    pub model: Model,
    /// The largest size resizes may reach.
    pub max_size: u64,
    /// The operations applied so far (for failure messages).
    pub log: Vec<Op>,
    /// How the image is (re)opened.
    pub open_options: OpenOptions,
    /// Internal snapshots: name and content.
    pub snapshots: Vec<(String, Vec<u8>)>,
    /// Snapshots created so far (for fresh names).
    pub snapshots_made: u32,
}

impl Harness {
    /// Creates an image of `size` bytes, closes it and opens it again with
    /// `open_options` (every later reopen uses them too).
    pub fn new(config: ImageConfig, size: u64, max_size: u64, open_options: OpenOptions) -> Result<Self, String> {
        let storage = Arc::new(MemoryStorage::new());
        Image::create_storage(storage.clone(), &config.create_options(size))
            .and_then(|i| i.close())
            .map_err(|e| format!("create {config:?}: {e}"))?;
        let st: Arc<dyn Storage> = storage.clone();
        let image = Image::open_storage(st, &open_options).map_err(|e| format!("open {open_options:?}: {e}"))?;
        Ok(Harness {
            config,
            storage,
            image: Some(image),
            model: Model::new(size, config.cluster_size),
            max_size,
            log: Vec::new(),
            open_options,
            snapshots: Vec::new(),
            snapshots_made: 0,
        })
    }

    /// Open options with QEMU's minimum caches (two L2 tables, four
    /// refcount blocks, so tables are evicted and written back all the
    /// time) when `small_cache`, and discards passed down to the host
    /// (`pass-discard-request`) when `passthrough`.
    pub fn open_options(config: &ImageConfig, small_cache: bool, passthrough: bool) -> OpenOptions {
        let mut o = OpenOptions::new();
        if small_cache {
            o.l2_cache_size = Some(2 * config.cluster_size);
            o.refcount_cache_size = Some(4 * config.cluster_size);
        }
        o.discard_passthrough = passthrough;
        o
    }

    /// The open image.
    pub fn image(&self) -> &Image {
        self.image.as_ref().expect("image is open")
    }

    /// Resolves and applies a generated operation.
    pub fn apply_spec(&mut self, spec: &OpSpec) -> Result<(), String> {
        let op = spec.resolve(self.model.len(), self.config.cluster_size, self.max_size);
        self.apply(&op)
    }

    /// Applies `op` to the image and the model.
    pub fn apply(&mut self, op: &Op) -> Result<(), String> {
        self.log.push(*op);
        let fail = |e: oxqcow::Error| format!("{op:?} failed: {e}");
        match *op {
            Op::Write { offset, len, seed } => {
                self.image().write_at(&pattern(seed, offset, len), offset).map_err(fail)?
            }
            Op::WriteZeroes { offset, len, may_unmap } => {
                self.image().write_zeroes_at(offset, len, may_unmap).map_err(fail)?
            }
            Op::Discard { offset, len } => self.image().discard(offset, len).map_err(fail)?,
            Op::Flush => self.image().flush().map_err(fail)?,
            Op::Resize { size, prealloc } => self.image().resize(size, prealloc).map_err(fail)?,
            Op::Reopen => {
                self.image.take().expect("open").close().map_err(fail)?;
                let storage: Arc<dyn Storage> = self.storage.clone();
                self.image = Some(Image::open_storage(storage, &self.open_options).map_err(fail)?);
            }
            Op::CrashReopen => {
                // A crash right after a flush leaves a clean image.
                self.image().flush().map_err(fail)?;
                let copy = Arc::new(MemoryStorage::from_bytes(self.storage.to_bytes()));
                let storage: Arc<dyn Storage> = copy.clone();
                let reopened = Image::open_storage(storage, &self.open_options).map_err(fail)?;
                // The old handle closes its own (now unused) storage.
                drop(self.image.replace(reopened));
                self.storage = copy;
            }
            Op::SnapshotCreate => {
                let name = format!("snap{}", self.snapshots_made);
                let q = self.image().as_qcow2().expect("qcow2");
                match q.snapshot_create(&name) {
                    Ok(_) => {
                        self.snapshots_made += 1;
                        self.snapshots.push((name, self.model.data.clone()));
                    }
                    // 1-bit refcounts cannot count a second reference: the
                    // snapshot is refused and nothing changes (verify
                    // checks that).
                    Err(_) if self.config.refcount_bits == 1 => {}
                    Err(e) => return Err(fail(e)),
                }
            }
            Op::SnapshotApply(i) => {
                if !self.snapshots.is_empty() {
                    let (name, data) = self.snapshots[usize::from(i) % self.snapshots.len()].clone();
                    self.image().as_qcow2().expect("qcow2").snapshot_apply(&name).map_err(fail)?;
                    self.model.data = data;
                }
                return Ok(());
            }
            Op::SnapshotDelete(i) => {
                if !self.snapshots.is_empty() {
                    let (name, _) = self.snapshots.remove(usize::from(i) % self.snapshots.len());
                    self.image().as_qcow2().expect("qcow2").snapshot_delete(&name).map_err(fail)?;
                }
            }
        }
        self.model.apply(op);
        Ok(())
    }

    /// Compares the whole disk with the model and runs `check`: no
    /// corruption, no leak, no check error.
    pub fn verify(&self) -> Result<(), String> {
        let img = self.image();
        if img.len() != self.model.len() {
            return Err(format!("disk size {} but the model has {}", img.len(), self.model.len()));
        }
        let mut buf = vec![0u8; self.model.len() as usize];
        img.read_at(&mut buf, 0).map_err(|e| format!("reading the whole disk: {e}"))?;
        if let Some(at) = self.model.first_difference(&buf) {
            return Err(format!(
                "content differs at offset {at}: image has {:#04x}, model {:#04x}",
                buf[at as usize], self.model.data[at as usize]
            ));
        }
        let report = img.check(None).map_err(|e| format!("check failed: {e}"))?;
        if report.corruptions != 0 || report.leaks != 0 || report.check_errors != 0 {
            return Err(format!(
                "check: {} corruptions, {} leaks, {} check errors: {:?}",
                report.corruptions, report.leaks, report.check_errors, report.messages
            ));
        }
        Ok(())
    }
}
