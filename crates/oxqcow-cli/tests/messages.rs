//! Where QEMU has a message for a damaged header, oxqcow prints QEMU's text
//! exactly, with nothing added (scripts and QEMU's own tests match it).

mod common;

use common::{patch, Scratch};

#[test]
fn damaged_headers_are_refused_with_qemus_words() {
    let s = Scratch::new();
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
    let base = std::fs::read(s.path("base.qcow2")).unwrap();
    let be32 = |v: u32| v.to_be_bytes().to_vec();
    let be64 = |v: u64| v.to_be_bytes().to_vec();
    let cases: &[(&str, u64, Vec<u8>)] = &[
        ("header-too-short.qcow2", 100, be32(96)),
        ("header-too-long.qcow2", 100, be32(70000)),
        ("too-big.qcow2", 24, be64(1 << 62)),
        ("refcount-order.qcow2", 96, be32(7)),
        ("l1-too-small.qcow2", 36, be32(0)),
        ("reftable-offset.qcow2", 48, be64(0x10200)),
        ("reftable-too-large.qcow2", 56, be32(0x0100_0000)),
        ("backing-offset.qcow2", 8, be64(0x20000)),
        ("cluster-bits.qcow2", 20, be32(22)),
        ("version.qcow2", 4, be32(4)),
    ];
    for (name, offset, bytes) in cases {
        std::fs::write(s.path(name), &base).unwrap();
        patch(&s.path(name), *offset, bytes);
        let out = s.assert_same(&["info", name]);
        assert_eq!(out.code, 1, "{name}: {out:?}");
        assert!(!out.stderr.contains(" ("), "{name}: QEMU adds no detail: {}", out.stderr);
    }
}
