//! The NBD client pipelines: requests from several threads are in flight
//! on one connection at once, and each reply reaches its caller whatever
//! the order the server answers in, with chunks of different replies
//! interleaved. A connection that breaks with requests in flight fails
//! every one of them with EIO, without a hang.
//!
//! The server here is a scripted one in the test, so that the order of
//! replies and the moment of the break are the test's to choose. It waits
//! for all the requests before answering any: the client that sent one
//! request at a time and waited for its reply (before pipelining) never
//! sent the second, and the server gave up on it after a long timeout,
//! failing every read.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use oxqcow::Storage;
use oxqcow_nbd::client::{NbdAddress, NbdClient};
use oxqcow_nbd::proto::{
    cmd, opt, rep, reply, EXTENDED_REPLY_MAGIC, IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};

const SIZE: u64 = 1 << 30;
/// Requests in flight at once: one per client thread.
const THREADS: usize = 4;
const READ_LEN: usize = 64 << 10;

/// What the scripted server does once it holds every request.
#[derive(Clone, Copy, PartialEq)]
enum Script {
    /// Answers in reverse order, each read in two chunks, the first
    /// chunks of all replies before the second ones.
    Reverse,
    /// Closes the connection.
    Hangup,
    /// Answers one block status request with as many extents as qemu-nbd
    /// sends at most (131072), 512 bytes each, data and holes in turn.
    ManyExtents,
}

/// qemu-nbd's most extents in one block status chunk.
const QEMU_MAX_EXTENTS: usize = 1 << 17;

/// The byte every export offset reads as.
fn byte_at(offset: u64) -> u8 {
    (offset % 251) as u8
}

fn be32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn option_reply(s: &mut UnixStream, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut out = Vec::new();
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    s.write_all(&out)
}

/// The negotiation, ending in NBD_OPT_GO: extended headers granted when
/// `extended`, structured replies and `base:allocation` (id 7) always.
fn negotiate(s: &mut UnixStream, extended: bool) -> io::Result<()> {
    let mut hello = Vec::new();
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&3u16.to_be_bytes());
    s.write_all(&hello)?;
    be32(s)?;
    loop {
        let mut head = [0u8; 16];
        s.read_exact(&mut head)?;
        let option = u32::from_be_bytes(head[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(head[12..16].try_into().unwrap());
        io::copy(&mut s.take(u64::from(len)), &mut io::sink())?;
        match option {
            opt::EXTENDED_HEADERS if extended => option_reply(s, option, rep::ACK, &[])?,
            opt::STRUCTURED_REPLY => option_reply(s, option, rep::ACK, &[])?,
            opt::SET_META_CONTEXT => {
                let mut d = 7u32.to_be_bytes().to_vec();
                d.extend_from_slice(b"base:allocation");
                option_reply(s, option, rep::META_CONTEXT, &d)?;
                option_reply(s, option, rep::ACK, &[])?;
            }
            opt::GO => {
                let mut d = 0u16.to_be_bytes().to_vec();
                d.extend_from_slice(&SIZE.to_be_bytes());
                d.extend_from_slice(&1u16.to_be_bytes());
                option_reply(s, option, rep::INFO, &d)?;
                return option_reply(s, option, rep::ACK, &[]);
            }
            _ => option_reply(s, option, rep::ERR_UNSUP, &[])?,
        }
    }
}

/// One data chunk of the reply to `cookie`: `data` at `offset`.
fn data_chunk(extended: bool, cookie: u64, done: bool, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    let flags = if done { reply::FLAG_DONE } else { 0 };
    let len = 8 + data.len() as u64;
    if extended {
        b.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&reply::TYPE_OFFSET_DATA.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
    } else {
        b.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&reply::TYPE_OFFSET_DATA.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&(len as u32).to_be_bytes());
    }
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// Serves one client as `script` says; `Err` when the client did not send
/// all its requests before the (generous) timeout.
fn serve(listener: UnixListener, extended: bool, script: Script) -> io::Result<()> {
    let (mut s, _) = listener.accept()?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    negotiate(&mut s, extended)?;
    if script == Script::ManyExtents {
        return many_extents(&mut s, extended);
    }
    let mut reads = Vec::new();
    while reads.len() < THREADS {
        let mut head = vec![0u8; if extended { 32 } else { 28 }];
        s.read_exact(&mut head)?;
        let kind = u16::from_be_bytes([head[6], head[7]]);
        let cookie = u64::from_be_bytes(head[8..16].try_into().unwrap());
        let offset = u64::from_be_bytes(head[16..24].try_into().unwrap());
        assert_eq!(kind, cmd::READ, "only reads are expected");
        reads.push((cookie, offset));
    }
    if script == Script::Hangup {
        return Ok(());
    }
    let content = |offset: u64, len: usize| (0..len as u64).map(|i| byte_at(offset + i)).collect::<Vec<u8>>();
    let half = (READ_LEN / 2) as u64;
    for &(cookie, offset) in reads.iter().rev() {
        s.write_all(&data_chunk(extended, cookie, false, offset + half, &content(offset + half, READ_LEN / 2)))?;
    }
    for &(cookie, offset) in reads.iter().rev() {
        s.write_all(&data_chunk(extended, cookie, true, offset, &content(offset, READ_LEN / 2)))?;
    }
    // Wait for the client's disconnection.
    let _ = s.read(&mut [0u8; 64]);
    Ok(())
}

/// Reads one block status request and answers it with QEMU_MAX_EXTENTS
/// extents of `base:allocation` (id 7).
fn many_extents(s: &mut UnixStream, extended: bool) -> io::Result<()> {
    let mut head = vec![0u8; if extended { 32 } else { 28 }];
    s.read_exact(&mut head)?;
    assert_eq!(u16::from_be_bytes([head[6], head[7]]), cmd::BLOCK_STATUS, "a block status request");
    let cookie = u64::from_be_bytes(head[8..16].try_into().unwrap());
    let mut payload = 7u32.to_be_bytes().to_vec();
    if extended {
        payload.extend_from_slice(&(QEMU_MAX_EXTENTS as u32).to_be_bytes());
    }
    for i in 0..QEMU_MAX_EXTENTS {
        let flags = (i % 2) as u64 * 3;
        if extended {
            payload.extend_from_slice(&512u64.to_be_bytes());
            payload.extend_from_slice(&flags.to_be_bytes());
        } else {
            payload.extend_from_slice(&512u32.to_be_bytes());
            payload.extend_from_slice(&(flags as u32).to_be_bytes());
        }
    }
    let kind = if extended { reply::TYPE_BLOCK_STATUS_EXT } else { reply::TYPE_BLOCK_STATUS };
    let mut b = Vec::new();
    if extended {
        b.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
        b.extend_from_slice(&reply::FLAG_DONE.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&0u64.to_be_bytes());
        b.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    } else {
        b.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b.extend_from_slice(&reply::FLAG_DONE.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    }
    b.extend_from_slice(&payload);
    s.write_all(&b)?;
    let _ = s.read(&mut [0u8; 64]);
    Ok(())
}

fn connect(socket: &Path) -> NbdClient {
    let addr = NbdAddress::parse(&format!("nbd+unix:///?socket={}", socket.display())).unwrap().unwrap();
    NbdClient::connect(&addr, None).unwrap()
}

/// Reads from THREADS threads at once: each thread's result.
fn parallel_reads(client: &NbdClient) -> Vec<io::Result<Vec<u8>>> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|i| {
                scope.spawn(move || {
                    let mut buf = vec![0u8; READ_LEN];
                    client.read_at(&mut buf, (i as u64) << 20).map(|()| buf)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn replies_in_any_order_reach_their_callers() {
    for extended in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s");
        let listener = UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || serve(listener, extended, Script::Reverse));
        let client = connect(&socket);
        for (i, got) in parallel_reads(&client).into_iter().enumerate() {
            let got = got.unwrap_or_else(|e| panic!("read {i} (extended headers: {extended}): {e}"));
            let offset = (i as u64) << 20;
            assert!(got.iter().enumerate().all(|(k, &b)| b == byte_at(offset + k as u64)), "read {i} content");
        }
        drop(client);
        server.join().unwrap().expect("the server got every request in flight at once");
    }
}

#[test]
fn a_broken_connection_fails_every_request_in_flight() {
    for extended in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s");
        let listener = UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || serve(listener, extended, Script::Hangup));
        let client = connect(&socket);
        for (i, got) in parallel_reads(&client).into_iter().enumerate() {
            let e = got.err().unwrap_or_else(|| panic!("read {i} succeeded on a closed connection"));
            assert_eq!(e.raw_os_error(), Some(libc::EIO), "read {i}: {e}");
        }
        // Later requests fail the same way, at once.
        let e = client.read_at(&mut [0u8; 512], 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
        server.join().unwrap().expect("the server got every request in flight at once");
    }
}

/// Block status asked for a large window gets qemu-nbd's largest answer,
/// 131072 extents (a compact chunk of 1 MiB and 4 bytes, an extended one
/// of 2 MiB and 8), which is taken whole. Guards against the chunk limit
/// of 1 MiB, which broke the connection once windows grew past 32 MiB.
#[test]
fn the_largest_block_status_answer_is_taken() {
    for extended in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s");
        let listener = UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || serve(listener, extended, Script::ManyExtents));
        let client = connect(&socket);
        let len = QEMU_MAX_EXTENTS as u64 * 512;
        let runs = client.allocation(0, len).unwrap_or_else(|e| panic!("extended headers: {extended}: {e}"));
        assert_eq!(runs.len(), QEMU_MAX_EXTENTS, "extended headers: {extended}");
        assert!(runs[0].data && !runs[0].zero && !runs[1].data && runs[1].zero, "{:?}", &runs[..2]);
        assert_eq!(runs.last().map(|r| r.offset + r.len), Some(len));
        drop(client);
        server.join().unwrap().unwrap();
    }
}
