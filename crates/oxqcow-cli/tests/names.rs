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
