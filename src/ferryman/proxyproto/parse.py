"""SANS-I/O PROXY protocol reader: the bytes a load balancer puts before the client's stream.

Owns: :func:`parse_proxy_header`, which recognises and validates a version 1 (text) or version 2
(binary) header as specified by HAProxy's "proxy-protocol.txt" (section numbers below refer to
it) and reports how many bytes it occupied.

Must not: import asyncio, socket, ssl or selectors, read from a connection, or guess. Section 2:
"The receiver MUST be configured to only receive the protocol described in this specification
and MUST not try to guess whether the protocol header is present or not" -- so a listener with
``accept_proxy_protocol = true`` calls this on the connection's first bytes, and anything that
is not a header is an error, never "no header, carry on". Whether the *peer* may send a header
at all (trusted load balancers only) is the caller's decision.

Strictness decisions:

- v1: exactly one space between fields, no heading zeroes in IPv4 octets or ports, the family
  matching the address syntax, no IPv6 zone ids, the CRLF within the first 107 bytes and no lone
  CR or LF (section 2.1). After ``PROXY UNKNOWN`` the rest of the line is ignored, as the
  section requires. Anything else that is not a prefix of a valid line fails as soon as it shows
  (section 2.1: "abort the connection as soon as possible").
- v2: version nibble 2, command LOCAL or PROXY, one of the seven valid family/protocol bytes, a
  length that covers the address block of the declared family, TLVs that exactly fill the rest,
  no duplicate TLV types (except ``PP2_TYPE_NOOP`` padding, which is skipped), and a verified
  checksum when a ``PP2_TYPE_CRC32C`` TLV is present (section 2.2.3: a receiver that supports it
  "MUST treat the TCP connection providing the header as invalid" on mismatch).
- v2 ``LOCAL``: the addresses are discarded ("must use the real connection endpoints and discard
  the protocol block including the family") but the block is still framed and its TLVs read.
- v2 datagram families fall back to UNSPEC (``Family.UNKNOWN``), which section 2.2 allows for
  protocols a receiver does not implement.

A prefix of a valid header always yields ``NEED_DATA``; the tests feed every header split at
every offset to hold this. Each call re-parses from the start, which is cheap: a v1 line is at
most 107 bytes and a v2 header is only examined once its fixed 16-byte part or all of it has
arrived.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final

from ferryman.errors import RemoteProtocolError
from ferryman.proxyproto._crc32c import crc32c
from ferryman.proxyproto.header import (
    NEED_DATA,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NOOP,
    UNIX_PATH_LENGTH,
    V1_MAX_LENGTH,
    V1_PREFIX,
    V2_HEADER_LENGTH,
    V2_INET6_ADDRESS_LENGTH,
    V2_INET_ADDRESS_LENGTH,
    V2_SIGNATURE,
    V2_UNIX_ADDRESS_LENGTH,
    V2_VERSION,
    Command,
    Family,
    NeedData,
    ProxyHeader,
)

_CR: Final = 0x0D
_LF: Final = 0x0A
_CR_OR_LF: Final = re.compile(rb"[\r\n]")
_V1_PORT: Final = re.compile(rb"0|[1-9][0-9]{0,4}")  # no heading zeroes (section 2.1)
# Characters a TCP4/TCP6 line may hold after the protocol token: addresses, ports, spaces.
_V1_TCP_CHARS: Final = frozenset(b"0123456789abcdefABCDEF.: ")
_V1_PROTOCOLS: Final = (b"TCP4 ", b"TCP6 ", b"UNKNOWN ", b"UNKNOWN\r")

# Valid fam bytes (section 2.2, "In practice, the following protocol bytes are expected").
# Value: (family reported for a PROXY command, address block length).
_V2_FAMILIES: Final[dict[int, tuple[Family, int]]] = {
    0x00: (Family.UNKNOWN, 0),  # AF_UNSPEC, UNSPEC
    0x11: (Family.TCP4, V2_INET_ADDRESS_LENGTH),
    0x12: (Family.UNKNOWN, V2_INET_ADDRESS_LENGTH),  # UDP over IPv4: fall back to UNSPEC
    0x21: (Family.TCP6, V2_INET6_ADDRESS_LENGTH),
    0x22: (Family.UNKNOWN, V2_INET6_ADDRESS_LENGTH),  # UDP over IPv6
    0x31: (Family.UNIX, V2_UNIX_ADDRESS_LENGTH),
    0x32: (Family.UNKNOWN, V2_UNIX_ADDRESS_LENGTH),  # UNIX datagram
}


def parse_proxy_header(data: bytes) -> NeedData | ProxyHeader:
    """Parse the PROXY protocol header at the start of a connection.

    Args:
        data: every byte received so far, from the first one. Call again with the longer
            buffer after ``NEED_DATA``.

    Returns:
        ``NEED_DATA`` while ``data`` is a prefix of a possible header; otherwise the
        :class:`ProxyHeader`, whose ``length`` says where the client's own bytes begin.

    Raises:
        RemoteProtocolError: the bytes are not a PROXY header (the header is mandatory on
            listeners that accept it) or break one of its rules.
    """
    if not data:
        return NEED_DATA
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data)
    if data[0] == V1_PREFIX[0]:
        return _parse_v1(data)
    raise RemoteProtocolError("connection does not start with a PROXY protocol header")


def _parse_v1(data: bytes) -> NeedData | ProxyHeader:
    if not data.startswith(V1_PREFIX[: len(data)]):
        raise RemoteProtocolError("connection does not start with a PROXY protocol header")
    end = _CR_OR_LF.search(data, 0, V1_MAX_LENGTH)
    if end is None:
        if len(data) >= V1_MAX_LENGTH:
            raise RemoteProtocolError(f"PROXY v1: no CRLF within {V1_MAX_LENGTH} bytes")
        _check_v1_partial(data)
        return NEED_DATA
    cr = end.start()
    # Section 2.1: "The receiver must not tolerate a single CR or LF character to end the line".
    if data[cr] == _LF:
        raise RemoteProtocolError("PROXY v1: line ends with LF without CR")
    if cr + 2 > V1_MAX_LENGTH:
        raise RemoteProtocolError(f"PROXY v1: line longer than {V1_MAX_LENGTH} bytes")
    if cr + 1 == len(data):
        _check_v1_partial(data[:cr])
        return NEED_DATA
    if data[cr + 1] != _LF:
        raise RemoteProtocolError("PROXY v1: CR not followed by LF")
    return _decode_v1_line(data[:cr], length=cr + 2)


def _check_v1_partial(line: bytes) -> None:
    """Fail early on an incomplete line that no completion could make valid."""
    rest = line[len(V1_PREFIX) :]
    if not rest:
        return
    for protocol in _V1_PROTOCOLS:
        if protocol.startswith(rest[: len(protocol)]):
            break
    else:
        raise RemoteProtocolError("PROXY v1: protocol is not TCP4, TCP6 or UNKNOWN")
    if rest.startswith(b"TCP") and not _V1_TCP_CHARS.issuperset(rest[5:]):
        raise RemoteProtocolError("PROXY v1: unexpected character in address or port")


def _decode_v1_line(line: bytes, *, length: int) -> ProxyHeader:
    if line == b"PROXY UNKNOWN" or line.startswith(b"PROXY UNKNOWN "):
        # Section 2.1: for UNKNOWN "the receiver must ignore anything presented before the CRLF".
        return ProxyHeader(
            version=1,
            command=Command.PROXY,
            family=Family.UNKNOWN,
            src_addr=None,
            src_port=None,
            dst_addr=None,
            dst_port=None,
            tlvs={},
            length=length,
        )
    fields = line.split(b" ")
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise RemoteProtocolError("PROXY v1: expected 'PROXY TCP4|TCP6 src dst sport dport'")
    _, protocol, src, dst, src_port, dst_port = fields
    family = Family.TCP4 if protocol == b"TCP4" else Family.TCP6
    return ProxyHeader(
        version=1,
        command=Command.PROXY,
        family=family,
        src_addr=_v1_address(src, family),
        src_port=_v1_port(src_port),
        dst_addr=_v1_address(dst, family),
        dst_port=_v1_port(dst_port),
        tlvs={},
        length=length,
    )


def _v1_address(raw: bytes, family: Family) -> str:
    # The charset check keeps out non-ASCII digits, '%' zone ids, '/' prefixes and whitespace,
    # none of which the section 2.1 syntax allows but some of which ipaddress would accept.
    if not raw or not _V1_TCP_CHARS.issuperset(raw) or b" " in raw:
        raise RemoteProtocolError("PROXY v1: malformed address")
    text = raw.decode("ascii")
    try:
        # ipaddress rejects heading zeroes in IPv4 octets (section 2.1 forbids them too).
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = (
            ipaddress.IPv4Address(text) if family is Family.TCP4 else ipaddress.IPv6Address(text)
        )
    except ValueError:
        raise RemoteProtocolError(f"PROXY v1: {text!r} is not a {family.value} address") from None
    return str(address)


def _v1_port(raw: bytes) -> int:
    if _V1_PORT.fullmatch(raw) is None or int(raw) > 0xFFFF:
        raise RemoteProtocolError("PROXY v1: port is not a decimal in 0..65535 without heading zeroes")
    return int(raw)


def _parse_v2(data: bytes) -> NeedData | ProxyHeader:
    signature_length = len(V2_SIGNATURE)
    if not data.startswith(V2_SIGNATURE[: len(data)]):
        raise RemoteProtocolError("connection does not start with a PROXY protocol header")
    if len(data) <= signature_length:
        return NEED_DATA
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != V2_VERSION:
        raise RemoteProtocolError(f"PROXY v2: version {version} is not 2")
    if command not in (Command.LOCAL, Command.PROXY):
        # Section 2.2: "Receivers must drop connections presenting unexpected values here."
        raise RemoteProtocolError(f"PROXY v2: unknown command {command}")
    if len(data) < 14:
        return NEED_DATA
    fam = data[13]
    if fam not in _V2_FAMILIES:
        raise RemoteProtocolError(f"PROXY v2: invalid address family/protocol byte 0x{fam:02x}")
    if len(data) < V2_HEADER_LENGTH:
        return NEED_DATA
    total = V2_HEADER_LENGTH + int.from_bytes(data[14:16], "big")
    if len(data) < total:
        return NEED_DATA
    family, address_length = _V2_FAMILIES[fam]
    if total - V2_HEADER_LENGTH < address_length:
        raise RemoteProtocolError(
            f"PROXY v2: length {total - V2_HEADER_LENGTH} is shorter than the "
            f"{address_length}-byte address block of family 0x{fam:02x}"
        )
    tlvs = _v2_tlvs(data, V2_HEADER_LENGTH + address_length, total)
    if command == Command.LOCAL:
        family = Family.UNKNOWN
    src_addr = dst_addr = None
    src_port = dst_port = None
    block = data[V2_HEADER_LENGTH : V2_HEADER_LENGTH + address_length]
    if family is Family.TCP4 or family is Family.TCP6:
        size = 4 if family is Family.TCP4 else 16
        src_addr = str(ipaddress.ip_address(block[:size]))
        dst_addr = str(ipaddress.ip_address(block[size : 2 * size]))
        src_port = int.from_bytes(block[2 * size : 2 * size + 2], "big")
        dst_port = int.from_bytes(block[2 * size + 2 : 2 * size + 4], "big")
    elif family is Family.UNIX:
        src_addr = _unix_path(block[:UNIX_PATH_LENGTH])
        dst_addr = _unix_path(block[UNIX_PATH_LENGTH:])
    return ProxyHeader(
        version=2,
        command=Command(command),
        family=family,
        src_addr=src_addr,
        src_port=src_port,
        dst_addr=dst_addr,
        dst_port=dst_port,
        tlvs=tlvs,
        length=total,
    )


def _v2_tlvs(data: bytes, start: int, end: int) -> dict[int, bytes]:
    tlvs: dict[int, bytes] = {}
    crc_offset: int | None = None
    pos = start
    while pos < end:
        if end - pos < 3:
            raise RemoteProtocolError("PROXY v2: truncated TLV header")
        tlv_type = data[pos]
        value_start = pos + 3
        value_end = value_start + int.from_bytes(data[pos + 1 : pos + 3], "big")
        if value_end > end:
            raise RemoteProtocolError(f"PROXY v2: TLV 0x{tlv_type:02x} runs past the header")
        pos = value_end
        if tlv_type == PP2_TYPE_NOOP:
            continue  # section 2.2.4: padding, "should be ignored when parsed"
        if tlv_type in tlvs:
            raise RemoteProtocolError(f"PROXY v2: duplicate TLV 0x{tlv_type:02x}")
        if tlv_type == PP2_TYPE_CRC32C:
            if value_end - value_start != 4:
                raise RemoteProtocolError("PROXY v2: CRC32C TLV is not 4 bytes")
            crc_offset = value_start
        tlvs[tlv_type] = bytes(data[value_start:value_end])
    if crc_offset is not None:
        # Section 2.2.3: zero the checksum field, checksum the whole header, compare.
        zeroed = bytearray(data[:end])
        zeroed[crc_offset : crc_offset + 4] = bytes(4)
        if crc32c(zeroed) != int.from_bytes(tlvs[PP2_TYPE_CRC32C], "big"):
            raise RemoteProtocolError("PROXY v2: CRC32C checksum mismatch")
    return tlvs


def _unix_path(raw: bytes) -> str:
    # sun_path is NUL-terminated and may carry junk after the NUL; a leading NUL marks a Linux
    # abstract socket name, whose NUL we keep (as Python's socket module does).
    abstract = raw[:1] == b"\x00"
    path = b"\x00" + raw[1:].rstrip(b"\x00") if abstract else raw.split(b"\x00", 1)[0]
    return path.decode("utf-8", "surrogateescape")
