"""What a TCP-mode connection says before its payload: a PROXY protocol header from a load
balancer, a TLS ClientHello (routing on SNI without terminating), or a plaintext HTTP/1.x head
(routing on Host).

Owns: reading those from a raw socket with the sans-I/O parsers (``proxyproto``,
``tlshello``, ``routing.http_host``), bounded in size and time, and returning the bytes that
were consumed so the relay can send them on first.

Must not: decide anything (the handler does) or terminate TLS (``proxy.streams`` does).
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket

from ferryman import proxyproto, tlshello
from ferryman.errors import RemoteProtocolError
from ferryman.identity.base import PeerInfo
from ferryman.proxy.poller import wait_fd
from ferryman.proxyproto.header import V1_MAX_LENGTH, V2_HEADER_LENGTH, V2_SIGNATURE
from ferryman.routing import http_host

MAX_HTTP_HEAD = 16384
_V2_FIRST = V2_SIGNATURE[:1]  # b"\r"; a v1 line starts with b"P"


async def read_proxy_header(sock: socket.socket) -> proxyproto.ProxyHeader:
    """Consume exactly one PROXY v1/v2 header, nothing after it (so TLS can start right after).

    Only bytes known to belong to the header are read (see :func:`_recv_header_part`), so the
    client's first bytes -- a TLS ClientHello, a PostgreSQL start-up -- stay in the socket for
    the next reader, however the header was split into segments. Between reads it waits for
    the socket to become readable: a half-sent header costs nothing until more bytes arrive.
    The caller bounds the wait (``proxy_protocol_timeout``).

    Raises RemoteProtocolError for a missing or malformed header, ConnectionError at EOF.
    """
    buf = b""
    while True:
        try:
            part = _recv_header_part(sock, buf)
        except (BlockingIOError, InterruptedError):
            await wait_fd(sock.fileno())
            continue
        if not part:
            raise ConnectionResetError("closed before the PROXY protocol header")
        buf += part
        result = proxyproto.parse_proxy_header(buf)
        if isinstance(result, proxyproto.ProxyHeader):
            return result


async def read_proxy_peer(sock: socket.socket, peer: PeerInfo, timeout: float) -> PeerInfo:
    """``peer`` as the load balancer's PROXY header names it (unchanged for ``LOCAL`` or
    ``UNKNOWN``, which carry no client address), the header read within ``timeout``.

    Raises RemoteProtocolError for a missing, malformed or late header, or a connection that
    fails before it: the connection is refused (PostgreSQL mode answers 08P01)."""
    try:
        async with asyncio.timeout(timeout):
            header = await read_proxy_header(sock)
    except TimeoutError:
        raise RemoteProtocolError("timed out waiting for the PROXY protocol header") from None
    except OSError as exc:
        raise RemoteProtocolError(
            f"connection failed before the PROXY protocol header: {exc.strerror or exc}"
        ) from None
    if header.src_addr is None or header.src_port is None:
        return peer
    return dataclasses.replace(peer, remote_host=header.src_addr, remote_port=header.src_port)


def _recv_header_part(sock: socket.socket, buf: bytes) -> bytes:
    """Read the next bytes that certainly belong to the header whose first bytes are ``buf``.

    v2 frames itself: the 16-byte fixed part, then exactly the length it announces. A v1 line
    has no length, so peek at most what is left of its 107 bytes and take everything up to and
    including the first LF -- or all of the peeked bytes when no LF has arrived yet, since they
    are all part of the line. (Peeking without consuming would leave the socket readable and
    make the wait spin.) Anything else is refused by the parser after at most one read.
    Returns ``b""`` at EOF; raises ``BlockingIOError`` when nothing is waiting.
    """
    if buf[:1] == _V2_FIRST:
        if len(buf) < V2_HEADER_LENGTH:
            return sock.recv(V2_HEADER_LENGTH - len(buf))
        total = V2_HEADER_LENGTH + int.from_bytes(buf[14:16], "big")
        return sock.recv(total - len(buf))
    peeked = sock.recv(V1_MAX_LENGTH - len(buf), socket.MSG_PEEK)
    if not peeked:
        return b""
    if not buf and peeked[:1] == _V2_FIRST:
        return sock.recv(min(len(peeked), V2_HEADER_LENGTH))
    line_end = peeked.find(b"\n")
    return sock.recv(len(peeked) if line_end < 0 else line_end + 1)


async def sniff_client_hello(sock: socket.socket) -> tuple[tlshello.ClientHello, bytes]:
    """Read until the ClientHello is complete. Returns it and every byte read (to forward).

    Raises RemoteProtocolError for a malformed hello or for a client that does not speak TLS.
    """
    loop = asyncio.get_running_loop()
    sniffer = tlshello.ClientHelloSniffer()
    seen = bytearray()
    while True:
        data = await loop.sock_recv(sock, 16384)
        sniffer.receive_data(data)
        seen += data
        result = sniffer.next_event()
        if isinstance(result, tlshello.ClientHello):
            return result, bytes(seen)
        if isinstance(result, tlshello.NotTLS):
            raise RemoteProtocolError(f"expected a TLS ClientHello: {result.reason}")
        if not data:
            raise ConnectionResetError("closed before the ClientHello was complete")


async def sniff_http_host(sock: socket.socket) -> tuple[str | None, bytes]:
    """Read the first HTTP/1.x request head of a plaintext connection. Returns its Host (or
    None when it is not HTTP / has no Host) and every byte read."""
    loop = asyncio.get_running_loop()
    seen = bytearray()
    while len(seen) < MAX_HTTP_HEAD:
        data = await loop.sock_recv(sock, MAX_HTTP_HEAD - len(seen))
        if not data:
            break
        seen += data
        host = http_host(bytes(seen))
        if host is not False:
            return (host if isinstance(host, str) else None), bytes(seen)
    return None, bytes(seen)
