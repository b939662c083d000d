"""PostgreSQL mode, client side of the start-up: from accepted socket to StartupMessage.

Owns: driving :class:`ferryman.pgwire.ServerConnection` over the accepted socket: SSLRequest
answered by ``tls_mode`` (then TLS with SNI certificate choice), GSSENCRequest answered ``N``,
CancelRequest handed back to the caller, the StartupMessage returned; bytes pipelined behind an
SSLRequest refused (CVE-2021-23214); and the per-connection preset request in the start-up
parameters.

Must not: identify, authorize or talk to the backend (``proxy.pg`` does).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from ferryman import pgwire
from ferryman._aio import wait_fd
from ferryman.errors import AccessDenied, RemoteProtocolError
from ferryman.proxy.streams import SetupStream, accept_tls
from ferryman.proxy.tlssetup import ListenerTLS

PRESET_PARAMETERS = ("ferryman_presets", "waypoint_presets")
PRESET_SETTINGS = ("ferryman.presets", "waypoint.presets")
DROPPED_PARAMETERS = frozenset({"user", "database", *PRESET_PARAMETERS})


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
    """Start-up parameters to pass to the backend (ours and user/database removed)."""


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


def extract_presets(parameters: dict[str, str]) -> tuple[str | None, dict[str, str]]:
    """Our preset request (``ferryman_presets``, ``-c ferryman.presets=…``, Waypoint aliases)
    and the parameters to forward, with our settings removed from ``options``.

    ``options`` is read as the server reads it (``pg_split_opts``, then ``-c name=value``,
    ``-cname=value`` or ``--name=value``); when it holds none of our settings it is forwarded
    unchanged, otherwise re-escaped from the remaining words."""
    forward = {k: v for k, v in parameters.items() if k not in DROPPED_PARAMETERS}
    requested: list[str] = [parameters[k] for k in PRESET_PARAMETERS if parameters.get(k)]
    options = parameters.get("options")
    if options:
        words = split_options(options)
        kept: list[str] = []
        removed = False
        i = 0
        while i < len(words):
            word = words[i]
            setting: str | None = None
            if word == "--":
                kept.extend(words[i:])  # getopt: the end of the options; the server refuses the rest
                break
            if word == "-c" and i + 1 < len(words):
                setting, i = words[i + 1], i + 2
            elif (word.startswith("-c") and len(word) > 2) or word.startswith("--"):
                setting, i = word[2:], i + 1
            else:
                kept.append(word)
                i += 1
                continue
            name, _, value = setting.partition("=")
            if name.strip().lower() in PRESET_SETTINGS:
                requested.append(value)
                removed = True
            else:
                kept.extend(["-c", setting])
        # Nothing of ours in it: the client's own string goes on byte for byte.
        if removed and kept:
            forward["options"] = _join_options(kept)
        elif removed:
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
        # libpq 17 always offers ALPN "postgresql"; other clients (asyncpg's direct_tls) may
        # offer none, which we accept. A different protocol is a client talking to the wrong port.
        if client.alpn not in (None, "postgresql"):
            raise RemoteProtocolError(f"direct TLS with ALPN {client.alpn!r}: this is a PostgreSQL service")
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
                if tls_mode == "require" and not client.tls:
                    raise TLSRequired(
                        "plaintext start-up on a TLS-only service",
                        client_message=("this service requires TLS (use sslmode=require or stronger)"),
                    )
                params = dict(event.parameters)
                presets, forward = extract_presets(params)
                user = event.user or ""
                return Startup(event, event.database or user, user, presets, forward)
            case pgwire.ConnectionClosed():
                raise ConnectionResetError("client closed during start-up")
            case _:
                raise RemoteProtocolError(f"unexpected {type(event).__name__} during start-up")


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


class TLSRequired(AccessDenied):
    """A plaintext StartupMessage on a ``tls_mode = "require"`` listener (28000, as PostgreSQL)."""
