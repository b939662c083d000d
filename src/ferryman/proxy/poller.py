"""One epoll set per event loop for the relay's raw sockets.

Owns: a level-triggered ``epoll`` set whose own descriptor is the only thing the event loop
watches for relayed sockets (one ``add_reader``), dispatching its events to one callback
per registered descriptor, and :func:`wait_fd` (readiness of a raw socket before it is
relayed: a dial in progress, a ClientHello or start-up packet still to come).

Why not ``loop.add_reader`` per socket: under uvloop every ``add_reader`` on a new descriptor
creates a libuv poll handle (``uv_poll_init``: an ``ioctl`` and an ``epoll_ctl`` ADD+DEL pair to
probe the descriptor, then the real ADD), and every ``remove_reader`` that leaves the
descriptor unwatched closes it again (a DEL). Re-watching a descriptor costs an ADD that fails
with ``EEXIST`` and a MOD. Traced under the connection-rate benchmark that was 12.7
``epoll_ctl`` and 4.3 ``ioctl`` calls per relayed connection against HAProxy's 3 and 0.
Here a socket costs one ADD when it is first watched, a MOD when what it waits for changes
(back-pressure, end of stream) and nothing when it is closed (closing a descriptor removes it
from every epoll set). uvloop also stops polling a socket for good after reporting one
EPOLLERR together with data (MagicStack/uvloop#552); this set is level-triggered, so an error
stays reported until it is read.

Must not: read or write sockets (callers do, in their callbacks), or watch a descriptor that
may be duplicated elsewhere in the process and closed here: the kernel keeps a registration
while any duplicate of the open file lives, and its events would arrive under a number that
may belong to a new socket. Callers that keep a socket open after they stop watching it must
:meth:`Poller.unregister` it; callers that close it call :meth:`Poller.forget` first.
"""

from __future__ import annotations

import asyncio
import select
import weakref
from collections.abc import Callable
from typing import Final

IN: Final = select.EPOLLIN
OUT: Final = select.EPOLLOUT
ERR: Final = select.EPOLLERR | select.EPOLLHUP
"""Reported whatever the mask says."""
MAX_EVENTS: Final = 256
"""Events taken per wake-up; more stay ready for the next (the set is level-triggered)."""

Handler = Callable[[int], None]
"""Called with the event mask (``IN``, ``OUT``, ``ERR`` bits) of one ready descriptor."""


class Poller:
    """A level-triggered epoll set dispatched by one reader on ``loop``."""

    __slots__ = ("__weakref__", "_epoll", "_handlers", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._epoll = select.epoll()
        self._handlers: dict[int, Handler] = {}
        self._loop = weakref.ref(loop)  # the loop holds this poller (its reader), not the reverse
        loop.add_reader(self._epoll.fileno(), self._dispatch)

    def __len__(self) -> int:
        return len(self._handlers)

    def fileno(self) -> int:
        """The epoll set's own descriptor (``/proc/self/fdinfo/<it>`` lists what it watches)."""
        return self._epoll.fileno()

    def register(self, fd: int, mask: int, handler: Handler) -> None:
        """Watch ``fd`` for ``mask`` (``ERR`` is always reported), calling ``handler(events)``."""
        try:
            self._epoll.register(fd, mask)
        except FileExistsError:
            # Still in the set from an earlier watcher that did not unregister it (a bug, but
            # the socket is the one the caller has now): take it over.
            self._epoll.modify(fd, mask)
        self._handlers[fd] = handler

    def modify(self, fd: int, mask: int) -> None:
        self._epoll.modify(fd, mask)

    def unregister(self, fd: int) -> None:
        """Stop watching ``fd``, which stays open."""
        if self._handlers.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass  # already closed: the kernel dropped it

    def forget(self, fd: int) -> None:
        """``fd`` is about to be closed, which removes it from the set without a system call."""
        self._handlers.pop(fd, None)

    def close(self) -> None:
        """Stop dispatching and close the set (see :func:`release_poller`)."""
        if not self._epoll.closed:
            loop = self._loop()
            if loop is not None and not loop.is_closed():
                loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
        self._handlers.clear()

    def _dispatch(self) -> None:
        handlers = self._handlers
        try:
            events = self._epoll.poll(0, MAX_EVENTS)
        except InterruptedError:
            return
        for fd, mask in events:
            handler = handlers.get(fd)
            if handler is None:
                # Forgotten: usually closed by an earlier handler of this batch (then this
                # fails harmlessly); if it was left open, drop it, or the level-triggered set
                # would report it on every turn.
                try:
                    self._epoll.unregister(fd)
                except OSError:
                    pass
            else:
                try:
                    handler(mask)
                except Exception as exc:  # one connection's bug must not starve the others
                    loop = self._loop()
                    if loop is None:
                        raise
                    loop.call_exception_handler(
                        {"message": f"relay poller: handler for fd {fd} failed", "exception": exc}
                    )


_pollers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Poller] = weakref.WeakKeyDictionary()


def poller_for(loop: asyncio.AbstractEventLoop) -> Poller:
    """The loop's poller, created on first use. It lives as long as the loop (the loop's
    reader holds it; it holds the loop weakly), or until :func:`release_poller`."""
    poller = _pollers.get(loop)
    if poller is None:
        poller = _pollers[loop] = Poller(loop)
    return poller


def release_poller(loop: asyncio.AbstractEventLoop) -> None:
    """Close ``loop``'s poller if it has one and it watches nothing (a gateway calls this when
    it has stopped; another gateway on the same loop may still have relays)."""
    poller = _pollers.get(loop)
    if poller is not None and not len(poller):
        del _pollers[loop]
        poller.close()


async def wait_fd(fd: int, *, writable: bool = False) -> None:
    """Wait until ``fd`` is readable (or writable, or has an error), consuming nothing. Two
    ``epoll_ctl`` calls (an ADD and a DEL); ``loop.add_reader`` costs uvloop five and an
    ``ioctl``."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def on_ready(events: int) -> None:
        if not ready.done():
            ready.set_result(None)

    poller = poller_for(loop)
    poller.register(fd, OUT if writable else IN, on_ready)
    try:
        await ready
    finally:
        poller.unregister(fd)
