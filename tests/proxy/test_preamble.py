"""Reading a load balancer's PROXY header off a raw socket (``proxy.preamble.read_proxy_header``)
and its bound on TCP listeners, with real sockets: the function on a loopback connection, then
a real gateway.

What must hold: only the header is consumed, however it is split into segments (the bytes after
it -- a TLS ClientHello, a client's payload -- stay in the socket for the next reader); a header
that stalls is refused after ``proxy_protocol_timeout`` alone, not that plus
``identity_timeout``; and a half-sent header costs no CPU while it waits (the reader used to
peek every 5 ms, and a readable socket never blocks).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ferryman import proxyproto
from ferryman.errors import RemoteProtocolError
from ferryman.proxy.preamble import read_proxy_header
from tests.proxy.routing_peers import NamedTLSServer, add_routed_listener, client_context
from tests.support.gateway import (
    EchoServer,
    GatewayFiles,
    grant,
    read_until_closed,
    running_gateway,
    wait_for,
)
from tests.tls.certgen import Authority

V1 = b"PROXY TCP4 127.0.0.9 127.0.0.1 40001 443\r\n"
V2 = proxyproto.encode_v2(
    ("127.0.0.9", 40001), ("127.0.0.1", 443), tlvs={proxyproto.PP2_TYPE_AUTHORITY: b"svc.test"}
)
HEADERS = {"v1": V1, "v2": V2}


def client_hello(sni: str = "svc.test") -> bytes:
    """A real ClientHello from Python's ssl: the kind of bytes that follow a header."""
    context = client_context(None, check_hostname=False)
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=sni)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def one_byte_writes(header: bytes, after: bytes) -> list[bytes]:
    """The header a byte per write; its last byte and ``after`` share the final write."""
    return [header[i : i + 1] for i in range(len(header) - 1)] + [header[-1:] + after]


def nonblocking_client(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one segment per write
    sock.setblocking(False)
    return sock


async def send_pieces(sock: socket.socket, pieces: list[bytes], pause: float = 0.003) -> None:
    loop = asyncio.get_running_loop()
    for piece in pieces:
        await loop.sock_sendall(sock, piece)
        await asyncio.sleep(pause)


async def recv_exactly(sock: socket.socket, n: int, timeout: float = 5.0) -> bytes:
    loop = asyncio.get_running_loop()
    out = b""
    async with asyncio.timeout(timeout):
        while len(out) < n:
            chunk = await loop.sock_recv(sock, n - len(out))
            if not chunk:
                break
            out += chunk
    return out


# -- the function, on a loopback connection ---------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(client, server): a loopback TCP connection, both ends non-blocking."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = nonblocking_client(listener.getsockname()[1])
        server, _ = listener.accept()
    server.setblocking(False)
    with client, server:
        yield client, server


@pytest.mark.parametrize("version", HEADERS)
@pytest.mark.parametrize(
    "after", [b"", b"payload\r\nmore\n", client_hello()], ids=["nothing", "text", "hello"]
)
async def test_header_in_one_byte_writes_leaves_what_follows(
    pair: tuple[socket.socket, socket.socket], version: str, after: bytes
) -> None:
    client, server = pair
    header = HEADERS[version]
    result, _ = await asyncio.gather(
        read_proxy_header(server), send_pieces(client, one_byte_writes(header, after))
    )
    assert (result.version, result.src_addr, result.src_port) == (int(version[1]), "127.0.0.9", 40001)
    assert result.length == len(header)
    # Every byte after the header is still in the socket, in order, for the next reader.
    client.shutdown(socket.SHUT_WR)
    assert await recv_exactly(server, len(after) + 1) == after


@pytest.mark.parametrize("version", HEADERS)
async def test_header_and_what_follows_in_one_write(
    pair: tuple[socket.socket, socket.socket], version: str
) -> None:
    client, server = pair
    after = client_hello() + b"\r\n" * 50  # line ends right after a v1 header: still not ours
    client.sendall(HEADERS[version] + after)
    result = await read_proxy_header(server)
    assert result.length == len(HEADERS[version])
    client.shutdown(socket.SHUT_WR)
    assert await recv_exactly(server, len(after) + 1) == after


async def test_v2_header_with_a_long_tlv_block(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    header = proxyproto.encode_v2(
        ("10.0.0.1", 1), ("10.0.0.2", 2), tlvs={proxyproto.PP2_TYPE_AUTHORITY: b"a" * 3000}
    )
    pieces = [header[:7], header[7:16], header[16:1000], header[1000:] + b"rest"]
    result, _ = await asyncio.gather(read_proxy_header(server), send_pieces(client, pieces))
    assert result.tlvs[proxyproto.PP2_TYPE_AUTHORITY] == b"a" * 3000
    assert await recv_exactly(server, 4) == b"rest"


@pytest.mark.parametrize(
    ("sent", "error"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", RemoteProtocolError),  # no header at all
        (client_hello(), RemoteProtocolError),
        (b"PROXY TCP4 " + b"1" * 96 + b"\r\n", RemoteProtocolError),  # longer than 107 bytes
        (b"PROXY TCP4 " + b"1" * 120, RemoteProtocolError),  # no CRLF within 107 bytes
        (b"PROXY UNKNOWN\n", RemoteProtocolError),  # LF without CR
        (proxyproto.V2_SIGNATURE + b"\x31\x11\x00\x00", RemoteProtocolError),  # version 3
        (b"", ConnectionError),  # EOF before any byte
        (V1[:20], ConnectionError),  # EOF mid-header
        (V2[:10], ConnectionError),
        (V2[:20], ConnectionError),
    ],
)
async def test_bad_or_missing_header_is_refused(
    pair: tuple[socket.socket, socket.socket], sent: bytes, error: type[Exception]
) -> None:
    client, server = pair
    client.sendall(sent)
    client.shutdown(socket.SHUT_WR)
    with pytest.raises(error):
        async with asyncio.timeout(5):
            await read_proxy_header(server)


# -- through a gateway ------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> GatewayFiles:
    return GatewayFiles(tmp_path)


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    async with EchoServer() as server:
        yield server


@pytest.mark.parametrize("version", HEADERS)
async def test_gateway_takes_a_header_sent_a_byte_at_a_time(
    files: GatewayFiles, echo: EchoServer, version: str
) -> None:
    port = files.add_listener("lb", echo.address, accept_proxy_protocol=True)
    files.grants.append(grant({"lb": {}}))
    payload = b"first bytes of the client\r\n"
    async with running_gateway(files):
        with nonblocking_client(port) as sock:
            await send_pieces(sock, one_byte_writes(HEADERS[version], payload))
            assert await recv_exactly(sock, len(payload)) == payload
        await wait_for(files.closes)
    (close,) = files.closes()
    assert (close["source"], close["bytes_up"], close["reason"]) == (
        "127.0.0.9:40001",
        len(payload),
        "normal",
    )


@pytest.mark.parametrize("version", HEADERS)
async def test_header_a_byte_at_a_time_then_tls_passthrough(
    files: GatewayFiles, tmp_path: Path, version: str
) -> None:
    # The ClientHello shares a segment with the header's last byte; it must reach the SNI
    # sniffer, and then the backend, intact (the client completes a TLS 1.3 handshake with it).
    ca = Authority("backend CA")
    async with NamedTLSServer("svc", ca.issue(dns=("svc.test",)), tmp_path) as backend:
        target = {"host": "svc.test", "ip": "127.0.0.1", "port": backend.port}
        port = add_routed_listener(
            files,
            "lb-pass",
            tls="passthrough",
            accept_proxy_protocol=True,
            rules=[{"domain": "svc.test", "targets": [target]}],
        )
        files.grants.append(grant({"lb-pass": {}}))
        async with running_gateway(files):
            loop = asyncio.get_running_loop()
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = client_context(ca).wrap_bio(incoming, outgoing, server_hostname="svc.test")
            with contextlib.suppress(ssl.SSLWantReadError):
                tls.do_handshake()
            with nonblocking_client(port) as sock:
                await send_pieces(sock, one_byte_writes(HEADERS[version], outgoing.read()))
                async with asyncio.timeout(5):
                    greeting = b""
                    while not greeting.endswith(b"\n"):
                        try:
                            tls.do_handshake()
                            greeting += tls.read(100)
                        except ssl.SSLWantReadError:
                            if pending := outgoing.read():
                                await loop.sock_sendall(sock, pending)
                            data = await loop.sock_recv(sock, 65536)
                            assert data, "closed during the handshake"
                            incoming.write(data)
            assert (greeting, tls.version()) == (b"svc\n", "TLSv1.3")
            await wait_for(files.closes)
    assert backend.snis == ["svc.test"]
    assert files.closes()[0]["source"] == "127.0.0.9:40001"


async def test_stalled_header_is_refused_after_proxy_protocol_timeout(
    files: GatewayFiles, echo: EchoServer
) -> None:
    # proxy_protocol_timeout bounds the header alone (README); identity_timeout is far away.
    port = files.add_listener(
        "lb",
        echo.address,
        accept_proxy_protocol=True,
        proxy_protocol_timeout="500ms",
        identity_timeout="30s",
    )
    files.grants.append(grant({"lb": {}}))
    partials = [b"", V1[:19], V2[:10], V2[:20]]  # nothing, mid-line, mid-fixed part, mid-TLVs
    async with running_gateway(files):
        loop = asyncio.get_running_loop()

        async def stall(sent: bytes) -> float:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started = loop.time()
            writer.write(sent)
            try:
                assert await read_until_closed(reader, timeout=5) == b""
                return loop.time() - started
            finally:
                writer.close()

        waited = await asyncio.gather(*(stall(sent) for sent in partials))
        assert all(0.4 < t < 2.5 for t in waited), waited
        await wait_for(lambda: len(files.audit()) == len(partials))
    assert echo.connections == 0
    for record in files.audit():
        assert record["allowed"] is False and record["outcome"] == "protocol"
        assert record["reason"] == "timed out waiting for the PROXY protocol header"


async def test_half_sent_headers_cost_no_cpu_while_they_wait(files: GatewayFiles, echo: EchoServer) -> None:
    # The gateway runs in this process, so this process's CPU time is the gateway's. With N
    # connections holding a partial header and nothing else to do it must stay idle; the old
    # reader peeked every 5 ms per connection (about 0.5 s of CPU per second here).
    port = files.add_listener(
        "lb",
        echo.address,
        accept_proxy_protocol=True,
        proxy_protocol_timeout="30s",
        identity_timeout="30s",
    )
    files.grants.append(grant({"lb": {}}))
    partials = [V1[:19], V1[:-1], V2[:10], V2[:20]]
    count = 128
    async with running_gateway(files):
        clients = [nonblocking_client(port) for _ in range(count)]
        try:
            for i, sock in enumerate(clients):
                sock.sendall(partials[i % len(partials)])
            await asyncio.sleep(0.5)  # every connection accepted and waiting for the rest
            cpu, wall = time.process_time(), time.monotonic()
            await asyncio.sleep(1.0)
            cpu, wall = time.process_time() - cpu, time.monotonic() - wall
            assert cpu < 0.1 * wall, f"{cpu:.3f}s of CPU in {wall:.2f}s with {count} partial headers"
            assert files.audit() == []  # none refused: they are all still waiting
        finally:
            for sock in clients:
                sock.close()
        # Still waiting (not refused) until the clients left: then each is refused at once.
        await wait_for(lambda: len(files.audit()) == count)
    assert echo.connections == 0
    assert all(r["allowed"] is False for r in files.audit())
