"""The sweeper and several gateways on one backend, against a real (throwaway) PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

from ferryman.policy.model import PgDatabaseGrant
from ferryman.provision import Provisioner
from tests.provision.conftest import APPDB, allowed, connect_as
from tests.support.pgcluster import PgCluster

pytestmark = pytest.mark.pg

READWRITE = PgDatabaseGrant(frozenset({"readwrite"}))
ADMIN = PgDatabaseGrant(frozenset({"admin"}))


async def scalar(cluster: PgCluster, query: str, *params: object, dbname: str = "postgres") -> object:
    async with await psycopg.AsyncConnection.connect(cluster.dsn(dbname=dbname)) as conn:
        cur = await conn.execute(query, params)
        row = await cur.fetchone()
        return row[0] if row else None


async def role_exists(cluster: PgCluster, role: str) -> bool:
    return bool(await scalar(cluster, "SELECT count(*) FROM pg_roles WHERE rolname = %s", role))


async def test_sweeper_drops_idle_roles_and_keeps_live_and_unmanaged_ones(
    cluster: PgCluster, make_provisioner: Any
) -> None:
    prov: Provisioner = await make_provisioner(user_ttl=0.2)
    cluster.execute("DROP DATABASE IF EXISTS sweepdb", "CREATE DATABASE sweepdb")
    idle = await prov.ensure_login("idle@example.com", "", APPDB, ADMIN)
    in_session = await prov.ensure_login("busy@example.com", "", APPDB, READWRITE)
    live_here = await prov.ensure_login("live@example.com", "", APPDB, READWRITE)
    replaced = await prov.ensure_login("gone@example.com", "", APPDB, READWRITE)
    # The idle person owns a table in its database and, by hand, one in another database.
    async with await connect_as(cluster, idle) as conn:
        await conn.execute("CREATE TABLE idle_owned (a int)")
    cluster.execute(
        "CREATE TABLE elsewhere (a int)",
        sql.SQL("ALTER TABLE elsewhere OWNER TO {}").format(sql.Identifier(idle.role)),
        dbname="sweepdb",
    )
    # Someone replaces a managed role by an unmanaged one of the same name: never ours to drop.
    cluster.execute(
        sql.SQL("DROP OWNED BY {0}; DROP ROLE {0}").format(sql.Identifier(replaced.role)), dbname=APPDB
    )
    cluster.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(replaced.role)))

    session = await connect_as(cluster, in_session)
    try:
        await asyncio.sleep(0.3)
        dropped = await prov.sweep(live_roles={live_here.role})
    finally:
        await session.close()
    assert dropped == [idle.role]
    assert not await role_exists(cluster, idle.role)
    for kept in (in_session.role, live_here.role, replaced.role):
        assert await role_exists(cluster, kept)
    owner = "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = %s"
    assert await scalar(cluster, owner, "idle_owned", dbname=APPDB) == "postgres"
    assert await scalar(cluster, owner, "elsewhere", dbname="sweepdb") == "postgres"

    # Coming back later simply provisions the role again.
    again = await prov.ensure_login("idle@example.com", "", APPDB, ADMIN)
    async with await connect_as(cluster, again) as conn:
        assert await allowed(conn, "INSERT INTO idle_owned VALUES (1)")

    # Now idle, with no session: swept on a later round (time passed in explicitly).
    later = datetime.now(UTC) + timedelta(seconds=5)
    assert set(await prov.sweep(later)) == {idle.role, in_session.role, live_here.role}
    assert await role_exists(cluster, replaced.role)


async def test_sweep_respects_the_ttl(cluster: PgCluster, make_provisioner: Any) -> None:
    prov: Provisioner = await make_provisioner(user_ttl=3600)
    login = await prov.ensure_login("fresh@example.com", "", APPDB, READWRITE)
    assert await prov.sweep() == []
    assert await prov.sweep(datetime.now(UTC) + timedelta(hours=2)) == [login.role]


async def test_two_gateways_with_a_shared_key(cluster: PgCluster, make_provisioner: Any) -> None:
    key = b"k" * 32
    a: Provisioner = await make_provisioner(password_key=key)
    b: Provisioner = await make_provisioner(password_key=key)
    people = [f"fleet{i}@example.com" for i in range(8)]
    results = await asyncio.gather(
        *(gw.ensure_login(p, "", APPDB, READWRITE) for p in people for gw in (a, b) for _ in range(3))
    )
    by_role: dict[str, set[str]] = {}
    for login in results:
        by_role.setdefault(login.role, set()).add(login.password)
    assert len(by_role) == 8 and all(len(pw) == 1 for pw in by_role.values())
    assert a.stats.rotations + b.stats.rotations == 8  # nobody re-keyed anybody
    for login in results[:2]:
        async with await connect_as(cluster, login) as conn:
            assert await allowed(conn, "INSERT INTO items (name) VALUES ('fleet')")


async def test_two_gateways_with_their_own_keys_recover_by_forget(
    cluster: PgCluster, make_provisioner: Any
) -> None:
    # Two gateway processes without a configured key: each has drawn its own.
    a: Provisioner = await make_provisioner(password_key=b"a" * 32)
    b: Provisioner = await make_provisioner(password_key=b"b" * 32)
    first = await a.ensure_login("solo@example.com", "", APPDB, READWRITE)
    second = await b.ensure_login("solo@example.com", "", APPDB, READWRITE)
    assert first.role == second.role and first.password != second.password
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        await connect_as(cluster, first)
    # The documented contract: on a failed backend login, forget and provision once more.
    a.forget(first.role)
    retry = await a.ensure_login("solo@example.com", "", APPDB, READWRITE)
    async with await connect_as(cluster, retry):
        pass


async def test_provisioners_of_one_process_without_a_key_do_not_re_key_each_other(
    cluster: PgCluster, make_provisioner: Any
) -> None:
    """Two listeners in front of one server (or a listener a reload re-created) each have a
    provisioner; with no configured key they share the process's, so the role's password one
    of them handed out still logs in after the other provisioned the same person."""
    a: Provisioner = await make_provisioner()
    b: Provisioner = await make_provisioner()
    first = await a.ensure_login("twice@example.com", "", APPDB, READWRITE)
    second = await b.ensure_login("twice@example.com", "", APPDB, READWRITE)
    assert second == first
    assert a.stats.rotations + b.stats.rotations == 1
    async with await connect_as(cluster, first):
        pass


async def test_sweep_by_one_gateway_while_another_caches(cluster: PgCluster, make_provisioner: Any) -> None:
    key = b"s" * 32
    a: Provisioner = await make_provisioner(password_key=key)
    b: Provisioner = await make_provisioner(password_key=key)
    login = await a.ensure_login("cached@example.com", "", APPDB, READWRITE)
    assert await b.sweep(datetime.now(UTC) + timedelta(days=2)) == [login.role]
    cached = await a.ensure_login("cached@example.com", "", APPDB, READWRITE)
    assert cached == login  # still a cache hit on gateway a ...
    with pytest.raises(psycopg.OperationalError):
        await connect_as(cluster, cached)  # ... whose role is gone
    a.forget(login.role)
    async with await connect_as(cluster, await a.ensure_login("cached@example.com", "", APPDB, READWRITE)):
        pass
