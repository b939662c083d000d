"""Per-person backend roles for PostgreSQL mode: create, reconcile, cache (SPEC 5.3 step 4).

Owns: :class:`Provisioner` -- :meth:`~Provisioner.ensure_login` (idempotent, locked per role,
the hot path cached), :meth:`~Provisioner.reconcile` (live preset changes),
:meth:`~Provisioner.forget` and :meth:`~Provisioner.sweep` (delegated to ``sweeper``) -- and
the password policy.

Must not: speak the wire protocol or log in as the role (the PostgreSQL session does), decide
grants (the policy engine does), or touch a role that is not marked as managed.

Password policy -- derived, cached, rotated:

* A role's password is ``HMAC-SHA256(password_key, role || epoch)`` (base64url, 43 chars).
  ``epoch`` lives in the registry row; rotating means ``epoch + 1`` and one ``ALTER ROLE``.
  Gateways configured with the same ``password_key`` derive the same password from the row,
  so one gateway never invalidates another's cached password. Without a configured key each
  process draws a random one, shared by all its provisioners (several listeners in front of
  one server, or a listener that a reload re-created, derive the same passwords); a second
  gateway process then re-keys the role on its first provisioning, and the first gateway's
  next backend login fails with 28P01 -- the session must then call :meth:`forget` and
  ``ensure_login`` once more (do that on any 28000/28P01 from the backend: a sweeper
  elsewhere may also have dropped the role).
* The server stores a SCRAM-SHA-256 verifier computed here (``statements.scram_secret``), so
  the plaintext never appears in SQL text or the server log. ``VALID UNTIL`` is now +
  ``password_lifetime`` (1 h); a password is reused until less than ``rotate_before`` (30 min)
  of that remains, so a login always has at least 30 min of validity. Sessions already
  logged in are unaffected by expiry (PostgreSQL checks it at login only).
* In-memory cache: "role R is provisioned for grant fingerprint F, password P valid until T,
  checked at M". A hit (same F, T not near, M younger than ``regrant_interval``) costs no
  round trip. Measured on a local PostgreSQL 15 (medians of 10 / 1000 calls, uvloop): cold
  ``ensure_login`` (role created, password set) 15-19 ms; refresh (role exists, password
  reused) 5-6.5 ms; cache hit 13-20 µs -- against ~11 ms for the SCRAM login as the role that
  follows each of them, so the hot path adds ~0.2 % to a new connection.
  ``tests/provision/test_provisioner.py::test_cold_vs_warm_timing`` prints the figures (-s).
* New tables: group roles get ``ALTER DEFAULT PRIVILEGES`` for the owners we know (the admin
  user, the database owner, the schema owner, and every admin-preset person role), so their
  new tables are visible on the very next connection; tables created by anyone else become
  visible on the first connection after ``regrant_interval`` (10 s), when the refresh re-runs
  ``GRANT … ON ALL TABLES IN SCHEMA`` for the role's groups. The refresh also re-checks the
  role and its memberships and records last use for the sweeper.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import logging
import secrets
import time
import weakref
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

import psycopg

from ferryman.errors import AccessDenied, NoSuchDatabase, PermissionDenied
from ferryman.policy.model import PRESETS, PgDatabaseGrant

from . import names
from . import statements as st
from ._backend import Backend, Conn, ServerInfo, fetch_all, fetch_one
from ._rows import RegistryRow, RoleState
from .statements import RawGrant, RawSqlRejected, Registry

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ProvisionerSettings:
    """Knobs of one provisioner; durations in seconds."""

    prefix: str = names.DEFAULT_PREFIX
    user_ttl: float = 24 * 3600.0
    """A role unused this long, with no live session, is dropped by :meth:`Provisioner.sweep`."""
    password_lifetime: float = 3600.0
    rotate_before: float = 1800.0
    regrant_interval: float = 10.0
    """How long a cached "provisioned" verdict is trusted before the cheap refresh."""
    password_key: bytes | None = dataclasses.field(default=None, repr=False)
    """Shared by the gateways of one fleet; ``None`` draws a random key per process."""
    password_format: Literal["scram-sha-256", "md5"] = "scram-sha-256"
    scram_iterations: int = 4096
    registry: Registry = dataclasses.field(default_factory=Registry)
    reassign_to: str | None = None
    """Owner of a swept role's objects; default: the admin user."""
    timeout: float = 30.0
    """Bound on one provisioning round (all its transactions)."""
    connect_timeout: float = 10.0
    """Bound on reaching the backend: one :meth:`Provisioner.open` attempt's connection, and
    each wait for a pooled connection; past it the backend counts as unavailable."""
    admin_pool_size: int = 4
    db_pool_size: int = 2
    max_db_pools: int = 16


@dataclass(frozen=True, slots=True)
class RoleLogin:
    """Credentials for the backend login; ``repr`` never shows the password."""

    role: str
    password: str = dataclasses.field(repr=False)
    valid_until: datetime


@dataclass(frozen=True, slots=True)
class _Who:
    """Who a role belongs to; ``cap`` is the lowered preset the role name carries, if any."""

    user: str
    node: str
    database: str
    cap: str | None
    allow_raw_sql: bool

    def same_person(self, login: str, node: str, database: str, cap: str | None) -> bool:
        return (
            login.casefold() == self.user.casefold()
            and node.casefold() == self.node.casefold()
            and database == self.database
            and cap == self.cap
        )


@dataclass(frozen=True, slots=True)
class _Plan:
    role: str
    who: _Who
    preset: str | None
    schemas: tuple[str, ...]
    raw: tuple[RawGrant, ...]
    fingerprint: str


@dataclass(slots=True)
class _Entry:
    fingerprint: str
    login: RoleLogin
    checked: float
    """``time.monotonic()`` of the last round trip that confirmed this entry."""


@dataclass
class Stats:
    """Counters for tests and metrics: how ``ensure_login`` was served."""

    hits: int = 0
    provisions: int = 0
    rotations: int = 0


_PROCESS_KEY = secrets.token_bytes(32)
"""The password key of provisioners given none: one per process (see the module docstring).
Per provisioner, two listeners in front of one server re-keyed each other's roles, and under
load a session's login could lose twice in a row (28P01 to the client)."""


class Provisioner:
    """Provisions per-person login roles on one backend through an admin connection pool."""

    def __init__(self, admin_conninfo: str, settings: ProvisionerSettings | None = None) -> None:
        self.settings = settings or ProvisionerSettings()
        names.check_prefix(self.settings.prefix)
        self.backend = Backend(
            admin_conninfo,
            admin_pool_size=self.settings.admin_pool_size,
            db_pool_size=self.settings.db_pool_size,
            max_db_pools=self.settings.max_db_pools,
            connect_timeout=self.settings.connect_timeout,
        )
        self._key = self.settings.password_key or _PROCESS_KEY
        self.key_id = hashlib.sha256(b"ferryman-key-id\x00" + self._key).hexdigest()[:16]
        self.marker = names.marker_name(self.settings.prefix)
        self.stats = Stats()
        self._cache: dict[str, _Entry] = {}
        self._who: dict[str, _Who] = {}
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._group_checked: dict[tuple[str, str], float] = {}

    # --- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> ServerInfo:
        """Connect, detect the flavour, create the registry table and the marker role once.

        Raises :class:`~ferryman.errors.BackendUnavailable` when the backend cannot be reached
        within ``connect_timeout``; calling ``open()`` again after a failure tries afresh."""
        info = await self.backend.open()
        if info.flavor == "cockroach" and self.settings.password_format == "md5":
            raise ValueError("CockroachDB stores SCRAM verifiers only; password_format must be scram-sha-256")

        async def setup(conn: Conn) -> None:
            await self.backend.lock_group(conn, self.marker)
            for stmt in self.settings.registry.create():
                await conn.execute(stmt)
            if await fetch_one(conn, st.ROLE_EXISTS, (self.marker,)) is None:
                for stmt in st.create_nologin(self.marker):
                    await conn.execute(stmt)

        await self.backend.transaction(setup, what="setup")
        return info

    async def close(self) -> None:
        await self.backend.close()

    async def __aenter__(self) -> Provisioner:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- the API -----------------------------------------------------------------------------

    async def ensure_login(
        self,
        user: str,
        node: str,
        database: str,
        grant: PgDatabaseGrant,
        requested_presets: str | None = None,
        allow_raw_sql: bool = False,
    ) -> RoleLogin:
        """The role to log in as, provisioned for ``grant`` as it is now, and its password.

        Raises InvalidParameter (22023) for an unknown requested preset, PermissionDenied
        (42501) for a raw grant that fails validation or a grant on the registry's schema,
        AccessDenied (28000) when the role name belongs to an unmanaged role or to another
        identity, NoSuchDatabase (3D000) when ``database`` does not exist on the backend (checked
        whenever provisioning work is done -- not on a cache hit -- before anything is created).
        Database errors propagate as ``psycopg.Error``.
        """
        preset, lowered = names.effective_preset(grant.permissions, requested_presets)
        role = names.role_name(self.settings.prefix, user, node, database, preset if lowered else None)
        who = _Who(user, node, database, preset if lowered else None, allow_raw_sql)
        plan = self._plan(role, who, preset, grant)
        entry = self._cache.get(role)
        if entry is not None and self._fresh(entry, plan.fingerprint):
            self.stats.hits += 1
            return entry.login
        lock = self._locks.get(role)
        if lock is None:
            lock = self._locks[role] = asyncio.Lock()
        async with lock:
            entry = self._cache.get(role)  # another task may have done it while we waited
            if entry is not None and self._fresh(entry, plan.fingerprint):
                self.stats.hits += 1
                return entry.login
            return await self._provision(plan)

    def forget(self, role: str) -> None:
        """Drop the cached verdict for ``role`` (after a failed backend login, see module doc)."""
        self._cache.pop(role, None)

    async def reconcile(self, role: str, grant: PgDatabaseGrant) -> None:
        """Bring a live session's role in line with a changed grant (revalidation, SPEC 5.3.8).

        The role keeps its name; its memberships follow the new strongest preset, still capped
        by the preset a lowered role was named for. Unknown roles are looked up in the registry.
        """
        who = self._who.get(role) or await self._who_from_registry(role)
        best = names.strongest(grant.permissions)
        preset = best
        if who.cap is not None and best is not None:
            preset = who.cap if PRESETS.index(who.cap) < PRESETS.index(best) else best
        plan = self._plan(role, who, preset, grant)
        lock = self._locks.get(role)
        if lock is None:
            lock = self._locks[role] = asyncio.Lock()
        async with lock:
            await self._provision(plan)

    async def sweep(self, now: datetime | None = None, live_roles: Collection[str] = ()) -> list[str]:
        """Drop managed roles idle for longer than ``user_ttl`` with no live session; see ``sweeper``."""
        from .sweeper import sweep  # deferred: the sweeper imports this module's types

        dropped = await sweep(self, now or datetime.now(UTC), set(live_roles))
        for role in dropped:
            self._cache.pop(role, None)
            self._who.pop(role, None)
        return dropped

    # --- internals ---------------------------------------------------------------------------

    def _fresh(self, entry: _Entry, fingerprint: str) -> bool:
        s = self.settings
        return (
            entry.fingerprint == fingerprint
            and time.monotonic() - entry.checked < s.regrant_interval
            and entry.login.valid_until.timestamp() - time.time() > s.rotate_before
        )

    def _plan(self, role: str, who: _Who, preset: str | None, grant: PgDatabaseGrant) -> _Plan:
        schemas = tuple(sorted(grant.schemas or {names.DEFAULT_SCHEMA}))
        info = self.backend.info
        if who.database == info.admin_database and self.settings.registry.schema in schemas:
            raise PermissionDenied(
                f"grant on schema {self.settings.registry.schema!r} of the admin database refused",
                client_message="permission denied for this schema",
            )
        raw: tuple[RawGrant, ...] = ()
        if who.allow_raw_sql and who.cap is None:
            try:
                raw = tuple(st.validate_raw_grant(text) for text in grant.sql)
            except RawSqlRejected as exc:
                raise PermissionDenied(
                    f"raw SQL grant rejected: {exc}", client_message="the grant's raw SQL was rejected"
                ) from None
        material = "\x00".join([who.database, preset or "", *schemas, "\x01", *(r.text for r in raw)])
        return _Plan(role, who, preset, schemas, raw, hashlib.sha256(material.encode()).hexdigest())

    def _password(self, role: str, epoch: int) -> str:
        mac = hmac.new(self._key, f"ferryman-role-password\x00{role}\x00{epoch}".encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()).decode("ascii").rstrip("=")

    def _secret(self, role: str, password: str) -> str:
        if self.settings.password_format == "md5":
            return st.md5_secret(password, role)
        return st.scram_secret(password, iterations=self.settings.scram_iterations)

    def _groups(self, plan: _Plan) -> dict[str, str]:
        """schema → group role implied by the plan (empty without a preset)."""
        if plan.preset is None:
            return {}
        return {
            s: names.group_name(self.settings.prefix, plan.who.database, s, plan.preset) for s in plan.schemas
        }

    async def _who_from_registry(self, role: str) -> _Who:
        async with self.backend.connection() as conn:
            row = RegistryRow.parse(await fetch_one(conn, self.settings.registry.select(), (role,)))
        if row is None or not row.login:
            raise AccessDenied(f"reconcile: {role!r} is not a provisioned role")
        # Raw SQL was applied only if it was allowed then; keep it rather than revoke it here.
        return _Who(row.login, row.node, row.database, row.cap, allow_raw_sql=bool(row.raw_sql))

    async def _provision(self, plan: _Plan) -> RoleLogin:
        async with asyncio.timeout(self.settings.timeout):
            groups = self._groups(plan)
            login, stale_raw, raw_changed = await self.backend.transaction(
                lambda conn: self._admin_round(conn, plan, groups), what="provision " + plan.role
            )
            await self.backend.transaction(
                lambda conn: self._database_round(conn, plan, groups, stale_raw),
                database=plan.who.database,
                what="grant " + plan.role,
            )
            if raw_changed:
                async with self.backend.connection() as conn:
                    await conn.execute(
                        self.settings.registry.set_raw_sql(), ([r.text for r in plan.raw], plan.role)
                    )
        self._who[plan.role] = plan.who
        self._cache[plan.role] = _Entry(plan.fingerprint, login, time.monotonic())
        self.stats.provisions += 1
        return login

    async def _admin_round(
        self, conn: Conn, plan: _Plan, groups: dict[str, str]
    ) -> tuple[RoleLogin, list[RawGrant], bool]:
        """In the admin database, under the role lock: role, password, memberships, registry row.

        First of all the database must exist: nothing is created for a name that does not."""
        role, who, reg = plan.role, plan.who, self.settings.registry
        if not await self.backend.database_exists(who.database, conn):
            raise NoSuchDatabase(who.database)
        await self.backend.lock_role(conn, role, reg)
        state = RoleState.parse(await fetch_one(conn, st.ROLE_STATE, {"marker": self.marker, "role": role}))
        if state is not None and not state.managed:
            raise AccessDenied(
                f"role {role!r} exists but is not managed by ferryman (no {self.marker!r} membership)",
                client_message="the backend role for this connection exists and is not managed by ferryman",
            )
        row = RegistryRow.parse(await fetch_one(conn, reg.select(), (role,)))
        if row is not None and row.login and not who.same_person(row.login, row.node, row.database, row.cap):
            raise AccessDenied(
                f"role name {role!r} is registered to another identity ({row.login!r}, node {row.node!r})",
                client_message="the backend role name for this connection is taken",
            )
        await self._ensure_groups(conn, sorted(set(groups.values())))

        now = datetime.now(UTC)
        epoch = row.epoch if row is not None else 0
        valid_until = row.valid_until if row is not None else None
        if (
            state is not None
            and row is not None
            and row.key_id == self.key_id
            and valid_until is not None
            and (valid_until - now).total_seconds() > self.settings.rotate_before
        ):
            password = self._password(role, epoch)
            if not state.can_login:
                await conn.execute(st.alter_login(role, secret=None, valid_until=None))
        else:
            epoch += 1
            password = self._password(role, epoch)
            valid_until = now + timedelta(seconds=self.settings.password_lifetime)
            secret = self._secret(role, password)
            if state is None:
                for stmt in st.create_login(
                    role,
                    marker=self.marker,
                    secret=secret,
                    valid_until=valid_until,
                    cockroach=self.backend.cockroach,
                ):
                    await conn.execute(stmt)
            else:
                await conn.execute(st.alter_login(role, secret=secret, valid_until=valid_until))
            self.stats.rotations += 1

        current = set(state.member_of) if state is not None else {self.marker}
        wanted = set(groups.values())
        for group in sorted(wanted - current):
            await conn.execute(st.grant_membership(group, role))
        for group in sorted(current - wanted - {self.marker}):
            await conn.execute(st.revoke_membership(group, role))

        previous = list(row.raw_sql) if row is not None else []
        new_texts = {r.text for r in plan.raw}
        stale = [st.validate_raw_grant(t) for t in previous if t not in new_texts]
        await conn.execute(
            reg.upsert(),
            {
                "role": role,
                "marker": self.marker,
                "login": who.user,
                "node": who.node,
                "database": who.database,
                "preset_cap": who.cap,
                "key_id": self.key_id,
                "epoch": epoch,
                "valid_until": valid_until,
                # Kept as they were until the database round has applied the new ones.
                "raw_sql": previous,
            },
        )
        return RoleLogin(role, password, valid_until), stale, sorted(previous) != sorted(new_texts)

    async def _ensure_groups(self, conn: Conn, groups: list[str]) -> None:
        if not groups:
            return
        rows = await fetch_all(conn, st.GROUPS_STATE, {"marker": self.marker, "groups": groups})
        known = {str(name): bool(managed) for name, managed in rows}
        for group in groups:
            if group in known:
                if not known[group]:
                    raise AccessDenied(
                        f"group role {group!r} exists but is not managed by ferryman",
                        client_message="a backend group role for this connection is not managed by ferryman",
                    )
                continue
            await self.backend.lock_group(conn, group)
            if await fetch_one(conn, st.ROLE_EXISTS, (group,)) is None:
                for stmt in st.create_nologin(group, member_of=self.marker):
                    await conn.execute(stmt)

    async def _database_round(
        self, conn: Conn, plan: _Plan, groups: dict[str, str], stale_raw: list[RawGrant]
    ) -> None:
        """In the target database, under its grants lock: CONNECT, preset grants, raw SQL."""
        await self.backend.lock_grants(conn)
        await conn.execute(st.grant_connect(plan.who.database, plan.role))
        rows = await fetch_all(conn, st.SCHEMA_OWNERS, (list(plan.schemas),))
        owners_of = {str(r[0]): {str(r[1]), str(r[2])} for r in rows}
        now = time.monotonic()
        for schema, group in groups.items():
            if schema not in owners_of:
                logger.info(
                    "provision %s: schema %r does not exist in %r; skipped",
                    plan.role,
                    schema,
                    plan.who.database,
                )
                continue
            assert plan.preset is not None
            key = (plan.who.database, group)
            checked = self._group_checked.get(key)
            if checked is None or now - checked >= self.settings.regrant_interval:
                for stmt in st.preset_grants(plan.preset, schema, group):
                    await conn.execute(stmt)
                # Owners whose future tables the group sees at once: schema and database owner,
                # the admin user, and the admin-preset people of this schema.
                admins = names.group_name(self.settings.prefix, plan.who.database, schema, "admin")
                members = {str(r[0]) for r in await fetch_all(conn, st.GROUP_MEMBERS, (admins,))}
                owners = owners_of[schema] | members | {self.backend.info.admin_user}
                for owner in sorted(owners - {"pg_database_owner"}):
                    await self._default_privileges(conn, owner, plan.preset, schema, group)
                self._group_checked[key] = now
            if plan.preset == "admin":
                # Tables this person creates become visible to every preset group of the schema.
                for preset in PRESETS:
                    peer = names.group_name(self.settings.prefix, plan.who.database, schema, preset)
                    if await fetch_one(conn, st.ROLE_EXISTS, (peer,)) is not None:
                        await self._default_privileges(conn, plan.role, preset, schema, peer)
        for raw in stale_raw:
            inverse = raw.inverse()
            if inverse is not None:
                await conn.execute(inverse.render(plan.role))
        for raw in plan.raw:
            await conn.execute(raw.render(plan.role))

    async def _default_privileges(self, conn: Conn, owner: str, preset: str, schema: str, group: str) -> None:
        # FOR ROLE needs membership in ``owner`` (a superuser has it); without it we fall back on
        # the periodic re-grant, so a refusal must not fail the connection.
        try:
            async with conn.transaction():
                for stmt in st.default_privileges(owner, preset, schema, group):
                    await conn.execute(stmt)
        except psycopg.errors.InsufficientPrivilege:
            logger.debug("no ALTER DEFAULT PRIVILEGES FOR ROLE %r; relying on re-grants", owner)
