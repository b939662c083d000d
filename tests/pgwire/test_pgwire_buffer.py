"""ReceiveBuffer: cheap consumption from the front and a hard cap."""

from __future__ import annotations

import time

import pytest

from ferryman.errors import LocalProtocolError, RemoteProtocolError
from ferryman.pgwire._buffer import ReceiveBuffer
from ferryman.pgwire._framing import INT32


def test_feed_consume_and_peek() -> None:
    buf = ReceiveBuffer(100)
    assert not buf
    buf.feed(b"\x00\x00\x00\x08abcd")
    assert len(buf) == 8
    assert buf.unpack_from(INT32) == (8,)
    assert buf.byte_at(4) == ord("a")
    assert buf.consume(4) == b"\x00\x00\x00\x08"
    assert buf.peek_all() == b"abcd"
    assert buf.consume(4) == b"abcd"
    assert not buf and len(buf) == 0
    buf.feed(b"xy")
    buf.clear()
    assert buf.peek_all() == b""


def test_cap_is_enforced_on_feed() -> None:
    buf = ReceiveBuffer(10)
    buf.feed(b"x" * 10)
    with pytest.raises(RemoteProtocolError, match="receive buffer limit"):
        buf.feed(b"y")
    buf.consume(5)
    buf.feed(b"y" * 5)  # consumption frees room
    assert buf.max_size == 10


def test_reading_past_the_end_is_a_local_error() -> None:
    buf = ReceiveBuffer(10)
    buf.feed(b"abc")
    with pytest.raises(LocalProtocolError):
        buf.consume(4)
    with pytest.raises(LocalProtocolError):
        buf.unpack_from(INT32)
    with pytest.raises(LocalProtocolError):
        buf.byte_at(3)
    with pytest.raises(ValueError):
        ReceiveBuffer(0)


def test_many_small_consumes_are_linear() -> None:
    # 1 MiB consumed 5 bytes at a time: quadratic copying would take minutes, not milliseconds.
    size = 1 << 20
    buf = ReceiveBuffer(size)
    buf.feed(b"z" * size)
    start = time.perf_counter()
    while buf:
        buf.consume(min(5, len(buf)))
    assert time.perf_counter() - start < 2.0
