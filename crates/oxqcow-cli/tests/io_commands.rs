//! qemu-io's commands that change how the image is open or act on the
//! process (`reopen`, `open -o node-name`, `sleep`, `sigraise`, `abort`,
//! the blkdebug breakpoint commands), compared with qemu-io: the same
//! command sequences on copies of the same image must print the same
//! lines, exit the same way and leave the same image.

mod qemu_oracle;

use qemu_oracle::{assert_check_clean, assert_same_content, compare_io, normalize, run, with_image, Output, Pair};

/// `-c CMD` for each command, then the image.
fn io(pair: &Pair, cmds: &[&str]) -> Output {
    let mut args: Vec<&str> = cmds.iter().flat_map(|c| ["-c", *c]).collect();
    args.push("IMG");
    compare_io(pair, &args)
}

// Guards against `reopen` missing from qemu-io's commands ("command
// "reopen" not found"): options, flags, and their errors.
#[test]
fn reopen_changes_options_and_keeps_the_old_ones_when_refused() {
    let pair = Pair::new("qcow2", None, "64M");
    io(
        &pair,
        &[
            "reopen -o lazy-refcounts=on,pass-discard-request=on",
            "reopen -o overlap-check=constant",
            // The old overlap mode gives way to the new template.
            "reopen -o overlap-check.template=all",
            "reopen -o cache-size=1M",
            "reopen -o l2-cache-size=512k",
            "reopen -o l2-cache-entry-size=4k",
            "reopen -o cache-clean-interval=5",
            "write -P 0x55 0 1M",
            "reopen -r",
            "write 0 512",
            "read -P 0x55 0 1M",
            "reopen -w",
            "write -P 0x66 0 512",
            "reopen -c none",
            "reopen -c bogus",
            // Flags replace what earlier options said.
            "reopen -r -o cache.direct=on",
            "write 0 512",
            "reopen -w -c writeback",
            "write -P 0x77 4k 512",
            "read -P 0x77 4k 512",
            "reopen -r -w",
            "reopen extra",
            "reopen -x",
            "info",
        ],
    );
    assert_same_content(&pair.qemu, &pair.ours, "reopen");
    assert_check_clean(&pair.ours, "reopen");
}

// Guards against reopen errors QEMU reports: options that cannot change,
// conflicting flags and options, and invalid values; each leaves the image
// as it was.
#[test]
fn reopen_refuses_what_qemu_refuses() {
    let pair = Pair::new("qcow2", None, "64M");
    for cmd in [
        "reopen -o node-name=foo",
        "reopen -o file.node-name=foo",
        "reopen -o driver=raw",
        "reopen -o file.driver=qcow2",
        "reopen -o driver=qcow2",
        "reopen -o file.driver=file",
        "reopen -o foo=bar",
        "reopen -r -o read-only=on",
        "reopen -w -o read-only=on",
        "reopen -c none -o cache.direct=on",
        "reopen -c directsync -o cache.no-flush=on",
        "reopen -o read-only=foo",
        "reopen -o cache.no-flush=bar",
        "reopen -o cache.direct=baz",
        "reopen -o auto-read-only=qux",
        "reopen -o lazy-refcounts=42",
        "reopen -o cache-size=1M,l2-cache-size=64k,refcount-cache-size=64k",
        "reopen -o cache-size=1M,l2-cache-size=2M",
        "reopen -o l2-cache-entry-size=33k",
        "reopen -o l2-cache-entry-size=128k",
        "reopen -o refcount-cache-size=256T",
        "reopen -o overlap-check=constant,overlap-check.template=all",
        "reopen -o overlap-check.template=blubb",
        "reopen -o cache-clean-interval=-1",
        "reopen -o cache-clean-interval=abc",
    ] {
        io(&pair, &[cmd, "write -P 0x11 0 4k"]);
    }
    assert_same_content(&pair.qemu, &pair.ours, "refused reopens");
}

// Guards against node-name options being refused at open ("does not
// support the option 'node-name'"); reopen keeps an unchanged one.
#[test]
fn node_names_are_accepted_and_cannot_change() {
    let pair = Pair::new("qcow2", None, "1M");
    let base = pair.path("base.qcow2");
    qemu_oracle::create(&["-f", "qcow2", base.to_str().expect("utf-8"), "1M"]);
    for image in [&pair.qemu, &pair.ours] {
        qemu_oracle::create(&[
            "-f",
            "qcow2",
            "-b",
            base.to_str().expect("utf-8"),
            "-F",
            "qcow2",
            image.to_str().expect("utf-8"),
        ]);
    }
    for key in ["node-name", "file.node-name", "backing.node-name"] {
        let open = format!("open -o {key}=foo IMG");
        for reopen in [format!("reopen -o {key}=foo"), "reopen".to_string(), format!("reopen -o {key}=bar")] {
            compare_io(&pair, &["-c", &open, "-c", &reopen, "-c", "write 0 512"]);
        }
    }
    compare_io(&pair, &["-c", "open -o node-name=1x IMG"]);
    compare_io(&pair, &["-c", "reopen -o backing.driver=qcow2", "-c", "reopen -o backing.driver=file", "IMG"]);
}

// Guards against `sleep`, `sigraise`, `abort` and the breakpoint commands
// missing ("command ... not found"): their errors, and a signal that ends
// qemu-io after what it printed so far was flushed.
#[test]
fn process_commands_act_as_qemu_io_does() {
    let pair = Pair::new("qcow2", None, "1M");
    io(
        &pair,
        &[
            "sleep 1",
            "sleep abc",
            "sleep -5",
            "sleep 1x",
            "sigraise 0",
            "sigraise abc",
            "sigraise -1",
            "sigraise 66",
            "break write_aio A",
            "resume A",
            "remove_break A",
            "help sigraise",
            "help break",
        ],
    );
    let killed = io(&pair, &["write -P 0x5a 0 512", "sigraise 9", "write -P 0x11 0 512"]);
    assert_eq!(killed.code, -1, "sigraise 9 must kill: {killed:?}");
    // What abort(3) leaves of stdout depends on its buffering, so only the
    // way the process ends is compared.
    for (tool, image) in [("qemu-io", &pair.qemu), (qemu_oracle::oxqcow(), &pair.ours)] {
        let mut args: Vec<String> = if tool == "qemu-io" { vec![] } else { vec!["io".into()] };
        args.extend(qemu_oracle::strings(&["-c", "write -P 0x33 0 512", "-c", "abort", "-c", "write -P 0x11 0 512"]));
        args.push(image.to_str().expect("utf-8").into());
        let aborted = run(tool, &args, None);
        assert_eq!(aborted.code, -1, "abort must kill {tool}: {aborted:?}");
    }
    assert_same_content(&pair.qemu, &pair.ours, "process commands");
}

// Guards against `wait_break` hanging: without blkdebug no request can
// stop, so QEMU waits forever; oxqcow fails at once, saying why.
#[test]
fn wait_break_without_blkdebug_fails_instead_of_hanging() {
    let pair = Pair::new("qcow2", None, "1M");
    let img = pair.ours.to_str().expect("utf-8");
    let out = qemu_oracle::ox(&["io", "-c", "wait_break A", "-c", "read 0 512", img]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stdout.starts_with(
            "Request tagged as A can never be suspended without blkdebug: Operation not supported\nread 512/512 bytes"
        ),
        "{out:?}"
    );
}

// Guards against a corruption found while writing being reported only at
// close ("an earlier metadata update failed ..."): QEMU prints "qcow2:
// Marking image as corrupt: ...; further corruption events will be
// suppressed" when it happens, fails the request with EIO, later ones
// (reads too) with ENOMEDIUM, and closes quietly.
#[test]
fn corruption_found_while_writing_is_signalled_as_qemu_signals_it() {
    let pair = Pair::new("qcow2", None, "64M");
    for image in [&pair.qemu, &pair.ours] {
        // The header cluster's refcount (first entry of the refcount block
        // at 0x20000) set to 0: the allocator would place the L2 table there.
        let mut bytes = std::fs::read(image).expect("read image");
        bytes[0x20000..0x20002].fill(0);
        std::fs::write(image, bytes).expect("write image");
    }
    io(&pair, &["write 64k 64k", "write 0 512", "read 0 512"]);
    assert_same_content(&pair.qemu, &pair.ours, "corrupt image");
    let info = qemu_oracle::qemu("qemu-img", &["info", pair.ours.to_str().expect("utf-8")]);
    assert!(info.stdout.contains("corrupt: true"), "{}", info.stdout);
}

// Guards against `read -b`/`write -b` being refused ("the VM state area is
// not supported"): the VM state lives after the disk in the image's
// address space, where QEMU finds what oxqcow wrote, and the other way
// round.
#[test]
fn vm_state_reads_and_writes_where_qemu_puts_them() {
    let pair = Pair::new("qcow2", None, "64M");
    let cmds = [
        "write -b -P 0x11 0 4k",
        "read -b -P 0x11 0 4k",
        "read -b -P 0 64k 4k",
        "write -b -P 0x22 1T 4k",
        "read -b -P 0x22 1T 4k",
        "read -b -P 0 2T 512",
        "write -b 1 512",
        "read -b 0 100",
        "read -P 0 0 64k",
        "map",
    ];
    io(&pair, &cmds);
    assert_check_clean(&pair.ours, "vm state");
    // Each tool reads what the other wrote.
    let swapped = Pair { dir: tempfile::tempdir().expect("tempdir"), qemu: pair.ours.clone(), ours: pair.qemu.clone() };
    io(&swapped, &["read -b -P 0x11 0 4k", "read -b -P 0x22 1T 4k"]);

    let raw = Pair::new("raw", None, "1M");
    compare_io(&raw, &["-f", "raw", "-c", "read -b 0 512", "-c", "write -b 0 512", "IMG"]);
}

// Guards against `-C` being refused ("copy-on-read (-C) is not supported"):
// reads copy what the overlay does not allocate, over whole clusters, zeros
// as zero clusters, from the command line and from `open -C`.
#[test]
fn copy_on_read_copies_what_the_overlay_lacks() {
    let pair = Pair::new("qcow2", None, "1M");
    let base = pair.path("base.qcow2");
    let b = base.to_str().expect("utf-8");
    qemu_oracle::create(&["-f", "qcow2", b, "1M"]);
    let w = qemu_oracle::qemu("qemu-io", &["-c", "write -P 1 0 100k", "-c", "write -z 200k 64k", b]);
    assert_eq!(w.code, 0, "{w:?}");
    for image in [&pair.qemu, &pair.ours] {
        qemu_oracle::create(&["-f", "qcow2", "-b", b, "-F", "qcow2", image.to_str().expect("utf-8")]);
    }
    compare_io(
        &pair,
        &["-C", "-c", "read -P 1 1000 10", "-c", "read 150k 150k", "-c", "readv 600k 512 512", "-c", "map", "IMG"],
    );
    compare_io(&pair, &["-c", "open -C IMG", "-c", "read 900k 512", "-c", "map"]);
    compare_io(&pair, &["-C", "-r", "-c", "read 0 512", "IMG"]);
    assert_same_content(&pair.qemu, &pair.ours, "copy on read");
    assert_eq!(qemu_oracle::guest_map(&pair.ours), qemu_oracle::guest_map(&pair.qemu), "allocation after copy on read");
    assert_check_clean(&pair.ours, "copy on read");
}

// Guards against `reopen -o read-only=on` (without -r) making the image
// read-only: qemu-io keeps its write permission, so QEMU refuses the
// reopen and writes go on (the node's generated name differs, so the
// message is compared with the name masked).
#[test]
fn read_only_by_option_alone_is_refused() {
    let pair = Pair::new("qcow2", None, "1M");
    let theirs = run(
        "qemu-io",
        &with_image(&["-c", "reopen -o read-only=on", "-c", "write -P 7 0 512", "IMG"], &pair.qemu),
        None,
    );
    let ours = qemu_oracle::ox(&[
        "io",
        "-c",
        "reopen -o read-only=on",
        "-c",
        "write -P 7 0 512",
        pair.ours.to_str().expect("utf-8"),
    ]);
    let mask =
        |e: &str| e.split('\'').enumerate().map(|(i, p)| if i == 1 { "NODE" } else { p }).collect::<Vec<_>>().join("'");
    assert_eq!(mask(&normalize(&ours, None, "qemu-io").stderr), mask(&normalize(&theirs, None, "qemu-io").stderr));
    assert_eq!(normalize(&ours, None, "qemu-io").stdout, normalize(&theirs, None, "qemu-io").stdout);
    assert_eq!(ours.code, theirs.code);
    assert_same_content(&pair.qemu, &pair.ours, "read-only by option");
}

// Guards against `info` describing a null device as a raw image with a
// cluster size and succeeding: QEMU names the null node (twice) or the raw
// format above it, and the command fails, for qemu-io's exit code 1.
#[test]
fn info_on_null_devices_fails_as_qemus() {
    let pair = Pair::new("qcow2", None, "1M");
    for args in [
        &["-f", "null-co", "-c", "reopen", "-c", "info", "json:{'driver': 'null-co', 'size': 65536}"][..],
        &["-c", "info", "json:{'driver': 'null-aio', 'size': 65536}"],
        &["-r", "-c", "info", "null-co://"],
        &["-f", "raw", "-c", "info", "null-co://"],
    ] {
        compare_io(&pair, args);
    }
}
