"""PostgreSQL mode, client side of the start-up: from accepted socket to StartupMessage.

Owns: driving :class:`ferryman.pgwire.ServerConnection` over the accepted socket: SSLRequest
answered by ``tls_mode`` (then TLS with SNI certificate choice), direct TLS (ALPN
``postgresql`` required), GSSENCRequest answered ``N``, CancelRequest handed back to the
caller, the StartupMessage returned -- after NegotiateProtocolVersion when the client asked for
a newer protocol or ``_pq_.*`` options; bytes pipelined behind an SSLRequest refused
(CVE-2021-23214); and the per-connection preset request in the start-up parameters.

Must not: identify, authorize or talk to the backend (``proxy.pg`` does).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from ferryman import pgwire
from ferryman.errors import AccessDenied, InvalidParameter, RemoteProtocolError
from ferryman.proxy.poller import wait_fd
from ferryman.proxy.streams import SetupStream, accept_tls
from ferryman.proxy.tlssetup import ListenerTLS

PRESET_PARAMETERS = ("ferryman_presets", "waypoint_presets")
PRESET_SETTINGS = ("ferryman.presets", "waypoint.presets")
DROPPED_PARAMETERS = frozenset({"user", "database", *PRESET_PARAMETERS})
PROTOCOL_OPTION_PREFIX = "_pq_."
"""Protocol options (docs, "Protocol versions"): negotiated between client and server, never
settings. We recognise none and speak 3.0 to the backend, so they are answered with
NegotiateProtocolVersion and never forwarded."""
ALPN_POSTGRESQL = "postgresql"


@dataclass(eq=False)
class ClientSide(SetupStream):
    """The client's connection, with what its TLS handshake (if any) told us."""

    sni: str | None = None
    alpn: str | None = None
    peer_cert_der: bytes | None = None


@dataclass(frozen=True)
class Startup:
    """What the client asked for."""

    message: pgwire.StartupMessage
    database: str
    user: str
    requested_presets: str | None
    forward: dict[str, str] = field(default_factory=dict)
    """Start-up parameters to pass to the backend (ours, ``_pq_.*`` and user/database removed).

    Values keep the client's bytes (see :class:`ferryman.pgwire.StartupMessage`): encoding
    them again gives the backend exactly what the client sent."""


@dataclass(frozen=True)
class CancelAsked:
    request: pgwire.CancelRequest


OPTIONS_SPACE = frozenset(" \t\n\v\f\r")
"""What separates words in ``options``: the server's ``pg_split_opts`` uses C ``isspace()`` on
bytes, so these six ASCII characters and nothing else (``str.isspace`` would also split on
U+00A0, U+2003, U+001F, ... which PostgreSQL keeps inside a value)."""


def split_options(options: str) -> list[str]:
    """Split libpq's ``options`` like the server does: whitespace, backslash escapes."""
    out: list[str] = []
    current: list[str] = []
    escaped = False
    for ch in options:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch in OPTIONS_SPACE:
            if current:
                out.append("".join(current))
                current = []
        else:
            current.append(ch)
    if current:
        out.append("".join(current))
    return out


def _join_options(words: list[str]) -> str:
    """The inverse of :func:`split_options`: every separator and backslash escaped."""
    return " ".join(
        "".join("\\" + ch if ch == "\\" or ch in OPTIONS_SPACE else ch for ch in w) for w in words
    )


SWITCHES_WITH_ARGUMENT = frozenset("BCDdfhkNprStvWc-")
"""The letters of the server's switch parser (``process_postgres_switches``: getopt with
``"B:bC:c:D:d:EeFf:h:ijk:lN:nOPp:r:S:sTt:v:W:-:"``) that take an argument, attached
(``-cname=value``) or in the next word. ``c`` and ``-`` carry a setting (``--name=value``)."""


def _take_settings(words: list[str], names: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Read ``options`` words as the server's getopt does -- switches grouped in one word
    (``-ec name=value``), arguments attached or in the next word, ``--`` ending the switches --
    and take out the settings whose name is one of ``names`` (case-insensitive).

    Returns the remaining words (each switch of a group that held one of ours re-emitted on its
    own; settings as ``-c name=value``) and the values taken, in order."""
    kept: list[str] = []
    taken: list[str] = []
    i = 0
    while i < len(words):
        start = i
        word = words[i]
        i += 1
        if word == "--":
            kept.extend(words[start:])  # getopt: the end of the switches; the server refuses the rest
            break
        if len(word) < 2 or word[0] != "-":
            kept.append(word)  # not a switch (the server refuses it too)
            continue
        group: list[str] = []
        found = False
        for j in range(1, len(word)):
            letter = word[j]
            if letter not in SWITCHES_WITH_ARGUMENT:
                group.append("-" + letter)
                continue
            argument: str | None = word[j + 1 :]
            if not argument:
                argument = words[i] if i < len(words) else None
                if argument is not None:
                    i += 1
            if argument is None:
                group.append("-" + letter)  # a missing argument: the server says so
            elif letter in "c-":
                name, _, value = argument.partition("=")
                if name.strip().lower() in names:
                    taken.append(value)
                    found = True
                else:
                    group.extend(["-c", argument])
            else:
                group.extend(["-" + letter, argument])
            break
        # A group without one of ours stays as the client wrote it (with its argument word).
        kept.extend(group if found else words[start:i])
    return kept, taken


def extract_presets(parameters: dict[str, str]) -> tuple[str | None, dict[str, str]]:
    """Our preset request (``ferryman_presets``, ``-c ferryman.presets=…``, Waypoint aliases)
    and the parameters to forward, with our settings removed from ``options``.

    ``options`` is read as the server reads it (``pg_split_opts``, then getopt: ``-c
    name=value``, ``-cname=value``, ``--name=value``, switches grouped as in ``-ec name=value``);
    when it holds none of our settings it is forwarded unchanged, otherwise re-escaped from the
    remaining words."""
    forward = {
        k: v
        for k, v in parameters.items()
        if k not in DROPPED_PARAMETERS and not k.startswith(PROTOCOL_OPTION_PREFIX)
    }
    requested: list[str] = [parameters[k] for k in PRESET_PARAMETERS if parameters.get(k)]
    options = parameters.get("options")
    if options:
        kept, ours = _take_settings(split_options(options), PRESET_SETTINGS)
        requested.extend(ours)
        # Nothing of ours in it: the client's own string goes on byte for byte.
        if ours and kept:
            forward["options"] = _join_options(kept)
        elif ours:
            forward.pop("options", None)
    return (",".join(requested) if requested else None), forward


async def read_startup(
    client: ClientSide,
    server: pgwire.ServerConnection,
    *,
    tls_mode: str,
    tls: ListenerTLS | None,
    handshake_timeout: float,
) -> Startup | CancelAsked:
    """Run the untyped start-up phase on ``client`` with the codec ``server``.

    Raises RemoteProtocolError (08P01), TLSRequired (28000), ``ssl.SSLError``/``OSError`` or
    TimeoutError; the caller answers (when it still can) and closes.
    """
    sock = client.sock
    if tls is not None and tls_mode != "off" and await _starts_with_tls(sock):
        # PostgreSQL 17's sslnegotiation=direct: TLS from the first byte, ALPN "postgresql".
        await _start_tls(client, tls, handshake_timeout)
        server.tls_established_direct()
        # PostgreSQL 17 refuses a direct TLS connection that did not negotiate ALPN
        # "postgresql" (be-secure-openssl.c / backend_startup.c): without it nothing says the
        # client speaks PostgreSQL in there (a cross-protocol attack, e.g. an HTTPS client sent
        # here). Our context offers only "postgresql", so a client offering only others ends
        # the handshake with no ALPN at all (OpenSSL's fallback): refuse that too. PostgreSQL
        # only logs it and closes; we say why, over the encrypted channel (libpq shows it).
        if client.alpn != ALPN_POSTGRESQL:
            raise RemoteProtocolError(
                "received direct SSL connection request without ALPN protocol negotiation extension"
            )
    while True:
        event = server.next_event()
        match event:
            case pgwire.NeedData.NEED_DATA:
                data = await client.recv()
                server.receive_data(data)
            case pgwire.SSLRequest():
                accept = tls_mode != "off" and tls is not None
                await client.send(server.send(pgwire.SSLResponse(accept)))
                if not accept:
                    continue
                if server.trailing_data:
                    # Sent in clear text before the handshake: never treat as encrypted.
                    raise RemoteProtocolError("data received after SSLRequest before the TLS handshake")
                assert tls is not None
                await _start_tls(client, tls, handshake_timeout)
                server.tls_established()
            case pgwire.GSSENCRequest():
                await client.send(server.send(pgwire.GSSENCResponse(False)))
            case pgwire.CancelRequest():
                return CancelAsked(event)
            case pgwire.StartupMessage():
                negotiation = event.negotiate()
                if negotiation is not None:
                    # As PostgreSQL does, right after reading the packet and before any
                    # authentication request or error: the client learns the session is 3.0
                    # before it reads AuthenticationOk (sent later by ``proxy.pg``).
                    await client.send(server.send(negotiation))
                if tls_mode == "require" and not client.tls:
                    raise TLSRequired(
                        "plaintext start-up on a TLS-only service",
                        client_message=("this service requires TLS (use sslmode=require or stronger)"),
                    )
                params = dict(event.parameters)
                presets, forward = extract_presets(params)
                user = event.user or ""
                database = event.database or user
                _check_database_name(database)
                return Startup(event, database, user, presets, forward)
            case pgwire.ConnectionClosed():
                raise ConnectionResetError("client closed during start-up")
            case _:
                raise RemoteProtocolError(f"unexpected {type(event).__name__} during start-up")


def _check_database_name(database: str) -> None:
    """Refuse a database name that is not UTF-8 (22021), before identity and provisioning.

    The other parameters pass through in the client's encoding, as PostgreSQL takes them; the
    client's ``user`` is not used (the role comes from the identity) and a preset request in
    another encoding is an unknown preset (22023). The database name, though, is matched
    against grants and goes into the provisioner's SQL, its connection string, role names,
    audit records and the state store, all of which are UTF-8 text. A cluster whose databases
    are UTF-8 (PostgreSQL's default) holds no such name, so PostgreSQL would refuse it
    anyway (3D000); we name the actual problem instead.
    """
    if pgwire.is_utf8(database):
        return
    raw = database.encode("utf-8", "surrogateescape")
    bad = "?"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = " ".join(f"0x{b:02x}" for b in raw[exc.start : exc.end])
    # PostgreSQL's wording for the same problem (report_invalid_encoding).
    raise DatabaseNameNotUTF8(f'invalid byte sequence for encoding "UTF8": {bad} (in the database name)')


async def _starts_with_tls(sock: socket.socket) -> bool:
    """Peek at the first byte without consuming it: 0x16 is a TLS handshake record."""
    await wait_fd(sock.fileno())
    try:
        first = sock.recv(1, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return False
    return first == b"\x16"


async def _start_tls(client: ClientSide, tls: ListenerTLS, timeout: float) -> None:
    client.conn = await accept_tls(client.sock, tls.context, timeout)
    info = tls.info(client.conn)
    client.sni, client.peer_cert_der, client.alpn = info.sni, info.peer_cert_der, info.alpn


class DatabaseNameNotUTF8(InvalidParameter):
    """The requested database name is not valid UTF-8 (character_not_in_repertoire)."""

    sqlstate = "22021"


class TLSRequired(AccessDenied):
    """A plaintext StartupMessage on a ``tls_mode = "require"`` listener (28000, as PostgreSQL)."""
