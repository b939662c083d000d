"""Property tests: any bytes give NEED_DATA, NotTLS, a ClientHello or RemoteProtocolError.

Profiles: ``fast`` by default, ``HYPOTHESIS_PROFILE=deep`` for a long run (see conftest.py).
"""

from __future__ import annotations

import itertools
import ssl

from hypothesis import given
from hypothesis import strategies as st
from tlshello_helpers import (
    GREASE,
    alpn_ext,
    client_hello,
    ext,
    handshake,
    hello_body,
    outcome,
    psk_ext,
    python_hello,
    records,
    sni_ext,
    sniff_in_chunks,
    versions_ext,
)

from ferryman import tlshello

VALID = [
    python_hello("db.example.com", ["postgresql", "h2"]),
    python_hello("legacy.example", maximum_version=ssl.TLSVersion.TLSv1_2),
    python_hello(None),
    client_hello(
        [ext(GREASE[1], b""), sni_ext(b"g.example"), alpn_ext(b"h2"), versions_ext(0x0304), psk_ext()]
    ),
    records(handshake(hello_body(extensions=[sni_ext(b"frag.example"), alpn_ext(b"x")])), [1, 2, 30]),
]


def check_outcome(data: bytes) -> tlshello.SniffResult | str:
    """Run the parser; anything but the four allowed outcomes fails the test by propagating."""
    result = outcome(data)
    assert result is tlshello.NEED_DATA or isinstance(result, tlshello.NotTLS | tlshello.ClientHello | str)
    # looks_like_tls agrees with the parser on what is "not TLS".
    verdict = tlshello.looks_like_tls(data[:2])
    assert (verdict is False) == isinstance(result, tlshello.NotTLS)
    if isinstance(result, tlshello.ClientHello):
        assert 0 < result.raw_length <= len(data)
        assert result.raw_length <= tlshello.MAX_HELLO_SIZE
    return result


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@given(st.binary(max_size=512))
def test_arbitrary_bytes(data: bytes) -> None:
    check_outcome(data)


@given(
    minor=st.integers(0, 6),
    length=st.integers(0, 0x4100),
    payload=st.binary(max_size=600),
    hello_header=st.booleans(),
)
def test_tls_looking_bytes(minor: int, length: int, payload: bytes, hello_header: bool) -> None:
    # Get past the first-byte check so the record and handshake layers are exercised.
    if hello_header:
        payload = b"\x01" + len(payload).to_bytes(3, "big") + payload
    check_outcome(b"\x16\x03" + bytes([minor]) + length.to_bytes(2, "big") + payload)


@given(st.sampled_from(VALID), st.data())
def test_mutated_valid_hellos(valid: bytes, data: st.DataObject) -> None:
    mutated = bytearray(valid)
    for _ in range(data.draw(st.integers(1, 4), label="flips")):
        position = data.draw(st.integers(0, len(mutated) - 1), label="position")
        mutated[position] ^= data.draw(st.integers(1, 255), label="xor")
    check_outcome(bytes(mutated))


@given(st.sampled_from(VALID), st.data())
def test_truncated_valid_hellos_need_data(valid: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(valid) - 1))
    assert check_outcome(valid[:cut]) is tlshello.NEED_DATA


@given(st.sampled_from(VALID), st.binary(min_size=1, max_size=64))
def test_extended_valid_hellos_are_unchanged(valid: bytes, extra: bytes) -> None:
    assert check_outcome(valid + extra) == check_outcome(valid)


@given(st.sampled_from(VALID), st.data())
def test_inserted_or_deleted_bytes(valid: bytes, data: st.DataObject) -> None:
    position = data.draw(st.integers(0, len(valid) - 1))
    if data.draw(st.booleans()):
        mutated = valid[:position] + data.draw(st.binary(min_size=1, max_size=8)) + valid[position:]
    else:
        mutated = valid[:position] + valid[position + data.draw(st.integers(1, 8)) :]
    check_outcome(mutated)


@given(
    st.one_of(st.binary(max_size=300), st.sampled_from(VALID)),
    st.lists(st.integers(min_value=0), max_size=6),
)
def test_chunked_sniffer_agrees_with_one_shot(data: bytes, cuts: list[int]) -> None:
    assert sniff_in_chunks(split(data, cuts)) == outcome(data)


LABEL = st.from_regex(r"\A[a-zA-Z0-9_]([a-zA-Z0-9_-]{0,10}[a-zA-Z0-9_])?\Z")
TOP_LABEL = st.from_regex(r"\A[a-zA-Z][a-zA-Z0-9-]{0,6}[a-zA-Z0-9]\Z")
ALPN_NAME = st.binary(min_size=1, max_size=12).filter(
    lambda b: not (len(b) == 2 and tlshello.is_grease(int.from_bytes(b, "big")))
)


@given(
    labels=st.lists(LABEL, max_size=4),
    top=TOP_LABEL,
    with_sni=st.booleans(),
    alpn=st.lists(ALPN_NAME, max_size=5),
    versions=st.lists(st.sampled_from([0x0304, 0x0303, 0x0302, 0x0301]), min_size=1, max_size=4, unique=True),
    grease=st.lists(st.sampled_from(GREASE), max_size=3, unique=True),
    data=st.data(),
)
def test_generated_hellos_decode_to_their_inputs(
    labels: list[str],
    top: str,
    with_sni: bool,
    alpn: list[bytes],
    versions: list[int],
    grease: list[int],
    data: st.DataObject,
) -> None:
    host = ".".join([*labels, top])
    extensions = [versions_ext(*grease, *versions), *(ext(g, b"\x00") for g in grease)]
    if with_sni:
        extensions.append(sni_ext(host.encode()))
    if alpn:
        extensions.append(alpn_ext(*alpn))
    extensions = data.draw(st.permutations(extensions), label="order")
    payload = handshake(hello_body(cipher_suites=(*grease, 0x1301, 0xC02F), extensions=extensions))
    sizes = data.draw(st.lists(st.integers(1, 64), max_size=4), label="record sizes")
    wire = records(payload, sizes)

    hello = check_outcome(wire)
    assert isinstance(hello, tlshello.ClientHello)
    assert hello.sni == (host.lower() if with_sni else None)
    assert hello.alpn == tuple(a.decode("latin-1") for a in alpn)
    assert hello.supported_versions == tuple(versions)
    assert hello.cipher_suites == (0x1301, 0xC02F)
    assert not any(tlshello.is_grease(t) for t in hello.extension_types)
    assert hello.raw_length == len(wire)
    assert sniff_in_chunks(split(wire, data.draw(st.lists(st.integers(0), max_size=5)))) == hello


@given(name=st.binary(min_size=1, max_size=300), data=st.data())
def test_any_host_name_bytes_decode_to_a_name_or_none(name: bytes, data: st.DataObject) -> None:
    # The host name's syntax never makes a well-framed hello an error: it is routed on when it
    # is printable ASCII (trailing dot dropped, lower-cased), and is "no SNI" otherwise.
    wire = client_hello([sni_ext(name), alpn_ext(b"h2")])
    hello = check_outcome(wire)
    assert isinstance(hello, tlshello.ClientHello)
    stripped = name[:-1] if name.endswith(b".") else name
    usable = 0 < len(stripped) <= 253 and all(0x21 <= b <= 0x7E for b in stripped)
    assert hello.sni == (stripped.decode("ascii").lower() if usable else None)
    assert hello.alpn == ("h2",)
    assert sniff_in_chunks(split(wire, data.draw(st.lists(st.integers(0), max_size=5)))) == hello


@given(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=60))
def test_printable_host_names_round_trip(host: str) -> None:
    hello = check_outcome(client_hello([sni_ext(host.encode("ascii") + b".")]))
    assert isinstance(hello, tlshello.ClientHello)
    assert hello.sni == host.lower()
