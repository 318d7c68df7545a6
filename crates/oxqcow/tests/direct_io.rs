//! Cache modes `none` and `directsync` bypass the host page cache: the
//! image file (and its backing chain) is read and written through an
//! `O_DIRECT` descriptor wherever a request meets the alignment, and
//! through the page cache otherwise, with the same content either way.

use std::path::Path;
use std::process::Command;

use oxqcow::{BlockDevice, CacheMode, CreateOptions, Image, OpenOptions};

/// `O_DIRECT` in the `flags` line of `/proc/self/fdinfo` (octal).
const O_DIRECT: u32 = 0o40000;

/// How many descriptors of this process are open on `path` with and
/// without `O_DIRECT`.
fn descriptors_on(path: &Path) -> (usize, usize) {
    let want = std::fs::canonicalize(path).unwrap();
    let (mut direct, mut buffered) = (0, 0);
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        if std::fs::read_link(entry.path()).ok().as_deref() != Some(want.as_path()) {
            continue;
        }
        let info = std::fs::read_to_string(Path::new("/proc/self/fdinfo").join(entry.file_name())).unwrap();
        let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).unwrap().trim();
        if u32::from_str_radix(flags, 8).unwrap() & O_DIRECT != 0 {
            direct += 1;
        } else {
            buffered += 1;
        }
    }
    (direct, buffered)
}

fn qemu_io(path: &Path, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.arg(path).output().expect("qemu-io is required by this test (apt-get install qemu-utils)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && !text.contains("fail"), "{text}{}", String::from_utf8_lossy(&out.stderr));
    text
}

#[test]
fn cache_none_goes_around_the_page_cache_and_keeps_the_data() {
    let dir = tempfile::tempdir().unwrap();
    for (mode, name) in [(CacheMode::None, "none.qcow2"), (CacheMode::DirectSync, "directsync.qcow2")] {
        let path = dir.path().join(name);
        let opts = CreateOptions { cache: mode, ..CreateOptions::qcow2(8 << 20) };
        let img = Image::create(&path, &opts).unwrap();
        let (direct, _) = descriptors_on(&path);
        assert_eq!(direct, 1, "{mode:?}: no O_DIRECT descriptor on the new image");
        // Aligned (direct), unaligned (page cache) and misaligned memory
        // (bounced), allocating and rewriting.
        img.write_at(&vec![0x11; 1 << 20], 0).unwrap();
        img.write_at(&[0x22; 1000], 4097).unwrap();
        let store = vec![0x33u8; 8193];
        img.write_at(&store[1..], 2 << 20).unwrap();
        img.write_at(&[0x44; 512], (2 << 20) + 512).unwrap();
        let mut back = vec![0u8; 3 << 20];
        img.read_at(&mut back[1..(3 << 20) - 4095], 0).unwrap();
        let back = &back[1..(3 << 20) - 4095];
        assert!(back[..4097].iter().all(|&b| b == 0x11));
        assert!(back[4097..5097].iter().all(|&b| b == 0x22));
        assert!(back[5097..1 << 20].iter().all(|&b| b == 0x11));
        assert!(back[(1 << 20)..(2 << 20)].iter().all(|&b| b == 0));
        assert!(back[(2 << 20)..(2 << 20) + 512].iter().all(|&b| b == 0x33));
        assert!(back[(2 << 20) + 512..(2 << 20) + 1024].iter().all(|&b| b == 0x44));
        assert!(back[(2 << 20) + 1024..(2 << 20) + 8192].iter().all(|&b| b == 0x33));
        img.close().unwrap();
        assert_eq!(descriptors_on(&path), (0, 0), "{mode:?}: descriptors left open");
        qemu_io(
            &path,
            &[
                "read -P 0x11 0 4097",
                "read -P 0x22 4097 1000",
                "read -P 0x11 5097 1043479",
                "read -P 0x33 2M 512",
                "read -P 0x44 2097664 512",
                "read -P 0x33 2098176 7168",
            ],
        );
        let out = Command::new("qemu-img").arg("check").arg(&path).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    }
}

#[test]
fn backing_files_inherit_direct_io_and_other_modes_do_not_use_it() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    Image::create(&base, &CreateOptions::qcow2(1 << 20)).unwrap().close().unwrap();
    let opts = CreateOptions {
        backing_file: Some("base.qcow2".into()),
        backing_format: Some("qcow2".into()),
        ..CreateOptions::qcow2(1 << 20)
    };
    Image::create(&top, &opts).unwrap().close().unwrap();
    let img = Image::open(&top, &OpenOptions { cache: CacheMode::None, ..OpenOptions::new() }).unwrap();
    assert_eq!(descriptors_on(&top).0, 1);
    assert_eq!(descriptors_on(&base).0, 1);
    // Switching back to a cached mode stops using them.
    img.set_cache_mode(CacheMode::Writeback).unwrap();
    img.write_at(&[7; 100], 3).unwrap();
    let mut b = [0u8; 100];
    img.read_at(&mut b, 3).unwrap();
    assert_eq!(b, [7; 100]);
    drop(img);
    for mode in [CacheMode::Writeback, CacheMode::Writethrough, CacheMode::Unsafe] {
        let img = Image::open(&top, &OpenOptions { cache: mode, ..OpenOptions::new() }).unwrap();
        assert_eq!(descriptors_on(&top), (0, 1), "{mode:?}");
        drop(img);
    }
}
