"""The audit stream: one JSON record per decision and per closed connection (SPEC §4, §10).

Owns: :class:`AuditLog`, which serialises records and writes them as JSON lines to a file or
standard output, batching writes within one event-loop turn and flushing right after.

Must not: block the loop for long (records are small; the file is append-only) or carry
secrets: callers pass only identity names, addresses, counters and reasons.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import IO, Any

import orjson


class AuditLog:
    """Append-only JSON-lines sink. ``target`` is a path or ``"-"`` for standard output."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._file: IO[bytes] | None = None
        self._owned = False
        self._flush_pending = False
        self._open()

    def _open(self) -> None:
        if self.target == "-":
            self._file = sys.stdout.buffer
            self._owned = False
        else:
            self._file = open(self.target, "ab", buffering=1 << 16)  # noqa: SIM115
            self._owned = True

    def write(self, event: str, **fields: Any) -> None:
        """Write one record: ``{"ts": …, "event": event, **fields}``."""
        if self._file is None:
            return
        record = {"ts": _now(), "event": event, **fields}
        self._file.write(_encode(record))
        if not self._flush_pending:
            self._flush_pending = True
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        self._flush_pending = False
        if self._file is not None:
            try:
                self._file.flush()
            except (OSError, ValueError):
                pass

    def reopen(self, target: str) -> None:
        """Switch to another target (config reload) or reopen the same one (log rotation)."""
        self.close()
        self.target = target
        self._open()

    def close(self) -> None:
        self.flush()
        if self._file is not None and self._owned:
            self._file.close()
        self._file = None


def _encode(record: dict[str, Any]) -> bytes:
    """One JSON line (UTF-8). Values JSON has no type for are written as their ``str``."""
    return orjson.dumps(record, default=str, option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS)


_second: tuple[int, str] = (-1, "")
_stamp: tuple[int, str] = (-1, "")


def _now() -> str:
    """UTC timestamp with milliseconds. The per-second prefix is formatted once per second and
    the whole stamp once per millisecond (a busy gateway writes many records in the same one)."""
    global _second, _stamp
    ms = int(time.time() * 1000)
    if ms != _stamp[0]:
        whole, frac = divmod(ms, 1000)
        if whole != _second[0]:
            _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
        _stamp = (ms, f"{_second[1]}.{frac:03d}Z")
    return _stamp[1]
