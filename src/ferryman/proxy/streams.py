"""Connections that run over asyncio transports (TLS, tunnels) rather than raw sockets.

Owns: :class:`Conn`, an ``asyncio.Protocol`` that offers awaitable reads while a connection is
being set up (TLS handshake done by the loop, then a protocol's startup phase), and is then
handed to :class:`TransportRelay`, which moves bytes between two ``Conn`` objects with the
same contract as :class:`~ferryman.proxy.relay.SocketRelay` (counts, budget, half-close,
close reason). Also the helpers that turn a raw socket into a ``Conn``, with or without TLS.

Must not: decide anything about identity or routing. A raw plaintext pair should use
``SocketRelay`` (splice); this relay exists for everything that needs a transport.

Why not ``StreamReader``: a relay must take over the connection without a private-buffer
hand-off; ``Conn`` keeps its own buffer, and switching to relay mode forwards what it holds.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from ferryman.proxy.session import Session

from ferryman.proxy.relay import DOWN, SIDE_NAMES, UP, CloseInfo, OnBytes, Relay, SocketRelay, Watch

MAX_SETUP_BUFFER = 1 << 20


class Conn(asyncio.Protocol):
    """One side of a connection over a transport."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._eof = False
        self._lost: BaseException | None = None
        self._closed = False
        self._waiter: asyncio.Future[None] | None = None
        self._relay: TransportRelay | None = None
        self._side = UP
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the Transport interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        relay = self._relay
        if relay is not None:
            relay.received(self._side, data)
            return
        self._buffer += data
        if len(self._buffer) > MAX_SETUP_BUFFER and self.transport is not None:
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        if self._relay is not None:
            self._relay.eof(self._side)
        self._wake()
        # Keep the write side open (half-close) -- where the transport can: over TLS asyncio
        # closes anyway and warns about a True answer.
        transport = self.transport
        return transport is None or transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._lost = exc
        self._eof = True
        self._wake()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        if self._relay is not None:
            self._relay.lost(self._side, exc)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._relay is not None:
            self._relay.pause(self._side)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        if self._relay is not None:
            self._relay.resume(self._side)

    # -- set-up phase API ----------------------------------------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self) -> None:
        assert self._waiter is None, "concurrent reads on one Conn"
        if self.transport is not None:
            self.transport.resume_reading()
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def read(self, n: int = 65536) -> bytes:
        """Up to ``n`` bytes; ``b""`` at EOF."""
        while not self._buffer and not self._eof:
            await self._wait()
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    async def readexactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            if self._eof:
                raise asyncio.IncompleteReadError(bytes(self._buffer), n)
            await self._wait()
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    def take_buffer(self) -> bytes:
        """Everything received but not yet read (handed over when relaying starts)."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self._closed:
            self.transport.write(data)

    async def drain(self) -> None:
        if self._write_paused and not self._closed:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            await self._drain_waiter
        if self._closed and self._lost is not None:
            raise ConnectionResetError(str(self._lost))

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._buffer

    def extra(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default) if self.transport else default

    def close(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.abort()

    def lingers(self) -> bool:
        """Whether :meth:`close` may leave the connection open for a while: TLS (it waits for
        the peer's close_notify) or bytes the peer has not taken yet."""
        transport = self.transport
        if transport is None or self._closed:
            return False
        return transport.get_extra_info("sslcontext") is not None or transport.get_write_buffer_size() > 0


@dataclass(eq=False)
class SetupStream:
    """A connection during a protocol's set-up: a raw socket until TLS starts, then a
    :class:`Conn`; ``pending`` holds bytes already received for it (e.g. with a ts-dial answer)."""

    sock: socket.socket
    conn: Conn | None = None
    pending: bytes = b""

    async def recv(self) -> bytes:
        if self.pending:
            data, self.pending = self.pending, b""
            return data
        if self.conn is not None:
            return await self.conn.read(65536)
        return await asyncio.get_running_loop().sock_recv(self.sock, 65536)

    async def send(self, data: bytes) -> None:
        if self.conn is not None:
            self.conn.write(data)
            await self.conn.drain()
        else:
            await asyncio.get_running_loop().sock_sendall(self.sock, data)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.abort()
        self.sock.close()

    @property
    def tls(self) -> bool:
        return self.conn is not None


async def accept_tls(sock: socket.socket, context: ssl.SSLContext, timeout: float) -> Conn:
    """Server-side TLS handshake on an accepted socket.

    Raises ``ssl.SSLError``, ``OSError`` or ``TimeoutError``.
    """
    loop = asyncio.get_running_loop()
    conn = Conn()
    # uvloop returns its SSLProtocol here, not ours: keep our own reference.
    await loop.connect_accepted_socket(lambda: conn, sock, ssl=context, ssl_handshake_timeout=timeout)
    return conn


async def wrap_plain(sock: socket.socket, *, server_side: bool) -> Conn:
    """A plaintext socket as a ``Conn`` (to relay against a TLS or tunnelled side)."""
    loop = asyncio.get_running_loop()
    conn = Conn()
    if server_side:
        await loop.connect_accepted_socket(lambda: conn, sock)
    else:
        await loop.create_connection(lambda: conn, sock=sock)
    return conn


async def connect_tls(
    sock: socket.socket, context: ssl.SSLContext, server_hostname: str | None, timeout: float
) -> Conn:
    """Client-side TLS on a connected socket (backend TLS). Verification is the context's."""
    loop = asyncio.get_running_loop()
    conn = Conn()
    await loop.create_connection(
        lambda: conn, sock=sock, ssl=context, server_hostname=server_hostname, ssl_handshake_timeout=timeout
    )
    return conn


class TransportRelay:
    """Relays between two :class:`Conn` objects; same contract as ``SocketRelay``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: Conn,
        backend: Conn,
        on_bytes: OnBytes | None,
        *,
        budget: int | None = None,
    ) -> None:
        self.loop = loop
        self.conns = (client, backend)
        self.on_bytes: OnBytes | None = on_bytes
        self.budget = budget
        self.bytes = [0, 0]
        self.last_activity = loop.time()
        self.closed = False
        self.done: asyncio.Future[CloseInfo] = loop.create_future()
        self._ended = [False, False]
        self._first_end: int | None = None

    def start(self, initial_up: bytes = b"", initial_down: bytes = b"") -> None:
        client, backend = self.conns
        client._relay, client._side = self, UP
        backend._relay, backend._side = self, DOWN
        for side, initial in ((UP, initial_up), (DOWN, initial_down)):
            conn = self.conns[side]
            pending = initial + conn.take_buffer()
            if pending:
                self.received(side, pending)
            if self.closed:
                return
            if conn._eof:
                self.eof(side)
            elif conn.transport is not None:
                conn.transport.resume_reading()
            if self.conns[1 - side]._write_paused:
                self.pause(1 - side)

    # Called by Conn; ``side`` is where the event happened (UP = client, DOWN = backend).

    def received(self, side: int, data: bytes) -> None:
        if self.closed:
            return
        budget = self.budget
        if budget is not None and len(data) > budget:
            if budget:
                self._forward(side, data[:budget])
            self.close("limit", "gateway", "max_bytes_per_conn reached")
            return
        self._forward(side, data)

    def _forward(self, side: int, data: bytes) -> None:
        n = len(data)
        self.conns[1 - side].write(data)
        self.bytes[side] += n
        if self.budget is not None:
            self.budget -= n
        self.last_activity = self.loop.time()
        if self.on_bytes is not None:
            self.on_bytes(side, n)

    def eof(self, side: int) -> None:
        if self.closed or self._ended[side]:
            return
        self._ended[side] = True
        if self._first_end is None:
            self._first_end = side
        other = self.conns[1 - side].transport
        if all(self._ended):
            self.close("normal", SIDE_NAMES[self._first_end])
        elif other is not None and other.can_write_eof():
            other.write_eof()
        else:
            # TLS cannot half-close: the session ends when one side is done talking.
            self.close("normal", SIDE_NAMES[side])

    def lost(self, side: int, exc: Exception | None) -> None:
        if self.closed:
            return
        if exc is None:
            self.eof(side)
            if not self.closed:
                self.close("normal", SIDE_NAMES[side])
            return
        detail = f"{SIDE_NAMES[side]}: {exc}"
        self.close("backend_error" if side == DOWN else "normal", SIDE_NAMES[side], detail)

    def pause(self, side: int) -> None:
        """``side`` cannot take more: stop reading from the other side."""
        transport = self.conns[1 - side].transport
        if transport is not None and not self.closed:
            transport.pause_reading()

    def resume(self, side: int) -> None:
        transport = self.conns[1 - side].transport
        if transport is not None and not self.closed and not self._ended[1 - side]:
            transport.resume_reading()

    def close(self, reason: str, closed_by: str = "gateway", detail: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        for conn in self.conns:
            conn._relay = None
            # Flush what was relayed (e.g. up to a byte budget), but don't wait on a peer
            # that stopped reading: abort whatever is still open shortly after.
            conn.close()
            if conn.lingers():
                self.loop.call_later(2.0, conn.abort)
        if not self.done.done():
            self.done.set_result(CloseInfo(reason, closed_by, detail))


async def open_relay(
    session: Session,
    client_sock: socket.socket,
    client_conn: Conn | None,
    backend_sock: socket.socket,
    backend_conn: Conn | None,
    *,
    splice: bool,
    initial_up: bytes = b"",
    initial_down: bytes = b"",
    watch: Watch | None = None,
) -> Relay:
    """Start relaying a session's two sides and return at once; the relay then runs on the
    loop's readiness callbacks and ends through the session (its ``done`` resolves, the session
    audits and leaves the registry). Raw sockets on both sides use :class:`SocketRelay`
    (``watch`` follows the stream, see its ``detach``) and start without waiting; anything over
    a transport uses :class:`TransportRelay` (``watch`` unused)."""
    loop = asyncio.get_running_loop()
    relay: Relay
    # No byte callback yet: session.attach installs one while a bandwidth window applies.
    if client_conn is None and backend_conn is None:
        relay = SocketRelay(loop, client_sock, backend_sock, None, splice=splice, watch=watch)
    else:
        try:
            client_side = client_conn or await wrap_plain(client_sock, server_side=True)
            backend_side = backend_conn or await wrap_plain(backend_sock, server_side=False)
        except BaseException as exc:
            # Nothing relays these sockets, so nothing would ever end the session: end it here.
            for conn in (client_conn, backend_conn):
                if conn is not None:
                    conn.abort()
            client_sock.close()
            backend_sock.close()
            reason = "shutdown" if isinstance(exc, asyncio.CancelledError) else "error"
            session.abandon(CloseInfo(reason, "gateway", f"relay set-up failed: {exc!r}"))
            raise
        relay = TransportRelay(loop, client_side, backend_side, None)
    session.attach(relay)
    relay.start(initial_up=initial_up, initial_down=initial_down)
    return relay


async def until_closed(relay: Relay) -> None:
    """Wait until ``relay`` ends, for a caller with more to do after it (PostgreSQL mode). If
    the wait is cancelled (forced shutdown), the relay still closes and its session audits."""
    try:
        await asyncio.shield(relay.done)
    finally:
        relay.close("shutdown")
