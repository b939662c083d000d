"""Test helpers: write a config + policy, run a real Gateway in the test's event loop, and
small real peers (echo / hold servers) to put behind it.

Nothing here fakes ferryman's own code: the gateway under test is the real one, bound to
real loopback sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferryman.app import Gateway
from ferryman.config.load import load_config

CAP = "ferryman.dev/cap/ferryman"


def toml_value(value: Any) -> str:
    """Render a value as TOML (dicts as inline tables, lists of dicts as arrays of them)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def grant(
    backends: dict[str, Any], limits: dict[str, Any] | None = None, src: list[str] | None = None
) -> dict[str, Any]:
    value: dict[str, Any] = {"backends": backends}
    if limits:
        value["limits"] = limits
    return {"src": src or ["*"], "app": {CAP: [value]}}


@dataclass
class GatewayFiles:
    """A config file and policy file in a temp dir, rewritable between reloads."""

    dir: Path
    listeners: list[dict[str, Any]] = field(default_factory=list)
    grants: list[dict[str, Any]] = field(default_factory=list)
    groups: dict[str, list[str]] = field(default_factory=dict)
    static: list[dict[str, Any]] = field(
        default_factory=lambda: [{"cidr": "127.0.0.0/8", "user": "dev@localhost", "groups": ["dev"]}]
    )
    extra: str = ""
    revalidation: str = "0"
    admin_listen: str = "off"
    """``[admin] listen`` (off unless a test asks: tests must not compete for port 9180)."""

    @property
    def config_path(self) -> Path:
        return self.dir / "ferryman.toml"

    @property
    def policy_path(self) -> Path:
        return self.dir / "policy.json"

    @property
    def audit_path(self) -> Path:
        return self.dir / "audit.jsonl"

    def add_listener(self, name: str, backend: str, **options: Any) -> int:
        port = options.pop("port", None) or free_port()
        self.listeners.append({"name": name, "listen": f"127.0.0.1:{port}", "backend": backend, **options})
        return int(port)

    def write(self) -> Path:
        lines = [
            'log_format = "json"',
            'log_level = "debug"',
            'policy_file = "policy.json"',
            "[audit]",
            f'file = "{self.audit_path}"',
            "[revalidation]",
            f'interval = "{self.revalidation}"',
            "[shutdown]",
            'grace = "2s"',
        ]
        if "[admin]" not in self.extra:
            lines += ["[admin]", f"listen = {toml_value(self.admin_listen)}"]
        for entry in self.static:
            lines.append("[[identity.static]]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in entry.items())
        for listener in self.listeners:
            lines.append("[[listeners]]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in listener.items())
        text = "\n".join(lines) + "\n" + self.extra
        self.config_path.write_text(text)
        self.write_policy()
        return self.config_path

    def write_policy(self) -> None:
        self.policy_path.write_text(json.dumps({"groups": self.groups, "grants": self.grants}, indent=1))

    def audit(self) -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines() if line.strip()]

    def closes(self) -> list[dict[str, Any]]:
        return [r for r in self.audit() if r["event"] == "close"]


@contextlib.asynccontextmanager
async def running_gateway(files: GatewayFiles) -> AsyncIterator[Gateway]:
    files.write()
    gateway = Gateway(load_config(files.config_path), config_path=str(files.config_path))
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.shutdown(0.5)


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something listens on ``port``, found by binding rather than connecting (a probe
    connection would travel through a proxy under test and show up in its audit)."""
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return True
        return False


async def started_gateway(files: GatewayFiles) -> Gateway:
    """A started gateway the test shuts down itself (to watch the shutdown)."""
    files.write()
    gateway = Gateway(load_config(files.config_path), config_path=str(files.config_path))
    await gateway.start()
    return gateway


async def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy (or fail after ``timeout``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        await asyncio.sleep(interval)


class EchoServer:
    """A real TCP echo server; optionally echoes only after the client half-closes."""

    def __init__(self, *, mode: str = "echo") -> None:
        self.mode = mode
        self.server: asyncio.Server | None = None
        self.port = 0
        self.connections = 0
        self.received = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> EchoServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            if self.mode == "after_eof":
                # Reply only once the client has shut its write side: tests half-close.
                data = await reader.read()
                self.received += len(data)
                for _ in range(50):
                    writer.write(b"reply:" + data)
                    await writer.drain()
                writer.close()
                return
            if self.mode == "hold":
                await reader.read()
                return
            while data := await reader.read(65536):
                self.received += len(data)
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def roundtrip(port: int, payload: bytes = b"ping", timeout: float = 5.0) -> bytes:
    reader, writer = await connect(port)
    try:
        writer.write(payload)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await reader.readexactly(len(payload))
    finally:
        writer.close()


async def refused(port: int, timeout: float = 5.0) -> bool:
    """True when the gateway closes the connection without sending a single byte."""
    reader, writer = await connect(port)
    try:
        writer.write(b"hello?")
        async with asyncio.timeout(timeout):
            data = await reader.read(100)
        return data == b""
    except ConnectionResetError:
        return True
    finally:
        writer.close()


async def read_until_closed(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """Everything until the peer closes; a cut connection may end in a reset (unread data)."""
    out = bytearray()
    async with asyncio.timeout(timeout):
        try:
            while chunk := await reader.read(65536):
                out += chunk
        except ConnectionResetError:
            pass
    return bytes(out)
