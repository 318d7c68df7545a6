//! Walking an image's block status front to back, one run at a time, the
//! way qemu-img's loops call `bdrv_block_status`: each query answers with
//! the longest run of equal status starting at the asked offset.
//!
//! The engine is asked in bounded windows (so a huge fragmented image never
//! has its whole extent list in memory) and runs that continue past a
//! window are joined again. For qcow2, runs end at L2 table boundaries, as
//! QEMU's answers do (one lookup never crosses an L2 table).

use std::collections::VecDeque;

use crate::extent::Extent;
use crate::image::{BlockDevice, Image};

/// How many bytes of block status one engine query covers.
const WINDOW: u64 = 1 << 30;

/// QEMU's block layer never answers for more than this in one call
/// (the driver interface counts in `int`).
const MAX_STATUS_BYTES: u64 = i32::MAX as u64;

/// The status flags qemu-img's strict compare looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flags {
    /// BDRV_BLOCK_DATA.
    pub data: bool,
    /// BDRV_BLOCK_ZERO.
    pub zero: bool,
    /// BDRV_BLOCK_OFFSET_VALID.
    pub offset_valid: bool,
    /// BDRV_BLOCK_ALLOCATED.
    pub allocated: bool,
    /// BDRV_BLOCK_COMPRESSED.
    pub compressed: bool,
    /// BDRV_BLOCK_EOF: the run reaches the end of the image.
    pub eof: bool,
}

/// A cursor over the block status of one image.
pub struct StatusCursor<'a> {
    image: &'a Image,
    size: u64,
    /// Bytes mapped by one L2 table (qcow2 only).
    l2_span: Option<u64>,
    runs: VecDeque<Extent>,
    fetched_to: u64,
}

impl<'a> StatusCursor<'a> {
    /// A cursor over `image`.
    pub fn new(image: &'a Image) -> StatusCursor<'a> {
        let l2_span = image.as_qcow2().map(|q| {
            let cs = q.geometry().cluster_size();
            (cs / 8) * cs
        });
        StatusCursor { image, size: image.len(), l2_span, runs: VecDeque::new(), fetched_to: 0 }
    }

    /// The image size.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn fetch(&mut self) -> crate::Result<()> {
        let len = (self.size - self.fetched_to).min(WINDOW);
        for e in self.image.block_status(self.fetched_to, len)? {
            if e.length == 0 {
                continue;
            }
            match self.runs.back_mut() {
                Some(last) if continues(last, &e) => last.length += e.length,
                _ => self.runs.push_back(e),
            }
        }
        self.fetched_to += len;
        Ok(())
    }

    /// The run of equal status starting at `offset` (which must be below
    /// the image size), as one QEMU block status query reports it.
    pub fn at(&mut self, offset: u64) -> crate::Result<Extent> {
        debug_assert!(offset < self.size);
        while self.runs.front().is_some_and(|e| e.offset + e.length <= offset) {
            self.runs.pop_front();
        }
        if self.runs.is_empty() {
            self.fetched_to = offset;
            self.fetch()?;
        }
        while self.runs.front().is_some_and(|e| e.offset + e.length == self.fetched_to) && self.fetched_to < self.size {
            self.fetch()?;
        }
        let Some(front) = self.runs.front() else {
            return Err(crate::Error::Corrupt(format!("no block status returned for offset {offset}")));
        };
        let mut e = front.clone();
        if e.offset < offset {
            let cut = offset - e.offset;
            e.offset = offset;
            e.length -= cut;
            e.host_offset = e.host_offset.map(|h| h + cut);
        }
        let mut limit = MAX_STATUS_BYTES;
        if let Some(span) = self.l2_span {
            limit = limit.min(span - offset % span);
        }
        e.length = e.length.min(limit);
        Ok(e)
    }

    /// The flags QEMU would return for a run.
    pub fn flags(&self, e: &Extent) -> Flags {
        Flags {
            data: e.data,
            zero: e.zero,
            offset_valid: e.host_offset.is_some(),
            allocated: e.present,
            compressed: e.compressed,
            eof: e.offset + e.length == self.size,
        }
    }
}

/// Whether `next` continues `last` with the same status.
fn continues(last: &Extent, next: &Extent) -> bool {
    last.offset + last.length == next.offset
        && last.present == next.present
        && last.zero == next.zero
        && last.data == next.data
        && last.compressed == next.compressed
        && last.depth == next.depth
        && match (last.host_offset, next.host_offset) {
            (None, None) => true,
            (Some(a), Some(b)) => a + last.length == b,
            _ => false,
        }
}
