"""One PostgreSQL listener's role management, as the session code sees it.

Owns: :class:`PgRoles` -- building the :class:`ferryman.provision.provisioner.Provisioner` for a
listener's backend from ``[listeners.postgres]`` (admin connection: host/port of the backend,
``admin_user``/``admin_password``/``admin_database``, TLS as ``backend_tls``), mapping database
failures to gateway errors (admin connection down → 08006, anything else → 58000 with details
in the log), terminating a backend session (for a revoked grant), and the periodic sweep of
idle managed roles; the :class:`~ferryman.proxy.pgpool.BackendPool` of kept backend sessions.

Opening is lazy and never on the gateway's start-up path: the first connection that needs a
backend opens its provisioner (one attempt, bounded by the listener's ``dial_timeout``;
concurrent connections share that attempt and its outcome), and the listener's background
task (:meth:`ListenerRoles.run`) tries the fixed backend once at start so a configuration
problem shows in the log. A failed attempt leaves nothing behind: while the backend is down
each connection gets 08006 within ``dial_timeout``, and the first one after it is back opens
a fresh admin pool -- no restart or reload needed.

Must not: build SQL for roles (``provision`` does) or know about client connections.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection

import psycopg
from psycopg.conninfo import make_conninfo

from ferryman.config.model import ListenerConfig
from ferryman.errors import BackendUnavailable, FerrymanError
from ferryman.policy.model import PgDatabaseGrant
from ferryman.provision.provisioner import Provisioner, ProvisionerSettings, RoleLogin
from ferryman.proxy.pgpool import BackendPool

logger = logging.getLogger(__name__)


class ProvisioningFailed(FerrymanError):
    """The backend refused or failed a provisioning statement (details logged, not sent)."""

    kind = "provisioning"


def admin_conninfo(listener: ListenerConfig, host: str, port: int) -> str:
    assert listener.postgres is not None
    pg = listener.postgres
    params: dict[str, str | int] = {
        "host": host,
        "port": port,
        "user": pg.admin_user,
        "dbname": pg.admin_database,
        "application_name": f"ferryman {listener.name}",
        "connect_timeout": max(1, int(listener.dial_timeout)),
    }
    if pg.admin_password:
        params["password"] = pg.admin_password
    if listener.backend_tls == "off":
        params["sslmode"] = "prefer"
    else:
        params["sslmode"] = listener.backend_tls
        if listener.backend_ca_file:
            params["sslrootcert"] = listener.backend_ca_file
    return make_conninfo(**{k: str(v) for k, v in params.items()})


class PgRoles:
    """Role provisioning for one backend of a PostgreSQL listener."""

    def __init__(self, listener: ListenerConfig, host: str, port: int) -> None:
        assert listener.postgres is not None
        self.listener = f"{listener.name} ({host}:{port})"
        pg = listener.postgres
        self.provisioner = Provisioner(
            admin_conninfo(listener, host, port),
            ProvisionerSettings(
                prefix=pg.user_prefix,
                user_ttl=pg.user_ttl,
                reassign_to=pg.admin_user,
                password_format=pg.password_encryption,
                connect_timeout=listener.dial_timeout,
            ),
        )
        self.sweep_interval = pg.sweep_interval
        self.pool = BackendPool(
            self.listener,
            idle_timeout=min(pg.backend_idle_timeout, pg.user_ttl),
            lifetime=pg.backend_lifetime,
            max_idle=pg.backend_max_idle if pg.reuse_backend_sessions else 0,
        )
        self._opened = False
        self._opening = asyncio.Lock()
        self._attempts = 0
        self._failure = ""

    async def open(self) -> None:
        """Open the provisioner unless it is open. Callers that queued behind an attempt get
        its failure rather than each making one more (so a burst waits one ``dial_timeout``)."""
        seen = self._attempts
        async with self._opening:
            if self._opened:
                return
            if self._attempts != seen:
                raise BackendUnavailable(self._failure)
            try:
                info = await self.provisioner.open()
            except (psycopg.Error, BackendUnavailable) as exc:
                self._failure = f"admin connection for {self.listener} failed: {exc}"
                self._attempts += 1  # counts finished attempts only: a cancelled one tells nothing
                raise BackendUnavailable(self._failure) from exc
        self._opened = True
        logger.info("listener %s: provisioning on %s", self.listener, info)

    async def close(self) -> None:
        await self.pool.close()
        await self.provisioner.close()

    async def ensure_login(
        self,
        *,
        user: str,
        node: str,
        database: str,
        grant: PgDatabaseGrant,
        requested_presets: str | None,
        allow_raw_sql: bool,
    ) -> RoleLogin:
        if not self._opened:
            await self.open()
        try:
            return await self.provisioner.ensure_login(
                user, node, database, grant, requested_presets=requested_presets, allow_raw_sql=allow_raw_sql
            )
        except psycopg.OperationalError as exc:
            raise BackendUnavailable(f"admin connection for {self.listener}: {exc}") from exc
        except psycopg.Error as exc:
            logger.error("listener %s: provisioning %s failed: %s", self.listener, user, exc)
            raise ProvisioningFailed(f"provisioning failed: {exc}") from exc

    def forget(self, role: str) -> None:
        self.provisioner.forget(role)

    async def terminate_backend(self, pid: int) -> None:
        """End a backend session the way PostgreSQL's admins do: the server sends FATAL 57P01."""
        try:
            async with self.provisioner.backend.connection() as conn:
                await conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        except psycopg.Error as exc:
            logger.warning("listener %s: could not terminate backend %d: %s", self.listener, pid, exc)

    async def sweep(self, live_roles: Collection[str]) -> None:
        """Drop managed roles idle for longer than ``user_ttl`` (never the live ones)."""
        if not self._opened:
            return
        try:
            dropped = await self.provisioner.sweep(live_roles={*live_roles, *self.pool.roles()})
        except (psycopg.Error, FerrymanError) as exc:
            logger.warning("listener %s: role sweep failed: %s", self.listener, exc)
            return
        if dropped:
            logger.info(
                "listener %s: dropped %d idle role(s)", self.listener, len(dropped), extra={"roles": dropped}
            )


class ListenerRoles:
    """The provisioners of one PostgreSQL listener: one per backend it may route to, created
    when first needed (the fixed ``backend`` at start, SNI-routed targets on first use)."""

    def __init__(self, listener: ListenerConfig) -> None:
        assert listener.postgres is not None
        self.config = listener
        self.sweep_interval = listener.postgres.sweep_interval
        self._by_backend: dict[tuple[str, int], PgRoles] = {}
        self._closed = False
        if listener.backend is not None:
            self.for_backend(*listener.backend_address)  # no I/O: opened by run() or a connection

    def for_backend(self, host: str, port: int) -> PgRoles:
        roles = self._by_backend.get((host, port))
        if roles is None:
            if self._closed:  # replaced by a reload: a late connection must not open new pools
                raise BackendUnavailable(f"listener {self.config.name}: provisioners closed")
            roles = self._by_backend[(host, port)] = PgRoles(self.config, host, port)
        return roles

    async def run(self, live_roles: Callable[[], Collection[str]]) -> None:
        """The listener's background task: open the fixed backend's provisioner once (a failure
        is logged; connections retry on their own), then sweep forever."""
        if self.config.backend is not None:
            try:
                await self.for_backend(*self.config.backend_address).open()
            except FerrymanError as exc:
                logger.error("listener %s: %s (connections will retry)", self.config.name, exc)
        await self.sweep_forever(live_roles)

    async def close(self) -> None:
        self._closed = True
        for roles in self._by_backend.values():
            await roles.close()
        self._by_backend.clear()

    async def sweep_forever(self, live_roles: Callable[[], Collection[str]]) -> None:
        """Every ``sweep_interval`` seconds, sweep every backend this listener has used."""
        while True:
            await asyncio.sleep(self.sweep_interval)
            for roles in list(self._by_backend.values()):
                await roles.sweep(live_roles())
