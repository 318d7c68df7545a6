//! Model test: random sequences of writes, zero writes (with and without
//! may-unmap), discards, flushes, resizes (grow and shrink, with every
//! preallocation mode), close/reopen, crash-style reopen and internal
//! snapshots (create, revert, delete), applied to an in-memory qcow2 image
//! and to a flat byte vector. After every step the whole disk must equal the model and
//! `check` must find no corruption, no leak and no check error; at the end
//! `qemu-img check` finds the closed image clean and `qemu-img compare`
//! finds it identical to the model.
//!
//! Each property covers one cluster size over every refcount width (1, 16,
//! 64) and compat 0.10 / 1.1 / 1.1 with lazy refcounts, with default caches
//! or QEMU's minimum ones (two L2 tables, four refcount blocks: constant
//! write-back on eviction), with and without pass-discard-request. The default case
//! count keeps `cargo test` quick; set PROPTEST_CASES for a longer run.

use oxqcow_testkit::model::ImageConfig;
use oxqcow_testkit::qemu;
use oxqcow_testkit::workload::{op_specs, Harness, OpSpec};
use proptest::prelude::*;
use proptest::test_runner::Config;

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn config(default_cases: u32) -> Config {
    Config { cases: cases(default_cases), failure_persistence: None, ..Config::default() }
}

/// Runs `specs` on a fresh image and checks after every step.
fn run(
    cfg: ImageConfig,
    small_cache: bool,
    passthrough: bool,
    initial: u16,
    max_size: u64,
    specs: &[OpSpec],
) -> Result<(), TestCaseError> {
    let size = (u64::from(initial) * max_size / 65536).div_ceil(512).max(1) * 512;
    let opts = Harness::open_options(&cfg, small_cache, passthrough);
    let mut h = Harness::new(cfg, size, max_size, opts).map_err(TestCaseError::fail)?;
    h.verify().map_err(|e| TestCaseError::fail(format!("{cfg:?} fresh image: {e}")))?;
    for spec in specs {
        let step = h.log.len();
        let res = h.apply_spec(spec).and_then(|()| h.verify());
        if let Err(e) = res {
            return Err(TestCaseError::fail(format!(
                "{cfg:?}, small cache {small_cache}, discard passthrough {passthrough}, initial size {size}, step {step}: {e}\nops: {:#?}",
                h.log
            )));
        }
    }
    // QEMU, an independent reader and checker, agrees with the model.
    h.image.take().expect("open").close().map_err(|e| TestCaseError::fail(format!("close: {e}")))?;
    let dir = oxqcow_testkit::scratch_dir();
    let (img, raw) = (dir.path().join("model.qcow2"), dir.path().join("model.raw"));
    std::fs::write(&img, h.storage.to_bytes()).unwrap();
    std::fs::write(&raw, &h.model.data).unwrap();
    let check = qemu::check(&img);
    prop_assert!(check.success(), "{cfg:?}: qemu-img check: {}\nops: {:#?}", check.text(), h.log);
    let cmp = qemu::compare(&img, "qcow2", &raw, "raw");
    prop_assert!(cmp.success(), "{cfg:?}: qemu-img compare with the model: {}\nops: {:#?}", cmp.text(), h.log);
    Ok(())
}

fn configs(cluster_size: u64) -> Vec<ImageConfig> {
    ImageConfig::matrix(&[cluster_size], &[1, 16, 64])
}

proptest! {
    #![proptest_config(config(24))]

    /// 512-byte clusters: 64-entry L2 tables, so resizes grow and shrink
    /// the L1 table and refcount blocks fill quickly.
    #[test]
    fn model_512_byte_clusters(
        cfg in prop::sample::select(configs(512)),
        small_cache in any::<bool>(),
        passthrough in any::<bool>(),
        initial in any::<u16>(),
        specs in op_specs(30),
    ) {
        run(cfg, small_cache, passthrough, initial, 3 << 20, &specs)?;
    }

    /// 4 KiB clusters (an L2 table covers 2 MiB, so growing past it
    /// grows the L1 table).
    #[test]
    fn model_4k_clusters(
        cfg in prop::sample::select(configs(4096)),
        small_cache in any::<bool>(),
        passthrough in any::<bool>(),
        initial in any::<u16>(),
        specs in op_specs(30),
    ) {
        run(cfg, small_cache, passthrough, initial, 6 << 20, &specs)?;
    }

    /// 64 KiB clusters, QEMU's default.
    #[test]
    fn model_64k_clusters(
        cfg in prop::sample::select(configs(65536)),
        small_cache in any::<bool>(),
        passthrough in any::<bool>(),
        initial in any::<u16>(),
        specs in op_specs(30),
    ) {
        run(cfg, small_cache, passthrough, initial, 6 << 20, &specs)?;
    }
}
