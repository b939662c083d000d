"""Property tests: any bytes give NEED_DATA, a ProxyHeader or RemoteProtocolError; encode round-trips.

Profiles: ``fast`` by default, ``HYPOTHESIS_PROFILE=deep`` for a long run (see conftest.py).
"""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st
from proxyproto_helpers import SIG, VALID, Outcome, outcome

from ferryman import proxyproto
from ferryman.proxyproto import Command, Family

VALID_WIRES = [wire for wire, _ in VALID.values()]


def check_outcome(data: bytes) -> Outcome:
    result = outcome(data)
    assert result is proxyproto.NEED_DATA or isinstance(result, proxyproto.ProxyHeader | str)
    if isinstance(result, proxyproto.ProxyHeader):
        assert 0 < result.length <= len(data)
        assert result.version in (1, 2)
        if result.version == 1:
            assert result.length <= proxyproto.V1_MAX_LENGTH
            assert not result.tlvs
        if result.family in (Family.TCP4, Family.TCP6):
            assert result.src_port is not None and 0 <= result.src_port <= 0xFFFF
            assert result.dst_port is not None and 0 <= result.dst_port <= 0xFFFF
            ipaddress.ip_address(result.src_addr or "")
            ipaddress.ip_address(result.dst_addr or "")
        if result.family is Family.UNKNOWN:
            assert result.src_addr is None and result.dst_addr is None
        # Whatever comes after the header does not change it.
        assert outcome(data[: result.length]) == result
    return result


@given(st.binary(max_size=300))
def test_arbitrary_bytes(data: bytes) -> None:
    check_outcome(data)


@given(st.binary(max_size=300))
def test_bytes_after_the_v2_signature(tail: bytes) -> None:
    check_outcome(SIG + tail)


@given(
    st.sampled_from([0x20, 0x21]),
    st.sampled_from([0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32, 0x13, 0x40]),
    st.binary(max_size=260),
    st.booleans(),
)
def test_v2_with_plausible_fixed_part(ver_cmd: int, fam: int, block: bytes, honest_length: bool) -> None:
    length = len(block) if honest_length else len(block) + 1
    check_outcome(SIG + bytes([ver_cmd, fam]) + length.to_bytes(2, "big") + block)


V1_ALPHABET = st.sampled_from(list(b"PROXYTCUNKW0123456789abcdefABCDEF.: \r\n46%"))


@given(st.lists(V1_ALPHABET, max_size=120).map(bytes))
def test_v1_like_lines(tail: bytes) -> None:
    check_outcome(b"PROXY " + tail)


@given(st.sampled_from(VALID_WIRES), st.data())
def test_mutated_valid_headers(wire: bytes, data: st.DataObject) -> None:
    mutated = bytearray(wire)
    for _ in range(data.draw(st.integers(1, 3))):
        mutated[data.draw(st.integers(0, len(mutated) - 1))] ^= data.draw(st.integers(1, 255))
    check_outcome(bytes(mutated))


@given(st.sampled_from(VALID_WIRES), st.data())
def test_truncated_valid_headers_need_data(wire: bytes, data: st.DataObject) -> None:
    assert check_outcome(wire[: data.draw(st.integers(0, len(wire) - 1))]) is proxyproto.NEED_DATA


ENDPOINT = st.one_of(
    st.tuples(st.ip_addresses(v=4), st.integers(0, 0xFFFF)),
    st.tuples(st.ip_addresses(v=6), st.integers(0, 0xFFFF)),
)
TLVS = st.dictionaries(
    st.integers(0, 255).filter(lambda t: t not in (proxyproto.PP2_TYPE_NOOP, proxyproto.PP2_TYPE_CRC32C)),
    st.binary(max_size=40),
    max_size=5,
)


def _expected(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, other_version: int) -> str:
    if ip.version == 4 and other_version == 6:
        return str(ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + ip.packed))
    return str(ip)


@given(ENDPOINT, ENDPOINT, TLVS, st.booleans())
def test_round_trip(
    src: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int],
    dst: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int],
    tlvs: dict[int, bytes],
    crc: bool,
) -> None:
    sent = {**tlvs, proxyproto.PP2_TYPE_CRC32C: b""} if crc else tlvs
    wires = [
        (1, proxyproto.encode_v1((str(src[0]), src[1]), (str(dst[0]), dst[1]))),
        (2, proxyproto.encode_v2(src, dst, tlvs=sent)),
    ]
    for version, wire in wires:
        header = check_outcome(wire)
        assert isinstance(header, proxyproto.ProxyHeader)
        assert (header.version, header.command, header.length) == (version, Command.PROXY, len(wire))
        mixed = 6 if 6 in (src[0].version, dst[0].version) else 4
        assert header.family is (Family.TCP6 if mixed == 6 else Family.TCP4)
        assert header.src_addr == _expected(src[0], mixed)
        assert header.dst_addr == _expected(dst[0], mixed)
        assert (header.src_port, header.dst_port) == (src[1], dst[1])
        if version == 2:
            assert {k: v for k, v in header.tlvs.items() if k != proxyproto.PP2_TYPE_CRC32C} == tlvs
        for cut in range(len(wire)):
            assert proxyproto.parse_proxy_header(wire[:cut]) is proxyproto.NEED_DATA
