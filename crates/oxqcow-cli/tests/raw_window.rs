//! QEMU's raw driver with `offset` and `size` (a window onto its file that
//! cannot grow), as the image's format and between a qcow2 image and its
//! file in `json:` names and `--image-opts`; and what happens when a
//! qcow2 image on such a window cannot store its persistent bitmaps at
//! close: QEMU's "Lost persistent bitmaps" lines, "Error while closing the
//! image" and exit codes, subcommand by subcommand. Everything is compared
//! with qemu-img and qemu-io on identical files.

mod common;
mod qemu_oracle;

use std::path::Path;

use common::{must, qemu_img, qemu_io, run_in, Outcome, Pair};

/// QEMU names unnamed nodes `#block` + a counter + two random digits
/// (`id_generate`); the iotests filter them, and so do these tests.
fn filter_node_names(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(at) = rest.find("#block") {
        out.push_str(&rest[..at]);
        let tail = &rest[at + "#block".len()..];
        let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
        if digits >= 3 {
            out.push_str("NODE_NAME");
        } else {
            out.push_str(&rest[at..at + "#block".len() + digits]);
        }
        rest = &tail[digits..];
    }
    out.push_str(rest);
    out
}

/// Runs both tools and asserts the same exit code, stdout and stderr,
/// node names aside.
fn same(pair: &Pair, args: &[&str]) -> Outcome {
    let (q, o) = pair.run(args);
    let fix = |o: Outcome| Outcome { stderr: filter_node_names(&o.stderr), ..o };
    let (q, o) = (fix(q), fix(o));
    assert_eq!(o, q, "oxqcow and qemu-img differ for {args:?}");
    o
}

/// Runs a command in both directories with QEMU's own tools (the setup
/// both sides start from).
fn setup(pair: &Pair, tool: &Path, args: &[&str]) {
    must(&pair.qemu, tool, args);
    must(&pair.ox, tool, args);
}

/// The `json:` name of `base.qcow2` seen through a raw node `size` bytes
/// long.
fn windowed(size: u64) -> String {
    format!(
        r#"json:{{"driver":"qcow2","file":{{"driver":"raw","size":{size},"file":{{"driver":"file","filename":"base.qcow2"}}}}}}"#
    )
}

/// A 1 MiB qcow2 image with bitmap `b1`, its file cut to the six clusters
/// it uses: on a window of exactly that size, storing the bitmap again at
/// close needs a cluster past the window.
fn full_base() -> (Pair, String) {
    let pair = Pair::new();
    setup(&pair, qemu_img(), &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
    setup(&pair, qemu_img(), &["bitmap", "--add", "base.qcow2", "b1"]);
    setup(&pair, qemu_io(), &["-f", "raw", "-c", "truncate 384k", "base.qcow2"]);
    (pair, windowed(384 << 10))
}

fn check_both(pair: &Pair) {
    let out = same(pair, &["check", "base.qcow2"]);
    assert_eq!(out.code, 0, "{out:?}");
}

// Guards against `json:` names with a `raw` file node being refused
// ("Unknown protocol 'raw'") and the raw driver's `offset`/`size` being
// unknown options.
#[test]
fn raw_windows_show_their_part_of_the_file_as_qemu_does() {
    let pair = Pair::new();
    setup(&pair, qemu_img(), &["create", "-q", "-f", "raw", "disk.raw", "1M"]);
    setup(&pair, qemu_io(), &["-f", "raw", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 64k 960k", "disk.raw"]);
    let spec = "driver=raw,offset=64k,size=128k,file.filename=disk.raw";
    same(&pair, &["convert", "--image-opts", spec, "-O", "raw", "part.raw"]);
    same(&pair, &["convert", "--image-opts", "driver=raw,offset=960k,file.filename=disk.raw", "-O", "raw", "tail.raw"]);
    let (q, o) = pair.files();
    assert_eq!(o["part.raw"], q["part.raw"]);
    assert_eq!(q["part.raw"], vec![0x22; 128 << 10]);
    assert_eq!(o["tail.raw"], q["tail.raw"]);
    assert_eq!(q["tail.raw"].len(), 64 << 10);
    // QEMU's validation, in its order and words.
    for bad in [
        "driver=raw,offset=2M,file.filename=disk.raw",
        "driver=raw,offset=512k,size=1M,file.filename=disk.raw",
        "driver=raw,size=1000,file.filename=disk.raw",
        "driver=raw,offset=-1,file.filename=disk.raw",
        "driver=raw,size=abc,file.filename=disk.raw",
    ] {
        let out = same(&pair, &["compare", "--image-opts", bad, "driver=file,filename=disk.raw"]);
        assert_ne!(out.code, 0, "{bad}: {out:?}");
    }
}

// Guards against writes past a fixed-size window going into the rest of
// the file: past the disk of a raw image they fail as any request past
// the end does (EIO), and a qcow2 image on a window finds no room for new
// clusters (ENOSPC).
#[test]
fn writes_past_a_window_fail() {
    let pair = qemu_oracle::Pair::new("raw", None, "1M");
    let spec = "driver=raw,offset=64k,size=960k,file.filename=IMG";
    let out = qemu_oracle::compare_io(
        &pair,
        &[
            "--image-opts",
            "-c",
            "write -P 0x33 896k 64k",
            "-c",
            "write -P 0x44 960k 64k",
            "-c",
            "read -P 0 0 64k",
            spec,
        ],
    );
    assert!(out.stdout.contains("write failed: Input/output error"), "{out:?}");
    qemu_oracle::assert_same_content(&pair.qemu, &pair.ours, "after the writes");

    let pair = qemu_oracle::Pair::new("qcow2", None, "1M");
    for image in [&pair.qemu, &pair.ours] {
        let out = qemu_oracle::run(
            "qemu-io",
            &qemu_oracle::strings(&["-f", "raw", "-c", "truncate 384k", image.to_str().unwrap()]),
            None,
        );
        assert_eq!(out.code, 0, "{out:?}");
    }
    let json =
        r#"json:{"driver":"qcow2","file":{"driver":"raw","size":393216,"file":{"driver":"file","filename":"IMG"}}}"#;
    let out = qemu_oracle::compare_io(
        &pair,
        &["-c", "write -P 0x55 0 64k", "-c", "write -P 0x66 64k 512k", "-c", "read -P 0x55 0 64k", json],
    );
    assert!(out.stdout.contains("write failed: No space left on device"), "{out:?}");
    qemu_oracle::assert_check_clean(&pair.ours, "after the failed write");
    qemu_oracle::assert_same_content(&pair.qemu, &pair.ours, "after the writes");
}

// Guards against bitmaps that cannot be stored at close being reported as
// a plain error (or not at all) instead of QEMU's lines: `bitmap` reports
// the loss, then "Error while closing the image", then the loss again
// when it closes, and fails.
#[test]
fn bitmap_fails_when_its_bitmaps_are_lost_at_close() {
    let (pair, json) = full_base();
    let out = same(&pair, &["bitmap", "--add", &json, "b2"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("Lost persistent bitmaps during inactivation of node 'NODE_NAME': "), "{out:?}");
    assert!(out.stderr.contains("Error while closing the image: Invalid argument"), "{out:?}");
    check_both(&pair);
    // The bitmaps stay in use on disk: later opens neither store nor lose them.
    let out = same(&pair, &["bitmap", "--add", &json, "b3"]);
    assert_eq!(out.code, 1, "{out:?}");
    check_both(&pair);
}

// Guards against commit reporting success when the base's bitmaps could
// not be stored: QEMU tries twice (inactivation, then close) and fails
// with "Error while closing the image" instead of "Image committed.".
#[test]
fn commit_fails_when_the_base_loses_its_bitmaps() {
    let (pair, json) = full_base();
    setup(&pair, qemu_img(), &["create", "-q", "-f", "qcow2", "-b", &json, "-F", "qcow2", "top.qcow2"]);
    let out = same(&pair, &["commit", "-d", "top.qcow2"]);
    assert_eq!(out.code, 1);
    assert_eq!(out.stdout, "");
    check_both(&pair);
}

// Guards against the other subcommands failing (or staying silent) when
// the image they close loses its bitmaps: QEMU prints the loss once, as the
// image closes, and the command's result stands.
#[test]
fn other_subcommands_report_lost_bitmaps_and_succeed() {
    for args in
        [&["amend", "-o", "lazy_refcounts=on", "JSON"][..], &["check", "-r", "all", "JSON"], &["resize", "JSON", "2M"]]
    {
        let (pair, json) = full_base();
        let args: Vec<&str> = args.iter().map(|a| if *a == "JSON" { json.as_str() } else { a }).collect();
        let out = same(&pair, &args);
        assert_eq!(out.code, 0, "{args:?}: {out:?}");
        assert_eq!(out.stderr.matches("Lost persistent bitmaps").count(), 1, "{args:?}: {out:?}");
        check_both(&pair);
    }
}

// Guards against `json:` backing file names being refused: an overlay
// whose backing file is a qcow2 image on a raw window reads it through
// the window, and `create -b json:...` takes its size from it.
#[test]
fn json_backing_files_open_through_their_windows() {
    let pair = Pair::new();
    setup(&pair, qemu_img(), &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
    setup(&pair, qemu_io(), &["-c", "write -P 0x55 0 64k", "base.qcow2"]);
    setup(&pair, qemu_io(), &["-f", "raw", "-c", "truncate 512k", "base.qcow2"]);
    let json = windowed(512 << 10);
    same(&pair, &["create", "-f", "qcow2", "-b", &json, "-F", "qcow2", "top.qcow2"]);
    same(&pair, &["info", "top.qcow2"]);
    same(&pair, &["convert", "-O", "raw", "top.qcow2", "flat.raw"]);
    let (q, o) = pair.files();
    assert_eq!(o["flat.raw"], q["flat.raw"]);
    assert_eq!(q["flat.raw"][..64 << 10], vec![0x55; 64 << 10][..]);
    // A window the file is too short for is refused as QEMU refuses it.
    same(&pair, &["create", "-f", "qcow2", "-b", &windowed(1 << 20), "-F", "qcow2", "bad.qcow2"]);
    let out = run_in(&pair.qemu, qemu_img(), &["check", "top.qcow2"]);
    assert_eq!(out.code, 0, "{out:?}");
}
