"""The relay over real connected sockets: integrity, half-close, back-pressure, budgets."""

import asyncio
import hashlib
import os
import socket

import pytest

from ferryman.proxy.poller import poller_for
from ferryman.proxy.relay import BULK, DOWN, SCRATCH_SIZE, UP, CloseInfo, SocketRelay, segment_aligned
from tests.support.sockets import tcp_pair


async def bounded(fut: "asyncio.Future[CloseInfo]", seconds: float = 5.0) -> CloseInfo:
    async with asyncio.timeout(seconds):
        return await fut


class Harness:
    """client_app <-> [client_sock | relay | backend_sock] <-> backend_app."""

    def __init__(self, splice: bool = True, budget: int | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.client_app, client_side = tcp_pair()
        backend_side, self.backend_app = tcp_pair()
        self.chunks: list[tuple[int, int]] = []
        self.relay = SocketRelay(
            loop,
            client_side,
            backend_side,
            lambda d, n: self.chunks.append((d, n)),
            budget=budget,
            splice=splice,
        )

    async def send_all(self, sock: socket.socket, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(sock, data)

    async def recv_all(self, sock: socket.socket, n: int | None = None) -> bytes:
        loop = asyncio.get_running_loop()
        out = bytearray()
        while n is None or len(out) < n:
            chunk = await loop.sock_recv(sock, 1 << 16)
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def close_apps(self) -> None:
        self.client_app.close()
        self.backend_app.close()


@pytest.mark.parametrize("splice", [True, False])
async def test_bulk_transfer_both_ways_is_exact(splice: bool) -> None:
    h = Harness(splice=splice)
    h.relay.start()
    up = os.urandom(3 * 1024 * 1024 + 17)
    down = os.urandom(2 * 1024 * 1024 + 5)

    async def client() -> bytes:
        await h.send_all(h.client_app, up)
        h.client_app.shutdown(socket.SHUT_WR)
        return await h.recv_all(h.client_app)

    async def backend() -> bytes:
        send = asyncio.ensure_future(h.send_all(h.backend_app, down))
        got = await h.recv_all(h.backend_app)
        await send
        h.backend_app.shutdown(socket.SHUT_WR)
        return got

    got_down, got_up = await asyncio.gather(client(), backend())
    assert hashlib.sha256(got_up).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(got_down).digest() == hashlib.sha256(down).digest()
    info = await bounded(h.relay.done)
    assert info.reason == "normal"
    assert h.relay.bytes == [len(up), len(down)]
    assert sum(n for d, n in h.chunks if d == UP) == len(up)
    assert sum(n for d, n in h.chunks if d == DOWN) == len(down)
    h.close_apps()


async def test_half_close_client_still_receives_reply() -> None:
    h = Harness()
    h.relay.start()
    await h.send_all(h.client_app, b"question")
    h.client_app.shutdown(socket.SHUT_WR)
    assert await h.recv_all(h.backend_app) == b"question"  # EOF reached the backend
    assert not h.relay.closed
    reply = os.urandom(500_000)
    await h.send_all(h.backend_app, reply)
    h.backend_app.shutdown(socket.SHUT_WR)
    assert await h.recv_all(h.client_app) == reply
    info = await h.relay.done
    assert (info.reason, info.closed_by) == ("normal", "client")
    h.close_apps()


async def test_backend_closing_first_is_recorded() -> None:
    h = Harness()
    h.relay.start()
    h.backend_app.shutdown(socket.SHUT_WR)
    assert await h.recv_all(h.client_app) == b""
    await h.send_all(h.client_app, b"late words")
    assert await h.recv_all(h.backend_app, 10) == b"late words"
    h.client_app.shutdown(socket.SHUT_WR)
    info = await h.relay.done
    assert (info.reason, info.closed_by) == ("normal", "backend")
    h.close_apps()


@pytest.mark.parametrize("splice", [True, False])
async def test_back_pressure_stops_reading_from_a_fast_sender(splice: bool) -> None:
    """With nobody reading at the backend, the relay must stop taking client bytes."""
    h = Harness(splice=splice)
    h.relay.start()
    sent = 0
    block = b"x" * 65536
    # Fill until the client's own send buffer is full: that only happens if the relay
    # stopped reading, because it could not write to the backend.
    while True:
        try:
            sent += h.client_app.send(block)
        except BlockingIOError:
            await asyncio.sleep(0.05)
            try:
                sent += h.client_app.send(block)
            except BlockingIOError:
                break
        await asyncio.sleep(0)
        assert sent < 512 * 1024 * 1024, "relay never pushed back"
    relayed = h.relay.bytes[UP]
    assert relayed < sent
    await asyncio.sleep(0.2)
    assert h.relay.bytes[UP] == relayed  # stalled, not buffering in user space
    assert len(await h.recv_all(h.backend_app, sent)) == sent
    h.relay.close("normal")
    h.close_apps()


@pytest.mark.parametrize("splice", [True, False])
async def test_budget_cuts_exactly_at_the_limit(splice: bool) -> None:
    h = Harness(splice=splice, budget=100_000)
    h.relay.start()
    await h.send_all(h.client_app, os.urandom(60_000))
    assert len(await h.recv_all(h.backend_app, 60_000)) == 60_000
    try:
        await h.send_all(h.client_app, os.urandom(SCRATCH_SIZE * 3))
    except ConnectionError:
        pass
    info = await bounded(h.relay.done)
    assert info.reason == "limit"
    assert sum(h.relay.bytes) == 100_000
    h.close_apps()


async def test_initial_bytes_go_first() -> None:
    h = Harness()
    h.relay.start(initial_up=b"peeked-")
    await h.send_all(h.client_app, b"rest")
    assert await h.recv_all(h.backend_app, 11) == b"peeked-rest"
    h.relay.close("normal")
    h.close_apps()


async def test_client_reset_ends_the_relay() -> None:
    h = Harness()
    h.relay.start()
    h.client_app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    h.client_app.close()  # RST
    info = await bounded(h.relay.done)
    assert info.closed_by == "client"
    assert await h.recv_all(h.backend_app) == b""
    h.backend_app.close()


@pytest.mark.parametrize("splice", [True, False])
@pytest.mark.parametrize("size", [1000, 200_000])
async def test_backend_reset_right_after_its_last_bytes_ends_the_relay(splice: bool, size: int) -> None:
    """The reply and the backend's RST arrive together, while the client waits quietly for
    the end: the relay ends with backend_error, after forwarding what the backend sent first.
    (uvloop reports such a socket's EPOLLERR to a reader once and then stops polling it, so
    a relay watching it with ``loop.add_reader`` would wait forever; the relay's own
    level-triggered epoll set keeps reporting it.)"""
    h = Harness(splice=splice)
    h.relay.start()
    reply = os.urandom(size)
    sent = h.backend_app.send(reply)  # whatever fits at once; on loopback it is on its way
    h.backend_app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    h.backend_app.close()  # RST right behind the data, before the relay has read any of it
    info = await bounded(h.relay.done)
    assert (info.reason, info.closed_by) == ("backend_error", "backend")
    got = await h.recv_all(h.client_app)
    assert got == reply[: len(got)] and len(got) <= sent
    if size <= 1000:
        assert got == reply
    h.client_app.close()


async def test_each_socket_is_watched_once_and_unwatched_when_the_relay_ends() -> None:
    """The relay's sockets are in the loop's epoll set while it runs and gone from it after:
    closed ones by closing, a detached backend (kept open for reuse) explicitly, so a new relay
    can watch it again (registering it twice would fail with EEXIST)."""
    loop = asyncio.get_running_loop()
    poller = poller_for(loop)
    before = len(poller)
    h = Harness()
    h.relay.start()
    assert len(poller) == before + 2
    h.relay.detach()
    assert len(poller) == before
    backend_side = h.relay.detached
    assert backend_side is not None
    client_app, client_side = tcp_pair()
    again = SocketRelay(loop, client_side, backend_side, None)
    again.start()
    assert len(poller) == before + 2
    h.backend_app.sendall(b"still here")
    assert await h.recv_all(client_app, 10) == b"still here"
    client_app.sendall(b"ok")
    assert await h.recv_all(h.backend_app, 2) == b"ok"
    again.close("normal")
    assert len(poller) == before
    assert (await bounded(again.done)).reason == "normal"
    client_app.close()
    h.close_apps()


async def test_close_is_idempotent_and_closes_both_sockets() -> None:
    h = Harness()
    h.relay.start()
    h.relay.close("revoked", "gateway", "grant removed")
    h.relay.close("normal")
    info = await h.relay.done
    assert (info.reason, info.detail) == ("revoked", "grant removed")
    assert await h.recv_all(h.client_app) == b""
    assert await h.recv_all(h.backend_app) == b""
    h.close_apps()


@pytest.mark.skipif(not hasattr(socket, "TCP_MAXSEG"), reason="needs TCP_MAXSEG")
async def copy_queued_bulk(backend_side: socket.socket, backend_app: socket.socket, size: int) -> list[int]:
    """Queue ``size`` random bytes from a client, then relay them (copy mode) to ``backend_side``;
    check they arrive intact at ``backend_app``. Returns the relay's read sizes."""
    loop = asyncio.get_running_loop()
    client_app, client_side = tcp_pair()
    reads: list[int] = []
    relay = SocketRelay(loop, client_side, backend_side, lambda d, n: reads.append(n), splice=False)
    payload = os.urandom(size)
    sender = asyncio.ensure_future(loop.sock_sendall(client_app, payload))
    await asyncio.sleep(0.05)  # let the client's data queue up so the relay's reads fill up
    relay.start()
    got = bytearray()
    while len(got) < len(payload):
        got += await loop.sock_recv(backend_app, 1 << 20)
    await sender
    assert got == payload
    relay.close("normal")
    for s in (client_app, backend_app):
        s.close()
    return reads


async def test_copy_mode_sends_whole_segments_in_bulk() -> None:
    """Copying bulk data, the relay reads (and so sends) whole multiples of the destination's
    segment size: with TCP_NODELAY any other size ends in a short segment of its own (on
    loopback a 64 KiB send is a 65,483-byte segment and a 53-byte one)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        backend_side = socket.socket()
        backend_side.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1000)
        backend_side.connect(server.getsockname())
        backend_app, _ = server.accept()
    for s in (backend_side, backend_app):
        s.setblocking(False)
    mss = backend_side.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
    assert 0 < mss <= 1000
    assert segment_aligned(backend_side) == SCRATCH_SIZE - SCRATCH_SIZE % mss
    reads = await copy_queued_bulk(backend_side, backend_app, 8 * 1024 * 1024)
    aligned = SCRATCH_SIZE - SCRATCH_SIZE % mss
    bulk = [n for n in reads if n >= BULK]
    # The first bulk read tells the relay it is moving bulk data; from then on a read that
    # finds enough data queued takes exactly a whole number of segments, never more.
    assert aligned in bulk[1:], (mss, bulk[:10])
    assert max(bulk[1:]) == aligned, (mss, bulk[:10])


def test_segment_size_of_a_socket_without_one() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert segment_aligned(a) is None


async def test_bulk_copy_to_a_unix_socket() -> None:
    """A backend reached over a unix socket (tailscaled's dial) has no TCP segment size: bulk
    data is still copied whole, in full-buffer reads."""
    backend_side, backend_app = socket.socketpair()
    for s in (backend_side, backend_app):
        s.setblocking(False)
    reads = await copy_queued_bulk(backend_side, backend_app, 4 * 1024 * 1024)
    assert max(reads) == SCRATCH_SIZE
