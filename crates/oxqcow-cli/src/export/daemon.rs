//! Serving daemons (`serve`, `mount`): opening the exported image and
//! forking into the background.

use oxqcow::{Image, ImageFormat, OpenOptions};

use crate::app::ctx::Ctx;
use crate::app::image::{open_image_as, parse_image_opts};
use crate::app::messages::warn_probed_raw;

/// An image a long-running export serves (`serve`, `mount`), opened.
pub struct ExportImage {
    /// The image.
    pub image: Image,
    /// The host file it was opened from (`file.filename` with `--image-opts`).
    pub path: String,
}

/// Opens the image an export serves: FILE in the format `-f` names (probed
/// otherwise), or with `--image-opts` the image the option string describes.
/// The command line's open options go on top of the option string's: either
/// may ask for read-only, discard passthrough or force-share; the cache mode
/// and the snapshot come from the command line. Warns as QEMU does when a
/// probed raw image is opened for writing. The error is the bare message;
/// each command prefixes it its own way.
pub fn open_export_image(
    file: &str,
    image_opts: bool,
    format: Option<&str>,
    cli: &OpenOptions,
) -> Result<ExportImage, String> {
    let (path, format, mut open) = if image_opts {
        parse_image_opts(file)?
    } else {
        (file.to_string(), format.map(str::to_string), OpenOptions::new())
    };
    open.read_only = open.read_only || cli.read_only;
    open.cache = cli.cache;
    open.discard_passthrough = open.discard_passthrough || cli.discard_passthrough;
    open.force_share = open.force_share || cli.force_share;
    open.snapshot = cli.snapshot.clone();
    // Open errors name the option string with --image-opts, as QEMU's do.
    let image = open_image_as(&path, file, format.as_deref(), open.clone())?;
    if format.is_none() && image.format() == ImageFormat::Raw && !open.read_only {
        warn_probed_raw(&crate::app::rbd::rbd_node_json(&path).map_or_else(|| path.clone(), |n| format!("json:{n}")));
    }
    Ok(ExportImage { image, path })
}

/// Forks a server into the background (`serve --fork`, `mount
/// --daemonize`), before any thread exists so that the child inherits no
/// lock held by a thread it does not have. In the child: a new session,
/// and `Ok` with the socket on which to tell the parent that it serves. In
/// the parent, and on failure (reported as `FAILURE: reason`): `Err` with
/// the exit code this process ends with.
pub fn fork_daemon(ctx: &Ctx, failure: &str) -> Result<std::os::unix::net::UnixStream, i32> {
    use oxqcow_nbd::sys::{self, Forked};
    let (parent_end, child_end) =
        std::os::unix::net::UnixStream::pair().map_err(|e| ctx.fail(&format!("{failure}: {e}")))?;
    // What is buffered would otherwise be written by both processes.
    crate::app::stdout::flush();
    match sys::fork() {
        Err(e) => Err(ctx.fail(&format!("{failure}: {e}"))),
        Ok(Forked::Parent(child)) => {
            drop(child_end);
            Err(wait_for_daemon(parent_end, child))
        }
        Ok(Forked::Child) => {
            drop(parent_end);
            sys::setsid();
            Ok(child_end)
        }
    }
}

/// The parent of a forked server (`serve --fork`, `mount --daemonize`):
/// exits 0 once the child says it serves (one byte on `from_child`), else
/// with the child's exit status (the child printed its error on the
/// shared stderr).
fn wait_for_daemon(mut from_child: std::os::unix::net::UnixStream, child: oxqcow_nbd::sys::ChildProcess) -> i32 {
    let mut byte = [0u8; 1];
    if matches!(std::io::Read::read(&mut from_child, &mut byte), Ok(1)) {
        return 0;
    }
    match child.wait() {
        Ok(0) | Err(_) => 1,
        Ok(code) => code,
    }
}
