"""SANS-I/O TLS ClientHello sniffing: bytes in, ``NeedData | NotTLS | ClientHello`` out.

Owns: the TLS record layer as far as a client's first flight goes (RFC 8446 §5.1, RFC 5246
§6.2.1) -- deciding "is this TLS at all" from the first bytes, the record and size caps,
reassembling a ClientHello fragmented over several records and arbitrary TCP chunks -- and the
public API: :func:`parse_client_hello`, :class:`ClientHelloSniffer`, :func:`looks_like_tls`.

Must not: import asyncio, socket, ssl or selectors, read or write a connection, or consume
anything. The driver keeps every byte it read and forwards them untouched to the backend before
relaying (tcpproxy's ``Conn{Peeked}``); asyncio has no peek, so this module only ever looks.

Theory of operation. A connection is TLS when its first record header says "handshake, version
3.x". From then on every record must be a handshake record with the same header version, length
1..2^14, until the ClientHello handshake message is complete; that message is then decoded by
``hello.py``. Decisions:

- NotTLS is decided from the first one or two bytes only (content type 22, major version 3), so
  an HTTP request or a PostgreSQL startup packet (first byte 0x00) is recognised at once.
- SSLv2-compatible ClientHellos (RFC 5246 Appendix E.2, first byte with the high bit set) are
  reported as :class:`NotTLS`, not as an error: they cannot carry extensions, so there is no SNI
  or ALPN to route on, and RFC 8446 Appendix D.5 forbids sending them. The listener's plaintext
  policy then decides, exactly as for any other non-TLS client.
- Record length 0 and lengths above 2^14 are errors. RFC 8446 §5.1 and RFC 5246 §6.2.1 cap a
  TLSPlaintext fragment at exactly 2^14; the +256/+2048 slack applies only to compressed or
  encrypted records, which a first flight cannot contain. Zero-length handshake fragments are
  forbidden by the same sections.
- A different record type before the hello is complete is an error: "Handshake messages MUST NOT
  be interleaved with other record types" (RFC 8446 §5.1).
- Handshake bytes after the ClientHello in its last record are an error: a client's first flight
  is the ClientHello alone, and with 0-RTT the hello must end on a record boundary (RFC 8446
  §5.1, key change). Records *after* that boundary are not ours and are not examined.
- The whole hello, record headers included, is capped (:data:`MAX_HELLO_SIZE`, 64 KiB by
  default, the same bound as Go's ``maxHandshake``), so the driver never buffers more than that.
  Every cap is checked as soon as the length field that breaks it arrives.

A prefix of a valid hello always yields ``NEED_DATA``, never an error: every check runs on
fields that the complete hello carries identically. Tests feed every valid hello split at every
offset to hold this.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, TypeAlias

from ferryman.errors import LocalProtocolError, RemoteProtocolError
from ferryman.tlshello.hello import ClientHello, decode_client_hello

CONTENT_TYPE_HANDSHAKE: Final = 22  # 0x16, RFC 8446 §5.1 ContentType.handshake
HANDSHAKE_CLIENT_HELLO: Final = 1  # RFC 8446 §4 HandshakeType.client_hello
RECORD_HEADER_LENGTH: Final = 5  # type(1) legacy_record_version(2) length(2)
HANDSHAKE_HEADER_LENGTH: Final = 4  # msg_type(1) length(3)
MAX_RECORD_LENGTH: Final = 16384  # 2^14, RFC 8446 §5.1 / RFC 5246 §6.2.1 TLSPlaintext.length
MAX_HELLO_SIZE: Final = 65536  # records + headers; Go crypto/tls maxHandshake is also 64 KiB
# Record versions 3.0 (SSL 3.0 / a TLS 1.0-1.2 client advertising its minimum, RFC 5246
# Appendix E.1) to 3.4. TLS 1.3 sends 3.1 or 3.3 in the first ClientHello (RFC 8446 §5.1).
_MAX_RECORD_MINOR: Final = 4


class NeedData(enum.Enum):
    """The single "feed me more bytes" sentinel. Compare with ``is NEED_DATA``.

    In a ``match`` statement write ``case NeedData.NEED_DATA:`` (or ``tlshello.NEED_DATA``): a
    bare name would be a capture pattern.
    """

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class NotTLS:
    """The stream does not start with a TLS handshake record. Do not subclass."""

    reason: str
    """A short, log-friendly description of what the first bytes looked like."""


SniffResult: TypeAlias = NeedData | NotTLS | ClientHello
"""What a sniff returns; end a ``match`` over it with ``assert_never`` (STYLE 2.7)."""


def looks_like_tls(first_bytes: bytes) -> bool | None:
    """Tell from a connection's first bytes whether a TLS record header starts there.

    Returns:
        ``None`` when more bytes are needed (fewer than two, and the first is 0x16), ``True``
        for a handshake record with major version 3, ``False`` otherwise. It agrees with
        :func:`parse_client_hello`: ``False`` exactly when that function returns
        :class:`NotTLS`. ``True`` does not promise a *valid* hello.
    """
    if not first_bytes:
        return None
    if first_bytes[0] != CONTENT_TYPE_HANDSHAKE:
        return False
    if len(first_bytes) < 2:
        return None
    return first_bytes[1] == 3


def parse_client_hello(data: bytes, *, max_size: int = MAX_HELLO_SIZE) -> SniffResult:
    """Sniff a ClientHello from everything read from a connection so far.

    Call again with the longer buffer after ``NEED_DATA``. Each call re-parses from the start,
    which costs O(len(data)); a driver that reads in many small pieces should keep one
    :class:`ClientHelloSniffer` instead, whose total cost is linear in the bytes received.

    Args:
        data: every byte received so far, from the first one.
        max_size: cap on the bytes the hello's records may occupy.

    Returns:
        ``NEED_DATA`` if ``data`` is a prefix of a possible hello; :class:`NotTLS` if the first
        bytes are not a TLS handshake record; the :class:`ClientHello` once complete (bytes
        after ``raw_length`` are ignored).

    Raises:
        RemoteProtocolError: the bytes started like TLS but break a framing rule or a cap.
    """
    sniffer = ClientHelloSniffer(max_size=max_size)
    if data:
        sniffer.receive_data(data)
    return sniffer.next_event()


class ClientHelloSniffer:
    """Incremental ClientHello sniffer with h11's verbs: ``receive_data`` then ``next_event``.

    It keeps only the bytes of the record in progress and the reassembled handshake bytes, and
    resumes where it stopped, so feeding a hello one byte at a time is linear, not quadratic.
    Once it has an answer (``NotTLS`` or ``ClientHello``) it keeps returning it and ignores
    further data; once it raised, it raises again.
    """

    __slots__ = (
        "_consumed",
        "_eof",
        "_error",
        "_handshake",
        "_max_size",
        "_outcome",
        "_pending",
        "_record_version",
    )

    def __init__(self, *, max_size: int = MAX_HELLO_SIZE) -> None:
        """Raises ``LocalProtocolError`` when ``max_size`` cannot hold even one record header."""
        if max_size < RECORD_HEADER_LENGTH + HANDSHAKE_HEADER_LENGTH:
            raise LocalProtocolError(f"max_size {max_size} is too small for any ClientHello")
        self._max_size = max_size
        self._pending = bytearray()  # the record in progress, header included
        self._handshake = bytearray()  # handshake-layer bytes from complete records
        self._consumed = 0  # raw bytes of the complete records folded into _handshake
        self._record_version: int | None = None  # set by the first complete record header
        self._outcome: NotTLS | ClientHello | None = None
        self._error: str | None = None
        self._eof = False

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the connection; ``b""`` means the peer closed (EOF), as in h11.

        Raises:
            LocalProtocolError: data after EOF was signalled (a driver bug).
        """
        if self._eof:
            raise LocalProtocolError("receive_data() after EOF")
        if not data:
            self._eof = True
        elif self._outcome is None and self._error is None:
            self._pending += data

    def next_event(self) -> SniffResult:
        """Advance as far as the bytes received allow.

        Returns:
            ``NEED_DATA``, :class:`NotTLS` or the :class:`ClientHello`; see
            :func:`parse_client_hello`.

        Raises:
            RemoteProtocolError: a framing rule or cap is broken, or EOF arrived before a
                complete hello (including EOF before any byte).
        """
        if self._error is not None:
            raise RemoteProtocolError(self._error)
        if self._outcome is not None:
            return self._outcome
        try:
            result = self._advance()
            if result is NEED_DATA and self._eof:
                raise RemoteProtocolError("connection closed before a complete ClientHello")
        except RemoteProtocolError as exc:
            self._error = str(exc)
            self._pending.clear()
            self._handshake.clear()
            raise
        if result is not NEED_DATA:
            self._outcome = result
            self._pending.clear()
            self._handshake.clear()
        return result

    def _advance(self) -> SniffResult:
        while True:
            buf = self._pending
            if self._record_version is None:
                verdict = looks_like_tls(bytes(buf[:2]))
                if verdict is None:
                    return NEED_DATA
                if not verdict:
                    return NotTLS(_describe(bytes(buf[:2])))
            elif not buf:
                return NEED_DATA
            elif buf[0] != CONTENT_TYPE_HANDSHAKE:
                raise RemoteProtocolError(
                    f"TLS record of type {buf[0]} interleaved with the ClientHello (RFC 8446 §5.1)"
                )
            if len(buf) < RECORD_HEADER_LENGTH:
                return NEED_DATA
            self._check_record_header(buf)
            end = RECORD_HEADER_LENGTH + ((buf[3] << 8) | buf[4])
            if len(buf) < end:
                # Check the handshake header as soon as it shows, so a non-hello or an oversized
                # hello is refused before the driver buffers the rest of it.
                # Only the few missing header bytes are copied, keeping each call O(1) here.
                missing = HANDSHAKE_HEADER_LENGTH - len(self._handshake)
                if missing > 0:
                    tail = buf[RECORD_HEADER_LENGTH : RECORD_HEADER_LENGTH + missing]
                    self._hello_length(bytes(self._handshake) + bytes(tail))
                return NEED_DATA
            self._handshake += buf[RECORD_HEADER_LENGTH:end]
            del buf[:end]  # CPython trims a bytearray's head in O(1) amortised
            self._consumed += end
            length = self._hello_length(bytes(self._handshake[:HANDSHAKE_HEADER_LENGTH]))
            if length is None:
                continue
            message_end = HANDSHAKE_HEADER_LENGTH + length
            if len(self._handshake) < message_end:
                continue
            if len(self._handshake) > message_end:
                raise RemoteProtocolError(
                    f"{len(self._handshake) - message_end} handshake bytes follow the ClientHello "
                    "in its last record"
                )
            return decode_client_hello(
                bytes(self._handshake[HANDSHAKE_HEADER_LENGTH:]), raw_length=self._consumed
            )

    def _check_record_header(self, header: bytearray) -> None:
        version = (header[1] << 8) | header[2]
        length = (header[3] << 8) | header[4]
        if self._record_version is None:
            if header[2] > _MAX_RECORD_MINOR:
                raise RemoteProtocolError(f"TLS record version 0x{version:04x} is not 3.0-3.4")
            self._record_version = version
        elif version != self._record_version:
            # Real stacks write every fragment of a flight with one header version; a change
            # mid-hello is either a bug or an attempt to make us and the backend disagree.
            raise RemoteProtocolError(
                f"TLS record version changed mid-ClientHello "
                f"(0x{self._record_version:04x} -> 0x{version:04x})"
            )
        if length == 0:
            raise RemoteProtocolError("zero-length handshake record (RFC 8446 §5.1)")
        if length > MAX_RECORD_LENGTH:
            raise RemoteProtocolError(f"TLS record length {length} exceeds 2^14 (RFC 8446 §5.1)")
        if self._consumed + RECORD_HEADER_LENGTH + length > self._max_size:
            raise RemoteProtocolError(f"ClientHello records exceed {self._max_size} bytes")

    def _hello_length(self, head: bytes) -> int | None:
        """Check the first (up to 4) handshake bytes; return the body length once known."""
        if not head:
            return None
        if head[0] != HANDSHAKE_CLIENT_HELLO:
            raise RemoteProtocolError(f"first handshake message has type {head[0]}, not ClientHello")
        if len(head) < HANDSHAKE_HEADER_LENGTH:
            return None
        length = int.from_bytes(head[1:HANDSHAKE_HEADER_LENGTH], "big")
        if HANDSHAKE_HEADER_LENGTH + length > self._max_size:
            raise RemoteProtocolError(f"ClientHello length {length} exceeds {self._max_size} bytes")
        return length


def _describe(first: bytes) -> str:
    if first[0] & 0x80:
        # RFC 5246 Appendix E.2: SSLv2 record headers set the high bit of the first length byte.
        return f"first byte 0x{first[0]:02x}: SSLv2-style header, not a TLS record"
    if len(first) > 1 and first[0] == CONTENT_TYPE_HANDSHAKE:
        return f"handshake byte followed by 0x{first[1]:02x}, not TLS major version 3"
    if 0x20 <= first[0] < 0x7F:
        return f"first byte {chr(first[0])!r}: plaintext, not a TLS record"
    return f"first byte 0x{first[0]:02x} is not a TLS handshake record"
