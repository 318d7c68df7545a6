//! One client connection: the handshake, then three parties.
//!
//! - The reader (the connection's own thread) frames requests, reads write
//!   payloads, validates, and hands each request to the worker pool.
//! - Workers run requests concurrently and give each encoded reply to the
//!   writer; replies leave in completion order, not request order.
//! - The writer thread owns the socket's sending side, so replies go out
//!   whole, and gathers whatever replies are ready into one `writev`.
//!
//! Memory is bounded per connection: requests in flight (queued, running
//! or waiting to be sent) may hold at most [`MAX_INFLIGHT_BYTES`] of
//! payload and reply data and number at most [`MAX_INFLIGHT`]; the reader
//! stops reading until replies have gone out. A client that stops reading
//! replies therefore stalls only itself.
//!
//! Locks: the in-flight budget (a mutex and condvar, held to count).

use std::io::{self, BufReader, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::export::Export;
use crate::handshake::{self, Outcome};
use crate::pool::Pool;
use crate::proto::{self, Errno, RequestHeader};
use crate::session::{Op, Payload, Session};

/// Requests one connection may have in flight.
pub const MAX_INFLIGHT: usize = 64;
/// Payload and reply bytes one connection may have in flight (a single
/// request larger than this still runs, alone).
pub const MAX_INFLIGHT_BYTES: usize = 64 << 20;
/// The writer sends at most this many replies in one system call.
const MAX_BATCH: usize = 64;

/// A connected client socket.
pub enum Stream {
    /// A Unix domain socket.
    Unix(UnixStream),
    /// A TCP socket.
    Tcp(TcpStream),
}

impl Stream {
    /// Another handle to the same socket.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    /// Shuts down one or both directions.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        }
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }

    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tcp(s) => s.set_write_timeout(t),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tcp(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The stream during the handshake: every read and write must finish
/// before the deadline (qemu-nbd's `--handshake-limit`).
struct Deadlined<'a> {
    s: &'a mut Stream,
    deadline: Option<Instant>,
}

impl Deadlined<'_> {
    fn arm(&self, write: bool) -> io::Result<()> {
        let Some(d) = self.deadline else { return Ok(()) };
        let left = d.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "handshake time limit reached"));
        }
        if write {
            self.s.set_write_timeout(Some(left))
        } else {
            self.s.set_read_timeout(Some(left))
        }
    }
}

impl Read for Deadlined<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm(false)?;
        self.s.read(buf)
    }
}

impl Write for Deadlined<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm(true)?;
        self.s.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Requests in flight on one connection.
struct Budget {
    state: Mutex<(usize, usize)>,
    changed: Condvar,
}

impl Budget {
    /// Waits until `bytes` more fit (always true when nothing is in flight).
    fn acquire(&self, bytes: usize) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while st.0 > 0 && (st.0 >= MAX_INFLIGHT || st.1 + bytes > MAX_INFLIGHT_BYTES) {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.0 += 1;
        st.1 += bytes;
    }

    fn release(&self, bytes: usize) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.0 -= 1;
        st.1 -= bytes;
        drop(st);
        self.changed.notify_all();
    }

    fn wait_idle(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while st.0 > 0 {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// A reply ready to send, with the budget it holds.
struct Outgoing {
    bytes: Vec<u8>,
    cost: usize,
}

/// Serves one client until it disconnects, breaks the protocol, or its
/// socket is shut down (server shutdown). Never panics on client input.
pub fn serve(mut stream: Stream, export: Arc<Export>, pool: &Pool, handshake_limit: Option<Duration>) {
    let deadline = handshake_limit.map(|d| Instant::now() + d);
    let outcome = handshake::negotiate(&mut Deadlined { s: &mut stream, deadline }, &export);
    let neg = match outcome {
        Ok(Outcome::Transmission(n)) => n,
        Ok(Outcome::Aborted) | Err(_) => {
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
    };
    if stream.set_read_timeout(None).and_then(|()| stream.set_write_timeout(None)).is_err() {
        return;
    }
    if let Stream::Tcp(t) = &stream {
        let _ = t.set_nodelay(true);
    }
    let Ok(mut sender) = stream.try_clone() else { return };
    let session = Arc::new(Session::new(export, neg));
    let budget = Arc::new(Budget { state: Mutex::new((0, 0)), changed: Condvar::new() });
    let (tx, rx) = mpsc::channel::<Outgoing>();
    let writer_budget = Arc::clone(&budget);
    let writer = std::thread::Builder::new().name("nbd-writer".into()).spawn(move || {
        write_replies(&mut sender, &rx, &writer_budget);
    });
    let Ok(writer) = writer else { return };
    let Ok(reader_half) = stream.try_clone() else {
        let _ = stream.shutdown(Shutdown::Both);
        drop(tx);
        let _ = writer.join();
        return;
    };
    read_requests(BufReader::with_capacity(64 << 10, reader_half), &session, pool, &budget, &tx);
    // Replies to everything already received go out before the close.
    budget.wait_idle();
    drop(tx);
    let _ = writer.join();
    let _ = stream.shutdown(Shutdown::Both);
}

fn read_requests(
    mut r: BufReader<Stream>,
    session: &Arc<Session>,
    pool: &Pool,
    budget: &Arc<Budget>,
    tx: &mpsc::Sender<Outgoing>,
) {
    loop {
        let mut hdr = [0u8; proto::REQUEST_HEADER_LEN];
        if r.read_exact(&mut hdr).is_err() {
            return;
        }
        // A bad magic leaves no way to find the next request: disconnect.
        let Ok(h) = RequestHeader::parse(&hdr) else { return };
        let mut payload = Vec::new();
        match session.payload(&h) {
            Payload::None => {}
            Payload::Read(n) => {
                budget.acquire(n as usize);
                payload.reserve_exact(n as usize);
                let got = (&mut r).take(u64::from(n)).read_to_end(&mut payload);
                budget.release(n as usize);
                if !matches!(got, Ok(k) if k == n as usize) {
                    return;
                }
            }
            Payload::Discard(n) => match io::copy(&mut (&mut r).take(u64::from(n)), &mut io::sink()) {
                Ok(k) if k == u64::from(n) => {}
                _ => return,
            },
        }
        let op = match session.check(&h) {
            Ok(Op::Disconnect) => return,
            Ok(op) => op,
            Err(refusal) => {
                budget.acquire(0);
                if tx.send(Outgoing { bytes: session.refusal_reply(&h, &refusal), cost: 0 }).is_err() {
                    budget.release(0);
                    return;
                }
                continue;
            }
        };
        let cost = payload.len()
            + match op {
                Op::Read { length, .. } => length as usize,
                _ => 0,
            };
        budget.acquire(cost);
        let (session, tx, budget) = (Arc::clone(session), tx.clone(), Arc::clone(budget));
        pool.submit(move || {
            let cookie = h.cookie;
            let bytes = catch_unwind(AssertUnwindSafe(|| session.execute(cookie, op, &payload))).unwrap_or_else(|_| {
                session
                    .refusal_reply(&h, &crate::session::Refusal { errno: Errno::Io, message: "internal error".into() })
            });
            drop(payload);
            if tx.send(Outgoing { bytes, cost }).is_err() {
                budget.release(cost);
            }
        });
    }
}

/// Sends replies as they come, several per system call when several are
/// ready. After a send failure the socket is shut down (which stops the
/// reader) and the remaining replies are dropped, releasing their budget.
fn write_replies(s: &mut Stream, rx: &mpsc::Receiver<Outgoing>, budget: &Budget) {
    let mut broken = false;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(o) => batch.push(o),
                Err(_) => break,
            }
        }
        if !broken && write_all_vectored(s, &batch).is_err() {
            broken = true;
            let _ = s.shutdown(Shutdown::Both);
        }
        for o in batch {
            budget.release(o.cost);
        }
    }
}

fn write_all_vectored(s: &mut Stream, batch: &[Outgoing]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> =
        batch.iter().filter(|o| !o.bytes.is_empty()).map(|o| IoSlice::new(&o.bytes)).collect();
    let mut bufs = &mut slices[..];
    while !bufs.is_empty() {
        match s.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
