"""PostgreSQL mode, backend side: log in as the provisioned role, and forward cancels.

Owns: dialling the backend (directly or through tailscaled), the PROXY protocol header first
when the listener sends one (``proxy_protocol``: login and cancel connections alike), optional
backend TLS via
SSLRequest (``backend_tls``: ``off``, ``require`` = encrypt without verifying, ``verify-full`` =
verify CA and host name), and driving :class:`ferryman.pgwire.ClientConnection` through the
login (SCRAM-SHA-256 with the server signature verified, MD5, cleartext or trust) up to
ReadyForQuery; forwarding a CancelRequest to the backend session it names.

Must not: decide who may log in or with which role (``proxy.pg`` and ``provision`` do).
"""

from __future__ import annotations

import asyncio
import ssl

from ferryman import pgwire
from ferryman.config.model import ListenerConfig, TargetConfig
from ferryman.errors import BackendAuthFailed, BackendUnavailable, FerrymanError
from ferryman.identity.base import PeerInfo
from ferryman.proxy.runtime import Runtime
from ferryman.proxy.streams import SetupStream, connect_tls
from ferryman.proxy.tcp import describe_target, dial_backend, proxy_header

# SQLSTATE classes that mean "your login was refused" rather than "the session failed".
_LOGIN_REFUSED = ("28000", "28P01")


class BackendSide(SetupStream):
    """The backend connection while logging in."""


class BackendRefused(FerrymanError):
    """The backend answered the login with an ErrorResponse; relay it to the client."""

    kind = "backend_refused"

    def __init__(self, error: pgwire.ErrorResponse) -> None:
        super().__init__(error.as_dict().get("message", "backend refused the login"))
        self.error = error


def backend_tls_context(listener: ListenerConfig) -> ssl.SSLContext | None:
    if listener.backend_tls == "off":
        return None
    ctx = ssl.create_default_context(cafile=listener.backend_ca_file)
    if listener.backend_tls == "require":
        # libpq's sslmode=require: encrypted, not verified.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _exchange(backend: BackendSide, codec: pgwire.ClientConnection) -> pgwire.BackendEvent:
    """Next backend event, reading as needed and writing queued auth replies."""
    while True:
        event = codec.next_event()
        out = codec.data_to_send()
        if out:
            await backend.send(out)
        if event is not pgwire.NeedData.NEED_DATA:
            return event
        data = await backend.recv()
        codec.receive_data(data)


async def backend_login(
    rt: Runtime,
    listener: ListenerConfig,
    *,
    target: TargetConfig,
    peer: PeerInfo,
    role: str,
    password: str | None,
    database: str,
    parameters: dict[str, str],
    tls: ssl.SSLContext | None,
) -> tuple[BackendSide, pgwire.ClientConnection]:
    """Connect and log in. Raises BackendUnavailable (08006), BackendAuthFailed (28P01) or
    BackendRefused (the backend's own ErrorResponse, e.g. 3D000). ``peer`` is the client, for a
    PROXY header (with its local address when the listener sends one)."""
    sock, first = await dial_backend(rt, listener, target)
    backend = BackendSide(sock, pending=first)
    codec = pgwire.ClientConnection(password=password)
    where = describe_target(target)
    try:
        async with asyncio.timeout(listener.dial_timeout):
            if listener.proxy_protocol != "off":
                await backend.send(proxy_header(listener.proxy_protocol, peer))
            if tls is not None:
                await backend.send(codec.send(pgwire.SSLRequest()))
                answer = await _exchange(backend, codec)
                if not isinstance(answer, pgwire.SSLResponse) or not answer.accept:
                    raise BackendUnavailable(f"backend {where} does not offer TLS (backend_tls)")
                # The name goes out as SNI either way; only verify-full's context checks it.
                backend.conn = await connect_tls(sock, tls, target.host, listener.dial_timeout)
                codec.tls_established()
            startup = pgwire.StartupMessage({**parameters, "user": role, "database": database})
            await backend.send(codec.send(startup))
            while True:
                event = await _exchange(backend, codec)
                match event:
                    case pgwire.ReadyForQuery():
                        return backend, codec
                    case pgwire.ErrorResponse():
                        fields = event.as_dict()
                        if fields.get("code") in _LOGIN_REFUSED:
                            code, text = fields.get("code"), fields.get("message")
                            raise BackendAuthFailed(f"backend refused login as {role}: {code} {text}")
                        raise BackendRefused(event)
                    case pgwire.ConnectionClosed():
                        raise BackendUnavailable("backend closed the connection during login")
                    case _:
                        continue
    except TimeoutError:
        backend.close()
        raise BackendUnavailable(f"backend {where}: login timed out") from None
    except ssl.SSLError as exc:
        backend.close()
        raise BackendUnavailable(f"backend {where}: TLS failed: {exc.reason or exc}") from None
    except OSError as exc:
        backend.close()
        raise BackendUnavailable(f"backend {where}: {exc.strerror or exc}") from None
    except BaseException:
        backend.close()
        raise


async def send_cancel(
    rt: Runtime,
    listener: ListenerConfig,
    target: TargetConfig,
    peer: PeerInfo,
    process_id: int,
    secret_key: bytes,
) -> None:
    """Deliver a CancelRequest for a backend session (best effort, as PostgreSQL's own);
    ``peer`` is the client that asked (named in a PROXY header if the listener sends one)."""
    sock, _ = await dial_backend(rt, listener, target)
    try:
        codec = pgwire.ClientConnection()
        data = codec.send(pgwire.CancelRequest(process_id, secret_key))
        if listener.proxy_protocol != "off":
            data = proxy_header(listener.proxy_protocol, peer) + data
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, data)
        # The server closes once it has read the request; wait for that so it isn't lost.
        async with asyncio.timeout(2):
            await loop.sock_recv(sock, 1)
    except (OSError, TimeoutError):
        pass
    finally:
        sock.close()
