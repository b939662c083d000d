"""TCP mode (SPEC §4): identify → authorize → count → dial → relay → audit.

Owns: the life of one TCP-mode connection, from the accepted socket to its close record.
Refused connections are closed without a byte sent. A backend that cannot be reached closes
the client at once with reason ``backend_error``.

Must not: parse protocols (the bytes are opaque) or hold state beyond the connection.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from ferryman.config.model import ListenerConfig
from ferryman.errors import BackendUnavailable, FerrymanError, ShuttingDown
from ferryman.identity.base import Identity, PeerInfo
from ferryman.proxy.dial import dial_tcp
from ferryman.proxy.relay import SocketRelay
from ferryman.proxy.runtime import Runtime
from ferryman.proxy.session import Session, new_connection_id
from ferryman.tailscale.errors import TailscaleError

logger = logging.getLogger(__name__)


def peer_info(sock: socket.socket, addr: tuple[Any, ...], listener: str) -> PeerInfo:
    try:
        local = sock.getsockname()
    except OSError:
        local = ("", 0)
    host = str(addr[0])
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return PeerInfo(
        remote_host=host,
        remote_port=int(addr[1]),
        local_host=str(local[0]),
        local_port=int(local[1]),
        listener=listener,
    )


async def dial_backend(rt: Runtime, listener: ListenerConfig) -> tuple[socket.socket, bytes]:
    """Connect to the listener's backend, directly or through tailscaled (``ts-dial``).

    Returns the connected socket and any backend bytes that arrived with the dial answer.
    Raises :class:`BackendUnavailable` with the reason.
    """
    host, port = listener.backend_address
    if not listener.backend_via_tailscale:
        return await dial_tcp(host, port, listener.dial_timeout), b""
    if rt.tailscale is None:
        raise BackendUnavailable("backend_via_tailscale is set but [tailscale] is not configured")
    try:
        dialed = await rt.tailscale.dial(host, port, timeout=listener.dial_timeout)
    except BackendUnavailable:
        raise
    except TailscaleError as exc:
        raise BackendUnavailable(f"dial {host}:{port} via tailscaled: {exc}") from exc
    return dialed.sock, dialed.initial_data


async def serve_tcp(
    rt: Runtime, listener: ListenerConfig, sock: socket.socket, addr: tuple[Any, ...]
) -> None:
    """Handle one accepted connection on a TCP-mode listener; owns ``sock``."""
    conn_id = new_connection_id()
    peer = peer_info(sock, addr, listener.name)
    identity: Identity | None = None
    try:
        if rt.draining:
            raise ShuttingDown("gateway is shutting down")
        async with asyncio.timeout(listener.identity_timeout):
            identity = await rt.access.identify(peer, rt.sources_for(listener))
        auth = rt.access.authorize(identity, peer, listener.name)
        lease = rt.tracker.acquire(identity.user, listener.name, auth.user_limits, auth.listener_limits)
    except (FerrymanError, TimeoutError) as exc:
        sock.close()
        rt.audit_refusal(conn_id, listener, peer, identity, exc)
        return
    rt.audit.write(
        "decision",
        id=conn_id,
        listener=listener.name,
        mode="tcp",
        allowed=True,
        user=identity.user,
        node=identity.node,
        identity_source=identity.source,
        source=peer.remote_addr,
        grants=list(auth.origins),
    )
    try:
        backend, first_bytes = await dial_backend(rt, listener)
    except BackendUnavailable as exc:
        lease.release()
        sock.close()
        logger.warning("%s: backend %s unavailable: %s", listener.name, listener.backend, exc)
        rt.audit.write(
            "close",
            id=conn_id,
            listener=listener.name,
            mode="tcp",
            user=identity.user,
            node=identity.node,
            source=peer.remote_addr,
            backend=listener.backend,
            bytes_up=0,
            bytes_down=0,
            duration=0.0,
            reason="backend_error",
            closed_by="backend",
            detail=str(exc),
        )
        return
    except BaseException:
        lease.release()
        sock.close()
        raise
    session = Session(
        id=conn_id,
        listener=listener.name,
        mode="tcp",
        identity=identity,
        peer=peer,
        backend=listener.backend,
        auth=auth,
        lease=lease,
        tracker=rt.tracker,
        on_close=rt.session_closed,
        idle_timeout=listener.idle_timeout,
    )
    relay = SocketRelay(asyncio.get_running_loop(), sock, backend, session.on_bytes, splice=rt.splice)
    rt.sessions.add(session)
    session.attach(relay)
    relay.start(initial_down=first_bytes)
    try:
        await asyncio.shield(relay.done)
    finally:
        # Cancelled (forced shutdown): the relay must still close and audit.
        relay.close("shutdown")
