"""Every option is documented, with its default: README.md's reference against the models.

The configuration model (``ferryman.config.model.Config``) is walked recursively -- nested
models, optional models, lists of models, aliases (the name a user writes in TOML) -- into key
paths such as ``listeners.rules.targets.port``. README.md's "Configuration reference" is read
into the same paths:

- each ``###`` heading names a section: "Top level" is the root, a heading starting with a
  backticked ``[audit]`` / ``[[identity.static]]`` / ``[listeners.postgres]`` is that table, and
  "Listener `policy`" is ``listeners.policy`` (documented by its own section, not by a row);
- a reference table is a markdown table whose first header cell is ``key``; its first column
  names the key(s), each in backticks (a row may name several: cert_file and key_file),
  optionally after a qualifier word naming the nested table they belong to (the row
  "target port" documents ``listeners.rules.targets.port`` and ``listeners.sni.forwards_to.port``;
  see :data:`QUALIFIERS`); its ``default`` column states the default (several keys: one
  default for all, or one per key separated by commas).

A path is documented by a row of the section it belongs to, or by a section heading of its own.
Checked: every leaf key of the model has a row (tables need none: their keys are checked); every
row and heading names a key the model has; every table states defaults, and each default that is
a value (``"30s"``, ``20``, ``false``, ``[]``, ``none``/``—``, ``required``) equals the model's
default after the model's own validation (so ``"1m"`` equals ``60.0``, ``"64KiB"`` equals
``65536``); defaults that are computed or conditional are listed in :data:`DEFAULT_EXCEPTIONS`
with the reason, and their documented behaviour is checked by hand below; every value a
``Literal`` option accepts is named in its row.

The grants file's limits (README "Limits", under "Grants") are checked the same way against
:class:`ferryman.policy.model.Limits`, through the parser users' JSON goes through. The
"Commands" table is checked against the argument parser of ``ferryman``.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import tomllib
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import pytest
from pydantic import BaseModel, TypeAdapter
from pydantic.fields import FieldInfo

from ferryman.cli.main import _parser
from ferryman.config.model import Config, ListenerConfig
from ferryman.policy.model import Limits
from ferryman.policy.parse import parse_limits

README = Path(__file__).resolve().parents[2] / "README.md"

QUALIFIERS: dict[str, tuple[str, ...]] = {
    # A word before the backticked key in a row's first column: the key belongs to this nested
    # table, relative to the row's section. Targets have one model (TargetConfig) in two places.
    "rule": ("rules",),
    "target": ("rules.targets", "sni.forwards_to"),
    "sni": ("sni",),
    "certificate": ("certificates",),
}

DEFAULT_EXCEPTIONS: dict[str, str] = {
    # Rows whose default is not a value: each is computed or conditional. Their documented
    # behaviour is checked in test_computed_defaults_behave_as_documented.
    "listeners.backend": "required unless rules, or sni.forwards_to with forward_if_no_match, "
    "choose the backend (Config's cross-check; the field itself defaults to None)",
    "listeners.identity": "None means every configured source (Config.sources_for)",
    "listeners.tailscale_cert_domain": "None means tailscaled's first CertDomains entry, known at run time",
    "listeners.session_tickets": "None means on without client certificates, off with them "
    "(ListenerConfig.issues_session_tickets)",
    "listeners.backend_ca_file": "None means the system trust store (ssl.create_default_context)",
}

VALUE_EXCEPTIONS: dict[str, set[str]] = {
    # Values a Literal accepts that the README deliberately does not offer.
    # "token" is reserved for SPEC's JWT source: nothing configures it yet, so naming it in a
    # listener's identity list is always the error "source 'token' is not configured".
    "listeners.identity": {"token"},
}

REQUIRED = object()
"""The documented default ``required``."""

NOT_A_VALUE = object()
"""A documented default in words (see DEFAULT_EXCEPTIONS)."""


# --- the README ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Table:
    heading: str
    """The ``##``/``###`` heading the table is under (its text, without the hashes)."""
    chapter: str
    """The enclosing ``##`` heading."""
    line: int
    header: list[str]
    rows: list[tuple[int, list[str]]]


def _cells(line: str) -> list[str]:
    """Split a table line on ``|``, except inside backticks or escaped as ``\\|``."""
    body = line.strip()
    body = body[1:] if body.startswith("|") else body
    body = body[:-1] if body.endswith("|") and not body.endswith("\\|") else body
    return split_outside_backticks(body, "|")


def readme_tables() -> list[Table]:
    tables: list[Table] = []
    chapter = heading = ""
    lines = README.read_text(encoding="utf-8").splitlines()
    in_fence = False
    i = 0
    while i < len(lines):
        text = lines[i].strip()
        if text.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and text.startswith("## "):
            chapter = heading = text[3:].strip()
        elif not in_fence and text.startswith("### "):
            heading = text[4:].strip()
        elif not in_fence and text.startswith("|") and i + 1 < len(lines):
            separator = lines[i + 1].strip()
            if re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", separator):
                header = [cell.lower() for cell in _cells(text)]
                rows = []
                j = i + 2
                while j < len(lines) and lines[j].strip().startswith("|"):
                    rows.append((j + 1, _cells(lines[j])))
                    j += 1
                tables.append(Table(heading, chapter, i + 1, header, rows))
                i = j
                continue
        i += 1
    return tables


def section_of(heading: str) -> str | None:
    """The key path a configuration-reference heading documents; ``None``: not a section."""
    if heading == "Top level":
        return ""
    match = re.match(r"`\[\[?([A-Za-z0-9_.]+)\]\]?`", heading)
    if match:
        return match.group(1)
    match = re.match(r"Listener `([A-Za-z0-9_]+)`", heading)
    if match:
        return f"listeners.{match.group(1)}"
    return None


def config_headings() -> dict[str, str]:
    """Section path → heading, for every ``###`` of the configuration reference that names one."""
    out: dict[str, str] = {}
    chapter = ""
    in_fence = False
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and line.startswith("## "):
            chapter = line[3:].strip()
        elif not in_fence and line.startswith("### ") and chapter == "Configuration reference":
            path = section_of(line[4:].strip())
            if path is not None:
                out[path] = line[4:].strip()
    return out


@dataclasses.dataclass(frozen=True)
class Row:
    path: str
    default: str | None
    """The row's default cell for this key; ``None`` when the table has no default column."""
    text: str
    """The whole row, for values it must mention."""
    where: str
    """``README.md:LINE``, for messages."""


def split_outside_backticks(text: str, sep: str = ",") -> list[str]:
    """Split ``text`` on ``sep``, except inside backticks or escaped with a backslash; the parts
    are stripped."""
    parts, current, in_code = [], "", False
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\" and text[i + 1 : i + 2] == sep:
            current += sep
            i += 2
            continue
        if char == "`":
            in_code = not in_code
        if char == sep and not in_code:
            parts.append(current.strip())
            current = ""
        else:
            current += char
        i += 1
    parts.append(current.strip())
    return parts


def config_rows() -> list[Row]:
    """Every key named by the configuration reference's key tables, as paths in the model."""
    rows: list[Row] = []
    for table in readme_tables():
        if table.chapter != "Configuration reference" or table.header[0] != "key":
            continue
        section = section_of(table.heading)
        assert section is not None, (
            f"README.md:{table.line}: a key table under '### {table.heading}', which names no "
            "configuration section (expected 'Top level', '`[section]`' or '`[[section]]`')"
        )
        has_default = "default" in table.header
        for line, cells in table.rows:
            assert len(cells) == len(table.header), f"README.md:{line}: {len(cells)} cells"
            first = cells[0]
            qualifier = first.split("`", 1)[0].strip()
            keys = re.findall(r"`([^`]*)`", first)
            assert keys, f"README.md:{line}: the first column names no key in backticks"
            for key in keys:
                assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"README.md:{line}: key {key!r}"
            assert qualifier == "" or qualifier in QUALIFIERS, (
                f"README.md:{line}: unknown qualifier {qualifier!r} before the key "
                f"(known: {', '.join(QUALIFIERS)}; add it to QUALIFIERS if it is a new nested table)"
            )
            defaults: list[str | None] = [None] * len(keys)
            if has_default:
                cell = cells[table.header.index("default")]
                parts = split_outside_backticks(cell)
                defaults = list(parts) if len(parts) == len(keys) and len(keys) > 1 else [cell] * len(keys)
            for key, default in zip(keys, defaults, strict=True):
                for middle in QUALIFIERS.get(qualifier, ("",)):
                    path = ".".join(p for p in (section, middle, key) if p)
                    rows.append(Row(path, default, " | ".join(cells), f"README.md:{line}"))
    return rows


def parse_default(cell: str) -> Any:
    """A documented default as a Python value, :data:`REQUIRED` or :data:`NOT_A_VALUE`.

    ``none`` and ``—`` are "not set" (``None``); a single backticked value is read as TOML
    (``"30s"``, ``20``, ``false``, ``[]``) or, when it is not TOML, as a bare string
    (`/var/run/tailscale/tailscaled.sock`, `postgres`)."""
    text = cell.strip()
    if text == "required":
        return REQUIRED
    if text in ("none", "—", "-"):
        return None
    match = re.fullmatch(r"`([^`]+)`", text)
    if match is None:
        return NOT_A_VALUE
    try:
        return tomllib.loads(f"value = {match.group(1)}")["value"]
    except tomllib.TOMLDecodeError:
        return match.group(1)


# --- the configuration model --------------------------------------------------------------------


def _unwrap(annotation: Any) -> list[Any]:
    """The types an annotation is made of: Optional, unions, tuples and lists taken apart."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, tuple, list, frozenset, set):
        return [t for arg in typing.get_args(annotation) if arg is not ... for t in _unwrap(arg)]
    return [annotation]


def nested_model(info: FieldInfo) -> type[BaseModel] | None:
    models = [t for t in _unwrap(info.annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
    assert len(models) <= 1, f"a field holding several kinds of table: {models}"
    return models[0] if models else None


def toml_name(name: str, info: FieldInfo) -> str:
    """The key a user writes in TOML: the validation alias (or alias) when there is one."""
    if isinstance(info.validation_alias, str):
        return info.validation_alias
    return info.alias or name


def model_keys(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo, bool]]:
    """(path, field, is_table) for every key of ``model`` and of the tables nested in it."""
    for name, info in model.model_fields.items():
        path = f"{prefix}.{toml_name(name, info)}" if prefix else toml_name(name, info)
        nested = nested_model(info)
        yield path, info, nested is not None
        if nested is not None:
            yield from model_keys(nested, path)


MODEL = {path: (info, is_table) for path, info, is_table in model_keys(Config)}


def validated_default(info: FieldInfo, value: Any) -> Any:
    """``value`` as the model would store it (durations and sizes parsed, lists as tuples)."""
    annotation = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
    return TypeAdapter(annotation).validate_python(value)


def literal_values(info: FieldInfo) -> set[str]:
    return {
        str(value)
        for t in _unwrap(info.annotation)
        if typing.get_origin(t) is typing.Literal
        for value in typing.get_args(t)
    }


def home_section(path: str, headings: dict[str, str]) -> str:
    """The README section a key path belongs in: the longest heading that contains it."""
    best = max((p for p in headings if p == "" or path.startswith(p + ".")), key=len, default="")
    return headings.get(best, "Top level")


# --- the checks ---------------------------------------------------------------------------------


def test_readme_is_parsed_into_the_expected_sections() -> None:
    """Guards the parser itself: a README reshuffle must not make the other checks vacuous."""
    headings = config_headings()
    for section in ("", "audit", "listeners", "listeners.postgres", "admin", "state", "listeners.policy"):
        assert section in headings
    assert len(config_rows()) > 50


def test_every_option_is_documented() -> None:
    headings = config_headings()
    documented = {row.path for row in config_rows()} | set(headings)
    missing = [
        f"{path}: add a row to the README table under '### {home_section(path, headings)}'"
        for path, (_, is_table) in MODEL.items()
        if not is_table and path not in documented
    ]
    assert not missing, "options without documentation:\n" + "\n".join(missing)


def test_no_documented_option_is_missing_from_the_model() -> None:
    stale = [f"{row.where}: {row.path}" for row in config_rows() if row.path not in MODEL]
    stale += [f"heading '{h}': {path}" for path, h in config_headings().items() if path and path not in MODEL]
    assert not stale, "documented, but the configuration model has no such key:\n" + "\n".join(stale)


def test_each_option_is_documented_once() -> None:
    seen: dict[str, str] = {}
    twice = []
    for row in config_rows():
        if row.path in seen:
            twice.append(f"{row.path}: {seen[row.path]} and {row.where}")
        seen[row.path] = row.where
    assert not twice, "documented twice:\n" + "\n".join(twice)


def test_every_key_table_states_defaults() -> None:
    without = [
        f"README.md:{t.line}: '### {t.heading}'"
        for t in readme_tables()
        if t.chapter == "Configuration reference" and t.header[0] == "key" and "default" not in t.header
    ]
    assert not without, "key tables without a default column:\n" + "\n".join(without)


def test_documented_defaults_are_the_model_defaults() -> None:
    wrong = []
    for row in config_rows():
        if row.path not in MODEL or row.default is None:
            continue  # reported by the tests above
        info, _ = MODEL[row.path]
        documented = parse_default(row.default)
        if row.path in DEFAULT_EXCEPTIONS:
            continue
        if documented is NOT_A_VALUE:
            wrong.append(
                f"{row.where}: {row.path}: default {row.default!r} is not a value; write it as one "
                '(`"30s"`, `false`, none, required) or add it to DEFAULT_EXCEPTIONS with the reason'
            )
        elif documented is REQUIRED:
            if not info.is_required():
                wrong.append(f"{row.where}: {row.path}: documented as required, default {info.default!r}")
        elif info.is_required():
            wrong.append(f"{row.where}: {row.path}: documented default {row.default}, but it is required")
        elif documented is None:
            if info.default is not None:
                wrong.append(f"{row.where}: {row.path}: documented as unset, default {info.default!r}")
        else:
            try:
                value = validated_default(info, documented)
            except ValueError as exc:
                wrong.append(f"{row.where}: {row.path}: documented default {row.default} is invalid: {exc}")
                continue
            if value != info.default:
                wrong.append(
                    f"{row.where}: {row.path}: documented default {row.default} "
                    f"(= {value!r}), model default {info.default!r}"
                )
    assert not wrong, "README defaults that disagree with the model:\n" + "\n".join(wrong)


def test_default_exceptions_are_still_needed() -> None:
    rows = {row.path: row for row in config_rows()}
    for path, reason in DEFAULT_EXCEPTIONS.items():
        assert path in MODEL, f"DEFAULT_EXCEPTIONS names {path}, which the model no longer has"
        assert path in rows, f"DEFAULT_EXCEPTIONS names {path}, which README does not document"
        default = rows[path].default
        assert default is not None and parse_default(default) is NOT_A_VALUE, (
            f"{rows[path].where}: {path} now documents a plain default: drop it from "
            f"DEFAULT_EXCEPTIONS ({reason})"
        )


def test_computed_defaults_behave_as_documented() -> None:
    """What the rows in DEFAULT_EXCEPTIONS say, checked on the model."""
    base = {"name": "a", "listen": "127.0.0.1:7000"}
    # backend: required unless rules (or sni.forwards_to with forward_if_no_match) choose one.
    with pytest.raises(ValueError, match="backend: required"):
        Config.model_validate({"listeners": [base]})
    target = {"host": "db", "port": 5432}
    Config.model_validate({"listeners": [{**base, "rules": [{"domain": "x", "targets": [target]}]}]})
    Config.model_validate(
        {"listeners": [{**base, "sni": {"forward_if_no_match": True, "forwards_to": target}}]}
    )
    with pytest.raises(ValueError, match="backend: required"):
        Config.model_validate({"listeners": [{**base, "sni": {"forwards_to": target}}]})
    # identity: every configured source.
    config = Config.model_validate(
        {
            "identity": {"static": [{"cidr": "127.0.0.0/8", "user": "u"}]},
            "tailscale": {},
            "listeners": [{**base, "backend": "db:1"}],
        }
    )
    assert config.sources_for(config.listeners[0]) == ("tailscale", "static")
    # session_tickets: on without client certificates, off with them.
    tcp = ListenerConfig.model_validate({**base, "backend": "db:1"})
    assert tcp.session_tickets is None and tcp.issues_session_tickets
    mtls = ListenerConfig.model_validate({**base, "backend": "db:1", "client_auth": "want"})
    assert not mtls.issues_session_tickets
    # tailscale_cert_domain and backend_ca_file: unset in the model, filled in at run time.
    assert tcp.tailscale_cert_domain is None and tcp.backend_ca_file is None


def test_every_accepted_value_is_named() -> None:
    rows = {row.path: row for row in config_rows()}
    unnamed = []
    for path, (info, _) in MODEL.items():
        if path not in rows:
            continue
        codes = re.findall(r"`([^`]*)`", rows[path].text)
        named = {word for code in codes for word in re.findall(r"[\w.:-]+", code)}
        for value in sorted(literal_values(info) - VALUE_EXCEPTIONS.get(path, set())):
            if value not in named:
                unnamed.append(f"{rows[path].where}: {path}: accepts `{value}`, which the row does not name")
    assert not unnamed, "\n".join(unnamed)


def test_value_exceptions_are_still_accepted() -> None:
    for path, values in VALUE_EXCEPTIONS.items():
        assert values <= literal_values(MODEL[path][0]), (
            f"VALUE_EXCEPTIONS: {path} no longer accepts {values}"
        )


# --- grant limits -------------------------------------------------------------------------------

LIMIT_SAMPLES: dict[str, Any] = {
    # A valid JSON value for each limit, to show the parser reads the documented key into it.
    "max_conns": 3,
    "max_bytes_per_conn": "10GB",
    "max_conn_duration": "8h",
    "bandwidth": [{"bytes": "50GB", "period": "24h"}],
}

WHERE = {"top-level `limits`": {"top"}, "`backends.NAME.limits`": {"backend"}, "either": {"top", "backend"}}


def limit_rows() -> list[tuple[str, dict[str, str]]]:
    (table,) = [t for t in readme_tables() if t.heading == "Limits" and t.chapter.startswith("Grants")]
    assert table.header[:3] == ["limit", "where", "default"], table.header
    out = []
    for line, cells in table.rows:
        (key,) = re.findall(r"`([^`]*)`", cells[0])
        out.append((key, {"line": f"README.md:{line}", **dict(zip(table.header, cells, strict=True))}))
    return out


def test_every_limit_is_documented_for_both_places() -> None:
    places: dict[str, set[str]] = {}
    for key, row in limit_rows():
        assert row["where"] in WHERE, f"{row['line']}: 'where' must be one of {', '.join(WHERE)}"
        places.setdefault(key, set()).update(WHERE[row["where"]])
    fields = {f.name for f in dataclasses.fields(Limits)}
    assert not set(places) - fields, f"documented limits the grant model lacks: {set(places) - fields}"
    assert not fields - set(places), f"grant limits without documentation: {fields - set(places)}"
    # parse_limits reads the top-level block and each backends.NAME.limits alike
    for key, where in places.items():
        assert where == {"top", "backend"}, f"{key}: documented only for {where}"


def test_documented_limits_are_read_by_the_parser() -> None:
    """The documented key is the JSON key the grant parser reads (the alias check of limits)."""
    for key, row in limit_rows():
        assert key in LIMIT_SAMPLES, f"add a sample value for {key} to LIMIT_SAMPLES"
        parsed = parse_limits({key: LIMIT_SAMPLES[key]}, "limits")
        assert getattr(parsed, key) != getattr(Limits(), key), f"{row['line']}: {key} is not read"


def test_documented_limit_defaults() -> None:
    absent = parse_limits({}, "limits")
    for key, row in limit_rows():
        assert row["default"] == "no limit", f"{row['line']}: {key}: default {row['default']!r}"
        assert getattr(absent, key) in (None, ()), f"{key}: absent reads as {getattr(absent, key)!r}"


def test_limit_windows_name_their_fields() -> None:
    """A limit holding records (``bandwidth``) names each of their fields in its row."""
    rows = dict(limit_rows())
    for item in dataclasses.fields(Limits):
        if item.name not in rows or item.name not in LIMIT_SAMPLES:
            continue  # reported by the tests above
        sample = getattr(parse_limits({item.name: LIMIT_SAMPLES[item.name]}, "limits"), item.name)
        if isinstance(sample, tuple) and sample and dataclasses.is_dataclass(sample[0]):
            words = set(re.findall(r"\w+", " ".join(re.findall(r"`([^`]*)`", rows[item.name]["behaviour"]))))
            for sub in dataclasses.fields(sample[0]):
                assert sub.name in words, f"{rows[item.name]['line']}: {item.name}: does not name {sub.name}"


# --- commands -----------------------------------------------------------------------------------


def test_commands_match_the_argument_parser() -> None:
    (table,) = [t for t in readme_tables() if t.heading == "Commands"]
    documented: dict[str, str] = {}
    for line, cells in table.rows:
        match = re.match(r"`ferryman (\w+)", cells[0])
        assert match, f"README.md:{line}: expected `ferryman COMMAND …`"
        documented[match.group(1)] = " ".join(cells)
    parser = _parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    commands: dict[str, argparse.ArgumentParser] = dict(sub.choices)
    assert set(documented) == set(commands), f"README: {sorted(documented)}, parser: {sorted(commands)}"
    for name, command in commands.items():
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert any(re.search(rf"{re.escape(o)}\b", documented[name]) for o in action.option_strings), (
                f"ferryman {name}: {'/'.join(action.option_strings)} is not in README's Commands"
            )
