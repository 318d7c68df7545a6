//! Entry points for fuzzers: a byte string plays the client, against a
//! small qcow2 image in memory, with no threads and no sockets.
//!
//! [`drive_session`] runs the handshake and then the transmission phase on
//! the same input; [`drive_requests`] starts in transmission with the
//! negotiated state chosen by the first byte, so the fuzzer reaches the
//! request parser and every command without learning the handshake first.
//! [`drive_tls_session`] is [`drive_session`] on a server that requires
//! TLS. All return what the server sent. None may panic on any input.
//!
//! [`drive_client`] turns it around: the byte string plays a server to
//! oxqcow's NBD client (the one `nbd://` image names open), which lists
//! exports or negotiates one and then reads, asks block status and
//! writes. The client is built on a socket and its pipelined receiver
//! on blocking reads, so this driver does use a socket pair and threads.

use std::io::{self, Cursor, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use oxqcow::storage::Run;
use oxqcow::{CreateOptions, Image, MemoryStorage, Storage};

use crate::client::{ExportInfo, NbdClient};
use crate::conn::Stream;

use crate::export::{Export, ExportOptions};
use crate::handshake::{self, Contexts, Negotiated, Outcome};
use crate::proto;
use crate::session::{Op, Payload, Session};

/// Disk size of the fuzzing image.
pub const DISK_SIZE: u64 = 1 << 20;

struct Duplex<'a> {
    input: Cursor<&'a [u8]>,
    output: Vec<u8>,
}

impl Read for Duplex<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Duplex<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An export of a fresh in-memory qcow2 image (64 KiB clusters), named
/// `""` or `"disk"`.
pub fn memory_export(name: &str, read_only: bool, discard: bool) -> Export {
    let image = Image::create_storage(Arc::new(MemoryStorage::new()), &CreateOptions::qcow2(DISK_SIZE))
        .unwrap_or_else(|e| panic!("creating an in-memory image failed: {e}"));
    // The image is writable; a read-only export refuses writes itself.
    Export::new(
        Arc::new(image),
        ExportOptions {
            name: name.into(),
            read_only,
            discard,
            multi_conn: true,
            allocation_depth: true,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("a memory export is always valid: {e}"))
}

/// Handshake, then requests, all read from `data`.
pub fn drive_session(data: &[u8]) -> Vec<u8> {
    let export = Arc::new(memory_export("", false, true));
    let mut io = Duplex { input: Cursor::new(data), output: Vec::new() };
    if let Ok(Outcome::Transmission(neg)) = handshake::negotiate(&mut io, &export) {
        let session = Session::new(export, neg);
        transmission(&session, &mut io.input, &mut io.output);
    }
    io.output
}

/// [`drive_session`] on a server that requires TLS: options before
/// STARTTLS are refused; after it the rest of `data` plays the decrypted
/// stream (the TLS layer itself is rustls's, not fuzzed here), through
/// the negotiation inside TLS and the requests.
pub fn drive_tls_session(data: &[u8]) -> Vec<u8> {
    let export = Arc::new(memory_export("", false, true));
    let mut io = Duplex { input: Cursor::new(data), output: Vec::new() };
    let mut outcome = handshake::negotiate_with(&mut io, &export, true);
    if let Ok(Outcome::StartTls(resume)) = outcome {
        outcome = handshake::resume_in_tls(&mut io, &export, resume);
    }
    if let Ok(Outcome::Transmission(neg)) = outcome {
        let session = Session::new(export, neg);
        transmission(&session, &mut io.input, &mut io.output);
    }
    io.output
}

/// Requests only. The first byte chooses the negotiated state: bit 0
/// structured replies, bit 1 `base:allocation`, bit 2
/// `qemu:allocation-depth`, bit 3 a read-only export, bit 4 discard, bit 5 extended headers.
pub fn drive_requests(data: &[u8]) -> Vec<u8> {
    let Some((&cfg, rest)) = data.split_first() else { return Vec::new() };
    let structured = cfg & 1 != 0;
    let neg = Negotiated {
        structured,
        extended: structured && cfg & 32 != 0,
        contexts: Contexts {
            base_allocation: structured && cfg & 2 != 0,
            allocation_depth: structured && cfg & 4 != 0,
            // The memory export has no bitmap: the context is never offered.
            dirty_bitmap: false,
        },
    };
    let export = Arc::new(memory_export("", cfg & 8 != 0, cfg & 16 != 0));
    let session = Session::new(export, neg);
    let mut input = Cursor::new(rest);
    let mut out = Vec::new();
    transmission(&session, &mut input, &mut out);
    out
}

/// The transmission loop of [`crate::conn`], run inline.
fn transmission(session: &Session, input: &mut Cursor<&[u8]>, out: &mut Vec<u8>) {
    loop {
        let mut hdr = [0u8; proto::EXTENDED_REQUEST_HEADER_LEN];
        let hdr = &mut hdr[..session.header_len()];
        if input.read_exact(hdr).is_err() {
            return;
        }
        let Ok(h) = session.parse_header(hdr) else { return };
        let mut payload = Vec::new();
        match session.payload(&h) {
            Payload::None => {}
            Payload::Hangup => return,
            Payload::Read(n) | Payload::Discard(n) => {
                // The input bounds how much is read, whatever the header says.
                match input.by_ref().take(u64::from(n)).read_to_end(&mut payload) {
                    Ok(k) if k == n as usize => {}
                    _ => return,
                }
                if matches!(session.payload(&h), Payload::Discard(_)) {
                    payload.clear();
                }
            }
        }
        match session.check(&h) {
            Ok(Op::Disconnect) => return,
            Ok(op) => out.extend(session.execute(&h, op, &payload)),
            Err(r) => out.extend(session.refusal_reply(&h, &r)),
        }
    }
}

/// What oxqcow's NBD client made of a server's byte string
/// ([`drive_client`]); each field `None` when its step failed or did not run.
#[derive(Debug, Default)]
pub struct ClientRun {
    /// Everything the client sent.
    pub sent: Vec<u8>,
    /// The exports listed (in listing mode).
    pub listed: Option<Vec<ExportInfo>>,
    /// The export's size, once negotiated.
    pub size: Option<u64>,
    /// Block status of the first MiB.
    pub status: Option<Vec<Run>>,
    /// The first 16 KiB, read.
    pub read: Option<Vec<u8>>,
    /// Whether the writes (512 bytes at 0, zeros at 4096, flush) succeeded.
    pub wrote: Option<()>,
}

/// `data`'s first byte chooses what the client does: bit 0 lists the
/// exports (`qemu-nbd --list`) instead of opening one, bit 1 opens with
/// `x-dirty-bitmap=qemu:allocation-depth` (QEMU's way to read the depth
/// context). The rest is what the server sends, from its greeting on;
/// after it the server's side of the socket closes.
pub fn drive_client(data: &[u8]) -> ClientRun {
    let Some((&cfg, server_bytes)) = data.split_first() else { return ClientRun::default() };
    let Ok((client_end, server_end)) = UnixStream::pair() else { return ClientRun::default() };
    let (Ok(feeding), Ok(draining)) = (server_end.try_clone(), server_end.try_clone()) else {
        return ClientRun::default();
    };
    let server_bytes = server_bytes.to_vec();
    // Feeding and draining run apart: the client may send much before it
    // reads (a write's payload) while the server's bytes fill the socket.
    let feeder = std::thread::spawn(move || {
        let mut s = feeding;
        let _ = s.write_all(&server_bytes);
        let _ = s.shutdown(Shutdown::Write);
    });
    let drainer = std::thread::spawn(move || {
        let mut sent = Vec::new();
        let _ = (&draining).read_to_end(&mut sent);
        sent
    });
    let mut run = ClientRun::default();
    if cfg & 1 != 0 {
        run.listed = crate::client::list_over_stream(Stream::Unix(client_end)).ok();
    } else {
        let context = (cfg & 2 != 0).then_some("qemu:allocation-depth");
        if let Ok(client) = NbdClient::over_stream(Stream::Unix(client_end), "", context) {
            use_export(&client, &mut run);
        }
    }
    // The client's socket is closed: the drainer sees the end.
    let _ = feeder.join();
    run.sent = drainer.join().unwrap_or_default();
    drop(server_end);
    run
}

/// The requests a convert or a qemu-io session sends, in a fixed order so
/// that a seed can answer them by cookie.
fn use_export(client: &NbdClient, run: &mut ClientRun) {
    let Ok(size) = client.len() else { return };
    run.size = Some(size);
    run.status = client.allocation(0, size.min(1 << 20)).ok();
    let mut buf = vec![0u8; size.min(16 << 10) as usize];
    run.read = client.read_at(&mut buf, 0).ok().map(|()| buf);
    if !client.is_read_only() && size >= 8192 {
        let wrote = client.write_at(&[0xab; 512], 0).and_then(|()| client.write_zeroes(4096, 4096));
        run.wrote = wrote.and_then(|()| client.sync()).ok();
    }
}
