"""Hostile or broken clients: each gets the right FATAL (or a silent close) and the gateway
serves the next client normally (SPEC §5 step 1, CVE-2021-23214 class)."""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path

import asyncpg
import pytest

from tests.pg.conftest import APPDB, listener_port, pg_files, pg_grant
from tests.support.gateway import running_gateway, wait_for
from tests.support.pgcluster import PgCluster

pytestmark = pytest.mark.pg

SSL_REQUEST = struct.pack("!ii", 8, 80877103)


def startup(params: dict[str, str], version: int = 196608) -> bytes:
    body = struct.pack("!i", version) + b"".join(
        k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()
    )
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


async def exchange(port: int, *chunks: bytes, pause: float = 0.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)
        out = b""
        async with asyncio.timeout(10):
            while data := await reader.read(65536):
                out += data
        return out
    except ConnectionResetError:
        return b"<reset>"
    finally:
        writer.close()


def fatal_code(reply: bytes) -> str | None:
    """SQLSTATE of the first ErrorResponse in ``reply``."""
    i = reply.find(b"E")
    while i >= 0:
        body = reply[i + 5 : i + 1 + struct.unpack("!i", reply[i + 1 : i + 5])[0]]
        for field in body.split(b"\0"):
            if field[:1] == b"C":
                return field[1:].decode()
        i = reply.find(b"E", i + 1)
    return None


@pytest.mark.parametrize(
    ("name", "chunks", "expect"),
    [
        ("oversized startup", [struct.pack("!ii", 1_000_000, 196608) + b"x" * 100], "08P01"),
        ("garbage", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"], "08P01"),
        ("unknown protocol version", [startup({"user": "x"}, version=(9 << 16))], "0A000"),
        ("truncated startup", [struct.pack("!i", 40) + b"\x00\x03"], None),
    ],
)
async def test_abuse_is_answered_and_next_client_is_served(
    tmp_path: Path, cluster: PgCluster, name: str, chunks: list[bytes], expect: str | None
) -> None:
    files = pg_files(tmp_path, cluster, prefix="ab_", tls_mode="off", postgres={"handshake_timeout": "1s"})
    files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}))
    async with running_gateway(files):
        port = listener_port(files)
        reply = await exchange(port, *chunks)
        if expect is None:
            assert reply in (b"", b"<reset>")
        else:
            assert fatal_code(reply) == expect, (name, reply)
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="x", database=APPDB, ssl=False)
        assert await conn.fetchval("select 1") == 1
        await conn.close()


@pytest.fixture(scope="module")
def server_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("pg.test")
    d = tmp_path_factory.mktemp("certs")
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    return str(d / "cert.pem"), str(d / "key.pem")


@pytest.mark.parametrize("later", [False, True])
async def test_plaintext_pipelined_behind_ssl_request_is_never_processed(
    tmp_path: Path, cluster: PgCluster, server_cert: tuple[str, str], later: bool
) -> None:
    """CVE-2021-23214 class: after we answer S, clear-text bytes must not be taken as a
    StartupMessage, whether they came in the same segment or after our answer."""
    cert, key = server_cert
    files = pg_files(tmp_path, cluster, prefix="ab_", tls_mode="optional", cert_file=cert, key_file=key)
    files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}))
    async with running_gateway(files):
        port = listener_port(files)
        attack = startup({"user": "x", "database": APPDB})
        chunks = [SSL_REQUEST, attack] if later else [SSL_REQUEST + attack]
        reply = await exchange(port, *chunks, pause=0.2 if later else 0.0)
        assert b"R\0\0\0\x08\0\0\0\0" not in reply  # never AuthenticationOk
        if not later:
            assert reply[:1] == b"S"
            assert fatal_code(reply[1:]) == "08P01"
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="x", database=APPDB, ssl=False)
        assert await conn.fetchval("select 1") == 1
        await conn.close()
    assert not [r for r in files.audit() if r.get("allowed")][1:]  # only the good client got in


async def test_ssl_refused_then_plain_startup_works(tmp_path: Path, cluster: PgCluster) -> None:
    files = pg_files(tmp_path, cluster, prefix="ab_")
    files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}))
    async with running_gateway(files):
        reader, writer = await asyncio.open_connection("127.0.0.1", listener_port(files))
        writer.write(SSL_REQUEST)
        assert await reader.readexactly(1) == b"N"
        writer.write(struct.pack("!ii", 8, 80877104))  # GSSENCRequest → N, keep reading
        assert await reader.readexactly(1) == b"N"
        writer.write(startup({"user": "x", "database": APPDB}))
        head = await reader.readexactly(9)
        assert head[:1] == b"R" and head[5:9] == b"\0\0\0\0"  # AuthenticationOk
        writer.close()


async def test_handshake_timeout(tmp_path: Path, cluster: PgCluster) -> None:
    files = pg_files(tmp_path, cluster, prefix="ab_", postgres={"handshake_timeout": "500ms"})
    async with running_gateway(files):
        loop = asyncio.get_running_loop()
        started = loop.time()
        reader, writer = await asyncio.open_connection("127.0.0.1", listener_port(files))
        async with asyncio.timeout(5):
            assert await reader.read() == b""
        assert loop.time() - started < 3
        writer.close()


async def test_handshake_failures_are_audited(tmp_path: Path, cluster: PgCluster) -> None:
    """A start-up that never completes still leaves a decision record, as every refusal does."""
    files = pg_files(tmp_path, cluster, prefix="ab_", postgres={"handshake_timeout": "500ms"})
    async with running_gateway(files):
        port = listener_port(files)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)  # says nothing
        async with asyncio.timeout(5):
            assert await reader.read() == b""
        writer.close()
        assert await exchange(port, struct.pack("!i", 40) + b"\x00\x03") in (b"", b"<reset>")  # cut short
        await wait_for(lambda: len(files.audit()) == 2)
    silent, truncated = files.audit()
    assert silent["allowed"] is False and silent["outcome"] == "protocol"
    assert silent["reason"] == "no complete start-up within 0.5s"
    assert truncated["outcome"] == "protocol" and "start-up" in truncated["reason"]


async def test_a_client_reset_during_a_backend_refusal_does_not_keep_its_max_conns_slot(
    tmp_path: Path, cluster: PgCluster
) -> None:
    """The backend refuses the login (22023: bad client_encoding) and the client is already gone
    (RST): the refusal is still audited and the connection's max_conns slot freed, so the next
    connection of the same person is not refused with 53300."""
    files = pg_files(tmp_path, cluster, prefix="ab_")
    files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}, limits={"max_conns": 1}))
    async with running_gateway(files) as gateway:
        port = listener_port(files)
        bad = startup({"user": "x", "database": APPDB, "client_encoding": "nope"})
        for attempt in (1, 2):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.sendall(bad)
            sock.close()  # RST before the gateway answers
            await wait_for(lambda attempt=attempt: len(files.audit()) == attempt)
        assert gateway.runtime.tracker.connections("dev@localhost") == 0
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="x", database=APPDB, ssl=False)
        assert await conn.fetchval("select 1") == 1
        await conn.close()
    refusals = [r for r in files.audit() if r["event"] == "decision" and not r["allowed"]]
    assert len(refusals) == 2 and all("client_encoding" in r["reason"] for r in refusals)
