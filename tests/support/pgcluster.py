"""Throwaway PostgreSQL clusters for tests that need a clean slate.

Owns: finding the PostgreSQL server binaries, ``initdb`` in a temporary directory (as the
``postgres`` OS user when the tests run as root -- initdb refuses root), a ``pg_hba.conf`` that
gives each kind of backend authentication its own test user, starting the server with
``pg_ctl -w`` on a free loopback port, and stopping + deleting it at the end of the session.

Must not: touch the shared server on 5432 or anything outside its temporary directory, read
standard input (CI runs without one), or leave a server running after the session.

Use it from a test package by importing the fixtures into that package's ``conftest.py``::

    from tests.support.pgcluster import pg_cluster, pg_cluster_factory  # noqa: F401

    def test_something(pg_cluster: PgCluster) -> None:
        with psycopg.connect(pg_cluster.dsn()) as conn: ...            # the superuser
        with psycopg.connect(pg_cluster.dsn("auth_md5")) as conn: ...  # md5 login

``pg_cluster`` is one cluster shared by the whole test session. ``pg_cluster_factory(name)``
starts (once per session, per name) a separate cluster for tests that must not see each
other's roles. Authentication layout (``pg_hba.conf``, first match wins):

====================  ===============  ==================  =========================================
user                  method           password            notes
====================  ===============  ==================  =========================================
``postgres``          trust            --                  superuser; local socket and 127.0.0.1
``auth_scram``        scram-sha-256    ``scram-pass``      SCRAM verifier stored
``auth_md5``          md5              ``md5-pass``        an MD5 hash is stored, so md5 is real md5
``auth_password``     password         ``clear-pass``      cleartext password over the wire
``auth_trust``        trust            --                  no password asked
anyone else           ``default_auth`` (scram-sha-256)     provisioned roles log in here
====================  ===============  ==================  =========================================

``PgCluster.users`` holds that table. Environment: ``FERRYMAN_PG_BINDIR`` picks the binaries
(default: ``pg_config --bindir``, else the newest ``/usr/lib/postgresql/*/bin``); without them
the dependent tests are skipped, unless ``FERRYMAN_REQUIRE_PG=1`` makes that a failure (for CI).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

SUPERUSER = "postgres"
_WATCHDOGS: list[subprocess.Popen[bytes]] = []


@dataclass(frozen=True)
class TestUser:
    """One pre-made login and the ``pg_hba`` method that authenticates it."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    name: str
    method: str
    password: str | None


TEST_USERS: tuple[TestUser, ...] = (
    TestUser("auth_scram", "scram-sha-256", "scram-pass"),
    TestUser("auth_md5", "md5", "md5-pass"),
    TestUser("auth_password", "password", "clear-pass"),
    TestUser("auth_trust", "trust", None),
)


@dataclass
class PgCluster:
    """A running throwaway cluster; see the module docstring for who logs in how."""

    name: str
    root: Path
    bindir: Path
    port: int
    host: str = "127.0.0.1"
    superuser: str = SUPERUSER
    users: dict[str, TestUser] = field(default_factory=dict)

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    @property
    def logfile(self) -> Path:
        return self.root / "server.log"

    def dsn(self, user: str | None = None, dbname: str = "postgres", password: str | None = None) -> str:
        """A libpq connection string over TCP to 127.0.0.1 (so pg_hba ``host`` lines apply).

        ``password`` defaults to the test user's own, when it has one.
        """
        user = user or self.superuser
        if password is None and user in self.users:
            password = self.users[user].password
        params: dict[str, str | int] = {"host": self.host, "port": self.port, "user": user, "dbname": dbname}
        if password is not None:
            params["password"] = password
        return make_conninfo("", **params)

    def socket_dsn(self, user: str | None = None, dbname: str = "postgres") -> str:
        """A connection string over the cluster's own unix socket directory."""
        return make_conninfo(
            "", host=str(self.socket_dir), port=self.port, user=user or self.superuser, dbname=dbname
        )

    def execute(self, *statements: str | sql.Composed, dbname: str = "postgres") -> None:
        """Run statements as the superuser, in autocommit (so CREATE DATABASE works)."""
        with psycopg.connect(self.dsn(dbname=dbname), autocommit=True) as conn:
            for statement in statements:
                conn.execute(sql.SQL(statement) if isinstance(statement, str) else statement)

    def create_database(self, name: str) -> None:
        self.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def find_bindir() -> Path | None:
    """Where ``initdb``/``pg_ctl`` live, or ``None`` when PostgreSQL is not installed."""
    env = os.environ.get("FERRYMAN_PG_BINDIR")
    candidates: list[Path] = [Path(env)] if env else []
    pg_config = shutil.which("pg_config")
    if pg_config and not env:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run(
                [pg_config, "--bindir"], check=True, capture_output=True, text=True, stdin=subprocess.DEVNULL
            )
            candidates.append(Path(out.stdout.strip()))
    if not env:
        versions = sorted(
            Path("/usr/lib/postgresql").glob("*/bin"),
            key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
            reverse=True,
        )
        candidates.extend(versions)
    for candidate in candidates:
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres(argv: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root; runuser needs no tty or password (CI-safe).
    if os.geteuid() != 0:
        return argv
    return ["runuser", "-u", SUPERUSER, "--", *argv]


def _run(argv: list[str], *, cwd: Path, what: str, log: Path | None = None) -> None:
    proc = subprocess.run(
        _as_postgres(argv), cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120
    )
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else ""
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n{tail}")


def _hba(default_auth: str) -> str:
    lines = [
        "# TYPE  DATABASE  USER  ADDRESS  METHOD -- written by tests/support/pgcluster.py",
        f"local   all  {SUPERUSER}  trust",
        f"host    all  {SUPERUSER}  127.0.0.1/32  trust",
    ]
    lines += [f"host    all  {u.name}  127.0.0.1/32  {u.method}" for u in TEST_USERS]
    lines.append(f"host    all  all  127.0.0.1/32  {default_auth}")
    return "\n".join(lines) + "\n"


def _settings(port: int, socket_dir: Path) -> str:
    # Speed over durability: the cluster lives for one test session.
    return "\n".join(
        [
            "",
            "# --- ferryman test cluster ---",
            "listen_addresses = '127.0.0.1'",
            f"port = {port}",
            f"unix_socket_directories = '{socket_dir}'",
            "fsync = off",
            "synchronous_commit = off",
            "full_page_writes = off",
            "shared_buffers = 16MB",
            "max_connections = 200",
            "max_wal_senders = 0",
            "wal_level = minimal",
            "password_encryption = 'scram-sha-256'",
            "log_min_messages = warning",
            "",
        ]
    )


def start_cluster(
    name: str,
    *,
    default_auth: str = "scram-sha-256",
    bindir: Path | None = None,
    ssl_pair: tuple[bytes, bytes] | None = None,
) -> PgCluster:
    """initdb + start a cluster; the caller owns it and must call :func:`stop_cluster`.

    ``ssl_pair`` = (certificate PEM, key PEM) turns on TLS (``ssl = on``); clients may then
    use it or not, pg_hba's ``host`` lines accept both.
    """
    bindir = bindir or find_bindir()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found")
    root = Path(tempfile.mkdtemp(prefix=f"ferryman-pg-{name}-"))
    try:
        if os.geteuid() == 0:
            entry = pwd.getpwnam(SUPERUSER)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        root.chmod(0o700)
        cluster = PgCluster(name=name, root=root, bindir=bindir, port=0)
        _run(
            [
                str(bindir / "initdb"),
                "-D", str(cluster.datadir),
                "-U", SUPERUSER,
                "-A", "trust",
                "-E", "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            cwd=root,
            what="initdb",
        )  # fmt: skip
        (cluster.datadir / "pg_hba.conf").write_text(_hba(default_auth))
        if ssl_pair is not None:
            for filename, pem in (("server.crt", ssl_pair[0]), ("server.key", ssl_pair[1])):
                path = cluster.datadir / filename
                path.write_bytes(pem)
                path.chmod(0o600)
                if os.geteuid() == 0:
                    entry = pwd.getpwnam(SUPERUSER)
                    os.chown(path, entry.pw_uid, entry.pw_gid)
            with (cluster.datadir / "postgresql.conf").open("a") as conf:
                conf.write("\nssl = on\n")
        _run(["mkdir", "-p", str(cluster.socket_dir)], cwd=root, what="mkdir socket dir")
        # A free port can be taken between the probe and the bind: try a few.
        for attempt in range(3):
            cluster.port = free_port()
            with (cluster.datadir / "postgresql.conf").open("a") as conf:
                conf.write(_settings(cluster.port, cluster.socket_dir))
            try:
                _run(
                    [str(bindir / "pg_ctl"), "-D", str(cluster.datadir), "-l", str(cluster.logfile),
                     "-w", "-t", "60", "start"],
                    cwd=root,
                    what="pg_ctl start",
                    log=cluster.logfile,
                )  # fmt: skip
                break
            except RuntimeError:
                if attempt == 2:
                    raise
        _create_test_users(cluster)
        _watchdog(cluster)
        return cluster
    except BaseException:
        _stop(root, bindir)
        shutil.rmtree(root, ignore_errors=True)
        raise


def _create_test_users(cluster: PgCluster) -> None:
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        for user in TEST_USERS:
            # md5 must really store an MD5 hash, or the server silently upgrades md5 to SCRAM.
            encryption = "md5" if user.method == "md5" else "scram-sha-256"
            conn.execute(sql.SQL("SET password_encryption = {}").format(sql.Literal(encryption)))
            statement = sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(user.name))
            if user.password is not None:
                statement = sql.SQL("{} PASSWORD {}").format(statement, sql.Literal(user.password))
            conn.execute(statement)
            cluster.users[user.name] = user


def _watchdog(cluster: PgCluster) -> None:
    """Stop and delete the cluster once this process is gone, however it ended.

    A SIGTERM/SIGKILL (a CI timeout, ``timeout 600 pytest``) skips fixture teardown, and a
    postmaster started by ``pg_ctl`` outlives us. The watchdog is a detached shell that polls
    our pid; after a normal teardown it finds nothing left to do.
    """
    stop = " ".join(
        shlex.quote(a)
        for a in _as_postgres(
            [str(cluster.bindir / "pg_ctl"), "-D", str(cluster.datadir), "-m", "immediate", "stop"]
        )
    )
    script = (
        f"while kill -0 {os.getpid()} 2>/dev/null; do sleep 1; done; "
        f"[ -f {shlex.quote(str(cluster.datadir / 'postmaster.pid'))} ] && {stop}; "
        f"rm -rf {shlex.quote(str(cluster.root))}"
    )
    # Referenced for the whole session: a collected Popen of a running child warns (ResourceWarning).
    _WATCHDOGS.append(
        subprocess.Popen(
            ["sh", "-c", script],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    )


def _stop(root: Path, bindir: Path) -> None:
    datadir = root / "data"
    if (datadir / "postmaster.pid").exists():
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            _run(
                [str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "immediate", "-w", "stop"],
                cwd=root,
                what="stop",
            )


def stop_cluster(cluster: PgCluster) -> None:
    """Stop the server (immediate mode: nothing to keep) and delete its directory."""
    _stop(cluster.root, cluster.bindir)
    shutil.rmtree(cluster.root, ignore_errors=True)


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("FERRYMAN_REQUIRE_PG") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_cluster_factory() -> Iterator[Callable[..., PgCluster]]:
    """``factory(name, default_auth="scram-sha-256", ssl_pair=None) -> PgCluster``: one cluster
    per name per session."""
    clusters: dict[str, PgCluster] = {}

    def factory(
        name: str = "default",
        *,
        default_auth: str = "scram-sha-256",
        ssl_pair: tuple[bytes, bytes] | None = None,
    ) -> PgCluster:
        if name not in clusters:
            if find_bindir() is None:
                _skip_or_fail("PostgreSQL server binaries not installed (set FERRYMAN_PG_BINDIR)")
            clusters[name] = start_cluster(name, default_auth=default_auth, ssl_pair=ssl_pair)
        return clusters[name]

    try:
        yield factory
    finally:
        for cluster in clusters.values():
            stop_cluster(cluster)


@pytest.fixture(scope="session")
def pg_cluster(pg_cluster_factory: Callable[..., PgCluster]) -> PgCluster:
    """The session's shared throwaway cluster."""
    return pg_cluster_factory("default")
