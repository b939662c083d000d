"""``ferryman._aio``: cancelling tasks and waiting for them, whatever the tasks do with it."""

from __future__ import annotations

import asyncio

import pytest

from ferryman import _aio
from ferryman._aio import cancel_and_wait, spawn

OWNED: set[asyncio.Task[object]] = set()


def start(coro: object, name: str) -> asyncio.Task[object]:
    return spawn(coro, name=name, owner=OWNED)  # type: ignore[arg-type]


async def test_a_task_that_swallows_its_cancellation_is_cancelled_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As Python 3.11's ``asyncio.wait_for`` does when the awaited thing finishes at the same
    moment (psycopg_pool waits with it): the task goes on to a long sleep. The wait must still
    end (a reload waited on such a sweeper for its whole sweep interval)."""
    monkeypatch.setattr(_aio, "RECANCEL_INTERVAL", 0.05)
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.set()
        await asyncio.sleep(3600)

    task = start(stubborn(), "stubborn")
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await cancel_and_wait([task])
    assert swallowed.is_set() and task.cancelled()


async def test_errors_of_cancelled_tasks_are_taken_and_done_tasks_left_alone() -> None:
    async def fails_when_cancelled() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None

    async def quick() -> int:
        return 1

    failing = start(fails_when_cancelled(), "failing")
    done = start(quick(), "quick")
    await asyncio.sleep(0)
    await done
    await cancel_and_wait([failing, done])
    assert isinstance(failing.exception(), RuntimeError) and done.result() == 1


async def test_our_own_cancellation_is_not_swallowed() -> None:
    async def slow_to_end() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(0.5)
            raise

    victim = start(slow_to_end(), "victim")
    await asyncio.sleep(0)
    waiter = start(cancel_and_wait([victim]), "waiter")
    await asyncio.sleep(0.05)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await cancel_and_wait([victim])
