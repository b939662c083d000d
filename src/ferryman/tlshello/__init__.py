"""SANS-I/O TLS ClientHello sniffing for SNI routing and TLS passthrough (SPEC §6).

Owns: reading a client's first TLS flight -- without consuming it -- into ``NeedData``,
``NotTLS`` or a :class:`ClientHello` (SNI, ALPN, versions). ``parse.py`` owns the record layer
and the API, ``hello.py`` the ClientHello body.

Must not: import asyncio, socket, ssl or selectors, or anything from ``ferryman.proxy``; it
imports only the standard library and ``ferryman.errors`` (a test walks the AST to hold this).
The asyncio driver does the reading, keeps the peeked bytes and forwards them.

Typical driver loop::

    sniffer = tlshello.ClientHelloSniffer()
    peeked = bytearray()
    while (result := sniffer.next_event()) is tlshello.NEED_DATA:
        chunk = await reader.read(65536)
        peeked += chunk
        sniffer.receive_data(chunk)  # b"" (EOF) makes next_event() raise
    match result:
        case tlshello.NotTLS(): ...         # plaintext policy of the listener
        case tlshello.ClientHello(sni=sni): ...  # route on sni, then send `peeked` first
"""

from ferryman.tlshello.hello import ClientHello, is_grease
from ferryman.tlshello.parse import (
    MAX_HELLO_SIZE,
    MAX_RECORD_LENGTH,
    NEED_DATA,
    ClientHelloSniffer,
    NeedData,
    NotTLS,
    SniffResult,
    looks_like_tls,
    parse_client_hello,
)

__all__ = [
    "MAX_HELLO_SIZE",
    "MAX_RECORD_LENGTH",
    "NEED_DATA",
    "ClientHello",
    "ClientHelloSniffer",
    "NeedData",
    "NotTLS",
    "SniffResult",
    "is_grease",
    "looks_like_tls",
    "parse_client_hello",
]
