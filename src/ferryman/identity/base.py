"""The identity contract: what a source is given, what it returns, how it fails.

Owns: :class:`PeerInfo` (everything known about a connection before it is identified),
:class:`Identity` (who it is, as vouched for by one source) and the :class:`IdentitySource`
protocol.

Must not: know about listeners, grants or sockets. Sources are handed a ``PeerInfo`` and
answer; they never read from the connection themselves.

Source contract:
- return an :class:`Identity` when the source vouches for the peer;
- return ``None`` when the source does not apply (no client certificate, no token, address
  outside every static CIDR) so the next source in the listener's list is tried;
- raise :class:`ferryman.errors.IdentityUnavailable` when the source applies but cannot answer
  or refuses (tailscaled down, WhoIs 404, expired token): the connection fails closed.

A source whose answer needs no I/O (static CIDRs, an already verified certificate) may also
define ``lookup(peer)``: the same answer, synchronously. Connections that only such sources
identify are then identified without a wait or its timer (see
:meth:`ferryman.proxy.access.Access.identify_now`).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=4096)
def _parse_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


@dataclass(frozen=True)
class PeerInfo:
    """What the gateway knows about a connection when it asks who it is."""

    remote_host: str
    """Client address as the gateway trusts it (after a PROXY protocol header, if accepted)."""
    remote_port: int
    local_host: str = ""
    local_port: int = 0
    listener: str = ""
    sni: str | None = None
    alpn: str | None = None
    peer_cert_der: bytes | None = None
    """DER of the client certificate, present only when the TLS layer verified it."""
    bearer_token: str | None = field(default=None, repr=False)
    """A bearer token (tunnel ``Proxy-Authorization`` or PostgreSQL password). Never logged."""

    @property
    def remote_ip(self) -> IPAddress | None:
        """The parsed client address (parsed once per distinct address: clients repeat)."""
        return _parse_ip(self.remote_host)

    @property
    def remote_addr(self) -> str:
        """``host:port`` (``[v6]:port`` for IPv6), as tailscaled's WhoIs expects it."""
        host = self.remote_host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.remote_port}"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is connecting, as one source vouched for it."""

    user: str
    """Login, e.g. ``alice@example.com``; for a tagged device, its tags joined by ``,``."""
    source: str
    """Name of the source that vouched (``static``, ``tailscale``, ``mtls``, ``token``)."""
    node: str = ""
    groups: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    grants: tuple[Any, ...] = ()
    """Raw grant values the source carries (Tailscale ``CapMap[capability]``), unparsed JSON."""
    claims: Mapping[str, Any] = field(default_factory=dict)
    """Extra attributes for policy criteria (token claims, certificate fields)."""
    expires_at: float | None = None
    """Unix time after which the identity is no longer valid (certificate/token expiry)."""

    def principals(self) -> frozenset[str]:
        """Selectors this identity satisfies besides addresses: login, ``group:``, ``tag:``."""
        out = {self.user}
        out.update(g if g.startswith("group:") else f"group:{g}" for g in self.groups)
        out.update(t if t.startswith("tag:") else f"tag:{t}" for t in self.tags)
        return frozenset(out)


@runtime_checkable
class IdentitySource(Protocol):
    """One way of learning who a peer is. See the module docstring for the contract."""

    @property
    def name(self) -> str: ...

    async def identify(self, peer: PeerInfo) -> Identity | None: ...

    async def aclose(self) -> None: ...
