"""Connections to the backend the provisioner manages: pools, transactions, locks, flavour.

Owns: the admin connection pool (the backend's admin database), a small lazily created pool
per target database (``GRANT … ON ALL TABLES IN SCHEMA`` and ``REASSIGN/DROP OWNED`` act on
the current database only), retrying a transaction that lost a race, the cross-gateway locks,
and telling PostgreSQL from CockroachDB.

Must not: decide what to provision (``provisioner``/``sweeper`` do) or build SQL text other
than the lock statements (``statements`` does).

Opening, and a backend that is down:

* :meth:`Backend.open` is one bounded attempt (``connect_timeout``): a single direct
  connection learns the server (so a refused or unreachable backend fails at once, not after a
  pool's retries), then a *fresh* admin pool is opened. psycopg_pool closes a pool for good
  when its first fill times out, so a failed attempt leaves no pool behind and the next
  ``open()`` starts over with a new one; nothing stays broken once the backend is back.
  Callers decide when to call it (the gateway: lazily, never on its start-up path).
* Once open, every pool waits at most ``connect_timeout`` for a connection
  (``PoolTimeout``, an ``OperationalError``), retries a lost backend for at most that long
  between attempts (``reconnect_timeout``; after giving up, the next request starts a new
  attempt at once), and checks a pooled connection before handing it out, so connections
  cut by a backend restart are replaced instead of failing a provisioning round.
* A database that does not exist is :class:`~ferryman.errors.NoSuchDatabase`, never a pool
  timeout: libpq reports no SQLSTATE for a refused connection and the pool would retry it until
  ``connect_timeout``, so a wait for a per-database connection looks at the pool's failed
  connection attempts every ``_WAIT_SLICE`` and, after one, asks ``pg_database`` (admin pool).

Locks, and why each exists:

* per role -- ``pg_advisory_xact_lock(k(role))`` in the admin database, so the parallel
  connections of one person and several gateways provision a role one at a time. The sweeper
  takes the same key at session level (``pg_try_advisory_lock``) while it drops the role.
* per group -- the same, on the group's key, around creating a group role shared by people.
* per target database -- one advisory key taken around every GRANT batch in that database:
  concurrent GRANTs that rewrite the same catalog row (a table's ACL, the database's ACL)
  fail with "tuple concurrently updated" (XX000) instead of waiting.

CockroachDB has no advisory locks: the role lock becomes ``SELECT … FOR UPDATE`` on the
role's registry row, and the other two rely on its serializable transactions plus retry
(40001). Advisory keys are per database in PostgreSQL; all role and group keys are taken in
the admin database, so every gateway meets on the same ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import psycopg
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ferryman.errors import BackendUnavailable, NoSuchDatabase

from .statements import DATABASE_EXISTS, Registry

logger = logging.getLogger(__name__)

T = TypeVar("T")
Conn = psycopg.AsyncConnection[tuple[object, ...]]
Flavor = Literal["postgres", "cockroach"]

RETRY_ATTEMPTS = 4
_GRANTS_KEY = "ferryman:grants"
_WAIT_SLICE = 0.25
"""How often a wait for a per-database connection checks for failed connection attempts."""


def lock_key(name: str) -> int:
    """A signed 64-bit advisory-lock key for ``name`` (stable across processes and gateways)."""
    digest = hashlib.sha256(b"ferryman-lock\x00" + name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _retryable(exc: psycopg.Error) -> bool:
    if isinstance(exc, errors.SerializationFailure | errors.DeadlockDetected):
        return True
    # Concurrent GRANT/REVOKE on one catalog row; PostgreSQL reports it as an internal error.
    return isinstance(exc, errors.InternalError_) and "concurrently" in str(exc)


@dataclass
class _DbPool:
    pool: AsyncConnectionPool[Conn]
    users: int = 0
    gone: bool = False
    """The database does not exist: out of ``_db_pools``, closed when its last user leaves."""


@dataclass(frozen=True, slots=True)
class ServerInfo:
    flavor: Flavor
    version: str
    admin_user: str
    admin_database: str


class Backend:
    """Pools and transactions against one backend; one per :class:`Provisioner`."""

    def __init__(
        self,
        admin_conninfo: str,
        *,
        admin_pool_size: int = 4,
        db_pool_size: int = 2,
        max_db_pools: int = 16,
        connect_timeout: float = 10.0,
    ) -> None:
        self._conninfo = admin_conninfo
        self._admin_pool_size = admin_pool_size
        self._db_pool_size = db_pool_size
        self._max_db_pools = max_db_pools
        self._connect_timeout = connect_timeout
        self._admin: AsyncConnectionPool[Conn] | None = None
        self._db_pools: OrderedDict[str, _DbPool] = OrderedDict()
        self._pools_lock = asyncio.Lock()
        self._info: ServerInfo | None = None
        self._closed = False

    @property
    def info(self) -> ServerInfo:
        if self._info is None:
            raise RuntimeError("Backend.open() has not run")
        return self._info

    @property
    def cockroach(self) -> bool:
        return self.info.flavor == "cockroach"

    async def open(self) -> ServerInfo:
        """Learn who and what we are talking to and open the admin pool: one attempt, bounded
        by ``connect_timeout``. Raises :class:`BackendUnavailable`; a later call tries afresh."""
        if self._admin is not None:
            return self.info
        if self._closed:
            raise BackendUnavailable("provisioning backend is closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._connect_timeout
        try:
            async with asyncio.timeout_at(deadline):
                info = await self._probe()
        except TimeoutError:
            raise BackendUnavailable(f"timed out after {self._connect_timeout:g}s") from None
        except psycopg.OperationalError as exc:
            raise BackendUnavailable(str(exc)) from exc
        pool = self._pool(self._conninfo, min_size=1, max_size=self._admin_pool_size, name="admin")
        try:
            await pool.open(wait=True, timeout=max(1.0, deadline - loop.time()))
            if self._closed:  # closed while we were connecting: keep nothing
                raise BackendUnavailable("provisioning backend is closed")
        except BaseException as exc:
            await pool.close()
            if isinstance(exc, psycopg.OperationalError):
                raise BackendUnavailable(f"admin pool: {exc}") from exc
            raise
        self._admin, self._info = pool, info
        return info

    async def _probe(self) -> ServerInfo:
        conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        async with conn:
            cur = await conn.execute("SELECT version(), current_user, current_database()")
            version, user, database = await _one(cur)
        flavor: Flavor = "cockroach" if "CockroachDB" in str(version) else "postgres"
        return ServerInfo(flavor, str(version), str(user), str(database))

    def _pool(
        self, conninfo: str, *, min_size: int, max_size: int, name: str, max_idle: float = 600.0
    ) -> AsyncConnectionPool[Conn]:
        return AsyncConnectionPool(
            conninfo,
            connection_class=psycopg.AsyncConnection[tuple[object, ...]],
            min_size=min_size,
            max_size=max_size,
            max_idle=max_idle,
            open=False,
            kwargs={"autocommit": True},
            check=AsyncConnectionPool.check_connection,
            timeout=self._connect_timeout,
            reconnect_timeout=self._connect_timeout,
            name=f"ferryman-provision-{name}",
        )

    def _admin_pool(self) -> AsyncConnectionPool[Conn]:
        if self._admin is None:
            if self._closed:
                # Closed under a caller (a reload removed or replaced the listener while its
                # connection was being set up): the same answer as a per-database pool's.
                raise BackendUnavailable("provisioning backend is closed")
            raise RuntimeError("Backend.open() has not run")
        return self._admin

    async def close(self) -> None:
        """Close every pool; an ``open()`` still in flight keeps nothing (see :meth:`open`)."""
        self._closed = True
        async with self._pools_lock:
            pools = [p.pool for p in self._db_pools.values()]
            self._db_pools.clear()
        if self._admin is not None:
            pools.append(self._admin)
            self._admin = None
        for pool in pools:
            await pool.close()

    @contextlib.asynccontextmanager
    async def connection(self, database: str | None = None) -> AsyncIterator[Conn]:
        """A pooled autocommit connection to ``database`` (default: the admin database)."""
        if database is None or database == self.info.admin_database:
            async with self._admin_pool().connection() as conn:
                yield conn
            return
        entry = await self._db_pool(database)
        try:
            conn = await self._db_getconn(entry, database)
            try:
                yield conn
            finally:
                await entry.pool.putconn(conn)
        finally:
            entry.users -= 1
            if entry.gone and entry.users == 0:
                await entry.pool.close()

    async def database_exists(self, database: str, conn: Conn | None = None) -> bool:
        """Whether ``database`` is in ``pg_database`` (asked on ``conn``, or the admin pool)."""
        if database == self.info.admin_database:
            return True
        if conn is not None:
            return await fetch_one(conn, DATABASE_EXISTS, (database,)) is not None
        async with self._admin_pool().connection() as admin:
            return await fetch_one(admin, DATABASE_EXISTS, (database,)) is not None

    async def _db_getconn(self, entry: _DbPool, database: str) -> Conn:
        """A connection from ``entry``'s pool within ``connect_timeout`` (else ``PoolTimeout``).

        Raises :class:`NoSuchDatabase` as soon as a connection attempt failed and the database
        is not in ``pg_database`` (dropped since it was checked), instead of waiting out the
        pool's retries; the pool is then dropped. In the usual case -- a connection ready, or
        made at once -- the first ``getconn`` returns and nothing else is asked."""
        pool = entry.pool
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._connect_timeout
        seen = _connect_errors(pool)
        while True:
            wait = min(_WAIT_SLICE, deadline - loop.time())
            try:
                return await pool.getconn(timeout=max(wait, 0.001))
            except PoolTimeout:
                if wait < _WAIT_SLICE:
                    raise PoolTimeout(
                        f"couldn't get a connection to database {database!r} "
                        f"after {self._connect_timeout:.2f} sec"
                    ) from None
            failed = _connect_errors(pool)
            if failed == seen:
                continue  # the pool is busy, not failing: keep waiting
            seen = failed
            try:
                async with asyncio.timeout_at(deadline):
                    exists = await self.database_exists(database)
            except (psycopg.Error, TimeoutError):
                exists = True  # cannot tell: keep waiting for the pool, as before
            if not exists:
                await self._drop_pool(database, entry)
                raise NoSuchDatabase(database)

    async def _drop_pool(self, database: str, entry: _DbPool) -> None:
        async with self._pools_lock:
            if self._db_pools.get(database) is entry:
                del self._db_pools[database]
            entry.gone = True

    async def _db_pool(self, database: str) -> _DbPool:
        async with self._pools_lock:
            entry = self._db_pools.get(database)
            if entry is None:
                if self._closed:
                    raise BackendUnavailable("provisioning backend is closed")
                params = conninfo_to_dict(self._conninfo)
                params["dbname"] = database
                entry = _DbPool(
                    self._pool(
                        make_conninfo("", **params),
                        min_size=0,
                        max_size=self._db_pool_size,
                        name=f"db-{len(self._db_pools)}",
                        max_idle=60.0,
                    )
                )
                await entry.pool.open(wait=False)
                self._db_pools[database] = entry
                await self._evict_idle()
            self._db_pools.move_to_end(database)
            entry.users += 1
            return entry

    async def _evict_idle(self) -> None:
        # Bounded: the least recently used pools nobody is using go first; pools in use stay
        # even past the bound (closing them would cut a transaction in flight).
        for name in list(self._db_pools):
            if len(self._db_pools) <= self._max_db_pools:
                return
            if self._db_pools[name].users == 0:
                await self._db_pools.pop(name).pool.close()

    async def transaction(
        self, body: Callable[[Conn], Awaitable[T]], *, database: str | None = None, what: str = "provision"
    ) -> T:
        """Run ``body`` in one transaction, retrying when it lost a race (40001, 40P01, XX000)."""
        for attempt in range(1, RETRY_ATTEMPTS + 1):
            try:
                async with self.connection(database) as conn, conn.transaction():
                    return await body(conn)
            except psycopg.Error as exc:
                if attempt == RETRY_ATTEMPTS or not _retryable(exc):
                    raise
                logger.debug("%s: retrying after %s (attempt %d)", what, exc.sqlstate, attempt)
                await asyncio.sleep(0.01 * attempt)
        raise AssertionError("unreachable")

    # --- locks ---------------------------------------------------------------------------------

    async def lock_role(self, conn: Conn, role: str, registry: Registry) -> None:
        """Hold the per-role lock until the current transaction ends."""
        if self.cockroach:
            await conn.execute(registry.reserve(), (role,))
            await conn.execute(registry.select(for_update=True), (role,))
        else:
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key("role:" + role),))

    async def lock_group(self, conn: Conn, group: str) -> None:
        if not self.cockroach:
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key("group:" + group),))

    async def lock_grants(self, conn: Conn) -> None:
        """Serialise GRANT batches in the connection's database (see module docstring)."""
        if not self.cockroach:
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key(_GRANTS_KEY),))

    @contextlib.asynccontextmanager
    async def try_role_session_lock(self, role: str, registry: Registry) -> AsyncIterator[bool]:
        """The sweeper's lock on a role across several transactions; yields False when busy."""
        if self.cockroach:
            # No session-level locks: the sweeper re-checks last use inside its transactions.
            yield True
            return
        key = lock_key("role:" + role)
        async with self._admin_pool().connection() as conn:
            cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (key,))
            (got,) = await _one(cur)
            try:
                yield bool(got)
            finally:
                if got:
                    await conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


def _connect_errors(pool: AsyncConnectionPool[Conn]) -> int:
    return pool.get_stats().get("connections_errors", 0)


async def _one(cur: psycopg.AsyncCursor[tuple[object, ...]]) -> tuple[object, ...]:
    row = await cur.fetchone()
    if row is None:
        raise RuntimeError("query returned no row")
    return row


Query = sql.SQL | sql.Composed | str
Params = Sequence[Any] | Mapping[str, Any] | None


async def fetch_one(conn: Conn, query: Query, params: Params = None) -> tuple[object, ...] | None:
    cur = await conn.execute(query, params)
    return await cur.fetchone()


async def fetch_all(conn: Conn, query: Query, params: Params = None) -> list[tuple[object, ...]]:
    cur = await conn.execute(query, params)
    return await cur.fetchall()
