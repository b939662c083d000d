"""TLS passthrough with SNI routing (SPEC §6), end to end: a real gateway, real TLS clients
(Python ssl, openssl s_client, redis-cli) and real TLS backends whose certificates the gateway
never has.

The proof that passthrough leaves the TLS bytes untouched: each client verifies the *backend's*
certificate against the backend's CA and host name, and completes a TLS 1.3 handshake whose
Finished messages cover a hash of every handshake byte, so any change on the way would fail
it; the backend also records the SNI and ALPN the client's own ClientHello carried.

Termination (``tls = "enabled"``) and verified backend TLS are in test_tls_routing_termination;
Host routing, target choice and the PROXY protocol in test_tls_routing_targets.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.proxy.routing_peers import (
    NamedTLSServer,
    add_routed_listener,
    client_context,
    run,
    subject_cn,
    tls_client,
    tls_client_in_pieces,
    tls_refused,
    write_pair,
)
from tests.support.gateway import GatewayFiles, grant, refused, running_gateway, wait_for
from tests.tls.certgen import Authority


@pytest.fixture
def files(tmp_path: Path) -> GatewayFiles:
    return GatewayFiles(tmp_path)


@dataclass
class PgPair:
    """Two TLS servers standing in for a PostgreSQL primary and its read replica."""

    ca: Authority
    primary: NamedTLSServer
    replica: NamedTLSServer


@pytest.fixture
async def pg_pair(tmp_path: Path) -> AsyncIterator[PgPair]:
    # The backends' own CA: the gateway's configuration never mentions it or its certificates.
    ca = Authority("db backends CA")
    primary = NamedTLSServer(
        "primary", ca.issue(cn="pg-primary", dns=("*.db.test",)), tmp_path, alpn=("postgresql",)
    )
    replica = NamedTLSServer(
        "replica", ca.issue(cn="pg-replica", dns=("*.db.test",)), tmp_path, alpn=("postgresql",)
    )
    async with primary, replica:
        yield PgPair(ca, primary, replica)


def replica_rule(pair: PgPair) -> dict[str, object]:
    return {
        "domain": "*read*",
        "targets": [{"host": "replica.db.internal", "ip": "127.0.0.1", "port": pair.replica.port}],
    }


def primary_target(pair: PgPair) -> dict[str, object]:
    return {"host": "primary.db.internal", "ip": "127.0.0.1", "port": pair.primary.port}


def otoroshi_service(pair: PgPair) -> dict[str, object]:
    """Otoroshi's example TCP service (the README's TOML): ``*read*`` names → the replica,
    everything else → the primary via ``sni.forwards_to``; targets named by host, dialled by ip."""
    return {
        "tls": "passthrough",
        "rules": [replica_rule(pair)],
        "sni": {"enabled": True, "forward_if_no_match": True, "forwards_to": primary_target(pair)},
    }


async def test_passthrough_routes_replicas_and_primary_by_sni(files: GatewayFiles, pg_pair: PgPair) -> None:
    port = add_routed_listener(files, "pg", **otoroshi_service(pg_pair))
    files.grants.append(grant({"pg": {}}))
    expected = {
        "read.db.test": "replica",
        "analytics-read-2.db.test": "replica",
        "READ.DB.TEST": "replica",  # matched case-insensitively
        "primary.db.test": "primary",
        "orders.db.test": "primary",
    }
    context = client_context(pg_pair.ca, alpn=("postgresql",))
    async with running_gateway(files):
        for sni, backend in expected.items():
            result = await tls_client(port, context, sni, payload=b"SELECT 1;\n")
            assert result.error is None, (sni, result.error)
            # The client verified the backend's own certificate for this very name.
            assert result.greeting.decode() == backend, sni
            assert subject_cn(result.served) == f"pg-{backend}"
            server = pg_pair.replica if backend == "replica" else pg_pair.primary
            assert result.served == server.issued.cert
            assert result.echoed == b"SELECT 1;\n"
            assert result.version == "TLSv1.3" and result.alpn == "postgresql"
        # No SNI at all: nothing for the rules to match, so the fallback takes it too.
        anonymous = await tls_client(port, client_context(pg_pair.ca, check_hostname=False), None)
        assert anonymous.greeting == b"primary" and anonymous.served == pg_pair.primary.issued.cert
        await wait_for(lambda: len(files.closes()) == len(expected) + 1)
    # The backends saw the client's own ClientHello: its SNI, as sent, and its ALPN.
    assert pg_pair.replica.snis == ["read.db.test", "analytics-read-2.db.test", "READ.DB.TEST"]
    assert pg_pair.primary.snis == ["primary.db.test", "orders.db.test", None]
    assert (pg_pair.replica.alpns, pg_pair.primary.alpns) == (["postgresql"] * 3, ["postgresql"] * 2 + [None])
    decisions = [r for r in files.audit() if r["event"] == "decision"]
    assert [(d["sni"], d["route"]) for d in decisions] == [
        ("read.db.test", "*read*"),
        ("analytics-read-2.db.test", "*read*"),
        ("read.db.test", "*read*"),
        ("primary.db.test", "sni.forwards_to"),
        ("orders.db.test", "sni.forwards_to"),
        (None, "sni.forwards_to"),
    ]
    backends = [c["backend"] for c in files.closes()]
    assert backends.count(f"replica.db.internal@127.0.0.1:{pg_pair.replica.port}") == 3
    assert backends.count(f"primary.db.internal@127.0.0.1:{pg_pair.primary.port}") == 3
    assert all(c["reason"] == "normal" and c["bytes_up"] > 0 for c in files.closes())


async def test_openssl_s_client_sees_the_backend_subject(files: GatewayFiles, pg_pair: PgPair) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    port = add_routed_listener(files, "pg", **otoroshi_service(pg_pair))
    files.grants.append(grant({"pg": {}}))
    ca_file = pg_pair.ca.write(files.dir, "backends-ca")
    async with running_gateway(files):
        for sni, cn in (("replica-read.db.test", "pg-replica"), ("main.db.test", "pg-primary")):
            code, out, err = await run(
                "openssl",
                "s_client",
                "-servername",
                sni,
                "-connect",
                f"127.0.0.1:{port}",
                "-CAfile",
                str(ca_file),
                "-verify_hostname",
                sni,
                stdin=b"",  # </dev/null: s_client quits after the handshake
            )
            assert code == 0, err
            assert f"CN = {cn}" in out.split("subject=", 1)[1].splitlines()[0], out
            assert "Verify return code: 0 (ok)" in out


async def test_rule_domains_are_regexes_matched_in_full_first_match_wins(
    files: GatewayFiles, pg_pair: PgPair
) -> None:
    rules = [
        {
            "domain": r"db-[0-9]+\.db\.test",
            "targets": [{"host": "r.internal", "ip": "127.0.0.1", "port": pg_pair.replica.port}],
        },
        {  # would also match db-1.db.test, but the rule above comes first
            "domain": r"db-.*",
            "targets": [{"host": "p.internal", "ip": "127.0.0.1", "port": pg_pair.primary.port}],
        },
        {  # a leading * is a wildcard: any run of characters, the rest literal (the dot too)
            "domain": "*.read.test",
            "targets": [{"host": "r.internal", "ip": "127.0.0.1", "port": pg_pair.replica.port}],
        },
    ]
    port = add_routed_listener(files, "pg", tls="passthrough", rules=rules)
    files.grants.append(grant({"pg": {}}))
    context = client_context(pg_pair.ca, check_hostname=False)
    async with running_gateway(files):
        for sni, backend in (
            ("db-1.db.test", "replica"),
            ("DB-42.Db.TeSt", "replica"),
            ("db-x.db.test", "primary"),
            ("db-1.db.test.evil.example", "primary"),  # not a full match of rule 1; rule 2 matches
            ("a.b.read.test", "replica"),
        ):
            result = await tls_client(port, context, sni)
            assert result.error is None and result.greeting.decode() == backend, sni
        # Full match only: a prefix or suffix around a rule's name does not match it.
        for sni in ("xdb-1.db.test", "a.read.test.example", "aXread.test", "read.test"):
            assert await tls_refused(port, sni), sni
    assert pg_pair.replica.connections == 3 and pg_pair.primary.connections == 2


async def test_no_match_and_no_fallback_is_refused_without_a_byte(
    files: GatewayFiles, pg_pair: PgPair
) -> None:
    rules = [replica_rule(pg_pair)]  # only *read*
    port = add_routed_listener(files, "pg", tls="passthrough", rules=rules)
    files.grants.append(grant({"pg": {}}))
    async with running_gateway(files):
        assert await tls_refused(port, "primary.db.test")
        assert await tls_refused(port, None)  # no SNI at all: nothing to route on
        await wait_for(lambda: len(files.audit()) == 2)
    assert pg_pair.primary.connections == pg_pair.replica.connections == 0
    first, second = files.audit()
    assert first["event"] == "decision" and first["allowed"] is False
    assert "no route" in first["reason"] and "primary.db.test" in first["reason"]
    assert second["allowed"] is False and "no server name" in second["reason"]
    assert first["user"] == "dev@localhost"  # identified and granted, but nowhere to go


async def test_forwards_to_without_forward_if_no_match_is_not_used(
    files: GatewayFiles, pg_pair: PgPair
) -> None:
    sni = {
        "forward_if_no_match": False,
        "forwards_to": primary_target(pg_pair),
    }
    port = add_routed_listener(files, "pg", tls="passthrough", rules=[replica_rule(pg_pair)], sni=sni)
    files.grants.append(grant({"pg": {}}))
    async with running_gateway(files):
        assert await tls_refused(port, "orders.db.test")
        await wait_for(files.audit)
    assert pg_pair.primary.connections == 0
    assert "no route" in files.audit()[0]["reason"]


def hello_naming(name: bytes) -> bytes:
    """A real ClientHello (Python's ssl) whose host_name is ``name``: for bytes Python will not
    send (NUL, space), a placeholder of the same length is swapped in, so every length field
    stays right. The handshake cannot complete after that; routing is all it is for."""
    placeholder = b"p" * len(name)
    context = client_context(None, check_hostname=False)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=placeholder.decode())
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello.count(placeholder) == 1
    return hello.replace(placeholder, name)


async def send_hello(port: int, hello: bytes) -> bytes:
    """Send ``hello`` and return what comes back before the connection closes (or 1 s passes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(hello)
        await writer.drain()
        async with asyncio.timeout(1):
            return await reader.read(100)
    except (TimeoutError, ConnectionResetError):
        return b""
    finally:
        writer.close()


# Server names real clients send that are not RFC 6066 host names; with a NUL or a space there
# is no name to route on, and a rule must not match what follows the NUL ("*read*" here).
UNUSABLE_NAMES = (b"evil.test\x00.read.db.test", b"exa mple.read.db.test")


async def test_unusual_server_names_are_routed_or_fall_back(files: GatewayFiles, pg_pair: PgPair) -> None:
    # HAProxy's behaviour: a name that no rule matches -- however odd -- goes to the default
    # backend (here sni.forwards_to); it is not a malformed ClientHello.
    port = add_routed_listener(files, "pg", **otoroshi_service(pg_pair))
    files.grants.append(grant({"pg": {}}))
    context = client_context(pg_pair.ca, check_hostname=False)
    ca_file = pg_pair.ca.write(files.dir, "backends-ca")
    python_names = {
        "db.example.com.": "primary",  # trailing dot
        "-bad.example.com": "primary",  # leading hyphen
        "Reports-Read.db.test.": "replica",  # a rule matches the name without its dot
    }
    async with running_gateway(files):
        for sni, backend in python_names.items():
            result = await tls_client(port, context, sni)
            assert result.error is None, (sni, result.error)
            assert result.greeting.decode() == backend and result.echoed == b"ping\n", sni
        expected = len(python_names)
        with_openssl = shutil.which("openssl") is not None
        if with_openssl:
            # Python's ssl sends no SNI for an IP address; OpenSSL sends what it is given.
            argv = ["s_client", "-servername", "10.1.2.3", "-connect", f"127.0.0.1:{port}"]
            code, out, err = await run("openssl", *argv, "-CAfile", str(ca_file), stdin=b"")
            assert code == 0, err
            assert "CN = pg-primary" in out.split("subject=", 1)[1].splitlines()[0], out
            expected += 1
        for name in UNUSABLE_NAMES:
            await send_hello(port, hello_naming(name))
            expected += 1
        await wait_for(lambda: len(files.closes()) == expected)
    decisions = [(r["sni"], r["route"]) for r in files.audit() if r["event"] == "decision"]
    assert decisions == [
        ("db.example.com", "sni.forwards_to"),
        ("-bad.example.com", "sni.forwards_to"),
        ("reports-read.db.test", "*read*"),
        *([("10.1.2.3", "sni.forwards_to")] if with_openssl else []),
        (None, "sni.forwards_to"),
        (None, "sni.forwards_to"),
    ]
    assert all(r["allowed"] for r in files.audit() if r["event"] == "decision")
    # The backends saw the names exactly as the clients sent them: nothing was rewritten. (Their
    # OpenSSL takes the name with a space too; the one with a NUL it refuses itself.)
    assert pg_pair.replica.snis == ["Reports-Read.db.test."]
    assert pg_pair.primary.snis == [
        "db.example.com.",
        "-bad.example.com",
        *(["10.1.2.3"] if with_openssl else []),
        "exa mple.read.db.test",
    ]


async def test_unusual_server_names_without_a_fallback_are_no_route(
    files: GatewayFiles, pg_pair: PgPair
) -> None:
    port = add_routed_listener(files, "pg", tls="passthrough", rules=[replica_rule(pg_pair)])
    files.grants.append(grant({"pg": {}}))
    async with running_gateway(files):
        assert await tls_refused(port, "db.example.com.")
        assert await tls_refused(port, "-bad.example.com")
        for name in UNUSABLE_NAMES:
            assert await send_hello(port, hello_naming(name)) == b""
        result = await tls_client(port, client_context(pg_pair.ca, check_hostname=False), "x-read.db.test.")
        assert result.greeting == b"replica"
        await wait_for(lambda: len(files.audit()) == 6)
    reasons = [r["reason"] for r in files.audit() if r["event"] == "decision" and not r["allowed"]]
    assert reasons == [
        "no route: no rule matches 'db.example.com'",
        "no route: no rule matches '-bad.example.com'",
        "no route: no server name to route on",
        "no route: no server name to route on",
    ]
    assert pg_pair.primary.connections == 0 and pg_pair.replica.connections == 1


async def test_client_hello_split_across_segments_is_still_routed(
    files: GatewayFiles, pg_pair: PgPair
) -> None:
    port = add_routed_listener(files, "pg", **otoroshi_service(pg_pair))
    files.grants.append(grant({"pg": {}}))
    context = client_context(pg_pair.ca)
    async with running_gateway(files):
        # Inside the record header, inside the handshake header, then mid-extensions.
        line = await tls_client_in_pieces(port, context, "read.db.test", cuts=(1, 3, 7, 60, 200))
        assert line == b"replica\n"
        line = await tls_client_in_pieces(port, context, "main.db.test", cuts=(5, 9))
        assert line == b"primary\n"
    assert pg_pair.replica.snis == ["read.db.test"] and pg_pair.primary.snis == ["main.db.test"]


async def test_sni_disabled_sends_everything_to_forwards_to(files: GatewayFiles, pg_pair: PgPair) -> None:
    sni = {
        "enabled": False,
        "forward_if_no_match": True,
        "forwards_to": primary_target(pg_pair),
    }
    port = add_routed_listener(files, "pg", tls="passthrough", rules=[replica_rule(pg_pair)], sni=sni)
    files.grants.append(grant({"pg": {}}))
    context = client_context(pg_pair.ca)
    async with running_gateway(files):
        # read.db.test would match the *read* rule, but rules are off: the fallback takes it.
        assert (await tls_client(port, context, "read.db.test")).greeting == b"primary"
    assert pg_pair.replica.connections == 0


async def test_passthrough_refuses_a_client_that_does_not_speak_tls(
    files: GatewayFiles, pg_pair: PgPair
) -> None:
    port = add_routed_listener(files, "pg", **otoroshi_service(pg_pair))
    files.grants.append(grant({"pg": {}}))
    async with running_gateway(files):
        assert await refused(port)  # plaintext "hello?" is not a ClientHello
        await wait_for(files.audit)
    assert pg_pair.primary.connections == pg_pair.replica.connections == 0
    (record,) = files.audit()
    assert record["allowed"] is False and "ClientHello" in record["reason"]


async def test_passthrough_leaves_alpn_to_the_backend(files: GatewayFiles, tmp_path: Path) -> None:
    ca = Authority("web backend CA")
    async with NamedTLSServer(
        "web", ca.issue(cn="web", dns=("web.test",)), tmp_path, alpn=("http/1.1",)
    ) as web:
        port = add_routed_listener(
            files,
            "web",
            tls="passthrough",
            rules=[
                {"domain": "web.test", "targets": [{"host": "web.test", "ip": "127.0.0.1", "port": web.port}]}
            ],
        )
        files.grants.append(grant({"web": {}}))
        async with running_gateway(files):
            result = await tls_client(port, client_context(ca, alpn=("h2", "http/1.1")), "web.test")
            assert result.error is None and result.greeting == b"web"
            await wait_for(files.audit)
    # The client offered h2 and http/1.1; the backend (not the gateway) chose http/1.1.
    assert result.alpn == "http/1.1" and web.alpns == ["http/1.1"]


@pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-cli not installed")
async def test_redis_behind_a_passthrough_rule_terminated_by_a_second_listener(
    files: GatewayFiles, tmp_path: Path
) -> None:
    ca = Authority("cache CA")
    pair = write_pair(ca.issue(cn="cache.test", dns=("cache.test",)), tmp_path, "cache")
    ca_file = ca.write(tmp_path, "cache-ca")
    # T terminates TLS for cache.test and relays plaintext to the local Redis.
    terminator = files.add_listener("T", "127.0.0.1:6379", tls="enabled", **pair)
    # P only reads the SNI and forwards the untouched TLS stream to T.
    front = add_routed_listener(
        files,
        "P",
        tls="passthrough",
        rules=[
            {
                "domain": "cache.test",
                "targets": [{"host": "cache.test", "ip": "127.0.0.1", "port": terminator}],
            }
        ],
    )
    files.grants.append(grant({"P": {}, "T": {}}))
    async with running_gateway(files):
        code, out, err = await run(
            "redis-cli", "--tls", "--cacert", str(ca_file), "--sni", "cache.test", "-p", str(front), "PING"
        )
        assert (code, out.strip()) == (0, "PONG"), err
        # Another name has no rule on P: refused there, T never dialled.
        code, out, _ = await run(
            "redis-cli", "--tls", "--cacert", str(ca_file), "--sni", "other.test", "-p", str(front), "PING"
        )
        assert out.strip() != "PONG"
        await wait_for(lambda: len(files.closes()) == 2)
    closes = {c["listener"]: c for c in files.closes()}
    assert closes["P"]["backend"] == f"cache.test@127.0.0.1:{terminator}"
    assert closes["T"]["backend"] == "127.0.0.1:6379"
    assert closes["T"]["bytes_up"] == len(b"*1\r\n$4\r\nPING\r\n") and closes["T"]["bytes_down"] == 7
    decisions = [r for r in files.audit() if r["event"] == "decision"]
    allowed = [(d["listener"], d["sni"]) for d in decisions if d["allowed"]]
    assert allowed == [("P", "cache.test"), ("T", "cache.test")]
    refusals = [d for d in decisions if not d["allowed"]]  # redis-cli tries twice
    assert refusals and all(d["listener"] == "P" and "other.test" in d["reason"] for d in refusals)


async def test_passthrough_routes_on_the_offered_alpn(files: GatewayFiles, pg_pair: PgPair) -> None:
    """A rule may also require an ALPN protocol: the client's offer picks between rules that
    share a name (e.g. one backend for h2, another for everything else)."""
    rules = [
        {
            "domain": "*.db.test",
            "alpn": ["x-replica"],
            "targets": [{"host": "r.internal", "ip": "127.0.0.1", "port": pg_pair.replica.port}],
        },
        {
            "domain": "*.db.test",
            "targets": [{"host": "p.internal", "ip": "127.0.0.1", "port": pg_pair.primary.port}],
        },
    ]
    port = add_routed_listener(files, "pg", tls="passthrough", rules=rules)
    files.grants.append(grant({"pg": {}}))
    async with running_gateway(files):
        for offer, backend in (
            (["x-replica", "http/1.1"], "replica"),
            (["http/1.1"], "primary"),
            ([], "primary"),
        ):
            context = client_context(pg_pair.ca, check_hostname=False, alpn=offer)
            result = await tls_client(port, context, "app.db.test")
            assert result.error is None and result.greeting.decode() == backend, offer
