"""Choosing a backend per connection from SNI (or HTTP Host) rules, Otoroshi-style (SPEC §6).

Owns: :func:`compile_domain` (rule patterns → anchored, case-insensitive regexes),
:class:`Router` (first matching rule wins; its targets used round robin per listener; targets
whose dial failed are skipped for ``down_time`` seconds; ``sni.forward_if_no_match`` →
``forwards_to``; else the fixed ``backend``), and :func:`http_host` (the Host of the first
HTTP/1.x request, for plaintext listeners).

Must not: dial, or know about sockets. The clock is injected.

Patterns: a rule's ``domain`` is a regular expression matched against the whole name, except
that a pattern starting with ``*`` (``*.example.com``, ``*read*``) is a wildcard pattern as in
Otoroshi: ``*`` matches any run of characters and everything else is literal.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ferryman.config.model import ListenerConfig, TargetConfig, split_hostport


def compile_domain(pattern: str) -> re.Pattern[str]:
    """Compile a rule's ``domain``. Raises ``ValueError`` for an invalid regular expression."""
    wildcard = pattern.startswith("*")
    regex = ".*".join(re.escape(part) for part in pattern.split("*")) if wildcard else pattern
    try:
        return re.compile(rf"(?:{regex})\Z", re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"invalid domain pattern {pattern!r}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Route:
    """The targets to try, in order, and which rule chose them (for audit)."""

    targets: tuple[TargetConfig, ...]
    rule: str


class NoRoute(Exception):
    """No rule matched and there is no fallback; the connection is refused."""


class Router:
    def __init__(self, listener: ListenerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._down_time = listener.target_down_time
        self._rules = [
            (compile_domain(r.domain), r.domain, r.targets, frozenset(r.alpn)) for r in listener.rules
        ]
        self._next: dict[str, int] = {}
        self._down: dict[tuple[str, int], float] = {}
        sni = listener.sni
        self._use_names = sni is None or sni.enabled
        self._fallback: tuple[TargetConfig, ...] = ()
        self._fallback_rule = ""
        if sni is not None and sni.forward_if_no_match and sni.forwards_to is not None:
            self._fallback, self._fallback_rule = (sni.forwards_to,), "sni.forwards_to"
        elif listener.backend is not None:
            host, port = split_hostport(listener.backend)
            self._fallback, self._fallback_rule = (TargetConfig(host=host, port=port),), "backend"

    def route(self, name: str | None, alpn: Sequence[str] = ()) -> Route:
        """Targets for a connection whose SNI/Host is ``name`` and whose ALPN protocols (offered
        or negotiated) are ``alpn``: the first rule matching both. Raises :class:`NoRoute`."""
        if name and self._use_names:
            for regex, domain, targets, protocols in self._rules:
                if regex.match(name) and (not protocols or not protocols.isdisjoint(alpn)):
                    return Route(self._rotate(domain, targets), domain)
        if self._fallback:
            return Route(self._fallback, self._fallback_rule)
        raise NoRoute(f"no rule matches {name!r}" if name else "no server name to route on")

    def _rotate(self, key: str, targets: Sequence[TargetConfig]) -> tuple[TargetConfig, ...]:
        """Round robin: each connection starts one further along; targets marked down go last."""
        start = self._next.get(key, 0) % len(targets)
        self._next[key] = start + 1
        ordered = [*targets[start:], *targets[:start]]
        now = self._clock()
        up = [t for t in ordered if self._down.get((t.dial_host, t.port), 0.0) <= now]
        down = [t for t in ordered if t not in up]
        return tuple(up + down)

    def mark_down(self, target: TargetConfig) -> None:
        self._down[(target.dial_host, target.port)] = self._clock() + self._down_time


_HOST = re.compile(rb"^host[ \t]*:[ \t]*([^\r\n]*)\r?$", re.IGNORECASE | re.MULTILINE)
_REQUEST_LINE = re.compile(rb"^[A-Z]{3,10} [^ \r\n]+ HTTP/1\.[01]\r?\n")
_METHOD_SO_FAR = re.compile(rb"[A-Z]{0,10}")
_METHOD = re.compile(rb"[A-Z]{3,10}")


def _may_become_request_line(head: bytes) -> bool:
    """Whether ``head`` (no complete line yet) is a prefix of an HTTP/1.x request line."""
    method, sp, rest = head.partition(b" ")
    if not sp:
        return _METHOD_SO_FAR.fullmatch(method) is not None
    if _METHOD.fullmatch(method) is None:
        return False
    target, sp, version = rest.partition(b" ")
    if not sp:
        return b"\r" not in target
    return bool(target) and (b"HTTP/1.0\r".startswith(version) or b"HTTP/1.1\r".startswith(version))


def http_host(head: bytes) -> str | bool | None:
    """The Host of a plaintext HTTP/1.x request head: the name (port and case stripped), ``None``
    when the head is complete but has no Host or is not HTTP, ``False`` when more bytes are needed.

    Not HTTP is decided as soon as the bytes cannot start a request line (``*1\\r\\n`` from
    redis-cli, a 6-byte greeting), so such clients are routed at once, not after a timeout."""
    end = head.find(b"\r\n\r\n")
    if end < 0:
        if b"\n" in head:
            return False if _REQUEST_LINE.match(head) else None
        return False if _may_become_request_line(head) else None
    if not _REQUEST_LINE.match(head):
        return None
    match = _HOST.search(head[: end + 2])
    if match is None:
        return None
    value = match.group(1).strip().decode("latin-1")
    if value.startswith("["):
        return value[1 : value.find("]")].lower() if "]" in value else None
    return value.rsplit(":", 1)[0].lower() if ":" in value else value.lower()
