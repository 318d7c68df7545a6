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

fn qemu(args: &[&str]) -> std::process::Output {
    let out = Command::new(args[0]).args(&args[1..]).output().expect("qemu tools must be installed");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

#[test]
fn reads_images_qemu_compressed() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let mut data = vec![0u8; 3 << 20];
    for (i, b) in data.iter_mut().enumerate() {
        *b = if (i / 65536) % 3 == 0 {
            (i % 251) as u8
        } else if (i / 65536) % 3 == 1 {
            0
        } else {
            (i * 7 / 13) as u8
        };
    }
    data[500_000..500_010].copy_from_slice(b"0123456789");
    std::fs::write(&raw, &data).unwrap();
    for (ctype, cs) in [("zlib", "65536"), ("zstd", "65536"), ("zlib", "4096"), ("zstd", "512"), ("zlib", "2M")] {
        let q = dir.path().join(format!("c-{ctype}-{cs}.qcow2"));
        let o = format!("compression_type={ctype},cluster_size={cs}");
        qemu(&[
            "qemu-img",
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &o,
            raw.to_str().unwrap(),
            q.to_str().unwrap(),
        ]);
        let img = Image::open(&q, &OpenOptions::new().read_only(true)).unwrap();
        let mut back = vec![0u8; data.len()];
        img.read_at(&mut back, 0).unwrap();
        assert!(back == data, "{ctype} {cs}: content differs");
        let r = img.check(None).unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0), "{ctype} {cs}: {:?}", r.messages);
        assert!(r.compressed_clusters > 0);
    }
}

#[test]
fn writes_compressed_clusters_qemu_reads() {
    let dir = tempfile::tempdir().unwrap();
    for (ctype, cs) in [
        (oxqcow::CompressionType::Zlib, 65536u64),
        (oxqcow::CompressionType::Zstd, 4096),
        (oxqcow::CompressionType::Zlib, 512),
    ] {
        let path = dir.path().join("w.qcow2");
        let mut opts = CreateOptions::qcow2(2 << 20).cluster_size(cs);
        opts.compression_type = ctype;
        let img = Image::create(&path, &opts).unwrap();
        let q = img.as_qcow2().unwrap();
        let mut data = vec![0u8; 2 << 20];
        for (i, b) in data.iter_mut().enumerate() {
            *b = ((i / 100) % 17) as u8;
        }
        q.write_compressed(&data[..1 << 20], 0).unwrap();
        data[1 << 20..].fill(0);
        // Overwrite parts of compressed clusters (COW from compressed data) and zero some.
        img.write_at(&[0xee; 300], 1000).unwrap();
        data[1000..1300].fill(0xee);
        img.write_zeroes_at(cs * 3, cs, true).unwrap();
        data[(cs * 3) as usize..(cs * 4) as usize].fill(0);
        img.discard(cs * 5, cs).unwrap();
        data[(cs * 5) as usize..(cs * 6) as usize].fill(0);
        img.flush().unwrap();
        let mut back = vec![0u8; data.len()];
        img.read_at(&mut back, 0).unwrap();
        assert!(back == data, "{ctype:?} {cs}: our read-back differs");
        img.close().unwrap();
        qemu(&["qemu-img", "check", path.to_str().unwrap()]);
        let raw = dir.path().join("w.raw");
        qemu(&["qemu-img", "convert", "-O", "raw", path.to_str().unwrap(), raw.to_str().unwrap()]);
        assert!(std::fs::read(&raw).unwrap() == data, "{ctype:?} {cs}: qemu reads different content");
    }
}
