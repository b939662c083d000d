"""What backend-session reuse needs from the protocol: idle detection and the reset.

Owns: :class:`SessionTracker` -- follows the message boundaries of a relayed session in both
directions (headers only; bodies are skipped by length, never copied or parsed) and answers
one question: when the client sends ``Terminate``, is the backend session idle, so that it
could serve another connection of the same role? -- and :class:`ResetExchange`, the
``DISCARD ALL`` that returns such a session to the state of a fresh login (PgBouncer's
``server_reset_query``).

Must not: do I/O, or decide whether a session *may* be reused (the pool and the session code
decide; they also key reuse by role, database and start-up parameters).

Idle, exactly (PostgreSQL docs, "Message Flow"): every simple ``Query``, ``Sync`` and
``FunctionCall`` the client sends is answered by exactly one ``ReadyForQuery``. The session is
idle when both directions stand at a message boundary, the backend has sent as many
ReadyForQuery as the client sent those three, the last one said ``I`` (no transaction block),
and no extended-protocol message (Parse, Bind, Describe, Execute, Close) is waiting for its
Sync. Anything the tracker cannot follow (a length below 4, a Terminate that is not alone in
its read, more than ``budget`` bytes) makes it give up for good: ``active`` turns false, the
session is simply not reused, and the relay may stop feeding it.
"""

from __future__ import annotations

from typing import Final

from ferryman.pgwire._backend import ParameterStatus
from ferryman.pgwire._buffer import ReceiveBuffer
from ferryman.pgwire._framing import next_typed
from ferryman.pgwire._frontend import Query, Terminate
from ferryman.pgwire._notice import ErrorResponse

TERMINATE: Final = Terminate().encode()
_SYNC_POINTS: Final = frozenset(b"QSF")
_EXTENDED: Final = frozenset(b"PBDEC")
_SYNC: Final = ord("S")
_READY: Final = ord("Z")
_TERMINATE: Final = TERMINATE[0]
_IDLE: Final = ord("I")

DEFAULT_BUDGET: Final = 256 * 1024
"""Bytes (both directions) a session may move while tracked. Reuse pays off for short
sessions (it saves the backend's fork and login); a session that has moved this much has
amortised those, so tracking stops and the relay is free to splice."""


class _Boundaries:
    """Message boundaries in one direction's byte stream: a typed header (``Byte1`` + ``Int32``
    length) at each boundary, the body skipped by length -- across reads of any size."""

    __slots__ = ("head", "skip")

    def __init__(self) -> None:
        self.head = b""
        """The start of a header that the last read cut off."""
        self.skip = 0
        """Body bytes of the current message still to come."""

    @property
    def at_boundary(self) -> bool:
        return not (self.head or self.skip)

    def messages(self, data: bytes | memoryview, peek: int) -> list[tuple[int, int]] | None:
        """``(type, first body byte or -1)`` of every message that starts in ``data``; the first
        body byte is read only for messages of type ``peek``. None for a length below 4."""
        if self.head:
            data = self.head + bytes(data)
            self.head = b""
        n = len(data)
        pos = self.skip
        found: list[tuple[int, int]] = []
        while pos < n:
            if pos + 5 > n:
                break
            kind = data[pos]
            length = int.from_bytes(data[pos + 1 : pos + 5], "big")
            if length < 4:
                return None
            if kind == peek:
                if pos + 6 > n:
                    break  # the byte we want is in the next read
                found.append((kind, data[pos + 5]))
            else:
                found.append((kind, -1))
            pos += 1 + length
        if pos < n:
            self.head = bytes(data[pos:])
            self.skip = 0
        else:
            self.skip = pos - n
        return found


class SessionTracker:
    """Message boundaries and ReadyForQuery accounting for one relayed session.

    Feed it every byte the client sends (:meth:`client_data`) and every byte the backend sends
    (:meth:`backend_data`), in order, starting right after the login's ReadyForQuery.
    """

    __slots__ = ("_down", "_left", "_ready", "_status", "_syncs", "_unsynced", "_up", "active")

    def __init__(self, budget: int = DEFAULT_BUDGET) -> None:
        self.active = True
        self._left = budget
        self._up = _Boundaries()
        self._down = _Boundaries()
        self._syncs = 0
        self._ready = 0
        self._status = _IDLE
        self._unsynced = False

    @property
    def idle(self) -> bool:
        """Both directions at a boundary, every sync point answered, no transaction open."""
        return (
            self.active
            and self._up.at_boundary
            and self._down.at_boundary
            and self._syncs == self._ready
            and self._status == _IDLE
            and not self._unsynced
        )

    def _spend(self, n: int) -> bool:
        self._left -= n
        if self._left < 0:
            self.active = False
        return self.active

    def client_data(self, data: bytes | memoryview) -> bool:
        """Follow bytes from the client. True means: ``data`` is a lone ``Terminate`` and the
        session is idle -- keep the Terminate from the backend and the session may be reused.
        (The caller then stops feeding; the tracker is spent.)"""
        if not self.active:
            return False
        if len(data) == 5 and data == TERMINATE and self.idle:
            self.active = False
            return True
        if not self._spend(len(data)):
            return False
        found = self._up.messages(data, -1)
        if found is None:
            self.active = False
            return False
        for kind, _ in found:
            if kind in _SYNC_POINTS:
                self._syncs += 1
                if kind == _SYNC:
                    self._unsynced = False
            elif kind in _EXTENDED:
                self._unsynced = True
            elif kind == _TERMINATE:
                # A Terminate behind other messages: the session ends anyway.
                self.active = False
                return False
        return False

    def backend_data(self, data: bytes | memoryview) -> None:
        """Follow bytes from the backend."""
        if not self.active or not self._spend(len(data)):
            return
        found = self._down.messages(data, _READY)
        if found is None:
            self.active = False
            return
        for kind, status in found:
            if kind == _READY:
                self._ready += 1
                self._status = status


RESET_SQL: Final = "DISCARD ALL"
_MAX_RESET_MESSAGE: Final = 1 << 20


class ResetExchange:
    """Run ``DISCARD ALL`` on an idle session and tell whether it came back clean.

    ``DISCARD ALL`` closes portals and cursors, deallocates prepared statements, drops
    temporary tables, releases advisory locks, ``UNLISTEN *``, resets every setting to its
    session default (the values of the start-up packet) and ``SET SESSION AUTHORIZATION
    DEFAULT`` -- the session is then what a fresh login of the same role with the same start-up
    parameters would be. ParameterStatus messages the reset produces are collected in
    :attr:`parameters` so the next client is told the current values.
    """

    def __init__(self) -> None:
        self._buffer = ReceiveBuffer(_MAX_RESET_MESSAGE + 5)
        self._completed = False
        self.done = False
        self.ok = False
        self.problem = ""
        self.parameters: dict[str, str] = {}

    def request(self) -> bytes:
        return Query(RESET_SQL).encode()

    def receive_data(self, data: bytes) -> bool:
        """Feed backend bytes; True once the exchange is over (then see :attr:`ok`).
        Raises RemoteProtocolError for a malformed stream."""
        if not data:
            self._finish("backend closed the connection")
            return True
        self._buffer.feed(data)
        while not self.done:
            frame = next_typed(self._buffer, _MAX_RESET_MESSAGE)
            if frame is None:
                break
            kind, body = frame
            match kind:
                case b"C":
                    self._completed = body == RESET_SQL.encode() + b"\0"
                case b"S":
                    status = ParameterStatus.parse(body)
                    self.parameters[status.name] = status.value
                case b"E":
                    self.problem = ErrorResponse.parse(body).as_dict().get("message", "error")
                case b"N" | b"A":
                    pass  # notices; notifications that raced the UNLISTEN
                case b"Z":
                    if self.problem:
                        pass  # the ErrorResponse says why
                    elif not self._completed:
                        self.problem = "DISCARD ALL did not complete"
                    elif body != b"I":
                        self.problem = f"transaction status {body!r} after the reset"
                    self._finish(self.problem)
                case _:
                    self._finish(f"unexpected message {kind!r} during the reset")
        return self.done

    def _finish(self, problem: str) -> None:
        self.done = True
        self.problem = problem
        self.ok = not problem and self._completed


__all__ = ["DEFAULT_BUDGET", "RESET_SQL", "TERMINATE", "ResetExchange", "SessionTracker"]
