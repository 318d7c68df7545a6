//! What a server exports, asked as `qemu-nbd --list` asks it: the framing
//! QEMU 10 negotiates (extended headers, else structured replies), then
//! NBD_OPT_LIST, and for each export NBD_OPT_INFO (size, flags, block
//! sizes) and NBD_OPT_LIST_META_CONTEXT (every context, no query); the
//! session ends with NBD_OPT_ABORT, never in transmission.

use std::io;

use super::{greeted, option_error, protocol_error, read_option_reply, send_option, simple_option};
use super::{NbdServer, Socket, TlsClient};
use crate::proto::{info, opt, rep};

/// The most a listing may hold, in bytes of reply data (names,
/// descriptions, context names) plus [`REPLY_COST`] for each reply kept: a
/// server that never ends its list must not fill the client's memory. A
/// thousand exports with long names and a few contexts each take a few MiB.
const MAX_LIST_BYTES: usize = 64 << 20;
/// What one kept reply costs the listing's budget beyond its data (the
/// `ExportInfo` or `String` that holds it).
const REPLY_COST: usize = 128;

/// What is left of a listing's [`MAX_LIST_BYTES`].
struct Budget(usize);

impl Budget {
    fn take(&mut self, data: &[u8]) -> io::Result<()> {
        self.0 = self
            .0
            .checked_sub(data.len() + REPLY_COST)
            .ok_or_else(|| protocol_error(format!("the server's export list exceeds {} MiB", MAX_LIST_BYTES >> 20)))?;
        Ok(())
    }
}

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
    let mut budget = Budget(MAX_LIST_BYTES);
    let mut exports = Vec::new();
    loop {
        let (kind, d) = read_option_reply(s, opt::LIST)?;
        match kind {
            rep::SERVER => {
                budget.take(&d)?;
                exports.push(server_entry(&d)?);
            }
            rep::ACK => break,
            k if k & (1 << 31) != 0 => return Err(option_error(k, &d, opt::LIST, "")),
            _ => {}
        }
    }
    for e in &mut exports {
        e.extended = extended;
        describe(s, e)?;
        if structured {
            e.contexts = contexts(s, &e.name, &mut budget)?;
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
fn contexts(s: &mut Socket, export: &str, budget: &mut Budget) -> io::Result<Vec<String>> {
    let mut data = (export.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&0u32.to_be_bytes());
    send_option(s, opt::LIST_META_CONTEXT, &data)?;
    let mut names = Vec::new();
    loop {
        let (kind, d) = read_option_reply(s, opt::LIST_META_CONTEXT)?;
        match kind {
            rep::META_CONTEXT if d.len() >= 4 => {
                budget.take(&d)?;
                names.push(String::from_utf8_lossy(&d[4..]).into_owned());
            }
            rep::ACK => return Ok(names),
            k if k & (1 << 31) != 0 => return Ok(Vec::new()),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing::drive_client;
    use crate::proto::{IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC};

    fn reply(out: &mut Vec<u8>, option: u32, kind: u32, data: &[u8]) {
        out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
    }

    /// A listing of `exports` entries with names of `name_len` bytes.
    fn listing(exports: usize, name_len: usize) -> Vec<u8> {
        let mut out = vec![1u8]; // the driver lists
        out.extend_from_slice(&NBDMAGIC.to_be_bytes());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&3u16.to_be_bytes());
        reply(&mut out, opt::EXTENDED_HEADERS, rep::ACK, &[]);
        let mut entry = (name_len as u32).to_be_bytes().to_vec();
        entry.resize(4 + name_len, b'n');
        for _ in 0..exports {
            reply(&mut out, opt::LIST, rep::SERVER, &entry);
        }
        reply(&mut out, opt::LIST, rep::ACK, &[]);
        out
    }

    /// Whether the client read the list to its end: only after the list's
    /// ACK does it send NBD_OPT_INFO for the first export. (Those answers
    /// never come here: the stream ends, and the listing fails then.)
    fn read_to_the_end(exports: usize, name_len: usize) -> bool {
        let run = drive_client(&listing(exports, name_len));
        assert!(run.listed.is_none());
        let info = [IHAVEOPT.to_be_bytes().as_slice(), &opt::INFO.to_be_bytes()].concat();
        run.sent.windows(info.len()).any(|w| w == info)
    }

    #[test]
    fn an_endless_export_list_is_refused_before_it_fills_memory() {
        // Just over the budget: 70 MiB of names in 1 MiB replies.
        assert!(!read_to_the_end(70, (1 << 20) - 4), "a 70 MiB list was accepted");
        // Tiny entries count too: 600000 of them are refused as well.
        assert!(!read_to_the_end(600_000, 0), "600000 entries were accepted");
    }

    #[test]
    fn a_large_but_plausible_list_is_read_whole() {
        // 10000 exports with 100-byte names: ~2.3 MiB of the budget.
        assert!(read_to_the_end(10_000, 100), "the list was not read to its end");
    }
}
