"""The tailscale identity source inside a running gateway: real TCP connections, the LocalAPI
double on a real unix socket, grants from CapMap merged with local ones, revalidation, dialing
through tailscaled (SPEC §1-3; issue "Tailscale identity")."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.gateway import (
    CAP,
    EchoServer,
    GatewayFiles,
    connect,
    grant,
    read_until_closed,
    refused,
    roundtrip,
    running_gateway,
    wait_for,
)
from tests.support.localapi_double import LocalAPIDouble

WAYPOINT = "redo.com/cap/waypoint"


@pytest.fixture
async def double() -> AsyncIterator[LocalAPIDouble]:
    async with LocalAPIDouble.running() as d:
        yield d


def tailscale_files(tmp_path: Path, double: LocalAPIDouble, capability: str = CAP) -> GatewayFiles:
    files = GatewayFiles(tmp_path)
    files.static = []
    files.extra = (
        f"[tailscale]\nsocket = {json.dumps(double.socket_path)}\ncapability = {json.dumps(capability)}\n"
        'timeout = "1s"\n'
    )
    return files


async def test_capmap_grant_admits_peer_and_audits_tailnet_identity(tmp_path: Path, double) -> None:
    files = tailscale_files(tmp_path, double)
    async with EchoServer() as echo:
        port = files.add_listener("echo", echo.address)
        double.add_peer(
            "127.0.0.1",
            login="alice@example.com",
            host="alice-laptop",
            cap_map={CAP: [{"backends": {"echo": {}}, "unknown": {"ignored": True}}]},
        )
        async with running_gateway(files):
            assert await roundtrip(port) == b"ping"
            await wait_for(files.closes)
    decision, close = files.audit()
    assert (decision["user"], decision["node"], decision["identity_source"]) == (
        "alice@example.com",
        "alice-laptop",
        "tailscale",
    )
    assert close["user"] == "alice@example.com"
    whois = [r for r in double.requests if r.endpoint == "whois"]
    assert whois and whois[0].header("host") == "local-tailscaled.sock"
    assert "addr=127.0.0.1%3A" in whois[0].target  # the loopback ip:port, passed unchanged


async def test_local_grants_are_merged_with_capmap(tmp_path: Path, double) -> None:
    files = tailscale_files(tmp_path, double)
    async with EchoServer() as echo:
        from_tailnet = files.add_listener("a", echo.address)
        from_local = files.add_listener("b", echo.address)
        nowhere = files.add_listener("c", echo.address)
        double.add_peer("127.0.0.1", login="alice@example.com", cap_map={CAP: [{"backends": {"a": {}}}]})
        files.grants.append(grant({"b": {}}, src=["alice@example.com"]))
        async with running_gateway(files):
            assert await roundtrip(from_tailnet) == b"ping"
            assert await roundtrip(from_local) == b"ping"
            assert await refused(nowhere)


async def test_tagged_device_is_identified_by_tags(tmp_path: Path, double) -> None:
    files = tailscale_files(tmp_path, double)
    async with EchoServer() as echo:
        port = files.add_listener("echo", echo.address)
        double.add_peer("127.0.0.1", tags=("tag:ci",), cap_map={})
        files.grants.append(grant({"echo": {}}, src=["tag:ci"]))
        async with running_gateway(files):
            assert await roundtrip(port) == b"ping"
            await wait_for(files.closes)
    assert files.closes()[0]["user"] == "tag:ci"


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ("unknown peer", "no such peer"),
        ("no profile", "no user profile"),
        ("403", "refused access (403)"),
        ("garbage", "bad answer"),
        ("slow", "no answer from tailscaled"),
    ],
)
async def test_whois_failures_fail_closed_with_precise_reason(
    tmp_path: Path, double, setup: str, reason: str
) -> None:
    files = tailscale_files(tmp_path, double)
    files.grants.append(grant({"echo": {}}))  # would admit anyone identified
    async with EchoServer() as echo:
        port = files.add_listener("echo", echo.address)
        if setup == "no profile":
            double.add_peer("127.0.0.1", with_profile=False)
        elif setup == "403":
            double.fail("whois", status=403, body=b"whois access denied\n")
        elif setup == "garbage":
            double.fail("whois", raw=b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{{{{{")
        elif setup == "slow":
            double.add_peer("127.0.0.1")
            double.delays["whois"] = 3.0
        async with running_gateway(files):
            assert await refused(port)
            await wait_for(files.audit)
        assert echo.connections == 0
    (record,) = files.audit()
    assert record["allowed"] is False
    assert reason in record["reason"]


async def test_unreachable_tailscaled_fails_closed(tmp_path: Path) -> None:
    files = GatewayFiles(tmp_path)
    files.static = []
    files.extra = f'[tailscale]\nsocket = "{tmp_path}/nope.sock"\n'
    files.grants.append(grant({"echo": {}}))
    async with EchoServer() as echo:
        port = files.add_listener("echo", echo.address)
        async with running_gateway(files):
            assert await refused(port)
            await wait_for(files.audit)
    assert "unreachable" in files.audit()[0]["reason"]


async def test_grant_revoked_mid_connection_closes_it(tmp_path: Path, double) -> None:
    files = tailscale_files(tmp_path, double)
    files.revalidation = "200ms"
    async with EchoServer() as echo:
        port = files.add_listener("echo", echo.address)
        double.add_peer("127.0.0.1", cap_map={CAP: [{"backends": {"echo": {}}}]})
        async with running_gateway(files):
            reader, writer = await connect(port)
            writer.write(b"hello")
            assert await reader.readexactly(5) == b"hello"
            before = double.count("whois")
            await wait_for(lambda: double.count("whois") > before)  # revalidation asks again
            writer.write(b"still")
            assert await reader.readexactly(5) == b"still"
            double.set_cap_map("127.0.0.1", {CAP: [{"backends": {"other": {}}}]})
            assert await read_until_closed(reader) == b""
            writer.close()
            await wait_for(files.closes)
    close = files.closes()[0]
    assert close["reason"] == "revoked"
    assert "no grant" in close["detail"]


async def test_vanished_peer_is_revoked(tmp_path: Path, double) -> None:
    files = tailscale_files(tmp_path, double)
    files.revalidation = "200ms"
    async with EchoServer() as echo:
        port = files.add_listener("echo", echo.address)
        double.add_peer("127.0.0.1", cap_map={CAP: [{"backends": {"echo": {}}}]})
        async with running_gateway(files):
            reader, writer = await connect(port)
            await wait_for(lambda: double.count("whois") >= 1)
            double.remove_peer("127.0.0.1")
            assert await read_until_closed(reader) == b""
            writer.close()
            await wait_for(files.closes)
    close = files.closes()[0]
    assert close["reason"] == "revoked"
    assert "no such peer" in close["detail"]


async def test_changed_limit_applies_on_revalidation(tmp_path: Path, double) -> None:
    files = tailscale_files(tmp_path, double)
    files.revalidation = "200ms"
    async with EchoServer() as echo:
        port = files.add_listener("echo", echo.address)
        double.add_peer("127.0.0.1", cap_map={CAP: [{"backends": {"echo": {}}}]})
        async with running_gateway(files):
            reader, writer = await connect(port)
            await asyncio.sleep(0.3)
            double.set_cap_map(
                "127.0.0.1", {CAP: [{"backends": {"echo": {}}, "limits": {"max_bytes_per_conn": 100}}]}
            )
            before = double.count("whois")
            await wait_for(lambda: double.count("whois") > before + 1)
            writer.write(b"x" * 300)
            got = await read_until_closed(reader)
            writer.close()
            await wait_for(files.closes)
    close = files.closes()[0]
    assert (close["reason"], close["limit"]) == ("limit", "max_bytes_per_conn")
    assert len(got) <= 100


async def test_waypoint_capability_and_legacy_shape(tmp_path: Path, double) -> None:
    files = tailscale_files(tmp_path, double, capability=WAYPOINT)
    async with EchoServer() as echo:
        limited = files.add_listener("redis", echo.address)
        other = files.add_listener("mysql", echo.address)
        double.add_peer(
            "127.0.0.1",
            cap_map={
                WAYPOINT: [{"backends": ["redis"], "endpoint_limits": {"redis": {"max_conns": 1}}}],
                CAP: [{"backends": {"mysql": {}}}],  # another capability name: ignored
            },
        )
        async with running_gateway(files) as gw:
            held = await connect(limited)
            await wait_for(lambda: len(gw.runtime.sessions) == 1)
            assert await refused(limited)  # endpoint_limits.redis.max_conns = 1
            assert await refused(other)
            held[1].close()


async def test_malformed_capmap_value_denies_only_that_rule(
    tmp_path: Path, double, caplog: pytest.LogCaptureFixture
) -> None:
    files = tailscale_files(tmp_path, double)
    async with EchoServer() as echo:
        good = files.add_listener("good", echo.address)
        bad = files.add_listener("bad", echo.address)
        double.add_peer(
            "127.0.0.1",
            cap_map={
                CAP: [
                    {"backends": {"bad": {"limits": {"max_conns": "lots"}}}},
                    {"backends": {"good": {}}},
                ]
            },
        )
        async with running_gateway(files):
            assert await roundtrip(good) == b"ping"
            assert await refused(bad)
    assert "ignoring malformed grant" in caplog.text
    assert '"lots"' in caplog.text  # the raw value is logged


async def test_backend_via_tailscale_dials_through_localapi(tmp_path: Path, double) -> None:
    files = tailscale_files(tmp_path, double)
    async with EchoServer() as echo:
        double.dial_routes["db.tail1234.ts.net"] = ("127.0.0.1", echo.port)
        port = files.add_listener("ts", "db.tail1234.ts.net:7000", backend_via_tailscale=True)
        double.add_peer("127.0.0.1", cap_map={CAP: [{"backends": {"ts": {}}}]})
        async with running_gateway(files):
            payload = bytes(range(256)) * 400
            assert await roundtrip(port, payload) == payload
            await wait_for(files.closes)
    dial = next(r for r in double.requests if r.endpoint == "dial")
    assert (dial.header("dial-host"), dial.header("dial-port"), dial.header("upgrade")) == (
        "db.tail1234.ts.net",
        "7000",
        "ts-dial",
    )
    close = files.closes()[0]
    assert close["bytes_up"] == close["bytes_down"] == len(payload)


async def test_backend_via_tailscale_first_bytes_are_delivered(tmp_path: Path, double) -> None:
    """Backend bytes that arrive with the 101 (e.g. a server greeting) must reach the client."""
    files = tailscale_files(tmp_path, double)
    async with EchoServer() as echo:
        double.dial_routes["db"] = ("127.0.0.1", echo.port)
        double.dial_greeting = b"GREETING\r\n"
        port = files.add_listener("ts", "db:7000", backend_via_tailscale=True)
        double.add_peer("127.0.0.1", cap_map={CAP: [{"backends": {"ts": {}}}]})
        async with running_gateway(files):
            reader, writer = await connect(port)
            async with asyncio.timeout(5):
                assert await reader.readexactly(10) == b"GREETING\r\n"
            writer.close()


async def test_backend_via_tailscale_dial_failure_is_backend_error(tmp_path: Path, double) -> None:
    files = tailscale_files(tmp_path, double)
    double.dial_error = "no route to host"
    port = files.add_listener("ts", "gone.tail1234.ts.net:5432", backend_via_tailscale=True)
    double.add_peer("127.0.0.1", cap_map={CAP: [{"backends": {"ts": {}}}]})
    async with running_gateway(files):
        assert await refused(port)
        await wait_for(files.closes)
    close = files.closes()[0]
    assert close["reason"] == "backend_error"
    assert "no route to host" in close["detail"]
