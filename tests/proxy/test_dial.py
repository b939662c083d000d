"""dial_tcp against real sockets: the immediate path (loopback connects complete at once), the
waiting path (a listener whose accept queue is full drops SYNs), refusals, names, timeouts."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from ferryman.errors import BackendUnavailable
from ferryman.proxy.dial import dial_tcp


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_connects_to_a_literal_address(listening: socket.socket) -> None:
    port = listening.getsockname()[1]
    sock = await dial_tcp("127.0.0.1", port, 5)
    with sock:
        assert sock.getpeername() == ("127.0.0.1", port)
        assert sock.getblocking() is False
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        accepted, _ = listening.accept()
        with accepted:
            sock.send(b"ping")
            assert accepted.recv(4) == b"ping"


async def test_connects_to_a_name(listening: socket.socket) -> None:
    sock = await dial_tcp("localhost", listening.getsockname()[1], 5)
    with sock:
        assert sock.getpeername()[1] == listening.getsockname()[1]


async def test_refused_is_backend_unavailable() -> None:
    port = free_port()
    with pytest.raises(BackendUnavailable, match=f"cannot connect to 127.0.0.1:{port}: Connection refused"):
        await dial_tcp("127.0.0.1", port, 5)


async def test_unresolvable_name() -> None:
    with pytest.raises(BackendUnavailable, match=r"cannot resolve no-such-host\.invalid"):
        await dial_tcp("no-such-host.invalid", 80, 5)


async def test_a_connect_that_does_not_complete_times_out() -> None:
    """A listener that never accepts, with its queue full: the kernel drops further SYNs, so the
    connect stays in progress until our timeout."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        fillers = []
        try:
            for _ in range(4):  # a backlog of 0 still admits one; fill generously
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
                fillers.append(filler)
            with pytest.raises(BackendUnavailable, match=r"timed out after 0\.3s"):
                await dial_tcp("127.0.0.1", port, 0.3)
        finally:
            for filler in fillers:
                filler.close()
