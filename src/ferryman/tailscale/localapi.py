"""asyncio client for tailscaled's LocalAPI over its unix socket.

Owns: :class:`LocalAPIClient` (``whois``, ``dial``, ``cert_pair``) and :class:`DialedConnection`,
the raw stream a ``ts-dial`` upgrade leaves behind. Plain requests reuse up to eight idle
keep-alive connections (as Go's http.Transport does); an upgrade always gets its own
connection; every call is bounded by a timeout.

Must not: frame HTTP itself (``ferryman.tailscale._http`` does, through h11), interpret WhoIs
answers as identities (``ferryman.identity.tailscale``) or hold global state: the socket path
and timeouts are given to the constructor.

Wire behaviour follows ``client/local/local.go`` and ``client/local/cert.go``:
``WhoIs`` is ``GET /localapi/v0/whois?addr=<url.QueryEscape(addr)>``, ``UserDial`` is a
``POST /localapi/v0/dial`` with ``Upgrade: ts-dial`` answered by ``101``, and
``CertPairWithValidity`` is ``GET /localapi/v0/cert/<domain>?type=pair&min_validity=<dur>``.
"""

from __future__ import annotations

import asyncio
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
_MAX_IDLE = 8
"""Idle keep-alive connections to tailscaled kept for reuse."""


def _close_all(sockets: list[socket.socket]) -> None:
    while sockets:
        sockets.pop().close()


class _StaleConnection(Exception):
    """A pooled keep-alive connection was closed by tailscaled before answering."""


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
        self._idle: list[socket.socket] = []
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
        target = "/localapi/v0/whois?addr=" + quote_plus(addr, safe="")
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
        # pooled connection tailscaled has meanwhile closed fails before any answer: retry once
        # on a fresh one.
        while self._idle:
            pooled = self._idle.pop()
            try:
                sock, resp = await self._call_keep(op, method, target, [], timeout=timeout, pooled=pooled)
            except _StaleConnection:
                continue
            break
        else:
            sock, resp = await self._call_keep(op, method, target, [], timeout=timeout)
        if sock is not None:  # a switch nobody asked for: drop it
            sock.close()
            raise LocalAPIProtocolError(
                f"tailscaled switched protocols on {op}", socket_path=self.socket_path
            )
        return resp

    async def _call_keep(
        self,
        op: str,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        *,
        timeout: float | None,
        pooled: socket.socket | None = None,
    ) -> tuple[socket.socket | None, HTTPResponse]:
        """Run one exchange; return the socket too when the protocol was switched.

        With ``pooled``, the request goes over that idle keep-alive connection; if it turns out
        to be closed before any answer byte, :class:`_StaleConnection` is raised (and the socket
        closed) so the caller can retry on a fresh one. A plain exchange that ends with both
        sides willing to keep the connection returns it to the idle pool.
        """
        limit = self.timeout if timeout is None else timeout
        request = build_request(
            method,
            target,
            headers,
            capability_version=self.capability_version,
            user_agent=self.user_agent,
        )
        loop = asyncio.get_running_loop()
        sock = pooled if pooled is not None else socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        keep = False
        pool = False
        try:
            sock.setblocking(False)
            async with asyncio.timeout(limit if limit else None):
                if pooled is None:
                    try:
                        await loop.sock_connect(sock, self.socket_path)
                    except OSError as exc:
                        raise LocalAPIUnreachable(self.socket_path, exc) from None
                exchange = Exchange(request)
                answered = False
                try:
                    await loop.sock_sendall(sock, exchange.request_bytes())
                    while True:
                        chunk = await loop.sock_recv(sock, _RECV_SIZE)
                        if pooled is not None and not answered and not chunk:
                            raise _StaleConnection
                        answered = True
                        resp = exchange.receive_data(chunk)
                        if resp is not None:
                            break
                except OSError as exc:
                    if pooled is not None and not answered:
                        raise _StaleConnection from None
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
            pool = not keep and exchange.reusable and len(self._idle) < _MAX_IDLE
            if pool:
                self._idle.append(sock)
            return (sock if keep else None), resp
        finally:
            if not keep and not pool:
                sock.close()
