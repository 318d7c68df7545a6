//! The transmission phase of one connection, without the sockets: request
//! validation, execution against the image, and reply encoding.
//!
//! [`Session::check`] turns a framed header into an [`Op`] or a refusal,
//! the way qemu-nbd judges requests (unknown commands and flags, lengths
//! past the block size limit, ranges past the end, writes to a read-only
//! export); [`Session::execute`] runs an op and returns the whole encoded
//! reply, so a reply always goes out in one piece. Both are synchronous
//! and touch no socket: the connection code runs them on worker threads,
//! the fuzzer and the tests call them directly.

use std::sync::Arc;

use oxqcow::{BlockDevice, Error as EngineError, ErrorKind};

use crate::export::{DetectZeroes, Export, MAX_BLOCK};
use crate::handshake::{Negotiated, CONTEXT_ALLOCATION_DEPTH, CONTEXT_BASE_ALLOCATION, CONTEXT_DIRTY_BITMAP};
use crate::proto::{self, cmd, cmd_flags, reply, Errno, FramingError, ReplyTo, RequestHeader};

/// Block status is computed for at most this many bytes per request; the
/// reply then covers less than asked, which the protocol allows, and the
/// client asks again from where it ends. Bounds the work and the extent
/// list one request can cause, whatever its length.
pub const STATUS_WINDOW: u64 = 256 << 20;
/// With `NBD_CMD_FLAG_REQ_ONE` only the first extent is sent: a smaller
/// window is enough.
pub const STATUS_WINDOW_ONE: u64 = 64 << 20;
/// At most this many extents per context in one reply (qemu sends at most
/// 2^17; a fragmented window of small clusters could otherwise make the
/// reply megabytes long).
pub const MAX_EXTENTS: usize = 1 << 16;
/// CACHE reads at most this much of its range (it is advice; the rest is
/// left to later reads), in pieces of [`CACHE_CHUNK`].
pub const CACHE_LIMIT: u64 = MAX_BLOCK as u64;
const CACHE_CHUNK: usize = 1 << 20;

/// `base:allocation` flags.
const STATE_HOLE: u32 = 1;
const STATE_ZERO: u32 = 2;

/// A request that passed validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read `length` bytes.
    Read {
        /// Offset.
        offset: u64,
        /// Length.
        length: u32,
        /// Answer in one chunk (`NBD_CMD_FLAG_DF`).
        df: bool,
    },
    /// Write the payload.
    Write {
        /// Offset.
        offset: u64,
        /// Flush before replying.
        fua: bool,
    },
    /// Flush.
    Flush,
    /// Discard.
    Trim {
        /// Offset.
        offset: u64,
        /// Length.
        length: u64,
        /// Flush before replying.
        fua: bool,
    },
    /// Prefetch.
    Cache {
        /// Offset.
        offset: u64,
        /// Length.
        length: u64,
    },
    /// Write zeros.
    WriteZeroes {
        /// Offset.
        offset: u64,
        /// Length.
        length: u64,
        /// Keep the allocation (`NBD_CMD_FLAG_NO_HOLE`).
        no_hole: bool,
        /// Fail with ENOTSUP rather than write data (`NBD_CMD_FLAG_FAST_ZERO`).
        fast: bool,
        /// Flush before replying.
        fua: bool,
    },
    /// Report metadata.
    BlockStatus {
        /// Offset.
        offset: u64,
        /// Length (0 when the payload gives it).
        length: u64,
        /// One extent per context.
        one: bool,
        /// The payload (`NBD_CMD_FLAG_PAYLOAD_LEN`) gives the length and
        /// the contexts to report.
        payload: bool,
    },
    /// Disconnect.
    Disconnect,
}

/// A request refused before it ran: the error and a message for the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The error value.
    pub errno: Errno,
    /// Why, for people.
    pub message: String,
}

fn refuse(errno: Errno, message: impl Into<String>) -> Refusal {
    Refusal { errno, message: message.into() }
}

/// What the reader must do with the bytes after a request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payload {
    /// Nothing follows.
    None,
    /// Read this many bytes of write data.
    Read(u32),
    /// Read and throw away this many bytes (a write payload over the
    /// limit, a block status payload that names no valid contexts): the
    /// request is then refused, and the stream stays in step.
    Discard(u32),
    /// A payload too large to read or skip (an extended header's 64-bit
    /// length): the connection ends, as qemu-nbd ends it.
    Hangup,
}

/// One connection's transmission state.
pub struct Session {
    export: Arc<Export>,
    neg: Negotiated,
}

impl Session {
    /// A session on `export` with what the handshake negotiated.
    pub fn new(export: Arc<Export>, neg: Negotiated) -> Session {
        Session { export, neg }
    }

    /// The export.
    pub fn export(&self) -> &Arc<Export> {
        &self.export
    }

    /// The size of a request header in the negotiated framing.
    pub fn header_len(&self) -> usize {
        if self.neg.extended {
            proto::EXTENDED_REQUEST_HEADER_LEN
        } else {
            proto::REQUEST_HEADER_LEN
        }
    }

    /// Parses a request header of [`Session::header_len`] bytes.
    pub fn parse_header(&self, b: &[u8]) -> Result<RequestHeader, FramingError> {
        RequestHeader::parse(b, self.neg.extended)
    }

    /// How a reply to `h` is framed.
    pub fn reply_to(&self, h: &RequestHeader) -> ReplyTo {
        ReplyTo { cookie: h.cookie, offset: self.neg.extended.then_some(h.offset) }
    }

    /// Whether `h` is a block status request whose payload names its
    /// contexts (only with extended headers).
    fn status_payload(&self, h: &RequestHeader) -> bool {
        self.neg.extended && h.kind == cmd::BLOCK_STATUS && h.flags & cmd_flags::PAYLOAD_LEN != 0
    }

    /// Whether a block status payload of `n` bytes has a usable shape: the
    /// effect length, then at most one id per selected context.
    fn status_payload_fits(&self, n: u64) -> bool {
        let ids = self.neg.contexts.list(self.export.bitmap()).len() as u64;
        n % 4 == 0 && n >= 8 && n <= 8 + 4 * ids
    }

    /// The bytes that follow `h` on the wire.
    pub fn payload(&self, h: &RequestHeader) -> Payload {
        let carries = h.kind == cmd::WRITE || self.status_payload(h);
        if !carries {
            return Payload::None;
        }
        let Ok(n) = u32::try_from(h.length) else { return Payload::Hangup };
        match h.kind {
            cmd::WRITE if n > MAX_BLOCK => Payload::Discard(n),
            cmd::WRITE => Payload::Read(n),
            _ if n > MAX_BLOCK => Payload::Hangup,
            _ if self.status_payload_fits(h.length) => Payload::Read(n),
            _ => Payload::Discard(n),
        }
    }

    /// Validates a request header, as qemu-nbd does: flags the command does
    /// not take, lengths past the block size limit, ranges past the end of
    /// the export, writes to a read-only export and status queries without
    /// a selected context are refused.
    pub fn check(&self, h: &RequestHeader) -> Result<Op, Refusal> {
        let mut valid = cmd_flags::FUA;
        match h.kind {
            cmd::READ if self.neg.structured => valid |= cmd_flags::DF,
            cmd::WRITE if self.neg.extended => valid |= cmd_flags::PAYLOAD_LEN,
            cmd::WRITE_ZEROES => valid |= cmd_flags::NO_HOLE | cmd_flags::FAST_ZERO,
            cmd::BLOCK_STATUS if self.neg.extended && self.neg.contexts.any() => {
                valid |= cmd_flags::REQ_ONE | cmd_flags::PAYLOAD_LEN
            }
            cmd::BLOCK_STATUS => valid |= cmd_flags::REQ_ONE,
            _ => {}
        }
        let known = matches!(
            h.kind,
            cmd::READ
                | cmd::WRITE
                | cmd::DISC
                | cmd::FLUSH
                | cmd::TRIM
                | cmd::CACHE
                | cmd::WRITE_ZEROES
                | cmd::BLOCK_STATUS
        );
        if !known {
            return Err(refuse(Errno::Inval, format!("unsupported command {}", h.kind)));
        }
        if h.flags & !valid != 0 {
            return Err(refuse(Errno::Inval, format!("unsupported flags {:#x} for command {}", h.flags, h.kind)));
        }
        let fua = h.flags & cmd_flags::FUA != 0;
        if matches!(h.kind, cmd::READ | cmd::WRITE) && h.length > u64::from(MAX_BLOCK) {
            return Err(refuse(Errno::Inval, format!("length {} exceeds the maximum of {MAX_BLOCK}", h.length)));
        }
        let writes = matches!(h.kind, cmd::WRITE | cmd::WRITE_ZEROES | cmd::TRIM);
        // A block status payload's effect length is checked once it is read.
        let status_payload = self.status_payload(h);
        if !matches!(h.kind, cmd::DISC | cmd::FLUSH) && !status_payload {
            let in_range = h.offset.checked_add(h.length).is_some_and(|end| end <= self.export.size());
            if !in_range {
                let errno = if matches!(h.kind, cmd::WRITE | cmd::WRITE_ZEROES) { Errno::NoSpc } else { Errno::Inval };
                return Err(refuse(
                    errno,
                    format!(
                        "request at offset {} with length {} is past the end of the export ({} bytes)",
                        h.offset,
                        h.length,
                        self.export.size()
                    ),
                ));
            }
        }
        if writes && self.export.read_only() {
            return Err(refuse(Errno::Perm, "the export is read-only"));
        }
        let (offset, length) = (h.offset, h.length);
        Ok(match h.kind {
            // Lengths past the block size were refused above.
            cmd::READ => Op::Read { offset, length: length as u32, df: h.flags & cmd_flags::DF != 0 },
            cmd::WRITE => Op::Write { offset, fua },
            cmd::DISC => Op::Disconnect,
            cmd::FLUSH => Op::Flush,
            cmd::TRIM => Op::Trim { offset, length, fua },
            cmd::CACHE => Op::Cache { offset, length },
            cmd::WRITE_ZEROES => Op::WriteZeroes {
                offset,
                length,
                no_hole: h.flags & cmd_flags::NO_HOLE != 0,
                fast: h.flags & cmd_flags::FAST_ZERO != 0,
                fua,
            },
            _ => {
                if !self.neg.contexts.any() {
                    return Err(refuse(Errno::Inval, "no metadata context was negotiated"));
                }
                let one = h.flags & cmd_flags::REQ_ONE != 0;
                if status_payload {
                    if !self.status_payload_fits(h.length) {
                        return Err(refuse(Errno::Inval, "CMD_BLOCK_STATUS payload not valid"));
                    }
                    return Ok(Op::BlockStatus { offset, length: 0, one, payload: true });
                }
                if length == 0 {
                    return Err(refuse(Errno::Inval, "block status of zero bytes"));
                }
                Op::BlockStatus { offset, length, one, payload: false }
            }
        })
    }

    /// The encoded reply refusing a request.
    pub fn refusal_reply(&self, h: &RequestHeader, r: &Refusal) -> Vec<u8> {
        self.error_reply(self.reply_to(h), r.errno, &r.message)
    }

    fn error_reply(&self, to: ReplyTo, errno: Errno, message: &str) -> Vec<u8> {
        if self.neg.structured {
            let mut out = Vec::with_capacity(to.header_len() + 6 + message.len().min(proto::MAX_STRING));
            proto::error_chunk(&mut out, to, errno, message);
            out
        } else {
            proto::simple_reply(to.cookie, errno as u32).to_vec()
        }
    }

    /// Success without data: a simple reply, or with extended headers
    /// (which have no simple replies) an empty final chunk.
    fn ok_reply(&self, to: ReplyTo) -> Vec<u8> {
        if self.neg.extended {
            let mut out = Vec::with_capacity(to.header_len());
            proto::chunk_header(&mut out, reply::FLAG_DONE, reply::TYPE_NONE, to, 0);
            out
        } else {
            proto::simple_reply(to.cookie, 0).to_vec()
        }
    }

    fn chunk_header_len(&self) -> usize {
        if self.neg.extended {
            proto::EXTENDED_CHUNK_HEADER_LEN
        } else {
            proto::CHUNK_HEADER_LEN
        }
    }

    /// The most bytes [`Session::execute_into`] puts in its buffer for a
    /// reply with data (reads, block status), so that a buffer of this
    /// capacity is never reallocated; 0 for the other requests, whose
    /// replies are small (at most an error message) and replace the buffer.
    pub fn reply_bound(&self, op: Op) -> usize {
        match op {
            Op::Read { length, .. } if self.neg.structured => structured_read_bound(self.chunk_header_len(), length),
            Op::Read { length, .. } => proto::SIMPLE_REPLY_LEN + length as usize,
            Op::BlockStatus { one, .. } => {
                let extents = if one { 1 } else { MAX_EXTENTS };
                let to = ReplyTo { cookie: 0, offset: self.neg.extended.then_some(0) };
                self.neg.contexts.list(self.export.bitmap()).len() * proto::block_status_chunk_len(to, extents)
            }
            _ => 0,
        }
    }

    /// [`Session::execute`] into `out`, reusing its allocation (and, for
    /// reads, its bytes: see `read_into`). With a capacity of at least
    /// [`Session::reply_bound`], a reply with data fits without
    /// reallocating.
    pub fn execute_into(&self, out: &mut Vec<u8>, h: &RequestHeader, op: Op, payload: &[u8]) {
        let to = self.reply_to(h);
        match op {
            Op::Read { offset, length, df } => self.read_into(out, to, offset, length, df),
            Op::BlockStatus { offset, length, one, payload: false } => {
                self.block_status(out, to, offset, length, one, None)
            }
            Op::BlockStatus { offset, one, payload: true, .. } => match self.status_request(offset, payload) {
                Ok((length, ids)) => self.block_status(out, to, offset, length, one, Some(&ids)),
                Err(r) => *out = self.error_reply(to, r.errno, &r.message),
            },
            other => *out = self.execute(h, other, payload),
        }
    }

    /// The effect length and context ids of a block status payload, checked
    /// as qemu-nbd checks them: each id one the client selected, none
    /// twice, a length that is not zero and stays inside the export.
    fn status_request(&self, offset: u64, payload: &[u8]) -> Result<(u64, Vec<u32>), Refusal> {
        let invalid = || refuse(Errno::Inval, "CMD_BLOCK_STATUS payload not valid");
        if !self.status_payload_fits(payload.len() as u64) {
            return Err(invalid());
        }
        let (len, rest) = payload.split_at(8);
        let length = u64::from_be_bytes(len.try_into().map_err(|_| invalid())?);
        let selected: Vec<u32> = self.neg.contexts.list(self.export.bitmap()).iter().map(|c| c.0).collect();
        let mut ids = Vec::new();
        for id in rest.chunks_exact(4) {
            let id = u32::from_be_bytes([id[0], id[1], id[2], id[3]]);
            if !selected.contains(&id) || ids.contains(&id) {
                return Err(invalid());
            }
            ids.push(id);
        }
        if ids.is_empty() {
            return Err(invalid());
        }
        if length == 0 {
            return Err(refuse(Errno::Inval, "block status of zero bytes"));
        }
        if offset.checked_add(length).is_none_or(|end| end > self.export.size()) {
            return Err(refuse(
                Errno::Inval,
                format!(
                    "request at offset {offset} with length {length} is past the end of the export ({} bytes)",
                    self.export.size()
                ),
            ));
        }
        Ok((length, ids))
    }

    /// Runs `op` and returns its encoded reply. `payload` is the write data
    /// (empty for other commands).
    pub fn execute(&self, h: &RequestHeader, op: Op, payload: &[u8]) -> Vec<u8> {
        let to = self.reply_to(h);
        let done = |r: Result<(), EngineError>| match r {
            Ok(()) => self.ok_reply(to),
            Err(e) => self.error_reply(to, errno_of(&e), &e.to_string()),
        };
        let img = &*self.export.image;
        match op {
            Op::Read { offset, length, df } => {
                let mut out = Vec::new();
                self.read_into(&mut out, to, offset, length, df);
                out
            }
            Op::Write { offset, fua } => done(self.write(offset, payload).and_then(|()| flush_if(img, fua))),
            Op::Flush => done(img.flush()),
            Op::Trim { offset, length, fua } => {
                let r = if self.export.opts.discard { img.discard(offset, length) } else { Ok(()) };
                done(r.and_then(|()| flush_if(img, fua)))
            }
            Op::Cache { offset, length } => done(self.cache(offset, length)),
            Op::WriteZeroes { offset, length, no_hole, fast, fua } => {
                let len = length;
                let may_unmap = !no_hole && self.export.opts.discard;
                if !fast {
                    return done(img.write_zeroes_at(offset, len, may_unmap).and_then(|()| flush_if(img, fua)));
                }
                match img.write_zeroes_no_fallback(offset, len, may_unmap) {
                    Ok(true) => done(flush_if(img, fua)),
                    Ok(false) => self.error_reply(to, Errno::NotSup, "zeroing this range would write data"),
                    Err(e) => done(Err(e)),
                }
            }
            op @ Op::BlockStatus { .. } => {
                let mut out = Vec::new();
                self.execute_into(&mut out, h, op, payload);
                out
            }
            Op::Disconnect => Vec::new(),
        }
    }
}

impl Session {
    /// Builds a READ reply in `out`. The bytes `out` holds may be left
    /// from an earlier reply: only what grows past its length is cleared,
    /// so a recycled buffer costs neither fresh pages nor zeroing.
    fn read_into(&self, out: &mut Vec<u8>, to: ReplyTo, offset: u64, length: u32, df: bool) {
        let cookie = to.cookie;
        let img = &*self.export.image;
        let len = length as usize;
        if !self.neg.structured {
            let total = proto::SIMPLE_REPLY_LEN + len;
            fit(out, total);
            match img.read_at(&mut out[proto::SIMPLE_REPLY_LEN..total], offset) {
                Ok(()) => out[..proto::SIMPLE_REPLY_LEN].copy_from_slice(&proto::simple_reply(cookie, 0)),
                Err(e) => {
                    out.clear();
                    out.extend_from_slice(&proto::simple_reply(cookie, errno_of(&e) as u32));
                }
            }
            return;
        }
        if length == 0 {
            out.clear();
            proto::chunk_header(out, reply::FLAG_DONE, reply::TYPE_NONE, to, 0);
            return;
        }
        let head = to.header_len();
        // Runs of (offset, length, reads as zeros), holes only when the
        // client lets the reply be fragmented.
        let mut runs = if df { Vec::new() } else { self.read_runs(offset, u64::from(length)) };
        let mut size = 0usize;
        for &(_, l, hole) in &runs {
            size += head + if hole { 12 } else { 8 + l as usize };
        }
        // Holes so short that their chunks outweigh their bytes are sent as
        // data: one chunk is smaller, and within `reply_bound`.
        if df || size > structured_read_bound(head, length) {
            (runs, size) = (vec![(offset, u64::from(length), false)], head + 8 + len);
        }
        fit(out, size);
        let mut header = Vec::with_capacity(head + 12);
        let mut pos = 0;
        for (i, &(o, l, hole)) in runs.iter().enumerate() {
            let flags = if i + 1 == runs.len() { reply::FLAG_DONE } else { 0 };
            header.clear();
            if hole {
                proto::hole_chunk(&mut header, flags, to, o, l as u32);
            } else {
                proto::data_chunk_header(&mut header, flags, to, o, l as u32);
            }
            out[pos..pos + header.len()].copy_from_slice(&header);
            pos += header.len();
            if !hole {
                if let Err(e) = img.read_at(&mut out[pos..pos + l as usize], o) {
                    *out = self.error_reply(to, errno_of(&e), &e.to_string());
                    return;
                }
                pos += l as usize;
            }
        }
        debug_assert_eq!(pos, size);
    }

    /// The read range as runs of data and holes, adjacent runs of the same
    /// kind merged. When block status fails, the whole range is data (the
    /// read itself reports the error).
    fn read_runs(&self, offset: u64, length: u64) -> Vec<(u64, u64, bool)> {
        let Ok(extents) = self.export.image.block_status(offset, length) else {
            return vec![(offset, length, false)];
        };
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        let mut pos = offset;
        for e in extents {
            // Extents cover the range in order; anything else is treated as data.
            if e.offset != pos || e.length == 0 || e.offset + e.length > offset + length {
                return vec![(offset, length, false)];
            }
            match runs.last_mut() {
                Some(last) if last.2 == e.zero => last.1 += e.length,
                _ => runs.push((e.offset, e.length, e.zero)),
            }
            pos += e.length;
        }
        if pos != offset + length {
            return vec![(offset, length, false)];
        }
        runs
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), EngineError> {
        let img = &*self.export.image;
        let detect = self.export.opts.detect_zeroes;
        if detect != DetectZeroes::Off && !data.is_empty() && is_zero(data) {
            let may_unmap = detect == DetectZeroes::Unmap;
            return img.write_zeroes_at(offset, data.len() as u64, may_unmap);
        }
        img.write_at(data, offset)
    }

    fn cache(&self, offset: u64, length: u64) -> Result<(), EngineError> {
        let len = length.min(CACHE_LIMIT);
        let mut buf = vec![0u8; (len as usize).min(CACHE_CHUNK)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            self.export.image.read_at(&mut buf[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// The exported bitmap over the window: `(length, 1 if dirty)`.
    fn dirty_extents(&self, window: u64, offset: u64, limit: usize) -> Result<Vec<(u64, u32)>, EngineError> {
        let (Some(name), Some(q)) = (self.export.bitmap(), self.export.image.as_qcow2()) else {
            return Ok(vec![(window, 0)]);
        };
        let mut descs = Vec::new();
        for (len, dirty) in q.bitmap_extents(name, offset, window)? {
            if descs.len() == limit {
                break;
            }
            descs.push((len, u32::from(dirty)));
        }
        Ok(descs)
    }

    /// The block status reply in `out` (emptied first), for the selected
    /// contexts or, from a payload, those of `only`.
    fn block_status(&self, out: &mut Vec<u8>, to: ReplyTo, offset: u64, length: u64, one: bool, only: Option<&[u32]>) {
        out.clear();
        // The window is below 4 GiB, so every extent fits a compact reply.
        let window = length.min(if one { STATUS_WINDOW_ONE } else { STATUS_WINDOW });
        let extents = match self.export.image.block_status(offset, window) {
            Ok(e) => e,
            Err(e) => {
                *out = self.error_reply(to, errno_of(&e), &e.to_string());
                return;
            }
        };
        let limit = if one { 1 } else { MAX_EXTENTS };
        let mut contexts = self.neg.contexts.list(self.export.bitmap());
        if let Some(ids) = only {
            contexts.retain(|c| ids.contains(&c.0));
        }
        for (i, &(id, _)) in contexts.iter().enumerate() {
            let mut descs: Vec<(u64, u32)> = Vec::new();
            if id == CONTEXT_DIRTY_BITMAP {
                match self.dirty_extents(window, offset, limit) {
                    Ok(d) => descs = d,
                    Err(e) => {
                        *out = self.error_reply(to, errno_of(&e), &e.to_string());
                        return;
                    }
                }
                let flags = if i + 1 == contexts.len() { reply::FLAG_DONE } else { 0 };
                proto::block_status_chunk(out, flags, to, id, &descs);
                continue;
            }
            let mut pos = offset;
            for e in &extents {
                if e.offset != pos || e.length == 0 {
                    break;
                }
                pos += e.length;
                let flags = if id == CONTEXT_BASE_ALLOCATION {
                    (if e.data { 0 } else { STATE_HOLE }) | if e.zero { STATE_ZERO } else { 0 }
                } else {
                    debug_assert_eq!(id, CONTEXT_ALLOCATION_DEPTH);
                    if e.present {
                        e.depth.saturating_add(1)
                    } else {
                        0
                    }
                };
                let len = e.length;
                if let Some(last) = descs.last_mut().filter(|l| l.1 == flags) {
                    last.0 += len;
                } else if descs.len() == limit {
                    break;
                } else {
                    descs.push((len, flags));
                }
            }
            if descs.is_empty() {
                *out = self.error_reply(to, Errno::Io, "block status described nothing");
                return;
            }
            let flags = if i + 1 == contexts.len() { reply::FLAG_DONE } else { 0 };
            proto::block_status_chunk(out, flags, to, id, &descs);
        }
    }
}

/// The most bytes of a structured READ reply: one data chunk, and room for
/// a short hole at either end of the range. Holes are whole sectors at
/// least, so those inside the range cost less as hole chunks than as data;
/// `read_into` sends a range that would need more as one data chunk.
/// `head`: the size of a chunk header in the negotiated framing.
fn structured_read_bound(head: usize, length: u32) -> usize {
    if length == 0 {
        return head;
    }
    let hole_and_split = 2 * head + 12 + 8;
    head + 8 + length as usize + 2 * hole_and_split
}

/// Makes `v` exactly `n` bytes long, clearing only bytes it did not hold.
pub fn fit(v: &mut Vec<u8>, n: usize) {
    if v.len() < n {
        v.resize(n, 0);
    } else {
        v.truncate(n);
    }
}

fn flush_if(img: &oxqcow::Image, yes: bool) -> Result<(), EngineError> {
    if yes {
        img.flush()
    } else {
        Ok(())
    }
}

fn is_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(16);
    words.by_ref().all(|w| u128::from_ne_bytes(w.try_into().unwrap_or([1; 16])) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

/// The NBD error for an engine error.
pub fn errno_of(e: &EngineError) -> Errno {
    match e.kind() {
        ErrorKind::ReadOnly => Errno::Perm,
        ErrorKind::OutOfBounds | ErrorKind::InvalidArgument => Errno::Inval,
        ErrorKind::NoSpace => Errno::NoSpc,
        ErrorKind::Io => match e {
            EngineError::Io { source, .. }
                if matches!(source.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) =>
            {
                Errno::NoSpc
            }
            _ => Errno::Io,
        },
        _ => Errno::Io,
    }
}
