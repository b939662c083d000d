"""A bounds-checked, big-endian reader over one *complete* TLS handshake message.

Owns: the vector framing rules of the TLS presentation language (RFC 8446 §3.4: a vector
``<floor..ceiling>`` is prefixed by a length field just wide enough for the ceiling) and the
error raised when a field does not fit.

Must not: buffer, wait for more bytes, or know what any field means. The reader only ever sees a
handshake message whose length the record layer has already checked and fully reassembled, so
running out of bytes here is a framing lie by the peer (``RemoteProtocolError``), never "need more
data". Sub-vectors share the parent's buffer (start/end offsets), so reading is copy-free.
"""

from __future__ import annotations

from ferryman.errors import RemoteProtocolError


class Reader:
    """Cursor over ``buf[start:end]``; every read either fits or raises ``RemoteProtocolError``."""

    __slots__ = ("_buf", "_end", "_pos", "_what")

    def __init__(self, buf: bytes, start: int, end: int, what: str) -> None:
        self._buf = buf
        self._pos = start
        self._end = end
        self._what = what  # names the structure in error messages: "ClientHello: cipher_suites"

    def _take(self, n: int, field: str) -> int:
        pos = self._pos
        if self._end - pos < n:
            raise RemoteProtocolError(f"{self._what}: {field} runs past the end of its container")
        self._pos = pos + n
        return pos

    @property
    def remaining(self) -> int:
        return self._end - self._pos

    def u8(self, field: str) -> int:
        pos = self._take(1, field)
        return self._buf[pos]

    def u16(self, field: str) -> int:
        pos = self._take(2, field)
        return (self._buf[pos] << 8) | self._buf[pos + 1]

    def skip(self, n: int, field: str) -> None:
        self._take(n, field)

    def raw(self, n: int, field: str) -> bytes:
        pos = self._take(n, field)
        return self._buf[pos : pos + n]

    def vector(self, length_size: int, field: str, *, floor: int = 0, ceiling: int | None = None) -> Reader:
        """Read a length-prefixed vector (1- or 2-byte length) and return a reader over its body.

        Raises:
            RemoteProtocolError: the length does not fit in this container, or lies outside
                ``floor..ceiling`` (the bounds written in the RFC's structure definition).
        """
        length = self.u8(field) if length_size == 1 else self.u16(field)
        if length < floor or (ceiling is not None and length > ceiling):
            bounds = f"{floor}..{ceiling if ceiling is not None else ''}"
            raise RemoteProtocolError(f"{self._what}: {field} length {length} outside <{bounds}>")
        pos = self._take(length, field)
        return Reader(self._buf, pos, pos + length, f"{self._what}: {field}")

    def expect_end(self) -> None:
        """Raise unless every byte was consumed: trailing bytes are garbage, not padding."""
        if self._pos != self._end:
            raise RemoteProtocolError(f"{self._what}: {self._end - self._pos} trailing bytes")
