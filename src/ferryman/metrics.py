"""Prometheus metrics (SPEC §10): what the gateway counts, and their exposition.

Owns: :class:`Metrics` -- plain counters the connection paths bump (a dict increment per
decision and per close; nothing per byte or per message), and a collector that turns them,
the live sessions and the process's own figures into Prometheus families when scraped.

Labels are bounded: ``listener`` (configured names), ``mode``, ``outcome`` (``allowed`` or a
refusal kind from :mod:`ferryman.errors`), ``reason`` (close reasons), ``direction``. Never a
user, node, address or database name.

Must not: serve HTTP (``ferryman.admin`` does) or decide anything.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from importlib import metadata
from typing import TypeVar

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

DURATION_BUCKETS = (0.01, 0.1, 1.0, 10.0, 60.0, 600.0, 3600.0, 28800.0, 86400.0)
"""Seconds; connections live from milliseconds (a health probe) to days (a psql session)."""

LiveSessions = Callable[[], Iterable[tuple[str, str]]]
"""Returns (listener, mode) of every live session, at scrape time."""


class _Histogram:
    __slots__ = ("buckets", "count", "total")

    def __init__(self) -> None:
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)  # the last one is +Inf
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.buckets[bisect.bisect_left(DURATION_BUCKETS, value)] += 1
        self.count += 1
        self.total += value


class Metrics:
    """The gateway's counters. Single-threaded (the event loop); scrapes read them in place."""

    def __init__(self, live_sessions: LiveSessions | None = None) -> None:
        self.decisions: dict[tuple[str, str, str], int] = {}
        self.closes: dict[tuple[str, str, str], int] = {}
        self.bytes: dict[tuple[str, str, str], int] = {}
        self.durations: dict[tuple[str, str], _Histogram] = {}
        self.reloads: dict[str, int] = {"success": 0, "failure": 0}
        self.last_reload_success = time.time()
        self.live_sessions = live_sessions
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        ProcessCollector(namespace="ferryman", registry=self.registry)

    # -- what the connection paths call -----------------------------------------------

    def decided(self, listener: str, mode: str, outcome: str) -> None:
        """A connection was admitted (``outcome`` = ``allowed``) or refused (its kind)."""
        key = (listener, mode, outcome)
        self.decisions[key] = self.decisions.get(key, 0) + 1

    def closed(self, listener: str, mode: str, reason: str, up: int, down: int, duration: float) -> None:
        """An admitted connection ended."""
        key = (listener, mode, reason)
        self.closes[key] = self.closes.get(key, 0) + 1
        if up:
            k = (listener, mode, "up")
            self.bytes[k] = self.bytes.get(k, 0) + up
        if down:
            k = (listener, mode, "down")
            self.bytes[k] = self.bytes.get(k, 0) + down
        hist = self.durations.get((listener, mode))
        if hist is None:
            hist = self.durations[(listener, mode)] = _Histogram()
        hist.observe(duration)

    def reloaded(self, ok: bool) -> None:
        self.reloads["success" if ok else "failure"] += 1
        if ok:
            self.last_reload_success = time.time()

    def exposition(self) -> bytes:
        """The text format a Prometheus server scrapes."""
        return generate_latest(self.registry)


def _version() -> str:
    try:
        return metadata.version("ferryman")
    except metadata.PackageNotFoundError:
        return "unknown"


_Key = TypeVar("_Key", bound=tuple[str, ...])


def _counter(
    name: str, documentation: str, labels: tuple[str, ...], values: Mapping[_Key, int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(key, value)
    return family


class _Collector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.version = _version()

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        info = InfoMetricFamily("ferryman_build", "The running ferryman.")
        info.add_metric([], {"version": self.version})
        yield info

        yield _counter(
            "ferryman_connections",
            "Connections decided, by outcome: allowed, or the kind of refusal.",
            ("listener", "mode", "outcome"),
            m.decisions,
        )
        yield _counter(
            "ferryman_connections_closed",
            "Admitted connections that ended, by close reason.",
            ("listener", "mode", "reason"),
            m.closes,
        )
        yield _counter(
            "ferryman_bytes",
            "Bytes relayed by connections that ended (up: client to backend).",
            ("listener", "mode", "direction"),
            m.bytes,
        )

        durations = HistogramMetricFamily(
            "ferryman_connection_duration_seconds",
            "How long admitted connections lasted.",
            labels=("listener", "mode"),
        )
        for pair, hist in sorted(m.durations.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*DURATION_BUCKETS, float("inf")), hist.buckets, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            durations.add_metric(list(pair), buckets, hist.total)
        yield durations

        active = GaugeMetricFamily(
            "ferryman_connections_active", "Connections being relayed now.", labels=("listener", "mode")
        )
        counts: dict[tuple[str, str], int] = {}
        for pair in m.live_sessions() if m.live_sessions is not None else ():
            counts[pair] = counts.get(pair, 0) + 1
        for pair, value in sorted(counts.items()):
            active.add_metric(pair, value)
        yield active

        yield _counter(
            "ferryman_config_reloads",
            "Configuration reloads, by result.",
            ("result",),
            {(result,): value for result, value in m.reloads.items()},
        )
        yield GaugeMetricFamily(
            "ferryman_config_last_reload_success_timestamp_seconds",
            "When the running configuration was loaded (start or the last successful reload).",
            value=m.last_reload_success,
        )
