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

from ferryman.errors import BackendUnavailable
from ferryman.proxy.poller import wait_fd


@functools.lru_cache(maxsize=1024)
def _literal_family(host: str) -> int | None:
    """Address family of an IP literal, None for a name (cached: backends repeat)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


def _start_connect(sock: socket.socket, addr: tuple[Any, ...]) -> bool:
    """Start a non-blocking connect; True if it is established already. (On loopback and fast
    networks the handshake has usually completed when ``connect`` returns ``EINPROGRESS``; one
    ``getpeername`` then saves a readiness wait, its timer and two ``epoll_ctl`` calls.)"""
    err = sock.connect_ex(addr)
    if err == 0:
        return True
    if err not in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
        raise OSError(err, os.strerror(err))
    try:
        sock.getpeername()
    except OSError:
        return False  # still connecting (or failed: the readiness wait will tell)
    return True


async def _finish_connect(sock: socket.socket) -> None:
    await wait_fd(sock.fileno(), writable=True)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


async def _connect(sock: socket.socket, addr: tuple[Any, ...]) -> None:
    """Non-blocking connect to a resolved address. (uvloop's ``sock_connect`` runs getaddrinfo
    on its thread pool for every call, even for IP literals: a measurable cost per dial.)"""
    if not _start_connect(sock, addr):
        await _finish_connect(sock)


def _new_socket(family: int) -> socket.socket:
    """Non-blocking from birth (no ``ioctl``), with ``TCP_NODELAY`` already set (it survives the
    connect)."""
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _cannot_connect(host: str, port: int, exc: OSError | None) -> BackendUnavailable:
    reason = exc.strerror if exc is not None and exc.strerror else exc
    return BackendUnavailable(f"cannot connect to {host}:{port}: {reason}")


async def dial_tcp(host: str, port: int, timeout: float) -> socket.socket:
    """Connect within ``timeout`` seconds. Raises :class:`BackendUnavailable` with the reason."""
    family = _literal_family(host)
    pending: socket.socket | None = None
    if family is not None:
        # Fast path for an IP literal whose connect completes at once: no timer, no wait.
        pending = _new_socket(family)
        try:
            if _start_connect(pending, (host, port)):
                return pending
        except OSError as exc:
            pending.close()
            raise _cannot_connect(host, port, exc) from None
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout if timeout > 0 else None):
            if pending is not None:
                try:
                    await _finish_connect(pending)
                except BaseException:
                    pending.close()
                    raise
                return pending
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            last: OSError | None = None
            for family_, _, _, _, addr in infos:
                sock = _new_socket(family_)
                try:
                    await _connect(sock, addr[:2])
                except OSError as exc:
                    sock.close()
                    last = exc
                    continue
                except BaseException:
                    sock.close()
                    raise
                return sock
            raise _cannot_connect(host, port, last)
    except TimeoutError:
        raise BackendUnavailable(f"cannot connect to {host}:{port}: timed out after {timeout:g}s") from None
    except socket.gaierror as exc:
        raise BackendUnavailable(f"cannot resolve {host}: {exc.strerror}") from None
    except OSError as exc:  # the literal address's connect failed
        raise _cannot_connect(host, port, exc) from None
