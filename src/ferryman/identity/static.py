"""The ``static`` identity source: trusted networks map to fixed identities.

Owns: matching a peer address against ``[[identity.static]]`` CIDRs (most specific first).
Must not: do I/O. Used for development and for networks whose edge already authenticates.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from ferryman.identity.base import Identity, PeerInfo

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class StaticEntry:
    network: IPNetwork
    identity: Identity


class StaticSource:
    """CIDR → identity. The longest matching prefix wins; no match means "not mine"."""

    name = "static"

    def __init__(self, entries: Iterable[StaticEntry]) -> None:
        self._entries = sorted(entries, key=lambda e: e.network.prefixlen, reverse=True)

    async def identify(self, peer: PeerInfo) -> Identity | None:
        return self.lookup(peer)

    def lookup(self, peer: PeerInfo) -> Identity | None:
        ip = peer.remote_ip
        if ip is None:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        for entry in self._entries:
            if ip.version == entry.network.version and ip in entry.network:
                return entry.identity
        return None

    async def aclose(self) -> None:
        return None
