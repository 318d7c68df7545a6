//! The crash harness: run a workload on a [`FaultyStorage`] that stops at
//! host write N, then check what the medium holds.
//!
//! While the workload runs, a [`DurabilityTracker`] remembers the model as
//! of the last completed flush (or close) and which bytes any operation
//! started since then may have changed. After the crash those other bytes
//! must read back exactly as flushed.

use std::sync::Arc;

use oxqcow::{BlockDevice, MemoryStorage, OpenOptions, RepairMode, Storage};

use crate::faulty::{CrashModel, FaultyStorage};
use crate::model::{compressible_pattern, pattern, AmendOp, Model, Op};
use crate::workload::{open_image, Backing};

/// What must survive a crash.
#[derive(Clone, Debug)]
pub struct DurabilityTracker {
    /// The model as of the last completed flush.
    pub durable: Vec<u8>,
    /// Bytes an operation started since that flush may have changed.
    pub touched: Vec<bool>,
    /// Disk sizes since that flush (the crash may leave any of them).
    pub sizes: Vec<u64>,
}

impl DurabilityTracker {
    fn new(model: &Model) -> Self {
        DurabilityTracker {
            durable: model.data.clone(),
            touched: vec![false; model.data.len()],
            sizes: vec![model.len()],
        }
    }

    fn touch(&mut self, offset: u64, len: u64) {
        let end = (offset + len) as usize;
        if self.touched.len() < end {
            self.touched.resize(end, false);
        }
        self.touched[offset as usize..end].fill(true);
    }

    fn durable_point(&mut self, model: &Model) {
        *self = DurabilityTracker::new(model);
    }

    /// Checks `content` (the whole disk after the crash) against what was
    /// flushed.
    pub fn verify(&self, content: &[u8]) -> Result<(), String> {
        let len = content.len() as u64;
        if !self.sizes.contains(&len) {
            return Err(format!("disk size {len} after the crash; expected one of {:?}", self.sizes));
        }
        // Compare in blocks; look at single bytes only where a block differs.
        const BLOCK: usize = 4096;
        for start in (0..content.len()).step_by(BLOCK) {
            let end = (start + BLOCK).min(content.len());
            let durable_end = end.min(self.durable.len());
            let same = if start < durable_end {
                content[start..durable_end] == self.durable[start..durable_end]
                    && content[durable_end..end].iter().all(|&b| b == 0)
            } else {
                content[start..end].iter().all(|&b| b == 0)
            };
            if same {
                continue;
            }
            for (p, &b) in content.iter().enumerate().take(end).skip(start) {
                if self.touched.get(p).copied().unwrap_or(false) {
                    continue;
                }
                let want = self.durable.get(p).copied().unwrap_or(0);
                if b != want {
                    return Err(format!("flushed byte at offset {p} reads {b:#04x} instead of {want:#04x}"));
                }
            }
        }
        Ok(())
    }
}

/// How far a run of the workload got.
pub struct Run {
    /// The storage, crashed or not.
    pub storage: Arc<FaultyStorage>,
    /// What must have survived.
    pub tracker: DurabilityTracker,
    /// Operations that completed.
    pub completed: usize,
    /// The error that stopped the workload, if any.
    pub error: Option<String>,
}

/// Opens the image in `base` on a faulty storage, applies `ops` and closes
/// it, stopping at the first error (the injected crash).
pub fn run_workload(base: &[u8], cluster_size: u64, ops: &[Op], crash: Option<(u64, CrashModel)>) -> Run {
    run_workload_on(base, None, cluster_size, ops, crash)
}

/// [`run_workload`] on an overlay of `backing` (`None`: no backing file).
pub fn run_workload_on(
    base: &[u8],
    backing: Option<&Backing>,
    cluster_size: u64,
    ops: &[Op],
    crash: Option<(u64, CrashModel)>,
) -> Run {
    let storage = Arc::new(match crash {
        Some((n, model)) => FaultyStorage::with_crash(base.to_vec(), Some(n), model),
        None => FaultyStorage::new(base.to_vec()),
    });
    let dynamic: Arc<dyn Storage> = storage.clone();
    let probe =
        open_image(Arc::new(MemoryStorage::from_bytes(base.to_vec())), &OpenOptions::new().read_only(true), backing)
            .expect("the base image opens");
    let mut content = vec![0u8; probe.len() as usize];
    probe.read_at(&mut content, 0).expect("the base image reads");
    let v2 = probe.as_qcow2().is_some_and(|q| q.info().version == 2);
    drop(probe);
    let mut model = Model::new(0, cluster_size);
    if let Some(b) = backing {
        model = Model::with_backing(0, cluster_size, b.content.clone(), v2);
    }
    model.data = content;
    let mut tracker = DurabilityTracker::new(&model);
    let run = |tracker: &mut DurabilityTracker| -> Result<usize, (usize, String)> {
        let image = open_image(dynamic, &OpenOptions::new(), backing).map_err(|e| (0, format!("open: {e}")))?;
        let (mut snapshots, mut snapshots_made) = (Vec::new(), 0);
        for (i, op) in ops.iter().enumerate() {
            let old_len = model.len();
            if let Some((o, l)) = model.apply(op) {
                tracker.touch(o, l);
            }
            if let Op::Resize { size, .. } | Op::Amend(AmendOp::Size(size)) = op {
                tracker.sizes.push(*size);
                // A crash may leave the old size, with data past the new end.
                if *size < old_len {
                    tracker.touch(*size, old_len - size);
                }
            }
            let res = match *op {
                Op::Write { offset, len, seed } => image.write_at(&pattern(seed, offset, len), offset),
                Op::WriteCompressed { offset, len, seed } => {
                    image.as_qcow2().expect("qcow2").write_compressed(&compressible_pattern(seed, offset, len), offset)
                }
                Op::Amend(a) => image.as_qcow2().expect("qcow2").amend(&a.options(), &mut |_, _| {}),
                Op::WriteZeroes { offset, len, may_unmap } => image.write_zeroes_at(offset, len, may_unmap),
                Op::Discard { offset, len } => image.discard(offset, len),
                Op::Flush => image.flush(),
                Op::Resize { size, prealloc } => image.resize(size, prealloc),
                Op::SnapshotCreate => {
                    snapshots_made += 1;
                    let name = format!("snap{snapshots_made}");
                    let r = image.as_qcow2().expect("qcow2").snapshot_create(&name).map(drop);
                    if r.is_ok() {
                        snapshots.push(name);
                    }
                    r
                }
                Op::SnapshotDelete(i) if !snapshots.is_empty() => {
                    let name = snapshots.remove(usize::from(i) % snapshots.len());
                    image.as_qcow2().expect("qcow2").snapshot_delete(&name)
                }
                Op::SnapshotDelete(_) => Ok(()),
                other => panic!("crash workloads do not use {other:?}"),
            };
            res.map_err(|e| (i, format!("{op:?}: {e}")))?;
            if *op == Op::Flush {
                tracker.durable_point(&model);
            }
        }
        image.close().map_err(|e| (ops.len(), format!("close: {e}")))?;
        tracker.durable_point(&model);
        Ok(ops.len())
    };
    let (completed, error) = match run(&mut tracker) {
        Ok(n) => (n, None),
        Err((n, e)) => (n, Some(e)),
    };
    Run { storage, tracker, completed, error }
}

/// What a crash left, after verification.
#[derive(Debug)]
pub struct Survivor {
    /// The image bytes after reopening, repairing, one more write and a
    /// close.
    pub bytes: Vec<u8>,
    /// COPIED flags that disagreed with the refcount in a harmless way
    /// (see [`unsafe_findings`]) and were repaired.
    pub copied_mismatches: u64,
}

/// The check findings a crash must never leave. Leaks are fine. A COPIED
/// flag that disagrees with the refcount is harmless in two cases, which
/// every crash inside snapshot creation or deletion leaves (QEMU's
/// ordering has the same windows; `check -r all` clears them): COPIED
/// missing on a cluster with refcount 1 (a write copies it needlessly), and
/// COPIED set on a cluster whose refcount is above its references (the
/// extra count is a leak: nothing else uses the cluster). COPIED set on a
/// cluster that is really shared, or anything else, is returned.
pub fn unsafe_findings(messages: &[String], cluster_size: u64) -> Vec<String> {
    let mut leaked_single = std::collections::HashSet::new();
    for m in messages {
        if let Some(rest) = m.strip_prefix("Leaked cluster ") {
            let mut it = rest.split(' ');
            let cluster: Option<u64> = it.next().and_then(|c| c.parse().ok());
            if let (Some(c), true) = (cluster, rest.ends_with(" reference=1")) {
                leaked_single.insert(c);
            }
        }
    }
    let field = |m: &str, key: &str| -> Option<u64> {
        let v = m.split(' ').find_map(|w| w.strip_prefix(key))?;
        if key.ends_with("entry=") {
            u64::from_str_radix(v, 16).ok()
        } else {
            v.parse().ok()
        }
    };
    let mut out = Vec::new();
    for m in messages {
        if m.starts_with("Leaked cluster ") {
            continue;
        }
        if m.starts_with("ERROR OFLAG_COPIED") {
            let entry = field(m, "l2_entry=").or_else(|| field(m, "l1_entry="));
            let refcount = field(m, "refcount=");
            if let (Some(e), Some(rc)) = (entry, refcount) {
                let copied = e >> 63 == 1;
                let cluster = (e & 0x00ff_ffff_ffff_fe00) / cluster_size;
                if (!copied && rc == 1) || (copied && rc > 1 && leaked_single.contains(&cluster)) {
                    continue;
                }
            }
        }
        out.push(m.clone());
    }
    out
}

/// What the medium looked like after the crash, verified: the image opens
/// read-write (a dirty lazy-refcount image gets its refcounts rebuilt),
/// check finds no corruption (leaks are allowed; with
/// `allow_copied_mismatch`, so are the harmless COPIED disagreements
/// [`unsafe_findings`] describes, which `check -r all` must then repair),
/// every flushed byte reads back, and after `check -r leaks` (`-r all`
/// with `allow_copied_mismatch`) the image is clean and takes a write.
pub fn verify_crashed(
    bytes: Vec<u8>,
    tracker: &DurabilityTracker,
    cluster_size: u64,
    allow_copied_mismatch: bool,
) -> Result<Survivor, String> {
    verify_crashed_on(bytes, None, tracker, cluster_size, allow_copied_mismatch)
}

/// [`verify_crashed`] for an overlay of `backing`.
pub fn verify_crashed_on(
    bytes: Vec<u8>,
    backing: Option<&Backing>,
    tracker: &DurabilityTracker,
    cluster_size: u64,
    allow_copied_mismatch: bool,
) -> Result<Survivor, String> {
    let storage = Arc::new(MemoryStorage::from_bytes(bytes));
    let dynamic: Arc<dyn Storage> = storage.clone();
    let image = open_image(dynamic, &OpenOptions::new(), backing).map_err(|e| format!("open after the crash: {e}"))?;
    let report = image.check(None).map_err(|e| format!("check: {e}"))?;
    let mut copied_mismatches = 0;
    if report.corruptions != 0 || report.check_errors != 0 {
        let bad = unsafe_findings(&report.messages, cluster_size);
        // Lines past the report's cap were not looked at: not provably safe.
        let unseen = report.messages_dropped != 0;
        if !allow_copied_mismatch || !bad.is_empty() || report.check_errors != 0 || unseen {
            let shown = if allow_copied_mismatch { bad } else { report.messages.clone() };
            return Err(format!(
                "check: {} corruptions, {} check errors: {:?}",
                report.corruptions, report.check_errors, shown
            ));
        }
        copied_mismatches = report.corruptions;
        let fixed = image.check(Some(RepairMode::All)).map_err(|e| format!("check -r all: {e}"))?;
        if fixed.corruptions != 0 || fixed.leaks != 0 {
            return Err(format!("check -r all left {} corruptions, {} leaks", fixed.corruptions, fixed.leaks));
        }
    }
    let mut content = vec![0u8; image.len() as usize];
    image.read_at(&mut content, 0).map_err(|e| format!("read after the crash: {e}"))?;
    tracker.verify(&content)?;
    if report.leaks != 0 {
        // Dropping a leaked snapshot reference to 1 leaves a cluster
        // without COPIED (harmless, see above): with snapshots, repair
        // those too.
        let mode = if allow_copied_mismatch { RepairMode::All } else { RepairMode::Leaks };
        let fixed = image.check(Some(mode)).map_err(|e| format!("check -r {mode:?}: {e}"))?;
        if fixed.leaks != 0 || fixed.corruptions != 0 {
            return Err(format!("check -r {mode:?} left {} leaks, {} corruptions", fixed.leaks, fixed.corruptions));
        }
        copied_mismatches += fixed.corruptions_fixed;
    }
    // The survivor is usable: a write lands and check stays clean.
    let at = image.len() / 3;
    image
        .write_at(&pattern(99, at, 5000.min(image.len() - at)), at)
        .map_err(|e| format!("write after the crash: {e}"))?;
    let report = image.check(None).map_err(|e| format!("check after a write: {e}"))?;
    if report.corruptions != 0 || report.leaks != 0 || report.check_errors != 0 {
        return Err(format!("check after a write: {:?}", report.messages));
    }
    image.close().map_err(|e| format!("close after the crash: {e}"))?;
    Ok(Survivor { bytes: storage.to_bytes(), copied_mismatches })
}

#[cfg(test)]
mod tests {
    use super::unsafe_findings;

    #[test]
    fn copied_mismatches_are_classified() {
        let m = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // COPIED set, refcount 2, one reference: a leak, harmless.
        let safe = m(&[
            "Leaked cluster 6 refcount=2 reference=1",
            "ERROR OFLAG_COPIED data cluster: l2_entry=8000000000000c00 refcount=2",
            "ERROR OFLAG_COPIED data cluster: l2_entry=e00 refcount=1",
        ]);
        assert!(unsafe_findings(&safe, 512).is_empty());
        // COPIED set on a cluster that two tables really reference.
        let shared = m(&["ERROR OFLAG_COPIED data cluster: l2_entry=8000000000000c00 refcount=2"]);
        assert_eq!(unsafe_findings(&shared, 512), shared);
        let other = m(&["ERROR cluster 3 refcount=1 reference=2"]);
        assert_eq!(unsafe_findings(&other, 512), other);
    }
}
