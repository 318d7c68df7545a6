//! The NBD wire format: magic numbers, option and command codes, flags,
//! error values, the parsers for what a client sends and the encoders for
//! what the server sends. Pure: bytes in, typed values out (and back); no
//! I/O, no image access, so that a fuzzer can drive every parser.
//!
//! Every field a client sends is bounded here: option data is parsed only
//! from a buffer the caller already limited, strings are checked against the
//! protocol's 4096-byte maximum and for UTF-8 and NUL bytes, counts are
//! checked against the bytes actually present.

/// `NBDMAGIC`, the first word the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, also the magic of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a (compact) transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of a request with a 64-bit length (extended headers).
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a reply chunk with extended headers.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Handshake flags the server sends.
pub mod handshake_flags {
    /// The server speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// The server can leave out the 124 zero bytes after EXPORT_NAME.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags, the client's answer to the handshake flags.
pub mod client_flags {
    /// The client speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// The client does not want the 124 zero bytes.
    pub const NO_ZEROES: u32 = 1 << 1;
    /// Every flag this server understands; any other bit ends the session.
    pub const KNOWN: u32 = FIXED_NEWSTYLE | NO_ZEROES;
}

/// Transmission flags, describing an export.
pub mod transmission_flags {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// Writes are refused.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_CMD_FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_FUA` is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// The medium is rotational.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_CMD_TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_CMD_WRITE_ZEROES` is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_CMD_FLAG_DF` is supported (only with structured replies).
    pub const SEND_DF: u16 = 1 << 7;
    /// A flush on one connection covers writes made on every connection.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_CMD_CACHE` is supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_CMD_FLAG_FAST_ZERO` is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
    /// `NBD_CMD_BLOCK_STATUS` may carry a payload naming its contexts
    /// (only with extended headers).
    pub const BLOCK_STAT_PAYLOAD: u16 = 1 << 12;
}

/// Option codes (`NBD_OPT_*`).
pub mod opt {
    /// Choose the export and start transmission, without error replies.
    pub const EXPORT_NAME: u32 = 1;
    /// End the negotiation.
    pub const ABORT: u32 = 2;
    /// List the exports.
    pub const LIST: u32 = 3;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and start transmission.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// Use 64-bit request and reply headers.
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (`NBD_REP_*`).
pub mod rep {
    /// The option succeeded (or a list ended).
    pub const ACK: u32 = 1;
    /// One export of a list.
    pub const SERVER: u32 = 2;
    /// One piece of information about an export.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    const ERR: u32 = 1 << 31;
    /// The option is not known.
    pub const ERR_UNSUP: u32 = ERR | 1;
    /// Policy forbids the option.
    pub const ERR_POLICY: u32 = ERR | 2;
    /// The option is malformed.
    pub const ERR_INVALID: u32 = ERR | 3;
    /// TLS is needed first.
    pub const ERR_TLS_REQD: u32 = ERR | 5;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = ERR | 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR | 7;
    /// The option's data is too large.
    pub const ERR_TOO_BIG: u32 = ERR | 9;
    /// Extended headers were negotiated: structured replies alone cannot be.
    pub const ERR_EXT_HEADER_REQD: u32 = ERR | 10;
}

/// Information types of `NBD_OPT_INFO` and `NBD_OPT_GO` (`NBD_INFO_*`).
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// The export's name.
    pub const NAME: u16 = 1;
    /// The export's description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command types (`NBD_CMD_*`).
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write (the data follows the header).
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Discard.
    pub const TRIM: u16 = 4;
    /// Prefetch.
    pub const CACHE: u16 = 5;
    /// Write zeros.
    pub const WRITE_ZEROES: u16 = 6;
    /// Query metadata.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags (`NBD_CMD_FLAG_*`).
pub mod cmd_flags {
    /// Force unit access: durable before the reply.
    pub const FUA: u16 = 1 << 0;
    /// WRITE_ZEROES must not punch holes.
    pub const NO_HOLE: u16 = 1 << 1;
    /// READ must be answered in one chunk.
    pub const DF: u16 = 1 << 2;
    /// BLOCK_STATUS: one extent per context.
    pub const REQ_ONE: u16 = 1 << 3;
    /// WRITE_ZEROES: fail rather than be slow.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// With extended headers: the length is that of a payload (WRITE's
    /// data, BLOCK_STATUS's effect length and context ids).
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured reply flags and chunk types.
pub mod reply {
    /// The last chunk of a reply.
    pub const FLAG_DONE: u16 = 1 << 0;
    /// An empty chunk.
    pub const TYPE_NONE: u16 = 0;
    /// Data at an offset.
    pub const TYPE_OFFSET_DATA: u16 = 1;
    /// Zeros at an offset, without the bytes.
    pub const TYPE_OFFSET_HOLE: u16 = 2;
    /// Extents of one metadata context.
    pub const TYPE_BLOCK_STATUS: u16 = 5;
    /// Extents of one metadata context with 64-bit lengths and flags
    /// (extended headers).
    pub const TYPE_BLOCK_STATUS_EXT: u16 = 6;
    /// An error.
    pub const TYPE_ERROR: u16 = (1 << 15) | 1;
}

/// Error values on the wire (Linux's numbering, as the protocol fixes it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Errno {
    /// Operation not permitted (a write to a read-only export).
    Perm = 1,
    /// Input/output error.
    Io = 5,
    /// Out of memory.
    NoMem = 12,
    /// Invalid argument.
    Inval = 22,
    /// No space left (a write past the end).
    NoSpc = 28,
    /// Value too large.
    Overflow = 75,
    /// Not supported (a zero request that would not be fast).
    NotSup = 95,
    /// The server is shutting down.
    Shutdown = 108,
}

/// The protocol's limit on strings (export names, queries, messages).
pub const MAX_STRING: usize = 4096;

/// Size of the fixed part of a client option.
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of a transmission request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Size of a transmission request header with extended headers.
pub const EXTENDED_REQUEST_HEADER_LEN: usize = 32;
/// Size of a simple reply.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Size of a reply chunk header with extended headers.
pub const EXTENDED_CHUNK_HEADER_LEN: usize = 32;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(w)
}

/// The fixed part of a client option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option code.
    pub option: u32,
    /// Length of the data that follows.
    pub length: u32,
}

/// Why a message cannot even be framed: the session must end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FramingError {
    /// The magic number was wrong.
    BadMagic(u64),
    /// A header of the wrong size for the negotiated framing.
    BadLength(usize),
}

impl std::fmt::Display for FramingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FramingError::BadMagic(m) => write!(f, "bad magic {m:#x}"),
            FramingError::BadLength(n) => write!(f, "request header of {n} bytes"),
        }
    }
}

impl OptionHeader {
    /// Parses the 16 bytes that start every option.
    pub fn parse(b: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, FramingError> {
        let magic = be64(b, 0);
        if magic != IHAVEOPT {
            return Err(FramingError::BadMagic(magic));
        }
        Ok(OptionHeader { option: be32(b, 8), length: be32(b, 12) })
    }
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO` data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest {
    /// The export asked for.
    pub name: String,
    /// The information types asked for, in order.
    pub requests: Vec<u16>,
}

/// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaQuery {
    /// The export the contexts are for.
    pub export: String,
    /// The queries (context names or namespace prefixes).
    pub queries: Vec<String>,
}

/// A parsed client option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME`.
    ExportName(String),
    /// `NBD_OPT_ABORT`.
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_STARTTLS`.
    StartTls,
    /// `NBD_OPT_INFO`.
    Info(InfoRequest),
    /// `NBD_OPT_GO`.
    Go(InfoRequest),
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMetaContext(MetaQuery),
    /// `NBD_OPT_SET_META_CONTEXT`.
    SetMetaContext(MetaQuery),
    /// `NBD_OPT_EXTENDED_HEADERS`.
    ExtendedHeaders,
    /// Anything else.
    Unknown(u32),
}

/// Why a known option's data is invalid: answered with `NBD_REP_ERR_INVALID`
/// and this text, and the negotiation goes on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidOption(pub String);

/// A cursor over option data that never reads past its end.
struct Fields<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], InvalidOption> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            return Err(InvalidOption(format!("option data ends inside the {what}")));
        };
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u16(&mut self, what: &str) -> Result<u16, InvalidOption> {
        Ok(be16(self.take(2, what)?, 0))
    }
    fn u32(&mut self, what: &str) -> Result<u32, InvalidOption> {
        Ok(be32(self.take(4, what)?, 0))
    }
    /// A 32-bit length followed by that many bytes of string.
    fn string(&mut self, what: &str) -> Result<String, InvalidOption> {
        let len = self.u32(what)? as usize;
        if len > MAX_STRING {
            return Err(InvalidOption(format!("{what} of {len} bytes exceeds the {MAX_STRING}-byte limit")));
        }
        let bytes = self.take(len, what)?;
        parse_string(bytes, what)
    }
    fn finish(&self, what: &str) -> Result<(), InvalidOption> {
        if self.pos != self.data.len() {
            return Err(InvalidOption(format!("{} stray bytes after the {what}", self.data.len() - self.pos)));
        }
        Ok(())
    }
}

/// Checks a protocol string: at most 4096 bytes, UTF-8, no NUL.
pub fn parse_string(bytes: &[u8], what: &str) -> Result<String, InvalidOption> {
    if bytes.len() > MAX_STRING {
        return Err(InvalidOption(format!("{what} of {} bytes exceeds the {MAX_STRING}-byte limit", bytes.len())));
    }
    if bytes.contains(&0) {
        return Err(InvalidOption(format!("{what} contains a NUL byte")));
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| InvalidOption(format!("{what} is not UTF-8")))
}

impl ClientOption {
    /// Parses an option's data. `data` is the whole data the header
    /// announced (the caller bounds its size).
    pub fn parse(option: u32, data: &[u8]) -> Result<ClientOption, InvalidOption> {
        let no_data = |o: ClientOption| {
            if data.is_empty() {
                Ok(o)
            } else {
                Err(InvalidOption(format!("option {option} takes no data, got {} bytes", data.len())))
            }
        };
        let mut f = Fields { data, pos: 0 };
        match option {
            opt::EXPORT_NAME => Ok(ClientOption::ExportName(parse_string(data, "export name")?)),
            opt::ABORT => no_data(ClientOption::Abort),
            opt::LIST => no_data(ClientOption::List),
            opt::STARTTLS => no_data(ClientOption::StartTls),
            opt::STRUCTURED_REPLY => no_data(ClientOption::StructuredReply),
            opt::EXTENDED_HEADERS => no_data(ClientOption::ExtendedHeaders),
            opt::INFO | opt::GO => {
                let name = f.string("export name")?;
                let count = f.u16("information request count")? as usize;
                // Each request is two bytes: the count cannot exceed what is there.
                let mut requests = Vec::with_capacity(count.min(data.len() / 2));
                for _ in 0..count {
                    requests.push(f.u16("information request")?);
                }
                f.finish("information requests")?;
                let req = InfoRequest { name, requests };
                Ok(if option == opt::INFO { ClientOption::Info(req) } else { ClientOption::Go(req) })
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                let export = f.string("export name")?;
                let count = f.u32("query count")? as usize;
                // Each query takes at least its four-byte length.
                let mut queries = Vec::with_capacity(count.min(data.len() / 4));
                for _ in 0..count {
                    queries.push(f.string("query")?);
                }
                f.finish("queries")?;
                let q = MetaQuery { export, queries };
                Ok(if option == opt::LIST_META_CONTEXT {
                    ClientOption::ListMetaContext(q)
                } else {
                    ClientOption::SetMetaContext(q)
                })
            }
            other => Ok(ClientOption::Unknown(other)),
        }
    }
}

/// Appends an option reply.
pub fn option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    // Option replies are built from bounded strings and fixed fields.
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// The start of the handshake: magic, newstyle magic, handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut g = [0u8; 18];
    g[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..].copy_from_slice(&(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES).to_be_bytes());
    g
}

/// `NBD_INFO_EXPORT` payload: type, size, transmission flags.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&info::EXPORT.to_be_bytes());
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

/// `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION` payload.
pub fn info_string(kind: u16, s: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + s.len());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(s.as_bytes());
    v
}

/// `NBD_INFO_BLOCK_SIZE` payload.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(14);
    v.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    for x in [min, preferred, max] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    v
}

/// A transmission request header, framed but not yet validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// The client's cookie (handle), echoed in the reply.
    pub cookie: u64,
    /// Offset.
    pub offset: u64,
    /// Length (32 bits on the wire without extended headers).
    pub length: u64,
}

impl RequestHeader {
    /// Parses a request header: 28 bytes, or 32 with extended headers
    /// (`extended`), whose magic differs; any other length is a framing
    /// error.
    pub fn parse(b: &[u8], extended: bool) -> Result<RequestHeader, FramingError> {
        let (want, magic) = if extended {
            (EXTENDED_REQUEST_HEADER_LEN, EXTENDED_REQUEST_MAGIC)
        } else {
            (REQUEST_HEADER_LEN, REQUEST_MAGIC)
        };
        if b.len() != want {
            return Err(FramingError::BadLength(b.len()));
        }
        let got = be32(b, 0);
        if got != magic {
            return Err(FramingError::BadMagic(u64::from(got)));
        }
        Ok(RequestHeader {
            flags: be16(b, 4),
            kind: be16(b, 6),
            cookie: be64(b, 8),
            offset: be64(b, 16),
            length: if extended { be64(b, 24) } else { u64::from(be32(b, 24)) },
        })
    }

    /// Encodes the header (for clients and tests): compact, its length cut
    /// to 32 bits, or extended.
    pub fn encode(&self, extended: bool) -> Vec<u8> {
        let mut b = Vec::with_capacity(EXTENDED_REQUEST_HEADER_LEN);
        let magic = if extended { EXTENDED_REQUEST_MAGIC } else { REQUEST_MAGIC };
        b.extend_from_slice(&magic.to_be_bytes());
        b.extend_from_slice(&self.flags.to_be_bytes());
        b.extend_from_slice(&self.kind.to_be_bytes());
        b.extend_from_slice(&self.cookie.to_be_bytes());
        b.extend_from_slice(&self.offset.to_be_bytes());
        if extended {
            b.extend_from_slice(&self.length.to_be_bytes());
        } else {
            b.extend_from_slice(&(self.length as u32).to_be_bytes());
        }
        b
    }
}

/// A simple reply.
pub fn simple_reply(cookie: u64, error: u32) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Whom a reply chunk answers, and how its header is framed: `offset` is
/// the request's offset with extended headers (their chunk header repeats
/// it), `None` for the compact structured header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyTo {
    /// The request's cookie.
    pub cookie: u64,
    /// The request's offset, with extended headers.
    pub offset: Option<u64>,
}

impl ReplyTo {
    /// The size of a chunk header in this framing.
    pub fn header_len(&self) -> usize {
        if self.offset.is_some() {
            EXTENDED_CHUNK_HEADER_LEN
        } else {
            CHUNK_HEADER_LEN
        }
    }
}

/// Appends a reply chunk header.
pub fn chunk_header(out: &mut Vec<u8>, flags: u16, kind: u16, to: ReplyTo, length: u32) {
    let magic = if to.offset.is_some() { EXTENDED_REPLY_MAGIC } else { STRUCTURED_REPLY_MAGIC };
    out.extend_from_slice(&magic.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&to.cookie.to_be_bytes());
    match to.offset {
        Some(offset) => {
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&u64::from(length).to_be_bytes());
        }
        None => out.extend_from_slice(&length.to_be_bytes()),
    }
}

/// Appends an `NBD_REPLY_TYPE_ERROR` chunk that ends the reply. The message
/// is cut to the protocol's string limit (on a character boundary).
pub fn error_chunk(out: &mut Vec<u8>, to: ReplyTo, errno: Errno, message: &str) {
    let mut cut = message.len().min(MAX_STRING);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let msg = &message.as_bytes()[..cut];
    chunk_header(out, reply::FLAG_DONE, reply::TYPE_ERROR, to, 6 + msg.len() as u32);
    out.extend_from_slice(&(errno as u32).to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

/// Appends an `NBD_REPLY_TYPE_OFFSET_HOLE` chunk.
pub fn hole_chunk(out: &mut Vec<u8>, flags: u16, to: ReplyTo, offset: u64, length: u32) {
    chunk_header(out, flags, reply::TYPE_OFFSET_HOLE, to, 12);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
}

/// Appends an `NBD_REPLY_TYPE_OFFSET_DATA` chunk header and offset; the
/// caller appends `length` bytes of data.
pub fn data_chunk_header(out: &mut Vec<u8>, flags: u16, to: ReplyTo, offset: u64, length: u32) {
    chunk_header(out, flags, reply::TYPE_OFFSET_DATA, to, 8 + length);
    out.extend_from_slice(&offset.to_be_bytes());
}

/// The size of a block status chunk of `extents` descriptors.
pub fn block_status_chunk_len(to: ReplyTo, extents: usize) -> usize {
    if to.offset.is_some() {
        EXTENDED_CHUNK_HEADER_LEN + 8 + 16 * extents
    } else {
        CHUNK_HEADER_LEN + 4 + 8 * extents
    }
}

/// Appends a block status chunk: the context id and `(length, flags)`
/// descriptors; `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` (a count, then 64-bit
/// fields) with extended headers, else `NBD_REPLY_TYPE_BLOCK_STATUS`.
pub fn block_status_chunk(out: &mut Vec<u8>, flags: u16, to: ReplyTo, context: u32, extents: &[(u64, u32)]) {
    let n = extents.len();
    if to.offset.is_some() {
        chunk_header(out, flags, reply::TYPE_BLOCK_STATUS_EXT, to, 8 + 16 * n as u32);
        out.extend_from_slice(&context.to_be_bytes());
        out.extend_from_slice(&(n as u32).to_be_bytes());
        for &(len, fl) in extents {
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&u64::from(fl).to_be_bytes());
        }
    } else {
        chunk_header(out, flags, reply::TYPE_BLOCK_STATUS, to, 4 + 8 * n as u32);
        out.extend_from_slice(&context.to_be_bytes());
        for &(len, fl) in extents {
            // Compact replies come from windows below 4 GiB.
            out.extend_from_slice(&(len as u32).to_be_bytes());
            out.extend_from_slice(&fl.to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info_data(name: &str, reqs: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    #[test]
    fn go_parses_name_and_requests() {
        let o = ClientOption::parse(opt::GO, &info_data("disk", &[3, 1])).unwrap();
        assert_eq!(o, ClientOption::Go(InfoRequest { name: "disk".into(), requests: vec![3, 1] }));
    }

    #[test]
    fn go_with_a_count_larger_than_the_data_is_invalid() {
        let mut d = info_data("", &[]);
        d[4..6].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(ClientOption::parse(opt::GO, &d).is_err());
    }

    #[test]
    fn stray_bytes_and_bad_strings_are_invalid() {
        let mut d = info_data("x", &[1]);
        d.push(0);
        assert!(ClientOption::parse(opt::INFO, &d).is_err());
        assert!(ClientOption::parse(opt::INFO, &info_data("a\0b", &[])).is_err());
        let mut bad_utf8 = info_data("ab", &[]);
        bad_utf8[4] = 0xff;
        assert!(ClientOption::parse(opt::INFO, &bad_utf8).is_err());
        let mut huge = 0x1_0000u32.to_be_bytes().to_vec();
        huge.extend(vec![b'a'; 16]);
        assert!(ClientOption::parse(opt::INFO, &huge).is_err());
        assert!(ClientOption::parse(opt::LIST, &[1]).is_err());
        assert!(ClientOption::parse(opt::STRUCTURED_REPLY, &[0, 0]).is_err());
    }

    #[test]
    fn meta_queries() {
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:allocation", "qemu:"] {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        let o = ClientOption::parse(opt::SET_META_CONTEXT, &d).unwrap();
        assert_eq!(
            o,
            ClientOption::SetMetaContext(MetaQuery {
                export: String::new(),
                queries: vec!["base:allocation".into(), "qemu:".into()]
            })
        );
        // A count of 2^32-1 with nothing behind it.
        let mut flood = 0u32.to_be_bytes().to_vec();
        flood.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(ClientOption::parse(opt::LIST_META_CONTEXT, &flood).is_err());
    }

    #[test]
    fn unknown_options_parse_as_unknown() {
        assert_eq!(ClientOption::parse(4242, &[1, 2, 3]).unwrap(), ClientOption::Unknown(4242));
    }

    #[test]
    fn request_header_round_trip_and_bad_magic() {
        let h = RequestHeader { flags: 3, kind: cmd::WRITE, cookie: 0xdead_beef, offset: 1 << 40, length: 4096 };
        assert_eq!(RequestHeader::parse(&h.encode(false), false).unwrap(), h);
        let mut b = h.encode(false);
        b[0] ^= 1;
        assert!(RequestHeader::parse(&b, false).is_err());
        // Extended headers carry 64-bit lengths and their own magic; a
        // compact header is not one.
        let big = RequestHeader { length: 5 << 32, ..h };
        assert_eq!(RequestHeader::parse(&big.encode(true), true).unwrap(), big);
        assert!(RequestHeader::parse(&h.encode(false), true).is_err());
        assert!(RequestHeader::parse(&h.encode(true)[..28], false).is_err());
    }

    #[test]
    fn error_messages_are_cut_on_char_boundaries() {
        let long = "é".repeat(3000);
        let mut out = Vec::new();
        error_chunk(&mut out, ReplyTo { cookie: 1, offset: None }, Errno::Io, &long);
        let len = u16::from_be_bytes([out[24], out[25]]) as usize;
        assert!(len <= MAX_STRING);
        assert!(std::str::from_utf8(&out[26..26 + len]).is_ok());
    }
}
