"""Dialling a backend through tailscaled's SOCKS5 server (``tailscaled --socks5-server``).

Owns: :func:`dial_socks5` -- a SOCKS5 ``CONNECT`` (no authentication, which is what tailscaled
offers) to ``host:port`` with the name resolved by the proxy (tailscaled resolves MagicDNS
names and reaches 100.x addresses), returning the connected non-blocking socket. The protocol
is python-socks'; every failure becomes :class:`~ferryman.errors.BackendUnavailable` with the
reason, as a ``ts-dial`` failure does.

Must not: decide when to use it (``[tailscale] socks5`` and the listener's
``backend_via_tailscale`` decide, in ``proxy.tcp.dial_backend``).
"""

from __future__ import annotations

import socket

from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError, ProxyType
from python_socks.async_.asyncio import Proxy

from ferryman.config.model import split_hostport
from ferryman.errors import BackendUnavailable


async def dial_socks5(proxy: str, host: str, port: int, timeout: float) -> socket.socket:
    """Connect to ``host:port`` through the SOCKS5 server at ``proxy`` (``host:port``)."""
    proxy_host, proxy_port = split_hostport(proxy)
    client = Proxy(ProxyType.SOCKS5, proxy_host, proxy_port, rdns=True)
    try:
        sock = await client.connect(dest_host=host, dest_port=port, timeout=timeout)
    except ProxyTimeoutError:
        what = f"dial {host}:{port} via SOCKS5 {proxy}"
        raise BackendUnavailable(f"{what}: timed out after {timeout:g}s") from None
    except ProxyConnectionError as exc:
        raise BackendUnavailable(f"SOCKS5 server {proxy} is not reachable: {exc}") from None
    except ProxyError as exc:
        raise BackendUnavailable(f"dial {host}:{port} via SOCKS5 {proxy}: {exc}") from None
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
    return sock
