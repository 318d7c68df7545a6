//! Random workloads and the harness that applies them to an image and to
//! the reference model side by side.
//!
//! Operations are generated as [`OpSpec`]s, which say where to act as a
//! fraction of the disk (with a bias towards sector and cluster
//! boundaries) and are resolved into concrete [`Op`]s against the disk
//! size at the time they run, so a shrink earlier in the sequence never
//! makes a later operation invalid and proptest can shrink sequences freely.
//!
//! Beside the content model the harness keeps the allocation model
//! ([`Layout`]) of the active layer and of every snapshot, predicts from it
//! which compressed writes, amends and snapshot operations the engine must
//! refuse (a refusal must leave everything unchanged), and compares it with
//! the image's block status after every step.

use std::collections::HashSet;
use std::sync::Arc;

use oxqcow::compress::Codec;
use oxqcow::{
    BlockDevice, Compat, CompressionType, ErrorKind, Image, ImageFormat, MemoryStorage, OpenOptions, Preallocation,
    Qcow2, Storage,
};

use crate::layout::{expand_zero_tree, observed_states, BackingMap, Cluster, Layout, State, SubclusterLayout};
use crate::model::{compressible_pattern, pattern, AmendOp, ImageConfig, Model, Op};

mod spec;

pub use spec::{backing_op_spec, extended_l2_op_spec, op_spec, op_specs, Len, OpSpec, Pos};

/// The name overlays record for their backing file (next to them).
pub const BACKING_NAME: &str = "backing.img";

/// A backing file for overlays: the open image every (re)open of an
/// overlay attaches, its content, and what block status reports for it.
#[derive(Clone)]
pub struct Backing {
    /// The backing image, open read-only.
    pub image: Arc<Image>,
    /// Its format.
    pub format: ImageFormat,
    /// Its disk content.
    pub content: Arc<Vec<u8>>,
    /// Where block status reports zeros without data.
    pub map: Arc<BackingMap>,
    /// Its host bytes (to write the file for QEMU).
    pub bytes: Vec<u8>,
}

impl Backing {
    /// A raw backing file holding `content` (a multiple of 512 bytes).
    pub fn raw(content: Vec<u8>) -> Result<Self, String> {
        let storage = Arc::new(MemoryStorage::from_bytes(content.clone()));
        let opts = OpenOptions::new().read_only(true).format(ImageFormat::Raw);
        let image = Image::open_storage(storage, &opts).map_err(|e| format!("opening the raw backing file: {e}"))?;
        Ok(Backing {
            image: Arc::new(image),
            format: ImageFormat::Raw,
            map: Arc::new(BackingMap::all_data(content.len() as u64)),
            content: Arc::new(content.clone()),
            bytes: content,
        })
    }

    /// A qcow2 backing file: the image `h` built (closed here), with the
    /// allocation its layout model says.
    pub fn qcow2(mut h: Harness) -> Result<Self, String> {
        h.image.take().expect("open").close().map_err(|e| format!("closing the backing file: {e}"))?;
        let bytes = h.storage.to_bytes();
        let storage = Arc::new(MemoryStorage::from_bytes(bytes.clone()));
        let image = Image::open_storage(storage, &OpenOptions::new().read_only(true))
            .map_err(|e| format!("opening the qcow2 backing file: {e}"))?;
        Ok(Backing {
            image: Arc::new(image),
            format: ImageFormat::Qcow2,
            map: Arc::new(BackingMap::from_layout(&h.layout)),
            content: Arc::new(h.model.data),
            bytes,
        })
    }
}

/// An internal snapshot as the harness knows it.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Its name.
    pub name: String,
    /// Its content (and so its disk size).
    pub data: Vec<u8>,
    /// Its allocation.
    pub clusters: Vec<Cluster>,
}

/// How often the interesting outcomes happened (to show a workload
/// reaches them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Clusters stored compressed.
    pub compressed: u64,
    /// Compressed writes refused (over a cluster with a host offset).
    pub compressed_refused: u64,
    /// Amends that changed the refcount width.
    pub width_changes: u64,
    /// Downgrades to compat 0.10 that succeeded.
    pub downgrades: u64,
    /// Amends and snapshot operations refused as predicted.
    pub refusals: u64,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        self.compressed += o.compressed;
        self.compressed_refused += o.compressed_refused;
        self.width_changes += o.width_changes;
        self.downgrades += o.downgrades;
        self.refusals += o.refusals;
    }
}

/// Opens a qcow2 image (attaching `backing`) or any image on `storage`.
pub fn open_image(storage: Arc<dyn Storage>, opts: &OpenOptions, backing: Option<&Backing>) -> oxqcow::Result<Image> {
    open_image_with(storage, None, opts, backing)
}

/// The same, with `data` as the image's external data file.
pub fn open_image_with(
    storage: Arc<dyn Storage>,
    data: Option<Arc<dyn Storage>>,
    opts: &OpenOptions,
    backing: Option<&Backing>,
) -> oxqcow::Result<Image> {
    if data.is_some() {
        return Ok(Image::Qcow2(Qcow2::open_with(storage, opts, backing.map(|b| b.image.clone()), data)?));
    }
    match backing {
        Some(b) => Ok(Image::Qcow2(Qcow2::open_with_backing(storage, opts, Some(b.image.clone()))?)),
        None => Image::open_storage(storage, opts),
    }
}

/// Whether a refusal is what `e` says (not a failure of the image).
fn is_refusal(e: &oxqcow::Error) -> bool {
    matches!(e.kind(), ErrorKind::InvalidArgument | ErrorKind::Unsupported)
}

/// Applies [`Op`]s to a qcow2 image in memory and to a [`Model`].
pub struct Harness {
    /// How the image is configured now (amend changes compat, refcount
    /// width, lazy refcounts and, by downgrading, the compression type).
    pub config: ImageConfig,
    /// The host bytes.
    pub storage: Arc<MemoryStorage>,
    /// The external data file's bytes, for configurations with one.
    pub data: Option<Arc<MemoryStorage>>,
    /// The open image (always `Some` between calls).
    pub image: Option<Image>,
    /// The expected content.
    pub model: Model,
    /// The expected allocation of the active layer.
    pub layout: Layout,
    /// With extended L2 entries: the expected allocation per subcluster
    /// (compared instead of `layout`, which is per cluster).
    pub subclusters: Option<SubclusterLayout>,
    /// The largest size resizes may reach.
    pub max_size: u64,
    /// The operations applied so far (for failure messages).
    pub log: Vec<Op>,
    /// How the image is (re)opened.
    pub open_options: OpenOptions,
    /// Internal snapshots.
    pub snapshots: Vec<Snapshot>,
    /// Snapshots created so far (for fresh names).
    pub snapshots_made: u32,
    /// The backing file, for overlays.
    pub backing: Option<Backing>,
    /// What happened so far.
    pub stats: Stats,
}

impl Harness {
    /// Creates an image of `size` bytes, closes it and opens it again with
    /// `open_options` (every later reopen uses them too).
    pub fn new(config: ImageConfig, size: u64, max_size: u64, open_options: OpenOptions) -> Result<Self, String> {
        Self::create(config, size, max_size, open_options, None)
    }

    /// The same for an overlay of `backing` (recorded as [`BACKING_NAME`]).
    pub fn with_backing(
        config: ImageConfig,
        size: u64,
        max_size: u64,
        open_options: OpenOptions,
        backing: Backing,
    ) -> Result<Self, String> {
        Self::create(config, size, max_size, open_options, Some(backing))
    }

    fn create(
        config: ImageConfig,
        size: u64,
        max_size: u64,
        open_options: OpenOptions,
        backing: Option<Backing>,
    ) -> Result<Self, String> {
        let storage = Arc::new(MemoryStorage::new());
        let data = config.data_file.map(|_| Arc::new(MemoryStorage::new()));
        if data.is_some() && backing.is_some() {
            return Err("the harness does not model overlays with an external data file".into());
        }
        let q = match &data {
            Some(d) => Qcow2::create_with_data_file(storage.clone(), d.clone(), &config.create_options(size)),
            None => Qcow2::create(storage.clone(), &config.create_options(size)),
        }
        .map_err(|e| format!("create {config:?}: {e}"))?;
        if let Some(b) = &backing {
            q.set_backing_file(Some(BACKING_NAME), Some(b.format.name()))
                .map_err(|e| format!("recording the backing file: {e}"))?;
        }
        q.close().map_err(|e| format!("close after create: {e}"))?;
        let st: Arc<dyn Storage> = storage.clone();
        let image = open_image_with(st, data.clone().map(|d| d as Arc<dyn Storage>), &open_options, backing.as_ref())
            .map_err(|e| format!("open {open_options:?}: {e}"))?;
        let cs = config.cluster_size;
        let v2 = config.compat == Compat::V2;
        let model = match &backing {
            Some(b) => Model::with_backing(size, cs, b.content.clone(), v2),
            None => Model::new(size, cs),
        };
        let mut layout = Layout::new(size, cs, config.compat.version(), backing.as_ref().map(|b| b.map.clone()));
        if config.data_file == Some(true) {
            // A raw data file is mapped whole from the start (QEMU
            // preallocates the metadata).
            layout = Layout::new(0, cs, config.compat.version(), None);
            layout.resize(size, Preallocation::Metadata, &HashSet::new());
        }
        let subclusters =
            config.extended_l2.then(|| SubclusterLayout::new(size, cs, backing.as_ref().map(|b| b.map.clone())));
        Ok(Harness {
            config,
            storage,
            data,
            image: Some(image),
            model,
            layout,
            subclusters,
            max_size,
            log: Vec::new(),
            open_options,
            snapshots: Vec::new(),
            snapshots_made: 0,
            backing,
            stats: Stats::default(),
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

    fn qcow2(&self) -> &Qcow2 {
        self.image().as_qcow2().expect("qcow2")
    }

    /// Ids of the host clusters snapshots reference.
    fn shared(&self) -> HashSet<u64> {
        self.snapshots.iter().flat_map(|s| s.clusters.iter().filter(|c| c.id != 0).map(|c| c.id)).collect()
    }

    /// Whether a refcount of `bits` bits may overflow with `trees` trees
    /// (active layer and snapshots) referencing clusters: each tree holds
    /// one reference on a shared cluster, and compressed clusters packed
    /// into one host cluster hold one each (how many share a host cluster
    /// is not modelled, but stays far below 16-bit refcounts here).
    fn may_overflow(&self, bits: u32, trees: u64) -> bool {
        let max = if bits >= 64 { u64::MAX } else { (1u64 << bits) - 1 };
        let compressed = self.layout.any_compressed()
            || self.snapshots.iter().any(|s| s.clusters.iter().any(|c| c.state == crate::layout::State::Compressed));
        trees > max || (bits < 16 && compressed)
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
        if self.refused_with_data_file(op)? {
            return Ok(());
        }
        let shared = self.shared();
        if let Some(sub) = &mut self.subclusters {
            match *op {
                Op::Write { offset, len, .. } => sub.write(offset, len),
                Op::WriteZeroes { offset, len, may_unmap } => sub.write_zeroes(offset, len, may_unmap),
                Op::Discard { offset, len } => sub.discard(offset, len),
                Op::Flush | Op::Reopen | Op::CrashReopen => {}
                _ => return Err(format!("{op:?}: the subcluster model does not cover this operation")),
            }
        }
        match *op {
            Op::Write { offset, len, seed } => {
                self.image().write_at(&pattern(seed, offset, len), offset).map_err(fail)?;
                self.layout.write(offset, len, &shared);
            }
            Op::WriteCompressed { offset, len, seed } => return self.write_compressed(op, offset, len, seed),
            Op::WriteZeroes { offset, len, may_unmap } => {
                self.image().write_zeroes_at(offset, len, may_unmap).map_err(fail)?;
                self.layout.write_zeroes(offset, len, may_unmap, &shared);
            }
            Op::Discard { offset, len } => {
                self.image().discard(offset, len).map_err(fail)?;
                self.layout.discard(offset, len);
            }
            Op::Flush => self.image().flush().map_err(fail)?,
            Op::Resize { size, prealloc } => {
                if self.layout.version == 2 && !self.snapshots.is_empty() {
                    return match self.image().resize(size, prealloc) {
                        Ok(()) => Err(format!("{op:?} succeeded on a version 2 image with snapshots (QEMU refuses)")),
                        Err(e) if is_refusal(&e) => {
                            self.stats.refusals += 1;
                            Ok(())
                        }
                        Err(e) => Err(fail(e)),
                    };
                }
                self.image().resize(size, prealloc).map_err(fail)?;
                self.layout.resize(size, self.growth_prealloc(prealloc), &shared);
            }
            Op::Reopen => self.reopen(op)?,
            Op::CrashReopen => self.crash_reopen(op)?,
            Op::SnapshotCreate => self.snapshot_create(op)?,
            Op::SnapshotApply(i) => return self.snapshot_apply(op, i),
            Op::SnapshotDelete(i) => self.snapshot_delete(op, i)?,
            Op::Amend(a) => return self.amend(op, a),
        }
        self.model.apply(op);
        Ok(())
    }

    /// With an external data file QEMU refuses internal snapshots and
    /// compressed clusters (-ENOTSUP), changing nothing: whether `op` was
    /// such a refusal (an error when it was not refused as it must be).
    fn refused_with_data_file(&mut self, op: &Op) -> Result<bool, String> {
        if self.data.is_none() {
            return Ok(false);
        }
        let fail = |e: oxqcow::Error| format!("{op:?} failed: {e}");
        let refused = match *op {
            Op::SnapshotCreate => Some(self.qcow2().snapshot_create("snap").map(|_| ())),
            Op::WriteCompressed { offset, len, seed } => {
                Some(self.qcow2().write_compressed(&compressible_pattern(seed, offset, len), offset))
            }
            _ => None,
        };
        match refused {
            Some(Err(e)) if e.kind() == ErrorKind::Unsupported => {
                self.stats.refusals += 1;
                Ok(true)
            }
            Some(Err(e)) => Err(fail(e)),
            Some(Ok(())) => Err(format!("{op:?} succeeded on an image with an external data file")),
            None => Ok(false),
        }
    }

    /// Closes and reopens the image.
    fn reopen(&mut self, op: &Op) -> Result<(), String> {
        let fail = |e: oxqcow::Error| format!("{op:?} failed: {e}");
        self.image.take().expect("open").close().map_err(fail)?;
        let storage: Arc<dyn Storage> = self.storage.clone();
        let data = self.data.clone().map(|d| d as Arc<dyn Storage>);
        self.image = Some(open_image_with(storage, data, &self.open_options, self.backing.as_ref()).map_err(fail)?);
        Ok(())
    }

    /// Reopens a copy of the storage as a crash right after a flush leaves it.
    fn crash_reopen(&mut self, op: &Op) -> Result<(), String> {
        let fail = |e: oxqcow::Error| format!("{op:?} failed: {e}");
        // A crash right after a flush leaves a clean image.
        self.image().flush().map_err(fail)?;
        let copy = Arc::new(MemoryStorage::from_bytes(self.storage.to_bytes()));
        let data_copy = self.data.as_ref().map(|d| Arc::new(MemoryStorage::from_bytes(d.to_bytes())));
        let storage: Arc<dyn Storage> = copy.clone();
        let data = data_copy.clone().map(|d| d as Arc<dyn Storage>);
        let reopened = open_image_with(storage, data, &self.open_options, self.backing.as_ref()).map_err(fail)?;
        // The old handle closes its own (now unused) storage.
        drop(self.image.replace(reopened));
        self.storage = copy;
        self.data = data_copy;
        Ok(())
    }

    /// Creates a snapshot, or checks that its refusal is explained.
    fn snapshot_create(&mut self, op: &Op) -> Result<(), String> {
        let fail = |e: oxqcow::Error| format!("{op:?} failed: {e}");
        let name = format!("snap{}", self.snapshots_made);
        match self.qcow2().snapshot_create(&name) {
            Ok(_) => {
                self.snapshots_made += 1;
                let clusters = self.layout.clusters.clone();
                self.snapshots.push(Snapshot { name, data: self.model.data.clone(), clusters });
            }
            // A refcount too narrow for one more reference: the
            // snapshot is refused and nothing changes (verify
            // checks that). 1-bit refcounts refuse any snapshot of
            // an image with clusters.
            Err(e) if is_refusal(&e) || self.config.refcount_bits < 16 => {
                let trees = self.snapshots.len() as u64 + 2;
                if !self.may_overflow(self.config.refcount_bits, trees) {
                    return Err(format!("{op:?} refused, but no refcount can overflow: {e}"));
                }
                self.stats.refusals += 1;
            }
            Err(e) => return Err(fail(e)),
        }
        Ok(())
    }

    /// Applies a snapshot: the model takes the snapshot's content (the
    /// operation itself changes nothing else in it).
    fn snapshot_apply(&mut self, op: &Op, i: u8) -> Result<(), String> {
        let fail = |e: oxqcow::Error| format!("{op:?} failed: {e}");
        if !self.snapshots.is_empty() {
            let s = self.snapshots[usize::from(i) % self.snapshots.len()].clone();
            match self.qcow2().snapshot_apply(&s.name) {
                Ok(()) => {
                    self.model.data = s.data;
                    self.layout.size = self.model.len();
                    self.layout.clusters = s.clusters;
                }
                // Applying adds the snapshot's references before
                // dropping the active layer's.
                Err(e) if self.may_overflow(self.config.refcount_bits, self.snapshots.len() as u64 + 2) => {
                    let _ = e;
                    self.stats.refusals += 1;
                }
                Err(e) => return Err(fail(e)),
            }
        }
        Ok(())
    }

    /// Deletes a snapshot.
    fn snapshot_delete(&mut self, op: &Op, i: u8) -> Result<(), String> {
        let fail = |e: oxqcow::Error| format!("{op:?} failed: {e}");
        if !self.snapshots.is_empty() {
            let s = self.snapshots.remove(usize::from(i) % self.snapshots.len());
            self.qcow2().snapshot_delete(&s.name).map_err(fail)?;
        }
        Ok(())
    }

    /// How new clusters of a grown disk are mapped: a raw data file maps
    /// them all (QEMU preallocates the metadata).
    fn growth_prealloc(&self, prealloc: Preallocation) -> Preallocation {
        match (self.config.data_file, prealloc) {
            (Some(true), Preallocation::Off) => Preallocation::Metadata,
            _ => prealloc,
        }
    }

    fn write_compressed(&mut self, op: &Op, offset: u64, len: u64, seed: u8) -> Result<(), String> {
        let cs = self.config.cluster_size;
        let buf = compressible_pattern(seed, offset, len);
        let codec = Codec::from_type(match self.config.compression_type {
            CompressionType::Zlib => 0,
            CompressionType::Zstd => 1,
        });
        let compresses = buf
            .chunks(cs as usize)
            .map(|chunk| {
                let mut cluster = chunk.to_vec();
                cluster.resize(cs as usize, 0);
                codec.compress(&cluster, cs as usize - 1).map(|c| c.is_some())
            })
            .collect::<Result<Vec<bool>, _>>()
            .map_err(|e| format!("compressing: {e}"))?;
        let shared = self.shared();
        let expected = self.layout.write_compressed(offset, len, &compresses, &shared);
        let written = match expected {
            Ok(()) => compresses.len() as u64,
            Err(at) => (at - offset) / cs,
        };
        self.stats.compressed += compresses.iter().take(written as usize).filter(|&&c| c).count() as u64;
        match (expected, self.qcow2().write_compressed(&buf, offset)) {
            (Ok(()), Ok(())) => {
                self.model.apply(op);
                Ok(())
            }
            (Err(at), Err(e)) if e.kind() == ErrorKind::InvalidArgument => {
                self.stats.compressed_refused += 1;
                let done = (at - offset) as usize;
                self.model.data[offset as usize..at as usize].copy_from_slice(&buf[..done]);
                Ok(())
            }
            (Ok(()), Err(e)) => Err(format!("{op:?} failed: {e} (the model expects it to succeed)")),
            (Err(at), Ok(())) => Err(format!(
                "{op:?} succeeded, but the cluster at guest offset {at} holds a host offset ({:?}) and QEMU refuses compressed data there",
                self.layout.clusters[(at / cs) as usize].state
            )),
            (Err(_), Err(e)) => Err(format!("{op:?} failed: {e} (the model expects a refusal)")),
        }
    }

    fn amend(&mut self, op: &Op, a: AmendOp) -> Result<(), String> {
        let call = |h: &Harness| h.qcow2().amend(&a.options(), &mut |_, _| {});
        let must_succeed = |h: &Harness| call(h).map_err(|e| format!("{op:?} failed: {e}"));
        let refused = |h: &mut Harness, why: &str| match call(h) {
            Ok(()) => Err(format!("{op:?} succeeded, but it must be refused: {why}")),
            Err(e) if is_refusal(&e) => {
                h.stats.refusals += 1;
                Ok(())
            }
            Err(e) => Err(format!("{op:?} failed ({why}): {e}")),
        };
        let version = self.layout.version;
        match a {
            AmendOp::Compat(Compat::V3) => {
                must_succeed(self)?;
                self.config.compat = Compat::V3;
                self.layout.version = 3;
                self.model.discard_keeps_data = false;
            }
            AmendOp::Compat(Compat::V2) if version == 2 => must_succeed(self)?,
            AmendOp::Compat(Compat::V2) if self.data.is_some() => {
                return refused(self, "images with a data file cannot be downgraded");
            }
            AmendOp::Compat(Compat::V2) => {
                if self.config.refcount_bits != 16 {
                    return refused(self, "compat 0.10 needs 16-bit refcounts");
                }
                if self.snapshots.iter().any(|s| s.data.len() != self.model.data.len()) {
                    return refused(self, "a snapshot has another disk size");
                }
                if self.backing.is_some() && !self.snapshots.is_empty() {
                    // Zero clusters over a backing file become new data
                    // clusters, shared by every snapshot whose L2 table
                    // holds them; the model does not track L2 table
                    // sharing, so this case is left out (nothing is done).
                    return Ok(());
                }
                self.layout.expand_zero_clusters();
                for s in &mut self.snapshots {
                    expand_zero_tree(&mut s.clusters);
                }
                if self.config.compression_type == CompressionType::Zstd && self.layout.any_compressed() {
                    // Refused after the zero clusters were expanded.
                    return refused(self, "zstd-compressed clusters cannot be downgraded");
                }
                must_succeed(self)?;
                self.stats.downgrades += 1;
                self.config.compat = Compat::V2;
                self.config.lazy_refcounts = false;
                self.config.compression_type = CompressionType::Zlib;
                self.layout.version = 2;
                self.model.discard_keeps_data = self.backing.is_some();
            }
            AmendOp::RefcountBits(bits) => {
                if version == 2 && bits != 16 {
                    return refused(self, "compat 0.10 has only 16-bit refcounts");
                }
                match call(self) {
                    Ok(()) => {
                        if bits != self.config.refcount_bits {
                            self.stats.width_changes += 1;
                        }
                        self.config.refcount_bits = bits;
                    }
                    Err(e) if is_refusal(&e) && self.may_overflow(bits, self.snapshots.len() as u64 + 1) => {
                        self.stats.refusals += 1;
                    }
                    Err(e) => return Err(format!("{op:?} failed: {e}")),
                }
            }
            AmendOp::LazyRefcounts(true) if version == 2 => {
                return refused(self, "lazy refcounts need compat 1.1");
            }
            AmendOp::LazyRefcounts(on) => {
                must_succeed(self)?;
                self.config.lazy_refcounts = on && version == 3;
            }
            AmendOp::Size(_) if version == 2 && !self.snapshots.is_empty() => {
                return refused(self, "QEMU resizes no version 2 image with snapshots");
            }
            AmendOp::Size(size) => {
                must_succeed(self)?;
                let shared = self.shared();
                self.layout.resize(size, self.growth_prealloc(Preallocation::Off), &shared);
                self.model.apply(op);
            }
        }
        Ok(())
    }

    /// Compares the whole disk with the model, the allocation of every
    /// cluster with the layout model and the header with the
    /// configuration, and runs `check`: no corruption, no leak, no check
    /// error.
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
        self.verify_layout()?;
        if let (Some(true), Some(data)) = (self.config.data_file, &self.data) {
            // A raw data file reads as the disk at all times.
            let mut raw = vec![0u8; self.model.len() as usize];
            data.read_at(&mut raw, 0).map_err(|e| format!("reading the data file: {e}"))?;
            if let Some(at) = self.model.first_difference(&raw) {
                return Err(format!(
                    "the raw data file differs from the disk at offset {at}: {:#04x}, model {:#04x}",
                    raw[at as usize], self.model.data[at as usize]
                ));
            }
        }
        let info = self.qcow2().info();
        let c = &self.config;
        let want = (c.compat.version(), c.refcount_bits, c.lazy_refcounts, c.compression_type.name());
        let got = (info.version, info.refcount_bits, info.lazy_refcounts, info.compression_type);
        if want != got {
            return Err(format!(
                "header (version, refcount bits, lazy refcounts, compression) is {got:?}, expected {want:?}"
            ));
        }
        Ok(())
    }

    /// Compares block status with the layout model.
    pub fn verify_layout(&self) -> Result<(), String> {
        let (cs, size) = (self.config.cluster_size, self.model.len());
        if self.layout.size != size {
            return Err(format!("the layout model has size {}, the content model {size}", self.layout.size));
        }
        let extents = self.image().block_status(0, size).map_err(|e| format!("block status: {e}"))?;
        if let Some(sub) = &self.subclusters {
            let sc = cs / 32;
            let seen = observed_states(&extents, sc, size)?;
            for (i, (got, want)) in seen.iter().zip(sub.expected()).enumerate() {
                if *got != want {
                    return Err(format!(
                        "subcluster {i} (guest offset {}) is {got:?}, but the subcluster model says {want:?}",
                        i as u64 * sc
                    ));
                }
            }
            return Ok(());
        }
        let seen = observed_states(&extents, cs, size)?;
        for (i, (got, want)) in seen.iter().zip(&self.layout.clusters).enumerate() {
            // In a data file guest cluster 0 lives at host offset 0, and a
            // zero cluster keeping host offset 0 cannot be told from a plain
            // one (QEMU reads such an entry as a plain zero cluster).
            let want_state = match want.state {
                State::ZeroAlloc if i == 0 && self.data.is_some() => State::ZeroPlain,
                s => s,
            };
            if *got != want_state {
                return Err(format!(
                    "cluster {i} (guest offset {}) is {got:?}, but the layout model says {:?}",
                    i as u64 * cs,
                    want.state
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
