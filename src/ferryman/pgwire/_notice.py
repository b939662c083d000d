"""ErrorResponse and NoticeResponse: the two messages built from "Error and Notice Message Fields".

Owns: the one-letter field codes and their names, parsing and encoding the field list, and
:meth:`ErrorResponse.fatal`. Re-exported by ``messages.py``; import from there.

Must not: decide what to do with an error (the connection classes and the shell do).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Final, Self

from ferryman.errors import LocalProtocolError
from ferryman.pgwire._framing import BodyReader, cstring, decode, typed_message

FIELD_CODES: Final = MappingProxyType(
    {
        # PostgreSQL docs, "Error and Notice Message Fields": code letter -> attribute name.
        "S": "severity",  # localized severity: ERROR, FATAL, PANIC, WARNING, NOTICE, ...
        "V": "severity_nonlocalized",  # the same, never translated (9.6+)
        "C": "code",  # SQLSTATE
        "M": "message",
        "D": "detail",
        "H": "hint",
        "P": "position",
        "p": "internal_position",
        "q": "internal_query",
        "W": "where",
        "s": "schema_name",
        "t": "table_name",
        "c": "column_name",
        "d": "data_type_name",
        "n": "constraint_name",
        "F": "file",
        "L": "line",
        "R": "routine",
    }
)
"""Field code letter -> attribute name on :class:`ErrorResponse` / :class:`NoticeResponse`."""

_FATAL_SEVERITIES: Final = frozenset({"FATAL", "PANIC"})


@dataclass(frozen=True, slots=True)
class _ErrorOrNotice:
    """Shared fields of ErrorResponse and NoticeResponse; do not use directly.

    ``severity``, ``code`` and ``message`` are always present per the docs; a peer that
    omits one gets ``""``. Fields with codes we do not know go to ``unknown`` in wire order
    (the docs tell frontends to ignore them; we keep them so encode(parse(x)) loses nothing).
    """

    severity: str
    code: str
    message: str
    severity_nonlocalized: str | None = None
    detail: str | None = None
    hint: str | None = None
    position: str | None = None
    internal_position: str | None = None
    internal_query: str | None = None
    where: str | None = None
    schema_name: str | None = None
    table_name: str | None = None
    column_name: str | None = None
    data_type_name: str | None = None
    constraint_name: str | None = None
    file: str | None = None
    line: str | None = None
    routine: str | None = None
    unknown: tuple[tuple[str, str], ...] = ()

    TYPE: ClassVar[bytes] = b""

    @property
    def is_fatal(self) -> bool:
        """True for FATAL or PANIC: the sender closes the session after this message."""
        severity = self.severity_nonlocalized or self.severity
        return severity in _FATAL_SEVERITIES

    def as_dict(self) -> dict[str, str]:
        """The fields that are set, keyed by attribute name (unknown ones by their code)."""
        out = {name: getattr(self, name) for name in FIELD_CODES.values() if getattr(self, name) is not None}
        out.update(self.unknown)
        return out

    def encode(self) -> bytes:
        """Return the frame: each set field as code letter + String, then a NUL.

        Raises:
            LocalProtocolError: a value contains NUL, or an ``unknown`` code is not one
                non-NUL byte.
        """
        body = bytearray()
        for letter, name in FIELD_CODES.items():
            value = getattr(self, name)
            if value is not None:
                body += letter.encode("ascii") + cstring(value)
        for letter, value in self.unknown:
            if len(letter) != 1 or not 0 < ord(letter) < 256:
                raise LocalProtocolError(f"invalid error field code {letter!r}")
            body += bytes([ord(letter)]) + cstring(value)
        body += b"\x00"
        return typed_message(self.TYPE, bytes(body))

    @classmethod
    def parse(cls, body: bytes) -> Self:
        """Parse the field list; on a repeated code the last value wins.

        Raises:
            RemoteProtocolError: the body is truncated or has bytes after the final NUL.
        """
        reader = BodyReader(body, cls.__name__)
        known: dict[str, Any] = {}
        unknown: list[tuple[str, str]] = []
        while letter_code := reader.byte1():
            letter = chr(letter_code)
            value = decode(reader.raw_cstring())
            name = FIELD_CODES.get(letter)
            if name is None:
                unknown.append((letter, value))
            else:
                known[name] = value
        reader.end()
        known.setdefault("severity", "")
        known.setdefault("code", "")
        known.setdefault("message", "")
        return cls(unknown=tuple(unknown), **known)

    def __str__(self) -> str:
        text = f"{self.severity}: {self.message} (SQLSTATE {self.code})"
        if self.detail:
            text += f"; DETAIL: {self.detail}"
        if self.hint:
            text += f"; HINT: {self.hint}"
        return text


@dataclass(frozen=True, slots=True)
class ErrorResponse(_ErrorOrNotice):
    """An error report (``E``). During startup every error ends the connection."""

    TYPE: ClassVar[bytes] = b"E"

    @classmethod
    def fatal(cls, code: str, message: str, detail: str | None = None, hint: str | None = None) -> Self:
        """Build a FATAL error with SQLSTATE ``code`` -- how the gateway refuses a client."""
        return cls(
            severity="FATAL",
            severity_nonlocalized="FATAL",
            code=code,
            message=message,
            detail=detail,
            hint=hint,
        )


@dataclass(frozen=True, slots=True)
class NoticeResponse(_ErrorOrNotice):
    """A notice/warning report (``N``); informational, the session goes on."""

    TYPE: ClassVar[bytes] = b"N"
