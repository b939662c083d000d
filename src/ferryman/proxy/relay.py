"""Byte relay between two connected, non-blocking sockets.

Owns: moving bytes both ways with back-pressure, half-close propagation, byte counting, the
per-connection byte budget, the last-activity clock, and the close reason / who closed first.

Must not: identify, authorize, dial or log. Timers (idle, duration) and grant limits that span
connections belong to :mod:`ferryman.proxy.session`, which calls :meth:`SocketRelay.close`.

How it moves bytes. The relay is callback-driven (``loop.add_reader``/``add_writer``), not a
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

    def check_errors(self) -> None:
        """Notice a peer's reset the event loop did not report (raw sockets; a no-op over
        transports, which report errors themselves)."""
        ...


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
        "error",
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
        self.error: OSError | None = None
        """A reset (or other socket error) taken from ``src`` while data may still be queued
        ahead of it: reported when that data has been read (see :meth:`check_error`)."""
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
            relay.loop.remove_writer(self.dst_fd)
        if self.eof:
            self._end()
        else:
            self._resume_reading()

    def _wait_writable(self) -> None:
        loop = self.relay.loop
        if self.reading:
            self.reading = False
            loop.remove_reader(self.src_fd)
        if not self.writing:
            self.writing = True
            loop.add_writer(self.dst_fd, self.on_writable)

    def _resume_reading(self) -> None:
        if not self.reading and not self.eof:
            self.reading = True
            self.relay.loop.add_reader(self.src_fd, self.on_readable)

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

    def check_error(self) -> None:
        """While waiting on ``src``: take a pending socket error, if any, and poll ``src`` afresh.

        A reset that arrives right behind data makes the socket report EPOLLERR. uvloop hands
        that to the reader once (which reads the data) and then stops polling the descriptor
        for good (its poll handle is closed, silently), so a relay that waited for the next
        readiness callback would wait forever -- holding both sockets, the session and its
        limits -- whenever the other direction is quiet. Polling afresh (the error now taken,
        the socket reads as readable again) lets any data still queued ahead of the reset be
        read and forwarded; :meth:`_on_eof` then ends the relay with the error instead of a
        clean end of stream. One ``getsockopt``: called for quiet relays by a periodic sweep
        (:meth:`SocketRelay.check_errors`), not per read, which would cost every message a
        system call (measured: 8 % of redis-benchmark's requests per second)."""
        if not self.reading or self.error is not None:
            return
        try:
            err = self.src.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as exc:
            self.relay.failed(self.index, exc)
            return
        if err:
            self.error = OSError(err, os.strerror(err))
            loop = self.relay.loop
            loop.remove_reader(self.src_fd)
            loop.add_reader(self.src_fd, self.on_readable)

    def _on_eof(self) -> None:
        if self.error is not None:
            self.relay.failed(self.index, self.error)
            return
        self.eof = True
        if self.reading:
            self.reading = False
            self.relay.loop.remove_reader(self.src_fd)
        if self.backlog is None and not self.in_pipe:
            self._end()

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
        loop = self.relay.loop
        if self.reading:
            self.reading = False
            loop.remove_reader(self.src_fd)
        if self.writing:
            self.writing = False
            loop.remove_writer(self.dst_fd)
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

    def check_errors(self) -> None:
        """Find a reset that the event loop stopped reporting (see :meth:`_Pump.check_error`);
        for a relay quiet for a while, called by the gateway's socket sweep."""
        for pump in self._pumps:
            if self.closed:
                return
            pump.check_error()

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
        for sock in sockets:
            try:
                sock.close()
            except OSError:
                pass
        if not self.done.done():
            self.done.set_result(info)
