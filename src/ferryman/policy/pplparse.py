"""Parse a listener's ``policy`` (Pomerium Policy Language) into a :class:`ListenerPolicy`.

Owns: :func:`parse_listener_policy`, which checks every rule, operator, criterion and value
once, at configuration load, and precompiles them (lower-cased logins, parsed networks, day
sets, seconds since midnight, time zones); and :class:`PolicyError`, which names the key path
of the first problem relative to the policy (``[1].deny.and[0].day_of_week``) so the
configuration loader can point at the key and line.

Must not: evaluate policies (``policy.ppl`` does), read files or know about pydantic.

The document, as Pomerium's parser reads it (``pkg/policy/parser``): one rule table or an array
of them; a rule table has ``allow`` and/or ``deny``; each holds operators ``and`` / ``or`` /
``not`` / ``nor``, each a list of one-key criterion tables. Where ferryman is stricter or goes
further (README, "Listener policy"):

- An unknown action, operator, criterion or matcher operator, a malformed value, an empty rule
  or operator list, a sub-path on a criterion other than ``claim`` and ``accept = false``
  are errors; Pomerium ignores some of these or never matches them.
- Operators may nest as criteria (``{ or = [ … ] }`` inside ``and``), up to 16 levels deep.
- ``day_of_week`` also takes a list, and a table ``{ days = "mon-fri", timezone = "…" }``;
  without a time zone it is UTC. ``tag`` and ``authenticated_user`` are supported; HTTP, device
  and data-source criteria are not.
- ``time_of_day`` times also come as TOML local times (``after = 09:00:00``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from datetime import UTC, time, tzinfo
from typing import Any, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ferryman.policy.ppl import (
    Action,
    ClaimMatch,
    Constant,
    DayOfWeek,
    Group,
    IPNetwork,
    ListenerPolicy,
    ListMatch,
    LoginMatch,
    MemberMatch,
    Node,
    Operator,
    Rule,
    Scalar,
    SourceIP,
    StringMatch,
    TimeOfDay,
)

KeyPath = tuple[str | int, ...]
"""A location inside the policy value: table keys and list indices."""

OPERATORS: tuple[Operator, ...] = ("and", "or", "not", "nor")
MAX_DEPTH = 16
"""Operators nested deeper than this are refused (a policy is written by a person)."""


class PolicyError(ValueError):
    """A listener policy is invalid; ``path`` says where, relative to the policy value."""

    def __init__(self, path: KeyPath, message: str) -> None:
        self.path = path
        self.message = message
        where = render(path)
        super().__init__(f"{where}: {message}" if where else message)


def render(path: KeyPath) -> str:
    """``(1, "deny", "and", 0)`` → ``[1].deny.and[0]``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + part
    return out


def parse_listener_policy(value: object) -> ListenerPolicy | None:
    """Compile a listener's ``policy``; ``None`` (no condition) when it has no rules.

    ``value`` is a rule table or an array of them, as TOML or JSON gives it. Raises
    :class:`PolicyError`."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        items: list[tuple[KeyPath, object]] = [((), value)]
    elif isinstance(value, list | tuple):
        items = [((index,), item) for index, item in enumerate(value)]
    else:
        raise PolicyError(
            (), f"a policy is a table {{ allow = …, deny = … }} or a list of them, got {_kind(value)}"
        )
    rules: list[Rule] = []
    for path, item in items:
        if not isinstance(item, Mapping):
            raise PolicyError(path, f"a rule is a table with allow and/or deny, got {_kind(item)}")
        if not item and path:
            raise PolicyError(path, "a rule needs allow or deny")
        for action, body in item.items():
            if action not in ("allow", "deny"):
                raise PolicyError(
                    (*path, action), f"unknown action {action!r} (a rule has allow and/or deny)"
                )
            rules.append(_rule(len(rules) + 1, cast(Action, action), body, (*path, action)))
    return ListenerPolicy(tuple(rules), source=value) if rules else None


def _rule(number: int, action: Action, body: object, path: KeyPath) -> Rule:
    if not isinstance(body, Mapping) or not body:
        raise PolicyError(
            path, f"{action} takes a table of operators (and, or, not, nor), e.g. {action} = {{ or = [ … ] }}"
        )
    groups = []
    for op, items in body.items():
        if op not in OPERATORS:
            raise PolicyError((*path, op), f"unknown operator {op!r} (and, or, not, nor)")
        groups.append(_group(cast(Operator, op), items, (*path, op), 1))
    return Rule(number, action, tuple(groups))


def _group(op: Operator, items: object, path: KeyPath, depth: int) -> Group:
    if not isinstance(items, list | tuple):
        raise PolicyError(
            path, f'{op} takes a list of criteria, e.g. {op} = [ {{ groups = {{ has = "dba" }} }} ]'
        )
    if not items:
        raise PolicyError(path, f"{op} is empty: give it at least one criterion")
    return Group(op, tuple(_node(item, (*path, index), depth) for index, item in enumerate(items)))


def _node(item: object, path: KeyPath, depth: int) -> Node:
    if not isinstance(item, Mapping) or len(item) != 1:
        raise PolicyError(
            path,
            f'a criterion is a table with one key, e.g. {{ email = "alice@example.com" }}, got {_kind(item)}',
        )
    ((key, data),) = item.items()
    key = str(key)
    if key in OPERATORS:
        if depth >= MAX_DEPTH:
            raise PolicyError((*path, key), f"operators nested more than {MAX_DEPTH} deep")
        return _group(key, data, (*path, key), depth + 1)
    name, slash, sub = key.partition("/")
    parse = _CRITERIA.get(name)
    if parse is None:
        known = (
            "is a Pomerium criterion ferryman listeners do not support"
            if name in _POMERIUM_ONLY
            else "is unknown"
        )
        raise PolicyError((*path, key), f"criterion {name!r} {known} (supported: {SUPPORTED})")
    if name == "claim" and not sub:
        raise PolicyError((*path, key), "claim needs the claim's name: claim/NAME, e.g. claim/department")
    if name != "claim" and slash:
        raise PolicyError((*path, key), f"only claim takes a sub-path, not {name}")
    return parse(key, sub, data, (*path, key))


# -- criteria -------------------------------------------------------------------------------


def _constant(value: bool) -> Callable[[str, str, object, KeyPath], Node]:
    def parse(key: str, sub: str, data: object, path: KeyPath) -> Node:
        if data is not True:
            raise PolicyError(path, f"{key} takes true, got {_kind(data)}")
        return Constant(key, value)

    return parse


_STRING_OPS = {
    "is": "is_",
    "not": "not_",
    "contains": "contains",
    "starts_with": "starts_with",
    "ends_with": "ends_with",
    "in": "in_",
    "not_in": "not_in",
}


def _login(key: str, sub: str, data: object, path: KeyPath) -> Node:
    return LoginMatch(key, _string_match(key, data, path), domain=key == "domain")


def _string_match(name: str, data: object, path: KeyPath) -> StringMatch:
    """Operands are stripped and lower-cased: logins and domains compare case-insensitively."""
    if isinstance(data, str):
        return StringMatch(is_=data.strip().lower())
    ops = ", ".join(_STRING_OPS)
    if not isinstance(data, Mapping) or not data:
        raise PolicyError(path, f"{name} takes a string or a table of operators ({ops}), got {_kind(data)}")
    fields: dict[str, Any] = {}
    for op, arg in data.items():
        attr = _STRING_OPS.get(op)
        if attr is None:
            raise PolicyError((*path, op), f"unknown operator {op!r} for {name} ({ops})")
        if op in ("in", "not_in"):
            if not isinstance(arg, list | tuple) or not arg or not all(isinstance(a, str) for a in arg):
                raise PolicyError((*path, op), f"{op} takes a non-empty list of strings, got {_kind(arg)}")
            fields[attr] = frozenset(a.strip().lower() for a in arg)
        elif isinstance(arg, str):
            fields[attr] = arg.strip().lower()
        else:
            raise PolicyError((*path, op), f"{op} takes a string, got {_kind(arg)}")
    return StringMatch(**fields)


_LIST_OPS = {"has": "has", "is": "is_", "exclude": "exclude"}


def _list_match(name: str, data: object, path: KeyPath, normalize: Callable[[str], str] | None) -> ListMatch:
    """``normalize`` is ``None`` for claims, whose values may also be numbers and booleans."""
    kinds = "a string" if normalize else "a string, number or boolean"

    def operand(arg: object, where: KeyPath) -> Scalar:
        if isinstance(arg, str):
            return normalize(arg) if normalize else arg
        if normalize is None and isinstance(arg, int | float | bool):
            return arg
        raise PolicyError(where, f"{name} compares with {kinds}, got {_kind(arg)}")

    if not isinstance(data, Mapping):
        return ListMatch(has=operand(data, path))
    ops = ", ".join(_LIST_OPS)
    if not data:
        raise PolicyError(path, f"{name} takes {kinds} or a table of operators ({ops})")
    fields: dict[str, Any] = {}
    for op, arg in data.items():
        attr = _LIST_OPS.get(op)
        if attr is None:
            raise PolicyError((*path, op), f"unknown operator {op!r} for {name} ({ops})")
        fields[attr] = operand(arg, (*path, op))
    return ListMatch(**fields)


def _member(prefix: str, tags: bool) -> Callable[[str, str, object, KeyPath], Node]:
    """``groups`` / ``tag``: each operand becomes its two spellings, with and without ``prefix``."""

    def parse(key: str, sub: str, data: object, path: KeyPath) -> Node:
        match = _list_match(key, data, path, lambda s: s.strip().removeprefix(prefix))
        fields = {
            attr: None if value is None else frozenset({str(value), prefix + str(value)})
            for attr, value in (("has", match.has), ("is_", match.is_), ("exclude", match.exclude))
        }
        return MemberMatch(key, tags=tags, **fields)

    return parse


def _claim(key: str, sub: str, data: object, path: KeyPath) -> Node:
    segments = tuple(s for s in re.split(r"[/.]", sub) if s)
    return ClaimMatch(key, sub, segments, _list_match(key, data, path, None))


def _source_ip(key: str, sub: str, data: object, path: KeyPath) -> Node:
    if isinstance(data, str):
        entries: list[tuple[KeyPath, object]] = [(path, data)]
    elif isinstance(data, list | tuple) and data:
        entries = [((*path, index), item) for index, item in enumerate(data)]
    else:
        raise PolicyError(
            path, f"source_ip takes an IP address or CIDR, or a list of them, got {_kind(data)}"
        )
    networks: list[IPNetwork] = []
    for where, entry in entries:
        if not isinstance(entry, str):
            raise PolicyError(where, f"source_ip takes IP addresses or CIDRs, got {_kind(entry)}")
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise PolicyError(where, f"not an IP address or CIDR: {entry!r}") from None
    return SourceIP(key, tuple(networks))


_DAYS = {
    name: number
    for number, names in enumerate(
        (
            ("mon", "monday"),
            ("tue", "tuesday"),
            ("wed", "wednesday"),
            ("thu", "thursday"),
            ("fri", "friday"),
            ("sat", "saturday"),
            ("sun", "sunday"),
        )
    )
    for name in names
}


def _day_of_week(key: str, sub: str, data: object, path: KeyPath) -> Node:
    zone: tzinfo = UTC
    spec, where = data, path
    if isinstance(data, Mapping):
        for extra in data:
            if extra not in ("days", "timezone"):
                raise PolicyError((*path, extra), "unknown key (day_of_week takes days and timezone)")
        if "days" not in data:
            raise PolicyError(
                path, 'day_of_week needs days, e.g. { days = "mon-fri", timezone = "Europe/Berlin" }'
            )
        if "timezone" in data:
            zone = _zone(data["timezone"], (*path, "timezone"))
        spec, where = data["days"], (*path, "days")
    if isinstance(spec, str):
        specs: list[tuple[KeyPath, object]] = [(where, spec)]
    elif isinstance(spec, list | tuple) and spec:
        specs = [((*where, index), item) for index, item in enumerate(spec)]
    else:
        raise PolicyError(where, f'day_of_week takes days such as "mon-fri" or "sat,sun", got {_kind(spec)}')
    days: set[int] = set()
    for item_path, item in specs:
        if not isinstance(item, str):
            raise PolicyError(
                item_path, f'day_of_week takes days such as "mon-fri" or "sat,sun", got {_kind(item)}'
            )
        days |= _parse_days(item, item_path)
    return DayOfWeek(key, frozenset(days), zone)


def _parse_days(text: str, path: KeyPath) -> set[int]:
    """``*``, a day, a range (``mon-fri``; ``fri-mon`` wraps over the weekend) or a comma list
    of those; English names or their three-letter abbreviations, any case."""
    if text.strip() == "*":
        return set(range(7))
    days: set[int] = set()
    for part in text.split(","):
        first, dash, last = (s.strip().lower() for s in part.partition("-"))
        start = _day(first, text, path)
        end = _day(last, text, path) if dash else start
        days.update((start + step) % 7 for step in range((end - start) % 7 + 1))
    return days


def _day(name: str, text: str, path: KeyPath) -> int:
    number = _DAYS.get(name)
    if number is None:
        raise PolicyError(
            path,
            f'unknown day {name!r} in {text!r} (mon … sun or full names; e.g. "mon-fri", "sat,sun", "*")',
        )
    return number


def _time_of_day(key: str, sub: str, data: object, path: KeyPath) -> Node:
    if not isinstance(data, Mapping):
        raise PolicyError(
            path,
            'time_of_day takes a table { timezone = "UTC", after = "09:00", before = "17:30" }, '
            f"got {_kind(data)}",
        )
    for extra in data:
        if extra not in ("timezone", "after", "before"):
            raise PolicyError((*path, extra), "unknown key (time_of_day takes timezone, after and before)")
    if "timezone" not in data:
        raise PolicyError(path, 'time_of_day needs timezone (an IANA name such as "Europe/Berlin", or "UTC")')
    if "after" not in data and "before" not in data:
        raise PolicyError(path, "time_of_day needs after, before or both")
    zone = _zone(data["timezone"], (*path, "timezone"))
    after = _clock_time(data["after"], (*path, "after")) if "after" in data else None
    before = _clock_time(data["before"], (*path, "before")) if "before" in data else None
    if after is not None and after == before:
        raise PolicyError((*path, "before"), "after and before are the same time: the window would be empty")
    return TimeOfDay(key, zone, after, before)


_TIME_24 = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?")
_TIME_12 = re.compile(r"(\d{1,2})(?::(\d{2}))? ?([AaPp][Mm])")


def _clock_time(value: object, path: KeyPath) -> float:
    """Seconds since midnight from Pomerium's formats (Go layouts ``3:04 PM``, ``3:04PM``,
    ``3 PM``, ``3PM``, ``15:04:05.999999999``, ``15:04:05``, ``15:04``) or a TOML local time."""
    if isinstance(value, time):
        return value.hour * 3600 + value.minute * 60 + value.second + value.microsecond / 1e6
    if isinstance(value, str):
        text = value.strip()
        if match := _TIME_24.fullmatch(text):
            hour, minute, second = int(match[1]), int(match[2]), int(match[3] or 0)
            fraction = float("0." + match[4]) if match[4] else 0.0
            if hour < 24 and minute < 60 and second < 60:
                return hour * 3600 + minute * 60 + second + fraction
        elif match := _TIME_12.fullmatch(text):
            hour, minute = int(match[1]), int(match[2] or 0)
            if 1 <= hour <= 12 and minute < 60:
                return (hour % 12 + (12 if match[3].lower() == "pm" else 0)) * 3600 + minute * 60
    raise PolicyError(path, f'not a time of day: {value!r} (e.g. "09:00", "17:30:00", "5:30 PM")')


def _zone(value: object, path: KeyPath) -> tzinfo:
    if isinstance(value, str) and value.strip():
        try:
            return ZoneInfo(value.strip())
        except (ZoneInfoNotFoundError, ValueError, OSError):
            pass
    raise PolicyError(path, f'unknown time zone {value!r} (an IANA name such as "Europe/Berlin", or "UTC")')


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


_CRITERIA: dict[str, Callable[[str, str, object, KeyPath], Node]] = {
    "accept": _constant(True),
    "authenticated_user": _constant(True),
    "claim": _claim,
    "day_of_week": _day_of_week,
    "domain": _login,
    "email": _login,
    "groups": _member("group:", tags=False),
    "reject": _constant(False),
    "source_ip": _source_ip,
    "tag": _member("tag:", tags=True),
    "time_of_day": _time_of_day,
    "user": _login,
}
SUPPORTED = ", ".join(f"{name}/NAME" if name == "claim" else name for name in _CRITERIA)

_POMERIUM_ONLY = frozenset(
    {
        "client_certificate",
        "cors_preflight",
        "date",
        "device",
        "http_method",
        "http_path",
        "invalid_client_certificate",
        "mcp_tool",
        "pomerium_routes",
        "record",
        "ssh_publickey",
        "ssh_username",
    }
)
"""Pomerium criteria for HTTP routes, devices, data sources and SSH: named in the error."""
