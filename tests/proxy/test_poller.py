"""The relay's epoll set: registration, level-triggered dispatch, errors, lifetime."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from ferryman.proxy.poller import ERR, IN, OUT, Poller, poller_for, release_poller, wait_fd
from tests.support.sockets import tcp_pair


async def turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0.01)


async def test_readiness_follows_the_mask_until_unregistered() -> None:
    poller = poller_for(asyncio.get_running_loop())
    a, b = tcp_pair()
    seen: list[int] = []
    poller.register(b.fileno(), IN, seen.append)
    await turns()
    assert seen == []  # nothing to read yet
    a.send(b"x")
    await turns()
    assert seen and all(m & IN for m in seen)
    first = len(seen)
    await turns()
    assert len(seen) > first  # level-triggered: still unread, still reported
    b.recv(10)
    poller.modify(b.fileno(), OUT)
    seen.clear()
    await turns()
    assert seen and all(m & OUT and not m & IN for m in seen)
    poller.unregister(b.fileno())
    seen.clear()
    a.send(b"y")
    await turns()
    assert seen == []
    assert b.recv(10) == b"y"  # unregistered, still open
    a.close()
    b.close()


async def test_a_reset_is_reported_whatever_the_mask_until_taken() -> None:
    poller = poller_for(asyncio.get_running_loop())
    a, b = tcp_pair()
    seen: list[int] = []
    poller.register(b.fileno(), OUT, seen.append)
    poller.modify(b.fileno(), 0)  # waiting for nothing
    a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    a.close()  # RST
    await turns()
    assert len(seen) >= 2 and all(m & ERR for m in seen)
    poller.forget(b.fileno())
    b.close()
    seen.clear()
    await turns()
    assert seen == []


async def test_forgotten_descriptors_are_dropped_by_closing_them() -> None:
    poller = poller_for(asyncio.get_running_loop())
    before = len(poller)
    pairs = [tcp_pair() for _ in range(3)]
    for _, b in pairs:
        poller.register(b.fileno(), IN, lambda m: None)
    assert len(poller) == before + 3
    for a, b in pairs:
        poller.forget(b.fileno())
        b.close()
        a.close()
    assert len(poller) == before
    # The numbers are free again and can be watched afresh (EEXIST if the kernel still had them).
    c, d = tcp_pair()
    seen: list[int] = []
    poller.register(d.fileno(), IN, seen.append)
    c.send(b"z")
    await turns()
    assert seen
    poller.forget(d.fileno())
    c.close()
    d.close()


def watched(poller: Poller) -> dict[int, int]:
    """What the kernel has in the set: descriptor -> event mask (from /proc/self/fdinfo)."""
    out: dict[int, int] = {}
    with open(f"/proc/self/fdinfo/{poller.fileno()}") as info:
        for line in info:
            if line.startswith("tfd:"):
                fields = line.split()
                out[int(fields[1])] = int(fields[3], 16)
    return out


async def test_a_forgotten_descriptor_left_open_is_dropped_not_reported_forever() -> None:
    poller = poller_for(asyncio.get_running_loop())
    a, b = tcp_pair()
    poller.register(b.fileno(), IN, lambda m: None)
    assert b.fileno() in watched(poller)
    poller.forget(b.fileno())  # a bug: forgotten, but not closed
    a.send(b"x")
    await turns()
    assert b.fileno() not in watched(poller)
    a.close()
    b.close()


async def test_registering_a_descriptor_still_in_the_set_takes_it_over() -> None:
    poller = poller_for(asyncio.get_running_loop())
    a, b = tcp_pair()
    poller.register(b.fileno(), OUT, lambda m: None)
    seen: list[int] = []
    poller.register(b.fileno(), IN, seen.append)  # no FileExistsError
    assert watched(poller)[b.fileno()] & (IN | OUT) == IN
    a.send(b"x")
    await turns()
    assert seen and all(m & IN and not m & OUT for m in seen)
    poller.unregister(b.fileno())
    a.close()
    b.close()


async def test_a_failing_handler_does_not_starve_the_others() -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    poller = poller_for(loop)
    (a1, b1), (a2, b2) = tcp_pair(), tcp_pair()
    seen: list[int] = []

    def broken(mask: int) -> None:
        raise RuntimeError("bug")

    poller.register(b1.fileno(), IN, broken)
    poller.register(b2.fileno(), IN, seen.append)
    a1.send(b"1")
    a2.send(b"2")
    await turns()
    assert seen
    assert errors and isinstance(errors[0]["exception"], RuntimeError)
    for s in (b1, b2):
        poller.forget(s.fileno())
    for s in (a1, b1, a2, b2):
        s.close()
    loop.set_exception_handler(None)


async def test_one_poller_per_loop_released_only_when_idle() -> None:
    loop = asyncio.get_running_loop()
    poller = poller_for(loop)
    assert poller_for(loop) is poller
    a, b = tcp_pair()
    poller.register(b.fileno(), IN, lambda m: None)
    release_poller(loop)  # still watching b: kept
    assert poller_for(loop) is poller
    poller.unregister(b.fileno())
    release_poller(loop)
    fresh = poller_for(loop)
    assert fresh is not poller
    seen: list[int] = []
    fresh.register(b.fileno(), IN, seen.append)
    a.send(b"after")
    await turns()
    assert seen
    fresh.unregister(b.fileno())
    release_poller(loop)
    a.close()
    b.close()


async def test_wait_fd_leaves_nothing_in_the_set_when_ready_or_cancelled() -> None:
    poller = poller_for(asyncio.get_running_loop())
    a, b = tcp_pair()
    waiting = asyncio.ensure_future(wait_fd(b.fileno()))
    await turns()
    assert b.fileno() in watched(poller) and not waiting.done()
    a.send(b"x")
    async with asyncio.timeout(5):
        await waiting
    assert b.fileno() not in watched(poller)
    assert b.recv(1) == b"x"  # consumed nothing
    waiting = asyncio.ensure_future(wait_fd(b.fileno()))
    await turns()
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert b.fileno() not in watched(poller)
    async with asyncio.timeout(5):
        await wait_fd(b.fileno(), writable=True)
    assert b.fileno() not in watched(poller)
    a.close()
    b.close()
