"""A stand-in for tailscaled's LocalAPI, served over a real unix socket.

Owns: :class:`LocalAPIDouble`, an asyncio HTTP/1.1 server (framed by h11 in the server role)
that answers ``/localapi/v0/whois``, ``/localapi/v0/dial`` and ``/localapi/v0/cert/<domain>``
the way tailscaled does, plus knobs a test needs: peers registered by IP or ``ip:port``,
CapMaps changed while connections are live, slow answers, forced statuses or garbage bytes,
request records, a ``ts-dial`` upgrade that really connects to a TCP backend and pipes bytes,
and certificate pairs a test can swap.

Must not: import ferryman (it doubles the *other* side of the wire), or be lenient where
tailscaled is strict: it checks ``Host`` (403 "invalid localapi request"), methods, the
upgrade headers and the ``addr`` syntax, and answers errors with Go's ``http.Error`` shape.

Fidelity notes, each following the Go source named:
- ``ipn/localapi/localapi.go`` ``ServeHTTP``: ``Tailscale-Version``, ``Tailscale-Cap``, CSP,
  ``X-Frame-Options`` and ``X-Content-Type-Options`` on every answer; unknown paths get
  ``404 page not found``.
- ``serveWhoIsWithBackend``: ``addr`` is a bare IP or ``ip:port``; lookup by node address
  first, then by ``ip:port`` (the proxy map tailscaled keeps for connections it forwarded to
  loopback in userspace mode); 404 ``no match for IP:port``; 403 ``whois access denied``
  without read permission; the body is ``json.MarshalIndent(res, "", "\\t")`` of
  ``{Node, UserProfile, CapMap}`` with ``CapMap`` ``null`` when empty.
- ``serveDial``: POST only, ``Connection`` containing ``upgrade`` and ``Upgrade: ts-dial``,
  502 ``dial failure: …``, then ``101`` and two ``io.Copy`` loops; when either direction
  ends both connections close (tailscaled does not propagate half-close).
- ``ipn/localapi/cert.go`` ``serveKeyPair``: ``type=pair`` writes the key PEM, then the
  certificate PEM, as ``text/plain``.
- Go's ``net/http`` server: bodies that fit its 2048-byte buffer get ``Content-Length``,
  longer ones are chunked; a ``Date`` header on every answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import ipaddress
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11

IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address
LOCALAPI_HOST = "local-tailscaled.sock"
TAGGED_DEVICES = "tagged-devices"


@dataclass
class Peer:
    """One node as tailscaled's netmap knows it; mutate ``cap_map`` to change grants live."""

    node: dict[str, Any]
    user_profile: dict[str, Any] | None
    cap_map: dict[str, list[Any]] | None = None


@dataclass
class Canned:
    """A forced answer for an endpoint: an HTTP status and body, or raw bytes then close."""

    status: int = 500
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    raw: bytes | None = None
    times: int | None = None


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    target: str
    endpoint: str
    headers: tuple[tuple[str, str], ...]
    query: dict[str, list[str]] = field(hash=False)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name.lower()), None)


def go_json(value: Any) -> bytes:
    """``json.MarshalIndent(v, "", "\\t")``, with Go's HTML-safe escaping of ``<``, ``>``, ``&``."""
    text = json.dumps(value, indent="\t", ensure_ascii=False)
    for char, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, esc)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").encode()


def _hexkey(prefix: str, seed: str) -> str:
    return f"{prefix}:{hashlib.sha256(seed.encode()).hexdigest()}"


def make_node(
    node_id: int,
    host: str,
    address: str,
    *,
    tailnet: str = "tail1234.ts.net",
    user_id: int = 1001,
    tags: tuple[str, ...] = (),
) -> dict[str, Any]:
    """A ``tailcfg.Node`` as tailscaled marshals it (field order and omitempty as in Go)."""
    v6 = f"fd7a:115c:a1e0::{node_id:x}"
    node: dict[str, Any] = {
        "ID": node_id,
        "StableID": f"n{hashlib.sha1(str(node_id).encode()).hexdigest()[:10]}CNTRL",
        "Name": f"{host}.{tailnet}.",
        "User": user_id,
        "Key": _hexkey("nodekey", host),
        "KeyExpiry": "2031-01-01T00:00:00Z",
        "Machine": _hexkey("mkey", host),
        "DiscoKey": _hexkey("discokey", host),
        "Addresses": [f"{address}/32", f"{v6}/128"],
        "AllowedIPs": [f"{address}/32", f"{v6}/128"],
        "Endpoints": ["198.51.100.7:41641", "10.0.0.7:41641"],
        "HomeDERP": 1,
        "Hostinfo": {
            "IPNVersion": "1.90.0-tdouble",
            "OS": "linux",
            "OSVersion": "6.1.0",
            "Hostname": host,
            "Services": [{"Proto": "peerapi4", "Port": 38273}],
        },
        "Created": "2024-05-01T10:00:00Z",
        "Cap": 127,
    }
    if tags:
        node["Tags"] = list(tags)
    node.update(
        {
            "Online": True,
            "MachineAuthorized": True,
            "CapMap": {"https://tailscale.com/cap/file-sharing": None},
            "ComputedName": host,
            "ComputedNameWithHost": host,
        }
    )
    return node


def make_user_profile(user_id: int, login: str, display_name: str, pic: str = "") -> dict[str, Any]:
    """A ``tailcfg.UserProfile`` (``ProfilePicURL`` is omitempty)."""
    profile: dict[str, Any] = {"ID": user_id, "LoginName": login, "DisplayName": display_name}
    if pic:
        profile["ProfilePicURL"] = pic
    return profile


def _parse_addr(value: str) -> tuple[IPAddr, int] | None:
    """``netip.ParseAddr`` (port 0) or ``netip.ParseAddrPort`` (v6 needs brackets)."""
    try:
        return ipaddress.ip_address(value), 0
    except ValueError:
        pass
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or len(port) > 5 or int(port) > 65535:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            return ipaddress.IPv6Address(host), int(port)
        except ValueError:
            return None
    try:
        return ipaddress.IPv4Address(host), int(port)
    except ValueError:
        return None


@contextlib.contextmanager
def short_socket_dir() -> Iterator[str]:
    """A fresh directory with a short path (unix socket paths are limited to ~107 bytes)."""
    path = tempfile.mkdtemp(prefix="ts-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class LocalAPIDouble:
    """tailscaled's LocalAPI on ``socket_path``; ``async with`` it, or ``start()``/``close()``."""

    def __init__(self, socket_path: str, *, permit_read: bool = True, permit_cert: bool = True) -> None:
        self.socket_path = socket_path
        self.permit_read = permit_read
        self.permit_cert = permit_cert
        self.version = "1.90.0-tdouble-gdouble"
        self.requests: list[RecordedRequest] = []
        self.delays: dict[str, float] = {}
        self.canned: dict[str, Canned] = {}
        self.dial_routes: dict[str, tuple[str, int]] = {}
        """Dial-Host → real ``(host, port)`` (e.g. a MagicDNS name → a loopback echo server)."""
        self.dial_error: str | None = None
        self.dial_greeting: bytes = b""
        """Bytes written in the same write as the 101 head, before any backend byte."""
        self.dial_self: str | None = None
        self.certs: dict[str, tuple[bytes, bytes]] = {}
        self.connections = 0
        """Connections accepted (keep-alive reuse shows as fewer connections than requests)."""
        self.cert_domains: list[str] = []
        """What ``/localapi/v0/status`` reports as ``CertDomains``."""
        self._by_ip: dict[IPAddr, Peer] = {}
        self._by_ipport: dict[tuple[IPAddr, int], Peer] = {}
        self._next_id = 1
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> LocalAPIDouble:
        self._server = await asyncio.start_unix_server(self._serve, self.socket_path)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    async def __aenter__(self) -> LocalAPIDouble:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls, **kwargs: Any) -> AsyncIterator[LocalAPIDouble]:
        """Serve on a socket in a fresh short temp directory for the block's duration."""
        with short_socket_dir() as d:
            async with cls(os.path.join(d, "tailscaled.sock"), **kwargs) as double:
                yield double

    # -- knobs ---------------------------------------------------------------------------------

    def add_peer(
        self,
        addr: str,
        *,
        login: str = "alice@example.com",
        display_name: str | None = None,
        host: str = "laptop",
        tags: tuple[str, ...] = (),
        cap_map: dict[str, list[Any]] | None = None,
        with_profile: bool = True,
    ) -> Peer:
        """Register a peer by IP (a node address) or ``ip:port`` (a forwarded connection)."""
        parsed = _parse_addr(addr)
        if parsed is None:
            raise ValueError(f"bad addr {addr!r}")
        ip, port = parsed
        node_id = self._next_id
        self._next_id += 1
        in_tailnet = isinstance(ip, ipaddress.IPv4Address) and ip in ipaddress.ip_network("100.64.0.0/10")
        address = str(ip) if in_tailnet else f"100.64.0.{node_id}"
        user_id = 2147455555 if tags else 1000 + node_id
        if tags:
            login, display_name = TAGGED_DEVICES, "Tagged Devices"
        profile = (
            make_user_profile(user_id, login, display_name or login.split("@")[0].title())
            if with_profile
            else None
        )
        peer = Peer(make_node(node_id, host, address, user_id=user_id, tags=tags), profile, cap_map)
        if port:
            self._by_ipport[(ip, port)] = peer
        else:
            self._by_ip[ip] = peer
        return peer

    def remove_peer(self, addr: str) -> None:
        parsed = _parse_addr(addr)
        if parsed is None:
            raise ValueError(f"bad addr {addr!r}")
        ip, port = parsed
        if port:
            del self._by_ipport[(ip, port)]
        else:
            del self._by_ip[ip]

    def set_cap_map(self, addr: str, cap_map: dict[str, list[Any]] | None) -> None:
        peer = self.lookup(addr)
        if peer is None:
            raise KeyError(addr)
        peer.cap_map = cap_map

    def lookup(self, addr: str) -> Peer | None:
        parsed = _parse_addr(addr)
        if parsed is None:
            return None
        ip, port = parsed
        return self._by_ip.get(ip) or (self._by_ipport.get((ip, port)) if port else None)

    def fail(
        self,
        endpoint: str,
        *,
        status: int = 500,
        body: bytes = b"",
        raw: bytes | None = None,
        content_type: str = "text/plain; charset=utf-8",
        times: int | None = None,
    ) -> None:
        """Answer ``endpoint`` (``whois``, ``dial``, ``cert``) with this, ``times`` times."""
        self.canned[endpoint] = Canned(status, body, content_type, raw, times)

    def set_cert(self, domain: str, cert_pem: bytes, key_pem: bytes) -> None:
        self.certs[domain] = (cert_pem, key_pem)

    def count(self, endpoint: str) -> int:
        return sum(1 for r in self.requests if r.endpoint == endpoint)

    # -- HTTP ----------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = await self._next(conn, reader)
                if not isinstance(event, h11.Request):
                    break
                while not isinstance(await self._next(conn, reader), h11.EndOfMessage):
                    pass  # LocalAPI requests we double carry no body
                if not await self._dispatch(conn, event, reader, writer):
                    break
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except h11.RemoteProtocolError:
            # Go's server answers a request it cannot parse with a bare 400 and closes.
            with contextlib.suppress(ConnectionError):
                writer.write(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
                    b"Connection: close\r\n\r\n400 Bad Request"
                )
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    @staticmethod
    async def _next(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            conn.receive_data(await reader.read(65536))

    def _headers(self, content_type: str | None = None) -> list[tuple[str, str]]:
        headers = [
            ("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'; script-src 'none'"),
            ("Tailscale-Cap", "127"),
            ("Tailscale-Version", self.version),
            ("X-Content-Type-Options", "nosniff"),
            ("X-Frame-Options", "DENY"),
            ("Date", email.utils.formatdate(usegmt=True)),
        ]
        if content_type:
            headers.insert(0, ("Content-Type", content_type))
        return headers

    async def _respond(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        content_type: str,
        extra: list[tuple[str, str]] | None = None,
    ) -> None:
        headers = self._headers(content_type) + (extra or [])
        if len(body) <= 2048:
            headers.append(("Content-Length", str(len(body))))
        else:
            headers.append(("Transfer-Encoding", "chunked"))
        reason = HTTPStatus(status).phrase  # Go writes the standard reason phrase
        out = conn.send(h11.Response(status_code=status, headers=headers, reason=reason)) or b""
        if body:
            out += conn.send(h11.Data(data=body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        writer.write(out)
        await writer.drain()

    async def _error(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, status: int, message: str
    ) -> None:
        """Go's ``http.Error``: text/plain, nosniff, the message and a newline."""
        await self._respond(conn, writer, status, (message + "\n").encode(), "text/plain; charset=utf-8")

    async def _dispatch(
        self,
        conn: h11.Connection,
        req: h11.Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        target = req.target.decode("latin-1")
        parts = urlsplit(target)
        path = parts.path
        headers = tuple((k.decode().lower(), v.decode("latin-1")) for k, v in req.headers)
        endpoint = (
            path.removeprefix("/localapi/v0/").split("/", 1)[0] if path.startswith("/localapi/v0/") else path
        )
        record = RecordedRequest(req.method.decode(), target, endpoint, headers, parse_qs(parts.query))
        self.requests.append(record)
        host = record.header("host") or ""
        if host not in ("", LOCALAPI_HOST) or record.header("referer") or record.header("origin"):
            await self._error(conn, writer, 403, "invalid localapi request")
            return True
        if delay := self.delays.get(endpoint, 0.0):
            await asyncio.sleep(delay)
        canned = self.canned.get(endpoint)
        if canned is not None:
            if canned.times is not None:
                canned.times -= 1
                if canned.times <= 0:
                    del self.canned[endpoint]
            if canned.raw is not None:
                writer.write(canned.raw)
                await writer.drain()
                return False
            await self._respond(conn, writer, canned.status, canned.body, canned.content_type)
            return True
        if path == "/localapi/v0/whois":
            await self._whois(conn, writer, record)
        elif path == "/localapi/v0/dial":
            return await self._dial(conn, writer, reader, record)
        elif path.startswith("/localapi/v0/cert/"):
            await self._cert(conn, writer, record, path.removeprefix("/localapi/v0/cert/"))
        elif path == "/localapi/v0/status":
            status = {
                "Version": self.version,
                "BackendState": "Running",
                "TailscaleIPs": ["100.64.0.254"],
                "Self": {
                    "ID": "nSelf",
                    "HostName": "gateway",
                    "DNSName": (self.cert_domains or ["gateway."])[0] + ".",
                    "Online": True,
                },
                "CertDomains": self.cert_domains,
                "MagicDNSSuffix": "tail1234.ts.net",
            }
            await self._respond(conn, writer, 200, go_json(status), "application/json")
        elif path == "/":
            await self._respond(conn, writer, 200, b"tailscaled\n", "text/plain; charset=utf-8")
        else:
            await self._error(conn, writer, 404, "404 page not found")
        return True

    async def _whois(self, conn: h11.Connection, writer: asyncio.StreamWriter, req: RecordedRequest) -> None:
        if not self.permit_read:
            await self._error(conn, writer, 403, "whois access denied")
            return
        addr = (req.query.get("addr") or [""])[0]
        if not addr:
            await self._error(conn, writer, 400, "missing 'addr' parameter")
            return
        if _parse_addr(addr) is None:
            await self._error(conn, writer, 400, "invalid 'addr' parameter")
            return
        peer = self.lookup(addr)
        if peer is None:
            await self._error(conn, writer, 404, "no match for IP:port")
            return
        body = go_json({"Node": peer.node, "UserProfile": peer.user_profile, "CapMap": peer.cap_map or None})
        await self._respond(conn, writer, 200, body, "application/json")

    async def _cert(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, req: RecordedRequest, domain: str
    ) -> None:
        if not self.permit_cert:
            await self._error(conn, writer, 403, "cert access denied")
            return
        pair = self.certs.get(domain)
        if pair is None:
            allowed = " ".join(f'"{d}"' for d in self.certs)
            await self._error(conn, writer, 500, f'invalid domain "{domain}"; must be one of [{allowed}]')
            return
        cert_pem, key_pem = pair
        kind = (req.query.get("type") or [""])[0]
        bodies = {"": cert_pem, "crt": cert_pem, "cert": cert_pem, "key": key_pem, "pair": key_pem + cert_pem}
        if kind not in bodies:
            await self._error(conn, writer, 400, 'invalid type; want "cert" (default), "key", or "pair"')
            return
        await self._respond(conn, writer, 200, bodies[kind], "text/plain")

    async def _dial(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        reader: asyncio.StreamReader,
        req: RecordedRequest,
    ) -> bool:
        if req.method != "POST":
            await self._error(conn, writer, 405, "POST required")
            return True
        if "upgrade" not in (req.header("connection") or "") or req.header("upgrade") != "ts-dial":
            await self._error(conn, writer, 400, "bad ts-dial upgrade")
            return True
        host, port = req.header("dial-host") or "", req.header("dial-port") or ""
        if not host or not port:
            await self._error(conn, writer, 400, "missing Dial-Host or Dial-Port header")
            return True
        if self.dial_self is not None:
            await self._respond(conn, writer, 200, b"", "text/plain", [("Dial-Self", self.dial_self)])
            return True
        if self.dial_error is not None:
            await self._error(conn, writer, 502, "dial failure: " + self.dial_error)
            return True
        real_host, real_port = self.dial_routes.get(host, (host, int(port)))
        try:
            async with asyncio.timeout(5):
                b_reader, b_writer = await asyncio.open_connection(real_host, real_port)
        except (OSError, TimeoutError) as exc:
            why = "connection refused" if isinstance(exc, ConnectionRefusedError) else str(exc)
            await self._error(conn, writer, 502, f"dial failure: dial tcp {host}:{port}: connect: {why}")
            return True
        head = conn.send(
            h11.InformationalResponse(
                status_code=101,
                reason="Switching Protocols",
                headers=[("Connection", "upgrade"), ("Upgrade", "ts-dial"), *self._headers()],
            )
        )
        writer.write((head or b"") + self.dial_greeting)  # one write: head and first bytes together
        leftover, _ = conn.trailing_data
        if leftover:
            b_writer.write(bytes(leftover))
        await self._pipe(reader, writer, b_reader, b_writer)
        return False

    @staticmethod
    async def _pipe(
        c_reader: asyncio.StreamReader,
        c_writer: asyncio.StreamWriter,
        b_reader: asyncio.StreamReader,
        b_writer: asyncio.StreamWriter,
    ) -> None:
        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:  # includes ConnectionError: the other side went away
                pass
            finally:  # serveDial returns after the first io.Copy ends; both conns close
                c_writer.close()
                b_writer.close()

        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(copy(c_reader, b_writer), name="double dial client->backend")
                tg.create_task(copy(b_reader, c_writer), name="double dial backend->client")
        finally:
            for w in (b_writer, c_writer):
                w.close()
                with contextlib.suppress(ConnectionError):
                    await w.wait_closed()
