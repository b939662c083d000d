"""Framing of PostgreSQL v3 messages: the two header shapes, and a bounds-checked body reader.

Owns: protocol constants, the pre-compiled ``struct`` formats, cutting whole frames out of a
:class:`~ferryman.pgwire._buffer.ReceiveBuffer`, building frames, and reading typed fields
out of a message body.

Must not: know what a message means, which messages are legal when (that is ``server.py`` /
``client.py``), or do I/O.

PostgreSQL docs, "Message Formats" / "Messaging Overview": before the startup packet is
accepted every frontend packet is *untyped* -- ``Int32 length`` (counting itself) and then a
body whose first ``Int32`` is a request code or protocol version. Every later message is
*typed*: ``Byte1 type``, ``Int32 length`` (counting itself but not the type byte), body.
Integers are network byte order (big-endian); strings are NUL-terminated.

Every parse failure here is a :class:`RemoteProtocolError` (08P01): these functions only ever
see the peer's bytes. Every encode failure (a NUL inside a string, a value out of range) is a
:class:`LocalProtocolError`: we were asked to emit something unencodable.
"""

from __future__ import annotations

import struct
from typing import Final

from ferryman.errors import LocalProtocolError, RemoteProtocolError
from ferryman.pgwire._buffer import ReceiveBuffer

# Request codes and protocol versions (PostgreSQL docs, "Message Formats": StartupMessage,
# SSLRequest, GSSENCRequest, CancelRequest). The magic codes sit in a "version" space that no
# real protocol version will ever use.
SSL_REQUEST_CODE: Final = 80877103  # 1234 << 16 | 5679
GSSENC_REQUEST_CODE: Final = 80877104  # 1234 << 16 | 5680
CANCEL_REQUEST_CODE: Final = 80877102  # 1234 << 16 | 5678
PROTOCOL_3_0: Final = 196608  # 3 << 16
PROTOCOL_3_2: Final = 196610  # 3 << 16 | 2 (PostgreSQL 18; 3.1 was never used)

MAX_STARTUP_PACKET: Final = 10_000
"""PostgreSQL's own MAX_STARTUP_PACKET_LENGTH (src/include/libpq/pqcomm.h)."""

MIN_CANCEL_KEY: Final = 4
MAX_CANCEL_KEY: Final = 256
"""Cancel key bounds (docs, BackendKeyData): 4 bytes in protocol 3.0, up to 256 in 3.2."""

INT16: Final = struct.Struct("!h")
INT32: Final = struct.Struct("!i")
UINT32: Final = struct.Struct("!I")
INT32_PAIR: Final = struct.Struct("!ii")
TYPED_HEADER: Final = struct.Struct("!ci")
"""``Byte1 type`` + ``Int32 length``; the length counts itself but not the type byte."""

_TYPED_HEADER_SIZE: Final = TYPED_HEADER.size  # 5


def typed_message(type_code: bytes, body: bytes) -> bytes:
    """Frame ``body`` as a typed message: ``type_code`` + Int32(len(body) + 4) + ``body``."""
    return TYPED_HEADER.pack(type_code, len(body) + 4) + body


def untyped_packet(code: int, body: bytes = b"") -> bytes:
    """Frame a startup-phase packet: Int32(length) + Int32(``code``) + ``body``."""
    return INT32_PAIR.pack(len(body) + 8, code) + body


def cstring(value: str) -> bytes:
    """Encode ``value`` as a NUL-terminated UTF-8 ``String``.

    Lone surrogates produced by :func:`decode` (``surrogateescape``) turn back into the
    original bytes, so a backend string relayed through a parsed message is byte-identical.

    Raises:
        LocalProtocolError: ``value`` contains NUL, which the wire format cannot carry, or a
            lone surrogate that :func:`decode` cannot have produced (outside U+DC80..U+DCFF).
    """
    if "\x00" in value:
        raise LocalProtocolError("a protocol String cannot contain NUL")
    try:
        return value.encode("utf-8", "surrogateescape") + b"\x00"
    except UnicodeEncodeError:
        raise LocalProtocolError("a protocol String cannot contain lone surrogates") from None


def cbytes(value: bytes) -> bytes:
    """Encode raw ``value`` as a NUL-terminated ``String``.

    Raises:
        LocalProtocolError: ``value`` contains NUL.
    """
    if b"\x00" in value:
        raise LocalProtocolError("a protocol String cannot contain NUL")
    return value + b"\x00"


def int32(value: int) -> bytes:
    """Encode a signed ``Int32``.

    Raises:
        LocalProtocolError: ``value`` does not fit.
    """
    if not -(2**31) <= value < 2**31:
        raise LocalProtocolError(f"{value} does not fit in an Int32")
    return INT32.pack(value)


def check_cancel_key(key: bytes) -> None:
    """Raise LocalProtocolError unless ``key`` is a valid cancel key length (4..256 bytes)."""
    if not MIN_CANCEL_KEY <= len(key) <= MAX_CANCEL_KEY:
        raise LocalProtocolError(f"cancel keys are {MIN_CANCEL_KEY} to {MAX_CANCEL_KEY} bytes")


def redacted(data: bytes | None) -> str:
    """How a secret-bearing field shows in ``repr``: its length only (STYLE 2.5)."""
    return "None" if data is None else f"<redacted {len(data)} bytes>"


def decode(raw: bytes) -> str:
    """Decode a ``String`` whose encoding we cannot know, losslessly.

    Backend strings are in the server encoding, which we do not know during startup; frontend
    start-up parameters are in the client's encoding (a LATIN1 client sends LATIN1 bytes, and
    PostgreSQL accepts them). UTF-8 with ``surrogateescape`` never fails, and every byte that
    is not UTF-8 becomes a lone surrogate in U+DC80..U+DCFF that :func:`cstring` turns back into
    the same byte: what we forward is byte-identical to what we received. Code that needs a
    real text (a name to match or to put in SQL) must check :func:`is_utf8` first.
    """
    return raw.decode("utf-8", "surrogateescape")


def is_utf8(value: str) -> bool:
    """Whether ``value`` (from :func:`decode`) came from valid UTF-8, i.e. holds no escaped byte."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class BodyReader:
    """A cursor over one message body; every read is bounds-checked.

    Each method raises :class:`RemoteProtocolError` (08P01, "invalid message format", as
    PostgreSQL's ``pq_getmsg*`` do) when the body is too short or malformed.
    """

    __slots__ = ("_body", "_pos", "_what")

    def __init__(self, body: bytes, what: str) -> None:
        self._body = body
        self._pos = 0
        self._what = what

    def _fail(self, detail: str) -> RemoteProtocolError:
        return RemoteProtocolError(f"invalid {self._what} message format: {detail}")

    @property
    def remaining(self) -> int:
        """Bytes not read yet."""
        return len(self._body) - self._pos

    def int32(self) -> int:
        """Read a signed ``Int32``."""
        if self.remaining < 4:
            raise self._fail("truncated Int32")
        (value,) = INT32.unpack_from(self._body, self._pos)
        self._pos += 4
        return int(value)

    def byte1(self) -> int:
        """Read one byte."""
        if self.remaining < 1:
            raise self._fail("truncated Byte1")
        value = self._body[self._pos]
        self._pos += 1
        return value

    def raw_cstring(self) -> bytes:
        """Read a NUL-terminated ``String`` and return its bytes without the NUL."""
        end = self._body.find(b"\x00", self._pos)
        if end < 0:
            raise self._fail("missing string terminator")
        value = self._body[self._pos : end]
        self._pos = end + 1
        return value

    def cstring(self) -> str:
        """Read a NUL-terminated ``String``, decoded losslessly (see :func:`decode`)."""
        return decode(self.raw_cstring())

    def take(self, n: int) -> bytes:
        """Read exactly ``n`` bytes."""
        if n < 0 or self.remaining < n:
            raise self._fail(f"expected {n} more bytes, have {self.remaining}")
        value = self._body[self._pos : self._pos + n]
        self._pos += n
        return value

    def rest(self) -> bytes:
        """Read every remaining byte."""
        value = self._body[self._pos :]
        self._pos = len(self._body)
        return value

    def end(self) -> None:
        """Assert the body is used up (PostgreSQL's ``pq_getmsgend``)."""
        if self.remaining:
            raise self._fail(f"{self.remaining} unexpected trailing bytes")


def next_untyped(buf: ReceiveBuffer, max_length: int) -> bytes | None:
    """Cut one startup-phase packet (length word included) off ``buf``, or ``None`` if partial.

    The length is checked as soon as its four bytes are in, so an absurd length is refused
    without waiting for (or buffering) the body it announces.

    Raises:
        RemoteProtocolError: the length is below 8 or above ``max_length`` (PostgreSQL:
            "invalid length of startup packet", 08P01).
    """
    if len(buf) < 4:
        return None
    (length,) = buf.unpack_from(INT32)
    if length < 8 or length > max_length:
        raise RemoteProtocolError(f"invalid length of startup packet ({length} bytes)")
    if len(buf) < length:
        return None
    return buf.consume(length)


def next_typed(buf: ReceiveBuffer, max_length: int) -> tuple[bytes, bytes] | None:
    """Cut one typed message off ``buf`` as ``(type_byte, body)``, or ``None`` if partial.

    Raises:
        RemoteProtocolError: the length word is below 4 (it counts itself) or the message
            would exceed ``max_length`` bytes of length word + body.
    """
    if len(buf) < _TYPED_HEADER_SIZE:
        return None
    type_code, length = buf.unpack_from(TYPED_HEADER)
    if length < 4:
        raise RemoteProtocolError(f"invalid message length {length} for message type {type_code!r}")
    if length > max_length:
        raise RemoteProtocolError(
            f"message type {type_code!r} of {length} bytes exceeds the limit of {max_length} bytes"
        )
    if len(buf) < length + 1:
        return None
    frame = buf.consume(length + 1)
    return frame[:1], frame[_TYPED_HEADER_SIZE:]
