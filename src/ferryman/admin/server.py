"""The admin HTTP listener: ``GET /metrics`` and ``GET /healthz`` (SPEC §2 ``[admin]``, §10).

Owns: an asyncio server on the ``[admin] listen`` address speaking HTTP/1.1 through h11
(keep-alive, request heads bounded to 16 KiB, an idle timeout per connection), the routing of
a request path to its handler, and 404 / 405 / 400 answers; its connection tasks, which
:meth:`AdminServer.close` cancels and waits for.

Must not: know what the handlers report (``ferryman.app`` passes them in) or check tokens --
``/metrics`` and ``/healthz`` are read-only and unauthenticated, as Prometheus and load
balancers expect; the bearer token of ``[admin]`` is for the REST API.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import h11

from ferryman._aio import cancel_and_wait, spawn

logger = logging.getLogger(__name__)

MAX_HEAD = 16384
IDLE_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    content_type: str
    body: bytes


Handler = Callable[[], Answer]


class AdminServer:
    """Serves ``routes`` (path → handler, GET only) on a bound socket until closed."""

    def __init__(self, routes: Mapping[str, Handler]) -> None:
        self.routes = dict(routes)
        self.address: tuple[str, int] | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self, sock: socket.socket) -> None:
        self._server = await asyncio.start_server(self._accepted, sock=sock)
        self.address = sock.getsockname()[:2]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        await cancel_and_wait(list(self._tasks))

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        spawn(self._serve(reader, writer), name="admin connection", owner=self._tasks)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        status = exc.error_status_hint
                        await _send(writer, conn, Answer(status, "text/plain", b"bad request\n"))
                    return
                if event is h11.NEED_DATA:
                    async with asyncio.timeout(IDLE_TIMEOUT):
                        data = await reader.read(65536)
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    await _send(writer, conn, self._answer(event))
                elif isinstance(event, h11.ConnectionClosed):
                    return
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
        except (OSError, TimeoutError, h11.LocalProtocolError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _answer(self, request: h11.Request) -> Answer:
        path = request.target.split(b"?", 1)[0].decode("ascii", "replace")
        handler = self.routes.get(path)
        if handler is None:
            return Answer(404, "text/plain", b"not found\n")
        if request.method != b"GET":
            return Answer(405, "text/plain", b"method not allowed\n")
        try:
            return handler()
        except Exception:
            logger.exception("admin handler for %s failed", path)
            return Answer(500, "text/plain", b"internal error\n")


async def _send(writer: asyncio.StreamWriter, conn: h11.Connection, answer: Answer) -> None:
    headers = [("content-type", answer.content_type), ("content-length", str(len(answer.body)))]
    if answer.status == 405:
        headers.append(("allow", "GET"))
    reason = http.HTTPStatus(answer.status).phrase.encode()
    data = conn.send(h11.Response(status_code=answer.status, headers=headers, reason=reason))
    data += conn.send(h11.Data(data=answer.body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    writer.write(data)
    await writer.drain()
