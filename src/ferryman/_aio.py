"""asyncio helpers: the one sanctioned way to start a task, and cancellation done right.

Owns: :func:`spawn` (named task, strong reference held by an owner set, cpython's loop only
keeps weak references) and :func:`cancel_and_wait`. (Readiness of a raw socket:
:func:`ferryman.proxy.poller.wait_fd`.)

Must not: hold global state. Owners are sets held by whoever is responsible for the tasks
(a listener for its connections, the gateway for its background loops).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


def spawn(
    coro: Coroutine[Any, Any, T],
    *,
    name: str,
    owner: set[asyncio.Task[Any]],
    loop: asyncio.AbstractEventLoop | None = None,
) -> asyncio.Task[T]:
    """Start ``coro`` as a named task that ``owner`` keeps alive until it finishes.

    ``loop``, when the caller holds the running loop already, saves looking it up (on
    Python 3.11 every lookup is a ``getpid`` system call; the accept path starts a task per
    connection)."""
    if loop is None:
        loop = asyncio.get_running_loop()
    task = loop.create_task(coro, name=name)
    owner.add(task)
    task.add_done_callback(owner.discard)
    return task


RECANCEL_INTERVAL = 1.0
"""Seconds :func:`cancel_and_wait` gives a cancelled task before cancelling it again."""


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait for them, without swallowing our own cancellation.

    A task still running :data:`RECANCEL_INTERVAL` after its cancellation is cancelled again,
    until it ends: code that swallows a cancellation would otherwise run on and this wait would
    never end. Python 3.11's ``asyncio.wait_for`` does swallow one when what it waits for
    finishes at the same moment (cpython gh-86296); psycopg_pool waits with it, so a
    provisioner's sweeper cancelled by a reload just as its admin pool became ready went on to
    sleep for its whole sweep interval, and the reload with it."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        done, pending = await asyncio.wait(pending, timeout=RECANCEL_INTERVAL)
        for task in done:
            if not task.cancelled():
                task.exception()  # retrieved: its end was asked for, not awaited by anyone else
    current = asyncio.current_task()
    if current is not None and current.cancelling():
        raise asyncio.CancelledError
