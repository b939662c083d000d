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
import socket

from ferryman import proxyproto, tlshello
from ferryman._aio import wait_fd
from ferryman.errors import RemoteProtocolError
from ferryman.routing import http_host

MAX_HTTP_HEAD = 16384
PROXY_HEADER_MAX = 16 + 65535


async def read_proxy_header(sock: socket.socket) -> proxyproto.ProxyHeader:
    """Consume exactly one PROXY v1/v2 header, nothing after it (so TLS can start right after).

    Peeks until the header is complete, then reads exactly its length. Raises
    RemoteProtocolError for a missing or malformed header, ConnectionError at EOF.
    """
    loop = asyncio.get_running_loop()
    while True:
        await wait_fd(sock.fileno())
        try:
            data = sock.recv(PROXY_HEADER_MAX, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            continue
        if not data:
            raise ConnectionResetError("closed before the PROXY protocol header")
        result = proxyproto.parse_proxy_header(data)
        if isinstance(result, proxyproto.ProxyHeader):
            await loop.sock_recv(sock, result.length)  # consume the header only
            return result
        # Incomplete header: wait for more bytes (rare: headers fit one segment).
        await asyncio.sleep(0.005)


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
