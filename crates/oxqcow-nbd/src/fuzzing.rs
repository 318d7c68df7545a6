//! Entry points for fuzzers: a byte string plays the client, against a
//! small qcow2 image in memory, with no threads and no sockets.
//!
//! [`drive_session`] runs the handshake and then the transmission phase on
//! the same input; [`drive_requests`] starts in transmission with the
//! negotiated state chosen by the first byte, so the fuzzer reaches the
//! request parser and every command without learning the handshake first.
//! [`drive_tls_session`] is [`drive_session`] on a server that requires
//! TLS. All return what the server sent. None may panic on any input.

use std::io::{self, Cursor, Read, Write};
use std::sync::Arc;

use oxqcow::{CreateOptions, Image, MemoryStorage};

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
