"""Parse grant JSON: the local policy file and capability values from any source.

Owns: reading a policy file (JSON with comments and trailing commas, as a tailnet policy file
allows, via the ``json5`` library), turning each capability value into a :class:`CapGrant`,
and reporting problems with their location.

Must not: evaluate grants against identities (``policy.engine``) or do any I/O besides
reading the one file it is given.

Compatibility: Waypoint's current shape (``backends`` as an object) and its legacy shape
(``backends`` as a list of names, a top-level ``pg`` applying to those backends, and
``endpoint_limits`` holding per-backend limits) are both accepted. Unknown fields are ignored,
as a tailnet would. Byte sizes may be numbers or strings (``"10GB"``), durations strings.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
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
from ferryman.units import parse_duration, parse_size


class GrantError(ValueError):
    """A capability value is malformed; the message names the field."""


def _obj(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise GrantError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> Sequence[Any]:
    if not isinstance(value, list):
        raise GrantError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def parse_limits(value: Any, where: str) -> Limits:
    if value is None:
        return Limits()
    raw = _obj(value, where)
    try:
        max_conns = raw.get("max_conns")
        if max_conns is not None and (isinstance(max_conns, bool) or not isinstance(max_conns, int)):
            raise GrantError(f"{where}.max_conns: expected a whole number, got {max_conns!r}")
        if max_conns is not None and max_conns < 0:
            raise GrantError(f"{where}.max_conns: must not be negative")
        max_bytes = raw.get("max_bytes_per_conn")
        max_duration = raw.get("max_conn_duration")
        windows = []
        for i, item in enumerate(_list(raw.get("bandwidth", []), f"{where}.bandwidth")):
            window = _obj(item, f"{where}.bandwidth[{i}]")
            if "bytes" not in window or "period" not in window:
                raise GrantError(f"{where}.bandwidth[{i}]: needs both 'bytes' and 'period'")
            period = parse_duration(window["period"])
            if period <= 0:
                raise GrantError(f"{where}.bandwidth[{i}].period: must be positive")
            windows.append(Bandwidth(parse_size(window["bytes"]), period))
        return Limits(
            max_conns=max_conns or None,
            max_bytes_per_conn=(parse_size(max_bytes) or None) if max_bytes is not None else None,
            max_conn_duration=(parse_duration(max_duration) or None) if max_duration is not None else None,
            bandwidth=tuple(w for w in windows if w.bytes),
        )
    except GrantError:
        raise
    except ValueError as exc:
        raise GrantError(f"{where}: {exc}") from exc


def _str_list(value: Any, where: str) -> list[str]:
    items = _list(value, where)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise GrantError(f"{where}[{i}]: expected a string")
    return list(items)


def parse_pg(value: Any, where: str) -> dict[str, PgDatabaseGrant]:
    raw = _obj(value, where)
    databases = _obj(raw.get("databases", {}), f"{where}.databases")
    out: dict[str, PgDatabaseGrant] = {}
    for name, grant in databases.items():
        here = f"{where}.databases.{name}"
        body = _obj(grant, here)
        permissions = _str_list(body.get("permissions", []), f"{here}.permissions")
        for p in permissions:
            if p not in PRESETS:
                raise GrantError(f"{here}.permissions: unknown preset {p!r} (use {', '.join(PRESETS)})")
        schemas = _str_list(body.get("schemas", []), f"{here}.schemas")
        sql = _str_list(body.get("sql", []), f"{here}.sql")
        out[str(name)] = PgDatabaseGrant(frozenset(permissions), frozenset(schemas), tuple(sql))
    return out


def parse_cap_value(value: Any, origin: str) -> CapGrant:
    """One element of ``app[<capability>]`` → :class:`CapGrant`. Raises :class:`GrantError`."""
    raw = _obj(value, origin)
    backends_raw = raw.get("backends", {})
    backends: dict[str, BackendGrant] = {}
    if isinstance(backends_raw, list):
        # Waypoint legacy shape: a list of names, top-level "pg" and "endpoint_limits".
        legacy_pg = parse_pg(raw["pg"], f"{origin}.pg") if "pg" in raw else None
        per_backend = _obj(raw.get("endpoint_limits", {}), f"{origin}.endpoint_limits")
        for name in _str_list(backends_raw, f"{origin}.backends"):
            limits = parse_limits(per_backend.get(name), f"{origin}.endpoint_limits.{name}")
            backends[name] = BackendGrant(pg=legacy_pg, limits=limits)
    else:
        for name, body in _obj(backends_raw, f"{origin}.backends").items():
            here = f"{origin}.backends.{name}"
            grant = _obj(body if body is not None else {}, here)
            pg = parse_pg(grant["pg"], f"{here}.pg") if "pg" in grant else None
            backends[str(name)] = BackendGrant(
                pg=pg, limits=parse_limits(grant.get("limits"), f"{here}.limits")
            )
    return CapGrant(
        backends=backends, limits=parse_limits(raw.get("limits"), f"{origin}.limits"), origin=origin
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
            groups[str(name)] = frozenset(m.lower() for m in _str_list(members, f"groups.{name}"))
        rules: list[Rule] = []
        warnings: list[str] = []
        known = set(listeners)
        for i, grant in enumerate(_list(root.get("grants", []), "grants")):
            where = f"grants[{i}]"
            body = _obj(grant, where)
            if "src" not in body:
                raise GrantError(f"{where}: 'src' is required")
            selector = parse_selector(_str_list(body["src"], f"{where}.src"), f"{where}.src")
            app = _obj(body.get("app", {}), f"{where}.app")
            values = app.get(capability)
            if values is None:
                warnings.append(f"{file}: {where} grants nothing for capability {capability!r}")
                continue
            caps = [
                parse_cap_value(v, f"{file} {where}.app[{capability!r}][{j}]")
                for j, v in enumerate(_list(values, f"{where}.app"))
            ]
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
