"""Kept PostgreSQL backend sessions, reused by later connections of the same role.

Owns: :class:`BackendPool` -- the idle backend sessions of one backend, keyed by (role,
database, start-up parameters): taking one (checked alive first), giving one back (cleaned with
``DISCARD ALL`` through :class:`ferryman.pgwire.ResetExchange`, then parked), and expiry
(``backend_idle_timeout``, ``backend_lifetime``, at most ``backend_max_idle`` kept, the
least recently parked closed first). A kept session is closed with ``Terminate``.

Must not: decide who may use a session. A connection takes from the pool only after the same
identity, grant, limit and provisioning steps as a fresh login, and the key holds the role
name -- which already encodes person, node, database and lowered preset -- so a session never
crosses people, databases or presets. It must not relay either (``proxy.pg`` does).

Why: a new PostgreSQL session costs the server a fork and a login (several ms on this class
of machine, more with SCRAM) -- far more than everything the gateway does per connection.
PgBouncer's session mode avoids it the same way.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from ferryman import pgwire
from ferryman._aio import cancel_and_wait, spawn
from ferryman.errors import RemoteProtocolError
from ferryman.pgwire.reuse import TERMINATE

logger = logging.getLogger(__name__)

RESET_TIMEOUT: Final = 5.0
PoolKey = tuple[str, str, tuple[tuple[str, str], ...]]


def pool_key(role: str, database: str, parameters: Mapping[str, str]) -> PoolKey:
    """Sessions are interchangeable only for the same role, database and start-up parameters."""
    return (role, database, tuple(sorted(parameters.items())))


@dataclass(eq=False)
class KeptSession:
    """A logged-in backend session at a message boundary, idle, not in a transaction."""

    sock: socket.socket
    key_data: pgwire.BackendKeyData | None
    parameters: dict[str, str]
    """The server's current ParameterStatus values, to replay to the next client."""
    born: float
    """``time.monotonic()`` of the backend login."""
    parked: float = 0.0


def _alive(sock: socket.socket) -> bool:
    """Nothing to read and not closed: an idle backend sends nothing unless it is going away
    (e.g. FATAL 57P01 after pg_terminate_backend, or a server shutdown)."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def _terminate(sock: socket.socket) -> None:
    try:
        sock.send(TERMINATE, socket.MSG_DONTWAIT)
    except OSError:
        pass
    sock.close()


class BackendPool:
    """Idle backend sessions of one backend (see the module docstring)."""

    def __init__(self, name: str, *, idle_timeout: float, lifetime: float, max_idle: int) -> None:
        self.name = name
        self.idle_timeout = idle_timeout
        self.lifetime = lifetime
        self.max_idle = max_idle
        self._idle: dict[PoolKey, list[KeptSession]] = {}
        self._count = 0
        self._resets: set[asyncio.Task[Any]] = set()
        self._reaper: asyncio.TimerHandle | None = None
        self._closed = False
        self.reused = 0
        """Sessions handed out again (for tests, logs and the bench)."""

    def __len__(self) -> int:
        return self._count

    def roles(self) -> set[str]:
        """Roles with a kept session (the sweeper must not drop them)."""
        return {key[0] for key, stack in self._idle.items() if stack}

    def take(self, key: PoolKey) -> KeptSession | None:
        """The most recently parked live session for ``key``, or ``None``."""
        stack = self._idle.get(key)
        now = time.monotonic()
        while stack:
            kept = stack.pop()
            self._count -= 1
            if now - kept.born < self.lifetime and _alive(kept.sock):
                self.reused += 1
                return kept
            _terminate(kept.sock)
        return None

    def give_back(self, key: PoolKey, kept: KeptSession) -> None:
        """Clean ``kept`` (``DISCARD ALL``) in the background and park it; closed on any doubt."""
        if self._closed or self.max_idle == 0 or time.monotonic() - kept.born >= self.lifetime:
            _terminate(kept.sock)
            return
        name = f"reset backend session ({self.name})"
        spawn(self._reset_and_park(key, kept), name=name, owner=self._resets)

    async def _reset_and_park(self, key: PoolKey, kept: KeptSession) -> None:
        loop = asyncio.get_running_loop()
        reset = pgwire.ResetExchange()
        try:
            async with asyncio.timeout(RESET_TIMEOUT):
                await loop.sock_sendall(kept.sock, reset.request())
                while not reset.receive_data(await loop.sock_recv(kept.sock, 65536)):
                    pass
        except (OSError, TimeoutError, RemoteProtocolError) as exc:
            logger.info("%s: backend session not kept: reset failed: %s", self.name, exc)
            _terminate(kept.sock)
            return
        except BaseException:
            _terminate(kept.sock)
            raise
        if not reset.ok or self._closed:
            if reset.problem:
                logger.info("%s: backend session not kept: %s", self.name, reset.problem)
            _terminate(kept.sock)
            return
        kept.parameters.update(reset.parameters)
        self._park(key, kept)

    def _park(self, key: PoolKey, kept: KeptSession) -> None:
        while self._count >= self.max_idle:
            self._evict_oldest()
        kept.parked = time.monotonic()
        self._idle.setdefault(key, []).append(kept)
        self._count += 1
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().call_later(self.idle_timeout, self._reap)

    def _evict_oldest(self) -> None:
        key, stack = min(((k, s) for k, s in self._idle.items() if s), key=lambda item: item[1][0].parked)
        _terminate(stack.pop(0).sock)
        self._count -= 1
        if not stack:
            del self._idle[key]

    def _reap(self) -> None:
        """Close sessions idle past ``idle_timeout`` or older than ``lifetime``."""
        self._reaper = None
        now = time.monotonic()
        next_due: float | None = None
        for key in list(self._idle):
            keep: list[KeptSession] = []
            for kept in self._idle[key]:
                if now - kept.parked >= self.idle_timeout or now - kept.born >= self.lifetime:
                    _terminate(kept.sock)
                    self._count -= 1
                else:
                    keep.append(kept)
                    due = kept.parked + self.idle_timeout
                    next_due = due if next_due is None else min(next_due, due)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if next_due is not None and not self._closed:
            self._reaper = asyncio.get_running_loop().call_later(max(0.01, next_due - now), self._reap)

    def discard_role(self, role: str) -> None:
        """Close every kept session of ``role`` (its grant is gone, or it is being dropped)."""
        for key in [k for k in self._idle if k[0] == role]:
            for kept in self._idle.pop(key):
                _terminate(kept.sock)
                self._count -= 1

    async def close(self) -> None:
        self._closed = True
        await cancel_and_wait(self._resets)
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for stack in self._idle.values():
            for kept in stack:
                _terminate(kept.sock)
        self._idle.clear()
        self._count = 0
