"""PostgreSQL mode: what the start-up negotiates (SPEC §5 step 1, §5.5).

* Protocol version: a StartupMessage asking for 3.1/3.2 or carrying ``_pq_.*`` options gets
  NegotiateProtocolVersion (version 3.0, the ``_pq_`` names) before AuthenticationOk, exactly
  as PostgreSQL 15/16 answers, and then a working 3.0 session; ``_pq_.*`` never reaches the
  backend. libpq 18 asking for 3.2 ends up on 3.0; libpq 15 (psql) and asyncpg see no change.
  Major versions other than 3 are refused with PostgreSQL's answer (0A000, "unsupported frontend
  protocol 9.0: server supports 3.0 to 3.0").
* Direct TLS (``sslnegotiation=direct``) needs ALPN ``postgresql``, as in PostgreSQL 17: a
  client offering only ``h2`` (or nothing) is refused with 08P01; the SSLRequest path needs no
  ALPN.
* Start-up parameters in another encoding than UTF-8 reach the backend byte for byte (the
  backend answers as it answers the same bytes sent directly); a database name that is not
  UTF-8 is refused (22021), a user name is ignored as always, a preset request is 22023.

Real throwaway PostgreSQL clusters and a real gateway; crafted bytes where no client library
sends what we need; the start-up reader itself over a socket pair.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import struct
from pathlib import Path

import asyncpg
import psycopg
import pytest
import trustme

from ferryman import pgwire
from ferryman.errors import InvalidParameter
from ferryman.proxy.pgstartup import ClientSide, Startup, extract_presets, read_startup
from tests.pg.conftest import APPDB, listener_port, needs_psql, pg_files, pg_grant
from tests.support.gateway import running_gateway
from tests.support.pgcluster import PgCluster

Message = tuple[bytes, bytes]

PROTOCOL_3_1 = pgwire.PROTOCOL_3_0 | 1
PROTOCOL_3_2 = pgwire.PROTOCOL_3_2


def startup(params: list[tuple[bytes, bytes]], version: int = pgwire.PROTOCOL_3_0) -> bytes:
    body = struct.pack("!I", version) + b"".join(k + b"\0" + v + b"\0" for k, v in params) + b"\0"
    return struct.pack("!I", len(body) + 4) + body


def negotiate(version: int, names: list[bytes]) -> bytes:
    body = struct.pack("!ii", version, len(names)) + b"".join(n + b"\0" for n in names)
    return b"v" + struct.pack("!i", len(body) + 4) + body


def fields(body: bytes) -> dict[str, bytes]:
    """The fields of an ErrorResponse body, by code."""
    return {f[:1].decode(): f[1:] for f in body.split(b"\0") if f}


class Raw:
    """A hand-driven PostgreSQL client: exact bytes out, whole messages in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, *, tls: ssl.SSLContext | None = None) -> Raw:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=tls, server_hostname="pg.test" if tls else None
        )
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def message(self) -> Message:
        async with asyncio.timeout(15):
            head = await self.reader.readexactly(5)
            (length,) = struct.unpack("!i", head[1:])
            return head[:1], await self.reader.readexactly(length - 4)

    async def until_ready(self) -> list[Message]:
        """Messages up to and including ReadyForQuery, or up to an ErrorResponse and the close."""
        out: list[Message] = []
        while True:
            try:
                kind, body = await self.message()
            except asyncio.IncompleteReadError:
                return out
            out.append((kind, body))
            if kind == b"Z":
                return out

    async def query(self, sql: bytes) -> list[bytes | None]:
        """The first row of a simple query, column by column, as the server's bytes."""
        await self.send(b"Q" + struct.pack("!i", len(sql) + 5) + sql + b"\0")
        row: list[bytes | None] = []
        for kind, body in await self.until_ready():
            assert kind != b"E", fields(body)
            if kind == b"D" and not row:
                (count,) = struct.unpack("!h", body[:2])
                pos = 2
                for _ in range(count):
                    (size,) = struct.unpack("!i", body[pos : pos + 4])
                    pos += 4
                    row.append(None if size < 0 else body[pos : pos + size])
                    pos += max(size, 0)
        return row

    async def close(self) -> None:
        self.writer.write(b"X\0\0\0\x04")
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


def kinds(messages: list[Message]) -> list[bytes]:
    return [kind for kind, _ in messages]


# --- the start-up reader on its own (no PostgreSQL needed) ------------------------------------


async def _read_over_socketpair(packet: bytes) -> tuple[Startup, bytes]:
    """Run read_startup on one end of a socket pair; what it sent back, in order."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    try:
        theirs.sendall(packet)
        server = pgwire.ServerConnection()
        result = await read_startup(ClientSide(ours), server, tls_mode="off", tls=None, handshake_timeout=5)
        assert isinstance(result, Startup)
        theirs.setblocking(False)
        try:
            sent = theirs.recv(65536)
        except BlockingIOError:
            sent = b""
        # The codec agrees that authentication may go on now (proxy.pg sends AuthenticationOk).
        server.send(pgwire.AuthenticationOk())
        return result, sent
    finally:
        ours.close()
        theirs.close()


@pytest.mark.parametrize(
    ("version", "options", "answer"),
    [
        (PROTOCOL_3_2, [b"_pq_.a", b"_pq_.b"], negotiate(pgwire.PROTOCOL_3_0, [b"_pq_.a", b"_pq_.b"])),
        (PROTOCOL_3_1, [], negotiate(pgwire.PROTOCOL_3_0, [])),
        (pgwire.PROTOCOL_3_0, [b"_pq_.x"], negotiate(pgwire.PROTOCOL_3_0, [b"_pq_.x"])),
        (pgwire.PROTOCOL_3_0, [], b""),
    ],
)
async def test_start_up_reader_negotiates_before_returning(
    version: int, options: list[bytes], answer: bytes
) -> None:
    params = [(b"user", b"u"), (b"database", b"d"), *((o, b"1") for o in options)]
    params.append((b"application_name", b"app"))
    result, sent = await _read_over_socketpair(startup(params, version))
    assert sent == answer  # NegotiateProtocolVersion, 3.0 as a whole version word, or nothing
    assert result.forward == {"application_name": "app"}  # no _pq_.*, user or database


def test_protocol_options_are_never_forwarded() -> None:
    presets, forward = extract_presets(
        {"user": "u", "_pq_.x": "1", "_pq_": "kept: not an option name", "ferryman_presets": "readonly"}
    )
    assert presets == "readonly"
    assert forward == {"_pq_": "kept: not an option name"}


async def test_start_up_reader_keeps_foreign_bytes_and_refuses_a_foreign_database() -> None:
    params = [
        (b"user", b"\xe9ric"),
        (b"database", b"appdb"),
        (b"application_name", b"caf\xe9"),
        (b"options", b"-c search_path=caf\xe9 -c ferryman.presets=readonly"),
    ]
    result, _ = await _read_over_socketpair(startup(params))
    assert result.requested_presets == "readonly"
    forwarded = pgwire.StartupMessage(result.forward).encode()
    assert b"application_name\0caf\xe9\0" in forwarded
    assert b"options\0-c search_path=caf\xe9\0" in forwarded

    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.sendall(startup([(b"user", b"u"), (b"database", b"caf\xe9s")]))
    with pytest.raises(InvalidParameter) as info:
        await read_startup(
            ClientSide(ours), pgwire.ServerConnection(), tls_mode="off", tls=None, handshake_timeout=5
        )
    ours.close()
    theirs.close()
    assert info.value.sqlstate == "22021"
    assert str(info.value) == 'invalid byte sequence for encoding "UTF8": 0xe9 (in the database name)'


# --- through a real gateway -------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    ca = trustme.CA()
    cert = ca.issue_cert("pg.test")
    d = tmp_path_factory.mktemp("negotiation-pki")
    out = {"ca": str(d / "ca.pem"), "cert": str(d / "cert.pem"), "key": str(d / "key.pem")}
    ca.cert_pem.write_to_path(out["ca"])
    cert.cert_chain_pems[0].write_to_path(out["cert"])
    cert.private_key_pem.write_to_path(out["key"])
    return out


@pytest.mark.pg
async def test_newer_protocol_and_options_are_negotiated_down_to_a_working_session(
    tmp_path: Path, cluster: PgCluster
) -> None:
    files = pg_files(tmp_path, cluster, prefix="ng_", tls_mode="off")
    files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}))
    cases = [
        (PROTOCOL_3_2, [b"_pq_.foo"]),
        (PROTOCOL_3_2, []),
        (PROTOCOL_3_1, []),
        (pgwire.PROTOCOL_3_0, [b"_pq_.a", b"_pq_.b"]),
        (pgwire.PROTOCOL_3_0, []),
    ]
    async with running_gateway(files):
        port = listener_port(files)
        for version, options in cases:
            client = await Raw.open(port)
            params = [(b"user", b"x"), (b"database", APPDB.encode()), *((o, b"on") for o in options)]
            await client.send(startup(params, version))
            messages = await client.until_ready()
            expected = (
                [negotiate(pgwire.PROTOCOL_3_0, options)] if version != pgwire.PROTOCOL_3_0 or options else []
            )
            got = [b"v" + struct.pack("!i", len(body) + 4) + body for kind, body in messages if kind == b"v"]
            assert got == expected, (version, options)
            # NegotiateProtocolVersion first, then AuthenticationOk: the client knows the
            # session is 3.0 before it believes it is in.
            start = 1 if expected else 0
            assert messages[start] == (b"R", b"\0\0\0\0"), messages
            assert kinds(messages)[-1] == b"Z"
            # A 3.0 session: the BackendKeyData key is 4 bytes, and queries work.
            key = next(body for kind, body in messages if kind == b"K")
            assert len(key) == 8
            assert await client.query(b"select 1") == [b"1"]
            # _pq_.* did not reach the backend as a setting (it would be a placeholder GUC).
            for option in options:
                assert await client.query(b"select current_setting('" + option + b"', true)") == [None]
            await client.close()


@pytest.mark.pg
async def test_libpq_18_asking_for_3_2_gets_3_0_and_others_are_unaffected(
    tmp_path: Path, cluster: PgCluster
) -> None:
    files = pg_files(tmp_path, cluster, prefix="ng_", tls_mode="off")
    files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}))
    async with running_gateway(files):
        port = listener_port(files)
        base = {"host": "127.0.0.1", "port": port, "dbname": APPDB, "user": "x", "sslmode": "disable"}
        if psycopg.pq.version() >= 180000:
            # max_protocol_version=3.2: libpq 18 sends 3.2, reads NegotiateProtocolVersion and
            # goes on in 3.0 (with a bare "0" there it would refuse: "downgrade to pre-3.0").
            async with await psycopg.AsyncConnection.connect(**base, max_protocol_version="3.2") as conn:
                assert conn.info.full_protocol_version == 30000
                assert await (await conn.execute("select 41 + 1")).fetchone() == (42,)
        async with await psycopg.AsyncConnection.connect(**base) as conn:
            assert await (await conn.execute("select 1")).fetchone() == (1,)
        apg = await asyncpg.connect(host="127.0.0.1", port=port, user="x", database=APPDB, ssl=False)
        assert await apg.fetchval("select 2") == 2
        await apg.close()
        if shutil.which("psql") is not None:
            proc = await asyncio.create_subprocess_exec(
                "psql",
                f"host=127.0.0.1 port={port} dbname={APPDB} user=x sslmode=disable connect_timeout=10",
                "-XAtc",
                "select 3",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                stdin=asyncio.subprocess.DEVNULL,
            )
            async with asyncio.timeout(30):
                out, err = await proc.communicate()
            assert (proc.returncode, out.strip()) == (0, b"3"), err


@pytest.mark.pg
@pytest.mark.parametrize("version", [2 << 16, 4 << 16, 3 << 16 | 0xFFFF])
async def test_other_major_versions_are_refused(tmp_path: Path, cluster: PgCluster, version: int) -> None:
    files = pg_files(tmp_path, cluster, prefix="ng_", tls_mode="off")
    files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}))
    async with running_gateway(files):
        client = await Raw.open(listener_port(files))
        await client.send(startup([(b"user", b"x"), (b"database", APPDB.encode())], version))
        messages = await client.until_ready()
        await client.close()
    if version >> 16 == 3:  # 3.65535: a newer minor, negotiated down like 3.2
        assert kinds(messages)[:2] == [b"v", b"R"]
        return
    assert kinds(messages) == [b"E"]
    error = fields(messages[0][1])
    assert error["C"] == b"0A000", error
    major, minor = version >> 16, version & 0xFFFF
    assert error["M"] == f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0".encode()


def _direct_tls_context(ca: str, alpn: list[str] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca)
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context


@pytest.mark.pg
@pytest.mark.parametrize(
    ("alpn", "accepted"),
    [(["postgresql"], True), (["h2", "postgresql"], True), (["h2"], False), (None, False)],
)
async def test_direct_tls_needs_alpn_postgresql(
    tmp_path: Path, cluster: PgCluster, pki: dict[str, str], alpn: list[str] | None, accepted: bool
) -> None:
    files = pg_files(
        tmp_path, cluster, prefix="ng_", tls_mode="require", cert_file=pki["cert"], key_file=pki["key"]
    )
    files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}))
    async with running_gateway(files):
        port = listener_port(files)
        client = await Raw.open(port, tls=_direct_tls_context(pki["ca"], alpn))
        tls_object = client.writer.get_extra_info("ssl_object")
        # OpenSSL's fallback: offered only h2, the handshake completes with no ALPN at all.
        assert tls_object.selected_alpn_protocol() == ("postgresql" if accepted else None)
        await client.send(startup([(b"user", b"x"), (b"database", APPDB.encode())]))
        messages = await client.until_ready()
        if accepted:
            assert kinds(messages)[0] == b"R" and kinds(messages)[-1] == b"Z"
            assert await client.query(b"select 1") == [b"1"]
        else:
            # PostgreSQL 17's wording; we say it over the TLS channel instead of only closing.
            assert kinds(messages) == [b"E"]
            error = fields(messages[0][1])
            assert error["C"] == b"08P01"
            assert (
                error["M"]
                == b"received direct SSL connection request without ALPN protocol negotiation extension"
            )
        await client.close()
        if not accepted:
            # The SSLRequest path needs no ALPN (libpq before 17 offers none).
            context = _direct_tls_context(pki["ca"], alpn)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(struct.pack("!ii", 8, 80877103))
            await writer.drain()
            assert await reader.readexactly(1) == b"S"
            await writer.start_tls(context, server_hostname="pg.test")
            client = Raw(reader, writer)
            await client.send(startup([(b"user", b"x"), (b"database", APPDB.encode())]))
            assert kinds(await client.until_ready())[-1] == b"Z"
            assert await client.query(b"select 1") == [b"1"]
            await client.close()


@pytest.mark.pg
async def test_psql_with_sslmode_require_needs_no_alpn(
    tmp_path: Path, cluster: PgCluster, pki: dict[str, str]
) -> None:
    needs_psql()
    files = pg_files(
        tmp_path, cluster, prefix="ng_", tls_mode="require", cert_file=pki["cert"], key_file=pki["key"]
    )
    files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}))
    async with running_gateway(files):
        proc = await asyncio.create_subprocess_exec(
            "psql",
            f"host=127.0.0.1 port={listener_port(files)} dbname={APPDB} user=x sslmode=require",
            "-XAtc",
            "select 1",  # sslmode=require: libpq 15 refuses to go on without TLS (it offers no ALPN)
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
        )
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
    assert (proc.returncode, out.strip()) == (0, b"1"), err


async def _first_row(port: int, params: list[tuple[bytes, bytes]], sql: bytes) -> list[bytes | None]:
    client = await Raw.open(port)
    await client.send(startup(params))
    messages = await client.until_ready()
    assert kinds(messages)[-1] == b"Z", [fields(b) for k, b in messages if k == b"E"]
    try:
        return await client.query(sql)
    finally:
        await client.close()


@pytest.mark.pg
async def test_parameters_in_another_encoding_reach_the_backend_unchanged(
    tmp_path: Path, cluster: PgCluster
) -> None:
    """A LATIN1 client's application_name and a custom setting: the backend answers through the
    gateway exactly what it answers when the same bytes come to it directly (PostgreSQL shows
    application_name's non-ASCII bytes as '?', and keeps the custom setting's bytes)."""
    files = pg_files(tmp_path, cluster, prefix="ng_", tls_mode="off")
    files.grants.append(pg_grant({APPDB: {"permissions": ["readonly"]}}))
    foreign = [(b"application_name", b"caf\xe9 cr\xe8me"), (b"ferryman_test.label", b"\xff\xfe caf\xe9")]
    sql = b"select current_setting('application_name'), current_setting('ferryman_test.label')"
    direct = await _first_row(
        cluster.port, [(b"user", cluster.superuser.encode()), (b"database", APPDB.encode()), *foreign], sql
    )
    assert direct == [b"caf? cr?me", b"\xff\xfe caf\xe9"]  # what PostgreSQL itself makes of them
    async with running_gateway(files):
        port = listener_port(files)
        through = await _first_row(port, [(b"user", b"x"), (b"database", APPDB.encode()), *foreign], sql)
        assert through == direct
        # The client's user name is not used (the role comes from the identity), whatever its bytes.
        who = await _first_row(
            port, [(b"user", b"\xe9ric"), (b"database", APPDB.encode())], b"select current_user"
        )
        assert who == [b"ng_dev_localhost__appdb"]


@pytest.mark.pg
@pytest.mark.parametrize(
    ("params", "code", "fragment"),
    [
        (
            [(b"user", b"x"), (b"database", b"caf\xe9")],
            b"22021",
            b'invalid byte sequence for encoding "UTF8": 0xe9',
        ),
        ([(b"user", b"\xff\xfe")], b"22021", b"0xff"),  # the database defaults to the user name
        (
            [(b"user", b"x"), (b"database", APPDB.encode()), (b"ferryman_presets", b"read\xe9")],
            b"22023",
            b"unknown preset",
        ),
    ],
)
async def test_identifiers_we_interpret_are_handled_safely(
    tmp_path: Path, cluster: PgCluster, params: list[tuple[bytes, bytes]], code: bytes, fragment: bytes
) -> None:
    files = pg_files(tmp_path, cluster, prefix="ng_", tls_mode="off")
    files.grants.append(pg_grant({"*": {"permissions": ["readonly"]}}))
    async with running_gateway(files):
        client = await Raw.open(listener_port(files))
        await client.send(startup(params))
        messages = await client.until_ready()
        await client.close()
        assert kinds(messages) == [b"E"]
        error = fields(messages[0][1])
        assert (error["S"], error["C"]) == (b"FATAL", code)
        assert fragment in error["M"]
        # The next client is served normally.
        apg = await asyncpg.connect(
            host="127.0.0.1", port=listener_port(files), user="x", database=APPDB, ssl=False
        )
        assert await apg.fetchval("select 1") == 1
        await apg.close()
    refused = [r for r in files.audit() if r.get("allowed") is False]
    assert len(refused) == 1, files.audit()  # audited like any refusal (the audit file is UTF-8)
