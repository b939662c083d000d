"""Test helpers for pgwire: scripted shells and an in-memory ClientConnection <-> ServerConnection pair.

The scripted shells play the asyncio driver's part without a loop: feed chunks, drain events,
answer each event the way a simple gateway would. Tests compare the event lists they return.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from ferryman import pgwire as pw


def phase_of(conn: pw.ServerConnection | pw.ClientConnection) -> pw.Phase:
    """``conn.phase``, unnarrowed: mypy keeps a property narrowed after ``assert conn.phase is X``
    even across calls that change it, and would call the next phase check unreachable."""
    return conn.phase


def split_at(data: bytes, points: Iterable[int]) -> list[bytes]:
    """Cut ``data`` at the given offsets (any order, duplicates and out-of-range ignored)."""
    cuts = sorted({p for p in points if 0 < p < len(data)})
    chunks: list[bytes] = []
    start = 0
    for cut in cuts:
        chunks.append(data[start:cut])
        start = cut
    chunks.append(data[start:])
    return chunks


def default_answer(server: pw.ServerConnection, event: pw.FrontendEvent) -> bytes:
    """How the scripted shell answers each client event: refuse TLS/GSS, negotiate the
    protocol down to 3.0 when asked for more, ask for a cleartext password, accept any
    password, then switch."""
    match event:
        case pw.SSLRequest():
            return server.send(pw.SSLResponse(False))
        case pw.GSSENCRequest():
            return server.send(pw.GSSENCResponse(False))
        case pw.StartupMessage():
            negotiation = event.negotiate()
            first = b"" if negotiation is None else server.send(negotiation)
            return first + server.send(pw.AuthenticationCleartextPassword())
        case pw.PasswordMessage():
            return b"".join(
                server.send(m)
                for m in (
                    pw.AuthenticationOk(),
                    pw.ParameterStatus("server_version", "15.0"),
                    pw.BackendKeyData(7, b"\x00\x00\x00\x07"),
                    pw.ReadyForQuery("I"),
                )
            )
    return b""


@dataclass
class ServerRun:
    """What a scripted server shell saw and said."""

    events: list[pw.FrontendEvent] = field(default_factory=list)
    sent: bytearray = field(default_factory=bytearray)
    trailing: bytes = b""


def run_server(
    chunks: Sequence[bytes],
    *,
    eof: bool = True,
    answer: Callable[[pw.ServerConnection, pw.FrontendEvent], bytes] = default_answer,
    server: pw.ServerConnection | None = None,
) -> ServerRun:
    """Feed ``chunks`` (then EOF) to a ServerConnection, answering events with ``answer``.

    Stops at the switch or close; ``trailing`` is then the unparsed rest of the stream.
    """
    conn = server if server is not None else pw.ServerConnection()
    run = ServerRun()
    feed = [*chunks, b""] if eof else list(chunks)
    for index, chunk in enumerate(feed):
        if conn.phase in (pw.Phase.SWITCHED, pw.Phase.CLOSED):
            run.trailing = conn.trailing_data + b"".join(feed[index:])
            return run
        conn.receive_data(chunk)
        while conn.phase not in (pw.Phase.SWITCHED, pw.Phase.CLOSED):
            event = conn.next_event()
            if event is pw.NEED_DATA:
                break
            run.events.append(event)
            run.sent += answer(conn, event)
    run.trailing = conn.trailing_data
    return run


@dataclass
class ClientRun:
    """What a scripted client shell saw and answered."""

    events: list[pw.BackendEvent] = field(default_factory=list)
    sent: bytearray = field(default_factory=bytearray)


def run_client(conn: pw.ClientConnection, chunks: Sequence[bytes], *, eof: bool = True) -> ClientRun:
    """Feed backend ``chunks`` (then EOF) to ``conn``, collecting events and its auth replies."""
    run = ClientRun()
    for chunk in [*chunks, b""] if eof else chunks:
        if conn.phase in (pw.Phase.SWITCHED, pw.Phase.CLOSED):
            break
        conn.receive_data(chunk)
        while conn.phase not in (pw.Phase.SWITCHED, pw.Phase.CLOSED):
            event = conn.next_event()
            run.sent += conn.data_to_send()
            if event is pw.NEED_DATA:
                break
            run.events.append(event)
    return run


def drain_server(conn: pw.ServerConnection) -> list[pw.FrontendEvent]:
    """All events the server can produce from what it has buffered."""
    events: list[pw.FrontendEvent] = []
    while conn.phase not in (pw.Phase.SWITCHED, pw.Phase.CLOSED):
        event = conn.next_event()
        if event is pw.NEED_DATA:
            break
        events.append(event)
        if isinstance(event, pw.SSLRequest | pw.GSSENCRequest):
            break  # must be answered before reading on
    return events


class ConnectionPair:
    """A ClientConnection and a ServerConnection joined by an in-memory link (h11's idea).

    ``chunking`` cuts every transfer into pieces, so tests can check that delivery boundaries
    never change what either side sees.
    """

    def __init__(
        self, *, password: str | None = None, chunking: Callable[[bytes], list[bytes]] | None = None
    ) -> None:
        self.client = pw.ClientConnection(password=password)
        self.server = pw.ServerConnection()
        self._chunking = chunking or (lambda data: [data])

    def to_server(self, data: bytes) -> list[pw.FrontendEvent]:
        """Deliver client bytes; return every event the server produced."""
        events: list[pw.FrontendEvent] = []
        for piece in self._chunking(data):
            self.server.receive_data(piece)
            events += drain_server(self.server)
        return events

    def to_client(self, data: bytes) -> list[pw.BackendEvent]:
        """Deliver server bytes; return client events, forwarding its auth replies to the server.

        Replies are passed on by the caller via :attr:`pending`, in order.
        """
        events: list[pw.BackendEvent] = []
        for piece in self._chunking(data):
            self.client.receive_data(piece)
            while self.client.phase not in (pw.Phase.SWITCHED, pw.Phase.CLOSED):
                event = self.client.next_event()
                self.pending += self.client.data_to_send()
                if event is pw.NEED_DATA:
                    break
                events.append(event)
        return events

    pending: bytes = b""
    """Client bytes (auth replies) produced while reading, not yet delivered to the server."""

    def flush_client(self) -> list[pw.FrontendEvent]:
        """Deliver :attr:`pending` to the server."""
        data, self.pending = self.pending, b""
        return self.to_server(data)
