"""Fixtures for the provisioning tests: one throwaway cluster for the package, a database
``appdb`` with known tables, and a fresh :class:`Provisioner` per test with its own role prefix
(so tests never see each other's roles, and can run in any order)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest

from ferryman.provision import Provisioner, ProvisionerSettings, RoleLogin
from tests.support.pgcluster import PgCluster, pg_cluster_factory  # noqa: F401 - fixture

APPDB = "appdb"


@pytest.fixture(scope="session")
def cluster(pg_cluster_factory: Callable[..., PgCluster]) -> PgCluster:  # noqa: F811 - fixture use
    c = pg_cluster_factory("provision")
    c.create_database(APPDB)
    c.execute(
        "CREATE TABLE items (id serial PRIMARY KEY, name text)",
        "INSERT INTO items (name) VALUES ('first')",
        "CREATE SCHEMA reporting",
        "CREATE TABLE reporting.stats (n int)",
        "INSERT INTO reporting.stats VALUES (42)",
        "CREATE TABLE reporting.secret (s text)",
        "INSERT INTO reporting.secret VALUES ('hush')",
        dbname=APPDB,
    )
    return c


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    return "t" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:6] + "_"


@pytest.fixture
async def make_provisioner(cluster: PgCluster, prefix: str) -> AsyncIterator[Callable[..., Any]]:
    """``await make(**settings) -> Provisioner`` (opened; closed at teardown): a gateway each."""
    opened: list[Provisioner] = []

    async def make(**overrides: Any) -> Provisioner:
        settings = ProvisionerSettings(prefix=overrides.pop("prefix", prefix), **overrides)
        p = Provisioner(cluster.dsn(), settings)
        await p.open()
        opened.append(p)
        return p

    try:
        yield make
    finally:
        for p in opened:
            await p.close()


@pytest.fixture
async def prov(make_provisioner: Callable[..., Any]) -> Provisioner:
    p: Provisioner = await make_provisioner()
    return p


async def connect_as(
    cluster: PgCluster, login: RoleLogin, dbname: str = APPDB
) -> psycopg.AsyncConnection[Any]:
    """A real login as the provisioned role, with its password, over TCP (pg_hba: SCRAM)."""
    return await psycopg.AsyncConnection.connect(
        cluster.dsn(login.role, dbname, password=login.password), autocommit=True
    )


async def allowed(conn: psycopg.AsyncConnection[Any], statement: str) -> bool:
    """Run ``statement``; False when the server says insufficient_privilege (42501)."""
    try:
        async with conn.transaction(force_rollback=True):
            await conn.execute(statement)
    except psycopg.errors.InsufficientPrivilege:
        return False
    return True
