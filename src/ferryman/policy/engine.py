"""The grant engine: does this identity, from this address, get this listener — and with what?

Owns: :func:`authorize`, a pure function from (identity, peer address, listener name, local
policy, capabilities carried by the identity) to an :class:`Authorization` or an
:class:`~ferryman.errors.AccessDenied`.

Must not: do I/O, log, or know about sockets and timers. It is called on every new connection
and on every revalidation pass, so it stays cheap and deterministic.

Rules (SPEC §3), the same as Waypoint's ``auth.Authorize``/``mergeRules``: a capability value
applies when its ``src`` matches (for carried values Tailscale already decided that) and it
names the listener under ``backends``; values that do not name the listener contribute nothing,
not even their top-level limits. Permissions of every applying value are unioned; for each limit
the strictest non-zero value wins, bandwidth windows are kept per period with the smallest
budget. Top-level ``limits`` of an applying value are the per-user limits (Waypoint's
``MergedLimits``: ``max_conns`` counted across all listeners); ``backends.<listener>.limits`` are
the per-listener ones (Waypoint's ``EndpointLimits``: ``max_conns`` counted per user and
listener). Per connection, byte and duration limits are the strictest of both levels.
For PostgreSQL, :meth:`Authorization.database_grant` resolves one database as Waypoint's
``auth.DatabasePermissions`` does. See ``docs/waypoint.md``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ferryman.errors import AccessDenied
from ferryman.identity.base import Identity, IPAddress
from ferryman.policy.model import (
    CapGrant,
    Limits,
    PgDatabaseGrant,
    Policy,
    Selector,
    database_grant,
    merge_pg,
)


@dataclass(frozen=True)
class Authorization:
    """The outcome of a granted decision."""

    listener: str
    user_limits: Limits
    """Limits counted per user across all listeners (``max_conns``, ``bandwidth``)."""
    listener_limits: Limits
    """Limits from ``backends.<listener>.limits`` (``max_conns`` counts per user and listener)."""
    pg: Mapping[str, PgDatabaseGrant] | None
    """Union of the applying values' ``pg.databases`` per key; ``None`` when none has ``pg``."""
    origins: tuple[str, ...]
    pg_grants: tuple[Mapping[str, PgDatabaseGrant], ...] = ()
    """Each applying value's ``pg.databases``, in order (for :meth:`database_grant`)."""

    @functools.cached_property
    def connection_limits(self) -> Limits:
        """Per-connection limits: the strictest of the user and listener levels."""
        return Limits.strictest((self.user_limits, self.listener_limits))

    def database_grant(self, database: str) -> PgDatabaseGrant | None:
        """What the caller may do in ``database``; ``None`` when no grant covers it (42501).

        Waypoint-exact: the exact entry and ``"*"`` of every applying value are combined, see
        :func:`ferryman.policy.model.database_grant`.
        """
        return database_grant(self.pg_grants, database)


def selector_matches(
    selector: Selector, identity: Identity, peer_ip: IPAddress | None, groups: Mapping[str, frozenset[str]]
) -> bool:
    if selector.everyone:
        return True
    login = identity.user.lower()
    if login in selector.logins:
        return True
    if selector.groups:
        principals = identity.principals()
        for group in selector.groups:
            if group in principals or login in groups.get(group, ()):
                return True
    if selector.tags and not selector.tags.isdisjoint(identity.principals()):
        return True
    if peer_ip is not None:
        for network in selector.networks:
            if peer_ip.version == network.version and peer_ip in network:
                return True
    return False


def applicable_caps(
    identity: Identity, peer_ip: IPAddress | None, policy: Policy, carried: Sequence[CapGrant]
) -> list[CapGrant]:
    """Every capability value that applies to this caller, carried ones first."""
    caps = list(carried)
    for rule in policy.rules:
        if selector_matches(rule.src, identity, peer_ip, policy.groups):
            caps.extend(rule.caps)
    return caps


def authorize(
    identity: Identity,
    peer_ip: IPAddress | None,
    listener: str,
    policy: Policy,
    carried: Sequence[CapGrant] = (),
) -> Authorization:
    """Decide whether ``identity`` may use ``listener``. Raises :class:`AccessDenied`.

    Reads only the identity's user, groups and tags, ``peer_ip``, ``policy`` and ``carried``:
    :meth:`ferryman.proxy.access.Access.authorize` remembers decisions keyed on exactly those,
    so a criterion added here must be added to that key too."""
    caps = [c for c in applicable_caps(identity, peer_ip, policy, carried) if listener in c.backends]
    if not caps:
        raise AccessDenied(f"no grant for listener {listener!r}", client_message="no grant for this service")
    backend_grants = [c.backends[listener] for c in caps]
    pg_parts = [g.pg for g in backend_grants if g.pg is not None]
    return Authorization(
        listener=listener,
        user_limits=Limits.strictest(c.limits for c in caps),
        listener_limits=Limits.strictest(g.limits for g in backend_grants),
        pg=merge_pg(pg_parts) if pg_parts else None,
        origins=tuple(c.origin for c in caps),
        pg_grants=tuple(pg_parts),
    )
