//! `oxqcow serve` against hand-written NBD clients: hostile and broken
//! requests get errors or a clean disconnect, and many clients pipelining
//! large requests stay within the server's memory budget.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;

mod external;
use external::*;

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_MAGIC: u32 = 0x6744_6698;

trait Conn: Read + Write {}
impl<T: Read + Write> Conn for T {}

fn connect(sock: &Path) -> UnixStream {
    let s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

fn read_n(c: &mut dyn Conn, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    c.read_exact(&mut b).expect("reading from the server");
    b
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

/// Reads the greeting and sends the client flags (fixed newstyle, no zeroes).
fn greet(c: &mut dyn Conn) {
    let g = read_n(c, 18);
    assert_eq!(&g[..8], b"NBDMAGIC");
    c.write_all(&3u32.to_be_bytes()).unwrap();
}

fn send_option(c: &mut dyn Conn, code: u32, data: &[u8]) {
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&code.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    c.write_all(&m).unwrap();
}

/// One option reply: (type, data).
fn option_reply(c: &mut dyn Conn) -> (u32, Vec<u8>) {
    let h = read_n(c, 20);
    let len = be32(&h[16..]) as usize;
    (be32(&h[12..]), read_n(c, len))
}

/// Handshake to transmission with simple replies on export "".
fn go(c: &mut dyn Conn) {
    greet(c);
    send_option(c, 7, &[0, 0, 0, 0, 0, 0]);
    loop {
        match option_reply(c).0 {
            3 => {}
            1 => break,
            other => panic!("GO failed with reply {other:#x}"),
        }
    }
}

fn request(c: &mut dyn Conn, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
    let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    c.write_all(&m).unwrap();
}

/// A simple reply: (error, cookie).
fn simple_reply(c: &mut dyn Conn) -> (u32, u64) {
    let r = read_n(c, 16);
    assert_eq!(be32(&r), SIMPLE_MAGIC);
    (be32(&r[4..]), u64::from_be_bytes(r[8..16].try_into().unwrap()))
}

/// The peer closed the connection (EOF or reset) rather than answering.
fn closed(c: &mut dyn Conn) -> bool {
    let mut b = [0u8; 1];
    matches!(c.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn hostile_clients_get_errors_or_a_clean_disconnect() {
    let d = Dir::new();
    let img = d.image("disk.qcow2", "16M");
    let sock = d.path("s.sock");
    let srv = Server::unix(&sock, &["-f", "qcow2", "-t", "-e", "0", img.to_str().unwrap()]);
    let mb = 1u64 << 20;

    // Bad option magic: disconnected.
    let mut c = connect(&sock);
    greet(&mut c);
    c.write_all(&[0x55; 16]).unwrap();
    assert!(closed(&mut c), "bad option magic was not disconnected");

    // Unknown client flags: disconnected.
    let mut c = connect(&sock);
    read_n(&mut c, 18);
    c.write_all(&0x8000_0001u32.to_be_bytes()).unwrap();
    assert!(closed(&mut c));

    // An EXPORT_NAME longer than any name: disconnected without reading it.
    let mut c = connect(&sock);
    greet(&mut c);
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&1u32.to_be_bytes());
    m.extend_from_slice(&0xffff_fff0u32.to_be_bytes());
    c.write_all(&m).unwrap();
    assert!(closed(&mut c));

    // Unknown and oversized options are refused and the negotiation goes on.
    let mut c = connect(&sock);
    greet(&mut c);
    send_option(&mut c, 0x1234, b"junk");
    assert_eq!(option_reply(&mut c).0, 0x8000_0001, "unknown option: ERR_UNSUP");
    send_option(&mut c, 0x4321, &vec![7u8; 200_000]);
    assert_eq!(option_reply(&mut c).0, 0x8000_0009, "oversized option: ERR_TOO_BIG");
    send_option(&mut c, 3, &[]);
    assert_eq!(option_reply(&mut c).0, 2, "LIST still answered");
    assert_eq!(option_reply(&mut c).0, 1);
    send_option(&mut c, 2, &[]);
    assert_eq!(option_reply(&mut c).0, 1);

    // An option flood is cut off.
    let mut c = connect(&sock);
    greet(&mut c);
    let flood: Vec<u8> = (0..2000)
        .flat_map(|_| {
            let mut m = IHAVEOPT.to_be_bytes().to_vec();
            m.extend_from_slice(&0x99u32.to_be_bytes());
            m.extend_from_slice(&0u32.to_be_bytes());
            m
        })
        .collect();
    let writer = {
        let mut w = c.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = w.write_all(&flood);
        })
    };
    let mut replies = 0;
    let mut buf = [0u8; 20];
    while c.read_exact(&mut buf).is_ok() {
        replies += 1;
        let len = be32(&buf[16..]) as usize;
        read_n(&mut c, len);
    }
    writer.join().unwrap();
    assert!((1..2000).contains(&replies), "option flood: {replies} replies");

    // Transmission: every bad request gets its error and the stream stays usable.
    let mut c = connect(&sock);
    go(&mut c);
    request(&mut c, 0, 0, 1, 15 * mb, (2 * mb) as u32); // past the end
    assert_eq!(simple_reply(&mut c), (22, 1));
    request(&mut c, 0, 0, 2, u64::MAX - 10, 100); // offset overflow
    assert_eq!(simple_reply(&mut c), (22, 2));
    request(&mut c, 0, 0, 3, 0, 64 << 20); // larger than the maximum block
    assert_eq!(simple_reply(&mut c), (22, 3));
    request(&mut c, 1, 0, 4, 16 * mb, 512); // write past the end: ENOSPC
    c.write_all(&[1u8; 512]).unwrap();
    assert_eq!(simple_reply(&mut c), (28, 4));
    request(&mut c, 1, 0, 5, 0, 40 << 20); // oversized write: payload drained, EINVAL
    c.write_all(&vec![2u8; 40 << 20]).unwrap();
    assert_eq!(simple_reply(&mut c), (22, 5));
    request(&mut c, 42, 0, 6, 0, 0); // unknown command
    assert_eq!(simple_reply(&mut c), (22, 6));
    request(&mut c, 0, 0x8000, 7, 0, 512); // unknown flag
    assert_eq!(simple_reply(&mut c), (22, 7));
    request(&mut c, 7, 0, 8, 0, 512); // block status without a context
    assert_eq!(simple_reply(&mut c), (22, 8));
    request(&mut c, 1, 0, 9, 4096, 4); // a good write after all that
    c.write_all(b"good").unwrap();
    assert_eq!(simple_reply(&mut c), (0, 9));
    request(&mut c, 0, 0, 10, 4096, 4);
    assert_eq!(simple_reply(&mut c), (0, 10));
    assert_eq!(read_n(&mut c, 4), b"good");
    // A bad request magic ends the session.
    c.write_all(&[0xee; 28]).unwrap();
    assert!(closed(&mut c), "bad request magic was not disconnected");

    // Half-closed: requests, then the client closes its sending side; every
    // reply still arrives, then the server closes.
    let mut c = connect(&sock);
    go(&mut c);
    for i in 0..32u64 {
        request(&mut c, 0, 0, 100 + i, i * 4096, 4096);
    }
    c.shutdown(Shutdown::Write).unwrap();
    let mut cookies = Vec::new();
    for _ in 0..32 {
        let (err, cookie) = simple_reply(&mut c);
        assert_eq!(err, 0);
        read_n(&mut c, 4096);
        cookies.push(cookie);
    }
    cookies.sort();
    assert_eq!(cookies, (100..132).collect::<Vec<_>>());
    assert!(closed(&mut c));

    // A client that never reads its replies, and one that vanishes in the
    // middle of a write payload, do not stop the others.
    let mut lazy = connect(&sock);
    go(&mut lazy);
    for i in 0..200u64 {
        request(&mut lazy, 0, 0, i, 0, 1 << 20);
    }
    let mut gone = connect(&sock);
    go(&mut gone);
    request(&mut gone, 1, 0, 1, 0, 1 << 20);
    gone.write_all(&[9u8; 1000]).unwrap();
    drop(gone);
    qemu_io(&["-f", "raw", &srv.uri()], &["write -P 0x66 8M 1M", "read -P 0x66 8M 1M", "read -P 0 0 4096"]);
    drop(lazy);
    srv.stop();
    qemu_io(&["-f", "qcow2", img.to_str().unwrap()], &["read -P 0x66 8M 1M"]);
    assert_clean(&img);
}

/// The process's virtual size (what an address-space limit counts), bytes.
fn vm_size(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading /proc/PID/status");
    let line = status.lines().find(|l| l.starts_with("VmSize:")).expect("VmSize in /proc/PID/status");
    let kib: u64 = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmSize value");
    kib << 10
}

/// Reads one simple reply to a READ of `len` bytes: (error, cookie), and
/// the data, checked against `pattern(cookie)`, 1 MiB at a time.
fn read_reply(c: &mut UnixStream, len: usize, pattern: impl Fn(u64) -> u8) -> (u32, u64) {
    let (err, cookie) = simple_reply(c);
    if err == 0 {
        let want = pattern(cookie);
        let mut buf = vec![0u8; 1 << 20];
        for at in (0..len).step_by(buf.len()) {
            c.read_exact(&mut buf).expect("reading READ data from the server");
            assert!(buf.iter().all(|&b| b == want), "cookie {cookie:#x}: wrong data near byte {at}");
        }
    }
    (err, cookie)
}

/// Guards against the NBD server having no memory bound across connections
/// (issue 9, item 9): 40 clients pipelining 32 MiB reads made it allocate
/// 64 MiB for each, and under an address-space limit it aborted. Now all
/// requests share one budget: with the limit set to what the server uses
/// with every client connected plus little more than the budget, it must
/// survive clients that read nothing, answer every request (the data or
/// ENOMEM; a write refused so has its payload dropped and the connection
/// goes on) and serve normally afterwards.
#[test]
fn many_clients_pipelining_large_reads_stay_within_the_memory_budget() {
    require("prlimit", "util-linux");
    const CLIENTS: usize = 40;
    const DEPTH: u64 = 3;
    const LEN: u32 = 32 << 20;
    // The budget (oxqcow_nbd::memory::MEMORY_LIMIT, 256 MiB) and room for
    // what the server allocates besides request buffers.
    const HEADROOM: u64 = 384 << 20;
    let d = Dir::new();
    let img = d.image("disk.qcow2", "96M");
    let img_s = img.to_str().unwrap();
    qemu_io(&["-f", "qcow2", img_s], &["write -P 0xa5 0 32M", "write -P 0x5a 32M 32M"]);
    let sock = d.path("s.sock");
    let mut srv = Server::unix(&sock, &["-f", "qcow2", "-t", "-e", "42", img_s]);
    // Cookie i * 16 + k: client i's k-th read, at 0 or 32 MiB.
    let offset = |cookie: u64| (cookie % 2) * u64::from(LEN);
    let pattern = |cookie: u64| if cookie % 2 == 0 { 0xa5 } else { 0x5a };

    let mut clients: Vec<UnixStream> = (0..CLIENTS)
        .map(|_| {
            let mut c = connect(&sock);
            go(&mut c);
            c
        })
        .collect();
    let (mut probe, mut writer) = (connect(&sock), connect(&sock));
    go(&mut probe);
    go(&mut writer);
    // Every connection's threads exist now: the limit leaves room for the
    // budget and little more.
    let limit = vm_size(srv.pid()) + HEADROOM;
    run_ok("prlimit", &["--pid", &srv.pid().to_string(), &format!("--as={limit}")]);
    for (i, c) in clients.iter_mut().enumerate() {
        for k in 0..DEPTH {
            let cookie = i as u64 * 16 + k;
            request(c, 0, 0, cookie, offset(cookie), LEN);
        }
    }
    // Nobody reads yet, so the memory the server grants stays granted. A
    // 41st client reads until the server answers ENOMEM: the budget is
    // used up and the server is alive. (Without a budget the server
    // allocated past the limit and aborted here.)
    let mut exhausted = false;
    for cookie in (1u64 << 32..).step_by(2).take(100) {
        request(&mut probe, 0, 0, cookie, offset(cookie), LEN);
        let (err, c) = read_reply(&mut probe, LEN as usize, pattern);
        srv.assert_running();
        assert_eq!(c, cookie);
        if err != 0 {
            assert_eq!(err, 12, "expected ENOMEM");
            exhausted = true;
            break;
        }
    }
    assert!(exhausted, "100 reads of 32 MiB never exhausted the server's memory budget");
    // A write cannot have its memory either: ENOMEM once none has come
    // back for a while, its payload read and dropped, and the next request
    // on the connection is answered.
    let payload = vec![0x77u8; LEN as usize];
    request(&mut writer, 1, 0, 1, 64 << 20, LEN);
    writer.write_all(&payload).unwrap();
    request(&mut writer, 3, 0, 2, 0, 0);
    assert_eq!(simple_reply(&mut writer), (12, 1), "a write without memory: ENOMEM");
    assert_eq!(simple_reply(&mut writer), (0, 2), "the flush after it");
    srv.assert_running();

    // Now every client reads its replies: each one the data or ENOMEM.
    let readers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            std::thread::spawn(move || {
                let mut cookies = Vec::new();
                let mut enomem = 0;
                for _ in 0..DEPTH {
                    let (err, cookie) = read_reply(&mut c, LEN as usize, pattern);
                    assert!(err == 0 || err == 12, "client {i}: error {err} for cookie {cookie:#x}");
                    enomem += usize::from(err == 12);
                    cookies.push(cookie);
                }
                cookies.sort();
                assert_eq!(cookies, (0..DEPTH).map(|k| i as u64 * 16 + k).collect::<Vec<_>>(), "client {i}");
                enomem
            })
        })
        .collect();
    let enomem: usize = readers.into_iter().map(|t| t.join().expect("a client failed")).sum();
    assert!(enomem < CLIENTS * DEPTH as usize, "every read was refused");
    srv.assert_running();
    // And the server goes on serving.
    request(&mut writer, 1, 0, 3, 64 << 20, LEN);
    writer.write_all(&payload).unwrap();
    assert_eq!(simple_reply(&mut writer), (0, 3));
    drop((probe, writer));
    qemu_io(&["-r", "-f", "raw", &srv.uri()], &["read -P 0xa5 0 32M", "read -P 0x5a 32M 32M", "read -P 0x77 64M 32M"]);
    srv.stop();
    assert_clean(&img);
}

#[test]
fn read_only_exports_refuse_writes() {
    let d = Dir::new();
    let img = d.image("disk.qcow2", "8M");
    populate_small(&img);
    let sock = d.path("s.sock");
    let srv = Server::unix(&sock, &["-r", "-f", "qcow2", "-t", img.to_str().unwrap()]);
    let mut c = connect(&sock);
    go(&mut c);
    request(&mut c, 1, 0, 1, 0, 4096);
    c.write_all(&[0xff; 4096]).unwrap();
    assert_eq!(simple_reply(&mut c), (1, 1), "write to a read-only export: EPERM");
    request(&mut c, 6, 0, 2, 0, 4096);
    assert_eq!(simple_reply(&mut c), (1, 2), "zero write: EPERM");
    request(&mut c, 4, 0, 3, 0, 4096);
    assert_eq!(simple_reply(&mut c), (1, 3), "trim: EPERM");
    request(&mut c, 0, 0, 4, 0, 4);
    assert_eq!(simple_reply(&mut c), (0, 4));
    assert_eq!(read_n(&mut c, 4), vec![1u8; 4]);
    request(&mut c, 2, 0, 5, 0, 0);
    assert!(closed(&mut c));
    let o = run("qemu-io", &["-f", "raw", "-c", "write 0 512", &srv.uri()]);
    assert!(!o.status.success() || String::from_utf8_lossy(&o.stdout).contains("failed"));
    srv.stop();
    qemu_io(&["-f", "qcow2", img.to_str().unwrap()], &["read -P 1 0 64k"]);
    assert_clean(&img);
}

#[test]
fn handshake_limit_drops_silent_clients() {
    let d = Dir::new();
    let img = d.image("disk.qcow2", "1M");
    let sock = d.path("s.sock");
    let srv = Server::unix(&sock, &["-f", "qcow2", "-t", "--handshake-limit=1", img.to_str().unwrap()]);
    let mut c = connect(&sock);
    // Say nothing: the server gives up and closes (EOF, not our timeout).
    let mut got = Vec::new();
    c.read_to_end(&mut got).expect("the server closed a silent client");
    assert!(got.len() <= 18 && got[..] == b"NBDMAGICIHAVEOPT\0\x03"[..got.len()], "{got:?}");
    // The slot is free again for a real client.
    qemu_io(&["-f", "raw", &srv.uri()], &["read -P 0 0 4096"]);
    srv.stop();
    assert_clean(&img);
}

/// Bytes qemu-img map calls data in `[start, start + len)`.
fn data_in(image: &Path, start: u64, len: u64) -> u64 {
    let runs = map_runs(&qemu_img(&["map", "--output=json", "-f", "qcow2", image.to_str().unwrap()]));
    runs.iter().filter(|r| r.2).map(|r| (r.0 + r.1).min(start + len).saturating_sub(r.0.max(start))).sum()
}

#[test]
fn discard_and_detect_zeroes_follow_their_flags() {
    let d = Dir::new();
    let img = d.image("disk.qcow2", "8M");
    qemu_io(&["-f", "qcow2", img.to_str().unwrap()], &["write -P 5 0 4M"]);
    let mb = 1 << 20;
    // Default (--discard=ignore): TRIM succeeds and changes nothing.
    let srv = Server::unix(&d.path("a.sock"), &["-f", "qcow2", "-t", img.to_str().unwrap()]);
    qemu_io(&["-f", "raw", &srv.uri()], &["discard 0 1M", "write -z -u 1M 1M"]);
    srv.stop();
    assert_eq!(data_in(&img, 0, mb), mb, "a TRIM without --discard=unmap freed clusters");
    // --discard=unmap: TRIM frees; the zero write reads as zeros either way.
    let srv = Server::unix(&d.path("b.sock"), &["-f", "qcow2", "-t", "--discard=unmap", img.to_str().unwrap()]);
    qemu_io(&["-f", "raw", &srv.uri()], &["discard 0 1M", "read -P 0 1M 1M", "read -P 5 2M 2M"]);
    srv.stop();
    assert_eq!(data_in(&img, 0, mb), 0, "a TRIM with --discard=unmap kept its clusters");
    // --detect-zeroes=on: a write of zeros becomes a zero write.
    let srv = Server::unix(&d.path("c.sock"), &["-f", "qcow2", "-t", "--detect-zeroes=on", img.to_str().unwrap()]);
    qemu_io(&["-f", "raw", &srv.uri()], &["write -P 0 6M 1M", "write -P 7 7M 4k"]);
    srv.stop();
    assert_eq!(data_in(&img, 6 * mb, mb), 0, "zeros were stored as data with --detect-zeroes=on");
    assert_eq!(data_in(&img, 7 * mb, 4096), 4096);
    qemu_io(&["-f", "qcow2", img.to_str().unwrap()], &["read -P 0 6M 1M", "read -P 7 7M 4k", "read -P 5 2M 2M"]);
    assert_clean(&img);
}

#[test]
fn image_opts_and_internal_snapshots() {
    require("nbdinfo", "libnbd-bin");
    let d = Dir::new();
    let img = d.image("disk.qcow2", "4M");
    qemu_io(&["-f", "qcow2", img.to_str().unwrap()], &["write -P 1 0 1M"]);
    qemu_img(&["snapshot", "-c", "before", img.to_str().unwrap()]);
    qemu_io(&["-f", "qcow2", img.to_str().unwrap()], &["write -P 2 0 1M"]);
    let opts = format!("driver=qcow2,file.filename={}", img.display());
    let srv = Server::unix(&d.path("a.sock"), &["-t", "--image-opts", &opts]);
    qemu_io(&["-f", "raw", &srv.uri()], &["read -P 2 0 1M"]);
    srv.stop();
    // -l exports the snapshot, read-only.
    let srv = Server::unix(&d.path("b.sock"), &["-t", "-f", "qcow2", "-l", "before", img.to_str().unwrap()]);
    qemu_io(&["-r", "-f", "raw", &srv.uri()], &["read -P 1 0 1M"]);
    assert!(run_ok("nbdinfo", &[&srv.uri()]).contains("is_read_only: true"));
    srv.stop();
    let srv =
        Server::unix(&d.path("c.sock"), &["-t", "-f", "qcow2", "-l", "snapshot.name=before", img.to_str().unwrap()]);
    qemu_io(&["-r", "-f", "raw", &srv.uri()], &["read -P 1 0 1M"]);
    srv.stop();
    qemu_io(&["-f", "qcow2", img.to_str().unwrap()], &["read -P 2 0 1M"]);
    assert_clean(&img);
}

/// serve split -l at every comma and named the whole item in its error
/// ("Invalid parameter 'snapshot.foo=1'"); qemu-nbd parses it with
/// QemuOpts: a warning for a flag, the key, then "Failed in parsing
/// snapshot param".
#[test]
fn snapshot_params_are_parsed_as_qemu_nbd_parses_them() {
    require("qemu-nbd", "qemu-utils");
    let d = Dir::new();
    let img = d.image("disk.qcow2", "1M");
    let i = img.to_str().unwrap();
    let sock = d.s("x.sock");
    for l in ["snapshot.foo=1", "snapshot.id=1,bogus", "snapshot.name=a,,b,x=1"] {
        let q = run("qemu-nbd", &["-l", l, "-k", &sock, i]);
        let o = run(OXQCOW, &["serve", "-l", l, "-k", &sock, i]);
        let qe = String::from_utf8_lossy(&q.stderr).replace("qemu-nbd:", "PROG:");
        let oe = String::from_utf8_lossy(&o.stderr).replace("oxqcow:", "PROG:");
        assert_eq!((o.status.code(), oe), (q.status.code(), qe), "-l {l}");
    }
    assert_clean(&img);
}
