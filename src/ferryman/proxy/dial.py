"""Connecting to backends.

Owns: :func:`dial_tcp`, a non-blocking connect to ``host:port`` (every resolved address tried
in turn) bounded by a timeout, returning a raw non-blocking socket with ``TCP_NODELAY``.

Must not: retry across targets or decide what a failure means for the client; callers map
``BackendUnavailable`` to their protocol's answer.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import os
import socket
from typing import Any

from ferryman._aio import wait_fd
from ferryman.errors import BackendUnavailable


@functools.lru_cache(maxsize=1024)
def _literal_family(host: str) -> int | None:
    """Address family of an IP literal, None for a name (cached: backends repeat)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


async def _connect(loop: asyncio.AbstractEventLoop, sock: socket.socket, addr: tuple[Any, ...]) -> None:
    """Non-blocking connect to a resolved address. (uvloop's ``sock_connect`` runs getaddrinfo
    on its thread pool for every call, even for IP literals: a measurable cost per dial.)"""
    err = sock.connect_ex(addr)
    if err == 0:
        return
    if err not in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
        raise OSError(err, os.strerror(err))
    await wait_fd(sock.fileno(), writable=True)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


async def dial_tcp(host: str, port: int, timeout: float) -> socket.socket:
    """Connect within ``timeout`` seconds. Raises :class:`BackendUnavailable` with the reason."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout if timeout > 0 else None):
            family = _literal_family(host)
            if family is not None:
                candidates: list[tuple[int, tuple[Any, ...]]] = [(family, (host, port))]
            else:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                candidates = [(family, addr[:2]) for family, _, _, _, addr in infos]
            last: OSError | None = None
            for family, addr in candidates:
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setblocking(False)
                try:
                    await _connect(loop, sock, addr)
                except OSError as exc:
                    sock.close()
                    last = exc
                    continue
                except BaseException:
                    sock.close()
                    raise
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            raise BackendUnavailable(
                f"cannot connect to {host}:{port}: {last.strerror if last and last.strerror else last}"
            )
    except TimeoutError:
        raise BackendUnavailable(f"cannot connect to {host}:{port}: timed out after {timeout:g}s") from None
    except socket.gaierror as exc:
        raise BackendUnavailable(f"cannot resolve {host}: {exc.strerror}") from None
