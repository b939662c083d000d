"""PROXY protocol writers: the header ferryman sends to backends with ``proxy_protocol = "v1"|"v2"``.

Owns: :func:`encode_v1` and :func:`encode_v2` for TCP over IPv4 and IPv6, the ``UNKNOWN`` /
``AF_UNSPEC`` forms and the v2 ``LOCAL`` command, following HAProxy's "proxy-protocol.txt"
(sections 2.1 and 2.2). Everything they produce is accepted by ``parse.py``; tests round-trip it.

Must not: do I/O or decide *whether* to send a header (the listener config does). Bad arguments
are our own bug, so they raise ``LocalProtocolError``, never ``RemoteProtocolError``.

Decisions:

- When the two endpoints are of different families (an IPv4 client reaching an IPv6 listener
  through some translation), the IPv4 one is written as its IPv4-mapped IPv6 address
  (RFC 4291 §2.5.5.2), since one header carries one family.
- An IPv6 zone id (``fe80::1%eth0``, as ``getpeername()`` reports link-local peers) is dropped:
  neither format can carry it, and it is meaningless on the receiving host anyway.
- v2 ``LOCAL`` carries no addresses (section 2.2: the sender "should not present any address
  so it sets this field to zero"); passing endpoints with it is refused as ambiguous.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Final, TypeAlias

from ferryman.errors import LocalProtocolError
from ferryman.proxyproto._crc32c import crc32c
from ferryman.proxyproto.header import PP2_TYPE_CRC32C, V2_SIGNATURE, V2_VERSION, Command

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
Address: TypeAlias = tuple[str | IPAddress, int]
"""An endpoint as ``(host, port)``, the shape ``getpeername()`` returns (extra items ignored)."""

_FAM_UNSPEC: Final = 0x00
_FAM_TCP4: Final = 0x11
_FAM_TCP6: Final = 0x21
_MAX_V2_BLOCK: Final = 0xFFFF  # the 16-bit length field


def encode_v1(src: Address | None, dst: Address | None) -> bytes:
    """Encode a v1 (text) header: ``PROXY TCP4|TCP6 src dst sport dport\\r\\n``.

    Args:
        src: the client's endpoint, or ``None`` together with ``dst`` for ``PROXY UNKNOWN``.
        dst: the endpoint the client connected to (our listener's address).

    Returns:
        The header line, at most 107 bytes, CRLF included.

    Raises:
        LocalProtocolError: only one endpoint given, an address that is not an IP address, or a
            port outside 0..65535.
    """
    endpoints = _endpoints(src, dst)
    if endpoints is None:
        return b"PROXY UNKNOWN\r\n"
    (src_ip, src_port), (dst_ip, dst_port) = endpoints
    protocol = "TCP4" if src_ip.version == 4 else "TCP6"
    return f"PROXY {protocol} {src_ip} {dst_ip} {src_port} {dst_port}\r\n".encode("ascii")


def encode_v2(
    src: Address | None,
    dst: Address | None,
    *,
    command: Command = Command.PROXY,
    tlvs: Mapping[int, bytes] | None = None,
) -> bytes:
    """Encode a v2 (binary) header.

    Args:
        src: the client's endpoint; ``None`` together with ``dst`` for ``AF_UNSPEC``.
        dst: the endpoint the client connected to.
        command: ``Command.PROXY`` for relayed connections, ``Command.LOCAL`` for connections
            the gateway makes on its own behalf (health checks); ``LOCAL`` needs both
            endpoints ``None``.
        tlvs: TLVs to append, written in the mapping's order. If it holds
            ``PP2_TYPE_CRC32C``, that value is ignored and replaced by the header's checksum
            (section 2.2.3).

    Returns:
        The complete header: 16 fixed bytes, the address block, the TLVs.

    Raises:
        LocalProtocolError: bad endpoints (see :func:`encode_v1`), endpoints with ``LOCAL``, a
            TLV type outside 0..255, or a header whose variable part exceeds 65,535 bytes.
    """
    if not isinstance(command, Command):
        raise LocalProtocolError(f"command must be a Command, not {command!r}")
    if command is Command.LOCAL and (src is not None or dst is not None):
        raise LocalProtocolError("a LOCAL header carries no addresses; pass None, None")
    endpoints = _endpoints(src, dst)
    if endpoints is None:
        fam, block = _FAM_UNSPEC, b""
    else:
        (src_ip, src_port), (dst_ip, dst_port) = endpoints
        fam = _FAM_TCP4 if src_ip.version == 4 else _FAM_TCP6
        block = src_ip.packed + dst_ip.packed + src_port.to_bytes(2, "big") + dst_port.to_bytes(2, "big")
    tlv_block, crc_at = _tlv_block(tlvs or {})
    length = len(block) + len(tlv_block)
    if length > _MAX_V2_BLOCK:
        raise LocalProtocolError(f"PROXY v2 header would be {length} bytes past the fixed part")
    header = bytearray(V2_SIGNATURE)
    header += bytes((V2_VERSION << 4 | command, fam))
    header += length.to_bytes(2, "big")
    header += block
    if crc_at is not None:
        crc_at += len(header)
    header += tlv_block
    if crc_at is not None:
        # The field is still zero here, which is exactly what the checksum is computed over.
        header[crc_at : crc_at + 4] = crc32c(header).to_bytes(4, "big")
    return bytes(header)


def _tlv_block(tlvs: Mapping[int, bytes]) -> tuple[bytes, int | None]:
    """Serialise TLVs; return them and the offset of the CRC32C value inside them, if any."""
    out = bytearray()
    crc_at: int | None = None
    for tlv_type, value in tlvs.items():
        key: object = tlv_type  # checked at run time: the mapping may come from config
        if not isinstance(key, int) or isinstance(key, bool) or not 0 <= key <= 0xFF:
            raise LocalProtocolError(f"TLV type {tlv_type!r} is not in 0..255")
        if tlv_type == PP2_TYPE_CRC32C:
            value = bytes(4)
            crc_at = len(out) + 3
        if len(value) > 0xFFFF:
            raise LocalProtocolError(f"TLV 0x{tlv_type:02x} value longer than 65535 bytes")
        out += bytes((tlv_type,)) + len(value).to_bytes(2, "big") + value
    return bytes(out), crc_at


def _endpoints(
    src: Address | None, dst: Address | None
) -> tuple[tuple[IPAddress, int], tuple[IPAddress, int]] | None:
    if src is None and dst is None:
        return None
    if src is None or dst is None:
        raise LocalProtocolError("give both endpoints, or neither for an UNKNOWN header")
    src_ip, src_port = _endpoint(src)
    dst_ip, dst_port = _endpoint(dst)
    if src_ip.version != dst_ip.version:
        src_ip, dst_ip = _as_ipv6(src_ip), _as_ipv6(dst_ip)
    return (src_ip, src_port), (dst_ip, dst_port)


def _endpoint(endpoint: Address) -> tuple[IPAddress, int]:
    host = endpoint[0]
    port: object = endpoint[1]  # checked at run time: callers pass getpeername() tuples
    if isinstance(host, str):
        try:
            ip: IPAddress = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            raise LocalProtocolError(f"{host!r} is not an IP address") from None
    elif isinstance(host, ipaddress.IPv4Address | ipaddress.IPv6Address):
        ip = host
    else:
        raise LocalProtocolError(f"{host!r} is not an IP address")
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        ip = ipaddress.IPv6Address(ip.packed)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 0xFFFF:
        raise LocalProtocolError(f"port {port!r} is not in 0..65535")
    return ip, port


def _as_ipv6(ip: IPAddress) -> ipaddress.IPv6Address:
    if isinstance(ip, ipaddress.IPv6Address):
        return ip
    return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + ip.packed)  # RFC 4291 §2.5.5.2
