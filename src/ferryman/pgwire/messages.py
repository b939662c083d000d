"""PostgreSQL v3 messages that ferryman parses or emits, named as in the PostgreSQL docs.

Owns: the public face of the message layer. Each message is a frozen, slotted dataclass
("Message Formats" chapter of the PostgreSQL docs) with ``encode() -> bytes`` and a
``parse(body)`` classmethod; :func:`parse_startup_packet` and :func:`parse_backend_message`
dispatch on the wire code. The classes live in ``_frontend.py``, ``_backend.py`` and
``_notice.py`` to keep each module short; import them from here.

Must not: decide which message is legal when (``server.py`` / ``client.py`` do), or do I/O.

Conventions:

* ``parse(body)`` takes the body after the header (after ``Byte1 type + Int32 length`` for
  typed messages, after ``Int32 length + Int32 code`` for startup packets) and raises only
  :class:`~ferryman.errors.RemoteProtocolError`.
* ``encode()`` returns the whole frame and raises only
  :class:`~ferryman.errors.LocalProtocolError`.
* Strings decode as UTF-8 with ``surrogateescape`` and re-encode byte-identically: the
  server encoding is unknown during startup, and a client's start-up parameters are in its
  own encoding (PostgreSQL accepts a LATIN1 ``application_name``). Whoever matches a name
  against grants or puts it in SQL checks :func:`is_utf8` first.
* Messages that carry secrets redact them in ``repr`` (STYLE 2.5: logs never hold passwords,
  cancel keys or SCRAM exchanges).
"""

from __future__ import annotations

from ferryman.pgwire._backend import (
    AUTH_CLEARTEXT_PASSWORD,
    AUTH_MD5_PASSWORD,
    AUTH_OK,
    AUTH_SASL,
    AUTH_SASL_CONTINUE,
    AUTH_SASL_FINAL,
    UNSUPPORTED_AUTH_METHODS,
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationRequest,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    BackendKeyData,
    BackendMessage,
    GSSENCResponse,
    NegotiateProtocolVersion,
    ParameterStatus,
    ReadyForQuery,
    SSLResponse,
    parse_backend_message,
)
from ferryman.pgwire._framing import is_utf8
from ferryman.pgwire._frontend import (
    CancelRequest,
    GSSENCRequest,
    PasswordMessage,
    Query,
    SASLInitialResponse,
    SASLResponse,
    SSLRequest,
    StartupMessage,
    StartupPacket,
    Terminate,
    parse_startup_packet,
)
from ferryman.pgwire._notice import FIELD_CODES, ErrorResponse, NoticeResponse

__all__ = [
    "AUTH_CLEARTEXT_PASSWORD",
    "AUTH_MD5_PASSWORD",
    "AUTH_OK",
    "AUTH_SASL",
    "AUTH_SASL_CONTINUE",
    "AUTH_SASL_FINAL",
    "FIELD_CODES",
    "UNSUPPORTED_AUTH_METHODS",
    "AuthenticationCleartextPassword",
    "AuthenticationMD5Password",
    "AuthenticationOk",
    "AuthenticationRequest",
    "AuthenticationSASL",
    "AuthenticationSASLContinue",
    "AuthenticationSASLFinal",
    "BackendKeyData",
    "BackendMessage",
    "CancelRequest",
    "ErrorResponse",
    "GSSENCRequest",
    "GSSENCResponse",
    "NegotiateProtocolVersion",
    "NoticeResponse",
    "ParameterStatus",
    "PasswordMessage",
    "Query",
    "ReadyForQuery",
    "SASLInitialResponse",
    "SASLResponse",
    "SSLRequest",
    "SSLResponse",
    "StartupMessage",
    "StartupPacket",
    "Terminate",
    "is_utf8",
    "parse_backend_message",
    "parse_startup_packet",
]
