"""SQLSTATE codes ferryman emits, named as in PostgreSQL's Appendix A "PostgreSQL Error Codes".

Owns: the constants. Must not: import anything, or map exceptions to codes (exceptions carry
their own ``sqlstate``, see ``ferryman.errors``).
"""

from __future__ import annotations

from typing import Final

INVALID_AUTHORIZATION_SPECIFICATION: Final = "28000"
"""No identity, or no grant for this listener/database."""

INVALID_PASSWORD: Final = "28P01"
"""The backend refused our login (or a client password was wrong)."""

INSUFFICIENT_PRIVILEGE: Final = "42501"
"""The database or preset asked for is not granted."""

INVALID_PARAMETER_VALUE: Final = "22023"
"""A bad client-supplied parameter, e.g. an unknown preset name."""

TOO_MANY_CONNECTIONS: Final = "53300"
"""A grant's connection limit was reached."""

CONNECTION_FAILURE: Final = "08006"
"""The backend could not be reached or dropped us."""

PROTOCOL_VIOLATION: Final = "08P01"
"""The peer broke the wire protocol."""

SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION: Final = "08001"
"""We could not establish the backend connection (e.g. TLS required but refused)."""

ADMIN_SHUTDOWN: Final = "57P01"
"""The session is closed by the gateway (revoked grant, shutdown)."""

CANNOT_CONNECT_NOW: Final = "57P03"
"""The gateway is draining and accepts no new sessions."""

SYSTEM_ERROR: Final = "58000"
"""Internal failure; details go to the log, not the client."""

FEATURE_NOT_SUPPORTED: Final = "0A000"
"""Something PostgreSQL allows but ferryman does not do (GSSAPI, an auth method, ...)."""
