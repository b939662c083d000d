"""Byte relay between two connected, non-blocking sockets.

Owns: moving bytes both ways with back-pressure, half-close propagation, byte counting, the
per-connection byte budget, the last-activity clock, and the close reason / who closed first.

Must not: identify, authorize, dial or log. Timers (idle, duration) and grant limits that span
connections belong to :mod:`ferryman.proxy.session`, which calls :meth:`SocketRelay.close`.

How it moves bytes. The relay is callback-driven (readiness from :mod:`~ferryman.proxy.poller`), not a
pair of tasks, so an idle connection costs two small objects and no coroutine frames. A
direction starts in *copy* mode: ``recv_into`` a scratch buffer shared by every connection
(the loop is single-threaded), then ``send``; only bytes the destination would not take are
kept per connection. When a read returns at least :data:`BULK` bytes the direction is moving
bulk data. By default it keeps copying, but reads a whole number of the destination's TCP
segments (``TCP_MAXSEG``) at a time: sockets carry ``TCP_NODELAY``, so a send that is not a
multiple of the segment size ends in a short segment of its own (64 KiB on loopback, where a
segment is 65,483 bytes, is one full segment and a 53-byte one, doubling the packets both
peers handle). With ``splice=True`` (``serve --splice``) it switches instead to ``splice(2)``
through its own pipe, so payload stays in the kernel: less CPU for the gateway, but measured
slower end to end with peers on the same host (bench/README.md, "Copy or splice").
Back-pressure: while a destination has unsent bytes, its source is not read.

Half-close: EOF from one side is passed on with ``shutdown(SHUT_WR)`` once everything read
from that side has been written; the other direction keeps flowing. The relay ends when both
directions have ended, when either side errors, or when :meth:`SocketRelay.close` is called.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

from ferryman.proxy.poller import ERR, IN, OUT, poller_for

UP: Final = 0
"""Client → backend."""
DOWN: Final = 1
"""Backend → client."""
SIDE_NAMES: Final = ("client", "backend")

SCRATCH_SIZE: Final = 1 << 18
"""The shared copy buffer; a copy-mode read takes at most this much."""
BULK: Final = 65536
"""A read of at least this many bytes means the direction is moving bulk data."""
PIPE_SIZE: Final = 1 << 20
_HAS_SPLICE = hasattr(os, "splice")
_SPLICE_FLAGS = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if _HAS_SPLICE else 0
_F_SETPIPE_SZ = 1031  # linux/fcntl.h: F_LINUX_SPECIFIC_BASE + 7
_scratch = bytearray(SCRATCH_SIZE)
_scratch_view = memoryview(_scratch)

IN_OR_ERR: Final = IN | ERR
OUT_OR_ERR: Final = OUT | ERR

# Errors a peer causes by going away; anything else on a socket is reported as an error.
_PEER_GONE = {errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EHOSTUNREACH}


@dataclass(frozen=True, slots=True)
class CloseInfo:
    """Why and how a relay ended."""

    reason: str
    """``normal``, ``limit``, ``revoked``, ``idle``, ``shutdown``, ``backend_error`` or ``error``."""
    closed_by: str
    """``client``, ``backend`` or ``gateway``: who ended the session first."""
    detail: str = ""


class Watch(Protocol):
    """Follows a relayed stream (PostgreSQL: :class:`ferryman.pgwire.SessionTracker`) while
    ``active``; copy mode feeds it every chunk before sending, and splice waits until it stops."""

    active: bool

    def client_data(self, data: memoryview) -> bool:
        """True: do not forward ``data``; end the relay keeping the backend (:meth:`SocketRelay.detach`)."""
        ...

    def backend_data(self, data: memoryview) -> None: ...


OnBytes = Callable[[int, int], None]


class Relay(Protocol):
    """What a session needs from a relay (``SocketRelay`` or ``streams.TransportRelay``)."""

    loop: asyncio.AbstractEventLoop
    bytes: list[int]
    budget: int | None
    last_activity: float
    closed: bool
    done: asyncio.Future[CloseInfo]
    on_bytes: OnBytes | None
    """Called with (direction, n) for every chunk moved; None when nobody needs it (the
    session sets it only while a bandwidth window applies: one call less per message)."""

    def close(self, reason: str, closed_by: str = "gateway", detail: str = "") -> None: ...


def segment_aligned(sock: socket.socket, size: int = SCRATCH_SIZE) -> int | None:
    """The largest whole number of ``sock``'s TCP segments that fits in ``size`` bytes (``size``
    itself when a segment is larger); None when ``sock`` has no TCP segment size (a unix socket
    to tailscaled, say)."""
    try:
        mss = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
    except OSError:
        return None
    if mss <= 0 or mss >= size:
        return size
    return size - size % mss


class _Pump:
    """One direction of the relay."""

    __slots__ = (
        "backlog",
        "chunk",
        "dst",
        "dst_fd",
        "ended",
        "eof",
        "in_pipe",
        "index",
        "pipe_r",
        "pipe_w",
        "reading",
        "relay",
        "src",
        "src_fd",
        "writing",
    )

    def __init__(self, relay: SocketRelay, index: int, src: socket.socket, dst: socket.socket) -> None:
        self.relay = relay
        self.index = index
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.backlog: memoryview | None = None
        self.chunk = SCRATCH_SIZE
        """Copy-mode read size: a whole number of the destination's segments once bulk; 0 for
        a destination without TCP segments (read :data:`SCRATCH_SIZE`, stop asking)."""
        self.in_pipe = 0
        self.pipe_r = -1
        self.pipe_w = -1
        self.eof = False
        self.ended = False
        self.reading = False
        self.writing = False

    # -- readiness callbacks --------------------------------------------------------------

    def on_readable(self) -> None:
        relay = self.relay
        want = (self.chunk or SCRATCH_SIZE) if self.pipe_w < 0 else PIPE_SIZE
        if relay.budget is not None:
            if relay.budget <= 0:
                relay.close("limit", "gateway", "max_bytes_per_conn reached")
                return
            want = min(want, relay.budget)
        try:
            if self.pipe_w >= 0:
                n = os.splice(self.src_fd, self.pipe_w, want, flags=_SPLICE_FLAGS)
            else:
                n = self.src.recv_into(_scratch, want)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            relay.failed(self.index, exc)
            return
        if n == 0:
            self._on_eof()
            return
        # Inlined accounting (this runs for every message): counts, budget, activity clock.
        relay.bytes[self.index] += n
        if relay.budget is not None:
            relay.budget -= n
        relay.last_activity = relay.loop.time()
        if relay.on_bytes is not None:
            relay.on_bytes(self.index, n)
            if relay.closed:
                return
        if self.pipe_w >= 0:
            self.in_pipe += n
            self._flush()
            return
        watch = relay.watch
        if watch is not None:
            if self.index == UP:
                if watch.client_data(_scratch_view[:n]):
                    relay.detach()
                    return
            else:
                watch.backend_data(_scratch_view[:n])
            if not watch.active:
                relay.watch = None
        # Copy mode: send straight from the shared scratch buffer; keep only what is left.
        try:
            sent = self.dst.send(_scratch_view[:n])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            relay.failed(1 - self.index, exc)
            return
        if sent < n:
            self.backlog = memoryview(bytes(_scratch_view[sent:n]))
            self._wait_writable()
        if n >= BULK:
            if _HAS_SPLICE and relay.splice_ok and relay.watch is None:
                self._start_splice()
            elif self.chunk:
                # Asked again on every bulk read: one cheap call per >= 64 KiB copied, and the
                # segment size can grow (on loopback it starts at half the peer's window).
                # A destination without one keeps whole-buffer reads (chunk 0 means: stop asking).
                self.chunk = segment_aligned(self.dst) or 0

    def on_writable(self) -> None:
        self._flush()

    # -- internals ------------------------------------------------------------------------

    def start(self, initial: bytes = b"") -> None:
        if initial:
            self.backlog = memoryview(initial)
            self._flush()
        else:
            self._resume_reading()

    def _flush(self) -> None:
        relay = self.relay
        try:
            while self.backlog is not None:
                sent = self.dst.send(self.backlog)
                self.backlog = self.backlog[sent:] if sent < len(self.backlog) else None
            while self.in_pipe:
                self.in_pipe -= os.splice(self.pipe_r, self.dst_fd, self.in_pipe, flags=_SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            self._wait_writable()
            return
        except OSError as exc:
            relay.failed(1 - self.index, exc)
            return
        if self.writing:
            self.writing = False
            relay.watch_fd(1 - self.index)
        if self.eof:
            self._end()
        else:
            self._resume_reading()

    def _wait_writable(self) -> None:
        relay = self.relay
        if self.reading:
            self.reading = False
            relay.watch_fd(self.index)
        if not self.writing:
            self.writing = True
            relay.watch_fd(1 - self.index)

    def _resume_reading(self) -> None:
        if not self.reading and not self.eof:
            self.reading = True
            self.relay.watch_fd(self.index)

    def _start_splice(self) -> None:
        try:
            self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            self.relay.splice_ok = False  # out of descriptors: stay in copy mode
            return
        try:
            import fcntl

            fcntl.fcntl(self.pipe_w, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # the default pipe size (64 KiB) still works, just with more calls

    def _on_eof(self) -> None:
        relay = self.relay
        self.eof = True
        self.reading = False
        if self.backlog is None and not self.in_pipe:
            self._end()
        if not relay.closed:
            # After _end: when that ended the relay, closing the socket unwatches it for free.
            relay.watch_fd(self.index)

    def _end(self) -> None:
        if self.ended:
            return
        self.ended = True
        # Half-close the other side -- unless the other direction is already over, in which case
        # the relay closes both sockets right now and close() sends the FIN anyway.
        if not self.relay.other_ended(self.index):
            try:
                self.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self.relay.direction_ended(self.index)

    def stop(self) -> None:
        self.reading = self.writing = False
        if self.pipe_r >= 0:
            os.close(self.pipe_r)
            os.close(self.pipe_w)
            self.pipe_r = self.pipe_w = -1


class SocketRelay:
    """Relays between ``client`` and ``backend`` until both sides finish or it is closed.

    ``on_bytes(direction, n)``, unless None, is called for every chunk moved (``UP`` or
    ``DOWN``); it may call :meth:`close`. ``done`` resolves with a :class:`CloseInfo`. The
    relay owns both sockets from :meth:`start` on and closes them.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: socket.socket,
        backend: socket.socket,
        on_bytes: OnBytes | None,
        *,
        budget: int | None = None,
        splice: bool = False,
        watch: Watch | None = None,
    ) -> None:
        self.loop = loop
        self.client = client
        self.backend = backend
        self.on_bytes: OnBytes | None = on_bytes
        self.budget = budget
        """Bytes (both directions together) still allowed, or ``None`` for no limit."""
        self.splice_ok = splice
        self.watch = watch
        self.detached: socket.socket | None = None
        """The backend socket, still open and positioned at a message boundary, if the relay
        ended by :meth:`detach`; the caller owns it then."""
        self.bytes = [0, 0]
        self.last_activity = loop.time()
        self.closed = False
        self.done: asyncio.Future[CloseInfo] = loop.create_future()
        self._first_end: int | None = None
        self._pumps = (_Pump(self, UP, client, backend), _Pump(self, DOWN, backend, client))
        self._poller = poller_for(loop)
        self._masks = [-1, -1]
        """What the poller watches each socket (``UP`` = client, ``DOWN`` = backend) for; -1:
        not registered."""
        self._handlers = (self._on_client_event, self._on_backend_event)

    def start(self, initial_up: bytes = b"", initial_down: bytes = b"") -> None:
        """Begin relaying; ``initial_*`` are bytes already read that must go first."""
        watch = self.watch
        if watch is not None:
            if initial_down:
                watch.backend_data(memoryview(initial_down))
            if initial_up and watch.client_data(memoryview(initial_up)):
                self.detach()
                return
        self._pumps[UP].start(initial_up)
        if not self.closed:
            self._pumps[DOWN].start(initial_down)

    def watch_fd(self, side: int) -> None:
        """Have the poller watch socket ``side`` (``UP`` = client, ``DOWN`` = backend) for what
        its pumps wait for: reading it (pump ``side``), writing it (the other pump)."""
        pumps = self._pumps
        mask = (IN if pumps[side].reading else 0) | (OUT if pumps[1 - side].writing else 0)
        current = self._masks[side]
        if mask == current or (mask == 0 and current < 0):
            return
        fd = pumps[side].src_fd
        if current < 0:
            self._poller.register(fd, mask, self._handlers[side])
        elif mask:
            self._poller.modify(fd, mask)
        else:
            # Not left registered with an empty mask: an error or hang-up would still be
            # reported, level-triggered, with nobody to take it.
            self._poller.unregister(fd)
            mask = -1
        self._masks[side] = mask

    def _on_client_event(self, events: int) -> None:
        pumps = self._pumps
        if events & OUT_OR_ERR and pumps[DOWN].writing:
            pumps[DOWN].on_writable()
        if events & IN_OR_ERR and pumps[UP].reading and not self.closed:
            pumps[UP].on_readable()

    def _on_backend_event(self, events: int) -> None:
        pumps = self._pumps
        if events & OUT_OR_ERR and pumps[UP].writing:
            pumps[UP].on_writable()
        if events & IN_OR_ERR and pumps[DOWN].reading and not self.closed:
            pumps[DOWN].on_readable()

    def other_ended(self, direction: int) -> bool:
        return self._pumps[1 - direction].ended

    def direction_ended(self, direction: int) -> None:
        if self._first_end is None:
            self._first_end = direction
        if all(p.ended for p in self._pumps):
            self.close("normal", SIDE_NAMES[self._first_end])

    def failed(self, side: int, exc: OSError) -> None:
        """A socket operation on ``side`` (``UP`` = client, ``DOWN`` = backend) failed."""
        name = SIDE_NAMES[side]
        detail = f"{name}: {exc.strerror or exc}"
        if exc.errno in _PEER_GONE:
            self.close("backend_error" if side == DOWN else "normal", name, detail)
        else:
            self.close("error", name, detail)

    def detach(self) -> None:
        """End the relay as the client's normal close, but keep the backend socket open and
        unread in :attr:`detached` (for PostgreSQL backend-session reuse)."""
        if not self.closed:
            self.detached = self.backend
            self._end((self.client,), CloseInfo("normal", "client"))

    def close(self, reason: str, closed_by: str = "gateway", detail: str = "") -> None:
        """End the relay now (idempotent) and close both sockets."""
        if not self.closed:
            self._end((self.client, self.backend), CloseInfo(reason, closed_by, detail))

    def _end(self, sockets: tuple[socket.socket, ...], info: CloseInfo) -> None:
        self.closed = True
        for pump in self._pumps:
            pump.stop()
        poller = self._poller
        for pump in self._pumps:
            if self._masks[pump.index] >= 0:
                self._masks[pump.index] = -1
                if pump.src in sockets:
                    poller.forget(pump.src_fd)  # closed below, which unwatches it
                else:
                    poller.unregister(pump.src_fd)
        for sock in sockets:
            try:
                sock.close()
            except OSError:
                pass
        if not self.done.done():
            self.done.set_result(info)
