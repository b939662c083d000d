"""Errors of the Tailscale LocalAPI client.

Owns: the exception types :mod:`ferryman.tailscale` raises, each carrying what went wrong as
attributes (socket path, HTTP status, body) so callers can phrase their own reasons.

Must not: decide what a failure means for a connection. The identity source turns these into
:class:`ferryman.errors.IdentityUnavailable` (fail closed); a dialler maps
:class:`DialRefused` (a :class:`ferryman.errors.BackendUnavailable`) to its protocol's answer.

Kinds follow ``client/local/local.go``: a transport failure (``doLocalRequestNiceError``'s
"Failed to connect to local Tailscale daemon"), a non-expected status
(``httpStatusError``, with ``AccessDeniedError`` for 403 and ``ErrPeerNotFound`` for a WhoIs
404), and an undecodable answer (``decodeJSON``'s "failed to unmarshal JSON").
"""

from __future__ import annotations

import json

from ferryman.errors import BackendUnavailable, FerrymanError


class TailscaleError(FerrymanError):
    """Base for every LocalAPI failure."""

    kind = "tailscale"

    def __init__(self, message: str, *, socket_path: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.socket_path = socket_path


class LocalAPIUnreachable(TailscaleError):
    """The socket could not be connected (missing, refused, permission denied)."""

    def __init__(self, socket_path: str, cause: OSError) -> None:
        detail = cause.strerror or str(cause) or type(cause).__name__
        super().__init__(f"tailscaled unreachable at {socket_path}: {detail}", socket_path=socket_path)
        self.cause = cause
        self.detail = detail


class LocalAPITimeout(TailscaleError):
    """No complete answer within the call's timeout (connect + request + response)."""

    def __init__(self, socket_path: str, operation: str, timeout: float) -> None:
        super().__init__(
            f"no answer from tailscaled at {socket_path} within {timeout:g}s ({operation})",
            socket_path=socket_path,
        )
        self.operation = operation
        self.timeout = timeout


class LocalAPIProtocolError(TailscaleError):
    """The answer was not valid HTTP/1.1, was cut short, or its body could not be decoded."""


def error_message_from_body(body: bytes) -> str:
    """The human message of an error body: ``{"error": ...}`` JSON, else the trimmed text.

    Follows ``errorMessageFromBody`` in ``client/local/local.go`` (whose ``errorJSON`` has one
    field ``Error``; Go's decoder matches keys case-insensitively, so ``error`` works too).
    """
    try:
        decoded = json.loads(body)
    except ValueError:
        decoded = None
    if isinstance(decoded, dict):
        for key, value in decoded.items():
            if key.lower() == "error" and isinstance(value, str) and value:
                return value
    return body.decode("utf-8", "replace").strip()


class LocalAPIError(TailscaleError):
    """tailscaled answered with a status the call did not want.

    ``status`` and ``reason`` are the HTTP status line, ``body`` the raw body (bounded),
    ``error`` the human message extracted from it, ``path`` the request target.
    """

    kind = "tailscale_status"

    def __init__(
        self,
        status: int,
        reason: str,
        body: bytes,
        *,
        path: str,
        socket_path: str = "",
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.status = status
        self.reason = reason
        self.body = body
        self.error = error_message_from_body(body)
        self.path = path
        self.headers = headers
        status_text = f"{status} {reason}".strip()
        super().__init__(
            f"tailscaled answered {status_text} to {path.split('?', 1)[0]}: {self.error or '(empty body)'}",
            socket_path=socket_path,
        )


class PeerNotFound(LocalAPIError):
    """WhoIs answered 404: tailscaled knows no peer at that address (Go ``ErrPeerNotFound``)."""


class LocalAPIAccessDenied(LocalAPIError):
    """403: this process may not use that endpoint (Go ``AccessDeniedError``)."""


class DialRefused(LocalAPIError, BackendUnavailable):
    """``/localapi/v0/dial`` answered anything but ``101 Switching Protocols``.

    tailscaled answers ``502`` with ``dial failure: <reason>`` when it cannot reach the target.
    ``dial_self`` holds a ``Dial-Self`` response header if the daemon sent one (see
    :meth:`ferryman.tailscale.localapi.LocalAPIClient.dial`).
    """

    sqlstate = BackendUnavailable.sqlstate
    http_status = BackendUnavailable.http_status
    kind = BackendUnavailable.kind

    def __init__(
        self,
        status: int,
        reason: str,
        body: bytes,
        *,
        path: str,
        socket_path: str = "",
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(status, reason, body, path=path, socket_path=socket_path, headers=headers)
        self.dial_self = next((v for k, v in headers if k == "dial-self"), None)
