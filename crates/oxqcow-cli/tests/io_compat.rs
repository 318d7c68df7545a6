//! `oxqcow io` against qemu-io: the same command sequences on copies of
//! the same image must print the same lines (timings aside), exit with the
//! same code, and leave images with the same content and allocation, which
//! `qemu-img check` finds clean.

mod qemu_oracle;

use std::path::Path;

use qemu_oracle::{
    assert_check_clean, assert_same_content, compare_io, compare_io_stdin, guest_map, ox, qemu, Output, Pair,
};

/// Content, allocation and consistency of the two images after the same commands.
fn compare_images(pair: &Pair, context: &str) {
    assert_same_content(&pair.qemu, &pair.ours, context);
    assert_eq!(guest_map(&pair.ours), guest_map(&pair.qemu), "{context}: allocation differs");
    if is_qcow2(&pair.ours) {
        assert_check_clean(&pair.ours, context);
    }
}

fn is_qcow2(path: &Path) -> bool {
    std::fs::read(path).map(|b| b.starts_with(b"QFI\xfb")).unwrap_or(false)
}

fn c(cmds: &[&'static str]) -> Vec<&'static str> {
    cmds.iter().flat_map(|c| ["-c", *c]).collect()
}

fn io(pair: &Pair, extra: &[&str], cmds: &[&'static str]) -> Output {
    let mut args: Vec<&str> = extra.to_vec();
    args.extend(c(cmds));
    args.push("IMG");
    compare_io(pair, &args)
}

#[test]
fn reads_writes_and_reports() {
    let pair = Pair::new("qcow2", None, "1M");
    let out = io(
        &pair,
        &[],
        &[
            "write 0 64k",
            "write -P 0x12 1000 1",
            "read -P 0x12 1000 1",
            "read -P 0xcd 0 1000",
            "read -v 990 32",
            "read -q 0 1",
            "write -C 4k 4k",
            "read -C 4k 4k",
            "writev -P 3 128k 1k 2k 512",
            "readv -P 3 128k 2k 1536",
            "aio_write -P 0x5a 256k 4k 4k",
            "aio_flush",
            "aio_read -P 0x5a 256k 8k",
            "aio_flush",
            "aio_read -v 256k 16",
            "aio_flush",
            "map",
            "alloc 0 1M",
            "alloc 64k",
            "alloc 0",
            "length",
            "info",
            "flush",
            "r -P 0 512k 1",
            "w -P 1 512k 1",
            "l",
            "i",
            "f",
        ],
    );
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    compare_images(&pair, "reads_writes_and_reports");
}

#[test]
fn zero_writes_with_and_without_unmap() {
    let pair = Pair::new("qcow2", None, "4M");
    io(
        &pair,
        &[],
        &[
            "write -P 0xaa 0 1M",
            "write -z 0 64k",
            "write -z -u 64k 64k",
            "write -z 200k 1000",
            "write -z -u 300000 200000",
            "write -z 1M 128k",
            "write -z -u 2M 100",
            "write -z 3M 1M",
            "map",
            "read -P 0 0 128k",
            "read -P 0xaa 128k 72k",
            "read -P 0 200k 1000",
            "read -P 0 300000 200000",
            "write -z -n 3M 64k",
            "write -z -n 100 100",
            "write -z -n 3000000 10",
            "aio_write -z 512k 64k",
            "aio_flush",
            "aio_write -z -u 576k 64k",
            "aio_flush",
            "alloc 0 4M",
            "map",
        ],
    );
    compare_images(&pair, "zero writes");
}

#[test]
fn discards_aligned_unaligned_and_at_the_end() {
    // 1 MiB + 1000 bytes: the last cluster is partial.
    let pair = Pair::new("qcow2", None, "1049576");
    io(
        &pair,
        &[],
        &[
            "write -P 1 0 1049576",
            "discard 0 64k",
            "discard 100k 100k",
            "discard 300k 1",
            "discard 1M 1000",
            "discard 0 0",
            "discard 512k 1",
            "d 640k 64k",
            "map",
            "alloc 0 2M",
            "read -P 1 64k 36k",
            "read -P 0 0 64k",
            "read -P 1 1000k 10",
            "discard -q 704k 64k",
            "discard -C 768k 64k",
            "map",
        ],
    );
    compare_images(&pair, "discards");
}

#[test]
fn unaligned_writes_across_clusters() {
    let pair = Pair::new("qcow2", Some("cluster_size=4k"), "1M");
    io(
        &pair,
        &[],
        &[
            "write -P 1 1 1",
            "write -P 2 4095 2",
            "write -P 3 5000 10000",
            "write -P 4 12345 678",
            "write -P 5 65535 65537",
            "read -P 1 1 1",
            "read -P 2 4095 2",
            "read -P 3 5000 7345",
            "read -P 4 12345 678",
            "read -P 3 13023 1977",
            "read -P 5 65535 65537",
            "read -P 0 0 1",
            "map",
            "alloc 0 1M",
        ],
    );
    compare_images(&pair, "unaligned writes");
}

#[test]
fn requests_at_and_past_the_last_byte() {
    let pair = Pair::new("qcow2", None, "1M");
    let out = io(
        &pair,
        &[],
        &[
            "write -P 9 1048575 1",
            "read -P 9 1048575 1",
            "read -P 0 1048574 1",
            "write 1048575 2",
            "write 1M 1",
            "write 1M 0",
            "write 2M 0",
            "read 1M 0",
            "read 2M 0",
            "read 0 2M",
            "write -z 1048064 512",
            "write -z 1048064 513",
            "discard 1048064 512",
            "discard 1048064 1024",
            "aio_write 1048575 2",
            "aio_flush",
            "aio_read 1M 1",
            "aio_flush",
            "alloc 1048575 1",
            "alloc 1M",
            "alloc 2M 1",
            "map",
        ],
    );
    assert_eq!(out.code, 1);
    compare_images(&pair, "last byte");
}

#[test]
fn pattern_verification_failures() {
    let pair = Pair::new("qcow2", None, "1M");
    let out = io(
        &pair,
        &[],
        &[
            "write -P 0x11 0 4k",
            "read -P 0x11 0 4k",
            "read -P 0x12 0 4k",
            "read -P 0x11 0 5k",
            "read -P 0x11 -s 1k -l 2k 0 4k",
            "read -P 0x11 -s 3k 2k 4k",
            "read -P 0x11 -s 2k -l 3k 0 4k",
            "read -P 0 -s 4k -l 1k 0 5k",
            "read -P 0x11 -l 0 4k 1k",
            "readv -P 0x11 0 2k 3k",
            "aio_read -P 0x11 0 2k 3k",
            "aio_flush",
            "read -P 0x100 0 1",
            "read -P abc 0 1",
            "read -P -1 0 1",
            "read -P 010 0 1",
            "write -P 0x1g 0 1",
        ],
    );
    assert_eq!(out.code, 1, "a failed verification fails the run");
    // A verification that passes leaves the exit code at 0.
    let good = io(&pair, &[], &["read -P 0x11 0 4k", "aio_read -P 0x12 0 4k", "aio_flush"]);
    assert_eq!(good.code, 0, "aio_read mismatches do not fail the run");
}

#[test]
fn argument_errors_and_usage() {
    let pair = Pair::new("qcow2", None, "1M");
    io(
        &pair,
        &[],
        &[
            "read 0 1x",
            "read x 1",
            "read 0 99999999999999999999",
            "read 0 8E",
            "read 0 3G",
            "read 0",
            "read",
            "read 0 1 2",
            "read -x 0 1",
            "read -P",
            "read 0 -1",
            "read -- 0 1",
            "read 0 1 -v",
            "read -s 1 0 1",
            "bogus",
            "write -u 0 1",
            "write -n 0 1",
            "write -z -P 1 0 1",
            "write -s /nonexistent 0 1",
            "write -f -c 0 64k",
            "write -z 0 3G",
            "write -c 1 512",
            "write -c 0 511",
            "write -b -z 0 512",
            "write -z -r 0 1",
            "aio_write -z 0 1 1",
            "aio_write -u 0 1",
            "aio_write -z -P 1 0 1",
            "aio_flush",
            "aio_write -i 0 1",
            "aio_read -i 0 1",
            "aio_read 0 3G",
            "aio_read 0 2G 2G",
            "aio_write 0",
            "discard 0 3G",
            "discard 0",
            "discard -x 0 1",
            "alloc x",
            "alloc 0 1 2",
            "alloc",
            "map 1",
            "length 1",
            "info 1",
            "close 1",
            "truncate",
            "truncate x",
            "truncate 8E",
            "truncate -m bogus 2M",
            "help foo",
            "help a b",
            "read 0x10 0x10",
            "read 010 1",
            "read 1.5k 1",
            "read 1.5 1",
            "read 0 1b",
            "read 0 +1",
            "read 0.1k 1",
            "read 1.k 1",
        ],
    );
    compare_images(&pair, "argument errors");
}

#[test]
fn write_source_file_and_flags() {
    let pair = Pair::new("qcow2", None, "1M");
    let src = pair.path("pattern.bin");
    std::fs::write(&src, b"oxqcow!").expect("write pattern file");
    let empty = pair.path("empty.bin");
    std::fs::write(&empty, b"").expect("write empty file");
    let write_src = format!("write -s {} 100 1000", src.display());
    let write_empty = format!("write -s {} 0 10", empty.display());
    let args: Vec<String> = vec![
        "-c".into(),
        write_src,
        "-c".into(),
        "read -v 96 32".into(),
        "-c".into(),
        write_empty,
        "-c".into(),
        "write -f -P 7 64k 4k".into(),
        "-c".into(),
        "write -p -r -P 8 128k 4k".into(),
        "-c".into(),
        "read -p -r -P 8 128k 4k".into(),
        "IMG".into(),
    ];
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    compare_io(&pair, &refs);
    compare_images(&pair, "source file writes");
}

#[test]
fn compressed_writes() {
    let pair = Pair::new("qcow2", None, "1M");
    io(
        &pair,
        &[],
        &[
            "write -c 0 64k",
            "write -c -P 0x33 64k 128k",
            "write -c 0 512",
            "write -c 512 512",
            "write -c 960k 64k",
            "write -c 0 64k",
            "read -P 0xcd 0 64k",
            "read -P 0x33 64k 128k",
            "write -P 1 100 1",
            "read -P 1 100 1",
            "read -P 0xcd 101 65435",
            "map",
        ],
    );
    compare_images(&pair, "compressed writes");
}

#[test]
fn truncate_grow_shrink_and_refusals() {
    let pair = Pair::new("qcow2", None, "1M");
    io(
        &pair,
        &[],
        &[
            "write -P 1 0 1M",
            "truncate 3G",
            "info",
            "length",
            "truncate 512k",
            "info",
            "length",
            "map",
            "truncate 1048577",
            "truncate -m full 256k",
            "truncate -m falloc 1M",
            "truncate -m metadata 2M",
            "truncate -m full 3M",
            "truncate 128P",
            "length",
            "map",
            "read -P 1 0 512k",
            "read -P 0 512k 2560k",
            "t 0",
            "length",
            "map",
        ],
    );
    compare_images(&pair, "truncate");
}

#[test]
fn version_2_and_small_clusters() {
    let v2 = Pair::new("qcow2", Some("compat=0.10"), "1G");
    io(
        &v2,
        &[],
        &[
            "info",
            "length",
            "write -z 0 64k",
            "write 64k 100k",
            "write -z 70k 10",
            "write -z -u 1M 1M",
            "discard 0 1M",
            "write -z -n 0 64k",
            "map",
            "alloc 0 1G",
        ],
    );
    compare_images(&v2, "version 2");
    let small = Pair::new("qcow2", Some("cluster_size=512,refcount_bits=1,lazy_refcounts=on"), "100k");
    io(
        &small,
        &[],
        &[
            "info",
            "write -P 1 0 100k",
            "discard 1000 50000",
            "write -z 300 1000",
            "write -z -u 512 2048",
            "map",
            "read -P 0 512 2048",
            "read -P 1 0 300",
        ],
    );
    compare_images(&small, "small clusters");
    let odd = Pair::new("qcow2", Some("cluster_size=4k"), "1536");
    io(&odd, &[], &["info", "length", "map", "write 1535 1", "read -P 0xcd 1535 1", "alloc 0 2k"]);
    compare_images(&odd, "sub-cluster image");
}

#[test]
fn raw_images() {
    let pair = Pair::new("raw", None, "1M");
    io(
        &pair,
        &["-f", "raw"],
        &[
            "write -P 3 64k 4k",
            "write -z 128k 4k",
            "write -z -u 256k 64k",
            "discard 512k 64k",
            "map",
            "alloc 0 1M",
            "length",
            "info",
            "write -c 0 64k",
            "truncate -m metadata 2M",
            "truncate -m falloc 2M",
            "truncate 512k",
            "length",
            "read 0 512k",
            "read 1 512k",
        ],
    );
    compare_images(&pair, "raw");
    // Probed raw: QEMU warns, and refuses to write an image header into sector 0.
    let probed = Pair::new("raw", None, "1M");
    io(&probed, &[], &["write -P 0x51 0 4", "write -P 1 0 512", "read -P 1 0 512", "length"]);
    compare_images(&probed, "probed raw");
    io(&probed, &["-r"], &["length", "map"]);
}

#[test]
fn backing_chain_reads_and_copy_on_write() {
    let pair = Pair::new("qcow2", None, "2M");
    // Give both copies a backing file with data, each its own copy.
    for (overlay, name) in [(&pair.qemu, "qemu-base.qcow2"), (&pair.ours, "ours-base.qcow2")] {
        let base = pair.path(name);
        create(&["-f", "qcow2", base.to_str().unwrap(), "1M"]);
        let w = qemu("qemu-io", &["-c", "write -P 7 0 1M", base.to_str().unwrap()]);
        assert_eq!(w.code, 0, "{}", w.stderr);
        create(&["-f", "qcow2", "-b", base.to_str().unwrap(), "-F", "qcow2", overlay.to_str().unwrap(), "2M"]);
    }
    io(
        &pair,
        &[],
        &[
            "map",
            "alloc 0 2M",
            "read -P 7 0 1M",
            "read -P 0 1M 1M",
            "write -P 8 1000 100",
            "read -P 7 0 1000",
            "read -P 8 1000 100",
            "read -P 7 1100 64436",
            "write -z 128k 64k",
            "write -z 200k 10",
            "discard 256k 64k",
            "map",
            "read -P 0 128k 64k",
            "read -P 7 320k 64k",
        ],
    );
    compare_images(&pair, "backing chain");
}

fn create(args: &[&str]) {
    qemu_oracle::create(args);
}

#[test]
fn read_only_and_open_close() {
    let pair = Pair::new("qcow2", None, "1M");
    io(
        &pair,
        &["-r"],
        &["truncate 2M", "write 0 1", "discard 0 1", "flush", "aio_write 0 1", "writev 0 1", "read 0 1", "length"],
    );
    io(
        &pair,
        &[],
        &[
            "open IMG",
            "close",
            "read 0 1",
            "close",
            "open -r IMG",
            "write 0 1",
            "open IMG",
            "c",
            "o -o driver=raw IMG",
            "info",
            "close",
            "open -f qcow2 IMG",
            "open",
            "open -o l2-cache-size=1M IMG",
            "write -P 4 0 4k",
            "close",
            "open -o bogus=1 IMG",
            "open -t bogus IMG",
            "open -d bogus IMG",
            "open -i bogus IMG",
            "open -U IMG",
            "open -r -U -n -t none -d ignore -i threads IMG",
            "read -P 4 0 4k",
            "quit",
            "read 0 1",
        ],
    );
    compare_images(&pair, "open and close");
    // Commands before any image is open.
    compare_io(&pair, &["-c", "read 0 1", "-c", "help length", "-c", "open IMG", "-c", "length"]);
}

#[test]
fn command_line_options_and_open_errors() {
    let pair = Pair::new("qcow2", None, "1M");
    let missing = pair.path("missing.qcow2");
    let missing = missing.to_str().unwrap();
    for args in [
        vec!["-t", "bogus", "-c", "length", "IMG"],
        vec!["-t", "writethrough", "-c", "write 0 1", "IMG"],
        vec!["-t", "unsafe", "-c", "write 0 1", "-c", "flush", "IMG"],
        vec!["-n", "-c", "length", "IMG"],
        vec!["--cache=directsync", "-c", "write 0 1", "IMG"],
        vec!["-i", "native", "-c", "length", "IMG"],
        vec!["-n", "-i", "native", "-c", "length", "IMG"],
        vec!["-k", "-c", "length", "IMG"],
        vec!["-i", "bogus", "-c", "length", "IMG"],
        vec!["-d", "bogus", "-c", "length", "IMG"],
        vec!["-d", "ignore", "-c", "write 0 64k", "-c", "discard 0 64k", "-c", "discard 1M 1", "IMG"],
        vec!["-d", "ignore", "-c", "write 64k 64k", "-c", "write -z -u 64k 64k", "-c", "map", "IMG"],
        vec!["-d", "unmap", "-c", "write 128k 64k", "-c", "write -z -u 128k 64k", "-c", "map", "IMG"],
        vec!["-U", "-c", "length", "IMG"],
        vec!["-U", "-r", "-c", "length", "IMG"],
        vec!["-m", "-c", "length", "IMG"],
        vec!["-c", "length", "-f", "qcow2"],
        vec!["-f", "raw", "-c", "length", "IMG"],
        vec!["-f", "bogus", "-c", "length", "IMG"],
        vec!["-c", "read 0 1", missing],
        vec!["--object", "foo,id=x", "-c", "length", "IMG"],
        vec!["--object", "secret,id=s0,data=abc", "-c", "length", "IMG"],
        vec!["--object", "secret,data=abc", "-c", "length", "IMG"],
        vec!["--object", "secret,id=s0", "-c", "length", "IMG"],
        vec!["--object", "secret,id=s0,data=x,bogus=1", "-c", "length", "IMG"],
        vec!["--image-opts", "-c", "length", "driver=qcow2,file.filename=IMG"],
        vec!["--image-opts", "-c", "length", "IMG"],
        vec!["--image-opts", "-c", "length", "driver=qcow2,file.filename=IMG,l2-cache-size=1M"],
        vec!["--image-opts", "-c", "length", "driver=qcow2,file.filename=IMG,bogus=1"],
        vec!["--image-opts", "-f", "qcow2", "-c", "length", "driver=qcow2,file.filename=IMG"],
        vec!["--image-opts", "-c", "length", "file.filename=IMG"],
        vec!["--image-opts", "-c", "open -o driver=raw IMG", "driver=qcow2,file.filename=IMG"],
        vec!["-c", "", "-c", "  ", "-c", "length", "IMG"],
        vec!["--cmd=length", "--read-only", "IMG"],
    ] {
        compare_io(&pair, &args);
    }
    compare_images(&pair, "command line options");
}

/// io had its own option splitter, which dropped empty items, read `no`
/// as the flag `no` and warned about `help`; QemuOpts reads `,x` and `no`
/// as flags named "" (`=on`, `=off`) and does not warn about a help
/// request. Now io splits as every other command does
/// (`oxqcow::qemu_syntax`), with QEMU's warnings.
#[test]
fn image_opts_split_as_qemu_opts_splits_them() {
    let pair = Pair::new("raw", None, "1M");
    for spec in [
        ",driver=raw,file.filename=IMG",
        "driver=raw,file.filename=IMG,no",
        "driver=raw,file.filename=IMG,help",
        "driver=raw,file.filename=IMG,nohelp",
        "driver=raw,file.filename=IMG,noread-only",
        "driver=raw,file.filename=IMG,",
    ] {
        compare_io(&pair, &["--image-opts", "-c", "length", spec]);
        compare_io(&pair, &["-c", &format!("open -o {spec}"), "-c", "length"]);
    }
}

#[test]
fn commands_from_standard_input() {
    let pair = Pair::new("qcow2", None, "1M");
    let script = "write -P 5 0 4k\nread -P 5 0 4k\n\nbogus\n  map  \nread 0\nlength\nquit\nlength\n";
    let out = compare_io_stdin(&pair, &["IMG"], Some(script));
    assert_eq!(out.code, 1);
    compare_images(&pair, "stdin commands");
}

#[test]
fn snapshot_mode_leaves_the_file_alone() {
    let pair = Pair::new("qcow2", None, "1M");
    let before = std::fs::read(&pair.ours).expect("read image");
    io(&pair, &["-s"], &["write -P 6 0 64k", "read -P 6 0 64k", "map", "info", "truncate 2M", "length"]);
    assert_eq!(std::fs::read(&pair.ours).expect("read image"), before, "-s must not touch the image file");
    compare_images(&pair, "snapshot mode");
}

#[test]
fn bad_input_never_panics() {
    let pair = Pair::new("qcow2", None, "1M");
    let img = pair.ours.to_str().unwrap();
    for cmd in [
        "read 8E 1",
        "read 9223372036854775807 1",
        "write 9223372036854775807 2",
        "alloc 9223372036854775807 9223372036854775807",
        "discard 9223372036854775807 2147483136",
        "write -z -n 0 8E",
        "read -P 0 -s 9223372036854775807 0 1",
        "read -P 0 -l 9223372036854775807 0 1",
        "truncate 9223372036854775807",
        "aio_write -z 9223372036854775807 9223372036854775807",
        "write -c 9223372036853727232 65536",
    ] {
        let out = ox(&["io", "-c", cmd, img]);
        assert!(out.code == 0 || out.code == 1, "{cmd}: exit {} ({})", out.code, out.stderr);
        assert!(!out.stderr.contains("panicked"), "{cmd}: {}", out.stderr);
    }
    assert_check_clean(&pair.ours, "after bad input");
}

// Guards against qemu-io's `discard=unmap` not reaching the engine: with
// it, `detect-zeroes=unmap` was refused as if discards were ignored, and
// zero buffers were written as data.
#[test]
fn detect_zeroes_with_image_opts() {
    for opts in ["discard=unmap,detect-zeroes=unmap", "detect-zeroes=on", "discard=ignore,detect-zeroes=unmap"] {
        let pair = Pair::new("qcow2", None, "4M");
        let spec = format!("driver=qcow2,file.filename=IMG,{opts}");
        io(&pair, &[], &["write -P 0xaa 0 256k"]);
        compare_io(&pair, &["--image-opts", "-c", "write -P 0 0 64k", "-c", "write -P 0 128k 4k", "-c", "map", &spec]);
        compare_images(&pair, opts);
    }
}
