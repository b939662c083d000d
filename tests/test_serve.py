"""``ferryman serve`` as a real process: SIGHUP reloads, SIGTERM drains, a second signal forces."""

import asyncio
import contextlib
import json
import os
import signal
import ssl
import struct
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trustme

from tests.support.gateway import (
    EchoServer,
    GatewayFiles,
    connect,
    free_port,
    grant,
    refused,
    roundtrip,
    wait_for,
)
from tests.support.pgcluster import PgCluster, pg_cluster_factory  # noqa: F401 - fixture


class Served:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[dict[str, object]] = []
        self.not_json: list[bytes] = []
        """Lines of standard error that are not one JSON object (README: there are none)."""
        self.stdout = bytearray()
        self._pump = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        out = asyncio.ensure_future(self._read_stdout())
        while line := await self.proc.stderr.readline():
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                self.not_json.append(line)
                record = {"msg": line.decode(errors="replace")}
            self.lines.append(record)
        await out

    async def _read_stdout(self) -> None:
        if self.proc.stdout is not None:
            while chunk := await self.proc.stdout.read(65536):
                self.stdout += chunk

    def logged(self, text: str) -> bool:
        return any(text in str(line.get("msg", "")) for line in self.lines)

    async def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 10) -> int:
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            await self._pump
        return code


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator:
    procs: list[Served] = []

    async def start(
        files: GatewayFiles, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
    ) -> Served:
        files.write()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ferryman",
            "serve",
            "-c",
            str(files.config_path),
            *args,
            stderr=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
        served = Served(proc)
        procs.append(served)
        await wait_for(lambda: served.logged("ferryman started") or proc.returncode is not None, timeout=15)
        assert proc.returncode is None, served.lines
        return served

    yield start
    for served in procs:
        if served.proc.returncode is None:
            served.proc.kill()
            await served.proc.wait()


async def test_sighup_applies_listener_changes_without_touching_other_connections(
    tmp_path: Path, serve
) -> None:
    files = GatewayFiles(tmp_path)
    async with EchoServer() as echo:
        stay = files.add_listener("stay", echo.address)
        gone = files.add_listener("gone", echo.address)
        moved_old = files.add_listener("moved", echo.address)
        files.grants.append(grant({"stay": {}, "gone": {}, "moved": {}, "new": {}}))
        served = await serve(files)
        long_lived = await connect(stay)
        on_moved = await connect(moved_old)
        assert await roundtrip(gone) == b"ping"

        moved_new = free_port()
        files.listeners = [item for item in files.listeners if item["name"] != "gone"]
        files.listeners[-1]["listen"] = f"127.0.0.1:{moved_new}"
        new = files.add_listener("new", echo.address)
        files.write()
        await served.signal(signal.SIGHUP)
        await wait_for(lambda: served.logged("configuration reloaded"))

        assert await roundtrip(new) == b"ping"  # new listener started
        assert await roundtrip(moved_new) == b"ping"  # changed listener rebound
        with pytest.raises(OSError):
            await connect(moved_old)
        with pytest.raises(OSError):
            await connect(gone)  # removed listener stopped
        for reader, writer in (long_lived, on_moved):  # unrelated and rebound connections untouched
            writer.write(b"still alive")
            assert await reader.readexactly(11) == b"still alive"
            writer.close()
        await served.signal(signal.SIGTERM)
        assert await served.wait() == 0


async def test_sighup_with_broken_file_keeps_running_config(tmp_path: Path, serve) -> None:
    files = GatewayFiles(tmp_path)
    async with EchoServer() as echo:
        port = files.add_listener("echo", echo.address)
        files.grants.append(grant({"echo": {}}))
        served = await serve(files)
        held = await connect(port)
        files.config_path.write_text(files.config_path.read_text() + '\nbakend = "oops"\n')
        await served.signal(signal.SIGHUP)
        await wait_for(lambda: served.logged("reload failed, keeping the running configuration"))
        message = next(str(line["msg"]) for line in served.lines if "reload failed" in str(line["msg"]))
        assert "ferryman.toml:" in message and "bakend: unknown key" in message
        assert await roundtrip(port) == b"ping"
        held[1].write(b"ok")
        assert await held[0].readexactly(2) == b"ok"

        # A broken policy file is refused the same way: grants stay as they were.
        files.write()
        files.policy_path.write_text("{ not json")
        await served.signal(signal.SIGHUP)
        await wait_for(lambda: sum("reload failed" in str(line.get("msg")) for line in served.lines) == 2)
        assert await roundtrip(port) == b"ping"
        held[1].close()
        await served.signal(signal.SIGTERM)
        assert await served.wait() == 0


async def test_sighup_with_client_auth_but_no_tls_keeps_running_config(tmp_path: Path, serve) -> None:
    """``client_auth`` on a listener that terminates no TLS is a configuration error: a reload
    with it is refused as a whole (the listener it also adds does not start) and names the line."""
    files = GatewayFiles(tmp_path)
    async with EchoServer() as echo:
        port = files.add_listener("echo", echo.address)
        files.grants.append(grant({"echo": {}, "new": {}}))
        served = await serve(files)
        held = await connect(port)
        files.listeners[0].update(client_auth="need", client_ca_file="clients-ca.pem")
        new = files.add_listener("new", echo.address)
        number = files.write().read_text().splitlines().index('client_auth = "need"') + 1
        await served.signal(signal.SIGHUP)
        await wait_for(lambda: served.logged("reload failed, keeping the running configuration"))
        message = next(str(line["msg"]) for line in served.lines if "reload failed" in str(line["msg"]))
        assert f'ferryman.toml:{number}: listeners[0].client_auth: "need" needs tls = "enabled"' in message
        with pytest.raises(OSError):
            await connect(new)
        assert await roundtrip(port) == b"ping"
        held[1].write(b"ok")
        assert await held[0].readexactly(2) == b"ok"
        held[1].close()
        await served.signal(signal.SIGTERM)
        assert await served.wait() == 0


async def test_sighup_reload_refuses_busy_port_atomically(tmp_path: Path, serve) -> None:
    files = GatewayFiles(tmp_path)
    async with EchoServer() as echo:
        port = files.add_listener("echo", echo.address)
        files.grants.append(grant({"echo": {}}))
        served = await serve(files)
        files.add_listener("busy", echo.address, port=echo.port)  # the echo server holds this port
        files.write()
        await served.signal(signal.SIGHUP)
        await wait_for(lambda: served.logged("reload failed"))
        assert await roundtrip(port) == b"ping"
        await served.signal(signal.SIGTERM)
        assert await served.wait() == 0


async def test_sigterm_drains_and_second_signal_forces_exit(tmp_path: Path, serve) -> None:
    files = GatewayFiles(tmp_path)
    async with EchoServer() as echo:
        port = files.add_listener("echo", echo.address)
        files.grants.append(grant({"echo": {}}))
        files.extra = ""
        served = await serve(files)
        text = files.config_path.read_text().replace('grace = "2s"', 'grace = "60s"')
        files.config_path.write_text(text)
        await served.signal(signal.SIGHUP)
        await wait_for(lambda: served.logged("configuration reloaded"))
        reader, writer = await connect(port)
        writer.write(b"x")
        await reader.readexactly(1)
        await served.signal(signal.SIGTERM)
        await wait_for(lambda: served.logged("draining 1 connection"))
        assert await refused_or_unreachable(port)
        writer.write(b"during drain")
        assert await reader.readexactly(12) == b"during drain"
        await served.signal(signal.SIGINT)  # second signal: don't wait 60s
        assert await served.wait(timeout=10) == 0
        assert await reader.read() == b""
        writer.close()
    assert served.logged("second stop signal")
    (close,) = files.closes()
    assert close["reason"] == "shutdown"


async def refused_or_unreachable(port: int) -> bool:
    try:
        return await refused(port)
    except OSError:
        return True


class RefusingPostgres:
    """A stand-in PostgreSQL server that makes the gateway use its admin password and then
    refuses it: it asks for the password in cleartext (so it crosses the wire and is recorded
    here), refuses the first ``refuse_logins`` logins (28P01, as a wrong password would be),
    lets later ones in and refuses every statement (42501). Enough for libpq and psycopg."""

    def __init__(self, refuse_logins: int = 1) -> None:
        self.refuse_logins = refuse_logins
        self.passwords: list[str] = []
        self.queries = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> "RefusingPostgres":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @staticmethod
    def _message(kind: bytes, body: bytes) -> bytes:
        return kind + struct.pack("!I", len(body) + 4) + body

    def _error(self, severity: str, code: str, text: str) -> bytes:
        fields = [
            b"S" + severity.encode(),
            b"V" + severity.encode(),
            b"C" + code.encode(),
            b"M" + text.encode(),
        ]
        return self._message(b"E", b"".join(f + b"\0" for f in fields) + b"\0")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # SSLRequest / GSSENCRequest -> "N", until the StartupMessage
                (length,) = struct.unpack("!I", await reader.readexactly(4))
                body = await reader.readexactly(length - 4)
                if struct.unpack("!I", body[:4])[0] not in (80877103, 80877104):
                    break
                writer.write(b"N")
                await writer.drain()
            writer.write(self._message(b"R", struct.pack("!I", 3)))  # AuthenticationCleartextPassword
            await writer.drain()
            kind, (length,) = await reader.readexactly(1), struct.unpack("!I", await reader.readexactly(4))
            assert kind == b"p"
            self.passwords.append((await reader.readexactly(length - 4)).rstrip(b"\0").decode())
            if len(self.passwords) <= self.refuse_logins:
                writer.write(self._error("FATAL", "28P01", "password authentication failed (test backend)"))
                return
            writer.write(self._message(b"R", struct.pack("!I", 0)))  # AuthenticationOk
            for name, value in (("server_version", "16.0"), ("client_encoding", "UTF8")):
                writer.write(self._message(b"S", f"{name}\0{value}\0".encode()))
            writer.write(self._message(b"K", struct.pack("!II", 4242, 1)))
            writer.write(self._message(b"Z", b"I"))
            await writer.drain()
            while True:  # each query (simple, or extended up to Sync) is refused
                kind, (length,) = (
                    await reader.readexactly(1),
                    struct.unpack("!I", await reader.readexactly(4)),
                )
                await reader.readexactly(length - 4)
                if kind == b"X":
                    return
                if kind in (b"Q", b"S"):
                    self.queries += 1
                    writer.write(self._error("ERROR", "42501", "permission denied by the test backend"))
                    writer.write(self._message(b"Z", b"I"))
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def startup_message(**params: str) -> bytes:
    body = struct.pack("!I", 196608) + b"".join(f"{k}\0{v}\0".encode() for k, v in params.items()) + b"\0"
    return struct.pack("!I", len(body) + 4) + body


async def test_secrets_never_reach_the_log(tmp_path: Path, serve) -> None:
    """Secrets given as ${VAR} that the gateway really uses -- a PostgreSQL listener's admin
    password, sent to a backend that refuses it and then refuses the gateway's statements --
    appear nowhere in what the gateway writes (log at debug level, stdout, audit), while the
    failures themselves are logged with their details."""
    password = "pw-9d41c7-secret"
    token = "tok-7f3a9c-secret"
    files = GatewayFiles(tmp_path)
    files.extra = f'[admin]\nlisten = "127.0.0.1:{free_port()}"\ntoken = "${{FERRYMAN_ADMIN_TOKEN}}"\n'
    async with RefusingPostgres() as backend:
        port = free_port()
        files.listeners.append(
            {
                "name": "pg-secret",
                "listen": f"127.0.0.1:{port}",
                "mode": "postgres",
                "backend": backend.address,
            }
        )
        files.extra += (
            '[listeners.postgres]\nadmin_user = "ferryman_admin"\n'
            'admin_password = "${PG_ADMIN_PASSWORD}"\nadmin_database = "postgres"\n'
        )
        files.grants.append(grant({"pg-secret": {"pg": {"databases": {"*": {"permissions": ["readonly"]}}}}}))
        served = await serve(files, env={"FERRYMAN_ADMIN_TOKEN": token, "PG_ADMIN_PASSWORD": password})
        # Sooner or later (at start, or for the first connection) the gateway logs in as its
        # admin, and the backend refuses the password.
        reader, writer = await connect(port)
        writer.write(startup_message(user="dev", database="appdb"))
        async with asyncio.timeout(15):
            first = await reader.read()
        writer.close()
        await wait_for(lambda: served.logged("password authentication failed (test backend)"), timeout=15)
        # The next attempt logs in, and the backend refuses the gateway's statements.
        reader, writer = await connect(port)
        writer.write(startup_message(user="dev", database="appdb"))
        async with asyncio.timeout(15):
            second = await reader.read()
        writer.close()
        await served.signal(signal.SIGHUP)
        await wait_for(lambda: served.logged("configuration reloaded"))
        await served.signal(signal.SIGTERM)
        assert await served.wait() == 0
    # The secret was used: expanded from the environment and sent to the backend at each login.
    assert len(backend.passwords) >= 2 and set(backend.passwords) == {password}
    assert backend.queries >= 1
    for reply in (first, second):  # each client was refused with a FATAL ErrorResponse
        assert reply[:1] == b"E" and b"SFATAL\0" in reply, reply
    log = json.dumps(served.lines)
    written = {
        "log": log,
        "stdout": served.stdout.decode(errors="replace"),
        "audit": files.audit_path.read_text(),
        "replies to clients": (first + second).decode(errors="replace"),
    }
    # The failures are in the log with their details (so a password in them would be too).
    assert "password authentication failed (test backend)" in log
    assert "permission denied by the test backend" in log
    assert "pg-secret" in log and backend.address in log
    assert "pg-secret" in written["audit"]
    for name, text in written.items():
        assert password not in text, name
        assert token not in text, name


async def test_serve_without_config_runs_on_defaults() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ferryman", "serve", stderr=asyncio.subprocess.PIPE
    )
    served = Served(proc)
    await wait_for(lambda: served.logged("ferryman started"), timeout=15)
    assert served.logged("embedded defaults")
    await served.signal(signal.SIGTERM)
    assert await served.wait() == 0


async def test_serve_with_invalid_config_exits_2(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("[[listeners]]\nname = 1\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ferryman",
        "serve",
        "-c",
        str(tmp_path / "bad.toml"),
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(15):
        _, err = await proc.communicate()
    assert proc.returncode == 2
    assert b"bad.toml:2: listeners[0].name" in err


def _pipes(pid: int) -> int:
    fds = Path(f"/proc/{pid}/fd")
    return sum(1 for fd in fds.iterdir() if os.readlink(fd).startswith("pipe:"))


@pytest.mark.skipif(not hasattr(os, "splice"), reason="needs splice(2)")
@pytest.mark.parametrize("args", [(), ("--no-splice",), ("--splice",)])
async def test_bulk_data_is_copied_unless_splice_is_asked_for(
    tmp_path: Path, serve, args: tuple[str, ...]
) -> None:
    files = GatewayFiles(tmp_path)
    async with EchoServer() as echo:
        port = files.add_listener("bulk", echo.address)
        files.grants.append(grant({"bulk": {}}))
        served = await serve(files, args=args)
        before = _pipes(served.proc.pid)
        reader, writer = await connect(port)
        payload = os.urandom(4 * 1024 * 1024)
        writer.write(payload)
        async with asyncio.timeout(10):
            assert await reader.readexactly(len(payload)) == payload
        # Still connected: a spliced direction keeps its pipe until the connection ends.
        during = _pipes(served.proc.pid) - before
        writer.close()
        await served.signal(signal.SIGTERM)
        assert await served.wait() == 0
    # A pipe is two descriptors; each direction that moved bulk data has one.
    assert during >= 2 if args == ("--splice",) else during == 0


# --- the log format: every line on standard error is one JSON object -------------------------


class Hop:
    """A TCP relay in front of a backend that can be cut: live connections aborted, new ones
    refused (the backend "goes away" under the gateway)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.transports: list[asyncio.BaseTransport] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> "Hop":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()

    def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for transport in self.transports:
            transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.transports += [writer.transport, up_writer.transport]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@pytest.fixture(scope="session")
def pg_cluster(pg_cluster_factory: Callable[..., PgCluster]) -> PgCluster:  # noqa: F811
    return pg_cluster_factory("default")


@pytest.mark.pg
async def test_library_warnings_are_json_lines(tmp_path: Path, serve, pg_cluster: PgCluster) -> None:
    """psycopg_pool's warnings when the provisioning backend goes away ("error connecting in
    'ferryman-provision-admin'", "reconnection attempt ... failed") come out as JSON records of
    their own logger, not as bare text from logging's last-resort handler."""
    files = GatewayFiles(tmp_path)
    async with Hop(pg_cluster.host, pg_cluster.port) as hop:
        port = files.add_listener(
            "pg",
            f"127.0.0.1:{hop.port}",
            mode="postgres",
            dial_timeout="2s",
            postgres={"admin_user": pg_cluster.superuser, "admin_database": "postgres"},
        )
        files.grants.append(grant({"pg": {"pg": {"databases": {"*": {"permissions": ["readonly"]}}}}}))
        served = await serve(files)
        await wait_for(lambda: served.logged("provisioning on"), timeout=15)  # admin pool is open
        hop.cut()
        reader, writer = await connect(port)
        writer.write(startup_message(user="dev", database="postgres"))
        async with asyncio.timeout(15):
            reply = await reader.read()
        writer.close()
        assert reply[:1] == b"E" and b"C08006\0" in reply, reply
        await wait_for(lambda: any(line.get("logger") == "psycopg.pool" for line in served.lines), timeout=15)
        await served.signal(signal.SIGTERM)
        assert await served.wait() == 0
    assert served.not_json == []
    pool = [line for line in served.lines if line.get("logger") == "psycopg.pool"]
    assert all(line["level"] == "warning" and "ts" in line for line in pool), pool
    assert any("ferryman-provision-admin" in str(line["msg"]) for line in pool), pool


async def test_tls_close_leaves_no_plain_text_on_stderr(tmp_path: Path, serve) -> None:
    """A TLS client ending its connection with close_notify: whatever the event loop has to
    say about it (asyncio's "returning true from eof_received() has no effect when using ssl",
    logged by the relay's half-close on a TLS transport) is a JSON record too."""
    ca = trustme.CA()
    cert = ca.issue_cert("tls.test")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    files = GatewayFiles(tmp_path)
    async with EchoServer() as echo:
        port = files.add_listener(
            "tls",
            echo.address,
            tls="enabled",
            cert_file=str(tmp_path / "cert.pem"),
            key_file=str(tmp_path / "key.pem"),
        )
        files.grants.append(grant({"tls": {}}))
        served = await serve(files)
        for _ in range(2):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname="tls.test"
            )
            writer.write(b"ping")
            async with asyncio.timeout(10):
                assert await reader.readexactly(4) == b"ping"
            writer.close()  # close_notify, then the TCP close
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await wait_for(lambda: len(files.closes()) >= 2, timeout=10)
        await served.signal(signal.SIGTERM)
        assert await served.wait() == 0
    assert served.not_json == []
    assert all({"ts", "level", "logger", "msg"} <= line.keys() for line in served.lines)


LOG_SETUP_SCRIPT = """
import gc, logging, sys, threading, warnings
from ferryman import logs

logs.setup(sys.argv[1], sys.argv[2])
logging.getLogger("psycopg.pool").warning("error connecting in %r: %s", "ferryman-provision-db-0", "boom")
logging.getLogger("psycopg.pool").info("third-party info: hidden")
logging.getLogger("asyncio").debug("third-party debug: hidden")
logging.getLogger("ferryman.proxy").debug("ferryman debug")
logging.getLogger("aiohttp.server").warning("bad args %d", "not a number")
class Unprintable:
    def __str__(self):
        raise RuntimeError("no str")
    __repr__ = __str__
logging.getLogger("ferryman.x").warning("odd extra", extra={"thing": Unprintable()})
logging.getLogger("ferryman.x").warning("an object %s", Unprintable())
warnings.warn("a python warning")
t = threading.Thread(target=lambda: 1 / 0, name="worker")
t.start(); t.join()
class Broken:
    def __del__(self):
        raise ValueError("in __del__")
Broken(); gc.collect()
raise SystemError("uncaught at the top")
"""


@pytest.mark.parametrize("level", ["debug", "info"])
async def test_log_setup_formats_every_record_as_json(level: str) -> None:
    """``logs.setup`` as the CLI calls it: other libraries' records (warning and above, also at
    debug), unformattable records, Python warnings and uncaught exceptions (top level, thread,
    ``__del__``) are each one JSON line; nothing else reaches standard error."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LOG_SETUP_SCRIPT, level, "json", stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(30):
        _, err = await proc.communicate()
    assert proc.returncode == 1
    lines = err.decode().splitlines()
    records = [json.loads(line) for line in lines]
    assert all(isinstance(r, dict) and {"ts", "level", "logger", "msg"} <= r.keys() for r in records)
    by_logger = {r["logger"]: r for r in records}
    assert by_logger["psycopg.pool"]["msg"] == "error connecting in 'ferryman-provision-db-0': boom"
    assert not any("hidden" in r["msg"] for r in records)
    assert ("ferryman.proxy" in by_logger) == (level == "debug")
    assert "unformattable log record" in by_logger["aiohttp.server"]["msg"]
    odd = [r for r in records if r["logger"] == "ferryman.x"]
    assert len(odd) == 2 and "repr failed" in odd[0]["thing"] and "repr failed" in odd[1]["msg"]
    assert "a python warning" in by_logger["py.warnings"]["msg"]
    messages = "\n".join(r["msg"] + r.get("exc", "") for r in records if r["logger"] == "ferryman")
    for expected in ("thread worker", "ZeroDivisionError", "in __del__", "uncaught exception", "SystemError"):
        assert expected in messages, messages
    assert "Logging error" not in err.decode()


async def test_log_setup_text_format_never_prints_logging_errors() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LOG_SETUP_SCRIPT, "info", "text", stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(30):
        _, err = await proc.communicate()
    text = err.decode()
    assert "--- Logging error ---" not in text
    assert "WARNING psycopg.pool: error connecting in 'ferryman-provision-db-0': boom" in text
    assert "unformattable log record" in text
