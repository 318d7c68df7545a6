//! What is served: one image with its name, description and policies, and
//! the transmission flags and block sizes that describe it to clients.
//!
//! The export holds the one [`Image`] every connection shares, so a flush
//! on any connection covers the writes of all of them: that is what makes
//! advertising `NBD_FLAG_CAN_MULTI_CONN` honest.

use std::sync::Arc;

use oxqcow::{BlockDevice, Image};

use crate::proto::transmission_flags as tf;

/// The smallest request the server handles (any byte offset and length).
pub const MIN_BLOCK: u32 = 1;
/// The request size clients should prefer.
pub const PREFERRED_BLOCK: u32 = 4096;
/// The largest READ or WRITE payload the server accepts, as qemu-nbd
/// (`NBD_MAX_BUFFER_SIZE`): larger reads are refused with EINVAL, larger
/// write payloads are read and discarded before the refusal.
pub const MAX_BLOCK: u32 = 32 << 20;

/// What `--detect-zeroes` does with WRITE payloads that are all zeros.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DetectZeroes {
    /// Write them as data.
    #[default]
    Off,
    /// Turn them into zero writes that keep the allocation.
    On,
    /// Turn them into zero writes that may free the allocation (needs
    /// discard = unmap).
    Unmap,
}

/// How an export is configured.
#[derive(Clone, Debug, Default)]
pub struct ExportOptions {
    /// The export name clients ask for (qemu-nbd's `-x`, empty by default).
    pub name: String,
    /// A description shown by `nbdinfo` (`-D`).
    pub description: String,
    /// Refuse writes (`-r`); the image must be open read-only too.
    pub read_only: bool,
    /// Pass TRIM and hole-punching zero writes to the image
    /// (`--discard=unmap`); otherwise TRIM succeeds without effect.
    pub discard: bool,
    /// `--detect-zeroes`.
    pub detect_zeroes: DetectZeroes,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN` (true when several clients may
    /// connect: one image behind all of them makes flushes global).
    pub multi_conn: bool,
    /// Every write request must be durable before its reply (cache modes
    /// writethrough and directsync); the engine does this for its own
    /// calls, the export for the zeroing it does on the host file.
    pub writethrough: bool,
    /// A persistent bitmap offered as `qemu:dirty-bitmap:NAME` (`-B`).
    pub bitmap: Option<String>,
    /// Offer `qemu:allocation-depth` (`-A`); qemu-nbd offers it only then.
    pub allocation_depth: bool,
}

/// One served image.
pub struct Export {
    pub(crate) image: Arc<Image>,
    pub(crate) opts: ExportOptions,
    pub(crate) size: u64,
}

impl Export {
    /// Serves `image` as `opts` say. A read-only export needs no read-only
    /// image, but a writable export of a read-only image is refused.
    pub fn new(image: Arc<Image>, opts: ExportOptions) -> Result<Export, String> {
        if !opts.read_only && image.is_read_only() {
            return Err("the image is open read-only: export it read-only".into());
        }
        if opts.name.len() > crate::proto::MAX_STRING || opts.description.len() > crate::proto::MAX_STRING {
            return Err(format!("export names and descriptions are limited to {} bytes", crate::proto::MAX_STRING));
        }
        if opts.detect_zeroes == DetectZeroes::Unmap && !opts.discard {
            return Err(
                "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap".into()
            );
        }
        if let Some(name) = &opts.bitmap {
            // qemu-nbd's checks: the bitmap exists and is usable.
            match image.as_qcow2() {
                None => return Err(format!("Bitmap '{name}' is not found")),
                Some(q) => {
                    if !q.bitmaps().iter().any(|b| &b.name == name) {
                        return Err(format!("Bitmap '{name}' is not found"));
                    }
                    // qemu-nbd reports the error without QEMU's hint line.
                    q.bitmap_extents(name, 0, 0)
                        .map_err(|e| e.to_string().lines().next().unwrap_or_default().to_string())?;
                }
            }
        }
        let size = image.len();
        Ok(Export { image, opts, size })
    }

    /// The export name.
    pub fn name(&self) -> &str {
        &self.opts.name
    }

    /// The description.
    pub fn description(&self) -> &str {
        &self.opts.description
    }

    /// The disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The image behind the export.
    pub fn image(&self) -> &Arc<Image> {
        &self.image
    }

    /// The exported bitmap's name.
    pub fn bitmap(&self) -> Option<&str> {
        self.opts.bitmap.as_deref()
    }

    /// Whether `qemu:allocation-depth` is offered.
    pub fn allocation_depth(&self) -> bool {
        self.opts.allocation_depth
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.opts.read_only
    }

    /// The transmission flags, as qemu-nbd sets them: DF only with
    /// structured replies, BLOCK_STAT_PAYLOAD only with extended headers,
    /// the write commands only when writable.
    pub fn transmission_flags(&self, structured: bool, extended: bool) -> u16 {
        let mut f = tf::HAS_FLAGS | tf::SEND_FLUSH | tf::SEND_FUA | tf::SEND_CACHE;
        if structured {
            f |= tf::SEND_DF;
        }
        if extended {
            f |= tf::BLOCK_STAT_PAYLOAD;
        }
        if self.opts.read_only {
            f |= tf::READ_ONLY;
        } else {
            f |= tf::SEND_TRIM | tf::SEND_WRITE_ZEROES | tf::SEND_FAST_ZERO;
        }
        if self.opts.multi_conn {
            f |= tf::CAN_MULTI_CONN;
        }
        f
    }
}
