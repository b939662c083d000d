"""The grant model: plain frozen values the engine evaluates.

Owns: :class:`Limits`, :class:`BackendGrant`, :class:`CapGrant` (one value of the app
capability, the same shape in a local policy file and in a tailnet's ``CapMap``),
:class:`Rule` and :class:`Policy`, and how limits and permissions combine
(:meth:`Limits.strictest`, :func:`merge_pg`, :func:`database_grant`).

Must not: parse JSON (``policy.parse`` does) or know where grants came from beyond an
``origin`` string used in audit records.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PRESETS = ("readonly", "readwrite", "admin")
"""PostgreSQL permission presets, weakest first."""


@dataclass(frozen=True, slots=True)
class Bandwidth:
    bytes: int
    period: float


def _min_nonzero(values: Iterable[float | int | None]) -> float | int | None:
    present = [v for v in values if v]
    return min(present) if present else None


@dataclass(frozen=True, slots=True)
class Limits:
    """Grant limits; ``None`` (or 0 in the source) means "no limit from this grant"."""

    max_conns: int | None = None
    max_bytes_per_conn: int | None = None
    max_conn_duration: float | None = None
    bandwidth: tuple[Bandwidth, ...] = ()

    @staticmethod
    def strictest(items: Iterable[Limits]) -> Limits:
        """Combine limits of several matching grants: the strictest non-zero value wins.

        Bandwidth windows all apply; for one period only the smallest byte budget is kept.
        """
        items = list(items)
        windows: dict[float, int] = {}
        for item in items:
            for window in item.bandwidth:
                current = windows.get(window.period)
                windows[window.period] = window.bytes if current is None else min(current, window.bytes)
        max_conns = _min_nonzero(i.max_conns for i in items)
        max_bytes = _min_nonzero(i.max_bytes_per_conn for i in items)
        max_duration = _min_nonzero(i.max_conn_duration for i in items)
        return Limits(
            max_conns=int(max_conns) if max_conns is not None else None,
            max_bytes_per_conn=int(max_bytes) if max_bytes is not None else None,
            max_conn_duration=float(max_duration) if max_duration is not None else None,
            bandwidth=tuple(Bandwidth(b, p) for p, b in sorted(windows.items())),
        )


NO_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class PgDatabaseGrant:
    """What a grant allows in one PostgreSQL database (key ``"*"`` = any other database)."""

    permissions: frozenset[str] = frozenset()
    schemas: frozenset[str] = frozenset()
    """Schemas the presets apply to; empty means ``public``."""
    sql: tuple[str, ...] = ()
    """Raw ``GRANT … TO {{.Role}}`` statements (used only with ``allow_raw_sql``)."""


def merge_pg(items: Iterable[Mapping[str, PgDatabaseGrant]]) -> dict[str, PgDatabaseGrant]:
    """Union of database grants: permissions, schemas and raw SQL of every matching grant."""
    out: dict[str, PgDatabaseGrant] = {}
    for grants in items:
        for name, grant in grants.items():
            prev = out.get(name)
            if prev is None:
                out[name] = grant
            else:
                sql = prev.sql + tuple(s for s in grant.sql if s not in prev.sql)
                out[name] = PgDatabaseGrant(
                    prev.permissions | grant.permissions, prev.schemas | grant.schemas, sql
                )
    return out


def database_grant(parts: Iterable[Mapping[str, PgDatabaseGrant]], database: str) -> PgDatabaseGrant | None:
    """What the matching grants allow in ``database``, exactly as Waypoint resolves it.

    ``parts`` are the ``pg.databases`` maps of every matching grant, in grant order. For each,
    the entry named ``database`` *and* the ``"*"`` entry both contribute (an exact entry does
    not hide ``"*"``): permissions and schemas are unioned, raw SQL is concatenated in order
    (exact before ``"*"`` within a grant, grants in order) so a ``REVOKE`` acts where its
    author put it. ``None`` when no grant has either entry: the database is not granted, even
    if the listener is (Waypoint's ``auth.DatabasePermissions``).
    """
    found = False
    permissions: set[str] = set()
    schemas: set[str] = set()
    sql: list[str] = []
    for grants in parts:
        for key in (database, "*"):
            entry = grants.get(key)
            if entry is None:
                continue
            found = True
            permissions |= entry.permissions
            schemas |= entry.schemas
            sql.extend(entry.sql)
    if not found:
        return None
    return PgDatabaseGrant(frozenset(permissions), frozenset(schemas), tuple(sql))


@dataclass(frozen=True, slots=True)
class BackendGrant:
    """``backends.<listener>`` of a capability value."""

    pg: Mapping[str, PgDatabaseGrant] | None = None
    limits: Limits = NO_LIMITS


@dataclass(frozen=True, slots=True)
class CapGrant:
    """One value of the app capability: backends it opens and the user-level limits."""

    backends: Mapping[str, BackendGrant]
    limits: Limits = NO_LIMITS
    origin: str = ""
    """Where it came from, for audit: ``policy.json grants[2]``, ``tailscale CapMap[0]``."""


@dataclass(frozen=True, slots=True)
class Selector:
    """The ``src`` of a local rule, pre-split for fast matching."""

    everyone: bool = False
    logins: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    tags: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    src: Selector
    caps: tuple[CapGrant, ...]
    origin: str


@dataclass(frozen=True, slots=True)
class Policy:
    """The local policy file, parsed."""

    groups: Mapping[str, frozenset[str]] = field(default_factory=dict)
    """``group:name`` → lower-cased logins."""
    rules: tuple[Rule, ...] = ()
    warnings: tuple[str, ...] = ()


EMPTY_POLICY = Policy()
