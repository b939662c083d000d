"""SessionTracker (idle detection on a relayed session) and ResetExchange (DISCARD ALL), sans I/O:
byte streams built from the protocol's own message layouts, split every way."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferryman import pgwire
from ferryman.errors import RemoteProtocolError
from ferryman.pgwire.reuse import TERMINATE, ResetExchange, SessionTracker


def msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def query(sql: str) -> bytes:
    return msg(b"Q", sql.encode() + b"\0")


def ready(status: bytes = b"I") -> bytes:
    return msg(b"Z", status)


ROWS = msg(b"T", b"\0\x01x\0" + bytes(18)) + msg(b"D", b"\0\x01\0\0\0\x011") + msg(b"C", b"SELECT 1\0")
SYNC = msg(b"S")
PARSE = msg(b"P", b"\0select 1\0\0\0")
BIND = msg(b"B", b"\0\0\0\0\0\0\0\0")
EXECUTE = msg(b"E", b"\0\0\0\0\0")
EXTENDED_ANSWER = msg(b"1") + msg(b"2") + msg(b"D", b"\0\x01\0\0\0\x011") + msg(b"C", b"SELECT 1\0")


def feed(tracker: SessionTracker, client: list[bytes], backend: list[bytes]) -> None:
    for chunk in client:
        assert tracker.client_data(memoryview(chunk)) is False
    for chunk in backend:
        tracker.backend_data(memoryview(chunk))


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


def test_terminate_after_answered_queries_means_reusable() -> None:
    tracker = SessionTracker()
    feed(tracker, [query("select 1")], [ROWS + ready()])
    feed(tracker, [PARSE + BIND + EXECUTE + SYNC], [EXTENDED_ANSWER + ready()])
    assert tracker.idle
    assert tracker.client_data(memoryview(TERMINATE)) is True
    assert not tracker.active  # spent


@pytest.mark.parametrize(
    ("client", "backend", "why"),
    [
        ([query("select pg_sleep(1)")], [], "query not answered yet"),
        ([query("begin")], [msg(b"C", b"BEGIN\0") + ready(b"T")], "transaction block open"),
        ([query("select x")], [msg(b"E", b"SERROR\0\0") + ready(b"E")], "failed transaction"),
        ([PARSE + BIND + EXECUTE], [msg(b"1") + msg(b"2")], "extended protocol without Sync"),
        ([query("select 1")], [ROWS], "answer not complete"),
        ([query("select 1")], [ROWS + ready()[:5]], "ReadyForQuery split before its status"),
        ([query("select 1"), query("select 2")], [ROWS + ready()], "second query outstanding"),
        ([query("copy t from stdin"), msg(b"d", b"1\n")], [msg(b"G", b"\0\0\0")], "COPY in progress"),
    ],
)
def test_not_idle(client: list[bytes], backend: list[bytes], why: str) -> None:
    tracker = SessionTracker()
    feed(tracker, client, backend)
    assert not tracker.idle, why
    assert tracker.client_data(memoryview(TERMINATE)) is False, why


def test_copy_in_finished_is_idle() -> None:
    tracker = SessionTracker()
    feed(
        tracker,
        [query("copy t from stdin"), msg(b"d", b"1\n"), msg(b"c")],
        [msg(b"G", b"\0\0\0"), msg(b"C", b"COPY 1\0") + ready()],
    )
    assert tracker.idle


def test_terminate_behind_other_messages_is_never_withheld() -> None:
    tracker = SessionTracker()
    feed(tracker, [query("select 1")], [ROWS + ready()])
    assert tracker.client_data(memoryview(query("select 2") + TERMINATE)) is False
    assert not tracker.active


def test_garbage_length_gives_up() -> None:
    tracker = SessionTracker()
    assert tracker.client_data(memoryview(b"Q\0\0\0\x02")) is False
    assert not tracker.active
    assert tracker.client_data(memoryview(TERMINATE)) is False


def test_budget_gives_up() -> None:
    tracker = SessionTracker(budget=100)
    big = msg(b"D", bytes(200))
    feed(tracker, [query("select big")], [big])
    assert not tracker.active
    tracker.backend_data(memoryview(ready()))
    assert not tracker.idle


def test_large_messages_are_skipped_by_length() -> None:
    """A 1 MB DataRow whose body happens to contain ReadyForQuery bytes counts as one message."""
    tracker = SessionTracker(budget=10 << 20)
    fake_rfq = ready() * 1000
    row = msg(b"D", fake_rfq + bytes(1 << 20))
    feed(tracker, [query("select big")], splits(row + msg(b"C", b"SELECT 1\0"), [7, 4096, 70000]))
    assert not tracker.idle  # no ReadyForQuery yet: the ones inside the row are data
    tracker.backend_data(memoryview(ready()))
    assert tracker.idle


@given(
    up_cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
    down_cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
    finished=st.booleans(),
)
def test_idle_verdict_does_not_depend_on_how_reads_split(
    up_cuts: list[int], down_cuts: list[int], finished: bool
) -> None:
    client = query("select 1") + PARSE + BIND + EXECUTE + SYNC + query("select 2")
    backend = ROWS + ready() + EXTENDED_ANSWER + ready() + ROWS + (ready() if finished else b"")
    tracker = SessionTracker()
    feed(tracker, splits(client, up_cuts), splits(backend, down_cuts))
    assert tracker.idle is finished


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_random_bytes_never_raise(up: bytes, down: bytes) -> None:
    tracker = SessionTracker()
    tracker.client_data(memoryview(up))
    tracker.backend_data(memoryview(down))
    tracker.client_data(memoryview(TERMINATE))


# -- ResetExchange ------------------------------------------------------------------------


def test_reset_request_is_a_discard_all_query() -> None:
    assert ResetExchange().request() == query("DISCARD ALL")
    assert pgwire.Query("DISCARD ALL").encode() == query("DISCARD ALL")
    assert pgwire.Query.parse(b"DISCARD ALL\0") == pgwire.Query("DISCARD ALL")


def test_reset_ok_collects_parameter_changes_in_any_split() -> None:
    answer = (
        pgwire.ParameterStatus("TimeZone", "UTC").encode()
        + msg(b"A", b"\0\0\0\x01chan\0payload\0")  # a notification that raced the UNLISTEN
        + msg(b"C", b"DISCARD ALL\0")
        + ready()
    )
    for cut in range(1, len(answer)):
        reset = ResetExchange()
        assert reset.receive_data(answer[:cut]) is False
        assert reset.receive_data(answer[cut:]) is True
        assert reset.ok, reset.problem
        assert reset.parameters == {"TimeZone": "UTC"}


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        (msg(b"E", b"SERROR\0C25001\0MDISCARD ALL cannot run inside a transaction block\0\0") + ready(b"T"),
         "DISCARD ALL cannot run inside a transaction block"),
        (msg(b"C", b"DISCARD ALL\0") + ready(b"T"), "transaction status"),
        (ready(), "did not complete"),
        (ROWS + ready(), "unexpected message"),
        (b"", "closed"),
    ],
)  # fmt: skip
def test_reset_failures(answer: bytes, problem: str) -> None:
    reset = ResetExchange()
    assert reset.receive_data(answer) is True
    assert not reset.ok
    assert problem in reset.problem


def test_reset_rejects_malformed_stream() -> None:
    with pytest.raises(RemoteProtocolError):
        ResetExchange().receive_data(b"C\0\0\0\x01")
