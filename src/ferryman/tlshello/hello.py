"""The ClientHello message body: what we decode from it and how strictly.

Owns: :class:`ClientHello` and :func:`decode_client_hello`, which turns one complete,
reassembled ClientHello handshake body (RFC 8446 §4.1.2, RFC 5246 §7.4.1.2) into the few fields a
router needs: SNI, ALPN, versions and cipher suites.

Must not: touch the record layer (``parse.py`` owns framing, caps and reassembly), buffer, or do
I/O. It also must not be lenient where the eventual TLS server would not be: following tcpproxy's
``sni.go``, the framing is checked "all the way up to the SNI field" and beyond, so the name we
route on is the name the backend's TLS stack will see. A router that accepted a hello the backend
rejects, or read a different SNI than the backend, could be steered by a crafted hello. (The
host name's *syntax* is the exception, below: whether ``10.1.2.3`` is acceptable is the
backend's call, and a name we cannot route on falls back instead of matching a rule.)

Strictness decisions, each with its source:

- every vector must exactly fill its container; trailing bytes anywhere are an error;
- at most one extension of each type (RFC 8446 §4.2, RFC 5246 §7.4.1.4);
- ``pre_shared_key`` must be the last extension (RFC 8446 §4.2.11);
- SNI: a non-empty ``server_name_list`` (RFC 6066 §3); entries of other name types are skipped
  as Go's crypto/tls does, but two ``host_name`` entries are an error ("MUST NOT contain more
  than one name of the same name_type");
- the host name itself is *not* held to RFC 6066's syntax (see :func:`_host_name`): real clients
  send a trailing dot, IP literals and odd labels, and HAProxy and Go route such hellos rather
  than refuse them. A name that is printable ASCII comes back for routing (trailing dot
  removed, lower-cased); anything else (NUL, spaces, control or non-ASCII bytes, over-long)
  counts as no usable SNI. Either way the listener's rules and fallback decide, and the framing
  around the name is as strict as everywhere else;
- GREASE values (RFC 8701) are accepted everywhere and dropped from the decoded tuples, because
  receivers must ignore them (RFC 8701 §3) and routing on them would be meaningless.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from ferryman.errors import RemoteProtocolError
from ferryman.tlshello._reader import Reader

# Extension types (IANA "TLS ExtensionType Values").
EXT_SERVER_NAME: Final = 0  # RFC 6066 §3
EXT_ALPN: Final = 16  # RFC 7301 §3.1
EXT_PRE_SHARED_KEY: Final = 41  # RFC 8446 §4.2.11
EXT_SUPPORTED_VERSIONS: Final = 43  # RFC 8446 §4.2.1
EXT_ENCRYPTED_CLIENT_HELLO: Final = 0xFE0D  # draft-ietf-tls-esni (ECH): SNI is the public name

NAME_TYPE_HOST_NAME: Final = 0  # RFC 6066 §3

MAX_SESSION_ID_LENGTH: Final = 32  # RFC 8446 §4.1.2 legacy_session_id<0..32>
MAX_HOST_NAME_LENGTH: Final = 253  # RFC 1035 §2.3.4: 255 octets on the wire, 253 as text

_PRINTABLE: Final = frozenset(range(0x21, 0x7F))  # ASCII graphic characters: no space or control


def is_grease(value: int) -> bool:
    """True for the 16 reserved GREASE code points 0x0A0A, 0x1A1A, … 0xFAFA (RFC 8701 §2)."""
    return (value & 0x0F0F) == 0x0A0A and (value >> 8) == (value & 0xFF)


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What the gateway learned from a client's first flight. Do not subclass.

    All tuples keep the client's order (it is the client's preference order) with GREASE values
    removed.
    """

    sni: str | None
    """The ``host_name`` from ``server_name``, lower-cased (RFC 4343: DNS names are
    case-insensitive) and without a trailing dot; IDNA A-labels (``xn--…``) are kept as sent.
    It is printable ASCII (no space, NUL or control byte) but need not be a valid DNS name:
    ``10.1.2.3`` and ``-bad.example.com`` come through for the rules to match or miss.
    ``None`` when the client sent no SNI, which is valid (tcpproxy returns ``""`` for it, not an
    error), or a name that is not usable (see :func:`_host_name`). With ECH
    (``EXT_ENCRYPTED_CLIENT_HELLO`` in ``extension_types``) this is the outer, public name."""
    alpn: tuple[str, ...]
    """ALPN protocol names (RFC 7301). The wire values are opaque bytes; they are decoded as
    Latin-1 so every value survives (``name.encode("latin-1")`` gives the bytes back). Registered
    identifiers are ASCII, so ``"h2"`` reads as ``"h2"``."""
    legacy_version: int
    """``ClientHello.legacy_version``, e.g. ``0x0303``. TLS 1.3 clients send 0x0303 here and the
    real versions in ``supported_versions`` (RFC 8446 §4.1.2)."""
    supported_versions: tuple[int, ...]
    """The ``supported_versions`` extension (RFC 8446 §4.2.1); empty when it is absent."""
    cipher_suites: tuple[int, ...]
    extension_types: tuple[int, ...]
    """Extension types in wire order, for logging and for spotting ECH."""
    raw_length: int
    """Bytes the records carrying this hello occupied, headers included. Bytes past this offset
    belong to the next records (a TLS 1.3 ChangeCipherSpec, early data) and are not ours."""


def decode_client_hello(body: bytes, *, raw_length: int) -> ClientHello:
    """Decode one complete ClientHello body (the bytes after the 4-byte handshake header).

    Returns:
        The decoded :class:`ClientHello`, carrying ``raw_length`` through.

    Raises:
        RemoteProtocolError: any framing or field rule is broken (see the module docstring).
    """
    r = Reader(body, 0, len(body), "ClientHello")
    legacy_version = r.u16("legacy_version")
    if legacy_version >> 8 != 3:
        # Every TLS/SSL3 version is 3.x (RFC 8446 Appendix D); anything else is not a TLS hello.
        raise RemoteProtocolError(f"ClientHello: legacy_version 0x{legacy_version:04x} is not 3.x")
    r.skip(32, "random")
    r.vector(1, "legacy_session_id", ceiling=MAX_SESSION_ID_LENGTH)
    suites = r.vector(2, "cipher_suites", floor=2)
    if suites.remaining % 2:
        raise RemoteProtocolError("ClientHello: cipher_suites has an odd length")
    cipher_suites = _u16_list(suites, "cipher_suite")
    compression = r.vector(1, "legacy_compression_methods", floor=1)
    # RFC 5246 §7.4.1.2: the list MUST contain the null method (0); TLS 1.3 allows only it.
    if 0 not in compression.raw(compression.remaining, "compression_method"):
        raise RemoteProtocolError("ClientHello: compression methods lack the null method")

    sni: str | None = None
    alpn: tuple[str, ...] = ()
    supported_versions: tuple[int, ...] = ()
    seen: list[int] = []
    # RFC 5246 §7.4.1.2: a TLS 1.0-1.2 hello may end right after the compression methods, with
    # no extensions block at all. When the block is present it must fill the rest exactly.
    if r.remaining:
        extensions = r.vector(2, "extensions")
        r.expect_end()
        while extensions.remaining:
            ext_type = extensions.u16("extension_type")
            data = extensions.vector(2, f"extension 0x{ext_type:04x}")
            if ext_type in seen:
                raise RemoteProtocolError(f"ClientHello: duplicate extension 0x{ext_type:04x}")
            if EXT_PRE_SHARED_KEY in seen:
                raise RemoteProtocolError("ClientHello: pre_shared_key is not the last extension")
            seen.append(ext_type)
            if ext_type == EXT_SERVER_NAME:
                sni = _server_name(data)
            elif ext_type == EXT_ALPN:
                alpn = _alpn(data)
            elif ext_type == EXT_SUPPORTED_VERSIONS:
                supported_versions = _supported_versions(data)
            # Other extensions are only framed (type + length), which is all a router needs.

    return ClientHello(
        sni=sni,
        alpn=alpn,
        legacy_version=legacy_version,
        supported_versions=supported_versions,
        cipher_suites=tuple(s for s in cipher_suites if not is_grease(s)),
        extension_types=tuple(t for t in seen if not is_grease(t)),
        raw_length=raw_length,
    )


def _u16_list(r: Reader, field: str) -> list[int]:
    values = []
    while r.remaining:
        values.append(r.u16(field))
    return values


def _server_name(data: Reader) -> str | None:
    # RFC 6066 §3: ServerNameList server_name_list<1..2^16-1>; a client must not send the empty
    # extension (that form is reserved for the server's acknowledgement).
    names = data.vector(2, "server_name_list", floor=1)
    data.expect_end()
    host: bytes | None = None
    while names.remaining:
        name_type = names.u8("name_type")
        # RFC 6066 only defines host_name; like Go's crypto/tls we assume any other type uses
        # the same 2-byte length prefix, so it can be skipped rather than rejected.
        name = names.vector(2, "HostName", floor=1)
        if name_type != NAME_TYPE_HOST_NAME:
            continue
        if host is not None:
            raise RemoteProtocolError("ClientHello: server_name lists host_name twice")
        host = name.raw(name.remaining, "HostName")
    if host is None:
        raise RemoteProtocolError("ClientHello: server_name carries no host_name entry")
    return _host_name(host)


def _host_name(raw: bytes) -> str | None:
    """The SNI host name to route on: lower-cased, one trailing dot removed; ``None`` when
    it is not usable.

    RFC 6066 §3 asks for a DNS host name "without a trailing dot" and forbids IP literals, but
    clients send both (``curl https://db.example.com./``, ``openssl s_client -servername
    10.1.2.3``), and HAProxy and Go's crypto/tls pass whatever arrived to their routing
    (``req.ssl_sni``, ``ClientHelloInfo.ServerName``) instead of refusing the connection. So
    does this: a name of printable ASCII comes back as sent and the rules match it or fall
    through to the listener's fallback. A name no rule could sensibly be written for, with a
    NUL, a space, a control or non-ASCII byte (U-labels must be sent as A-labels), or longer
    than a DNS name can be, comes back as ``None``: the same as a client that sent no SNI, so
    it too reaches the fallback, or is refused for lack of a name to route on.
    """
    if raw.endswith(b"."):
        raw = raw[:-1]  # the root label of a fully qualified name: same host (RFC 1034 §3.1)
    if not 0 < len(raw) <= MAX_HOST_NAME_LENGTH or not _PRINTABLE.issuperset(raw):
        return None
    return raw.decode("ascii").lower()


def _alpn(data: Reader) -> tuple[str, ...]:
    # RFC 7301 §3.1: ProtocolName protocol_name_list<2..2^16-1>, ProtocolName <1..2^8-1>.
    names = data.vector(2, "protocol_name_list", floor=2)
    data.expect_end()
    protocols = []
    while names.remaining:
        name = names.vector(1, "ProtocolName", floor=1)
        value = name.raw(name.remaining, "ProtocolName")
        # RFC 8701 §2 reserves the two-byte strings 0x0A0A..0xFAFA as GREASE ALPN identifiers.
        if len(value) == 2 and is_grease(int.from_bytes(value, "big")):
            continue
        protocols.append(value.decode("latin-1"))
    return tuple(protocols)


def _supported_versions(data: Reader) -> tuple[int, ...]:
    # RFC 8446 §4.2.1: in a ClientHello, ProtocolVersion versions<2..254>.
    versions = data.vector(1, "supported_versions", floor=2, ceiling=254)
    data.expect_end()
    if versions.remaining % 2:
        raise RemoteProtocolError("ClientHello: supported_versions has an odd length")
    return tuple(v for v in _u16_list(versions, "version") if not is_grease(v))
