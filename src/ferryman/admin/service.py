"""What the admin listener answers, and keeping it on the configured address.

Owns: :class:`AdminService` -- the ``/metrics`` answer (the runtime's :class:`Metrics` in the
Prometheus text format) and the ``/healthz`` answer (200 while serving, 503 once shutdown has
begun, so a load balancer stops sending new clients during the drain), and the admin server's
place: bound at start, moved when a reload changes ``[admin] listen``, closed at the very end
of shutdown. A busy admin address is logged as an error and does not stop the gateway (the
connections it relays matter more than its dashboard); ``listen = "off"`` serves nothing.

Must not: touch connections or configuration (``ferryman.app`` does).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping

from ferryman.admin.server import AdminServer, Answer
from ferryman.config.model import AdminConfig, split_hostport
from ferryman.metrics import CONTENT_TYPE
from ferryman.proxy.listener import bind_socket
from ferryman.proxy.runtime import Runtime

logger = logging.getLogger(__name__)


class AdminService:
    def __init__(self, runtime: Runtime, listeners: Callable[[], Mapping[str, str]]) -> None:
        self.runtime = runtime
        self.listeners = listeners
        """Running listeners: name → bound address."""
        self.server: AdminServer | None = None
        self.listen: str | None = None

    async def apply(self, admin: AdminConfig) -> None:
        """Serve on ``admin.listen`` (nothing to do if already there)."""
        if admin.listen == self.listen and (self.server is not None or admin.listen == "off"):
            return
        await self.close()
        self.listen = admin.listen
        if admin.listen == "off":
            return
        host, port = split_hostport(admin.listen, default_host="")
        try:
            sock = bind_socket(host, port)
        except OSError as exc:
            logger.error(
                "admin listener: cannot listen on %s: %s (no /metrics or /healthz until a reload)",
                admin.listen,
                exc.strerror or exc,
            )
            return
        server = AdminServer({"/metrics": self.metrics, "/healthz": self.health})
        await server.start(sock)
        self.server = server
        logger.info("admin listener on %s (/metrics, /healthz)", admin.listen)

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()
            self.server = None

    def metrics(self) -> Answer:
        return Answer(200, CONTENT_TYPE, self.runtime.metrics.exposition())

    def health(self) -> Answer:
        draining = self.runtime.draining
        body = {
            "status": "draining" if draining else "ok",
            "listeners": dict(self.listeners()),
            "connections": len(self.runtime.sessions),
        }
        return Answer(503 if draining else 200, "application/json", json.dumps(body).encode() + b"\n")
