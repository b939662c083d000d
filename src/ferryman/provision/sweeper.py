"""Dropping idle managed roles (SPEC 5.3 step 4: "unused for longer than user_ttl").

Owns: :func:`sweep`, which :meth:`Provisioner.sweep` calls -- the gateway runs it on a timer.

Must not: touch a role that is not a direct member of the marker role, drop a role that has a
session on the backend (from any gateway) or in ``live_roles``, or drop a role before its owned
objects have a new owner.

Per candidate (registry row whose ``last_used`` is older than ``now - user_ttl``), holding the
role's lock so no gateway provisions it meanwhile:

1. skip it if it is live here, or has a backend session (``pg_stat_activity``, which sees every
   gateway's sessions; ``crdb_internal.cluster_sessions`` on CockroachDB);
2. ``ALTER ROLE … NOLOGIN`` -- a gateway holding a cached password can no longer start a
   session -- then look for sessions once more (one may have logged in just before) and put
   LOGIN back if there is one;
3. in each database holding objects owned by, or privileges granted to, the role (from
   ``pg_shdepend``; every connectable database on CockroachDB, which has no ``pg_shdepend``),
   ``REASSIGN OWNED BY role TO owner`` then ``DROP OWNED BY role`` (the latter revokes its
   privileges and default privileges; docs: DROP ROLE, "Dropping Roles");
4. ``DROP ROLE`` and delete the registry row.

Last use is the registry's ``last_used``, written by every provisioning round and refresh
(at least once per ``regrant_interval`` while a person keeps connecting), so it survives a
gateway restart and is shared by all gateways.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import psycopg

from ferryman.errors import NoSuchDatabase

from . import statements as st
from ._backend import Conn, fetch_all, fetch_one
from ._rows import RoleState

if TYPE_CHECKING:
    from .provisioner import Provisioner

logger = logging.getLogger(__name__)


async def _sessions(prov: Provisioner, conn: Conn, role: str) -> int:
    query = st.LIVE_SESSIONS_CRDB if prov.backend.cockroach else st.LIVE_SESSIONS_PG
    row = await fetch_one(conn, query, (role,))
    return int(row[0]) if row is not None and isinstance(row[0], int) else 0


async def sweep(prov: Provisioner, now: datetime, live_roles: set[str]) -> list[str]:
    """Drop idle managed roles; returns the names dropped. One failure skips only that role."""
    reg = prov.settings.registry
    cutoff = now - timedelta(seconds=prov.settings.user_ttl)
    async with prov.backend.connection() as conn:
        candidates = [(str(r), str(d)) for r, d in await fetch_all(conn, reg.idle(), (prov.marker, cutoff))]
    dropped: list[str] = []
    for role, database in candidates:
        if role in live_roles:
            continue
        try:
            if await _sweep_one(prov, role, database, cutoff):
                dropped.append(role)
        except psycopg.Error as exc:
            logger.warning("sweep %s: %s; will retry on the next sweep", role, exc)
    return dropped


async def _sweep_one(prov: Provisioner, role: str, database: str, cutoff: datetime) -> bool:
    reg, backend = prov.settings.registry, prov.backend
    async with backend.try_role_session_lock(role, reg) as locked:
        if not locked:
            return False  # being provisioned right now: not idle
        async with backend.connection() as conn:
            last = await fetch_one(conn, reg.last_used(), (role,))
            if last is None or not isinstance(last[0], datetime) or last[0] >= cutoff:
                return False
            state = RoleState.parse(
                await fetch_one(conn, st.ROLE_STATE, {"marker": prov.marker, "role": role})
            )
            if state is None or not state.managed:
                # Gone, or replaced by a role we do not manage: forget it, touch nothing.
                await conn.execute(reg.delete(), (role,))
                return False
            if await _sessions(prov, conn, role):
                return False
            await conn.execute(st.set_nologin(role))
            if await _sessions(prov, conn, role):
                await conn.execute(st.set_nologin(role, login=True))
                return False
            if backend.cockroach:
                databases = [str(r[0]) for r in await fetch_all(conn, st.ALL_DATABASES)]
            else:
                databases = [str(r[0]) for r in await fetch_all(conn, st.DEPENDENT_DATABASES, (role,))]
        # The role's own database first: DROP OWNED there also revokes CONNECT on it (a shared
        # object), under that database's grants lock like every other change to its ACL.
        ordered = sorted(set(databases) | {database}, key=lambda d: (d != database, d))
        new_owner = prov.settings.reassign_to or backend.info.admin_user
        for name in ordered:
            await _disown(prov, role, name, new_owner)

        async def drop(conn: Conn) -> None:
            await conn.execute(st.drop_role(role))
            await conn.execute(reg.delete(), (role,))

        await backend.transaction(drop, what="drop " + role)
        logger.info("sweep: dropped idle role %s (objects reassigned to %s)", role, new_owner)
        return True


async def _disown(prov: Provisioner, role: str, database: str, new_owner: str) -> None:
    async def body(conn: Conn) -> None:
        await prov.backend.lock_grants(conn)
        for stmt in st.reassign_and_drop_owned(role, new_owner):
            await conn.execute(stmt)

    try:
        await prov.backend.transaction(body, database=database, what=f"disown {role} in {database}")
    except NoSuchDatabase:
        logger.info("sweep %s: database %r no longer exists; nothing to disown there", role, database)
    except psycopg.OperationalError as exc:
        # The database is gone, or refuses connections; it cannot hold the role's objects then
        # unless it comes back, in which case DROP ROLE fails and the next sweep tries again.
        logger.warning("sweep %s: cannot reach database %r: %s", role, database, exc)
