"""The one exception tree of ferryman.

Owns: every exception the package raises on purpose, and the hints each carries for the
edge that answers the peer -- a PostgreSQL SQLSTATE (``sqlstate``), an HTTP status
(``http_status``) and a bounded audit/metrics vocabulary (``kind``).

Must not: import anything but the standard library, format client-facing messages from
secrets, or decide how a connection is closed (the shell does that, once).

Convention (h11's): raise where the fact is known, attach context as attributes, translate
once at the boundary. ``except Exception`` never catches ``CancelledError``; keep it that way.
"""

from __future__ import annotations

from typing import ClassVar


class FerrymanError(Exception):
    """Base for every error ferryman raises on purpose."""

    sqlstate: ClassVar[str] = "58000"  # system_error: details go to the log, not the client
    http_status: ClassVar[int] = 500
    kind: ClassVar[str] = "error"
    """Bounded label for metrics and audit records; never user data."""


class ConfigError(FerrymanError):
    """A configuration or policy file is invalid.

    ``where`` names the file and line when known; ``key`` the dotted key path. ``str()`` gives
    one line a person can act on: ``ferryman.toml:12: listeners[0].bakend: unknown key``.
    """

    kind = "config"

    def __init__(
        self, message: str, *, file: str | None = None, line: int | None = None, key: str | None = None
    ) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.key = key
        super().__init__(self._render())

    def _render(self) -> str:
        where = ""
        if self.file is not None:
            where = self.file + (f":{self.line}" if self.line is not None else "") + ": "
        elif self.line is not None:
            where = f"line {self.line}: "
        key = f"{self.key}: " if self.key else ""
        return f"{where}{key}{self.message}"


class ConfigErrors(ConfigError):
    """Several configuration problems found in one pass; each is a :class:`ConfigError`."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))

    def _render(self) -> str:
        return self.message


class ProtocolError(FerrymanError):
    """A wire-protocol rule was broken. Abstract: raise a Local or Remote subclass."""

    sqlstate = "08P01"  # protocol_violation
    http_status = 400
    kind = "protocol"

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        if type(self) is ProtocolError:
            raise TypeError("instantiate LocalProtocolError or RemoteProtocolError")
        super().__init__(message)
        if sqlstate is not None:
            self.sqlstate = sqlstate  # type: ignore[misc]


class LocalProtocolError(ProtocolError):
    """We misused a codec (asked it to send something illegal in its state): a bug."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the protocol; answer with ``sqlstate`` and close."""


class AccessDenied(FerrymanError):
    """No identity, or no grant for this listener. The reason stays in the audit log."""

    sqlstate = "28000"  # invalid_authorization_specification
    http_status = 403
    kind = "denied"

    def __init__(self, reason: str, *, client_message: str = "access denied") -> None:
        super().__init__(reason)
        self.reason = reason
        self.client_message = client_message


class IdentityUnavailable(AccessDenied):
    """An identity source could not answer (WhoIs failed, JWKS down): fail closed."""

    kind = "identity_unavailable"


class PermissionDenied(AccessDenied):
    """The grant exists but not for this database or preset."""

    sqlstate = "42501"  # insufficient_privilege
    kind = "forbidden"


class InvalidParameter(FerrymanError):
    """A client-supplied parameter (e.g. a preset name) is not valid."""

    sqlstate = "22023"  # invalid_parameter_value
    http_status = 400
    kind = "bad_parameter"


class LimitExceeded(FerrymanError):
    """A grant limit refused or cut a connection; ``limit`` names which one."""

    sqlstate = "53300"  # too_many_connections
    http_status = 429
    kind = "limit"

    def __init__(self, limit: str, detail: str) -> None:
        super().__init__(f"{limit}: {detail}")
        self.limit = limit
        self.detail = detail


class BackendUnavailable(FerrymanError):
    """The backend could not be dialled (refused, unreachable, timed out)."""

    sqlstate = "08006"  # connection_failure
    http_status = 503
    kind = "backend_error"


class NoSuchDatabase(FerrymanError):
    """The requested database does not exist on the backend; nothing was provisioned for it.

    Not a :class:`BackendUnavailable`: the backend answered, so it stays in rotation.
    ``str()`` is PostgreSQL's own wording (the client sees it as is); ``database`` the name.
    """

    sqlstate = "3D000"  # invalid_catalog_name
    http_status = 404
    kind = "no_database"

    def __init__(self, database: str) -> None:
        super().__init__(f'database "{database}" does not exist')
        self.database = database


class BackendAuthFailed(FerrymanError):
    """The backend refused our login as the provisioned role."""

    sqlstate = "28P01"  # invalid_password
    http_status = 502
    kind = "backend_auth"


class ShuttingDown(FerrymanError):
    """The gateway is draining and accepts no new sessions."""

    sqlstate = "57P03"  # cannot_connect_now
    http_status = 503
    kind = "shutdown"
