"""PostgreSQL mode (SPEC §5): a wire-protocol gateway logging in as per-person roles.

Owns: the life of one PostgreSQL-mode connection: a load balancer's PROXY header
(``accept_proxy_protocol``), start-up (``proxy.pgstartup``), identity and
grant for the requested database, effective preset, limits, role provisioning, backend login
(``proxy.pgbackend``) or taking a kept backend session of the same role (``proxy.pgpool``),
answering the client (AuthenticationOk, ParameterStatus, our own BackendKeyData,
ReadyForQuery), the cancel-key map, then relaying the session unchanged -- and, when the client
ends an idle session with Terminate, giving the backend session back to the pool.
Every refusal reaches the client as a FATAL ErrorResponse with the SQLSTATE of SPEC §5.7 and a
message a person understands; details go to the log and audit, never secrets.

Must not: parse the session after ReadyForQuery (the relay carries it byte for byte; for
reuse a :class:`ferryman.pgwire.SessionTracker` only follows message boundaries) or build SQL
(``ferryman.provision`` does).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ferryman import pgwire
from ferryman.config.model import ListenerConfig, TargetConfig
from ferryman.errors import (
    AccessDenied,
    BackendAuthFailed,
    BackendUnavailable,
    FerrymanError,
    IdentityUnavailable,
    InvalidParameter,
    LimitExceeded,
    LocalProtocolError,
    NoSuchDatabase,
    PermissionDenied,
    RemoteProtocolError,
    ShuttingDown,
)
from ferryman.identity.base import Identity, PeerInfo
from ferryman.limits.tracker import Lease
from ferryman.policy.engine import Authorization
from ferryman.policy.model import PgDatabaseGrant
from ferryman.provision.provisioner import RoleLogin
from ferryman.proxy.pgbackend import (
    BackendRefused,
    BackendSide,
    backend_login,
    backend_tls_context,
    send_cancel,
)
from ferryman.proxy.pgpool import KeptSession, PoolKey, pool_key
from ferryman.proxy.pgroles import PgRoles
from ferryman.proxy.pgstartup import CancelAsked, ClientSide, Startup, read_startup
from ferryman.proxy.preamble import read_proxy_peer
from ferryman.proxy.relay import SocketRelay
from ferryman.proxy.runtime import CancelTarget, Runtime
from ferryman.proxy.session import Session, new_connection_id
from ferryman.proxy.streams import open_relay, until_closed
from ferryman.proxy.tcp import describe_target, peer_info, with_local_address
from ferryman.routing import NoRoute

logger = logging.getLogger(__name__)


def database_grant(auth: Authorization, database: str) -> PgDatabaseGrant:
    """What the caller may do in ``database`` (exact entry and ``"*"`` combined, as Waypoint
    does). Raises PermissionDenied (42501) when no grant covers the database."""
    grant = auth.database_grant(database)
    if grant is None:
        raise PermissionDenied(
            f"no grant for database {database!r} on {auth.listener}",
            client_message=f'permission denied for database "{database}"',
        )
    return grant


def client_message(exc: BaseException) -> tuple[str, str]:
    """(SQLSTATE, message) for the client; never internals or secrets."""
    match exc:
        case AccessDenied():
            return exc.sqlstate, exc.client_message
        case LimitExceeded():
            return (
                exc.sqlstate,
                f"too many connections or too much traffic for you: {exc.limit} limit reached",
            )
        case InvalidParameter():
            return exc.sqlstate, str(exc)
        case BackendAuthFailed():
            return exc.sqlstate, "the gateway could not log in to the database"
        case BackendUnavailable():
            return exc.sqlstate, "the database is not reachable through the gateway"
        case NoSuchDatabase():  # PostgreSQL's own words
            return exc.sqlstate, str(exc)
        case ShuttingDown():
            return exc.sqlstate, "the gateway is shutting down"
        case RemoteProtocolError():
            return exc.sqlstate, str(exc)
        case TimeoutError():
            return "08006", "timed out"
        case _:
            return "58000", "internal error in the gateway (see its log)"


async def _send_fatal(client: ClientSide, server: pgwire.ServerConnection, code: str, message: str) -> None:
    error = pgwire.ErrorResponse.fatal(code, message)
    try:
        data = server.send(error)
    except LocalProtocolError:
        data = error.encode()
    await _send_last_words(client, data)


async def _send_last_words(client: ClientSide, data: bytes) -> None:
    """Send a refusal, bounded in time; a client that is gone (reset, stalled) changes nothing:
    the caller still releases what the connection holds and audits it."""
    try:
        async with asyncio.timeout(2):
            await client.send(data)
    except (OSError, TimeoutError):
        pass


def _startup_failure(exc: BaseException, timeout: float) -> RemoteProtocolError:
    """Why a start-up ended before a StartupMessage could be acted on, for log and audit."""
    if isinstance(exc, TimeoutError):
        return RemoteProtocolError(f"no complete start-up within {timeout:g}s")
    if isinstance(exc, ssl.SSLError):
        return RemoteProtocolError(f"TLS handshake failed: {exc.reason or exc}")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc) or type(exc).__name__)
    return RemoteProtocolError(f"connection failed during start-up: {reason}")


async def serve_postgres(
    rt: Runtime, listener: ListenerConfig, sock: socket.socket, addr: tuple[Any, ...]
) -> None:
    """Handle one accepted connection on a PostgreSQL-mode listener; owns ``sock``."""
    assert listener.postgres is not None
    conn_id = new_connection_id()
    peer = peer_info(addr, listener.name)
    client = ClientSide(sock)
    server = pgwire.ServerConnection()
    identity: Identity | None = None
    lease: Lease | None = None
    try:
        if listener.accept_proxy_protocol:
            peer = await read_proxy_peer(sock, peer, listener.proxy_protocol_timeout)
        try:
            async with asyncio.timeout(listener.postgres.handshake_timeout):
                asked = await read_startup(
                    client,
                    server,
                    tls_mode=listener.tls_mode,
                    tls=rt.tls.get(listener.name),
                    handshake_timeout=listener.postgres.handshake_timeout,
                )
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            # Nothing to answer (the client is gone, or speaks neither TLS nor PostgreSQL):
            # close, and audit the attempt like any other refusal.
            client.close()
            failure = _startup_failure(exc, listener.postgres.handshake_timeout)
            rt.audit_refusal(conn_id, listener, peer, None, failure)
            return
        if listener.proxy_protocol != "off":
            peer = with_local_address(peer, sock)  # the header's destination
        if isinstance(asked, CancelAsked):
            try:
                await _forward_cancel(rt, asked, peer)
            finally:
                client.close()  # also when a forced shutdown cut the forwarding
            return
        startup = asked
        peer = dataclasses.replace(peer, sni=client.sni, peer_cert_der=client.peer_cert_der)
        if rt.draining:
            raise ShuttingDown("gateway is shutting down")
        try:
            async with asyncio.timeout(listener.identity_timeout):
                identity = await rt.access.identify(peer, rt.sources_for(listener))
        except TimeoutError:
            # No identity (28000), not an unreachable database: the sources were too slow.
            raise IdentityUnavailable(
                f"identity lookup timed out after {listener.identity_timeout:g}s",
                client_message="could not tell who you are in time (identity lookup timed out)",
            ) from None
        auth = rt.access.authorize(identity, peer, listener.name)
        grant = database_grant(auth, startup.database)
        roles = rt.provisioners.get(listener.name)
        router = rt.routers.get(listener.name)
        if roles is None or router is None:
            raise BackendUnavailable(f"listener {listener.name} is not ready (no provisioner)")
        try:
            route = router.route(client.sni)
        except NoRoute as exc:
            raise PermissionDenied(
                f"no route: {exc}", client_message="no database here for that server name"
            ) from exc
        lease = rt.tracker.acquire(
            identity.user,
            listener.name,
            auth.user_limits,
            auth.listener_limits,
            auth.connection_limits.bandwidth,
        )
        failures: list[str] = []
        reuse = _reusable(listener, client)
        for target in route.targets:
            provisioner = roles.for_backend(target.dial_host, target.port)
            try:
                login, backend = await _login(
                    rt, listener, target, provisioner, identity, peer, grant, startup, reuse=reuse
                )
                break
            except BackendUnavailable as exc:
                failures.append(str(exc))
                router.mark_down(target)
        else:
            raise BackendUnavailable("; ".join(failures))
    except BackendRefused as exc:
        # The backend's own words (e.g. 3D000 database does not exist) are the useful answer.
        await _send_last_words(client, exc.error.encode())
        _refused(rt, conn_id, listener, peer, identity, exc, client, lease, None)
        return
    except (FerrymanError, TimeoutError) as exc:
        code, message = client_message(exc)
        if isinstance(exc, FerrymanError) and exc.sqlstate == "58000":
            logger.error("%s: internal error for %s: %s", listener.name, peer.remote_addr, exc)
        await _send_fatal(client, server, code, message)
        _refused(rt, conn_id, listener, peer, identity, exc, client, lease, None)
        return
    except Exception as exc:
        logger.exception("%s: unexpected failure during start-up", listener.name)
        await _send_fatal(client, server, "58000", "internal error in the gateway (see its log)")
        _refused(rt, conn_id, listener, peer, identity, exc, client, lease, None)
        return
    except BaseException:
        if lease is not None:
            lease.release()
        client.close()
        raise
    assert backend is not None
    admitted = _Admitted(
        conn_id,
        peer,
        client,
        server,
        backend,
        identity,
        auth,
        lease,
        login,
        startup,
        provisioner,
        target,
    )
    await _run_session(rt, listener, admitted)


@dataclass(eq=False)
class _Admitted:
    """Everything known once the backend login succeeded."""

    conn_id: str
    peer: PeerInfo
    client: ClientSide
    server: pgwire.ServerConnection
    backend: _BackendSession
    identity: Identity
    auth: Authorization
    lease: Lease
    login: RoleLogin
    startup: Startup
    provisioner: PgRoles
    target: TargetConfig


@dataclass(eq=False)
class _BackendSession:
    """The logged-in backend session: fresh from a login, or kept from an earlier connection."""

    side: BackendSide
    key_data: pgwire.BackendKeyData | None
    parameters: dict[str, str]
    status: str
    trailing: bytes
    born: float
    reused: bool
    pool_key: PoolKey | None
    """Where the session goes back to when the client ends it idle; None: never reused."""

    @classmethod
    def kept(cls, kept: KeptSession, key: PoolKey) -> _BackendSession:
        side = BackendSide(kept.sock)
        return cls(side, kept.key_data, kept.parameters, "I", b"", kept.born, True, key)


def _reusable(listener: ListenerConfig, client: ClientSide) -> bool:
    """Reuse needs raw sockets on both sides (the relay follows the bytes) and no per-client
    state on the backend connection (a PROXY header names the first client)."""
    pg = listener.postgres
    assert pg is not None
    return (
        pg.reuse_backend_sessions
        and pg.backend_max_idle > 0
        and client.conn is None
        and listener.backend_tls == "off"
        and listener.proxy_protocol == "off"
    )


async def _login(
    rt: Runtime,
    listener: ListenerConfig,
    target: TargetConfig,
    provisioner: PgRoles,
    identity: Identity,
    peer: PeerInfo,
    grant: PgDatabaseGrant,
    startup: Startup,
    *,
    reuse: bool,
) -> tuple[RoleLogin, _BackendSession]:
    """Provision the role on ``target`` (always: it also reconciles the grant) and take a kept
    session of that role, or log in to it (once more after re-provisioning if a cached password
    is refused: another gateway may have rotated it, or the role was swept)."""
    assert listener.postgres is not None
    for attempt in (1, 2):
        login = await provisioner.ensure_login(
            user=identity.user,
            node=identity.node,
            database=startup.database,
            grant=grant,
            requested_presets=startup.requested_presets,
            allow_raw_sql=listener.postgres.allow_raw_sql,
        )
        key = pool_key(login.role, startup.database, startup.forward) if reuse else None
        if key is not None:
            kept = provisioner.pool.take(key)
            if kept is not None:
                return login, _BackendSession.kept(kept, key)
        try:
            backend, codec = await backend_login(
                rt,
                listener,
                target=target,
                peer=peer,
                role=login.role,
                password=login.password,
                database=startup.database,
                parameters=startup.forward,
                tls=backend_tls_context(listener),
            )
            session = _BackendSession(
                backend,
                codec.backend_key_data,
                dict(codec.server_parameters),
                codec.transaction_status or "I",
                codec.trailing_data,
                time.monotonic(),
                reused=False,
                pool_key=key,
            )
            return login, session
        except BackendAuthFailed:
            if attempt == 2:
                raise
            provisioner.forget(login.role)
    raise AssertionError("unreachable")


def _refused(
    rt: Runtime,
    conn_id: str,
    listener: ListenerConfig,
    peer: PeerInfo,
    identity: Identity | None,
    exc: BaseException,
    client: ClientSide,
    lease: Lease | None,
    backend: _BackendSession | None,
) -> None:
    if lease is not None:
        lease.release()
    if backend is not None:
        backend.side.close()
    client.close()
    rt.audit_refusal(conn_id, listener, peer, identity, exc)


async def _run_session(rt: Runtime, listener: ListenerConfig, a: _Admitted) -> None:
    conn_id, peer, client, server, backend = a.conn_id, a.peer, a.client, a.server, a.backend
    identity, auth, lease, login, startup, provisioner = (
        a.identity,
        a.auth,
        a.lease,
        a.login,
        a.startup,
        a.provisioner,
    )
    key = backend.key_data
    our_pid, our_secret = rt.new_cancel_key()
    if key is not None:
        rt.pg_cancel[(our_pid, our_secret)] = CancelTarget(
            listener.name, a.target, key.process_id, key.secret_key
        )
    try:
        out = [server.send(pgwire.AuthenticationOk())]
        out += [server.send(pgwire.ParameterStatus(k, v)) for k, v in backend.parameters.items()]
        out.append(server.send(pgwire.BackendKeyData(our_pid, our_secret)))
        out.append(server.send(pgwire.ReadyForQuery(backend.status)))
        await client.send(b"".join(out))
    except (OSError, LocalProtocolError) as exc:
        rt.pg_cancel.pop((our_pid, our_secret), None)
        _refused(rt, conn_id, listener, peer, identity, exc, client, lease, backend)
        return
    except asyncio.CancelledError:
        # A forced shutdown while the client was slow to take AuthenticationOk: nothing is
        # relayed yet, so the lease, both sockets and the cancel key are released here.
        rt.pg_cancel.pop((our_pid, our_secret), None)
        cut = ShuttingDown("gateway shut down while sending AuthenticationOk")
        _refused(rt, conn_id, listener, peer, identity, cut, client, lease, backend)
        raise
    rt.audit_admitted(
        conn_id,
        listener,
        peer,
        identity,
        auth.origins,
        database=startup.database,
        role=login.role,
        backend_session="kept" if backend.reused else "new",
    )
    up, down = server.trailing_data, backend.trailing
    session = Session(
        id=conn_id,
        listener=listener.name,
        mode="postgres",
        identity=identity,
        peer=peer,
        backend=describe_target(a.target),
        auth=auth,
        lease=lease,
        tracker=rt.tracker,
        on_close=rt.session_closed,
        idle_timeout=listener.idle_timeout,
    )
    session.extra = {"database": startup.database, "role": login.role}
    session.recheck = _rechecker(session, listener, startup, provisioner)
    if key is not None:
        session.graceful_close = _terminator(provisioner, key.process_id)
    rt.sessions.add(session)
    side = backend.side
    watch = pgwire.SessionTracker() if backend.pool_key is not None and side.conn is None else None
    try:
        relay = await open_relay(
            session,
            client.sock,
            client.conn,
            side.sock,
            side.conn,
            splice=rt.splice,
            initial_up=up,
            initial_down=down,
            watch=watch,
        )
        await until_closed(relay)
    finally:
        rt.pg_cancel.pop((our_pid, our_secret), None)
    if isinstance(relay, SocketRelay) and relay.detached is not None and backend.pool_key is not None:
        # The client said Terminate with the session idle: clean it and keep it for the next
        # connection of this role (the Terminate never reached the backend).
        kept = KeptSession(relay.detached, key, backend.parameters, backend.born)
        provisioner.pool.give_back(backend.pool_key, kept)


def _rechecker(
    session: Session, listener: ListenerConfig, startup: Startup, provisioner: PgRoles
) -> Callable[[Authorization], Awaitable[None]]:
    """Revalidation for a PostgreSQL session: the database grant must still be there, and a
    changed grant is reconciled on the live role (memberships follow the new preset)."""
    assert listener.postgres is not None
    allow_raw_sql = listener.postgres.allow_raw_sql

    async def recheck(auth: Authorization) -> None:
        grant = database_grant(auth, startup.database)
        if session.auth.database_grant(startup.database) != grant:
            await provisioner.ensure_login(
                user=session.identity.user,
                node=session.identity.node,
                database=startup.database,
                grant=grant,
                requested_presets=startup.requested_presets,
                allow_raw_sql=allow_raw_sql,
            )

    return recheck


def _terminator(provisioner: PgRoles, backend_pid: int) -> Callable[[], Awaitable[None]]:
    async def terminate() -> None:
        # PostgreSQL itself then sends FATAL 57P01 at a message boundary and closes.
        await provisioner.terminate_backend(backend_pid)

    return terminate


async def _forward_cancel(rt: Runtime, asked: CancelAsked, peer: PeerInfo) -> None:
    target = rt.pg_cancel.get((asked.request.process_id, asked.request.secret_key))
    if target is None:
        return  # unknown keys are dropped silently, as PostgreSQL does
    listener = rt.listener_config(target.listener)
    if listener is None:
        return
    try:
        await send_cancel(rt, listener, target.target, peer, target.process_id, target.secret_key)
    except FerrymanError as exc:
        logger.info("cancel for %s not delivered: %s", target.listener, exc)
