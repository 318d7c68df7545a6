//! Tests of the harness itself: a wrong model or layout is caught.

//! The harness's checks can fail: each test breaks the model on purpose
//! and expects the step or the verification to report it.
use super::*;
use crate::layout::State;

fn harness(compat: Compat) -> Harness {
    Harness::new(ImageConfig::new(512, 16, compat, false), 8 * 512, 8 * 512, OpenOptions::new()).unwrap()
}

#[test]
fn verify_catches_a_raw_data_file_that_differs_from_the_disk() {
    let cfg = ImageConfig::new(512, 16, Compat::V3, false).with_data_file(true);
    let mut h = Harness::new(cfg, 8 * 512, 8 * 512, OpenOptions::new()).unwrap();
    h.apply(&Op::Write { offset: 0, len: 1024, seed: 1 }).unwrap();
    h.apply(&Op::WriteZeroes { offset: 512, len: 512, may_unmap: false }).unwrap();
    // Refused, changing nothing.
    h.apply(&Op::SnapshotCreate).unwrap();
    h.apply(&Op::WriteCompressed { offset: 1024, len: 512, seed: 2 }).unwrap();
    assert_eq!(h.stats.refusals, 2);
    h.verify().unwrap();
    // The disk reads zeros there (a zero cluster), the data file not.
    h.data.as_ref().unwrap().write_at(&[7], 600).unwrap();
    let e = h.verify().unwrap_err();
    assert!(e.contains("raw data file differs from the disk at offset 600"), "{e}");
}

#[test]
fn verify_catches_an_allocation_the_model_does_not_expect() {
    let mut h = harness(Compat::V3);
    h.apply(&Op::Write { offset: 0, len: 512, seed: 1 }).unwrap();
    h.verify().unwrap();
    h.layout.clusters[0].state = State::ZeroAlloc;
    let e = h.verify().unwrap_err();
    assert!(e.contains("cluster 0") && e.contains("Normal"), "{e}");
}

#[test]
fn compressed_write_predictions_are_checked() {
    // The model forgot the data in cluster 0: it expects the compressed
    // write to land, the engine refuses it.
    let mut h = harness(Compat::V3);
    h.apply(&Op::Write { offset: 0, len: 512, seed: 1 }).unwrap();
    h.layout.clusters[0].state = State::Unallocated;
    let e = h.apply(&Op::WriteCompressed { offset: 0, len: 512, seed: 2 }).unwrap_err();
    assert!(e.contains("expects it to succeed"), "{e}");
    // The model believes cluster 1 holds data: the engine takes the
    // compressed write the model says QEMU refuses.
    let mut h = harness(Compat::V3);
    h.layout.clusters[1].state = State::Normal;
    let e = h.apply(&Op::WriteCompressed { offset: 512, len: 512, seed: 2 }).unwrap_err();
    assert!(e.contains("QEMU refuses"), "{e}");
    // A correct model: the refusal is expected and changes nothing.
    let mut h = harness(Compat::V3);
    h.apply(&Op::WriteZeroes { offset: 0, len: 512, may_unmap: false }).unwrap();
    h.apply(&Op::Write { offset: 512, len: 512, seed: 1 }).unwrap();
    h.apply(&Op::WriteCompressed { offset: 0, len: 1024, seed: 2 }).unwrap();
    h.verify().unwrap();
    assert_eq!(h.stats.compressed_refused, 1);
}

#[test]
fn amend_predictions_are_checked() {
    // Believing the image has 64-bit refcounts, the harness expects a
    // downgrade to be refused; it succeeds.
    let mut h = harness(Compat::V3);
    h.config.refcount_bits = 64;
    let e = h.apply(&Op::Amend(AmendOp::Compat(Compat::V2))).unwrap_err();
    assert!(e.contains("must be refused"), "{e}");
    // The header must say what the amends said.
    let mut h = harness(Compat::V3);
    h.apply(&Op::Amend(AmendOp::LazyRefcounts(true))).unwrap();
    h.verify().unwrap();
    h.config.lazy_refcounts = false;
    assert!(h.verify().unwrap_err().contains("header"));
    // A downgrade expands zero clusters: a layout model that kept them
    // is caught.
    let mut h = harness(Compat::V3);
    h.apply(&Op::Write { offset: 0, len: 1024, seed: 1 }).unwrap();
    h.apply(&Op::WriteZeroes { offset: 0, len: 512, may_unmap: false }).unwrap();
    let kept = h.layout.clusters[0];
    h.apply(&Op::Amend(AmendOp::Compat(Compat::V2))).unwrap();
    h.verify().unwrap();
    h.layout.clusters[0] = kept;
    assert!(h.verify().unwrap_err().contains("cluster 0"));
}

#[test]
fn overlay_masking_is_checked() {
    // A discard on a version 2 overlay keeps the data; a model that
    // shows zeros there is caught.
    let backing = Backing::raw(vec![7; 4096]).unwrap();
    let cfg = ImageConfig::new(512, 16, Compat::V2, false);
    let mut h = Harness::with_backing(cfg, 4096, 4096, OpenOptions::new(), backing.clone()).unwrap();
    h.apply(&Op::Write { offset: 0, len: 1024, seed: 1 }).unwrap();
    h.verify().unwrap();
    h.model.discard_keeps_data = false;
    h.apply(&Op::Discard { offset: 0, len: 1024 }).unwrap();
    assert!(h.verify().unwrap_err().contains("content differs at offset 0"));
    // On version 3 the discarded clusters read as zeros: a model that
    // keeps the data is caught.
    let cfg = ImageConfig::new(512, 16, Compat::V3, false);
    let mut h = Harness::with_backing(cfg, 4096, 4096, OpenOptions::new(), backing).unwrap();
    h.model.discard_keeps_data = true;
    h.apply(&Op::Discard { offset: 0, len: 1024 }).unwrap();
    assert!(h.verify().unwrap_err().contains("content differs at offset 0"));
}

#[test]
fn refused_snapshots_must_be_explained_by_the_refcount_width() {
    // 1-bit refcounts refuse a snapshot of an image with data; a
    // harness that believes in 16-bit refcounts reports the refusal.
    let mut h = Harness::new(ImageConfig::new(512, 1, Compat::V3, false), 4096, 4096, OpenOptions::new()).unwrap();
    h.apply(&Op::Write { offset: 0, len: 512, seed: 1 }).unwrap();
    h.config.refcount_bits = 16;
    let e = h.apply(&Op::SnapshotCreate).unwrap_err();
    assert!(e.contains("no refcount can overflow"), "{e}");
}
