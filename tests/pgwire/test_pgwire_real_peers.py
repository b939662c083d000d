"""pgwire against real peers: a running PostgreSQL, and the real ``psql`` client.

Blocking sockets and subprocesses only (no event loop): the codec is sans-I/O, so a plain
loop is a complete driver. PostgreSQL tests skip when no server answers on
``FERRYMAN_TEST_PG_HOST``:``FERRYMAN_TEST_PG_PORT`` (default 127.0.0.1:5432, trust auth for
user ``postgres``); psql tests skip when ``psql`` is not installed.
"""

from __future__ import annotations

import os
import selectors
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from ferryman import pgwire as pw
from ferryman.errors import RemoteProtocolError
from ferryman.pgwire._buffer import ReceiveBuffer
from ferryman.pgwire._framing import next_typed

PG_HOST = os.environ.get("FERRYMAN_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("FERRYMAN_TEST_PG_PORT", "5432"))
IO_TIMEOUT = 10.0


@pytest.fixture
def pg_address() -> tuple[str, int]:
    try:
        with socket.create_connection((PG_HOST, PG_PORT), timeout=1.0):
            pass
    except OSError as exc:
        pytest.skip(f"no PostgreSQL at {PG_HOST}:{PG_PORT}: {exc}")
    return PG_HOST, PG_PORT


@pytest.fixture
def psql() -> str:
    path = shutil.which("psql")
    if path is None:
        pytest.skip("psql is not installed")
    return path


def dial(address: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address, timeout=IO_TIMEOUT)
    sock.settimeout(IO_TIMEOUT)
    return sock


def client_events(conn: pw.ClientConnection, sock: socket.socket) -> Iterator[pw.BackendEvent]:
    """Drive ``conn`` over ``sock`` until the switch or close, yielding events."""
    while conn.phase not in (pw.Phase.SWITCHED, pw.Phase.CLOSED):
        event = conn.next_event()
        if reply := conn.data_to_send():
            sock.sendall(reply)
        if event is pw.NEED_DATA:
            conn.receive_data(sock.recv(65536))
            continue
        yield event
        if isinstance(event, pw.SSLResponse):
            return


def backend_login(
    address: tuple[str, int], parameters: dict[str, str], *, ssl_request: bool = False
) -> tuple[socket.socket, pw.ClientConnection, list[pw.BackendEvent]]:
    sock = dial(address)
    conn = pw.ClientConnection()
    events: list[pw.BackendEvent] = []
    if ssl_request:
        sock.sendall(conn.send(pw.SSLRequest()))
        events += client_events(conn, sock)
        if events[-1] == pw.SSLResponse(True):
            sock.close()
            pytest.skip("this server has TLS on; the plain-socket test needs it off")
    sock.sendall(conn.send(pw.StartupMessage(parameters)))
    events += client_events(conn, sock)
    return sock, conn, events


# --- (a) ClientConnection against a real PostgreSQL -----------------------------------------


@pytest.mark.pg
@pytest.mark.parametrize("ssl_request", [False, True], ids=["plain", "ssl-refused"])
def test_login_to_real_postgres(pg_address: tuple[str, int], ssl_request: bool) -> None:
    params = {"user": "postgres", "database": "postgres", "application_name": "ferryman-test"}
    sock, conn, events = backend_login(pg_address, params, ssl_request=ssl_request)
    with sock:
        assert conn.phase is pw.Phase.SWITCHED
        assert events[-1] == pw.ReadyForQuery("I")
        assert pw.AuthenticationOk() in events
        assert conn.server_parameters["server_version"]
        assert conn.server_parameters["application_name"] == "ferryman-test"
        key = conn.backend_key_data
        assert key is not None and key.process_id > 0 and len(key.secret_key) == 4
        assert conn.trailing_data == b""
        sock.sendall(pw.Terminate().encode())


@pytest.mark.pg
def test_real_postgres_refuses_unknown_role(pg_address: tuple[str, int]) -> None:
    sock, conn, events = backend_login(pg_address, {"user": "ferryman_no_such_role", "database": "postgres"})
    with sock:
        error = conn.error
        assert error is not None and error.is_fatal
        assert error.code == "28000"
        assert "ferryman_no_such_role" in error.message
        assert events[-1] == pw.ConnectionClosed()


@pytest.mark.pg
def test_real_postgres_unknown_database_after_auth_ok(pg_address: tuple[str, int]) -> None:
    sock, conn, events = backend_login(pg_address, {"user": "postgres", "database": "ferryman_no_such_db"})
    with sock:
        assert pw.AuthenticationOk() in events
        assert conn.error is not None and conn.error.code == "3D000"


@pytest.mark.pg
def test_cancel_request_reaches_real_postgres(pg_address: tuple[str, int]) -> None:
    sock, conn, _ = backend_login(pg_address, {"user": "postgres", "database": "postgres"})
    key = conn.backend_key_data
    assert key is not None
    with sock:
        query = b"select pg_sleep(10)\x00"
        sock.sendall(b"Q" + (len(query) + 4).to_bytes(4, "big") + query)
        time.sleep(0.2)  # let the query start
        with dial(pg_address) as cancel_sock:
            cancel_sock.sendall(pw.ClientConnection().send(pw.CancelRequest(key.process_id, key.secret_key)))
            assert cancel_sock.recv(1) == b""  # the server closes without a reply
        buf = ReceiveBuffer(1 << 20)
        started = time.monotonic()
        while True:
            frame = next_typed(buf, 1 << 20)
            if frame is None:
                buf.feed(sock.recv(65536))
                continue
            if frame[0] == b"E":
                assert pw.ErrorResponse.parse(frame[1]).code == "57014"  # query_canceled
                break
        assert time.monotonic() - started < 5


# --- (c) ServerConnection against the real psql -----------------------------------------------

Handler = Callable[[pw.ServerConnection, pw.FrontendEvent, socket.socket], bytes]


def serve_connection(sock: socket.socket, handler: Handler) -> list[pw.FrontendEvent]:
    """Blocking driver for one client connection; returns what the client sent."""
    conn = pw.ServerConnection()
    events: list[pw.FrontendEvent] = []
    while conn.phase not in (pw.Phase.CLOSED, pw.Phase.SWITCHED):
        try:
            event = conn.next_event()
        except RemoteProtocolError as exc:
            sock.sendall(conn.send(pw.ErrorResponse.fatal(exc.sqlstate, str(exc))))
            break
        if event is pw.NEED_DATA:
            conn.receive_data(sock.recv(65536))
            continue
        events.append(event)
        match event:
            case pw.SSLRequest():
                sock.sendall(conn.send(pw.SSLResponse(False)))
            case pw.GSSENCRequest():
                sock.sendall(conn.send(pw.GSSENCResponse(False)))
            case _:
                sock.sendall(handler(conn, event, sock))
    return events


def run_psql(
    psql: str, conninfo: str, handler: Handler, *args: str
) -> tuple[list[list[pw.FrontendEvent]], subprocess.CompletedProcess[str]]:
    """Run psql against a one-off listener driven by ``handler``; return per-connection events."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    proc = subprocess.Popen(
        [psql, conninfo.format(port=port), "-c", "select 1", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    connections: list[list[pw.FrontendEvent]] = []
    listener.settimeout(0.1)
    deadline = time.monotonic() + 15
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            with sock:
                sock.settimeout(IO_TIMEOUT)
                connections.append(serve_connection(sock, handler))
        stdout, stderr = proc.communicate(timeout=IO_TIMEOUT)
    finally:
        listener.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return connections, subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def refuse_no_grant(conn: pw.ServerConnection, event: pw.FrontendEvent, sock: socket.socket) -> bytes:
    assert isinstance(event, pw.StartupMessage), event
    return conn.send(pw.ErrorResponse.fatal(pw.sqlstate.INVALID_AUTHORIZATION_SPECIFICATION, "no grant"))


@pytest.mark.parametrize("sslmode", ["disable", "prefer"])
def test_psql_is_refused_with_our_error(psql: str, sslmode: str) -> None:
    conninfo = f"host=127.0.0.1 port={{port}} user=alice dbname=appdb sslmode={sslmode} connect_timeout=5"
    connections, result = run_psql(psql, conninfo, refuse_no_grant)
    assert result.returncode == 2, result
    assert "FATAL:  no grant" in result.stderr
    assert len(connections) == 1
    events = connections[0]
    if sslmode == "prefer":
        assert pw.SSLRequest() in events  # answered N, then startup continued in clear text
    startup = events[-1]
    assert isinstance(startup, pw.StartupMessage)
    assert startup.user == "alice"
    assert startup.database == "appdb"
    assert startup.parameters["application_name"] == "psql"
    assert startup.protocol_version == pw.PROTOCOL_3_0


@pytest.mark.pg
def test_psql_through_a_minimal_gateway(psql: str, pg_address: tuple[str, int]) -> None:
    """psql -> ServerConnection | ClientConnection -> PostgreSQL, then a raw relay: the switch works."""

    def gateway(conn: pw.ServerConnection, event: pw.FrontendEvent, client: socket.socket) -> bytes:
        assert isinstance(event, pw.StartupMessage)
        params = {"user": "postgres", "database": "postgres"}
        params["application_name"] = event.parameters.get("application_name", "")
        backend, upstream, events = backend_login(pg_address, params)
        with backend:
            assert upstream.phase is pw.Phase.SWITCHED
            out = conn.send(pw.AuthenticationOk())
            out += b"".join(conn.send(e) for e in events if isinstance(e, pw.ParameterStatus))
            out += conn.send(pw.BackendKeyData(1, b"gw!!"))  # the gateway's own key
            out += conn.send(pw.ReadyForQuery(upstream.transaction_status or "I"))
            client.sendall(out)
            backend.sendall(conn.trailing_data)
            relay(client, backend)
        return b""

    conninfo = "host=127.0.0.1 port={port} user=alice dbname=appdb sslmode=disable connect_timeout=5"
    _, result = run_psql(psql, conninfo, gateway, "-At")
    assert result.returncode == 0, result
    assert result.stdout.strip() == "1"


def relay(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes."""
    with selectors.DefaultSelector() as sel:
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b, selectors.EVENT_READ, a)
        while True:
            for key, _ in sel.select(IO_TIMEOUT):
                src = key.fileobj
                assert isinstance(src, socket.socket)
                data = src.recv(65536)
                if not data:
                    return
                key.data.sendall(data)


def test_plaintext_pipelined_behind_ssl_request_over_a_socket() -> None:
    """CVE-2021-23214 over a real socket: SSLRequest + StartupMessage in one segment."""
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname(), timeout=IO_TIMEOUT) as client:
        client.sendall(pw.SSLRequest().encode() + pw.StartupMessage({"user": "mallory"}).encode())
        server_sock, _ = listener.accept()
        with server_sock:
            server_sock.settimeout(IO_TIMEOUT)
            conn = pw.ServerConnection()
            while (event := conn.next_event()) is pw.NEED_DATA:
                conn.receive_data(server_sock.recv(65536))
            assert event == pw.SSLRequest()
            # Read whatever else has arrived, as the asyncio shell does before start_tls.
            time.sleep(0.05)
            server_sock.setblocking(False)
            try:
                conn.receive_data(server_sock.recv(65536))
            except BlockingIOError:
                pass
            server_sock.setblocking(True)
            server_sock.sendall(conn.send(pw.SSLResponse(True)))
            assert conn.trailing_data  # the shell refuses to start TLS
            with pytest.raises(RemoteProtocolError) as info:
                conn.next_event()
            server_sock.sendall(conn.send(pw.ErrorResponse.fatal(info.value.sqlstate, str(info.value))))
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
        assert answer[:1] == b"S"
        error = pw.ErrorResponse.parse(answer[6:])
        assert (error.code, error.message) == ("08P01", "received unencrypted data after SSL request")
