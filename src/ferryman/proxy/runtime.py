"""The gateway's shared runtime state, handed to every connection handler.

Owns: :class:`Runtime` -- the current access generation, the limit tracker, the session
registry, the audit log, the metrics, the draining flag -- and the audit records (and metric
counts) every mode writes the same way (refusals, closes).

Must not: start or stop anything (``ferryman.app`` does) or import connection handlers.
"""

from __future__ import annotations

import logging
import secrets
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ferryman.audit import AuditLog
from ferryman.config.model import Config, ListenerConfig, TargetConfig
from ferryman.errors import AccessDenied, FerrymanError, LimitExceeded
from ferryman.identity.base import Identity, PeerInfo
from ferryman.limits.tracker import LimitTracker
from ferryman.metrics import Metrics
from ferryman.proxy.access import Access
from ferryman.proxy.relay import CloseInfo
from ferryman.proxy.session import Session, SessionRegistry
from ferryman.proxy.tlssetup import ListenerTLS
from ferryman.routing import Router
from ferryman.tailscale.localapi import LocalAPIClient

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CancelTarget:
    """Where a client's cancel key leads: the backend session of a PostgreSQL listener."""

    listener: str
    target: TargetConfig
    process_id: int
    secret_key: bytes


@dataclass(eq=False)
class Runtime:
    config: Config
    access: Access
    audit: AuditLog
    tracker: LimitTracker = field(default_factory=LimitTracker)
    sessions: SessionRegistry = field(default_factory=SessionRegistry)
    metrics: Metrics = field(default_factory=Metrics)
    draining: bool = False
    splice: bool = False
    """Bulk plaintext relays use splice(2) (``serve --splice``) instead of copying."""
    tailscale: LocalAPIClient | None = None
    """The LocalAPI client of the current configuration (dialling via tailscaled)."""
    tls: dict[str, ListenerTLS] = field(default_factory=dict)
    """Server TLS per listener name (certificates chosen by SNI, client certificates)."""
    routers: dict[str, Router] = field(default_factory=dict)
    """Target choice per listener name (round robin and down-marking persist across connections)."""
    provisioners: dict[str, Any] = field(default_factory=dict)
    """Role provisioners per PostgreSQL listener name (``proxy.pgroles.ListenerRoles``)."""
    pg_cancel: dict[tuple[int, bytes], CancelTarget] = field(default_factory=dict)
    """Our (process id, secret key) handed to a client → its backend session."""
    listeners: dict[str, ListenerConfig] = field(default_factory=dict)
    """The running listeners' configuration by name (kept current by the gateway)."""
    _sources: dict[int, tuple[ListenerConfig, tuple[str, ...]]] = field(default_factory=dict)
    _sources_of: weakref.ref[Config] | None = None
    """The configuration ``_sources`` was worked out for (weakly: a reload's new one starts it
    afresh, and the replaced one is not kept alive by it -- entries that held their
    configuration kept every replaced one alive, one more per reload)."""

    def listener_config(self, name: str) -> ListenerConfig | None:
        return self.listeners.get(name)

    def new_cancel_key(self) -> tuple[int, bytes]:
        """A fresh (process id, secret key) for a client; unguessable, never reused while live."""
        while True:
            key = (secrets.randbelow(2**31 - 2) + 1, secrets.token_bytes(4))
            if key not in self.pg_cancel:
                return key

    def sources_for(self, listener: ListenerConfig) -> tuple[str, ...]:
        """The identity sources ``listener`` tries, under the current configuration (remembered)."""
        config = self.config
        if self._sources_of is None or self._sources_of() is not config:
            self._sources.clear()
            self._sources_of = weakref.ref(config)
        key = id(listener)
        cached = self._sources.get(key)
        if cached is None or cached[0] is not listener:
            cached = self._sources[key] = (listener, config.sources_for(listener))
        return cached[1]

    def audit_refusal(
        self,
        conn_id: str,
        listener: ListenerConfig,
        peer: PeerInfo,
        identity: Identity | None,
        exc: BaseException,
    ) -> None:
        """Log and audit a refused connection with its reason (and limit, if one refused it)."""
        if isinstance(exc, TimeoutError):
            reason, kind = "identity lookup timed out", "identity_unavailable"
        elif isinstance(exc, AccessDenied):
            reason, kind = exc.reason, exc.kind
        elif isinstance(exc, FerrymanError):
            reason, kind = str(exc), exc.kind
        else:
            reason, kind = repr(exc), "error"
        fields: dict[str, object] = {
            "id": conn_id,
            "listener": listener.name,
            "mode": listener.mode,
            "allowed": False,
            "outcome": kind,
            "reason": reason,
            "source": peer.remote_addr,
            "user": identity.user if identity else None,
            "node": identity.node if identity else None,
        }
        if isinstance(exc, LimitExceeded):
            fields["limit"] = exc.limit
        logger.info(
            "refused %s on %s: %s",
            peer.remote_addr,
            listener.name,
            reason,
            extra={"conn_id": conn_id, "listener": listener.name, "outcome": kind},
        )
        self.audit.write("decision", **fields)
        self.metrics.decided(listener.name, listener.mode, kind)

    def audit_admitted(
        self,
        conn_id: str,
        listener: ListenerConfig,
        peer: PeerInfo,
        identity: Identity,
        origins: Sequence[str],
        **mode_fields: Any,
    ) -> None:
        """Audit an allowed connection; ``mode_fields`` are what the mode adds (route, role…)."""
        self.audit.write(
            "decision",
            id=conn_id,
            listener=listener.name,
            mode=listener.mode,
            allowed=True,
            user=identity.user,
            node=identity.node,
            identity_source=identity.source,
            source=peer.remote_addr,
            **mode_fields,
            grants=list(origins),
        )
        self.metrics.decided(listener.name, listener.mode, "allowed")

    def audit_unreached(
        self,
        conn_id: str,
        listener: ListenerConfig,
        peer: PeerInfo,
        identity: Identity,
        backend: str,
        detail: str,
        *,
        reason: str = "backend_error",
    ) -> None:
        """The close record (and count) of an admitted connection that never became a session:
        ``backend_error`` (closed by the backend) when it was not reached, else the gateway's
        ``reason`` -- ``shutdown`` for a dial cut by a forced shutdown or outlived by its
        listener, ``error`` for anything else."""
        self.audit.write(
            "close",
            id=conn_id,
            listener=listener.name,
            mode=listener.mode,
            user=identity.user,
            node=identity.node,
            source=peer.remote_addr,
            backend=backend,
            bytes_up=0,
            bytes_down=0,
            duration=0.0,
            reason=reason,
            closed_by="backend" if reason == "backend_error" else "gateway",
            detail=detail,
        )
        self.metrics.closed(listener.name, listener.mode, reason, 0, 0, 0.0)

    def session_closed(self, session: Session, info: CloseInfo) -> None:
        self.sessions.remove(session)
        record = session.describe()
        record.pop("started", None)
        record.update(reason=info.reason, closed_by=info.closed_by)
        if info.detail:
            record["detail"] = info.detail
        if info.reason == "limit":
            record["limit"] = info.detail.split(" ", 1)[0].rstrip(":")
        self.audit.write("close", **record)
        self.metrics.closed(
            session.listener,
            session.mode,
            info.reason,
            record["bytes_up"],
            record["bytes_down"],
            record["duration"],
        )
        if info.reason not in ("normal",):
            logger.info(
                "closed %s (%s) on %s: %s %s",
                session.id,
                session.identity.user,
                session.listener,
                info.reason,
                info.detail,
                extra={"conn_id": session.id, "listener": session.listener, "reason": info.reason},
            )
