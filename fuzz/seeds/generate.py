#!/usr/bin/env python3
"""Writes the seed inputs of the NBD fuzz targets.

  nbd_session/   client byte streams from the greeting's answer on: what
                 qemu-img, nbdinfo and nbdcopy send, plus hostile variants.
  nbd_requests/  a configuration byte, then transmission requests (compact,
                 or extended when the byte's bit 5 asks for extended headers).

The seeds are committed; rerun this after changing it. fuzz/run.sh copies
them into the (git-ignored) corpus before fuzzing:

  fuzz/run.sh 60 nbd_session

and `cargo test -p oxqcow-nbd --test fuzz_seeds` runs the drivers over
them and over mutations of them.
"""
import os
import struct

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
