"""The ``tailscale`` identity source: LocalAPI WhoIs on the peer address.

Owns: :class:`TailscaleSource`, which asks tailscaled who owns a connection's remote address
and turns the answer into an :class:`~ferryman.identity.base.Identity`: user = the
``UserProfile.LoginName`` (or, for a tagged device, its tags joined by ``,``), node = the node's
``ComputedName`` (else the first label of its MagicDNS ``Name``), tags = ``Node.Tags``, grants =
the raw ``CapMap[capability]`` values, unparsed (the policy engine parses them).

Must not: cache answers (revalidation must see grant changes on the next call: every
``identify`` asks tailscaled), parse grants, or own the LocalAPI client (it is injected and
closed by whoever built it). Mapping an answer to an identity is pure, so the identity built
for an answer object is reused when the client returns that same object again (it does for a
byte-identical body, see ``decode_whois``); a changed answer is a new object.

Failing closed: every way WhoIs can fail -- 404, 403, another status, an unreachable socket, a
timeout, an undecodable answer, a missing user profile -- raises
:class:`~ferryman.errors.IdentityUnavailable` with a reason naming the address and the cause.

When the source does not apply (returns None): only when tailscaled obviously cannot know the
address -- the peer's host is not an IP literal (a unix-socket peer), or it is unspecified,
multicast or link-local (tailnet addresses are never link-local, and a zone is meaningless to
tailscaled), or the port is 0. Everything else is asked, loopback included: with
``--tun=userspace-networking`` tailscaled forwards tailnet connections from ``127.0.0.1:<port>``
and resolves exactly that ``ip:port`` in WhoIs. An IPv4-mapped IPv6 peer (a dual-stack socket)
is asked as its IPv4 form, which is how tailscaled stores node addresses.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Any, Protocol

from ferryman.errors import IdentityUnavailable
from ferryman.identity.base import Identity, PeerInfo
from ferryman.tailscale.apitype import TAGGED_DEVICES_LOGIN, WhoIsResponse
from ferryman.tailscale.errors import (
    LocalAPIAccessDenied,
    LocalAPIError,
    LocalAPIProtocolError,
    LocalAPITimeout,
    LocalAPIUnreachable,
    PeerNotFound,
    TailscaleError,
)

_MEMO_SIZE = 256


class WhoIsClient(Protocol):
    """The part of :class:`ferryman.tailscale.LocalAPIClient` this source uses."""

    async def whois(self, addr: str, *, timeout: float | None = None) -> WhoIsResponse: ...


def whois_addr(peer: PeerInfo) -> str | None:
    """The ``addr`` to ask tailscaled about, or None when it cannot know this peer."""
    if not 0 < peer.remote_port < 65536:
        return None
    host = _whois_host(peer.remote_host)
    return None if host is None else f"{host}:{peer.remote_port}"


@functools.lru_cache(maxsize=4096)
def _whois_host(remote_host: str) -> str | None:
    """The host part of ``addr`` for a peer host (``1.2.3.4``, ``[fd7a::1]``), or None.

    Pure in the host string (parsed as ``PeerInfo.remote_ip`` parses it), so it is computed
    once per distinct client address rather than once per connection."""
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(remote_host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or ip.is_multicast or ip.is_link_local:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        return f"[{ip.compressed}]"
    return str(ip)


class TailscaleSource:
    """Identify peers by asking tailscaled (``WhoIs``); see the module docstring for the rules.

    ``capability`` is the app-capability name whose ``CapMap`` values become the identity's
    grants (``ferryman.dev/cap/ferryman``, or ``redo.com/cap/waypoint`` to reuse Waypoint's).
    ``timeout`` bounds one WhoIs (None: the client's default).
    """

    name = "tailscale"

    def __init__(self, client: WhoIsClient, capability: str, *, timeout: float | None = None) -> None:
        if not capability:
            raise ValueError("capability name must not be empty")
        self._client = client
        self.capability = capability
        self.timeout = timeout
        self._memo: dict[int, tuple[WhoIsResponse, Identity]] = {}
        """id(answer) → (answer, its identity): the client hands out the same answer object for
        a byte-identical WhoIs body, and mapping it again would give an equal identity."""

    async def identify(self, peer: PeerInfo) -> Identity | None:
        addr = whois_addr(peer)
        if addr is None:
            return None
        try:
            answer = await self._client.whois(addr, timeout=self.timeout)
        except TailscaleError as exc:
            raise IdentityUnavailable(_reason(addr, exc)) from exc
        hit = self._memo.get(id(answer))
        if hit is not None and hit[0] is answer:
            return hit[1]
        identity = self.to_identity(addr, answer)  # raises for an answer that is no identity
        memo = self._memo
        if len(memo) >= _MEMO_SIZE:
            del memo[next(iter(memo))]
        memo[id(answer)] = (answer, identity)  # the answer is kept: its id cannot be reused
        return identity

    def to_identity(self, addr: str, answer: WhoIsResponse) -> Identity:
        """Map a WhoIs answer for ``addr`` to an identity. Raises ``IdentityUnavailable``."""
        node, profile = answer.node, answer.user_profile
        if profile is None:
            raise IdentityUnavailable(f"tailscale whois: {addr} has no user profile in the WhoIs answer")
        tags = tuple(node.tags)
        if tags:
            user = ",".join(tags)
        elif profile.login_name == TAGGED_DEVICES_LOGIN:
            raise IdentityUnavailable(f"tailscale whois: {addr} is a tagged device without tags")
        elif profile.login_name:
            user = profile.login_name
        else:
            raise IdentityUnavailable(f"tailscale whois: {addr} has an empty LoginName")
        claims: dict[str, Any] = {
            "tailscale_login_name": profile.login_name,
            "tailscale_display_name": profile.display_name,
            "tailscale_node_name": node.name.rstrip("."),
            "tailscale_node_id": node.stable_id,
            "tailscale_addresses": list(node.addresses),
        }
        return Identity(
            user=user,
            source=self.name,
            node=node.short_name,
            tags=tags,
            grants=tuple(answer.cap_map.get(self.capability, ())),
            claims=claims,
        )

    async def aclose(self) -> None:
        """Nothing to release: the client belongs to whoever injected it."""
        return None


def _reason(addr: str, exc: TailscaleError) -> str:
    prefix = "tailscale whois:"
    if isinstance(exc, PeerNotFound):
        return f"{prefix} no such peer {addr} ({exc.status})"
    if isinstance(exc, LocalAPIAccessDenied):
        return f"{prefix} tailscaled refused access ({exc.status}) for {addr}: {exc.error}"
    if isinstance(exc, LocalAPIError):
        return f"{prefix} tailscaled answered {exc.status} for {addr}: {exc.error or '(empty body)'}"
    if isinstance(exc, LocalAPIUnreachable):
        return f"{prefix} tailscaled unreachable at {exc.socket_path}: {exc.detail}"
    if isinstance(exc, LocalAPITimeout):
        return f"{prefix} no answer from tailscaled at {exc.socket_path} within {exc.timeout:g}s for {addr}"
    if isinstance(exc, LocalAPIProtocolError):
        return f"{prefix} bad answer from tailscaled for {addr}: {exc.message}"
    return f"{prefix} {addr}: {exc.message}"
