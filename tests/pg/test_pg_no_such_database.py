"""A database that does not exist (SPEC §5 step 7; README "PostgreSQL mode"): the client gets
PostgreSQL's own ``FATAL 3D000 database "…" does not exist`` at once, as from PostgreSQL or
PgBouncer -- not an 08006 after the listener's ``dial_timeout`` -- no role or group role is
created for the name, the refusal is audited as such, and the target is not marked down, so
the listener keeps serving the databases that do exist.

Real clients (asyncpg, psql) through a real gateway to a throwaway PostgreSQL cluster.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import sql

from ferryman.app import Gateway
from ferryman.config.model import TargetConfig
from ferryman.errors import NoSuchDatabase
from ferryman.proxy.pg import client_message
from tests.pg.conftest import APPDB, listener_port, needs_psql, pg_files, pg_grant
from tests.pg.test_pg_mode import psql
from tests.support.gateway import GatewayFiles, running_gateway, wait_for
from tests.support.pgcluster import PgCluster

pytestmark = pytest.mark.pg

DIAL_TIMEOUT = 10.0
PROMPT = 5.0
"""The bug answered only after ``dial_timeout`` (10 s); PostgreSQL answers at once."""
QUOTED_DB = 'Nsd "Quoted" Db'
"""Exists: spaces, double quotes and upper case (must be quoted as an identifier)."""


@pytest.fixture(autouse=True)
def _psql() -> None:
    needs_psql()


def gateway_files(tmp_path: Path, cluster: PgCluster, prefix: str) -> GatewayFiles:
    files = pg_files(tmp_path, cluster, prefix=prefix, dial_timeout=f"{DIAL_TIMEOUT:g}s")
    files.grants.append(pg_grant({"*": {"permissions": ["readonly"]}}))
    return files


def managed_roles(cluster: PgCluster, prefix: str) -> set[str]:
    with psycopg.connect(cluster.dsn()) as conn:
        rows = conn.execute("SELECT rolname FROM pg_roles WHERE starts_with(rolname, %s)", (prefix,))
        return {str(r[0]) for r in rows.fetchall()}


def spy_mark_down(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> list[TargetConfig]:
    router = gw.runtime.routers["pg"]
    marked: list[TargetConfig] = []
    real = router.mark_down

    def mark_down(target: TargetConfig) -> None:
        marked.append(target)
        real(target)

    monkeypatch.setattr(router, "mark_down", mark_down)
    return marked


async def refused_3d000(port: int, database: str) -> asyncpg.PostgresError:
    started = time.monotonic()
    with pytest.raises(asyncpg.PostgresError) as info:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=port, user="x", database=database, ssl=False, timeout=DIAL_TIMEOUT * 3
        )
        await conn.close()
    elapsed = time.monotonic() - started
    assert info.value.sqlstate == "3D000", info.value
    assert elapsed < PROMPT, f"3D000 took {elapsed:.1f}s"
    return info.value


async def select_through(port: int, database: str, query: str) -> list[Any]:
    conn = await asyncpg.connect(
        host="127.0.0.1", port=port, user="x", database=database, ssl=False, timeout=DIAL_TIMEOUT * 3
    )
    try:
        return list(await conn.fetchrow(query))
    finally:
        await conn.close()


def test_client_message_is_postgresqls_own() -> None:
    assert client_message(NoSuchDatabase('a "b" C')) == ("3D000", 'database "a "b" C" does not exist')


async def test_missing_database_is_3d000_at_once_and_provisions_nothing(
    tmp_path: Path, cluster: PgCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = "nsd1_"
    files = gateway_files(tmp_path, cluster, prefix)
    async with running_gateway(files) as gw:
        port = listener_port(files)
        marked = spy_mark_down(gw, monkeypatch)
        # The provisioner is open and the marker role made: only the refusals may change roles.
        assert await select_through(port, APPDB, "select current_database()") == [APPDB]
        before = managed_roles(cluster, prefix)

        error = await refused_3d000(port, "nsd_missing_db")
        assert error.severity == "FATAL"
        assert error.args[0] == 'database "nsd_missing_db" does not exist'

        code, _, err = await psql(port, "select 1", dbname="nsd_other_missing", timeout=PROMPT * 3)
        assert code != 0
        assert 'FATAL:  database "nsd_other_missing" does not exist' in err

        assert managed_roles(cluster, prefix) == before
        assert not [r for r in before if "missing" in r]

        # The listener keeps serving at once: the target was not marked down.
        assert await select_through(port, APPDB, "select current_database()") == [APPDB]
        assert marked == []
        await wait_for(lambda: len(files.audit()) >= 4)
    refusals = [r for r in files.audit() if r["event"] == "decision" and not r["allowed"]]
    assert [(r["outcome"], r["reason"]) for r in refusals] == [
        ("no_database", 'database "nsd_missing_db" does not exist'),
        ("no_database", 'database "nsd_other_missing" does not exist'),
    ]


async def test_database_names_needing_quotes(tmp_path: Path, cluster: PgCluster) -> None:
    prefix = "nsd2_"
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(QUOTED_DB)))
    cluster.create_database(QUOTED_DB)
    files = gateway_files(tmp_path, cluster, prefix)
    async with running_gateway(files):
        port = listener_port(files)
        row = await select_through(port, QUOTED_DB, "select current_database(), current_user")
        assert row[0] == QUOTED_DB
        assert str(row[1]).startswith(prefix)
        before = managed_roles(cluster, prefix)

        missing = 'Nsd "Missing" Db'
        error = await refused_3d000(port, missing)
        assert error.args[0] == f'database "{missing}" does not exist'
        # A name that differs only in case is another database in PostgreSQL.
        error = await refused_3d000(port, QUOTED_DB.lower())
        assert error.args[0] == f'database "{QUOTED_DB.lower()}" does not exist'
        assert managed_roles(cluster, prefix) == before

        row = await select_through(port, QUOTED_DB, "select current_database()")
        assert row == [QUOTED_DB]
