"""A PostgreSQL listener whose backend is down when the gateway starts (SPEC §5 step 7, 08006).

The gateway must bind every listener at once (no wait on the backend), answer clients 08006
promptly while the backend is down, and serve the next client once the backend is up --
without a restart, and also after a reload made while the backend was down. A real,
throwaway cluster is stopped and started under the running gateway.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from tests.pg.conftest import APPDB, listener_port, pg_files, pg_grant, prepare
from tests.support.gateway import EchoServer, GatewayFiles, roundtrip, running_gateway
from tests.support.pgcluster import SUPERUSER, PgCluster, pg_cluster_factory  # noqa: F401 - fixture

pytestmark = pytest.mark.pg

ADMIN_PASSWORD = "adm1n-Pw-never-logged"  # looked for in the logs and audit: never there
DIAL_TIMEOUT = 3.0
START_BOUND = 10.0
"""The bug blocked start for 30 s (psycopg_pool's default open timeout)."""
REFUSAL_BOUND = 10.0


def _pg_ctl(cluster: PgCluster, *args: str) -> None:
    argv = [str(cluster.bindir / "pg_ctl"), "-D", str(cluster.datadir), *args]
    if os.geteuid() == 0:  # the cluster's files belong to the postgres OS user
        argv = ["runuser", "-u", SUPERUSER, "--", *argv]
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=120)


async def start_backend(cluster: PgCluster) -> None:
    # In a thread: the gateway under test runs on this event loop.
    await asyncio.to_thread(_pg_ctl, cluster, "-l", str(cluster.logfile), "-w", "-t", "60", "start")


def stop_backend(cluster: PgCluster) -> None:
    if (cluster.datadir / "postmaster.pid").exists():
        _pg_ctl(cluster, "-m", "fast", "-w", "stop")


@pytest.fixture
def down_cluster(pg_cluster_factory) -> Iterator[PgCluster]:  # noqa: F811
    """A cluster of its own, stopped for the test (left running; the session stops it)."""
    cluster = prepare(pg_cluster_factory("backend-down"))
    stop_backend(cluster)
    yield cluster


def gateway_files(tmp_path: Path, cluster: PgCluster, echo: EchoServer, prefix: str) -> GatewayFiles:
    files = pg_files(
        tmp_path,
        cluster,
        prefix=prefix,
        dial_timeout=f"{DIAL_TIMEOUT:g}s",
        postgres={"admin_password": ADMIN_PASSWORD},
    )
    files.add_listener("plain", echo.address)
    files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}))
    files.grants.append({"src": ["*"], "app": {"ferryman.dev/cap/ferryman": [{"backends": {"plain": {}}}]}})
    return files


async def refused_08006(port: int) -> str:
    """Connect with asyncpg; the gateway must answer 08006 within REFUSAL_BOUND seconds."""
    started = time.monotonic()
    with pytest.raises(asyncpg.PostgresError) as info:
        await asyncpg.connect(
            host="127.0.0.1", port=port, user="x", database=APPDB, ssl=False, timeout=REFUSAL_BOUND + 20
        )
    assert time.monotonic() - started < REFUSAL_BOUND
    assert info.value.sqlstate == "08006", info.value
    return str(info.value)


async def query_through(port: int) -> tuple[object, ...] | None:
    dsn = f"host=127.0.0.1 port={port} dbname={APPDB} user=x sslmode=disable connect_timeout=20"
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute("select current_user, count(*) from items")
        return await cur.fetchone()


def assert_no_secret(files: GatewayFiles, caplog: pytest.LogCaptureFixture) -> None:
    assert ADMIN_PASSWORD not in files.audit_path.read_text()
    for record in caplog.records:
        assert ADMIN_PASSWORD not in record.getMessage(), record
        assert ADMIN_PASSWORD not in repr(record.__dict__), record


def assert_pools_closed() -> None:
    left = [
        t.get_name()
        for t in asyncio.all_tasks()
        if not t.done() and (t.get_name().startswith("ferryman-provision") or "sweeper" in t.get_name())
    ]
    assert left == []


async def test_backend_down_at_start_recovers_without_restart(
    tmp_path: Path, down_cluster: PgCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with EchoServer() as echo:
        files = gateway_files(tmp_path, down_cluster, echo, prefix="bd1_")
        started = time.monotonic()
        async with running_gateway(files):
            assert time.monotonic() - started < START_BOUND
            # An unrelated TCP listener serves at once.
            assert await roundtrip(listener_port(files, "plain"), b"hello") == b"hello"
            message = await refused_08006(listener_port(files))
            assert "not reachable" in message
            assert await refused_08006(listener_port(files))  # still prompt, still 08006

            await start_backend(down_cluster)
            row = await query_through(listener_port(files))
            assert row == ("bd1_dev_localhost__appdb", 2)
        assert_pools_closed()
    refusals = [r for r in files.audit() if r.get("mode") == "postgres" and r.get("reason")]
    assert refusals and not any("cannot be reused" in str(r) for r in refusals)
    assert_no_secret(files, caplog)


async def test_reload_while_backend_down_then_backend_up(
    tmp_path: Path, down_cluster: PgCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with EchoServer() as echo:
        files = gateway_files(tmp_path, down_cluster, echo, prefix="bd2_")
        started = time.monotonic()
        async with running_gateway(files) as gateway:
            assert time.monotonic() - started < START_BOUND
            await refused_08006(listener_port(files))

            started = time.monotonic()
            assert await gateway.reload()  # same backend settings: the provisioner is kept
            assert time.monotonic() - started < START_BOUND
            await refused_08006(listener_port(files))

            await start_backend(down_cluster)
            row = await query_through(listener_port(files))
            assert row == ("bd2_dev_localhost__appdb", 2)
            assert await roundtrip(listener_port(files, "plain"), b"again") == b"again"
        assert_pools_closed()
    assert_no_secret(files, caplog)


async def test_backend_restart_while_running(tmp_path: Path, down_cluster: PgCluster) -> None:
    """Once open, the admin pool outlives a backend restart: its dead connections are replaced
    and the roles provisioned afterwards (no cached verdict) work at once."""
    await start_backend(down_cluster)
    async with EchoServer() as echo:
        files = gateway_files(tmp_path, down_cluster, echo, prefix="bd3_")
        files.grants.append(pg_grant({"postgres": {"permissions": ["readonly"]}}))
        async with running_gateway(files):
            port = listener_port(files)
            assert await query_through(port) == ("bd3_dev_localhost__appdb", 2)

            await asyncio.to_thread(stop_backend, down_cluster)
            await refused_08006(port)
            await start_backend(down_cluster)
            # A role not provisioned yet: the admin pool must serve it after the restart.
            dsn = f"host=127.0.0.1 port={port} dbname=postgres user=x sslmode=disable connect_timeout=20"
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                cur = await conn.execute("select current_user")
                assert await cur.fetchone() == ("bd3_dev_localhost__postgres",)
        assert_pools_closed()
