"""Transport-based connections and relay: TLS termination, half-close, budgets, back-pressure."""

import asyncio
import hashlib
import os
import socket
import ssl

import pytest
import trustme

from ferryman.proxy.relay import CloseInfo
from ferryman.proxy.streams import Conn, TransportRelay, accept_tls, connect_tls, wrap_plain
from tests.support.sockets import tcp_pair


async def bounded(fut: "asyncio.Future[CloseInfo]") -> CloseInfo:
    async with asyncio.timeout(10):
        return await fut


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("gw.test").configure_cert(ctx)
    return ctx


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


async def test_conn_reads_during_setup_then_relays_leftovers() -> None:
    app, gw_side = tcp_pair()
    backend_gw, backend_app = tcp_pair()
    loop = asyncio.get_running_loop()
    client = await wrap_plain(gw_side, server_side=True)
    backend = await wrap_plain(backend_gw, server_side=False)
    await loop.sock_sendall(app, b"HELLO rest-of-first-segment")
    assert await client.readexactly(5) == b"HELLO"
    relay = TransportRelay(loop, client, backend, lambda d, n: None)
    relay.start()
    got = b""
    while len(got) < len(b" rest-of-first-segment"):
        got += await loop.sock_recv(backend_app, 100)
    assert got == b" rest-of-first-segment"
    relay.close("normal")
    app.close()
    backend_app.close()


async def test_tls_terminated_relay_is_exact(ca: trustme.CA) -> None:
    loop = asyncio.get_running_loop()
    app, gw_side = tcp_pair()
    backend_gw, backend_app = tcp_pair()
    app.setblocking(True)

    accepting = asyncio.ensure_future(accept_tls(gw_side, server_context(ca), 5))
    tls_app = await asyncio.to_thread(lambda: client_context(ca).wrap_socket(app, server_hostname="gw.test"))
    client = await accepting
    backend = await wrap_plain(backend_gw, server_side=False)
    seen: list[tuple[int, int]] = []
    relay = TransportRelay(loop, client, backend, lambda d, n: seen.append((d, n)))
    relay.start()

    payload = os.urandom(2_000_000)

    def talk() -> bytes:
        tls_app.sendall(payload)
        out = bytearray()
        while len(out) < len(payload):
            out += tls_app.recv(65536)
        tls_app.close()
        return bytes(out)

    async def echo_backend() -> None:
        got = 0
        while got < len(payload):
            chunk = await loop.sock_recv(backend_app, 65536)
            got += len(chunk)
            await loop.sock_sendall(backend_app, chunk)

    echoed, _ = await asyncio.gather(asyncio.to_thread(talk), echo_backend())
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    info = await bounded(relay.done)
    assert (info.reason, info.closed_by) == ("normal", "client")
    assert relay.bytes == [len(payload), len(payload)]
    backend_app.close()


async def test_plain_half_close_over_transports() -> None:
    loop = asyncio.get_running_loop()
    app, gw_side = tcp_pair()
    backend_gw, backend_app = tcp_pair()
    relay = TransportRelay(
        loop,
        await wrap_plain(gw_side, server_side=True),
        await wrap_plain(backend_gw, server_side=False),
        lambda d, n: None,
    )
    relay.start()
    await loop.sock_sendall(app, b"q")
    app.shutdown(socket.SHUT_WR)
    assert await loop.sock_recv(backend_app, 10) == b"q"
    assert await loop.sock_recv(backend_app, 10) == b""  # EOF passed on
    await loop.sock_sendall(backend_app, b"answer")
    backend_app.shutdown(socket.SHUT_WR)
    assert await loop.sock_recv(app, 10) == b"answer"
    info = await bounded(relay.done)
    assert (info.reason, info.closed_by) == ("normal", "client")
    app.close()
    backend_app.close()


async def test_budget_over_transports() -> None:
    loop = asyncio.get_running_loop()
    app, gw_side = tcp_pair()
    backend_gw, backend_app = tcp_pair()
    relay = TransportRelay(
        loop,
        await wrap_plain(gw_side, server_side=True),
        await wrap_plain(backend_gw, server_side=False),
        lambda d, n: None,
        budget=1000,
    )
    relay.start()
    await loop.sock_sendall(app, b"a" * 3000)
    info = await bounded(relay.done)
    assert info.reason == "limit"
    assert relay.bytes[0] == 1000
    received = b""
    while chunk := await loop.sock_recv(backend_app, 4096):
        received += chunk
    assert received == b"a" * 1000
    app.close()
    backend_app.close()


async def test_backpressure_pauses_reading(ca: trustme.CA) -> None:
    loop = asyncio.get_running_loop()
    app, gw_side = tcp_pair()
    backend_gw, backend_app = tcp_pair()
    client = await wrap_plain(gw_side, server_side=True)
    backend = await wrap_plain(backend_gw, server_side=False)
    relay = TransportRelay(loop, client, backend, lambda d, n: None)
    relay.start()
    sent = 0
    stalled = 0
    while stalled < 3 and sent < 256 * 1024 * 1024:
        try:
            sent += app.send(b"x" * 65536)
            stalled = 0
        except BlockingIOError:
            stalled += 1
            await asyncio.sleep(0.05)
    assert sent < 256 * 1024 * 1024, "relay never pushed back"
    assert backend.transport is not None
    assert backend.transport.get_write_buffer_size() < 4 * 1024 * 1024
    relay.close("normal")
    app.close()
    backend_app.close()


async def test_backend_tls_verification(ca: trustme.CA) -> None:
    """connect_tls verifies the backend against the given CA and name."""
    loop = asyncio.get_running_loop()
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=server_context(ca))
    port = server.sockets[0].getsockname()[1]
    try:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        conn = await connect_tls(sock, client_context(ca), "gw.test", 5)
        assert isinstance(conn, Conn)
        assert conn.extra("ssl_object") is not None
        conn.close()
        sock2 = socket.create_connection(("127.0.0.1", port))
        sock2.setblocking(False)
        with pytest.raises(ssl.SSLCertVerificationError):
            await connect_tls(sock2, client_context(ca), "wrong.name", 5)
    finally:
        server.close()
        await server.wait_closed()
        del loop


async def test_a_relay_that_cannot_be_set_up_ends_its_session() -> None:
    """open_relay registers nothing it cannot finish: when wrapping a side fails (here the
    backend socket is already closed), both sides are closed, the session's limits lease is
    released and its close record handed on -- no session left in a registry for ever."""
    from ferryman.identity.base import Identity, PeerInfo
    from ferryman.limits.tracker import LimitTracker
    from ferryman.policy.engine import authorize
    from ferryman.policy.parse import parse_policy
    from ferryman.proxy.session import Session
    from ferryman.proxy.streams import open_relay

    cap = "ferryman.dev/cap/ferryman"
    policy = parse_policy(
        {"grants": [{"src": ["*"], "app": {cap: [{"backends": {"svc": {}}}]}}]}, capability=cap
    )
    alice = Identity(user="alice@example.com", source="static")
    auth = authorize(alice, None, "svc", policy)
    tracker = LimitTracker()
    lease = tracker.acquire(alice.user, "svc", auth.user_limits, auth.listener_limits)
    closed: list[CloseInfo] = []
    session = Session(
        id="t-1",
        listener="svc",
        mode="tcp",
        identity=alice,
        peer=PeerInfo(remote_host="127.0.0.1", remote_port=1, listener="svc"),
        backend="backend:1",
        auth=auth,
        lease=lease,
        tracker=tracker,
        on_close=lambda s, info: closed.append(info),
    )
    app, gw_side = tcp_pair()
    client = await wrap_plain(gw_side, server_side=True)
    backend_gw, backend_app = tcp_pair()
    backend_gw.close()
    with pytest.raises((OSError, ValueError)):
        await open_relay(session, gw_side, client, backend_gw, None, splice=False)
    assert tracker.connections(alice.user) == 0
    assert [(c.reason, c.closed_by) for c in closed] == [("error", "gateway")]
    assert "relay set-up failed" in closed[0].detail
    async with asyncio.timeout(5):
        assert await asyncio.get_running_loop().sock_recv(app, 10) == b""  # client side closed too
    app.close()
    backend_app.close()
