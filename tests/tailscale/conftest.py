"""Fixtures: a LocalAPI double on a real unix socket, a client for it, a TCP echo backend."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from ferryman.tailscale.localapi import LocalAPIClient
from tests.support.localapi_double import LocalAPIDouble


@pytest.fixture
async def double() -> AsyncIterator[LocalAPIDouble]:
    async with LocalAPIDouble.running() as d:
        yield d


@pytest.fixture
async def client(double: LocalAPIDouble) -> AsyncIterator[LocalAPIClient]:
    c = LocalAPIClient(double.socket_path, timeout=2.0)
    yield c
    await c.aclose()


class EchoServer:
    """A TCP server that says hello, then echoes every byte back upper-cased."""

    def __init__(self) -> None:
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.received = bytearray()
        self._writers: set[asyncio.StreamWriter] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            writer.write(b"HELLO\n")
            await writer.drain()
            while data := await reader.read(65536):
                self.received += data
                writer.write(data.upper())
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self._writers):
            w.close()
            with contextlib.suppress(ConnectionError):
                await w.wait_closed()
        await self.server.wait_closed()


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    server = EchoServer()
    await server.start()
    yield server
    await server.close()
