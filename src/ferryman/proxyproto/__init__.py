"""SANS-I/O PROXY protocol v1 and v2 (HAProxy's "proxy-protocol.txt") for SPEC §6.

Owns: reading the header a trusted load balancer puts in front of a client's stream
(``accept_proxy_protocol = true``) and writing one for backends (``proxy_protocol = "v1"|"v2"``).
``header.py`` holds the types and constants, ``parse.py`` the reader, ``encode.py`` the writers.

Must not: import asyncio, socket, ssl or selectors, or anything from ``ferryman.proxy``; it
imports only the standard library and ``ferryman.errors`` (a test walks the AST to hold this).
Deciding which peers may send a header is the listener's job, not this package's.

Typical driver loop::

    buf = b""
    while (header := proxyproto.parse_proxy_header(buf)) is proxyproto.NEED_DATA:
        chunk = await reader.read(65536)
        if not chunk:
            raise RemoteProtocolError("closed before the PROXY header")
        buf += chunk
    rest = buf[header.length:]  # the client's first bytes, to feed the next layer
"""

from ferryman.proxyproto.encode import Address, encode_v1, encode_v2
from ferryman.proxyproto.header import (
    NEED_DATA,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NETNS,
    PP2_TYPE_NOOP,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    Command,
    Family,
    NeedData,
    ProxyHeader,
)
from ferryman.proxyproto.parse import parse_proxy_header

__all__ = [
    "NEED_DATA",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NETNS",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_SSL",
    "PP2_TYPE_UNIQUE_ID",
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    "Address",
    "Command",
    "Family",
    "NeedData",
    "ProxyHeader",
    "encode_v1",
    "encode_v2",
    "parse_proxy_header",
]
