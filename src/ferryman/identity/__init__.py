"""Identity sources: who is on the other end of a connection.

Every source implements :class:`ferryman.identity.base.IdentitySource`; the gateway core only
ever talks to that interface, so new sources plug in without touching the core.
"""

from ferryman.identity.base import Identity, IdentitySource, PeerInfo

__all__ = ["Identity", "IdentitySource", "PeerInfo"]
