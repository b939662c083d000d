"""The PROXY protocol on PostgreSQL listeners (SPEC §6, for ``postgres`` as for ``tcp``):

* ``proxy_protocol = "v1" | "v2"`` puts a header naming the client in front of every backend
  connection made for a client -- its login and its cancel requests. The backend here is a hop
  written in the test in front of a real PostgreSQL 15 cluster: it reads an optional header
  (parsed by hand, independently of ``ferryman.proxyproto``) and relays the rest, as CockroachDB
  does with ``--accept-proxy-protocol-headers``; the provisioner's own admin connections arrive
  without one.
* ``accept_proxy_protocol = true`` with a real HAProxy (Debian's) in front sending v2: the
  address in the header is the client's for static identity and audit; a client that sends no
  header is refused with 08P01 and audited.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import shutil
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import psycopg
import pytest

from tests.pg.conftest import APPDB, listener_port, pg_files, pg_grant
from tests.support.gateway import free_port, port_in_use, running_gateway, wait_for
from tests.support.pgcluster import PgCluster

pytestmark = pytest.mark.pg

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
HAPROXY = "/usr/sbin/haproxy"


@dataclass
class Header:
    version: int
    src: tuple[str, int]
    dst: tuple[str, int]


def parse_header(data: bytes) -> tuple[Header, int] | None:
    """A TCP4/TCP6 PROXY header at the start of ``data``: (header, its length), or None if the
    data does not start with one. Raises ValueError for a malformed one."""
    if data.startswith(b"PROXY "):
        end = data.index(b"\r\n")
        proto, src, dst, sport, dport = data[6:end].decode().split(" ")
        assert proto in ("TCP4", "TCP6")
        return Header(1, (src, int(sport)), (dst, int(dport))), end + 2
    if data.startswith(V2_SIGNATURE):
        ver_cmd, fam, length = data[12], data[13], struct.unpack("!H", data[14:16])[0]
        if ver_cmd != 0x21:
            raise ValueError(f"version/command byte {ver_cmd:#x}")
        body = data[16 : 16 + length]
        if fam == 0x11:
            src, dst = (str(ipaddress.IPv4Address(body[i : i + 4])) for i in (0, 4))
            sport, dport = struct.unpack("!HH", body[8:12])
        elif fam == 0x21:
            src, dst = (str(ipaddress.IPv6Address(body[i : i + 16])) for i in (0, 16))
            sport, dport = struct.unpack("!HH", body[32:36])
        else:
            raise ValueError(f"family byte {fam:#x}")
        return Header(2, (src, sport), (dst, dport)), 16 + length
    return None


@dataclass
class ProxyAwareHop:
    """Accepts connections with or without a PROXY header, records the headers, relays to
    PostgreSQL."""

    upstream: int
    headers: list[Header] = field(default_factory=list)
    plain: int = 0
    port: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.writers.append(writer)
        first = await reader.read(65536)
        while first and (first.startswith(b"PROXY ") or first.startswith(V2_SIGNATURE)):
            if (b"\r\n" in first) if first.startswith(b"PROXY ") else len(first) >= 16:
                break
            first += await reader.read(65536)  # a header split across reads
        parsed = parse_header(first)
        if parsed is None:
            self.plain += 1
        else:
            header, length = parsed
            self.headers.append(header)
            first = first[length:]
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        self.writers.append(up_writer)
        up_writer.write(first)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(OSError):
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@contextlib.asynccontextmanager
async def hop_in_front_of(cluster: PgCluster) -> AsyncIterator[ProxyAwareHop]:
    hop = ProxyAwareHop(cluster.port)
    server = await asyncio.start_server(hop.handle, "127.0.0.1", 0)
    hop.port = server.sockets[0].getsockname()[1]
    try:
        yield hop
    finally:
        server.close()
        for writer in hop.writers:
            writer.close()
        for task in hop.tasks:
            task.cancel()
        await asyncio.gather(*hop.tasks, return_exceptions=True)
        await server.wait_closed()


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_backend_connections_carry_the_clients_address(
    tmp_path: Path, cluster: PgCluster, version: str
) -> None:
    async with hop_in_front_of(cluster) as hop:
        files = pg_files(tmp_path, cluster, prefix=f"pp{version}_", proxy_protocol=version)
        files.listeners[0]["backend"] = f"127.0.0.1:{hop.port}"
        files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}))
        async with running_gateway(files):
            port = listener_port(files)
            conn = await asyncpg.connect(host="127.0.0.1", port=port, user="x", database=APPDB, ssl=False)
            try:
                assert await conn.fetchval("select current_database()") == APPDB
                # asyncpg cancels a timed-out query with a CancelRequest on a new connection.
                with pytest.raises(asyncio.TimeoutError):
                    await conn.execute("select pg_sleep(30)", timeout=0.5)
                assert await conn.fetchval("select 1") == 1  # the session survived the cancel
            finally:
                await conn.close()
            await wait_for(lambda: files.closes() and len(hop.headers) == 2)
    (close,) = files.closes()
    login, cancel = hop.headers
    assert {login.version, cancel.version} == {int(version[1])}
    # The login's header names the client the gateway audited, and the address it dialled.
    assert f"{login.src[0]}:{login.src[1]}" == close["source"]
    assert login.dst == ("127.0.0.1", port)
    # The cancel request came on another client connection: its own source port.
    assert cancel.src[0] == "127.0.0.1" and cancel.src[1] != login.src[1]
    assert cancel.dst == ("127.0.0.1", port)
    assert hop.plain >= 1  # the provisioner's admin connections: no header


@contextlib.asynccontextmanager
async def haproxy_in_front(tmp_path: Path, port: int, source: str) -> AsyncIterator[int]:
    """Debian's HAProxy on a free port, sending PROXY v2 to ``port`` from ``source``."""
    lb_port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        "global\n  maxconn 100\n"
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n"
        f"frontend front\n  bind 127.0.0.1:{lb_port}\n  default_backend ferryman\n"
        f"backend ferryman\n  server s 127.0.0.1:{port} send-proxy-v2 source {source}\n"
    )
    proc = await asyncio.create_subprocess_exec(
        HAPROXY, "-db", "-f", str(config), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        await wait_for(lambda: port_in_use(lb_port) or proc.returncode is not None)
        assert proc.returncode is None, "haproxy exited"
        yield lb_port
    finally:
        proc.terminate()
        async with asyncio.timeout(5):
            await proc.wait()


@pytest.mark.skipif(shutil.which(HAPROXY) is None, reason="haproxy not installed")
async def test_haproxy_in_front_names_the_client_for_identity_and_audit(
    tmp_path: Path, cluster: PgCluster
) -> None:
    files = pg_files(tmp_path, cluster, prefix="ppa_", accept_proxy_protocol=True)
    # HAProxy dials the gateway from 127.0.0.9, an identity with no grant: only if the gateway
    # uses the address in the header (the client's, 127.0.0.1) is the connection admitted.
    files.static = [
        {"cidr": "127.0.0.9/32", "user": "lb@example.com"},
        {"cidr": "127.0.0.0/8", "user": "alice@example.com"},
    ]
    files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}, src=["alice@example.com"]))
    async with running_gateway(files):
        port = listener_port(files)
        async with haproxy_in_front(tmp_path, port, "127.0.0.9") as lb_port:
            dsn = f"host=127.0.0.1 port={lb_port} dbname={APPDB} user=x sslmode=disable connect_timeout=10"
            async with await psycopg.AsyncConnection.connect(dsn) as conn:
                cur = await conn.execute("select current_user, current_database()")
                role, database = await cur.fetchone() or (None, None)
        await wait_for(files.closes)
    (close,) = files.closes()
    assert close["user"] == "alice@example.com" and close["reason"] == "normal"
    assert close["source"].startswith("127.0.0.1:")
    assert database == APPDB and str(role).startswith("ppa_")


async def test_a_client_without_header_gets_08p01_and_the_next_one_is_served(
    tmp_path: Path, cluster: PgCluster
) -> None:
    files = pg_files(tmp_path, cluster, prefix="ppm_", accept_proxy_protocol=True)
    files.static.append({"cidr": "10.0.0.0/8", "user": "dev@localhost"})
    files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}))
    async with running_gateway(files):
        port = listener_port(files)
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncpg.connect(host="127.0.0.1", port=port, user="x", database=APPDB, ssl=False)
        assert info.value.sqlstate == "08P01"
        assert "PROXY" in str(info.value)
        # A client behind a correct header is served by the same listener right after.
        # (asyncio: the gateway runs in this test's event loop.)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        addresses = socket.inet_aton("10.1.2.3") + socket.inet_aton("127.0.0.1")
        body = addresses + struct.pack("!HH", 40123, port)
        startup = b"user\x00x\x00database\x00" + APPDB.encode() + b"\x00\x00"
        writer.write(V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body)
        writer.write(struct.pack("!ii", 8 + len(startup), 196608) + startup)
        answer = b""
        async with asyncio.timeout(10):
            while b"Z\x00\x00\x00\x05" not in answer:  # ReadyForQuery
                chunk = await reader.read(65536)
                assert chunk, answer
                answer += chunk
        assert answer[:1] == b"R"  # AuthenticationOk first
        writer.write(b"X\x00\x00\x00\x04")  # Terminate
        writer.close()
        await wait_for(lambda: len(files.closes()) == 1)
    refusal = next(r for r in files.audit() if r["event"] == "decision" and not r["allowed"])
    assert refusal["outcome"] == "protocol" and refusal["source"].startswith("127.0.0.1:")
    assert files.closes()[0]["source"] == "10.1.2.3:40123"
