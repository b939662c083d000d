"""Backend messages: what a server sends during startup and authentication.

Owns: SSLResponse, GSSENCResponse, the Authentication* requests, ParameterStatus,
BackendKeyData, ReadyForQuery, NegotiateProtocolVersion and :func:`parse_backend_message`
(ErrorResponse/NoticeResponse are in ``_notice.py``). Conventions are in ``messages.py``,
which re-exports everything here; import from there.

Must not: decide which message is legal when, or do I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar, Final, TypeAlias

from ferryman.errors import LocalProtocolError, RemoteProtocolError
from ferryman.pgwire import sqlstate
from ferryman.pgwire._framing import (
    INT32,
    MAX_CANCEL_KEY,
    MIN_CANCEL_KEY,
    BodyReader,
    check_cancel_key,
    cstring,
    int32,
    redacted,
    typed_message,
)
from ferryman.pgwire._notice import ErrorResponse, NoticeResponse


@dataclass(frozen=True, slots=True)
class SSLResponse:
    """The server's one-byte answer to SSLRequest: ``S`` (go ahead with TLS) or ``N``.

    Not a framed message; the docs describe it under "SSL Session Encryption".
    """

    accept: bool

    def encode(self) -> bytes:
        """Return ``b"S"`` or ``b"N"``."""
        return b"S" if self.accept else b"N"


@dataclass(frozen=True, slots=True)
class GSSENCResponse:
    """The server's one-byte answer to GSSENCRequest: ``G`` or ``N`` (ferryman: always ``N``)."""

    accept: bool

    def encode(self) -> bytes:
        """Return ``b"G"`` or ``b"N"``."""
        return b"G" if self.accept else b"N"


AUTH_OK: Final = 0
AUTH_KERBEROS_V5: Final = 2
AUTH_CLEARTEXT_PASSWORD: Final = 3
AUTH_MD5_PASSWORD: Final = 5
AUTH_SCM_CREDENTIAL: Final = 6
AUTH_GSS: Final = 7
AUTH_GSS_CONTINUE: Final = 8
AUTH_SSPI: Final = 9
AUTH_SASL: Final = 10
AUTH_SASL_CONTINUE: Final = 11
AUTH_SASL_FINAL: Final = 12

UNSUPPORTED_AUTH_METHODS: Final = MappingProxyType(
    {
        AUTH_KERBEROS_V5: "KerberosV5",
        AUTH_SCM_CREDENTIAL: "SCMCredential",
        AUTH_GSS: "GSS",
        AUTH_GSS_CONTINUE: "GSSContinue",
        AUTH_SSPI: "SSPI",
    }
)
"""Authentication request codes we know by name but cannot answer."""


def _auth(code: int, payload: bytes = b"") -> bytes:
    return typed_message(b"R", INT32.pack(code) + payload)


@dataclass(frozen=True, slots=True)
class AuthenticationOk:
    """Authentication succeeded."""

    def encode(self) -> bytes:
        """Return ``52 00 00 00 08 00 00 00 00``."""
        return _auth(AUTH_OK)


@dataclass(frozen=True, slots=True)
class AuthenticationCleartextPassword:
    """The server wants the password in clear text."""

    def encode(self) -> bytes:
        """Return ``52 00 00 00 08 00 00 00 03``."""
        return _auth(AUTH_CLEARTEXT_PASSWORD)


@dataclass(frozen=True, slots=True)
class AuthenticationMD5Password:
    """The server wants an MD5-hashed password, salted with the 4-byte ``salt``."""

    salt: bytes

    def encode(self) -> bytes:
        """Return the frame; raises LocalProtocolError unless the salt is 4 bytes."""
        if len(self.salt) != 4:
            raise LocalProtocolError("the MD5 salt is exactly 4 bytes")
        return _auth(AUTH_MD5_PASSWORD, self.salt)


@dataclass(frozen=True, slots=True)
class AuthenticationSASL:
    """The server starts SASL and lists the mechanisms it accepts, in preference order."""

    mechanisms: tuple[str, ...]

    def encode(self) -> bytes:
        """Return the frame: each name NUL-terminated, then one more NUL."""
        if any(not m for m in self.mechanisms):
            raise LocalProtocolError("SASL mechanism names cannot be empty")
        return _auth(AUTH_SASL, b"".join(cstring(m) for m in self.mechanisms) + b"\x00")


@dataclass(frozen=True, slots=True)
class AuthenticationSASLContinue:
    """A SASL challenge (for SCRAM: server-first-message)."""

    data: bytes

    def __repr__(self) -> str:
        return f"AuthenticationSASLContinue(data={redacted(self.data)})"

    def encode(self) -> bytes:
        """Return the frame."""
        return _auth(AUTH_SASL_CONTINUE, self.data)


@dataclass(frozen=True, slots=True)
class AuthenticationSASLFinal:
    """SASL outcome data (for SCRAM: server-final-message, the server's proof)."""

    data: bytes

    def __repr__(self) -> str:
        return f"AuthenticationSASLFinal(data={redacted(self.data)})"

    def encode(self) -> bytes:
        """Return the frame."""
        return _auth(AUTH_SASL_FINAL, self.data)


AuthenticationRequest: TypeAlias = (
    AuthenticationOk
    | AuthenticationCleartextPassword
    | AuthenticationMD5Password
    | AuthenticationSASL
    | AuthenticationSASLContinue
    | AuthenticationSASLFinal
)


def _parse_authentication(body: bytes) -> AuthenticationRequest:
    reader = BodyReader(body, "Authentication")
    code = reader.int32()
    result: AuthenticationRequest
    if code == AUTH_OK:
        result = AuthenticationOk()
    elif code == AUTH_CLEARTEXT_PASSWORD:
        result = AuthenticationCleartextPassword()
    elif code == AUTH_MD5_PASSWORD:
        result = AuthenticationMD5Password(reader.take(4))
    elif code == AUTH_SASL:
        names: list[str] = []
        while name := reader.cstring():
            names.append(name)
        result = AuthenticationSASL(tuple(names))
    elif code == AUTH_SASL_CONTINUE:
        result = AuthenticationSASLContinue(reader.rest())
    elif code == AUTH_SASL_FINAL:
        result = AuthenticationSASLFinal(reader.rest())
    elif code in UNSUPPORTED_AUTH_METHODS:
        raise RemoteProtocolError(
            f"the server requested authentication method {UNSUPPORTED_AUTH_METHODS[code]} "
            f"(code {code}), which ferryman does not support",
            sqlstate=sqlstate.FEATURE_NOT_SUPPORTED,
        )
    else:
        raise RemoteProtocolError(f"unknown authentication request code {code}")
    reader.end()
    return result


@dataclass(frozen=True, slots=True)
class ParameterStatus:
    """A run-time parameter's current value (``server_version``, ``client_encoding``, ...)."""

    name: str
    value: str
    TYPE: ClassVar[bytes] = b"S"

    def encode(self) -> bytes:
        """Return the frame."""
        return typed_message(self.TYPE, cstring(self.name) + cstring(self.value))

    @classmethod
    def parse(cls, body: bytes) -> ParameterStatus:
        """Parse an ``S`` body from the backend."""
        reader = BodyReader(body, "ParameterStatus")
        result = cls(reader.cstring(), reader.cstring())
        reader.end()
        return result


@dataclass(frozen=True, slots=True)
class BackendKeyData:
    """The ``(process_id, secret_key)`` a client quotes in a later CancelRequest."""

    process_id: int
    secret_key: bytes
    TYPE: ClassVar[bytes] = b"K"

    def __repr__(self) -> str:
        return f"BackendKeyData(process_id={self.process_id}, secret_key={redacted(self.secret_key)})"

    def encode(self) -> bytes:
        """Return the frame; raises LocalProtocolError for a key outside 4..256 bytes."""
        check_cancel_key(self.secret_key)
        return typed_message(self.TYPE, int32(self.process_id) + self.secret_key)

    @classmethod
    def parse(cls, body: bytes) -> BackendKeyData:
        """Parse a ``K`` body (process id, then the key to the end)."""
        reader = BodyReader(body, "BackendKeyData")
        process_id = reader.int32()
        key = reader.rest()
        if not MIN_CANCEL_KEY <= len(key) <= MAX_CANCEL_KEY:
            raise RemoteProtocolError(f"invalid BackendKeyData key length ({len(key)} bytes)")
        return cls(process_id, key)


TRANSACTION_STATUSES: Final = frozenset("ITE")
"""ReadyForQuery status: ``I`` idle, ``T`` in a transaction block, ``E`` failed transaction."""


@dataclass(frozen=True, slots=True)
class ReadyForQuery:
    """The backend is ready for a new query; ``transaction_status`` is ``I``, ``T`` or ``E``."""

    transaction_status: str = "I"
    TYPE: ClassVar[bytes] = b"Z"

    def encode(self) -> bytes:
        """Return the frame, e.g. ``5a 00 00 00 05 49`` when idle."""
        if self.transaction_status not in TRANSACTION_STATUSES:
            raise LocalProtocolError(f"invalid transaction status {self.transaction_status!r}")
        return typed_message(self.TYPE, self.transaction_status.encode("ascii"))

    @classmethod
    def parse(cls, body: bytes) -> ReadyForQuery:
        """Parse a ``Z`` body."""
        reader = BodyReader(body, "ReadyForQuery")
        status = chr(reader.byte1())
        reader.end()
        if status not in TRANSACTION_STATUSES:
            raise RemoteProtocolError(f"invalid transaction status {status!r} in ReadyForQuery")
        return cls(status)


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion:
    """The protocol version the session will use and the ``_pq_.`` options the server ignored.

    ``newest_version`` is a whole version word, ``major << 16 | minor`` (196608 for 3.0), as
    PostgreSQL sends it (``pq_sendint32(&buf, PG_PROTOCOL_LATEST)`` in
    ``SendNegotiateProtocolVersion``) and libpq reads it: libpq 18 refuses anything below
    ``PG_PROTOCOL(3, 0)`` as a "downgrade to pre-3.0". Older docs call the field the "newest
    minor protocol version"; a bare ``0`` there breaks real clients.
    """

    newest_version: int
    unrecognized_options: tuple[str, ...] = field(default=())
    TYPE: ClassVar[bytes] = b"v"

    def encode(self) -> bytes:
        """Return the frame."""
        names = b"".join(cstring(o) for o in self.unrecognized_options)
        return typed_message(
            self.TYPE, int32(self.newest_version) + int32(len(self.unrecognized_options)) + names
        )

    @classmethod
    def parse(cls, body: bytes) -> NegotiateProtocolVersion:
        """Parse a ``v`` body."""
        reader = BodyReader(body, "NegotiateProtocolVersion")
        version = reader.int32()
        count = reader.int32()
        # Each option takes at least its NUL, so a count above the bytes left is a lie.
        if count < 0 or count > reader.remaining:
            raise RemoteProtocolError(f"invalid option count {count} in NegotiateProtocolVersion")
        options = tuple(reader.cstring() for _ in range(count))
        reader.end()
        return cls(version, options)


BackendMessage: TypeAlias = (
    AuthenticationRequest
    | ParameterStatus
    | BackendKeyData
    | ReadyForQuery
    | ErrorResponse
    | NoticeResponse
    | NegotiateProtocolVersion
)


def parse_backend_message(type_code: bytes, body: bytes) -> BackendMessage:
    """Parse one typed backend message of the kinds used during startup.

    Raises:
        RemoteProtocolError: an unknown type or a malformed body (08P01), or an
            authentication method ferryman cannot answer (0A000, naming the method).
    """
    if type_code == b"R":
        return _parse_authentication(body)
    if type_code == b"S":
        return ParameterStatus.parse(body)
    if type_code == b"K":
        return BackendKeyData.parse(body)
    if type_code == b"Z":
        return ReadyForQuery.parse(body)
    if type_code == b"E":
        return ErrorResponse.parse(body)
    if type_code == b"N":
        return NoticeResponse.parse(body)
    if type_code == b"v":
        return NegotiateProtocolVersion.parse(body)
    raise RemoteProtocolError(f"unexpected backend message type {type_code!r}")
