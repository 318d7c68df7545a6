//! qcow2's runtime options and the generic block-layer ones act as QEMU's
//! do: the same images after the same requests (compared with
//! `qemu-img map` and `qemu-img check`), and QEMU's messages for values
//! it refuses (compared with what qemu-io says).

use std::path::Path;
use std::process::Command;

use oxqcow::{BlockDevice, Image, OpenOptions};

fn run(args: &[&str]) -> std::process::Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{} must be installed (apt-get install qemu-utils): {e}", args[0]))
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

/// A 1 MiB image (64 KiB clusters) with data in its first two clusters.
fn image_with_data(path: &Path, compat: &str) {
    let o = format!("compat={compat},cluster_size=64k");
    assert!(run(&["qemu-img", "create", "-q", "-f", "qcow2", "-o", &o, p(path), "1M"]).status.success());
    assert!(run(&["qemu-io", "-c", "write -P 7 0 128k", p(path)]).status.success());
}

/// `qemu-img map --output=json` and `qemu-img check` of an image, which
/// together show its mapping, its zero clusters and its refcounts.
fn state(path: &Path) -> String {
    let map = run(&["qemu-img", "map", "--output=json", p(path)]);
    let check = run(&["qemu-img", "check", p(path)]);
    text(&map) + &text(&check)
}

fn opened(path: &Path, options: &[(&str, &str)]) -> oxqcow::Result<Image> {
    let mut opts = OpenOptions::new();
    for (k, v) in options {
        opts.apply_qemu_option(k, v)?;
    }
    Image::open(path, &opts)
}

/// Applies `qemu_cmd` with qemu-io and `ours` with the engine, both opened
/// with `options`, to copies of the same image; their states must match.
fn same_as_qemu(compat: &str, options: &[(&str, &str)], qemu_cmd: &str, ours: impl Fn(&Image)) {
    let dir = tempfile::tempdir().unwrap();
    let theirs = dir.path().join("theirs.qcow2");
    let mine = dir.path().join("mine.qcow2");
    image_with_data(&theirs, compat);
    std::fs::copy(&theirs, &mine).unwrap();
    let spec: String = options.iter().map(|(k, v)| format!(",{k}={v}")).collect();
    let spec = format!("driver=qcow2,file.filename={}{spec}", p(&theirs));
    let out = run(&["qemu-io", "--image-opts", "-c", qemu_cmd, &spec]);
    assert!(out.status.success() && !text(&out).contains("failed"), "{}", text(&out));
    let image = opened(&mine, options).unwrap();
    ours(&image);
    image.close().unwrap();
    let (a, b) = (state(&theirs), state(&mine));
    assert_eq!(a.replace("theirs", "IMG"), b.replace("mine", "IMG"), "{options:?}: {qemu_cmd}");
}

// Guards against discard-no-unref being ignored: discarded clusters were
// freed (unallocated, refcount dropped) where QEMU keeps them as zero
// clusters that still own their host clusters.
#[test]
fn discard_no_unref_keeps_the_host_clusters() {
    let opts = [("discard-no-unref", "on")];
    same_as_qemu("1.1", &opts, "discard 0 64k", |i| i.discard(0, 65536).unwrap());
    same_as_qemu("1.1", &opts, "write -z -u 64k 64k", |i| i.write_zeroes_at(65536, 65536, true).unwrap());
}

// Guards against detect-zeroes being ignored: a buffer of zeros was written
// as data where QEMU writes a zero cluster (and with unmap frees it).
#[test]
fn detect_zeroes_turns_zero_buffers_into_zero_writes() {
    let zeros = vec![0u8; 65536];
    same_as_qemu("1.1", &[("detect-zeroes", "on")], "write -P 0 0 64k", |i| i.write_at(&zeros, 0).unwrap());
    same_as_qemu("1.1", &[("discard", "unmap"), ("detect-zeroes", "unmap")], "write -P 0 0 64k", |i| {
        i.write_at(&zeros, 0).unwrap()
    });
}

// Guards against runtime option values QEMU refuses being accepted, or
// refused with other words.
#[test]
fn refused_values_get_qemus_messages() {
    let dir = tempfile::tempdir().unwrap();
    let v3 = dir.path().join("v3.qcow2");
    let v2 = dir.path().join("v2.qcow2");
    image_with_data(&v3, "1.1");
    image_with_data(&v2, "0.10");
    let cases: &[(&Path, &[(&str, &str)])] = &[
        (&v3, &[("l2-cache-entry-size", "1000")]),
        (&v3, &[("l2-cache-entry-size", "256")]),
        (&v3, &[("l2-cache-entry-size", "128k")]),
        (&v3, &[("cache-clean-interval", "4294967296")]),
        (&v3, &[("cache-clean-interval", "-1")]),
        (&v3, &[("cache-clean-interval", "abc")]),
        (&v3, &[("detect-zeroes", "foo")]),
        (&v3, &[("discard", "ignore"), ("detect-zeroes", "unmap")]),
        (&v3, &[("overlap-check", "constant"), ("overlap-check.template", "all")]),
        (&v2, &[("discard-no-unref", "on")]),
    ];
    for (path, options) in cases {
        let spec: String = options.iter().map(|(k, v)| format!(",{k}={v}")).collect();
        let spec = format!("driver=qcow2,file.filename={}{spec}", p(path));
        let out = text(&run(&["qemu-io", "--image-opts", "-c", "read 0 512", &spec]));
        let theirs = out.trim().strip_prefix("qemu-io: can't open: ").unwrap_or_else(|| panic!("{spec}: {out}"));
        let ours = match opened(path, options) {
            Ok(_) => panic!("{options:?} accepted; QEMU says: {theirs}"),
            Err(e) => e.to_string(),
        };
        assert!(ours.contains(theirs), "{options:?}: ours {ours:?}, QEMU's {theirs:?}");
    }
    // What QEMU accepts opens here too.
    for options in
        [&[("l2-cache-entry-size", "512")][..], &[("cache-clean-interval", "0")], &[("discard-no-unref", "on")]]
    {
        opened(&v3, options).unwrap_or_else(|e| panic!("{options:?}: {e}"));
    }
}

/// Host storage that records the ranges punched out of it.
#[derive(Default)]
struct PunchLog {
    inner: oxqcow::MemoryStorage,
    punched: std::sync::Mutex<Vec<(u64, u64)>>,
}

impl oxqcow::Storage for PunchLog {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.inner.sync()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.punched.lock().unwrap().push((offset, len));
        self.inner.punch_hole(offset, len)
    }
}

/// With `pass-discard-request`, a discard of adjacent clusters punched
/// each host cluster on its own; QEMU merges its queued discards and
/// punches the run at once. Punching a run piece by piece splits the host
/// file's extents on the way, and the file system may keep the extent tree
/// block a split needed: the image used more disk than QEMU's.
#[test]
fn adjacent_freed_clusters_are_punched_in_one_range() {
    use std::sync::Arc;
    let storage = Arc::new(PunchLog::default());
    let cs = 65536;
    let create = oxqcow::CreateOptions { cluster_size: cs, ..oxqcow::CreateOptions::qcow2(4 << 20) };
    let img = Image::create_storage(storage.clone(), &create).unwrap();
    img.write_at(&vec![7u8; 1 << 20], 0).unwrap();
    img.close().unwrap();
    let opts = OpenOptions {
        format: Some(oxqcow::ImageFormat::Qcow2),
        discard_passthrough: true,
        unmap: true,
        ..Default::default()
    };
    let img = Image::open_storage(storage.clone(), &opts).unwrap();
    let host = |img: &Image, guest: u64| img.block_status(guest, cs).unwrap()[0].host_offset.unwrap();
    let first = host(&img, 2 * cs);
    assert_eq!(host(&img, 9 * cs), first + 7 * cs, "the data must lie in one host run");
    storage.punched.lock().unwrap().clear();
    img.discard(2 * cs, 8 * cs).unwrap();
    img.flush().unwrap();
    assert_eq!(*storage.punched.lock().unwrap(), [(first, 8 * cs)]);
    img.close().unwrap();
}
