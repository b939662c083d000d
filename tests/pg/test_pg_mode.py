"""PostgreSQL mode end to end: real psql / psycopg / asyncpg / pgbench through a real gateway
to a throwaway PostgreSQL 15 cluster (SPEC §5)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
from pathlib import Path

import asyncpg
import psycopg
import pytest

from tests.pg.conftest import APPDB, listener_port, needs_psql, pg_files, pg_grant
from tests.support.gateway import GatewayFiles, running_gateway, started_gateway, wait_for
from tests.support.localapi_double import LocalAPIDouble
from tests.support.pgcluster import PgCluster

pytestmark = pytest.mark.pg

ENV = {**os.environ, "PGCONNECT_TIMEOUT": "10", "PGSSLMODE": "disable"}


def dsn(port: int, dbname: str = APPDB, **extra: str) -> str:
    params = {
        "host": "127.0.0.1",
        "port": str(port),
        "dbname": dbname,
        "user": "ignored",
        "sslmode": "disable",
        "connect_timeout": "10",
        **extra,
    }
    return " ".join(f"{k}={v}" for k, v in params.items())


async def psql(
    port: int, sql: str, *, dbname: str = APPDB, timeout: float = 60, **extra: str
) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "psql",
        dsn(port, dbname, **extra),
        "-X",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
        "-c",
        sql,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        env=ENV,
    )
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture(autouse=True)
def _psql() -> None:
    needs_psql()


async def test_psql_select_as_provisioned_role(tmp_path: Path, cluster: PgCluster) -> None:
    files = pg_files(tmp_path, cluster, prefix="e1_")
    files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}))
    async with running_gateway(files):
        code, out, err = await psql(listener_port(files), "select current_user, count(*) from items")
        assert code == 0, err
        assert out.strip() == "e1_dev_localhost__appdb|2"
        await wait_for(files.closes)
    decision, close = files.audit()
    assert decision["role"] == "e1_dev_localhost__appdb"
    assert decision["database"] == APPDB
    assert close["mode"] == "postgres" and close["reason"] == "normal"


async def test_presets_are_enforced_by_real_statements(tmp_path: Path, cluster: PgCluster) -> None:
    files = pg_files(tmp_path, cluster, prefix="e2_")
    files.grants.append(pg_grant({APPDB: {"permissions": ["admin"]}, "*": {"permissions": ["readonly"]}}))
    async with running_gateway(files):
        port = listener_port(files)
        code, _, err = await psql(port, "create table e2_made (x int); insert into e2_made values (1)")
        assert code == 0, err  # admin: CREATE TABLE in the schema
        # The same person, lowered per connection to readonly: a separate, scoped role.
        for how in (
            {"options": "'-c ferryman.presets=readonly'"},
            {"options": "'-c waypoint.presets=readonly'"},
        ):
            code, out, err = await psql(
                port, "select current_user; insert into items(name) values ('x')", **how
            )
            assert code != 0
            assert "permission denied for table items" in err
        code, out, err = await psql(port, "select current_user", options="'-c ferryman.presets=readonly'")
        assert out.strip().endswith("_readonly")
        # "*" grants readonly on other databases.
        code, out, err = await psql(port, "select 1", dbname="postgres")
        assert code == 0, err
        code, _, err = await psql(port, "create table nope (x int)", dbname="postgres")
        assert code != 0 and "permission denied" in err


async def test_readwrite_can_write_but_not_create(tmp_path: Path, cluster: PgCluster) -> None:
    files = pg_files(tmp_path, cluster, prefix="e3_")
    files.grants.append(pg_grant({APPDB: {"permissions": ["readwrite"]}}))
    async with running_gateway(files):
        port = listener_port(files)
        code, out, err = await psql(port, "insert into items(name) values ('rw') returning name")
        assert (code, out.split()[0]) == (0, "rw"), err
        code, _, err = await psql(port, "create table e3 (x int)")
        assert code != 0 and "permission denied for schema public" in err


@pytest.mark.parametrize(
    ("grants", "extra", "sqlstate_text"),
    [
        ([], {}, "no grant for this service"),  # 28000
        (
            [pg_grant({"otherdb": {"permissions": ["admin"]}})],
            {},
            'permission denied for database "appdb"',
        ),  # 42501
        (
            [pg_grant({APPDB: {"permissions": ["readonly"]}})],
            {"options": "'-c ferryman.presets=superuser'"},
            "preset",
        ),  # 22023
    ],
)
async def test_refusals_carry_sqlstate_and_clear_message(
    tmp_path: Path, cluster: PgCluster, grants: list, extra: dict, sqlstate_text: str
) -> None:
    files = pg_files(tmp_path, cluster, prefix="e4_")
    files.grants.extend(grants)
    async with running_gateway(files):
        code, _, err = await psql(listener_port(files), "select 1", **extra)
    assert code != 0
    assert "FATAL" in err and sqlstate_text in err


async def test_sqlstates_seen_by_psycopg(tmp_path: Path, cluster: PgCluster) -> None:
    files = pg_files(tmp_path, cluster, prefix="e5_")
    files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}, limits={"max_conns": 1}))
    async with running_gateway(files):
        port = listener_port(files)
        held = await psycopg.AsyncConnection.connect(dsn(port))
        with pytest.raises(psycopg.OperationalError) as info:
            await psycopg.AsyncConnection.connect(dsn(port))
        assert "max_conns" in str(info.value)
        await held.close()
        with pytest.raises(psycopg.OperationalError) as info:
            await psycopg.AsyncConnection.connect(dsn(port, "otherdb"))
        assert 'permission denied for database "otherdb"' in str(info.value)
    refusals = [r for r in files.audit() if r["event"] == "decision" and not r["allowed"]]
    assert refusals[0].get("limit") == "max_conns"


async def test_sqlstate_codes_exact(tmp_path: Path, cluster: PgCluster) -> None:
    """asyncpg exposes the SQLSTATE of the FATAL ErrorResponse directly."""
    files = pg_files(tmp_path, cluster, prefix="e6_")
    files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}, limits={"max_conns": 1}))
    async with running_gateway(files) as gw:
        port = listener_port(files)

        async def sqlstate(**kw: str) -> str:
            with pytest.raises(asyncpg.PostgresError) as info:
                conn = await asyncpg.connect(host="127.0.0.1", port=port, user="x", ssl=False, **kw)
                await conn.close()
            return str(info.value.sqlstate)

        assert await sqlstate(database="otherdb") == "42501"
        assert await sqlstate(database=APPDB, server_settings={"ferryman_presets": "root"}) == "22023"
        held = await asyncpg.connect(host="127.0.0.1", port=port, user="x", database=APPDB, ssl=False)
        assert await sqlstate(database=APPDB) == "53300"
        await held.close()
        gw.runtime.draining = True
        assert await sqlstate(database=APPDB) == "57P03"
        gw.runtime.draining = False


async def test_backend_unreachable_is_08006(tmp_path: Path, cluster: PgCluster) -> None:
    files = GatewayFiles(tmp_path)
    from tests.support.gateway import free_port

    files.add_listener(
        "pg",
        f"127.0.0.1:{free_port()}",
        mode="postgres",
        postgres={"admin_user": "postgres", "user_prefix": "e7_"},
        dial_timeout="2s",
    )
    files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}))
    async with running_gateway(files):
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncpg.connect(
                host="127.0.0.1", port=listener_port(files), user="x", database=APPDB, ssl=False
            )
    assert info.value.sqlstate == "08006"


async def test_identity_lookup_timeout_is_28000_not_08006(tmp_path: Path, cluster: PgCluster) -> None:
    """A tailscaled slower than the listener's identity_timeout: the client has no identity
    (28000), the database is not unreachable (08006)."""
    async with LocalAPIDouble.running() as double:
        double.add_peer("127.0.0.1", login="alice@example.com")
        double.delays["whois"] = 3.0
        files = pg_files(tmp_path, cluster, prefix="e8_", identity_timeout="0.3s")
        files.static = []
        files.extra = f'[tailscale]\nsocket = {json.dumps(double.socket_path)}\ntimeout = "10s"\n'
        files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}))
        async with running_gateway(files):
            with pytest.raises(asyncpg.PostgresError) as info:
                await asyncpg.connect(
                    host="127.0.0.1", port=listener_port(files), user="x", database=APPDB, ssl=False
                )
            await wait_for(files.audit)
    assert info.value.sqlstate == "28000"
    assert "identity lookup timed out" in str(info.value)
    (record,) = files.audit()
    assert record["allowed"] is False and "identity lookup timed out" in record["reason"]


async def test_unmanaged_role_with_same_name_is_refused(tmp_path: Path, cluster: PgCluster) -> None:
    cluster.execute('CREATE ROLE "e8_dev_localhost__appdb" LOGIN')
    files = pg_files(tmp_path, cluster, prefix="e8_")
    files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}))
    async with running_gateway(files):
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncpg.connect(
                host="127.0.0.1", port=listener_port(files), user="x", database=APPDB, ssl=False
            )
    assert info.value.sqlstate == "28000"
    with psycopg.connect(cluster.dsn()) as conn:  # untouched: still a plain login role
        assert conn.execute(
            "select rolcanlogin from pg_roles where rolname = 'e8_dev_localhost__appdb'"
        ).fetchone() == (True,)


async def test_twenty_parallel_first_connections(tmp_path: Path, cluster: PgCluster) -> None:
    files = pg_files(tmp_path, cluster, prefix="e9_")
    files.grants.append(pg_grant({APPDB: {"permissions": ["readwrite"]}}))
    async with running_gateway(files):
        port = listener_port(files)

        async def one(i: int) -> str:
            conn = await asyncpg.connect(host="127.0.0.1", port=port, user="x", database=APPDB, ssl=False)
            try:
                return str(await conn.fetchval("select current_user"))
            finally:
                await conn.close()

        users = await asyncio.gather(*(one(i) for i in range(20)))
    assert set(users) == {"e9_dev_localhost__appdb"}


async def test_psycopg_extended_pipeline_notify_and_big_bytea(tmp_path: Path, cluster: PgCluster) -> None:
    files = pg_files(tmp_path, cluster, prefix="ea_")
    files.grants.append(pg_grant({APPDB: {"permissions": ["admin"]}}))
    async with running_gateway(files):
        port = listener_port(files)
        async with await psycopg.AsyncConnection.connect(dsn(port), autocommit=True) as conn:
            cur = await conn.execute("select %s::int + %s::int", (40, 2))  # extended protocol
            assert await cur.fetchone() == (42,)
            async with conn.pipeline():
                cursors = [await conn.execute("select %s::text", (f"p{i}",)) for i in range(20)]
            assert [(await c.fetchone()) for c in cursors] == [(f"p{i}",) for i in range(20)]
            blob = os.urandom(50 * 1024 * 1024)
            cur = await conn.execute("select length(%s::bytea), md5(%s::bytea)", (blob, blob))
            import hashlib

            assert await cur.fetchone() == (len(blob), hashlib.md5(blob).hexdigest())
            listener = await psycopg.AsyncConnection.connect(dsn(port), autocommit=True)
            await listener.execute("LISTEN ferryman_chan")
            await conn.execute("NOTIFY ferryman_chan, 'hello through the gateway'")
            gen = listener.notifies(timeout=5)
            note = await anext(gen)
            assert note.payload == "hello through the gateway"
            await listener.close()


async def test_asyncpg_prepared_statements(tmp_path: Path, cluster: PgCluster) -> None:
    files = pg_files(tmp_path, cluster, prefix="eb_")
    files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}))
    async with running_gateway(files):
        conn = await asyncpg.connect(
            host="127.0.0.1", port=listener_port(files), user="x", database=APPDB, ssl=False
        )
        stmt = await conn.prepare("select name from items where id = $1")
        assert [await stmt.fetchval(i) for i in (1, 2)] == ["first", "second"]
        await conn.close()


async def test_psql_copy_100k_rows(tmp_path: Path, cluster: PgCluster) -> None:
    cluster.execute("CREATE TABLE copy_target (n int, s text)", dbname=APPDB)
    files = pg_files(tmp_path, cluster, prefix="ec_")
    files.grants.append(pg_grant({APPDB: {"permissions": ["readwrite"]}}))
    data = tmp_path / "rows.csv"
    data.write_text("".join(f"{i},row {i}\n" for i in range(100_000)))
    async with running_gateway(files):
        port = listener_port(files)
        code, out, err = await psql(port, f"\\copy copy_target from '{data}' with (format csv)")
        assert code == 0, err
        assert "COPY 100000" in out
        code, out, _ = await psql(port, "select count(*), sum(n) from copy_target")
        assert out.strip() == f"100000|{sum(range(100_000))}"
        code, out, err = await psql(port, f"\\copy copy_target to '{tmp_path}/out.csv' with (format csv)")
        assert code == 0, err
        assert (tmp_path / "out.csv").read_text().count("\n") == 100_000


async def test_psql_ctrl_c_cancels_query(tmp_path: Path, cluster: PgCluster) -> None:
    files = pg_files(tmp_path, cluster, prefix="ed_")
    files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}))
    async with running_gateway(files):
        proc = await asyncio.create_subprocess_exec(
            "psql",
            dsn(listener_port(files)),
            "-X",
            "-c",
            "select pg_sleep(30)",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
            env=ENV,
        )
        with psycopg.connect(cluster.dsn(dbname=APPDB), autocommit=True) as admin:
            for _ in range(100):
                row = admin.execute(
                    "select count(*) from pg_stat_activity where query = 'select pg_sleep(30)' "
                    "and state = 'active'"
                ).fetchone()
                if row and row[0]:
                    break
                await asyncio.sleep(0.1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        proc.send_signal(signal.SIGINT)  # psql sends a CancelRequest on Ctrl-C
        async with asyncio.timeout(10):
            _, err = await proc.communicate()
        assert loop.time() - started < 5
    assert "canceling statement due to user request" in err.decode()


async def test_unknown_cancel_key_is_dropped(tmp_path: Path, cluster: PgCluster) -> None:
    files = pg_files(tmp_path, cluster, prefix="ee_")
    async with running_gateway(files):
        reader, writer = await asyncio.open_connection("127.0.0.1", listener_port(files))
        writer.write(bytes.fromhex("00000010 04d2162e 00001234 deadbeef"))
        async with asyncio.timeout(5):
            assert await reader.read() == b""
        writer.close()


async def test_revoked_grant_ends_session_with_fatal(tmp_path: Path, cluster: PgCluster) -> None:
    files = pg_files(tmp_path, cluster, prefix="ef_")
    files.revalidation = "300ms"
    files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}))
    async with running_gateway(files):
        conn = await psycopg.AsyncConnection.connect(dsn(listener_port(files)), autocommit=True)
        await conn.execute("select 1")
        files.grants[:] = []
        files.write_policy()
        with pytest.raises(psycopg.OperationalError) as info:
            for _ in range(50):
                await conn.execute("select 1")
                await asyncio.sleep(0.1)
        assert "terminating connection due to administrator command" in str(info.value)
        await conn.close()
        await wait_for(files.closes)
    assert files.closes()[0]["reason"] == "revoked"


async def test_lowered_grant_is_reconciled_live(tmp_path: Path, cluster: PgCluster) -> None:
    files = pg_files(tmp_path, cluster, prefix="eg_")
    files.revalidation = "300ms"
    files.grants.append(pg_grant({APPDB: {"permissions": ["readwrite"]}}))
    async with running_gateway(files):
        conn = await psycopg.AsyncConnection.connect(dsn(listener_port(files)), autocommit=True)
        await conn.execute("insert into items(name) values ('before')")
        files.grants[:] = [pg_grant({APPDB: {"permissions": ["readonly"]}})]
        files.write_policy()

        async def insert_refused() -> bool:
            try:
                await conn.execute("insert into items(name) values ('after')")
            except psycopg.errors.InsufficientPrivilege:
                return True
            return False

        for _ in range(50):
            if await insert_refused():
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the live role kept its write permission")
        assert await (await conn.execute("select count(*) from items")).fetchone() is not None
        await conn.close()


@pytest.mark.skipif(shutil.which("pgbench") is None, reason="pgbench not installed")
async def test_pgbench_select_only(tmp_path: Path, cluster: PgCluster) -> None:
    cluster.create_database("benchdb")
    proc = await asyncio.create_subprocess_exec(
        "pgbench",
        "-i",
        "-s",
        "1",
        "-q",
        "-h",
        "127.0.0.1",
        "-p",
        str(cluster.port),
        "-U",
        "postgres",
        "benchdb",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=ENV,
    )
    await proc.communicate()
    assert proc.returncode == 0
    files = pg_files(tmp_path, cluster, prefix="eh_")
    files.grants.append(pg_grant({"benchdb": {"permissions": ["readonly"]}}))
    async with running_gateway(files):
        proc = await asyncio.create_subprocess_exec(
            "pgbench",
            "-S",
            "-c",
            "4",
            "-j",
            "2",
            "-t",
            "50",
            "-h",
            "127.0.0.1",
            "-p",
            str(listener_port(files)),
            "-U",
            "x",
            "benchdb",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=ENV,
        )
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert "number of transactions actually processed: 200/200" in out.decode()


async def test_sweeper_drops_idle_roles_but_not_live_ones(tmp_path: Path, cluster: PgCluster) -> None:
    files = pg_files(tmp_path, cluster, prefix="ei_", postgres={"user_ttl": "1s", "sweep_interval": "300ms"})
    files.grants.append(pg_grant({"*": {"permissions": ["readonly"]}}))

    def roles() -> set[str]:
        with psycopg.connect(cluster.dsn()) as conn:
            rows = conn.execute(
                "select rolname from pg_roles where rolname like 'ei\\_%' and rolcanlogin"
            ).fetchall()
        return {r[0] for r in rows}

    async with running_gateway(files):
        port = listener_port(files)
        live = await psycopg.AsyncConnection.connect(dsn(port))  # role for appdb, kept open
        gone = await psycopg.AsyncConnection.connect(dsn(port, "postgres"))  # role for postgres, closed
        await gone.close()
        assert roles() == {"ei_dev_localhost__appdb", "ei_dev_localhost__postgres"}
        await wait_for(lambda: roles() == {"ei_dev_localhost__appdb"}, timeout=15)
        cur = await live.execute("select count(*) from items")  # the live session kept its role
        assert (await cur.fetchone()) is not None
        await live.close()


@pytest.mark.parametrize("how", ["shutdown", "listener removed"])
async def test_sessions_cut_by_the_gateway_end_with_57p01(
    tmp_path: Path, cluster: PgCluster, how: str
) -> None:
    """At shutdown (after the grace period) and when a reload removes the listener, a
    PostgreSQL session ends with the server's own FATAL 57P01, not a dropped connection."""
    files = pg_files(tmp_path, cluster, prefix="sd_")
    files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}))
    gateway = await started_gateway(files)
    try:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=listener_port(files), user="x", database=APPDB, ssl=False
        )
        running = asyncio.ensure_future(conn.fetchval("select pg_sleep(30)"))
        await asyncio.sleep(0.3)  # the query is running on the backend
        if how == "shutdown":
            await gateway.shutdown(0.2)
        else:
            files.listeners.clear()
            files.write()
            assert await gateway.reload()
        with pytest.raises(asyncpg.PostgresError) as info:
            async with asyncio.timeout(10):
                await running
        # asyncpg reports a FATAL that ends a running query as 08003 with the server's words
        # (directly against PostgreSQL too); a dropped connection has no such words.
        assert "terminating connection due to administrator command" in str(info.value)
        await conn.close(timeout=2)
        await wait_for(files.closes)
    finally:
        await gateway.shutdown(0.2)
    (close,) = files.closes()
    assert close["reason"] == "shutdown"
