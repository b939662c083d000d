"""LocalAPIClient against the LocalAPI double over a real unix socket (and a raw peer for bytes)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable

import pytest
import trustme

from ferryman.errors import BackendUnavailable
from ferryman.tailscale.apitype import DecodeError
from ferryman.tailscale.errors import (
    DialRefused,
    LocalAPIAccessDenied,
    LocalAPIError,
    LocalAPIProtocolError,
    LocalAPITimeout,
    LocalAPIUnreachable,
    PeerNotFound,
)
from ferryman.tailscale.localapi import LocalAPIClient
from tests.support.localapi_double import LocalAPIDouble, short_socket_dir
from tests.tailscale.conftest import EchoServer

CAP = "ferryman.dev/cap/ferryman"

WHOIS_BYTES = (
    b"GET /localapi/v0/whois?addr=100.101.102.103%3A4567 HTTP/1.1\r\n"
    b"Host: local-tailscaled.sock\r\n"
    b"User-Agent: ferryman-localapi/1\r\n"
    b"Tailscale-Cap: 127\r\n"
    b"\r\n"
)
DIAL_BYTES = (
    b"POST /localapi/v0/dial HTTP/1.1\r\n"
    b"Host: local-tailscaled.sock\r\n"
    b"User-Agent: ferryman-localapi/1\r\n"
    b"Tailscale-Cap: 127\r\n"
    b"Upgrade: ts-dial\r\n"
    b"Connection: upgrade\r\n"
    b"Dial-Host: db.tail1234.ts.net\r\n"
    b"Dial-Port: 5432\r\n"
    b"Dial-Network: tcp\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)


async def _capture(answer: bytes, call: Callable[[LocalAPIClient], object]) -> bytes:
    """Run ``call`` against a raw unix server that records the request and sends ``answer``."""
    got = bytearray()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while b"\r\n\r\n" not in got:
            got.extend(await reader.read(4096))
        writer.write(answer)
        await writer.drain()
        writer.close()

    with short_socket_dir() as d:
        path = os.path.join(d, "s")
        server = await asyncio.start_unix_server(handle, path)
        try:
            result = call(LocalAPIClient(path, timeout=2))
            assert asyncio.iscoroutine(result)
            out = await result
            if hasattr(out, "close"):
                out.close()
        finally:
            server.close()
            await server.wait_closed()
    return bytes(got)


async def test_whois_sends_exactly_what_the_go_client_sends() -> None:
    answer = b'HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{"Node":{}}'
    got = await _capture(answer, lambda c: c.whois("100.101.102.103:4567"))
    assert got == WHOIS_BYTES


async def test_dial_sends_exactly_what_the_go_client_sends() -> None:
    answer = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: ts-dial\r\n\r\n"
    got = await _capture(answer, lambda c: c.dial("db.tail1234.ts.net", 5432))
    assert got == DIAL_BYTES


async def test_whois_returns_node_profile_and_capmap(double: LocalAPIDouble, client: LocalAPIClient) -> None:
    grant: dict[str, object] = {"backends": {"pg-main": {}}}
    double.add_peer("100.101.102.103", login="alice@example.com", host="alice-laptop", cap_map={CAP: [grant]})
    resp = await client.whois("100.101.102.103:4567")
    assert resp.node.name == "alice-laptop.tail1234.ts.net."
    assert resp.node.computed_name == "alice-laptop"
    assert "100.101.102.103/32" in resp.node.addresses
    assert resp.user_profile is not None
    assert (resp.user_profile.login_name, resp.user_profile.display_name) == ("alice@example.com", "Alice")
    assert resp.cap_map[CAP] == (grant,)
    req = double.requests[-1]
    assert req.header("host") == "local-tailscaled.sock"
    assert req.header("tailscale-cap") == "127"
    assert req.query == {"addr": ["100.101.102.103:4567"]}


async def test_whois_ipv6_address_is_query_escaped(double: LocalAPIDouble, client: LocalAPIClient) -> None:
    double.add_peer("fd7a:115c:a1e0::5")
    resp = await client.whois("[fd7a:115c:a1e0::5]:8080")
    assert resp.node.id == 1
    assert double.requests[-1].target == "/localapi/v0/whois?addr=%5Bfd7a%3A115c%3Aa1e0%3A%3A5%5D%3A8080"


async def test_large_answers_arrive_chunked_and_decode(
    double: LocalAPIDouble, client: LocalAPIClient
) -> None:
    values = [{"backends": {f"svc-{i}": {}}, "note": "x" * 100} for i in range(40)]
    double.add_peer("100.64.1.1", cap_map={CAP: values})
    resp = await client.whois("100.64.1.1:1")
    assert resp.cap_map[CAP] == tuple(values)


async def test_whois_unknown_peer_is_peer_not_found(double: LocalAPIDouble, client: LocalAPIClient) -> None:
    with pytest.raises(PeerNotFound) as info:
        await client.whois("100.1.2.3:4567")
    assert (info.value.status, info.value.error) == (404, "no match for IP:port")


async def test_whois_forbidden_is_access_denied() -> None:
    async with LocalAPIDouble.running(permit_read=False) as d:
        with pytest.raises(LocalAPIAccessDenied) as info:
            await LocalAPIClient(d.socket_path).whois("100.1.2.3:4567")
    assert (info.value.status, info.value.error) == (403, "whois access denied")


async def test_server_error_keeps_status_and_body(double: LocalAPIDouble, client: LocalAPIClient) -> None:
    double.fail("whois", status=500, body=b'{"error":"backend is not running"}')
    with pytest.raises(LocalAPIError) as info:
        await client.whois("100.1.2.3:4567")
    assert info.value.status == 500 and info.value.error == "backend is not running"


async def test_missing_socket_is_unreachable() -> None:
    with short_socket_dir() as d:
        path = os.path.join(d, "nope.sock")
        with pytest.raises(LocalAPIUnreachable) as info:
            await LocalAPIClient(path).whois("100.1.2.3:4567")
    assert info.value.socket_path == path and "No such file" in info.value.detail


async def test_stale_socket_file_is_unreachable() -> None:
    with short_socket_dir() as d:
        path = os.path.join(d, "stale.sock")
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(path)  # bound, never listening: connect() is refused
            with pytest.raises(LocalAPIUnreachable, match="refused"):
                await LocalAPIClient(path).whois("100.1.2.3:4567")


async def test_slow_answer_times_out(double: LocalAPIDouble) -> None:
    double.add_peer("100.64.0.9")
    double.delays["whois"] = 5.0
    client = LocalAPIClient(double.socket_path, timeout=5.0)
    start = time.monotonic()
    with pytest.raises(LocalAPITimeout) as info:
        await client.whois("100.64.0.9:1", timeout=0.2)
    assert time.monotonic() - start < 2
    assert info.value.timeout == 0.2 and info.value.operation == "whois"


async def test_garbage_bytes_are_a_protocol_error(double: LocalAPIDouble, client: LocalAPIClient) -> None:
    double.fail("whois", raw=b"\x16\x03\x01 not http at all\r\n\r\n")
    with pytest.raises(LocalAPIProtocolError, match="malformed HTTP"):
        await client.whois("100.1.2.3:4567")


async def test_garbage_json_is_a_decode_error(double: LocalAPIDouble, client: LocalAPIClient) -> None:
    double.fail("whois", status=200, body=b'{"Node": {"ID": 1', content_type="application/json")
    with pytest.raises(DecodeError, match="not JSON"):
        await client.whois("100.1.2.3:4567")


async def test_double_is_strict_about_host(double: LocalAPIDouble) -> None:
    reader, writer = await asyncio.open_unix_connection(double.socket_path)
    writer.write(b"GET /localapi/v0/whois?addr=1.2.3.4 HTTP/1.1\r\nHost: localhost\r\n\r\n")
    answer = await reader.read(4096)
    writer.close()
    await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 403 ") and answer.endswith(b"invalid localapi request\n")


# -- dial ----------------------------------------------------------------------------------------


async def test_dial_pipes_bytes_both_ways(
    double: LocalAPIDouble, client: LocalAPIClient, echo: EchoServer
) -> None:
    double.dial_routes["db.tail1234.ts.net"] = ("127.0.0.1", echo.port)
    conn = await client.dial("db.tail1234.ts.net", 5432)
    reader, writer = await conn.open_streams()
    try:
        assert await reader.readexactly(6) == b"HELLO\n"
        payload = os.urandom(1 << 20).hex().encode()[: 1 << 20].lower()
        writer.write(payload)
        await writer.drain()
        assert await reader.readexactly(len(payload)) == payload.upper()
    finally:
        writer.close()
        await writer.wait_closed()
    req = double.requests[-1]
    assert (req.method, req.header("dial-host"), req.header("dial-port")) == (
        "POST",
        "db.tail1234.ts.net",
        "5432",
    )
    assert req.header("dial-network") == "tcp" and req.header("connection") == "upgrade"


async def test_bytes_in_the_101_segment_are_handed_over(
    double: LocalAPIDouble, client: LocalAPIClient, echo: EchoServer
) -> None:
    double.dial_routes["db"] = ("127.0.0.1", echo.port)
    double.dial_greeting = b"GREETING:"
    conn = await client.dial("db", 5432)
    assert conn.initial_data.startswith(b"GREETING:")
    reader, writer = await conn.open_streams()
    try:
        assert await reader.readexactly(15) == b"GREETING:HELLO\n"
        writer.write(b"ping")
        await writer.drain()
        assert await reader.readexactly(4) == b"PING"
    finally:
        writer.close()
        await writer.wait_closed()


async def test_raw_socket_and_initial_data_for_a_splice_relay(
    double: LocalAPIDouble, client: LocalAPIClient, echo: EchoServer
) -> None:
    double.dial_routes["db"] = ("127.0.0.1", echo.port)
    double.dial_greeting = b">"
    conn = await client.dial("db", 1)
    loop = asyncio.get_running_loop()
    try:
        got = bytearray(conn.initial_data)
        while len(got) < 7:
            got += await loop.sock_recv(conn.sock, 100)
        assert bytes(got) == b">HELLO\n"
        await loop.sock_sendall(conn.sock, b"abc")
        assert await loop.sock_recv(conn.sock, 100) == b"ABC"
    finally:
        conn.close()


async def test_dial_failure_is_dial_refused_with_status_and_body(
    double: LocalAPIDouble, client: LocalAPIClient
) -> None:
    double.dial_error = "dial tcp 100.64.0.7:5432: connect: no route to host"
    with pytest.raises(DialRefused) as info:
        await client.dial("100.64.0.7", 5432)
    err = info.value
    assert issubclass(DialRefused, BackendUnavailable) and err.kind == "backend_error"
    assert err.status == 502
    assert err.body == b"dial failure: dial tcp 100.64.0.7:5432: connect: no route to host\n"
    assert "502 Bad Gateway" in str(err) and err.dial_self is None


async def test_dial_to_a_closed_port_reports_tailscaled_reason(
    double: LocalAPIDouble, client: LocalAPIClient
) -> None:
    with socket.socket() as s:  # reserve a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with pytest.raises(DialRefused, match="connection refused"):
            await client.dial("127.0.0.1", port)


async def test_dial_self_answer_is_not_followed(double: LocalAPIDouble, client: LocalAPIClient) -> None:
    double.dial_self = "203.0.113.5:443"
    with pytest.raises(DialRefused) as info:
        await client.dial("example.com", 443)
    assert info.value.status == 200 and info.value.dial_self == "203.0.113.5:443"


async def test_dial_arguments_are_checked(client: LocalAPIClient) -> None:
    with pytest.raises(ValueError):
        await client.dial("db", 0)
    with pytest.raises(ValueError):
        await client.dial("db\r\nX-Evil: 1", 80)


# -- certificates --------------------------------------------------------------------------------


async def test_cert_pair_is_split_key_first(double: LocalAPIDouble, client: LocalAPIClient) -> None:
    leaf = trustme.CA().issue_cert("gw.tail1234.ts.net")
    key_pem = leaf.private_key_pem.bytes()
    cert_pem = b"".join(p.bytes() for p in leaf.cert_chain_pems)
    double.set_cert("gw.tail1234.ts.net", cert_pem, key_pem)
    got_cert, got_key = await client.cert_pair("gw.tail1234.ts.net")
    assert (got_cert, got_key) == (cert_pem, key_pem)
    assert double.requests[-1].target == "/localapi/v0/cert/gw.tail1234.ts.net?type=pair&min_validity=0s"


async def test_cert_errors(client: LocalAPIClient) -> None:
    with pytest.raises(LocalAPIError) as info:
        await client.cert_pair("other.tail1234.ts.net")
    assert info.value.status == 500 and "invalid domain" in info.value.error
    with pytest.raises(ValueError):
        await client.cert_pair("../../etc/passwd")
    async with LocalAPIDouble.running(permit_cert=False) as d:
        with pytest.raises(LocalAPIAccessDenied, match="cert access denied"):
            await LocalAPIClient(d.socket_path).cert_pair("gw.tail1234.ts.net")


async def test_cancelled_call_leaves_nothing_open(double: LocalAPIDouble, client: LocalAPIClient) -> None:
    double.delays["whois"] = 5.0
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):  # the caller's own deadline cancels the call
            await client.whois("100.1.2.3:4567", timeout=None)
    # filterwarnings=error turns a leaked socket (ResourceWarning) into a failure


async def test_whois_reuses_a_keep_alive_connection_and_retries_a_stale_one() -> None:
    import tempfile

    from tests.support.localapi_double import LocalAPIDouble as Double

    path = tempfile.mkdtemp(prefix="ts-") + "/s.sock"  # short: unix socket paths are limited
    async with Double(path) as double:
        double.add_peer("100.64.0.9", login="alice@example.com")
        client = LocalAPIClient(double.socket_path, timeout=2.0)
        for _ in range(5):
            assert (await client.whois("100.64.0.9:1234")).user_profile is not None
        assert double.connections == 1
    # tailscaled restarts: the pooled connection is dead; the next call retries on a new one.
    async with Double(path) as restarted:
        restarted.add_peer("100.64.0.9", login="alice@example.com")
        assert (await client.whois("100.64.0.9:1234")).user_profile is not None
        assert restarted.connections == 1
    await client.aclose()
