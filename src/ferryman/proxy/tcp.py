"""TCP mode (SPEC §4, §6): preamble → identify → authorize → count → route and dial → relay.

Owns: the life of one TCP-mode connection, from the accepted socket to its close record: an
optional PROXY protocol header from a load balancer, TLS passthrough (route on the
ClientHello's SNI, forward the TLS bytes untouched) or termination (``tls = "enabled"``), Host
routing for plaintext HTTP, target failover with verified backend TLS, and a PROXY header to
the backend. Refused connections are closed without a byte sent. A backend that cannot be
reached closes the client at once with reason ``backend_error``.

Must not: parse the payload beyond that preamble, or hold state beyond the connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import socket
import ssl
from typing import Any

from ferryman import proxyproto
from ferryman.config.model import ListenerConfig, TargetConfig
from ferryman.errors import BackendUnavailable, FerrymanError, RemoteProtocolError, ShuttingDown
from ferryman.identity.base import Identity, PeerInfo
from ferryman.limits.tracker import Lease
from ferryman.proxy.dial import dial_tcp
from ferryman.proxy.preamble import read_proxy_peer, sniff_client_hello, sniff_http_host
from ferryman.proxy.runtime import Runtime
from ferryman.proxy.session import Session, new_connection_id
from ferryman.proxy.streams import Conn, accept_tls, connect_tls, open_relay
from ferryman.routing import NoRoute, Route
from ferryman.tailscale.errors import TailscaleError
from ferryman.tailscale.socks5 import dial_socks5

logger = logging.getLogger(__name__)


def peer_info(addr: tuple[Any, ...], listener: str) -> PeerInfo:
    """The client as accepted. The local address is left out (a ``getsockname`` per connection):
    only a PROXY header to the backend needs it, see :func:`with_local_address`."""
    return PeerInfo(remote_host=_unmapped(str(addr[0])), remote_port=int(addr[1]), listener=listener)


def with_local_address(peer: PeerInfo, sock: socket.socket) -> PeerInfo:
    """``peer`` with the address the client connected to (``sock``'s local address)."""
    try:
        local = sock.getsockname()
    except OSError:
        return peer
    return dataclasses.replace(peer, local_host=_unmapped(str(local[0])), local_port=int(local[1]))


def _unmapped(host: str) -> str:
    """An IPv4-mapped IPv6 address (a dual-stack listener's IPv4 client) as plain IPv4."""
    return host[7:] if host.startswith("::ffff:") and "." in host else host


async def dial_backend(
    rt: Runtime, listener: ListenerConfig, target: TargetConfig | None = None
) -> tuple[socket.socket, bytes]:
    """Connect to ``target`` (default: the listener's backend), directly or through tailscaled
    (its SOCKS5 server when ``[tailscale] socks5`` is set, else the LocalAPI ``ts-dial``).

    Returns the connected socket and any backend bytes that arrived with the dial answer.
    Raises :class:`BackendUnavailable` with the reason.
    """
    if target is None:
        host, port = listener.backend_address
    else:
        host, port = target.dial_host, target.port
    if not listener.backend_via_tailscale:
        return await dial_tcp(host, port, listener.dial_timeout), b""
    tailscale = rt.config.tailscale
    if tailscale is not None and tailscale.socks5 is not None:
        return await dial_socks5(tailscale.socks5, host, port, listener.dial_timeout), b""
    if rt.tailscale is None:
        raise BackendUnavailable("backend_via_tailscale is set but [tailscale] is not configured")
    try:
        dialed = await rt.tailscale.dial(host, port, timeout=listener.dial_timeout)
    except BackendUnavailable:
        raise
    except TailscaleError as exc:
        raise BackendUnavailable(f"dial {host}:{port} via tailscaled: {exc}") from exc
    return dialed.sock, dialed.initial_data


def proxy_header(version: str, peer: PeerInfo) -> bytes:
    """The PROXY header describing the client to the backend."""
    src = (peer.remote_host, peer.remote_port)
    dst = (peer.local_host or "0.0.0.0", peer.local_port)
    try:
        return proxyproto.encode_v1(src, dst) if version == "v1" else proxyproto.encode_v2(src, dst)
    except FerrymanError:
        # An address the header cannot carry (e.g. a unix peer): say so with UNKNOWN/LOCAL.
        return (
            proxyproto.encode_v1(None, None)
            if version == "v1"
            else proxyproto.encode_v2(None, None, command=proxyproto.Command.LOCAL)
        )


@functools.lru_cache(maxsize=64)
def _backend_tls_context(ca_file: str | None, insecure: bool) -> ssl.SSLContext:
    """One client context per (CA, verification) pair: loading a CA store per connection is slow."""
    ctx = ssl.create_default_context(cafile=ca_file)
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def connect_route(
    rt: Runtime, listener: ListenerConfig, route: Route, peer: PeerInfo
) -> tuple[socket.socket, Conn | None, bytes, TargetConfig]:
    """Dial the route's targets in turn (failover), send the PROXY header, start backend TLS.

    Returns (socket, TLS Conn or None, backend's first bytes, the target used).
    Raises BackendUnavailable naming every failure.
    """
    router = rt.routers.get(listener.name)
    failures: list[str] = []
    for target in route.targets:
        sock: socket.socket | None = None
        try:
            sock, first = await dial_backend(rt, listener, target)
            if listener.proxy_protocol != "off":
                await asyncio.get_running_loop().sock_sendall(
                    sock, proxy_header(listener.proxy_protocol, peer)
                )
            conn: Conn | None = None
            if target.tls:
                conn = await connect_tls(
                    sock,
                    _backend_tls_context(listener.backend_ca_file, listener.backend_insecure_skip_verify),
                    target.host,
                    listener.dial_timeout,
                )
            return sock, conn, first, target
        except (BackendUnavailable, OSError, ssl.SSLError, TimeoutError) as exc:
            if sock is not None:
                sock.close()
            failures.append(f"{target.dial_host}:{target.port}: {exc}")
            if router is not None:
                router.mark_down(target)
    raise BackendUnavailable("; ".join(failures) or "no target")


async def serve_tcp(
    rt: Runtime, listener: ListenerConfig, sock: socket.socket, addr: tuple[Any, ...]
) -> None:
    """Handle one accepted connection on a TCP-mode listener; owns ``sock``."""
    conn_id = new_connection_id()
    peer = peer_info(addr, listener.name)
    identity: Identity | None = None
    client_conn: Conn | None = None
    initial = b""
    route_name: str | None = None
    route_alpn: tuple[str, ...] = ()
    waiting_for = "the PROXY protocol header"  # what a set-up timeout interrupted, for the audit
    try:
        if rt.draining:
            raise ShuttingDown("gateway is shutting down")
        if not listener.reads_before_identity:
            # Nothing to read first: sources that answer without I/O need no wait and no timer.
            waiting_for = "identity"
            identity = rt.access.identify_now(peer, rt.sources_for(listener))
        if identity is None:
            async with asyncio.timeout(listener.proxy_protocol_timeout + listener.identity_timeout):
                if listener.accept_proxy_protocol:
                    # The header alone has its own, shorter bound (README).
                    peer = await read_proxy_peer(sock, peer, listener.proxy_protocol_timeout)
                waiting_for = {"passthrough": "the TLS ClientHello", "enabled": "the TLS handshake"}.get(
                    listener.tls, "the HTTP request head"
                )
                if listener.tls == "passthrough":
                    hello, initial = await sniff_client_hello(sock)
                    route_name, route_alpn = hello.sni, hello.alpn
                    alpn = hello.alpn[0] if hello.alpn else None
                    peer = dataclasses.replace(peer, sni=hello.sni, alpn=alpn)
                elif listener.tls == "enabled":
                    tls = rt.tls[listener.name]
                    client_conn = await accept_tls(sock, tls.context, listener.identity_timeout)
                    info = tls.info(client_conn)
                    route_name, route_alpn = info.sni, (info.alpn,) if info.alpn else ()
                    peer = dataclasses.replace(
                        peer, sni=info.sni, alpn=info.alpn, peer_cert_der=info.peer_cert_der
                    )
                elif listener.routes_by_name:
                    route_name, initial = await sniff_http_host(sock)
                waiting_for = "identity"
                identity = await rt.access.identify(peer, rt.sources_for(listener))
        auth = rt.access.authorize(identity, peer, listener.name)
        router = rt.routers.get(listener.name)
        if router is None:
            raise BackendUnavailable(f"listener {listener.name} has no router")
        route = router.route(route_name, route_alpn)
        lease = rt.tracker.acquire(
            identity.user,
            listener.name,
            auth.user_limits,
            auth.listener_limits,
            auth.connection_limits.bandwidth,
        )
    except (FerrymanError, TimeoutError, NoRoute, ssl.SSLError, OSError) as exc:
        if client_conn is not None:
            client_conn.abort()
        sock.close()
        rt.audit_refusal(conn_id, listener, peer, identity, _as_error(exc, waiting_for))
        return
    except asyncio.CancelledError:
        # A forced shutdown cut the set-up (a stalled header or handshake): the socket is still ours.
        if client_conn is not None:
            client_conn.abort()
        sock.close()
        rt.audit_refusal(
            conn_id, listener, peer, identity, ShuttingDown(f"shut down waiting for {waiting_for}")
        )
        raise
    rt.audit_admitted(conn_id, listener, peer, identity, auth.origins, sni=peer.sni, route=route.rule)
    if listener.proxy_protocol != "off":
        peer = with_local_address(peer, sock)
    try:
        backend, backend_conn, first_bytes, target = await connect_route(rt, listener, route, peer)
    except BackendUnavailable as exc:
        logger.warning("%s: backend unavailable: %s", listener.name, exc)
        _end_unrelayed(rt, conn_id, listener, peer, identity, route, sock, client_conn, lease, str(exc))
        return
    except BaseException as exc:
        # Admitted, so it gets its close record: a forced shutdown cut the dial (or a bug did).
        if isinstance(exc, asyncio.CancelledError):
            reason, detail = "shutdown", "gateway shut down while dialling the backend"
        else:
            reason, detail = "error", f"dialling the backend failed: {exc!r}"
        _end_unrelayed(
            rt, conn_id, listener, peer, identity, route, sock, client_conn, lease, detail, reason=reason
        )
        raise
    if listener.name not in rt.listeners:
        # A reload removed the listener while we dialled: end like the sessions it closed.
        if backend_conn is not None:
            backend_conn.abort()
        backend.close()
        detail = "listener removed from configuration"
        _end_unrelayed(
            rt, conn_id, listener, peer, identity, route, sock, client_conn, lease, detail, reason="shutdown"
        )
        return
    session = Session(
        id=conn_id,
        listener=listener.name,
        mode="tcp",
        identity=identity,
        peer=peer,
        backend=describe_target(target),
        auth=auth,
        lease=lease,
        tracker=rt.tracker,
        on_close=rt.session_closed,
        idle_timeout=listener.idle_timeout,
    )
    rt.sessions.add(session)
    # The relay outlives this task: from here the session owns the connection (it closes, audits
    # and leaves the registry when the relay ends; shutdown drains and closes the registry).
    await open_relay(
        session,
        sock,
        client_conn,
        backend,
        backend_conn,
        splice=rt.splice,
        initial_up=initial,
        initial_down=first_bytes,
    )


def _end_unrelayed(
    rt: Runtime,
    conn_id: str,
    listener: ListenerConfig,
    peer: PeerInfo,
    identity: Identity,
    route: Route,
    sock: socket.socket,
    client_conn: Conn | None,
    lease: Lease,
    detail: str,
    *,
    reason: str = "backend_error",
) -> None:
    """Close an admitted connection that never reached the relay, and write its close record
    (see :meth:`Runtime.audit_unreached`)."""
    lease.release()
    if client_conn is not None:
        client_conn.abort()
    sock.close()
    backend_name = describe_target(route.targets[0]) if route.targets else ""
    rt.audit_unreached(conn_id, listener, peer, identity, backend_name, detail, reason=reason)


def describe_target(target: TargetConfig) -> str:
    """How audit records and logs name a target: ``host:port``, or ``host@ip:port``."""
    host = target.host if target.ip is None else f"{target.host}@{target.ip}"
    return f"{host}:{target.port}"


def _as_error(exc: BaseException, waiting_for: str = "identity") -> BaseException:
    if isinstance(exc, TimeoutError):
        # An OSError subclass: without this branch the reason would read "...set-up: " (empty).
        if waiting_for == "identity":
            return exc  # audited as "identity lookup timed out"
        return RemoteProtocolError(f"timed out waiting for {waiting_for}")
    if isinstance(exc, NoRoute):
        return RemoteProtocolError(f"no route: {exc}")
    if isinstance(exc, ssl.SSLError):
        return RemoteProtocolError(f"TLS handshake failed: {exc.reason or exc}")
    if isinstance(exc, OSError) and not isinstance(exc, FerrymanError):
        return RemoteProtocolError(f"connection failed during set-up: {exc.strerror or exc}")
    return exc
