"""Builders for the tlshello tests: hand-made ClientHellos and real ones from Python's ``ssl``.

The hand-made builder writes the structures of RFC 8446 §4.1.2 field by field, so a test can
put GREASE where it likes, reorder extensions, or break exactly one rule. (Named
``tlshello_helpers`` because the test directories are not packages and module names must be
unique across ``tests/``.)
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Sequence

from ferryman import tlshello
from ferryman.errors import RemoteProtocolError

GREASE = tuple(0x0A0A + 0x1010 * i for i in range(16))
TLS13_SUITES = (0x1301, 0x1302, 0x1303)
TLS12_SUITES = (0xC02B, 0xC02F, 0xC02C, 0xC030)


def u8(n: int) -> bytes:
    return n.to_bytes(1, "big")


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def u24(n: int) -> bytes:
    return n.to_bytes(3, "big")


def vec8(body: bytes) -> bytes:
    return u8(len(body)) + body


def vec16(body: bytes) -> bytes:
    return u16(len(body)) + body


def ext(ext_type: int, body: bytes) -> bytes:
    return u16(ext_type) + vec16(body)


def sni_ext(*names: bytes | tuple[int, bytes]) -> bytes:
    """server_name with host_name entries (bytes) or (name_type, name) pairs."""
    entries = b""
    for name in names:
        name_type, value = name if isinstance(name, tuple) else (0, name)
        entries += u8(name_type) + vec16(value)
    return ext(0, vec16(entries))


def alpn_ext(*protocols: bytes) -> bytes:
    return ext(16, vec16(b"".join(vec8(p) for p in protocols)))


def versions_ext(*versions: int) -> bytes:
    return ext(43, vec8(b"".join(u16(v) for v in versions)))


def groups_ext(*groups: int) -> bytes:
    return ext(10, vec16(b"".join(u16(g) for g in groups)))


def key_share_ext(group: int = 0x001D, key: bytes = b"\x11" * 32) -> bytes:
    return ext(51, vec16(u16(group) + vec16(key)))


def psk_ext() -> bytes:
    identity = vec16(b"ticket") + (0).to_bytes(4, "big")
    return ext(41, vec16(identity) + vec16(vec8(b"\x22" * 32)))


def hello_body(
    *,
    legacy_version: int = 0x0303,
    random: bytes = b"\x42" * 32,
    session_id: bytes = b"\x07" * 32,
    cipher_suites: Sequence[int] = TLS13_SUITES,
    compression: bytes = b"\x00",
    extensions: Iterable[bytes] | None = (),
    raw_suites: bytes | None = None,
) -> bytes:
    """A ClientHello body; ``extensions=None`` omits the block entirely (TLS 1.0 style)."""
    suites = raw_suites if raw_suites is not None else b"".join(u16(s) for s in cipher_suites)
    body = u16(legacy_version) + random + vec8(session_id) + vec16(suites) + vec8(compression)
    if extensions is not None:
        body += vec16(b"".join(extensions))
    return body


def handshake(body: bytes, msg_type: int = 1) -> bytes:
    return u8(msg_type) + u24(len(body)) + body


def records(
    payload: bytes,
    sizes: Sequence[int] | None = None,
    *,
    version: int = 0x0301,
    content_type: int = 22,
) -> bytes:
    """Wrap ``payload`` in records of the given ``sizes`` (clamped), then full ones for the rest."""
    out = b""
    pos = 0
    for wanted in sizes or ():
        size = min(wanted, len(payload) - pos)  # never write a record longer than its payload
        if size == 0:
            break
        out += u8(content_type) + u16(version) + u16(size) + payload[pos : pos + size]
        pos += size
    while pos < len(payload) or not out:
        chunk = payload[pos : pos + 16384]
        out += u8(content_type) + u16(version) + u16(len(chunk)) + chunk
        pos += len(chunk)
    return out


def client_hello(extensions: Iterable[bytes] = (), *, sizes: Sequence[int] | None = None) -> bytes:
    """Records carrying one default ClientHello with these extensions."""
    return records(handshake(hello_body(extensions=extensions)), sizes)


def python_hello(
    server_hostname: str | None,
    alpn: Sequence[str] = (),
    *,
    maximum_version: ssl.TLSVersion | None = None,
) -> bytes:
    """The first flight of a real ``ssl`` client, produced in memory (no socket)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if maximum_version is not None:
        ctx.maximum_version = maximum_version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    try:
        conn.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


Outcome = tlshello.SniffResult | str


def outcome(data: bytes) -> Outcome:
    """``parse_client_hello`` with a RemoteProtocolError turned into ``"error: <message>"``."""
    try:
        return tlshello.parse_client_hello(data)
    except RemoteProtocolError as exc:
        return f"error: {exc}"


def sniff_in_chunks(chunks: Iterable[bytes]) -> Outcome:
    """Feed chunks to one ClientHelloSniffer, asking for an event after each, like a driver.

    Empty chunks are skipped: for the sniffer ``b""`` means EOF, and a socket read never
    returns an empty chunk otherwise.
    """
    sniffer = tlshello.ClientHelloSniffer()
    result: tlshello.SniffResult = tlshello.NEED_DATA
    try:
        for chunk in chunks:
            if not chunk:
                continue
            sniffer.receive_data(chunk)
            result = sniffer.next_event()
            if result is not tlshello.NEED_DATA:
                break
    except RemoteProtocolError as exc:
        return f"error: {exc}"
    return result
