"""Every valid hello, cut at every offset, must give the same answer (h11's test_io idea)."""

from __future__ import annotations

import ssl
import time

import pytest
from tlshello_helpers import (
    GREASE,
    alpn_ext,
    client_hello,
    ext,
    handshake,
    hello_body,
    psk_ext,
    python_hello,
    records,
    sni_ext,
    sniff_in_chunks,
    versions_ext,
)

from ferryman import tlshello

CORPUS = {
    "python-tls13": python_hello("db.example.com", ["postgresql", "h2"]),
    "python-tls12": python_hello("legacy.example", maximum_version=ssl.TLSVersion.TLSv1_2),
    "python-no-sni": python_hello(None),
    "handmade-grease": client_hello(
        [
            ext(GREASE[1], b""),
            sni_ext(b"g.example"),
            alpn_ext(b"h2"),
            versions_ext(GREASE[4], 0x0304),
            psk_ext(),
        ]
    ),
    "handmade-5-records": records(
        handshake(hello_body(extensions=[sni_ext(b"frag.example"), alpn_ext(b"x")])), [1, 2, 30, 40]
    ),
    "handmade-no-extensions": records(handshake(hello_body(extensions=None)), [4]),
}


@pytest.mark.parametrize("data", CORPUS.values(), ids=CORPUS.keys())
def test_every_prefix_needs_data_then_the_same_hello(data: bytes) -> None:
    expected = tlshello.parse_client_hello(data)
    assert isinstance(expected, tlshello.ClientHello)
    assert expected.raw_length == len(data)
    for cut in range(len(data)):
        assert tlshello.parse_client_hello(data[:cut]) is tlshello.NEED_DATA, cut
    # Whatever follows the hello does not change it.
    assert tlshello.parse_client_hello(data + b"\x14\x03\x03\x00\x01\x01") == expected


@pytest.mark.parametrize("data", CORPUS.values(), ids=CORPUS.keys())
def test_sniffer_split_at_every_offset(data: bytes) -> None:
    expected = tlshello.parse_client_hello(data)
    for cut in range(len(data) + 1):
        assert sniff_in_chunks([data[:cut], data[cut:]]) == expected, cut


@pytest.mark.parametrize("data", CORPUS.values(), ids=CORPUS.keys())
def test_sniffer_one_byte_at_a_time(data: bytes) -> None:
    expected = tlshello.parse_client_hello(data)
    assert sniff_in_chunks(data[i : i + 1] for i in range(len(data))) == expected


def test_sniffer_is_linear_in_tiny_records() -> None:
    # ~10,000 one-byte records (~60 KB, just under the cap) fed one byte per call: with a
    # re-parse per call this is ~10^8 record-header steps; the sniffer resumes, so it is quick.
    payload = handshake(hello_body(extensions=[sni_ext(b"slow.example"), ext(0xFFCE, b"\x00" * 10500)]))
    data = records(payload, [1] * (len(payload) - 1))
    assert 60_000 < len(data) <= tlshello.MAX_HELLO_SIZE
    started = time.perf_counter()
    result = sniff_in_chunks(data[i : i + 1] for i in range(len(data)))
    elapsed = time.perf_counter() - started
    assert isinstance(result, tlshello.ClientHello)
    assert result.sni == "slow.example"
    assert elapsed < 10, f"took {elapsed:.1f}s: the sniffer is re-parsing from the start"
