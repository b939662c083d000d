"""Real peers for the TLS / SNI / Host routing tests (SPEC §6): backends that say who they are,
and the client side of those conversations.

- :class:`NamedTLSServer` -- an asyncio TLS server with its own certificate (one the gateway
  never sees) that records the SNI and ALPN it was offered, greets with its name and echoes.
- :class:`NamedHTTPServer` -- answers every request with ``HTTP/1.1 200 OK`` and its name.
- :class:`ProxyProtocolServer` -- reads a PROXY header with ``ferryman.proxyproto`` and echoes.
- :func:`tls_client` -- a Python ``ssl`` client that reports what the server presented.

Nothing here stands in for ferryman itself.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from ferryman import proxyproto
from tests.support.gateway import GatewayFiles, free_port
from tests.tls.certgen import Authority, Issued


def add_routed_listener(files: GatewayFiles, name: str, **options: Any) -> int:
    """A listener without a fixed ``backend``: only ``rules`` / ``sni.forwards_to`` route it."""
    port = int(options.pop("port", None) or free_port())
    files.listeners.append({"name": name, "listen": f"127.0.0.1:{port}", **options})
    return port


def write_pair(issued: Issued, directory: Path, stem: str) -> dict[str, str]:
    """``{cert_file, key_file}`` for a config entry, written to ``directory``."""
    cert, key = issued.write(directory, stem)
    return {"cert_file": str(cert), "key_file": str(key)}


def subject_cn(cert: x509.Certificate | None) -> str | None:
    if cert is None:
        return None
    values = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    return str(values[0].value) if values else None


class _Server:
    """Common start/stop of an asyncio server on a loopback port."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0
        self.connections = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def _start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.server = await asyncio.start_server(self._accepted, "127.0.0.1", 0, ssl=ssl_context)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        try:
            await self.handle(reader, writer)
        except (ConnectionError, OSError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        if self.server is None:
            return
        self.server.close()
        for writer in self._writers:
            writer.close()
        await self.server.wait_closed()
        self.server = None

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class NamedTLSServer(_Server):
    """A TLS backend: sends ``<name>\\n`` after the handshake, then echoes.

    ``snis`` / ``alpns`` list, per handshake, the server name and protocol the client offered
    and chose -- what a backend behind a passthrough sees only if the ClientHello arrived intact.
    """

    def __init__(self, name: str, issued: Issued, directory: Path, *, alpn: Sequence[str] = ()) -> None:
        super().__init__()
        self.name = name
        self.issued = issued
        self.snis: list[str | None] = []
        self.alpns: list[str | None] = []
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert, key = issued.write(directory, f"backend-{name}")
        self.context.load_cert_chain(cert, key)
        if alpn:
            self.context.set_alpn_protocols(list(alpn))

        def on_sni(_obj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
            self.snis.append(server_name)

        self.context.sni_callback = on_sni

    async def __aenter__(self) -> NamedTLSServer:
        await self._start(self.context)
        return self

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        self.alpns.append(ssl_object.selected_alpn_protocol() if ssl_object else None)
        writer.write(self.name.encode() + b"\n")
        await writer.drain()
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


class NamedHTTPServer(_Server):
    """A tiny HTTP/1.1 server answering ``200 OK`` with its name; records the Host it saw."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.hosts: list[str] = []

    async def __aenter__(self) -> NamedHTTPServer:
        await self._start()
        return self

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        for line in head.split(b"\r\n")[1:]:
            if line.lower().startswith(b"host:"):
                self.hosts.append(line[5:].strip().decode())
        body = f"hello from {self.name}\n".encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()


class ProxyProtocolServer(_Server):
    """A backend that requires a PROXY header (parsed with ferryman.proxyproto), then echoes."""

    def __init__(self) -> None:
        super().__init__()
        self.headers: list[proxyproto.ProxyHeader] = []

    async def __aenter__(self) -> ProxyProtocolServer:
        await self._start()
        return self

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffer = b""
        while (header := proxyproto.parse_proxy_header(buffer)) is proxyproto.NEED_DATA:
            chunk = await reader.read(65536)
            if not chunk:
                return
            buffer += chunk
        assert isinstance(header, proxyproto.ProxyHeader)
        self.headers.append(header)
        rest = buffer[header.length :]
        if rest:
            writer.write(rest)
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


class ClosingServer(_Server):
    """Accepts and hangs up at once (a target whose TLS handshake fails); counts accepts."""

    async def __aenter__(self) -> ClosingServer:
        await self._start()
        return self

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        return None


@dataclass
class TLSResult:
    greeting: bytes = b""
    echoed: bytes = b""
    served: x509.Certificate | None = None
    alpn: str | None = None
    version: str | None = None
    local_port: int = 0
    error: BaseException | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def client_context(
    ca: Authority | None,
    *,
    check_hostname: bool = True,
    alpn: Sequence[str] = (),
    cert: Issued | None = None,
    directory: Path | None = None,
    max_version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """A verifying client context trusting only ``ca`` (nothing when ``ca`` is None)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is not None:
        context.load_verify_locations(cadata=ca.cert_pem.decode())
    context.check_hostname = check_hostname
    if not check_hostname and ca is None:
        context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(list(alpn))
    if cert is not None:
        assert directory is not None
        cert_path, key_path = cert.write(directory, f"client-{id(cert)}")
        context.load_cert_chain(cert_path, key_path)
    if max_version is not None:
        with warnings.catch_warnings():  # TLS 1.1 is deprecated: that is the point of such tests
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            context.maximum_version = max_version
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let OpenSSL 3 offer TLS 1.1 at all
    return context


async def tls_client(
    port: int,
    context: ssl.SSLContext,
    sni: str | None,
    *,
    payload: bytes = b"ping\n",
    greeting: bool = True,
    timeout: float = 5.0,
) -> TLSResult:
    """Connect with TLS (``sni=None``: no server name sent), read the greeting line if the
    backend sends one, send ``payload`` and read it back. Errors land in ``result.error``."""
    result = TLSResult()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname=sni or ""
            )
            ssl_object = writer.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True)
            result.served = x509.load_der_x509_certificate(der) if der else None
            result.alpn = ssl_object.selected_alpn_protocol()
            result.version = ssl_object.version()
            result.local_port = writer.get_extra_info("sockname")[1]
            if greeting:
                result.greeting = (await reader.readline()).rstrip(b"\n")
            writer.write(payload)
            await writer.drain()
            result.echoed = await reader.readexactly(len(payload))
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError, TimeoutError) as exc:
        result.error = exc
    finally:
        if writer is not None:
            writer.close()
    return result


async def run(*argv: str, stdin: bytes | None = b"", timeout: float = 20) -> tuple[int, str, str]:
    """Run a real command-line client; (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate(stdin)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def tls_refused(port: int, sni: str | None, *, timeout: float = 5.0) -> bool:
    """Send a real ClientHello (Python's ssl through memory BIOs, so the bytes are visible) and
    report whether the gateway closed the connection without sending a single byte back."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=sni)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    assert hello[:1] == b"\x16"  # a TLS handshake record
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(hello)
        await writer.drain()
        async with asyncio.timeout(timeout):
            data = await reader.read(100)
    except ConnectionResetError:
        data = b""
    finally:
        writer.close()
    return data == b""


async def tls_client_in_pieces(
    port: int, context: ssl.SSLContext, sni: str, cuts: Sequence[int], *, timeout: float = 5.0
) -> bytes:
    """A TLS client (Python ssl over memory BIOs) that writes its ClientHello cut at the byte
    offsets ``cuts``, one flushed write per piece; then finishes the handshake and returns
    the first line the server sends."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=sni)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def pump() -> None:
        if pending := outgoing.read():
            writer.write(pending)
            await writer.drain()
        data = await reader.read(65536)
        if not data:
            raise ConnectionResetError("server closed during the handshake")
        incoming.write(data)

    try:
        async with asyncio.timeout(timeout):
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                pass
            hello = outgoing.read()
            bounds = [0, *cuts, len(hello)]
            for start, end in itertools.pairwise(bounds):
                writer.write(hello[start:end])
                await writer.drain()
                await asyncio.sleep(0.02)  # separate segments (coalescing would only make it easier)
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await pump()
            line = b""
            while not line.endswith(b"\n"):
                try:
                    line += tls.read(1)
                except ssl.SSLWantReadError:
                    await pump()
            return line
    finally:
        writer.close()
