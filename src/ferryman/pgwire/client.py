"""ClientConnection: ferryman playing the PostgreSQL *client* to a backend, up to ReadyForQuery.

Owns: the client-side state machine for SSL negotiation, startup and authentication -- every
``_phase`` assignment is in this file -- collecting ParameterStatus and BackendKeyData, and
the error-consume state after an ErrorResponse.

Must not: import asyncio, socket, ssl or selectors; choose credentials or TLS policy; or decide
how a failed login is reported to our own client (the shell maps events and exceptions).

Flow (PostgreSQL docs, "Message Flow" / "Start-up"), driven by the caller:

1. Optionally ``send(SSLRequest())``; :meth:`ClientConnection.next_event` then yields the
   server's one-byte :class:`SSLResponse`. On ``S`` the phase is TLS_PENDING, and any further
   byte the server sent in clear text is refused: those bytes would otherwise be read as if
   they came over TLS (CVE-2021-23222). Start TLS, then call ``tls_established()``.
2. ``send(StartupMessage(...))``. Authentication requests are answered automatically by
   :class:`~ferryman.pgwire.auth.ClientAuthenticator`; the reply is queued, and the caller
   must write :meth:`data_to_send` after each event (as with h2's ``data_to_send``).
3. ParameterStatus, BackendKeyData and NoticeResponse are returned as events (and collected);
   ReadyForQuery moves the phase to SWITCHED.

Error-consume (asyncpg's ``PROTOCOL_ERROR_CONSUME``): an ErrorResponse during startup ends the
login. It is returned once (and kept in :attr:`ClientConnection.error`); afterwards the codec
discards whatever the backend still sends until ReadyForQuery or EOF, and then reports
:class:`ConnectionClosed`. PostgreSQL itself closes after a startup error, so in practice the
state only swallows a trailing NoticeResponse.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, TypeAlias

from ferryman.errors import BackendAuthFailed, LocalProtocolError, RemoteProtocolError
from ferryman.pgwire._buffer import ReceiveBuffer
from ferryman.pgwire._events import NEED_DATA, ConnectionClosed, NeedData, Phase
from ferryman.pgwire._framing import PROTOCOL_3_0, next_typed
from ferryman.pgwire.auth import ClientAuthenticator
from ferryman.pgwire.messages import (
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    BackendKeyData,
    BackendMessage,
    CancelRequest,
    ErrorResponse,
    NegotiateProtocolVersion,
    NoticeResponse,
    ParameterStatus,
    ReadyForQuery,
    SSLRequest,
    SSLResponse,
    StartupMessage,
    Terminate,
    parse_backend_message,
)

DEFAULT_MAX_BACKEND_MESSAGE: Final = 1 << 20
"""Default cap on one backend message during startup; real ones are a few hundred bytes."""

READ_AHEAD_SLACK: Final = 1 << 18

BackendEvent: TypeAlias = BackendMessage | SSLResponse | ConnectionClosed
"""What :meth:`ClientConnection.next_event` returns besides :data:`NEED_DATA`."""

ClientMessage: TypeAlias = SSLRequest | StartupMessage | CancelRequest | Terminate
"""What :meth:`ClientConnection.send` accepts; auth replies are produced internally."""

_BEFORE_AUTH_OK: Final = frozenset({b"R", b"E", b"N", b"v"})
_AFTER_AUTH_OK: Final = frozenset({b"S", b"K", b"N", b"E", b"Z"})


class ClientConnection:
    """Sans-I/O client side of the PostgreSQL v3 startup and authentication flow.

    Args:
        password: the password for cleartext/MD5/SCRAM-SHA-256, or ``None`` (trust only).
        max_message: cap on one backend message's length word.
        max_buffer: cap on unparsed buffered bytes; defaults to one maximal message plus
            256 KiB.

    To cancel a backend query, open a new connection and write
    ``ClientConnection().send(CancelRequest(pid, key))`` (or just ``CancelRequest(...).encode()``).
    """

    def __init__(
        self,
        *,
        password: str | None = None,
        max_message: int = DEFAULT_MAX_BACKEND_MESSAGE,
        max_buffer: int | None = None,
    ) -> None:
        if max_message < 4:
            raise ValueError("max_message too small to carry any message")
        self._password = password
        self._max_message = max_message
        self._buf = ReceiveBuffer(
            max_buffer if max_buffer is not None else max_message + 1 + READ_AHEAD_SLACK
        )
        self._eof = False
        self._phase = Phase.STARTUP
        self._ssl_awaiting_answer = False
        self._ssl_done = False
        self._auth: ClientAuthenticator | None = None
        self._outbox = bytearray()
        self._error: ErrorResponse | None = None
        self._parameters: dict[str, str] = {}
        self._key: BackendKeyData | None = None
        self._transaction_status: str | None = None

    # --- inspection ---------------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        """The current :class:`Phase` (SWITCHED once ReadyForQuery arrived)."""
        return self._phase

    @property
    def trailing_data(self) -> bytes:
        """Backend bytes received but not parsed (after the switch: the session's first bytes)."""
        return self._buf.peek_all()

    @property
    def server_parameters(self) -> Mapping[str, str]:
        """Every ParameterStatus so far, name -> latest value (read-only view)."""
        return MappingProxyType(self._parameters)

    @property
    def backend_key_data(self) -> BackendKeyData | None:
        """The backend's cancel key, once BackendKeyData arrived."""
        return self._key

    @property
    def transaction_status(self) -> str | None:
        """``I``/``T``/``E`` from ReadyForQuery, or ``None`` before it."""
        return self._transaction_status

    @property
    def auth_method(self) -> str | None:
        """The method the backend chose ("trust", "password", "md5", "scram-sha-256")."""
        return None if self._auth is None else self._auth.method

    @property
    def error(self) -> ErrorResponse | None:
        """The ErrorResponse that ended the login, if any."""
        return self._error

    # --- sending ------------------------------------------------------------------------------

    def send(self, message: ClientMessage) -> bytes:
        """Validate ``message`` against the phase, update the state, and return its bytes.

        * SSLRequest: once, in STARTUP, before the StartupMessage.
        * StartupMessage: in STARTUP (not while an SSL answer is pending); protocol 3.0 and a
          ``user`` parameter are required. Moves to AUTHENTICATING.
        * CancelRequest: instead of a StartupMessage on a fresh connection; moves to CLOSED.
        * Terminate: any time before the switch; moves to CLOSED.

        Raises:
            LocalProtocolError: ``message`` is not legal now or cannot be encoded.
        """
        data = message.encode()
        phase = self._phase
        match message:
            case SSLRequest():
                if phase is not Phase.STARTUP or self._ssl_awaiting_answer or self._ssl_done:
                    raise LocalProtocolError("SSLRequest is sent once, before the StartupMessage")
                self._ssl_awaiting_answer = True
            case StartupMessage():
                if phase is not Phase.STARTUP or self._ssl_awaiting_answer:
                    raise LocalProtocolError(f"cannot send StartupMessage in phase {phase.name}")
                if message.protocol_version != PROTOCOL_3_0:
                    raise LocalProtocolError("ClientConnection speaks protocol 3.0 only")
                user = message.user
                if not user:
                    raise LocalProtocolError("the StartupMessage needs a user parameter")
                self._auth = ClientAuthenticator(user, self._password)
                self._phase = Phase.AUTHENTICATING
            case CancelRequest():
                if phase is not Phase.STARTUP or self._ssl_awaiting_answer:
                    raise LocalProtocolError(f"cannot send CancelRequest in phase {phase.name}")
                self._phase = Phase.CLOSED
            case Terminate():
                if phase is Phase.SWITCHED:
                    raise LocalProtocolError("the connection has switched; relay raw bytes instead")
                self._phase = Phase.CLOSED
        return data

    def data_to_send(self) -> bytes:
        """Return and clear the queued authentication replies; write them to the backend."""
        out = bytes(self._outbox)
        self._outbox.clear()
        return out

    # --- receiving ----------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the backend; ``b""`` means the backend closed (EOF).

        Raises:
            RemoteProtocolError: the buffer cap would be exceeded (phase becomes ERROR).
            LocalProtocolError: called after the switch, or with data after EOF.
        """
        if self._phase is Phase.SWITCHED:
            raise LocalProtocolError("the connection has switched; relay raw bytes instead")
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("received data after EOF")
        if self._phase in (Phase.CLOSED, Phase.ERROR):
            return
        try:
            self._buf.feed(data)
        except RemoteProtocolError:
            self._phase = Phase.ERROR
            raise

    def tls_established(self) -> None:
        """Tell the codec the TLS handshake with the backend finished; back to STARTUP.

        Raises:
            LocalProtocolError: the phase is not TLS_PENDING.
            RemoteProtocolError: clear-text bytes were buffered before the handshake
                (CVE-2021-23222); the phase becomes ERROR.
        """
        if self._phase is not Phase.TLS_PENDING:
            raise LocalProtocolError(f"tls_established() in phase {self._phase.name}")
        if self._buf:
            self._phase = Phase.ERROR
            raise RemoteProtocolError("received unencrypted data after SSL response")
        self._phase = Phase.STARTUP

    def next_event(self) -> BackendEvent | NeedData:
        """Parse and return the next backend event, or :data:`NEED_DATA`.

        Returns:
            SSLResponse, an Authentication* request (its answer is queued for
            :meth:`data_to_send`), ParameterStatus, BackendKeyData, NoticeResponse,
            NegotiateProtocolVersion, ErrorResponse (the login failed), ReadyForQuery (phase
            SWITCHED), :class:`ConnectionClosed`, or :data:`NEED_DATA`.

        Raises:
            RemoteProtocolError: the backend broke the protocol (phase ERROR for good), or asked
                for an authentication method we do not support (sqlstate 0A000).
            BackendAuthFailed: the backend's SCRAM proof was wrong or skipped, or it asked for a
                password and none was given (phase ERROR).
            LocalProtocolError: :meth:`data_to_send` was not drained, or called after the switch.

        Any other exception is a bug in this module.
        """
        if self._outbox:
            raise LocalProtocolError("write data_to_send() before reading the next event")
        if self._phase is Phase.ERROR:
            raise RemoteProtocolError("cannot read from a connection in the ERROR phase")
        if self._phase is Phase.SWITCHED:
            raise LocalProtocolError("the connection has switched; relay raw bytes instead")
        if self._phase is Phase.CLOSED:
            return ConnectionClosed()
        try:
            if self._phase is Phase.STARTUP:
                return self._on_startup()
            if self._phase is Phase.TLS_PENDING:
                return self._on_tls_pending()
            if self._error is not None:
                return self._on_error_consume()
            return self._on_authenticating()
        except (RemoteProtocolError, BackendAuthFailed):
            self._phase = Phase.ERROR
            raise

    def _need_data(self) -> ConnectionClosed | NeedData:
        if not self._eof:
            return NEED_DATA
        if self._buf:
            raise RemoteProtocolError("connection closed by the server in the middle of a message")
        self._phase = Phase.CLOSED
        return ConnectionClosed()

    def _on_startup(self) -> BackendEvent | NeedData:
        if not self._ssl_awaiting_answer:
            if self._buf:
                raise RemoteProtocolError("the server sent data before the startup packet")
            return self._need_data()
        if not self._buf:
            return self._need_data()
        answer = self._buf.consume(1)
        if answer not in (b"S", b"N"):
            if answer == b"E":
                raise RemoteProtocolError("the server does not support SSL: it answered with an error")
            raise RemoteProtocolError(f"received invalid response to SSL negotiation: {answer!r}")
        # Nothing may follow the answer before we speak again: after S it would be clear text
        # processed as if encrypted (CVE-2021-23222), after N it is unsolicited.
        if self._buf:
            raise RemoteProtocolError("received unencrypted data after SSL response")
        self._ssl_awaiting_answer = False
        self._ssl_done = True
        if answer == b"S":
            self._phase = Phase.TLS_PENDING
            return SSLResponse(True)
        return SSLResponse(False)

    def _on_tls_pending(self) -> ConnectionClosed | NeedData:
        if self._buf:
            raise RemoteProtocolError("received unencrypted data after SSL response")
        return self._need_data()

    def _on_error_consume(self) -> ConnectionClosed | NeedData:
        while (frame := next_typed(self._buf, self._max_message)) is not None:
            if frame[0] == ReadyForQuery.TYPE:
                self._phase = Phase.CLOSED
                return ConnectionClosed()
        if self._eof:
            self._phase = Phase.CLOSED
            return ConnectionClosed()
        return NEED_DATA

    def _on_authenticating(self) -> BackendEvent | NeedData:
        auth = self._auth
        assert auth is not None  # set together with Phase.AUTHENTICATING
        frame = next_typed(self._buf, self._max_message)
        if frame is None:
            return self._need_data()
        type_code, body = frame
        allowed = _AFTER_AUTH_OK if auth.done else _BEFORE_AUTH_OK
        if type_code not in allowed:
            raise RemoteProtocolError(f"unexpected message type {type_code!r} during startup")
        event = parse_backend_message(type_code, body)
        match event:
            case (
                AuthenticationOk()
                | AuthenticationCleartextPassword()
                | AuthenticationMD5Password()
                | AuthenticationSASL()
                | AuthenticationSASLContinue()
                | AuthenticationSASLFinal()
            ):
                reply = auth.step(event)
                if reply is not None:
                    self._outbox += reply.encode()
            case ParameterStatus(name=name, value=value):
                self._parameters[name] = value
            case BackendKeyData(secret_key=key):
                if self._key is not None:
                    raise RemoteProtocolError("BackendKeyData received twice")
                # We asked for protocol 3.0, where the key is exactly 4 bytes (docs; libpq
                # enforces the same since PostgreSQL 18).
                if len(key) != 4:
                    raise RemoteProtocolError(f"BackendKeyData key of {len(key)} bytes in protocol 3.0")
                self._key = event
            case ReadyForQuery(transaction_status=status):
                self._transaction_status = status
                self._phase = Phase.SWITCHED
            case ErrorResponse():
                self._error = event
            case NoticeResponse() | NegotiateProtocolVersion():
                pass
        return event
