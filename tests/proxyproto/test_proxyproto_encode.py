"""encode_v1 / encode_v2: byte-exact output from the spec's layout, and round trips through parse."""

from __future__ import annotations

import ipaddress

import pytest
from proxyproto_helpers import SIG, VALID, tlv, v2

from ferryman import proxyproto
from ferryman.errors import LocalProtocolError
from ferryman.proxyproto import Command, Family


def parsed(wire: bytes) -> proxyproto.ProxyHeader:
    header = proxyproto.parse_proxy_header(wire)
    assert isinstance(header, proxyproto.ProxyHeader)
    assert header.length == len(wire)
    return header


def test_v1_spec_example_is_byte_exact() -> None:
    wire = proxyproto.encode_v1(("192.168.0.1", 56324), ("192.168.0.11", 443))
    assert wire == VALID["v1-spec-example"][0]


def test_v1_tcp6_and_unknown() -> None:
    assert (
        proxyproto.encode_v1(("2001:DB8::1", 1), ("2001:db8::2", 2))
        == b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n"
    )
    assert proxyproto.encode_v1(None, None) == b"PROXY UNKNOWN\r\n"
    assert (
        proxyproto.encode_v1(("ffff:" * 7 + "ffff", 65535), ("ffff:" * 7 + "ffff", 65535))
        == (VALID["v1-tcp6-max-length"][0])
    )


def test_v2_vectors_are_byte_exact() -> None:
    assert proxyproto.encode_v2(("192.168.0.1", 56324), ("192.168.0.11", 443)) == VALID["v2-tcp4"][0]
    assert proxyproto.encode_v2(("2001:db8::1", 12345), ("2001:db8::2", 5432)) == VALID["v2-tcp6"][0]
    assert proxyproto.encode_v2(None, None, command=Command.LOCAL) == VALID["v2-local-health-check"][0]
    assert (
        proxyproto.encode_v2(None, None, tlvs={5: b"conn-42", 0xE0: b""}) == VALID["v2-unspec-with-tlvs"][0]
    )
    assert (
        proxyproto.encode_v2(
            ("192.0.2.1", 8080), ("198.51.100.1", 80), tlvs={proxyproto.PP2_TYPE_CRC32C: b""}
        )
        == VALID["v2-tcp4-crc32c"][0]
    )


def test_v2_layout_by_hand() -> None:
    wire = proxyproto.encode_v2(
        ("10.1.2.3", 40000), ("10.9.8.7", 5432), tlvs={proxyproto.PP2_TYPE_ALPN: b"pg"}
    )
    assert wire[:12] == SIG
    assert wire[12] == 0x21  # version 2, PROXY
    assert wire[13] == 0x11  # AF_INET, STREAM
    assert int.from_bytes(wire[14:16], "big") == 12 + 5
    ports = (40000).to_bytes(2, "big") + (5432).to_bytes(2, "big")
    assert wire[16:28] == bytes([10, 1, 2, 3, 10, 9, 8, 7]) + ports
    assert wire[28:] == tlv(0x01, b"pg")


@pytest.mark.parametrize(
    ("src", "dst", "family", "src_addr", "dst_addr"),
    [
        (("127.0.0.1", 5), ("127.0.0.2", 6), Family.TCP4, "127.0.0.1", "127.0.0.2"),
        (("::1", 0), ("::2", 65535), Family.TCP6, "::1", "::2"),
        (
            (ipaddress.ip_address("203.0.113.9"), 1234),
            (ipaddress.ip_address("2001:db8::5"), 443),
            Family.TCP6,
            str(ipaddress.IPv6Address("::ffff:203.0.113.9")),
            "2001:db8::5",
        ),
        (("fe80::1%eth0", 1), ("fe80::2", 2), Family.TCP6, "fe80::1", "fe80::2"),
        (("10.0.0.1", 1, 0, 0), ("10.0.0.2", 2), Family.TCP4, "10.0.0.1", "10.0.0.2"),
    ],
)
def test_round_trips(
    src: proxyproto.Address, dst: proxyproto.Address, family: Family, src_addr: str, dst_addr: str
) -> None:
    for version, wire in ((1, proxyproto.encode_v1(src, dst)), (2, proxyproto.encode_v2(src, dst))):
        header = parsed(wire)
        assert header.version == version
        assert header.command is Command.PROXY
        assert header.family is family
        assert (header.src_addr, header.src_port) == (src_addr, src[1])
        assert (header.dst_addr, header.dst_port) == (dst_addr, dst[1])


def test_v2_tlvs_round_trip_in_order_with_padding_dropped() -> None:
    tlvs = {
        0x05: b"id-1",
        0x04: b"\x00" * 5,
        0x20: b"\x01\x00\x00\x00\x00" + tlv(0x21, b"TLSv1.3"),
        0xEE: b"",
    }
    header = parsed(proxyproto.encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2), tlvs=tlvs))
    assert list(header.tlvs.items()) == [(0x05, b"id-1"), (0x20, tlvs[0x20]), (0xEE, b"")]


def test_v2_local_round_trip_with_crc() -> None:
    wire = proxyproto.encode_v2(
        None, None, command=Command.LOCAL, tlvs={proxyproto.PP2_TYPE_CRC32C: b"ignored"}
    )
    header = parsed(wire)
    assert (header.command, header.family, header.src_addr) == (Command.LOCAL, Family.UNKNOWN, None)
    assert len(header.tlvs[proxyproto.PP2_TYPE_CRC32C]) == 4


def test_v2_largest_header() -> None:
    value = b"\xaa" * (0xFFFF - 12 - 3)
    header = parsed(proxyproto.encode_v2(("1.1.1.1", 1), ("2.2.2.2", 2), tlvs={0xE1: value}))
    assert header.length == 16 + 0xFFFF
    assert header.tlvs[0xE1] == value
    with pytest.raises(LocalProtocolError):
        proxyproto.encode_v2(("1.1.1.1", 1), ("2.2.2.2", 2), tlvs={0xE1: value + b"!"})


BAD_CALLS = {
    "only src": lambda: proxyproto.encode_v1(("1.2.3.4", 1), None),
    "only dst v2": lambda: proxyproto.encode_v2(None, ("1.2.3.4", 1)),
    "host name": lambda: proxyproto.encode_v1(("localhost", 1), ("1.2.3.4", 1)),
    "port 65536": lambda: proxyproto.encode_v1(("1.2.3.4", 65536), ("1.2.3.4", 1)),
    "port -1": lambda: proxyproto.encode_v2(("1.2.3.4", -1), ("1.2.3.4", 1)),
    "port True": lambda: proxyproto.encode_v2(("1.2.3.4", True), ("1.2.3.4", 1)),
    "port as text": lambda: proxyproto.encode_v2(("1.2.3.4", "80"), ("1.2.3.4", 1)),  # type: ignore[arg-type]
    "host as bytes": lambda: proxyproto.encode_v2((b"1.2.3.4", 80), ("1.2.3.4", 1)),  # type: ignore[arg-type]
    "LOCAL with addresses": lambda: proxyproto.encode_v2(
        ("1.2.3.4", 1), ("1.2.3.4", 1), command=Command.LOCAL
    ),
    "command as int": lambda: proxyproto.encode_v2(None, None, command=1),  # type: ignore[arg-type]
    "TLV type 256": lambda: proxyproto.encode_v2(None, None, tlvs={256: b""}),
    "TLV type -1": lambda: proxyproto.encode_v2(None, None, tlvs={-1: b""}),
    "TLV value too long": lambda: proxyproto.encode_v2(None, None, tlvs={1: b"x" * 65536}),
}


@pytest.mark.parametrize("call", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_misuse_is_a_local_error(call: object) -> None:
    assert callable(call)
    with pytest.raises(LocalProtocolError):
        call()


def test_v2_fixed_bytes_are_literal() -> None:
    assert v2(0x21, 0x11, bytes(12))[:16] == SIG + b"\x21\x11\x00\x0c"
