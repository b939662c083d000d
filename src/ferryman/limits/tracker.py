"""Counters behind ``max_conns`` and ``bandwidth`` (SPEC §3), for one gateway process.

Owns: concurrent-connection counts per user and per (user, listener), handed out as
:class:`Lease` objects, and sliding-window byte usage per user.

Must not: know about sockets, sessions or timers; the clock is injected so tests can move
time. A fleet-wide implementation (Redis) will offer the same methods.

Bandwidth windows are sliding: each period is cut into ``BUCKETS`` buckets and usage is the
sum of the buckets that overlap the last ``period`` seconds, so usage decays smoothly instead
of resetting at a boundary.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ferryman.errors import LimitExceeded
from ferryman.policy.model import Bandwidth, Limits
from ferryman.units import format_duration

BUCKETS = 60


K = TypeVar("K")


def _decrement(table: dict[K, int], key: K) -> None:
    count = table.get(key, 0) - 1
    if count > 0:
        table[key] = count
    else:
        table.pop(key, None)


class _Window:
    """Sliding byte counter for one period."""

    __slots__ = ("buckets", "period", "total", "width")

    def __init__(self, period: float) -> None:
        self.period = period
        self.width = period / BUCKETS
        self.buckets: deque[list[float]] = deque()  # [bucket start, bytes]
        self.total = 0

    def _expire(self, now: float) -> None:
        horizon = now - self.period
        buckets = self.buckets
        while buckets and buckets[0][0] + self.width <= horizon:
            self.total -= int(buckets.popleft()[1])

    def add(self, now: float, nbytes: int) -> int:
        self._expire(now)
        buckets = self.buckets
        if buckets and now < buckets[-1][0] + self.width:
            buckets[-1][1] += nbytes
        else:
            buckets.append([now - (now % self.width), nbytes])
        self.total += nbytes
        return self.total

    def usage(self, now: float) -> int:
        self._expire(now)
        return self.total


@dataclass(slots=True)
class Lease:
    """One counted connection; :meth:`release` exactly once when it closes."""

    tracker: LimitTracker
    user: str
    listener: str
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.tracker._release(self.user, self.listener)


class LimitTracker:
    """In-process limit counters."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._per_user: dict[str, int] = {}
        self._per_listener: dict[tuple[str, str], int] = {}
        self._windows: dict[str, dict[float, _Window]] = {}

    def connections(self, user: str, listener: str | None = None) -> int:
        if listener is None:
            return self._per_user.get(user, 0)
        return self._per_listener.get((user, listener), 0)

    def acquire(
        self,
        user: str,
        listener: str,
        user_limits: Limits,
        listener_limits: Limits,
        bandwidth: tuple[Bandwidth, ...] | None = None,
    ) -> Lease:
        """Count a new connection, or raise :class:`LimitExceeded` naming the limit.

        ``bandwidth`` is the combined windows when the caller already has them.
        """
        if bandwidth is None:
            bandwidth = Limits.strictest((user_limits, listener_limits)).bandwidth
        over = self.bandwidth_exceeded(user, bandwidth)
        if over is not None:
            raise LimitExceeded("bandwidth", f"{over.bytes} bytes per {format_duration(over.period)} used up")
        if user_limits.max_conns and self._per_user.get(user, 0) >= user_limits.max_conns:
            raise LimitExceeded(
                "max_conns", f"{user_limits.max_conns} concurrent connections (all listeners)"
            )
        key = (user, listener)
        if listener_limits.max_conns and self._per_listener.get(key, 0) >= listener_limits.max_conns:
            raise LimitExceeded(
                "max_conns", f"{listener_limits.max_conns} concurrent connections to {listener}"
            )
        self._per_user[user] = self._per_user.get(user, 0) + 1
        self._per_listener[key] = self._per_listener.get(key, 0) + 1
        return Lease(self, user, listener)

    def _release(self, user: str, listener: str) -> None:
        _decrement(self._per_user, user)
        _decrement(self._per_listener, (user, listener))

    def watch(self, user: str, windows: tuple[Bandwidth, ...]) -> None:
        """Start counting ``user``'s bytes for each window's period."""
        per_user = self._windows.setdefault(user, {})
        for window in windows:
            if window.period not in per_user:
                per_user[window.period] = _Window(window.period)

    def charge(self, user: str, nbytes: int) -> None:
        """Add transferred bytes to every window watched for ``user``."""
        per_user = self._windows.get(user)
        if per_user:
            now = self._clock()
            for window in per_user.values():
                window.add(now, nbytes)

    def usage(self, user: str, period: float) -> int:
        window = self._windows.get(user, {}).get(period)
        return window.usage(self._clock()) if window else 0

    def prune(self) -> None:
        """Forget the bandwidth windows of users with no live connection whose counted bytes
        have all slid out of them (otherwise every user who ever had a window keeps one).
        A returning user's windows start afresh at zero, which is what they would read."""
        now = self._clock()
        idle = [user for user in self._windows if user not in self._per_user]
        for user in idle:
            if all(window.usage(now) == 0 for window in self._windows[user].values()):
                del self._windows[user]

    def bandwidth_exceeded(self, user: str, windows: tuple[Bandwidth, ...]) -> Bandwidth | None:
        """The first window whose budget ``user`` has used up, if any."""
        if not windows:
            return None
        per_user = self._windows.get(user)
        if not per_user:
            return None
        now = self._clock()
        for window in windows:
            counter = per_user.get(window.period)
            if counter is not None and counter.usage(now) >= window.bytes:
                return window
        return None
