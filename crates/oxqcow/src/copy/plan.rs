//! Cutting the concatenated sources into chunks, front to back, by their
//! block status.

use super::status::StatusCursor;
use super::{CopyError, CopyStep, Source, IO_BUF_SIZE, MAX_ZERO_CHUNK};

/// What one chunk of the copy is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// Read from the source, then written (less its zero runs).
    Data,
    /// Reads as zeros in the source.
    Zero,
    /// Reads as zeros in the source but must be written as data (`-S 0`).
    ZeroAsData,
}

/// A chunk of the copy, numbered in order. Offsets are in the target (the
/// sources concatenated).
#[derive(Clone, Copy, Debug)]
pub(super) struct Chunk {
    pub index: u64,
    pub offset: u64,
    pub len: u64,
    pub kind: Kind,
}

/// Hands out chunks front to back.
pub(super) struct Planner<'a> {
    pub cursors: Vec<StatusCursor<'a>>,
    pub sources: &'a [Source<'a>],
    pub pos: u64,
    pub source: usize,
    pub next_index: u64,
    /// Chunks start and end on multiples of this (the cluster size when
    /// compressing: compressed writes cover whole clusters), except at the
    /// end of the whole; 0 when chunks follow the sources' status exactly.
    pub align: u64,
}

impl Planner<'_> {
    /// The next chunk; `None` once the sources are all handed out.
    pub fn next(&mut self, total: u64, min_sparse: u64) -> Result<Option<Chunk>, CopyError> {
        while self.source < self.sources.len() {
            let s = &self.sources[self.source];
            if self.pos < s.start + s.len {
                break;
            }
            self.source += 1;
        }
        if self.pos >= total || self.source >= self.sources.len() {
            return Ok(None);
        }
        let s = &self.sources[self.source];
        let src_offset = self.pos - s.start;
        let e = self.cursors[self.source]
            .at(src_offset)
            .map_err(|e| CopyError::new(CopyStep::BlockStatus, src_offset, e))?;
        // End of the run in target offsets (a run never crosses a source).
        let run_end = self.pos + e.length.min(s.len - src_offset);
        let (kind, end) = if self.align == 0 {
            let (kind, cap) = match (e.zero, min_sparse) {
                (false, _) => (Kind::Data, IO_BUF_SIZE),
                (true, 0) => (Kind::ZeroAsData, IO_BUF_SIZE),
                (true, _) => (Kind::Zero, MAX_ZERO_CHUNK),
            };
            (kind, run_end.min(self.pos + cap))
        } else {
            let align = self.align;
            let zero_end = if run_end == total { total } else { run_end / align * align };
            if e.zero && min_sparse != 0 && zero_end > self.pos {
                (Kind::Zero, zero_end.min(self.pos + MAX_ZERO_CHUNK))
            } else {
                // Data, or zeros too short to fill a cluster: whole clusters
                // of data, read across runs (and sources) as needed.
                (Kind::Data, run_end.div_ceil(align).saturating_mul(align).min(self.pos + IO_BUF_SIZE).min(total))
            }
        };
        let chunk = Chunk { index: self.next_index, offset: self.pos, len: end - self.pos, kind };
        self.next_index += 1;
        self.pos = end;
        Ok(Some(chunk))
    }
}
