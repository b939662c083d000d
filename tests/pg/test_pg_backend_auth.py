"""The gateway logs in to backends that ask for SCRAM-SHA-256, MD5, cleartext or nothing
(SPEC §5 step 5), each against a throwaway cluster whose pg_hba uses that method for the
provisioned roles; and a backend that refuses the login gives the client 28P01."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import asyncpg
import psycopg
import pytest

from tests.pg.conftest import APPDB, listener_port, pg_files, pg_grant, prepare
from tests.support.gateway import running_gateway
from tests.support.pgcluster import PgCluster

pytestmark = pytest.mark.pg


@pytest.mark.parametrize(
    ("method", "encryption"),
    [
        ("scram-sha-256", "scram-sha-256"),
        ("md5", "md5"),
        ("password", "scram-sha-256"),
        ("trust", "scram-sha-256"),
    ],
)
async def test_backend_auth_methods(
    tmp_path: Path, pg_cluster_factory: Callable[..., PgCluster], method: str, encryption: str
) -> None:
    cluster = prepare(pg_cluster_factory(f"auth-{method}", default_auth=method))
    files = pg_files(tmp_path, cluster, prefix="au_", postgres={"password_encryption": encryption})
    files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}))
    async with running_gateway(files):
        conn = await asyncpg.connect(
            host="127.0.0.1", port=listener_port(files), user="x", database=APPDB, ssl=False
        )
        assert await conn.fetchval("select count(*) from items") == 2
        await conn.close()
    with psycopg.connect(cluster.dsn()) as admin:
        (found,) = admin.execute(
            "select count(*) from pg_hba_file_rules where auth_method = %s", (method,)
        ).fetchone() or (0,)
    assert found >= 1  # the cluster really asks for this method


async def test_backend_refusing_login_is_28p01(
    tmp_path: Path, pg_cluster_factory: Callable[..., PgCluster]
) -> None:
    cluster = prepare(pg_cluster_factory("auth-reject", default_auth="reject"))
    files = pg_files(tmp_path, cluster, prefix="rj_")
    files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}))
    async with running_gateway(files):
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncpg.connect(
                host="127.0.0.1", port=listener_port(files), user="x", database=APPDB, ssl=False
            )
    assert info.value.sqlstate == "28P01"
    assert "could not log in" in str(info.value)


@pytest.fixture(scope="module")
def tls_cluster(pg_cluster_factory: Callable[..., PgCluster], tmp_path_factory: pytest.TempPathFactory):
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("db.pg.test", "127.0.0.1")
    cluster = prepare(
        pg_cluster_factory(
            "backend-tls", ssl_pair=(cert.cert_chain_pems[0].bytes(), cert.private_key_pem.bytes())
        )
    )
    ca_file = tmp_path_factory.mktemp("backend-ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return cluster, str(ca_file)


async def _tls_in_use(port: int) -> bool:
    conn = await asyncpg.connect(host="127.0.0.1", port=port, user="x", database=APPDB, ssl=False)
    try:
        return bool(await conn.fetchval("select ssl from pg_stat_ssl where pid = pg_backend_pid()"))
    finally:
        await conn.close()


@pytest.mark.parametrize("mode", ["off", "require", "verify-full"])
async def test_backend_tls_modes(tmp_path: Path, tls_cluster, mode: str) -> None:
    cluster, ca_file = tls_cluster
    extra = {"backend_tls": mode}
    if mode == "verify-full":
        extra["backend_ca_file"] = ca_file
    files = pg_files(tmp_path, cluster, prefix="bt_", **extra)
    files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}))
    async with running_gateway(files):
        assert await _tls_in_use(listener_port(files)) is (mode != "off")


async def test_backend_tls_verify_full_refuses_wrong_ca(tmp_path: Path, tls_cluster) -> None:
    import trustme

    cluster, _ = tls_cluster
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    files = pg_files(tmp_path, cluster, prefix="bt_", backend_tls="verify-full", backend_ca_file=str(other))
    files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}))
    async with running_gateway(files):
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncpg.connect(
                host="127.0.0.1", port=listener_port(files), user="x", database=APPDB, ssl=False
            )
    assert info.value.sqlstate == "08006"
