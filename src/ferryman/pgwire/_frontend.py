"""Frontend messages: the startup-phase packets and the typed messages a client sends during auth.

Owns: SSLRequest, GSSENCRequest, CancelRequest, StartupMessage (+ :func:`parse_startup_packet`),
PasswordMessage, SASLInitialResponse, SASLResponse, Terminate. Conventions are in
``messages.py``, which re-exports everything here; import from there.

Must not: decide which message is legal when, or do I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar, Final, TypeAlias

from ferryman.errors import LocalProtocolError, RemoteProtocolError
from ferryman.pgwire import sqlstate
from ferryman.pgwire._backend import NegotiateProtocolVersion
from ferryman.pgwire._framing import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    INT32,
    INT32_PAIR,
    MAX_CANCEL_KEY,
    MIN_CANCEL_KEY,
    PROTOCOL_3_0,
    SSL_REQUEST_CODE,
    BodyReader,
    cbytes,
    check_cancel_key,
    cstring,
    decode,
    int32,
    redacted,
    typed_message,
    untyped_packet,
)

# --- startup-phase (untyped) frontend packets ------------------------------------------------


@dataclass(frozen=True, slots=True)
class SSLRequest:
    """Frontend asks to switch to TLS; the answer is one byte, see :class:`SSLResponse`."""

    def encode(self) -> bytes:
        """Return the 8-byte packet ``00 00 00 08 04 d2 16 2f``."""
        return untyped_packet(SSL_REQUEST_CODE)

    @classmethod
    def parse(cls, body: bytes) -> SSLRequest:
        """Parse the body after the request code; it must be empty."""
        BodyReader(body, "SSLRequest").end()
        return cls()


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    """Frontend asks for GSSAPI encryption; ferryman always answers ``N``."""

    def encode(self) -> bytes:
        """Return the 8-byte packet ``00 00 00 08 04 d2 16 30``."""
        return untyped_packet(GSSENC_REQUEST_CODE)

    @classmethod
    def parse(cls, body: bytes) -> GSSENCRequest:
        """Parse the body after the request code; it must be empty."""
        BodyReader(body, "GSSENCRequest").end()
        return cls()


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """Cancel the query running in the backend session named by ``(process_id, secret_key)``.

    Sent on a fresh connection instead of a StartupMessage; the server closes it without a
    reply. ``secret_key`` is 4 bytes in protocol 3.0 and up to 256 in 3.2.
    """

    process_id: int
    secret_key: bytes

    def __repr__(self) -> str:
        return f"CancelRequest(process_id={self.process_id}, secret_key={redacted(self.secret_key)})"

    def encode(self) -> bytes:
        """Return the packet; raises LocalProtocolError for a key outside 4..256 bytes."""
        check_cancel_key(self.secret_key)
        return untyped_packet(CANCEL_REQUEST_CODE, int32(self.process_id) + self.secret_key)

    @classmethod
    def parse(cls, body: bytes) -> CancelRequest:
        """Parse the body after the request code (process id, then the key to the end)."""
        reader = BodyReader(body, "CancelRequest")
        process_id = reader.int32()
        key = reader.rest()
        if not MIN_CANCEL_KEY <= len(key) <= MAX_CANCEL_KEY:
            raise RemoteProtocolError(f"invalid length of cancel request key ({len(key)} bytes)")
        return cls(process_id, key)


_REDACTED_PARAMETERS: Final = frozenset({"options"})
"""Startup parameters whose values stay out of ``repr``: ``options`` can carry ``-c`` settings
holding secrets (STYLE 2.5)."""


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """The client's first real packet: protocol version and run-time parameters.

    ``parameters`` keeps wire order and is made read-only. Names and values are decoded
    losslessly (UTF-8 with ``surrogateescape``, see ``_framing.decode``): a LATIN1 client's
    ``application_name`` is accepted as PostgreSQL accepts it, and :meth:`encode` gives back
    the client's exact bytes. Check :func:`~ferryman.pgwire.is_utf8` before using a value as
    text. ``protocol_version`` is ``major << 16 | minor``; :func:`parse_startup_packet` only
    lets major 3 through, so a minor above 0 (3.2 from PostgreSQL 18 clients) and ``_pq_.*``
    protocol options are the cases to answer with :meth:`negotiate` first.
    """

    parameters: Mapping[str, str]
    protocol_version: int = PROTOCOL_3_0

    def __post_init__(self) -> None:
        object.__setattr__(self, "parameters", MappingProxyType(dict(self.parameters)))

    def __repr__(self) -> str:
        shown = {k: ("<redacted>" if k in _REDACTED_PARAMETERS else v) for k, v in self.parameters.items()}
        version = f"{self.major_version}.{self.minor_version}"
        return f"StartupMessage(parameters={shown!r}, protocol_version={version})"

    @property
    def major_version(self) -> int:
        """The protocol major version (3)."""
        return self.protocol_version >> 16

    @property
    def minor_version(self) -> int:
        """The protocol minor version the client asked for (0, or 2 for protocol 3.2)."""
        return self.protocol_version & 0xFFFF

    @property
    def user(self) -> str | None:
        """The ``user`` parameter (required by PostgreSQL; the server codec enforces it)."""
        return self.parameters.get("user")

    @property
    def database(self) -> str | None:
        """The ``database`` parameter, defaulting to the user name as PostgreSQL does."""
        return self.parameters.get("database") or self.user

    @property
    def protocol_options(self) -> tuple[str, ...]:
        """Names of ``_pq_.*`` protocol-extension parameters, which we recognise none of."""
        return tuple(k for k in self.parameters if k.startswith("_pq_."))

    def negotiate(self) -> NegotiateProtocolVersion | None:
        """The NegotiateProtocolVersion to send before authentication, or ``None``.

        PostgreSQL docs, "Protocol versions": a server that supports an older minor version or
        does not recognise ``_pq_.`` options answers NegotiateProtocolVersion and carries on in
        the version it named. We speak 3.0 only, and recognise no ``_pq_.`` option; like
        PostgreSQL 15/16 we name 3.0 as a whole version word and list every such option in
        the order the client sent them (``ProcessStartupPacket``).
        """
        if self.minor_version == 0 and not self.protocol_options:
            return None
        return NegotiateProtocolVersion(PROTOCOL_3_0, self.protocol_options)

    def encode(self) -> bytes:
        """Return the packet; raises LocalProtocolError for empty names or NUL in strings."""
        body = bytearray(int32(self.protocol_version))
        for name, value in self.parameters.items():
            if not name:
                raise LocalProtocolError("startup parameter names cannot be empty")
            body += cstring(name) + cstring(value)
        body += b"\x00"
        return INT32.pack(len(body) + 4) + bytes(body)

    @classmethod
    def parse(cls, version: int, body: bytes) -> StartupMessage:
        """Parse the name/value pairs that follow the protocol version word.

        Bytes that are not UTF-8 are kept, not refused: PostgreSQL takes start-up parameters
        in the client's encoding, and whoever interprets one checks it (see the class doc).

        Raises:
            RemoteProtocolError: bad layout or duplicate names (08P01), or no ``user``
                (28000, as PostgreSQL answers).
        """
        reader = BodyReader(body, "StartupMessage")
        params: dict[str, str] = {}
        while True:
            raw_name = reader.raw_cstring()
            if not raw_name:
                break
            name = decode(raw_name)
            value = decode(reader.raw_cstring())
            # PostgreSQL lets the last duplicate win; we refuse, so what the gateway checks and
            # what it forwards can never disagree. (``decode`` is injective: equal names here
            # are equal bytes on the wire.)
            if name in params:
                raise RemoteProtocolError(f"duplicate startup parameter {name!r}")
            params[name] = value
        if reader.remaining:
            raise RemoteProtocolError("invalid startup packet layout: expected terminator as last byte")
        if not params.get("user"):
            raise RemoteProtocolError(
                "no PostgreSQL user name specified in startup packet",
                sqlstate=sqlstate.INVALID_AUTHORIZATION_SPECIFICATION,
            )
        return cls(params, version)


StartupPacket: TypeAlias = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage


def parse_startup_packet(packet: bytes) -> StartupPacket:
    """Parse one whole startup-phase packet (its length word included).

    Raises:
        RemoteProtocolError: the length word disagrees with ``len(packet)``, the code is
            neither a known request nor protocol 3.x ("unsupported frontend protocol",
            0A000 as PostgreSQL), or the body is malformed (08P01).
    """
    if len(packet) < 8:
        raise RemoteProtocolError(f"invalid length of startup packet ({len(packet)} bytes)")
    length, code = INT32_PAIR.unpack_from(packet)
    if length != len(packet):
        raise RemoteProtocolError(f"startup packet length word {length} != {len(packet)} bytes")
    body = packet[8:]
    if code == SSL_REQUEST_CODE:
        return SSLRequest.parse(body)
    if code == GSSENC_REQUEST_CODE:
        return GSSENCRequest.parse(body)
    if code == CANCEL_REQUEST_CODE:
        return CancelRequest.parse(body)
    major, minor = (code >> 16) & 0xFFFF, code & 0xFFFF
    if major != 3:
        # PostgreSQL's words and code (postmaster.c, ProcessStartupPacket). It answers a 2.0
        # client in the old message format; protocol 2 clients are gone (libpq 14 dropped
        # them), so ferryman answers every version in the 3.0 format.
        raise RemoteProtocolError(
            f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0",
            sqlstate=sqlstate.FEATURE_NOT_SUPPORTED,
        )
    return StartupMessage.parse(code, body)


# --- typed frontend messages ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PasswordMessage:
    """A password in answer to AuthenticationCleartextPassword or ...MD5Password.

    ``password`` is the raw bytes without the NUL (for MD5 it is ``"md5" + hex``).
    """

    password: bytes
    TYPE: ClassVar[bytes] = b"p"

    def __repr__(self) -> str:
        return f"PasswordMessage(password={redacted(self.password)})"

    def encode(self) -> bytes:
        """Return the frame; raises LocalProtocolError if the password contains NUL."""
        return typed_message(self.TYPE, cbytes(self.password))

    @classmethod
    def parse(cls, body: bytes) -> PasswordMessage:
        """Parse a ``p`` body as a password ("invalid password packet size" otherwise)."""
        reader = BodyReader(body, "PasswordMessage")
        password = reader.raw_cstring()
        reader.end()
        return cls(password)


@dataclass(frozen=True, slots=True)
class SASLInitialResponse:
    """First SASL message: the chosen mechanism and its optional initial response."""

    mechanism: str
    data: bytes | None
    TYPE: ClassVar[bytes] = b"p"

    def __repr__(self) -> str:
        return f"SASLInitialResponse(mechanism={self.mechanism!r}, data={redacted(self.data)})"

    def encode(self) -> bytes:
        """Return the frame (``Int32(-1)`` stands for "no initial response")."""
        data = b"" if self.data is None else self.data
        length = -1 if self.data is None else len(data)
        return typed_message(self.TYPE, cstring(self.mechanism) + INT32.pack(length) + data)

    @classmethod
    def parse(cls, body: bytes) -> SASLInitialResponse:
        """Parse a ``p`` body as SASLInitialResponse."""
        reader = BodyReader(body, "SASLInitialResponse")
        mechanism = reader.cstring()
        length = reader.int32()
        data = None if length == -1 else reader.take(length)
        reader.end()
        return cls(mechanism, data)


@dataclass(frozen=True, slots=True)
class SASLResponse:
    """A later SASL message from the client (for SCRAM: client-final-message)."""

    data: bytes
    TYPE: ClassVar[bytes] = b"p"

    def __repr__(self) -> str:
        return f"SASLResponse(data={redacted(self.data)})"

    def encode(self) -> bytes:
        """Return the frame."""
        return typed_message(self.TYPE, self.data)

    @classmethod
    def parse(cls, body: bytes) -> SASLResponse:
        """Parse a ``p`` body as SASLResponse (the body is the data)."""
        return cls(body)


@dataclass(frozen=True, slots=True)
class Query:
    """A simple-protocol query: ``Q`` + the SQL text as a C string."""

    sql: str
    TYPE: ClassVar[bytes] = b"Q"

    def encode(self) -> bytes:
        """Return the frame; raises LocalProtocolError for a NUL inside the text."""
        return typed_message(self.TYPE, cstring(self.sql))

    @classmethod
    def parse(cls, body: bytes) -> Query:
        """Parse a ``Q`` body."""
        reader = BodyReader(body, "Query")
        result = cls(reader.cstring())
        reader.end()
        return result


@dataclass(frozen=True, slots=True)
class Terminate:
    """The frontend is closing the connection."""

    TYPE: ClassVar[bytes] = b"X"

    def encode(self) -> bytes:
        """Return ``58 00 00 00 04``."""
        return typed_message(self.TYPE, b"")

    @classmethod
    def parse(cls, body: bytes) -> Terminate:
        """Parse an ``X`` body; it must be empty."""
        BodyReader(body, "Terminate").end()
        return cls()
