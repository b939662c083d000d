"""The sans-I/O pieces: request bytes, response collection, JSON decoding, the cert split."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferryman.tailscale._http import Exchange, HTTPResponse, build_request
from ferryman.tailscale.apitype import DecodeError, decode_whois, split_cert_pair
from ferryman.tailscale.errors import LocalAPIProtocolError, error_message_from_body
from ferryman.tailscale.localapi import go_duration
from tests.support.localapi_double import go_json, make_node, make_user_profile

WHOIS_REQUEST = (
    b"GET /localapi/v0/whois?addr=100.101.102.103%3A4567 HTTP/1.1\r\n"
    b"Host: local-tailscaled.sock\r\n"
    b"User-Agent: ferryman-localapi/1\r\n"
    b"Tailscale-Cap: 127\r\n"
    b"\r\n"
)


def test_get_request_bytes_have_no_framing_headers() -> None:
    ex = Exchange(build_request("GET", "/localapi/v0/whois?addr=100.101.102.103%3A4567"))
    assert ex.request_bytes() == WHOIS_REQUEST


def test_post_request_carries_content_length_zero_like_go() -> None:
    req = build_request("POST", "/localapi/v0/dial", [("Upgrade", "ts-dial"), ("Connection", "upgrade")])
    data = Exchange(req).request_bytes()
    assert data.endswith(b"Upgrade: ts-dial\r\nConnection: upgrade\r\nContent-Length: 0\r\n\r\n")


def test_targets_outside_localapi_are_refused() -> None:
    with pytest.raises(ValueError, match="/localapi/v0/"):
        build_request("GET", "/status")


def _collect(chunks: list[bytes], method: str = "GET", upgrade: bool = False) -> HTTPResponse | None:
    headers = [("Upgrade", "ts-dial"), ("Connection", "upgrade")] if upgrade else []
    ex = Exchange(build_request(method, "/localapi/v0/x", headers))
    ex.request_bytes()
    result = None
    for chunk in chunks:
        result = ex.receive_data(chunk)
        if result is not None:
            break
    return result


CL_RESPONSE = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{"a":1}'
CHUNKED_RESPONSE = b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{"a"\r\n3\r\n:1}\r\n0\r\n\r\n'
SWITCH_RESPONSE = (
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: ts-dial\r\n\r\nHELLO\nmore"
)


@pytest.mark.parametrize("wire", [CL_RESPONSE, CHUNKED_RESPONSE])
def test_response_split_at_every_offset(wire: bytes) -> None:
    for cut in range(1, len(wire)):
        resp = _collect([wire[:cut], wire[cut:]])
        assert resp is not None
        assert (resp.status, resp.body) == (200, b'{"a":1}')


def test_switch_keeps_bytes_after_the_101_at_every_offset() -> None:
    head_len = SWITCH_RESPONSE.index(b"\r\n\r\n") + 4
    for cut in range(1, len(SWITCH_RESPONSE)):
        resp = _collect([SWITCH_RESPONSE[:cut], SWITCH_RESPONSE[cut:]], "POST", upgrade=True)
        assert resp is not None and resp.switched
        assert resp.header("upgrade") == "ts-dial"
        # Whatever arrived with the head is handed over; the rest is still on the socket.
        expected = SWITCH_RESPONSE[head_len:cut] if cut >= head_len else SWITCH_RESPONSE[head_len:]
        assert resp.trailing == expected


def test_non_101_answer_to_an_upgrade_is_a_plain_response() -> None:
    wire = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 27\r\n\r\ndial failure: no route here"
    resp = _collect([wire], "POST", upgrade=True)
    assert resp is not None and not resp.switched
    assert (resp.status, resp.body) == (502, b"dial failure: no route here")


def test_early_eof_is_a_protocol_error() -> None:
    with pytest.raises(LocalAPIProtocolError, match="before answering"):
        _collect([b"", b""])
    with pytest.raises(LocalAPIProtocolError):
        _collect([CL_RESPONSE[:-3], b""])


def test_body_until_close_is_accepted() -> None:
    resp = _collect([b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nabc", b""])
    assert resp is not None and resp.body == b"abc"


@given(st.binary(max_size=300))
def test_garbage_only_raises_protocol_errors(data: bytes) -> None:
    ex = Exchange(build_request("GET", "/localapi/v0/whois?addr=1.2.3.4"))
    ex.request_bytes()
    try:
        ex.receive_data(data)
        ex.receive_data(b"")
    except LocalAPIProtocolError:
        pass


def test_error_message_from_body_prefers_json_error() -> None:
    assert error_message_from_body(b'{"Error":"nope"}') == "nope"
    assert error_message_from_body(b'{"error":"nope"}') == "nope"
    assert error_message_from_body(b"dial failure: refused\n") == "dial failure: refused"


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (45, "45s"), (90, "1m30s"), (3600, "1h0m0s"), (14 * 86400, "336h0m0s")]
)
def test_go_duration(seconds: int, text: str) -> None:
    assert go_duration(seconds) == text


# -- WhoIs decoding ------------------------------------------------------------------------------


def _whois_doc(**over: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "Node": make_node(7, "laptop", "100.101.102.103"),
        "UserProfile": make_user_profile(1007, "alice@example.com", "Alice"),
        "CapMap": {"ferryman.dev/cap/ferryman": [{"backends": {"pg": {}}}]},
    }
    doc.update(over)
    return doc


def test_decode_whois_reads_go_shaped_json() -> None:
    resp = decode_whois(go_json(_whois_doc()))
    assert resp.node.id == 7
    assert resp.node.name == "laptop.tail1234.ts.net."
    assert resp.node.computed_name == "laptop"
    assert resp.node.addresses[0] == "100.101.102.103/32"
    assert resp.node.stable_id.endswith("CNTRL")
    assert resp.node.raw["Hostinfo"]["OS"] == "linux"
    assert resp.user_profile is not None and resp.user_profile.login_name == "alice@example.com"
    assert resp.cap_map["ferryman.dev/cap/ferryman"] == ({"backends": {"pg": {}}},)


def test_decode_whois_ignores_unknown_and_tolerates_missing_fields() -> None:
    doc = _whois_doc(Future={"x": 1}, CapMap=None)
    doc["Node"] = {"ID": 9, "Name": "db.example.ts.net.", "SomethingNew": [1, 2]}
    resp = decode_whois(json.dumps(doc).encode())
    assert resp.node.computed_name == "" and resp.node.short_name == "db"
    assert resp.node.tags == () and resp.cap_map == {}
    del doc["UserProfile"]
    assert decode_whois(json.dumps(doc).encode()).user_profile is None


@pytest.mark.parametrize(
    "doc",
    [
        [],
        {"UserProfile": None},
        {"Node": "x"},
        {"Node": {"ID": "7"}},
        {"Node": {"ID": True}},
        {"Node": {"Tags": "tag:a"}},
        {"Node": {"Tags": [1]}},
        {"Node": {}, "UserProfile": {"LoginName": 5}},
        {"Node": {}, "CapMap": {"cap": {"not": "an array"}}},
        {"Node": {}, "CapMap": []},
    ],
)
def test_decode_whois_rejects_wrong_types_as_go_would(doc: object) -> None:
    with pytest.raises(DecodeError):
        decode_whois(json.dumps(doc).encode())


def test_decode_whois_rejects_non_json() -> None:
    with pytest.raises(DecodeError, match="not JSON"):
        decode_whois(b"<html>")
    with pytest.raises(DecodeError):
        decode_whois(b"\xff\xfe")


# -- certificate pair ----------------------------------------------------------------------------

KEY = b"-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n"
LEAF = b"-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----\n"
INTER = b"-----BEGIN CERTIFICATE-----\nCCCC\n-----END CERTIFICATE-----\n"


def test_split_cert_pair_key_comes_first() -> None:
    cert, key = split_cert_pair(KEY + LEAF + INTER)
    assert key == KEY and cert == LEAF + INTER


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (KEY, "no delimiter"),
        (LEAF + KEY, "private key found"),
        (LEAF + INTER, "not a private key"),
        (KEY + KEY, "private key found"),
    ],
)
def test_split_cert_pair_refuses_bad_bodies(body: bytes, why: str) -> None:
    with pytest.raises(DecodeError, match=why):
        split_cert_pair(body)
