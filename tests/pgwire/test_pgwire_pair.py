"""ClientConnection <-> ServerConnection in memory (h11's ConnectionPair), with real auth peers.

The server side plays a backend: cleartext and MD5 are checked with pgwire.auth's helpers,
SCRAM-SHA-256 with scramp's *server* implementation, so our client is verified against an
independent peer rather than against itself.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import scramp  # type: ignore[import-untyped]
from hypothesis import given
from hypothesis import strategies as st
from pgwire_helpers import ConnectionPair, phase_of, split_at

from ferryman import pgwire as pw
from ferryman.errors import BackendAuthFailed
from ferryman.pgwire.auth import verify_cleartext_password, verify_md5_password

STARTUP = pw.StartupMessage({"user": "ferry_alice", "database": "appdb", "application_name": "t"})
SALT = b"\x01\x02\x03\x04"
Answer = Callable[[pw.ServerConnection, pw.FrontendEvent], bytes]


def session_start(server: pw.ServerConnection) -> bytes:
    return b"".join(
        server.send(m)
        for m in (
            pw.AuthenticationOk(),
            pw.ParameterStatus("server_version", "15.20"),
            pw.BackendKeyData(99, b"\x00\x00\x00\x63"),
            pw.ReadyForQuery("I"),
        )
    )


def refuse(server: pw.ServerConnection) -> bytes:
    return server.send(
        pw.ErrorResponse.fatal("28P01", 'password authentication failed for user "ferry_alice"')
    )


def password_backend(method: str, password: str) -> Answer:
    def answer(server: pw.ServerConnection, event: pw.FrontendEvent) -> bytes:
        match event:
            case pw.StartupMessage() if method == "md5":
                return server.send(pw.AuthenticationMD5Password(SALT))
            case pw.StartupMessage():
                return server.send(pw.AuthenticationCleartextPassword())
            case pw.PasswordMessage() if method == "md5":
                ok = verify_md5_password(event, "ferry_alice", password, SALT)
                return session_start(server) if ok else refuse(server)
            case pw.PasswordMessage():
                return session_start(server) if verify_cleartext_password(event, password) else refuse(server)
        raise AssertionError(event)

    return answer


def scram_backend(password: str, *, tamper_final: bool = False, auth_info: object = None) -> Answer:
    """A SCRAM backend; pass ``auth_info`` to reuse one stored verifier (same salt)."""
    mechanism = scramp.ScramMechanism("SCRAM-SHA-256")
    auth_info = auth_info or mechanism.make_auth_info(password)
    scram_server = mechanism.make_server(lambda _user: auth_info)

    def answer(server: pw.ServerConnection, event: pw.FrontendEvent) -> bytes:
        match event:
            case pw.StartupMessage():
                # As PostgreSQL over TLS: -PLUS first; the client must pick plain SCRAM-SHA-256.
                return server.send(pw.AuthenticationSASL(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")))
            case pw.SASLInitialResponse(mechanism="SCRAM-SHA-256", data=bytes(data)):
                scram_server.set_client_first(data.decode())
                return server.send(pw.AuthenticationSASLContinue(scram_server.get_server_first().encode()))
            case pw.SASLResponse(data=data):
                try:
                    scram_server.set_client_final(data.decode())
                except scramp.ScramException:
                    return refuse(server)
                final: str = scram_server.get_server_final()
                if tamper_final:
                    final = "v=" + "A" * 43 + "="  # well-formed, 32 bytes, wrong
                return server.send(pw.AuthenticationSASLFinal(final.encode())) + session_start(server)
        raise AssertionError(event)

    return answer


def converse(
    pair: ConnectionPair, answer: Answer, *, first: bytes | None = None
) -> tuple[list[pw.FrontendEvent], list[pw.BackendEvent]]:
    """Run the login to the end: client bytes -> server events -> answers -> client events."""
    server_events: list[pw.FrontendEvent] = []
    client_events: list[pw.BackendEvent] = []
    to_server = first if first is not None else pair.client.send(STARTUP)
    while to_server:
        events = pair.to_server(to_server)
        server_events += events
        reply = b"".join(answer(pair.server, e) for e in events)
        client_events += pair.to_client(reply)
        to_server, pair.pending = pair.pending, b""
    return server_events, client_events


@pytest.mark.parametrize("method", ["password", "md5"])
def test_password_logins(method: str) -> None:
    pair = ConnectionPair(password="correct horse")
    server_events, client_events = converse(pair, password_backend(method, "correct horse"))
    assert [type(e) for e in server_events] == [pw.StartupMessage, pw.PasswordMessage]
    assert server_events[0] == STARTUP
    assert pair.client.phase is pw.Phase.SWITCHED and pair.server.phase is pw.Phase.SWITCHED
    assert pair.client.auth_method == method
    assert pair.client.server_parameters["server_version"] == "15.20"
    assert pair.client.backend_key_data == pw.BackendKeyData(99, b"\x00\x00\x00\x63")
    assert client_events[-1] == pw.ReadyForQuery("I")


@pytest.mark.parametrize("method", ["password", "md5"])
def test_wrong_password_gives_error_event(method: str) -> None:
    pair = ConnectionPair(password="wrong")
    _, client_events = converse(pair, password_backend(method, "correct horse"))
    assert isinstance(client_events[-1], pw.ErrorResponse)
    assert client_events[-1].code == "28P01"
    assert pair.client.error == client_events[-1]
    assert pair.server.phase is pw.Phase.CLOSED


def test_scram_login_against_scramp_server() -> None:
    pair = ConnectionPair(password="pencil ✏ 1")
    server_events, client_events = converse(pair, scram_backend("pencil ✏ 1"))
    assert [type(e) for e in server_events] == [pw.StartupMessage, pw.SASLInitialResponse, pw.SASLResponse]
    initial = server_events[1]
    assert isinstance(initial, pw.SASLInitialResponse)
    assert initial.mechanism == "SCRAM-SHA-256"
    assert initial.data is not None and initial.data.startswith(b"n,,")  # no channel binding
    assert [type(e) for e in client_events[:3]] == [
        pw.AuthenticationSASL,
        pw.AuthenticationSASLContinue,
        pw.AuthenticationSASLFinal,
    ]
    assert pair.client.phase is pw.Phase.SWITCHED
    assert pair.client.auth_method == "scram-sha-256"


def test_scram_wrong_password_is_refused_by_the_server() -> None:
    pair = ConnectionPair(password="not pencil")
    _, client_events = converse(pair, scram_backend("pencil"))
    assert isinstance(client_events[-1], pw.ErrorResponse)
    assert client_events[-1].code == "28P01"


def test_scram_wrong_server_signature_is_rejected() -> None:
    pair = ConnectionPair(password="pencil")
    with pytest.raises(BackendAuthFailed, match="signature") as info:
        converse(pair, scram_backend("pencil", tamper_final=True))
    assert info.value.sqlstate == "28P01"
    assert pair.client.phase is pw.Phase.ERROR


def test_ssl_refused_then_login() -> None:
    pair = ConnectionPair(password="pw")
    events = pair.to_server(pair.client.send(pw.SSLRequest()))
    assert events == [pw.SSLRequest()]
    assert pair.to_client(pair.server.send(pw.SSLResponse(False))) == [pw.SSLResponse(False)]
    converse(pair, password_backend("password", "pw"))
    assert pair.client.phase is pw.Phase.SWITCHED


def test_ssl_accepted_both_sides_wait_for_tls() -> None:
    pair = ConnectionPair()
    pair.to_server(pair.client.send(pw.SSLRequest()))
    pair.to_client(pair.server.send(pw.SSLResponse(True)))
    assert pair.client.phase is pw.Phase.TLS_PENDING
    assert pair.server.phase is pw.Phase.TLS_PENDING
    # (a real shell runs the TLS handshake here)
    pair.client.tls_established()
    pair.server.tls_established()
    converse(pair, lambda server, event: session_start(server))
    assert phase_of(pair.client) is pw.Phase.SWITCHED
    assert pair.client.auth_method == "trust"


def test_gateway_sends_fatal_to_client() -> None:
    pair = ConnectionPair()
    _, events = converse(pair, lambda server, event: server.send(pw.ErrorResponse.fatal("28000", "no grant")))
    assert events == [pw.ErrorResponse.fatal("28000", "no grant")]
    assert pair.server.phase is pw.Phase.CLOSED


def _chunker(points: list[int]) -> Callable[[bytes], list[bytes]]:
    return lambda data: split_at(data, points)


@given(st.lists(st.integers(min_value=1, max_value=80), max_size=12), st.sampled_from(["password", "md5"]))
def test_random_chunking_never_changes_events(points: list[int], method: str) -> None:
    reference = converse(ConnectionPair(password="pw"), password_backend(method, "pw"))
    chunked = converse(
        ConnectionPair(password="pw", chunking=_chunker(points)), password_backend(method, "pw")
    )
    assert chunked == reference


@given(st.lists(st.integers(min_value=1, max_value=120), max_size=8))
def test_random_chunking_scram(points: list[int]) -> None:
    pair = ConnectionPair(password="pencil", chunking=_chunker(points))
    server_events, client_events = converse(pair, scram_backend("pencil"))
    # Nonces are random, so compare the shape; correctness is the verified signature.
    assert [type(e) for e in server_events] == [pw.StartupMessage, pw.SASLInitialResponse, pw.SASLResponse]
    assert [type(e) for e in client_events] == [
        pw.AuthenticationSASL,
        pw.AuthenticationSASLContinue,
        pw.AuthenticationSASLFinal,
        pw.AuthenticationOk,
        pw.ParameterStatus,
        pw.BackendKeyData,
        pw.ReadyForQuery,
    ]
    assert pair.client.phase is pw.Phase.SWITCHED


def test_scram_key_derivation_is_reused_for_the_same_role_salt_and_password() -> None:
    """Repeat logins of one role (same stored salt) skip PBKDF2, and still verify everything:
    a wrong server signature or a wrong password is still refused after a cached login."""
    from ferryman.pgwire import auth

    stored = scramp.ScramMechanism("SCRAM-SHA-256").make_auth_info("repeat-pass")  # one salt
    auth._cached_hi.cache_clear()
    before = auth._cached_hi.cache_info()
    for _ in range(3):
        pair = ConnectionPair(password="repeat-pass")
        converse(pair, scram_backend("repeat-pass", auth_info=stored))
        assert pair.client.phase is pw.Phase.SWITCHED
    after = auth._cached_hi.cache_info()
    assert after.misses - before.misses == 1
    assert after.hits - before.hits == 2
    with pytest.raises(BackendAuthFailed, match="signature"):
        converse(
            ConnectionPair(password="repeat-pass"), scram_backend("", tamper_final=True, auth_info=stored)
        )
    _, events = converse(ConnectionPair(password="other-pass"), scram_backend("", auth_info=stored))
    assert isinstance(events[-1], pw.ErrorResponse) and events[-1].code == "28P01"
