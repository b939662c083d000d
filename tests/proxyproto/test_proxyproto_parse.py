"""parse_proxy_header against byte-exact vectors from proxy-protocol.txt, split at every offset."""

from __future__ import annotations

import dataclasses

import pytest
from proxyproto_helpers import SIG, VALID, outcome, tlv, v2

from ferryman import proxyproto
from ferryman.errors import RemoteProtocolError
from ferryman.proxyproto._crc32c import crc32c


@pytest.mark.parametrize(("wire", "expected"), VALID.values(), ids=VALID.keys())
def test_valid_vectors(wire: bytes, expected: proxyproto.ProxyHeader) -> None:
    assert proxyproto.parse_proxy_header(wire) == expected
    assert expected.length == len(wire)


@pytest.mark.parametrize(("wire", "expected"), VALID.values(), ids=VALID.keys())
def test_every_prefix_needs_data_and_the_stream_is_left_alone(
    wire: bytes, expected: proxyproto.ProxyHeader
) -> None:
    for cut in range(len(wire)):
        assert proxyproto.parse_proxy_header(wire[:cut]) is proxyproto.NEED_DATA, cut
    # The client's own bytes may arrive in the same segment; they are not part of the header.
    for payload in (b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x02\x00\x01", b"\r\n", SIG):
        stream = wire + payload
        header = proxyproto.parse_proxy_header(stream)
        assert header == expected
        assert isinstance(header, proxyproto.ProxyHeader)
        assert stream[header.length :] == payload


def test_v1_line_of_exactly_107_bytes_is_the_limit() -> None:
    assert len(VALID["v1-unknown-worst-case"][0]) == proxyproto.V1_MAX_LENGTH
    too_long = b"PROXY UNKNOWN " + b"f" * 92 + b"\r\n"
    assert len(too_long) == 108
    with pytest.raises(RemoteProtocolError, match="107"):
        proxyproto.parse_proxy_header(too_long)
    # Without a CRLF, 107 bytes are enough to give up.
    with pytest.raises(RemoteProtocolError, match="107"):
        proxyproto.parse_proxy_header(b"PROXY UNKNOWN " + b"f" * 93)
    assert proxyproto.parse_proxy_header(b"PROXY UNKNOWN " + b"f" * 92) is proxyproto.NEED_DATA
    # CR as the 107th byte: its LF would be the 108th.
    with pytest.raises(RemoteProtocolError, match="107"):
        proxyproto.parse_proxy_header(b"PROXY UNKNOWN " + b"f" * 92 + b"\r")


def test_v1_unknown_ignores_the_rest_of_the_line() -> None:
    line = b"PROXY UNKNOWN whatever \xff\x00 goes\r\n"
    header = proxyproto.parse_proxy_header(line + b"rest")
    assert isinstance(header, proxyproto.ProxyHeader)
    assert header.family is proxyproto.Family.UNKNOWN
    assert header.length == len(line)


V1_ERRORS = {
    "lower-case keyword": b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "unknown protocol": b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    "UDP4": b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "UNKNOWN glued": b"PROXY UNKNOWNX\r\n",
    "double space": b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
    "trailing space": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
    "missing port": b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
    "extra field": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
    "tab separator": b"PROXY TCP4\t1.2.3.4 5.6.7.8 1 2\r\n",
    "heading zero in octet": b"PROXY TCP4 192.168.0.01 5.6.7.8 1 2\r\n",
    "octet over 255": b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
    "three octets": b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
    "heading zero in port": b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n",
    "port 65536": b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
    "signed port": b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
    "hex port": b"PROXY TCP4 1.2.3.4 5.6.7.8 0x1 2\r\n",
    "empty port": b"PROXY TCP4 1.2.3.4 5.6.7.8  2\r\n",
    "TCP4 with IPv6": b"PROXY TCP4 ::1 ::1 1 2\r\n",
    "TCP6 with IPv4": b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
    "IPv6 zone id": b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
    "IPv6 two double colons": b"PROXY TCP6 1::2::3 ::1 1 2\r\n",
    "host name": b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n",
    "lone LF": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
    "lone CR": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",
    "CR inside": b"PROXY UNKNOWN a\rb\r\n",
    "LF inside": b"PROXY UNKNOWN a\nb\r\n",
    "unicode digits": "PROXY TCP4 1.2.3.4 5.6.7.8 \u0661 2\r\n".encode(),
}


@pytest.mark.parametrize("wire", V1_ERRORS.values(), ids=V1_ERRORS.keys())
def test_v1_errors(wire: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        proxyproto.parse_proxy_header(wire)


V2_ERRORS = {
    "version 1 nibble": v2(0x11, 0x11, bytes(12)),
    "version 3 nibble": v2(0x31, 0x11, bytes(12)),
    "command 2": v2(0x22, 0x11, bytes(12)),
    "command 15": v2(0x2F, 0x00, b""),
    "family 4": v2(0x21, 0x41, bytes(12)),
    "protocol 3": v2(0x21, 0x13, bytes(12)),
    "UNSPEC family with STREAM": v2(0x21, 0x01, b""),
    "INET with UNSPEC protocol": v2(0x21, 0x10, bytes(12)),
    "INET length 11": v2(0x21, 0x11, bytes(11)),
    "INET6 length 35": v2(0x21, 0x21, bytes(35)),
    "UNIX length 215": v2(0x21, 0x31, bytes(215)),
    "LOCAL with a short INET block": v2(0x20, 0x11, bytes(4)),
    "two stray bytes after the address": v2(0x21, 0x11, bytes(12) + b"\x01\x00"),
    "TLV overruns": v2(0x21, 0x11, bytes(12) + b"\x01\x00\x05abc"),
    "duplicate TLV": v2(0x21, 0x00, tlv(0x01, b"h2") + tlv(0x01, b"h2")),
    "CRC32C of 3 bytes": v2(0x21, 0x00, tlv(0x03, b"\x00\x00\x00")),
    "CRC32C mismatch": v2(0x21, 0x00, tlv(0x03, b"\x00\x00\x00\x00")),
}


@pytest.mark.parametrize("wire", V2_ERRORS.values(), ids=V2_ERRORS.keys())
def test_v2_errors(wire: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        proxyproto.parse_proxy_header(wire)


def test_v2_crc32c_is_checked_over_the_whole_header() -> None:
    wire, _ = VALID["v2-tcp4-crc32c"]
    assert isinstance(proxyproto.parse_proxy_header(wire), proxyproto.ProxyHeader)
    tlv_type_at = len(wire) - 7
    for position in range(len(wire)):
        if 12 <= position < 16 or position == tlv_type_at:
            # The fixed part has its own checks; a flipped TLV type is simply no longer a CRC.
            continue
        broken = bytearray(wire)
        broken[position] ^= 0x40
        with pytest.raises(RemoteProtocolError):
            proxyproto.parse_proxy_header(bytes(broken))


EARLY = {
    "http": b"GET / HTTP/1.1\r\n",
    "tls": b"\x16\x03\x01",
    "pg": b"\x00\x00\x00\x08",
    "bad signature byte": SIG[:6] + b"X",
    "wrong keyword": b"PROXX",
    "keyword without space": b"PROXY\t",
    "bad protocol token": b"PROXY TCP9",
    "bad address character": b"PROXY TCP4 1.2.3.4 z",
    "bad version": SIG + b"\x11",
    "bad family": SIG + b"\x21\x99",
}


@pytest.mark.parametrize("wire", EARLY.values(), ids=EARLY.keys())
def test_errors_are_raised_as_soon_as_the_bytes_show_them(wire: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        proxyproto.parse_proxy_header(wire)


@pytest.mark.parametrize(
    "wire",
    [
        b"",
        b"P",
        b"PROXY",
        b"PROXY ",
        b"PROXY UNK",
        b"PROXY TCP4 1.2.3.4 5.6",
        b"PROXY UNKNOWN\r",
        SIG[:1],
        SIG,
        SIG + b"\x21\x11\x00",
    ],
)
def test_need_data(wire: bytes) -> None:
    assert proxyproto.parse_proxy_header(wire) is proxyproto.NEED_DATA


def test_crc32c_matches_rfc3720_vectors() -> None:
    # RFC 3720 Appendix B.4 (the iSCSI CRC is CRC-32C), plus the common "123456789" check value.
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C
    assert crc32c(b"123456789") == 0xE3069283


def test_header_is_frozen_and_hashable() -> None:
    header = proxyproto.parse_proxy_header(VALID["v2-tcp4-tlvs-and-noop-padding"][0])
    assert isinstance(header, proxyproto.ProxyHeader)
    with pytest.raises(dataclasses.FrozenInstanceError):
        header.src_port = 1  # type: ignore[misc]
    assert hash(header) == hash(dataclasses.replace(header))
    assert not hasattr(header, "__dict__")


def test_outcome_helper() -> None:
    result = outcome(b"nope")
    assert isinstance(result, str)
    assert result.startswith("error: ")
