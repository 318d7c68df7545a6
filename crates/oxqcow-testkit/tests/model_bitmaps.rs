//! Model test for persistent dirty bitmaps: random sequences of guest
//! writes, zero writes, discards and compressed writes, flushes, reopens,
//! resizes and bitmap operations (enable, disable, clear, add, remove) on
//! images with several bitmaps of different granularities, checked against
//! a model that keeps one bit per granule per bitmap (QEMU's rule: an
//! enabled bitmap marks every granule a request's range touches, whether
//! the request changed data or not).
//!
//! After every reopen and at the end the bitmaps the image stores must be
//! the model's; at the end QEMU must find the image clean and read every
//! bitmap as the model has it (`qemu-nbd -B` + `nbdinfo --map`).
//! `BITMAP_MODEL_CASES=N` runs more cases (default 12, fixed seeds).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use oxqcow::{CreateOptions, MemoryStorage, OpenOptions, Preallocation, Qcow2};
use oxqcow_testkit::prng::Prng;
use oxqcow_testkit::qemu;

/// One bitmap of the model: granularity and one flag per granule.
#[derive(Clone, Debug)]
struct ModelBitmap {
    granularity: u64,
    enabled: bool,
    bits: Vec<bool>,
}

impl ModelBitmap {
    fn new(granularity: u64, len: u64, enabled: bool) -> Self {
        ModelBitmap { granularity, enabled, bits: vec![false; len.div_ceil(granularity) as usize] }
    }

    fn mark(&mut self, offset: u64, len: u64, disk: u64) {
        let end = (offset + len).min(disk);
        if !self.enabled || offset >= end {
            return;
        }
        for g in offset / self.granularity..=(end - 1) / self.granularity {
            self.bits[g as usize] = true;
        }
    }

    fn resize(&mut self, len: u64) {
        self.bits.resize(len.div_ceil(self.granularity) as usize, false);
    }

    /// Dirty ranges, merged, clipped to the disk.
    fn ranges(&self, disk: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (i, &b) in self.bits.iter().enumerate() {
            if !b {
                continue;
            }
            let start = i as u64 * self.granularity;
            let end = (start + self.granularity).min(disk);
            match out.last_mut() {
                Some(last) if last.0 + last.1 == start => last.1 = end - last.0,
                _ => out.push((start, end - start)),
            }
        }
        out
    }
}

fn open(storage: &Arc<MemoryStorage>) -> Qcow2 {
    Qcow2::open(storage.clone(), &OpenOptions::new()).expect("the image opens read-write")
}

fn check_against_model(q: &Qcow2, model: &BTreeMap<String, ModelBitmap>, what: &str) {
    let disk = q.len();
    let listed: Vec<String> = q.open_bitmaps().into_iter().map(|b| b.name).collect();
    let mut expected: Vec<String> = model.keys().cloned().collect();
    let mut got = listed.clone();
    expected.sort();
    got.sort();
    assert_eq!(got, expected, "{what}: bitmaps listed");
    for (name, m) in model {
        let bits = q.bitmap_contents(name).unwrap_or_else(|e| panic!("{what}: bitmap {name}: {e}"));
        assert_eq!(bits.granularity(), m.granularity, "{what}: granularity of {name}");
        assert_eq!(bits.dirty_ranges(), m.ranges(disk), "{what}: bits of {name}");
    }
    // What is on disk: every bitmap stored at the last close, marked in use
    // while the image is open.
    assert!(q.bitmaps().iter().all(|b| b.in_use), "{what}: stored bitmaps not marked in use while open");
}

/// QEMU's view of bitmap `name`, as `nbdinfo --map` prints it, rebuilt from
/// the model to compare.
fn nbdinfo_lines(ranges: &[(u64, u64)], disk: u64) -> String {
    let mut out = String::new();
    let mut pos = 0;
    let mut line = |start: u64, len: u64, dirty: bool| {
        let (n, word) = if dirty { (1, "dirty") } else { (0, "clean") };
        out += &format!("{start:>10}  {len:>10}    {n}  {word}\n");
    };
    for &(start, len) in ranges {
        if start > pos {
            line(pos, start - pos, false);
        }
        line(start, len, true);
        pos = start + len;
    }
    if pos < disk {
        line(pos, disk - pos, false);
    }
    out
}

fn qemu_map(image: &Path, name: &str) -> String {
    let dir = oxqcow_testkit::scratch_dir();
    let sock = dir.path().join("nbd.sock");
    let mut server = Command::new("qemu-nbd")
        .args(["-r", "-f", "qcow2", "-B", name, "-k"])
        .arg(&sock)
        .arg(image)
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-nbd is required by this test");
    let mut waited = 0;
    while !sock.exists() {
        std::thread::sleep(std::time::Duration::from_millis(20));
        waited += 1;
        assert!(waited < 500, "qemu-nbd did not create its socket");
    }
    let out = Command::new("nbdinfo")
        .arg(format!("--map=qemu:dirty-bitmap:{name}"))
        .arg(format!("nbd+unix:///?socket={}", sock.display()))
        .output()
        .expect("nbdinfo is required by this test");
    let _ = server.kill();
    let _ = server.wait();
    assert!(out.status.success(), "nbdinfo: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn run_case(seed: u64) {
    let mut rng = Prng::new(seed);
    let cs = [512u64, 4096, 65536][rng.below(3) as usize];
    let mut disk = rng.range(1, 64) * 64 * 1024 + rng.below(2) * 512;
    let storage = Arc::new(MemoryStorage::new());
    let mut opts = CreateOptions::qcow2(disk);
    opts.cluster_size = cs;
    oxqcow::Image::create_storage(storage.clone(), &opts).unwrap().close().unwrap();
    let mut model: BTreeMap<String, ModelBitmap> = BTreeMap::new();
    let mut q = open(&storage);
    let mut next_name = 0;
    let what = |step: usize| format!("seed {seed} (cluster size {cs}), step {step}");
    for step in 0..40 {
        let offset = rng.below(disk);
        let len = rng.range(1, (disk - offset).min(300_000) + 1);
        match rng.below(14) {
            0..=2 => {
                let data = vec![(step as u8) | 1; len as usize];
                q.write_at(&data, offset).unwrap();
                model.values_mut().for_each(|m| m.mark(offset, len, disk));
            }
            3 => {
                q.write_zeroes_at(offset, len, rng.chance(1, 2)).unwrap();
                model.values_mut().for_each(|m| m.mark(offset, len, disk));
            }
            4 => {
                q.discard(offset, len).unwrap();
                model.values_mut().for_each(|m| m.mark(offset, len, disk));
            }
            5 => {
                // Whole clusters, compressed (some may be refused: still a request).
                let start = offset / cs * cs;
                let n = ((disk - start).min(3 * cs) / cs).max(1) * cs;
                let n = n.min(disk - start);
                let data = vec![7u8; n as usize];
                let _ = q.write_compressed(&data, start);
                model.values_mut().for_each(|m| m.mark(start, n, disk));
            }
            6 => q.flush().unwrap(),
            7 => {
                q.close().unwrap();
                q = open(&storage);
                check_against_model(&q, &model, &format!("{}: after a reopen", what(step)));
            }
            8 => {
                let new = rng.range(1, 96) * 32 * 1024;
                q.resize(new, Preallocation::Off).unwrap();
                disk = new;
                model.values_mut().for_each(|m| m.resize(disk));
            }
            9 if model.len() < 4 => {
                let granularity = 1u64 << rng.range(9, 18);
                let enabled = rng.chance(3, 4);
                let name = format!("bm{next_name}");
                next_name += 1;
                q.bitmap_add(&name, Some(granularity), enabled).unwrap();
                model.insert(name, ModelBitmap::new(granularity, disk, enabled));
            }
            10 if !model.is_empty() => {
                let name = model.keys().nth(rng.below(model.len() as u64) as usize).unwrap().clone();
                q.bitmap_remove(&name).unwrap();
                model.remove(&name);
            }
            11 | 12 if !model.is_empty() => {
                let name = model.keys().nth(rng.below(model.len() as u64) as usize).unwrap().clone();
                let on = rng.chance(1, 2);
                q.bitmap_set_enabled(&name, on).unwrap();
                model.get_mut(&name).unwrap().enabled = on;
            }
            13 if !model.is_empty() => {
                let name = model.keys().nth(rng.below(model.len() as u64) as usize).unwrap().clone();
                q.bitmap_clear(&name).unwrap();
                let m = model.get_mut(&name).unwrap();
                m.bits.iter_mut().for_each(|b| *b = false);
            }
            _ => {}
        }
        check_against_model(&q, &model, &what(step));
    }
    q.close().unwrap();
    let q = open(&storage);
    check_against_model(&q, &model, &format!("seed {seed}: at the end"));
    let report = q.check(None).unwrap();
    assert_eq!((report.corruptions, report.leaks, report.check_errors), (0, 0, 0), "seed {seed}: check");
    q.close().unwrap();
    let dir = oxqcow_testkit::scratch_dir();
    let img = dir.path().join("model.qcow2");
    std::fs::write(&img, storage.to_bytes()).unwrap();
    qemu::assert_check_clean(&img);
    for (name, m) in &model {
        assert_eq!(qemu_map(&img, name), nbdinfo_lines(&m.ranges(disk), disk), "seed {seed}: QEMU's view of {name}");
    }
}

#[test]
fn bitmaps_record_what_the_model_records() {
    let cases: u64 = std::env::var("BITMAP_MODEL_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(12);
    for seed in 0..cases {
        run_case(0xb17_0000 + seed);
    }
}
