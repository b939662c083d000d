"""The sans-I/O pieces: request bytes, response collection, JSON decoding, the cert split."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferryman.tailscale._http import MAX_BODY, MAX_HEAD, Exchange, HTTPResponse, PlainRequest, build_request
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


# -- answers to plain GETs (httptools) -----------------------------------------------------------

TARGET = "/localapi/v0/whois?addr=1.2.3.4%3A5"


def _exchange(kind: str, max_body: int = MAX_BODY) -> Exchange:
    request = PlainRequest(TARGET) if kind == "plain" else build_request("GET", TARGET)
    ex = Exchange(request, max_body=max_body)
    ex.request_bytes()
    return ex


Outcome = tuple[str, object, bool]


def _run(ex: Exchange, chunks: list[bytes]) -> Outcome:
    """("ok", (status, reason, headers, body), reusable), ("error", message, False) or pending."""
    try:
        for chunk in chunks:
            resp = ex.receive_data(chunk)
            if resp is not None:
                assert not resp.switched and resp.trailing == b""
                return ("ok", (resp.status, resp.reason, resp.headers, resp.body), ex.reusable)
    except LocalAPIProtocolError as exc:
        return ("error", str(exc), False)
    return ("pending", None, False)


def _kind(outcome: Outcome) -> Outcome:
    # llhttp's wording of an error does not depend on how the bytes were split, but an answer
    # cut short at EOF is worded by where it was cut: compare that an error happened.
    return ("error", None, False) if outcome[0] == "error" else outcome


def test_plain_request_bytes_are_h11s() -> None:
    for target in ["/localapi/v0/whois?addr=100.101.102.103%3A4567", "/localapi/v0/status?peers=false"]:
        assert PlainRequest(target).encode() == Exchange(build_request("GET", target)).request_bytes()
    assert PlainRequest("/localapi/v0/whois?addr=100.101.102.103%3A4567").encode() == WHOIS_REQUEST
    with pytest.raises(ValueError):
        PlainRequest("/status").encode()


GO_WHOIS = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTailscale-Version: 1.90.0\r\n"
    b"X-Frame-Options: DENY\r\nDate: Tue, 24 Nov 2026 10:03:21 GMT\r\nContent-Length: 11\r\n\r\n"
    b'{"Node":{}}'
)
GO_CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    b'6\r\n{"Node\r\n5\r\n":{}}\r\n0\r\n\r\n'
)
JSON = ("content-type", "application/json")
CHUNKED = ("transfer-encoding", "chunked")
ERROR: Outcome = ("error", None, False)


def _ok(
    status: int, reason: str, headers: list[tuple[str, str]], body: bytes, reusable: bool = True
) -> Outcome:
    return ("ok", (status, reason, tuple(headers), body), reusable)


CL_OK = _ok(200, "OK", [JSON, ("content-length", "7")], b'{"a":1}')
ANSWERS: list[tuple[bytes, Outcome]] = [
    (CL_RESPONSE, CL_OK),
    (CHUNKED_RESPONSE, _ok(200, "OK", [CHUNKED], b'{"a":1}')),
    (
        GO_WHOIS,
        _ok(
            200,
            "OK",
            [
                JSON,
                ("tailscale-version", "1.90.0"),
                ("x-frame-options", "DENY"),
                ("date", "Tue, 24 Nov 2026 10:03:21 GMT"),
                ("content-length", "11"),
            ],
            b'{"Node":{}}',
        ),
    ),
    (GO_CHUNKED, _ok(200, "OK", [JSON, CHUNKED], b'{"Node":{}}')),
    (
        b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 21\r\n\r\n"
        b"no match for IP:port\n",
        _ok(
            404,
            "Not Found",
            [("content-type", "text/plain; charset=utf-8"), ("content-length", "21")],
            b"no match for IP:port\n",
        ),
    ),
    # The body ends where the connection does: complete at EOF, never reused.
    (
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nabc",
        _ok(200, "OK", [("connection", "close")], b"abc", reusable=False),
    ),
    (
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        _ok(200, "OK", [("connection", "close"), CHUNKED], b"abc", reusable=False),
    ),
    (
        b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nabc",
        _ok(200, "OK", [("content-length", "3")], b"abc", reusable=False),
    ),
    (b"HTTP/1.1 204 No Content\r\n\r\n", _ok(204, "No Content", [], b"")),
    (b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n", _ok(200, "", [("content-length", "0")], b"")),
    # 1xx answers before the real one are skipped.
    (b"HTTP/1.1 100 Continue\r\n\r\n" + CL_RESPONSE, CL_OK),
    (b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + CL_RESPONSE, CL_OK),
    # Names lower-cased, values stripped of surrounding whitespace and read as Latin-1.
    (
        b"HTTP/1.1 200 OK\r\nX-Odd:   a b \t \r\nEMPTY:\r\nX-Latin: caf\xe9\r\nContent-Length: 0\r\n\r\n",
        _ok(
            200, "OK", [("x-odd", "a b"), ("empty", ""), ("x-latin", "caf\xe9"), ("content-length", "0")], b""
        ),
    ),
    # Chunk extensions are skipped, trailer fields dropped.
    (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\n\r\n",
        _ok(200, "OK", [CHUNKED], b"abc"),
    ),
    (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nTrailer: x\r\n\r\n",
        _ok(200, "OK", [CHUNKED], b"abc"),
    ),
    # Malformed: refused (llhttp is strict; no leniency is turned on).
    (b"HTTP/1.1 200 OK\nContent-Length: 3\n\nabc", ERROR),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", ERROR),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n folded\r\n\r\nabc", ERROR),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", ERROR),
    (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        ERROR,
    ),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc", ERROR),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n", ERROR),
    (b"HTTP/1.1 200 OK\r\nX: a\x01b\r\nContent-Length: 0\r\n\r\n", ERROR),
    (b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n", ERROR),
    (b"SSH-2.0-OpenSSH_9.2\r\n", ERROR),
    # A 101 nobody asked for (a plain GET proposes no upgrade).
    (b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: ts-dial\r\n\r\nraw", ERROR),
    # Cut short.
    (CL_RESPONSE[:-3], ERROR),
    (CHUNKED_RESPONSE[:-2], ERROR),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n", ERROR),
    (b"", ERROR),
]


@pytest.mark.parametrize("kind", ["plain", "h11"])
@pytest.mark.parametrize(("wire", "expected"), ANSWERS)
def test_answer_split_at_every_byte(kind: str, wire: bytes, expected: Outcome) -> None:
    for cut in range(len(wire) + 1):
        chunks = [c for c in (wire[:cut], wire[cut:]) if c] + [b""]
        assert _kind(_run(_exchange(kind), chunks)) == expected, cut
    one_by_one = [wire[i : i + 1] for i in range(len(wire))] + [b""]
    assert _kind(_run(_exchange(kind), one_by_one)) == expected


def test_cut_short_errors_say_where() -> None:
    assert _run(_exchange("plain"), [b""])[1] == "tailscaled closed the connection before answering"
    assert _run(_exchange("plain"), [CL_RESPONSE[:20], b""])[1] == (
        "tailscaled closed the connection before answering"
    )
    assert _run(_exchange("plain"), [CL_RESPONSE[:-3], b""])[1] == (
        "tailscaled closed the connection mid-body (status 200)"
    )
    assert str(_run(_exchange("plain"), [b"HTTP/1.1 200 OK\nX: y\n\n"])[1]).startswith(
        "malformed HTTP from tailscaled: "
    )


def test_bytes_after_the_answer_make_the_connection_unusable() -> None:
    for extra in [b"EXTRA", b"\x00", CL_RESPONSE]:
        ex = _exchange("plain")
        assert _run(ex, [CL_RESPONSE + extra]) == ("ok", CL_OK[1], False)
    # Once complete, an exchange answers the same and reads nothing more.
    ex = _exchange("plain")
    first = ex.receive_data(CL_RESPONSE)
    assert first is not None and ex.reusable
    assert ex.receive_data(b"junk") is first and ex.receive_data(b"") is first


def test_a_refused_answer_stays_refused() -> None:
    ex = _exchange("plain")
    with pytest.raises(LocalAPIProtocolError):
        ex.receive_data(b"HTTP/1.1 20 OK\r\n")
    with pytest.raises(LocalAPIProtocolError):
        ex.receive_data(CL_RESPONSE)


def test_head_larger_than_the_limit_is_refused() -> None:
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 100) for i in range(200))
    assert len(head) > MAX_HEAD
    ex = _exchange("plain")
    with pytest.raises(LocalAPIProtocolError, match="head larger than"):
        for i in range(0, len(head), 1000):
            ex.receive_data(head[i : i + 1000])
    # A head under the limit is fine, however it is split.
    small = head[: head.index(b"\r\n", MAX_HEAD - 200) + 2] + b"Content-Length: 0\r\n\r\n"
    assert len(small) <= MAX_HEAD
    resp = _run(_exchange("plain"), [small[i : i + 1000] for i in range(0, len(small), 1000)])
    assert resp[0] == "ok"


@pytest.mark.parametrize(
    "wire",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n0123456789A",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\n012345\r\n5\r\n6789A\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n0123456789A",
    ],
)
def test_body_larger_than_the_limit_is_refused(wire: bytes) -> None:
    assert _run(_exchange("plain", max_body=11), [wire, b""])[0] == "ok"
    for chunks in ([wire, b""], [wire[:-1], wire[-1:], b""]):
        outcome = _run(_exchange("plain", max_body=10), chunks)
        assert outcome[0] == "error" and "larger than 10 bytes" in str(outcome[1])


def test_framing_and_trailers_are_bounded_too() -> None:
    ex = _exchange("plain", max_body=10)
    ex.receive_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n")
    with pytest.raises(LocalAPIProtocolError, match="answer larger than"):
        for _ in range(100):
            ex.receive_data(b"X-Trailer: " + b"t" * 1000 + b"\r\n")


def test_head_requests_are_not_supported() -> None:
    with pytest.raises(ValueError, match="HEAD"):
        Exchange(build_request("HEAD", TARGET))


# -- the ts-dial upgrade -------------------------------------------------------------------------


def test_switch_hands_over_bytes_after_the_head_byte_by_byte() -> None:
    ex = Exchange(
        build_request("POST", "/localapi/v0/dial", [("Upgrade", "ts-dial"), ("Connection", "upgrade")])
    )
    head_len = SWITCH_RESPONSE.index(b"\r\n\r\n") + 4
    for i in range(head_len - 1):
        assert ex.receive_data(SWITCH_RESPONSE[i : i + 1]) is None
    resp = ex.receive_data(SWITCH_RESPONSE[head_len - 1 :])
    assert resp is not None and resp.switched and (resp.status, resp.reason) == (101, "Switching Protocols")
    assert resp.headers == (("connection", "upgrade"), ("upgrade", "ts-dial"))
    assert resp.trailing == SWITCH_RESPONSE[head_len:] and resp.body == b""
    assert not ex.reusable


@pytest.mark.parametrize(
    ("wire", "switched"),
    [
        (b"HTTP/1.1 100 Continue\r\n\r\n" + SWITCH_RESPONSE, True),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\nraw", False),  # Go wants Upgrade + Connection too
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: ts-dial\r\n\r\nraw", False),
    ],
)
def test_what_counts_as_a_switch(wire: bytes, switched: bool) -> None:
    if switched:
        resp = _collect([wire], "POST", upgrade=True)
        assert resp is not None and resp.switched and resp.trailing == b"HELLO\nmore"
    else:
        with pytest.raises(LocalAPIProtocolError):
            _collect([wire, b""], "POST", upgrade=True)


# -- fuzzing: a result or LocalAPIProtocolError, never anything else -----------------------------

FUZZ_SEEDS = [wire for wire, _ in ANSWERS if wire] + [SWITCH_RESPONSE]


def _outcome_no_reuse(outcome: Outcome) -> object:
    # Bytes after a complete answer unset ``reusable`` only if they arrive in the same read.
    return _kind(outcome)[:2]


@given(st.sampled_from(FUZZ_SEEDS), st.integers(0, 400), st.binary(max_size=8), st.integers(0, 400))
def test_mangled_answers_give_a_result_or_our_error(wire: bytes, at: int, junk: bytes, cut: int) -> None:
    at = min(at, len(wire))
    mangled = wire[:at] + junk + wire[at + len(junk) :]
    cut = min(cut, len(mangled))
    whole = _run(_exchange("plain"), [mangled, b""])
    split = _run(_exchange("plain"), [c for c in (mangled[:cut], mangled[cut:]) if c] + [b""])
    assert _outcome_no_reuse(whole) == _outcome_no_reuse(split)


@given(st.binary(max_size=300), st.integers(0, 300))
def test_garbage_gives_a_result_or_our_error(data: bytes, cut: int) -> None:
    whole = _run(_exchange("plain"), ([data] if data else []) + [b""])
    split = _run(_exchange("h11"), [c for c in (data[:cut], data[cut:]) if c] + [b""])
    assert whole[0] in ("ok", "error") and _outcome_no_reuse(whole) == _outcome_no_reuse(split)
