"""Backend-session reuse in PostgreSQL mode, end to end against a real PostgreSQL 15: a session
ended idle by the client goes back to the pool clean (``DISCARD ALL``) and serves the next
connection of the same role, database and start-up parameters -- and nothing else."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trustme

from ferryman.app import Gateway
from tests.pg.conftest import APPDB, listener_port, pg_files, pg_grant
from tests.pg.test_pg_mode import dsn
from tests.support.gateway import GatewayFiles, running_gateway, wait_for
from tests.support.pgcluster import PgCluster

pytestmark = pytest.mark.pg


def reuse_files(tmp_path: Path, cluster: PgCluster, prefix: str, **postgres: Any) -> GatewayFiles:
    files = pg_files(tmp_path, cluster, prefix=prefix, postgres=postgres)
    files.grants.append(pg_grant({"*": {"permissions": ["readwrite"]}}))
    return files


async def backend_pid(port: int, dbname: str = APPDB, **extra: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn(port, dbname, **extra), autocommit=True) as conn:
        row = await (await conn.execute("select pg_backend_pid()")).fetchone()
    assert row is not None
    return int(row[0])


def pool_of(gateway: Gateway) -> Any:
    roles = gateway.runtime.provisioners["pg"]
    (pg_roles,) = roles._by_backend.values()
    return pg_roles.pool


def sessions_of(cluster: PgCluster, prefix: str) -> int:
    with psycopg.connect(cluster.dsn()) as conn:
        row = conn.execute(
            "select count(*) from pg_stat_activity where usename like %s", (prefix.replace("_", "\\_") + "%",)
        ).fetchone()
    assert row is not None
    return int(row[0])


def pid_alive(cluster: PgCluster, pid: int) -> bool:
    with psycopg.connect(cluster.dsn()) as conn:
        row = conn.execute("select count(*) from pg_stat_activity where pid = %s", (pid,)).fetchone()
    return row == (1,)


async def test_next_connection_of_the_same_role_gets_the_kept_session(
    tmp_path: Path, cluster: PgCluster
) -> None:
    files = reuse_files(tmp_path, cluster, "ra_")
    async with running_gateway(files) as gateway:
        port = listener_port(files)
        first = await backend_pid(port)
        pool = pool_of(gateway)
        await wait_for(lambda: len(pool) == 1)
        second = await backend_pid(port)
        assert second == first
        assert pool.reused == 1
    decisions = [r for r in files.audit() if r.get("allowed") is True]
    assert [d["backend_session"] for d in decisions] == ["new", "kept"]
    assert [c["reason"] for c in files.closes()] == ["normal", "normal"]


async def test_kept_session_is_clean_for_the_next_connection(tmp_path: Path, cluster: PgCluster) -> None:
    """Temp tables, prepared statements, settings, advisory locks and LISTEN do not
    survive into the next connection (DISCARD ALL)."""
    files = reuse_files(tmp_path, cluster, "rb_")
    async with running_gateway(files) as gateway:
        port = listener_port(files)
        async with await psycopg.AsyncConnection.connect(dsn(port), autocommit=True) as conn:
            pid = (await (await conn.execute("select pg_backend_pid()")).fetchone() or [0])[0]
            await conn.execute("create temp table scratch (x int)")
            await conn.execute("prepare leftover as select 1")
            await conn.execute("set search_path = pg_catalog")
            await conn.execute("set statement_timeout = '1234ms'")
            await conn.execute("select pg_advisory_lock(4242)")
            await conn.execute("listen leftover_channel")
        await wait_for(lambda: len(pool_of(gateway)) == 1)
        async with await psycopg.AsyncConnection.connect(dsn(port), autocommit=True) as conn:

            async def one(sql: str) -> Any:
                row = await (await conn.execute(sql)).fetchone()
                assert row is not None
                return row[0]

            assert await one("select pg_backend_pid()") == pid  # really the same session
            assert (
                await one("select count(*) from pg_class where relname = 'scratch' and relpersistence = 't'")
                == 0
            )
            assert await one("select count(*) from pg_prepared_statements") == 0
            assert await one("show search_path") == '"$user", public'
            assert await one("show statement_timeout") == "0"
            assert (
                await one(
                    "select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()"
                )
                == 0
            )
            assert await one("select count(*) from pg_listening_channels()") == 0
            assert await one("select current_user = session_user") is True


async def test_different_role_database_or_parameters_never_share(tmp_path: Path, cluster: PgCluster) -> None:
    cluster.create_database("otherdb")
    files = reuse_files(tmp_path, cluster, "rc_")
    async with running_gateway(files) as gateway:
        port = listener_port(files)
        pool = pool_of(gateway)
        first = await backend_pid(port)
        await wait_for(lambda: len(pool) == 1)
        # Another database, a lowered preset (another role), other start-up parameters.
        assert await backend_pid(port, "otherdb") != first
        assert await backend_pid(port, options="'-c ferryman.presets=readonly'") != first
        assert await backend_pid(port, application_name="someone-else") != first
        await wait_for(lambda: len(pool) == 4)
        assert pool.reused == 0
        assert await backend_pid(port) == first
        assert pool.reused == 1


async def test_session_left_in_a_transaction_is_not_kept(tmp_path: Path, cluster: PgCluster) -> None:
    files = reuse_files(tmp_path, cluster, "rd_")
    async with running_gateway(files) as gateway:
        port = listener_port(files)
        conn = await psycopg.AsyncConnection.connect(dsn(port))  # not autocommit: BEGIN implicit
        row = await (await conn.execute("select pg_backend_pid()")).fetchone()
        assert row is not None
        await conn.execute("insert into items(name) values ('uncommitted')")
        await conn.close()  # Terminate inside a transaction: the backend must roll back and end
        await wait_for(lambda: sessions_of(cluster, "rd_") == 0, timeout=10)
        assert len(pool_of(gateway)) == 0
        assert await backend_pid(port) != row[0]
    with psycopg.connect(cluster.dsn(dbname=APPDB)) as check:
        assert check.execute("select count(*) from items where name = 'uncommitted'").fetchone() == (0,)


async def test_client_vanishing_without_terminate_is_not_kept(tmp_path: Path, cluster: PgCluster) -> None:
    files = reuse_files(tmp_path, cluster, "re_")
    async with running_gateway(files) as gateway:
        port = listener_port(files)
        first = await backend_pid(port)  # creates the role and keeps one session
        await wait_for(lambda: len(pool_of(gateway)) == 1)
        conn = await psycopg.AsyncConnection.connect(dsn(port), autocommit=True)
        assert (await (await conn.execute("select pg_backend_pid()")).fetchone()) == (first,)
        # Drop the TCP connection under psycopg: no Terminate message.
        with socket.socket(fileno=os.dup(conn.pgconn.socket)) as raw:
            raw.shutdown(socket.SHUT_RDWR)
        await wait_for(lambda: sessions_of(cluster, "re_") == 0, timeout=10)
        assert len(pool_of(gateway)) == 0
        await conn.close()


async def test_kept_sessions_expire_and_reuse_can_be_turned_off(tmp_path: Path, cluster: PgCluster) -> None:
    files = reuse_files(tmp_path, cluster, "rf_", backend_idle_timeout="300ms")
    async with running_gateway(files) as gateway:
        port = listener_port(files)
        await backend_pid(port)
        await wait_for(lambda: len(pool_of(gateway)) == 1)
        await wait_for(lambda: sessions_of(cluster, "rf_") == 0, timeout=10)  # closed after 300 ms
        assert len(pool_of(gateway)) == 0

    (tmp_path / "off").mkdir()
    files = reuse_files(tmp_path / "off", cluster, "rg_", reuse_backend_sessions=False)
    async with running_gateway(files):
        port = listener_port(files)
        pids = [await backend_pid(port) for _ in range(3)]
        assert len(set(pids)) == 3
        await wait_for(lambda: sessions_of(cluster, "rg_") == 0, timeout=10)


async def test_revoked_person_cannot_take_a_kept_session(tmp_path: Path, cluster: PgCluster) -> None:
    files = reuse_files(tmp_path, cluster, "rh_")
    async with running_gateway(files) as gateway:
        port = listener_port(files)
        await backend_pid(port)
        await wait_for(lambda: len(pool_of(gateway)) == 1)
        files.grants[:] = []
        files.write_policy()
        await gateway.reload()
        with pytest.raises(psycopg.OperationalError, match=r"28000|no grant|not allowed|permission"):
            await backend_pid(port)
        assert pool_of(gateway).reused == 0


async def test_cancel_reaches_a_kept_session(tmp_path: Path, cluster: PgCluster) -> None:
    files = reuse_files(tmp_path, cluster, "ri_")
    async with running_gateway(files) as gateway:
        port = listener_port(files)
        await backend_pid(port)
        await wait_for(lambda: len(pool_of(gateway)) == 1)
        async with await psycopg.AsyncConnection.connect(dsn(port), autocommit=True) as conn:
            assert pool_of(gateway).reused == 1
            sleeper = asyncio.ensure_future(conn.execute("select pg_sleep(30)"))
            await asyncio.sleep(0.5)
            await conn.cancel_safe(timeout=10)
            with pytest.raises(psycopg.errors.QueryCanceled):
                async with asyncio.timeout(10):
                    await sleeper


@pytest.mark.skipif(shutil.which("pgbench") is None, reason="pgbench not installed")
async def test_pgbench_new_connection_per_transaction_reuses_sessions(
    tmp_path: Path, cluster: PgCluster
) -> None:
    cluster.execute(
        "CREATE TABLE IF NOT EXISTS pgbench_accounts (aid int primary key, abalance int)", dbname=APPDB
    )
    cluster.execute(
        "INSERT INTO pgbench_accounts SELECT g, 0 FROM generate_series(1, 100000) g ON CONFLICT DO NOTHING",
        dbname=APPDB,
    )
    files = reuse_files(tmp_path, cluster, "rj_")
    script = tmp_path / "select.sql"
    script.write_text(
        "\\set aid random(1, 100000)\nSELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n"
    )
    async with running_gateway(files) as gateway:
        proc = await asyncio.create_subprocess_exec(
            "pgbench", "-n", "-C", "-c", "4", "-t", "50", "-f", str(script),
            "-h", "127.0.0.1", "-p", str(listener_port(files)), "-U", "ignored", APPDB,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PGSSLMODE": "disable"},
        )  # fmt: skip
        async with asyncio.timeout(120):
            out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert "number of transactions actually processed: 200/200" in out.decode()
        reused = pool_of(gateway).reused
    kinds = [d["backend_session"] for d in files.audit() if d.get("allowed") is True]
    assert kinds.count("kept") == reused
    # A fresh login happens only while a just-ended session is still being reset.
    assert reused >= 150, kinds


async def test_max_idle_evicts_the_least_recently_parked(tmp_path: Path, cluster: PgCluster) -> None:
    cluster.create_database("evictdb")
    files = reuse_files(tmp_path, cluster, "rk_", backend_max_idle=1)
    async with running_gateway(files) as gateway:
        port = listener_port(files)
        pool = pool_of(gateway)
        first = await backend_pid(port)
        await wait_for(lambda: len(pool) == 1)
        other = await backend_pid(port, "evictdb")  # parks a second session: the first goes
        await wait_for(lambda: sessions_of(cluster, "rk_") == 1, timeout=10)
        assert len(pool) == 1
        assert not pid_alive(cluster, first)
        assert await backend_pid(port) != first
        await wait_for(lambda: not pid_alive(cluster, other), timeout=10)  # evicted in turn
        assert await backend_pid(port, "evictdb") != other
        assert pool.reused == 0


async def test_sessions_past_their_lifetime_are_not_reused(tmp_path: Path, cluster: PgCluster) -> None:
    files = reuse_files(tmp_path, cluster, "rl_", backend_lifetime="300ms")
    async with running_gateway(files) as gateway:
        port = listener_port(files)
        first = await backend_pid(port)
        await wait_for(lambda: len(pool_of(gateway)) == 1)
        await asyncio.sleep(0.5)
        assert await backend_pid(port) != first
        assert pool_of(gateway).reused == 0


async def test_tls_clients_do_not_reuse(tmp_path: Path, cluster: PgCluster) -> None:
    """The relay can only follow message boundaries on raw sockets: a TLS client always gets a
    fresh backend session (documented)."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "srv.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "srv.key"))
    files = pg_files(
        tmp_path, cluster, prefix="rm_", tls_mode="optional",
        cert_file=str(tmp_path / "srv.pem"), key_file=str(tmp_path / "srv.key"),
    )  # fmt: skip
    files.grants.append(pg_grant({"*": {"permissions": ["readonly"]}}))
    async with running_gateway(files) as gateway:
        port = listener_port(files)
        pool = pool_of(gateway)
        plain = await backend_pid(port)  # a plaintext client's session is kept…
        await wait_for(lambda: len(pool) == 1)
        tls = [await backend_pid(port, sslmode="require") for _ in range(2)]
        assert plain not in tls and tls[0] != tls[1]  # …but TLS clients neither take nor leave one
        assert len(pool) == 1 and pool.reused == 0
        assert await backend_pid(port) == plain
