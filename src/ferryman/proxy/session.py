"""A live, authorized connection: its identity, grant, counters, timers and close record.

Owns: :class:`Session` (what the admin API lists and revalidation re-checks), the
per-connection timers (``max_conn_duration``, ``idle_timeout``), bandwidth accounting on every
chunk, and the audit record written when it closes; :class:`SessionRegistry`, the live set
(which owns a TCP-mode connection once its relay runs: no task waits on it; shutdown waits for
the registry to empty).

Must not: move bytes (the relay does) or decide grants (the engine does). It applies what they
say: a new :class:`~ferryman.policy.engine.Authorization` after revalidation, or a close.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ferryman._aio import spawn
from ferryman.identity.base import Identity, PeerInfo
from ferryman.limits.tracker import Lease, LimitTracker
from ferryman.policy.engine import Authorization
from ferryman.policy.model import Limits
from ferryman.proxy.relay import DOWN, UP, CloseInfo, Relay
from ferryman.units import format_duration

_counter = itertools.count(1)
_closers: set[asyncio.Task[Any]] = set()
"""Graceful-close tasks in flight (each bounded to a few seconds)."""

GRACEFUL_CLOSE_TIMEOUT = 2.0
"""Seconds a graceful close may take before the session is cut."""
_GRACEFUL = ("revoked", "shutdown")
_prefix = os.urandom(3).hex()


def new_connection_id() -> str:
    """Short, unique within a process run, and unguessable across runs."""
    return f"{_prefix}-{next(_counter):x}"


@dataclass(eq=False)
class Session:
    """One relayed connection, from authorization to close."""

    id: str
    listener: str
    mode: str
    identity: Identity
    peer: PeerInfo
    backend: str
    auth: Authorization
    lease: Lease
    tracker: LimitTracker
    on_close: Callable[[Session, CloseInfo], None]
    started: float = field(default_factory=time.time)
    started_mono: float = field(default_factory=time.monotonic)
    relay: Relay | None = None
    close_info: CloseInfo | None = None
    idle_timeout: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    """Mode-specific fields for the admin API and the close record (database, role…)."""
    recheck: Callable[[Authorization], Awaitable[None]] | None = None
    """Mode-specific revalidation (raises AccessDenied to revoke)."""
    graceful_close: Callable[[], Awaitable[None]] | None = None
    """How to end the session cleanly on ``revoked`` and ``shutdown`` (PostgreSQL: terminate
    the backend so the client gets the server's own FATAL 57P01 at a message boundary)."""
    _pending: CloseInfo | None = None
    _limits: Limits = field(default_factory=Limits)
    _duration_timer: asyncio.TimerHandle | None = None
    _idle_timer: asyncio.TimerHandle | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def attach(self, relay: Relay) -> None:
        """Take over ``relay``: apply limits, arm timers, and finish when it finishes."""
        self.relay = relay
        self._apply_limits(self.auth.connection_limits)
        if self.idle_timeout > 0:
            self._idle_timer = relay.loop.call_later(self.idle_timeout, self._check_idle)
        relay.done.add_done_callback(self._on_relay_done)

    def close(self, reason: str, detail: str = "") -> None:
        """End the session with ``reason`` (idempotent); ``revoked`` and ``shutdown`` go
        through :attr:`graceful_close` when the mode has one, with a hard close after
        :data:`GRACEFUL_CLOSE_TIMEOUT`."""
        relay = self.relay
        if relay is None or relay.closed:
            return
        if reason in _GRACEFUL and self.graceful_close is not None and self._pending is None:
            self._pending = CloseInfo(reason, "gateway", detail)
            spawn(self._close_gracefully(), name=f"close {self.id}", owner=_closers)
            return
        relay.close(reason, "gateway", detail)

    async def _close_gracefully(self) -> None:
        relay = self.relay
        assert relay is not None and self.graceful_close is not None and self._pending is not None
        try:
            async with asyncio.timeout(GRACEFUL_CLOSE_TIMEOUT):
                await self.graceful_close()
                await asyncio.shield(relay.done)
        except Exception:  # the hard close below still happens
            pass
        relay.close(self._pending.reason, "gateway", self._pending.detail)

    def abandon(self, info: CloseInfo) -> None:
        """End a session whose relay never started (its set-up failed after the session was
        registered): release its limits lease and hand its close record on, as a relay's end
        would. No-op once a relay is attached."""
        if self.relay is not None or self.close_info is not None:
            return
        self.lease.release()
        self.close_info = info
        self.on_close(self, info)

    @property
    def closing(self) -> bool:
        """Whether a graceful close is under way (the relay still runs)."""
        return self._pending is not None and self.relay is not None and not self.relay.closed

    def update(self, auth: Authorization) -> None:
        """Apply a re-checked grant: limits may have changed (revalidation)."""
        self.auth = auth
        self._apply_limits(auth.connection_limits)

    # -- accounting -----------------------------------------------------------------------

    def on_bytes(self, direction: int, nbytes: int) -> None:
        """Relay callback for every chunk; enforces bandwidth budgets."""
        windows = self._limits.bandwidth
        if windows:
            tracker = self.tracker
            tracker.charge(self.identity.user, nbytes)
            over = tracker.bandwidth_exceeded(self.identity.user, windows)
            if over is not None:
                self.close("limit", f"bandwidth: {over.bytes} bytes per {format_duration(over.period)}")

    @property
    def bytes_up(self) -> int:
        return self.relay.bytes[UP] if self.relay else 0

    @property
    def bytes_down(self) -> int:
        return self.relay.bytes[DOWN] if self.relay else 0

    @property
    def duration(self) -> float:
        return time.monotonic() - self.started_mono

    # -- internals ------------------------------------------------------------------------

    def _apply_limits(self, limits: Limits) -> None:
        relay = self.relay
        if relay is None:
            return
        self._limits = limits
        if limits.bandwidth:
            self.tracker.watch(self.identity.user, limits.bandwidth)
        relay.on_bytes = self.on_bytes if limits.bandwidth else None
        used = relay.bytes[UP] + relay.bytes[DOWN]
        relay.budget = None if limits.max_bytes_per_conn is None else max(0, limits.max_bytes_per_conn - used)
        if self._duration_timer is not None:
            self._duration_timer.cancel()
            self._duration_timer = None
        if limits.max_conn_duration:
            remaining = limits.max_conn_duration - self.duration
            self._duration_timer = relay.loop.call_later(max(0.0, remaining), self._duration_expired)

    def _duration_expired(self) -> None:
        limit = self._limits.max_conn_duration or 0.0
        self.close("limit", f"max_conn_duration {format_duration(limit)} reached")

    def _check_idle(self) -> None:
        relay = self.relay
        if relay is None or relay.closed:
            return
        quiet = relay.loop.time() - relay.last_activity
        if quiet >= self.idle_timeout:
            self.close("idle", f"no traffic for {format_duration(self.idle_timeout)}")
        else:
            # Re-arm for the remaining time instead of resetting a timer on every chunk.
            self._idle_timer = relay.loop.call_later(self.idle_timeout - quiet, self._check_idle)

    def _on_relay_done(self, fut: asyncio.Future[CloseInfo]) -> None:
        for timer in (self._duration_timer, self._idle_timer):
            if timer is not None:
                timer.cancel()
        self.lease.release()
        self.close_info = self._pending or fut.result()
        self.on_close(self, self.close_info)

    def describe(self) -> dict[str, Any]:
        """The fields the admin API and the audit record share."""
        return {
            "id": self.id,
            "listener": self.listener,
            "mode": self.mode,
            "user": self.identity.user,
            "node": self.identity.node,
            "identity_source": self.identity.source,
            "source": self.peer.remote_addr,
            "backend": self.backend,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "duration": round(self.duration, 3),
            "started": self.started,
            **self.extra,
        }


class SessionRegistry:
    """The live sessions of this gateway."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._empty = asyncio.Event()
        self._empty.set()

    def add(self, session: Session) -> None:
        self._sessions[session.id] = session
        self._empty.clear()

    def remove(self, session: Session) -> None:
        self._sessions.pop(session.id, None)
        if not self._sessions:
            self._empty.set()

    async def wait_empty(self) -> None:
        """Return once no session is live (shutdown's drain waits on this)."""
        await self._empty.wait()

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def __len__(self) -> int:
        return len(self._sessions)

    def for_listener(self, name: str) -> list[Session]:
        return [s for s in self._sessions.values() if s.listener == name]
