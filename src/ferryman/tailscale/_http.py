"""One LocalAPI request/response over HTTP/1.1, sans-I/O: requests rendered by h11, answers
parsed by httptools (llhttp).

Owns: building the exact request a Go ``local.Client`` sends (``Host: local-tailscaled.sock``,
``Tailscale-Cap``, ``Content-Length: 0`` on a body-less POST) and collecting the answer into
an :class:`HTTPResponse`, including the bytes that followed a ``101 Switching Protocols``.

Must not: touch sockets, asyncio or timeouts; :mod:`ferryman.tailscale.localapi` drives an
:class:`Exchange` with bytes. Every framing problem is raised as
:class:`~ferryman.tailscale.errors.LocalAPIProtocolError`.

Request shape follows ``client/local/local.go`` (``DoLocalRequest`` sets ``Tailscale-Cap``;
``apitype.LocalAPIHost`` is the ``Host``) and Go's ``net/http`` client, which sends
``Content-Length: 0`` for a POST without a body and no framing header for a GET. h11 renders
requests; a plain ``GET`` (:class:`PlainRequest`, WhoIs runs once per client connection) is
written from a template h11 rendered once for the same headers.

Answers are parsed by ``httptools.HttpResponseParser`` (llhttp, strict mode: no leniencies are
turned on). This module adds only what llhttp leaves to its caller: 1xx answers other than a
``101`` are skipped; a ``101`` is a switch only when the request proposed an ``Upgrade`` (and
llhttp requires ``Upgrade`` + ``Connection: upgrade`` on it, as Go's transport does), and the
bytes after its head are handed over untouched; a body without ``Content-Length`` or
``Transfer-Encoding`` ends at EOF (httptools has no ``finish()``); header values are stripped
of surrounding whitespace and trailer fields are dropped (as h11 and Go do); the size limits
(:data:`MAX_HEAD`, :data:`MAX_BODY`); and keep-alive, which is llhttp's
``should_keep_alive()`` for an answer that ended exactly where the received bytes did --
anything after it (even a second answer) is discarded and the connection is not reused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import h11
import httptools

from ferryman.tailscale.errors import LocalAPIProtocolError

LOCALAPI_HOST = "local-tailscaled.sock"
"""``apitype.LocalAPIHost``: tailscaled rejects other ``Host`` values with 403."""

CAPABILITY_VERSION = 127
"""``tailcfg.CurrentCapabilityVersion`` of the Go source this client follows (sent, not checked)."""

USER_AGENT = "ferryman-localapi/1"

MAX_BODY = 8 << 20
"""Largest body accepted (a WhoIs answer is a few KiB, a certificate pair under 16 KiB)."""

MAX_HEAD = 16 << 10
"""Most bytes received before the answer's head is complete (h11's default
``max_incomplete_event_size``, the limit this module had while h11 parsed answers)."""


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


def _render(request: h11.Request) -> bytes:
    """The bytes h11 writes for ``request`` and its (empty) end of message."""
    conn = h11.Connection(h11.CLIENT)
    data = conn.send(request)
    end = conn.send(h11.EndOfMessage())
    return (data or b"") + (end or b"")


_TARGET_RE = re.compile(r"[\x21-\x7e]+")
"""h11's ``request-target`` (one or more visible ASCII characters)."""


@dataclass(frozen=True, slots=True)
class PlainRequest:
    """A body-less ``GET`` with only the standard LocalAPI headers, serialised without h11.

    The bytes come from a template h11 rendered for the same headers (:func:`plain_template`),
    so they are exactly what ``Exchange(build_request("GET", target, ...)).request_bytes()``
    gives; :meth:`to_h11` builds that request when the template cannot carry the target.
    """

    target: str
    capability_version: int = CAPABILITY_VERSION
    user_agent: str = USER_AGENT

    def to_h11(self) -> h11.Request:
        return build_request(
            "GET", self.target, capability_version=self.capability_version, user_agent=self.user_agent
        )

    def encode(self) -> bytes:
        target = self.target
        if not target.startswith("/localapi/v0/") or not _TARGET_RE.fullmatch(target):
            # Not something the template may carry: let build_request/h11 refuse it as before.
            return _render(self.to_h11())
        return b"GET " + target.encode("ascii") + plain_template(self.capability_version, self.user_agent)


_TEMPLATES: dict[tuple[int, str], bytes] = {}


def plain_template(capability_version: int, user_agent: str) -> bytes:
    """What h11 writes after the target of a plain ``GET`` (`` HTTP/1.1``, headers, blank line)."""
    key = (capability_version, user_agent)
    tail = _TEMPLATES.get(key)
    if tail is None:
        probe = "/localapi/v0/x"
        data = _render(
            build_request("GET", probe, capability_version=capability_version, user_agent=user_agent)
        )
        prefix = b"GET " + probe.encode("ascii")
        assert data.startswith(prefix)
        tail = _TEMPLATES[key] = data[len(prefix) :]
    return tail


class _Followed(Exception):
    """Raised from a parser callback to stop at bytes that follow a complete answer."""


class _Reader:
    """The httptools callbacks for one answer, and what they collected.

    Holds the parser (its callbacks need the status code and keep-alive flag); the parser holds
    these bound methods, so :class:`Exchange` drops the parser once the answer is settled.
    """

    __slots__ = (
        "body",
        "body_len",
        "done",
        "failure",
        "fields",
        "head",
        "max_body",
        "parser",
        "reason",
        "reusable",
        "status",
        "upgrade",
    )

    def __init__(self, upgrade: bool, max_body: int) -> None:
        self.upgrade = upgrade
        self.max_body = max_body
        self.parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.status = 0
        self.reason = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.head: tuple[tuple[str, str], ...] | None = None
        """The final (non-1xx) answer's headers, once its head is complete."""
        self.body: list[bytes] = []
        self.body_len = 0
        self.done: HTTPResponse | None = None
        self.reusable = False
        self.failure: LocalAPIProtocolError | None = None
        """Raised from a callback; httptools reports it as an ``HttpParserCallbackError``."""

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.done is not None:
            raise _Followed

    def on_status(self, reason: bytes) -> None:
        self.reason += reason  # llhttp may deliver the reason in pieces across reads

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))  # after the head: trailer fields, dropped

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        status = self.status = self.parser.get_status_code()
        if status == 101 and not self.upgrade:
            self.failure = LocalAPIProtocolError(
                "malformed HTTP from tailscaled: 101 Switching Protocols without an Upgrade request"
            )
            raise self.failure
        fields, self.fields = self.fields, []
        if status >= 200 or status == 101:
            self.head = tuple(
                (name.lower().decode("latin-1"), value.strip(b" \t").decode("latin-1"))
                for name, value in fields
            )

    def on_body(self, body: bytes) -> None:
        self.body_len += len(body)
        if self.body_len > self.max_body:
            self.failure = LocalAPIProtocolError(f"LocalAPI body larger than {self.max_body} bytes")
            raise self.failure
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.head is None:  # 100 Continue, 103 Early Hints: not the answer
            self.reason = b""
            return
        if self.status == 101:
            return  # feed_data raises HttpParserUpgrade with where the raw bytes start
        assert self.parser is not None
        self.reusable = self.parser.should_keep_alive()
        self.finish()

    # -- ---------------------------------------------------------------------------------

    def finish(self, switched: bool = False, trailing: bytes = b"") -> HTTPResponse:
        assert self.head is not None
        self.done = HTTPResponse(
            status=self.status,
            reason=self.reason.decode("latin-1"),
            headers=self.head,
            body=b"".join(self.body),
            switched=switched,
            trailing=trailing,
        )
        return self.done

    def ends_at_eof(self) -> bool:
        """The answer's body is delimited by the connection closing (no length, not chunked).

        llhttp reads such a body until EOF too; a ``Transfer-Encoding`` other than ``chunked``
        also would, but is refused, as h11 did (Go would too for a LocalAPI answer)."""
        assert self.head is not None
        return not any(name in ("content-length", "transfer-encoding") for name, _ in self.head)


class Exchange:
    """One request and its response.

    Usage: send :meth:`request_bytes`, then feed every received chunk to
    :meth:`receive_data` (``b""`` at EOF) until it returns an :class:`HTTPResponse`.
    A request carrying ``Upgrade`` may end in a switched response; any other 1xx is skipped.
    ``HEAD`` is not supported (the LocalAPI has no use for it, and llhttp would expect a body).
    """

    __slots__ = ("_fed", "_reader", "_request")

    def __init__(self, request: h11.Request | PlainRequest, *, max_body: int = MAX_BODY) -> None:
        self._request = request
        upgrade = False
        if isinstance(request, h11.Request):
            if request.method == b"HEAD":
                raise ValueError("HEAD requests are not supported")
            upgrade = any(name == b"upgrade" for name, _ in request.headers)
        self._reader = _Reader(upgrade, max_body)
        self._fed = 0

    @property
    def reusable(self) -> bool:
        """The exchange finished cleanly and both sides keep the connection open (keep-alive)."""
        return self._reader.reusable

    def request_bytes(self) -> bytes:
        if isinstance(self._request, PlainRequest):
            return self._request.encode()
        return _render(self._request)

    def receive_data(self, data: bytes) -> HTTPResponse | None:
        """Consume bytes from tailscaled; return the response once it is complete."""
        reader = self._reader
        done = reader.done
        if done is not None:
            return done
        parser = reader.parser
        if parser is None:  # failed before: the connection is unusable
            raise LocalAPIProtocolError("the LocalAPI answer was already refused")
        if not data:
            return self._eof()
        self._fed += len(data)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            reader.parser = None
            return reader.finish(switched=True, trailing=data[exc.args[0] :])
        except httptools.HttpParserError as exc:
            reader.parser = None
            if reader.done is not None:  # complete, then bytes nobody asked for: not reusable
                reader.reusable = False
                return reader.done
            if reader.failure is not None:
                raise reader.failure from None
            raise LocalAPIProtocolError(f"malformed HTTP from tailscaled: {exc}") from None
        if reader.done is not None:
            reader.parser = None
            return reader.done
        if reader.head is None and self._fed > MAX_HEAD:
            reader.parser = None
            raise LocalAPIProtocolError(f"LocalAPI response head larger than {MAX_HEAD} bytes")
        if self._fed > MAX_HEAD + 2 * reader.max_body:
            # Chunk framing and trailer fields are not body bytes; bound them all the same.
            reader.parser = None
            raise LocalAPIProtocolError(f"LocalAPI answer larger than {MAX_HEAD + 2 * reader.max_body} bytes")
        return None

    def _eof(self) -> HTTPResponse:
        reader = self._reader
        reader.parser = None
        if reader.head is None:
            raise LocalAPIProtocolError("tailscaled closed the connection before answering")
        if reader.status >= 200 and reader.ends_at_eof():
            return reader.finish()
        raise LocalAPIProtocolError(f"tailscaled closed the connection mid-body (status {reader.status})")
