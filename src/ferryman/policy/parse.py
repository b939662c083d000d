"""Parse grant JSON: the local policy file and capability values from any source.

Owns: reading a policy file (JSON with comments and trailing commas, as a tailnet policy file
allows, via the ``json5`` library), turning each capability value into a :class:`CapGrant`,
and reporting problems with their location.

Must not: evaluate grants against identities (``policy.engine``) or do any I/O besides
reading the one file it is given.

Compatibility with Waypoint (``redo.com/cap/waypoint``; its Go decoder is ``auth.CapRule`` and
``CapRule.UnmarshalJSON``), so grants written for it are read the same way:

- Shapes: ``backends`` as an object is the current shape (top-level ``pg`` and
  ``endpoint_limits`` are then unknown fields and ignored); as a list of names it is the legacy
  shape, where a top-level ``pg`` applies to every listed backend and ``endpoint_limits.<name>``
  holds that backend's limits. Missing or ``null`` ``backends`` grants nothing.
- Field names match case-insensitively (``"Backends"``, ``"MAX_CONNS"``), the last matching key
  wins, ``null`` means absent, unknown fields are ignored; map keys (listener and database
  names) are exact.
- Types are Go's: ``max_conns`` and byte counts are whole JSON numbers (a float such as ``1e9``
  is refused), durations are Go duration strings (``"90s"``, ``"1h30m"``, ``".5h"``, ``"0"``),
  lists are lists. Fields Waypoint knows but ferryman does not use (``mongo``, ``k8s``) are
  type-checked the same way and otherwise ignored.

Deliberate differences (``docs/waypoint.md``): byte counts may also be strings (``"10GB"``, as
Waypoint's documentation writes them); durations may also use ``d`` and ``w``; negative numbers,
unparsable durations and incomplete bandwidth windows are errors where Waypoint silently drops
the limit; preset names are checked when the grant is read, not when the role is provisioned.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import json5

from ferryman.errors import ConfigError
from ferryman.policy.model import (
    PRESETS,
    BackendGrant,
    Bandwidth,
    CapGrant,
    Limits,
    PgDatabaseGrant,
    Policy,
    Rule,
    Selector,
)
from ferryman.units import parse_size

INT64_MAX = 2**63 - 1
"""Largest value Go's ``int``/``int64`` (and ``time.Duration``, in nanoseconds) can hold."""


class GrantError(ValueError):
    """A capability value is malformed; the message names the field."""


# --- Go encoding/json field matching ----------------------------------------------------------

_FOLD_SPECIAL = {"\u017f": "S", "\u212a": "K"}  # long s and the Kelvin sign fold to ASCII in Go


@functools.lru_cache(maxsize=1024)
def _fold(key: str) -> str:
    """Go's ``foldName`` restricted to what can equal an ASCII field name."""
    return "".join(_FOLD_SPECIAL.get(c, c.upper() if "a" <= c <= "z" else c) for c in key)


def _field(raw: Mapping[str, Any], name: str) -> Any:
    """The value Go's ``encoding/json`` would store in struct field ``name``.

    Keys match exactly or case-insensitively; when several keys match, the last one wins.
    ``None`` means the field is absent or ``null`` (both leave a Go field unset).
    """
    target = _fold(name)
    value = None
    for key, item in raw.items():
        if key == name or _fold(key) == target:
            value = item
    return value


def _obj(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise GrantError(f"{where}: expected an object, got {_kind(value)}")
    return value


def _list(value: Any, where: str) -> Sequence[Any]:
    if not isinstance(value, list):
        raise GrantError(f"{where}: expected a list, got {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _opt_obj(value: Any, where: str) -> Mapping[str, Any]:
    """An object field; ``null``/absent reads as empty (a nil Go map)."""
    return {} if value is None else _obj(value, where)


def _str_list(value: Any, where: str) -> list[str]:
    """A ``[]string`` field; ``null``/absent reads as empty."""
    if value is None:
        return []
    items = _list(value, where)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise GrantError(f"{where}[{i}]: expected a string, got {_kind(item)}")
    return list(items)


def _whole(value: Any, where: str) -> int:
    """A Go ``int``/``int64`` field: a JSON number without fraction or exponent, in range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise GrantError(f"{where}: expected a whole number, got {value!r}")
    if value < 0:
        raise GrantError(f"{where}: must not be negative ({value})")
    if value > INT64_MAX:
        raise GrantError(f"{where}: {value} is too large")
    return int(value)


def _bytes(value: Any, where: str) -> int:
    """A byte count: a whole JSON number as in Waypoint, or (ferryman) a string like ``"10GB"``."""
    if isinstance(value, str):
        try:
            size = parse_size(value)
        except ValueError as exc:
            raise GrantError(f"{where}: {exc}") from None
        if size > INT64_MAX:
            raise GrantError(f"{where}: {value!r} is too large")
        return size
    if isinstance(value, float):
        raise GrantError(
            f'{where}: expected a whole number of bytes or a byte size such as "10GB", got {value!r}'
        )
    if isinstance(value, bool) or not isinstance(value, int):
        raise GrantError(f'{where}: not a byte size: {value!r} (use e.g. 10485760 or "10GB")')
    return _whole(value, where)


# --- Go time.ParseDuration --------------------------------------------------------------------

_NS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # micro sign
    "\u03bcs": 1_000,  # Greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
    # ferryman extension: Go has no day or week unit (Waypoint would ignore such a limit).
    "d": 86400 * 1_000_000_000,
    "w": 7 * 86400 * 1_000_000_000,
}


def _is_digit(c: str) -> bool:
    return "0" <= c <= "9"


def _duration(value: Any, where: str) -> float:
    """A Go duration string (``time.ParseDuration`` grammar, plus ``d`` and ``w``) in seconds.

    Waypoint's fields are strings; a JSON number is refused as Go's decoder refuses it. A
    negative or unparsable duration is an error here (Waypoint would drop the limit).
    """
    bad = f'{where}: not a duration: {value!r} (use a string such as "90s", "1h30m", "8h")'
    if not isinstance(value, str):
        raise GrantError(bad)
    text = value
    negative = False
    if text[:1] in ("+", "-"):
        negative = text[0] == "-"
        text = text[1:]
    if text == "0":
        return 0.0
    if not text:
        raise GrantError(bad)
    total = Fraction(0)
    i = 0
    while i < len(text):
        j = i
        while j < len(text) and _is_digit(text[j]):
            j += 1
        whole = text[i:j]
        frac = ""
        if j < len(text) and text[j] == ".":
            k = j + 1
            while k < len(text) and _is_digit(text[k]):
                k += 1
            frac, j = text[j + 1 : k], k
        if not whole and not frac:
            raise GrantError(bad)
        k = j
        while k < len(text) and text[k] != "." and not _is_digit(text[k]):
            k += 1
        unit = text[j:k]
        if unit not in _NS:
            raise GrantError(bad if unit else f"{bad}: missing unit")
        number = Fraction(int(whole or "0")) + (Fraction(int(frac), 10 ** len(frac)) if frac else 0)
        total += number * _NS[unit]
        i = k
    if total > INT64_MAX:
        raise GrantError(f"{where}: duration {value!r} is too long")
    if negative and total:
        raise GrantError(f"{where}: duration must not be negative ({value!r})")
    return float(total / 1_000_000_000)


# --- limits and protocol blocks ---------------------------------------------------------------


def parse_limits(value: Any, where: str) -> Limits:
    """A ``limits`` block (Waypoint's ``LimitsCap``). ``null``/absent means no limits; 0 is no limit."""
    if value is None:
        return Limits()
    raw = _obj(value, where)
    max_conns = _field(raw, "max_conns")
    max_bytes = _field(raw, "max_bytes_per_conn")
    max_duration = _field(raw, "max_conn_duration")
    if max_duration == "":
        max_duration = None  # Go's zero value: Waypoint checks `MaxConnDuration != ""`
    windows: dict[float, int] = {}
    bandwidth = _field(raw, "bandwidth")
    for i, item in enumerate(_list(bandwidth, f"{where}.bandwidth") if bandwidth is not None else ()):
        here = f"{where}.bandwidth[{i}]"
        if item is None:
            continue  # Go decodes null into a zero window, which it skips
        window = _obj(item, here)
        nbytes, period_text = _field(window, "bytes"), _field(window, "period")
        if nbytes is None or period_text is None:
            raise GrantError(f"{here}: needs both 'bytes' and 'period'")
        size = _bytes(nbytes, f"{here}.bytes")
        period = _duration(period_text, f"{here}.period")
        if size and period:  # Waypoint skips windows with no bytes or no period
            windows[period] = min(size, windows.get(period, size))
    return Limits(
        max_conns=(_whole(max_conns, f"{where}.max_conns") or None) if max_conns is not None else None,
        max_bytes_per_conn=(_bytes(max_bytes, f"{where}.max_bytes_per_conn") or None)
        if max_bytes is not None
        else None,
        max_conn_duration=(_duration(max_duration, f"{where}.max_conn_duration") or None)
        if max_duration is not None
        else None,
        bandwidth=tuple(Bandwidth(b, p) for p, b in sorted(windows.items())),
    )


def parse_pg(value: Any, where: str) -> dict[str, PgDatabaseGrant]:
    """A ``pg`` block (Waypoint's ``PGCap``): ``databases`` keyed by name or ``"*"``."""
    raw = _obj(value, where)
    databases = _opt_obj(_field(raw, "databases"), f"{where}.databases")
    out: dict[str, PgDatabaseGrant] = {}
    for name, grant in databases.items():
        here = f"{where}.databases.{name}"
        body = _opt_obj(grant, here)  # null is a zero DBPermissions: the database, no presets
        permissions = []
        for p in _str_list(_field(body, "permissions"), f"{here}.permissions"):
            preset = p.lower()  # Waypoint lower-cases preset names (provision.ExpandPresets)
            if preset not in PRESETS:
                raise GrantError(f"{here}.permissions: unknown preset {p!r} (use {', '.join(PRESETS)})")
            permissions.append(preset)
        schemas = _str_list(_field(body, "schemas"), f"{here}.schemas")
        sql = _str_list(_field(body, "sql"), f"{here}.sql")
        out[str(name)] = PgDatabaseGrant(frozenset(permissions), frozenset(schemas), tuple(sql))
    return out


def _check_mongo(value: Any, where: str) -> None:
    """Type-check Waypoint's ``mongo`` block (``MongoCap``); ferryman has no MongoDB mode."""
    if value is None:
        return
    databases = _opt_obj(_field(_obj(value, where), "databases"), f"{where}.databases")
    for name, body in databases.items():
        here = f"{where}.databases.{name}"
        _str_list(_field(_opt_obj(body, here), "permissions"), f"{here}.permissions")


def _check_k8s(value: Any, where: str) -> None:
    """Type-check Waypoint's ``k8s`` block (``K8sCap``); ferryman has no Kubernetes mode."""
    if value is None:
        return
    raw = _obj(value, where)
    user = _field(raw, "user")
    if user is not None and not isinstance(user, str):
        raise GrantError(f"{where}.user: expected a string, got {_kind(user)}")
    _str_list(_field(raw, "groups"), f"{where}.groups")
    for key, values in _opt_obj(_field(raw, "extra"), f"{where}.extra").items():
        _str_list(values, f"{where}.extra.{key}")


def _backend(value: Any, where: str) -> BackendGrant:
    """One ``backends.<listener>`` entry (``BackendCap``); ``{}`` or ``null`` = allowed, no detail."""
    body = _opt_obj(value, where)
    pg = _field(body, "pg")
    _check_mongo(_field(body, "mongo"), f"{where}.mongo")
    _check_k8s(_field(body, "k8s"), f"{where}.k8s")
    return BackendGrant(
        pg=parse_pg(pg, f"{where}.pg") if pg is not None else None,
        limits=parse_limits(_field(body, "limits"), f"{where}.limits"),
    )


def _legacy_backends(raw: Mapping[str, Any], names: Sequence[Any], origin: str) -> dict[str, BackendGrant]:
    """Waypoint's legacy shape: ``backends`` a list, top-level ``pg`` and ``endpoint_limits``."""
    pg_raw = _field(raw, "pg")
    pg = parse_pg(pg_raw, f"{origin}.pg") if pg_raw is not None else None
    per_backend = {
        str(name): parse_limits(limits, f"{origin}.endpoint_limits.{name}")
        for name, limits in _opt_obj(_field(raw, "endpoint_limits"), f"{origin}.endpoint_limits").items()
    }
    backends: dict[str, BackendGrant] = {}
    for i, name in enumerate(names):
        if name is None:
            continue  # Go decodes null into "", a listener name that cannot exist
        if not isinstance(name, str):
            raise GrantError(f"{origin}.backends[{i}]: expected a string, got {_kind(name)}")
        backends[name] = BackendGrant(pg=pg, limits=per_backend.get(name, Limits()))
    return backends


def parse_cap_value(value: Any, origin: str) -> CapGrant:
    """One element of ``app[<capability>]`` → :class:`CapGrant`. Raises :class:`GrantError`.

    Accepts Waypoint's current and legacy shapes exactly as ``CapRule.UnmarshalJSON`` does.
    """
    raw = _obj(value, origin)
    backends_raw = _field(raw, "backends")
    if isinstance(backends_raw, Mapping):
        backends = {
            str(name): _backend(body, f"{origin}.backends.{name}") for name, body in backends_raw.items()
        }
    elif isinstance(backends_raw, list) or backends_raw is None:
        # Waypoint falls back to the legacy decoder whenever ``backends`` is not an object; with
        # no ``backends`` at all the value is still decoded (and checked) but grants nothing.
        backends = _legacy_backends(raw, backends_raw or [], origin)
    else:
        raise GrantError(f"{origin}.backends: expected an object, got {_kind(backends_raw)}")
    return CapGrant(
        backends=backends, limits=parse_limits(_field(raw, "limits"), f"{origin}.limits"), origin=origin
    )


def parse_cap_values(values: Sequence[Any], origin: str) -> tuple[list[CapGrant], list[str]]:
    """Parse several values; a malformed one is dropped (denying only that rule) and reported."""
    caps: list[CapGrant] = []
    problems: list[str] = []
    for i, value in enumerate(values):
        try:
            caps.append(parse_cap_value(value, f"{origin}[{i}]"))
        except GrantError as exc:
            problems.append(f"{exc} (raw value: {json5.dumps(value)[:500]})")
    return caps, problems


def parse_selector(src: Sequence[Any], where: str) -> Selector:
    logins: set[str] = set()
    groups: set[str] = set()
    tags: set[str] = set()
    networks = []
    everyone = False
    for i, item in enumerate(src):
        if not isinstance(item, str) or not item:
            raise GrantError(f"{where}[{i}]: expected a non-empty string")
        if item == "*":
            everyone = True
        elif item.startswith("group:"):
            groups.add(item)
        elif item.startswith("tag:"):
            tags.add(item)
        elif item.startswith("autogroup:"):
            raise GrantError(f"{where}[{i}]: {item!r} is not supported in a local policy file")
        elif "@" in item:
            logins.add(item.lower())
        else:
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                logins.add(item.lower())
    return Selector(everyone, frozenset(logins), frozenset(groups), frozenset(tags), tuple(networks))


def _capability_values(body: Mapping[str, Any], capability: str, where: str) -> list[tuple[str, Any]] | None:
    """The grant's values for ``capability`` with their location: under ``app`` (tailnet policy
    syntax) and under ``cap`` (the key Waypoint's documentation uses); ``None`` when neither has it."""
    found: list[tuple[str, Any]] | None = None
    for key in ("app", "cap"):
        if key not in body:
            continue
        values = _obj(body[key], f"{where}.{key}").get(capability)
        if values is not None:
            here = f"{where}.{key}[{capability!r}]"
            found = (found or []) + [(f"{here}[{j}]", v) for j, v in enumerate(_list(values, here))]
    return found


def parse_policy(
    data: Any, *, capability: str, file: str = "<policy>", listeners: Sequence[str] = ()
) -> Policy:
    """Validate a parsed policy document. Raises :class:`ConfigError` naming the problem."""
    try:
        root = _obj(data, "policy")
        groups: dict[str, frozenset[str]] = {}
        for name, members in _obj(root.get("groups", {}), "groups").items():
            if not str(name).startswith("group:"):
                raise GrantError(f"groups.{name}: group names start with 'group:'")
            groups[str(name)] = frozenset(
                m.lower() for m in _str_list(_list(members, f"groups.{name}"), f"groups.{name}")
            )
        rules: list[Rule] = []
        warnings: list[str] = []
        known = set(listeners)
        for i, grant in enumerate(_list(root.get("grants", []), "grants")):
            where = f"grants[{i}]"
            body = _obj(grant, where)
            if "src" not in body:
                raise GrantError(f"{where}: 'src' is required")
            selector = parse_selector(
                _str_list(_list(body["src"], f"{where}.src"), f"{where}.src"), f"{where}.src"
            )
            values = _capability_values(body, capability, where)
            if values is None:
                warnings.append(f"{file}: {where} grants nothing for capability {capability!r}")
                continue
            caps = [parse_cap_value(value, f"{file} {here}") for here, value in values]
            if known:
                for cap in caps:
                    for name in cap.backends:
                        if name not in known:
                            warnings.append(f"{cap.origin}: names no configured listener: {name!r}")
            rules.append(Rule(selector, tuple(caps), f"{file} {where}"))
        return Policy(groups=groups, rules=tuple(rules), warnings=tuple(warnings))
    except GrantError as exc:
        raise ConfigError(str(exc), file=file) from exc


def load_policy(path: str | Path, *, capability: str, listeners: Sequence[str] = ()) -> Policy:
    """Read and validate a policy file (JSON, comments and trailing commas allowed)."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read policy file: {exc.strerror or exc}", file=file) from exc
    try:
        data = json5.loads(text)
    except ValueError as exc:
        raise ConfigError(f"not valid JSON: {exc}", file=file) from exc
    return parse_policy(data, capability=capability, file=file, listeners=listeners)
