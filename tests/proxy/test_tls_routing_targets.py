"""Host routing on plaintext listeners, target choice (round robin, failover, down-marking) and
the PROXY protocol both ways (SPEC §6), end to end: real gateway, real clients (curl,
redis-cli, HAProxy, hand-written bytes), real backends.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import struct
from pathlib import Path

import pytest

from tests.proxy.routing_peers import (
    ClosingServer,
    NamedHTTPServer,
    NamedTLSServer,
    ProxyProtocolServer,
    add_routed_listener,
    client_context,
    run,
    write_pair,
)
from tests.support.gateway import (
    EchoServer,
    GatewayFiles,
    connect,
    free_port,
    grant,
    port_in_use,
    read_until_closed,
    refused,
    running_gateway,
    wait_for,
)
from tests.tls.certgen import Authority


@pytest.fixture
def files(tmp_path: Path) -> GatewayFiles:
    return GatewayFiles(tmp_path)


def target(port: int, host: str = "backend.internal", **options: object) -> dict[str, object]:
    return {"host": host, "ip": "127.0.0.1", "port": port, **options}


async def http_get(port: int, host: str) -> bytes:
    """One HTTP/1.1 request with ``Host: host``; the whole answer (the backend closes)."""
    reader, writer = await connect(port)
    try:
        writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return await read_until_closed(reader)
    finally:
        writer.close()


# -- Host routing ------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
async def test_plaintext_http_is_routed_on_the_host_header(files: GatewayFiles) -> None:
    async with NamedHTTPServer("A") as a, NamedHTTPServer("B") as b:
        port = add_routed_listener(
            files,
            "web",
            rules=[
                {"domain": "a.test", "targets": [target(a.port)]},
                {"domain": "*.b.test", "targets": [target(b.port)]},
                {"domain": "b.test", "targets": [target(b.port)]},
            ],
        )
        files.grants.append(grant({"web": {}}))
        async with running_gateway(files):
            for host, body in (
                ("a.test", "hello from A"),
                ("b.test", "hello from B"),
                ("www.b.test", "hello from B"),
            ):
                code, out, err = await run(
                    "curl",
                    "-sS",
                    "--max-time",
                    "5",
                    "--resolve",
                    f"{host}:{port}:127.0.0.1",
                    f"http://{host}:{port}/",
                )
                assert (code, out.strip()) == (0, body), err
            # Case does not matter; the port in Host is not part of the name.
            code, out, _ = await run("curl", "-sS", "-H", "Host: A.Test:80", f"http://127.0.0.1:{port}/")
            assert out.strip() == "hello from A"
            # No rule for c.test and no fallback: the connection is closed without an answer.
            code, out, _ = await run(
                "curl",
                "-sS",
                "--max-time",
                "5",
                "--resolve",
                f"c.test:{port}:127.0.0.1",
                f"http://c.test:{port}/",
            )
            assert code == 52 and out == ""  # curl: "Empty reply from server"
            await wait_for(lambda: len(files.audit()) == 9)
    # The request head reached the backends unchanged (Host with its port, as curl sent it).
    assert a.hosts == [f"a.test:{port}", "A.Test:80"]
    assert b.hosts == [f"b.test:{port}", f"www.b.test:{port}"]
    refusal = files.audit()[-1]
    assert refusal["allowed"] is False and "no rule matches 'c.test'" in refusal["reason"]


@pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-cli not installed")
async def test_non_http_client_falls_back_to_the_backend(files: GatewayFiles) -> None:
    async with NamedHTTPServer("A") as a:
        # Host rules for HTTP, and the local Redis for everything that is not HTTP.
        port = files.add_listener(
            "mixed", "127.0.0.1:6379", rules=[{"domain": "a.test", "targets": [target(a.port)]}]
        )
        files.grants.append(grant({"mixed": {}}))
        async with running_gateway(files):
            assert b"hello from A" in await http_get(port, "a.test")
            loop = asyncio.get_running_loop()
            started = loop.time()
            code, out, err = await run("redis-cli", "-p", str(port), "PING", timeout=10)
            assert (code, out.strip()) == (0, "PONG"), err
            assert loop.time() - started < 2  # routed at once, not after a sniffing timeout
            await wait_for(lambda: len(files.closes()) == 2)
    routes = [r["route"] for r in files.audit() if r["event"] == "decision"]
    assert routes == ["a.test", "backend"]


async def test_request_line_split_across_segments_is_still_routed(files: GatewayFiles) -> None:
    async with NamedHTTPServer("A") as a:
        port = files.add_listener(
            "web", "127.0.0.1:1", rules=[{"domain": "a.test", "targets": [target(a.port)]}]
        )
        files.grants.append(grant({"web": {}}))
        async with running_gateway(files):
            reader, writer = await connect(port)
            # The first piece is already longer than any method: only the rest shows it is HTTP.
            for piece in (b"GET /reports/2026/very-long-path", b"?q=1 HTTP/1.", b"1\r\nHost: a.test\r\n\r\n"):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.02)  # separate segments (coalescing would only make it easier)
            assert b"hello from A" in await read_until_closed(reader)
            writer.close()
    assert a.hosts == ["a.test"]


async def test_non_http_client_without_fallback_is_refused(files: GatewayFiles) -> None:
    async with EchoServer() as echo:
        port = add_routed_listener(files, "web", rules=[{"domain": "a.test", "targets": [target(echo.port)]}])
        files.grants.append(grant({"web": {}}))
        async with running_gateway(files):
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await refused(port)  # "hello?" is no HTTP request
            assert loop.time() - started < 2
            # An HTTP request without a Host header has nothing to route on either.
            reader, writer = await connect(port)
            writer.write(b"GET / HTTP/1.0\r\nUser-Agent: old\r\n\r\n")
            assert await read_until_closed(reader) == b""
            writer.close()
            await wait_for(lambda: len(files.audit()) == 2)
        assert echo.connections == 0
    assert all(r["allowed"] is False and "no server name" in r["reason"] for r in files.audit())


async def test_set_up_timeouts_are_refused_with_a_reason(files: GatewayFiles) -> None:
    # A client that stalls before the gateway can route it is cut after proxy_protocol_timeout
    # + identity_timeout; one that stalls inside the PROXY header after proxy_protocol_timeout
    # alone. (So a server-speaks-first protocol on a Host-routed listener is refused, not sent
    # to the fallback: there is no Host to wait for.)
    quick = {"proxy_protocol_timeout": "300ms", "identity_timeout": "200ms"}
    rules = [{"domain": "a.test", "targets": [target(1)]}]
    stalls = {
        "lb": (
            files.add_listener(
                "lb",
                "127.0.0.1:1",
                accept_proxy_protocol=True,
                proxy_protocol_timeout="450ms",
                identity_timeout="30s",
            ),
            b"PROXY TCP4 10.",
        ),
        "web": (files.add_listener("web", "127.0.0.1:1", rules=rules, **quick), b""),
        "pass": (
            add_routed_listener(files, "pass", tls="passthrough", rules=rules, **quick),
            b"\x16\x03\x01",
        ),
    }
    files.grants.append(grant({"lb": {}, "web": {}, "pass": {}}))
    async with running_gateway(files):
        loop = asyncio.get_running_loop()
        for port, sent in stalls.values():
            reader, writer = await connect(port)
            writer.write(sent)
            started = loop.time()
            assert await read_until_closed(reader) == b""
            assert 0.4 < loop.time() - started < 3
            writer.close()
        await wait_for(lambda: len(files.audit()) == 3)
    reasons = {r["listener"]: r["reason"] for r in files.audit()}
    assert reasons == {
        "lb": "timed out waiting for the PROXY protocol header",
        "web": "timed out waiting for the HTTP request head",
        "pass": "timed out waiting for the TLS ClientHello",
    }


# -- targets -----------------------------------------------------------------------------


async def test_targets_of_a_rule_are_used_round_robin(files: GatewayFiles) -> None:
    async with NamedHTTPServer("A") as a, NamedHTTPServer("B") as b:
        port = add_routed_listener(
            files, "rr", rules=[{"domain": "rr.test", "targets": [target(a.port, "a"), target(b.port, "b")]}]
        )
        files.grants.append(grant({"rr": {}}))
        async with running_gateway(files):
            bodies = [await http_get(port, "rr.test") for _ in range(6)]
            await wait_for(lambda: len(files.closes()) == 6)
    assert (a.connections, b.connections) == (3, 3)
    assert [body.rsplit(b"\n", 2)[-2][-1:] for body in bodies] == [b"A", b"B"] * 3
    assert [c["backend"] for c in files.closes()] == [f"a@127.0.0.1:{a.port}", f"b@127.0.0.1:{b.port}"] * 3


async def test_a_target_that_cannot_be_dialled_fails_over_to_the_next(files: GatewayFiles) -> None:
    dead = free_port()  # nothing listens there: the dial is refused
    async with NamedHTTPServer("A") as a:
        port = add_routed_listener(
            files, "fo", rules=[{"domain": "fo.test", "targets": [target(dead, "dead"), target(a.port, "a")]}]
        )
        files.grants.append(grant({"fo": {}}))
        async with running_gateway(files):
            for _ in range(4):
                assert b"hello from A" in await http_get(port, "fo.test")
            await wait_for(lambda: len(files.closes()) == 4)
    assert a.connections == 4
    assert {(c["backend"], c["reason"]) for c in files.closes()} == {(f"a@127.0.0.1:{a.port}", "normal")}


async def test_a_failed_target_is_tried_last_for_target_down_time(files: GatewayFiles) -> None:
    # The broken target accepts (so its dials can be counted) and hangs up: with tls = true
    # that is a failed connection, as a refused dial would be.
    async with ClosingServer() as broken, NamedHTTPServer("A") as a:
        port = add_routed_listener(
            files,
            "down",
            target_down_time="1s",
            rules=[
                {
                    "domain": "d.test",
                    "targets": [target(broken.port, "broken", tls=True), target(a.port, "a")],
                }
            ],
        )
        files.grants.append(grant({"down": {}}))
        async with running_gateway(files):
            loop = asyncio.get_running_loop()
            assert b"hello from A" in await http_get(port, "d.test")  # broken first: fails over
            marked_down = loop.time()
            assert broken.connections == 1
            for _ in range(4):  # round robin would put broken first twice: it is down, so last
                assert b"hello from A" in await http_get(port, "d.test")
            assert broken.connections == 1
            # Once target_down_time has passed, it is tried again (and fails over again).
            async with asyncio.timeout(5):
                while broken.connections == 1:
                    assert b"hello from A" in await http_get(port, "d.test")
                    await asyncio.sleep(0.05)
            assert loop.time() - marked_down >= 0.9
            # Down targets are tried last, not skipped: with A gone, broken is still dialled.
            await a.stop()
            before = broken.connections
            assert await http_get(port, "d.test") == b""
            assert broken.connections == before + 1
            await wait_for(lambda: files.closes() and files.closes()[-1]["reason"] == "backend_error")
    failure = files.closes()[-1]
    assert f"127.0.0.1:{a.port}" in failure["detail"] and f"127.0.0.1:{broken.port}" in failure["detail"]
    assert {c["backend"] for c in files.closes()[:-1]} == {f"a@127.0.0.1:{a.port}"}


# -- PROXY protocol to backends ----------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_proxy_protocol_tells_the_backend_the_client_address(files: GatewayFiles, version: str) -> None:
    async with ProxyProtocolServer() as backend:
        port = files.add_listener("pp", backend.address, proxy_protocol=version)
        files.grants.append(grant({"pp": {}}))
        async with running_gateway(files):
            reader, writer = await connect(port)
            client_port = writer.get_extra_info("sockname")[1]
            writer.write(b"payload after the header")
            assert await reader.readexactly(24) == b"payload after the header"
            writer.close()
            await wait_for(files.closes)
    (header,) = backend.headers
    assert header.version == int(version[1])
    assert (header.src_addr, header.src_port) == ("127.0.0.1", client_port)
    assert (header.dst_addr, header.dst_port) == ("127.0.0.1", port)
    assert files.closes()[0]["bytes_up"] == 24  # the header is not the client's traffic


# -- PROXY protocol from a load balancer -------------------------------------------------

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v2_header(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    """A PROXY v2 header written out by hand: version 2 / PROXY, TCP over IPv4."""
    addresses = socket.inet_aton(src[0]) + socket.inet_aton(dst[0]) + struct.pack("!HH", src[1], dst[1])
    return V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses)) + addresses


async def test_accepted_proxy_header_is_the_client_address(files: GatewayFiles) -> None:
    files.static.append({"cidr": "10.9.8.0/24", "user": "lb-client@example.com", "groups": ["lan"]})
    async with EchoServer() as echo:
        port = files.add_listener("lb", echo.address, accept_proxy_protocol=True)
        # Only the identity of the address in the header is granted, not the real loopback peer.
        files.grants.append(grant({"lb": {}}, src=["lb-client@example.com"]))
        async with running_gateway(files):
            for header in (
                v2_header(("10.9.8.7", 40001), ("127.0.0.1", port)),
                f"PROXY TCP4 10.9.8.8 127.0.0.1 40002 {port}\r\n".encode(),
            ):
                reader, writer = await connect(port)
                writer.write(header + b"hello")  # the client's bytes right behind the header
                assert await reader.readexactly(5) == b"hello"
                writer.close()
            await wait_for(lambda: len(files.closes()) == 2)
    closes = files.closes()
    assert [(c["source"], c["user"]) for c in closes] == [
        ("10.9.8.7:40001", "lb-client@example.com"),
        ("10.9.8.8:40002", "lb-client@example.com"),
    ]
    assert all(c["bytes_up"] == 5 for c in closes)


async def test_proxy_header_then_tls_passthrough_or_termination(files: GatewayFiles, tmp_path: Path) -> None:
    # A load balancer in front of TLS listeners: the header is consumed exactly, and the TLS
    # that follows it is routed on SNI (passthrough) or terminated (enabled) as usual.
    files.static.append({"cidr": "10.9.8.0/24", "user": "lb-client@example.com"})
    backend_ca, gateway_ca = Authority("backend CA"), Authority("gateway CA")
    async with (
        NamedTLSServer("tls-backend", backend_ca.issue(dns=("svc.test",)), tmp_path) as tls_backend,
        EchoServer() as echo,
    ):
        passthrough = add_routed_listener(
            files,
            "lb-pass",
            tls="passthrough",
            accept_proxy_protocol=True,
            rules=[{"domain": "svc.test", "targets": [target(tls_backend.port)]}],
        )
        pair = write_pair(gateway_ca.issue(dns=("svc.test",)), tmp_path, "front")
        terminated = files.add_listener(
            "lb-tls", echo.address, tls="enabled", accept_proxy_protocol=True, **pair
        )
        files.grants.append(grant({"lb-pass": {}, "lb-tls": {}}, src=["lb-client@example.com"]))
        async with running_gateway(files):
            for port, ca, greeting in ((passthrough, backend_ca, True), (terminated, gateway_ca, False)):
                sock = socket.create_connection(("127.0.0.1", port))
                sock.sendall(v2_header(("10.9.8.7", 40000 + port % 1000), ("127.0.0.1", port)))
                reader, writer = await asyncio.open_connection(
                    sock=sock, ssl=client_context(ca), server_hostname="svc.test"
                )
                if greeting:
                    assert await reader.readline() == b"tls-backend\n"
                writer.write(b"over tls")
                assert await reader.readexactly(8) == b"over tls"
                writer.close()
            await wait_for(lambda: len(files.closes()) == 2)
    assert {c["listener"]: c["source"] for c in files.closes()} == {
        "lb-pass": f"10.9.8.7:{40000 + passthrough % 1000}",
        "lb-tls": f"10.9.8.7:{40000 + terminated % 1000}",
    }
    assert tls_backend.snis == ["svc.test"]


async def test_missing_or_malformed_proxy_header_is_refused(files: GatewayFiles) -> None:
    async with EchoServer() as echo:
        port = files.add_listener("lb", echo.address, accept_proxy_protocol=True)
        files.grants.append(grant({"lb": {}}))
        async with running_gateway(files):
            assert await refused(port)  # no header at all
            for bad in (
                b"PROXY TCP4 10.9.8.7 nonsense\r\nhello",
                b"PROXY TCP4 10.9.8.7 127.0.0.1 70000 80\r\nhello",  # port out of range
                V2_SIGNATURE + bytes([0x31, 0x11, 0, 12]) + bytes(12),  # version 3
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            ):
                reader, writer = await connect(port)
                writer.write(bad)
                assert await read_until_closed(reader) == b"", bad
                writer.close()
            await wait_for(lambda: len(files.audit()) == 5)
        assert echo.connections == 0
    assert all(r["allowed"] is False and r["outcome"] == "protocol" for r in files.audit())


@pytest.mark.skipif(not Path("/usr/sbin/haproxy").exists(), reason="haproxy not installed")
async def test_haproxy_send_proxy_v2_in_front(files: GatewayFiles) -> None:
    async with EchoServer() as echo:
        port = files.add_listener("behind-lb", echo.address, accept_proxy_protocol=True)
        files.grants.append(grant({"behind-lb": {}}))
        lb_port = free_port()
        config = files.dir / "haproxy.cfg"
        config.write_text(
            "global\n"
            "  maxconn 100\n"
            "defaults\n"
            "  mode tcp\n"
            "  timeout connect 5s\n"
            "  timeout client 30s\n"
            "  timeout server 30s\n"
            "frontend front\n"
            f"  bind 127.0.0.1:{lb_port}\n"
            "  default_backend ferryman\n"
            "backend ferryman\n"
            f"  server s 127.0.0.1:{port} send-proxy-v2\n"
        )
        async with running_gateway(files):
            haproxy = await asyncio.create_subprocess_exec(
                "/usr/sbin/haproxy",
                "-db",
                "-f",
                str(config),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                await wait_for(lambda: port_in_use(lb_port) or haproxy.returncode is not None)
                assert haproxy.returncode is None, "haproxy exited"
                reader, writer = await connect(lb_port)
                client_port = writer.get_extra_info("sockname")[1]
                writer.write(b"through haproxy")
                async with asyncio.timeout(5):
                    assert await reader.readexactly(15) == b"through haproxy"
                writer.close()
                await wait_for(files.closes)
            finally:
                haproxy.terminate()
                async with asyncio.timeout(5):
                    await haproxy.wait()
    (close,) = files.closes()
    # Ferryman's peer was HAProxy; the audit names the client HAProxy accepted.
    assert close["source"] == f"127.0.0.1:{client_port}"
    assert (close["bytes_up"], close["reason"]) == (15, "normal")
