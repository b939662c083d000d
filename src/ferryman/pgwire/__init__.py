"""Sans-I/O PostgreSQL v3 wire codec, for both ends of the gateway.

A PostgreSQL frontend/backend protocol implementation for the startup and authentication
phases, containing no networking code at all: bytes go in through ``receive_data``, events
come out of ``next_event``, and ``send`` turns messages into bytes for the caller to write
(h11's verbs). Once ReadyForQuery has been exchanged the codec steps aside and the caller
relays raw bytes, starting with ``trailing_data``.

For backend-session reuse, :class:`SessionTracker` follows the message boundaries of a relayed
session (without parsing bodies) to know when it is idle, and :class:`ResetExchange` runs the
``DISCARD ALL`` that cleans a session before another connection of the same role gets it.

* :class:`ServerConnection` -- we play the server to PostgreSQL clients.
* :class:`ClientConnection` -- we play the client to the backend.
* ``messages`` -- one dataclass per message, named as in the PostgreSQL docs.
* ``auth`` -- password exchanges (cleartext, MD5, SCRAM-SHA-256 via scramp).
* ``sqlstate`` -- the SQLSTATE codes ferryman emits.

Must not: import asyncio, socket, ssl, selectors or ``ferryman.proxy`` (a test walks the
source to enforce it). Imports: the standard library, ``ferryman.errors`` and ``scramp``.
"""

from ferryman.errors import BackendAuthFailed, LocalProtocolError, RemoteProtocolError
from ferryman.pgwire import auth, sqlstate
from ferryman.pgwire._events import NEED_DATA, ConnectionClosed, NeedData, Phase
from ferryman.pgwire._framing import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    MAX_STARTUP_PACKET,
    PROTOCOL_3_0,
    PROTOCOL_3_2,
    SSL_REQUEST_CODE,
)
from ferryman.pgwire.client import BackendEvent, ClientConnection, ClientMessage
from ferryman.pgwire.messages import (
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationRequest,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    BackendKeyData,
    BackendMessage,
    CancelRequest,
    ErrorResponse,
    GSSENCRequest,
    GSSENCResponse,
    NegotiateProtocolVersion,
    NoticeResponse,
    ParameterStatus,
    PasswordMessage,
    Query,
    ReadyForQuery,
    SASLInitialResponse,
    SASLResponse,
    SSLRequest,
    SSLResponse,
    StartupMessage,
    StartupPacket,
    Terminate,
    is_utf8,
    parse_backend_message,
    parse_startup_packet,
)
from ferryman.pgwire.reuse import ResetExchange, SessionTracker
from ferryman.pgwire.server import FrontendEvent, ServerConnection, ServerMessage

__all__ = [
    "CANCEL_REQUEST_CODE",
    "GSSENC_REQUEST_CODE",
    "MAX_STARTUP_PACKET",
    "NEED_DATA",
    "PROTOCOL_3_0",
    "PROTOCOL_3_2",
    "SSL_REQUEST_CODE",
    "AuthenticationCleartextPassword",
    "AuthenticationMD5Password",
    "AuthenticationOk",
    "AuthenticationRequest",
    "AuthenticationSASL",
    "AuthenticationSASLContinue",
    "AuthenticationSASLFinal",
    "BackendAuthFailed",
    "BackendEvent",
    "BackendKeyData",
    "BackendMessage",
    "CancelRequest",
    "ClientConnection",
    "ClientMessage",
    "ConnectionClosed",
    "ErrorResponse",
    "FrontendEvent",
    "GSSENCRequest",
    "GSSENCResponse",
    "LocalProtocolError",
    "NeedData",
    "NegotiateProtocolVersion",
    "NoticeResponse",
    "ParameterStatus",
    "PasswordMessage",
    "Phase",
    "Query",
    "ReadyForQuery",
    "RemoteProtocolError",
    "ResetExchange",
    "SASLInitialResponse",
    "SASLResponse",
    "SSLRequest",
    "SSLResponse",
    "ServerConnection",
    "ServerMessage",
    "SessionTracker",
    "StartupMessage",
    "StartupPacket",
    "Terminate",
    "auth",
    "is_utf8",
    "parse_backend_message",
    "parse_startup_packet",
    "sqlstate",
]
