#!/usr/bin/env python3
"""Writes the seed inputs of the NBD fuzz targets.

  nbd_session/   client byte streams from the greeting's answer on: what
                 qemu-img, nbdinfo and nbdcopy send, plus hostile variants.
  nbd_requests/  a configuration byte, then transmission requests (compact,
                 or extended when the byte's bit 5 asks for extended headers).
  nbd_client/    a configuration byte, then what a server sends to oxqcow's
                 NBD client (`oxqcow_nbd::fuzzing::drive_client`): as
                 qemu-nbd answers with extended headers, with structured
                 replies only, with simple replies only, the depth context,
                 an export listing, and broken answers.
  open_any_check/ images of the formats other than qcow2 that oxqcow
                 opens, made by qemu-img (which this needs): qcow (v1)
                 images, plain, compressed, with a backing name, AES
                 encrypted, and a LUKS image's first 4 KiB (its header).
  open_secret_check/ encrypted images made by qemu-img and written by
                 qemu-io with the passphrase "fuzz" and the shortest
                 iter-time: luks with four ciphers, modes, IV generators
                 and hashes, qcow2 with LUKS and with AES, qcow with AES;
                 each holds 0x5a at 0..4 KiB and 0xa5 at 40..48 KiB.

The seeds are committed; rerun this after changing it. fuzz/run.sh copies
them into the (git-ignored) corpus before fuzzing:

  fuzz/run.sh 60 nbd_session

and `cargo test -p oxqcow-nbd --test fuzz_seeds` runs the drivers over
them and over mutations of them.
"""
import os
import struct
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META, OPT_SET_META, OPT_EXTENDED = 8, 9, 10, 11
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = range(8)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO, PAYLOAD_LEN = 1, 2, 4, 8, 16, 32


def option(code, data=b""):
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data


def string(s):
    b = s.encode()
    return struct.pack(">I", len(b)) + b


def info(name, reqs):
    return string(name) + struct.pack(">H", len(reqs)) + b"".join(struct.pack(">H", r) for r in reqs)


def meta(name, queries):
    return string(name) + struct.pack(">I", len(queries)) + b"".join(string(q) for q in queries)


def request(kind, offset, length, flags=0, cookie=1, payload=b"", extended=False):
    if extended:
        return struct.pack(">IHHQQQ", EXTENDED_REQUEST_MAGIC, flags, kind, cookie, offset, length) + payload
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, kind, cookie, offset, length) + payload


def qemu_handshake():
    # QEMU 10: extended headers first; structured replies only if refused.
    return (struct.pack(">I", 3) + option(OPT_EXTENDED)
            + option(OPT_SET_META, meta("", ["base:allocation"])) + option(OPT_GO, info("", [3])))


def io_requests(extended=False):
    x = extended
    # With extended headers a write's length is its payload's, and a block
    # status may name its contexts in a payload (effect length, ids).
    wflags = PAYLOAD_LEN if x else 0
    out = (request(WRITE, 4096, 512, flags=wflags, payload=b"\xab" * 512, extended=x)
           + request(READ, 0, 65536 * 2, cookie=2, extended=x)
           + request(READ, 4000, 200, flags=DF, cookie=3, extended=x)
           + request(BLOCK_STATUS, 0, 1 << 20, cookie=4, extended=x)
           + request(BLOCK_STATUS, 0, 1 << 20, flags=REQ_ONE, cookie=5, extended=x))
    if x:
        out += request(BLOCK_STATUS, 0, 12, flags=PAYLOAD_LEN, cookie=12, extended=x,
                       payload=struct.pack(">QI", 1 << 20, 0))
    return (out
            + request(WRITE_ZEROES, 65536, 65536, flags=FAST_ZERO, cookie=6, extended=x)
            + request(WRITE_ZEROES, 100, 100, flags=NO_HOLE | FUA, cookie=7, extended=x)
            + request(TRIM, 0, 1 << 20, cookie=8, extended=x)
            + request(CACHE, 0, 1 << 20, cookie=9, extended=x)
            + request(FLUSH, 0, 0, cookie=10, extended=x)
            + request(DISC, 0, 0, cookie=11, extended=x))


# The server's side, for the nbd_client target.
NBDMAGIC = 0x4E42444D41474943
OPTION_REPLY_MAGIC = 0x0003E889045565A9
SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, EXTENDED_REPLY_MAGIC = 0x67446698, 0x668E33EF, 0x6E8A278C
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR_UNSUP = (1 << 31) | 1
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3
DONE = 1
CHUNK_NONE, CHUNK_DATA, CHUNK_HOLE, CHUNK_STATUS, CHUNK_STATUS_EXT, CHUNK_ERROR = 0, 1, 2, 5, 6, (1 << 15) | 1
HAS_FLAGS, READ_ONLY, SEND_FLUSH, SEND_WRITE_ZEROES = 1, 2, 4, 64
DISK = 1 << 20


def greeting():
    return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3)


def opt_reply(opt, kind, data=b""):
    return struct.pack(">QIII", OPTION_REPLY_MAGIC, opt, kind, len(data)) + data


def negotiation(framing, context="base:allocation", flags=HAS_FLAGS | SEND_FLUSH | SEND_WRITE_ZEROES):
    """The answers to oxqcow's client: extended headers, structured replies
    ("structured": extended refused) or neither ("simple"); the context;
    the export's size and flags."""
    out = greeting()
    if framing == "extended":
        out += opt_reply(OPT_EXTENDED, REP_ACK)
    else:
        out += opt_reply(OPT_EXTENDED, REP_ERR_UNSUP)
        out += opt_reply(OPT_STRUCTURED_REPLY, REP_ACK if framing == "structured" else REP_ERR_UNSUP)
    if framing != "simple":
        out += (opt_reply(OPT_SET_META, REP_META_CONTEXT, struct.pack(">I", 1) + context.encode())
                + opt_reply(OPT_SET_META, REP_ACK))
    return (out + opt_reply(OPT_GO, REP_INFO, struct.pack(">HQH", INFO_EXPORT, DISK, flags))
            + opt_reply(OPT_GO, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096, 32 << 20))
            + opt_reply(OPT_GO, REP_ACK))


def chunk(framing, cookie, kind, payload, flags=DONE, offset=0):
    if framing == "extended":
        return struct.pack(">IHHQQQ", EXTENDED_REPLY_MAGIC, flags, kind, cookie, offset, len(payload)) + payload
    return struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, flags, kind, cookie, len(payload)) + payload


def simple_reply(cookie, error=0, data=b""):
    return struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, cookie) + data


def status_reply(framing, cookie, extents):
    if framing == "extended":
        body = struct.pack(">II", 1, len(extents)) + b"".join(struct.pack(">QQ", l, f) for l, f in extents)
        return chunk(framing, cookie, CHUNK_STATUS_EXT, body)
    body = struct.pack(">I", 1) + b"".join(struct.pack(">II", l, f) for l, f in extents)
    return chunk(framing, cookie, CHUNK_STATUS, body)


def read_reply(framing, cookie, data):
    """Data, then a hole, as qemu-nbd splits a read (simple: whole)."""
    if framing == "simple":
        return simple_reply(cookie, data=data)
    half = len(data) // 2
    return (chunk(framing, cookie, CHUNK_DATA, struct.pack(">Q", 0) + data[:half], flags=0)
            + chunk(framing, cookie, CHUNK_HOLE, struct.pack(">QI", half, len(data) - half)))


def done_reply(framing, cookie):
    if framing == "extended":
        return chunk(framing, cookie, CHUNK_NONE, b"")
    return simple_reply(cookie)


def client_session(framing, extents=((65536, 0), (DISK - 65536, 3)), context="base:allocation"):
    """What the driver's client asks, answered in order: block status (with
    a context), a 16 KiB read, a write, write zeroes, flush."""
    out = negotiation(framing, context)
    cookie = 1
    if framing != "simple":
        out += status_reply(framing, cookie, extents)
        cookie += 1
    out += read_reply(framing, cookie, b"\x5a" * 8192 + bytes(8192))
    for c in range(cookie + 1, cookie + 4):
        out += done_reply(framing, c)
    return out


def listing():
    out = greeting() + opt_reply(OPT_EXTENDED, REP_ACK)
    for name, desc in (("", "the default"), ("disk", "")):
        out += opt_reply(OPT_LIST, REP_SERVER, struct.pack(">I", len(name)) + name.encode() + desc.encode())
    out += opt_reply(OPT_LIST, REP_ACK)
    for flags in (HAS_FLAGS | SEND_FLUSH, HAS_FLAGS | READ_ONLY):
        out += (opt_reply(OPT_INFO, REP_INFO, struct.pack(">HQH", INFO_EXPORT, DISK, flags))
                + opt_reply(OPT_INFO, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096, 32 << 20))
                + opt_reply(OPT_INFO, REP_ACK))
        out += (opt_reply(OPT_LIST_META, REP_META_CONTEXT, struct.pack(">I", 1) + b"base:allocation")
                + opt_reply(OPT_LIST_META, REP_META_CONTEXT, struct.pack(">I", 2) + b"qemu:allocation-depth")
                + opt_reply(OPT_LIST_META, REP_ACK))
    return out


def write(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


write("nbd_session", "qemu-img", qemu_handshake() + io_requests(extended=True))
write("nbd_session", "nbdinfo-list", struct.pack(">I", 1) + option(OPT_STRUCTURED_REPLY) + option(OPT_LIST)
      + option(OPT_INFO, info("", [3, 1, 2])) + option(OPT_LIST_META, meta("", [])) + option(OPT_ABORT))
write("nbd_session", "nbdcopy", struct.pack(">I", 1) + option(OPT_STRUCTURED_REPLY)
      + option(OPT_SET_META, meta("", ["base:allocation", "qemu:allocation-depth"]))
      + option(OPT_GO, info("", [])) + io_requests())
write("nbd_session", "export-name-simple", struct.pack(">I", 3) + option(OPT_EXPORT_NAME, b"") + io_requests())
write("nbd_session", "hostile-options", struct.pack(">I", 1) + option(4242, b"x" * 100) + option(OPT_STARTTLS)
      + option(OPT_SET_META, meta("", ["base:allocation"])) + option(OPT_GO, b"\xff\xff\xff\xff")
      + option(OPT_INFO, info("", [1] * 300)) + option(OPT_LIST_META, struct.pack(">II", 0, 0xFFFFFFFF))
      + option(OPT_GO, info("", [])) + request(READ, 1 << 62, 1 << 31) + request(WRITE, 0, 0xFFFFFFFF))
write("nbd_requests", "structured-contexts", bytes([0b00111]) + io_requests())
write("nbd_requests", "simple", bytes([0]) + io_requests())
write("nbd_requests", "extended-contexts", bytes([0b100111]) + io_requests(extended=True))
write("nbd_requests", "read-only", bytes([0b01011]) + io_requests())
write("nbd_requests", "hostile", bytes([0b11111]) + request(READ, 0xFFFFFFFFFFFFFFFF, 10) + request(99, 0, 0)
      + request(READ, 0, 1, flags=0xFFFF) + request(BLOCK_STATUS, 0, 0) + request(WRITE, (1 << 20) - 1, 2, payload=b"zz")
      + request(WRITE, 0, 40 << 20))

write("nbd_client", "extended", bytes([0]) + client_session("extended"))
write("nbd_client", "structured", bytes([0]) + client_session("structured"))
write("nbd_client", "simple", bytes([0]) + client_session("simple"))
write("nbd_client", "allocation-depth", bytes([2]) + client_session(
    "extended", extents=((4096, 0), (4096, 1), (8192, 2), (DISK - 16384, 3)), context="qemu:allocation-depth"))
write("nbd_client", "list", bytes([1]) + listing())
# The read fails with an error chunk carrying a message; the writes go on.
write("nbd_client", "read-error", bytes([0]) + negotiation("extended")
      + status_reply("extended", 1, [(DISK, 0)])
      + chunk("extended", 2, CHUNK_ERROR, struct.pack(">IH", 5, 7) + b"EIO now")
      + b"".join(done_reply("extended", c) for c in (3, 4, 5)))
# Broken: extents of length 0, a data chunk outside the read, a reply to a
# cookie never sent.
write("nbd_client", "hostile", bytes([0]) + negotiation("structured")
      + status_reply("structured", 1, [(0, 0), (0xFFFFFFFF, 0xFFFFFFFF)])
      + chunk("structured", 2, CHUNK_DATA, struct.pack(">Q", (1 << 64) - 8) + b"x" * 16)
      + simple_reply(99))


def qemu_img(*args):
    subprocess.run(["qemu-img", *args], check=True, stdout=subprocess.DEVNULL)


def qemu_io(fmt, path, *commands):
    cmd = ["qemu-io", "-f", fmt]
    for c in commands:
        cmd += ["-c", c]
    subprocess.run(cmd + [path], check=True, stdout=subprocess.DEVNULL)


with tempfile.TemporaryDirectory() as tmp:
    def path(name):
        return os.path.join(tmp, name)

    def seed(name, file_name, limit=None):
        with open(path(file_name), "rb") as f:
            write("open_any_check", name, f.read(limit))

    qemu_img("create", "-q", "-f", "qcow", path("a.qcow"), "1M")
    qemu_io("qcow", path("a.qcow"), "write -P 0x11 0 5000", "write -P 0x22 600k 8k")
    seed("qcow", "a.qcow")
    # qemu-img ends a compressed qcow convert with an error (its last,
    # empty compressed write fails) after writing every cluster.
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow", path("a.qcow"), path("c.qcow")],
                   stderr=subprocess.DEVNULL)
    seed("qcow-compressed", "c.qcow")
    qemu_img("create", "-q", "-f", "qcow", "-b", "a.qcow", "-F", "qcow", path("b.qcow"))
    qemu_io("qcow", path("b.qcow"), "write -P 0x33 4096 4096")
    seed("qcow-backing", "b.qcow")
    qemu_img("create", "-q", "-f", "qcow", "--object", "secret,id=s,data=fuzz",
             "-o", "encrypt.format=aes,encrypt.key-secret=s", path("e.qcow"), "1M")
    seed("qcow-aes", "e.qcow")
    qemu_img("create", "-q", "-f", "luks", "--object", "secret,id=s,data=fuzz",
             "-o", "key-secret=s,iter-time=10", path("l.luks"), "1M")
    seed("luks-header", "l.luks", 4096)

    # Encrypted images: what `open_secret_check` unlocks. Ciphers with
    # 16-byte keys keep a LUKS file near 580 KiB (eight slots of key
    # material before the payload); XTS, which needs 32, twice that.
    def encrypted_io(driver, file_name):
        secret = "encrypt.key-secret" if driver != "luks" else "key-secret"
        subprocess.run(["qemu-io", "--object", "secret,id=s,data=fuzz", "--image-opts",
                        f"driver={driver},{secret}=s,file.filename={path(file_name)}",
                        "-c", "write -P 0x5a 0 4k", "-c", "write -P 0xa5 40k 8k"],
                       check=True, stdout=subprocess.DEVNULL)
        with open(path(file_name), "rb") as f:
            write("open_secret_check", file_name, f.read())

    luks_specs = {
        "luks-aes128-cbc-essiv-sha1": "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,"
                                      "ivgen-hash-alg=sha256,hash-alg=sha1",
        "luks-cast5-cbc-plain64-sha512": "cipher-alg=cast5-128,cipher-mode=cbc,ivgen-alg=plain64,"
                                         "hash-alg=sha512",
        "luks-twofish128-ctr-plain-sha224": "cipher-alg=twofish-128,cipher-mode=ctr,ivgen-alg=plain,"
                                            "hash-alg=sha224",
        "luks-aes128-xts-plain64-sha256": "cipher-alg=aes-128,cipher-mode=xts,ivgen-alg=plain64,"
                                          "hash-alg=sha256",
    }
    for name, spec in luks_specs.items():
        qemu_img("create", "-q", "-f", "luks", "--object", "secret,id=s,data=fuzz",
                 "-o", f"key-secret=s,iter-time=1,{spec}", path(name), "64K")
        encrypted_io("luks", name)
    qemu_img("create", "-q", "-f", "qcow2", "--object", "secret,id=s,data=fuzz",
             "-o", "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=1,"
             "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain64,"
             "cluster_size=4096", path("qcow2-luks-aes128-cbc-plain64"), "64K")
    encrypted_io("qcow2", "qcow2-luks-aes128-cbc-plain64")
    qemu_img("create", "-q", "-f", "qcow2", "--object", "secret,id=s,data=fuzz",
             "-o", "encrypt.format=aes,encrypt.key-secret=s,cluster_size=512", path("qcow2-aes"), "64K")
    encrypted_io("qcow2", "qcow2-aes")
    qemu_img("create", "-q", "-f", "qcow", "--object", "secret,id=s,data=fuzz",
             "-o", "encrypt.format=aes,encrypt.key-secret=s", path("qcow-aes"), "64K")
    encrypted_io("qcow", "qcow-aes")
