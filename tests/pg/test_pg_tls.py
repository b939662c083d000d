"""TLS on PostgreSQL listeners: tls_mode, certificates chosen by SNI (psql verify-full), direct
TLS without SSLRequest, client certificates as the mtls identity, and the tailnet certificate
from tailscaled renewed without a restart (SPEC §5 step 1, §6; Tailscale issue item 4)."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import ssl
from pathlib import Path

import asyncpg
import pytest
import trustme

from tests.pg.conftest import APPDB, listener_port, needs_psql, pg_files, pg_grant
from tests.support.gateway import running_gateway, wait_for
from tests.support.localapi_double import LocalAPIDouble
from tests.support.pgcluster import PgCluster

pytestmark = pytest.mark.pg

ENV = {**os.environ, "PGCONNECT_TIMEOUT": "10"}


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def pki(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("pki")
    out = {"ca": str(d / "ca.pem")}
    ca.cert_pem.write_to_path(out["ca"])
    for name, identities in {"a": ["a.pg.test"], "b": ["b.pg.test", "*.w.pg.test"]}.items():
        cert = ca.issue_cert(*identities)
        cert.cert_chain_pems[0].write_to_path(str(d / f"{name}.pem"))
        cert.private_key_pem.write_to_path(str(d / f"{name}.key"))
        out[name], out[f"{name}_key"] = str(d / f"{name}.pem"), str(d / f"{name}.key")
    client = ca.issue_cert("alice@example.com", organization_unit_name="dba")
    client.cert_chain_pems[0].write_to_path(str(d / "client.pem"))
    client.private_key_pem.write_to_path(str(d / "client.key"))
    os.chmod(d / "client.key", 0o600)
    out["client"], out["client_key"] = str(d / "client.pem"), str(d / "client.key")
    return out


async def psql(port: int, conninfo: str, sql: str = "select current_user") -> tuple[int, str, str]:
    needs_psql()
    proc = await asyncio.create_subprocess_exec(
        "psql",
        f"port={port} dbname={APPDB} user=x connect_timeout=10 {conninfo}",
        "-X",
        "-A",
        "-t",
        "-c",
        sql,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        env=ENV,
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_tls_require_refuses_plaintext(tmp_path: Path, cluster: PgCluster, pki: dict[str, str]) -> None:
    files = pg_files(
        tmp_path, cluster, prefix="t1_", tls_mode="require", cert_file=pki["a"], key_file=pki["a_key"]
    )
    files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}))
    async with running_gateway(files):
        port = listener_port(files)
        code, _, err = await psql(port, "host=127.0.0.1 sslmode=disable")
        assert code != 0 and "requires TLS" in err
        code, out, err = await psql(port, "host=127.0.0.1 sslmode=require")
        assert code == 0, err
        assert out.strip() == "t1_dev_localhost__appdb"


@pytest.mark.parametrize(
    ("host", "ok"),
    [("a.pg.test", True), ("b.pg.test", True), ("x.w.pg.test", True), ("unknown.pg.test", False)],
)
async def test_verify_full_with_sni_certificate_choice(
    tmp_path: Path, cluster: PgCluster, pki: dict[str, str], host: str, ok: bool
) -> None:
    files = pg_files(
        tmp_path,
        cluster,
        prefix="t2_",
        tls_mode="optional",
        certificates=[
            {"cert_file": pki["a"], "key_file": pki["a_key"]},
            {"cert_file": pki["b"], "key_file": pki["b_key"]},
        ],
    )
    files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}))
    async with running_gateway(files):
        code, _, err = await psql(
            listener_port(files),
            f"host={host} hostaddr=127.0.0.1 sslmode=verify-full sslrootcert={pki['ca']}",
        )
    if ok:
        assert code == 0, err
    else:
        # No certificate names it: the default (a.pg.test) is served and verify-full refuses it.
        assert code != 0 and "does not match host name" in err


async def test_direct_tls_without_ssl_request(
    tmp_path: Path, cluster: PgCluster, pki: dict[str, str]
) -> None:
    files = pg_files(
        tmp_path, cluster, prefix="t3_", tls_mode="require", cert_file=pki["a"], key_file=pki["a_key"]
    )
    files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}))
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.check_hostname = False  # the chain is verified; the name is a.pg.test, we dial an IP
    ctx.set_alpn_protocols(["postgresql"])
    async with running_gateway(files):
        conn = await asyncpg.connect(
            host="127.0.0.1",
            port=listener_port(files),
            user="x",
            database=APPDB,
            ssl=ctx,
            direct_tls=True,
            server_settings={"application_name": "direct"},
        )
        assert await conn.fetchval("select current_setting('application_name')") == "direct"
        await conn.close()


async def test_client_certificate_is_the_mtls_identity(
    tmp_path: Path, cluster: PgCluster, pki: dict[str, str]
) -> None:
    files = pg_files(
        tmp_path,
        cluster,
        prefix="t4_",
        tls_mode="require",
        cert_file=pki["a"],
        key_file=pki["a_key"],
        client_auth="want",
        identity=["mtls", "static"],
    )
    files.extra = f'[identity.mtls]\nca_file = "{pki["ca"]}"\n'
    files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}, src=["group:dba"]))
    async with running_gateway(files):
        port = listener_port(files)
        code, out, err = await psql(
            port, f"host=127.0.0.1 sslmode=require sslcert={pki['client']} sslkey={pki['client_key']}"
        )
        assert code == 0, err
        assert out.strip() == "t4_alice_example_com__appdb"
        # Without a certificate the static identity (dev@localhost, not in group:dba) has no grant.
        code, _, err = await psql(port, "host=127.0.0.1 sslmode=require")
        assert code != 0 and "no grant" in err
    decisions = [r for r in files.audit() if r["event"] == "decision"]
    assert decisions[0]["identity_source"] == "mtls"


async def test_tailnet_certificate_served_and_renewed(tmp_path: Path, cluster: PgCluster) -> None:
    ts_ca = trustme.CA()
    domain = "gw.tail1234.ts.net"
    now = datetime.datetime.now(datetime.UTC)
    old = ts_ca.issue_cert(
        domain, not_before=now - datetime.timedelta(days=89), not_after=now + datetime.timedelta(days=1)
    )  # due for renewal
    new = ts_ca.issue_cert(domain, not_after=now + datetime.timedelta(days=90))
    ca_file = tmp_path / "ts-ca.pem"
    ts_ca.cert_pem.write_to_path(str(ca_file))
    async with LocalAPIDouble.running() as double:
        double.cert_domains = [domain]
        double.set_cert(domain, old.cert_chain_pems[0].bytes(), old.private_key_pem.bytes())
        files = pg_files(
            tmp_path, cluster, prefix="t5_", tls_mode="require", use_tailscale_tls=True, identity=["static"]
        )
        files.extra = (
            f'[tailscale]\nsocket = {json.dumps(double.socket_path)}\ncert_check_interval = "200ms"\n'
        )
        files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}))
        async with running_gateway(files) as gw:
            port = listener_port(files)
            served = await served_not_after(port, domain, str(ca_file))
            assert served.date() == (now + datetime.timedelta(days=1)).date()
            code, _, err = await psql(
                port, f"host={domain} hostaddr=127.0.0.1 sslmode=verify-full sslrootcert={ca_file}"
            )
            assert code == 0, err
            double.set_cert(domain, new.cert_chain_pems[0].bytes(), new.private_key_pem.bytes())
            tls = gw.runtime.tls["pg"]
            assert tls.store is not None
            await wait_for(lambda: tls.store is not None and tls.store.version > 1, timeout=10)
            renewed = await served_not_after(port, domain, str(ca_file))
            assert renewed.date() == (now + datetime.timedelta(days=90)).date()
    assert double.count("cert") >= 2


async def served_not_after(port: int, server_name: str, ca_file: str) -> datetime.datetime:
    """Do an SSLRequest + TLS handshake by hand and return the served certificate's notAfter."""
    ctx = ssl.create_default_context(cafile=ca_file)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(bytes.fromhex("00000008 04d2162f"))
    assert await reader.readexactly(1) == b"S"
    await writer.start_tls(ctx, server_hostname=server_name)
    ssl_object = writer.get_extra_info("ssl_object")
    not_after = ssl.cert_time_to_seconds(ssl_object.getpeercert()["notAfter"])
    writer.close()
    return datetime.datetime.fromtimestamp(not_after, datetime.UTC)


async def test_postgres_listener_routes_by_sni(
    tmp_path: Path, cluster: PgCluster, pg_cluster_factory, ca: trustme.CA
) -> None:
    """Something an L4 proxy cannot do: route a PostgreSQL connection by the SNI the client
    sent after SSLRequest (Otoroshi's replicas example, with role provisioning per backend)."""
    from tests.pg.conftest import prepare

    replica = prepare(pg_cluster_factory("sni-replica"))
    cert = ca.issue_cert("*.pg.test")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "w.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "w.key"))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    files = pg_files(
        tmp_path,
        cluster,
        prefix="t6_",
        tls_mode="require",
        cert_file=str(tmp_path / "w.pem"),
        key_file=str(tmp_path / "w.key"),
        rules=[
            {
                "domain": "*read*",
                "targets": [{"host": "replica.pg.test", "ip": "127.0.0.1", "port": replica.port}],
            }
        ],
    )
    files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}))
    async with running_gateway(files):
        port = listener_port(files)
        base = f"hostaddr=127.0.0.1 sslmode=verify-full sslrootcert={ca_file}"
        code, out, err = await psql(port, f"host=db-read.pg.test {base}", "show port")
        assert (code, out.strip()) == (0, str(replica.port)), err
        code, out, err = await psql(port, f"host=primary.pg.test {base}", "show port")
        assert (code, out.strip()) == (0, str(cluster.port)), err
        await wait_for(lambda: len(files.closes()) == 2)
    # Each close record names the backend the connection was actually routed to.
    assert [c["backend"] for c in files.closes()] == [
        f"replica.pg.test@127.0.0.1:{replica.port}",
        f"127.0.0.1:{cluster.port}",
    ]
