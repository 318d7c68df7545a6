//! The fixed newstyle handshake: greeting, client flags, then options until
//! the client picks the export (GO or EXPORT_NAME) or leaves.
//!
//! Generic over any `Read + Write`, so tests and the fuzzer drive it over
//! in-memory streams. Options the server does not know, or knows but finds
//! malformed, are answered with an error reply and the negotiation goes on;
//! only what the protocol cannot answer (a bad magic, unknown client flags,
//! a bad EXPORT_NAME) or an option flood ends the session.

use std::io::{self, Read, Write};

use crate::export::{Export, MAX_BLOCK, MIN_BLOCK, PREFERRED_BLOCK};
use crate::proto::{self, client_flags, info, opt, rep, ClientOption, MetaQuery, OptionHeader};

/// Option data larger than this is read and thrown away, and the option is
/// refused with `NBD_REP_ERR_TOO_BIG`: the largest legitimate option, a
/// meta context query list, is far smaller (qemu's bound is 32 MiB, but it
/// keeps the data; here no buffer grows past this).
pub const MAX_OPTION_DATA: u32 = 64 << 10;

/// Options one connection may send before the server gives up on it: real
/// clients send fewer than ten. A flood past this ends the session (the
/// protocol allows a hard disconnect for a client that is a denial of
/// service).
pub const MAX_OPTIONS: usize = 1024;

/// Metadata context ids, as qemu-nbd numbers them.
pub const CONTEXT_BASE_ALLOCATION: u32 = 0;
/// See [`CONTEXT_BASE_ALLOCATION`].
pub const CONTEXT_ALLOCATION_DEPTH: u32 = 1;
/// The exported dirty bitmap (`qemu:dirty-bitmap:NAME`, qemu-nbd's `-B`).
pub const CONTEXT_DIRTY_BITMAP: u32 = 2;
const BASE_ALLOCATION: &str = "base:allocation";
const ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
/// The namespace prefix of dirty bitmap contexts.
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// The selected metadata contexts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Contexts {
    /// `base:allocation`.
    pub base_allocation: bool,
    /// `qemu:allocation-depth`.
    pub allocation_depth: bool,
    /// `qemu:dirty-bitmap:NAME` of the export's bitmap.
    pub dirty_bitmap: bool,
}

impl Contexts {
    /// Whether any context is selected.
    pub fn any(&self) -> bool {
        self.base_allocation || self.allocation_depth || self.dirty_bitmap
    }

    /// The selected contexts with their ids and names (`bitmap`: the
    /// export's bitmap).
    pub fn list(&self, bitmap: Option<&str>) -> Vec<(u32, String)> {
        let mut v = Vec::new();
        if self.base_allocation {
            v.push((CONTEXT_BASE_ALLOCATION, BASE_ALLOCATION.to_string()));
        }
        if self.allocation_depth {
            v.push((CONTEXT_ALLOCATION_DEPTH, ALLOCATION_DEPTH.to_string()));
        }
        if let Some(name) = bitmap.filter(|_| self.dirty_bitmap) {
            v.push((CONTEXT_DIRTY_BITMAP, format!("{DIRTY_BITMAP_PREFIX}{name}")));
        }
        v
    }

    /// The contexts `queries` name. For LIST a bare namespace (`base:`,
    /// `qemu:`) names every context in it and no query means all; for SET
    /// only full names select, as qemu-nbd does. `depth`: whether the
    /// export offers `qemu:allocation-depth` at all.
    fn matching(queries: &[String], listing: bool, bitmap: Option<&str>, depth: bool) -> Contexts {
        let has_bitmap = bitmap.is_some();
        if queries.is_empty() {
            return Contexts {
                base_allocation: listing,
                allocation_depth: listing && depth,
                dirty_bitmap: listing && has_bitmap,
            };
        }
        let mut c = Contexts::default();
        for q in queries {
            match q.as_str() {
                BASE_ALLOCATION => c.base_allocation = true,
                ALLOCATION_DEPTH => c.allocation_depth = depth,
                "base:" if listing => c.base_allocation = true,
                "qemu:" if listing => {
                    c.allocation_depth |= depth;
                    c.dirty_bitmap |= has_bitmap;
                }
                DIRTY_BITMAP_PREFIX if listing => c.dirty_bitmap |= has_bitmap,
                other => {
                    if let Some(name) = other.strip_prefix(DIRTY_BITMAP_PREFIX) {
                        c.dirty_bitmap |= bitmap == Some(name);
                    }
                }
            }
        }
        c
    }
}

/// What the negotiation settled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Negotiated {
    /// Structured replies are on.
    pub structured: bool,
    /// Extended headers are on (64-bit requests and replies; implies
    /// structured replies).
    pub extended: bool,
    /// The metadata contexts BLOCK_STATUS reports.
    pub contexts: Contexts,
}

/// How a negotiation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The client chose the export: transmission follows.
    Transmission(Negotiated),
    /// The client ended the session (NBD_OPT_ABORT).
    Aborted,
    /// NBD_OPT_STARTTLS was acknowledged: the caller runs the TLS handshake
    /// on the socket, then continues with [`resume_in_tls`] over the
    /// decrypted stream.
    StartTls(Resume),
}

/// A negotiation interrupted by NBD_OPT_STARTTLS: what it settled before.
/// Nothing the client chose in clear text survives but its flags (the
/// protocol lets only STARTTLS and ABORT through before TLS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resume {
    no_zeroes: bool,
    /// Options received so far (they count against [`MAX_OPTIONS`]).
    options: usize,
}

/// Where the negotiation stands with respect to TLS; it decides the
/// answers to STARTTLS and whether other options are served (qemu-nbd's
/// rules, `nbd_negotiate_options`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tls {
    /// No credentials: STARTTLS is refused with NBD_REP_ERR_POLICY.
    Off,
    /// Credentials, TLS not started: every option but STARTTLS is refused
    /// with NBD_REP_ERR_TLS_REQD (EXPORT_NAME, which cannot be refused,
    /// ends the session).
    Required,
    /// Inside TLS: a second STARTTLS is NBD_REP_ERR_INVALID.
    Active,
}

fn violation(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Runs the server side of the handshake for `export` over `s`, for a
/// server without TLS. `Err` means the session must end (I/O failure or a
/// protocol violation).
pub fn negotiate<S: Read + Write>(s: &mut S, export: &Export) -> io::Result<Outcome> {
    negotiate_with(s, export, false)
}

/// [`negotiate`], for a server that requires TLS when `tls` is set: then
/// the negotiation ends in [`Outcome::StartTls`] (or a refusal), never in
/// transmission.
pub fn negotiate_with<S: Read + Write>(s: &mut S, export: &Export, tls: bool) -> io::Result<Outcome> {
    s.write_all(&proto::greeting())?;
    s.flush()?;
    let mut w = [0u8; 4];
    s.read_exact(&mut w)?;
    let cflags = u32::from_be_bytes(w);
    if cflags & !client_flags::KNOWN != 0 {
        return Err(violation(format!("unknown client flags {cflags:#x}")));
    }
    let resume = Resume { no_zeroes: cflags & client_flags::NO_ZEROES != 0, options: 0 };
    options(s, export, if tls { Tls::Required } else { Tls::Off }, resume)
}

/// Continues a negotiation after STARTTLS, over the decrypted stream `s`.
pub fn resume_in_tls<S: Read + Write>(s: &mut S, export: &Export, resume: Resume) -> io::Result<Outcome> {
    options(s, export, Tls::Active, resume)
}

/// The answer to an option before TLS started on a server that requires it
/// (`h`: the option, whose data has not been read): `Some` ends the
/// option loop.
fn before_tls<S: Read + Write>(s: &mut S, h: &OptionHeader, resume: Resume) -> io::Result<Option<Outcome>> {
    let mut out = Vec::new();
    match h.option {
        // No way to refuse it: the connection is dropped.
        opt::EXPORT_NAME => {
            return Err(violation(format!("Option {:#x} not permitted before TLS", h.option)));
        }
        opt::STARTTLS if h.length != 0 => {
            // A client that cannot start TLS properly is dropped.
            let msg = "option 'starttls' has unexpected length".to_string();
            proto::option_reply(&mut out, h.option, rep::ERR_INVALID, msg.as_bytes());
            let _ = send(s, &out);
            return Err(violation(msg));
        }
        opt::STARTTLS => {
            proto::option_reply(&mut out, h.option, rep::ACK, &[]);
            send(s, &out)?;
            return Ok(Some(Outcome::StartTls(resume)));
        }
        _ => {}
    }
    io::copy(&mut Read::by_ref(s).take(u64::from(h.length)), &mut io::sink())?;
    let msg = format!("Option {:#x} not permitted before TLS", h.option);
    proto::option_reply(&mut out, h.option, rep::ERR_TLS_REQD, msg.as_bytes());
    if h.option == opt::ABORT {
        // The client may hang up without reading the refusal.
        let _ = send(s, &out);
        return Ok(Some(Outcome::Aborted));
    }
    send(s, &out)?;
    Ok(None)
}

fn options<S: Read + Write>(s: &mut S, export: &Export, tls: Tls, mut resume: Resume) -> io::Result<Outcome> {
    let no_zeroes = resume.no_zeroes;
    let mut state = Negotiated::default();
    // The export name the selected contexts were set for.
    let mut contexts_for: Option<String> = None;
    while resume.options < MAX_OPTIONS {
        resume.options += 1;
        let mut hdr = [0u8; proto::OPTION_HEADER_LEN];
        s.read_exact(&mut hdr)?;
        let h = OptionHeader::parse(&hdr).map_err(|e| violation(format!("option: {e}")))?;
        if tls == Tls::Required {
            match before_tls(s, &h, resume)? {
                Some(outcome) => return Ok(outcome),
                None => continue,
            }
        }
        let mut out = Vec::new();
        if h.length > MAX_OPTION_DATA {
            if h.option == opt::EXPORT_NAME {
                return Err(violation(format!("export name of {} bytes", h.length)));
            }
            io::copy(&mut Read::by_ref(s).take(u64::from(h.length)), &mut io::sink())?;
            let msg = format!("option data of {} bytes exceeds the limit of {MAX_OPTION_DATA}", h.length);
            proto::option_reply(&mut out, h.option, rep::ERR_TOO_BIG, msg.as_bytes());
            send(s, &out)?;
            continue;
        }
        let mut data = vec![0u8; h.length as usize];
        s.read_exact(&mut data)?;
        let parsed = match ClientOption::parse(h.option, &data) {
            Ok(o) => o,
            Err(e) if h.option == opt::EXPORT_NAME => return Err(violation(e.0)),
            Err(e) => {
                proto::option_reply(&mut out, h.option, rep::ERR_INVALID, e.0.as_bytes());
                send(s, &out)?;
                continue;
            }
        };
        match parsed {
            ClientOption::ExportName(name) => {
                if name != export.name() {
                    return Err(violation(format!("no export named '{name}'")));
                }
                if contexts_for.as_deref() != Some(name.as_str()) {
                    state.contexts = Contexts::default();
                }
                out.extend_from_slice(&export.size().to_be_bytes());
                out.extend_from_slice(&export.transmission_flags(state.structured, state.extended).to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                send(s, &out)?;
                return Ok(Outcome::Transmission(state));
            }
            ClientOption::Abort => {
                proto::option_reply(&mut out, h.option, rep::ACK, &[]);
                // The client may close without reading the reply.
                let _ = send(s, &out);
                return Ok(Outcome::Aborted);
            }
            ClientOption::List => {
                let mut server = (export.name().len() as u32).to_be_bytes().to_vec();
                server.extend_from_slice(export.name().as_bytes());
                server.extend_from_slice(export.description().as_bytes());
                proto::option_reply(&mut out, h.option, rep::SERVER, &server);
                proto::option_reply(&mut out, h.option, rep::ACK, &[]);
            }
            ClientOption::StartTls if tls == Tls::Active => {
                proto::option_reply(&mut out, h.option, rep::ERR_INVALID, b"TLS already enabled");
            }
            ClientOption::StartTls => {
                proto::option_reply(&mut out, h.option, rep::ERR_POLICY, b"TLS not configured");
            }
            ClientOption::Info(req) | ClientOption::Go(req) => {
                if req.name != export.name() {
                    let msg = format!("export '{}' not present", req.name);
                    proto::option_reply(&mut out, h.option, rep::ERR_UNKNOWN, msg.as_bytes());
                    send(s, &out)?;
                    continue;
                }
                let flags = export.transmission_flags(state.structured, state.extended);
                for kind in dedup(&req.requests) {
                    let payload = match kind {
                        info::NAME => proto::info_string(info::NAME, export.name()),
                        info::DESCRIPTION if !export.description().is_empty() => {
                            proto::info_string(info::DESCRIPTION, export.description())
                        }
                        info::BLOCK_SIZE => proto::info_block_size(MIN_BLOCK, PREFERRED_BLOCK, MAX_BLOCK),
                        _ => continue,
                    };
                    proto::option_reply(&mut out, h.option, rep::INFO, &payload);
                }
                proto::option_reply(&mut out, h.option, rep::INFO, &proto::info_export(export.size(), flags));
                proto::option_reply(&mut out, h.option, rep::ACK, &[]);
                send(s, &out)?;
                if h.option == opt::GO {
                    if contexts_for.as_deref() != Some(req.name.as_str()) {
                        state.contexts = Contexts::default();
                    }
                    return Ok(Outcome::Transmission(state));
                }
                continue;
            }
            ClientOption::StructuredReply => {
                if state.extended {
                    proto::option_reply(
                        &mut out,
                        h.option,
                        rep::ERR_EXT_HEADER_REQD,
                        b"extended headers already negotiated",
                    );
                } else if state.structured {
                    proto::option_reply(&mut out, h.option, rep::ERR_INVALID, b"structured replies already on");
                } else {
                    state.structured = true;
                    proto::option_reply(&mut out, h.option, rep::ACK, &[]);
                }
            }
            ClientOption::ListMetaContext(q) | ClientOption::SetMetaContext(q) => {
                let set = h.option == opt::SET_META_CONTEXT;
                if let Some((code, msg)) = meta_refusal(&q, export, state.structured) {
                    proto::option_reply(&mut out, h.option, code, msg.as_bytes());
                    if set {
                        // A failed SET leaves no context selected.
                        state.contexts = Contexts::default();
                        contexts_for = None;
                    }
                } else {
                    let found = Contexts::matching(&q.queries, !set, export.bitmap(), export.allocation_depth());
                    for (id, name) in found.list(export.bitmap()) {
                        let mut d = id.to_be_bytes().to_vec();
                        d.extend_from_slice(name.as_bytes());
                        proto::option_reply(&mut out, h.option, rep::META_CONTEXT, &d);
                    }
                    proto::option_reply(&mut out, h.option, rep::ACK, &[]);
                    if set {
                        state.contexts = found;
                        contexts_for = Some(q.export);
                    }
                }
            }
            ClientOption::ExtendedHeaders => {
                if state.extended {
                    proto::option_reply(&mut out, h.option, rep::ERR_INVALID, b"extended headers already negotiated");
                } else {
                    // Contexts chosen under the old framing are dropped: the
                    // protocol lets a server forget them when the framing
                    // changes, and the client sets them again.
                    state.extended = true;
                    state.structured = true;
                    state.contexts = Contexts::default();
                    contexts_for = None;
                    proto::option_reply(&mut out, h.option, rep::ACK, &[]);
                }
            }
            ClientOption::Unknown(code) => {
                let msg = format!("option {code} is not supported");
                proto::option_reply(&mut out, h.option, rep::ERR_UNSUP, msg.as_bytes());
            }
        }
        send(s, &out)?;
    }
    Err(violation(format!("more than {MAX_OPTIONS} options")))
}

fn meta_refusal(q: &MetaQuery, export: &Export, structured: bool) -> Option<(u32, String)> {
    if !structured {
        return Some((rep::ERR_INVALID, "structured replies are not negotiated".into()));
    }
    if q.export != export.name() {
        return Some((rep::ERR_UNKNOWN, format!("export '{}' not present", q.export)));
    }
    None
}

/// The known information types asked for, each once, in order of first
/// request (a hostile list of 32768 entries costs one pass).
fn dedup(requests: &[u16]) -> Vec<u16> {
    let mut seen = 0u16;
    let mut out = Vec::new();
    for &r in requests {
        if r <= info::BLOCK_SIZE && seen & (1 << r) == 0 {
            seen |= 1 << r;
            out.push(r);
        }
    }
    out
}

fn send<S: Write>(s: &mut S, bytes: &[u8]) -> io::Result<()> {
    s.write_all(bytes)?;
    s.flush()
}
