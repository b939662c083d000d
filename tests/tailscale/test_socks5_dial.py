"""``backend_via_tailscale`` through a SOCKS5 server (``[tailscale] socks5``), as tailscaled's
``--socks5-server`` offers it: a real SOCKS5 server (Debian's microsocks) between the gateway
and an echo backend; the name is resolved by the proxy, not by the gateway."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ferryman.config.load import load_config
from ferryman.errors import BackendUnavailable, ConfigError
from ferryman.tailscale.socks5 import dial_socks5
from tests.support.gateway import CAP, EchoServer, GatewayFiles, refused, roundtrip, running_gateway, wait_for
from tests.support.localapi_double import LocalAPIDouble
from tests.tailscale.test_gateway_tailscale import tailscale_files

pytestmark = pytest.mark.skipif(shutil.which("microsocks") is None, reason="microsocks not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def socks() -> AsyncIterator[str]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        "microsocks", "-i", "127.0.0.1", "-p", str(port),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with asyncio.timeout(10):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.02)
                    continue
                writer.close()
                break
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        await proc.wait()


@pytest.fixture
async def double() -> AsyncIterator[LocalAPIDouble]:
    async with LocalAPIDouble.running() as d:
        yield d


def with_socks5(files: GatewayFiles, address: str) -> None:
    files.extra += f"socks5 = {json.dumps(address)}\n"


async def test_dial_through_socks5_resolves_names_at_the_proxy(socks: str) -> None:
    async with EchoServer() as echo:
        # "localhost" is resolved by the SOCKS5 server (rdns), as tailscaled resolves MagicDNS.
        sock = await dial_socks5(socks, "localhost", echo.port, 5)
        with sock:
            assert sock.getblocking() is False
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(sock, b"hello")
            async with asyncio.timeout(5):
                assert await loop.sock_recv(sock, 5) == b"hello"


async def test_socks5_failures_are_backend_unavailable(socks: str) -> None:
    closed = free_port()
    with pytest.raises(BackendUnavailable, match=rf"dial 127\.0\.0\.1:{closed} via SOCKS5 {socks}"):
        await dial_socks5(socks, "127.0.0.1", closed, 5)  # the proxy reports connection refused
    down = f"127.0.0.1:{free_port()}"
    with pytest.raises(BackendUnavailable, match=f"SOCKS5 server {down} is not reachable"):
        await dial_socks5(down, "127.0.0.1", closed, 5)


async def test_listener_dials_backend_through_socks5(tmp_path: Path, double, socks: str) -> None:
    files = tailscale_files(tmp_path, double)
    with_socks5(files, socks)
    async with EchoServer() as echo:
        port = files.add_listener("ts", f"localhost:{echo.port}", backend_via_tailscale=True)
        double.add_peer("127.0.0.1", cap_map={CAP: [{"backends": {"ts": {}}}]})
        async with running_gateway(files):
            payload = bytes(range(256)) * 400
            assert await roundtrip(port, payload) == payload
            await wait_for(files.closes)
    assert not [r for r in double.requests if r.endpoint == "dial"]  # SOCKS5, not ts-dial
    close = files.closes()[0]
    assert close["reason"] == "normal"
    assert close["bytes_up"] == close["bytes_down"] == len(payload)


async def test_socks5_server_down_is_backend_error(tmp_path: Path, double) -> None:
    files = tailscale_files(tmp_path, double)
    down = f"127.0.0.1:{free_port()}"
    with_socks5(files, down)
    port = files.add_listener("ts", "db.tail1234.ts.net:5432", backend_via_tailscale=True)
    double.add_peer("127.0.0.1", cap_map={CAP: [{"backends": {"ts": {}}}]})
    async with running_gateway(files):
        assert await refused(port)
        await wait_for(files.closes)
    close = files.closes()[0]
    assert close["reason"] == "backend_error"
    assert f"SOCKS5 server {down} is not reachable" in close["detail"]


def test_socks5_address_is_validated(tmp_path: Path) -> None:
    config = tmp_path / "f.toml"
    config.write_text('[tailscale]\nsocks5 = "1055"\n')
    with pytest.raises(ConfigError, match="socks5"):
        load_config(config)
