//! The transmission phase of one client connection, pipelined: many
//! threads each send a request and wait for its reply, with any number of
//! requests in flight on the one socket.
//!
//! Sending: a request (header and payload together) is written whole under
//! the writing lock, with the next cookie, after its caller is entered in
//! the table of requests waiting for replies.
//!
//! Receiving has no thread of its own: one waiting caller at a time holds
//! the reading turn and reads reply headers (simple replies, structured
//! chunks, or extended chunks when extended headers were negotiated). A
//! header for its own request it handles itself, reading the payload
//! straight into its own buffer; a header for another request it hands,
//! with the turn, to that request's caller, which reads the payload into
//! its buffer and goes on reading. So a read's data is never copied
//! between threads. When a caller's reply is complete it gives the turn
//! up for any other waiting caller to take. Only callers whose requests
//! were sent whole wait for replies, so while replies are due someone is
//! there to read them.
//!
//! An errno in a reply fails that request only. Anything that leaves the
//! stream out of step (a failed read or write, a reply that breaks the
//! protocol, the server gone) breaks the connection: the socket is shut,
//! every waiting request and every later one fails with EIO, as QEMU's
//! client fails them ("Input/output error").

use std::collections::HashMap;
use std::io::{self, BufReader, IoSlice, Read, Write};
use std::net::Shutdown;
use std::sync::{Condvar, Mutex, MutexGuard};

use super::{protocol_error, Socket, MAX_REPLY_DATA};
use crate::conn::Stream;
use crate::proto::{reply, RequestHeader, EXTENDED_REPLY_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC};

/// The reading buffer: reply headers and small chunks come through it,
/// a read's data mostly straight into the caller's buffer (`BufReader`
/// hands large reads to the socket once it is drained).
const READ_BUFFER: usize = 64 << 10;
/// The largest block status chunk taken: qemu-nbd sends up to 131072
/// extents in one (1 MiB of compact ones and their header, 2 MiB of
/// extended ones), which the large requests of `NbdClient::allocation`
/// can ask for; other servers may send more, within reason.
const MAX_STATUS_CHUNK: u64 = 8 << 20;

/// One request's header fields (the cookie is the connection's to give).
#[derive(Clone, Copy)]
pub(super) struct Request {
    pub kind: u16,
    pub flags: u16,
    pub offset: u64,
    pub length: u64,
}

/// Where a reply's payload goes.
pub(super) enum ReplyInto<'a> {
    /// Nowhere: the reply carries none.
    Nothing,
    /// A read's bytes.
    Read(&'a mut [u8]),
    /// Block status extents (length, flags) of the status context.
    Extents(&'a mut Vec<(u64, u64)>),
}

/// One reply header: a simple reply or a chunk of a structured one.
#[derive(Clone, Copy, Debug)]
struct Chunk {
    cookie: u64,
    /// `None` for a simple reply, with its `error` in `length`'s place.
    kind: Option<u16>,
    flags: u16,
    /// The chunk's payload length, or a simple reply's error.
    length: u64,
}

/// What the callers share about the replies.
struct State {
    /// A caller holds the reading turn (or it was handed to one).
    reading: bool,
    /// Requests sent and not answered whole, by cookie: the header read
    /// for one when the reading turn was handed to its caller.
    waiting: HashMap<u64, Option<Chunk>>,
    /// The connection broke.
    broken: bool,
}

/// What the sender holds.
struct Tx {
    socket: Socket,
    next_cookie: u64,
}

/// A connection in its transmission phase.
pub(super) struct Wire {
    tx: Mutex<Tx>,
    rx: Mutex<BufReader<Stream>>,
    /// Another handle to the socket, to shut it when the connection breaks
    /// (which ends a read blocked in another thread).
    control: Stream,
    state: Mutex<State>,
    turn: Condvar,
    extended: bool,
    structured: bool,
    /// The id of the status context, whose extents block status keeps.
    status_context: Option<u32>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The error of every request on a broken connection.
fn broken() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[..8]);
    u64::from_be_bytes(w)
}

/// Writes all of `parts`, in as few system calls as the socket allows.
fn write_all_parts(w: &mut impl Write, parts: &mut [&[u8]]) -> io::Result<()> {
    let mut first = 0;
    while first < parts.len() {
        let slices: Vec<IoSlice<'_>> = parts[first..].iter().map(|p| IoSlice::new(p)).collect();
        let mut n = match w.write_vectored(&slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        while first < parts.len() && n >= parts[first].len() {
            n -= parts[first].len();
            first += 1;
        }
        if n > 0 {
            parts[first] = &parts[first][n..];
        }
    }
    Ok(())
}

impl Wire {
    /// The transmission phase on `socket`, as negotiated.
    pub(super) fn new(
        socket: Socket,
        extended: bool,
        structured: bool,
        status_context: Option<u32>,
    ) -> io::Result<Wire> {
        let reading = socket.stream().try_clone()?;
        let control = socket.stream().try_clone()?;
        Ok(Wire {
            tx: Mutex::new(Tx { socket, next_cookie: 1 }),
            rx: Mutex::new(BufReader::with_capacity(READ_BUFFER, reading)),
            control,
            state: Mutex::new(State { reading: false, waiting: HashMap::new(), broken: false }),
            turn: Condvar::new(),
            extended,
            structured,
            status_context,
        })
    }

    /// Breaks the connection: every waiting request fails.
    fn fail(&self) {
        let mut st = lock(&self.state);
        if !st.broken {
            st.broken = true;
            let _ = self.control.shutdown(Shutdown::Both);
        }
        drop(st);
        self.turn.notify_all();
    }

    /// Sends `req` (with `payload` for writes) and waits for its reply,
    /// whose payload goes `into` the caller's buffer.
    pub(super) fn request(&self, req: Request, payload: &[u8], mut into: ReplyInto<'_>) -> io::Result<()> {
        let cookie = self.send(req, payload)?;
        self.await_reply(cookie, req, &mut into)
    }

    fn send(&self, req: Request, payload: &[u8]) -> io::Result<u64> {
        let mut tx = lock(&self.tx);
        let cookie = tx.next_cookie;
        {
            let mut st = lock(&self.state);
            if st.broken {
                return Err(broken());
            }
            st.waiting.insert(cookie, None);
        }
        tx.next_cookie += 1;
        let Request { kind, flags, offset, length } = req;
        let header = RequestHeader { flags, kind, cookie, offset, length }.encode(self.extended);
        if write_all_parts(&mut tx.socket, &mut [&header, payload]).is_err() {
            drop(tx);
            self.fail();
            lock(&self.state).waiting.remove(&cookie);
            return Err(broken());
        }
        Ok(cookie)
    }

    /// Waits for the reply to `cookie`, reading replies when it holds the
    /// reading turn.
    fn await_reply(&self, cookie: u64, req: Request, into: &mut ReplyInto<'_>) -> io::Result<()> {
        // An error chunk's errno, reported once the reply is complete.
        let mut failure: Option<io::Error> = None;
        loop {
            let handed = {
                let mut st = lock(&self.state);
                loop {
                    if st.broken {
                        st.waiting.remove(&cookie);
                        return Err(broken());
                    }
                    if let Some(chunk) = st.waiting.get_mut(&cookie).and_then(Option::take) {
                        break Some(chunk);
                    }
                    if !st.reading {
                        st.reading = true;
                        break None;
                    }
                    st = self.turn.wait(st).unwrap_or_else(|p| p.into_inner());
                }
            };
            // This caller holds the reading turn now.
            let mut rx = lock(&self.rx);
            let mut next = handed;
            loop {
                let chunk = match next.take() {
                    Some(c) => c,
                    None => match self.read_header(&mut *rx) {
                        Ok(c) => c,
                        Err(_) => {
                            drop(rx);
                            self.fail();
                            lock(&self.state).waiting.remove(&cookie);
                            return Err(broken());
                        }
                    },
                };
                if chunk.cookie != cookie {
                    let mut st = lock(&self.state);
                    if let Some(slot) = st.waiting.get_mut(&chunk.cookie) {
                        *slot = Some(chunk);
                        drop(st);
                        drop(rx);
                        self.turn.notify_all();
                        break;
                    }
                    // A reply to nothing asked: the stream is out of step.
                    drop(st);
                    drop(rx);
                    self.fail();
                    lock(&self.state).waiting.remove(&cookie);
                    return Err(broken());
                }
                match self.read_body(&mut *rx, &chunk, req, into) {
                    Ok(None) => {}
                    Ok(Some(errno)) => {
                        failure.get_or_insert(errno);
                    }
                    Err(_) => {
                        drop(rx);
                        self.fail();
                        lock(&self.state).waiting.remove(&cookie);
                        return Err(broken());
                    }
                }
                let done = chunk.kind.is_none() || chunk.flags & reply::FLAG_DONE != 0;
                if done {
                    drop(rx);
                    let mut st = lock(&self.state);
                    st.reading = false;
                    st.waiting.remove(&cookie);
                    drop(st);
                    self.turn.notify_all();
                    return failure.map_or(Ok(()), Err);
                }
            }
        }
    }

    /// The next reply header.
    fn read_header(&self, r: &mut impl Read) -> io::Result<Chunk> {
        let mut magic = [0u8; 4];
        r.read_exact(&mut magic)?;
        match be32(&magic) {
            SIMPLE_REPLY_MAGIC if !self.extended => {
                let mut b = [0u8; 12];
                r.read_exact(&mut b)?;
                Ok(Chunk { cookie: be64(&b[4..]), kind: None, flags: 0, length: u64::from(be32(&b)) })
            }
            STRUCTURED_REPLY_MAGIC if self.structured && !self.extended => {
                let mut b = [0u8; 16];
                r.read_exact(&mut b)?;
                let (flags, kind, cookie) = (be16(&b), be16(&b[2..]), be64(&b[4..]));
                Ok(Chunk { cookie, kind: Some(kind), flags, length: u64::from(be32(&b[12..])) })
            }
            EXTENDED_REPLY_MAGIC if self.extended => {
                let mut b = [0u8; 28];
                r.read_exact(&mut b)?;
                let (flags, kind, cookie) = (be16(&b), be16(&b[2..]), be64(&b[4..]));
                Ok(Chunk { cookie, kind: Some(kind), flags, length: be64(&b[20..]) })
            }
            m => Err(protocol_error(format!("bad reply magic {m:#x}"))),
        }
    }

    /// Reads the payload of `chunk`, a header of the reply to `req`, into
    /// the caller's buffer: `Some(errno)` for an error reply or chunk;
    /// `Err` when the stream cannot be trusted any more.
    fn read_body(
        &self,
        r: &mut impl Read,
        chunk: &Chunk,
        req: Request,
        into: &mut ReplyInto<'_>,
    ) -> io::Result<Option<io::Error>> {
        let Some(kind) = chunk.kind else {
            let error = chunk.length as u32;
            if error != 0 {
                return Ok(Some(super::server_errno(error)));
            }
            if let ReplyInto::Read(buf) = into {
                r.read_exact(buf)?;
            }
            return Ok(None);
        };
        let len = chunk.length;
        // Where a chunk's bytes [at, at + n) fall in the read's buffer.
        let inside = |at: u64, n: u64| -> io::Result<std::ops::Range<usize>> {
            let start = at.checked_sub(req.offset).filter(|s| s.checked_add(n).is_some_and(|e| e <= req.length));
            let start = start.ok_or_else(|| protocol_error("reply chunk outside the request"))?;
            Ok(start as usize..(start + n) as usize)
        };
        match kind {
            reply::TYPE_OFFSET_DATA => {
                let ReplyInto::Read(buf) = into else { return Err(protocol_error("data for a non-read")) };
                let n = len.checked_sub(8).ok_or_else(|| protocol_error("short data chunk"))?;
                let mut at = [0u8; 8];
                r.read_exact(&mut at)?;
                let range = inside(be64(&at), n)?;
                r.read_exact(&mut buf[range])?;
            }
            reply::TYPE_OFFSET_HOLE => {
                let ReplyInto::Read(buf) = into else { return Err(protocol_error("hole for a non-read")) };
                if len != 12 {
                    return Err(protocol_error("bad hole chunk"));
                }
                let mut b = [0u8; 12];
                r.read_exact(&mut b)?;
                let range = inside(be64(&b), u64::from(be32(&b[8..])))?;
                buf[range].fill(0);
            }
            reply::TYPE_BLOCK_STATUS | reply::TYPE_BLOCK_STATUS_EXT => {
                let ext = kind == reply::TYPE_BLOCK_STATUS_EXT;
                if ext != self.extended {
                    return Err(protocol_error("block status chunk of the wrong kind"));
                }
                let (head, entry) = if ext { (8, 16) } else { (4, 8) };
                if !(head..=MAX_STATUS_CHUNK).contains(&len) || (len - head) % entry != 0 {
                    return Err(protocol_error("bad block status chunk"));
                }
                let mut data = vec![0u8; len as usize];
                r.read_exact(&mut data)?;
                let context = be32(&data);
                if let (true, ReplyInto::Extents(list)) = (Some(context) == self.status_context, &mut *into) {
                    for e in data[head as usize..].chunks_exact(entry as usize) {
                        list.push(if ext {
                            (be64(e), be64(&e[8..]))
                        } else {
                            (u64::from(be32(e)), u64::from(be32(&e[4..])))
                        });
                    }
                }
            }
            reply::TYPE_NONE => {
                if len != 0 {
                    return Err(protocol_error("bad none chunk"));
                }
            }
            k if k & (1 << 15) != 0 => {
                if !(6..=u64::from(MAX_REPLY_DATA)).contains(&len) {
                    return Err(protocol_error("bad error chunk"));
                }
                let mut rest = vec![0u8; len as usize];
                r.read_exact(&mut rest)?;
                return Ok(Some(super::server_errno(be32(&rest).max(1))));
            }
            _ => {
                // An unknown informational chunk: skip it.
                if len > u64::from(MAX_REPLY_DATA) {
                    return Err(protocol_error("oversized reply chunk"));
                }
                io::copy(&mut r.take(len), &mut io::sink())?;
            }
        }
        Ok(None)
    }

    /// Ends the session (NBD_CMD_DISC) unless the connection broke.
    pub(super) fn disconnect(&mut self) {
        let broken = self.state.get_mut().unwrap_or_else(|p| p.into_inner()).broken;
        if !broken {
            let header = RequestHeader { flags: 0, kind: crate::proto::cmd::DISC, cookie: 0, offset: 0, length: 0 };
            let tx = self.tx.get_mut().unwrap_or_else(|p| p.into_inner());
            let _ = tx.socket.write_all(&header.encode(self.extended));
        }
    }
}
