//! An NBD client: an export of any NBD server (qemu-nbd, nbdkit,
//! `oxqcow serve`) as a [`Storage`], so that every image operation works on
//! it as on a file. QEMU's names for it (`nbd://`, `nbd+unix://`, `nbd:`)
//! are read by [`NbdAddress::parse`].
//!
//! One connection, one request at a time: the socket is held for a whole
//! request and its reply, so requests from many threads are serialised
//! rather than pipelined (simple and always correct; the server side is
//! where oxqcow's NBD speed lies). Structured replies are negotiated so
//! that block status (`base:allocation`, or the context the nbd driver's
//! `x-dirty-bitmap` names) tells holes from data; reads accept both reply
//! kinds.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::Duration;

use oxqcow::storage::Run;
use oxqcow::Storage;

pub use address::{NbdAddress, NbdServer, DEFAULT_PORT};
pub use list::{list_exports, ExportInfo};
pub use tls::TlsClient;

mod address;
mod list;
mod tls;

use crate::proto::{
    client_flags, cmd, cmd_flags, handshake_flags, info, opt, rep, reply, transmission_flags, RequestHeader, IHAVEOPT,
    NBDMAGIC, OPTION_REPLY_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};

/// The largest request sent: 32 MiB, the most servers accept (the
/// protocol's suggested maximum), unless the server says less.
const MAX_REQUEST: u64 = 32 << 20;
/// The most an option reply or a reply chunk other than data may carry:
/// anything larger is a broken or hostile server.
const MAX_REPLY_DATA: u32 = 1 << 20;
/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Either kind of socket, or one of them under TLS.
enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, Socket>>),
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.read(buf),
            Socket::Unix(s) => s.read(buf),
            Socket::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.write(buf),
            Socket::Unix(s) => s.write(buf),
            Socket::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Socket::Tls(s) => s.flush(),
            _ => Ok(()),
        }
    }
}

/// The connection, held for one request and its reply.
struct Conn {
    socket: Socket,
    next_cookie: u64,
    /// A failed request left the stream in an unknown state: every later
    /// request fails rather than read someone else's reply.
    broken: bool,
}

/// One request's header fields (the cookie is the connection's to give).
#[derive(Clone, Copy)]
struct Request {
    kind: u16,
    flags: u16,
    offset: u64,
    length: u32,
}

impl Request {
    /// `length` is at most a request's maximum, which fits 32 bits.
    fn new(kind: u16, flags: u16, offset: u64, length: u64) -> Request {
        Request { kind, flags, offset, length: length as u32 }
    }
}

/// Where a reply's payload goes.
enum ReplyInto<'a> {
    /// Nowhere: the reply carries none.
    Nothing,
    /// A read's bytes.
    Read(&'a mut [u8]),
    /// Block status extents (length, flags) of the status context.
    Extents(&'a mut Vec<(u32, u32)>),
}

/// A connected NBD export.
pub struct NbdClient {
    conn: Mutex<Conn>,
    size: u64,
    flags: u16,
    structured: bool,
    /// The id the server gave the status context (`base:allocation` or the
    /// `x-dirty-bitmap` one), when it agreed to it.
    allocation_context: Option<u32>,
    /// The status context is `qemu:allocation-depth` through
    /// `x-dirty-bitmap`: depths past 2 read as 2, as QEMU folds them, so
    /// that the two bits say "local" (1, a hole) or "backing" (2, zeros).
    fold_depth: bool,
    max_request: u64,
}

fn protocol_error(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn send_option(w: &mut impl Write, option: u32, data: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    w.write_all(&out)
}

/// One option reply: its type and data.
fn read_option_reply(r: &mut impl Read, option: u32) -> io::Result<(u32, Vec<u8>)> {
    if read_u64(r)? != OPTION_REPLY_MAGIC {
        return Err(protocol_error("bad option reply magic"));
    }
    let echoed = read_u32(r)?;
    if echoed != option {
        return Err(protocol_error(format!("reply to option {echoed} while waiting for option {option}")));
    }
    let kind = read_u32(r)?;
    let len = read_u32(r)?;
    if len > MAX_REPLY_DATA {
        return Err(protocol_error(format!("option reply of {len} bytes")));
    }
    let mut data = vec![0u8; len as usize];
    r.read_exact(&mut data)?;
    Ok((kind, data))
}

/// QEMU's name of an option, for messages.
fn option_name(option: u32) -> &'static str {
    match option {
        opt::EXPORT_NAME => "export name",
        opt::ABORT => "abort",
        opt::LIST => "list",
        opt::STARTTLS => "starttls",
        opt::INFO => "info",
        opt::GO => "go",
        opt::STRUCTURED_REPLY => "structured reply",
        opt::LIST_META_CONTEXT => "list meta context",
        opt::SET_META_CONTEXT => "set meta context",
        opt::EXTENDED_HEADERS => "extended headers",
        _ => "<unknown>",
    }
}

/// The text of an error reply to `option`, in QEMU's manner.
fn option_error(kind: u32, data: &[u8], option: u32, export: &str) -> io::Error {
    let detail = String::from_utf8_lossy(data).into_owned();
    let o = format!("option {option} ({})", option_name(option));
    let what = match kind {
        rep::ERR_UNKNOWN => format!("Requested export not available\nserver reported: {detail}"),
        rep::ERR_TLS_REQD => {
            format!("TLS negotiation required before {o}\nDid you forget a valid tls-creds?\nserver reported: {detail}")
        }
        rep::ERR_POLICY => format!("Denied by server for {o}\nserver reported: {detail}"),
        rep::ERR_SHUTDOWN => format!("Server shutting down before {o}"),
        _ => format!("Option {option} ({}) for export '{export}' failed: {detail}", option_name(option)),
    };
    io::Error::other(what)
}

impl NbdClient {
    /// Connects to `addr` and negotiates its export, over TLS with `tls`
    /// (the credentials `addr.tls_creds` names: the caller holds them).
    pub fn connect(addr: &NbdAddress, tls: Option<&TlsClient>) -> io::Result<NbdClient> {
        let mut socket = greeted(&addr.server, tls, addr.tls_hostname())?;
        let context = addr.x_dirty_bitmap.as_deref();
        let (size, flags, structured, allocation_context) = match negotiate(&mut socket, &addr.export, context) {
            Ok(n) => n,
            Err(e) => {
                // End the negotiation politely, as QEMU's client does, so
                // that the server does not log a broken handshake.
                let _ = send_option(&mut socket, opt::ABORT, &[]);
                return Err(e);
            }
        };
        if let Socket::Tcp(s) = &socket {
            let _ = s.set_nodelay(true);
        }
        Ok(NbdClient {
            conn: Mutex::new(Conn { socket, next_cookie: 1, broken: false }),
            size,
            flags,
            structured,
            allocation_context,
            fold_depth: context == Some(ALLOCATION_DEPTH),
            max_request: MAX_REQUEST,
        })
    }

    /// Whether the export refuses writes.
    pub fn is_read_only(&self) -> bool {
        self.flags & transmission_flags::READ_ONLY != 0
    }

    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// Sends one request (with `payload` for writes) and reads its reply
    /// into `read_into` (reads) or `extents` (block status).
    fn request(&self, req: Request, payload: &[u8], mut into: ReplyInto<'_>) -> io::Result<()> {
        let Request { kind, flags, offset, length } = req;
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if conn.broken {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the NBD connection failed earlier"));
        }
        let cookie = conn.next_cookie;
        conn.next_cookie += 1;
        let header = RequestHeader { flags, kind, cookie, offset, length: u64::from(length) }.encode(false);
        let result = (|| {
            let mut out = Vec::with_capacity(header.len() + payload.len());
            out.extend_from_slice(&header);
            out.extend_from_slice(payload);
            conn.socket.write_all(&out)?;
            self.read_reply(&mut conn.socket, cookie, offset, length, &mut into)
        })();
        if let Err(e) = &result {
            // An errno reply leaves the stream in step; anything else does not.
            if !is_server_errno(e) {
                conn.broken = true;
            }
        }
        result
    }

    fn read_reply(
        &self,
        s: &mut Socket,
        cookie: u64,
        offset: u64,
        length: u32,
        into: &mut ReplyInto<'_>,
    ) -> io::Result<()> {
        let mut failure: Option<io::Error> = None;
        loop {
            let magic = read_u32(s)?;
            if magic == SIMPLE_REPLY_MAGIC {
                let error = read_u32(s)?;
                if read_u64(s)? != cookie {
                    return Err(protocol_error("reply to another request"));
                }
                if error != 0 {
                    return Err(server_errno(error));
                }
                if let ReplyInto::Read(buf) = into {
                    s.read_exact(buf)?;
                }
                return Ok(());
            }
            if magic != STRUCTURED_REPLY_MAGIC || !self.structured {
                return Err(protocol_error(format!("bad reply magic {magic:#x}")));
            }
            let chunk_flags = read_u16(s)?;
            let kind = read_u16(s)?;
            if read_u64(s)? != cookie {
                return Err(protocol_error("reply to another request"));
            }
            let len = read_u32(s)?;
            match kind {
                reply::TYPE_OFFSET_DATA => {
                    let at = read_u64(s)?;
                    let n = u64::from(len.checked_sub(8).ok_or_else(|| protocol_error("short data chunk"))?);
                    let ReplyInto::Read(buf) = into else { return Err(protocol_error("data for a non-read")) };
                    let start = at.checked_sub(offset).filter(|st| st + n <= u64::from(length));
                    let start = start.ok_or_else(|| protocol_error("data chunk outside the request"))?;
                    s.read_exact(&mut buf[start as usize..(start + n) as usize])?;
                }
                reply::TYPE_OFFSET_HOLE => {
                    if len != 12 {
                        return Err(protocol_error("bad hole chunk"));
                    }
                    let at = read_u64(s)?;
                    let n = u64::from(read_u32(s)?);
                    let ReplyInto::Read(buf) = into else { return Err(protocol_error("hole for a non-read")) };
                    let start = at.checked_sub(offset).filter(|st| st + n <= u64::from(length));
                    let start = start.ok_or_else(|| protocol_error("hole chunk outside the request"))?;
                    buf[start as usize..(start + n) as usize].fill(0);
                }
                reply::TYPE_BLOCK_STATUS => {
                    if !(4..=MAX_REPLY_DATA).contains(&len) || (len - 4) % 8 != 0 {
                        return Err(protocol_error("bad block status chunk"));
                    }
                    let context = read_u32(s)?;
                    let mut data = vec![0u8; (len - 4) as usize];
                    s.read_exact(&mut data)?;
                    if let (true, ReplyInto::Extents(list)) = (Some(context) == self.allocation_context, &mut *into) {
                        {
                            for e in data.chunks_exact(8) {
                                let l = u32::from_be_bytes([e[0], e[1], e[2], e[3]]);
                                let f = u32::from_be_bytes([e[4], e[5], e[6], e[7]]);
                                list.push((l, f));
                            }
                        }
                    }
                }
                reply::TYPE_NONE => {
                    if len != 0 {
                        return Err(protocol_error("bad none chunk"));
                    }
                }
                k if k & (1 << 15) != 0 => {
                    if !(6..=MAX_REPLY_DATA).contains(&len) {
                        return Err(protocol_error("bad error chunk"));
                    }
                    let error = read_u32(s)?;
                    let mlen = read_u16(s)?;
                    let mut rest = vec![0u8; (len - 6) as usize];
                    s.read_exact(&mut rest)?;
                    let _ = mlen;
                    failure.get_or_insert_with(|| server_errno(error.max(1)));
                }
                _ => {
                    // An unknown informational chunk: skip it.
                    if len > MAX_REPLY_DATA {
                        return Err(protocol_error("oversized reply chunk"));
                    }
                    let mut skip = vec![0u8; len as usize];
                    s.read_exact(&mut skip)?;
                }
            }
            if chunk_flags & reply::FLAG_DONE != 0 {
                return match failure {
                    Some(e) => Err(e),
                    None => Ok(()),
                };
            }
        }
    }

    /// `f(offset, len)` for each piece of `[offset, offset + len)` no
    /// larger than a request may be.
    fn in_pieces(&self, offset: u64, len: u64, mut f: impl FnMut(u64, u64) -> io::Result<()>) -> io::Result<()> {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(self.max_request);
            f(offset + done, n)?;
            done += n;
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(())
    }

    fn zeroes(&self, offset: u64, len: u64, flags: u16) -> io::Result<()> {
        self.check_range(offset, len)?;
        self.in_pieces(offset, len, |o, n| {
            self.request(Request::new(cmd::WRITE_ZEROES, flags, o, n), &[], ReplyInto::Nothing)
        })
    }
}

fn server_errno(error: u32) -> io::Error {
    let errno = match error {
        1 => libc::EPERM,
        5 => libc::EIO,
        12 => libc::ENOMEM,
        22 => libc::EINVAL,
        28 => libc::ENOSPC,
        75 => libc::EOVERFLOW,
        95 => libc::ENOTSUP,
        108 => libc::ESHUTDOWN,
        _ => libc::EINVAL,
    };
    let os = io::Error::from_raw_os_error(errno);
    io::Error::new(os.kind(), ServerErrno(os))
}

/// An errno the server replied with.
#[derive(Debug)]
struct ServerErrno(io::Error);

impl std::fmt::Display for ServerErrno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", crate::tls::strerror(&self.0))
    }
}

impl std::error::Error for ServerErrno {}

fn is_server_errno(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<ServerErrno>())
}

/// Connects to `server`, with QEMU's message on failure.
fn open_socket(server: &NbdServer) -> io::Result<Socket> {
    Ok(match server {
        NbdServer::Unix(path) => Socket::Unix(UnixStream::connect(path).map_err(|e| {
            io::Error::new(e.kind(), format!("Failed to connect to '{path}': {}", crate::tls::strerror(&e)))
        })?),
        NbdServer::Tcp { host, port } => Socket::Tcp(connect_tcp(host, *port)?),
    })
}

/// A connection to `server` past the greeting, under TLS when `tls` is
/// given (the server's certificate checked for `hostname`).
fn greeted(server: &NbdServer, tls: Option<&TlsClient>, hostname: Option<&str>) -> io::Result<Socket> {
    let mut socket = open_socket(server)?;
    greet(&mut socket)?;
    match tls {
        Some(creds) => tls::start(socket, creds, hostname),
        None => Ok(socket),
    }
}

/// The start of fixed newstyle negotiation: the server's greeting, the
/// client's flags.
fn greet(s: &mut Socket) -> io::Result<()> {
    if read_u64(s)? != NBDMAGIC {
        return Err(protocol_error("not an NBD server (bad magic)"));
    }
    if read_u64(s)? != IHAVEOPT {
        return Err(protocol_error("the server speaks only the oldstyle protocol"));
    }
    let hflags = read_u16(s)?;
    if hflags & handshake_flags::FIXED_NEWSTYLE == 0 {
        return Err(protocol_error("the server does not speak fixed newstyle"));
    }
    let mut cflags = client_flags::FIXED_NEWSTYLE;
    if hflags & handshake_flags::NO_ZEROES != 0 {
        cflags |= client_flags::NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes())
}

/// Sends an option without data and reads its answer: whether the server
/// acknowledged it (an error reply is a refusal, not a failure).
fn simple_option(s: &mut Socket, option: u32) -> io::Result<bool> {
    send_option(s, option, &[])?;
    loop {
        let (kind, _) = read_option_reply(s, option)?;
        match kind {
            rep::ACK => return Ok(true),
            k if k & (1 << 31) != 0 => return Ok(false),
            _ => {}
        }
    }
}

fn connect_tcp(host: &str, port: u16) -> io::Result<TcpStream> {
    use std::net::ToSocketAddrs;
    let addrs = (host, port)
        .to_socket_addrs()
        .map_err(|e| io::Error::new(e.kind(), format!("address resolution failed for {host}:{port}: {e}")))?;
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    let e = last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AddrNotAvailable));
    Err(io::Error::new(e.kind(), format!("Failed to connect to '{host}:{port}': {}", crate::tls::strerror(&e))))
}

const BASE_ALLOCATION: &str = "base:allocation";
const ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// Fixed newstyle negotiation ending in `NBD_OPT_GO`: the export's size and
/// transmission flags, whether structured replies are on, and the status
/// context's id: `base:allocation`'s, or that of `x_dirty_bitmap`, which
/// the server must grant.
fn negotiate(s: &mut Socket, export: &str, x_dirty_bitmap: Option<&str>) -> io::Result<(u64, u16, bool, Option<u32>)> {
    let structured = simple_option(s, opt::STRUCTURED_REPLY)?;
    let mut allocation_context = None;
    if structured {
        let name = x_dirty_bitmap.unwrap_or(BASE_ALLOCATION).as_bytes();
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&1u32.to_be_bytes());
        data.extend_from_slice(&(name.len() as u32).to_be_bytes());
        data.extend_from_slice(name);
        send_option(s, opt::SET_META_CONTEXT, &data)?;
        loop {
            let (kind, d) = read_option_reply(s, opt::SET_META_CONTEXT)?;
            match kind {
                rep::META_CONTEXT if d.len() >= 4 && &d[4..] == name => {
                    allocation_context = Some(u32::from_be_bytes([d[0], d[1], d[2], d[3]]));
                }
                rep::ACK => break,
                k if k & (1 << 31) != 0 => break,
                _ => {}
            }
        }
    }
    if x_dirty_bitmap.is_some() && allocation_context.is_none() {
        // QEMU's nbd driver fails the open without a message of its own:
        // the block layer's generic one is what shows.
        return Err(io::Error::other("Could not open image: Invalid argument"));
    }
    let mut data = Vec::new();
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    send_option(s, opt::GO, &data)?;
    let mut size_flags = None;
    loop {
        let (kind, d) = read_option_reply(s, opt::GO)?;
        match kind {
            rep::INFO if d.len() >= 2 => {
                let t = u16::from_be_bytes([d[0], d[1]]);
                if t == info::EXPORT && d.len() == 12 {
                    let size = u64::from_be_bytes(d[2..10].try_into().unwrap_or_default());
                    let flags = u16::from_be_bytes([d[10], d[11]]);
                    size_flags = Some((size, flags));
                }
            }
            rep::ACK => break,
            rep::INFO => {}
            k if k & (1 << 31) != 0 => return Err(option_error(k, &d, opt::GO, export)),
            _ => {}
        }
    }
    let (size, flags) = size_flags.ok_or_else(|| protocol_error("the server did not describe the export"))?;
    Ok((size, flags, structured, allocation_context))
}

impl Storage for NbdClient {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // Past the end reads as zeros, as for files.
        let inside = self.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[inside..].fill(0);
        let mut done = 0usize;
        while done < inside {
            let n = (inside - done).min(self.max_request as usize);
            let piece = &mut buf[done..done + n];
            self.request(Request::new(cmd::READ, 0, offset + done as u64, n as u64), &[], ReplyInto::Read(piece))?;
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64).map_err(|_| io::Error::from_raw_os_error(libc::ENOSPC))?;
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(self.max_request as usize);
            let req = Request::new(cmd::WRITE, 0, offset + done as u64, n as u64);
            self.request(req, &buf[done..done + n], ReplyInto::Nothing)?;
            done += n;
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.size)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if len == self.size {
            return Ok(());
        }
        Err(io::Error::new(io::ErrorKind::Unsupported, "Cannot grow NBD nodes"))
    }

    fn sync(&self) -> io::Result<()> {
        if self.is_read_only() || !self.has(transmission_flags::SEND_FLUSH) {
            return Ok(());
        }
        self.request(Request::new(cmd::FLUSH, 0, 0, 0), &[], ReplyInto::Nothing)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.has(transmission_flags::SEND_WRITE_ZEROES) {
            return self.zeroes(offset, len, 0);
        }
        self.write_zeroes(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.has(transmission_flags::SEND_WRITE_ZEROES) {
            return self.zeroes(offset, len, cmd_flags::NO_HOLE);
        }
        let chunk = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len() as u64);
            self.write_at(&chunk[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }

    fn write_zeroes_fast(&self, offset: u64, len: u64) -> io::Result<bool> {
        if !self.has(transmission_flags::SEND_WRITE_ZEROES) || !self.has(transmission_flags::SEND_FAST_ZERO) {
            return Ok(false);
        }
        match self.zeroes(offset, len, cmd_flags::FAST_ZERO) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) || is_server_errno(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn driver_name(&self) -> &str {
        "nbd"
    }

    /// An export's disk usage is the server's secret ("unavailable").
    fn allocated_bytes(&self) -> io::Result<u64> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "the disk usage of an NBD export is unknown"))
    }

    fn data_runs(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64, bool)>> {
        // Data here is what is neither a hole nor zeros.
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        for r in self.allocation(offset, len)? {
            let data = r.data && !r.zero;
            match runs.last_mut() {
                Some(last) if last.2 == data => last.1 += r.len,
                _ => runs.push((r.offset, r.len, data)),
            }
        }
        Ok(runs)
    }

    /// Block status as QEMU's nbd driver reads it: bit 0 (a hole) clears
    /// "data", bit 1 sets "zero", whatever the context; a run that is
    /// neither is not present. Past the export's end: zeros.
    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Run>> {
        let end = offset.saturating_add(len).min(self.size);
        if self.allocation_context.is_none() || offset >= end {
            return Ok(vec![Run { offset, len, data: true, zero: false }]);
        }
        let mut runs: Vec<Run> = Vec::new();
        let mut at = offset;
        while at < end {
            let n = (end - at).min(self.max_request.min(u64::from(u32::MAX)));
            let mut extents = Vec::new();
            self.request(Request::new(cmd::BLOCK_STATUS, 0, at, n), &[], ReplyInto::Extents(&mut extents))?;
            let before = at;
            for (l, flags) in extents {
                let l = u64::from(l).min(end - at);
                if l == 0 {
                    break;
                }
                let flags = if self.fold_depth { flags.min(2) } else { flags };
                let (data, zero) = (flags & 1 == 0, flags & 2 != 0);
                match runs.last_mut() {
                    Some(last) if last.data == data && last.zero == zero => last.len += l,
                    _ => runs.push(Run { offset: at, len: l, data, zero }),
                }
                at += l;
            }
            if at == before {
                return Err(protocol_error("block status without progress"));
            }
        }
        if offset + len > end {
            runs.push(Run { offset: end, len: offset + len - end, data: false, zero: true });
        }
        Ok(runs)
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        let conn = self.conn.get_mut().unwrap_or_else(|p| p.into_inner());
        if !conn.broken {
            let header = RequestHeader { flags: 0, kind: cmd::DISC, cookie: 0, offset: 0, length: 0 }.encode(false);
            let _ = conn.socket.write_all(&header);
            if let Socket::Tls(t) = &mut conn.socket {
                // Tell the server the session ends cleanly (close_notify).
                t.conn.send_close_notify();
                let _ = t.flush();
            }
        }
    }
}
