"""Real sockets for tests of the relay layer."""

from __future__ import annotations

import socket


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Both ends of a real, non-blocking loopback TCP connection (not a socketpair: the tests
    see what the gateway sees)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    for s in (a, b):
        s.setblocking(False)
    return a, b
