"""Hand-made ClientHellos: one rule per test, valid forms first, then each way to break them."""

from __future__ import annotations

import dataclasses
import itertools
from typing import assert_never

import pytest
from tlshello_helpers import (
    GREASE,
    alpn_ext,
    client_hello,
    ext,
    groups_ext,
    handshake,
    hello_body,
    key_share_ext,
    psk_ext,
    records,
    sni_ext,
    u16,
    vec8,
    vec16,
    versions_ext,
)

from ferryman import tlshello
from ferryman.errors import LocalProtocolError, RemoteProtocolError

STANDARD_EXTENSIONS = [
    sni_ext(b"db.example.com"),
    alpn_ext(b"h2", b"http/1.1"),
    versions_ext(0x0304, 0x0303),
    groups_ext(0x001D, 0x0017),
    key_share_ext(),
]


def parse_ok(data: bytes) -> tlshello.ClientHello:
    result = tlshello.parse_client_hello(data)
    assert isinstance(result, tlshello.ClientHello), result
    return result


def test_decodes_every_field() -> None:
    data = client_hello(STANDARD_EXTENSIONS)
    assert parse_ok(data) == tlshello.ClientHello(
        sni="db.example.com",
        alpn=("h2", "http/1.1"),
        legacy_version=0x0303,
        supported_versions=(0x0304, 0x0303),
        cipher_suites=(0x1301, 0x1302, 0x1303),
        extension_types=(0, 16, 43, 10, 51),
        raw_length=len(data),
    )


def test_grease_is_accepted_everywhere_and_dropped() -> None:
    # Chrome's shape (RFC 8701): GREASE suite first, GREASE extensions first and last with
    # different values, GREASE in versions and ALPN.
    body = hello_body(
        cipher_suites=(GREASE[3], 0x1301, 0x1302),
        extensions=[
            ext(GREASE[5], b""),
            sni_ext(b"grease.example"),
            alpn_ext(GREASE[7].to_bytes(2, "big"), b"h2"),
            versions_ext(GREASE[9], 0x0304, 0x0303),
            groups_ext(GREASE[2], 0x001D),
            ext(GREASE[11], b"\x00"),
        ],
    )
    hello = parse_ok(records(handshake(body)))
    assert hello.cipher_suites == (0x1301, 0x1302)
    assert hello.alpn == ("h2",)
    assert hello.supported_versions == (0x0304, 0x0303)
    assert hello.extension_types == (0, 16, 43, 10)
    assert hello.sni == "grease.example"


@pytest.mark.parametrize("value", GREASE)
def test_is_grease_matches_rfc8701_values(value: int) -> None:
    assert tlshello.is_grease(value)
    assert not tlshello.is_grease(value ^ 0x0100)


def test_extension_order_does_not_matter() -> None:
    expected = parse_ok(client_hello(STANDARD_EXTENSIONS[:4]))
    for order in itertools.permutations(STANDARD_EXTENSIONS[:4]):
        hello = parse_ok(client_hello(order))
        assert sorted(hello.extension_types) == sorted(expected.extension_types)
        assert dataclasses.replace(hello, extension_types=expected.extension_types) == expected


def test_no_sni_is_not_an_error() -> None:
    hello = parse_ok(client_hello([alpn_ext(b"h2"), versions_ext(0x0304)]))
    assert hello.sni is None
    assert hello.alpn == ("h2",)


def test_hello_without_extensions_block() -> None:
    # RFC 5246 §7.4.1.2: a TLS 1.0-1.2 hello may end after the compression methods.
    data = records(handshake(hello_body(extensions=None, cipher_suites=(0xC02F,))))
    hello = parse_ok(data)
    assert (hello.sni, hello.alpn, hello.supported_versions, hello.extension_types) == (None, (), (), ())
    assert hello.cipher_suites == (0xC02F,)


def test_empty_extensions_block() -> None:
    assert parse_ok(client_hello([])).extension_types == ()


def test_sni_takes_the_host_name_among_other_name_types() -> None:
    data = client_hello([sni_ext((7, b"\x01\x02opaque"), b"Host.Example.ORG", (1, b"x"))])
    assert parse_ok(data).sni == "host.example.org"


@pytest.mark.parametrize(
    "name",
    [
        b"a",
        b"localhost",
        b"xn--bcher-kva.example",
        b"my_host.corp",
        b"a-b.c-d.e",
        b"1.2.3.example",
        b"x" * 63 + b".io",
    ],
)
def test_valid_host_names(name: bytes) -> None:
    assert parse_ok(client_hello([sni_ext(name)])).sni == name.decode().lower()


@pytest.mark.parametrize(
    ("name", "sni"),
    [
        # Not RFC 6066 host names, but sent by real clients: routed on as received (HAProxy's
        # req.ssl_sni and Go's ServerName do the same), so a rule or the fallback decides.
        (b"example.com.", "example.com"),  # trailing dot: the root label of an FQDN, dropped
        (b"DB.Example.COM.", "db.example.com"),
        (b"10.0.0.1", "10.0.0.1"),  # IPv4 literal (forbidden by RFC 6066 §3, sent anyway)
        (b"::1", "::1"),
        (b"[::1]", "[::1]"),
        (b"-lead.example", "-lead.example"),
        (b"trail-.example", "trail-.example"),
        (b".example.com", ".example.com"),
        (b"a..b", "a..b"),
        (b"example.com..", "example.com."),  # only the one root dot is dropped
        (b"x" * 64 + b".example", "x" * 64 + ".example"),  # a label over 63
        (b"host:443", "host:443"),
        (b"a/b*c", "a/b*c"),
        (b"a" * 253, "a" * 253),
        (b"a" * 253 + b".", "a" * 253),
    ],
)
def test_unusual_host_names_are_routed_on(name: bytes, sni: str) -> None:
    assert parse_ok(client_hello([sni_ext(name)])).sni == sni


@pytest.mark.parametrize(
    ("name", "why"),
    [
        (b"exa mple.com", "space"),
        (b"evil.com\x00.good.com", "NUL"),
        (b"tab\t.example", "control character"),
        (b"del\x7f.example", "DEL"),
        (b"b\xc3\xbccher.example", "U-label instead of A-label"),
        (b"\xff", "non-ASCII byte"),
        (b".", "nothing but the root"),
        (b"a" * 254, "name over 253"),
        ((b"a" * 63 + b".") * 4, "name over 253 even without its trailing dot"),
    ],
)
def test_unusable_host_names_count_as_no_sni(name: bytes, why: str) -> None:
    # Not an error either: the hello is well formed, there is just no name to route on.
    hello = parse_ok(client_hello([sni_ext(name), alpn_ext(b"h2")]))
    assert (hello.sni, hello.alpn) == (None, ("h2",)), why
    assert 0 in hello.extension_types  # the server_name extension was there


@pytest.mark.parametrize(
    ("sizes", "version"),
    [
        ([1], 0x0301),  # the handshake type alone in the first record
        ([2], 0x0303),  # split inside the 24-bit length
        ([4, 100], 0x0301),  # three records
        ([3, 7, 50], 0x0303),  # four records
        ([1, 1, 1, 100], 0x0301),  # five records
        ([4], 0x0300),  # SSL 3.0 record version, allowed by RFC 5246 Appendix E.1
        ([], 0x0302),
        ([], 0x0304),
    ],
)
def test_hello_fragmented_over_records(sizes: list[int], version: int) -> None:
    payload = handshake(hello_body(extensions=STANDARD_EXTENSIONS))
    data = records(payload, sizes, version=version)
    assert len(data) == len(payload) + 5 * (len(sizes) + 1)
    hello = parse_ok(data)
    assert hello.sni == "db.example.com"
    assert hello.raw_length == len(data)


def test_records_after_the_hello_are_not_examined() -> None:
    data = client_hello(STANDARD_EXTENSIONS)
    ccs = b"\x14\x03\x03\x00\x01\x01"
    early_data = b"\x17\x03\x03\x00\x05hello"
    hello = parse_ok(data + ccs + early_data + b"\xff garbage")
    assert hello.raw_length == len(data)


def test_psk_as_last_extension_is_fine() -> None:
    assert parse_ok(client_hello([*STANDARD_EXTENSIONS, psk_ext()])).extension_types[-1] == 41


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="http"),
        pytest.param(b"\x00\x00\x00\x08\x04\xd2\x16\x2f", id="pg-sslrequest"),
        pytest.param(b"\x00\x00\x00\x29\x00\x03\x00\x00user\x00alice\x00\x00", id="pg-startup"),
        pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n", id="ssh"),
        pytest.param(b"\x80\x2e\x01\x03\x01\x00\x15\x00\x00\x00\x10", id="sslv2-compatible-hello"),
        pytest.param(b"\x16\x02\x00\x00\x10", id="handshake-byte-then-wrong-major"),
        pytest.param(b"\x15\x03\x01\x00\x02\x02\x28", id="alert-record-first"),
        pytest.param(b"\x17\x03\x03\x00\x05hello", id="application-data-first"),
        pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", id="proxy-protocol-v1"),
    ],
)
def test_not_tls(data: bytes) -> None:
    result = tlshello.parse_client_hello(data)
    assert isinstance(result, tlshello.NotTLS)
    assert result.reason
    # Decided from the first byte or two, without waiting for anything else.
    assert tlshello.parse_client_hello(data[:2]) == result
    assert tlshello.looks_like_tls(data[:2]) is False


def test_sslv2_reason_says_so() -> None:
    result = tlshello.parse_client_hello(b"\x80\x2e\x01\x03\x01")
    assert isinstance(result, tlshello.NotTLS)
    assert "SSLv2" in result.reason


@pytest.mark.parametrize(
    ("first", "expected"),
    [
        (b"", None),
        (b"\x16", None),
        (b"\x16\x03", True),
        (b"\x16\x03\x01\x02\x00", True),
        (b"\x16\x02", False),
        (b"G", False),
        (b"\x00", False),
        (b"\x80", False),
    ],
)
def test_looks_like_tls(first: bytes, expected: bool | None) -> None:
    assert tlshello.looks_like_tls(first) is expected


def test_need_data_on_short_inputs() -> None:
    assert tlshello.parse_client_hello(b"") is tlshello.NEED_DATA
    assert tlshello.parse_client_hello(b"\x16") is tlshello.NEED_DATA
    assert tlshello.parse_client_hello(b"\x16\x03\x01") is tlshello.NEED_DATA
    assert repr(tlshello.NEED_DATA) == "NEED_DATA"


def _body_with(**fields: bytes) -> bytes:
    parts = {
        "version": u16(0x0303),
        "random": b"\x42" * 32,
        "session_id": vec8(b""),
        "suites": vec16(u16(0x1301)),
        "compression": vec8(b"\x00"),
        "extensions": vec16(sni_ext(b"ok.example")),
    }
    parts.update(fields)
    return b"".join(parts.values())


BROKEN_BODIES = {
    "legacy_version 2.0": _body_with(version=u16(0x0200)),
    "session id of 33 bytes": _body_with(session_id=vec8(b"\x00" * 33)),
    "empty cipher suites": _body_with(suites=vec16(b"")),
    "odd cipher suites": _body_with(suites=vec16(b"\x13\x01\x13")),
    "empty compression methods": _body_with(compression=vec8(b"")),
    "no null compression": _body_with(compression=vec8(b"\x01")),
    "trailing byte after extensions": _body_with() + b"\x00",
    "extensions length too long": _body_with(extensions=u16(40) + sni_ext(b"ok.example")),
    "extensions length too short": _body_with(extensions=u16(5) + sni_ext(b"ok.example")),
    "lone byte instead of extensions": _body_with(extensions=b"\x00"),
    "truncated random": u16(0x0303) + b"\x42" * 20,
    "duplicate extension": _body_with(extensions=vec16(alpn_ext(b"h2") + alpn_ext(b"h2"))),
    "duplicate GREASE extension": _body_with(extensions=vec16(ext(0x0A0A, b"") + ext(0x0A0A, b""))),
    "psk not last": _body_with(extensions=vec16(psk_ext() + alpn_ext(b"h2"))),
    "empty SNI extension": _body_with(extensions=vec16(ext(0, b""))),
    "empty server_name_list": _body_with(extensions=vec16(ext(0, vec16(b"")))),
    "SNI list shorter than extension": _body_with(
        extensions=vec16(ext(0, vec16(b"\x00" + vec16(b"a.b")) + b"!"))
    ),
    "SNI name overruns list": _body_with(extensions=vec16(ext(0, vec16(b"\x00\x00\x09a.b")))),
    "empty host_name": _body_with(extensions=vec16(ext(0, vec16(b"\x00" + vec16(b""))))),
    "two host_names": _body_with(extensions=vec16(sni_ext(b"a.example", b"b.example"))),
    "SNI without host_name": _body_with(extensions=vec16(sni_ext((1, b"x")))),
    "empty ALPN list": _body_with(extensions=vec16(ext(16, vec16(b"")))),
    "empty ALPN name": _body_with(extensions=vec16(ext(16, vec16(b"\x00\x02h2")))),
    "ALPN name overruns": _body_with(extensions=vec16(ext(16, vec16(b"\x05h2")))),
    "odd supported_versions": _body_with(extensions=vec16(ext(43, vec8(b"\x03\x04\x03")))),
    "empty supported_versions": _body_with(extensions=vec16(ext(43, vec8(b"")))),
    "supported_versions trailing": _body_with(extensions=vec16(ext(43, vec8(b"\x03\x04") + b"\x00"))),
}


@pytest.mark.parametrize("body", BROKEN_BODIES.values(), ids=BROKEN_BODIES.keys())
def test_broken_body(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        tlshello.parse_client_hello(records(handshake(body)))


def test_trailing_handshake_bytes_after_hello_in_same_record() -> None:
    payload = handshake(_body_with())
    with pytest.raises(RemoteProtocolError, match="follow the ClientHello"):
        tlshello.parse_client_hello(records(payload + b"\x00"))
    # A second handshake message (e.g. a stray Finished) in the same record is the same thing.
    with pytest.raises(RemoteProtocolError, match="follow the ClientHello"):
        tlshello.parse_client_hello(records(payload + handshake(b"\x00" * 12, msg_type=20)))


def test_handshake_length_shorter_than_body() -> None:
    body = _body_with()
    payload = b"\x01" + (len(body) - 1).to_bytes(3, "big") + body
    with pytest.raises(RemoteProtocolError):
        tlshello.parse_client_hello(records(payload))


RECORD_ERRORS = {
    "zero-length record": b"\x16\x03\x01\x00\x00",
    "record over 2^14": b"\x16\x03\x01\x40\x01",
    "record version 3.5": b"\x16\x03\x05\x00\x10",
    "server hello first": b"\x16\x03\x01\x00\x30\x02",
    "hello length over the cap": b"\x16\x03\x01\x00\x04\x01\x01\x00\x00",
}


@pytest.mark.parametrize("data", RECORD_ERRORS.values(), ids=RECORD_ERRORS.keys())
def test_record_layer_errors_are_raised_early(data: bytes) -> None:
    # Each of these is refused from its first bytes, before the rest of the record arrives.
    with pytest.raises(RemoteProtocolError):
        tlshello.parse_client_hello(data)


def test_other_record_type_interleaved_mid_hello() -> None:
    payload = handshake(_body_with())
    first = records(payload[:10])
    with pytest.raises(RemoteProtocolError, match="interleaved"):
        tlshello.parse_client_hello(first + b"\x15\x03\x01\x00\x02\x02\x28")


def test_record_version_change_mid_hello() -> None:
    payload = handshake(_body_with())
    data = records(payload[:10], version=0x0301) + records(payload[10:], version=0x0303)
    with pytest.raises(RemoteProtocolError, match="version changed"):
        tlshello.parse_client_hello(data)


def test_total_size_cap() -> None:
    big = client_hello([ext(0xFFCE, b"\x00" * 20000)])
    assert parse_ok(big).raw_length == len(big)
    with pytest.raises(RemoteProtocolError, match="exceed"):
        tlshello.parse_client_hello(big, max_size=16000)
    # The cap counts record headers too: a hello in 1-byte records costs six bytes per byte.
    payload = handshake(_body_with())
    tiny = records(payload, [1] * (len(payload) - 1))
    assert parse_ok(tiny).raw_length == len(tiny)
    with pytest.raises(RemoteProtocolError, match="exceed"):
        tlshello.parse_client_hello(tiny, max_size=len(tiny) - 1)


def test_default_cap_is_64k() -> None:
    # Four full records of padding: the handshake alone fits in 64 KiB, the records do not.
    payload = handshake(hello_body(extensions=[ext(0xFFCE, b"\x00" * (65536 - 4 - 100))]))
    with pytest.raises(RemoteProtocolError, match="exceed"):
        tlshello.parse_client_hello(records(payload))


def test_sniffer_eof_and_sticky_outcomes() -> None:
    data = client_hello(STANDARD_EXTENSIONS)

    sniffer = tlshello.ClientHelloSniffer()
    sniffer.receive_data(data[:10])
    assert sniffer.next_event() is tlshello.NEED_DATA
    sniffer.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="closed"):
        sniffer.next_event()
    with pytest.raises(RemoteProtocolError, match="closed"):  # stays failed
        sniffer.next_event()
    with pytest.raises(LocalProtocolError):
        sniffer.receive_data(b"more")

    empty = tlshello.ClientHelloSniffer()
    empty.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        empty.next_event()

    done = tlshello.ClientHelloSniffer()
    done.receive_data(data)
    hello = done.next_event()
    assert isinstance(hello, tlshello.ClientHello)
    done.receive_data(b"\x17\x03\x03\x00\x01x")  # ignored: sniffing is over
    assert done.next_event() is hello

    plain = tlshello.ClientHelloSniffer()
    plain.receive_data(b"GET")
    assert isinstance(plain.next_event(), tlshello.NotTLS)
    plain.receive_data(b"")  # EOF after a verdict changes nothing
    assert isinstance(plain.next_event(), tlshello.NotTLS)


def test_sniffer_rejects_a_useless_cap() -> None:
    with pytest.raises(LocalProtocolError):
        tlshello.ClientHelloSniffer(max_size=8)


def test_results_are_frozen_and_slotted() -> None:
    hello = parse_ok(client_hello(STANDARD_EXTENSIONS))
    with pytest.raises(dataclasses.FrozenInstanceError):
        hello.sni = "other.example"  # type: ignore[misc]
    assert not hasattr(hello, "__dict__")
    assert hash(hello) == hash(parse_ok(client_hello(STANDARD_EXTENSIONS)))


def test_match_statement_usage() -> None:
    def route(data: bytes) -> str:
        match tlshello.parse_client_hello(data):
            case tlshello.NeedData.NEED_DATA:
                return "more"
            case tlshello.NotTLS(reason=reason):
                return f"plain: {reason}"
            case tlshello.ClientHello(sni=sni):
                return f"tls: {sni}"
            case unreachable:
                assert_never(unreachable)

    assert route(b"\x16") == "more"
    assert route(b"GET /").startswith("plain")
    assert route(client_hello(STANDARD_EXTENSIONS)) == "tls: db.example.com"
