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
_IDLE: Final = ord("I")

DEFAULT_BUDGET: Final = 256 * 1024
"""Bytes (both directions) a session may move while tracked. Reuse pays off for short
sessions (it saves the backend's fork and login); a session that has moved this much has
amortised those, so tracking stops and the relay is free to splice."""


class SessionTracker:
    """Message boundaries and ReadyForQuery accounting for one relayed session.

    Feed it every byte the client sends (:meth:`client_data`) and every byte the backend sends
    (:meth:`backend_data`), in order, starting right after the login's ReadyForQuery.
    """

    __slots__ = (
        "_down_head",
        "_down_skip",
        "_left",
        "_ready",
        "_status",
        "_syncs",
        "_unsynced",
        "_up_head",
        "_up_skip",
        "active",
    )

    def __init__(self, budget: int = DEFAULT_BUDGET) -> None:
        self.active = True
        self._left = budget
        self._up_skip = 0
        self._up_head = b""
        self._down_skip = 0
        self._down_head = b""
        self._syncs = 0
        self._ready = 0
        self._status = _IDLE
        self._unsynced = False

    @property
    def idle(self) -> bool:
        """Both directions at a boundary, every sync point answered, no transaction open."""
        return (
            self.active
            and not (self._up_skip or self._up_head or self._down_skip or self._down_head)
            and self._syncs == self._ready
            and self._status == _IDLE
            and not self._unsynced
        )

    def give_up(self) -> None:
        self.active = False

    def client_data(self, data: bytes | memoryview) -> bool:
        """Follow bytes from the client. True means: ``data`` is a lone ``Terminate`` and the
        session is idle -- keep the Terminate from the backend and the session may be reused.
        (The caller then stops feeding; the tracker is spent.)"""
        if not self.active:
            return False
        n = len(data)
        if n == 5 and data == TERMINATE and self.idle:
            self.active = False
            return True
        self._left -= n
        if self._left < 0:
            self.active = False
            return False
        if self._up_head:
            data = self._up_head + bytes(data)
            n = len(data)
            self._up_head = b""
        pos = self._up_skip
        if pos >= n:
            self._up_skip = pos - n
            return False
        syncs = 0
        while True:
            if pos + 5 > n:
                self._up_head = bytes(data[pos:])
                self._up_skip = 0
                break
            kind = data[pos]
            length = int.from_bytes(data[pos + 1 : pos + 5], "big")
            if length < 4 or kind == TERMINATE[0]:
                # Garbage, or a Terminate behind other messages: the session ends anyway.
                self.active = False
                return False
            if kind in _SYNC_POINTS:
                syncs += 1
                if kind == _SYNC:
                    self._unsynced = False
            elif kind in _EXTENDED:
                self._unsynced = True
            pos += 1 + length
            if pos >= n:
                self._up_skip = pos - n
                break
        self._syncs += syncs
        return False

    def backend_data(self, data: bytes | memoryview) -> None:
        """Follow bytes from the backend."""
        if not self.active:
            return
        n = len(data)
        self._left -= n
        if self._left < 0:
            self.active = False
            return
        if self._down_head:
            data = self._down_head + bytes(data)
            n = len(data)
            self._down_head = b""
        pos = self._down_skip
        if pos >= n:
            self._down_skip = pos - n
            return
        while True:
            if pos + 5 > n:
                self._down_head = bytes(data[pos:])
                self._down_skip = 0
                return
            kind = data[pos]
            length = int.from_bytes(data[pos + 1 : pos + 5], "big")
            if length < 4:
                self.active = False
                return
            if kind == _READY:
                if pos + 6 > n:  # the status byte is in the next read
                    self._down_head = bytes(data[pos:])
                    self._down_skip = 0
                    return
                self._ready += 1
                self._status = data[pos + 5]
            pos += 1 + length
            if pos >= n:
                self._down_skip = pos - n
                return


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
