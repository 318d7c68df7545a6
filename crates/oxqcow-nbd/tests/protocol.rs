//! The handshake and the session, driven in memory: what each option and
//! request is answered with, as real clients send them and as hostile ones
//! do.

use std::io::{self, Cursor, Read, Write};
use std::sync::Arc;

use oxqcow::{BlockDevice, CreateOptions, Image, MemoryStorage};
use oxqcow_nbd::handshake::{self, Contexts, Negotiated, Outcome, MAX_OPTIONS, MAX_OPTION_DATA};
use oxqcow_nbd::proto::{self, cmd, cmd_flags, opt, rep, reply, Errno, RequestHeader};
use oxqcow_nbd::session::{Op, Payload, Session};
use oxqcow_nbd::{Export, ExportOptions};

/// A client byte script on one side, the server's output on the other.
struct Duplex {
    input: Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Read for Duplex {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Duplex {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

const DISK: u64 = 4 << 20;
const CLUSTER: u64 = 64 << 10;

fn export(name: &str, read_only: bool) -> Arc<Export> {
    let image = Image::create_storage(Arc::new(MemoryStorage::new()), &CreateOptions::qcow2(DISK)).unwrap();
    let opts = ExportOptions {
        name: name.into(),
        description: "a test disk".into(),
        read_only,
        discard: true,
        allocation_depth: true,
        ..Default::default()
    };
    Arc::new(Export::new(Arc::new(image), opts).unwrap())
}

fn option(code: u32, data: &[u8]) -> Vec<u8> {
    let mut v = proto::IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn info_data(name: &str, reqs: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
    for r in reqs {
        d.extend_from_slice(&r.to_be_bytes());
    }
    d
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// One option reply: (option, type, data).
type Rep = (u32, u32, Vec<u8>);

/// Runs a handshake on `client` bytes (after the client flags) and returns
/// the outcome and the option replies.
fn handshake(export: &Export, flags: u32, options: &[Vec<u8>]) -> (io::Result<Outcome>, Vec<Rep>, Vec<u8>) {
    handshake_tls(export, flags, options, false)
}

/// [`handshake`] on a server that requires TLS when `tls` is set.
fn handshake_tls(
    export: &Export,
    flags: u32,
    options: &[Vec<u8>],
    tls: bool,
) -> (io::Result<Outcome>, Vec<Rep>, Vec<u8>) {
    let mut input = flags.to_be_bytes().to_vec();
    for o in options {
        input.extend_from_slice(o);
    }
    let mut d = Duplex { input: Cursor::new(input), output: Vec::new() };
    let outcome = handshake::negotiate_with(&mut d, export, tls);
    let out = d.output;
    assert_eq!(&out[..18], &proto::greeting()[..], "greeting");
    let (replies, rest) = option_replies(&out[18..]);
    (outcome, replies, rest)
}

/// The option replies at the start of `out`, and the bytes after them.
fn option_replies(out: &[u8]) -> (Vec<Rep>, Vec<u8>) {
    let mut replies = Vec::new();
    let mut pos = 0;
    while pos + 20 <= out.len() && out[pos..pos + 8] == proto::OPTION_REPLY_MAGIC.to_be_bytes() {
        let o = u32::from_be_bytes(out[pos + 8..pos + 12].try_into().unwrap());
        let t = u32::from_be_bytes(out[pos + 12..pos + 16].try_into().unwrap());
        let l = u32::from_be_bytes(out[pos + 16..pos + 20].try_into().unwrap()) as usize;
        replies.push((o, t, out[pos + 20..pos + 20 + l].to_vec()));
        pos += 20 + l;
    }
    (replies, out[pos..].to_vec())
}

fn types(replies: &[Rep]) -> Vec<(u32, u32)> {
    replies.iter().map(|r| (r.0, r.1)).collect()
}

const FIXED: u32 = 1;
const NO_ZEROES: u32 = 2;

/// QEMU 10's client asks for extended headers first; qemu-nbd 10 grants
/// them (oxqcow refused them with ERR_UNSUP, so `qemu-nbd --list` said
/// "transaction size: 32-bit" and no "block-status-payload" flag), and
/// structured replies are then refused as implied.
#[test]
fn qemu_sequence_negotiates_extended_headers() {
    let e = export("", false);
    let (outcome, replies, rest) = handshake(
        &e,
        FIXED | NO_ZEROES,
        &[
            option(opt::EXTENDED_HEADERS, &[]),
            option(opt::STRUCTURED_REPLY, &[]),
            option(opt::SET_META_CONTEXT, &meta_data("", &["base:allocation"])),
            option(opt::GO, &info_data("", &[proto::info::BLOCK_SIZE])),
        ],
    );
    let neg = match outcome.unwrap() {
        Outcome::Transmission(n) => n,
        other => panic!("expected transmission, got {other:?}"),
    };
    assert!(neg.structured && neg.extended);
    assert_eq!(neg.contexts, Contexts { base_allocation: true, allocation_depth: false, dirty_bitmap: false });
    assert!(rest.is_empty());
    assert_eq!(
        types(&replies),
        vec![
            (opt::EXTENDED_HEADERS, rep::ACK),
            (opt::STRUCTURED_REPLY, rep::ERR_EXT_HEADER_REQD),
            (opt::SET_META_CONTEXT, rep::META_CONTEXT),
            (opt::SET_META_CONTEXT, rep::ACK),
            (opt::GO, rep::INFO),
            (opt::GO, rep::INFO),
            (opt::GO, rep::ACK),
        ]
    );
    assert_eq!(&replies[2].2[4..], b"base:allocation");
    // Block sizes: 1, 4096, 32 MiB.
    let bs = &replies[4].2;
    assert_eq!(u16::from_be_bytes([bs[0], bs[1]]), proto::info::BLOCK_SIZE);
    assert_eq!(u32::from_be_bytes(bs[2..6].try_into().unwrap()), 1);
    assert_eq!(u32::from_be_bytes(bs[6..10].try_into().unwrap()), 4096);
    assert_eq!(u32::from_be_bytes(bs[10..14].try_into().unwrap()), 32 << 20);
    // Export info: size and flags (qemu-nbd's 0x1ded less multi-conn here).
    let ex = &replies[5].2;
    assert_eq!(u64::from_be_bytes(ex[2..10].try_into().unwrap()), DISK);
    assert_eq!(u16::from_be_bytes([ex[10], ex[11]]), 0x1ded & !0x0100);
}

/// A client without extended headers (libnbd 1.14, QEMU before 9) gets
/// the compact framing and no BLOCK_STAT_PAYLOAD flag.
#[test]
fn structured_replies_alone_keep_the_compact_framing() {
    let e = export("", true);
    let (outcome, replies, _) =
        handshake(&e, FIXED | NO_ZEROES, &[option(opt::STRUCTURED_REPLY, &[]), option(opt::GO, &info_data("", &[]))]);
    match outcome.unwrap() {
        Outcome::Transmission(n) => assert!(n.structured && !n.extended),
        other => panic!("expected transmission, got {other:?}"),
    }
    let ex = &replies[1].2;
    assert_eq!(u16::from_be_bytes([ex[10], ex[11]]), 0x048f);
}

#[test]
fn nbdinfo_list_sequence() {
    let e = export("disk", true);
    let (outcome, replies, _) = handshake(
        &e,
        FIXED,
        &[
            option(opt::STRUCTURED_REPLY, &[]),
            option(opt::LIST, &[]),
            option(opt::INFO, &info_data("disk", &[3, 1, 2])),
            option(opt::LIST_META_CONTEXT, &meta_data("disk", &[])),
            option(opt::ABORT, &[]),
        ],
    );
    assert_eq!(outcome.unwrap(), Outcome::Aborted);
    let t = types(&replies);
    assert_eq!(t[1], (opt::LIST, rep::SERVER));
    let server = &replies[1].2;
    assert_eq!(&server[..4], &4u32.to_be_bytes());
    assert_eq!(&server[4..8], b"disk");
    assert_eq!(&server[8..], b"a test disk");
    assert_eq!(t[2], (opt::LIST, rep::ACK));
    // INFO: block size, name, description, export, ack.
    assert_eq!(&t[3..7], &[(opt::INFO, rep::INFO); 4][..]);
    assert_eq!(t[7], (opt::INFO, rep::ACK));
    assert_eq!(&replies[5].2[2..], b"a test disk");
    let flags = u16::from_be_bytes([replies[6].2[10], replies[6].2[11]]);
    assert_ne!(flags & proto::transmission_flags::READ_ONLY, 0);
    assert_eq!(flags & proto::transmission_flags::SEND_TRIM, 0);
    // Both contexts are listed.
    let listed: Vec<&[u8]> = replies.iter().filter(|r| r.1 == rep::META_CONTEXT).map(|r| &r.2[4..]).collect();
    assert_eq!(listed, vec![&b"base:allocation"[..], &b"qemu:allocation-depth"[..]]);
    assert_eq!(*t.last().unwrap(), (opt::ABORT, rep::ACK));
}

#[test]
fn errors_do_not_end_the_negotiation() {
    let e = export("", false);
    let huge = MAX_OPTION_DATA as usize + 10;
    let (outcome, replies, _) = handshake(
        &e,
        FIXED,
        &[
            option(4242, b"whatever"),
            option(opt::STARTTLS, &[]),
            option(opt::SET_META_CONTEXT, &meta_data("", &["base:allocation"])),
            option(opt::LIST, &[1]),
            option(opt::INFO, &info_data("nope", &[])),
            option(opt::GO, &[0, 0, 0, 9]),
            option(7777, &vec![0u8; huge]),
            option(opt::STRUCTURED_REPLY, &[]),
            option(opt::STRUCTURED_REPLY, &[]),
            option(opt::SET_META_CONTEXT, &meta_data("other", &["base:allocation"])),
            option(opt::GO, &info_data("", &[])),
        ],
    );
    assert!(matches!(outcome.unwrap(), Outcome::Transmission(n) if n.structured && !n.contexts.any()));
    assert_eq!(
        types(&replies),
        vec![
            (4242, rep::ERR_UNSUP),
            (opt::STARTTLS, rep::ERR_POLICY),
            (opt::SET_META_CONTEXT, rep::ERR_INVALID),
            (opt::LIST, rep::ERR_INVALID),
            (opt::INFO, rep::ERR_UNKNOWN),
            (opt::GO, rep::ERR_INVALID),
            (7777, rep::ERR_TOO_BIG),
            (opt::STRUCTURED_REPLY, rep::ACK),
            (opt::STRUCTURED_REPLY, rep::ERR_INVALID),
            (opt::SET_META_CONTEXT, rep::ERR_UNKNOWN),
            (opt::GO, rep::INFO),
            (opt::GO, rep::ACK),
        ]
    );
}

#[test]
fn export_name_without_zeroes_and_with() {
    let e = export("x", false);
    let (o, _, rest) = handshake(&e, FIXED | NO_ZEROES, &[option(opt::EXPORT_NAME, b"x")]);
    assert!(matches!(o.unwrap(), Outcome::Transmission(_)));
    assert_eq!(rest.len(), 10);
    assert_eq!(u64::from_be_bytes(rest[..8].try_into().unwrap()), DISK);
    let (_, _, rest) = handshake(&e, FIXED, &[option(opt::EXPORT_NAME, b"x")]);
    assert_eq!(rest.len(), 134);
    // An unknown name cannot be refused with a reply: the session ends.
    let (o, _, rest) = handshake(&e, FIXED, &[option(opt::EXPORT_NAME, b"y")]);
    assert!(o.is_err());
    assert!(rest.is_empty());
}

#[test]
fn protocol_violations_end_the_session() {
    let e = export("", false);
    // Unknown client flags.
    assert!(handshake(&e, 1 << 7, &[]).0.is_err());
    // A bad option magic.
    let mut bad = option(opt::LIST, &[]);
    bad[0] ^= 0xff;
    assert!(handshake(&e, FIXED, &[bad]).0.is_err());
    // An endless stream of options is cut off.
    let flood: Vec<Vec<u8>> = (0..MAX_OPTIONS + 5).map(|_| option(4242, &[])).collect();
    let (o, replies, _) = handshake(&e, FIXED, &flood);
    assert!(o.is_err());
    assert_eq!(replies.len(), MAX_OPTIONS);
    // A client that leaves in the middle of an option.
    let mut cut = option(opt::GO, &info_data("", &[1, 2, 3]));
    cut.truncate(20);
    assert!(handshake(&e, FIXED, &[cut]).0.is_err());
}

/// qemu-nbd offers `qemu:allocation-depth` only with -A; the server
/// offered it always, so a client listing contexts saw one qemu-nbd hides.
#[test]
fn allocation_depth_is_offered_only_when_asked_for() {
    let image = Image::create_storage(Arc::new(MemoryStorage::new()), &CreateOptions::qcow2(DISK)).unwrap();
    let e = Arc::new(Export::new(Arc::new(image), ExportOptions::default()).unwrap());
    let (o, replies, _) = handshake(
        &e,
        FIXED,
        &[
            option(opt::STRUCTURED_REPLY, &[]),
            option(opt::LIST_META_CONTEXT, &meta_data("", &[])),
            option(opt::LIST_META_CONTEXT, &meta_data("", &["qemu:"])),
            option(opt::SET_META_CONTEXT, &meta_data("", &["base:allocation", "qemu:allocation-depth"])),
            option(opt::GO, &info_data("", &[])),
        ],
    );
    let Outcome::Transmission(n) = o.unwrap() else { panic!("no transmission") };
    assert_eq!(n.contexts, Contexts { base_allocation: true, allocation_depth: false, dirty_bitmap: false });
    let listed: Vec<&[u8]> = replies.iter().filter(|r| r.1 == rep::META_CONTEXT).map(|r| &r.2[4..]).collect();
    assert_eq!(listed, vec![&b"base:allocation"[..], &b"base:allocation"[..]]);
}

#[test]
fn set_meta_context_replaces_and_bare_namespaces_select_nothing() {
    let e = export("", false);
    let (o, replies, _) = handshake(
        &e,
        FIXED,
        &[
            option(opt::STRUCTURED_REPLY, &[]),
            option(opt::SET_META_CONTEXT, &meta_data("", &["base:allocation", "qemu:allocation-depth"])),
            option(opt::SET_META_CONTEXT, &meta_data("", &["qemu:", "base:", "qemu:dirty-bitmap:x"])),
            option(opt::LIST_META_CONTEXT, &meta_data("", &["qemu:"])),
            option(opt::SET_META_CONTEXT, &meta_data("", &["qemu:allocation-depth"])),
            option(opt::GO, &info_data("", &[])),
        ],
    );
    let Outcome::Transmission(n) = o.unwrap() else { panic!("no transmission") };
    assert_eq!(n.contexts, Contexts { base_allocation: false, allocation_depth: true, dirty_bitmap: false });
    let metas: Vec<(u32, Vec<u8>)> =
        replies.iter().filter(|r| r.1 == rep::META_CONTEXT).map(|r| (r.0, r.2.clone())).collect();
    assert_eq!(metas.len(), 4, "{metas:?}");
    assert_eq!(&metas[2].1[4..], b"qemu:allocation-depth");
    assert_eq!(metas[2].0, opt::LIST_META_CONTEXT);
}

fn session(read_only: bool, structured: bool, contexts: Contexts) -> Session {
    Session::new(export("", read_only), Negotiated { structured, extended: false, contexts })
}

fn req(kind: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
    RequestHeader { flags, kind, cookie: 0x1234_5678_9abc_def0, offset, length: u64::from(length) }
}

fn errno(s: &Session, h: RequestHeader) -> Errno {
    s.check(&h).expect_err("request should be refused").errno
}

#[test]
fn requests_are_judged_like_qemu_nbd() {
    let s = session(false, true, Contexts::default());
    assert_eq!(errno(&s, req(99, 0, 0, 0)), Errno::Inval);
    assert_eq!(errno(&s, req(cmd::READ, cmd_flags::REQ_ONE, 0, 512)), Errno::Inval);
    assert_eq!(errno(&s, req(cmd::WRITE, cmd_flags::NO_HOLE, 0, 512)), Errno::Inval);
    assert_eq!(errno(&s, req(cmd::READ, 0, 0, (32 << 20) + 1)), Errno::Inval);
    assert_eq!(errno(&s, req(cmd::READ, 0, DISK - 1, 2)), Errno::Inval);
    assert_eq!(errno(&s, req(cmd::READ, 0, u64::MAX, 2)), Errno::Inval);
    assert_eq!(errno(&s, req(cmd::WRITE, 0, DISK, 1)), Errno::NoSpc);
    assert_eq!(errno(&s, req(cmd::WRITE_ZEROES, 0, u64::MAX - 1, 4)), Errno::NoSpc);
    assert_eq!(errno(&s, req(cmd::TRIM, 0, DISK, 1)), Errno::Inval);
    assert_eq!(errno(&s, req(cmd::BLOCK_STATUS, 0, 0, 512)), Errno::Inval, "no context negotiated");
    assert_eq!(
        s.check(&req(cmd::READ, cmd_flags::DF | cmd_flags::FUA, DISK - 1, 1)).unwrap(),
        Op::Read { offset: DISK - 1, length: 1, df: true }
    );
    assert_eq!(s.check(&req(cmd::FLUSH, 0, u64::MAX, u32::MAX)).unwrap(), Op::Flush);
    assert_eq!(s.check(&req(cmd::DISC, 0, 0, 0)).unwrap(), Op::Disconnect);
    // DF needs structured replies.
    let simple = session(false, false, Contexts::default());
    assert_eq!(errno(&simple, req(cmd::READ, cmd_flags::DF, 0, 512)), Errno::Inval);
    // Writes to a read-only export.
    let ro = session(true, true, Contexts::default());
    for kind in [cmd::WRITE, cmd::WRITE_ZEROES, cmd::TRIM] {
        assert_eq!(errno(&ro, req(kind, 0, 0, 512)), Errno::Perm);
    }
    assert!(ro.check(&req(cmd::READ, 0, 0, 512)).is_ok());
    let bs = session(false, true, Contexts { base_allocation: true, allocation_depth: false, dirty_bitmap: false });
    assert_eq!(errno(&bs, req(cmd::BLOCK_STATUS, 0, 0, 0)), Errno::Inval);
    assert!(bs.check(&req(cmd::BLOCK_STATUS, cmd_flags::REQ_ONE, 0, u32::MAX)).is_err(), "past the end");
    assert!(bs.check(&req(cmd::BLOCK_STATUS, cmd_flags::REQ_ONE, 0, DISK as u32)).is_ok());
}

/// Parses a structured reply into chunks: (flags, type, payload).
fn chunks(mut b: &[u8], cookie: u64) -> Vec<(u16, u16, Vec<u8>)> {
    let mut out = Vec::new();
    while !b.is_empty() {
        assert_eq!(&b[..4], &proto::STRUCTURED_REPLY_MAGIC.to_be_bytes());
        let flags = u16::from_be_bytes([b[4], b[5]]);
        let kind = u16::from_be_bytes([b[6], b[7]]);
        assert_eq!(u64::from_be_bytes(b[8..16].try_into().unwrap()), cookie);
        let len = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
        out.push((flags, kind, b[20..20 + len].to_vec()));
        b = &b[20 + len..];
    }
    assert_eq!(out.last().map(|c| c.0 & reply::FLAG_DONE), Some(reply::FLAG_DONE), "last chunk has DONE");
    assert!(out[..out.len() - 1].iter().all(|c| c.0 & reply::FLAG_DONE == 0), "only the last chunk has DONE");
    out
}

fn run(s: &Session, h: RequestHeader, payload: &[u8]) -> Vec<u8> {
    let op = s.check(&h).unwrap();
    s.execute(&h, op, payload)
}

#[test]
fn structured_reads_send_holes_as_hole_chunks() {
    let s = session(false, true, Contexts::default());
    let data = vec![0xabu8; CLUSTER as usize];
    let w = run(&s, req(cmd::WRITE, 0, CLUSTER, CLUSTER as u32), &data);
    assert_eq!(w, proto::simple_reply(0x1234_5678_9abc_def0, 0).to_vec());
    let h = req(cmd::READ, 0, 0, 3 * CLUSTER as u32);
    let c = chunks(&run(&s, h, &[]), h.cookie);
    let kinds: Vec<u16> = c.iter().map(|c| c.1).collect();
    assert_eq!(kinds, vec![reply::TYPE_OFFSET_HOLE, reply::TYPE_OFFSET_DATA, reply::TYPE_OFFSET_HOLE]);
    assert_eq!(&c[0].2, &[0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0]);
    assert_eq!(u64::from_be_bytes(c[1].2[..8].try_into().unwrap()), CLUSTER);
    assert_eq!(&c[1].2[8..], &data[..]);
    // DF: one data chunk with the zeros in it.
    let h = req(cmd::READ, cmd_flags::DF, CLUSTER / 2, CLUSTER as u32);
    let c = chunks(&run(&s, h, &[]), h.cookie);
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].1, reply::TYPE_OFFSET_DATA);
    assert!(c[0].2[8..8 + CLUSTER as usize / 2].iter().all(|&b| b == 0));
    assert!(c[0].2[8 + CLUSTER as usize / 2..].iter().all(|&b| b == 0xab));
    // Refusals of reads are structured errors.
    let bad = req(cmd::READ, 0, DISK, 1);
    let r = s.refusal_reply(&bad, &s.check(&bad).unwrap_err());
    let c = chunks(&r, bad.cookie);
    assert_eq!(c[0].1, reply::TYPE_ERROR);
    assert_eq!(u32::from_be_bytes(c[0].2[..4].try_into().unwrap()), Errno::Inval as u32);
}

#[test]
fn simple_reads_carry_the_data() {
    let s = session(false, false, Contexts::default());
    run(&s, req(cmd::WRITE, 0, 100, 3), b"abc");
    let r = run(&s, req(cmd::READ, 0, 99, 5), &[]);
    assert_eq!(&r[..16], &proto::simple_reply(0x1234_5678_9abc_def0, 0));
    assert_eq!(&r[16..], b"\0abc\0");
}

#[test]
fn block_status_reports_both_contexts_and_honours_req_one() {
    let s = session(false, true, Contexts { base_allocation: true, allocation_depth: true, dirty_bitmap: false });
    run(&s, req(cmd::WRITE, 0, 0, CLUSTER as u32), &vec![1u8; CLUSTER as usize]);
    run(&s, req(cmd::WRITE_ZEROES, cmd_flags::NO_HOLE, 2 * CLUSTER, CLUSTER as u32), &[]);
    let h = req(cmd::BLOCK_STATUS, 0, 0, DISK as u32);
    let c = chunks(&run(&s, h, &[]), h.cookie);
    assert_eq!(c.len(), 2);
    let descs = |p: &[u8]| -> (u32, Vec<(u32, u32)>) {
        let id = u32::from_be_bytes(p[..4].try_into().unwrap());
        let d = p[4..]
            .chunks(8)
            .map(|x| (u32::from_be_bytes(x[..4].try_into().unwrap()), u32::from_be_bytes(x[4..].try_into().unwrap())))
            .collect();
        (id, d)
    };
    let c64 = CLUSTER as u32;
    let rest = DISK as u32 - 3 * c64;
    // A zero cluster reads as a hole (as QEMU reports it) but is allocated
    // at depth 1; unallocated clusters are at depth 0.
    assert_eq!(descs(&c[0].2), (0, vec![(c64, 0), (DISK as u32 - c64, 3)]));
    assert_eq!(descs(&c[1].2), (1, vec![(c64, 1), (c64, 0), (c64, 1), (rest, 0)]));
    let h = req(cmd::BLOCK_STATUS, cmd_flags::REQ_ONE, CLUSTER, DISK as u32 - c64);
    let c = chunks(&run(&s, h, &[]), h.cookie);
    assert_eq!(descs(&c[0].2), (0, vec![(DISK as u32 - c64, 3)]));
    assert_eq!(descs(&c[1].2), (1, vec![(c64, 0)]));
    let h = req(cmd::BLOCK_STATUS, cmd_flags::REQ_ONE, 0, DISK as u32);
    let c = chunks(&run(&s, h, &[]), h.cookie);
    assert_eq!(descs(&c[0].2), (0, vec![(c64, 0)]));
    assert_eq!(descs(&c[1].2), (1, vec![(c64, 1)]));
}

/// Parses a reply framed with extended headers into chunks: (flags, type,
/// payload); every chunk repeats the request's cookie and offset.
fn extended_chunks(mut b: &[u8], h: &RequestHeader) -> Vec<(u16, u16, Vec<u8>)> {
    let mut out = Vec::new();
    while !b.is_empty() {
        assert_eq!(&b[..4], &proto::EXTENDED_REPLY_MAGIC.to_be_bytes());
        let flags = u16::from_be_bytes([b[4], b[5]]);
        let kind = u16::from_be_bytes([b[6], b[7]]);
        assert_eq!(u64::from_be_bytes(b[8..16].try_into().unwrap()), h.cookie);
        assert_eq!(u64::from_be_bytes(b[16..24].try_into().unwrap()), h.offset);
        let len = u64::from_be_bytes(b[24..32].try_into().unwrap()) as usize;
        out.push((flags, kind, b[32..32 + len].to_vec()));
        b = &b[32 + len..];
    }
    assert_eq!(out.last().map(|c| c.0 & reply::FLAG_DONE), Some(reply::FLAG_DONE), "last chunk has DONE");
    out
}

/// `(context, [(length, flags)])` of an `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`
/// payload.
fn extended_descs(p: &[u8]) -> (u32, Vec<(u64, u64)>) {
    let id = u32::from_be_bytes(p[..4].try_into().unwrap());
    let n = u32::from_be_bytes(p[4..8].try_into().unwrap()) as usize;
    let d: Vec<(u64, u64)> = p[8..]
        .chunks(16)
        .map(|x| (u64::from_be_bytes(x[..8].try_into().unwrap()), u64::from_be_bytes(x[8..].try_into().unwrap())))
        .collect();
    assert_eq!(d.len(), n, "descriptor count");
    (id, d)
}

/// With extended headers every reply is a chunk with the 32-byte header
/// (no simple replies), lengths are 64-bit, and block status uses
/// BLOCK_STATUS_EXT; a payload (NBD_CMD_FLAG_PAYLOAD_LEN) picks contexts.
/// Guards the framing qemu-img/qemu-io 10 use against `oxqcow serve`.
#[test]
fn extended_headers_frame_every_reply() {
    let both = Contexts { base_allocation: true, allocation_depth: true, dirty_bitmap: false };
    let s = Session::new(export("", false), Negotiated { structured: true, extended: true, contexts: both });
    assert_eq!(s.header_len(), proto::EXTENDED_REQUEST_HEADER_LEN);
    let h = |kind, flags, offset, length: u64| RequestHeader { flags, kind, cookie: 77, offset, length };
    let w = h(cmd::WRITE, cmd_flags::PAYLOAD_LEN, 0, CLUSTER);
    assert_eq!(s.parse_header(&w.encode(true)).unwrap(), w);
    let c = extended_chunks(&run(&s, w, &vec![1u8; CLUSTER as usize]), &w);
    assert_eq!((c.len(), c[0].1), (1, reply::TYPE_NONE), "success is an empty chunk");
    // A zero write longer than 4 GiB is refused only for its range.
    let z = h(cmd::WRITE_ZEROES, 0, 0, 5 << 32);
    assert_eq!(s.check(&z).unwrap_err().errno, Errno::NoSpc);
    let b = h(cmd::BLOCK_STATUS, 0, 0, DISK);
    let c = extended_chunks(&run(&s, b, &[]), &b);
    assert_eq!(c.iter().map(|c| c.1).collect::<Vec<_>>(), vec![reply::TYPE_BLOCK_STATUS_EXT; 2]);
    assert_eq!(extended_descs(&c[0].2), (0, vec![(CLUSTER, 0), (DISK - CLUSTER, 3)]));
    assert_eq!(extended_descs(&c[1].2), (1, vec![(CLUSTER, 1), (DISK - CLUSTER, 0)]));
    // The payload: effect length, then the ids wanted (depth only).
    let mut payload = (2 * CLUSTER).to_be_bytes().to_vec();
    payload.extend_from_slice(&1u32.to_be_bytes());
    let p = h(cmd::BLOCK_STATUS, cmd_flags::PAYLOAD_LEN, 0, payload.len() as u64);
    assert_eq!(s.payload(&p), Payload::Read(12));
    let c = extended_chunks(&run(&s, p, &payload), &p);
    assert_eq!(c.len(), 1);
    assert_eq!(extended_descs(&c[0].2), (1, vec![(CLUSTER, 1), (CLUSTER, 0)]));
    // An id never selected, or a payload of the wrong shape, is EINVAL.
    let mut bad = (2 * CLUSTER).to_be_bytes().to_vec();
    bad.extend_from_slice(&9u32.to_be_bytes());
    let c = extended_chunks(&run(&s, p, &bad), &p);
    assert_eq!((c[0].1, u32::from_be_bytes(c[0].2[..4].try_into().unwrap())), (reply::TYPE_ERROR, Errno::Inval as u32));
    let odd = h(cmd::BLOCK_STATUS, cmd_flags::PAYLOAD_LEN, 0, 10);
    assert_eq!(s.payload(&odd), Payload::Discard(10));
    assert_eq!(s.check(&odd).unwrap_err().errno, Errno::Inval);
    // A payload that cannot even be skipped ends the connection.
    assert_eq!(s.payload(&h(cmd::WRITE, 0, 0, 1 << 40)), Payload::Hangup);
    // Without extended headers the flag is refused.
    let compact = session(false, true, both);
    assert_eq!(errno(&compact, req(cmd::BLOCK_STATUS, cmd_flags::PAYLOAD_LEN, 0, 12)), Errno::Inval);
}

#[test]
fn fast_zero_refuses_partial_clusters_with_data() {
    let s = session(false, true, Contexts::default());
    run(&s, req(cmd::WRITE, 0, 0, 4096), &[7u8; 4096]);
    let fast = cmd_flags::FAST_ZERO;
    // A partial cluster that holds data would need a data write.
    let h = req(cmd::WRITE_ZEROES, fast, 512, CLUSTER as u32);
    let c = chunks(&run(&s, h, &[]), h.cookie);
    assert_eq!(u32::from_be_bytes(c[0].2[..4].try_into().unwrap()), Errno::NotSup as u32);
    // Whole clusters, and partial clusters that read as zeros, are fast.
    let ok = proto::simple_reply(0x1234_5678_9abc_def0, 0).to_vec();
    assert_eq!(run(&s, req(cmd::WRITE_ZEROES, fast, CLUSTER, 2 * CLUSTER as u32), &[]), ok);
    assert_eq!(run(&s, req(cmd::WRITE_ZEROES, fast, 3 * CLUSTER + 10, 100), &[]), ok);
    // Without FAST_ZERO the partial cluster is zeroed by writing.
    assert_eq!(run(&s, req(cmd::WRITE_ZEROES, 0, 512, 1024), &[]), ok);
    let mut buf = vec![0u8; 4096];
    s.export().image().read_at(&mut buf, 0).unwrap();
    assert!(buf[..512].iter().all(|&b| b == 7) && buf[512..1536].iter().all(|&b| b == 0));
    assert!(buf[1536..].iter().all(|&b| b == 7));
}

#[test]
fn trim_frees_clusters() {
    let s = session(false, true, Contexts::default());
    run(&s, req(cmd::WRITE, 0, 0, CLUSTER as u32), &vec![9u8; CLUSTER as usize]);
    run(&s, req(cmd::TRIM, cmd_flags::FUA, 0, CLUSTER as u32), &[]);
    let st = s.export().image().block_status(0, CLUSTER).unwrap();
    assert!(st.iter().all(|e| !e.data && e.zero), "{st:?}");
}

#[test]
fn replies_built_in_recycled_buffers_hold_nothing_old() {
    for structured in [false, true] {
        let s = session(false, structured, Contexts::default());
        run(&s, req(cmd::WRITE, 0, CLUSTER, 8), b"newbytes");
        let mut out = vec![0xeeu8; 1 << 20];
        let h = req(cmd::READ, 0, CLUSTER - 8, 16);
        s.execute_into(&mut out, &h, s.check(&h).unwrap(), &[]);
        assert!(!out.contains(&0xee), "structured={structured}: stale bytes in {out:?}");
        if structured {
            let c = chunks(&out, h.cookie);
            assert_eq!(c.len(), 2);
            assert_eq!(&c[1].2[8..], b"newbytes");
        } else {
            assert_eq!(out.len(), 16 + 16);
            assert_eq!(&out[16..], b"\0\0\0\0\0\0\0\0newbytes");
        }
        // A small reply after a big one.
        let f = req(cmd::FLUSH, 0, 0, 0);
        s.execute_into(&mut out, &f, Op::Flush, &[]);
        assert_eq!(out, proto::simple_reply(f.cookie, 0).to_vec());
    }
}

#[test]
fn tls_is_required_before_anything_else() {
    let e = export("", false);
    // Options before STARTTLS are refused (their data read and dropped),
    // then STARTTLS is acknowledged and the caller starts TLS.
    let (outcome, replies, rest) = handshake_tls(
        &e,
        FIXED | NO_ZEROES,
        &[
            option(opt::LIST, &[]),
            option(opt::GO, &info_data("", &[])),
            option(opt::STRUCTURED_REPLY, &[]),
            option(4242, b"whatever"),
            option(opt::STARTTLS, &[]),
            // Never read: the TLS handshake comes next.
            option(opt::GO, &info_data("", &[])),
        ],
        true,
    );
    let Outcome::StartTls(resume) = outcome.unwrap() else { panic!("expected STARTTLS") };
    assert_eq!(
        types(&replies),
        vec![
            (opt::LIST, rep::ERR_TLS_REQD),
            (opt::GO, rep::ERR_TLS_REQD),
            (opt::STRUCTURED_REPLY, rep::ERR_TLS_REQD),
            (4242, rep::ERR_TLS_REQD),
            (opt::STARTTLS, rep::ACK),
        ]
    );
    assert_eq!(replies[1].2, b"Option 0x7 not permitted before TLS");
    assert!(rest.is_empty());

    // Inside TLS: a second STARTTLS is invalid, the rest as usual, and the
    // client flags from before TLS still hold (no zeroes after EXPORT_NAME).
    let mut input = Vec::new();
    for o in [option(opt::STARTTLS, &[]), option(opt::STRUCTURED_REPLY, &[]), option(opt::EXPORT_NAME, b"")] {
        input.extend_from_slice(&o);
    }
    let mut d = Duplex { input: Cursor::new(input), output: Vec::new() };
    let outcome = handshake::resume_in_tls(&mut d, &e, resume).unwrap();
    assert!(matches!(outcome, Outcome::Transmission(n) if n.structured), "{outcome:?}");
    let (replies, rest) = option_replies(&d.output);
    assert_eq!(types(&replies), vec![(opt::STARTTLS, rep::ERR_INVALID), (opt::STRUCTURED_REPLY, rep::ACK)]);
    assert_eq!(replies[0].2, b"TLS already enabled");
    assert_eq!(rest.len(), 10, "EXPORT_NAME reply without zeroes");
}

#[test]
fn before_tls_export_name_drops_and_abort_ends() {
    let e = export("", false);
    let (outcome, replies, _) =
        handshake_tls(&e, FIXED, &[option(opt::INFO, &info_data("", &[])), option(opt::EXPORT_NAME, b"")], true);
    assert!(outcome.is_err(), "EXPORT_NAME before TLS must drop the connection");
    assert_eq!(types(&replies), vec![(opt::INFO, rep::ERR_TLS_REQD)]);

    let (outcome, replies, _) = handshake_tls(&e, FIXED, &[option(opt::ABORT, &[])], true);
    assert_eq!(outcome.unwrap(), Outcome::Aborted);
    assert_eq!(types(&replies), vec![(opt::ABORT, rep::ERR_TLS_REQD)]);

    // STARTTLS with data: refused, and the connection dropped.
    let (outcome, replies, _) = handshake_tls(&e, FIXED, &[option(opt::STARTTLS, b"x")], true);
    assert!(outcome.is_err());
    assert_eq!(types(&replies), vec![(opt::STARTTLS, rep::ERR_INVALID)]);

    // Without TLS configured, STARTTLS is a policy refusal, as in qemu-nbd.
    let (outcome, replies, _) = handshake(&e, FIXED, &[option(opt::STARTTLS, &[]), option(opt::ABORT, &[])]);
    assert_eq!(outcome.unwrap(), Outcome::Aborted);
    assert_eq!(types(&replies), vec![(opt::STARTTLS, rep::ERR_POLICY), (opt::ABORT, rep::ACK)]);
    assert_eq!(replies[0].2, b"TLS not configured");
}

/// Guards the memory budget's accounting (issue 9): the connection grants a
/// reply with data `reply_bound` bytes before it runs, and the reply must
/// be built in them, never in a larger reallocation.
#[test]
fn replies_with_data_fit_in_their_bound() {
    let both = Contexts { base_allocation: true, allocation_depth: true, dirty_bitmap: false };
    for structured in [false, true] {
        let s = session(false, structured, both);
        // Data in every other cluster, and a partial cluster: many runs.
        for c in (0..DISK / CLUSTER).step_by(2) {
            run(&s, req(cmd::WRITE, 0, c * CLUSTER + 512, 4096), &[0x3c; 4096]);
        }
        let mut cases = vec![
            req(cmd::READ, 0, 0, DISK as u32),
            req(cmd::READ, 0, CLUSTER - 100, 3 * CLUSTER as u32 + 200),
            req(cmd::READ, 0, 100, 1000),
            req(cmd::READ, 0, 0, 0),
        ];
        if structured {
            cases.push(req(cmd::READ, cmd_flags::DF, CLUSTER - 100, 3 * CLUSTER as u32));
            cases.push(req(cmd::BLOCK_STATUS, 0, 0, DISK as u32));
            cases.push(req(cmd::BLOCK_STATUS, cmd_flags::REQ_ONE, 100, DISK as u32 - 100));
        }
        for h in cases {
            let op = s.check(&h).unwrap();
            let bound = s.reply_bound(op);
            let mut out = Vec::with_capacity(bound);
            let at = out.as_ptr();
            s.execute_into(&mut out, &h, op, &[]);
            assert!(out.len() <= bound && out.as_ptr() == at, "{h:?}: {} bytes in a bound of {bound}", out.len());
            assert_eq!(out, s.execute(&h, op, &[]), "{h:?}");
        }
    }
}
