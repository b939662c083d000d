"""Provisioning against a real (throwaway) PostgreSQL: every check logs in as the role.

Marker ``pg``: these need the server binaries (see ``tests/support/pgcluster.py``).
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from typing import Any

import psycopg
import pytest
from psycopg import sql

from ferryman.errors import AccessDenied, BackendUnavailable, InvalidParameter, PermissionDenied
from ferryman.policy.model import PgDatabaseGrant
from ferryman.provision import Provisioner, group_name, marker_name
from tests.provision.conftest import APPDB, allowed, connect_as
from tests.support.pgcluster import PgCluster

pytestmark = pytest.mark.pg


def grant(*presets: str, schemas: tuple[str, ...] = (), sql_: tuple[str, ...] = ()) -> PgDatabaseGrant:
    return PgDatabaseGrant(frozenset(presets), frozenset(schemas), sql_)


async def memberships(cluster: PgCluster, role: str) -> set[str]:
    async with await psycopg.AsyncConnection.connect(cluster.dsn()) as conn:
        cur = await conn.execute(
            "SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid "
            "JOIN pg_roles r ON r.oid = m.member WHERE r.rolname = %s",
            (role,),
        )
        return {str(r[0]) for r in await cur.fetchall()}


async def test_readonly_preset(cluster: PgCluster, prov: Provisioner) -> None:
    login = await prov.ensure_login("alice@example.com", "laptop", APPDB, grant("readonly"))
    assert login.role == prov.settings.prefix + "alice_example_com_laptop_appdb"
    async with await connect_as(cluster, login) as conn:
        cur = await conn.execute("SELECT name FROM items WHERE id = 1")
        assert await cur.fetchone() == ("first",)
        assert not await allowed(conn, "INSERT INTO items (name) VALUES ('x')")
        assert not await allowed(conn, "CREATE TABLE mine (a int)")
        assert not await allowed(conn, "SELECT * FROM reporting.stats")  # schema not granted
        assert await allowed(conn, "SELECT last_value FROM items_id_seq")


async def test_readwrite_preset(cluster: PgCluster, prov: Provisioner) -> None:
    login = await prov.ensure_login("bob@example.com", "", APPDB, grant("readwrite"))
    async with await connect_as(cluster, login) as conn:
        assert await allowed(
            conn, "INSERT INTO items (name) VALUES ('by bob')"
        )  # needs USAGE on the sequence
        assert await allowed(conn, "UPDATE items SET name = name WHERE id = 1")
        assert await allowed(conn, "DELETE FROM items WHERE name = 'nothing'")
        assert not await allowed(conn, "CREATE TABLE mine (a int)")
        assert not await allowed(conn, "TRUNCATE items")


async def test_admin_preset_and_its_tables_are_visible_to_others(
    cluster: PgCluster, prov: Provisioner
) -> None:
    reader = await prov.ensure_login("reader@example.com", "", APPDB, grant("readonly"))
    admin = await prov.ensure_login("carol@example.com", "", APPDB, grant("admin"))
    async with await connect_as(cluster, admin) as conn:
        assert await allowed(conn, "INSERT INTO items (name) VALUES ('by carol')")
        await conn.execute("CREATE TABLE carol_t (a int)")
        await conn.execute("INSERT INTO carol_t VALUES (7)")
    # The reader's next connection (cache hit, no round trip) sees it: default privileges.
    again = await prov.ensure_login("reader@example.com", "", APPDB, grant("readonly"))
    assert again == reader
    async with await connect_as(cluster, again) as conn:
        cur = await conn.execute("SELECT a FROM carol_t")
        assert await cur.fetchall() == [(7,)]
        assert not await allowed(conn, "INSERT INTO carol_t VALUES (8)")


async def test_connect_is_granted_explicitly(cluster: PgCluster, prov: Provisioner) -> None:
    cluster.execute(
        "DROP DATABASE IF EXISTS lockeddb",
        "CREATE DATABASE lockeddb",
        "REVOKE CONNECT ON DATABASE lockeddb FROM PUBLIC",
    )
    login = await prov.ensure_login("dave@example.com", "", "lockeddb", grant("readonly"))
    async with await connect_as(cluster, login, "lockeddb") as conn:
        cur = await conn.execute("SELECT current_database(), current_user")
        assert await cur.fetchone() == ("lockeddb", login.role)
    # Another role without the explicit grant is turned away by the server.
    with pytest.raises(psycopg.OperationalError, match="permission denied"):
        await psycopg.AsyncConnection.connect(cluster.dsn("auth_scram", "lockeddb"))


async def test_marker_role(cluster: PgCluster, prov: Provisioner) -> None:
    login = await prov.ensure_login("erin@example.com", "", APPDB, grant("readonly"))
    marker = marker_name(prov.settings.prefix)
    async with await psycopg.AsyncConnection.connect(cluster.dsn()) as conn:
        cur = await conn.execute("SELECT rolcanlogin, rolsuper FROM pg_roles WHERE rolname = %s", (marker,))
        assert await cur.fetchone() == (False, False)
        cur = await conn.execute(
            "SELECT rolcanlogin, rolsuper, rolcreaterole, rolcreatedb, rolvaliduntil IS NOT NULL "
            "FROM pg_roles WHERE rolname = %s",
            (login.role,),
        )
        assert await cur.fetchone() == (True, False, False, False, True)
    assert marker in await memberships(cluster, login.role)


async def test_refuses_an_unmanaged_role_of_the_same_name(cluster: PgCluster, prov: Provisioner) -> None:
    role = prov.settings.prefix + "frank_example_com__appdb"
    cluster.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'mine'").format(sql.Identifier(role)))
    with pytest.raises(AccessDenied) as info:
        await prov.ensure_login("frank@example.com", "", APPDB, grant("admin"))
    assert info.value.sqlstate == "28000" and "not managed" in str(info.value)
    assert await memberships(cluster, role) == set()
    # Untouched: its own password still works.
    async with await psycopg.AsyncConnection.connect(cluster.dsn(role, APPDB, password="mine")):
        pass


async def test_lowered_preset_gets_a_separate_scoped_role(cluster: PgCluster, prov: Provisioner) -> None:
    raw = ("GRANT USAGE ON SCHEMA reporting TO {{.Role}}", "GRANT SELECT ON reporting.secret TO {{.Role}}")
    g = grant("admin", sql_=raw)
    full = await prov.ensure_login("gina@example.com", "", APPDB, g, allow_raw_sql=True)
    low = await prov.ensure_login("gina@example.com", "", APPDB, g, "readonly", allow_raw_sql=True)
    assert low.role == full.role + "_readonly" and low.password != full.password
    async with await connect_as(cluster, low) as conn:
        assert await allowed(conn, "SELECT * FROM items")
        assert not await allowed(conn, "INSERT INTO items (name) VALUES ('x')")
        assert not await allowed(conn, "SELECT * FROM reporting.secret")  # no raw SQL when lowered
    async with await connect_as(cluster, full) as conn:
        assert await allowed(conn, "CREATE TABLE gina_t (a int)")
        assert await allowed(conn, "SELECT * FROM reporting.secret")
    with pytest.raises(InvalidParameter):
        await prov.ensure_login("gina@example.com", "", APPDB, g, "superuser")


async def test_memberships_follow_the_grant(cluster: PgCluster, prov: Provisioner) -> None:
    p = prov.settings.prefix
    wide = grant("readwrite", schemas=("public", "reporting"))
    login = await prov.ensure_login("hank@example.com", "", APPDB, wide)
    groups = {group_name(p, APPDB, s, "readwrite") for s in ("public", "reporting")}
    assert await memberships(cluster, login.role) == groups | {marker_name(p)}
    cluster.execute(sql.SQL("GRANT pg_read_all_data TO {}").format(sql.Identifier(login.role)))  # a stray one

    narrow = await prov.ensure_login("hank@example.com", "", APPDB, grant("readonly"))
    assert narrow.role == login.role and narrow.password == login.password
    assert await memberships(cluster, login.role) == {
        group_name(p, APPDB, "public", "readonly"),
        marker_name(p),
    }
    async with await connect_as(cluster, narrow) as conn:
        assert not await allowed(conn, "INSERT INTO items (name) VALUES ('x')")
        assert not await allowed(conn, "SELECT * FROM reporting.stats")

    await prov.ensure_login("hank@example.com", "", APPDB, wide)
    assert await memberships(cluster, login.role) == groups | {marker_name(p)}
    async with await connect_as(cluster, login) as conn:
        assert await allowed(conn, "INSERT INTO reporting.stats VALUES (1)")


async def test_reconcile_changes_a_live_role(cluster: PgCluster, prov: Provisioner) -> None:
    p = prov.settings.prefix
    full = await prov.ensure_login("ivy@example.com", "", APPDB, grant("admin"))
    low = await prov.ensure_login("ivy@example.com", "", APPDB, grant("admin"), "readwrite")
    async with await connect_as(cluster, full) as session:
        await prov.reconcile(full.role, grant("readonly"))
        await prov.reconcile(low.role, grant("readonly"))
        # Privileges follow membership at once, inside the already open session too.
        assert not await allowed(session, "INSERT INTO items (name) VALUES ('x')")
    assert await memberships(cluster, full.role) == {
        group_name(p, APPDB, "public", "readonly"),
        marker_name(p),
    }
    assert await memberships(cluster, low.role) == {
        group_name(p, APPDB, "public", "readonly"),
        marker_name(p),
    }
    await prov.reconcile(low.role, grant("admin"))  # the lowered role stays capped at readwrite
    assert group_name(p, APPDB, "public", "readwrite") in await memberships(cluster, low.role)


async def test_tables_created_later_become_visible(cluster: PgCluster, make_provisioner: Any) -> None:
    prov: Provisioner = await make_provisioner(regrant_interval=0.3)
    cluster.execute(
        "DROP ROLE IF EXISTS migrator",
        "CREATE ROLE migrator",
        "GRANT CREATE ON SCHEMA public TO migrator",
        dbname=APPDB,
    )
    login = await prov.ensure_login("jack@example.com", "", APPDB, grant("readonly"))
    # By the database owner: default privileges make it visible on the very next connection.
    cluster.execute("CREATE TABLE owner_later (a int)", "INSERT INTO owner_later VALUES (1)", dbname=APPDB)
    login = await prov.ensure_login("jack@example.com", "", APPDB, grant("readonly"))
    async with await connect_as(cluster, login) as conn:
        assert await allowed(conn, "SELECT * FROM owner_later")
    # By anyone else: visible once the cached verdict is older than regrant_interval.
    cluster.execute("SET ROLE migrator", "CREATE TABLE migrated_later (a int)", dbname=APPDB)
    async with await connect_as(cluster, login) as conn:
        assert not await allowed(conn, "SELECT * FROM migrated_later")
    await asyncio.sleep(0.35)
    login = await prov.ensure_login("jack@example.com", "", APPDB, grant("readonly"))
    async with await connect_as(cluster, login) as conn:
        assert await allowed(conn, "SELECT * FROM migrated_later")


async def test_twenty_parallel_logins_for_one_person(cluster: PgCluster, prov: Provisioner) -> None:
    logins = await asyncio.gather(
        *(prov.ensure_login("kim@example.com", "phone", APPDB, grant("readwrite")) for _ in range(20))
    )
    assert len({(login.role, login.password) for login in logins}) == 1
    assert prov.stats.provisions == 1 and prov.stats.hits == 19
    conns = await asyncio.gather(*(connect_as(cluster, login) for login in logins[:5]))
    for conn in conns:
        await conn.close()


async def test_parallel_logins_of_many_people(cluster: PgCluster, prov: Provisioner) -> None:
    # Different people sharing group roles: group creation and GRANT batches must not collide.
    both = grant("readonly", schemas=("public", "reporting"))
    logins = await asyncio.gather(
        *(prov.ensure_login(f"user{i}@example.com", "", APPDB, both) for i in range(12))
    )
    assert len({login.role for login in logins}) == 12
    async with await connect_as(cluster, logins[-1]) as conn:
        assert await allowed(conn, "SELECT * FROM reporting.stats")


async def test_raw_sql_grants(cluster: PgCluster, prov: Provisioner) -> None:
    raw = ("GRANT SELECT ON reporting.secret TO {{.Role}}", "GRANT USAGE ON SCHEMA reporting TO {{.Role}}")
    login = await prov.ensure_login(
        "liz@example.com", "", APPDB, grant("readonly", sql_=raw), allow_raw_sql=True
    )
    async with await connect_as(cluster, login) as conn:
        cur = await conn.execute("SELECT s FROM reporting.secret")
        assert await cur.fetchone() == ("hush",)
        assert not await allowed(conn, "SELECT * FROM reporting.stats")
    # The statement leaves the grant: what it granted is revoked.
    await prov.ensure_login("liz@example.com", "", APPDB, grant("readonly", sql_=raw[1:]), allow_raw_sql=True)
    async with await connect_as(cluster, login) as conn:
        assert not await allowed(conn, "SELECT * FROM reporting.secret")
    # Not applied at all without allow_raw_sql; rejected text refuses the connection (42501).
    other = await prov.ensure_login("max@example.com", "", APPDB, grant("readonly", sql_=raw))
    async with await connect_as(cluster, other) as conn:
        assert not await allowed(conn, "SELECT * FROM reporting.secret")
    bad = grant("readonly", sql_=("GRANT SELECT ON reporting.secret TO {{.Role}} WITH GRANT OPTION",))
    with pytest.raises(PermissionDenied) as info:
        await prov.ensure_login("ned@example.com", "", APPDB, bad, allow_raw_sql=True)
    assert info.value.sqlstate == "42501"


@pytest.mark.parametrize(
    ("user", "node", "database", "schema"),
    [
        ('alice"; DROP ROLE x; --@evil', "Mac Book ü", 'we"ird db; --', 'my "schema"'),
        ("ünïcødé@例え.jp", "ノード", "データ", "スキーマ"),
        ("a" * 80 + "@example.com", "n" * 40, "d" * 63, "s" * 63),
    ],
)
async def test_hostile_and_long_identifiers_round_trip(
    cluster: PgCluster, prov: Provisioner, user: str, node: str, database: str, schema: str
) -> None:
    cluster.execute(
        sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(database)),
        sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)),
    )
    cluster.execute(
        sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)),
        sql.SQL("CREATE TABLE {}.t (a int)").format(sql.Identifier(schema)),
        sql.SQL("INSERT INTO {}.t VALUES (5)").format(sql.Identifier(schema)),
        dbname=database,
    )
    login = await prov.ensure_login(user, node, database, grant("readwrite", schemas=(schema,)))
    assert re.fullmatch(r"[a-z0-9_]{1,63}", login.role)
    async with await connect_as(cluster, login, database) as conn:
        table = sql.SQL("{}.t").format(sql.Identifier(schema))
        cur = await conn.execute(sql.SQL("SELECT a FROM {}").format(table))
        assert await cur.fetchall() == [(5,)]
        await conn.execute(sql.SQL("INSERT INTO {} VALUES (6)").format(table))
    async with await psycopg.AsyncConnection.connect(cluster.dsn()) as conn:
        cur = await conn.execute("SELECT count(*) FROM pg_roles WHERE rolname = 'x'")
        assert await cur.fetchone() == (0,)


async def test_names_that_sanitise_alike_do_not_share_a_role(prov: Provisioner) -> None:
    first = await prov.ensure_login("o.p@example.com", "", APPDB, grant("readonly"))
    with pytest.raises(AccessDenied, match="another identity"):
        await prov.ensure_login("o_p@example.com", "", APPDB, grant("admin"))
    # Case differences are the same person.
    assert (await prov.ensure_login("O.P@example.com", "", APPDB, grant("readonly"))).role == first.role


async def test_cold_vs_warm_timing(cluster: PgCluster, prov: Provisioner) -> None:
    """Numbers for the password/caching decision (printed with -s; asserted loosely)."""
    g = grant("readwrite")
    await prov.ensure_login("warmup@example.com", "", APPDB, g)  # pools and groups exist
    cold, refresh, warm = [], [], []
    for i in range(10):
        t0 = time.perf_counter()
        login = await prov.ensure_login(f"timing{i}@example.com", "", APPDB, g)
        cold.append(time.perf_counter() - t0)
        prov.forget(login.role)
        t0 = time.perf_counter()
        await prov.ensure_login(f"timing{i}@example.com", "", APPDB, g)
        refresh.append(time.perf_counter() - t0)
        for _ in range(100):
            t0 = time.perf_counter()
            await prov.ensure_login(f"timing{i}@example.com", "", APPDB, g)
            warm.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    async with await connect_as(cluster, login):
        pass
    direct = time.perf_counter() - t0
    ms = statistics.median
    print(  # noqa: T201 - the measurement is the point of this test
        f"\nensure_login cold {ms(cold) * 1e3:.2f} ms, refresh {ms(refresh) * 1e3:.2f} ms, "
        f"warm {ms(warm) * 1e6:.1f} us; one SCRAM login as the role {direct * 1e3:.2f} ms"
    )
    assert ms(warm) < 0.001 < ms(cold)


async def test_a_closed_provisioner_says_the_backend_is_unavailable(prov: Provisioner) -> None:
    """A connection still setting up when its listener's provisioner closes (a reload removed
    or replaced the listener) gets BackendUnavailable -- an answer the gateway sends as 08006 --
    not an internal error; cached logins need no backend and still answer."""
    cached = await prov.ensure_login("cached@example.com", "", APPDB, grant("readonly"))
    await prov.close()
    with pytest.raises(BackendUnavailable, match="closed"):
        await prov.ensure_login("late@example.com", "", APPDB, grant("readonly"))
    assert await prov.ensure_login("cached@example.com", "", APPDB, grant("readonly")) == cached
