//! What a server exports, asked as `qemu-nbd --list` asks it: the framing
//! QEMU 10 negotiates (extended headers, else structured replies), then
//! NBD_OPT_LIST, and for each export NBD_OPT_INFO (size, flags, block
//! sizes) and NBD_OPT_LIST_META_CONTEXT (every context, no query); the
//! session ends with NBD_OPT_ABORT, never in transmission.

use std::io;

use super::{greeted, option_error, protocol_error, read_option_reply, send_option, simple_option};
use super::{NbdServer, Socket, TlsClient};
use crate::proto::{info, opt, rep};

/// One export as the server describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportInfo {
    /// Its name.
    pub name: String,
    /// Its description (from the list; may be empty).
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (0 when the server sent none).
    pub flags: u16,
    /// Minimum, preferred and maximum block sizes, when the server gave them.
    pub block_sizes: Option<(u32, u32, u32)>,
    /// Whether extended headers (64-bit transactions) were negotiated.
    pub extended: bool,
    /// The metadata contexts it offers, in the server's order.
    pub contexts: Vec<String>,
}

/// Lists the exports of `server`, over TLS with `tls` (the server's
/// certificate checked for `hostname`).
pub fn list_exports(
    server: &NbdServer,
    tls: Option<&TlsClient>,
    hostname: Option<&str>,
) -> io::Result<Vec<ExportInfo>> {
    let mut s = greeted(server, tls, hostname)?;
    let listed = list_on(&mut s);
    // Leave politely, as QEMU does; the reply does not matter.
    let _ = send_option(&mut s, opt::ABORT, &[]);
    listed
}

/// [`list_exports`] on a stream the caller connected: for the fuzz driver,
/// which plays the server.
pub(crate) fn list_over_stream(stream: crate::conn::Stream) -> io::Result<Vec<ExportInfo>> {
    let mut s = Socket::plain(stream);
    super::greet(&mut s)?;
    let listed = list_on(&mut s);
    let _ = send_option(&mut s, opt::ABORT, &[]);
    listed
}

fn list_on(s: &mut Socket) -> io::Result<Vec<ExportInfo>> {
    let extended = simple_option(s, opt::EXTENDED_HEADERS)?;
    let structured = extended || simple_option(s, opt::STRUCTURED_REPLY)?;
    send_option(s, opt::LIST, &[])?;
    let mut exports = Vec::new();
    loop {
        let (kind, d) = read_option_reply(s, opt::LIST)?;
        match kind {
            rep::SERVER => exports.push(server_entry(&d)?),
            rep::ACK => break,
            k if k & (1 << 31) != 0 => return Err(option_error(k, &d, opt::LIST, "")),
            _ => {}
        }
    }
    for e in &mut exports {
        e.extended = extended;
        describe(s, e)?;
        if structured {
            e.contexts = contexts(s, &e.name)?;
        }
    }
    Ok(exports)
}

/// An NBD_REP_SERVER payload: the name's length, the name, the description.
fn server_entry(d: &[u8]) -> io::Result<ExportInfo> {
    let bad = || protocol_error("bad export list entry");
    let len = d.get(..4).ok_or_else(bad)?;
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    let name = d.get(4..4 + len).ok_or_else(bad)?;
    Ok(ExportInfo {
        name: String::from_utf8_lossy(name).into_owned(),
        description: String::from_utf8_lossy(&d[4 + len..]).into_owned(),
        ..Default::default()
    })
}

/// NBD_OPT_INFO for `e`, asking for its block sizes.
fn describe(s: &mut Socket, e: &mut ExportInfo) -> io::Result<()> {
    let mut data = (e.name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(e.name.as_bytes());
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    send_option(s, opt::INFO, &data)?;
    loop {
        let (kind, d) = read_option_reply(s, opt::INFO)?;
        match kind {
            rep::INFO if d.len() >= 2 => {
                let be32 = |at: usize| u32::from_be_bytes([d[at], d[at + 1], d[at + 2], d[at + 3]]);
                match u16::from_be_bytes([d[0], d[1]]) {
                    info::EXPORT if d.len() == 12 => {
                        e.size = (u64::from(be32(2)) << 32) | u64::from(be32(6));
                        e.flags = u16::from_be_bytes([d[10], d[11]]);
                    }
                    info::BLOCK_SIZE if d.len() == 14 => e.block_sizes = Some((be32(2), be32(6), be32(10))),
                    _ => {}
                }
            }
            rep::ACK => return Ok(()),
            k if k & (1 << 31) != 0 => return Err(option_error(k, &d, opt::INFO, &e.name)),
            _ => {}
        }
    }
}

/// NBD_OPT_LIST_META_CONTEXT without a query: every context of `export`.
/// A refusal lists none.
fn contexts(s: &mut Socket, export: &str) -> io::Result<Vec<String>> {
    let mut data = (export.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&0u32.to_be_bytes());
    send_option(s, opt::LIST_META_CONTEXT, &data)?;
    let mut names = Vec::new();
    loop {
        let (kind, d) = read_option_reply(s, opt::LIST_META_CONTEXT)?;
        match kind {
            rep::META_CONTEXT if d.len() >= 4 => names.push(String::from_utf8_lossy(&d[4..]).into_owned()),
            rep::ACK => return Ok(names),
            k if k & (1 << 31) != 0 => return Ok(Vec::new()),
            _ => {}
        }
    }
}
