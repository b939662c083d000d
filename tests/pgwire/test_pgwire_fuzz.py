"""Fuzzing both codec ends: whatever the peer sends, the only exception is RemoteProtocolError.

(The client may also raise BackendAuthFailed, but only for streams that get a SASL exchange
going, which random bytes do not; the structured tests below allow it explicitly.)
Run with HYPOTHESIS_PROFILE=deep for many more examples.
"""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import given
from hypothesis import strategies as st
from pgwire_helpers import run_client, run_server, split_at

from ferryman import pgwire as pw
from ferryman.errors import BackendAuthFailed, RemoteProtocolError

STARTUP = pw.StartupMessage({"user": "alice", "database": "appdb"})

VALID_CLIENT_STREAM = (
    pw.GSSENCRequest().encode()
    + pw.SSLRequest().encode()
    + STARTUP.encode()
    + pw.PasswordMessage(b"pw").encode()
    + b"Q\x00\x00\x00\x0dselect 1\x00"
)
VALID_BACKEND_STREAM = b"".join(
    m.encode()
    for m in (
        pw.AuthenticationMD5Password(b"salt"),
        pw.AuthenticationOk(),
        pw.ParameterStatus("server_version", "15"),
        pw.NoticeResponse("NOTICE", "00000", "hi"),
        pw.BackendKeyData(1, b"abcd"),
        pw.ReadyForQuery("I"),
    )
)


def server_in(state: str) -> pw.ServerConnection:
    """A server that is fresh, or has asked for a password / SASL message."""
    server = pw.ServerConnection()
    if state == "fresh":
        return server
    server.receive_data(STARTUP.encode())
    server.next_event()
    if state == "password":
        server.send(pw.AuthenticationCleartextPassword())
    elif state == "sasl-initial":
        server.send(pw.AuthenticationSASL(("SCRAM-SHA-256",)))
    else:
        server.send(pw.AuthenticationSASL(("SCRAM-SHA-256",)))
        server.receive_data(pw.SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=x").encode())
        server.next_event()
        server.send(pw.AuthenticationSASLContinue(b"r=xy,s=c2FsdHNhbHRzYWx0,i=4096"))
    return server


def client_in(state: str) -> pw.ClientConnection:
    """A client that has sent an SSLRequest or its StartupMessage."""
    client = pw.ClientConnection(password="pw")
    client.send(pw.SSLRequest() if state == "ssl" else STARTUP)
    return client


SERVER_STATES = st.sampled_from(["fresh", "password", "sasl-initial", "sasl-response"])
CLIENT_STATES = st.sampled_from(["ssl", "startup"])
CHUNKS = st.lists(st.binary(max_size=64), max_size=8)


def _only_remote_errors(action: Callable[[], object]) -> None:
    try:
        action()
    except RemoteProtocolError:
        pass


@given(st.binary(max_size=512), SERVER_STATES)
def test_server_random_bytes(data: bytes, state: str) -> None:
    _only_remote_errors(lambda: run_server([data], server=server_in(state)))


@given(CHUNKS, SERVER_STATES, st.booleans())
def test_server_random_chunks(chunks: list[bytes], state: str, eof: bool) -> None:
    _only_remote_errors(lambda: run_server(chunks, server=server_in(state), eof=eof))


@given(st.binary(max_size=512), CLIENT_STATES)
def test_client_random_bytes(data: bytes, state: str) -> None:
    _only_remote_errors(lambda: run_client(client_in(state), [data]))


@given(CHUNKS, CLIENT_STATES, st.booleans())
def test_client_random_chunks(chunks: list[bytes], state: str, eof: bool) -> None:
    _only_remote_errors(lambda: run_client(client_in(state), chunks, eof=eof))


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few bytes replaced, inserted or deleted."""
    out = bytearray(data)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        op = draw(st.sampled_from(["replace", "insert", "delete"]))
        index = draw(st.integers(min_value=0, max_value=max(len(out) - 1, 0)))
        if op == "replace" and out:
            out[index] = draw(st.integers(min_value=0, max_value=255))
        elif op == "insert":
            out[index:index] = draw(st.binary(min_size=1, max_size=4))
        elif out:
            del out[index]
    return bytes(out)


@given(mutated(VALID_CLIENT_STREAM), st.lists(st.integers(min_value=1, max_value=100), max_size=6))
def test_server_mutated_valid_stream(data: bytes, points: list[int]) -> None:
    _only_remote_errors(lambda: run_server(split_at(data, points)))


@given(mutated(VALID_BACKEND_STREAM), st.lists(st.integers(min_value=1, max_value=100), max_size=6))
def test_client_mutated_valid_stream(data: bytes, points: list[int]) -> None:
    try:
        run_client(client_in("startup"), split_at(data, points))
    except (RemoteProtocolError, BackendAuthFailed):
        pass


BACKEND_MESSAGES = st.sampled_from(
    [
        pw.AuthenticationOk(),
        pw.AuthenticationCleartextPassword(),
        pw.AuthenticationMD5Password(b"salt"),
        pw.AuthenticationSASL(("SCRAM-SHA-256",)),
        pw.AuthenticationSASL(("SCRAM-SHA-256-PLUS",)),
        pw.AuthenticationSASLContinue(b"r=abc,s=c2FsdHNhbHRzYWx0,i=4096"),
        pw.AuthenticationSASLFinal(b"v=AAAA"),
        pw.ParameterStatus("a", "b"),
        pw.BackendKeyData(1, b"abcd"),
        pw.BackendKeyData(1, b"abcdefgh"),
        pw.ReadyForQuery("E"),
        pw.ErrorResponse.fatal("28000", "x"),
        pw.NoticeResponse("NOTICE", "00000", "x"),
        pw.NegotiateProtocolVersion(pw.PROTOCOL_3_0, ("_pq_.a",)),
    ]
)


@given(st.lists(BACKEND_MESSAGES, max_size=10), st.booleans())
def test_client_random_valid_message_sequences(messages: list[pw.BackendMessage], ssl: bool) -> None:
    prefix = b"N" if ssl else b""
    client = client_in("ssl" if ssl else "startup")
    stream = b"".join(m.encode() for m in messages)
    try:
        if ssl:
            run_client(client, [prefix], eof=False)
            client.send(STARTUP)
        run_client(client, [stream])
    except (RemoteProtocolError, BackendAuthFailed):
        pass


FRONTEND_PACKETS = st.sampled_from(
    [
        pw.SSLRequest().encode(),
        pw.GSSENCRequest().encode(),
        pw.CancelRequest(1, b"abcd").encode(),
        STARTUP.encode(),
        pw.StartupMessage({"user": "u"}, protocol_version=pw.PROTOCOL_3_2).encode(),
        pw.PasswordMessage(b"pw").encode(),
        pw.SASLInitialResponse("SCRAM-SHA-256", None).encode(),
        pw.SASLResponse(b"x").encode(),
        pw.Terminate().encode(),
        b"Q\x00\x00\x00\x05\x00",
    ]
)


@given(st.lists(FRONTEND_PACKETS, max_size=8))
def test_server_random_valid_message_sequences(packets: list[bytes]) -> None:
    _only_remote_errors(lambda: run_server([b"".join(packets)]))


NON_NUL = st.binary(max_size=24).map(lambda b: b.replace(b"\x00", b"\x01"))


@given(
    st.lists(st.tuples(NON_NUL.filter(bool), NON_NUL), max_size=6),
    st.sampled_from([pw.PROTOCOL_3_0, pw.PROTOCOL_3_0 | 1, pw.PROTOCOL_3_2]),
)
def test_startup_parameters_round_trip_byte_for_byte(pairs: list[tuple[bytes, bytes]], version: int) -> None:
    """Whatever bytes the client puts in its parameters, a parsed StartupMessage re-encodes to
    the same packet (what the backend gets is what the client sent), or the packet is refused
    with our protocol error (duplicate names, no user)."""
    body = version.to_bytes(4, "big") + b"".join(k + b"\x00" + v + b"\x00" for k, v in pairs) + b"\x00"
    wire = (len(body) + 4).to_bytes(4, "big") + body
    try:
        message = pw.parse_startup_packet(wire)
    except RemoteProtocolError:
        return
    assert isinstance(message, pw.StartupMessage)
    assert message.encode() == wire
    repr(message)  # never raises, whatever the bytes
