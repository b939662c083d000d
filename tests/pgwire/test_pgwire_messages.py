"""Byte-exact vectors and round trips for every message in ferryman.pgwire.messages.

Expected bytes are written by hand from the PostgreSQL docs chapter "Message Formats"
(Int32 lengths count themselves; typed messages have a Byte1 type before the length).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from ferryman import pgwire as pw
from ferryman.errors import LocalProtocolError, RemoteProtocolError
from ferryman.pgwire._buffer import ReceiveBuffer
from ferryman.pgwire._framing import next_typed, next_untyped


def h(text: str) -> bytes:
    """Hex with spaces and ``"quoted ascii"`` runs, for readable vectors."""
    out = bytearray()
    for i, part in enumerate(text.split('"')):
        out += part.encode() if i % 2 else bytes.fromhex(part)
    return bytes(out)


STARTUP_VECTORS: list[tuple[pw.StartupPacket, bytes]] = [
    (pw.SSLRequest(), h("00 00 00 08 04 d2 16 2f")),
    (pw.GSSENCRequest(), h("00 00 00 08 04 d2 16 30")),
    (pw.CancelRequest(1234, b"\xde\xad\xbe\xef"), h("00 00 00 10 04 d2 16 2e 00 00 04 d2 de ad be ef")),
    (
        pw.StartupMessage({"user": "alice", "database": "appdb"}),
        h('00 00 00 23 00 03 00 00 "user" 00 "alice" 00 "database" 00 "appdb" 00 00'),
    ),
    (
        pw.StartupMessage({"user": "bob"}, protocol_version=pw.PROTOCOL_3_2),
        h('00 00 00 12 00 03 00 02 "user" 00 "bob" 00 00'),
    ),
    (
        pw.StartupMessage({"user": "bob", "options": ""}),
        h('00 00 00 1b 00 03 00 00 "user" 00 "bob" 00 "options" 00 00 00'),
    ),
]

FRONTEND_TYPED_VECTORS: list[
    tuple[pw.PasswordMessage | pw.SASLInitialResponse | pw.SASLResponse | pw.Terminate, bytes]
] = [
    (pw.PasswordMessage(b"secret"), h('70 00 00 00 0b "secret" 00')),
    (
        pw.SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=abc"),
        h('70 00 00 00 21 "SCRAM-SHA-256" 00 00 00 00 0b "n,,n=,r=abc"'),
    ),
    (pw.SASLInitialResponse("SCRAM-SHA-256", None), h('70 00 00 00 16 "SCRAM-SHA-256" 00 ff ff ff ff')),
    (pw.SASLInitialResponse("X", b""), h('70 00 00 00 0a "X" 00 00 00 00 00')),
    (pw.SASLResponse(b"c=biws"), h('70 00 00 00 0a "c=biws"')),
    (pw.Terminate(), h("58 00 00 00 04")),
]

BACKEND_VECTORS: list[tuple[pw.BackendMessage, bytes]] = [
    (pw.AuthenticationOk(), h("52 00 00 00 08 00 00 00 00")),
    (pw.AuthenticationCleartextPassword(), h("52 00 00 00 08 00 00 00 03")),
    (pw.AuthenticationMD5Password(b"\x01\x02\x03\x04"), h("52 00 00 00 0c 00 00 00 05 01 02 03 04")),
    (
        pw.AuthenticationSASL(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")),
        h('52 00 00 00 2a 00 00 00 0a "SCRAM-SHA-256-PLUS" 00 "SCRAM-SHA-256" 00 00'),
    ),
    (pw.AuthenticationSASLContinue(b"r=x"), h('52 00 00 00 0b 00 00 00 0b "r=x"')),
    (pw.AuthenticationSASLFinal(b"v=x"), h('52 00 00 00 0b 00 00 00 0c "v=x"')),
    (pw.ParameterStatus("server_version", "15.2"), h('53 00 00 00 18 "server_version" 00 "15.2" 00')),
    (pw.BackendKeyData(1234, b"\x01\x02\x03\x04"), h("4b 00 00 00 0c 00 00 04 d2 01 02 03 04")),
    (pw.ReadyForQuery("I"), h("5a 00 00 00 05 49")),
    (pw.ReadyForQuery("T"), h("5a 00 00 00 05 54")),
    (
        pw.ErrorResponse.fatal("28000", "no grant"),
        h('45 00 00 00 24 "S" "FATAL" 00 "V" "FATAL" 00 "C" "28000" 00 "M" "no grant" 00 00'),
    ),
    (
        pw.NoticeResponse(severity="NOTICE", code="00000", message="hi"),
        h('4e 00 00 00 18 "S" "NOTICE" 00 "C" "00000" 00 "M" "hi" 00 00'),
    ),
    (
        pw.NegotiateProtocolVersion(pw.PROTOCOL_3_0, ("_pq_.foo",)),
        # The version is a whole word, 3 << 16, as PostgreSQL sends PG_PROTOCOL_LATEST.
        h('76 00 00 00 15 00 03 00 00 00 00 00 01 "_pq_.foo" 00'),
    ),
    (pw.NegotiateProtocolVersion(pw.PROTOCOL_3_0), h("76 00 00 00 0c 00 03 00 00 00 00 00 00")),
]


@pytest.mark.parametrize(("message", "wire"), STARTUP_VECTORS, ids=lambda v: type(v).__name__)
def test_startup_packet_vectors(message: pw.StartupPacket, wire: bytes) -> None:
    assert message.encode() == wire
    assert pw.parse_startup_packet(wire) == message


@pytest.mark.parametrize(("message", "wire"), FRONTEND_TYPED_VECTORS, ids=lambda v: type(v).__name__)
def test_frontend_typed_vectors(
    message: pw.PasswordMessage | pw.SASLInitialResponse | pw.SASLResponse | pw.Terminate, wire: bytes
) -> None:
    assert message.encode() == wire
    assert type(message).parse(wire[5:]) == message


@pytest.mark.parametrize(("message", "wire"), BACKEND_VECTORS, ids=lambda v: type(v).__name__)
def test_backend_vectors(message: pw.BackendMessage, wire: bytes) -> None:
    assert message.encode() == wire
    assert pw.parse_backend_message(wire[:1], wire[5:]) == message


def test_single_byte_answers() -> None:
    assert pw.SSLResponse(True).encode() == b"S"
    assert pw.SSLResponse(False).encode() == b"N"
    assert pw.GSSENCResponse(False).encode() == b"N"
    assert pw.GSSENCResponse(True).encode() == b"G"


def test_error_response_full_field_map_round_trips() -> None:
    error = pw.ErrorResponse(
        severity="ERRORE",
        severity_nonlocalized="ERROR",
        code="23505",
        message="duplicate key",
        detail="Key (id)=(1) already exists.",
        hint="h",
        position="3",
        internal_position="4",
        internal_query="select",
        where="w",
        schema_name="public",
        table_name="t",
        column_name="c",
        data_type_name="int4",
        constraint_name="t_pkey",
        file="nbtinsert.c",
        line="666",
        routine="_bt_check_unique",
        unknown=(("Z", "future field"),),
    )
    wire = error.encode()
    assert pw.parse_backend_message(b"E", wire[5:]) == error
    assert not error.is_fatal
    fields = error.as_dict()
    assert fields["constraint_name"] == "t_pkey"
    assert fields["Z"] == "future field"
    # Every one-letter code appears once, in FIELD_CODES order, then the unknown one.
    letters = [part[:1] for part in wire[5:-1].split(b"\x00")[:-1]]
    assert letters == [c.encode() for c in pw.messages.FIELD_CODES] + [b"Z"]


def test_error_response_parsing_is_lenient_like_libpq() -> None:
    # Missing S/C/M become "", a repeated code keeps the last value, unknown codes are kept.
    body = h('"M" "one" 00 "M" "two" 00 "x" "?" 00 00')
    error = pw.ErrorResponse.parse(body)
    assert (error.severity, error.code, error.message, error.unknown) == ("", "", "two", (("x", "?"),))


def test_error_response_fatal_helper() -> None:
    error = pw.ErrorResponse.fatal("08P01", "bad", detail="d", hint="h")
    assert error.is_fatal
    assert (error.severity, error.severity_nonlocalized, error.code, error.message) == (
        "FATAL",
        "FATAL",
        "08P01",
        "bad",
    )
    assert (error.detail, error.hint) == ("d", "h")
    assert str(error) == "FATAL: bad (SQLSTATE 08P01); DETAIL: d; HINT: h"


def test_backend_strings_round_trip_non_utf8_bytes() -> None:
    # A LATIN1 server may send non-UTF-8 text during startup; relaying a parsed message must
    # not alter a byte.
    wire = b"S" + (4 + 5 + 4).to_bytes(4, "big") + b"name\x00\xe9t\xe9\x00"
    message = pw.parse_backend_message(b"S", wire[5:])
    assert isinstance(message, pw.ParameterStatus)
    assert message.encode() == wire


@pytest.mark.parametrize(
    "params",
    [
        [(b"user", b"x"), (b"application_name", b"caf\xe9")],  # LATIN1 client
        [(b"user", b"\xff"), (b"database", b"\xff\xfe")],
        [(b"user", b"x"), (b"\xc3\x28", b"\xed\xa0\x80")],  # bad name; UTF-8-encoded surrogate
        [(b"user", b"x"), (b"options", b"-c search_path=\xe9 -c ferryman.presets=readonly")],
    ],
)
def test_startup_parameters_in_any_encoding_round_trip(params: list[tuple[bytes, bytes]]) -> None:
    # PostgreSQL takes start-up parameters in the client's encoding; we keep them and forward
    # exactly the bytes the client sent.
    body = b"".join(k + b"\x00" + v + b"\x00" for k, v in params) + b"\x00"
    wire = (len(body) + 8).to_bytes(4, "big") + pw.PROTOCOL_3_0.to_bytes(4, "big") + body
    message = pw.parse_startup_packet(wire)
    assert isinstance(message, pw.StartupMessage)
    assert message.encode() == wire
    assert [
        (k.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape"))
        for k, v in message.parameters.items()
    ] == params
    assert all(pw.is_utf8(k) for k in message.parameters) == all(_utf8(k) for k, _ in params)
    assert "options" not in repr(message) or "<redacted>" in repr(message)


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_is_utf8() -> None:
    assert pw.is_utf8("café")
    assert not pw.is_utf8(b"caf\xe9".decode("utf-8", "surrogateescape"))


def test_encoding_a_foreign_lone_surrogate_is_a_local_error() -> None:
    # surrogateescape only ever produces U+DC80..U+DCFF; anything else cannot be encoded.
    with pytest.raises(LocalProtocolError, match="surrogate"):
        pw.StartupMessage({"user": "\ud800"}).encode()


def test_secrets_are_redacted_in_repr() -> None:
    secrets = [
        pw.PasswordMessage(b"hunter2"),
        pw.SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=hunter2"),
        pw.SASLResponse(b"p=hunter2"),
        pw.AuthenticationSASLContinue(b"r=hunter2"),
        pw.AuthenticationSASLFinal(b"v=hunter2"),
        pw.StartupMessage({"user": "u", "options": "-c secret=hunter2"}),
        pw.CancelRequest(1, b"hunter2"),
        pw.BackendKeyData(1, b"hunter2"),
    ]
    for message in secrets:
        assert "hunter2" not in repr(message), repr(message)
        assert "redacted" in repr(message)
    assert "alice" in repr(pw.StartupMessage({"user": "alice"}))


def test_startup_message_helpers() -> None:
    msg = pw.StartupMessage({"user": "alice", "_pq_.ext": "1"}, protocol_version=pw.PROTOCOL_3_2)
    assert (msg.major_version, msg.minor_version) == (3, 2)
    assert msg.database == "alice"  # PostgreSQL's default: the user name
    assert msg.protocol_options == ("_pq_.ext",)
    assert msg.negotiate() == pw.NegotiateProtocolVersion(pw.PROTOCOL_3_0, ("_pq_.ext",))
    assert pw.StartupMessage({"user": "a", "database": "d"}).negotiate() is None
    with pytest.raises(TypeError):
        msg.parameters["user"] = "mallory"  # type: ignore[index]


@pytest.mark.parametrize(
    ("wire", "fragment"),
    [
        (h("00 00 00 08 00 02 00 00"), "unsupported frontend protocol 2.0"),
        (h("00 00 00 08 12 34 56 78"), "unsupported frontend protocol"),
        (h('00 00 00 0d 00 03 00 00 "user" 00'), "missing string terminator"),
        (h('00 00 00 11 00 03 00 00 "user" 00 "a" 00 00 00'), "expected terminator as last byte"),
        (h('00 00 00 0f 00 03 00 00 "user" 00 "a" 00'), "missing string terminator"),
        (h('00 00 00 12 00 03 00 00 "user" 00 "a" 00 "x" 00 00'), "missing string terminator"),
        (h('00 00 00 17 00 03 00 00 "user" 00 "a" 00 "user" 00 "b" 00 00'), "duplicate"),
        (h("00 00 00 0c 04 d2 16 2f 00 00 00 00"), "SSLRequest"),
        (h("00 00 00 0c 04 d2 16 2e 00 00 00 01"), "cancel request key"),
        (h("00 00 00 09 00 03 00 00 00"), "no PostgreSQL user name"),
        (h("00 00 00 09 04 d2 16 2f"), "length word"),
    ],
)
def test_malformed_startup_packets(wire: bytes, fragment: str) -> None:
    with pytest.raises(RemoteProtocolError, match=fragment) as info:
        pw.parse_startup_packet(wire)
    # PostgreSQL's codes: feature_not_supported for a version, invalid_authorization_specification
    # for a missing user, protocol_violation for the rest.
    expected = {"unsupported frontend protocol": "0A000", "no PostgreSQL user name": "28000"}
    assert info.value.sqlstate == next((c for f, c in expected.items() if fragment.startswith(f)), "08P01")


def test_missing_user_is_28000() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        pw.parse_startup_packet(pw.StartupMessage({"database": "x"}).encode())
    assert info.value.sqlstate == pw.sqlstate.INVALID_AUTHORIZATION_SPECIFICATION


@pytest.mark.parametrize(
    ("type_code", "body", "fragment"),
    [
        (b"R", h("00 00 00 02"), "KerberosV5"),
        (b"R", h("00 00 00 07"), "GSS"),
        (b"R", h("00 00 00 09"), "SSPI"),
        (b"R", h("00 00 00 06"), "SCMCredential"),
        (b"R", h("00 00 00 63"), "unknown authentication request code 99"),
        (b"R", h("00 00 00 05 01 02"), "expected 4 more bytes"),
        (b"R", h("00 00 00 00 00"), "trailing"),
        (b"R", h('00 00 00 0a "SCRAM"'), "terminator"),
        (b"Z", h("58"), "transaction status"),
        (b"Z", b"", "truncated"),
        (b"K", h("00 00 00 01 02"), "key length"),
        (b"v", h("00 00 00 00 00 00 00 05 61 00"), "option count"),
        (b"v", h("00 00 00 00 ff ff ff ff"), "option count"),
        (b"E", h('"S" "x"'), "terminator"),
        (b"E", h('"S" "x" 00 00 ff'), "trailing"),
        (b"D", b"", "unexpected backend message type"),
    ],
)
def test_malformed_backend_messages(type_code: bytes, body: bytes, fragment: str) -> None:
    with pytest.raises(RemoteProtocolError, match=fragment):
        pw.parse_backend_message(type_code, body)


def test_unsupported_auth_method_names_the_method_and_is_0a000() -> None:
    with pytest.raises(RemoteProtocolError, match="KerberosV5") as info:
        pw.parse_backend_message(b"R", h("00 00 00 02"))
    assert info.value.sqlstate == pw.sqlstate.FEATURE_NOT_SUPPORTED


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (lambda: pw.StartupMessage({"user": "a\x00b"}), "NUL"),
        (lambda: pw.StartupMessage({"": "x"}), "empty"),
        (lambda: pw.PasswordMessage(b"a\x00b"), "NUL"),
        (lambda: pw.AuthenticationMD5Password(b"\x01\x02\x03"), "4 bytes"),
        (lambda: pw.BackendKeyData(1, b"\x01"), "cancel keys"),
        (lambda: pw.CancelRequest(1, b"x" * 257), "cancel keys"),
        (lambda: pw.CancelRequest(2**31, b"abcd"), "Int32"),
        (lambda: pw.ReadyForQuery("X"), "transaction status"),
        (lambda: pw.AuthenticationSASL(("",)), "empty"),
        (lambda: pw.ErrorResponse("E", "1", "m", unknown=(("", "x"),)), "field code"),
    ],
)
def test_unencodable_messages_raise_local_errors(build: Callable[[], Any], fragment: str) -> None:
    with pytest.raises(LocalProtocolError, match=fragment):
        build().encode()


def _frame_pieces(wire: bytes) -> list[list[bytes]]:
    """``wire`` split at every offset, plus byte by byte."""
    splits = [[wire[:i], wire[i:]] for i in range(len(wire) + 1)]
    return [*splits, [wire[i : i + 1] for i in range(len(wire))]]


@pytest.mark.parametrize(("message", "wire"), STARTUP_VECTORS, ids=lambda v: type(v).__name__)
def test_startup_vectors_split_at_every_offset(message: pw.StartupPacket, wire: bytes) -> None:
    for pieces in _frame_pieces(wire):
        buf = ReceiveBuffer(1024)
        packets = []
        for piece in pieces:
            buf.feed(piece)
            if (packet := next_untyped(buf, 10_000)) is not None:
                packets.append(pw.parse_startup_packet(packet))
        assert packets == [message]
        assert not buf


@pytest.mark.parametrize(
    ("message", "wire"), [*FRONTEND_TYPED_VECTORS, *BACKEND_VECTORS], ids=lambda v: type(v).__name__
)
def test_typed_vectors_split_at_every_offset(message: object, wire: bytes) -> None:
    # Authentication* requests share one parser (dispatch on the Int32 code), the rest have their own.
    parse: Callable[[bytes], object] | None = getattr(type(message), "parse", None)
    for pieces in _frame_pieces(wire):
        buf = ReceiveBuffer(1024)
        frames = []
        for piece in pieces:
            buf.feed(piece)
            if (frame := next_typed(buf, 1 << 16)) is not None:
                frames.append(frame)
        assert frames == [(wire[:1], wire[5:])]
        type_code, body = frames[0]
        parsed = parse(body) if parse is not None else pw.parse_backend_message(type_code, body)
        assert parsed == message
