"""TCP mode end to end: a real gateway on loopback, real clients, real backends (SPEC §4)."""

import asyncio
import contextlib
import logging
import os
import shutil
import socket
from pathlib import Path

import pytest

from ferryman.app import Gateway
from tests.support.gateway import (
    EchoServer,
    GatewayFiles,
    connect,
    free_port,
    grant,
    read_until_closed,
    refused,
    roundtrip,
    running_gateway,
    started_gateway,
    wait_for,
)


@pytest.fixture
def files(tmp_path: Path) -> GatewayFiles:
    return GatewayFiles(tmp_path)


async def run(*argv: str, stdin: bytes | None = None, timeout: float = 20) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate(stdin)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-cli not installed")
async def test_redis_cli_through_gateway(files: GatewayFiles) -> None:
    port = files.add_listener("redis", "127.0.0.1:6379")
    files.grants.append(grant({"redis": {}}, src=["group:dev"]))
    async with running_gateway(files):
        code, out, err = await run(
            "redis-cli", "-p", str(port), "SET", "ferryman:test", "through the gateway"
        )
        assert (code, out.strip()) == (0, "OK"), err
        code, out, _ = await run("redis-cli", "-p", str(port), "GET", "ferryman:test")
        assert out.strip() == "through the gateway"
        # A pipelined batch: many commands in, many replies out, over one connection.
        batch = b"".join(b"INCR ferryman:counter\r\n" for _ in range(1000))
        code, out, _ = await run("redis-cli", "-p", str(port), "--pipe", stdin=batch)
        assert code == 0 and "replies: 1000" in out
        await wait_for(lambda: len(files.closes()) == 3)
    closes = files.closes()
    assert {c["user"] for c in closes} == {"dev@localhost"}
    assert all(c["reason"] == "normal" and c["bytes_up"] > 0 and c["bytes_down"] > 0 for c in closes)


@pytest.mark.skipif(shutil.which("mariadb") is None, reason="mariadb client not installed")
async def test_mariadb_client_through_gateway(files: GatewayFiles) -> None:
    port = files.add_listener("maria", "127.0.0.1:3306")
    files.grants.append(grant({"maria": {}}))
    async with running_gateway(files):
        code, out, err = await run(
            "mariadb",
            "-h",
            "127.0.0.1",
            "-P",
            str(port),
            "-u",
            "root",
            "--batch",
            "-e",
            "SELECT 6*7 AS answer; SELECT REPEAT('x', 100000) AS big;",
        )
        assert code == 0, err
        assert "answer\n42" in out
        assert "x" * 100000 in out


async def test_audit_record_fields(files: GatewayFiles) -> None:
    async with EchoServer() as echo:
        port = files.add_listener("echo", echo.address)
        files.grants.append(grant({"echo": {}}))
        async with running_gateway(files):
            assert await roundtrip(port, b"x" * 1234) == b"x" * 1234
            await wait_for(files.closes)
    decision, close = files.audit()
    assert decision["event"] == "decision" and decision["allowed"] is True
    assert decision["id"] == close["id"]
    for key in (
        "id",
        "listener",
        "user",
        "node",
        "source",
        "backend",
        "bytes_up",
        "bytes_down",
        "duration",
        "reason",
        "closed_by",
    ):
        assert key in close, key
    assert close["listener"] == "echo"
    assert close["backend"] == echo.address
    assert close["source"].startswith("127.0.0.1:")
    assert (close["bytes_up"], close["bytes_down"]) == (1234, 1234)
    assert close["closed_by"] == "client"


async def test_no_grant_is_refused_without_a_byte(files: GatewayFiles) -> None:
    async with EchoServer() as echo:
        port = files.add_listener("echo", echo.address)
        files.grants.append(grant({"something-else": {}}))
        async with running_gateway(files):
            assert await refused(port)
            await wait_for(files.audit)
        assert echo.connections == 0
    (record,) = files.audit()
    assert record["allowed"] is False
    assert "no grant" in record["reason"]


async def test_no_identity_is_refused(files: GatewayFiles) -> None:
    files.static = [{"cidr": "10.0.0.0/8", "user": "elsewhere"}]
    async with EchoServer() as echo:
        port = files.add_listener("echo", echo.address)
        files.grants.append(grant({"echo": {}}))
        async with running_gateway(files):
            assert await refused(port)
            await wait_for(files.audit)
    assert "no identity" in files.audit()[0]["reason"]


async def test_backend_down_closes_client_promptly(files: GatewayFiles) -> None:
    dead = free_port()
    port = files.add_listener("dead", f"127.0.0.1:{dead}")
    files.grants.append(grant({"dead": {}}))
    async with running_gateway(files):
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await refused(port)
        assert loop.time() - started < 2
        await wait_for(files.closes)
    (close,) = files.closes()
    assert close["reason"] == "backend_error"
    assert "cannot connect" in close["detail"]


async def test_dial_timeout_is_bounded(files: GatewayFiles) -> None:
    # A listening socket with a full backlog never completes the handshake (psycopg's deaf_listen).
    deaf = socket.socket()
    deaf.bind(("127.0.0.1", 0))
    deaf.listen(0)
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(deaf.getsockname())
        except BlockingIOError:
            pass
        fillers.append(s)
    port = files.add_listener("deaf", f"127.0.0.1:{deaf.getsockname()[1]}", dial_timeout="300ms")
    files.grants.append(grant({"deaf": {}}))
    try:
        async with running_gateway(files):
            assert await refused(port, timeout=5)
            await wait_for(files.closes)
        assert "timed out" in files.closes()[0]["detail"]
    finally:
        for s in [deaf, *fillers]:
            s.close()


async def test_half_close_through_gateway(files: GatewayFiles) -> None:
    async with EchoServer(mode="after_eof") as server:
        port = files.add_listener("halfclose", server.address)
        files.grants.append(grant({"halfclose": {}}))
        async with running_gateway(files):
            reader, writer = await connect(port)
            writer.write(b"request")
            writer.write_eof()  # the client is done talking, but still listening
            async with asyncio.timeout(5):
                reply = await reader.read()
            writer.close()
    assert reply == b"reply:request" * 50


def epoll_sets() -> int:
    """How many epoll sets this process has open."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += "eventpoll" in os.readlink(f"/proc/self/fd/{name}")
    return count


async def test_shutdown_closes_the_relays_epoll_set(files: GatewayFiles) -> None:
    """The relays' epoll set (one per event loop, made by the first relay) is closed when the
    gateway stops and watches nothing any more: a stopped gateway leaves no descriptor."""
    before = epoll_sets()
    async with EchoServer() as server:
        port = files.add_listener("echo", server.address)
        files.grants.append(grant({"echo": {}}))
        async with running_gateway(files):
            reader, writer = await connect(port)
            writer.write(b"ping")
            async with asyncio.timeout(5):
                assert await reader.readexactly(4) == b"ping"
            assert epoll_sets() == before + 1
            writer.close()
    assert epoll_sets() == before


async def test_max_conns_per_user_across_listeners(files: GatewayFiles) -> None:
    async with EchoServer() as echo:
        a = files.add_listener("a", echo.address)
        b = files.add_listener("b", echo.address)
        files.grants.append(grant({"a": {}, "b": {}}, limits={"max_conns": 2}))
        async with running_gateway(files) as gw:
            c1 = await connect(a)
            c2 = await connect(b)
            await wait_for(lambda: len(gw.runtime.sessions) == 2)
            assert await refused(a)
            assert await refused(b)
            c1[1].close()
            await wait_for(lambda: len(gw.runtime.sessions) == 1)
            assert await roundtrip(b) == b"ping"
            c2[1].close()
    refusals = [r for r in files.audit() if r["event"] == "decision" and not r["allowed"]]
    assert [r["limit"] for r in refusals] == ["max_conns", "max_conns"]
    assert all("53300" not in r["reason"] for r in refusals)


async def test_max_conns_per_listener(files: GatewayFiles, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ferryman")
    async with EchoServer() as echo:
        a = files.add_listener("a", echo.address)
        b = files.add_listener("b", echo.address)
        files.grants.append(grant({"a": {"limits": {"max_conns": 1}}, "b": {}}))
        async with running_gateway(files) as gw:
            held = await connect(a)
            await wait_for(lambda: len(gw.runtime.sessions) == 1)
            assert await refused(a)
            assert await roundtrip(b) == b"ping"  # other listener unaffected
            held[1].close()
            await wait_for(lambda: not gw.runtime.sessions)
            assert await roundtrip(a) == b"ping"  # the slot is free again
            await wait_for(lambda: len(files.closes()) == 3)
        assert echo.connections == 3  # the refused connection never reached the backend
    # "Each refusal or cut is logged and audited with its limit."
    (refusal,) = [r for r in files.audit() if r["event"] == "decision" and not r["allowed"]]
    assert (refusal["listener"], refusal["user"], refusal["outcome"]) == ("a", "dev@localhost", "limit")
    assert refusal["limit"] == "max_conns"
    assert refusal["reason"] == "max_conns: 1 concurrent connections to a"
    assert "53300" not in refusal["reason"]
    assert any(
        r.getMessage().startswith("refused 127.0.0.1:")
        and r.getMessage().endswith(f"on a: {refusal['reason']}")
        for r in caplog.records
    )
    assert all(c["reason"] == "normal" for c in files.closes())


async def test_max_bytes_per_conn_cuts_connection(files: GatewayFiles) -> None:
    async with EchoServer() as echo:
        port = files.add_listener("echo", echo.address)
        files.grants.append(grant({"echo": {}}, limits={"max_bytes_per_conn": "10KiB"}))
        async with running_gateway(files):
            reader, writer = await connect(port)
            writer.write(b"a" * 4000)
            assert await reader.readexactly(4000) == b"a" * 4000  # 8000 of 10240 used
            writer.write(b"b" * 4000)
            rest = await read_until_closed(reader)  # cut: at most the remaining budget came back
            writer.close()
            await wait_for(files.closes)
    (close,) = files.closes()
    assert (close["reason"], close["limit"]) == ("limit", "max_bytes_per_conn")
    assert close["bytes_up"] + close["bytes_down"] == 10240
    assert len(rest) < 4000


async def test_max_conn_duration_cuts_idle_connection(files: GatewayFiles) -> None:
    async with EchoServer() as echo:
        port = files.add_listener("echo", echo.address)
        files.grants.append(grant({"echo": {}}, limits={"max_conn_duration": "400ms"}))
        async with running_gateway(files):
            reader, writer = await connect(port)
            async with asyncio.timeout(5):
                assert await reader.read() == b""  # never sent anything; the timer still fires
            writer.close()
            await wait_for(files.closes)
    (close,) = files.closes()
    assert (close["reason"], close["limit"]) == ("limit", "max_conn_duration")
    assert 0.35 < close["duration"] < 3


async def test_bandwidth_window_cuts_and_refuses(files: GatewayFiles) -> None:
    async with EchoServer() as echo:
        port = files.add_listener("echo", echo.address)
        files.grants.append(grant({"echo": {}}, limits={"bandwidth": [{"bytes": "64KiB", "period": "1h"}]}))
        async with running_gateway(files):
            reader, writer = await connect(port)
            writer.write(b"z" * 20000)
            await reader.readexactly(20000)  # 40000 of 65536 used
            writer.write(b"z" * 20000)
            await read_until_closed(reader)
            writer.close()
            await wait_for(files.closes)
            assert await refused(port)  # the window is still full: new connections refused
            await wait_for(lambda: len(files.audit()) == 3)
    close = files.closes()[0]
    assert (close["reason"], close["limit"]) == ("limit", "bandwidth")
    assert files.audit()[-1]["limit"] == "bandwidth"


async def test_idle_timeout(files: GatewayFiles) -> None:
    async with EchoServer() as echo:
        port = files.add_listener("echo", echo.address, idle_timeout="300ms")
        files.grants.append(grant({"echo": {}}))
        async with running_gateway(files):
            reader, writer = await connect(port)
            for _ in range(4):  # traffic keeps it alive past the timeout
                await asyncio.sleep(0.15)
                writer.write(b"k")
                await reader.readexactly(1)
            async with asyncio.timeout(5):
                assert await reader.read() == b""
            writer.close()
            await wait_for(files.closes)
    (close,) = files.closes()
    assert close["reason"] == "idle"
    assert close["duration"] > 0.6


async def test_revalidation_closes_connection_when_policy_file_changes(files: GatewayFiles) -> None:
    files.revalidation = "200ms"
    async with EchoServer() as echo:
        keep = files.add_listener("keep", echo.address)
        lose = files.add_listener("lose", echo.address)
        files.grants.append(grant({"keep": {}, "lose": {}}))
        async with running_gateway(files):
            kept = await connect(keep)
            lost = await connect(lose)
            assert await roundtrip(lose) == b"ping"
            files.grants[:] = [grant({"keep": {}})]
            files.write_policy()
            async with asyncio.timeout(5):
                assert await lost[0].read() == b""
            kept[1].write(b"still here")
            assert await kept[0].readexactly(10) == b"still here"
            assert await refused(lose)
            kept[1].close()
            lost[1].close()
            await wait_for(lambda: any(c["listener"] == "keep" for c in files.closes()))
    revoked = [c for c in files.closes() if c["reason"] == "revoked"]
    assert [c["listener"] for c in revoked] == ["lose"]


async def test_revalidation_closes_connection_whose_identity_changed(files: GatewayFiles) -> None:
    """A reload maps a client address to another user: its live connection, admitted for the
    old user, is closed (``revoked``) even though the new user holds a grant too -- the
    connection is not handed over to someone else. Other addresses keep their connections,
    and a new connection from the remapped address is admitted as the new user."""
    files.revalidation = "200ms"
    moved = ("127.0.0.2", 0)
    async with EchoServer() as echo:
        port = files.add_listener("echo", echo.address)
        files.grants.append(grant({"echo": {}}))  # src "*": both users may use the listener
        async with running_gateway(files) as gateway:
            kept = await connect(port)
            remapped = await asyncio.open_connection("127.0.0.1", port, local_addr=moved)
            for reader, writer in (kept, remapped):
                writer.write(b"hello")
                assert await reader.readexactly(5) == b"hello"
            assert {s.identity.user for s in gateway.runtime.sessions} == {"dev@localhost"}

            files.static.append({"cidr": "127.0.0.2/32", "user": "ops@localhost", "groups": ["ops"]})
            files.write()
            assert await gateway.reload()
            assert await read_until_closed(remapped[0]) == b""
            remapped[1].close()
            kept[1].write(b"still here")  # 127.0.0.1 still maps to the same user
            assert await kept[0].readexactly(10) == b"still here"

            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=moved)
            writer.write(b"again")
            assert await reader.readexactly(5) == b"again"
            writer.close()
            kept[1].close()
            await wait_for(lambda: len(files.closes()) == 3)
    revoked, *others = sorted(files.closes(), key=lambda c: c["reason"] != "revoked")
    assert revoked["reason"] == "revoked" and revoked["closed_by"] == "gateway"
    assert revoked["detail"] == "identity changed from dev@localhost to ops@localhost"
    assert revoked["user"] == "dev@localhost" and revoked["source"].startswith("127.0.0.2:")
    assert revoked["bytes_up"] == revoked["bytes_down"] == 5
    assert sorted((c["reason"], c["user"]) for c in others) == [
        ("normal", "dev@localhost"),
        ("normal", "ops@localhost"),
    ]
    admitted = [r for r in files.audit() if r["event"] == "decision" and r["allowed"]]
    assert [(r["user"], r["source"].split(":")[0]) for r in admitted] == [
        ("dev@localhost", "127.0.0.1"),
        ("dev@localhost", "127.0.0.2"),
        ("ops@localhost", "127.0.0.2"),
    ]


async def test_revalidation_applies_changed_limits(files: GatewayFiles) -> None:
    files.revalidation = "200ms"
    async with EchoServer() as echo:
        port = files.add_listener("echo", echo.address)
        files.grants.append(grant({"echo": {}}))
        async with running_gateway(files):
            reader, writer = await connect(port)
            assert await roundtrip(port) == b"ping"
            files.grants[:] = [grant({"echo": {}}, limits={"max_conn_duration": "1s"})]
            files.write_policy()
            async with asyncio.timeout(5):
                assert await reader.read() == b""
            writer.close()
            await wait_for(lambda: len(files.closes()) == 2)
    assert files.closes()[-1]["limit"] == "max_conn_duration"


async def test_revalidation_adds_a_bandwidth_window_to_a_live_connection(files: GatewayFiles) -> None:
    """A connection admitted without a bandwidth window gets one when the grant changes; the
    bytes it moves from then on are charged (the relay only reports bytes while a window
    applies)."""
    files.revalidation = "200ms"
    async with EchoServer() as echo:
        port = files.add_listener("echo", echo.address)
        files.grants.append(grant({"echo": {}}))
        async with running_gateway(files) as gateway:
            reader, writer = await connect(port)
            writer.write(b"z" * 100_000)  # no window yet: nothing is charged
            await reader.readexactly(100_000)
            window = {"bandwidth": [{"bytes": "64KiB", "period": "1h"}]}
            files.grants[:] = [grant({"echo": {}}, limits=window)]
            files.write_policy()
            await wait_for(lambda: _windowed(gateway), timeout=5)
            writer.write(b"z" * 20_000)
            await reader.readexactly(20_000)  # 40,000 of 65,536 charged
            writer.write(b"z" * 20_000)
            await read_until_closed(reader)
            writer.close()
            await wait_for(files.closes)
    (close,) = files.closes()
    assert (close["reason"], close["limit"]) == ("limit", "bandwidth")
    assert close["bytes_up"] >= 120_000


def _windowed(gateway: Gateway) -> bool:
    """Every live session's re-checked grant has a bandwidth window."""
    sessions = list(gateway.runtime.sessions)
    return bool(sessions) and all(s.auth.connection_limits.bandwidth for s in sessions)


async def test_invalid_policy_change_keeps_old_grants(
    files: GatewayFiles, caplog: pytest.LogCaptureFixture
) -> None:
    files.revalidation = "100ms"
    async with EchoServer() as echo:
        port = files.add_listener("echo", echo.address)
        files.grants.append(grant({"echo": {}}))
        async with running_gateway(files):
            reader, writer = await connect(port)
            files.policy_path.write_text('{"grants": [ broken')
            await asyncio.sleep(0.5)
            writer.write(b"alive")
            assert await reader.readexactly(5) == b"alive"
            assert await roundtrip(port) == b"ping"
            writer.close()
    assert "keeping the previous grants" in caplog.text


async def test_shutdown_drains_then_closes_with_reason(files: GatewayFiles) -> None:
    async with EchoServer() as echo:
        port = files.add_listener("echo", echo.address)
        files.grants.append(grant({"echo": {}}))
        gateway = await started_gateway(files)
        short = await connect(port)
        long = await connect(port)
        await wait_for(lambda: len(gateway.runtime.sessions) == 2)
        stopping = asyncio.ensure_future(gateway.shutdown(grace=1.0))
        await asyncio.sleep(0.2)
        # Draining: no new connections, but live ones keep working.
        with pytest.raises(OSError):
            await connect(port)
        long[1].write(b"during drain")
        assert await long[0].readexactly(12) == b"during drain"
        short[1].close()
        async with asyncio.timeout(5):
            await stopping
            assert await long[0].read() == b""
        long[1].close()
    reasons = sorted((c["reason"], c["closed_by"]) for c in files.closes())
    assert reasons == [("normal", "client"), ("shutdown", "gateway")]
    assert not gateway.listeners
    assert all(t.done() for t in asyncio.all_tasks() if t.get_name().startswith("conn "))


async def test_shutdown_drains_connections_of_a_rebound_listener_and_ends_with_the_last(
    files: GatewayFiles,
) -> None:
    """A relayed connection outlives its listener's task and a reload that moved the listener:
    the drain still waits for it, and ends when it closes, long before the grace period."""
    async with EchoServer() as echo:
        port = files.add_listener("echo", echo.address)
        files.grants.append(grant({"echo": {}}))
        gateway = await started_gateway(files)
        reader, writer = await connect(port)
        await wait_for(lambda: len(gateway.runtime.sessions) == 1)
        files.listeners[0]["listen"] = f"127.0.0.1:{free_port()}"  # moved: the listener rebinds
        files.write()
        assert await gateway.reload()
        assert all(not listener.tasks for listener in gateway.listeners.values())
        stopping = asyncio.ensure_future(gateway.shutdown(grace=60.0))
        await asyncio.sleep(0.2)
        assert not stopping.done()  # draining the connection the new listener never accepted
        writer.write(b"during drain")
        assert await reader.readexactly(12) == b"during drain"
        writer.close()
        async with asyncio.timeout(5):  # not the 60 s grace: the drain ends with the last one
            await stopping
    (close,) = files.closes()
    assert (close["reason"], close["closed_by"], close["bytes_up"]) == ("normal", "client", 12)


async def test_audit_to_stdout_is_json_lines(tmp_path: Path) -> None:
    files = GatewayFiles(tmp_path)
    files.add_listener("x", "127.0.0.1:1")
    files.grants.append(grant({"x": {}}))
    files.write()
    text = files.config_path.read_text().replace(f'file = "{files.audit_path}"', 'file = "-"')
    files.config_path.write_text(text)
    import sys

    code, out, err = await run(
        sys.executable,
        "-c",
        (
            "from ferryman.config.load import load_config; from ferryman.app import Gateway; import asyncio\n"
            "async def main():\n"
            f"  g = Gateway(load_config({str(files.config_path)!r})); await g.start()\n"
            "  g.runtime.audit.write('decision', note='hello'); await g.shutdown(0)\n"
            "asyncio.run(main())\n"
        ),
    )
    assert code == 0, err
    assert '"event":"decision"' in out and '"note":"hello"' in out


async def test_backend_reset_behind_its_last_bytes_ends_a_quiet_connection(files: GatewayFiles) -> None:
    """The backend's reply and its RST arrive together while the client only waits. (uvloop
    reports such a socket to a reader once and then never again; the relay's own epoll set
    does not lose it.) The reply is forwarded, the client's connection ends and the close
    record says backend_error, instead of both sockets being held forever."""
    loop = asyncio.get_running_loop()
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        port = files.add_listener("rst", f"127.0.0.1:{server.getsockname()[1]}")
        files.grants.append(grant({"rst": {}}))
        async with running_gateway(files):
            reader, writer = await connect(port)
            backend, _ = await loop.sock_accept(server)
            await asyncio.sleep(0.1)  # the relay is waiting on both sides
            backend.setblocking(True)
            backend.sendall(b"bye")
            backend.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            backend.close()  # a RST right behind the reply
            async with asyncio.timeout(10):
                assert await read_until_closed(reader) == b"bye"
            writer.close()
            await wait_for(files.closes)
    (close,) = files.closes()
    assert (close["reason"], close["closed_by"], close["bytes_down"]) == ("backend_error", "backend", 3)


async def test_connection_dialling_when_its_listener_is_removed_is_not_relayed(files: GatewayFiles) -> None:
    """A reload removes a listener while one of its connections is still dialling (the
    backend's accept queue is full, so its SYN is dropped and retransmitted). When the dial
    completes, the connection is ended like the listener's sessions were -- reason shutdown,
    one close record -- instead of living on as a session of a listener that is gone."""
    loop = asyncio.get_running_loop()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        server.setblocking(False)
        backend_port = server.getsockname()[1]
        fillers = []
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", backend_port))
            fillers.append(filler)

        async def accept_everything() -> None:
            while True:
                conn, _ = await loop.sock_accept(server)
                conn.close()

        port = files.add_listener("gone", f"127.0.0.1:{backend_port}", dial_timeout="20s")
        files.grants.append(grant({"gone": {}}))
        async with running_gateway(files) as gateway:
            reader, writer = await connect(port)
            await wait_for(lambda: [r for r in files.audit() if r["event"] == "decision"])
            files.listeners.clear()
            files.write()
            assert await gateway.reload()
            # Free the queue for good: the fillers stop retrying, and every arrival is taken,
            # so the gateway's next SYN retransmission completes its dial.
            for filler in fillers:
                filler.close()
            acceptor = asyncio.ensure_future(accept_everything())
            try:
                assert await read_until_closed(reader, timeout=20) == b""
                await wait_for(files.closes)
                assert not list(gateway.runtime.sessions)
            finally:
                writer.close()  # also on failure: a leaked transport would fail later tests
                acceptor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await acceptor
    (close,) = files.closes()
    assert (close["reason"], close["closed_by"]) == ("shutdown", "gateway")
    assert close["detail"] == "listener removed from configuration"
