"""Map TOML key paths to the line they are written on, for error messages.

Owns: a line scanner that follows table headers (``[a.b]``, ``[[a]]``) and ``key = value``
lines and records the first line of every key path, with array-of-tables indices, e.g.
``("listeners", 1, "backend") -> 27``.

Must not: interpret values. ``tomllib`` parses the file; this module only finds lines, and it
is deliberately forgiving: a path it cannot place falls back to its nearest known parent.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

KeyPath = tuple[str | int, ...]

_BARE = r"[A-Za-z0-9_-]+"
_QUOTED = r"\"(?:[^\"\\]|\\.)*\"|'[^']*'"
_KEY = rf"(?:{_BARE}|{_QUOTED})"
_DOTTED = rf"{_KEY}(?:\s*\.\s*{_KEY})*"
_HEADER = re.compile(rf"^\s*(\[\[?)\s*({_DOTTED})\s*\]\]?\s*(?:#.*)?$")
_ASSIGN = re.compile(rf"^\s*({_DOTTED})\s*=")
_PART = re.compile(_KEY)


def _parts(dotted: str) -> list[str]:
    out = []
    for match in _PART.finditer(dotted):
        part = match.group(0)
        if part[0] in "\"'":
            part = part[1:-1]
        out.append(part)
    return out


def key_lines(text: str) -> dict[KeyPath, int]:
    """Return ``{key path: 1-based line}`` for every header and key found in ``text``."""
    lines: dict[KeyPath, int] = {}
    array_counts: dict[tuple[str, ...], int] = {}
    current: KeyPath = ()
    in_multiline: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if in_multiline is not None:
            if in_multiline in line:
                in_multiline = None
            continue
        header = _HEADER.match(line)
        if header:
            names = _parts(header.group(2))
            path: list[str | int] = []
            for depth, name in enumerate(names):
                path.append(name)
                prefix = tuple(names[: depth + 1])
                is_last = depth == len(names) - 1
                if is_last and header.group(1) == "[[":
                    array_counts[prefix] = array_counts.get(prefix, -1) + 1
                    path.append(array_counts[prefix])
                elif prefix in array_counts:
                    path.append(array_counts[prefix])
            current = tuple(path)
            lines.setdefault(current, number)
            if current and isinstance(current[-1], int):
                lines.setdefault(current[:-1], number)
            continue
        assign = _ASSIGN.match(line)
        if assign:
            key_path = current + tuple(_parts(assign.group(1)))
            lines.setdefault(key_path, number)
            rest = line[assign.end() :]
            for quote in ('"""', "'''"):
                if rest.count(quote) == 1:
                    in_multiline = quote
    return lines


def line_for(lines: dict[KeyPath, int], path: Sequence[str | int]) -> int | None:
    """The line of ``path``, or of its nearest ancestor that has one."""
    key = tuple(path)
    while key:
        if key in lines:
            return lines[key]
        key = key[:-1]
    return None


def render_path(path: Sequence[str | int]) -> str:
    """``("listeners", 0, "backend")`` → ``listeners[0].backend``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out
