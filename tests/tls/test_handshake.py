"""Real TLS handshakes against ``CertificateSet.server_context()`` on uvloop.

Servers: ``proxy.streams.accept_tls`` on accepted sockets (what the gateway does), and
``asyncio.start_server(ssl=…)``. Clients: Python's ``ssl`` (blocking, in a thread, and asyncio
streams) and ``openssl s_client``. Every test checks what the *server* recorded: with TLS 1.3 a
client finishes its handshake before the server has judged its certificate, so the server side
is where a rejection is certain.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import socket
import ssl
import subprocess
import warnings
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import pytest
import uvloop
from cryptography import x509

from ferryman.identity.base import PeerInfo
from ferryman.identity.mtls import MtlsSource
from ferryman.proxy.streams import Conn, accept_tls, wrap_plain
from ferryman.tls import CertificateSet, ClientAuth, HandshakeInfo, parse_entry, peer_certificate
from tests.tls.certgen import DAY, NOW, Authority, Issued

HELLO = b"hello from ferryman\n"


@dataclass
class Pki:
    server_ca: Authority
    client_ca: Authority
    foreign_ca: Authority
    leaves: list[Issued]
    client: Issued
    expired_client: Issued
    foreign_client: Issued
    server_only_client: Issued
    dir: Path

    @property
    def client_ca_file(self) -> Path:
        return self.dir / "client-ca.pem"

    def certs(self) -> CertificateSet:
        return CertificateSet(
            parse_entry(leaf.cert_pem, leaf.key_pem, key=f"slot{i}") for i, leaf in enumerate(self.leaves)
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    server_ca = Authority("server CA")
    client_ca = Authority("client CA")
    foreign_ca = Authority("foreign CA")
    leaves = [
        server_ca.issue(cn="default", dns=("default.test",)),
        server_ca.issue(cn="multi", dns=("api.example.com", "db.example.com")),
        server_ca.intermediate().issue(cn="wild", dns=("*.apps.example.com",)),
    ]
    pki = Pki(
        server_ca=server_ca,
        client_ca=client_ca,
        foreign_ca=foreign_ca,
        leaves=leaves,
        client=client_ca.issue(cn="alice", emails=("alice@example.com",), ous=("dba",), usages=("client",)),
        expired_client=client_ca.issue(
            emails=("old@example.com",), not_before=NOW - 30 * DAY, not_after=NOW - DAY
        ),
        foreign_client=foreign_ca.issue(emails=("mallory@example.com",)),
        server_only_client=client_ca.issue(emails=("srv@example.com",), usages=("server",)),
        dir=directory,
    )
    client_ca.write(directory, "client-ca")
    server_ca.write(directory, "server-ca")
    return pki


# -- the server side -------------------------------------------------------------------------


class TlsServer:
    """Accepts connections, runs ``accept_tls`` and records each handshake's outcome."""

    def __init__(self, certs: CertificateSet, context: ssl.SSLContext) -> None:
        self.certs = certs
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port: int = self.listener.getsockname()[1]
        self.results: asyncio.Queue[HandshakeInfo | Exception] = asyncio.Queue()
        self.conns: list[Conn] = []

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(self.listener)
            sock.setblocking(False)
            try:
                conn = await accept_tls(sock, self.context, 5)
            except (ssl.SSLError, OSError, TimeoutError) as exc:
                # The transport owns (and has closed) the socket by now: do not close it again.
                self.results.put_nowait(exc)
                continue
            self.conns.append(conn)
            self.results.put_nowait(self.certs.handshake_info(conn))
            conn.write(HELLO)
            conn.close()

    async def result(self) -> HandshakeInfo | Exception:
        async with asyncio.timeout(10):
            return await self.results.get()

    async def handshake(self) -> HandshakeInfo:
        result = await self.result()
        assert isinstance(result, HandshakeInfo), result
        return result


Serve: TypeAlias = Callable[[CertificateSet, ssl.SSLContext], TlsServer]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    tasks: list[asyncio.Future[None]] = []
    servers: list[TlsServer] = []

    def start(certs: CertificateSet, context: ssl.SSLContext) -> TlsServer:
        server = TlsServer(certs, context)
        servers.append(server)
        tasks.append(asyncio.ensure_future(server.serve()))
        return server

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for server in servers:
        server.listener.close()


# -- clients ---------------------------------------------------------------------------------


@dataclass
class ClientResult:
    served: x509.Certificate | None = None
    alpn: str | None = None
    version: str | None = None
    data: bytes = b""
    error: Exception | None = None


def client_context(
    pki: Pki,
    *,
    cert: Issued | None = None,
    alpn: Sequence[str] = (),
    max_version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # the tests look at which certificate was served instead
    context.load_verify_locations(cadata=pki.server_ca.cert_pem.decode())
    if cert is not None:
        name = f"client-{id(cert)}"
        cert_file, key_file = cert.write(pki.dir, name)
        context.load_cert_chain(cert_file, key_file)
    if alpn:
        context.set_alpn_protocols(list(alpn))
    if max_version is not None:
        with warnings.catch_warnings():  # TLS 1.1 is deprecated: that is the point of the test
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            context.maximum_version = max_version
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let OpenSSL 3 speak TLS 1.1 at all
    return context


def blocking_client(port: int, context: ssl.SSLContext, sni: str | None) -> ClientResult:
    result = ClientResult()
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=sni) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
            result.served = x509.load_der_x509_certificate(der) if der else None
            result.alpn = tls.selected_alpn_protocol()
            result.version = tls.version()
            while chunk := tls.recv(4096):
                result.data += chunk
    except (ssl.SSLError, OSError) as exc:
        result.error = exc
    return result


async def connect(
    server: TlsServer,
    pki: Pki,
    sni: str | None = None,
    *,
    cert: Issued | None = None,
    alpn: Sequence[str] = (),
    max_version: ssl.TLSVersion | None = None,
) -> tuple[ClientResult, HandshakeInfo | Exception]:
    context = client_context(pki, cert=cert, alpn=alpn, max_version=max_version)
    client = await asyncio.to_thread(blocking_client, server.port, context, sni)
    return client, await server.result()


def served_cn(cert: x509.Certificate | None) -> str:
    assert cert is not None
    return str(cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


# -- SNI and ALPN ----------------------------------------------------------------------------


async def test_tests_run_on_uvloop() -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


@pytest.mark.parametrize(
    ("sni", "cn", "recorded", "key"),
    [
        ("api.example.com", "multi", "api.example.com", "slot1"),
        ("DB.Example.COM", "multi", "db.example.com", "slot1"),
        ("x.apps.example.com", "wild", "x.apps.example.com", "slot2"),
        ("a.b.apps.example.com", "default", "a.b.apps.example.com", "slot0"),
        ("unknown.test", "default", "unknown.test", "slot0"),
        (None, "default", None, "slot0"),
    ],
)
async def test_sni_chooses_the_certificate(
    pki: Pki, serve: Serve, sni: str | None, cn: str, recorded: str | None, key: str
) -> None:
    certs = pki.certs()
    server = serve(certs, certs.server_context())
    client, info = await connect(server, pki, sni)
    assert client.error is None and client.data == HELLO
    assert served_cn(client.served) == cn
    assert isinstance(info, HandshakeInfo)
    assert (info.sni, info.certificate, info.alpn, info.peer_cert_der) == (recorded, key, None, None)
    assert info.version == client.version == "TLSv1.3"


async def test_alpn_is_recorded_and_optional(pki: Pki, serve: Serve) -> None:
    certs = pki.certs()
    server = serve(certs, certs.server_context(alpn_protocols=["postgresql", "http/1.1"]))
    client, info = await connect(server, pki, "db.example.com", alpn=["http/1.1", "postgresql"])
    assert client.alpn == "postgresql"  # the server's preference
    assert isinstance(info, HandshakeInfo) and info.alpn == "postgresql"
    # A client offering nothing we serve still gets a session, without ALPN.
    client, info = await connect(server, pki, "db.example.com", alpn=["h2"])
    assert client.error is None and client.alpn is None
    assert isinstance(info, HandshakeInfo) and info.alpn is None


async def test_asyncio_streams_on_uvloop(pki: Pki) -> None:
    certs = pki.certs()
    context = certs.server_context(alpn_protocols=["postgresql"])
    recorded: list[HandshakeInfo] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert type(writer.get_extra_info("ssl_object")) is ssl.SSLObject
        recorded.append(certs.handshake_info(writer.transport))
        writer.write(HELLO)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    try:
        for sni, cn in (("api.example.com", "multi"), ("q.apps.example.com", "wild"), ("", "default")):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context(pki, alpn=["postgresql"]), server_hostname=sni
            )
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            assert served_cn(x509.load_der_x509_certificate(der)) == cn
            assert await reader.read() == HELLO
            writer.close()
            await writer.wait_closed()
            info = recorded.pop()
            assert (info.sni, info.alpn) == (sni or None, "postgresql")
    finally:
        server.close()
        await server.wait_closed()


# -- openssl s_client ------------------------------------------------------------------------

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl binary not installed")
PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n", re.DOTALL)


def s_client(port: int, *args: str) -> subprocess.CompletedProcess[bytes]:
    assert OPENSSL is not None
    return subprocess.run(
        [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=10,
        check=False,
    )


@needs_openssl
@pytest.mark.parametrize(
    ("args", "cn", "sans", "recorded"),
    [
        (("-servername", "db.example.com"), "multi", ["api.example.com", "db.example.com"], "db.example.com"),
        (("-servername", "z.apps.example.com"), "wild", ["*.apps.example.com"], "z.apps.example.com"),
        (("-servername", "nobody.test"), "default", ["default.test"], "nobody.test"),
        (("-noservername",), "default", ["default.test"], None),
    ],
)
async def test_openssl_s_client(
    pki: Pki, serve: Serve, args: tuple[str, ...], cn: str, sans: list[str], recorded: str | None
) -> None:
    certs = pki.certs()
    server = serve(certs, certs.server_context(alpn_protocols=["postgresql"]))
    done = await asyncio.to_thread(s_client, server.port, *args, "-alpn", "postgresql")
    info = await server.handshake()
    out = done.stdout
    assert re.search(rb"^subject=.*CN ?= ?" + cn.encode() + rb"$", out, re.MULTILINE), out
    assert b"ALPN protocol: postgresql" in out
    served = x509.load_pem_x509_certificate(PEM_CERT.findall(out)[0])
    names = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == sans
    assert (info.sni, info.alpn) == (recorded, "postgresql")


@needs_openssl
async def test_openssl_s_client_with_client_certificate(pki: Pki, serve: Serve) -> None:
    certs = pki.certs()
    server = serve(certs, certs.server_context(client_auth="need", ca_file=pki.client_ca_file))
    cert_file, key_file = pki.client.write(pki.dir, "s-client")
    await asyncio.to_thread(
        s_client,
        server.port,
        "-servername",
        "api.example.com",
        "-cert",
        str(cert_file),
        "-key",
        str(key_file),
    )
    info = await server.handshake()
    assert info.peer_cert_der == pki.client.der
    identity = MtlsSource().identity_from_der(info.peer_cert_der)
    assert (identity.user, identity.groups) == ("alice@example.com", ("dba",))


@needs_openssl
async def test_openssl_tls_1_1_is_refused(pki: Pki, serve: Serve) -> None:
    certs = pki.certs()
    server = serve(certs, certs.server_context())
    done = await asyncio.to_thread(s_client, server.port, "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0")
    assert done.returncode != 0
    result = await server.result()
    assert isinstance(result, ssl.SSLError) and "UNSUPPORTED_PROTOCOL" in str(result)


# -- versions --------------------------------------------------------------------------------


async def test_tls_1_1_client_is_refused(pki: Pki, serve: Serve) -> None:
    certs = pki.certs()
    server = serve(certs, certs.server_context())
    client, result = await connect(server, pki, "db.example.com", max_version=ssl.TLSVersion.TLSv1_1)
    assert isinstance(client.error, ssl.SSLError) and client.version is None
    assert isinstance(result, ssl.SSLError) and "UNSUPPORTED_PROTOCOL" in str(result)


async def test_tls_1_2_client_is_served_by_sni_too(pki: Pki, serve: Serve) -> None:
    certs = pki.certs()
    server = serve(certs, certs.server_context())
    client, info = await connect(server, pki, "x.apps.example.com", max_version=ssl.TLSVersion.TLSv1_2)
    assert client.data == HELLO and served_cn(client.served) == "wild"
    assert isinstance(info, HandshakeInfo) and (info.version, info.sni) == ("TLSv1.2", "x.apps.example.com")


# -- replacement -----------------------------------------------------------------------------


async def test_replace_changes_what_the_next_handshake_gets(pki: Pki, serve: Serve) -> None:
    certs = pki.certs()
    server = serve(certs, certs.server_context())
    before, _ = await connect(server, pki, "db.example.com")
    assert served_cn(before.served) == "multi"

    renewed = pki.server_ca.issue(cn="multi-renewed", dns=("db.example.com",))
    certs.replace("slot1", renewed.cert_pem, renewed.key_pem)
    after, info = await connect(server, pki, "db.example.com")
    assert after.served == renewed.cert
    assert isinstance(info, HandshakeInfo) and info.certificate == "slot1"
    # The slot's names are the new certificate's: api.example.com now falls to the default.
    other, _ = await connect(server, pki, "api.example.com")
    assert served_cn(other.served) == "default"

    new_default = pki.server_ca.issue(cn="default-renewed", dns=("default.test",))
    certs.replace(0, new_default.cert_pem, new_default.key_pem)
    for sni in (None, "nobody.test"):
        client, _ = await connect(server, pki, sni)
        assert served_cn(client.served) == "default-renewed"


async def test_replace_reaches_every_context_of_the_set(pki: Pki, serve: Serve) -> None:
    certs = pki.certs()
    plain = serve(certs, certs.server_context())
    mutual = serve(certs, certs.server_context(client_auth="need", ca_file=pki.client_ca_file))
    renewed = pki.server_ca.issue(cn="renewed", dns=("api.example.com",))
    certs.replace("slot1", renewed.cert_pem, renewed.key_pem)
    client, _ = await connect(plain, pki, "api.example.com")
    assert served_cn(client.served) == "renewed"
    client, info = await connect(mutual, pki, "api.example.com", cert=pki.client)
    assert served_cn(client.served) == "renewed"
    assert isinstance(info, HandshakeInfo) and info.peer_cert_der == pki.client.der


# -- client certificates ---------------------------------------------------------------------


def rejected(client: ClientResult, result: HandshakeInfo | Exception) -> bool:
    # asyncio and uvloop close without flushing the server's alert, so the client sees an EOF:
    # during its handshake (TLS 1.2), or on its first read (TLS 1.3). Either way, no data.
    return isinstance(result, ssl.SSLError) and client.data == b""


@pytest.mark.parametrize("sni", [None, "x.apps.example.com"])  # default and SNI-switched contexts
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
async def test_need(pki: Pki, serve: Serve, sni: str | None, version: ssl.TLSVersion) -> None:
    certs = pki.certs()
    server = serve(certs, certs.server_context(client_auth="need", ca_file=pki.client_ca_file))

    async def attempt(cert: Issued | None) -> tuple[ClientResult, HandshakeInfo | Exception]:
        return await connect(server, pki, sni, cert=cert, max_version=version)

    for bad in (None, pki.foreign_client, pki.expired_client, pki.server_only_client):
        client, result = await attempt(bad)
        assert rejected(client, result), (bad, client, result)

    client, info = await attempt(pki.client)
    assert client.error is None and client.data == HELLO
    assert isinstance(info, HandshakeInfo) and info.peer_cert_der == pki.client.der


async def test_expired_client_certificate_reason(pki: Pki, serve: Serve) -> None:
    certs = pki.certs()
    server = serve(certs, certs.server_context(client_auth="need", ca_file=pki.client_ca_file))
    _, result = await connect(server, pki, cert=pki.expired_client)
    assert isinstance(result, ssl.SSLError) and "certificate has expired" in str(result)
    _, result = await connect(server, pki, cert=pki.foreign_client)
    assert isinstance(result, ssl.SSLError) and "unable to get local issuer certificate" in str(result)


@pytest.mark.parametrize("sni", [None, "api.example.com"])
async def test_want(pki: Pki, serve: Serve, sni: str | None) -> None:
    certs = pki.certs()
    server = serve(certs, certs.server_context(client_auth="want", ca_file=pki.client_ca_file))

    client, info = await connect(server, pki, sni)
    assert client.data == HELLO
    assert isinstance(info, HandshakeInfo) and info.peer_cert_der is None

    client, info = await connect(server, pki, sni, cert=pki.client)
    assert client.data == HELLO
    assert isinstance(info, HandshakeInfo) and info.peer_cert_der == pki.client.der

    # "want" is not "ignore": a certificate that is sent must verify (OpenSSL CERT_OPTIONAL).
    for bad in (pki.foreign_client, pki.expired_client):
        client, result = await connect(server, pki, sni, cert=bad)
        assert rejected(client, result)


async def test_none_never_asks_for_a_certificate(pki: Pki, serve: Serve) -> None:
    certs = pki.certs()
    server = serve(certs, certs.server_context(client_auth="none", ca_file=pki.client_ca_file))
    client, info = await connect(server, pki, "api.example.com", cert=pki.foreign_client)
    assert client.data == HELLO
    assert isinstance(info, HandshakeInfo) and info.peer_cert_der is None


async def test_peer_certificate_accepts_conn_transport_and_ssl_object(pki: Pki, serve: Serve) -> None:
    certs = pki.certs()
    server = serve(certs, certs.server_context(client_auth="need", ca_file=pki.client_ca_file))
    await connect(server, pki, "db.example.com", cert=pki.client)
    conn = server.conns[-1]
    ssl_object = conn.extra("ssl_object")
    assert isinstance(ssl_object, ssl.SSLObject) and conn.transport is not None
    assert peer_certificate(conn) == peer_certificate(conn.transport) == peer_certificate(ssl_object)
    assert peer_certificate(conn) == pki.client.der
    peer = PeerInfo("127.0.0.1", 1, peer_cert_der=peer_certificate(conn))
    identity = await MtlsSource(user_from="cn").identify(peer)
    assert identity is not None and identity.user == "alice"


async def test_plaintext_has_no_tls_info(pki: Pki) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    b.setblocking(False)
    conn = await wrap_plain(b, server_side=True)
    try:
        assert peer_certificate(conn) is None
        with pytest.raises(ValueError, match="not a TLS connection"):
            pki.certs().handshake_info(conn)
    finally:
        conn.close()
        a.close()


async def test_handshake_info_refuses_a_foreign_context(pki: Pki, serve: Serve) -> None:
    certs, other = pki.certs(), pki.certs()
    server = serve(certs, certs.server_context())
    await connect(server, pki, "db.example.com")
    with pytest.raises(ValueError, match="did not go through this certificate set"):
        other.handshake_info(server.conns[-1])


def test_client_auth_modes_map_to_openssl() -> None:
    from ferryman.tls import VERIFY_MODES

    expected: dict[ClientAuth, ssl.VerifyMode] = {
        "none": ssl.CERT_NONE,
        "want": ssl.CERT_OPTIONAL,
        "need": ssl.CERT_REQUIRED,
    }
    assert expected == VERIFY_MODES


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
async def test_resumed_session_is_recorded_too(pki: Pki, serve: Serve, version: ssl.TLSVersion) -> None:
    certs = pki.certs()
    server = serve(certs, certs.server_context(client_auth="need", ca_file=pki.client_ca_file))
    context = client_context(pki, cert=pki.client, max_version=version)

    def two_connections() -> list[bool | None]:
        session: ssl.SSLSession | None = None
        reused: list[bool | None] = []
        for _ in range(2):
            with (
                socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
                context.wrap_socket(raw, server_hostname="db.example.com", session=session) as tls,
            ):
                while tls.recv(4096):
                    pass
                reused.append(tls.session_reused)
                session = tls.session
        return reused

    assert await asyncio.to_thread(two_connections) == [False, True]
    for _ in range(2):
        info = await server.handshake()
        # The certificate of a resumed session was verified when the session was made, not
        # now: MtlsSource re-checks its validity window for that reason.
        assert (info.sni, info.certificate, info.peer_cert_der) == ("db.example.com", "slot1", pki.client.der)


def _memory_handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, session: ssl.SSLSession | None
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname="db.example.com", session=session)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(5):
        for obj in (c, s):
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    with contextlib.suppress(ssl.SSLWantReadError):
        c.read(1)  # takes in the session ticket
    return c, s


def test_one_ticket_still_resumes_with_client_certificates(pki: Pki) -> None:
    certs = pki.certs()
    server = certs.server_context(client_auth="need", ca_file=pki.client_ca_file)
    client = client_context(pki, cert=pki.client)
    first, _ = _memory_handshake(server, client, None)
    assert first.session is not None and not first.session_reused
    second, served = _memory_handshake(server, client, first.session)
    assert second.session_reused and served.session_reused
    assert peer_certificate(served) == pki.client.der
    assert certs.handshake_info(served).sni == "db.example.com"
