"""PostgreSQL mode: what the client's start-up parameters do (SPEC §5.3, §5.5, §5.7).

* §5.5 "Forward the client's startup parameters (``application_name``, …, ``options`` minus
  ours)": a setting in ``options`` reaches the backend, our ``ferryman.presets`` does not, and
  ``options`` arrives as the server itself would have read it from the client.
* §5.3 the per-connection preset request as a start-up parameter (``ferryman_presets``,
  ``waypoint_presets``), lowering but never raising the grant (README: "Asking above the
  grant just caps at the grant; an unknown preset is 22023").
* :func:`ferryman.proxy.pgstartup.extract_presets` on its own.
* §5.7 ``58000``: a provisioning failure (an admin role without privileges on the tables it
  must grant) reaches the client as a generic message; the details are in the gateway's log.

Real throwaway PostgreSQL clusters, a real gateway, libpq (psycopg) and asyncpg clients.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferryman.errors import InvalidParameter
from ferryman.provision import names
from ferryman.proxy.pgstartup import extract_presets, split_options
from tests.pg.conftest import APPDB, listener_port, pg_files, pg_grant, prepare
from tests.support.gateway import running_gateway
from tests.support.pgcluster import PgCluster

NOTES = "sp_notes"
"""This module's own table in the shared cluster's ``appdb``: the INSERTs go there, so the
row counts other modules check on ``items`` stay as they are."""

GENERIC_58000 = "internal error in the gateway (see its log)"


def role(prefix: str, lowered: str | None = None) -> str:
    """The role the static test identity (dev@localhost, node localhost) gets in appdb."""
    return f"{prefix}dev_localhost__{APPDB}" + (f"_{lowered}" if lowered else "")


def libpq(port: int, **extra: str) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": port,
        "dbname": APPDB,
        "user": "ignored",
        "sslmode": "disable",
        "connect_timeout": 10,
        "autocommit": True,
        **extra,
    }


async def pq_values(port: int, sql: str, **extra: str) -> tuple[Any, ...]:
    """One row through the gateway with libpq (psycopg): ``options`` etc. as libpq sends them."""
    async with await psycopg.AsyncConnection.connect(**libpq(port, **extra)) as conn:
        row = await (await conn.execute(sql)).fetchone()
    assert row is not None
    return tuple(row)


async def apg(port: int, database: str = APPDB, **settings: str) -> asyncpg.Connection:
    """asyncpg puts every ``server_settings`` entry into the StartupMessage as it is."""
    return await asyncpg.connect(
        host="127.0.0.1",
        port=port,
        user="ignored",
        database=database,
        ssl=False,
        timeout=10,
        server_settings=settings or None,
    )


async def apg_sqlstate(port: int, **settings: str) -> asyncpg.PostgresError:
    with pytest.raises(asyncpg.PostgresError) as info:
        conn = await apg(port, **settings)
        await conn.close()
    return info.value


async def direct_values(cluster: PgCluster, sql: str, **settings: str) -> tuple[Any, ...]:
    """The same query straight to the cluster (as its superuser), same start-up parameters."""
    conn = await asyncpg.connect(
        host=cluster.host,
        port=cluster.port,
        user=cluster.superuser,
        database=APPDB,
        ssl=False,
        timeout=10,
        server_settings=settings or None,
    )
    try:
        return tuple(await conn.fetchrow(sql))
    finally:
        await conn.close()


@pytest.fixture
def notes(cluster: PgCluster) -> str:
    cluster.execute(f"CREATE TABLE IF NOT EXISTS {NOTES} (id serial PRIMARY KEY, note text)", dbname=APPDB)
    return NOTES


# --- 1. start-up parameters forwarded, ours removed (SPEC §5.5) ------------------------------


@pytest.mark.pg
async def test_options_setting_alone_reaches_the_backend(tmp_path: Path, cluster: PgCluster) -> None:
    files = pg_files(tmp_path, cluster, prefix="spa_")
    files.grants.append(pg_grant({APPDB: {"permissions": ["readwrite"]}}))
    async with running_gateway(files):
        got = await pq_values(
            listener_port(files),
            "select current_setting('statement_timeout'), current_user",
            options="-c statement_timeout=1234",
        )
    assert got == ("1234ms", role("spa_"))  # and nothing lowered: no preset was asked for


LEAK_PROBE = (
    "select current_setting('statement_timeout'), current_setting('ferryman.presets', true), "
    "current_setting('waypoint.presets', true), current_user"
)


@pytest.mark.pg
@pytest.mark.parametrize(
    "options",
    [
        "-c statement_timeout=1234 -c ferryman.presets=readonly",
        "-c ferryman.presets=readonly -c statement_timeout=1234",
        "-cferryman.presets=readonly -cstatement_timeout=1234",
        "--ferryman.presets=readonly --statement_timeout=1234",
        "-c waypoint.presets=readonly -c statement_timeout=1234",
        "-c statement_timeout=1234 -c Ferryman.Presets=ReadOnly",
        # getopt groups: -e (European dates) and our setting in one word, and apart.
        "-ecferryman.presets=readonly --statement_timeout=1234",
        "-ec ferryman.presets=readonly -c statement_timeout=1234",
    ],
)
async def test_options_mixing_a_setting_with_ours(
    tmp_path: Path, cluster: PgCluster, notes: str, options: str
) -> None:
    # The probe can see a leak: straight to PostgreSQL, our setting is an ordinary placeholder.
    direct = await direct_values(cluster, LEAK_PROBE, options=options)
    assert direct[0] == "1234ms"
    assert "readonly" in {str(direct[1]).lower(), str(direct[2]).lower()}

    files = pg_files(tmp_path, cluster, prefix="spb_")
    files.grants.append(pg_grant({APPDB: {"permissions": ["readwrite"]}}))
    async with running_gateway(files):
        port = listener_port(files)
        assert await pq_values(port, LEAK_PROBE, options=options) == (
            "1234ms",  # the client's own setting reached the backend
            None,  # ours did not ...
            None,
            role("spb_", "readonly"),  # ... but was acted on
        )
        async with await psycopg.AsyncConnection.connect(**libpq(port, options=options)) as conn:
            await conn.execute(f"select count(*) from {notes}")
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                await conn.execute(f"insert into {notes}(note) values ('lowered')")
        assert info.value.sqlstate == "42501"


@pytest.mark.pg
async def test_plain_startup_parameters_reach_the_backend(tmp_path: Path, cluster: PgCluster) -> None:
    files = pg_files(tmp_path, cluster, prefix="spc_")
    files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}))
    async with running_gateway(files):
        port = listener_port(files)
        async with await psycopg.AsyncConnection.connect(
            **libpq(port, application_name="sp startup probe")
        ) as conn:
            cur = await conn.execute("select current_setting('application_name'), pg_backend_pid()")
            shown, pid = await cur.fetchone() or (None, None)
            # What the server itself recorded for that backend (not what it echoed to us).
            with psycopg.connect(cluster.dsn()) as admin:
                seen = admin.execute(
                    "select application_name, usename from pg_stat_activity where pid = %s", (pid,)
                ).fetchone()
        assert shown == "sp startup probe"
        assert seen == ("sp startup probe", role("spc_"))
        # Any GUC a client sets as a start-up parameter of its own (asyncpg's server_settings).
        conn = await apg(port, work_mem="1234kB", DateStyle="SQL, DMY")
        try:
            assert await conn.fetchval("select current_setting('work_mem')") == "1234kB"
            assert await conn.fetchval("select current_setting('DateStyle')") == "SQL, DMY"
        finally:
            await conn.close()


# Each is forwarded as the server would have read it from the client; several broke through
# the gateway before pgstartup split ``options`` with C isspace() (the server's) rather than
# str.isspace() and re-escaped every separator: a tab escaped into a value, U+00A0 and U+001F
# (not separators for PostgreSQL) came out as word breaks ("invalid command-line argument").
LABEL_OPTIONS = [
    "-c sp.label=hello\\ world",
    "-c sp.label=back\\\\slash",
    "-c sp.label=tab\\\tinside",
    "-c sp.label=nbsp\u00a0inside",
    "-c sp.label=unit\x1fseparator",
    "-c sp.label=em\u2003space",
    "-csp.label=a\\ b\\ \\ c",
    "--sp.label=long\\ form",
    "-c\tsp.label=tab-separated\n",
    "-c sp.label=trailing-backslash\\",
    "-c sp.label=before-the-end --",
]


@pytest.mark.pg
async def test_options_reach_the_backend_as_the_server_reads_them(tmp_path: Path, cluster: PgCluster) -> None:
    probe = "select current_setting('sp.label', true), current_setting('ferryman.presets', true)"
    files = pg_files(tmp_path, cluster, prefix="spd_")
    files.grants.append(pg_grant({APPDB: {"permissions": ["readwrite"]}}))
    async with running_gateway(files):
        port = listener_port(files)
        for options in LABEL_OPTIONS:
            expected_label = (await direct_values(cluster, probe, options=options))[0]
            assert expected_label is not None, options
            for with_ours in (options, f"-c ferryman.presets=readonly {options}"):
                conn = await apg(port, options=with_ours)
                try:
                    got = tuple(await conn.fetchrow(probe))
                finally:
                    await conn.close()
                assert got == (expected_label, None), repr(with_ours)


# --- 2. the preset request as a start-up parameter (SPEC §5.3) --------------------------------


@pytest.mark.pg
@pytest.mark.parametrize("parameter", ["ferryman_presets", "waypoint_presets"])
async def test_preset_startup_parameter_lowers_the_connection(
    tmp_path: Path, cluster: PgCluster, notes: str, parameter: str
) -> None:
    files = pg_files(tmp_path, cluster, prefix="spe_")
    files.grants.append(pg_grant({APPDB: {"permissions": ["readwrite"]}}))
    async with running_gateway(files):
        port = listener_port(files)
        full = await apg(port)  # without the request: the grant, readwrite
        try:
            assert await full.fetchval("select current_user") == role("spe_")
            await full.execute(f"insert into {notes}(note) values ('full')")
        finally:
            await full.close()
        # PostgreSQL refuses an unknown start-up parameter without a dot (FATAL 42704), so
        # this login also shows that the parameter was not passed on.
        lowered = await apg(port, **{parameter: "readonly"})
        try:
            assert await lowered.fetchval("select current_user") == role("spe_", "readonly")
            assert await lowered.fetchval(f"select count(*) from {notes}") >= 1
            with pytest.raises(asyncpg.InsufficientPrivilegeError) as info:
                await lowered.execute(f"insert into {notes}(note) values ('lowered')")
            assert info.value.sqlstate == "42501"
        finally:
            await lowered.close()


@pytest.mark.pg
@pytest.mark.parametrize(
    "request_",
    [
        {"ferryman_presets": "admin"},
        {"waypoint_presets": "admin"},
        {"ferryman_presets": "readwrite, admin"},
        {"options": "-c ferryman.presets=admin"},
    ],
    ids=["ferryman_presets", "waypoint_presets", "list", "options"],
)
async def test_asking_above_the_grant_caps_at_the_grant(
    tmp_path: Path, cluster: PgCluster, notes: str, request_: dict[str, str]
) -> None:
    files = pg_files(tmp_path, cluster, prefix="spf_")
    files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}))
    async with running_gateway(files):
        conn = await apg(listener_port(files), **request_)
        try:
            # The grant's own role (not a "lowered" one), with the grant's privileges only.
            assert await conn.fetchval("select current_user") == role("spf_")
            assert await conn.fetchval(f"select count(*) from {notes}") is not None
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(f"insert into {notes}(note) values ('raised?')")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute("create table spf_raised (x int)")
        finally:
            await conn.close()


@pytest.mark.pg
async def test_a_list_is_capped_by_its_strongest_entry(
    tmp_path: Path, cluster: PgCluster, notes: str
) -> None:
    files = pg_files(tmp_path, cluster, prefix="spg_")
    files.grants.append(pg_grant({APPDB: {"permissions": ["admin"]}}))
    async with running_gateway(files):
        conn = await apg(listener_port(files), ferryman_presets="readonly, ReadWrite")
        try:
            assert await conn.fetchval("select current_user") == role("spg_", "readwrite")
            await conn.execute(f"insert into {notes}(note) values ('readwrite')")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute("create table spg_admin_only (x int)")
        finally:
            await conn.close()


@pytest.mark.pg
@pytest.mark.parametrize(
    "request_",
    [
        {"waypoint_presets": "superuser"},
        {"ferryman_presets": "readonly,bogus"},
        {"options": "--ferryman.presets=root"},
        {"ferryman_presets": "readonly", "options": "-c waypoint.presets=owner"},
    ],
)
async def test_unknown_preset_is_22023(tmp_path: Path, cluster: PgCluster, request_: dict[str, str]) -> None:
    files = pg_files(tmp_path, cluster, prefix="sph_")
    files.grants.append(pg_grant({APPDB: {"permissions": ["admin"]}}))
    async with running_gateway(files):
        error = await apg_sqlstate(listener_port(files), **request_)
    assert error.sqlstate == "22023"
    assert "unknown preset" in str(error)


# --- 3. extract_presets and split_options -----------------------------------------------------


def _escape(word: str) -> str:
    """How a client quotes one word of ``options`` (libpq passes the string on untouched)."""
    return "".join("\\" + ch if ch in " \t\n\v\f\r\\" else ch for ch in word)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ("-c a.b=x", ["-c", "a.b=x"]),
        ("  -c   a.b=x  ", ["-c", "a.b=x"]),
        ("-c\ta.b=x\n-c\ra.c=y\x0b\x0c", ["-c", "a.b=x", "-c", "a.c=y"]),
        ("-c a.b=hello\\ world", ["-c", "a.b=hello world"]),
        ("-c\\ a.b=x", ["-c a.b=x"]),
        ("-c a.b=back\\\\slash", ["-c", "a.b=back\\slash"]),
        ("-c a.b=\\x\\y", ["-c", "a.b=xy"]),  # a backslash escapes any character
        ("-c a.b=end\\", ["-c", "a.b=end"]),  # a trailing backslash escapes nothing
        ("-c a.b=tab\\\tin", ["-c", "a.b=tab\tin"]),
        # Not separators for the server (C isspace() on bytes), though str.isspace() says so:
        ("-c a.b=x\u00a0y", ["-c", "a.b=x\u00a0y"]),
        ("-c a.b=x\x1fy\x1cz", ["-c", "a.b=x\x1fy\x1cz"]),
        ("-c a.b=x\u2003y\u3000z", ["-c", "a.b=x\u2003y\u3000z"]),
        ("", []),
        ("   ", []),
    ],
)
def test_split_options_like_pg_split_opts(options: str, words: list[str]) -> None:
    assert split_options(options) == words


@pytest.mark.parametrize(
    ("parameters", "requested", "forwarded_options"),
    [
        ({"options": "-c ferryman.presets=readonly"}, "readonly", None),
        ({"options": "-cferryman.presets=readonly"}, "readonly", None),
        ({"options": "--ferryman.presets=readonly"}, "readonly", None),
        ({"options": "-c waypoint.presets=readonly"}, "readonly", None),
        ({"options": "--waypoint.presets=readonly"}, "readonly", None),
        ({"options": "-c FERRYMAN.Presets=ReadOnly"}, "ReadOnly", None),
        ({"options": "-c ferryman.presets=readonly,\\ readwrite"}, "readonly, readwrite", None),
        # The same setting as one escaped word: our setting all the same, never passed on.
        ({"options": "-c\\ ferryman.presets=readonly"}, "readonly", None),
        (
            {"options": "-c statement_timeout=5 -c ferryman.presets=readonly -c a.b=x"},
            "readonly",
            "-c statement_timeout=5 -c a.b=x",
        ),
        # Re-escaped after our part is cut out: spaces, tabs, backslashes survive.
        (
            {"options": "-c a.b=hello\\ world -c ferryman.presets=readonly -c a.c=t\\\tb\\\\"},
            "readonly",
            "-c a.b=hello\\ world -c a.c=t\\\tb\\\\",
        ),
        # The long and attached forms of other settings are kept as the client wrote them.
        (
            {"options": "--statement_timeout=5 -cwork_mem=64kB --ferryman.presets=admin"},
            "admin",
            "--statement_timeout=5 -cwork_mem=64kB",
        ),
        # Switches grouped in one word, as getopt reads them: ours is found inside the group,
        # and the group's other switches go on one by one.
        ({"options": "-ecferryman.presets=readonly"}, "readonly", "-e"),
        ({"options": "-ec ferryman.presets=readonly -c a.b=x"}, "readonly", "-e -c a.b=x"),
        ({"options": "-e-ferryman.presets=readonly"}, "readonly", "-e"),
        ({"options": "-Fc ferryman.presets=admin -B 64"}, "admin", "-F -B 64"),
        # A switch's argument is the next word even when it looks like a switch: not ours.
        ({"options": "-B -cferryman.presets=admin"}, None, "-B -cferryman.presets=admin"),
        ({"options": "-eB16 -c ferryman.presets=admin"}, "admin", "-eB16"),
        # Nothing of ours: passed on byte for byte, odd spacing included.
        ({"options": "  -c a.b=x\\ y\t--c.d=z "}, None, "  -c a.b=x\\ y\t--c.d=z "),
        ({"options": "-c a.b=x\u00a0y -c a.c=\x1f"}, None, "-c a.b=x\u00a0y -c a.c=\x1f"),
        # "--" ends getopt's options: what follows is not a setting (the server refuses it).
        ({"options": "--"}, None, "--"),
        (
            {"options": "-c ferryman.presets=readonly -- -c a.b=x"},
            "readonly",
            "-- -c a.b=x",
        ),
        # Both ways at once, and both start-up parameters: every value is part of the request.
        (
            {"ferryman_presets": "readonly", "options": "-c ferryman.presets=readwrite"},
            "readonly,readwrite",
            None,
        ),
        ({"ferryman_presets": "readonly", "waypoint_presets": "admin"}, "readonly,admin", None),
        # Empty values: no request (an empty parameter is still not passed on).
        ({"ferryman_presets": ""}, None, None),
        ({"waypoint_presets": "", "options": "-c a.b=x"}, None, "-c a.b=x"),
        ({"options": ""}, None, ""),
        ({"options": "-c ferryman.presets="}, "", None),
    ],
)
def test_extract_presets(
    parameters: dict[str, str], requested: str | None, forwarded_options: str | None
) -> None:
    base = {"user": "alice", "database": APPDB, "application_name": "app", "client_encoding": "UTF8"}
    got_requested, forward = extract_presets({**base, **parameters})
    assert got_requested == requested
    assert forward.get("options") == forwarded_options
    rest = {k: v for k, v in forward.items() if k != "options"}
    assert rest == {"application_name": "app", "client_encoding": "UTF8"}  # user/database/ours gone


@given(
    values=st.lists(
        st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), max_size=12),
        min_size=1,
        max_size=5,
    ),
    ours_at=st.integers(min_value=0, max_value=5),
)
def test_extract_presets_round_trip(values: list[str], ours_at: int) -> None:
    """Whatever the values, the settings left over are the client's, word for word."""
    settings = [f"x.k{i}={value}" for i, value in enumerate(values)]
    words = [w for s in settings for w in ("-c", s)]
    untouched = " ".join(_escape(w) for w in words)
    assert extract_presets({"options": untouched}) == (None, {"options": untouched})
    at = 2 * min(ours_at, len(values))
    words[at:at] = ["-c", "ferryman.presets=readonly"]
    requested, forward = extract_presets({"options": " ".join(_escape(w) for w in words)})
    assert requested == "readonly"
    assert split_options(forward["options"]) == [w for s in settings for w in ("-c", s)]


@pytest.mark.parametrize(
    ("granted", "requested", "effective"),
    [
        ({"admin"}, "", ("admin", False)),  # empty: no request
        ({"admin"}, " , ", ("admin", False)),
        ({"admin"}, "readonly", ("readonly", True)),
        ({"admin"}, "READONLY, readwrite", ("readwrite", True)),
        ({"readonly"}, "admin", ("readonly", False)),  # never raised
        ({"readwrite"}, "readwrite", ("readwrite", False)),
    ],
)
def test_effective_preset_of_an_extracted_request(
    granted: set[str], requested: str, effective: tuple[str, bool]
) -> None:
    assert names.effective_preset(granted, requested) == effective


@pytest.mark.parametrize("value", ["superuser", "readonly,root", "read only", "readonly;drop"])
def test_invalid_preset_is_22023(value: str) -> None:
    requested, _ = extract_presets({"options": f"-c ferryman.presets={_escape(value)}"})
    assert requested == value
    with pytest.raises(InvalidParameter) as info:
        names.effective_preset({"admin"}, requested)
    assert info.value.sqlstate == "22023"


# --- 4. 58000: an internal failure, details in the log only (SPEC §5.7) ------------------------


@pytest.mark.pg
async def test_provisioning_failure_is_58000_with_details_in_the_log(
    tmp_path: Path,
    pg_cluster_factory: Callable[..., PgCluster],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An admin role that may create roles but holds no privilege on appdb's tables: granting
    SELECT on them fails in the backend ("permission denied for table items"), an internal
    error of the gateway's set-up, not the client's fault."""
    cluster = prepare(pg_cluster_factory("startup-58000"))
    admin, password = "sp58_admin", "sp58-pass"
    cluster.execute(
        f"CREATE ROLE {admin} LOGIN CREATEROLE PASSWORD '{password}'",
        f"GRANT CREATE ON DATABASE postgres TO {admin}",  # for the registry schema
    )
    files = pg_files(
        tmp_path, cluster, prefix="sp58_", postgres={"admin_user": admin, "admin_password": password}
    )
    files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}))
    async with running_gateway(files):
        port = listener_port(files)
        error = await apg_sqlstate(port)
        assert error.sqlstate == "58000"
        assert str(error) == GENERIC_58000
        assert "items" not in str(error) and admin not in str(error)
        assert "permission denied for table items" in caplog.text  # the detail is logged
        # The cause really is that privilege: with it, the same connection goes through.
        cluster.execute(
            f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {admin} WITH GRANT OPTION",
            f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {admin} WITH GRANT OPTION",
            dbname=APPDB,
        )
        conn = await apg(port)
        try:
            assert await conn.fetchval("select count(*) from items") == 2
        finally:
            await conn.close()
    refusals = [r for r in files.audit() if r["event"] == "decision" and not r["allowed"]]
    assert len(refusals) == 1  # the audit, for the operator, has the cause as well
    assert refusals[0]["outcome"] == "provisioning"
    assert "permission denied for table items" in refusals[0]["reason"]
