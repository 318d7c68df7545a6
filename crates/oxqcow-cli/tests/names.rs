//! Image names and options as QEMU reads them, against qemu-img and
//! qemu-io: QEMU's `file-posix` drivers named as backing formats, the
//! `file:` prefix and names containing ':', `json:{...}` pseudo-filenames,
//! and the generic open options of qemu-io's `--image-opts`.

mod common;

use common::Pair;

// Guards against `-F host_device` being refused ("Invalid format name"):
// QEMU takes any driver's name as the backing format, records it, and
// checks the file against the driver only when it opens it.
#[test]
fn host_drivers_as_backing_formats() {
    let setup = tempfile::tempdir().unwrap();
    common::must(setup.path(), common::qemu_img(), &["create", "-q", "-f", "qcow2", "img.qcow2", "1M"]);
    common::must(setup.path(), common::qemu_img(), &["create", "-q", "-f", "raw", "plain.raw", "1M"]);
    let pair = Pair::from(setup.path());
    for args in [
        &["rebase", "-u", "-b", "/some/backing/file", "-F", "host_device", "img.qcow2"][..],
        // Opening the chain now fails on the missing file, not on the driver.
        &["rebase", "-b", "plain.raw", "-F", "raw", "img.qcow2"],
        &["rebase", "-u", "-b", "/dev/null", "-F", "host_cdrom", "img.qcow2"],
        // A regular file is no device.
        &["rebase", "-b", "plain.raw", "-F", "host_device", "img.qcow2"],
        &["rebase", "-u", "-b", "x", "-F", "no_such_driver", "img.qcow2"],
    ] {
        pair.same_output(args);
        pair.same_files(args);
    }
}

// Guards against `file:` being taken as part of the file name (creating
// nothing, or a file named `file:...`) and against a colon after a slash
// being read as a protocol: QEMU strips the prefix, puts `./` before a
// rest that would look like a protocol, and names the image that way.
#[test]
fn the_file_prefix_and_names_with_colons() {
    let pair = Pair::new();
    for args in [
        &["create", "-f", "qcow2", "./a:b.qcow2", "1M"][..],
        &["create", "-f", "qcow2", "file:c:d.qcow2", "1M"],
        &["create", "-f", "qcow2", "base.qcow2", "1M"],
        &["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "file:image:top.qcow2", "1M"],
        &["info", "file:image:top.qcow2"],
        &["info", "./a:b.qcow2"],
        &["info", "a:b.qcow2"],
        &["check", "file:c:d.qcow2"],
    ] {
        pair.same_output(args);
        pair.same_file_names(args);
    }
}

// Guards against `json:{...}` names being taken as file names ("No such
// file or directory"): QEMU parses them (its JSON dialect, single quotes
// included), opens null-co devices from them, and refuses bad ones with
// its parser's and its drivers' messages.
#[test]
fn json_names_in_qemu_img() {
    let setup = tempfile::tempdir().unwrap();
    common::must(setup.path(), common::qemu_img(), &["create", "-q", "-f", "qcow2", "img.qcow2", "1M"]);
    let pair = Pair::from(setup.path());
    let null = "json:{ 'driver': 'null-co', 'size': 1048576, 'read-zeroes': true }";
    for args in [
        &["map", "--output=json", null][..],
        &["map", "--output=json", "json:{\"driver\": \"null-aio\", \"size\": \"64k\"}"],
        &["map", "--output=json", "json:{'driver':'null-co','size':'1M','x':1}"],
        &["map", "json:{'driver':'qcow2','file':{'driver':'file','filename':'img.qcow2'},'l2-cache-size':'1M'}"],
        // Named by its file, as QEMU names a node that says no more.
        &["info", "json:{'driver':'qcow2','file':{'filename':'img.qcow2'}}"],
        &["info", "--output=json", "json:{'file':{'driver':'file','filename':'img.qcow2'}}"],
        &["map", "json:{'driver':'qcow2','file':{'filename':'img.qcow2'},'l2-cache-entry-size':'1000'}"],
        &["map", "json:{"],
        &["map", "json:[1]"],
        &["convert", "-O", "qcow2", "-S", "512", null, "sparse.qcow2"],
        &["map", "--output=json", "sparse.qcow2"],
        &["convert", "-O", "qcow2", "-S", "0", null, "full.qcow2"],
        &["map", "--output=json", "full.qcow2"],
    ] {
        pair.same_output(args);
        pair.same_file_names(args);
    }
}

/// qemu-io's output without its timing lines.
fn untimed(o: common::Outcome) -> (i32, String, String) {
    let keep = |s: &str| s.lines().filter(|l| !l.contains(" ops; ")).collect::<Vec<_>>().join("\n");
    (o.code, keep(&o.stdout), keep(&o.stderr).replace("oxqcow: ", "qemu-io: "))
}

/// Runs qemu-io (in `pair.qemu`) or `oxqcow io` (in `pair.ox`) with `args`
/// in `dir`, as [`untimed`] shows the result.
fn io(pair: &Pair, dir: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let ours = dir == pair.ox;
    let tool = if ours { std::path::Path::new(env!("CARGO_BIN_EXE_oxqcow")) } else { common::qemu_io() };
    let args: Vec<&str> =
        if ours { std::iter::once("io").chain(args.iter().copied()).collect() } else { args.to_vec() };
    untimed(common::run_in(dir, tool, &args))
}

// Guards against qemu-io refusing `json:` names and null-co data files: an
// image whose data file is a null device takes writes (its metadata is
// written, its data dropped) as QEMU's does.
#[test]
fn json_names_in_qemu_io() {
    let pair = Pair::new();
    for dir in [&pair.qemu, &pair.ox] {
        common::must(
            dir,
            common::qemu_img(),
            &["create", "-q", "-f", "qcow2", "-o", "data_file=d.raw", "i.qcow2", "4M"],
        );
    }
    for args in [
        &[
            "-c",
            "write -P 1 0 64k",
            "-c",
            "read -P 0 0 64k",
            "json:{'driver':'qcow2','file':{'filename':'i.qcow2'},'data-file':{'driver':'null-co','size':'4M','read-zeroes':true}}",
        ][..],
        &["-c", "read -P 0 0 4k", "-c", "map", "json:{'driver':'null-co','size':'1M','read-zeroes':true}"],
        &["-c", "read 0 4k", "json:{'driver':'null-co','size':'1M','y':1}"],
        &["-c", "read 0 4k", "json:{'driver':"],
    ] {
        assert_eq!(io(&pair, &pair.ox, args), io(&pair, &pair.qemu, args), "{args:?}");
    }
    common::must(&pair.ox, common::qemu_img(), &["check", "i.qcow2"]);
    let maps: Vec<_> = [&pair.qemu, &pair.ox]
        .map(|d| common::must(d, common::qemu_img(), &["map", "--output=json", "i.qcow2"]).stdout)
        .into();
    assert_eq!(maps[0], maps[1]);
}

// Guards against `file.driver=qcow2` being refused ("protocol driver 'qcow2'
// is not supported"): QEMU opens a format as another format's file, and
// the outer image reads the inner one's guest data.
#[test]
fn nested_formats_in_qemu_io() {
    let setup = tempfile::tempdir().unwrap();
    let img = |args: &[&str]| common::must(setup.path(), common::qemu_img(), args);
    img(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    let w = common::run_in(
        setup.path(),
        common::qemu_io(),
        &["-c", "write -P 42 0 512", "-c", "write -P 23 512 512", "base.qcow2"],
    );
    assert_eq!(w.code, 0, "{}", w.stderr);
    img(&["convert", "-f", "raw", "-O", "qcow2", "base.qcow2", "t.qcow2"]);
    let pair = Pair::from(setup.path());
    for args in [
        &[
            "-c",
            "open -o driver=qcow2,file.driver=qcow2,file.file.filename=t.qcow2",
            "-c",
            "read -P 42 0 512",
            "-c",
            "read -P 23 512 512",
            "-c",
            "map",
        ][..],
        &[
            "-c",
            "open -o driver=raw,file.driver=qcow2,file.file.filename=t.qcow2",
            "-c",
            "read -P 0x51 0 1",
            "-c",
            "map",
        ],
        &["-c", "read -P 42 0 512", "t.qcow2"],
    ] {
        assert_eq!(io(&pair, &pair.ox, args), io(&pair, &pair.qemu, args), "{args:?}");
    }
}

// Guards against options no driver takes being refused as "Invalid
// parameter": QEMU names the format (given or probed) or the protocol
// that does not support them, and refuses qcow2's options on raw images.
#[test]
fn options_a_driver_does_not_take() {
    let setup = tempfile::tempdir().unwrap();
    common::must(setup.path(), common::qemu_img(), &["create", "-q", "-f", "qcow2", "q.qcow2", "1M"]);
    common::must(setup.path(), common::qemu_img(), &["create", "-q", "-f", "raw", "r.raw", "1M"]);
    let pair = Pair::from(setup.path());
    for spec in [
        "driver=qcow2,file.filename=q.qcow2,bogus=1",
        "file.filename=q.qcow2,bogus=1",
        "driver=raw,file.filename=q.qcow2,l2-cache-size=1M",
        "file.filename=r.raw,cache-clean-interval=1",
        "file.filename=q.qcow2,file.bogus=1",
        "file.filename=q.qcow2,l2-cache-size=1M,discard-no-unref=on",
    ] {
        pair.same_output(&["map", "--image-opts", spec]);
    }
    pair.same_output(&["map", "json:{'driver':'qcow2','file':{'filename':'q.qcow2'},'bogus':1}"]);
}

// Guards against `null-co://` being refused as an unsupported protocol:
// it is QEMU's 1 GiB null device (probed raw), its only name; the node
// below reports the null driver, without a host file's facts.
#[test]
fn null_device_names() {
    let pair = Pair::new();
    for args in [
        &["info", "null-co://"][..],
        &["info", "--output=json", "null-aio://"],
        &["map", "--output=json", "null-co://"],
        &["info", "null-co://x"],
        &["map", "null-aio:foo"],
        &["map", "-f", "raw", "--output=json", "null-co://"],
    ] {
        pair.same_output(args);
    }
    for args in [&["-c", "write 0 4k", "-c", "length", "null-co://"][..], &["-r", "-c", "read 0 4k", "null-aio://"]] {
        assert_eq!(io(&pair, &pair.ox, args), io(&pair, &pair.qemu, args), "{args:?}");
    }
}
