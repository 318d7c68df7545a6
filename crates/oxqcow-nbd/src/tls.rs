//! TLS for NBD (NBD_OPT_STARTTLS), as qemu-nbd serves it with a
//! `tls-creds-x509` object: the server credentials, the TLS handshake on a
//! client socket, and the relay that lets the rest of the connection code
//! run unchanged over the decrypted stream.
//!
//! Credentials ([`TlsServer::load_x509`]) come from a directory holding
//! QEMU's file names: `ca-cert.pem`, `server-cert.pem`, `server-key.pem`,
//! and optionally `ca-crl.pem` and `dh-params.pem`. They are checked in
//! QEMU's order (`crypto/tlscredsx509.c`) and refused with its messages.
//! With `verify-peer` (QEMU's default) a client must present a certificate
//! signed by the CA; rustls checks it (chain, validity, key usage, CRLs).
//! DH parameters are parsed for their PEM frame and otherwise unused:
//! rustls negotiates ECDHE (and TLS 1.3 groups) only.
//!
//! After the handshake ([`start`]), a relay thread per connection reads
//! the client socket and shares the rustls state (under a lock): it
//! decrypts what the client sends into one end of a Unix socket pair and
//! encrypts what the connection code writes on the other end (the rest of
//! the negotiation). The connection's request path stays as it is, at the
//! cost of one copy through the pair; its replies skip the pair: the
//! connection's writer encrypts them and hands the records to the client
//! socket itself ([`TlsSender`]), which saves two copies of every reply
//! and a wake of the relay. The NBD client (`client/tls.rs`) runs its
//! side of a TLS session through the relay alone ([`relay`]), "client"
//! below being the server it talks to. The relay uses non-blocking
//! sockets and `poll`, so it waits for whichever side can move, never
//! blocks on one while the other has data.
//!
//! Shutdown, both ways: the client's close_notify or EOF (or the server
//! shutting the client socket for reading) becomes EOF on the pair, so the
//! connection stops reading; the connection closing its end becomes
//! close_notify and the end of the relay once everything is sent; a failed
//! send or a TLS error ends the relay, and the connection's next send or
//! read on the pair fails.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use rustix::event::{poll, PollFd, PollFlags};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{Connection, RootCertStore, ServerConfig, ServerConnection};

use crate::conn::Stream;

/// The credentials file names in a `tls-creds-x509` directory (QEMU's).
pub const CA_CERT: &str = "ca-cert.pem";
/// See [`CA_CERT`].
pub const CA_CRL: &str = "ca-crl.pem";
/// See [`CA_CERT`].
pub const SERVER_CERT: &str = "server-cert.pem";
/// See [`CA_CERT`].
pub const SERVER_KEY: &str = "server-key.pem";
/// See [`CA_CERT`].
pub const DH_PARAMS: &str = "dh-params.pem";

/// Plaintext the relay holds in either direction before it stops reading
/// from that side: bounds memory per connection and keeps backpressure.
/// Every TLS client has a relay, so this multiplies by up to 256 clients
/// (about 640 KiB each with [`CHUNK`] and rustls's queue of records, where
/// 1 MiB and 256 KiB made 2.5 MiB). The socket buffers of the pair and of
/// the client socket keep data flowing meanwhile: nbdcopy over TLS ran as
/// fast or faster than with 1 MiB, and with less CPU, for records freed in
/// smaller batches let the allocator keep their pages.
const RELAY_LIMIT: usize = 256 << 10;
/// One read from the connection's end of the pair.
const CHUNK: usize = 64 << 10;
/// The send buffer of the pair's end that is not the relay's: what the
/// NBD client writes (requests with up to 32 MiB of payload) passes
/// through it, and with the default (about 200 KiB) a 256 KiB write woke
/// the relay and waited for it twice.
const PAIR_BUFFER: usize = 1 << 20;

/// Server credentials: the rustls configuration every connection starts
/// from.
#[derive(Clone, Debug)]
pub struct TlsServer {
    config: Arc<ServerConfig>,
}

/// The text of an OS error without Rust's " (os error N)" suffix, as QEMU
/// prints `strerror`.
pub(crate) fn strerror(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Reads a credentials file: `Ok(None)` when an optional one is absent,
/// QEMU's "Unable to access credentials" otherwise.
fn read_cred(dir: &Path, name: &str, required: bool) -> Result<Option<(String, Vec<u8>)>, String> {
    let path = dir.join(name);
    let shown = path.display().to_string();
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some((shown, bytes))),
        Err(e) if e.kind() == io::ErrorKind::NotFound && !required => Ok(None),
        Err(e) => Err(format!("Unable to access credentials {shown}: {}", strerror(&e))),
    }
}

fn certificates(pem: &[u8]) -> Option<Vec<CertificateDer<'static>>> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
    certs.ok().filter(|c| !c.is_empty())
}

impl TlsServer {
    /// Loads server credentials from `dir` (QEMU's `tls-creds-x509` with
    /// `endpoint=server`); `verify_peer` demands a client certificate
    /// signed by the CA. Errors are QEMU's messages, naming the file.
    pub fn load_x509(dir: &Path, verify_peer: bool) -> Result<TlsServer, String> {
        // Presence first, in QEMU's order, then contents.
        let (ca_path, ca_pem) = read_cred(dir, CA_CERT, true)?.unwrap_or_default();
        let crl = read_cred(dir, CA_CRL, false)?;
        let (cert_path, cert_pem) = read_cred(dir, SERVER_CERT, true)?.unwrap_or_default();
        let (key_path, key_pem) = read_cred(dir, SERVER_KEY, true)?.unwrap_or_default();
        let dh = read_cred(dir, DH_PARAMS, false)?;

        let chain = certificates(&cert_pem).ok_or_else(|| {
            format!("Unable to import server certificate {cert_path}: Base64 unexpected header error.")
        })?;
        let ca_list = || format!("Unable to import CA certificate list {ca_path}");
        let ca = certificates(&ca_pem).ok_or_else(ca_list)?;
        let mut roots = RootCertStore::empty();
        for c in ca {
            roots.add(c).map_err(|_| ca_list())?;
        }
        let cert_and_key = |reason: &str| format!("Cannot load certificate '{cert_path}' & key '{key_path}': {reason}");
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|_| cert_and_key("The requested data were not available."))?;
        let crl_path = crl.as_ref().map(|(path, _)| path.clone());
        let crls = match crl {
            None => Vec::new(),
            Some((path, pem)) => {
                let crls: Result<Vec<_>, _> = CertificateRevocationListDer::pem_slice_iter(&pem).collect();
                crls.ok()
                    .filter(|c| !c.is_empty())
                    .ok_or_else(|| format!("Cannot load CRL '{path}': Base64 decoding error."))?
            }
        };
        if let Some((path, pem)) = dh {
            if !String::from_utf8_lossy(&pem).contains("-----BEGIN DH PARAMETERS-----") {
                return Err(format!("Unable to load DH parameters from {path}: Base64 unexpected header error."));
            }
        }

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("Cannot set up TLS: {e}"))?;
        let verifier = if verify_peer {
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).with_crls(crls).build().map_err(
                |e| match &crl_path {
                    // The roots were accepted one by one above: what fails
                    // here is a revocation list.
                    Some(path) => format!("Cannot load CRL '{path}': {e}"),
                    None => format!("Unable to load CA certificate {ca_path}: {e}"),
                },
            )?
        } else {
            WebPkiClientVerifier::no_client_auth()
        };
        let config = builder.with_client_cert_verifier(verifier).with_single_cert(chain, key).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => cert_and_key("The certificate and the given key do not match."),
            other => cert_and_key(&other.to_string()),
        })?;
        Ok(TlsServer { config: Arc::new(config) })
    }
}

/// The relay of one TLS connection (see the module doc).
pub struct Relay {
    thread: JoinHandle<()>,
    sender: Option<TlsSender>,
}

impl Relay {
    /// The sending side of the session, for a connection that encrypts
    /// its replies itself ([`TlsSender`]); once.
    pub fn take_sender(&mut self) -> Option<TlsSender> {
        self.sender.take()
    }

    /// Waits until the relay has sent everything and ended. The caller must
    /// have closed (or shut down) its end of the pair first.
    pub fn join(self) {
        let _ = self.thread.join();
    }
}

/// Runs the TLS handshake on `io` (the client socket, behind the caller's
/// deadline), then hands the socket `net` to a relay thread. Returns the
/// connection's end of the pair, over which the negotiation continues in
/// clear, and the relay.
pub fn start<S: Read + Write>(tls: &TlsServer, io: &mut S, net: Stream) -> io::Result<(UnixStream, Relay)> {
    let mut conn = ServerConnection::new(Arc::clone(&tls.config)).map_err(io::Error::other)?;
    while conn.is_handshaking() {
        conn.complete_io(io)?;
    }
    relay(Connection::Server(conn), net)
}

/// Hands `net` and its TLS session `conn` (past the handshake, either
/// side's) to a relay thread: the returned end of the pair carries the
/// session in clear. The NBD client runs over TLS the same way, so that
/// its reading and writing halves are plain sockets too.
pub(crate) fn relay(mut conn: Connection, net: Stream) -> io::Result<(UnixStream, Relay)> {
    conn.set_buffer_limit(Some(RELAY_LIMIT));
    let (inner, outer) = UnixStream::pair()?;
    use std::os::fd::AsFd;
    let _ = crate::sys::set_send_buffer(inner.as_fd(), PAIR_BUFFER);
    net.set_nonblocking(true)?;
    outer.set_nonblocking(true)?;
    let tls = Arc::new(Mutex::new(Shared { conn, writer_busy: false }));
    let sender = TlsSender { tls: Arc::clone(&tls), net: net.try_clone()? };
    let relay = Pump {
        net,
        tls,
        local: outer,
        // Allocated (and zeroed) once: the loops below fill them by
        // index, never by resizing, which zeroed a whole chunk per read.
        to_local: vec![0; RELAY_LIMIT + CHUNK],
        to_local_pos: 0,
        to_local_len: 0,
        to_net: vec![0; CHUNK],
        to_net_pos: 0,
        to_net_len: 0,
        peer_done: false,
        local_shut: false,
        local_eof: false,
    };
    let thread = std::thread::Builder::new().name("nbd-tls".into()).spawn(move || relay.run())?;
    Ok((inner, Relay { thread, sender: Some(sender) }))
}

struct Pump {
    net: Stream,
    /// Shared with the connection's writer ([`TlsSender`]).
    tls: Arc<Mutex<Shared>>,
    /// The relay's end of the pair.
    local: UnixStream,
    /// Decrypted bytes not yet taken by the connection:
    /// `to_local[to_local_pos..to_local_len]`.
    to_local: Vec<u8>,
    to_local_pos: usize,
    to_local_len: usize,
    /// Bytes from the connection not yet taken by rustls:
    /// `to_net[to_net_pos..to_net_len]`.
    to_net: Vec<u8>,
    to_net_pos: usize,
    to_net_len: usize,
    /// The client sent close_notify or closed its socket.
    peer_done: bool,
    /// The connection's end was told EOF.
    local_shut: bool,
    /// The connection closed its end: close_notify is queued.
    local_eof: bool,
}

/// The relay's writes to the peer, which never raise SIGPIPE: the NBD
/// client runs in commands that restore its default action, and a server
/// gone must end the relay, not the command.
struct NoSignal<'a>(&'a Stream);

impl Write for NoSignal<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        crate::sys::send_vectored(self.0.fd(), &[io::IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        crate::sys::send_vectored(self.0.fd(), bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The session, shared by the relay and the writer.
struct Shared {
    conn: Connection,
    /// The writer is sending: the records rustls holds are its to send,
    /// and the relay does not wake for the socket's room to send them.
    writer_busy: bool,
}

impl std::ops::Deref for Shared {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.conn
    }
}

impl std::ops::DerefMut for Shared {
    fn deref_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }
}

impl Shared {
    /// Records the relay itself must wait to send.
    fn relay_wants_write(&self) -> bool {
        !self.writer_busy && self.conn.wants_write()
    }
}

fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The sending side of a TLS session, for the connection's writer: its
/// replies are encrypted and sent to the peer by the writer itself rather
/// than through the pair and the relay, which cost two more copies of
/// every reply and a wake of the relay for each (most of the relay's time
/// serving reads). The relay still decrypts what the peer sends, and sends
/// what the session itself needs (alerts, close_notify); both take the
/// session's lock to encrypt and to hand records to the socket, so the
/// records leave in order.
pub struct TlsSender {
    tls: Arc<Mutex<Shared>>,
    /// The peer's socket (non-blocking: the relay's).
    net: Stream,
}

impl TlsSender {
    /// Encrypts and sends `parts`, in order, waiting (without the lock)
    /// while the socket is full.
    pub fn send_all(&self, parts: &[&[u8]]) -> io::Result<()> {
        lock(&self.tls).writer_busy = true;
        let sent = self.send(parts);
        lock(&self.tls).writer_busy = false;
        sent
    }

    /// Encrypts what of `bytes` rustls takes and sends the records the
    /// socket takes, without waiting: the bytes taken, and whether every
    /// record went out. A worker sends its reply so when the socket is
    /// idle, sparing the writer a wake; the writer sends the rest.
    pub fn try_send(&self, bytes: &[u8]) -> io::Result<(usize, bool)> {
        let mut tls = lock(&self.tls);
        let mut taken = 0;
        while taken < bytes.len() {
            let n = tls.writer().write(&bytes[taken..])?;
            if n == 0 {
                break;
            }
            taken += n;
        }
        while tls.wants_write() {
            match tls.write_tls(&mut NoSignal(&self.net)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok((taken, !tls.wants_write()))
    }

    fn send(&self, parts: &[&[u8]]) -> io::Result<()> {
        let mut parts = parts.iter().copied().filter(|p| !p.is_empty());
        let mut current = parts.next();
        loop {
            let blocked = {
                let mut tls = lock(&self.tls);
                // Plaintext in, as far as the session's limit lets.
                while let Some(p) = current {
                    let n = tls.writer().write(p)?;
                    if n == 0 {
                        break;
                    }
                    current = if n < p.len() { Some(&p[n..]) } else { parts.next() };
                }
                // Records out, as far as the socket takes them.
                loop {
                    if !tls.wants_write() {
                        break false;
                    }
                    match tls.write_tls(&mut NoSignal(&self.net)) {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break true,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
            };
            if blocked {
                let mut fds = [PollFd::from_borrowed_fd(self.net.fd(), PollFlags::OUT)];
                match poll(&mut fds, None) {
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(e.into()),
                }
            } else if current.is_none() {
                return Ok(());
            }
        }
    }
}

/// What one step of the relay did.
enum Step {
    Progress,
    Idle,
    /// The relay is over (finished or failed).
    Done,
}

impl Step {
    fn moved(progress: bool) -> Step {
        if progress {
            Step::Progress
        } else {
            Step::Idle
        }
    }
}

impl Pump {
    fn run(mut self) {
        loop {
            let mut progress = false;
            for step in [Pump::deliver, Pump::take, Pump::flush, Pump::receive] {
                match step(&mut self) {
                    Step::Progress => progress = true,
                    Step::Idle => {}
                    Step::Done => return self.finish(),
                }
            }
            if self.local_eof && self.to_net_pos == self.to_net_len && !lock(&self.tls).wants_write() {
                // Everything the connection wrote, and close_notify, are out.
                let _ = self.net.shutdown(std::net::Shutdown::Write);
                return;
            }
            if !progress && !self.wait() {
                return self.finish();
            }
        }
    }

    /// The relay failed: the client gets no more and the connection sees
    /// its end closed when `self.local` drops.
    fn finish(self) {
        let _ = self.net.shutdown(std::net::Shutdown::Both);
    }

    /// Decrypted bytes to the connection.
    fn deliver(&mut self) -> Step {
        let shared = Arc::clone(&self.tls);
        let mut tls = lock(&shared);
        let mut progress = false;
        // Take plaintext out of rustls while there is room.
        while !self.peer_done && self.to_local_len - self.to_local_pos < RELAY_LIMIT {
            if self.to_local_pos == self.to_local_len {
                self.to_local_pos = 0;
                self.to_local_len = 0;
            } else if self.to_local_pos >= RELAY_LIMIT || self.to_local.len() - self.to_local_len < CHUNK {
                // A reader that always lags a little must not let the
                // consumed prefix fill the buffer.
                self.to_local.copy_within(self.to_local_pos..self.to_local_len, 0);
                self.to_local_len -= self.to_local_pos;
                self.to_local_pos = 0;
            }
            let got = tls.reader().read(&mut self.to_local[self.to_local_len..]);
            match got {
                Ok(0) => self.peer_done = true,
                Ok(n) => {
                    self.to_local_len += n;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // EOF without close_notify: the client is gone all the same.
                Err(_) => self.peer_done = true,
            }
        }
        // Senders encrypt meanwhile.
        drop(tls);
        while self.to_local_pos < self.to_local_len {
            match (&self.local).write(&self.to_local[self.to_local_pos..self.to_local_len]) {
                Ok(n) => {
                    self.to_local_pos += n;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // The connection stopped reading for good: what the
                    // client sends now has no taker.
                    self.to_local_len = 0;
                    self.to_local_pos = 0;
                    self.peer_done = true;
                }
            }
        }
        if self.peer_done && self.to_local_pos == self.to_local_len && !self.local_shut {
            self.local_shut = true;
            let _ = self.local.shutdown(std::net::Shutdown::Write);
            progress = true;
        }
        Step::moved(progress)
    }

    /// Bytes from the connection into rustls, while it has room.
    fn take(&mut self) -> Step {
        let shared = Arc::clone(&self.tls);
        let mut tls = lock(&shared);
        let mut progress = false;
        loop {
            if self.to_net_pos < self.to_net_len {
                match tls.writer().write(&self.to_net[self.to_net_pos..self.to_net_len]) {
                    Ok(0) => break,
                    Ok(n) => {
                        self.to_net_pos += n;
                        progress = true;
                        continue;
                    }
                    Err(_) => return Step::Done,
                }
            }
            // Records pile up in rustls until its limit refuses more
            // (`Ok(0)` above), so that each send to the peer carries many
            // of them: one system call per 64 KiB cost a third of the
            // relay's time in wakeups and switches.
            if self.local_eof {
                break;
            }
            self.to_net_pos = 0;
            self.to_net_len = 0;
            let got = (&self.local).read(&mut self.to_net);
            match got {
                Ok(0) => {
                    self.local_eof = true;
                    tls.send_close_notify();
                    progress = true;
                }
                Ok(n) => {
                    self.to_net_len = n;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Step::Done,
            }
        }
        Step::moved(progress)
    }

    /// TLS records to the client.
    fn flush(&mut self) -> Step {
        let shared = Arc::clone(&self.tls);
        let mut tls = lock(&shared);
        let mut progress = false;
        while tls.wants_write() {
            match tls.write_tls(&mut NoSignal(&self.net)) {
                Ok(_) => progress = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Step::Done,
            }
        }
        Step::moved(progress)
    }

    /// TLS records from the client, when rustls wants them (it does not
    /// while decrypted bytes wait in it: backpressure).
    fn receive(&mut self) -> Step {
        let shared = Arc::clone(&self.tls);
        let mut tls = lock(&shared);
        if self.peer_done || !tls.wants_read() {
            return Step::Idle;
        }
        match tls.read_tls(&mut self.net) {
            Ok(0) => {
                // rustls now reports the EOF through its reader.
                let _ = tls.process_new_packets();
                Step::Progress
            }
            Ok(_) => match tls.process_new_packets() {
                Ok(_) => Step::Progress,
                Err(_) => {
                    // rustls queued an alert: send it if the socket takes it.
                    let _ = tls.write_tls(&mut NoSignal(&self.net));
                    Step::Done
                }
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::Idle,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Step::Progress,
            Err(_) => Step::Done,
        }
    }

    /// Waits until a side can move; false when nothing could ever move.
    fn wait(&self) -> bool {
        let shared = Arc::clone(&self.tls);
        let tls = lock(&shared);
        let mut net = PollFlags::empty();
        if !self.peer_done && tls.wants_read() {
            net |= PollFlags::IN;
        }
        if tls.relay_wants_write() {
            net |= PollFlags::OUT;
        }
        let mut local = PollFlags::empty();
        if !self.local_eof && self.to_net_pos == self.to_net_len && !tls.relay_wants_write() {
            local |= PollFlags::IN;
        }
        if self.to_local_pos < self.to_local_len {
            local |= PollFlags::OUT;
        }
        // The writer encrypts and sends meanwhile.
        drop(tls);
        if net.is_empty() && local.is_empty() {
            return false;
        }
        // A side with nothing to wait for stays out of the set: poll would
        // report its hang-up at once, again and again.
        let mut fds = Vec::with_capacity(2);
        if !net.is_empty() {
            fds.push(PollFd::from_borrowed_fd(self.net.fd(), net));
        }
        if !local.is_empty() {
            fds.push(PollFd::new(&self.local, local));
        }
        loop {
            match poll(&mut fds, None) {
                Ok(_) => return true,
                Err(rustix::io::Errno::INTR) => {}
                Err(_) => return false,
            }
        }
    }
}
