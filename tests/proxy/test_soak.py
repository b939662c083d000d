"""Soak: thousands of short, mixed, partly hostile connections through one real gateway, then
proof that the gateway's own state went back to where it started.

The load mixes well-behaved clients (echo round trips, half-close) with clients that reset
(SO_LINGER 0) before sending, right after connecting or mid-relay, send garbage to a TLS
listener or stall its handshake past the timeout, connect to a listener whose backend is down,
go over a byte budget or a per-user ``max_conns``, and -- in PostgreSQL mode -- disconnect
mid-start-up, mid-query or while their query is being cancelled. Meanwhile reloads remove and
re-add a listener. Afterwards, with every client socket closed:

- the process holds as many file descriptors as before the load (PostgreSQL: as before the
  gateway started, since its admin pool grows on demand and closes at shutdown),
- no session is registered, no limit lease is held (``max_conns`` connections of the limited
  user get through again, one more does not), no cancel key or kept backend session is left,
  no asyncio task is left over, and no configuration a reload replaced is still alive,
- every audit decision that admitted a connection has exactly one close record,
- nothing was logged as an error and no exception reached the event loop, and
- the gateway still serves a normal client.

Then each test shuts the gateway down with connections in every stage (stalled handshakes and
headers, hanging dials, a listener just removed, live sessions, a cancel in flight): no
connection task outlives the shutdown, every admitted connection still gets one close record,
and descriptors and tasks go back to what they were before the gateway started.

Seeds make the mix reproducible (``FERRYMAN_SOAK_SEED``); the interleaving is the
scheduler's. There are no timing thresholds: waits only bound how long a wedge may take to be
reported.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import os
import random
import socket
import ssl
import struct
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import trustme

from ferryman.app import Gateway
from tests.pg.conftest import APPDB, cluster, listener_port, pg_files  # noqa: F401 - fixture
from tests.support.gateway import EchoServer, GatewayFiles, free_port, grant, started_gateway, wait_for
from tests.support.pgcluster import PgCluster, pg_cluster_factory  # noqa: F401 - fixture

SEED = int(os.environ.get("FERRYMAN_SOAK_SEED", "1729"))
DEV = "dev@localhost"
LIMITED = "limited@localhost"
LIMITED_IP = "127.0.0.3"
MAX_CONNS = 4
BYTE_BUDGET = 4096
TLS_BUDGET = 65536
TLS_NAME = "tls.test"
SOAK_CONNECTIONS = int(os.environ.get("FERRYMAN_SOAK_CONNECTIONS", "6000"))
PG_SOAK_CONNECTIONS = int(os.environ.get("FERRYMAN_SOAK_PG_CONNECTIONS", "800"))
CLIENT_TIMEOUT = 15.0
"""Any single client step taking longer than this is a wedge (reported, never retried)."""


# -- process state --------------------------------------------------------------------------


def fd_table() -> dict[int, str]:
    """This process's open descriptors and what they point at."""
    table: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            table[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return table


def _tcp_endpoints() -> dict[str, str]:
    """socket inode → "local -> remote state" from /proc/net/tcp{,6} (for failure messages)."""
    out: dict[str, str] = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(path) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
                out[inode] = f"{_addr(local)} -> {_addr(remote)} st={state}"
    return out


def _addr(hexaddr: str) -> str:
    host, port = hexaddr.split(":")
    return f"{host[-8:]}:{int(port, 16)}"


def describe_fds(extra: dict[int, str]) -> str:
    endpoints = _tcp_endpoints()
    lines = []
    for fd, target in sorted(extra.items()):
        inode = target[8:-1] if target.startswith("socket:[") else ""
        lines.append(f"  fd {fd}: {target} {endpoints.get(inode, '')}")
    return "\n".join(lines)


def task_names() -> collections.Counter[str]:
    return collections.Counter(t.get_name().split(" ")[0] + " " + _coro_name(t) for t in asyncio.all_tasks())


def _coro_name(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    return getattr(coro, "__qualname__", repr(coro))


class Problems(logging.Handler):
    """Collects what must not happen under load: errors logged by the gateway (an unexpected
    exception in a connection handler is the one path that leaves no audit record) and
    exceptions that reach the event loop's handler."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        trace = logging.Formatter().formatException(record.exc_info) if record.exc_info else ""
        self.records.append(f"{record.name}: {record.getMessage()} {trace}")

    def loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.records.append(f"loop: {context.get('message')} {context.get('exception')!r}")


@contextlib.contextmanager
def watching_problems() -> Iterator[Problems]:
    problems = Problems()
    loop = asyncio.get_running_loop()
    loggers = [logging.getLogger(name) for name in ("ferryman", "asyncio")]
    for logger in loggers:
        logger.addHandler(problems)
    previous = loop.get_exception_handler()
    loop.set_exception_handler(problems.loop_exception)
    try:
        yield problems
    finally:
        loop.set_exception_handler(previous)
        for logger in loggers:
            logger.removeHandler(problems)


def task_chains() -> str:
    """Where every task waits (its chain of awaits), for a wedge's failure message."""
    lines = []
    for task in asyncio.all_tasks():
        chain = []
        awaited: Any = task.get_coro()
        while awaited is not None:
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
            where = f":{frame.f_lineno}" if frame is not None else ""
            chain.append(f"{getattr(awaited, '__qualname__', type(awaited).__name__)}{where}")
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
        lines.append(
            f"  {task.get_name()}{' (cancelling)' if task.cancelling() else ''}: {' -> '.join(chain)}"
        )
    return "\n".join(sorted(lines))


@contextlib.asynccontextmanager
async def wedge_guard(seconds: float) -> AsyncIterator[None]:
    """Fail (with every task's chain of awaits) instead of hanging when the gateway wedges: with
    nothing scheduled, uvloop sleeps in C and pytest-timeout's signal never gets to run."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise AssertionError(f"no progress for {seconds}s; tasks:\n{task_chains()}") from None


# -- raw client helpers ---------------------------------------------------------------------


async def open_socket(port: int, source: str = "127.0.0.1", *, linger0: bool = False) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        if linger0:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if source != "127.0.0.1":
            sock.bind((source, 0))
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a RST, not a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def recv_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def recv_until_eof(sock: socket.socket) -> bytes:
    """Everything until the peer closes (a reset counts as the end, too)."""
    loop = asyncio.get_running_loop()
    buf = bytearray()
    with contextlib.suppress(ConnectionResetError):
        while chunk := await loop.sock_recv(sock, 65536):
            buf += chunk
    return bytes(buf)


def client_hello(context: ssl.SSLContext) -> bytes:
    """The first flight of a real TLS client (for partial-handshake clients)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=TLS_NAME)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


class FlakyBackend:
    """A backend that misbehaves in turn: resets at once, resets after reading a little, or
    echoes one read and closes."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.tasks: set[asyncio.Task[None]] = set()
        self._count = 0
        self._accepting: asyncio.Task[None] | None = None

    async def __aenter__(self) -> FlakyBackend:
        self._accepting = asyncio.ensure_future(self._accept())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._accepting is not None
        self._accepting.cancel()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(self._accepting, *self.tasks, return_exceptions=True)
        self.sock.close()

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self.sock)
            self._count += 1
            task = asyncio.ensure_future(self._serve(conn, self._count % 3))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _serve(self, conn: socket.socket, how: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            if how > 0:
                data = await loop.sock_recv(conn, 65536)
                if how == 2 and data:
                    await loop.sock_sendall(conn, data)
        except OSError:
            pass
        finally:
            # A plain close after the echo; a RST all the same when more was sent than read.
            conn.close() if how == 2 else reset(conn)


@contextlib.contextmanager
def blackhole() -> Iterator[int]:
    """A port whose connects hang: a listening socket that never accepts, its queue full (the
    kernel then drops further SYNs, so a dial waits for its timeout)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = int(server.getsockname()[1])
    fillers = []
    try:
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        server.close()


# -- the TCP soak ---------------------------------------------------------------------------


Kind = Callable[[random.Random], Awaitable[str]]


class Load:
    """A soak's client side: one coroutine per kind of client, run in a seeded mix by a pool of
    workers; each outcome is counted, and a wedge or a wrong answer recorded."""

    seed_tag = ""
    """Keeps the TCP and PostgreSQL mixes apart for the same seed."""

    def __init__(self, ports: dict[str, int], tls_client: ssl.SSLContext) -> None:
        self.ports = ports
        self.tls_client = tls_client
        self.hello = client_hello(tls_client)
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []
        self.loop = asyncio.get_running_loop()

    def kinds(self) -> list[tuple[Kind, int]]:
        raise NotImplementedError

    def beside(self) -> tuple[Kind, ...]:
        """Slow kinds that run beside the workers instead of holding a worker slot each."""
        return ()

    async def run(self, count: int, concurrency: int) -> None:
        kinds = self.kinds()
        picker = random.Random(f"{SEED}{self.seed_tag}")
        plan = picker.choices([k for k, _ in kinds], weights=[w for _, w in kinds], k=count)
        beside = self.beside()
        aside = [i for i, k in enumerate(plan) if k in beside]
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in (i for i, k in enumerate(plan) if k not in beside):
            queue.put_nowait(i)

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                await self.one(i, plan[i])

        await asyncio.gather(*(worker() for _ in range(concurrency)), *(self.one(i, plan[i]) for i in aside))

    async def one(self, i: int, kind: Kind) -> None:
        rng = random.Random(f"{SEED}{self.seed_tag}-{i}")
        name = kind.__name__
        try:
            async with asyncio.timeout(CLIENT_TIMEOUT):
                outcome = await kind(rng)
        except TimeoutError:
            outcome = "WEDGED"
            self.failures.append(f"#{i} {name}: no progress for {CLIENT_TIMEOUT}s")
        except AssertionError as exc:
            outcome = "WRONG"
            self.failures.append(f"#{i} {name}: {exc}")
        self.outcomes[f"{name}: {outcome}"] += 1


class TcpLoad(Load):
    """The client side of the TCP soak."""

    def beside(self) -> tuple[Kind, ...]:
        # A stalled handshake waits for the gateway's timeout: it would hold a worker a second.
        return (self.tls_stall,)

    def kinds(self) -> list[tuple[Kind, int]]:
        return [
            (self.echo, 20),
            (self.echo_half_close, 8),
            (self.half_close_only, 3),
            (self.reset_right_after_connect, 6),
            (self.reset_before_sending, 6),
            (self.reset_mid_relay, 10),
            (self.tls_echo, 6),
            (self.tls_reset_mid_session, 3),
            (self.tls_garbage, 4),
            (self.tls_partial_then_reset, 3),
            (self.tls_stall, 1),
            (self.dead_backend, 6),
            (self.over_budget, 6),
            (self.limited_user, 10),
            (self.reloaded_listener, 8),
            (self.reloaded_tls_listener, 4),
            (self.flaky_backend, 6),
            (self.slow_dial, 3),
            (self.tls_over_budget, 2),
        ]

    # Well-behaved plaintext clients --------------------------------------------------------

    async def echo(self, rng: random.Random) -> str:
        payload = rng.randbytes(rng.randint(1, 16384))
        sock = await open_socket(self.ports["echo"])
        try:
            await self.loop.sock_sendall(sock, payload)
            assert await recv_exactly(sock, len(payload)) == payload, "echo differs"
        finally:
            sock.close()
        return "ok"

    async def echo_half_close(self, rng: random.Random) -> str:
        payload = rng.randbytes(rng.randint(1, 65536))
        sock = await open_socket(self.ports["echo"])
        try:
            await self.loop.sock_sendall(sock, payload)
            sock.shutdown(socket.SHUT_WR)
            assert await recv_until_eof(sock) == payload, "half-closed echo differs"
        finally:
            sock.close()
        return "ok"

    async def half_close_only(self, rng: random.Random) -> str:
        sock = await open_socket(self.ports["echo"])
        try:
            sock.shutdown(socket.SHUT_WR)
            assert await recv_until_eof(sock) == b"", "bytes from nowhere"
        finally:
            sock.close()
        return "ok"

    # Clients that reset ----------------------------------------------------------------------

    async def reset_right_after_connect(self, rng: random.Random) -> str:
        reset(await open_socket(self.ports[rng.choice(["echo", "echo", "capped", "dead"])]))
        return "reset"

    async def reset_before_sending(self, rng: random.Random) -> str:
        sock = await open_socket(self.ports[rng.choice(["echo", "capped", "dead"])])
        await asyncio.sleep(rng.uniform(0, 0.03))
        reset(sock)
        return "reset"

    async def reset_mid_relay(self, rng: random.Random) -> str:
        """Send more than fits in the socket buffers without reading, then reset -- at a random
        point of the upload, or after reading part of the echo."""
        sock = await open_socket(self.ports["echo"])
        try:
            payload = rng.randbytes(rng.choice([512, 65536, 262144, 1 << 20]))
            if rng.random() < 0.5:
                with contextlib.suppress(TimeoutError, OSError):
                    async with asyncio.timeout(rng.uniform(0, 0.05)):
                        await self.loop.sock_sendall(sock, payload)
            else:
                head = payload[:4096]
                await self.loop.sock_sendall(sock, head)
                await recv_exactly(sock, rng.randint(1, len(head)))
        finally:
            reset(sock)
        return "reset"

    # TLS termination -------------------------------------------------------------------------

    async def _tls_open(self, *, linger0: bool = False) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = await open_socket(self.ports["tls"], linger0=linger0)
        try:
            return await asyncio.open_connection(
                sock=sock, ssl=self.tls_client, server_hostname=TLS_NAME, ssl_handshake_timeout=10
            )
        except BaseException:
            sock.close()
            raise

    async def tls_echo(self, rng: random.Random) -> str:
        payload = rng.randbytes(rng.randint(1, 8192))
        reader, writer = await self._tls_open()
        try:
            writer.write(payload)
            assert await reader.readexactly(len(payload)) == payload, "TLS echo differs"
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
        return "ok"

    async def tls_reset_mid_session(self, rng: random.Random) -> str:
        _reader, writer = await self._tls_open(linger0=True)
        writer.write(rng.randbytes(rng.choice([100, 50000, 300000])))
        await asyncio.sleep(rng.uniform(0, 0.02))
        writer.transport.abort()  # SO_LINGER 0 was set: a RST
        return "reset"

    async def tls_garbage(self, rng: random.Random) -> str:
        sock = await open_socket(self.ports["tls"])
        try:
            garbage = rng.choice([b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", rng.randbytes(rng.randint(1, 3000))])
            with contextlib.suppress(OSError):
                await self.loop.sock_sendall(sock, garbage)
            await recv_until_eof(sock)  # an alert at most, then the close
        finally:
            sock.close()
        return "closed"

    async def tls_partial_then_reset(self, rng: random.Random) -> str:
        sock = await open_socket(self.ports["tls"])
        await self.loop.sock_sendall(sock, self.hello[: rng.randint(1, len(self.hello))])
        await asyncio.sleep(rng.uniform(0, 0.05))
        reset(sock)
        return "reset"

    async def tls_stall(self, rng: random.Random) -> str:
        """Say nothing, or part of a ClientHello, and wait: the gateway's handshake timeout
        (1s here) must close the connection."""
        sock = await open_socket(self.ports["tls"])
        try:
            if rng.random() < 0.5:
                await self.loop.sock_sendall(sock, self.hello[: rng.randint(1, len(self.hello) - 1)])
            await recv_until_eof(sock)
        finally:
            sock.close()
        return "timed out"

    # Refusals and limits -------------------------------------------------------------------

    async def dead_backend(self, rng: random.Random) -> str:
        sock = await open_socket(self.ports["dead"])
        try:
            with contextlib.suppress(OSError):
                await self.loop.sock_sendall(sock, b"hello?")
            assert await recv_until_eof(sock) == b"", "a refused connection got bytes"
        finally:
            sock.close()
        return "closed"

    async def over_budget(self, rng: random.Random) -> str:
        """Send well past ``max_bytes_per_conn`` (both directions count): cut at the budget."""
        sock = await open_socket(self.ports["capped"])
        try:
            payload = rng.randbytes(rng.choice([BYTE_BUDGET + 1, 16384, 200000]))
            sender = asyncio.ensure_future(self.loop.sock_sendall(sock, payload))
            try:
                echoed = await recv_until_eof(sock)
            finally:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await sender
            assert len(echoed) <= BYTE_BUDGET, f"{len(echoed)} bytes echoed past the budget"
        finally:
            sock.close()
        return "cut"

    async def limited_user(self, rng: random.Random) -> str:
        """The user with ``max_conns``: admitted (echo) or refused (closed without a byte);
        some reset instead of closing."""
        sock = await open_socket(self.ports["echo"], LIMITED_IP)
        try:
            await self.loop.sock_sendall(sock, b"x" * 10)
            try:
                got = await recv_exactly(sock, 10)
            except (EOFError, ConnectionResetError):
                return "refused"
            assert got == b"x" * 10
            await asyncio.sleep(rng.uniform(0, 0.02))
            return "ok"
        finally:
            if rng.random() < 0.3:
                reset(sock)
            else:
                sock.close()

    async def reloaded_listener(self, rng: random.Random) -> str:
        """Echo through the listener the reloads remove and re-add: refused while it is gone,
        cut (reason ``shutdown``) when removed under a live connection."""
        payload = rng.randbytes(rng.randint(1, 4096))
        try:
            sock = await open_socket(self.ports["reloaded"])
        except (ConnectionRefusedError, ConnectionResetError):  # reset: queued when it closed
            return "listener gone"
        try:
            await self.loop.sock_sendall(sock, payload)
            await asyncio.sleep(rng.uniform(0, 0.05))
            got = await recv_exactly(sock, len(payload))
            assert got == payload, "echo differs"
        except (EOFError, ConnectionResetError, BrokenPipeError):
            return "cut"
        finally:
            sock.close()
        return "ok"

    async def reloaded_tls_listener(self, rng: random.Random) -> str:
        """A TLS client of the TLS listener the reloads remove and re-add, sometimes
        resetting in the middle of its handshake."""
        try:
            sock = await open_socket(self.ports["reloaded_tls"], linger0=rng.random() < 0.3)
        except (ConnectionRefusedError, ConnectionResetError):
            return "listener gone"
        try:
            if rng.random() < 0.3:
                await self.loop.sock_sendall(sock, self.hello[: rng.randint(1, len(self.hello))])
                await asyncio.sleep(rng.uniform(0, 0.02))
                reset(sock)
                return "reset"
            try:
                reader, writer = await asyncio.open_connection(
                    sock=sock, ssl=self.tls_client, server_hostname=TLS_NAME, ssl_handshake_timeout=10
                )
            except (OSError, ssl.SSLError):
                return "cut in handshake"
        except BaseException:
            sock.close()
            raise
        payload = rng.randbytes(rng.randint(1, 4096))
        try:
            writer.write(payload)
            await asyncio.sleep(rng.uniform(0, 0.05))
            got = await reader.readexactly(len(payload))
            assert got == payload, "TLS echo differs"
        except (asyncio.IncompleteReadError, OSError, ssl.SSLError):
            return "cut"
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
        return "ok"

    async def flaky_backend(self, rng: random.Random) -> str:
        """A backend that resets or closes early: the client sees the end, nothing hangs."""
        sock = await open_socket(self.ports["flaky"])
        try:
            with contextlib.suppress(OSError):
                await self.loop.sock_sendall(sock, rng.randbytes(rng.randint(1, 100000)))
            await recv_until_eof(sock)
        finally:
            reset(sock) if rng.random() < 0.3 else sock.close()
        return "ended"

    async def slow_dial(self, rng: random.Random) -> str:
        """A backend whose connect hangs until the listener's dial timeout: the client waits
        for the close, or resets while the gateway is still dialling."""
        sock = await open_socket(self.ports["slow"])
        try:
            if rng.random() < 0.5:
                await asyncio.sleep(rng.uniform(0, 0.3))
                reset(sock)
                return "reset while dialling"
            assert await recv_until_eof(sock) == b"", "bytes from an unreachable backend"
        finally:
            sock.close()
        return "closed"

    async def tls_over_budget(self, rng: random.Random) -> str:
        reader, writer = await self._tls_open()
        try:
            writer.write(rng.randbytes(rng.choice([70000, 300000])))
            echoed = 0
            with contextlib.suppress(OSError, ssl.SSLError):
                while chunk := await reader.read(65536):
                    echoed += len(chunk)
            assert echoed <= TLS_BUDGET, f"{echoed} bytes echoed past the budget"
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
        return "cut"


class Flapping:
    """Removes one of the listeners ``names`` and adds it back, by reloads (what SIGHUP runs),
    until stopped; keeps a weak reference to every configuration a reload replaced."""

    def __init__(self, gateway: Gateway, files: GatewayFiles, names: list[str], rng: random.Random) -> None:
        self.gateway = gateway
        self.files = files
        self.entries = [item for item in files.listeners if item["name"] in names]
        self.rng = rng
        self.flaps = 0
        self.replaced: list[weakref.ref[Any]] = []
        self._stop = asyncio.Event()
        self._task = asyncio.ensure_future(self._run())

    async def _reload(self) -> None:
        self.replaced.append(weakref.ref(self.gateway.config))
        self.files.write()
        assert await self.gateway.reload()

    async def _run(self) -> None:
        while not self._stop.is_set():
            await asyncio.sleep(self.rng.uniform(0.02, 0.2))
            entry = self.rng.choice(self.entries)
            self.files.listeners.remove(entry)
            await self._reload()
            await asyncio.sleep(self.rng.uniform(0.01, 0.1))
            self.files.listeners.append(entry)
            await self._reload()
            self.flaps += 1

    async def stop(self) -> None:
        self._stop.set()
        await self._task
        assert self.flaps >= 1

    def still_held(self) -> int:
        """How many replaced configurations are still alive (a reload must let go of them)."""
        gc.collect()
        return sum(1 for ref in self.replaced if ref() is not None)


def check_audit(records: list[dict[str, Any]]) -> tuple[int, int]:
    """Each admitting decision has exactly one close record, and every close belongs to one.
    Returns (admitted, refused)."""
    admitted: set[str] = set()
    refused = 0
    decided: collections.Counter[str] = collections.Counter()
    closes: collections.Counter[str] = collections.Counter()
    for record in records:
        if record["event"] == "decision":
            decided[record["id"]] += 1
            if record["allowed"]:
                admitted.add(record["id"])
            else:
                refused += 1
        elif record["event"] == "close":
            closes[record["id"]] += 1
    assert not [i for i, n in decided.items() if n > 1], "a connection decided twice"
    unclosed = sorted(admitted - set(closes))
    assert not unclosed, f"{len(unclosed)} admitted connection(s) never closed: {unclosed[:10]}"
    twice = sorted(i for i, n in closes.items() if n > 1)
    assert not twice, f"closed more than once: {twice[:10]}"
    orphans = sorted(set(closes) - admitted)
    assert not orphans, f"close records without an admitting decision: {orphans[:10]}"
    return len(admitted), refused


async def settled(
    what: str, predicate: Callable[[], bool], explain: Callable[[], str], timeout: float = 10.0
) -> None:
    """Wait for ``predicate`` (the gateway's deferred closes -- a TLS session's bounded close,
    say -- take a couple of seconds); fail with ``explain()`` otherwise."""
    try:
        await wait_for(predicate, timeout=timeout)
    except AssertionError:
        raise AssertionError(f"{what} did not return to baseline:\n{explain()}") from None


def sockets_and_files(table: dict[int, str] | None = None) -> dict[int, str]:
    """``table`` (default: this process's descriptors now) without its epoll sets."""
    return {k: v for k, v in (fd_table() if table is None else table).items() if "eventpoll" not in v}


class Baseline:
    """This process's descriptors and asyncio tasks at one moment, to come back to."""

    def __init__(self) -> None:
        self.fds = fd_table()
        self.tasks = task_names()

    async def fds_back(self, what: str) -> None:
        # Counted, not compared by number: a listener a reload removed and added again may
        # have a new one. Epoll sets are left out: an earlier test's event loop (and its relay
        # poller) may be closed by the garbage collector at any moment.
        await settled(
            what,
            lambda: len(sockets_and_files()) == len(sockets_and_files(self.fds)),
            lambda: describe_fds({k: v for k, v in sockets_and_files().items() if self.fds.get(k) != v}),
        )

    async def tasks_back(self, what: str) -> None:
        await settled(
            what,
            lambda: task_names() == self.tasks,
            lambda: f"new: {task_names() - self.tasks}, gone: {self.tasks - task_names()}",
        )


async def assert_limit_slots_free(port: int) -> None:
    """``MAX_CONNS`` concurrent connections of the limited user get through; one more does not."""
    loop = asyncio.get_running_loop()
    held = [await open_socket(port, LIMITED_IP) for _ in range(MAX_CONNS)]
    try:
        for i, sock in enumerate(held):
            await loop.sock_sendall(sock, b"slot%d" % i)
            async with asyncio.timeout(5):
                assert await recv_exactly(sock, 5) == b"slot%d" % i, f"slot {i} not served"
        extra = await open_socket(port, LIMITED_IP)
        try:
            with contextlib.suppress(OSError):
                await loop.sock_sendall(extra, b"one too many")
            async with asyncio.timeout(5):
                assert await recv_until_eof(extra) == b"", "max_conns not enforced after the soak"
        finally:
            extra.close()
    finally:
        for sock in held:
            sock.close()


def server_certificate(directory: Path) -> ssl.SSLContext:
    """``cert.pem``/``key.pem`` for TLS_NAME and 127.0.0.1 in ``directory``; returns a client
    context that trusts them."""
    ca = trustme.CA()
    issued = ca.issue_cert(TLS_NAME, "127.0.0.1")
    issued.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    issued.private_key_pem.write_to_path(str(directory / "key.pem"))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return client


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[GatewayFiles, ssl.SSLContext]:
    client = server_certificate(tmp_path)
    files = GatewayFiles(tmp_path)
    files.static = [
        {"cidr": "127.0.0.0/8", "user": DEV, "groups": ["dev"]},
        {"cidr": f"{LIMITED_IP}/32", "user": LIMITED, "groups": ["limited"]},
    ]
    return files, client


async def test_tcp_soak_returns_to_baseline(tls_files: tuple[GatewayFiles, ssl.SSLContext]) -> None:
    files, tls_client = tls_files
    tls = {"tls": "enabled", "cert_file": str(files.dir / "cert.pem"), "key_file": str(files.dir / "key.pem")}
    async with EchoServer() as echo, FlakyBackend() as flaky:
        with blackhole() as hole:
            ports = {
                "echo": files.add_listener("echo", echo.address),
                "dead": files.add_listener("dead", f"127.0.0.1:{free_port()}"),
                "slow": files.add_listener("slow", f"127.0.0.1:{hole}", dial_timeout="300ms"),
                "flaky": files.add_listener("flaky", flaky.address),
                # identity_timeout bounds the TLS handshake.
                "tls": files.add_listener("tls", echo.address, identity_timeout="1s", **tls),
                "capped": files.add_listener("capped", echo.address),
                "reloaded": files.add_listener("reloaded", echo.address),
                "reloaded_tls": files.add_listener(
                    "reloaded_tls", echo.address, identity_timeout="1s", **tls
                ),
                # Only for the shutdown: set-ups that outlast its grace period.
                "slower": files.add_listener("slower", f"127.0.0.1:{hole}", dial_timeout="30s"),
                "proxied": files.add_listener("proxied", echo.address, accept_proxy_protocol=True),
                "tls_slow": files.add_listener("tls_slow", echo.address, identity_timeout="30s", **tls),
                "removed": files.add_listener("removed", echo.address, identity_timeout="30s", **tls),
            }
            files.grants += [
                grant(
                    {
                        **{name: {} for name in ports if name not in ("tls", "capped")},
                        "tls": {"limits": {"max_bytes_per_conn": TLS_BUDGET}},
                        "capped": {"limits": {"max_bytes_per_conn": BYTE_BUDGET}},
                    },
                    src=[DEV],
                ),
                grant({"echo": {}}, limits={"max_conns": MAX_CONNS}, src=[LIMITED]),
            ]
            before = Baseline()
            gateway = await started_gateway(files)
            try:
                async with wedge_guard(90):
                    await soak(gateway, files, ports, tls_client)
                    await shutdown_under_load(gateway, files, ports, tls_client)
            finally:
                if not gateway.stopped.is_set():
                    await gateway.shutdown(0.5)
            # Whatever the shutdown cut, nothing of the gateway's stays behind.
            await before.fds_back("file descriptors after shutdown")
            await before.tasks_back("asyncio tasks after shutdown")


async def shutdown_under_load(
    gateway: Gateway, files: GatewayFiles, ports: dict[str, int], tls_client: ssl.SSLContext
) -> None:
    """Shut down (grace 0.5 s) with connections in every stage: TLS handshakes and PROXY headers
    that stall, backend dials that hang, and live sessions. Every admitted one gets its close
    record (reason ``shutdown``)."""
    loop = asyncio.get_running_loop()
    hello = client_hello(tls_client)
    clients: list[socket.socket] = []
    gateway.runtime.audit.flush()
    closed_before = len(files.closes())
    with watching_problems() as problems:
        try:
            for i in range(5):
                clients.append(await open_socket(ports["tls_slow"]))
                await loop.sock_sendall(clients[-1], hello[: 10 * i])
                clients.append(await open_socket(ports["proxied"]))
                await loop.sock_sendall(clients[-1], b"PROXY TCP4 "[: 2 * i])
                clients.append(await open_socket(ports["slower"]))
                clients.append(await open_socket(ports["echo"]))
                await loop.sock_sendall(clients[-1], b"live")
                assert await recv_exactly(clients[-1], 4) == b"live"
                clients.append(await open_socket(ports["removed"]))
            await wait_for(lambda: sum(1 for s in gateway.runtime.sessions if s.listener == "echo") == 5)
            await asyncio.sleep(0.1)  # the stalled ones are waiting now
            # A listener removed with handshakes in flight: they are the gateway's still.
            files.listeners = [item for item in files.listeners if item["name"] != "removed"]
            files.write()
            assert await gateway.reload()
            await gateway.shutdown(0.5)
            # Shut down means done: no connection of the gateway's is still being handled.
            left = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("conn ")]
            assert not left, left
        finally:
            for sock in clients:
                sock.close()
        check_audit(files.audit())
        # The hanging dials (admitted) and the live sessions: each closed once, by the shutdown.
        cut = collections.Counter((r["listener"], r["reason"]) for r in files.closes()[closed_before:])
        assert cut == {("slower", "shutdown"): 5, ("echo", "shutdown"): 5}, cut
        assert not problems.records, "\n".join(problems.records[:20])


async def soak(
    gateway: Gateway, files: GatewayFiles, ports: dict[str, int], tls_client: ssl.SSLContext
) -> None:
    rt = gateway.runtime
    with watching_problems() as problems:
        # Warm-up, so lazily made state (caches, the audit file's buffer) is in the baseline.
        load = TcpLoad(ports, tls_client)
        assert await load.echo(random.Random(0)) == "ok"
        assert await load.tls_echo(random.Random(0)) == "ok"
        await settled("sessions", lambda: len(rt.sessions) == 0, lambda: "")
        await asyncio.sleep(0.2)
        before = Baseline()

        flapping = Flapping(gateway, files, ["reloaded", "reloaded_tls"], random.Random(SEED + 1))
        try:
            await load.run(count=SOAK_CONNECTIONS, concurrency=48)
        finally:
            await flapping.stop()
        assert not load.failures, "\n".join(load.failures[:20]) + f"\n{dict(load.outcomes)}"
        assert gateway.listeners.keys() == ports.keys()

        await settled("sessions", lambda: len(rt.sessions) == 0, lambda: repr(list(rt.sessions)))
        await settled(
            "replaced configurations", lambda: flapping.still_held() == 0, lambda: str(flapping.still_held())
        )
        await settled(
            "limit leases",
            lambda: rt.tracker.connections(LIMITED) == 0 and rt.tracker.connections(DEV) == 0,
            lambda: f"{LIMITED}: {rt.tracker.connections(LIMITED)}, {DEV}: {rt.tracker.connections(DEV)}",
        )
        await before.fds_back("file descriptors")
        await before.tasks_back("asyncio tasks")
        await assert_limit_slots_free(ports["echo"])
        # Still serving, plain and TLS.
        assert await load.echo(random.Random(1)) == "ok"
        assert await load.tls_echo(random.Random(1)) == "ok"
        await settled("sessions", lambda: len(rt.sessions) == 0, lambda: repr(list(rt.sessions)))
        await before.fds_back("file descriptors")
        rt.audit.flush()
        admitted, refused = check_audit(files.audit())
        assert admitted > SOAK_CONNECTIONS // 3 and refused > SOAK_CONNECTIONS // 20, (admitted, refused)
        assert not problems.records, "\n".join(problems.records[:20])


# -- the PostgreSQL soak --------------------------------------------------------------------

PG_PROTOCOL = 196608
PG_CANCEL_CODE = 80877102
PG_SSL_CODE = 80877103


def pg_startup(database: str = APPDB, **params: str) -> bytes:
    body = struct.pack("!I", PG_PROTOCOL)
    for key, value in {"user": "soak", "database": database, **params}.items():
        body += key.encode() + b"\0" + value.encode() + b"\0"
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


def pg_message(kind: bytes, payload: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(payload) + 4) + payload


def pg_query(sql: str) -> bytes:
    return pg_message(b"Q", sql.encode() + b"\0")


PG_TERMINATE = pg_message(b"X")


class PgSession:
    """A raw PostgreSQL protocol client over a socket (so that it can misbehave anywhere)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.key: tuple[int, int] | None = None
        self.loop = asyncio.get_running_loop()

    async def message(self) -> tuple[bytes, bytes]:
        while True:
            if len(self.buffer) >= 5:
                length = struct.unpack("!I", self.buffer[1:5])[0]
                if len(self.buffer) >= 1 + length:
                    kind, payload = bytes(self.buffer[:1]), bytes(self.buffer[5 : 1 + length])
                    del self.buffer[: 1 + length]
                    return kind, payload
            chunk = await self.loop.sock_recv(self.sock, 65536)
            if not chunk:
                raise EOFError("server closed")
            self.buffer += chunk

    async def until_ready(self) -> list[tuple[bytes, bytes]]:
        """Messages up to ReadyForQuery; an ErrorResponse before it is returned too."""
        seen = []
        while True:
            kind, payload = await self.message()
            seen.append((kind, payload))
            if kind == b"K":
                self.key = struct.unpack("!II", payload[:8])
            if kind == b"Z":
                return seen
            if kind == b"E" and self.key is None:
                return seen  # a refusal during start-up: the server closes next

    async def login(self) -> bool:
        """Start-up to ReadyForQuery; False when refused (ErrorResponse)."""
        await self.loop.sock_sendall(self.sock, pg_startup())
        return self.until_ready_ok(await self.until_ready())

    @staticmethod
    def until_ready_ok(seen: list[tuple[bytes, bytes]]) -> bool:
        return seen[-1][0] == b"Z"

    async def query(self, sql: str) -> list[tuple[bytes, bytes]]:
        await self.loop.sock_sendall(self.sock, pg_query(sql))
        return await self.until_ready()


def sqlstate(seen: list[tuple[bytes, bytes]]) -> str | None:
    for kind, payload in seen:
        if kind == b"E":
            for field in payload.split(b"\0"):
                if field[:1] == b"C":
                    return field[1:].decode()
    return None


class PgLoad(Load):
    """The client side of the PostgreSQL soak."""

    seed_tag = "-pg"

    def kinds(self) -> list[tuple[Kind, int]]:
        return [
            (self.asyncpg_query, 10),
            (self.query_and_terminate, 12),
            (self.reset_after_startup, 8),
            (self.partial_startup, 6),
            (self.ssl_request_then_leave, 3),
            (self.reset_mid_query, 8),
            (self.cancel_while_querying, 6),
            (self.reset_during_cancel, 6),
            (self.unknown_cancel_key, 3),
            (self.limited_user, 8),
            (self.terminate_in_transaction, 4),
            (self.stall_startup, 1),
            (self.flapping_listener, 6),
            (self.tls_asyncpg_query, 5),
            (self.tls_reset_in_handshake, 3),
            (self.tls_reset_mid_query, 4),
            (self.tls_stall_after_yes, 1),
        ]

    async def session(self, port: str = "pg", source: str = "127.0.0.1") -> PgSession:
        return PgSession(await open_socket(self.ports[port], source))

    async def asyncpg_query(self, rng: random.Random) -> str:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=self.ports["pg"], user="soak", database=APPDB, ssl=False, timeout=10
        )
        try:
            assert await conn.fetchval("select count(*) from items") == 2
        finally:
            await conn.close()
        return "ok"

    async def query_and_terminate(self, rng: random.Random) -> str:
        s = await self.session()
        try:
            assert await s.login(), "refused"
            seen = await s.query(f"select {rng.randint(1, 1000)}")
            assert sqlstate(seen) is None, seen
            await self.loop.sock_sendall(s.sock, PG_TERMINATE)
            await recv_until_eof(s.sock)
        finally:
            s.sock.close()
        return "ok"

    async def reset_after_startup(self, rng: random.Random) -> str:
        """Gone while the gateway identifies, provisions or logs in to the backend."""
        s = await self.session()
        await self.loop.sock_sendall(s.sock, pg_startup())
        await asyncio.sleep(rng.choice([0, 0, rng.uniform(0, 0.05)]))
        reset(s.sock)
        return "reset"

    async def partial_startup(self, rng: random.Random) -> str:
        s = await self.session()
        data = pg_startup()
        await self.loop.sock_sendall(s.sock, data[: rng.randint(1, len(data) - 1)])
        await asyncio.sleep(rng.uniform(0, 0.02))
        reset(s.sock) if rng.random() < 0.5 else s.sock.close()
        return "left"

    async def ssl_request_then_leave(self, rng: random.Random) -> str:
        s = await self.session()
        try:
            await self.loop.sock_sendall(s.sock, struct.pack("!II", 8, PG_SSL_CODE))
            answer = await self.loop.sock_recv(s.sock, 1)
            assert answer == b"S", answer  # TLS offered; what follows is no handshake
            if rng.random() < 0.5:
                await self.loop.sock_sendall(s.sock, rng.randbytes(rng.randint(1, 50)))
        finally:
            reset(s.sock)
        return "left"

    async def reset_mid_query(self, rng: random.Random) -> str:
        s = await self.session()
        try:
            assert await s.login(), "refused"
            await self.loop.sock_sendall(s.sock, pg_query("select pg_sleep(0.3), 'x'"))
            await asyncio.sleep(rng.uniform(0, 0.1))
        finally:
            reset(s.sock)
        return "reset"

    async def _cancel(self, key: tuple[int, int], *, leave: bool = False) -> None:
        sock = await open_socket(self.ports["pg"])
        try:
            await self.loop.sock_sendall(sock, struct.pack("!IIII", 16, PG_CANCEL_CODE, *key))
            if leave:
                return
            assert await recv_until_eof(sock) == b"", "a cancel connection got an answer"
        finally:
            reset(sock) if leave else sock.close()

    async def cancel_while_querying(self, rng: random.Random) -> str:
        s = await self.session()
        try:
            assert await s.login(), "refused"
            assert s.key is not None
            await self.loop.sock_sendall(s.sock, pg_query("select pg_sleep(3)"))
            await asyncio.sleep(rng.uniform(0.02, 0.1))
            await self._cancel(s.key)
            seen = await s.until_ready()
            # The cancel may land before the query started: then the query runs out (3 s).
            assert sqlstate(seen) in ("57014", None), seen
            await self.loop.sock_sendall(s.sock, PG_TERMINATE)
            await recv_until_eof(s.sock)
        finally:
            s.sock.close()
        return "cancelled"

    async def reset_during_cancel(self, rng: random.Random) -> str:
        """Reset the session, the cancel connection, or both, while the cancel is on its way."""
        s = await self.session()
        try:
            assert await s.login(), "refused"
            assert s.key is not None
            await self.loop.sock_sendall(s.sock, pg_query("select pg_sleep(0.5)"))
            await asyncio.sleep(rng.uniform(0, 0.05))
            how = rng.randrange(3)
            cancel = asyncio.ensure_future(self._cancel(s.key, leave=how != 1))
            if how != 0:
                reset(s.sock)
            await cancel
        finally:
            reset(s.sock)
        return "reset"

    async def unknown_cancel_key(self, rng: random.Random) -> str:
        await self._cancel((rng.getrandbits(31), rng.getrandbits(32)))
        return "dropped"

    async def limited_user(self, rng: random.Random) -> str:
        s = await self.session(source=LIMITED_IP)
        try:
            await self.loop.sock_sendall(s.sock, pg_startup())
            seen = await s.until_ready()
            if not PgSession.until_ready_ok(seen):
                assert sqlstate(seen) == "53300", seen
                return "refused"
            await asyncio.sleep(rng.uniform(0, 0.05))
            if rng.random() < 0.5:
                await self.loop.sock_sendall(s.sock, PG_TERMINATE)
        finally:
            reset(s.sock) if rng.random() < 0.3 else s.sock.close()
        return "ok"

    async def terminate_in_transaction(self, rng: random.Random) -> str:
        s = await self.session()
        try:
            assert await s.login(), "refused"
            assert sqlstate(await s.query("begin; select 1")) is None
            await self.loop.sock_sendall(s.sock, PG_TERMINATE)
            await recv_until_eof(s.sock)
        finally:
            s.sock.close()
        return "ok"

    async def stall_startup(self, rng: random.Random) -> str:
        """Nothing, or half a StartupMessage, past the handshake timeout (1 s here)."""
        s = await self.session()
        try:
            if rng.random() < 0.5:
                await self.loop.sock_sendall(s.sock, pg_startup()[:10])
            await recv_until_eof(s.sock)
        finally:
            s.sock.close()
        return "timed out"

    async def flapping_listener(self, rng: random.Random) -> str:
        """A session on the listener the reloads remove and re-add: refused while it is gone,
        ended (FATAL from the server, or a close) when removed under the session."""
        try:
            s = await self.session("pgflap")
        except (ConnectionRefusedError, ConnectionResetError):
            return "listener gone"
        try:
            if not await s.login():
                return "refused"
            seen = await s.query("select pg_sleep(0.05)")
            if sqlstate(seen) is not None:
                return "ended"
            await self.loop.sock_sendall(s.sock, PG_TERMINATE)
            await recv_until_eof(s.sock)
        except (EOFError, ConnectionError):
            return "ended"
        finally:
            s.sock.close()
        return "ok"

    async def tls_asyncpg_query(self, rng: random.Random) -> str:
        conn = await asyncpg.connect(
            host="127.0.0.1",
            port=self.ports["pg"],
            user="soak",
            database=APPDB,
            ssl=self.tls_client,
            timeout=10,
        )
        try:
            assert await conn.fetchval("select count(*) from items") == 2
        finally:
            await conn.close()
        return "ok"

    async def _ssl_request(self, *, linger0: bool = False) -> socket.socket:
        sock = await open_socket(self.ports["pg"], linger0=linger0)
        try:
            await self.loop.sock_sendall(sock, struct.pack("!II", 8, PG_SSL_CODE))
            assert await recv_exactly(sock, 1) == b"S"
        except BaseException:
            sock.close()
            raise
        return sock

    async def tls_reset_in_handshake(self, rng: random.Random) -> str:
        sock = await self._ssl_request()
        await self.loop.sock_sendall(sock, self.hello[: rng.randint(1, len(self.hello))])
        await asyncio.sleep(rng.uniform(0, 0.02))
        reset(sock)
        return "reset"

    async def tls_reset_mid_query(self, rng: random.Random) -> str:
        """A TLS session (the transport relay) whose client resets during start-up or a query."""
        sock = await self._ssl_request(linger0=True)
        try:
            reader, writer = await asyncio.open_connection(
                sock=sock, ssl=self.tls_client, server_hostname=TLS_NAME, ssl_handshake_timeout=10
            )
        except BaseException:
            sock.close()
            raise
        try:
            writer.write(pg_startup())
            if rng.random() < 0.3:
                return "reset in start-up"
            while (await reader.readexactly(1)) != b"Z":
                length = struct.unpack("!I", await reader.readexactly(4))[0]
                await reader.readexactly(length - 4)
            await reader.readexactly(5)  # the rest of ReadyForQuery
            writer.write(pg_query("select pg_sleep(0.3)"))
            await asyncio.sleep(rng.uniform(0, 0.1))
        finally:
            writer.transport.abort()  # SO_LINGER 0: a RST
        return "reset"

    async def tls_stall_after_yes(self, rng: random.Random) -> str:
        """'S', then no handshake: the start-up timeout (1 s) closes it."""
        sock = await self._ssl_request()
        try:
            await recv_until_eof(sock)
        finally:
            sock.close()
        return "timed out"


async def assert_pg_slots_free(port: int) -> None:
    """``MAX_CONNS`` sessions of the limited user get through; one more is refused (53300)."""
    loop = asyncio.get_running_loop()
    held = [PgSession(await open_socket(port, LIMITED_IP)) for _ in range(MAX_CONNS)]
    try:
        for s in held:
            assert await s.login(), "a max_conns slot is still taken"
        extra = PgSession(await open_socket(port, LIMITED_IP))
        try:
            await loop.sock_sendall(extra.sock, pg_startup())
            assert sqlstate(await extra.until_ready()) == "53300"
        finally:
            extra.sock.close()
        for s in held:
            await loop.sock_sendall(s.sock, PG_TERMINATE)
            await recv_until_eof(s.sock)
    finally:
        for s in held:
            s.sock.close()


async def pg_shutdown_under_load(gateway: Gateway, files: GatewayFiles, load: PgLoad) -> None:
    """Shut down (grace 0.5 s) with PostgreSQL connections in every stage: start-ups that stall
    (plain and after 'S'), idle sessions, sessions in a query, a session whose query is being
    cancelled. Each admitted one gets its close record; no connection task outlives shutdown."""
    loop = asyncio.get_running_loop()
    clients: list[socket.socket] = []
    with watching_problems() as problems:
        try:
            for i in range(3):
                s = await load.session()
                clients.append(s.sock)
                await loop.sock_sendall(s.sock, pg_startup()[: 5 * i])
                clients.append(await load._ssl_request())
                for sql in ("", "select pg_sleep(5)"):
                    s = await load.session()
                    clients.append(s.sock)
                    assert await s.login()
                    if sql:
                        await loop.sock_sendall(s.sock, pg_query(sql))
            assert s.key is not None
            cancel = await open_socket(load.ports["pg"])
            clients.append(cancel)
            await loop.sock_sendall(cancel, struct.pack("!IIII", 16, PG_CANCEL_CODE, *s.key))
            await wait_for(lambda: len(gateway.runtime.sessions) == 6)
            live = {session.id for session in gateway.runtime.sessions}
            await gateway.shutdown(0.5)
            left = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("conn ")]
            assert not left, left
        finally:
            for sock in clients:
                sock.close()
        check_audit(files.audit())
        reasons = {r["id"]: r["reason"] for r in files.closes() if r["id"] in live}
        assert set(reasons.values()) == {"shutdown"} and reasons.keys() == live, reasons
        assert not problems.records, "\n".join(problems.records[:20])


@pytest.mark.pg
async def test_postgres_soak_returns_to_baseline(tmp_path: Path, cluster: PgCluster) -> None:  # noqa: F811
    postgres = {"handshake_timeout": "1s", "backend_idle_timeout": "1s"}
    tls_client = server_certificate(tmp_path)
    tls = {
        "tls_mode": "optional",
        "cert_file": str(tmp_path / "cert.pem"),
        "key_file": str(tmp_path / "key.pem"),
    }
    files = pg_files(tmp_path, cluster, prefix="soak_", postgres=postgres, **tls)
    files.add_listener(
        "pgflap",
        f"127.0.0.1:{cluster.port}",
        mode="postgres",
        postgres={"admin_user": "postgres", "user_prefix": "soak_", **postgres},
    )
    files.static = [
        {"cidr": "127.0.0.0/8", "user": DEV, "groups": ["dev"]},
        {"cidr": f"{LIMITED_IP}/32", "user": LIMITED, "groups": ["limited"]},
    ]
    databases = {"pg": {"databases": {APPDB: {"permissions": ["readonly"]}}}}
    files.grants += [
        grant({"pg": databases, "pgflap": databases}, src=[DEV]),
        grant({"pg": databases}, limits={"max_conns": MAX_CONNS}, src=[LIMITED]),
    ]
    ports = {"pg": listener_port(files), "pgflap": listener_port(files, "pgflap")}
    # The event loop opens a spare descriptor (/dev/null, for running out of them) with its first
    # transport and keeps it: let a client connection make it before counting.
    warm = await asyncpg.connect(host=cluster.host, port=cluster.port, user="postgres", ssl=False)
    await warm.close()
    before = Baseline()
    gateway = await started_gateway(files)
    rt = gateway.runtime
    try:
        async with wedge_guard(90):
            with watching_problems() as problems:
                load = PgLoad(ports, tls_client)
                flapping = Flapping(gateway, files, ["pgflap"], random.Random(SEED + 3))
                try:
                    await load.run(count=PG_SOAK_CONNECTIONS, concurrency=16)
                finally:
                    await flapping.stop()
                assert not load.failures, "\n".join(load.failures[:20]) + f"\n{dict(load.outcomes)}"

                await settled("sessions", lambda: len(rt.sessions) == 0, lambda: repr(list(rt.sessions)))
                await settled("cancel keys", lambda: not rt.pg_cancel, lambda: repr(rt.pg_cancel))
                await settled(
                    "replaced configurations",
                    lambda: flapping.still_held() == 0,
                    lambda: str(flapping.still_held()),
                )
                await settled(
                    "limit leases",
                    lambda: rt.tracker.connections(LIMITED) == 0 and rt.tracker.connections(DEV) == 0,
                    lambda: (
                        f"{LIMITED}: {rt.tracker.connections(LIMITED)}, {DEV}: {rt.tracker.connections(DEV)}"
                    ),
                )

                def kept() -> int:
                    return sum(
                        len(roles.for_backend("127.0.0.1", cluster.port).pool)
                        for roles in rt.provisioners.values()
                    )

                await settled("kept backend sessions", lambda: kept() == 0, lambda: str(kept()))
                await assert_pg_slots_free(ports["pg"])
                assert await load.asyncpg_query(random.Random(0)) == "ok"
                await settled("sessions", lambda: len(rt.sessions) == 0, lambda: repr(list(rt.sessions)))
                rt.audit.flush()
                admitted, refused = check_audit(files.audit())
                assert admitted > PG_SOAK_CONNECTIONS // 3 and refused > PG_SOAK_CONNECTIONS // 20
                assert not problems.records, "\n".join(problems.records[:20])
                await pg_shutdown_under_load(gateway, files, load)
    finally:
        if not gateway.stopped.is_set():
            await gateway.shutdown(0.5)
    # The provisioners' admin pools grow on demand and close at shutdown: compare from here.
    await before.fds_back("file descriptors")
    await before.tasks_back("asyncio tasks")
