use std::process::Command;

use oxqcow::{BlockDevice, CreateOptions, Image, OpenOptions};

#[test]
fn create_write_read_check() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.qcow2");
    {
        let img = Image::create(&path, &CreateOptions::qcow2(16 << 20)).unwrap();
        img.write_at(&[0xaa; 70000], 1000).unwrap();
        img.write_at(&[0xbb; 10], 65530).unwrap();
        let mut buf = vec![0u8; 80000];
        img.read_at(&mut buf, 0).unwrap();
        assert!(buf[..1000].iter().all(|b| *b == 0));
        assert!(buf[1000..65530].iter().all(|b| *b == 0xaa));
        assert!(buf[65530..65540].iter().all(|b| *b == 0xbb));
        assert!(buf[65540..71000].iter().all(|b| *b == 0xaa));
        assert!(buf[71000..].iter().all(|b| *b == 0));
        img.close().unwrap();
    }
    let out = Command::new("qemu-img").arg("check").arg(&path).output().unwrap();
    println!("{}", String::from_utf8_lossy(&out.stdout));
    println!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    let out = Command::new("qemu-io")
        .args(["-c", "read -P 0xaa 1000 64530", "-c", "read -P 0xbb 65530 10", "-c", "read -P 0 71000 1000"])
        .arg(&path)
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    println!("{s}");
    assert!(!s.contains("fail"));
    let img = Image::open(&path, &OpenOptions::new().read_only(true)).unwrap();
    let r = img.check(None).unwrap();
    assert_eq!(r.corruptions, 0, "{:?}", r.messages);
    assert_eq!(r.leaks, 0, "{:?}", r.messages);
}

#[test]
fn fresh_image_is_byte_identical_to_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for (args, opts) in [
        ("cluster_size=65536", CreateOptions::qcow2(1 << 30)),
        ("cluster_size=4096", CreateOptions::qcow2(1 << 30).cluster_size(4096)),
        ("cluster_size=512,refcount_bits=1", CreateOptions::qcow2(100 << 20).cluster_size(512).refcount_bits(1)),
        ("compat=0.10", CreateOptions::qcow2(1 << 30).compat(oxqcow::Compat::V2)),
        ("lazy_refcounts=on,refcount_bits=64", CreateOptions::qcow2(5 << 30).lazy_refcounts(true).refcount_bits(64)),
        ("cluster_size=2M", CreateOptions::qcow2(10 << 30).cluster_size(2 << 20)),
    ] {
        let ours = dir.path().join("ours.qcow2");
        let theirs = dir.path().join("theirs.qcow2");
        Image::create(&ours, &opts).unwrap().close().unwrap();
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", args])
            .arg(&theirs)
            .arg(opts.size.to_string())
            .status()
            .unwrap();
        assert!(st.success());
        let a = std::fs::read(&ours).unwrap();
        let b = std::fs::read(&theirs).unwrap();
        assert_eq!(a.len(), b.len(), "{args}: file length");
        let first_diff = a.iter().zip(&b).position(|(x, y)| x != y);
        assert_eq!(first_diff, None, "{args}: first differing byte");
    }
}
