"""Limit counters: max_conns per user and per listener, sliding bandwidth windows."""

import pytest

from ferryman.errors import LimitExceeded
from ferryman.limits.tracker import LimitTracker
from ferryman.policy.model import Bandwidth, Limits


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_max_conns_per_user_across_listeners() -> None:
    tracker = LimitTracker()
    user = Limits(max_conns=2)
    a = tracker.acquire("u", "l1", user, Limits())
    tracker.acquire("u", "l2", user, Limits())
    with pytest.raises(LimitExceeded) as info:
        tracker.acquire("u", "l3", user, Limits())
    assert info.value.limit == "max_conns"
    assert info.value.sqlstate == "53300"
    tracker.acquire("someone-else", "l1", user, Limits())
    a.release()
    a.release()  # idempotent
    tracker.acquire("u", "l3", user, Limits())
    assert tracker.connections("u") == 2


def test_max_conns_per_listener() -> None:
    tracker = LimitTracker()
    per_listener = Limits(max_conns=1)
    tracker.acquire("u", "pg", Limits(), per_listener)
    with pytest.raises(LimitExceeded, match="to pg"):
        tracker.acquire("u", "pg", Limits(), per_listener)
    tracker.acquire("u", "redis", Limits(), per_listener)


def test_bandwidth_window_slides() -> None:
    clock = Clock()
    tracker = LimitTracker(clock)
    window = (Bandwidth(1000, 60.0),)
    tracker.watch("u", window)
    tracker.charge("u", 600)
    clock.now += 30
    tracker.charge("u", 400)
    assert tracker.bandwidth_exceeded("u", window) == window[0]
    with pytest.raises(LimitExceeded, match="bandwidth"):
        tracker.acquire("u", "l", Limits(bandwidth=window), Limits())
    clock.now += 31  # the first 600 bytes have left the window
    assert tracker.usage("u", 60.0) == 400
    assert tracker.bandwidth_exceeded("u", window) is None
    tracker.acquire("u", "l", Limits(bandwidth=window), Limits())
    clock.now += 61
    assert tracker.usage("u", 60.0) == 0


def test_charge_without_watch_is_free() -> None:
    tracker = LimitTracker()
    tracker.charge("u", 10**9)
    assert tracker.bandwidth_exceeded("u", (Bandwidth(1, 60.0),)) is None


def test_prune_forgets_only_windows_nobody_needs() -> None:
    """Every user who ever had a bandwidth window kept one forever; prune drops those with no
    live connection and nothing left in the window, and keeps everything that still counts."""
    clock = Clock()
    tracker = LimitTracker(clock)
    window = (Bandwidth(1000, 60.0),)
    live = tracker.acquire("live", "l", Limits(bandwidth=window), Limits())
    for user in ("live", "gone", "recent"):
        tracker.watch(user, window)
        tracker.charge(user, 100)
    clock.now += 61  # "gone" and "live" have slid out; "recent" is charged again
    tracker.charge("recent", 1000)
    tracker.prune()
    assert set(tracker._windows) == {"live", "recent"}  # live: a connection; recent: bytes counted
    assert tracker.bandwidth_exceeded("recent", window) == window[0]  # its usage was not lost
    live.release()
    tracker.prune()
    assert set(tracker._windows) == {"recent"}
    clock.now += 61
    tracker.prune()
    assert tracker._windows == {}
    tracker.watch("gone", window)  # a returning user starts afresh
    assert tracker.usage("gone", 60.0) == 0
