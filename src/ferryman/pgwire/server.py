"""ServerConnection: ferryman playing the PostgreSQL *server* to a client, up to the switch.

Owns: the whole server-side state machine for startup and authentication -- every
``_phase``/``_auth`` assignment is in this file (h11's "Rule 1") -- and the limits that keep a
hostile client cheap: startup packet size, one SSLRequest and one GSSENCRequest at most,
typed message size, total buffered bytes.

Must not: import asyncio, socket, ssl or selectors; decide policy (who may connect, which
auth method to ask for); or decide how to close. It parses, validates order, and encodes.

Theory of operation (PostgreSQL docs, "Message Flow" / "Start-up"):

1. STARTUP: untyped packets. SSLRequest and GSSENCRequest are answered with one byte and
   each may appear once (PostgreSQL's ``ProcessStartupPacket`` takes the same view: no second
   SSLRequest, no GSSENCRequest after TLS). CancelRequest ends the connection.
   StartupMessage moves to AUTHENTICATING. A StartupMessage asking for a newer minor version
   (3.2 from libpq 18) or carrying ``_pq_.*`` options must be answered with
   NegotiateProtocolVersion before anything else (PostgreSQL's ``ProcessStartupPacket`` sends
   it as soon as it has read the packet); the session then speaks 3.0.
2. TLS_PENDING: after we answer ``S``, *nothing* may be buffered or arrive until the TLS
   handshake is done. Bytes pipelined behind an SSLRequest were sent in clear text and must
   never be processed as if they came over TLS (CVE-2021-23214).
3. AUTHENTICATING: what a ``p`` message means depends on what we asked last (PasswordMessage
   after Cleartext/MD5, SASLInitialResponse after SASL, SASLResponse after SASLContinue), so
   the request we send decides how the next one is parsed. After AuthenticationOk we stop
   parsing the client's bytes: they are the session, and belong to the relay.
4. SWITCHED, after we send ReadyForQuery: the caller relays raw bytes, ``trailing_data`` first.
"""

from __future__ import annotations

import enum
from typing import Final, TypeAlias

from ferryman.errors import LocalProtocolError, RemoteProtocolError
from ferryman.pgwire._buffer import ReceiveBuffer
from ferryman.pgwire._events import NEED_DATA, ConnectionClosed, NeedData, Phase
from ferryman.pgwire._framing import MAX_STARTUP_PACKET, next_typed, next_untyped
from ferryman.pgwire.messages import (
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    BackendKeyData,
    CancelRequest,
    ErrorResponse,
    GSSENCRequest,
    GSSENCResponse,
    NegotiateProtocolVersion,
    NoticeResponse,
    ParameterStatus,
    PasswordMessage,
    ReadyForQuery,
    SASLInitialResponse,
    SASLResponse,
    SSLRequest,
    SSLResponse,
    StartupMessage,
    Terminate,
    parse_startup_packet,
)

DEFAULT_MAX_AUTH_MESSAGE: Final = 1 << 16
"""Default cap on a typed frontend message during auth; PostgreSQL itself caps password and
SASL packets at PG_MAX_AUTH_TOKEN_LENGTH = 65535 bytes (src/backend/libpq/auth.c)."""

READ_AHEAD_SLACK: Final = 1 << 18
"""Bytes allowed in the buffer beyond one maximal message, for the caller's read size."""

FrontendEvent: TypeAlias = (
    SSLRequest
    | GSSENCRequest
    | CancelRequest
    | StartupMessage
    | PasswordMessage
    | SASLInitialResponse
    | SASLResponse
    | Terminate
    | ConnectionClosed
)
"""What :meth:`ServerConnection.next_event` returns besides :data:`NEED_DATA`."""

ServerMessage: TypeAlias = (
    SSLResponse
    | GSSENCResponse
    | AuthenticationOk
    | AuthenticationCleartextPassword
    | AuthenticationMD5Password
    | AuthenticationSASL
    | AuthenticationSASLContinue
    | AuthenticationSASLFinal
    | NegotiateProtocolVersion
    | ParameterStatus
    | BackendKeyData
    | ReadyForQuery
    | ErrorResponse
    | NoticeResponse
)
"""What :meth:`ServerConnection.send` accepts."""


class _Auth(enum.Enum):
    """Sub-state of Phase.AUTHENTICATING."""

    NOT_STARTED = enum.auto()  # nothing sent yet; NegotiateProtocolVersion may go first
    AWAIT_PASSWORD = enum.auto()  # asked Cleartext/MD5; next 'p' is a PasswordMessage
    GOT_PASSWORD = enum.auto()  # caller checks it: AuthenticationOk or ErrorResponse
    AWAIT_SASL_INITIAL = enum.auto()  # sent AuthenticationSASL; next 'p' is SASLInitialResponse
    AWAIT_SASL_RESPONSE = enum.auto()  # sent SASLContinue; next 'p' is SASLResponse
    SASL_EXCHANGE = enum.auto()  # got a SASL message; caller sends SASLContinue or SASLFinal
    SASL_FINAL_SENT = enum.auto()  # server proof sent; AuthenticationOk next
    AUTH_OK_SENT = enum.auto()  # ParameterStatus/BackendKeyData/Notice, then ReadyForQuery


# (sub-state, message type we send) -> next sub-state. NoticeResponse, ErrorResponse and
# ReadyForQuery are handled in send() since they touch the phase, not just the sub-state.
_SEND_TRANSITIONS: Final[dict[tuple[_Auth, type], _Auth]] = {
    (_Auth.NOT_STARTED, NegotiateProtocolVersion): _Auth.NOT_STARTED,
    (_Auth.NOT_STARTED, AuthenticationOk): _Auth.AUTH_OK_SENT,
    (_Auth.NOT_STARTED, AuthenticationCleartextPassword): _Auth.AWAIT_PASSWORD,
    (_Auth.NOT_STARTED, AuthenticationMD5Password): _Auth.AWAIT_PASSWORD,
    (_Auth.NOT_STARTED, AuthenticationSASL): _Auth.AWAIT_SASL_INITIAL,
    (_Auth.GOT_PASSWORD, AuthenticationOk): _Auth.AUTH_OK_SENT,
    (_Auth.SASL_EXCHANGE, AuthenticationSASLContinue): _Auth.AWAIT_SASL_RESPONSE,
    (_Auth.SASL_EXCHANGE, AuthenticationSASLFinal): _Auth.SASL_FINAL_SENT,
    (_Auth.SASL_FINAL_SENT, AuthenticationOk): _Auth.AUTH_OK_SENT,
    (_Auth.AUTH_OK_SENT, ParameterStatus): _Auth.AUTH_OK_SENT,
    (_Auth.AUTH_OK_SENT, BackendKeyData): _Auth.AUTH_OK_SENT,
}

# Sub-state -> (how to parse the client's 'p', sub-state after it arrives). A sub-state not
# listed here reads nothing from the client.
_RECEIVE_TRANSITIONS: Final[
    dict[_Auth, tuple[type[PasswordMessage] | type[SASLInitialResponse] | type[SASLResponse], _Auth]]
] = {
    _Auth.AWAIT_PASSWORD: (PasswordMessage, _Auth.GOT_PASSWORD),
    _Auth.AWAIT_SASL_INITIAL: (SASLInitialResponse, _Auth.SASL_EXCHANGE),
    _Auth.AWAIT_SASL_RESPONSE: (SASLResponse, _Auth.SASL_EXCHANGE),
}


class _Answer(enum.Enum):
    NONE = enum.auto()
    SSL = enum.auto()
    GSS = enum.auto()


class ServerConnection:
    """Sans-I/O server side of the PostgreSQL v3 startup and authentication flow.

    Feed client bytes with :meth:`receive_data`, pull events with :meth:`next_event`, turn
    replies into bytes with :meth:`send`. After ReadyForQuery the phase is
    :attr:`Phase.SWITCHED` and the caller relays raw bytes, sending :attr:`trailing_data` on
    first.

    Args:
        max_startup_packet: cap on one startup-phase packet (PostgreSQL: 10,000).
        max_message: cap on one typed message's length word during authentication.
        max_buffer: cap on unparsed buffered bytes; defaults to one maximal message plus
            :data:`READ_AHEAD_SLACK`.
    """

    def __init__(
        self,
        *,
        max_startup_packet: int = MAX_STARTUP_PACKET,
        max_message: int = DEFAULT_MAX_AUTH_MESSAGE,
        max_buffer: int | None = None,
    ) -> None:
        if max_startup_packet < 8 or max_message < 4:
            raise ValueError("limits too small to carry any message")
        self._max_startup_packet = max_startup_packet
        self._max_message = max_message
        if max_buffer is None:
            max_buffer = max(max_startup_packet, max_message + 1) + READ_AHEAD_SLACK
        self._buf = ReceiveBuffer(max_buffer)
        self._eof = False
        self._phase = Phase.STARTUP
        self._auth = _Auth.NOT_STARTED
        self._answer_due = _Answer.NONE
        self._ssl_done = False
        self._gss_done = False
        self._negotiation_due = False
        """The client's StartupMessage needs a NegotiateProtocolVersion not sent yet."""
        self._negotiated = False

    # --- inspection ---------------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        """The current :class:`Phase`."""
        return self._phase

    @property
    def trailing_data(self) -> bytes:
        """Bytes received but not parsed.

        After the switch these are the first bytes of the session, to relay before reading
        more. In TLS_PENDING any byte here was sent in clear text behind the SSLRequest and
        the connection must be refused (CVE-2021-23214).
        """
        return self._buf.peek_all()

    @property
    def received_eof(self) -> bool:
        """True once ``receive_data(b"")`` has been called."""
        return self._eof

    # --- receiving ----------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the client; ``b""`` means the client closed (EOF).

        Raises:
            RemoteProtocolError: the buffer cap would be exceeded (phase becomes ERROR).
            LocalProtocolError: called after the switch (relay raw bytes instead) or with data
                after EOF.
        """
        if self._phase is Phase.SWITCHED:
            raise LocalProtocolError("the connection has switched; relay raw bytes instead")
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("received data after EOF")
        if self._phase in (Phase.CLOSED, Phase.ERROR):
            return  # nothing will read it: do not let it accumulate
        try:
            self._buf.feed(data)
        except RemoteProtocolError:
            self._phase = Phase.ERROR
            raise

    def next_event(self) -> FrontendEvent | NeedData:
        """Parse and return the next client event, or :data:`NEED_DATA`.

        Returns:
            A startup packet, an auth response, Terminate, :class:`ConnectionClosed` (clean EOF,
            also returned forever once CLOSED), or :data:`NEED_DATA`.

        Raises:
            RemoteProtocolError: the client broke the protocol; ``exc.sqlstate`` is the code to
                answer with. The phase becomes ERROR and every later call raises again.
            LocalProtocolError: called while an SSLRequest/GSSENCRequest is unanswered, or after
                the switch.

        Any other exception is a bug in this module.
        """
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
            return self._on_authenticating()
        except RemoteProtocolError:
            self._phase = Phase.ERROR
            raise

    def _need_data(self, *, partial_is_error: bool = True) -> ConnectionClosed | NeedData:
        if not self._eof:
            return NEED_DATA
        if self._buf and partial_is_error:
            raise RemoteProtocolError("connection closed by the client in the middle of a message")
        self._phase = Phase.CLOSED
        return ConnectionClosed()

    def _on_startup(self) -> FrontendEvent | NeedData:
        if self._answer_due is not _Answer.NONE:
            raise LocalProtocolError(f"answer the {self._answer_due.name} request with send() first")
        packet = next_untyped(self._buf, self._max_startup_packet)
        if packet is None:
            return self._need_data()
        event = parse_startup_packet(packet)
        match event:
            case SSLRequest():
                if self._ssl_done:
                    raise RemoteProtocolError("SSLRequest received after SSL negotiation was done")
                self._ssl_done = True
                self._answer_due = _Answer.SSL
            case GSSENCRequest():
                if self._gss_done:
                    raise RemoteProtocolError("GSSENCRequest received after encryption negotiation")
                self._gss_done = True
                self._answer_due = _Answer.GSS
            case CancelRequest():
                # The server closes a cancel connection without a reply (docs, "Canceling
                # Requests in Progress"); nothing after it is read.
                self._phase = Phase.CLOSED
            case StartupMessage():
                self._phase = Phase.AUTHENTICATING
                self._auth = _Auth.NOT_STARTED
                self._negotiation_due = event.negotiate() is not None
        return event

    def _on_tls_pending(self) -> ConnectionClosed | NeedData:
        if self._buf:
            # PostgreSQL's own wording for the same check (CVE-2021-23214).
            raise RemoteProtocolError("received unencrypted data after SSL request")
        return self._need_data()

    def _on_authenticating(self) -> FrontendEvent | NeedData:
        expected = _RECEIVE_TRANSITIONS.get(self._auth)
        if expected is None:
            # Not our turn to read: whatever the client sent (e.g. queries pipelined after
            # AuthenticationOk) stays buffered for trailing_data.
            return self._need_data(partial_is_error=False)
        frame = next_typed(self._buf, self._max_message)
        if frame is None:
            return self._need_data()
        type_code, body = frame
        if type_code == Terminate.TYPE:
            event: FrontendEvent = Terminate.parse(body)
            self._phase = Phase.CLOSED
            return event
        if type_code != PasswordMessage.TYPE:
            raise RemoteProtocolError(f"expected password response, got message type {type_code!r}")
        message_type, next_auth = expected
        event = message_type.parse(body)
        self._auth = next_auth
        return event

    def tls_established(self) -> None:
        """Tell the codec the TLS handshake finished; back to STARTUP for the StartupMessage.

        Raises:
            LocalProtocolError: the phase is not TLS_PENDING.
            RemoteProtocolError: clear-text bytes were buffered before the handshake
                (CVE-2021-23214); the phase becomes ERROR.
        """
        if self._phase is not Phase.TLS_PENDING:
            raise LocalProtocolError(f"tls_established() in phase {self._phase.name}")
        if self._buf:
            self._phase = Phase.ERROR
            raise RemoteProtocolError("received unencrypted data after SSL request")
        # PostgreSQL accepts no GSSENCRequest once TLS is up (ProcessStartupPacket).
        self._gss_done = True
        self._phase = Phase.STARTUP

    def tls_established_direct(self) -> None:
        """The client opened with TLS directly (PostgreSQL 17 ``sslnegotiation=direct``) and
        the handshake finished: no SSLRequest or GSSENCRequest may follow.

        Raises:
            LocalProtocolError: anything was already received or answered.
        """
        if self._phase is not Phase.STARTUP or self._buf or self._ssl_done or self._gss_done:
            raise LocalProtocolError("direct TLS is only possible before the first packet")
        self._ssl_done = True
        self._gss_done = True

    # --- sending ------------------------------------------------------------------------------

    def send(self, message: ServerMessage) -> bytes:
        """Validate ``message`` against the phase, update the state, and return its bytes.

        * SSLResponse/GSSENCResponse only right after the matching request; ``S`` moves to
          TLS_PENDING (check :attr:`trailing_data` before starting TLS).
        * Authentication requests, NegotiateProtocolVersion, ParameterStatus, BackendKeyData
          in the order of :data:`_SEND_TRANSITIONS`; ReadyForQuery after AuthenticationOk
          moves to SWITCHED. NegotiateProtocolVersion (``StartupMessage.negotiate()``) is
          required before the first authentication request when the StartupMessage asked for
          it, and refused otherwise.
        * NoticeResponse while AUTHENTICATING; ErrorResponse in any phase before the switch
          (including ERROR, to answer a RemoteProtocolError) -- it moves to CLOSED.

        Raises:
            LocalProtocolError: ``message`` is not legal now, or cannot be encoded. The state
                is left unchanged.
        """
        data = message.encode()
        phase = self._phase
        match message:
            case ErrorResponse():
                if phase in (Phase.CLOSED, Phase.SWITCHED):
                    raise LocalProtocolError(f"cannot send ErrorResponse in phase {phase.name}")
                # Every error before the switch ends the connection (docs, "Start-up").
                self._phase = Phase.CLOSED
            case SSLResponse(accept=accept):
                if phase is not Phase.STARTUP or self._answer_due is not _Answer.SSL:
                    raise LocalProtocolError("SSLResponse without a pending SSLRequest")
                self._answer_due = _Answer.NONE
                if accept:
                    self._phase = Phase.TLS_PENDING
            case GSSENCResponse(accept=accept):
                if phase is not Phase.STARTUP or self._answer_due is not _Answer.GSS:
                    raise LocalProtocolError("GSSENCResponse without a pending GSSENCRequest")
                if accept:
                    raise LocalProtocolError("GSSAPI encryption is not supported")
                self._answer_due = _Answer.NONE
            case NoticeResponse():
                if phase is not Phase.AUTHENTICATING:
                    raise LocalProtocolError(f"cannot send NoticeResponse in phase {phase.name}")
            case ReadyForQuery():
                if phase is not Phase.AUTHENTICATING or self._auth is not _Auth.AUTH_OK_SENT:
                    raise LocalProtocolError("ReadyForQuery before AuthenticationOk")
                self._phase = Phase.SWITCHED
            case NegotiateProtocolVersion() if not self._negotiation_due:
                # Sent once, and only when asked for: libpq 18 refuses one it did not provoke
                # ("server negotiated but asks for no changes").
                raise LocalProtocolError(
                    "NegotiateProtocolVersion was already sent"
                    if self._negotiated
                    else "NegotiateProtocolVersion without a newer version or _pq_ option to refuse"
                )
            case _:
                next_auth = _SEND_TRANSITIONS.get((self._auth, type(message)))
                if phase is not Phase.AUTHENTICATING or next_auth is None:
                    raise LocalProtocolError(
                        f"cannot send {type(message).__name__} in phase {phase.name} ({self._auth.name})"
                    )
                if isinstance(message, NegotiateProtocolVersion):
                    self._negotiation_due = False
                    self._negotiated = True
                elif self._negotiation_due:
                    # A client that asked for 3.2 and got AuthenticationOk believes 3.2 was
                    # accepted; the answer must come first (docs, "Protocol versions").
                    raise LocalProtocolError(
                        f"send NegotiateProtocolVersion before {type(message).__name__}: "
                        "the client asked for a newer protocol version or _pq_ options"
                    )
                self._auth = next_auth
        return data
