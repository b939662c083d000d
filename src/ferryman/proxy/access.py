"""Admission: who is this, may they use this listener, and within which limits?

Owns: :class:`Access`, which runs a listener's identity sources in order, evaluates grants
with the pure engine (local policy plus capabilities carried by the identity), applies the
listener's own ``policy`` (Pomerium Policy Language, :mod:`ferryman.policy.ppl`) on top, and
re-checks live sessions for revalidation. It holds the *current* policy and sources; a reload
swaps them in one assignment, so a decision always sees one consistent generation.

Must not: touch sockets or write audit records (callers do, knowing the outcome).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ferryman.errors import AccessDenied, IdentityUnavailable
from ferryman.identity.base import Identity, IdentitySource, PeerInfo
from ferryman.policy.engine import Authorization, authorize
from ferryman.policy.model import CapGrant, Policy
from ferryman.policy.parse import parse_cap_values
from ferryman.policy.ppl import ListenerPolicy

logger = logging.getLogger(__name__)


_AuthKey = tuple[str, tuple[str, ...], tuple[str, ...], str, str]
"""(user, groups, tags, client address, listener): everything a decision reads from an
identity without carried grants (see :func:`ferryman.policy.engine.authorize`)."""


@dataclass(frozen=True, slots=True)
class AccessGeneration:
    """One consistent set of policy and sources (replaced whole on reload)."""

    policy: Policy
    sources: Mapping[str, IdentitySource]
    capability: str
    decisions: dict[_AuthKey, Authorization | tuple[str, str]] = field(
        default_factory=dict, compare=False, repr=False
    )
    """This policy's decisions (an Authorization, or a denial's reason and client message) for
    identities that carry no grants. The engine is a pure function of the key and the policy,
    so a repeat caller gets the same answer without re-walking every rule; a reload brings a
    new generation and with it an empty memo. Listener policies are never remembered here:
    they may read the clock and the identity's claims, which the key does not hold."""


class ListenerSettings(Protocol):
    """What :class:`Access` reads from a listener's configuration (``ListenerConfig``)."""

    @property
    def policy(self) -> ListenerPolicy | None: ...


POLICY_CLIENT_MESSAGE = "refused by this service's access policy"

_CAPS_MEMO_SIZE = 1024
_AUTH_MEMO_SIZE = 4096


class Access:
    def __init__(
        self,
        generation: AccessGeneration,
        *,
        listeners: Mapping[str, ListenerSettings] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.generation = generation
        self.listeners: Mapping[str, ListenerSettings] = {} if listeners is None else listeners
        """The running listeners' configuration by name, read for their ``policy`` on every
        decision. The gateway passes its ``Runtime.listeners`` here (the same dict, kept
        current by start and reload), so a reload's listener configuration -- and with it a
        changed policy -- applies to the next decision and the next revalidation. A listener
        missing from it has no policy."""
        self.clock = clock
        """Wall-clock time in Unix seconds, for ``day_of_week`` and ``time_of_day``."""
        self._caps_memo: dict[int, tuple[tuple[Any, ...], str, list[CapGrant], list[str]]] = {}
        """id(grants) → (grants, source, parsed, problems). A Tailscale source hands out the same
        grants tuple for every connection of a peer whose WhoIs answer did not change; parsing it
        again would give equal values."""

    async def identify(self, peer: PeerInfo, source_names: Sequence[str]) -> Identity:
        """First identity any named source vouches for. Raises :class:`AccessDenied`."""
        sources = self.generation.sources
        for name in source_names:
            source = sources.get(name)
            if source is None:
                continue
            identity = await source.identify(peer)
            if identity is not None:
                return _unexpired(name, identity)
        raise _nobody(peer, source_names)

    def identify_now(self, peer: PeerInfo, source_names: Sequence[str]) -> Identity | None:
        """:meth:`identify` without waiting, or ``None`` when a source it would have to ask
        needs I/O (it has no ``lookup``; see :mod:`ferryman.identity.base`): the caller then
        awaits :meth:`identify`. Same answer, same errors."""
        sources = self.generation.sources
        for name in source_names:
            source = sources.get(name)
            if source is None:
                continue
            lookup: Callable[[PeerInfo], Identity | None] | None = getattr(source, "lookup", None)
            if lookup is None:
                return None
            identity = lookup(peer)
            if identity is not None:
                return _unexpired(name, identity)
        raise _nobody(peer, source_names)

    def carried_caps(self, identity: Identity) -> list[CapGrant]:
        """Capability values the identity brought (Tailscale CapMap), parsed; bad ones dropped."""
        grants = identity.grants
        if not grants:
            return []
        hit = self._caps_memo.get(id(grants))
        if hit is not None and hit[0] is grants and hit[1] == identity.source:
            caps, problems = hit[2], hit[3]
        else:
            caps, problems = parse_cap_values(grants, f"{identity.source} capability")
            memo = self._caps_memo
            if len(memo) >= _CAPS_MEMO_SIZE:
                del memo[next(iter(memo))]
            memo[id(grants)] = (grants, identity.source, caps, problems)  # keeps grants alive
        for problem in problems:
            logger.warning("ignoring malformed grant for %s: %s", identity.user, problem)
        return list(caps)

    def authorize(self, identity: Identity, peer: PeerInfo, listener: str) -> Authorization:
        """Raises :class:`AccessDenied` when no grant names ``listener``, or when the
        listener's ``policy`` refuses the connection (checked after the grants, every time:
        it may depend on the time of day, so revalidation closes a session whose window has
        ended)."""
        generation = self.generation
        if identity.grants:  # carried capabilities: decided afresh (their memo is by identity)
            auth = authorize(
                identity, peer.remote_ip, listener, generation.policy, self.carried_caps(identity)
            )
        else:
            memo = generation.decisions
            key = (identity.user, identity.groups, identity.tags, peer.remote_host, listener)
            decided = memo.get(key)
            if decided is None:
                try:
                    decided = authorize(identity, peer.remote_ip, listener, generation.policy)
                except AccessDenied as exc:
                    decided = (exc.reason, exc.client_message)  # not the exception: no traceback kept
                if len(memo) >= _AUTH_MEMO_SIZE:
                    del memo[next(iter(memo))]
                memo[key] = decided
            if isinstance(decided, tuple):
                raise AccessDenied(decided[0], client_message=decided[1])
            auth = decided
        settings = self.listeners.get(listener)
        if settings is not None and settings.policy is not None:
            verdict = settings.policy.evaluate(identity, peer.remote_ip, self.clock())
            if not verdict.allowed:
                raise AccessDenied(verdict.reason, client_message=POLICY_CLIENT_MESSAGE)
        return auth

    async def admit(
        self, peer: PeerInfo, listener: str, source_names: Sequence[str]
    ) -> tuple[Identity, Authorization]:
        identity = await self.identify(peer, source_names)
        return identity, self.authorize(identity, peer, listener)


def _unexpired(source: str, identity: Identity) -> Identity:
    if identity.expires_at is not None and identity.expires_at <= time.time():
        raise IdentityUnavailable(f"{source}: identity expired", client_message="credentials expired")
    return identity


def _nobody(peer: PeerInfo, source_names: Sequence[str]) -> AccessDenied:
    return AccessDenied(
        f"no identity: none of {', '.join(source_names) or 'no sources'} recognised {peer.remote_addr}",
        client_message="no identity for this connection",
    )
