"""Parsing of the human units used in configuration and grants: durations and byte sizes.

Owns: ``parse_duration`` and ``parse_size``. Pure functions, no I/O.

Durations are strings such as ``"90s"``, ``"1m"``, ``"24h"``, ``"1h30m"``, ``"500ms"``, ``"7d"``;
``"0"`` or ``0`` means zero (callers use it for "disabled"/"never"). A bare number is taken as
seconds. Byte sizes accept integers (``10485760``) or strings with SI (``kB``, ``MB``, ``GB``,
``TB``: powers of 1000) or IEC (``KiB``, ``MiB``, ``GiB``, ``TiB``: powers of 1024) units;
``"10G"`` is read as SI like ``"10GB"``.
"""

from __future__ import annotations

import math
import re

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|s|m|h|d|w)")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 7 * 86400.0,
}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_duration(value: object) -> float:
    """Return the duration in seconds. Raises ``ValueError`` naming the bad value."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"duration must be a non-negative number: {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f'not a duration: {value!r} (use a string such as "90s", "1m", "24h")')
    text = value.strip()
    if text in ("0", ""):
        if text == "":
            raise ValueError('empty duration (use "0" to disable)')
        return 0.0
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if seconds < 0 or not math.isfinite(seconds):
            raise ValueError(f"duration must be non-negative: {value!r}")
        return seconds
    pos = 0
    total = 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or pos == 0:
        raise ValueError(f'not a duration: {value!r} (use e.g. "90s", "1m", "1h30m", "24h")')
    return total


def parse_size(value: object) -> int:
    """Return the size in bytes. Raises ``ValueError`` naming the bad value."""
    if isinstance(value, bool):
        raise ValueError(f"not a byte size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"byte size must be non-negative: {value!r}")
        return value
    if isinstance(value, float):
        if value < 0 or not math.isfinite(value) or value != int(value):
            raise ValueError(f"byte size must be a whole non-negative number: {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"not a byte size: {value!r}")
    match = _SIZE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f'not a byte size: {value!r} (use e.g. 10485760, "10MiB", "10GB")')
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def format_duration(seconds: float) -> str:
    """Compact rendering for logs and messages: ``90s``, ``1h``, ``1.5s``."""
    if seconds and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return f"{seconds:g}s"
