"""A listening socket and its accept loop.

Owns: binding (``":port"`` = every interface, dual-stack where the host allows), accepting in
batches from a readiness callback, and the registry of connection tasks it started (so
shutdown can wait for them: on Python 3.11 ``Server.wait_closed`` does not, cpython#104344).

Must not: know what a connection is for. Each accepted socket goes to the handler given at
construction; the handler owns the socket from then on.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from ferryman._aio import spawn

logger = logging.getLogger(__name__)

Handler = Callable[[socket.socket, tuple[Any, ...]], Coroutine[Any, Any, None]]

ACCEPT_BATCH = 64
BACKLOG = 4096


def bind_socket(host: str, port: int) -> socket.socket:
    """Create a listening, non-blocking socket. Raises ``OSError`` (e.g. address in use)."""
    if host in ("", "*", "0.0.0.0", "::") and socket.has_dualstack_ipv6() and host != "0.0.0.0":
        sock = socket.create_server(
            ("::", port), family=socket.AF_INET6, backlog=BACKLOG, reuse_port=False, dualstack_ipv6=True
        )
    else:
        infos = socket.getaddrinfo(host or "0.0.0.0", port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        sock = socket.create_server(addr[:2], family=family, backlog=BACKLOG)
    sock.setblocking(False)
    return sock


class Listener:
    """Accepts connections on one address and hands each to ``handler`` in its own task."""

    def __init__(self, name: str, sock: socket.socket, handler: Handler) -> None:
        self.name = name
        self.sock = sock
        self.handler = handler
        self.tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False
        self._resume: asyncio.TimerHandle | None = None
        self._family = int(sock.family)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        self._loop.add_reader(self.sock.fileno(), self._on_accept)

    def _on_accept(self) -> None:
        sock = self.sock
        family = self._family
        for _ in range(ACCEPT_BATCH):
            try:
                # ``accept()`` without its wrapper's family/type enum look-ups (per connection).
                fd, addr = sock._accept()  # type: ignore[attr-defined]  # CPython, not in typeshed
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: stop accepting for a moment instead of spinning.
                    logger.error("listener %s: accept failed: %s; pausing accepts for 1s", self.name, exc)
                    self._pause(1.0)
                    return
                logger.warning("listener %s: accept failed: %s", self.name, exc)
                return
            conn = socket.socket(family, socket.SOCK_STREAM, 0, fd)
            conn.setblocking(False)
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            spawn(
                self.handler(conn, addr),
                name=f"conn {self.name} {addr[0]}:{addr[1]}",
                owner=self.tasks,
                loop=self._loop,
            )

    def _pause(self, seconds: float) -> None:
        assert self._loop is not None
        self._loop.remove_reader(self.sock.fileno())
        self._resume = self._loop.call_later(seconds, self._unpause)

    def _unpause(self) -> None:
        self._resume = None
        if self._accepting and self._loop is not None:
            self._loop.add_reader(self.sock.fileno(), self._on_accept)

    def stop_accepting(self) -> None:
        """Close the listening socket; connections already accepted go on."""
        if self._accepting and self._loop is not None:
            self._accepting = False
            if self._resume is not None:
                self._resume.cancel()
            else:
                self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
