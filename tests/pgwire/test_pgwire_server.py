"""ServerConnection: the startup/auth state machine we run against PostgreSQL clients."""

from __future__ import annotations

import pytest
from pgwire_helpers import drain_server, phase_of, run_server, split_at

from ferryman import pgwire as pw
from ferryman.errors import LocalProtocolError, RemoteProtocolError

STARTUP = pw.StartupMessage({"user": "alice", "database": "appdb", "application_name": "psql"})
QUERY = b"Q\x00\x00\x00\x0dselect 1\x00"  # what the client pipelines right after the password


def started(**kwargs: int) -> pw.ServerConnection:
    """A server that has read STARTUP."""
    server = pw.ServerConnection(**kwargs)
    server.receive_data(STARTUP.encode())
    assert server.next_event() == STARTUP
    assert server.phase is pw.Phase.AUTHENTICATING
    return server


def test_cleartext_login_to_switch_with_trailing_data() -> None:
    stream = STARTUP.encode() + pw.PasswordMessage(b"pw").encode() + QUERY
    run = run_server([stream])
    assert run.events == [STARTUP, pw.PasswordMessage(b"pw")]
    assert run.trailing == QUERY
    assert run.sent.startswith(pw.AuthenticationCleartextPassword().encode() + pw.AuthenticationOk().encode())
    assert run.sent.endswith(pw.ReadyForQuery("I").encode())


def test_every_split_of_a_negotiating_client_gives_the_same_events() -> None:
    stream = (
        pw.GSSENCRequest().encode()
        + pw.SSLRequest().encode()
        + STARTUP.encode()
        + pw.PasswordMessage(b"secret").encode()
        + QUERY
    )
    whole = run_server([stream])
    assert [type(e) for e in whole.events] == [
        pw.GSSENCRequest,
        pw.SSLRequest,
        pw.StartupMessage,
        pw.PasswordMessage,
    ]
    for offset in range(len(stream) + 1):
        run = run_server(split_at(stream, [offset]))
        assert (run.events, run.sent, run.trailing) == (whole.events, whole.sent, whole.trailing), offset
    # and byte by byte
    run = run_server([stream[i : i + 1] for i in range(len(stream))])
    assert (run.events, run.sent, run.trailing) == (whole.events, whole.sent, whole.trailing)


def test_ssl_accepted_then_startup_over_tls() -> None:
    server = pw.ServerConnection()
    server.receive_data(pw.SSLRequest().encode())
    assert server.next_event() == pw.SSLRequest()
    assert server.send(pw.SSLResponse(True)) == b"S"
    assert server.phase is pw.Phase.TLS_PENDING
    assert server.trailing_data == b""
    assert server.next_event() is pw.NEED_DATA
    server.tls_established()
    assert phase_of(server) is pw.Phase.STARTUP
    server.receive_data(STARTUP.encode())
    assert server.next_event() == STARTUP


@pytest.mark.parametrize("later_segment", [False, True], ids=["same-segment", "later-segment"])
def test_bytes_pipelined_after_ssl_request_are_refused(later_segment: bool) -> None:
    # CVE-2021-23214: bytes sent in clear text behind SSLRequest must never be read as if they
    # had arrived over TLS.
    server = pw.ServerConnection()
    if later_segment:
        server.receive_data(pw.SSLRequest().encode())
    else:
        server.receive_data(pw.SSLRequest().encode() + STARTUP.encode())
    assert server.next_event() == pw.SSLRequest()
    server.send(pw.SSLResponse(True))
    if later_segment:
        assert server.trailing_data == b""
        server.receive_data(STARTUP.encode())
    assert server.trailing_data == STARTUP.encode()  # what the shell checks before start_tls
    with pytest.raises(RemoteProtocolError, match="unencrypted data after SSL request") as info:
        server.next_event()
    assert info.value.sqlstate == "08P01"
    assert server.phase is pw.Phase.ERROR
    # The shell answers in clear text and closes.
    assert server.send(pw.ErrorResponse.fatal(info.value.sqlstate, str(info.value)))
    assert phase_of(server) is pw.Phase.CLOSED


def test_tls_established_refuses_buffered_plaintext() -> None:
    server = pw.ServerConnection()
    server.receive_data(pw.SSLRequest().encode() + b"X")
    server.next_event()
    server.send(pw.SSLResponse(True))
    with pytest.raises(RemoteProtocolError, match="unencrypted"):
        server.tls_established()
    assert server.phase is pw.Phase.ERROR


def test_ssl_refused_keeps_reading_startup() -> None:
    server = pw.ServerConnection()
    server.receive_data(pw.SSLRequest().encode() + STARTUP.encode())
    assert server.next_event() == pw.SSLRequest()
    assert server.send(pw.SSLResponse(False)) == b"N"
    assert server.next_event() == STARTUP


@pytest.mark.parametrize(
    ("first", "answer", "second", "fragment"),
    [
        (pw.SSLRequest(), pw.SSLResponse(False), pw.SSLRequest(), "SSLRequest received after"),
        (pw.GSSENCRequest(), pw.GSSENCResponse(False), pw.GSSENCRequest(), "GSSENCRequest received after"),
    ],
)
def test_negotiation_packets_are_bounded(
    first: pw.StartupPacket,
    answer: pw.SSLResponse | pw.GSSENCResponse,
    second: pw.StartupPacket,
    fragment: str,
) -> None:
    server = pw.ServerConnection()
    server.receive_data(first.encode() + second.encode())
    server.next_event()
    server.send(answer)
    with pytest.raises(RemoteProtocolError, match=fragment):
        server.next_event()


def test_no_negotiation_after_tls() -> None:
    for second in (pw.SSLRequest(), pw.GSSENCRequest()):
        server = pw.ServerConnection()
        server.receive_data(pw.SSLRequest().encode())
        server.next_event()
        server.send(pw.SSLResponse(True))
        server.tls_established()
        server.receive_data(second.encode())
        with pytest.raises(RemoteProtocolError, match="after"):
            server.next_event()


def test_gssenc_refused_then_ssl_allowed() -> None:
    server = pw.ServerConnection()
    server.receive_data(pw.GSSENCRequest().encode() + pw.SSLRequest().encode())
    assert drain_server(server) == [pw.GSSENCRequest()]
    with pytest.raises(LocalProtocolError, match="GSSAPI"):
        server.send(pw.GSSENCResponse(True))
    server.send(pw.GSSENCResponse(False))
    assert drain_server(server) == [pw.SSLRequest()]


def test_reading_before_answering_negotiation_is_a_local_error() -> None:
    server = pw.ServerConnection()
    server.receive_data(pw.SSLRequest().encode())
    server.next_event()
    with pytest.raises(LocalProtocolError, match="answer the SSL request"):
        server.next_event()


def test_cancel_request_closes() -> None:
    server = pw.ServerConnection()
    server.receive_data(pw.CancelRequest(42, b"\x01\x02\x03\x04").encode() + b"ignored")
    assert server.next_event() == pw.CancelRequest(42, b"\x01\x02\x03\x04")
    assert server.phase is pw.Phase.CLOSED
    assert server.next_event() == pw.ConnectionClosed()


@pytest.mark.parametrize(
    ("prefix", "fragment"),
    [
        (b"\x00\x00\x27\x11", "invalid length of startup packet (10001 bytes)"),
        (b"\x00\x00\x00\x07", "invalid length of startup packet (7 bytes)"),
        (b"\xff\xff\xff\xff", "invalid length"),
        (b"GET / HTTP/1.1\r\n", "invalid length"),
        (b"\x16\x03\x01\x02\x00", "invalid length"),  # a TLS ClientHello (direct SSL)
    ],
)
def test_startup_length_is_checked_before_the_body_arrives(prefix: bytes, fragment: str) -> None:
    server = pw.ServerConnection()
    server.receive_data(prefix)
    with pytest.raises(RemoteProtocolError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        server.next_event()


def test_startup_limit_is_configurable() -> None:
    packet = STARTUP.encode()
    server = pw.ServerConnection(max_startup_packet=len(packet) - 1)
    server.receive_data(packet[:4])
    with pytest.raises(RemoteProtocolError, match="invalid length"):
        server.next_event()
    server = pw.ServerConnection(max_startup_packet=len(packet))
    server.receive_data(packet)
    assert server.next_event() == STARTUP


def test_unknown_protocol_version_is_0a000() -> None:
    """PostgreSQL's answer to another major version: feature_not_supported."""
    server = pw.ServerConnection()
    server.receive_data(b"\x00\x00\x00\x08\x00\x02\x00\x00")
    with pytest.raises(RemoteProtocolError, match=r"unsupported frontend protocol 2\.0") as info:
        server.next_event()
    assert info.value.sqlstate == "0A000"


def test_protocol_3_2_is_parsed_and_negotiated_down() -> None:
    message = pw.StartupMessage({"user": "alice", "_pq_.x": "on"}, protocol_version=pw.PROTOCOL_3_2)
    server = pw.ServerConnection()
    server.receive_data(message.encode())
    event = server.next_event()
    assert isinstance(event, pw.StartupMessage)
    negotiate = event.negotiate()
    assert negotiate == pw.NegotiateProtocolVersion(pw.PROTOCOL_3_0, ("_pq_.x",))
    assert server.send(negotiate) == negotiate.encode()
    with pytest.raises(LocalProtocolError, match="already sent"):
        server.send(negotiate)
    server.send(pw.AuthenticationOk())
    with pytest.raises(LocalProtocolError):
        server.send(pw.NegotiateProtocolVersion(pw.PROTOCOL_3_0))


@pytest.mark.parametrize(
    ("version", "params", "expected"),
    [
        (pw.PROTOCOL_3_0 | 1, {"user": "a"}, pw.NegotiateProtocolVersion(pw.PROTOCOL_3_0)),
        (pw.PROTOCOL_3_2, {"user": "a"}, pw.NegotiateProtocolVersion(pw.PROTOCOL_3_0)),
        (
            pw.PROTOCOL_3_0,
            {"user": "a", "_pq_.x": "1"},
            pw.NegotiateProtocolVersion(pw.PROTOCOL_3_0, ("_pq_.x",)),
        ),
        (pw.PROTOCOL_3_0, {"user": "a"}, None),
    ],
)
def test_negotiation_is_required_before_authentication_exactly_when_asked_for(
    version: int, params: dict[str, str], expected: pw.NegotiateProtocolVersion | None
) -> None:
    server = pw.ServerConnection()
    server.receive_data(pw.StartupMessage(params, protocol_version=version).encode())
    event = server.next_event()
    assert isinstance(event, pw.StartupMessage)
    assert event.negotiate() == expected
    if expected is None:
        with pytest.raises(LocalProtocolError, match="without a newer version"):
            server.send(pw.NegotiateProtocolVersion(pw.PROTOCOL_3_0))
    else:
        for premature in (pw.AuthenticationOk(), pw.AuthenticationCleartextPassword()):
            with pytest.raises(LocalProtocolError, match="send NegotiateProtocolVersion before"):
                server.send(premature)
        server.send(expected)
    server.send(pw.AuthenticationOk())
    server.send(pw.ReadyForQuery("I"))
    assert server.phase is pw.Phase.SWITCHED


def test_errors_need_no_negotiation_first() -> None:
    server = pw.ServerConnection()
    server.receive_data(pw.StartupMessage({"user": "a"}, protocol_version=pw.PROTOCOL_3_2).encode())
    server.next_event()
    server.send(pw.ErrorResponse.fatal("28000", "no"))
    assert server.phase is pw.Phase.CLOSED


def test_sasl_exchange_parses_p_by_what_was_asked() -> None:
    server = started()
    server.send(pw.AuthenticationSASL(("SCRAM-SHA-256",)))
    initial = pw.SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=abc")
    server.receive_data(initial.encode())
    assert server.next_event() == initial
    server.send(pw.AuthenticationSASLContinue(b"r=abcdef,s=c2FsdA==,i=4096"))
    server.receive_data(pw.SASLResponse(b"c=biws,r=abcdef,p=xx").encode())
    assert server.next_event() == pw.SASLResponse(b"c=biws,r=abcdef,p=xx")
    with pytest.raises(LocalProtocolError, match="AuthenticationOk"):
        server.send(pw.AuthenticationOk())  # the server must prove itself first
    server.send(pw.AuthenticationSASLFinal(b"v=xx"))
    server.send(pw.AuthenticationOk())
    server.send(pw.ReadyForQuery())
    assert server.phase is pw.Phase.SWITCHED


def test_md5_request_then_password() -> None:
    server = started()
    server.send(pw.AuthenticationMD5Password(b"abcd"))
    server.receive_data(pw.PasswordMessage(b"md5" + b"0" * 32).encode())
    assert server.next_event() == pw.PasswordMessage(b"md5" + b"0" * 32)
    server.send(pw.ErrorResponse.fatal("28P01", "password authentication failed"))
    assert server.phase is pw.Phase.CLOSED


def test_unexpected_message_during_auth() -> None:
    server = started()
    server.send(pw.AuthenticationCleartextPassword())
    server.receive_data(QUERY)
    with pytest.raises(RemoteProtocolError, match="expected password response, got message type b'Q'"):
        server.next_event()
    with pytest.raises(RemoteProtocolError):
        server.next_event()  # ERROR is sticky


def test_terminate_during_auth() -> None:
    server = started()
    server.send(pw.AuthenticationCleartextPassword())
    server.receive_data(pw.Terminate().encode())
    assert server.next_event() == pw.Terminate()
    assert server.phase is pw.Phase.CLOSED


def test_typed_message_limit() -> None:
    server = started(max_message=100)
    server.send(pw.AuthenticationCleartextPassword())
    server.receive_data(b"p\x00\x00\x00\x65")  # 101: refused before the body arrives
    with pytest.raises(RemoteProtocolError, match="exceeds the limit of 100"):
        server.next_event()
    server = started(max_message=100)
    server.send(pw.AuthenticationCleartextPassword())
    server.receive_data(b"p\x00\x00\x00\x03")
    with pytest.raises(RemoteProtocolError, match="invalid message length 3"):
        server.next_event()


def test_buffer_cap() -> None:
    server = pw.ServerConnection(max_buffer=64)
    with pytest.raises(RemoteProtocolError, match="receive buffer"):
        server.receive_data(b"\x00" * 65)
    assert server.phase is pw.Phase.ERROR


def test_client_bytes_after_auth_ok_are_not_parsed() -> None:
    server = started()
    server.send(pw.AuthenticationOk())
    server.receive_data(b"\xffnot a message at all")
    assert server.next_event() is pw.NEED_DATA
    server.send(pw.ParameterStatus("server_version", "15"))
    server.send(pw.BackendKeyData(1, b"abcd"))
    server.send(pw.NoticeResponse("NOTICE", "00000", "hello"))
    server.send(pw.ReadyForQuery())
    assert server.phase is pw.Phase.SWITCHED
    assert server.trailing_data == b"\xffnot a message at all"
    with pytest.raises(LocalProtocolError, match="relay raw bytes"):
        server.receive_data(b"more")
    with pytest.raises(LocalProtocolError, match="relay raw bytes"):
        server.next_event()
    with pytest.raises(LocalProtocolError):
        server.send(pw.ErrorResponse.fatal("57P01", "bye"))


def test_eof_handling() -> None:
    server = pw.ServerConnection()
    server.receive_data(b"")
    assert server.next_event() == pw.ConnectionClosed()
    assert server.phase is pw.Phase.CLOSED
    assert server.received_eof

    server = pw.ServerConnection()
    server.receive_data(STARTUP.encode()[:10])
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a message"):
        server.next_event()

    server = started()
    server.send(pw.AuthenticationCleartextPassword())
    server.receive_data(b"")  # psql hangs up to prompt for a password
    assert server.next_event() == pw.ConnectionClosed()
    with pytest.raises(LocalProtocolError, match="after EOF"):
        server.receive_data(b"x")


@pytest.mark.parametrize(
    "message",
    [
        pw.ReadyForQuery(),
        pw.ParameterStatus("a", "b"),
        pw.BackendKeyData(1, b"abcd"),
        pw.AuthenticationSASLContinue(b"x"),
        pw.AuthenticationSASLFinal(b"x"),
        pw.SSLResponse(False),
    ],
)
def test_out_of_order_sends_are_local_errors(message: pw.ServerMessage) -> None:
    server = started()
    with pytest.raises(LocalProtocolError):
        server.send(message)
    assert server.phase is pw.Phase.AUTHENTICATING  # state unchanged


def test_sends_in_startup_and_closed() -> None:
    server = pw.ServerConnection()
    for message in (pw.AuthenticationOk(), pw.NoticeResponse("N", "0", "m"), pw.SSLResponse(True)):
        with pytest.raises(LocalProtocolError):
            server.send(message)
    server.send(pw.ErrorResponse.fatal("57P03", "shutting down"))
    with pytest.raises(LocalProtocolError):
        server.send(pw.ErrorResponse.fatal("57P03", "again"))


def test_waiting_for_password_does_not_allow_second_request() -> None:
    server = started()
    server.send(pw.AuthenticationCleartextPassword())
    with pytest.raises(LocalProtocolError):
        server.send(pw.AuthenticationMD5Password(b"abcd"))
    with pytest.raises(LocalProtocolError):
        server.send(pw.AuthenticationOk())


def test_tls_established_out_of_phase() -> None:
    with pytest.raises(LocalProtocolError):
        pw.ServerConnection().tls_established()


def test_constructor_rejects_useless_limits() -> None:
    with pytest.raises(ValueError):
        pw.ServerConnection(max_startup_packet=4)


def test_direct_tls_then_startup_and_no_ssl_request_afterwards() -> None:
    server = pw.ServerConnection()
    server.tls_established_direct()
    server.receive_data(pw.SSLRequest().encode())
    with pytest.raises(RemoteProtocolError):
        server.next_event()
    server = pw.ServerConnection()
    server.tls_established_direct()
    server.receive_data(pw.StartupMessage({"user": "u", "database": "d"}).encode())
    assert isinstance(server.next_event(), pw.StartupMessage)


def test_direct_tls_only_before_the_first_packet() -> None:
    server = pw.ServerConnection()
    server.receive_data(pw.SSLRequest().encode())
    assert isinstance(server.next_event(), pw.SSLRequest)
    with pytest.raises(LocalProtocolError):
        server.tls_established_direct()
