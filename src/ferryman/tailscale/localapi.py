"""asyncio client for tailscaled's LocalAPI over its unix socket.

Owns: :class:`LocalAPIClient` (``whois``, ``dial``, ``cert_pair``) and :class:`DialedConnection`,
the raw stream a ``ts-dial`` upgrade leaves behind. Plain requests reuse idle keep-alive
connections (as Go's http.Transport does; up to ``_MAX_IDLE`` of them, so that a burst of
concurrent WhoIs lookups does not connect anew); an upgrade always gets its own connection;
every call is bounded by a timeout.

Must not: frame HTTP itself (``ferryman.tailscale._http`` does: h11-rendered requests,
httptools parsing), interpret WhoIs answers as identities (``ferryman.identity.tailscale``) or
hold global state: the socket path and timeouts are given to the constructor.

Wire behaviour follows ``client/local/local.go`` and ``client/local/cert.go``:
``WhoIs`` is ``GET /localapi/v0/whois?addr=<url.QueryEscape(addr)>``, ``UserDial`` is a
``POST /localapi/v0/dial`` with ``Upgrade: ts-dial`` answered by ``101``, and
``CertPairWithValidity`` is ``GET /localapi/v0/cert/<domain>?type=pair&min_validity=<dur>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import socket
import weakref
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import quote_plus

from ferryman.tailscale._http import (
    CAPABILITY_VERSION,
    USER_AGENT,
    Exchange,
    HTTPResponse,
    PlainRequest,
    build_request,
)
from ferryman.tailscale.apitype import WhoIsResponse, decode_whois, split_cert_pair
from ferryman.tailscale.errors import (
    DialRefused,
    LocalAPIAccessDenied,
    LocalAPIError,
    LocalAPIProtocolError,
    LocalAPITimeout,
    LocalAPIUnreachable,
    PeerNotFound,
    TailscaleError,
)

DEFAULT_SOCKET: Final = "/var/run/tailscale/tailscaled.sock"
"""``paths.DefaultTailscaledSocket()`` on Linux."""

_RECV_SIZE = 65536
_MAX_IDLE = 64
"""Idle keep-alive connections to tailscaled kept for reuse: enough for a burst of concurrent
WhoIs lookups (one per accepted client connection) to find one each instead of connecting anew.
tailscaled serves every LocalAPI connection in its own goroutine and sets no limit; an idle one
costs a descriptor on each side."""


def _close_all(conns: list[_KeepAlive]) -> None:
    while conns:
        conns.pop().close()


class _StaleConnection(Exception):
    """A pooled keep-alive connection was closed by tailscaled before answering."""


def _expire(fut: asyncio.Future[HTTPResponse]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class _KeepAlive(asyncio.Protocol):
    """One keep-alive connection to tailscaled for plain requests.

    It stays registered with the loop between requests (no per-request reader set-up, and a
    connection tailscaled closes while idle is noticed and skipped); a request is a
    ``transport.write`` and a future that :meth:`data_received` completes once the
    :class:`Exchange` has the whole answer.
    """

    __slots__ = ("answered", "closed", "exchange", "op", "pooled", "socket_path", "transport", "waiter")

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.waiter: asyncio.Future[HTTPResponse] | None = None
        self.op = ""
        self.pooled = False
        self.answered = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def start(self, exchange: Exchange, waiter: asyncio.Future[HTTPResponse], op: str, pooled: bool) -> None:
        self.exchange, self.waiter, self.op, self.pooled, self.answered = exchange, waiter, op, pooled, False
        assert self.transport is not None
        self.transport.write(exchange.request_bytes())

    def data_received(self, data: bytes) -> None:
        exchange, waiter = self.exchange, self.waiter
        if exchange is None or waiter is None or waiter.done():
            self.abort()  # bytes nobody asked for: this connection cannot be trusted again
            return
        self.answered = True
        try:
            resp = exchange.receive_data(data)
        except TailscaleError as exc:
            exc.socket_path = exc.socket_path or self.socket_path
            waiter.set_exception(exc)
            return
        if resp is not None:
            waiter.set_result(resp)

    def eof_received(self) -> bool:
        self._ended(None)
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._ended(exc)

    def _ended(self, exc: Exception | None) -> None:
        exchange, waiter = self.exchange, self.waiter
        if exchange is None or waiter is None or waiter.done():
            return
        if self.pooled and not self.answered:
            waiter.set_exception(_StaleConnection())
        elif isinstance(exc, OSError):
            waiter.set_exception(
                LocalAPIProtocolError(
                    f"connection to tailscaled failed during {self.op}: {exc.strerror or exc}",
                    socket_path=self.socket_path,
                )
            )
        else:
            try:
                resp = exchange.receive_data(b"")
            except TailscaleError as err:
                err.socket_path = err.socket_path or self.socket_path
                waiter.set_exception(err)
            else:
                if resp is not None:
                    waiter.set_result(resp)

    def finish(self) -> None:
        self.exchange = self.waiter = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            with contextlib.suppress(RuntimeError):
                self.transport.abort()


_PLAIN_ADDR_RE = re.compile(r"[0-9A-Za-z.:\[\]]*")
_ADDR_ESCAPES = str.maketrans({":": "%3A", "[": "%5B", "]": "%5D"})


def _query_escape(addr: str) -> str:
    """``url.QueryEscape(addr)``, i.e. ``quote_plus(addr, safe="")``; an ``ip:port`` (the only
    thing WhoIs is asked about per connection) is escaped by a table, anything else by quote_plus."""
    if _PLAIN_ADDR_RE.fullmatch(addr):
        return addr.translate(_ADDR_ESCAPES)
    return quote_plus(addr, safe="")


_DOMAIN_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?$")


def go_duration(seconds: float) -> str:
    """Format whole seconds as Go's ``time.Duration.String`` does: ``0s``, ``90s`` → ``1m30s``."""
    total = max(0, int(seconds))
    if total == 0:
        return "0s"
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


@dataclass(eq=False, slots=True)
class DialedConnection:
    """A connection tailscaled switched to raw bytes after ``101 Switching Protocols``.

    ``sock`` is the connected, non-blocking unix socket to tailscaled, now a byte pipe to the
    dialled target. ``initial_data`` holds bytes that arrived in the same reads as the 101 head:
    the target's first bytes, which a relay must deliver before reading ``sock``. The owner
    closes ``sock`` (or the writer from :meth:`open_streams`).
    """

    sock: socket.socket
    initial_data: bytes = b""
    response_headers: tuple[tuple[str, str], ...] = field(default=())

    async def open_streams(self, *, limit: int = 2**16) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Wrap ``sock`` in asyncio streams, with ``initial_data`` already in the reader."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        if self.initial_data:
            # Fed before the transport exists, so these bytes always come first.
            reader.feed_data(self.initial_data)
            self.initial_data = b""
        transport, protocol = await loop.create_unix_connection(
            lambda: asyncio.StreamReaderProtocol(reader, loop=loop), sock=self.sock
        )
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)

    def close(self) -> None:
        self.sock.close()


class LocalAPIClient:
    """A client for one tailscaled, reached at ``socket_path``.

    ``timeout`` bounds each call (connect, request and complete answer) unless the call passes
    its own; ``None`` or ``0`` means unbounded. Methods raise subclasses of
    :class:`~ferryman.tailscale.errors.TailscaleError` only (and ``CancelledError``).
    """

    def __init__(
        self,
        socket_path: str = DEFAULT_SOCKET,
        *,
        timeout: float | None = 5.0,
        capability_version: int = CAPABILITY_VERSION,
        user_agent: str = USER_AGENT,
    ) -> None:
        self.socket_path = socket_path
        self._idle: list[_KeepAlive] = []
        # A client dropped without aclose() still closes its pooled connections.
        weakref.finalize(self, _close_all, self._idle)
        self.timeout = timeout
        self.capability_version = capability_version
        self.user_agent = user_agent

    def __repr__(self) -> str:
        return f"LocalAPIClient({self.socket_path!r})"

    # -- endpoints ---------------------------------------------------------------------------

    async def whois(self, addr: str, *, timeout: float | None = None) -> WhoIsResponse:
        """Who owns ``addr`` (``ip:port``, ``[v6]:port`` or a bare IP).

        Raises :class:`PeerNotFound` on 404, :class:`LocalAPIAccessDenied` on 403, another
        :class:`LocalAPIError` for any other non-200, :class:`LocalAPIProtocolError` for an
        undecodable answer.
        """
        target = "/localapi/v0/whois?addr=" + _query_escape(addr)
        resp = await self._call("whois", "GET", target, timeout=timeout)
        if resp.status != 200:
            raise self._status_error(resp, target, not_found=PeerNotFound)
        return decode_whois(resp.body)

    async def cert_domains(self, *, timeout: float | None = None) -> tuple[str, ...]:
        """The names tailscaled can fetch certificates for (``Status.CertDomains``, in the
        order it reports them; the first is the node's own MagicDNS name)."""
        target = "/localapi/v0/status?peers=false"
        resp = await self._call("status", "GET", target, timeout=timeout)
        if resp.status != 200:
            raise self._status_error(resp, target)
        try:
            status = json.loads(resp.body)
            domains = status.get("CertDomains") or []
            if not isinstance(domains, list) or not all(isinstance(d, str) for d in domains):
                raise ValueError("CertDomains is not a list of strings")
        except (ValueError, AttributeError) as exc:
            raise LocalAPIProtocolError(f"bad status answer: {exc}", socket_path=self.socket_path) from exc
        return tuple(domains)

    async def cert_pair(
        self, domain: str, *, min_validity: float = 0, timeout: float | None = None
    ) -> tuple[bytes, bytes]:
        """``(cert_pem, key_pem)`` for ``domain``; tailscaled may take long on a fresh ACME order.

        ``min_validity`` (seconds) asks tailscaled to renew synchronously when the cached
        certificate is valid for less than that (``CertPairWithValidity``); 0 means its default.
        """
        if not _DOMAIN_RE.match(domain) or ".." in domain:
            raise ValueError(f"not a DNS name: {domain!r}")
        target = f"/localapi/v0/cert/{domain}?type=pair&min_validity={go_duration(min_validity)}"
        resp = await self._call("cert", "GET", target, timeout=timeout)
        if resp.status != 200:
            raise self._status_error(resp, target)
        return split_cert_pair(resp.body)

    async def dial(
        self, host: str, port: int, *, network: str = "tcp", timeout: float | None = None
    ) -> DialedConnection:
        """Connect to ``host:port`` through tailscaled (``UserDial``); ``host`` may be a MagicDNS name.

        The timeout bounds only the setup (until the ``101``), not the returned connection.
        A non-101 answer raises :class:`DialRefused` with tailscaled's status and body (``502``
        with ``dial failure: …`` when the target cannot be reached). A ``Dial-Self`` header on
        such an answer is kept in ``DialRefused.dial_self`` but never followed: dialling the
        target directly would bypass tailscaled's routing and ACLs, so we fail closed.
        """
        if not 0 < port < 65536:
            raise ValueError(f"port out of range: {port}")
        if not host or any(c in host for c in "\r\n\0"):
            raise ValueError(f"bad dial host: {host!r}")
        target = "/localapi/v0/dial"
        headers = [
            ("Upgrade", "ts-dial"),
            ("Connection", "upgrade"),
            ("Dial-Host", host),
            ("Dial-Port", str(port)),
            ("Dial-Network", network),
        ]
        sock, resp = await self._call_keep("dial", "POST", target, headers, timeout=timeout)
        if sock is None:
            # UserDial (client/local/local.go) turns any non-101 into "unexpected HTTP
            # response: <status>, <body>"; it uses DoLocalRequest, so 403 is not special here.
            raise self._status_error(resp, target, error=DialRefused)
        # UserDial keeps reading through res.Body's buffer (netutil.NewAltReadWriteCloserConn)
        # because net/http may have read past the 101 head; our equivalent is initial_data.
        return DialedConnection(sock, resp.trailing, resp.headers)

    async def aclose(self) -> None:
        """Close the idle keep-alive connections."""
        while self._idle:
            self._idle.pop().close()

    # -- transport ---------------------------------------------------------------------------

    def _status_error(
        self,
        resp: HTTPResponse,
        target: str,
        *,
        not_found: type[LocalAPIError] | None = None,
        error: type[LocalAPIError] = LocalAPIError,
    ) -> LocalAPIError:
        cls = error
        if error is LocalAPIError:
            # doLocalRequestNiceError: 403 → AccessDeniedError; WhoIs: 404 → ErrPeerNotFound.
            if resp.status == 403:
                cls = LocalAPIAccessDenied
            elif resp.status == 404 and not_found is not None:
                cls = not_found
        return cls(
            resp.status,
            resp.reason,
            resp.body,
            path=target,
            socket_path=self.socket_path,
            headers=resp.headers,
        )

    async def _call(self, op: str, method: str, target: str, *, timeout: float | None) -> HTTPResponse:
        # Plain requests reuse an idle keep-alive connection when there is one (WhoIs runs for
        # every new client connection; connect + accept per request is most of its cost). A
        # pooled connection tailscaled has meanwhile closed fails before any answer: retry on
        # the next idle one, then on a fresh one.
        assert method == "GET"
        limit = self.timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        request = PlainRequest(target, self.capability_version, self.user_agent)
        idle = self._idle
        while True:
            conn: _KeepAlive | None = None
            while idle:
                conn = idle.pop()
                if not conn.closed:
                    break
                conn = None
            pooled = conn is not None
            if conn is None:
                conn = await self._connect(op, limit)
            waiter: asyncio.Future[HTTPResponse] = loop.create_future()
            timer = loop.call_later(limit, _expire, waiter) if limit else None
            exchange = Exchange(request)
            try:
                conn.start(exchange, waiter, op, pooled)
                resp = await waiter
            except _StaleConnection:
                conn.abort()
                continue
            except TimeoutError:
                conn.abort()
                raise LocalAPITimeout(self.socket_path, op, limit or 0) from None
            except BaseException:
                conn.abort()
                raise
            finally:
                if timer is not None:
                    timer.cancel()
            conn.finish()
            if resp.switched:  # a switch nobody asked for: drop it
                conn.abort()
                raise LocalAPIProtocolError(
                    f"tailscaled switched protocols on {op}", socket_path=self.socket_path
                )
            if exchange.reusable and not conn.closed and len(idle) < _MAX_IDLE:
                idle.append(conn)
            else:
                conn.close()
            return resp

    async def _connect(self, op: str, limit: float | None) -> _KeepAlive:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(limit if limit else None):
                _, conn = await loop.create_unix_connection(
                    functools.partial(_KeepAlive, self.socket_path), self.socket_path
                )
        except TimeoutError:
            raise LocalAPITimeout(self.socket_path, op, limit or 0) from None
        except OSError as exc:
            raise LocalAPIUnreachable(self.socket_path, exc) from None
        return conn

    async def _call_keep(
        self,
        op: str,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        *,
        timeout: float | None,
    ) -> tuple[socket.socket | None, HTTPResponse]:
        """Run one exchange that may switch protocols (``ts-dial``) on a connection of its own;
        return the socket too when the protocol was switched (else it is closed)."""
        limit = self.timeout if timeout is None else timeout
        request = build_request(
            method,
            target,
            headers,
            capability_version=self.capability_version,
            user_agent=self.user_agent,
        )
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        keep = False
        try:
            sock.setblocking(False)
            async with asyncio.timeout(limit if limit else None):
                try:
                    await loop.sock_connect(sock, self.socket_path)
                except OSError as exc:
                    raise LocalAPIUnreachable(self.socket_path, exc) from None
                exchange = Exchange(request)
                try:
                    await loop.sock_sendall(sock, exchange.request_bytes())
                    while True:
                        chunk = await loop.sock_recv(sock, _RECV_SIZE)
                        resp = exchange.receive_data(chunk)
                        if resp is not None:
                            break
                except OSError as exc:
                    raise LocalAPIProtocolError(
                        f"connection to tailscaled failed during {op}: {exc.strerror or exc}",
                        socket_path=self.socket_path,
                    ) from None
                except TailscaleError as exc:
                    exc.socket_path = exc.socket_path or self.socket_path
                    raise
        except TimeoutError:
            raise LocalAPITimeout(self.socket_path, op, limit or 0) from None
        else:
            keep = resp.switched
            return (sock if keep else None), resp
        finally:
            if not keep:
                sock.close()
