"""Logging set-up and the JSON log format.

Owns: :func:`setup` (called once, by the CLI), :func:`set_level` (reload) and
:class:`JsonFormatter`. Library modules use ``logging.getLogger(__name__)`` with lazy ``%``
arguments and pass context in ``extra=``.

Must not: be called from library code, or format secrets. Messages never contain passwords,
tokens or SCRAM exchanges; objects that carry them redact their ``repr``.

Standard error carries one record per line in the configured format, whoever logs it. The
handler sits on the root logger, so records of the libraries we use (psycopg_pool's "error
connecting in 'ferryman-provision-db-0'", asyncio's "returning true from eof_received()", aiohttp)
come out formatted like ours instead of as bare text from logging's last-resort handler. So do
Python warnings (``logging.captureWarnings``) and exceptions that reach the top of a thread or
are raised where nobody can catch them (``sys.excepthook``, ``threading.excepthook``,
``sys.unraisablehook``). Those libraries log at ``THIRD_PARTY_LEVEL`` (warning) and above, or
at ferryman's level when it is stricter: their debug output is verbose and can carry connection
details, so ``log_level = "debug"`` turns on ferryman's debug records only.

A record that cannot be formatted (a library's bad ``%`` arguments, an ``extra`` value whose
``str()`` raises) still produces one valid line, saying what went wrong: formatting never
raises, and a failed write never prints a traceback of its own.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from types import TracebackType
from typing import Any, TextIO

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {"message", "asctime"}

FERRYMAN = "ferryman"
THIRD_PARTY_LEVEL = logging.WARNING
"""The least severe record other libraries' loggers emit (see the module docstring)."""

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _message(record: logging.LogRecord) -> str:
    """``record.getMessage()``, or a description of the record when its arguments do not fit."""
    try:
        return record.getMessage()
    except Exception as exc:
        return f"{_safe_str(record.msg)} % {_safe_repr(record.args)} (unformattable log record: {exc!r})"


def _safe_str(value: object) -> str:
    try:
        return str(value)
    except Exception:
        return _safe_repr(value)


def _safe_repr(value: object) -> str:
    try:
        return repr(value)
    except Exception:
        return f"<{type(value).__name__} object (repr failed)>"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and any ``extra=`` fields.

    Never raises: a field that cannot be rendered is replaced by a description of it.
    """

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": _message(record),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            try:
                out["exc"] = self.formatException(record.exc_info)
            except Exception as exc:
                out["exc"] = f"(traceback unavailable: {exc!r})"
        try:
            return json.dumps(out, default=_safe_str)
        except Exception:
            # Non-string keys or a value json cannot take even as str(): keep what is safe.
            safe = {
                str(k): v if isinstance(v, str | int | float | bool | None) else _safe_str(v)
                for k, v in out.items()
            }
            return json.dumps(safe, default=_safe_str)


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``, with the same guarantees as :class:`JsonFormatter` (never raises; one
    record may span lines only through its traceback, as text logs do)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        try:
            return super().format(record)
        except Exception:
            record.message = _message(record)
            record.asctime = self.formatTime(record)
            return f"{record.asctime} {record.levelname} {record.name}: {record.message}"


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Standard error, without logging's multi-line "--- Logging error ---" report: a record
    that failed to write is reported in one formatted line, if even that can be written."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def handleError(self, record: logging.LogRecord) -> None:
        try:
            failure = logging.LogRecord(
                record.name,
                logging.ERROR,
                record.pathname,
                record.lineno,
                "could not write a log record: %s",
                (_safe_repr(sys.exc_info()[1]),),
                None,
            )
            assert self.formatter is not None
            self.stream.write(self.formatter.format(failure) + self.terminator)
            self.flush()
        except Exception:  # nowhere left to report it
            pass


def setup(level: str = "info", fmt: str = "json") -> None:
    """Send every record (ferryman's at ``level``, other libraries' at ``THIRD_PARTY_LEVEL`` or
    ``level`` if stricter) to standard error in ``fmt`` (``json`` or ``text``)."""
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)  # an earlier setup() (the CLI calls it again once configured)
    root.addHandler(handler)
    ours = logging.getLogger(FERRYMAN)
    ours.handlers.clear()
    ours.propagate = True  # to the root handler, like everyone else's
    set_level(level)
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_thread_exception
    sys.unraisablehook = _log_unraisable


def set_level(level: str) -> None:
    """Apply ``level`` (debug, info, warning, error) to ferryman's loggers, and the matching
    floor to other libraries'."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    logging.getLogger(FERRYMAN).setLevel(numeric)
    logging.getLogger().setLevel(max(numeric, THIRD_PARTY_LEVEL))


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    logging.getLogger(FERRYMAN).critical("uncaught exception", exc_info=(kind, exc, tb))


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger(FERRYMAN).error(
        "uncaught exception in thread %s", name, exc_info=(args.exc_type, args.exc_value, args.exc_traceback)
    )


def _log_unraisable(unraisable: Any) -> None:
    try:
        where = unraisable.err_msg or "Exception ignored in"
        obj = _safe_repr(unraisable.object)
        exc_info = (unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback)
        logging.getLogger(FERRYMAN).warning("%s: %s", where, obj, exc_info=exc_info)
    except Exception:  # the hook must not raise
        pass
