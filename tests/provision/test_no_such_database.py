"""A database that does not exist, against a real (throwaway) PostgreSQL: ``NoSuchDatabase``
before anything is created, and promptly -- also when the database disappears between the
check and the per-database connection (the pool would otherwise retry until its timeout)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

from ferryman.errors import BackendUnavailable, NoSuchDatabase
from ferryman.policy.model import PgDatabaseGrant
from ferryman.provision import Provisioner
from tests.provision.conftest import APPDB
from tests.support.pgcluster import PgCluster

pytestmark = pytest.mark.pg

READONLY = PgDatabaseGrant(frozenset({"readonly"}))
CONNECT_TIMEOUT = 10.0
PROMPT = 3.0
"""Well under ``CONNECT_TIMEOUT``: what the pool's retries took before."""


def roles(cluster: PgCluster, prefix: str) -> set[str]:
    with psycopg.connect(cluster.dsn()) as conn:
        rows = conn.execute("SELECT rolname FROM pg_roles WHERE starts_with(rolname, %s)", (prefix,))
        return {str(r[0]) for r in rows.fetchall()}


def recreate(cluster: PgCluster, name: str) -> None:
    cluster.execute(
        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)),
        sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)),
    )


def drop(cluster: PgCluster, name: str) -> None:
    cluster.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def check_passes_anyway(prov: Provisioner, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The admin round's check says "exists" (as if the database were dropped just after it);
    the per-database wait still asks the real catalog. Returns the names the round checked."""
    real = prov.backend.database_exists
    checked: list[str] = []

    async def database_exists(database: str, conn: Any = None) -> bool:
        if conn is not None:
            checked.append(database)
            return True
        return await real(database)

    monkeypatch.setattr(prov.backend, "database_exists", database_exists)
    return checked


async def test_missing_database_creates_nothing(cluster: PgCluster, make_provisioner: Any) -> None:
    prov: Provisioner = await make_provisioner(connect_timeout=CONNECT_TIMEOUT)
    before = roles(cluster, prov.settings.prefix)
    for name in ("nsd_missing", 'Nsd "Odd" Name', "x" * 63):
        started = time.monotonic()
        with pytest.raises(NoSuchDatabase) as info:
            await prov.ensure_login("mallory@example.com", "", name, READONLY)
        assert time.monotonic() - started < PROMPT
        assert info.value.database == name and info.value.sqlstate == "3D000"
        assert str(info.value) == f'database "{name}" does not exist'
        assert not isinstance(info.value, BackendUnavailable)
    assert roles(cluster, prov.settings.prefix) == before  # neither login nor group roles
    assert prov.stats.provisions == 0


async def test_cache_hits_do_not_check_the_database(
    cluster: PgCluster, make_provisioner: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    prov: Provisioner = await make_provisioner()
    checked = check_passes_anyway(prov, monkeypatch)
    first = await prov.ensure_login("hot@example.com", "", APPDB, READONLY)
    assert checked == [APPDB]  # the provisioning round checked once, on its own connection
    for _ in range(5):
        assert await prov.ensure_login("hot@example.com", "", APPDB, READONLY) == first
    assert checked == [APPDB] and prov.stats.hits == 5


@pytest.mark.parametrize("pool", ["new", "existing"])
async def test_database_dropped_after_the_check_is_no_such_database_at_once(
    cluster: PgCluster, make_provisioner: Any, monkeypatch: pytest.MonkeyPatch, pool: str
) -> None:
    name = f"nsd_race_{pool}"
    recreate(cluster, name)
    prov: Provisioner = await make_provisioner(connect_timeout=CONNECT_TIMEOUT)
    if pool == "existing":  # its per-database pool holds an idle connection, cut by the DROP
        await prov.ensure_login("early@example.com", "", name, READONLY)
    drop(cluster, name)
    checked = check_passes_anyway(prov, monkeypatch)
    started = time.monotonic()
    with pytest.raises(NoSuchDatabase):
        await prov.ensure_login("late@example.com", "", name, READONLY)
    assert time.monotonic() - started < PROMPT
    assert checked == [name]
    # The database comes back: a fresh pool serves it.
    recreate(cluster, name)
    login = await prov.ensure_login("late@example.com", "", name, READONLY)
    async with await psycopg.AsyncConnection.connect(
        cluster.dsn(login.role, name, password=login.password)
    ) as conn:
        cur = await conn.execute("SELECT current_database()")
        assert await cur.fetchone() == (name,)
    drop(cluster, name)


async def test_sweeper_does_not_wait_for_a_dropped_database(
    cluster: PgCluster, make_provisioner: Any
) -> None:
    name = "nsd_swept"
    recreate(cluster, name)
    prov: Provisioner = await make_provisioner(connect_timeout=CONNECT_TIMEOUT)
    login = await prov.ensure_login("gone@example.com", "", name, READONLY)
    drop(cluster, name)
    started = time.monotonic()
    assert await prov.sweep(datetime.now(UTC) + timedelta(days=2)) == [login.role]
    assert time.monotonic() - started < PROMPT
    assert login.role not in roles(cluster, prov.settings.prefix)
