"""The admin listener: Prometheus ``/metrics`` with bounded labels and ``/healthz`` (SPEC §10),
scraped over real HTTP from a running gateway relaying real connections.

Metric values are checked against what the test did (connections admitted, refused, cut by a
dead backend, bytes sent) and against the audit records of the same connections.
"""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.gateway import (
    EchoServer,
    GatewayFiles,
    connect,
    free_port,
    grant,
    refused,
    roundtrip,
    running_gateway,
    started_gateway,
    wait_for,
)


def admin_files(tmp_path: Path) -> tuple[GatewayFiles, int]:
    files = GatewayFiles(tmp_path)
    port = free_port()
    files.admin_listen = f"127.0.0.1:{port}"
    return files, port


async def http_get(port: int, path: str) -> tuple[int, str, bytes]:
    """A real HTTP GET (urllib, on a thread: the gateway runs in this event loop)."""

    def get() -> tuple[int, str, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
                return resp.status, resp.headers["content-type"], resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers["content-type"], exc.read()

    return await asyncio.to_thread(get)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (name, sorted labels) → value (parsed by prometheus_client)."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(scrape: dict, name: str, **labels: str) -> float:
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_decisions_closes_bytes_and_live_connections(tmp_path: Path) -> None:
    files, admin = admin_files(tmp_path)
    async with EchoServer() as echo:
        port = files.add_listener("echo", echo.address)
        nogrant = files.add_listener("nogrant", echo.address)
        down = files.add_listener("down", f"127.0.0.1:{free_port()}", dial_timeout="2s")
        files.grants.append(grant({"echo": {}, "down": {}}))
        async with running_gateway(files):
            assert await roundtrip(port, b"ping") == b"ping"
            assert await roundtrip(port, b"hello world") == b"hello world"
            assert await refused(nogrant)
            assert await refused(down)
            await wait_for(lambda: len(files.closes()) == 3)
            reader, writer = await connect(port)  # held open: one live connection
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            status, content_type, body = await http_get(admin, "/metrics")
            writer.close()
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    text = body.decode()
    scrape = samples(text)
    refusal = next(r for r in files.audit() if r["event"] == "decision" and not r["allowed"])
    assert value(scrape, "ferryman_connections_total", listener="echo", mode="tcp", outcome="allowed") == 3
    assert value(scrape, "ferryman_connections_total", listener="down", mode="tcp", outcome="allowed") == 1
    # The refusal's outcome label is the audit record's outcome.
    outcome = refusal["outcome"]
    assert value(scrape, "ferryman_connections_total", listener="nogrant", mode="tcp", outcome=outcome) == 1
    closed = "ferryman_connections_closed_total"
    assert value(scrape, closed, listener="echo", mode="tcp", reason="normal") == 2
    assert value(scrape, closed, listener="down", mode="tcp", reason="backend_error") == 1
    assert value(scrape, "ferryman_bytes_total", listener="echo", mode="tcp", direction="up") == 15
    assert value(scrape, "ferryman_bytes_total", listener="echo", mode="tcp", direction="down") == 15
    assert value(scrape, "ferryman_connection_duration_seconds_count", listener="echo", mode="tcp") == 2
    assert (
        value(scrape, "ferryman_connection_duration_seconds_bucket", listener="echo", mode="tcp", le="+Inf")
        == 2
    )
    assert value(scrape, "ferryman_connections_active", listener="echo", mode="tcp") == 1
    assert value(scrape, "ferryman_process_resident_memory_bytes") > 0
    assert value(scrape, "ferryman_config_reloads_total", result="success") == 0
    # Bounded labels: never a user, a client address or a backend address.
    assert "dev@localhost" not in text
    assert "127.0.0.1" not in text


async def test_reloads_are_counted_and_the_admin_listener_moves(tmp_path: Path) -> None:
    files, admin = admin_files(tmp_path)
    async with EchoServer() as echo:
        files.add_listener("echo", echo.address)
        files.grants.append(grant({"echo": {}}))
        async with running_gateway(files) as gateway:
            files.config_path.write_text("this is = not [valid toml")
            assert await gateway.reload() is False
            moved = free_port()
            files.admin_listen = f"127.0.0.1:{moved}"
            files.write()
            assert await gateway.reload() is True
            status, _, body = await http_get(moved, "/metrics")
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", admin), timeout=2).close()
    assert status == 200
    scrape = samples(body.decode())
    assert value(scrape, "ferryman_config_reloads_total", result="failure") == 1
    assert value(scrape, "ferryman_config_reloads_total", result="success") == 1


async def test_healthz_is_ok_while_serving_and_503_while_draining(tmp_path: Path) -> None:
    files, admin = admin_files(tmp_path)
    async with EchoServer() as echo:
        port = files.add_listener("echo", echo.address)
        files.grants.append(grant({"echo": {}}))
        gateway = await started_gateway(files)
        status, content_type, body = await http_get(admin, "/healthz")
        assert (status, content_type) == (200, "application/json")
        health = json.loads(body)
        assert health["status"] == "ok" and health["listeners"] == {"echo": f"127.0.0.1:{port}"}
        reader, writer = await connect(port)  # keeps the drain going
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        shutdown = asyncio.ensure_future(gateway.shutdown(10))
        await wait_for(lambda: gateway.runtime.draining)
        status, _, body = await http_get(admin, "/healthz")
        assert status == 503 and json.loads(body)["status"] == "draining"
        writer.close()
        async with asyncio.timeout(10):
            await shutdown
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", admin), timeout=2).close()


async def test_unknown_paths_methods_and_garbage(tmp_path: Path) -> None:
    files, admin = admin_files(tmp_path)
    async with running_gateway(files):
        assert (await http_get(admin, "/nope"))[0] == 404
        assert (await http_get(admin, "/metrics?name[]=x"))[0] == 200  # query strings are ignored

        def raw(request: bytes) -> bytes:
            with socket.create_connection(("127.0.0.1", admin), timeout=5) as sock:
                sock.sendall(request)
                out = b""
                while chunk := sock.recv(65536):
                    out += chunk
                return out

        post = b"POST /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        answer = await asyncio.to_thread(raw, post)
        assert answer.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n") and b"allow: get" in answer.lower()
        answer = await asyncio.to_thread(raw, b"NOT HTTP AT ALL\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 ")
        # Keep-alive: two requests on one connection, both answered.
        first = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        last = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        answer = await asyncio.to_thread(raw, first + last)
        assert answer.count(b"HTTP/1.1 200 ") == 2


async def test_a_busy_admin_address_is_logged_and_the_gateway_still_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files, admin = admin_files(tmp_path)
    with socket.create_server(("127.0.0.1", admin)):
        async with EchoServer() as echo:
            port = files.add_listener("echo", echo.address)
            files.grants.append(grant({"echo": {}}))
            async with running_gateway(files):
                assert await roundtrip(port) == b"ping"
    busy = f"cannot listen on 127.0.0.1:{admin}"
    assert any(r.levelname == "ERROR" and busy in r.getMessage() for r in caplog.records)
