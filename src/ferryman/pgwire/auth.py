"""Password authentication exchanges, as sans-I/O step objects.

Owns: the client half of backend logins -- cleartext, MD5 and SCRAM-SHA-256 (wrapping the
``scramp`` library, itself message-in/message-out) -- as :class:`ClientAuthenticator`, which
:class:`~ferryman.pgwire.ClientConnection` drives; and two small server-side checks for a
shell that wants to ask a client for a password.

Must not: do I/O, log, or keep secrets around longer than the exchange needs. Nothing here
formats a password or a SCRAM message into an exception text.

Server-side SCRAM is deliberately absent: libpq sends an empty user name in
client-first-message (PostgreSQL docs, "SCRAM-SHA-256 Authentication": the server ignores it)
and scramp's server side rejects an empty user name, so it cannot serve real clients.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import hmac
from typing import Any, Final, TypeAlias

import scramp  # type: ignore[import-untyped]
import scramp.core  # type: ignore[import-untyped]

from ferryman.errors import BackendAuthFailed, RemoteProtocolError
from ferryman.pgwire import sqlstate
from ferryman.pgwire.messages import (
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationRequest,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    PasswordMessage,
    SASLInitialResponse,
    SASLResponse,
)

SCRAM_SHA_256: Final = "SCRAM-SHA-256"
SCRAM_SHA_256_PLUS: Final = "SCRAM-SHA-256-PLUS"

AuthReply: TypeAlias = PasswordMessage | SASLInitialResponse | SASLResponse
"""What the client sends back to an authentication request."""


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    """Return the PasswordMessage payload for AuthenticationMD5Password.

    PostgreSQL docs, "Password Authentication":
    ``"md5" + md5(md5(password + user).hexdigest() + salt).hexdigest()``.
    """
    # usedforsecurity=False: MD5 here is the protocol's choice, not ours; FIPS builds of
    # OpenSSL would otherwise refuse to compute it.
    inner = hashlib.md5(password.encode() + user.encode(), usedforsecurity=False).hexdigest()
    outer = hashlib.md5(inner.encode("ascii") + salt, usedforsecurity=False).hexdigest()
    return b"md5" + outer.encode("ascii")


def verify_cleartext_password(message: PasswordMessage, expected: str) -> bool:
    """Server side: does ``message`` (answering AuthenticationCleartextPassword) match? Constant time."""
    return hmac.compare_digest(message.password, expected.encode())


def verify_md5_password(message: PasswordMessage, user: str, expected: str, salt: bytes) -> bool:
    """Server side: does ``message`` answer AuthenticationMD5Password(``salt``) correctly? Constant time."""
    return hmac.compare_digest(message.password, md5_password(user, expected, salt))


# The key derivation of SCRAM (PBKDF2, 4096 rounds by default: 5-12 ms of CPU here) depends only
# on the password, the salt and the iteration count. The gateway logs in as the same role, with
# the same password and the same stored salt, over and over: memoise the salted password in a
# bounded cache instead of paying PBKDF2 per connection. scramp still runs the whole exchange,
# including the server-signature check; only its ``hi`` is cached. (Salted passwords are
# password-equivalent; the cache lives in the same process that holds the passwords.)
_scramp_hi = scramp.core.hi


@functools.lru_cache(maxsize=1024)
def _cached_hi(hf: Any, password: bytes, salt: bytes, iterations: int) -> bytes:
    return bytes(_scramp_hi(hf, password, salt, iterations))


def _hi(hf: Any, password: Any, salt: Any, iterations: Any) -> bytes:
    # scramp passes an IterationCount object; the cache needs plain, hashable values.
    return _cached_hi(hf, bytes(password), bytes(salt), int(iterations))


scramp.core.hi = _hi


class ScramSHA256Client:
    """Client side of one SCRAM-SHA-256 exchange (RFC 5802 / RFC 7677), without channel binding.

    We send GS2 flag ``n`` ("client does not support channel binding"): ferryman offers plain
    SCRAM-SHA-256 even when the backend also lists ``-PLUS``, which PostgreSQL accepts.
    Every failure raises :class:`BackendAuthFailed`: a backend that cannot finish SCRAM, or
    whose proof does not verify, has not authenticated itself and we must not log in.
    """

    def __init__(self, user: str, password: str, *, nonce: str | None = None) -> None:
        """Prepare the exchange; ``nonce`` fixes the client nonce (tests only).

        Raises:
            BackendAuthFailed: the password cannot be used with SCRAM (SASLprep rejects it).
        """
        try:
            self._client: Any = scramp.ScramClient([SCRAM_SHA_256], user, password, c_nonce=nonce)
        except scramp.ScramException:
            # PostgreSQL ignores the SCRAM user name (it uses the startup packet's), so a name
            # that SASLprep rejects can be replaced; a rejected password cannot.
            try:
                self._client = scramp.ScramClient([SCRAM_SHA_256], "*", password, c_nonce=nonce)
            except scramp.ScramException:
                raise BackendAuthFailed("the backend password cannot be used with SCRAM (SASLprep)") from None

    def initial_response(self) -> SASLInitialResponse:
        """Return the SASLInitialResponse carrying client-first-message."""
        first: str = self._client.get_client_first()
        return SASLInitialResponse(SCRAM_SHA_256, first.encode())

    def continue_(self, server_first: bytes) -> SASLResponse:
        """Consume server-first-message; return the SASLResponse carrying client-final-message.

        Raises:
            BackendAuthFailed: server-first is malformed, carries an error, or does not extend
                our nonce.
        """
        try:
            self._client.set_server_first(server_first.decode("utf-8"))
            final: str = self._client.get_client_final()
        except (scramp.ScramException, UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:
            raise BackendAuthFailed(
                f"backend SCRAM server-first-message rejected: {_scram_reason(exc)}"
            ) from None
        return SASLResponse(final.encode())

    def finish(self, server_final: bytes) -> None:
        """Verify server-final-message (the server's signature).

        Raises:
            BackendAuthFailed: the signature does not match, or the server sent an error.
        """
        try:
            self._client.set_server_final(server_final.decode("utf-8"))
        except (scramp.ScramException, UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:
            raise BackendAuthFailed(f"backend SCRAM proof rejected: {_scram_reason(exc)}") from None


def _scram_reason(exc: Exception) -> str:
    # scramp's messages describe the protocol step, never key material; other exception
    # types may quote input, so only their type name is kept.
    if isinstance(exc, scramp.ScramException) and exc.args:
        reason = str(exc.args[0])
        server_error = getattr(exc, "server_error", None)
        # e.g. "unknown-user" from a server-first "e=" attribute; "other-error" adds nothing.
        if server_error is not None and server_error.value != "other-error":
            reason += f" ({server_error.value})"
        return reason
    return type(exc).__name__


class _Step(enum.Enum):
    IDLE = enum.auto()  # no request seen yet
    AWAIT_RESULT = enum.auto()  # password sent; expect AuthenticationOk
    SASL_CONTINUE = enum.auto()  # SASLInitialResponse sent; expect SASLContinue
    SASL_FINAL = enum.auto()  # SASLResponse sent; expect SASLFinal
    SASL_DONE = enum.auto()  # server proof verified; expect AuthenticationOk
    DONE = enum.auto()  # AuthenticationOk seen


class ClientAuthenticator:
    """Answers one backend's authentication requests, in order, for one login.

    Feed each Authentication* message to :meth:`step`; it returns the reply to send, or
    ``None`` when there is nothing to send. The order is enforced, so a backend cannot skip
    its SCRAM proof and claim success (PostgreSQL docs, "SASL Authentication": the
    AuthenticationSASLFinal message comes before AuthenticationOk).
    """

    def __init__(self, user: str, password: str | None, *, scram_nonce: str | None = None) -> None:
        self._user = user
        self._password = password
        self._scram_nonce = scram_nonce
        self._scram: ScramSHA256Client | None = None
        self._step = _Step.IDLE
        self.method: str | None = None
        """The method the backend chose: "trust", "password", "md5" or "scram-sha-256"."""

    @property
    def done(self) -> bool:
        """True once AuthenticationOk has been accepted."""
        return self._step is _Step.DONE

    def _need_password(self, method: str) -> str:
        if self._password is None:
            raise BackendAuthFailed(f"the backend requested {method} authentication but no password is set")
        return self._password

    def step(self, request: AuthenticationRequest) -> AuthReply | None:
        """Answer ``request``.

        Returns:
            The message to send back, or ``None`` (AuthenticationOk, AuthenticationSASLFinal).

        Raises:
            RemoteProtocolError: the request is out of order (08P01), or SASL offers no
                mechanism we use (0A000, naming what was offered).
            BackendAuthFailed: the backend's SCRAM proof is wrong or missing, or it wants a
                password and none is set.
        """
        step = self._step
        match request:
            case AuthenticationOk():
                if step in (_Step.SASL_CONTINUE, _Step.SASL_FINAL):
                    raise BackendAuthFailed("the backend reported success without completing SCRAM")
                if step not in (_Step.IDLE, _Step.AWAIT_RESULT, _Step.SASL_DONE):
                    raise RemoteProtocolError("unexpected AuthenticationOk")
                if step is _Step.IDLE:
                    self.method = "trust"
                self._step = _Step.DONE
                return None
            case AuthenticationCleartextPassword() if step is _Step.IDLE:
                self.method = "password"
                self._step = _Step.AWAIT_RESULT
                return PasswordMessage(self._need_password("password").encode())
            case AuthenticationMD5Password(salt=salt) if step is _Step.IDLE:
                self.method = "md5"
                self._step = _Step.AWAIT_RESULT
                return PasswordMessage(md5_password(self._user, self._need_password("md5"), salt))
            case AuthenticationSASL(mechanisms=mechanisms) if step is _Step.IDLE:
                if SCRAM_SHA_256 not in mechanisms:
                    raise RemoteProtocolError(
                        f"the backend offered SASL mechanisms {list(mechanisms)!r}; ferryman supports "
                        f"{SCRAM_SHA_256} only (no channel binding)",
                        sqlstate=sqlstate.FEATURE_NOT_SUPPORTED,
                    )
                self.method = "scram-sha-256"
                self._scram = ScramSHA256Client(
                    self._user, self._need_password("SCRAM-SHA-256"), nonce=self._scram_nonce
                )
                self._step = _Step.SASL_CONTINUE
                return self._scram.initial_response()
            case AuthenticationSASLContinue(data=data) if step is _Step.SASL_CONTINUE:
                assert self._scram is not None
                reply = self._scram.continue_(data)
                self._step = _Step.SASL_FINAL
                return reply
            case AuthenticationSASLFinal(data=data) if step is _Step.SASL_FINAL:
                assert self._scram is not None
                self._scram.finish(data)
                self._scram = None
                self._step = _Step.SASL_DONE
                return None
            case _:
                raise RemoteProtocolError(f"unexpected {type(request).__name__} during authentication")
