"""Listener policies in Pomerium Policy Language (PPL): compiled rules and their evaluation.

Owns: :class:`ListenerPolicy` (a listener's ``policy``, compiled by
:func:`ferryman.policy.pplparse.parse_listener_policy`), the criteria it is built from, and
:meth:`ListenerPolicy.evaluate`: identity, client address and the time in, a :class:`Decision`
out.

Must not: do I/O, log or read the clock -- the caller passes ``now`` (Unix seconds) -- or know
about grants, listeners or sockets. Evaluation is pure and allocation-light, so
:class:`ferryman.proxy.access.Access` runs it on every connection and every revalidation.

Semantics, as Pomerium implements them (``pkg/policy/generator``, ``pkg/policy/criteria``):

- Access needs at least one matching ``allow`` rule and no matching ``deny`` rule: ``deny``
  always wins, and a policy with only ``deny`` rules admits nobody.
- A rule matches when any of its operators does; ``and`` = all criteria, ``or`` = any,
  ``not`` = none (not A and not B), ``nor`` = not all (not A or not B).
- String matchers (``email``, ``user``, ``domain``) hold when every operator given holds; string
  list matchers (``groups``, ``tag``, ``claim/…``) test ``has`` (some value equals), ``is`` (the
  only value equals), ``exclude`` (no value equals). A missing claim is an empty list.
- Values compare as JSON does: ``1 == 1.0``, but ``"1" != 1`` and ``true != 1``.

What ferryman reads for each criterion (see the README, "Listener policy"): ``email`` and
``user`` the login (:attr:`Identity.user`), ``domain`` the part after its last ``@`` (a login
without one matches no ``domain`` criterion), all three case-insensitively as grants compare
logins; ``groups`` and ``tag`` the identity's groups and tags, a ``group:`` / ``tag:`` prefix
optional on either side; ``claim/NAME`` the identity's claims (Tailscale and certificate
identities carry some; a ``/`` or ``.`` in NAME walks into nested values when no claim has the
whole name); ``source_ip`` the client address; ``day_of_week`` and ``time_of_day`` ``now``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from typing import Any, Literal, Protocol

from ferryman.identity.base import Identity, IPAddress

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Scalar = str | int | float | bool
"""A value a string list matcher compares with (claims may be numbers or booleans)."""
Action = Literal["allow", "deny"]
Operator = Literal["and", "or", "not", "nor"]


class Node(Protocol):
    """An operator or a criterion: true or false for one connection at one moment."""

    def matches(self, who: Identity, ip: IPAddress | None, now: float) -> bool: ...

    def explain(self, who: Identity, ip: IPAddress | None, now: float) -> tuple[str, ...]:
        """Names of the criteria that decide this node's current value (for refusal reasons)."""
        ...


def _same(a: object, b: object) -> bool:
    """JSON equality (Python's ``True == 1`` and ``"1" != 1.0`` are not what a policy means)."""
    if a.__class__ is b.__class__:
        return a == b
    if isinstance(a, bool) or isinstance(b, bool):
        return False
    return isinstance(a, int | float) and isinstance(b, int | float) and a == b


@dataclass(frozen=True, slots=True)
class StringMatch:
    """A string matcher: every operator that is set must hold."""

    is_: str | None = None
    not_: str | None = None
    contains: str | None = None
    starts_with: str | None = None
    ends_with: str | None = None
    in_: frozenset[str] | None = None
    not_in: frozenset[str] | None = None

    def test(self, value: str) -> bool:
        if self.is_ is not None and value != self.is_:
            return False
        if self.not_ is not None and value == self.not_:
            return False
        if self.contains is not None and self.contains not in value:
            return False
        if self.starts_with is not None and not value.startswith(self.starts_with):
            return False
        if self.ends_with is not None and not value.endswith(self.ends_with):
            return False
        if self.in_ is not None and value not in self.in_:
            return False
        return self.not_in is None or value not in self.not_in


@dataclass(frozen=True, slots=True)
class ListMatch:
    """A string list matcher: every operator that is set must hold."""

    has: Scalar | None = None
    is_: Scalar | None = None
    exclude: Scalar | None = None
    kinds: tuple[str, ...] = field(init=False, repr=False)
    """The operands' types, so that equality of matchers is exact (``true`` is not ``1``)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", tuple(type(v).__name__ for v in (self.has, self.is_, self.exclude)))

    def test(self, values: tuple[Any, ...]) -> bool:
        if self.has is not None and not _contains(values, self.has):
            return False
        if self.is_ is not None and not (len(values) == 1 and _same(values[0], self.is_)):
            return False
        return self.exclude is None or not _contains(values, self.exclude)


def _contains(values: tuple[Any, ...], wanted: Scalar) -> bool:
    for value in values:  # noqa: SIM110 - a loop: any() over a generator costs ~0.5 µs more
        if _same(value, wanted):
            return True
    return False


@dataclass(frozen=True, slots=True)
class Constant:
    """``accept`` (always), ``reject`` (never), ``authenticated_user`` (every connection that
    reaches a listener policy has an identity)."""

    name: str
    value: bool

    def matches(self, who: Identity, ip: IPAddress | None, now: float) -> bool:
        return self.value

    def explain(self, who: Identity, ip: IPAddress | None, now: float) -> tuple[str, ...]:
        return (self.name,)


@dataclass(frozen=True, slots=True)
class LoginMatch:
    """``email`` / ``user`` (the whole login) or ``domain`` (after its last ``@``), lower-cased."""

    name: str
    match: StringMatch
    domain: bool = False

    def matches(self, who: Identity, ip: IPAddress | None, now: float) -> bool:
        login = who.user.lower()
        if self.domain:
            _, at, login = login.rpartition("@")
            if not at:
                return False  # Pomerium: no domain, the criterion is false (negations too)
        return self.match.test(login)

    def explain(self, who: Identity, ip: IPAddress | None, now: float) -> tuple[str, ...]:
        return (self.name,)


@dataclass(frozen=True, slots=True)
class MemberMatch:
    """``groups`` or ``tag``: the identity's groups or tags, a ``group:`` / ``tag:`` prefix
    optional on either side. Each operand is held as the set of its two spellings, so a test
    is a set lookup per value (operators as in :class:`ListMatch`)."""

    name: str
    has: frozenset[str] | None = None
    is_: frozenset[str] | None = None
    exclude: frozenset[str] | None = None
    tags: bool = False

    def matches(self, who: Identity, ip: IPAddress | None, now: float) -> bool:
        values = who.tags if self.tags else who.groups
        if self.has is not None and self.has.isdisjoint(values):
            return False
        if self.is_ is not None and not (len(values) == 1 and values[0] in self.is_):
            return False
        return self.exclude is None or self.exclude.isdisjoint(values)

    def explain(self, who: Identity, ip: IPAddress | None, now: float) -> tuple[str, ...]:
        return (self.name,)


_MISSING = object()


def claim_values(claims: Mapping[str, Any], key: str, segments: tuple[str, ...]) -> tuple[Any, ...]:
    """The values of claim ``key`` as a list (Pomerium's claims are lists): the claim named
    ``key``, else the nested value at ``segments``; missing or a table → ``()``."""
    value: Any = claims.get(key, _MISSING)
    if value is _MISSING and len(segments) > 1:
        value = claims
        for segment in segments:
            if not isinstance(value, Mapping) or segment not in value:
                return ()
            value = value[segment]
    if value is _MISSING or value is None or isinstance(value, Mapping):
        return ()
    if isinstance(value, list | tuple | frozenset | set):
        return tuple(value)
    return (value,)


@dataclass(frozen=True, slots=True)
class ClaimMatch:
    """``claim/NAME``: the identity's claim values (none for sources without claims)."""

    name: str
    key: str
    segments: tuple[str, ...]
    match: ListMatch

    def matches(self, who: Identity, ip: IPAddress | None, now: float) -> bool:
        return self.match.test(claim_values(who.claims, self.key, self.segments))

    def explain(self, who: Identity, ip: IPAddress | None, now: float) -> tuple[str, ...]:
        return (self.name,)


@dataclass(frozen=True, slots=True)
class SourceIP:
    """``source_ip``: the client address is in one of the networks (IPv4-mapped IPv6 addresses
    count as their IPv4 address). An unknown address matches nothing."""

    name: str
    networks: tuple[IPNetwork, ...]

    def matches(self, who: Identity, ip: IPAddress | None, now: float) -> bool:
        if ip is None:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        for net in self.networks:  # noqa: SIM110 - see Rule.matches
            if ip.version == net.version and ip in net:
                return True
        return False

    def explain(self, who: Identity, ip: IPAddress | None, now: float) -> tuple[str, ...]:
        return (self.name,)


@dataclass(frozen=True, slots=True)
class DayOfWeek:
    """``day_of_week``: today (in ``zone``) is one of ``days`` (0 = Monday … 6 = Sunday)."""

    name: str
    days: frozenset[int]
    zone: tzinfo

    def matches(self, who: Identity, ip: IPAddress | None, now: float) -> bool:
        return datetime.fromtimestamp(now, self.zone).weekday() in self.days

    def explain(self, who: Identity, ip: IPAddress | None, now: float) -> tuple[str, ...]:
        return (self.name,)


@dataclass(frozen=True, slots=True)
class TimeOfDay:
    """``time_of_day``: the wall-clock time in ``zone``, in seconds since midnight, is at or
    after ``after`` and before ``before``; when ``after`` is later than ``before`` the window
    runs across midnight (``22:00`` → ``06:00``)."""

    name: str
    zone: tzinfo
    after: float | None
    before: float | None

    def matches(self, who: Identity, ip: IPAddress | None, now: float) -> bool:
        moment = datetime.fromtimestamp(now, self.zone)
        t = moment.hour * 3600 + moment.minute * 60 + moment.second + moment.microsecond / 1e6
        after, before = self.after, self.before
        if before is None:
            return after is None or t >= after
        if after is None:
            return t < before
        if after <= before:
            return after <= t < before
        return t >= after or t < before

    def explain(self, who: Identity, ip: IPAddress | None, now: float) -> tuple[str, ...]:
        return (self.name,)


@dataclass(frozen=True, slots=True)
class Group:
    """A logical operator over criteria (or, nested -- a ferryman extension -- operators)."""

    op: Operator
    items: tuple[Node, ...]

    def matches(self, who: Identity, ip: IPAddress | None, now: float) -> bool:
        op = self.op
        if op == "and" or op == "nor":
            for item in self.items:
                if not item.matches(who, ip, now):
                    return op == "nor"
            return op == "and"
        for item in self.items:  # or, not
            if item.matches(who, ip, now):
                return op == "or"
        return op == "not"

    def explain(self, who: Identity, ip: IPAddress | None, now: float) -> tuple[str, ...]:
        # The deciding child is the first one whose value settles the operator; when every
        # child had to be looked at, all of them decide.
        settle = self.op in ("or", "not")  # these settle on the first true child
        for item in self.items:
            if item.matches(who, ip, now) == settle:
                return item.explain(who, ip, now)
        return tuple(name for item in self.items for name in item.explain(who, ip, now))


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``allow`` or ``deny`` table; ``number`` counts them from 1 in the order written."""

    number: int
    action: Action
    groups: tuple[Group, ...]

    def matches(self, who: Identity, ip: IPAddress | None, now: float) -> bool:
        # A loop, not any() over a generator: this runs per connection, and the generator
        # (a closure over three arguments) costs ~0.5 µs more than the whole check.
        for group in self.groups:  # noqa: SIM110
            if group.matches(who, ip, now):
                return True
        return False

    def explain(self, who: Identity, ip: IPAddress | None, now: float) -> tuple[str, ...]:
        for group in self.groups:
            if group.matches(who, ip, now):
                return tuple(dict.fromkeys(group.explain(who, ip, now)))
        return ()


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of a listener policy for one connection at one moment."""

    allowed: bool
    reason: str = ""
    """Why it was refused, for the audit record and the log."""
    rule: int | None = None
    """The ``deny`` rule that refused, if one did."""
    criteria: tuple[str, ...] = ()
    """The criteria that made that rule match."""


ALLOWED = Decision(True)


@dataclass(frozen=True, slots=True)
class ListenerPolicy:
    """A listener's compiled policy. Equal policies compare equal (and hash alike)."""

    rules: tuple[Rule, ...]
    source: Any = field(default=None, compare=False, repr=False)
    """The value as written (for serialising the configuration back)."""
    allow: tuple[Rule, ...] = field(init=False, compare=False, repr=False)
    deny: tuple[Rule, ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "allow", tuple(r for r in self.rules if r.action == "allow"))
        object.__setattr__(self, "deny", tuple(r for r in self.rules if r.action == "deny"))

    def evaluate(self, who: Identity, ip: IPAddress | None, now: float) -> Decision:
        """Decide for ``who`` connecting from ``ip`` at ``now`` (Unix seconds): a matching
        ``deny`` rule refuses (it always wins), else a matching ``allow`` rule admits, else
        nothing admitted the connection."""
        for rule in self.deny:
            if rule.matches(who, ip, now):
                names = rule.explain(who, ip, now)
                return Decision(
                    False,
                    f"listener policy: denied by rule {rule.number} ({', '.join(names)})",
                    rule.number,
                    names,
                )
        for rule in self.allow:
            if rule.matches(who, ip, now):
                return ALLOWED
        if not self.allow:
            return Decision(False, "listener policy: no allow rule matched (the policy has only deny rules)")
        return Decision(False, "listener policy: no allow rule matched")
