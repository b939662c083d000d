"""The receive buffer under both codec ends.

Owns: bytes received but not yet parsed, with a hard size cap, and cheap consumption from
the front.

Must not: parse messages, know about phases, or do I/O. It raises only
:class:`~ferryman.errors.RemoteProtocolError` (the cap) and ``LocalProtocolError``
(a caller asked for more bytes than are buffered -- a codec bug).

Why not a plain ``bytes`` or ``bytearray``: slicing a consumed prefix off a ``bytes`` copies
the remainder every time, so a peer that sends many tiny messages in one segment makes
parsing O(n^2). Here consumption only moves an offset, and the consumed prefix is dropped
in one ``del`` once it is at least half of the storage, which keeps the total work
O(bytes consumed) amortised (the same argument as h11's ``_receivebuffer.py``).
"""

from __future__ import annotations

import struct
from typing import Any

from ferryman.errors import LocalProtocolError, RemoteProtocolError


class ReceiveBuffer:
    """Bytes received from the peer and not yet consumed by the parser.

    ``max_size`` bounds what may be buffered at once; :meth:`feed` raises
    :class:`RemoteProtocolError` (08P01) rather than grow past it, so a peer can never make
    the codec hold more than ``max_size`` bytes.
    """

    __slots__ = ("_data", "_max_size", "_start")

    def __init__(self, max_size: int) -> None:
        if max_size < 1:
            raise ValueError("max_size must be positive")
        self._data = bytearray()
        self._start = 0
        self._max_size = max_size

    def __len__(self) -> int:
        return len(self._data) - self._start

    def __bool__(self) -> bool:
        return len(self._data) > self._start

    @property
    def max_size(self) -> int:
        """The cap given at construction."""
        return self._max_size

    def feed(self, data: bytes) -> None:
        """Append ``data``.

        Raises:
            RemoteProtocolError: the buffer would exceed ``max_size``.
        """
        if len(self) + len(data) > self._max_size:
            raise RemoteProtocolError(
                f"receive buffer limit exceeded ({len(self) + len(data)} > {self._max_size} bytes)"
            )
        self._data += data

    def unpack_from(self, fmt: struct.Struct, offset: int = 0) -> tuple[Any, ...]:
        """Unpack ``fmt`` at ``offset`` bytes past the unconsumed start, without consuming.

        Raises:
            LocalProtocolError: fewer than ``offset + fmt.size`` bytes are buffered (the
                caller must check ``len()`` first).
        """
        if len(self) < offset + fmt.size:
            raise LocalProtocolError("ReceiveBuffer.unpack_from past the end of the buffer")
        return fmt.unpack_from(self._data, self._start + offset)

    def byte_at(self, offset: int) -> int:
        """The unconsumed byte at ``offset``, without consuming it.

        Raises:
            LocalProtocolError: fewer than ``offset + 1`` bytes are buffered.
        """
        if not 0 <= offset < len(self):
            raise LocalProtocolError("ReceiveBuffer.byte_at past the end of the buffer")
        return self._data[self._start + offset]

    def consume(self, n: int) -> bytes:
        """Remove and return the first ``n`` unconsumed bytes.

        Raises:
            LocalProtocolError: fewer than ``n`` bytes are buffered.
        """
        if not 0 <= n <= len(self):
            raise LocalProtocolError("ReceiveBuffer.consume past the end of the buffer")
        start = self._start
        out = bytes(self._data[start : start + n])
        self._start = start + n
        # Compact once the dead prefix is at least half the storage: each byte is then moved
        # at most a constant number of times over its life (amortised O(1) per byte).
        if self._start * 2 >= len(self._data):
            del self._data[: self._start]
            self._start = 0
        return out

    def peek_all(self) -> bytes:
        """A copy of every unconsumed byte, leaving the buffer unchanged."""
        return bytes(self._data[self._start :])

    def clear(self) -> None:
        """Drop every buffered byte."""
        self._data.clear()
        self._start = 0
