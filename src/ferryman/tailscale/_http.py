"""One LocalAPI request/response over HTTP/1.1, sans-I/O, framed by h11.

Owns: building the exact request a Go ``local.Client`` sends (``Host: local-tailscaled.sock``,
``Tailscale-Cap``, ``Content-Length: 0`` on a body-less POST) and collecting the answer into
an :class:`HTTPResponse`, including the bytes that followed a ``101 Switching Protocols``.

Must not: touch sockets, asyncio or timeouts; :mod:`ferryman.tailscale.localapi` drives an
:class:`Exchange` with bytes. Every framing problem is raised as
:class:`~ferryman.tailscale.errors.LocalAPIProtocolError`.

Request shape follows ``client/local/local.go`` (``DoLocalRequest`` sets ``Tailscale-Cap``;
``apitype.LocalAPIHost`` is the ``Host``) and Go's ``net/http`` client, which sends
``Content-Length: 0`` for a POST without a body and no framing header for a GET.
"""

from __future__ import annotations

from dataclasses import dataclass

import h11

from ferryman.tailscale.errors import LocalAPIProtocolError

LOCALAPI_HOST = "local-tailscaled.sock"
"""``apitype.LocalAPIHost``: tailscaled rejects other ``Host`` values with 403."""

CAPABILITY_VERSION = 127
"""``tailcfg.CurrentCapabilityVersion`` of the Go source this client follows (sent, not checked)."""

USER_AGENT = "ferryman-localapi/1"

MAX_BODY = 8 << 20
"""Largest body accepted (a WhoIs answer is a few KiB, a certificate pair under 16 KiB)."""


@dataclass(frozen=True, slots=True)
class HTTPResponse:
    """A complete LocalAPI answer."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    """Header names lower-cased, values decoded as Latin-1 (HTTP's octet-preserving choice)."""
    body: bytes
    switched: bool = False
    """True after ``101 Switching Protocols``: the connection now carries raw bytes."""
    trailing: bytes = b""
    """Bytes read past the ``101`` head: the first bytes of the switched stream."""

    def header(self, name: str) -> str | None:
        lname = name.lower()
        return next((v for k, v in self.headers if k == lname), None)


def build_request(
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    *,
    capability_version: int = CAPABILITY_VERSION,
    user_agent: str = USER_AGENT,
) -> h11.Request:
    """The request Go's ``local.Client`` would send for ``method target`` (no body)."""
    if not target.startswith("/localapi/v0/"):
        raise ValueError(f"LocalAPI targets live under /localapi/v0/, not {target!r}")
    head: list[tuple[str, str]] = [
        ("Host", LOCALAPI_HOST),
        ("User-Agent", user_agent),
        ("Tailscale-Cap", str(capability_version)),
    ]
    head.extend(headers or [])
    if method in ("POST", "PUT", "PATCH"):
        head.append(("Content-Length", "0"))
    return h11.Request(method=method, target=target, headers=head)


def _decode_headers(raw: list[tuple[bytes, bytes]]) -> tuple[tuple[str, str], ...]:
    return tuple((k.decode("ascii").lower(), v.decode("latin-1")) for k, v in raw)


class Exchange:
    """Drive one request and its response through an ``h11`` client connection.

    Usage: send :meth:`request_bytes`, then feed every received chunk to
    :meth:`receive_data` (``b""`` at EOF) until it returns an :class:`HTTPResponse`.
    A request carrying ``Upgrade`` may end in a switched response; any other 1xx is skipped.
    """

    def __init__(self, request: h11.Request, *, max_body: int = MAX_BODY) -> None:
        self._conn = h11.Connection(h11.CLIENT)
        self._request = request
        self._max_body = max_body
        self._head: h11.Response | None = None
        self._body = bytearray()
        self._done: HTTPResponse | None = None

    @property
    def reusable(self) -> bool:
        """The exchange finished cleanly and both sides keep the connection open (keep-alive)."""
        return self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE

    def request_bytes(self) -> bytes:
        data = self._conn.send(self._request)
        end = self._conn.send(h11.EndOfMessage())
        return (data or b"") + (end or b"")

    def receive_data(self, data: bytes) -> HTTPResponse | None:
        """Consume bytes from tailscaled; return the response once it is complete."""
        if self._done is not None:
            return self._done
        try:
            self._conn.receive_data(data)
            return self._drain(eof=not data)
        except h11.RemoteProtocolError as exc:
            if not data:  # h11 reports an EOF before a complete message as a protocol error
                raise LocalAPIProtocolError(self._cut_short()) from None
            raise LocalAPIProtocolError(f"malformed HTTP from tailscaled: {exc}") from None

    def _drain(self, *, eof: bool) -> HTTPResponse | None:
        while True:
            event = self._conn.next_event()
            if event is h11.NEED_DATA:
                if eof:
                    raise LocalAPIProtocolError(self._cut_short())
                return None
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101 and self._conn.their_state is h11.SWITCHED_PROTOCOL:
                    trailing, _closed = self._conn.trailing_data
                    self._done = HTTPResponse(
                        status=101,
                        reason=event.reason.decode("latin-1"),
                        headers=_decode_headers(list(event.headers)),
                        body=b"",
                        switched=True,
                        trailing=bytes(trailing),
                    )
                    return self._done
                continue  # 100 Continue, 103 Early Hints: not the answer
            if isinstance(event, h11.Response):
                self._head = event
            elif isinstance(event, h11.Data):
                self._body += event.data
                if len(self._body) > self._max_body:
                    raise LocalAPIProtocolError(f"LocalAPI body larger than {self._max_body} bytes")
            elif isinstance(event, h11.EndOfMessage):
                head = self._head
                assert head is not None  # h11 never ends a message it did not start
                self._done = HTTPResponse(
                    status=head.status_code,
                    reason=head.reason.decode("latin-1"),
                    headers=_decode_headers(list(head.headers)),
                    body=bytes(self._body),
                )
                return self._done
            elif isinstance(event, h11.ConnectionClosed):
                raise LocalAPIProtocolError(self._cut_short())
            elif event is h11.PAUSED:
                # We proposed an upgrade and the answer is a plain response (e.g. 502):
                # h11 pauses only before a switch, which a non-101 answer never makes.
                raise LocalAPIProtocolError("h11 paused without a protocol switch")

    def _cut_short(self) -> str:
        if self._head is None:
            return "tailscaled closed the connection before answering"
        return f"tailscaled closed the connection mid-body (status {self._head.status_code})"
