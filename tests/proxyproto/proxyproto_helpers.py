"""Shared vectors for the proxyproto tests, written byte by byte from proxy-protocol.txt.

(Named ``proxyproto_helpers`` because the test directories are not packages and module names
must be unique across ``tests/``.)
"""

from __future__ import annotations

from ferryman import proxyproto
from ferryman.errors import RemoteProtocolError
from ferryman.proxyproto import Command, Family, ProxyHeader

SIG = bytes.fromhex("0d0a0d0a000d0a515549540a")  # section 2.2, 12 bytes


def tlv(tlv_type: int, value: bytes) -> bytes:
    return bytes([tlv_type]) + len(value).to_bytes(2, "big") + value


def v2(ver_cmd: int, fam: int, block: bytes, *, length: int | None = None) -> bytes:
    declared = len(block) if length is None else length
    return SIG + bytes([ver_cmd, fam]) + declared.to_bytes(2, "big") + block


def unix_path(path: bytes) -> bytes:
    return path.ljust(108, b"\x00")


# Section 2.1's own example, then the longest lines the section lists.
V1_SPEC_EXAMPLE = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
V1_MAX_TCP6 = b"PROXY TCP6 " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n"
V1_MAX_UNKNOWN = b"PROXY UNKNOWN " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n"

# (wire bytes, expected header) pairs; every one is also fed split at every offset.
VALID: dict[str, tuple[bytes, ProxyHeader]] = {
    "v1-spec-example": (
        V1_SPEC_EXAMPLE,
        ProxyHeader(1, Command.PROXY, Family.TCP4, "192.168.0.1", 56324, "192.168.0.11", 443, {}, 47),
    ),
    "v1-tcp6": (
        b"PROXY TCP6 2001:DB8::1 2001:db8:0:0:0:0:0:2 0 65535\r\n",
        ProxyHeader(1, Command.PROXY, Family.TCP6, "2001:db8::1", 0, "2001:db8::2", 65535, {}, 53),
    ),
    "v1-tcp6-max-length": (
        V1_MAX_TCP6,
        ProxyHeader(
            1,
            Command.PROXY,
            Family.TCP6,
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            65535,
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            65535,
            {},
            104,
        ),
    ),
    "v1-unknown-short": (
        b"PROXY UNKNOWN\r\n",
        ProxyHeader(1, Command.PROXY, Family.UNKNOWN, None, None, None, None, {}, 15),
    ),
    "v1-unknown-worst-case": (
        V1_MAX_UNKNOWN,
        ProxyHeader(1, Command.PROXY, Family.UNKNOWN, None, None, None, None, {}, 107),
    ),
    "v2-tcp4": (
        v2(0x21, 0x11, bytes.fromhex("c0a80001 c0a8000b dc04 01bb")),
        ProxyHeader(2, Command.PROXY, Family.TCP4, "192.168.0.1", 56324, "192.168.0.11", 443, {}, 28),
    ),
    "v2-tcp6": (
        v2(
            0x21,
            0x21,
            bytes.fromhex("20010db8000000000000000000000001 20010db8000000000000000000000002 3039 1538"),
        ),
        ProxyHeader(2, Command.PROXY, Family.TCP6, "2001:db8::1", 12345, "2001:db8::2", 5432, {}, 52),
    ),
    "v2-local-health-check": (
        v2(0x20, 0x00, b""),
        ProxyHeader(2, Command.LOCAL, Family.UNKNOWN, None, None, None, None, {}, 16),
    ),
    "v2-local-with-addresses-discarded": (
        v2(0x20, 0x11, bytes.fromhex("7f000001 7f000001 0001 0002") + tlv(0x05, b"hc")),
        ProxyHeader(2, Command.LOCAL, Family.UNKNOWN, None, None, None, None, {5: b"hc"}, 33),
    ),
    "v2-unspec-with-tlvs": (
        v2(0x21, 0x00, tlv(0x05, b"conn-42") + tlv(0xE0, b"")),
        ProxyHeader(
            2,
            Command.PROXY,
            Family.UNKNOWN,
            None,
            None,
            None,
            None,
            {0x05: b"conn-42", 0xE0: b""},
            29,
        ),
    ),
    "v2-udp4-falls-back-to-unspec": (
        v2(0x21, 0x12, bytes.fromhex("0a000001 0a000002 0035 0035")),
        ProxyHeader(2, Command.PROXY, Family.UNKNOWN, None, None, None, None, {}, 28),
    ),
    "v2-unix-stream": (
        v2(0x21, 0x31, unix_path(b"/run/client.sock") + unix_path(b"/run/ferryman.sock\x00junk")),
        ProxyHeader(
            2,
            Command.PROXY,
            Family.UNIX,
            "/run/client.sock",
            None,
            "/run/ferryman.sock",
            None,
            {},
            232,
        ),
    ),
    "v2-unix-abstract": (
        v2(0x21, 0x31, unix_path(b"\x00abstract") + unix_path(b"/x")),
        ProxyHeader(2, Command.PROXY, Family.UNIX, "\x00abstract", None, "/x", None, {}, 232),
    ),
    "v2-tcp4-tlvs-and-noop-padding": (
        v2(
            0x21,
            0x11,
            bytes.fromhex("0a000001 0a000002 c350 0050")
            + tlv(0x01, b"h2")
            + tlv(0x04, b"\x00\x00")
            + tlv(0x02, b"db.example.com")
            + tlv(0x04, b""),
        ),
        ProxyHeader(
            2,
            Command.PROXY,
            Family.TCP4,
            "10.0.0.1",
            50000,
            "10.0.0.2",
            80,
            {0x01: b"h2", 0x02: b"db.example.com"},
            16 + 12 + 5 + 5 + 17 + 3,
        ),
    ),
    # The checksum is CRC-32C over this header with its four value bytes zeroed (section 2.2.3),
    # computed once; the CRC code itself is pinned by RFC 3720 B.4 vectors in test_crc32c and
    # checked against HAProxy's "proxy-v2-options crc32c" in the interop test.
    "v2-tcp4-crc32c": (
        v2(0x21, 0x11, bytes.fromhex("c0000201 c6336401 1f90 0050") + tlv(0x03, bytes.fromhex("c174a7df"))),
        ProxyHeader(
            2,
            Command.PROXY,
            Family.TCP4,
            "192.0.2.1",
            8080,
            "198.51.100.1",
            80,
            {0x03: bytes.fromhex("c174a7df")},
            35,
        ),
    ),
}


Outcome = proxyproto.NeedData | proxyproto.ProxyHeader | str


def outcome(data: bytes) -> Outcome:
    """``parse_proxy_header`` with a RemoteProtocolError turned into ``"error: <message>"``."""
    try:
        return proxyproto.parse_proxy_header(data)
    except RemoteProtocolError as exc:
        return f"error: {exc}"
