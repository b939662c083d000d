"""ClientConnection: logging in to a backend, against hand-built backend messages."""

from __future__ import annotations

import hashlib

import pytest
from pgwire_helpers import phase_of, run_client, split_at

from ferryman import pgwire as pw
from ferryman.errors import BackendAuthFailed, LocalProtocolError, RemoteProtocolError
from ferryman.pgwire.auth import ScramSHA256Client, md5_password

STARTUP = pw.StartupMessage({"user": "postgres", "database": "postgres"})
SALT = b"\x93\x1c\x8a\x05"
AFTER_OK: list[pw.BackendMessage] = [
    pw.ParameterStatus("server_version", "15.20"),
    pw.ParameterStatus("client_encoding", "UTF8"),
    pw.NoticeResponse("NOTICE", "00000", "welcome"),
    pw.BackendKeyData(4242, b"\x0a\x0b\x0c\x0d"),
    pw.ReadyForQuery("I"),
]


def started(password: str | None = "postgres") -> pw.ClientConnection:
    client = pw.ClientConnection(password=password)
    assert client.send(STARTUP) == STARTUP.encode()
    assert client.phase is pw.Phase.AUTHENTICATING
    return client


def wire(*messages: pw.BackendMessage) -> bytes:
    return b"".join(m.encode() for m in messages)


def test_trust_login() -> None:
    client = started(password=None)
    run = run_client(client, [wire(pw.AuthenticationOk(), *AFTER_OK)])
    assert run.events == [pw.AuthenticationOk(), *AFTER_OK]
    assert run.sent == b""
    assert client.phase is pw.Phase.SWITCHED
    assert client.auth_method == "trust"
    assert dict(client.server_parameters) == {"server_version": "15.20", "client_encoding": "UTF8"}
    assert client.backend_key_data == pw.BackendKeyData(4242, b"\x0a\x0b\x0c\x0d")
    assert client.transaction_status == "I"
    assert client.trailing_data == b""


def test_cleartext_password_reply_must_be_drained() -> None:
    client = started(password="s3cret")
    client.receive_data(wire(pw.AuthenticationCleartextPassword(), pw.AuthenticationOk()))
    assert client.next_event() == pw.AuthenticationCleartextPassword()
    with pytest.raises(LocalProtocolError, match="data_to_send"):
        client.next_event()
    assert client.data_to_send() == pw.PasswordMessage(b"s3cret").encode()
    assert client.data_to_send() == b""
    assert client.next_event() == pw.AuthenticationOk()
    assert client.auth_method == "password"


def test_md5_password_formula() -> None:
    # PostgreSQL stores md5(password || user); for postgres/postgres that is the well-known
    # "md53175bce1d3201d16594cebf9d7eb3f9d".
    inner = "3175bce1d3201d16594cebf9d7eb3f9d"
    assert hashlib.md5(b"postgrespostgres").hexdigest() == inner
    expected = b"md5" + hashlib.md5(inner.encode() + SALT).hexdigest().encode()
    assert md5_password("postgres", "postgres", SALT) == expected
    assert len(expected) == 35


def test_md5_login_split_at_every_offset() -> None:
    stream = wire(pw.AuthenticationMD5Password(SALT), pw.AuthenticationOk(), *AFTER_OK)
    expected_reply = pw.PasswordMessage(md5_password("postgres", "postgres", SALT)).encode()
    whole = run_client(started(), [stream])
    assert whole.sent == expected_reply
    assert whole.events == [pw.AuthenticationMD5Password(SALT), pw.AuthenticationOk(), *AFTER_OK]
    for offset in range(len(stream) + 1):
        client = started()
        run = run_client(client, split_at(stream, [offset]))
        assert (run.events, run.sent) == (whole.events, whole.sent), offset
        assert client.phase is pw.Phase.SWITCHED
        assert client.auth_method == "md5"


def test_scram_rfc7677_vector() -> None:
    # RFC 7677 section 3: user "user", password "pencil".
    scram = ScramSHA256Client("user", "pencil", nonce="rOprNGfwEbeRWgbNEkqO")
    assert scram.initial_response() == pw.SASLInitialResponse(
        "SCRAM-SHA-256", b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    )
    reply = scram.continue_(
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    )
    assert reply == pw.SASLResponse(
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
    scram.finish(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")


def test_scram_rfc7677_vector_wrong_signature() -> None:
    scram = ScramSHA256Client("user", "pencil", nonce="rOprNGfwEbeRWgbNEkqO")
    scram.initial_response()
    scram.continue_(b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
    with pytest.raises(BackendAuthFailed, match="signature"):
        scram.finish(b"v=AAAATRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")


@pytest.mark.parametrize(
    "server_first",
    [
        b"r=someoneelse,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",  # does not extend our nonce
        b"e=unknown-user",
        b"\xff\xfe",
        b"garbage",
    ],
)
def test_scram_bad_server_first(server_first: bytes) -> None:
    scram = ScramSHA256Client("user", "pencil", nonce="rOprNGfwEbeRWgbNEkqO")
    scram.initial_response()
    with pytest.raises(BackendAuthFailed):
        scram.continue_(server_first)


@pytest.mark.parametrize(
    ("mechanisms", "fragment"),
    [
        (("SCRAM-SHA-256-PLUS",), "SCRAM-SHA-256-PLUS"),
        (("OAUTHBEARER",), "OAUTHBEARER"),
        ((), r"\[\]"),
    ],
)
def test_sasl_without_plain_scram_is_refused(mechanisms: tuple[str, ...], fragment: str) -> None:
    client = started()
    client.receive_data(pw.AuthenticationSASL(mechanisms).encode())
    with pytest.raises(RemoteProtocolError, match=fragment) as info:
        client.next_event()
    assert info.value.sqlstate == "0A000"
    assert client.phase is pw.Phase.ERROR


@pytest.mark.parametrize(("code", "name"), [(2, "KerberosV5"), (6, "SCMCredential"), (7, "GSS"), (9, "SSPI")])
def test_unsupported_auth_methods_are_named(code: int, name: str) -> None:
    client = started()
    client.receive_data(b"R\x00\x00\x00\x08" + code.to_bytes(4, "big"))
    with pytest.raises(RemoteProtocolError, match=f"authentication method {name} ") as info:
        client.next_event()
    assert info.value.sqlstate == "0A000"


@pytest.mark.parametrize(
    "request_",
    [
        pw.AuthenticationCleartextPassword(),
        pw.AuthenticationMD5Password(SALT),
        pw.AuthenticationSASL(("SCRAM-SHA-256",)),
    ],
)
def test_password_needed_but_missing(request_: pw.AuthenticationRequest) -> None:
    client = started(password=None)
    client.receive_data(request_.encode())
    with pytest.raises(BackendAuthFailed, match="no password"):
        client.next_event()
    assert client.phase is pw.Phase.ERROR


def test_error_response_during_auth_then_error_consume() -> None:
    client = started()
    error = pw.ErrorResponse.fatal("28P01", 'password authentication failed for user "postgres"')
    client.receive_data(
        wire(
            pw.AuthenticationCleartextPassword(), error, pw.NoticeResponse("N", "0", "x"), pw.ReadyForQuery()
        )
    )
    assert client.next_event() == pw.AuthenticationCleartextPassword()
    client.data_to_send()
    event = client.next_event()
    assert event == error
    assert isinstance(event, pw.ErrorResponse)
    assert event.is_fatal
    assert event.code == "28P01" and event.message.startswith("password authentication failed")
    assert client.error == error
    assert client.next_event() == pw.ConnectionClosed()  # the notice and RFQ were discarded
    assert client.phase is pw.Phase.CLOSED


def test_error_after_auth_ok_then_eof() -> None:
    client = started()
    error = pw.ErrorResponse.fatal("3D000", 'database "nope" does not exist')
    run = run_client(client, [wire(pw.AuthenticationOk(), error)])
    assert run.events == [pw.AuthenticationOk(), error, pw.ConnectionClosed()]


def test_error_consume_waits_for_more() -> None:
    client = started()
    client.receive_data(wire(pw.ErrorResponse.fatal("53300", "too many")) + b"N\x00\x00")
    assert isinstance(client.next_event(), pw.ErrorResponse)
    assert client.next_event() is pw.NEED_DATA
    client.receive_data(b"")
    assert client.next_event() == pw.ConnectionClosed()


def test_ssl_refused() -> None:
    client = pw.ClientConnection()
    assert client.send(pw.SSLRequest()) == b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
    assert client.next_event() is pw.NEED_DATA
    client.receive_data(b"N")
    assert client.next_event() == pw.SSLResponse(False)
    assert client.phase is pw.Phase.STARTUP
    client.send(STARTUP)
    with pytest.raises(LocalProtocolError):
        client.send(pw.SSLRequest())


def test_ssl_accepted() -> None:
    client = pw.ClientConnection()
    client.send(pw.SSLRequest())
    client.receive_data(b"S")
    assert client.next_event() == pw.SSLResponse(True)
    assert client.phase is pw.Phase.TLS_PENDING
    assert client.next_event() is pw.NEED_DATA
    client.tls_established()
    assert phase_of(client) is pw.Phase.STARTUP
    with pytest.raises(LocalProtocolError):
        client.send(pw.SSLRequest())
    client.send(STARTUP)


@pytest.mark.parametrize("later_segment", [False, True], ids=["same-segment", "later-segment"])
def test_server_bytes_after_ssl_answer_are_refused(later_segment: bool) -> None:
    # CVE-2021-23222: bytes a MITM injects behind "S" must not be read as TLS-protected.
    client = pw.ClientConnection()
    client.send(pw.SSLRequest())
    injected = pw.AuthenticationOk().encode()
    if later_segment:
        client.receive_data(b"S")
        assert client.next_event() == pw.SSLResponse(True)
        client.receive_data(injected)
        with pytest.raises(RemoteProtocolError, match="unencrypted data after SSL response"):
            client.tls_established()
    else:
        client.receive_data(b"S" + injected)
        with pytest.raises(RemoteProtocolError, match="unencrypted data after SSL response"):
            client.next_event()
    assert client.phase is pw.Phase.ERROR


@pytest.mark.parametrize(("answer", "fragment"), [(b"E", "does not support SSL"), (b"X", "invalid response")])
def test_bad_ssl_answers(answer: bytes, fragment: str) -> None:
    client = pw.ClientConnection()
    client.send(pw.SSLRequest())
    client.receive_data(answer)
    with pytest.raises(RemoteProtocolError, match=fragment):
        client.next_event()


def test_send_rules() -> None:
    client = pw.ClientConnection()
    client.send(pw.SSLRequest())
    with pytest.raises(LocalProtocolError):
        client.send(STARTUP)  # the SSL answer is pending
    with pytest.raises(LocalProtocolError, match=r"3\.0 only"):
        pw.ClientConnection().send(pw.StartupMessage({"user": "u"}, protocol_version=pw.PROTOCOL_3_2))
    with pytest.raises(LocalProtocolError, match="user"):
        pw.ClientConnection().send(pw.StartupMessage({"database": "d"}))
    client = started()
    with pytest.raises(LocalProtocolError):
        client.send(STARTUP)
    assert client.send(pw.Terminate()) == b"X\x00\x00\x00\x04"
    assert client.phase is pw.Phase.CLOSED


def test_cancel_request_on_a_fresh_connection() -> None:
    client = pw.ClientConnection()
    data = client.send(pw.CancelRequest(4242, b"\x0a\x0b\x0c\x0d"))
    assert data == bytes.fromhex("00000010 04d2162e 00001092 0a0b0c0d")
    assert client.phase is pw.Phase.CLOSED
    with pytest.raises(LocalProtocolError):
        started().send(pw.CancelRequest(1, b"abcd"))


@pytest.mark.parametrize(
    ("stream", "fragment"),
    [
        (pw.ParameterStatus("a", "b").encode(), "unexpected message type b'S'"),
        (b"D\x00\x00\x00\x04", "unexpected message type b'D'"),
        (wire(pw.AuthenticationOk(), pw.AuthenticationOk()), "unexpected message type b'R'"),
        (wire(pw.AuthenticationOk(), pw.BackendKeyData(1, b"abcd"), pw.BackendKeyData(1, b"abcd")), "twice"),
        (wire(pw.AuthenticationOk(), pw.BackendKeyData(1, b"abcdefgh")), "protocol 3.0"),
        (wire(pw.AuthenticationSASLFinal(b"v=x")), "unexpected AuthenticationSASLFinal"),
        (wire(pw.AuthenticationCleartextPassword(), pw.AuthenticationMD5Password(SALT)), "unexpected"),
        (b"R\x00\x00\x00\x02", "invalid message length 2"),
    ],
)
def test_unexpected_backend_messages(stream: bytes, fragment: str) -> None:
    client = started()
    with pytest.raises(RemoteProtocolError, match=fragment):
        run_client(client, [stream])


def test_scram_success_without_final_is_refused() -> None:
    client = started()
    client.receive_data(wire(pw.AuthenticationSASL(("SCRAM-SHA-256",)), pw.AuthenticationOk()))
    assert isinstance(client.next_event(), pw.AuthenticationSASL)
    client.data_to_send()
    with pytest.raises(BackendAuthFailed, match="without completing SCRAM"):
        client.next_event()


def test_negotiate_protocol_version_is_passed_through() -> None:
    client = started()
    run = run_client(
        client, [wire(pw.NegotiateProtocolVersion(pw.PROTOCOL_3_0), pw.AuthenticationOk(), *AFTER_OK)]
    )
    assert run.events[0] == pw.NegotiateProtocolVersion(pw.PROTOCOL_3_0)


def test_backend_speaking_first_or_hanging_up() -> None:
    client = pw.ClientConnection()
    client.receive_data(b"Z")
    with pytest.raises(RemoteProtocolError, match="before the startup packet"):
        client.next_event()
    client = started()
    client.receive_data(b"R\x00\x00")
    client.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a message"):
        client.next_event()
    client = started()
    client.receive_data(b"")
    assert client.next_event() == pw.ConnectionClosed()
    assert client.next_event() == pw.ConnectionClosed()


def test_backend_message_limit() -> None:
    client = pw.ClientConnection(max_message=64)
    client.send(STARTUP)
    client.receive_data(b"E\x00\x00\x00\x41")
    with pytest.raises(RemoteProtocolError, match="exceeds the limit of 64"):
        client.next_event()
    with pytest.raises(RemoteProtocolError, match="ERROR phase"):
        client.next_event()


def test_after_switch_the_codec_steps_aside() -> None:
    client = started()
    run_client(client, [wire(pw.AuthenticationOk(), pw.ReadyForQuery("I"))], eof=False)
    assert client.phase is pw.Phase.SWITCHED
    for call in (lambda: client.receive_data(b"x"), client.next_event, lambda: client.send(pw.Terminate())):
        with pytest.raises(LocalProtocolError):
            call()
