"""The PROXY protocol's vocabulary: the decoded header, its enums and wire constants.

Owns: :class:`ProxyHeader`, :class:`Command`, :class:`Family`, the ``NEED_DATA`` sentinel and
the constants of HAProxy's "proxy-protocol.txt" (sections 2.1 and 2.2), named as there.

Must not: parse, encode or do I/O (``parse.py`` and ``encode.py`` do the first two; the asyncio
driver does the last).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

V1_PREFIX: Final = b"PROXY "  # "PROXY" then exactly one space (section 2.1)
V1_MAX_LENGTH: Final = 107  # worst-case line, CRLF included (section 2.1)
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"  # 12 bytes, section 2.2
V2_HEADER_LENGTH: Final = 16  # signature + ver_cmd + fam + len
V2_VERSION: Final = 0x2  # high nibble of the 13th byte; "the receiver must only accept this"

# Address block sizes per address family (section 2.2, "union proxy_addr").
V2_INET_ADDRESS_LENGTH: Final = 12  # 2*4 + 2*2
V2_INET6_ADDRESS_LENGTH: Final = 36  # 2*16 + 2*2
V2_UNIX_ADDRESS_LENGTH: Final = 216  # 2*108
UNIX_PATH_LENGTH: Final = 108

# TLV types (section 2.2). 0xE0-0xEF are for applications, 0xF0-0xF7 experimental.
PP2_TYPE_ALPN: Final = 0x01
PP2_TYPE_AUTHORITY: Final = 0x02
PP2_TYPE_CRC32C: Final = 0x03
PP2_TYPE_NOOP: Final = 0x04
PP2_TYPE_UNIQUE_ID: Final = 0x05
PP2_TYPE_SSL: Final = 0x20
PP2_TYPE_NETNS: Final = 0x30


class NeedData(enum.Enum):
    """The single "feed me more bytes" sentinel. Compare with ``is NEED_DATA``.

    In a ``match`` statement write ``case NeedData.NEED_DATA:`` (or ``proxyproto.NEED_DATA``):
    a bare name would be a capture pattern.
    """

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA


class Command(enum.IntEnum):
    """The v2 command nibble (section 2.2). v1 headers are always ``PROXY``."""

    LOCAL = 0x0
    """The proxy opened this connection itself (health check): use the real endpoints."""
    PROXY = 0x1
    """Relayed on behalf of a client: the header's addresses are the original endpoints."""


class Family(enum.Enum):
    """What the header says about the original connection."""

    TCP4 = "TCP4"
    TCP6 = "TCP6"
    UNIX = "UNIX"
    """v2 only: AF_UNIX stream; addresses are socket paths, ports are ``None``."""
    UNKNOWN = "UNKNOWN"
    """No usable addresses: v1 ``UNKNOWN``, v2 ``AF_UNSPEC``, a v2 ``LOCAL`` command, or a v2
    datagram family (section 2.2 lets a receiver fall back to UNSPEC for protocols it does not
    support; a stream gateway has no use for UDP endpoints). Use the real connection's
    endpoints."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A decoded PROXY protocol header (v1 or v2). Do not subclass."""

    version: int
    """1 (text) or 2 (binary)."""
    command: Command
    family: Family
    src_addr: str | None
    """Canonical text form (``str(ipaddress.ip_address(...))``) for TCP4/TCP6, the socket path
    for UNIX (trailing NULs stripped, decoded as UTF-8 with ``surrogateescape``), ``None`` when
    ``family`` is ``UNKNOWN``."""
    src_port: int | None
    dst_addr: str | None
    dst_port: int | None
    tlvs: Mapping[int, bytes] = field(hash=False)
    """v2 TLVs by type, in wire order; ``PP2_TYPE_NOOP`` padding is dropped. Always empty for
    v1. A CRC32C TLV is only present here after its checksum was verified."""
    length: int
    """Bytes the header occupied; the application stream starts at ``data[length:]``."""
