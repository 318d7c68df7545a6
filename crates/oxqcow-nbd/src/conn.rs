//! One client connection: the handshake, then three parties.
//!
//! - The reader (the connection's own thread) frames requests, validates
//!   them, takes the memory each needs and reads write payloads, and hands
//!   each request to the worker pool.
//! - Workers run requests concurrently; replies leave in completion order,
//!   not request order, each one whole.
//! - The outbox orders the sending: a worker whose reply finds the socket
//!   idle sends it itself, without blocking (MSG_DONTWAIT); whatever does
//!   not go out at once waits in the outbox for the writer thread, which
//!   sends blocking, several replies per `writev`. Only the writer ever
//!   blocks on the socket, so a client that stops reading stalls its own
//!   connection and never a worker. Under TLS the one sending (worker or
//!   writer) encrypts the replies itself and hands the records to the
//!   client's socket (`tls::TlsSender`; a worker without waiting), while
//!   requests still come in through the relay's pair.
//!
//! Requests in flight (queued, running or waiting to be sent) number at
//! most [`MAX_INFLIGHT`] per connection, and the buffers they hold (write
//! payloads until the write ran, read and block status replies until they
//! are sent) are granted from the server's memory budget
//! ([`crate::memory`]: a share per connection, a bound over all of them).
//! The reader stops reading while a request waits for either, so a client
//! that stops reading replies stalls only itself; a request the budget
//! cannot grant, or whose buffer cannot be allocated, is answered with
//! ENOMEM (its write payload read and dropped), and the connection goes on.
//!
//! Locks: the request count (a mutex and condvar, held to count); the
//! outbox (held to queue or take replies, never across a blocking send);
//! the memory budget (see its module).

use std::collections::VecDeque;
use std::io::{self, BufReader, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::export::Export;
use crate::handshake::{self, Outcome};
use crate::memory::{Account, Memory, NoMemory};
use crate::pool::Pool;
use crate::proto::{self, Errno};
use crate::session::{Op, Payload, Refusal, Session};
use crate::tls::{Relay, TlsSender, TlsServer};

/// Requests one connection may have in flight.
pub const MAX_INFLIGHT: usize = 64;
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

    pub(crate) fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_nonblocking(on),
            Stream::Tcp(s) => s.set_nonblocking(on),
        }
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Tcp(s) => s.as_fd(),
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

/// The number of requests in flight on one connection.
struct Budget {
    state: Mutex<BudgetState>,
    changed: Condvar,
}

struct BudgetState {
    requests: usize,
    /// Threads waiting for the count to drop (the reader): releases wake
    /// only when someone waits.
    waiting: usize,
}

impl Budget {
    fn new() -> Budget {
        Budget { state: Mutex::new(BudgetState { requests: 0, waiting: 0 }), changed: Condvar::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until one more request may be in flight.
    fn acquire(&self) {
        let mut st = self.lock();
        while st.requests >= MAX_INFLIGHT {
            st.waiting += 1;
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
            st.waiting -= 1;
        }
        st.requests += 1;
    }

    fn release(&self) {
        let mut st = self.lock();
        st.requests -= 1;
        let wake = st.waiting > 0;
        drop(st);
        if wake {
            self.changed.notify_all();
        }
    }

    fn wait_idle(&self) {
        let mut st = self.lock();
        while st.requests > 0 {
            st.waiting += 1;
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
            st.waiting -= 1;
        }
    }
}

/// A reply ready to send, with the memory granted for it.
struct Outgoing {
    bytes: Vec<u8>,
    /// Bytes already sent.
    sent: usize,
    granted: usize,
}

struct OutQueue {
    replies: VecDeque<Outgoing>,
    /// Someone is sending on the socket.
    busy: bool,
    /// No more replies will come: the writer ends once the queue is empty.
    closed: bool,
    /// A send failed: replies are dropped.
    broken: bool,
}

/// The replies of one connection on their way out (see the module doc).
struct Outbox {
    queue: Mutex<OutQueue>,
    changed: Condvar,
    budget: Arc<Budget>,
    account: Arc<Account>,
    /// Under TLS, where replies go: encrypted by whoever sends them (a
    /// worker finding the socket idle, or the writer), not through the
    /// relay's pair.
    tls: Option<TlsSender>,
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, OutQueue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A reply is sent or dropped: its memory and its place go back.
    fn done(&self, out: Outgoing) {
        self.account.give_back(out.bytes, out.granted);
        self.budget.release();
    }

    /// Hands over a finished reply: sent at once if the socket is idle and
    /// takes it without blocking, else queued for the writer.
    fn send(&self, sock: &Stream, bytes: Vec<u8>, granted: usize) {
        let mut out = Outgoing { bytes, sent: 0, granted };
        let mut q = self.lock();
        if q.broken {
            drop(q);
            self.done(out);
            return;
        }
        if q.busy || !q.replies.is_empty() {
            q.replies.push_back(out);
            drop(q);
            self.changed.notify_one();
            return;
        }
        q.busy = true;
        drop(q);
        let done = match &self.tls {
            // What rustls did not take, or records the socket did not
            // take, the writer sends (an entry whose bytes are all taken
            // still makes it flush).
            Some(t) => match t.try_send(&out.bytes) {
                Ok((taken, flushed)) => {
                    out.sent = taken;
                    taken == out.bytes.len() && flushed
                }
                Err(_) => false,
            },
            None => loop {
                if out.sent == out.bytes.len() {
                    break true;
                }
                match crate::sys::send_nonblocking(sock.fd(), &out.bytes[out.sent..]) {
                    Ok(0) => break false,
                    Ok(n) => out.sent += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break false,
                }
            },
        };
        let mut q = self.lock();
        q.busy = false;
        let sent = if done {
            Some(out)
        } else {
            // The rest goes first: the writer sends it, blocking, or finds
            // the socket broken.
            q.replies.push_front(out);
            None
        };
        // Only the writer waits here, and only for queued replies: a wake
        // is a system call, so none when it has nothing to do.
        let wake = !q.replies.is_empty();
        drop(q);
        if wake {
            self.changed.notify_one();
        }
        if let Some(out) = sent {
            self.done(out);
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }
}

/// Serves one client until it disconnects, breaks the protocol, or its
/// socket is shut down (server shutdown). Never panics on client input.
/// With `tls`, the client must start TLS before anything else; the
/// connection then runs over the TLS relay's socket pair (see
/// [`crate::tls`]), and returns once the relay has sent everything.
pub fn serve(
    stream: Stream,
    export: Arc<Export>,
    pool: &Pool,
    memory: &Arc<Memory>,
    handshake_limit: Option<Duration>,
    tls: Option<&TlsServer>,
) {
    let mut relay = None;
    serve_stream(stream, export, pool, memory, handshake_limit, tls, &mut relay);
    // Every handle on the connection's end of the pair is gone or shut down
    // by now, so the relay ends.
    if let Some(r) = relay {
        r.join();
    }
}

fn serve_stream(
    mut stream: Stream,
    export: Arc<Export>,
    pool: &Pool,
    memory: &Arc<Memory>,
    handshake_limit: Option<Duration>,
    tls: Option<&TlsServer>,
    relay: &mut Option<Relay>,
) {
    let deadline = handshake_limit.map(|d| Instant::now() + d);
    let mut outcome = handshake::negotiate_with(&mut Deadlined { s: &mut stream, deadline }, &export, tls.is_some());
    if let (Ok(Outcome::StartTls(resume)), Some(tls)) = (&outcome, tls) {
        let resume = *resume;
        if let Stream::Tcp(t) = &stream {
            let _ = t.set_nodelay(true);
        }
        let Ok(net) = stream.try_clone() else { return };
        let (inner, r) = match crate::tls::start(tls, &mut Deadlined { s: &mut stream, deadline }, net) {
            Ok(started) => started,
            Err(_) => {
                let _ = stream.shutdown(Shutdown::Both);
                return;
            }
        };
        *relay = Some(r);
        // The relay owns the client socket now; this end of the pair is
        // the connection's socket.
        stream = Stream::Unix(inner);
        outcome = handshake::resume_in_tls(&mut Deadlined { s: &mut stream, deadline }, &export, resume);
    }
    let neg = match outcome {
        Ok(Outcome::Transmission(n)) => n,
        Ok(Outcome::Aborted | Outcome::StartTls(_)) | Err(_) => {
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
    let Ok(reader_half) = stream.try_clone() else { return };
    let session = Arc::new(Session::new(export, neg));
    let budget = Arc::new(Budget::new());
    let account = Arc::new(memory.account());
    let tls_sender = relay.as_mut().and_then(Relay::take_sender);
    let outbox = Arc::new(Outbox {
        queue: Mutex::new(OutQueue { replies: VecDeque::new(), busy: false, closed: false, broken: false }),
        changed: Condvar::new(),
        budget: Arc::clone(&budget),
        account: Arc::clone(&account),
        tls: tls_sender,
    });
    let writer_box = Arc::clone(&outbox);
    let writer = std::thread::Builder::new().name("nbd-writer".into()).spawn(move || {
        write_replies(&mut sender, &writer_box);
    });
    let Ok(writer) = writer else { return };
    let sock = Arc::new(stream);
    let reader = BufReader::with_capacity(64 << 10, reader_half);
    read_requests(reader, &session, pool, &budget, &outbox, &sock, &account);
    // Replies to everything already received go out before the close.
    budget.wait_idle();
    outbox.close();
    let _ = writer.join();
    let _ = sock.shutdown(Shutdown::Both);
}

fn read_requests(
    mut r: BufReader<Stream>,
    session: &Arc<Session>,
    pool: &Pool,
    budget: &Arc<Budget>,
    outbox: &Arc<Outbox>,
    sock: &Arc<Stream>,
    account: &Arc<Account>,
) {
    loop {
        let mut hdr = [0u8; proto::EXTENDED_REQUEST_HEADER_LEN];
        let hdr = &mut hdr[..session.header_len()];
        if r.read_exact(hdr).is_err() {
            return;
        }
        // A bad magic leaves no way to find the next request: disconnect.
        let Ok(h) = session.parse_header(hdr) else { return };
        let mut checked = session.check(&h);
        if checked == Ok(Op::Disconnect) {
            return;
        }
        budget.acquire();
        // The write payload: read into granted memory when the write will
        // run, else read and dropped, so the stream stays in step.
        let mut payload = Vec::new();
        let mut payload_granted = 0;
        let mut drop_payload = 0;
        match session.payload(&h) {
            Payload::None => {}
            Payload::Read(n) if checked.is_ok() => match account.take(n as usize) {
                Ok(buf) => (payload, payload_granted) = (buf, n as usize),
                Err(e) => {
                    checked = Err(no_memory(e));
                    drop_payload = n;
                }
            },
            Payload::Read(n) | Payload::Discard(n) => drop_payload = n,
            Payload::Hangup => {
                budget.release();
                return;
            }
        }
        if payload_granted > 0 {
            crate::session::fit(&mut payload, payload_granted);
            if r.read_exact(&mut payload).is_err() {
                account.give_back(payload, payload_granted);
                budget.release();
                return;
            }
        }
        if drop_payload > 0 {
            match io::copy(&mut (&mut r).take(u64::from(drop_payload)), &mut io::sink()) {
                Ok(k) if k == u64::from(drop_payload) => {}
                _ => {
                    budget.release();
                    return;
                }
            }
        }
        // The reply's memory, for the replies that carry data.
        let mut reply = Vec::new();
        let mut reply_granted = 0;
        if let Ok(op) = checked {
            let need = session.reply_bound(op);
            match account.take(need) {
                Ok(buf) => (reply, reply_granted) = (buf, need),
                Err(e) => checked = Err(no_memory(e)),
            }
        }
        let op = match checked {
            Ok(op) => op,
            Err(refusal) => {
                account.give_back(payload, payload_granted);
                outbox.send(sock, session.refusal_reply(&h, &refusal), 0);
                continue;
            }
        };
        let (session, outbox, sock, account) =
            (Arc::clone(session), Arc::clone(outbox), Arc::clone(sock), Arc::clone(account));
        pool.submit(move || {
            let mut bytes = reply;
            let ran = catch_unwind(AssertUnwindSafe(|| session.execute_into(&mut bytes, &h, op, &payload)));
            if ran.is_err() {
                let internal = Refusal { errno: Errno::Io, message: "internal error".into() };
                bytes = session.refusal_reply(&h, &internal);
            }
            // The payload's memory goes back once the write ran, not when
            // its (small) reply is sent.
            account.give_back(payload, payload_granted);
            outbox.send(&sock, bytes, reply_granted);
        });
    }
}

fn no_memory(e: NoMemory) -> Refusal {
    Refusal { errno: Errno::NoMem, message: e.to_string() }
}

/// Sends the replies workers could not send themselves, blocking, several
/// per system call. After a send failure the socket is shut down (which
/// stops the reader) and every reply is dropped, releasing its budget.
/// Under TLS the replies go through the outbox's `TlsSender`, encrypted by
/// this thread; `s` (the connection's end of the relay's pair) is then
/// only shut down.
fn write_replies(s: &mut Stream, outbox: &Outbox) {
    loop {
        let mut batch = {
            let mut q = outbox.lock();
            while !(q.closed && q.replies.is_empty()) && (q.busy || q.replies.is_empty()) {
                q = outbox.changed.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            if q.replies.is_empty() {
                return;
            }
            let n = q.replies.len().min(MAX_BATCH);
            q.busy = true;
            q.replies.drain(..n).collect::<Vec<_>>()
        };
        let ok = !outbox.lock().broken
            && match &outbox.tls {
                Some(t) => {
                    let parts: Vec<&[u8]> = batch.iter().map(|o| &o.bytes[o.sent..]).collect();
                    t.send_all(&parts).is_ok()
                }
                None => write_all_vectored(s, &mut batch).is_ok(),
            };
        let mut q = outbox.lock();
        q.busy = false;
        if !ok && !q.broken {
            q.broken = true;
            let _ = s.shutdown(Shutdown::Both);
        }
        let dropped: Vec<Outgoing> = if q.broken { q.replies.drain(..).collect() } else { Vec::new() };
        drop(q);
        for o in batch.into_iter().chain(dropped) {
            outbox.done(o);
        }
    }
}

fn write_all_vectored(s: &mut Stream, batch: &mut [Outgoing]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> =
        batch.iter().filter(|o| o.sent < o.bytes.len()).map(|o| IoSlice::new(&o.bytes[o.sent..])).collect();
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
