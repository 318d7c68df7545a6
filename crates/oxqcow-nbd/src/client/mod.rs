//! An NBD client: an export of any NBD server (qemu-nbd, nbdkit,
//! `oxqcow serve`) as a [`Storage`], so that every image operation works on
//! it as on a file. QEMU's names for it (`nbd://`, `nbd+unix://`, `nbd:`)
//! are read by [`NbdAddress::parse`].
//!
//! One connection, pipelined (`wire.rs`): requests from many threads are
//! in flight at once, each reply dispatched to its caller, so that
//! convert's workers keep the server busy. Extended headers are asked
//! for first, as QEMU's client asks, else structured replies, so that
//! block status (`base:allocation`, or the context the nbd driver's
//! `x-dirty-bitmap` names) tells holes from data; reads accept every reply
//! kind.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use oxqcow::storage::Run;
use oxqcow::Storage;

pub use address::{NbdAddress, NbdServer, DEFAULT_PORT};
pub(crate) use list::list_over_stream;
pub use list::{list_exports, ExportInfo};
pub use tls::TlsClient;

mod address;
mod list;
mod tls;
mod wire;

use crate::conn::Stream;
use crate::proto::{
    client_flags, cmd, cmd_flags, handshake_flags, info, opt, rep, transmission_flags, IHAVEOPT, NBDMAGIC,
    OPTION_REPLY_MAGIC,
};
use crate::tls::Relay;
use wire::{ReplyInto, Request, Wire};

/// The largest read or write sent: 32 MiB, the most servers accept (the
/// protocol's suggested maximum), unless the server says less.
const MAX_REQUEST: u64 = 32 << 20;
/// The most one block status request asks about: as much as a compact
/// header's 32-bit length holds, on a 1 MiB grid (servers answer for less
/// when they like; fewer round trips skip large holes faster).
const MAX_STATUS: u64 = u32::MAX as u64 & !((1 << 20) - 1);
/// With extended headers: a block status request's length is 64 bits.
const MAX_STATUS_EXTENDED: u64 = 1 << 40;
/// The most an option reply or a reply chunk other than data may carry:
/// anything larger is a broken or hostile server.
const MAX_REPLY_DATA: u32 = 1 << 20;
/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection's socket: the server's, or under TLS the clear end of the
/// relay's pair (the relay holds the server's).
struct Socket {
    stream: Stream,
    relay: Option<Relay>,
}

impl Socket {
    fn plain(stream: Stream) -> Socket {
        Socket { stream, relay: None }
    }

    fn relayed(clear: UnixStream, relay: Relay) -> Socket {
        Socket { stream: Stream::Unix(clear), relay: Some(relay) }
    }

    fn stream(&self) -> &Stream {
        &self.stream
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.read(buf)
    }
}

/// Writes never raise SIGPIPE: a server gone fails the write.
impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        crate::sys::send_vectored(self.stream.fd(), &[io::IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        crate::sys::send_vectored(self.stream.fd(), bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        if let Some(relay) = self.relay.take() {
            // The relay sends what was written and close_notify, then
            // ends: the server sees the session end cleanly.
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
            relay.join();
        }
    }
}

/// A connected NBD export.
pub struct NbdClient {
    wire: Wire,
    size: u64,
    flags: u16,
    /// Whether the server gave the status context (`base:allocation` or
    /// the `x-dirty-bitmap` one).
    has_status: bool,
    /// The status context is `qemu:allocation-depth` through
    /// `x-dirty-bitmap`: depths past 2 read as 2, as QEMU folds them, so
    /// that the two bits say "local" (1, a hole) or "backing" (2, zeros).
    fold_depth: bool,
    max_request: u64,
    max_status: u64,
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

/// What the negotiation settled.
struct Negotiated {
    size: u64,
    flags: u16,
    extended: bool,
    structured: bool,
    /// The status context's id, when the server gave it.
    status_context: Option<u32>,
}

impl NbdClient {
    /// Connects to `addr` and negotiates its export, over TLS with `tls`
    /// (the credentials `addr.tls_creds` names: the caller holds them).
    pub fn connect(addr: &NbdAddress, tls: Option<&TlsClient>) -> io::Result<NbdClient> {
        let socket = greeted(&addr.server, tls, addr.tls_hostname())?;
        NbdClient::negotiated(socket, &addr.export, addr.x_dirty_bitmap.as_deref())
    }

    /// The whole client conversation (greeting, negotiation) on a stream
    /// the caller connected: for the fuzz driver, which plays the server.
    pub(crate) fn over_stream(stream: Stream, export: &str, x_dirty_bitmap: Option<&str>) -> io::Result<NbdClient> {
        let mut socket = Socket::plain(stream);
        greet(&mut socket)?;
        NbdClient::negotiated(socket, export, x_dirty_bitmap)
    }

    /// Negotiates `export` on a connection past the greeting.
    fn negotiated(mut socket: Socket, export: &str, context: Option<&str>) -> io::Result<NbdClient> {
        let n = match negotiate(&mut socket, export, context) {
            Ok(n) => n,
            Err(e) => {
                // End the negotiation politely, as QEMU's client does, so
                // that the server does not log a broken handshake.
                let _ = send_option(&mut socket, opt::ABORT, &[]);
                return Err(e);
            }
        };
        Ok(NbdClient {
            wire: Wire::new(socket, n.extended, n.structured, n.status_context)?,
            size: n.size,
            flags: n.flags,
            has_status: n.status_context.is_some(),
            fold_depth: context == Some(ALLOCATION_DEPTH),
            max_request: MAX_REQUEST,
            max_status: if n.extended { MAX_STATUS_EXTENDED } else { MAX_STATUS },
        })
    }

    /// Whether the export refuses writes.
    pub fn is_read_only(&self) -> bool {
        self.flags & transmission_flags::READ_ONLY != 0
    }

    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    fn request(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u64,
        payload: &[u8],
        into: ReplyInto<'_>,
    ) -> io::Result<()> {
        self.wire.request(Request { kind, flags, offset, length }, payload, into)
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
        self.in_pieces(offset, len, |o, n| self.request(cmd::WRITE_ZEROES, flags, o, n, &[], ReplyInto::Nothing))
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
fn open_socket(server: &NbdServer) -> io::Result<Stream> {
    Ok(match server {
        NbdServer::Unix(path) => Stream::Unix(UnixStream::connect(path).map_err(|e| {
            io::Error::new(e.kind(), format!("Failed to connect to '{path}': {}", crate::tls::strerror(&e)))
        })?),
        NbdServer::Tcp { host, port } => {
            let s = connect_tcp(host, *port)?;
            let _ = s.set_nodelay(true);
            Stream::Tcp(s)
        }
    })
}

/// A connection to `server` past the greeting, under TLS when `tls` is
/// given (the server's certificate checked for `hostname`).
fn greeted(server: &NbdServer, tls: Option<&TlsClient>, hostname: Option<&str>) -> io::Result<Socket> {
    let mut socket = Socket::plain(open_socket(server)?);
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
fn simple_option(s: &mut (impl Read + Write), option: u32) -> io::Result<bool> {
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
/// transmission flags, the reply framing (extended headers, as QEMU's
/// client asks first, else structured replies), and the status context's
/// id: `base:allocation`'s, or that of `x_dirty_bitmap`, which the server
/// must grant.
fn negotiate(s: &mut Socket, export: &str, x_dirty_bitmap: Option<&str>) -> io::Result<Negotiated> {
    let extended = simple_option(s, opt::EXTENDED_HEADERS)?;
    let structured = extended || simple_option(s, opt::STRUCTURED_REPLY)?;
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
    Ok(Negotiated { size, flags, extended, structured, status_context: allocation_context })
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
            self.request(cmd::READ, 0, offset + done as u64, n as u64, &[], ReplyInto::Read(piece))?;
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64).map_err(|_| io::Error::from_raw_os_error(libc::ENOSPC))?;
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(self.max_request as usize);
            self.request(cmd::WRITE, 0, offset + done as u64, n as u64, &buf[done..done + n], ReplyInto::Nothing)?;
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
        self.request(cmd::FLUSH, 0, 0, 0, &[], ReplyInto::Nothing)
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
        if !self.has_status || offset >= end {
            return Ok(vec![Run { offset, len, data: true, zero: false }]);
        }
        let mut runs: Vec<Run> = Vec::new();
        let mut at = offset;
        while at < end {
            let n = (end - at).min(self.max_status);
            let mut extents = Vec::new();
            self.request(cmd::BLOCK_STATUS, 0, at, n, &[], ReplyInto::Extents(&mut extents))?;
            let before = at;
            for (l, flags) in extents {
                let l = l.min(end - at);
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
        self.wire.disconnect();
    }
}
