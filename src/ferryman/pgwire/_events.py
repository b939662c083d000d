"""Codec-level events and states that are not PostgreSQL messages.

Owns: the :class:`Phase` enum shared by both connection ends, the :data:`NEED_DATA`
sentinel, and the :class:`ConnectionClosed` event.

Must not: hold transition logic -- each connection class keeps its whole machine in its own
module (``server.py``, ``client.py``), h11's "Rule 1".
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final


class Phase(enum.Enum):
    """Where a connection is in the startup/authentication flow.

    Both :class:`~ferryman.pgwire.ServerConnection` and
    :class:`~ferryman.pgwire.ClientConnection` use it; each documents what the phases mean
    from its side.
    """

    #: Before the startup packet: SSL/GSSENC negotiation, CancelRequest, StartupMessage.
    STARTUP = enum.auto()
    #: ``S`` was exchanged for an SSLRequest; no byte is acceptable until the TLS handshake
    #: is done (CVE-2021-23214 on the server side, CVE-2021-23222 on the client side).
    TLS_PENDING = enum.auto()
    #: StartupMessage exchanged; authentication, then ParameterStatus/BackendKeyData until
    #: ReadyForQuery.
    AUTHENTICATING = enum.auto()
    #: ReadyForQuery exchanged: the codec is done; the caller relays raw bytes, starting with
    #: ``trailing_data``.
    SWITCHED = enum.auto()
    #: Over: the peer closed (EOF, Terminate), a CancelRequest was exchanged, the server side
    #: sent an ErrorResponse, or the client side's login ended with one (see client.py).
    CLOSED = enum.auto()
    #: The codec raised :class:`~ferryman.errors.RemoteProtocolError`; it stays here for good.
    ERROR = enum.auto()


class NeedData(enum.Enum):
    """Type of :data:`NEED_DATA`; a one-member enum so ``is`` checks narrow under mypy."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA
"""Returned by ``next_event()`` when more bytes must be passed to ``receive_data()`` first."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its side cleanly (EOF on a message boundary). Not a wire message."""
