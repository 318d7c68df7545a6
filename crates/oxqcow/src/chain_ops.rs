//! Operations across a backing chain: commit, rebase, and changing the
//! backing file recorded in a header.
//!
//! Both work through the public block interfaces (`BlockDevice`), so raw
//! images take part as bases and commit targets like qcow2 ones.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::image::backing::{resolve_backing_path, BackingPolicy, Chain};
use crate::image::{BlockDevice, Image};
use crate::options::{CacheMode, ImageFormat, OpenOptions};

/// Copy granularity of commit.
const CHUNK: u64 = 1 << 20;
/// qemu-img's `IO_BUF_SIZE`: the most rebase compares at once.
const REBASE_BUF: u64 = 2 << 20;

/// Reports progress as (done, total) bytes.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// The files of a backing chain, top first, as their headers name them.
#[derive(Clone, Debug)]
pub struct ChainLayer {
    /// Path of the image file.
    pub path: PathBuf,
    /// Its format.
    pub format: ImageFormat,
    /// The backing file name as recorded in its header.
    pub backing_name: Option<String>,
    /// The backing format as recorded in its header.
    pub backing_format: Option<String>,
    /// The raw windows the layer is seen through (a `json:` backing file
    /// name's `file.driver=raw` nodes).
    pub raw_windows: Vec<crate::options::RawWindow>,
}

/// Lists the layers of the chain starting at `top` (following header names
/// the way `Image::open` does, without opening the images for I/O).
pub fn chain_layers(top: &Path, format: Option<ImageFormat>) -> Result<Vec<ChainLayer>> {
    chain_layers_with(top, format, &OpenOptions::default())
}

/// [`chain_layers`], with the protocols of `opts`: the listing ends above
/// a backing file named by protocol (a read-only storage, never a base to
/// write into).
fn chain_layers_with(top: &Path, format: Option<ImageFormat>, opts: &OpenOptions) -> Result<Vec<ChainLayer>> {
    let mut layers: Vec<ChainLayer> = Vec::new();
    let mut path = top.to_path_buf();
    let mut fmt = format;
    let mut windows = Vec::new();
    let mut chain = Chain::new();
    loop {
        chain.enter(&path)?;
        // The headers alone: encrypted layers open without their secrets.
        let layer_opts = OpenOptions {
            read_only: true,
            format: fmt,
            backing: BackingPolicy::Ignore,
            no_io: true,
            raw_windows: windows.clone(),
            ..Default::default()
        };
        let image = Image::open(&path, &layer_opts)?;
        let (name, bfmt) = match image.as_qcow2() {
            Some(q) => {
                let h = q.header();
                (h.backing_file.clone(), h.extensions.backing_format.clone())
            }
            None => (None, None),
        };
        layers.push(ChainLayer {
            path: path.clone(),
            format: image.format(),
            backing_name: name.clone(),
            backing_format: bfmt.clone(),
            raw_windows: windows.clone(),
        });
        let Some(name) = name else { return Ok(layers) };
        if opts.protocols.as_ref().is_some_and(|p| p.takes(&name)) {
            return Ok(layers);
        }
        let driver = match name.strip_prefix("json:") {
            Some(text) => {
                let mut node = OpenOptions::default();
                let (p, driver) = crate::image::backing::json_node(text, &mut node)?;
                path = p;
                windows = node.raw_windows;
                driver
            }
            None => {
                path = resolve_backing_path(&path, &name);
                windows = Vec::new();
                None
            }
        };
        fmt = driver.or(bfmt).as_deref().map(ImageFormat::from_name).transpose()?;
    }
}

/// Copies everything the layers above `base` hold into `base` (the image's
/// own backing file when `base` is `None`), then empties the top image
/// unless `keep_top` (qemu-img commit's `-d`; with an explicit base QEMU
/// keeps the top image too).
pub fn commit(top: &Path, base: Option<&Path>, keep_top: bool, progress: Progress<'_>) -> Result<()> {
    commit_with(top, &OpenOptions::default(), base, keep_top, progress)
}

/// [`commit`] with the top image's open options: its secret
/// (`passphrase`), its backing file's (`backing_passphrase`, which unlocks
/// the base when it is that backing file) and the backing file options.
pub fn commit_with(
    top: &Path,
    opts: &OpenOptions,
    base: Option<&Path>,
    keep_top: bool,
    progress: Progress<'_>,
) -> Result<()> {
    let layers = chain_layers_with(top, None, opts)?;
    if layers.len() < 2 {
        return Err(Error::InvalidArgument(format!("Image '{}' does not have a backing file", top.display())));
    }
    let base_index = match base {
        None => 1,
        Some(b) => {
            let want = std::fs::canonicalize(b).unwrap_or_else(|_| b.to_path_buf());
            layers
                .iter()
                .position(|l| std::fs::canonicalize(&l.path).unwrap_or_else(|_| l.path.clone()) == want)
                .filter(|&i| i > 0)
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "'{}' is not in the backing file chain of '{}'",
                        b.display(),
                        top.display()
                    ))
                })?
        }
    };
    // The chain is only read, and the base is about to be opened for
    // writing by this very process: share it.
    let top_image = Image::open(top, &OpenOptions { read_only: true, force_share: true, ..opts.clone() })?;
    let base_layer = &layers[base_index];
    // The base is opened with its own backing chain: a version 2 image
    // with a backing file must write zeros as data (it has no zero flag),
    // which the engine only does when it knows about the backing file.
    let base_opts = OpenOptions {
        format: Some(base_layer.format),
        passphrase: opts.backing_passphrase.clone().filter(|_| base_index == 1),
        max_unlock_work: opts.max_unlock_work,
        raw_windows: base_layer.raw_windows.clone(),
        messages: opts.messages.clone(),
        protocols: opts.protocols.clone(),
        ..Default::default()
    };
    let base_image = Image::open(&base_layer.path, &base_opts)?;
    let size = top_image.len();
    if base_image.len() < size {
        base_image.resize(size, crate::options::Preallocation::Off)?;
    }
    // qemu-img commit runs QEMU's mirror job: it marks every chunk of
    // `grain` bytes that the layers above the base hold any part of, then
    // copies each marked run chunk by chunk, writing zeros where the chain
    // reads as zeros for whole chunks and data otherwise. Copying the same
    // chunks gives the base the same allocation.
    let grain = base_image.as_qcow2().map_or(MIRROR_GRAIN, |q| q.geometry().cluster_size().clamp(4096, MIRROR_GRAIN));
    let marked = chunks_above_base(&top_image, base_index, size, grain)?;
    let mut buf = Vec::new();
    for (start, end) in marked {
        let mut pos = start;
        while pos < end {
            let status = top_image.block_status(pos, (end - pos).min(CHUNK))?;
            let e = status.first().ok_or_else(|| Error::InvalidArgument(format!("no block status at {pos}")))?;
            let run = e.length.min(end - pos) / grain * grain;
            if run >= grain && !e.data {
                base_image.write_zeroes_at(pos, run, true)?;
                pos += run;
            } else {
                let n = run.max(grain).min(end - pos);
                buf.resize(n as usize, 0);
                top_image.read_at(&mut buf, pos)?;
                base_image.write_at(&buf, pos)?;
                pos += n;
            }
            progress(pos, size);
        }
    }
    progress(size, size);
    base_image.flush()?;
    drop(top_image);
    // qemu-img empties the top before it closes the chain.
    if !keep_top && base.is_none() {
        let top_opts =
            OpenOptions { backing: BackingPolicy::Ignore, passphrase: opts.passphrase.clone(), ..Default::default() };
        let top_rw = Image::open(top, &top_opts)?;
        if let Some(q) = top_rw.as_qcow2() {
            q.make_empty()?;
        }
        top_rw.close()?;
    }
    // Inactivated first, then closed, as qemu-img commit does: a base
    // whose bitmaps cannot be stored tries twice (each attempt reported to
    // `opts.messages`), and the first failure is the commit's.
    let inactivated = base_image.inactivate();
    let closed = base_image.close();
    inactivated.and(closed)
}

/// The granularity of QEMU's mirror job without a cluster size to follow.
const MIRROR_GRAIN: u64 = 64 << 10;

/// The runs of `grain`-sized chunks (the last one cut at `size`) of which
/// the layers above the one at `base_index` hold any part: what they
/// allocate, and zeros past the end of a shorter layer above the base,
/// which QEMU counts as allocated in that layer.
fn chunks_above_base(top: &Image, base_index: usize, size: u64, grain: u64) -> Result<Vec<(u64, u64)>> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let len = CHUNK.min(size - pos);
        for e in top.block_status(pos, len)? {
            let depth = e.depth as usize;
            let above = if e.present { depth < base_index } else { e.zero && depth + 1 < base_index };
            if !above {
                continue;
            }
            let (start, end) =
                (e.offset / grain * grain, (e.offset + e.length).div_ceil(grain).saturating_mul(grain).min(size));
            match runs.last_mut() {
                Some(last) if last.1 >= start => last.1 = last.1.max(end),
                _ => runs.push((start, end)),
            }
        }
        pos += len;
    }
    Ok(runs)
}

/// How [`rebase`] works.
#[derive(Clone, Debug, Default)]
pub struct RebaseOptions {
    /// Only rewrite the header (qemu-img rebase `-u`).
    pub unsafe_mode: bool,
    /// Cache mode of the image and its current chain (`-t`).
    pub cache: CacheMode,
    /// Cache mode of the new backing file (`-T`).
    pub backing_cache: CacheMode,
    /// Write the clusters copied into the image compressed (`-c`), where
    /// they are whole clusters the image does not hold yet.
    pub compress: bool,
    /// Opens backing files named by protocol, the old and the new one
    /// (see [`OpenOptions::protocols`]).
    pub protocols: Option<std::sync::Arc<dyn crate::options::ProtocolOpener>>,
}

/// Changes the backing file of `top` to `new_backing` (`None`: no backing
/// file). Safe mode first copies into `top` every range whose content would
/// change, so the guest sees the same disk; unsafe mode only rewrites the
/// header (qemu-img rebase `-u`).
pub fn rebase(
    top: &Path,
    new_backing: Option<(&str, Option<&str>)>,
    opts: RebaseOptions,
    progress: Progress<'_>,
) -> Result<()> {
    // QEMU's file-posix drivers may be named as the backing format: the
    // header records the driver, and the file is read as raw shows it
    // (after the check that it is the kind of file the driver opens).
    let takes = |name: &str| opts.protocols.as_ref().is_some_and(|p| p.takes(name));
    // The new backing file, read-only: a protocol's storage as its opener
    // gives it, a file relative to the image's directory.
    let open_new = |name: &str, o: &OpenOptions| -> Result<Image> {
        let o = OpenOptions { read_only: true, protocols: opts.protocols.clone(), ..o.clone() };
        match opts.protocols.as_ref().filter(|p| p.takes(name)).and_then(|p| p.open_backing(name)) {
            Some(storage) => Image::open_storage(storage?, &o),
            None => Image::open(&resolve_backing_path(top, name), &o),
        }
    };
    let resolved_format = |name: &str, fmt: Option<&str>| -> Result<ImageFormat> {
        match fmt {
            Some(d) if crate::image::is_host_driver(d) && !takes(name) => {
                crate::image::check_host_file(d, &resolve_backing_path(top, name))?;
                Ok(ImageFormat::Raw)
            }
            Some(f) => ImageFormat::from_name(f),
            None => Ok(open_new(name, &OpenOptions { backing: BackingPolicy::Ignore, ..Default::default() })?.format()),
        }
    };
    if opts.unsafe_mode {
        let img =
            Image::open(top, &OpenOptions { backing: BackingPolicy::Ignore, cache: opts.cache, ..Default::default() })?;
        let q = img.as_qcow2().ok_or_else(|| Error::InvalidArgument("only qcow2 images have a backing file".into()))?;
        match new_backing {
            Some((name, fmt)) => {
                // Unsafe mode does not need the file, but records a format
                // when it can learn it.
                let probed = || resolved_format(name, None).ok().map(ImageFormat::name);
                q.set_backing_file(Some(name), fmt.or_else(probed))?;
            }
            None => q.set_backing_file(None, None)?,
        }
        return img.close();
    }
    let img =
        Image::open(top, &OpenOptions { cache: opts.cache, protocols: opts.protocols.clone(), ..OpenOptions::new() })?;
    let q = img.as_qcow2().ok_or_else(|| Error::InvalidArgument("only qcow2 images have a backing file".into()))?;
    let new_image = match new_backing {
        Some((name, fmt)) => {
            let f = resolved_format(name, fmt)?;
            let o = OpenOptions { format: Some(f), cache: opts.backing_cache, ..Default::default() };
            Some((open_new(name, &o)?, fmt.unwrap_or(f.name())))
        }
        None => None,
    };
    let size = img.len();
    let new_len = new_image.as_ref().map_or(0, |(i, _)| i.len());
    // What lies past the old backing file's end (everything, without one)
    // reads as zeros, and qemu-img writes zeros there as zero writes, not
    // as data: on a version 3 image they become zero clusters.
    let old_len = q.backing().map_or(0, |b| b.len());
    // qemu-img compares in units of the image's subcluster (a compressed
    // copy writes whole clusters), so that no write needs copy on write.
    let g = q.geometry();
    let align = if opts.compress { g.cluster_size() } else { g.subcluster_size() };
    let mut old = vec![0u8; REBASE_BUF as usize];
    let mut new = vec![0u8; REBASE_BUF as usize];
    let mut offset = 0;
    while offset < size {
        // qemu-img's img_rebase: a window of at most 2 MiB, cut where the
        // image's own allocation changes; what the image holds is skipped.
        let window = REBASE_BUF.min(size - offset);
        let status = img.block_status(offset, window)?;
        let held = |e: &crate::extent::Extent| e.depth == 0 && e.present;
        let Some(first) = status.first() else { break };
        let allocated = held(first);
        let n = status.iter().take_while(|e| held(e) == allocated).map(|e| e.length).sum::<u64>().min(window);
        if allocated {
            offset += n;
            progress(offset, size);
            continue;
        }
        let (old, new) = (&mut old[..n as usize], &mut new[..n as usize]);
        img.read_at(old, offset)?;
        new.fill(0);
        if let Some((ni, _)) = &new_image {
            let m = new_len.saturating_sub(offset).min(n) as usize;
            if m > 0 {
                ni.read_at(&mut new[..m], offset)?;
            }
        }
        // Runs of equal and of differing units; each differing run is
        // written with the old content: as zeros once past the old
        // backing file's end (decided at the run's start), else as data.
        let mut written = 0usize;
        let mut past_old_end = offset >= old_len;
        while written < n as usize {
            let (differs, len) = compare_units(&old[written..], &new[written..], align as usize);
            if differs {
                let at = offset + written as u64;
                let data = &old[written..written + len];
                if past_old_end {
                    img.write_zeroes_at(at, len as u64, false)?;
                } else if opts.compress && at % g.cluster_size() == 0 {
                    q.write_compressed(data, at)?;
                } else {
                    img.write_at(data, at)?;
                }
            }
            written += len;
            if offset + written as u64 >= old_len {
                past_old_end = true;
            }
        }
        offset += n;
        progress(offset, size);
    }
    img.flush()?;
    match &new_backing {
        Some((name, _)) => q.set_backing_file(Some(name), new_image.as_ref().map(|(_, f)| *f))?,
        None => q.set_backing_file(None, None)?,
    }
    img.close()
}

/// qemu-img's `compare_buffers`: whether the first `align`-sized unit of
/// `a` and `b` differs, and how long the run of units that agree with it on
/// that is (the last unit may be shorter).
fn compare_units(a: &[u8], b: &[u8], align: usize) -> (bool, usize) {
    let unit = |i: usize| a[i..(i + align).min(a.len())] != b[i..(i + align).min(b.len())];
    let differs = unit(0);
    let mut i = align.min(a.len());
    while i < a.len() && unit(i) == differs {
        i = (i + align).min(a.len());
    }
    (differs, i)
}
