#!/usr/bin/env python3
"""TCP-mode benchmark: direct vs ferryman (copy / splice) vs HAProxy, in one run.

Measures, per path:

* ``throughput`` -- iperf3, 1 and 8 parallel streams, forward and reverse (``-R``), and the
  proxy's CPU seconds (utime + stime from ``/proc/<pid>/stat``) per GB moved in each run;
* ``redis`` -- ``redis-benchmark -t ping_inline`` against 127.0.0.1:6379 with ``-c 1`` and
  ``-c 50``: requests/s and p99 latency (from ``--csv``);
* ``connrate`` -- new connections per second, one small round trip each, against an echo
  backend started here (for ferryman every connection is identified, authorized and audited);
* ``memory`` -- proxy RSS growth per idle connection with ``--idle-conns`` connections open.

Everything it uses (gateway, HAProxy, iperf3 server, echo server) is started and stopped here,
on loopback only. See bench/README.md for how the CPUs are shared and how to read the table.

Run with the project's virtualenv (uvloop is used when importable)::

    /work/main/.venv/bin/python bench/tcp.py [--seconds 5] [--only throughput,redis] ...

Internal helpers run as ``tcp.py _worker echo|connrate ...`` (started by the bench itself).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import errno
import io
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import uvloop
except ImportError:  # pragma: no cover - the project venv has it
    uvloop = None

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
GB = 1e9

METRICS = ("throughput", "redis", "connrate", "memory")
DEFAULT_PATHS = ("direct", "ferryman", "ferryman-splice", "haproxy", "haproxy-buf64k")
OPTIONAL_PATHS = ("haproxy-splice", "python-floor")
HAPROXY_BASELINES = ("haproxy", "haproxy-buf64k")
"""The HAProxy variants whose better value (per row) is the comparison baseline."""
FERRYMAN_PATHS = ("ferryman", "ferryman-splice")
RATED_PATHS = (*FERRYMAN_PATHS, "python-floor")
"""Paths with ratio and target columns: ferryman's, and the Python floor for reference."""

IPERF_RUNS = ((1, False), (8, False), (1, True), (8, True))
"""(parallel streams, reverse)."""

REDIS_CLIENTS = (1, 50)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Process and /proc helpers


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime field 14, stime field 15 (1-based).
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def proc_fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _cpu_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values[:8]), idle


def machine_busy(interval: float = 0.5) -> float:
    """Fraction of all CPUs busy over ``interval`` seconds (0..1)."""
    total0, idle0 = _cpu_jiffies()
    time.sleep(interval)
    total1, idle1 = _cpu_jiffies()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_quiet(ctx: Ctx, what: str) -> float:
    """Wait (up to ``--wait-idle`` seconds) until the machine is idle; return the last busy sample.

    Other processes on a 2-CPU machine distort every row, so the bench waits for them and records
    how busy the machine was just before each measurement.
    """
    deadline = time.monotonic() + ctx.args.wait_idle
    busy = machine_busy()
    warned = False
    while busy > ctx.args.idle_threshold and time.monotonic() < deadline:
        if not warned:
            log(f"machine {busy * 100:.0f}% busy before {what}: waiting up to {ctx.args.wait_idle:g}s")
            warned = True
        busy = machine_busy(1.0)
    if busy > ctx.args.idle_threshold:
        msg = f"{what}: machine was {busy * 100:.0f}% busy with other work when it started"
        log(msg)
        ctx.notes.append(msg)
    ctx.busy[what] = round(busy, 3)
    return busy


def listening_ports() -> set[int]:
    """Ports in LISTEN state on 127.0.0.1 or 0.0.0.0 (IPv4)."""
    ports = set()
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            local, state = parts[1], parts[3]
            if state != "0A":
                continue
            addr, port = local.split(":")
            if addr in ("0100007F", "00000000"):
                ports.add(int(port, 16))
    return ports


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Procs:
    """Every child process the bench starts; :meth:`stop_all` ends them (also on Ctrl-C)."""

    def __init__(self, tmp: Path, tool_cpus: set[int] | None, proxy_cpus: set[int] | None) -> None:
        self.tmp = tmp
        self.tool_cpus = tool_cpus
        self.proxy_cpus = proxy_cpus
        self.live: dict[int, tuple[str, subprocess.Popen[bytes]]] = {}

    def start(self, name: str, cmd: list[str], *, role: str) -> subprocess.Popen[bytes]:
        """Start ``cmd`` in its own session (Ctrl-C reaches only the bench), output to a log file."""
        cpus = self.proxy_cpus if role == "proxy" else self.tool_cpus
        logf = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - closed right after Popen
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
            )
        finally:
            logf.close()
        self.live[proc.pid] = (name, proc)
        return proc

    def run(self, name: str, cmd: list[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
        """Run a load generator to completion on the tool CPUs; raise on timeout."""
        cpus = self.tool_cpus
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
        self.live[proc.pid] = (name, proc)  # type: ignore[assignment]
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(proc)
            raise RuntimeError(f"{name} did not finish within {timeout:.0f}s") from None
        except BaseException:  # Ctrl-C: the child runs in its own session, stop it here
            self.stop(proc, timeout=5.0)
            raise
        finally:
            self.live.pop(proc.pid, None)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.tmp / f"{name}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
        self.live.pop(proc.pid, None)
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(5)

    def stop_all(self) -> None:
        for _, proc in list(self.live.values()):
            self.stop(proc, timeout=5.0)


def wait_listening(
    port: int, proc: subprocess.Popen[Any], procs: Procs, name: str, timeout: float = 15.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{procs.log_tail(name)}")
        if port in listening_ports():
            return
        time.sleep(0.02)
    raise RuntimeError(f"{name} is not listening on {port} after {timeout:.0f}s:\n{procs.log_tail(name)}")


# ----------------------------------------------------------------------------------------------
# Proxies


@dataclass
class Ctx:
    args: argparse.Namespace
    tmp: Path
    procs: Procs
    ferryman_bin: str
    haproxy_bin: str | None
    idle_conns: int
    haproxy_maxconn: int
    counter: int = 0
    notes: list[str] = field(default_factory=list)
    busy: dict[str, float] = field(default_factory=dict)
    """Machine busy fraction sampled just before each (metric, path) measurement."""

    def next_name(self, stem: str) -> str:
        self.counter += 1
        return f"{self.counter:03d}-{stem}"


FERRYMAN_TOML = """\
log_level = "info"
log_format = "text"
policy_file = "{policy}"

[audit]
file = "{audit}"

[shutdown]
grace = "1s"

[[identity.static]]
cidr = "127.0.0.0/8"
user = "bench@localhost"
groups = ["bench"]

[[listeners]]
name = "bench"
listen = "{host}:{port}"
backend = "{host}:{backend}"
"""

FERRYMAN_POLICY = {
    "groups": {"group:bench": ["bench@localhost"]},
    "grants": [
        {"src": ["group:bench"], "app": {"ferryman.dev/cap/ferryman": [{"backends": {"bench": {}}}]}},
    ],
}

HAPROXY_CFG = """\
global
    maxconn {maxconn}
    nbthread {threads}
{tune}
defaults
    mode tcp
    maxconn {maxconn}
    timeout connect 5s
    timeout client 1h
    timeout server 1h
{extra}
listen bench
    bind {host}:{port}
    server backend {host}:{backend}
"""


@dataclass
class Proxy:
    path: str
    port: int
    proc: subprocess.Popen[bytes] | None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


@contextlib.contextmanager
def proxy_for(ctx: Ctx, path: str, backend_port: int, metric: str) -> Iterator[Proxy]:
    """A fresh proxy (or none for ``direct``) in front of ``backend_port`` for one metric."""
    if path == "direct":
        yield Proxy(path, backend_port, None)
        return
    name = ctx.next_name(f"{path}-{metric}")
    port = free_port()
    if path == "python-floor":
        cmd = [sys.executable, str(Path(__file__).resolve()), "_worker", "floor", "--port", str(port)]
        cmd += ["--backend", str(backend_port)]
    elif path.startswith("ferryman"):
        cfg = ctx.tmp / f"{name}.toml"
        cfg.write_text(
            FERRYMAN_TOML.format(
                policy=ctx.tmp / "policy.json",
                audit=ctx.tmp / f"{name}.audit.jsonl",
                host=HOST,
                port=port,
                backend=backend_port,
            )
        )
        cmd = [ctx.ferryman_bin, "serve", "-c", str(cfg)]
        if path == "ferryman-splice":
            cmd.append("--splice")
    else:
        assert ctx.haproxy_bin is not None
        tune = "    tune.bufsize 65536\n" if path == "haproxy-buf64k" else ""
        extra = "    option splice-auto\n" if path == "haproxy-splice" else ""
        cfg = ctx.tmp / f"{name}.cfg"
        cfg.write_text(
            HAPROXY_CFG.format(
                maxconn=ctx.haproxy_maxconn,
                threads=ctx.args.haproxy_threads,
                tune=tune,
                extra=extra,
                host=HOST,
                port=port,
                backend=backend_port,
            )
        )
        cmd = [ctx.haproxy_bin, "-f", str(cfg), "-db"]
    proc = ctx.procs.start(name, cmd, role="proxy")
    try:
        wait_listening(port, proc, ctx.procs, name)
        yield Proxy(path, port, proc)
    finally:
        ctx.procs.stop(proc)


# ----------------------------------------------------------------------------------------------
# Backends


def start_echo(ctx: Ctx) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    name = ctx.next_name("echo")
    cmd = [sys.executable, str(Path(__file__).resolve()), "_worker", "echo", "--port", str(port)]
    proc = ctx.procs.start(name, cmd, role="tool")
    wait_listening(port, proc, ctx.procs, name)
    return proc, port


def start_iperf_server(ctx: Ctx, port: int | None = None) -> tuple[subprocess.Popen[bytes], int]:
    port = port or free_port()
    name = ctx.next_name("iperf3-server")
    proc = ctx.procs.start(name, ["iperf3", "-s", "-B", HOST, "-p", str(port)], role="tool")
    wait_listening(port, proc, ctx.procs, name)
    return proc, port


def redis_alive(port: int = 6379) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------
# Metrics

Results = dict[str, dict[str, Any]]
"""row key → path → value (plus ``_raw`` details per row key)."""


def put(results: Results, key: str, path: str, value: Any) -> None:
    results.setdefault(key, {})[path] = value


def iperf_key(streams: int, reverse: bool) -> str:
    return f"P{streams}-{'rev' if reverse else 'fwd'}"


def bench_throughput(ctx: Ctx, paths: list[str], results: Results, raw: dict[str, Any]) -> None:
    seconds = ctx.args.seconds
    for path in paths:
        wait_quiet(ctx, f"throughput/{path}")
        server, server_port = start_iperf_server(ctx)
        try:
            with proxy_for(ctx, path, server_port, "iperf") as proxy:
                for streams, reverse in IPERF_RUNS:
                    key = iperf_key(streams, reverse)
                    cmd = [
                        "iperf3",
                        "-c",
                        HOST,
                        "-p",
                        str(proxy.port),
                        "-t",
                        str(seconds),
                        "-P",
                        str(streams),
                        "-J",
                    ]
                    if reverse:
                        cmd.append("-R")
                    cpu0 = proc_cpu_seconds(proxy.pid) if proxy.pid else None
                    done = ctx.procs.run("iperf3-client", cmd, timeout=seconds + 30)
                    cpu1 = proc_cpu_seconds(proxy.pid) if proxy.pid else None
                    try:
                        data = json.loads(done.stdout)
                    except json.JSONDecodeError:
                        data = {"error": f"no JSON from iperf3: {done.stderr.strip()[:300]}"}
                    if "error" in data or done.returncode != 0:
                        msg = f"iperf3 {key} via {path} failed: {data.get('error', done.stderr.strip())}"
                        log(msg)
                        ctx.notes.append(msg)
                        # A failed test can leave the server waiting; restart it on its port.
                        ctx.procs.stop(server)
                        server, server_port = start_iperf_server(ctx, server_port)
                        continue
                    recv = data["end"]["sum_received"]
                    gbps = recv["bits_per_second"] / 1e9
                    moved = float(recv["bytes"])
                    put(results, f"tput-{key}", path, gbps)
                    entry: dict[str, Any] = {
                        "gbit_per_s": gbps,
                        "bytes": moved,
                        "seconds": recv["seconds"],
                        "retransmits": data["end"].get("sum_sent", {}).get("retransmits"),
                        "iperf_cpu_percent": data["end"].get("cpu_utilization_percent"),
                    }
                    if cpu0 is not None and cpu1 is not None:
                        cpu = cpu1 - cpu0
                        entry["proxy_cpu_s"] = cpu
                        entry["proxy_cpu_util"] = cpu / float(recv["seconds"] or seconds)
                        put(results, f"cpu-{key}", path, cpu / (moved / GB) if moved else None)
                    raw.setdefault("throughput", {}).setdefault(path, {})[key] = entry
                    util = (
                        f", proxy CPU {entry['proxy_cpu_util'] * 100:.0f}%"
                        if "proxy_cpu_util" in entry
                        else ""
                    )
                    log(f"iperf3 {key:7s} {path:18s} {gbps:7.2f} Gbit/s{util}")
                    time.sleep(0.3)
        finally:
            ctx.procs.stop(server)


def parse_redis_csv(text: str) -> dict[str, float]:
    rows = list(csv.reader(io.StringIO(text)))
    header = next((r for r in rows if r and r[0] == "test"), None)
    for row in rows:
        if row and row[0].upper() == "PING_INLINE" and header:
            return {h: float(v) for h, v in zip(header[1:], row[1:], strict=False)}
    raise RuntimeError(f"no PING_INLINE row in redis-benchmark output: {text[:300]!r}")


def redis_run(ctx: Ctx, port: int, clients: int, requests: int) -> dict[str, float]:
    cmd = [
        "redis-benchmark",
        "-h",
        HOST,
        "-p",
        str(port),
        "-t",
        "ping_inline",
        "-c",
        str(clients),
        "-n",
        str(requests),
        "--csv",
    ]
    done = ctx.procs.run("redis-benchmark", cmd, timeout=max(60.0, ctx.args.seconds * 6))
    if done.returncode != 0:
        raise RuntimeError(f"redis-benchmark failed: {done.stderr.strip()[:300]}")
    return parse_redis_csv(done.stdout)


def start_own_redis(ctx: Ctx) -> tuple[subprocess.Popen[bytes], int]:
    """A private redis-server (no persistence) on a free port, pinned with the load generators."""
    port = free_port()
    name = ctx.next_name("redis-server")
    cmd = [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        HOST,
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(ctx.tmp),
        "--daemonize",
        "no",
    ]
    proc = ctx.procs.start(name, cmd, role="tool")
    wait_listening(port, proc, ctx.procs, name)
    return proc, port


def bench_redis(ctx: Ctx, paths: list[str], results: Results, raw: dict[str, Any]) -> None:
    own: subprocess.Popen[bytes] | None = None
    if ctx.args.own_redis:
        own, redis_port = start_own_redis(ctx)
    else:
        redis_port = 6379
        if not redis_alive(redis_port):
            msg = "redis: nothing answers PING on 127.0.0.1:6379; redis rows skipped"
            log(msg)
            ctx.notes.append(msg)
            return
    rounds = max(1, ctx.args.redis_rounds)
    sizes: dict[tuple[str, int], int] = {}
    samples: dict[tuple[str, int], list[dict[str, float]]] = {}
    try:
        # Rounds are interleaved (every path once, then again), so slow drift in the machine's
        # state hits every path alike; the median of the rounds is reported.
        for rnd in range(rounds):
            for path in paths:
                wait_quiet(ctx, f"redis/{path}/round{rnd + 1}")
                with proxy_for(ctx, path, redis_port, "redis") as proxy:
                    for clients in REDIS_CLIENTS:
                        key = (path, clients)
                        if key not in sizes:
                            # A short probe sizes the real run to about --seconds.
                            probe = redis_run(ctx, proxy.port, clients, 2000 if clients == 1 else 20000)
                            sizes[key] = max(2000, int(probe["rps"] * ctx.args.seconds))
                        else:
                            redis_run(ctx, proxy.port, clients, 1000)  # warm-up of the fresh proxy
                        stats = redis_run(ctx, proxy.port, clients, sizes[key])
                        samples.setdefault(key, []).append(stats)
                        log(
                            f"redis c={clients:<3d} {path:18s} {stats['rps']:9.0f} req/s"
                            f"  p50 {stats['p50_latency_ms']:.3f} ms  p99 {stats['p99_latency_ms']:.3f} ms"
                            f"  (round {rnd + 1}/{rounds})"
                        )
    finally:
        if own is not None:
            ctx.procs.stop(own)
    for (path, clients), runs in samples.items():
        rps = statistics.median(r["rps"] for r in runs)
        p99 = statistics.median(r["p99_latency_ms"] for r in runs)
        put(results, f"redis-c{clients}-rps", path, rps)
        put(results, f"redis-c{clients}-p99", path, p99)
        raw.setdefault("redis", {}).setdefault(path, {})[f"c{clients}"] = {
            "requests": sizes[(path, clients)],
            "median_rps": rps,
            "median_p99_ms": p99,
            "rounds": runs,
        }


def bench_connrate(ctx: Ctx, paths: list[str], results: Results, raw: dict[str, Any]) -> None:
    seconds = ctx.args.seconds
    echo, echo_port = start_echo(ctx)
    try:
        for path in paths:
            wait_quiet(ctx, f"connrate/{path}")
            with proxy_for(ctx, path, echo_port, "connrate") as proxy:
                cmd = [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "_worker",
                    "connrate",
                    "--port",
                    str(proxy.port),
                    "--concurrency",
                    str(ctx.args.conn_concurrency),
                    "--seconds",
                    str(seconds),
                ]
                echo_cpu0 = proc_cpu_seconds(echo.pid)
                proxy_cpu0 = proc_cpu_seconds(proxy.pid) if proxy.pid else None
                done = ctx.procs.run("connrate-client", cmd, timeout=seconds + 60)
                echo_cpu = proc_cpu_seconds(echo.pid) - echo_cpu0
                if done.returncode != 0:
                    raise RuntimeError(f"connrate client failed: {done.stderr.strip()[-500:]}")
                data = json.loads(done.stdout)
                if proxy_cpu0 is not None and proxy.pid:
                    data["proxy_cpu_util"] = (proc_cpu_seconds(proxy.pid) - proxy_cpu0) / data["elapsed"]
                data["echo_cpu_util"] = echo_cpu / data["elapsed"]
                tools = data["client_cpu_util"] + data["echo_cpu_util"]
                data["tools_cpu_util"] = tools
                ncpu = len(ctx.procs.tool_cpus) if ctx.procs.tool_cpus else os.cpu_count() or 1
                data["tools_bound"] = tools >= 0.9 * ncpu
                put(results, "connrate", path, data["rate"])
                if data.get("proxy_cpu_util"):
                    put(results, "connrate-cpu", path, data["rate"] / data["proxy_cpu_util"])
                raw.setdefault("connrate", {})[path] = data
                pu = f", proxy CPU {data['proxy_cpu_util'] * 100:.0f}%" if "proxy_cpu_util" in data else ""
                log(
                    f"connrate {path:18s} {data['rate']:8.0f} conn/s  errors {data['errors']}"
                    f"  p99 {data['p99_ms']:.2f} ms  load generators {tools * 100:.0f}% CPU{pu}"
                )
                time.sleep(1.0)
    finally:
        ctx.procs.stop(echo)


async def _open_idle(port: int, count: int, socks: list[socket.socket]) -> int:
    """Open ``count`` connections to ``port``, appending them to ``socks``; return failures."""
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(256)
    failures = 0

    async def one() -> None:
        nonlocal failures
        async with sem:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                async with asyncio.timeout(10):
                    await loop.sock_connect(sock, (HOST, port))
            except (OSError, TimeoutError):
                sock.close()
                failures += 1
                return
            socks.append(sock)

    await asyncio.gather(*(one() for _ in range(count)))
    return failures


async def _memory_probe(proxy: Proxy, count: int) -> dict[str, Any]:
    pid = proxy.pid
    assert pid is not None
    # Warm-up: a few connections opened and closed, so first-use allocations are in "before".
    warm: list[socket.socket] = []
    await _open_idle(proxy.port, 50, warm)
    await asyncio.sleep(0.3)
    for s in warm:
        s.close()
    await asyncio.sleep(1.0)
    fds0 = proc_fd_count(pid)
    rss0 = proc_rss_kib(pid)
    socks: list[socket.socket] = []
    t0 = time.monotonic()
    try:
        failures = await _open_idle(proxy.port, count, socks)
        opened = len(socks)
        # Wait until the proxy holds both sides of every connection (it accepts and dials
        # asynchronously), or until its descriptor count stops growing.
        target = fds0 + 2 * opened
        last, stable_since = -1, time.monotonic()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            fds = proc_fd_count(pid)
            if fds >= target:
                break
            if fds != last:
                last, stable_since = fds, time.monotonic()
            elif time.monotonic() - stable_since > 3:
                break
            await asyncio.sleep(0.1)
        setup = time.monotonic() - t0
        await asyncio.sleep(1.0)
        fds1 = proc_fd_count(pid)
        rss1 = proc_rss_kib(pid)
    finally:
        for s in socks:
            s.close()
    held = (fds1 - fds0) // 2
    return {
        "requested": count,
        "opened": opened,
        "failures": failures,
        "proxy_held": held,
        "rss_before_kib": rss0,
        "rss_after_kib": rss1,
        "kib_per_conn": (rss1 - rss0) / held if held > 0 else None,
        "setup_seconds": setup,
    }


def bench_memory(ctx: Ctx, paths: list[str], results: Results, raw: dict[str, Any]) -> None:
    echo, echo_port = start_echo(ctx)
    try:
        for path in paths:
            if path == "direct":
                continue
            wait_quiet(ctx, f"memory/{path}")
            with proxy_for(ctx, path, echo_port, "memory") as proxy:
                try:
                    data = run_async(_interruptible(_memory_probe(proxy, ctx.idle_conns)))
                finally:
                    install_signal_handlers()
            put(results, "idle-kib", path, data["kib_per_conn"])
            raw.setdefault("memory", {})[path] = data
            if data["proxy_held"] < data["requested"]:
                msg = f"memory via {path}: only {data['proxy_held']} of {data['requested']} connections held"
                log(msg)
                ctx.notes.append(msg)
            kib = data["kib_per_conn"]
            log(
                f"memory {path:18s} {kib if kib is not None else float('nan'):6.2f} KiB/conn "
                f"(RSS {data['rss_before_kib']} → {data['rss_after_kib']} KiB, {data['proxy_held']} conns, "
                f"set up in {data['setup_seconds']:.1f}s)"
            )
            time.sleep(1.0)
    finally:
        ctx.procs.stop(echo)


def run_async(coro: Any) -> Any:
    if uvloop is not None:
        return uvloop.run(coro)
    return asyncio.run(coro)


async def _interruptible(coro: Any) -> Any:
    """Run ``coro``; SIGINT/SIGTERM cancel it and surface as KeyboardInterrupt (so the bench
    cleans up) instead of relying on the runner's own SIGINT handling."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    interrupted = False

    def on_signal() -> None:
        nonlocal interrupted
        interrupted = True
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        return await coro
    except asyncio.CancelledError:
        if interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


# ----------------------------------------------------------------------------------------------
# Report


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    unit: str
    fmt: str
    higher_is_better: bool
    vs_haproxy: tuple[str, float] | None = None
    """(">=" or "<=", ratio) that ferryman/haproxy must meet."""
    vs_direct: tuple[str, float] | None = None
    absolute: tuple[str, float] | None = None


def rows() -> list[Row]:
    out = []
    for streams, reverse in IPERF_RUNS:
        key = iperf_key(streams, reverse)
        out.append(Row(f"tput-{key}", f"iperf3 {key}", "Gbit/s", "{:.2f}", True, (">=", 1.1), (">=", 0.55)))
    for streams, reverse in IPERF_RUNS:
        key = iperf_key(streams, reverse)
        out.append(Row(f"cpu-{key}", f"CPU/GB {key}", "s/GB", "{:.3f}", False, ("<=", 0.8)))
    for clients in REDIS_CLIENTS:
        out.append(Row(f"redis-c{clients}-rps", f"redis c={clients}", "req/s", "{:,.0f}", True, (">=", 1.0)))
        out.append(Row(f"redis-c{clients}-p99", f"redis c={clients} p99", "ms", "{:.3f}", False))
    out.append(Row("connrate", "new conns", "conn/s", "{:,.0f}", True, (">=", 0.9)))
    out.append(Row("connrate-cpu", "new conns/CPU-s", "conn/cpu-s", "{:,.0f}", True))
    out.append(Row("idle-kib", "idle conn mem", "KiB/conn", "{:.2f}", False, absolute=("<=", 20.0)))
    return out


def haproxy_best(row: Row, values: dict[str, Any]) -> tuple[float | None, str | None]:
    candidates = [(values[p], p) for p in HAPROXY_BASELINES if values.get(p) is not None]
    if not candidates:
        return None, None
    pick = max if row.higher_is_better else min
    return pick(candidates, key=lambda c: c[0])


def meets(op: str, value: float, bound: float) -> bool:
    return value >= bound if op == ">=" else value <= bound


def evaluate(results: Results) -> dict[str, dict[str, Any]]:
    """Per row: the HAProxy baseline and, per ferryman variant, ratios and pass/fail."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows():
        values = results.get(row.key)
        if not values:
            continue
        hap, hap_path = haproxy_best(row, values)
        direct = values.get("direct")
        entry: dict[str, Any] = {"haproxy_best": hap, "haproxy_best_path": hap_path}
        for fm in RATED_PATHS:
            v = values.get(fm)
            if v is None:
                continue
            checks: list[bool] = []
            r_hap = v / hap if hap else None
            r_dir = v / direct if direct else None
            if row.vs_haproxy and r_hap is not None:
                checks.append(meets(row.vs_haproxy[0], r_hap, row.vs_haproxy[1]))
            if row.vs_direct and r_dir is not None:
                checks.append(meets(row.vs_direct[0], r_dir, row.vs_direct[1]))
            if row.absolute:
                checks.append(meets(row.absolute[0], v, row.absolute[1]))
            entry[fm] = {
                "value": v,
                "ratio_haproxy": r_hap,
                "ratio_direct": r_dir,
                "pass": all(checks) if checks else None,
            }
        out[row.key] = entry
    return out


def target_text(row: Row) -> str:
    parts = []
    if row.vs_haproxy:
        parts.append(f"{row.vs_haproxy[0]}{row.vs_haproxy[1]:g}x hap")
    if row.vs_direct:
        parts.append(f"{row.vs_direct[0]}{row.vs_direct[1]:g}x dir")
    if row.absolute:
        parts.append(f"{row.absolute[0]}{row.absolute[1]:g}")
    return ", ".join(parts) or "-"


def render(results: Results, evaluation: dict[str, dict[str, Any]], paths: list[str]) -> str:
    def fmt(row: Row, v: Any) -> str:
        return "n/a" if v is None else row.fmt.format(v)

    lines: list[str] = []
    table_rows = [r for r in rows() if r.key in results]
    head = ["metric", "unit", *paths]
    body = [[r.label, r.unit, *(fmt(r, results[r.key].get(p)) for p in paths)] for r in table_rows]
    lines += _grid(head, body, "Absolute numbers (n/a: not applicable or not measured)")
    lines.append("")

    fms = [p for p in RATED_PATHS if p in paths]
    short = {"ferryman": "fm", "ferryman-splice": "fm-splice", "python-floor": "floor"}
    head = ["metric", "haproxy best", *(f"{short[f]}/hap" for f in fms), *(f"{short[f]}/direct" for f in fms)]
    head += ["target", *(f"{short[f]}" for f in fms)]
    body = []
    for r in table_rows:
        ev = evaluation.get(r.key, {})
        hap = ev.get("haproxy_best")
        hap_txt = (
            "n/a"
            if hap is None
            else f"{fmt(r, hap)} ({'64k' if ev['haproxy_best_path'] == 'haproxy-buf64k' else 'def'})"
        )

        def ratio(f: str, which: str, ev: dict[str, Any] = ev) -> str:
            v = ev.get(f, {}).get(which)
            return "-" if v is None else f"{v:.3g}x"

        def verdict(f: str, ev: dict[str, Any] = ev) -> str:
            p = ev.get(f, {}).get("pass")
            return "-" if p is None else ("PASS" if p else "FAIL")

        body.append(
            [
                r.label,
                hap_txt,
                *(ratio(f, "ratio_haproxy") for f in fms),
                *(ratio(f, "ratio_direct") for f in fms),
                target_text(r),
                *(verdict(f) for f in fms),
            ]
        )
    lines += _grid(
        head, body, "Ratios and targets (haproxy best = better of default and tune.bufsize 65536, per row)"
    )
    return "\n".join(lines)


def _grid(head: list[str], body: list[list[str]], title: str) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body, strict=False)]

    def line(cells: list[str]) -> str:
        first = f"{cells[0]:<{widths[0]}}"
        rest = [f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:], strict=False)]
        return "  ".join([first, *rest])

    return [title, line(head), "  ".join("-" * w for w in widths), *(line(b) for b in body)]


def source_state() -> dict[str, Any]:
    """The commit the gateway was built from and whether src/ had local changes (read-only git)."""

    def git(*argv: str) -> str:
        try:
            done = subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    changed = git("status", "--porcelain", "--", "src")
    return {"commit": git("rev-parse", "HEAD") or None, "src_changed_files": len(changed.splitlines())}


def tool_versions(haproxy: str | None) -> dict[str, str]:
    def first_line(cmd: list[str]) -> str:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "unavailable"
        return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr) else ""

    out = {
        "iperf3": first_line(["iperf3", "--version"]),
        "redis-benchmark": first_line(["redis-benchmark", "--version"]),
        "python": sys.version.split()[0],
        "uvloop": getattr(uvloop, "__version__", "absent") if uvloop else "absent",
        "kernel": platform.release(),
    }
    if haproxy:
        out["haproxy"] = first_line([haproxy, "-v"])
    return out


# ----------------------------------------------------------------------------------------------
# Worker processes (echo backend, connection-rate client)


class _Echo(asyncio.Protocol):
    __slots__ = ("transport",)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close our side too


async def _echo_main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Echo, HOST, port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


class _FloorPump:
    """One direction of the floor proxy: recv, send, park the rest and stop reading until the
    destination drains, pass EOF on as a half-close."""

    __slots__ = ("dst", "eof", "loop", "other", "pending", "src")

    def __init__(self, loop: asyncio.AbstractEventLoop, src: socket.socket, dst: socket.socket) -> None:
        self.loop, self.src, self.dst = loop, src, dst
        self.pending = b""
        self.eof = False
        self.other: _FloorPump | None = None

    def readable(self) -> None:
        try:
            data = self.src.recv(FLOOR_BUFFER)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not data:
            self.eof = True
            self.loop.remove_reader(self.src.fileno())
            with contextlib.suppress(OSError):
                self.dst.shutdown(socket.SHUT_WR)
            if self.other is not None and self.other.eof:
                self.close()
            return
        try:
            sent = self.dst.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close()
            return
        if sent < len(data):
            self.pending = data[sent:]
            self.loop.remove_reader(self.src.fileno())
            self.loop.add_writer(self.dst.fileno(), self.writable)

    def writable(self) -> None:
        try:
            sent = self.dst.send(self.pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        self.pending = self.pending[sent:]
        if not self.pending:
            self.loop.remove_writer(self.dst.fileno())
            self.loop.add_reader(self.src.fileno(), self.readable)

    def close(self) -> None:
        for pump in (self, self.other):
            if pump is None or pump.src.fileno() < 0:
                continue
            self.loop.remove_reader(pump.src.fileno())
            self.loop.remove_writer(pump.dst.fileno())
        for sock in (self.src, self.dst):
            sock.close()


FLOOR_BUFFER = 262144


async def _floor_main(port: int, backend: int) -> None:
    """The ``python-floor`` path: the least a Python proxy on uvloop can do per connection and
    per message -- accept, connect, relay with back-pressure and half-close, close -- with no
    identity, policy, limits, audit, timers or tasks. Not a product: a measuring stick for
    what CPython itself costs, next to ferryman and HAProxy in the same run."""
    loop = asyncio.get_running_loop()
    listener = socket.create_server((HOST, port), backlog=4096)
    listener.setblocking(False)
    target = (HOST, backend)

    def start(client: socket.socket) -> None:
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = upstream.connect_ex(target)
        if err not in (0, errno.EINPROGRESS):
            client.close()
            upstream.close()
            return

        def connected() -> None:
            loop.remove_writer(upstream.fileno())
            if upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                client.close()
                upstream.close()
                return
            up, down = _FloorPump(loop, client, upstream), _FloorPump(loop, upstream, client)
            up.other, down.other = down, up
            loop.add_reader(client.fileno(), up.readable)
            loop.add_reader(upstream.fileno(), down.readable)

        loop.add_writer(upstream.fileno(), connected)

    def accept() -> None:
        for _ in range(64):
            try:
                client, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            start(client)

    loop.add_reader(listener.fileno(), accept)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    listener.close()


async def _connrate_main(
    port: int, concurrency: int, seconds: float, warmup: float, size: int
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    request = b"x" * size
    state = {"stop": False}
    latencies: list[float] = []
    counted = 0
    errors = 0
    err_kinds: dict[str, int] = {}
    window = [0.0, 0.0]

    class Client(asyncio.Protocol):
        __slots__ = ("done", "got", "transport")

        def __init__(self, done: asyncio.Future[bool]) -> None:
            self.done = done
            self.got = 0

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]
            self.transport.write(request)

        def data_received(self, data: bytes) -> None:
            self.got += len(data)
            if self.got >= size:
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            if not self.done.done():
                self.done.set_result(self.got >= size)

    async def worker() -> None:
        nonlocal counted, errors
        while not state["stop"]:
            t0 = time.perf_counter()
            done: asyncio.Future[bool] = loop.create_future()
            try:
                async with asyncio.timeout(10):
                    await loop.create_connection(lambda done=done: Client(done), HOST, port)
                    ok = await done
            except (OSError, TimeoutError) as exc:
                ok = False
                kind = errno.errorcode.get(getattr(exc, "errno", 0) or 0, type(exc).__name__)
                err_kinds[kind] = err_kinds.get(kind, 0) + 1
            t1 = time.perf_counter()
            if window[0] <= t1 <= window[1]:
                if ok:
                    counted += 1
                    latencies.append(t1 - t0)
                else:
                    errors += 1
            if not ok:
                await asyncio.sleep(0.01)

    start = time.perf_counter()
    window[0] = start + warmup
    window[1] = window[0] + seconds
    cpu0 = os.times()
    tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
    await asyncio.sleep(warmup + seconds)
    state["stop"] = True
    cpu1 = os.times()
    await asyncio.wait(tasks, timeout=15)
    for t in tasks:
        t.cancel()
    elapsed = seconds + warmup
    latencies.sort()

    def pct(q: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")
        )

    return {
        "rate": counted / seconds,
        "connections": counted,
        "errors": errors,
        "error_kinds": err_kinds,
        "seconds": seconds,
        "elapsed": elapsed,
        "concurrency": concurrency,
        "request_bytes": size,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "client_cpu_util": ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)) / elapsed,
    }


def worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tcp.py _worker")
    parser.add_argument("kind", choices=["echo", "connrate", "floor"])
    parser.add_argument("--backend", type=int, help="floor: the port to relay to")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args(argv)
    raise_nofile(None)
    if args.kind == "echo":
        run_async(_echo_main(args.port))
        return 0
    if args.kind == "floor":
        run_async(_floor_main(args.port, args.backend))
        return 0
    result = run_async(_connrate_main(args.port, args.concurrency, args.seconds, args.warmup, args.size))
    print(json.dumps(result))
    return 0


# ----------------------------------------------------------------------------------------------
# Main


def raise_nofile(wanted: int | None) -> int:
    """Raise RLIMIT_NOFILE (soft to hard; hard to ``wanted`` when privileged). Return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if wanted is not None and hard != resource.RLIM_INFINITY and hard < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            soft, hard = wanted, wanted
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def _on_term(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def install_signal_handlers() -> None:
    """SIGTERM and SIGINT raise KeyboardInterrupt, which runs the clean-up. SIGINT is set
    explicitly: a shell that starts the bench as a background job leaves it ignored."""
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/tcp.py",
        description="Side-by-side TCP benchmark: direct vs ferryman vs HAProxy (see bench/README.md).",
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each timed run (default 5)")
    parser.add_argument(
        "--only",
        default=",".join(METRICS),
        help=f"comma-separated subset of {','.join(METRICS)} (CPU/GB comes with throughput)",
    )
    parser.add_argument(
        "--paths",
        default=",".join(DEFAULT_PATHS),
        help=f"comma-separated subset of {','.join(DEFAULT_PATHS + OPTIONAL_PATHS)}",
    )
    parser.add_argument(
        "--redis-rounds",
        type=int,
        default=3,
        help="interleaved rounds of the redis rows; the median is reported (default 3)",
    )
    parser.add_argument(
        "--own-redis",
        action="store_true",
        help="run a private redis-server pinned with the load generators instead of 127.0.0.1:6379",
    )
    parser.add_argument("--idle-conns", type=int, default=10000, help="idle connections for the memory row")
    parser.add_argument(
        "--conn-concurrency", type=int, default=50, help="concurrent workers for the connrate row"
    )
    parser.add_argument(
        "--haproxy-threads", type=int, default=1, help="HAProxy nbthread (default 1, like ferryman)"
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin the proxy and the tools to separate CPUs"
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=120.0,
        help="before each measurement wait up to this many seconds for other CPU load to stop (default 120)",
    )
    parser.add_argument(
        "--idle-threshold",
        type=float,
        default=0.10,
        help="machine busy fraction counted as idle for --wait-idle (default 0.10)",
    )
    parser.add_argument("--ferryman", help="ferryman executable (default: the repo's .venv/bin/ferryman)")
    parser.add_argument("--haproxy", default="/usr/sbin/haproxy", help="HAProxy executable")
    parser.add_argument("--results-dir", default=str(HERE / "results"), help="where the JSON goes")
    parser.add_argument(
        "--keep-tmp", action="store_true", help="keep the temp dir (configs, logs, audit files)"
    )
    args = parser.parse_args(argv)
    args.only = [m.strip() for m in args.only.split(",") if m.strip()]
    bad = [m for m in args.only if m not in METRICS]
    if bad:
        parser.error(f"--only: unknown metric(s) {', '.join(bad)}; choose from {', '.join(METRICS)}")
    args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    bad = [p for p in args.paths if p not in DEFAULT_PATHS + OPTIONAL_PATHS]
    if bad:
        parser.error(f"--paths: unknown path(s) {', '.join(bad)}")
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    return args


def find_binaries(args: argparse.Namespace) -> tuple[str, str | None, list[str]]:
    """(ferryman, haproxy or None, the paths left to measure): ``--ferryman`` or the project's
    virtualenv or PATH; ``--haproxy`` or PATH (no HAProxy: its columns are skipped)."""
    ferryman_bin = args.ferryman or str(REPO / ".venv" / "bin" / "ferryman")
    if not os.access(ferryman_bin, os.X_OK):
        ferryman_bin = shutil.which("ferryman") or ferryman_bin
    haproxy_bin = args.haproxy if os.access(args.haproxy, os.X_OK) else shutil.which("haproxy")
    paths = list(args.paths)
    if haproxy_bin is None:
        paths = [p for p in paths if not p.startswith("haproxy")]
        log("haproxy not found: HAProxy columns skipped")
    return ferryman_bin, haproxy_bin, paths


def pin_cpus(no_pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """(proxy CPUs, tool CPUs): the proxy under test gets the last CPU to itself; every load
    generator and backend (and this process, from now on) shares the others."""
    cpus = sorted(os.sched_getaffinity(0))
    if no_pin or len(cpus) < 2:
        return None, None
    tool_cpus = set(cpus[:-1])
    os.sched_setaffinity(0, tool_cpus)
    return {cpus[-1]}, tool_cpus


def main(argv: list[str]) -> int:
    if argv[:1] == ["_worker"]:
        return worker_main(argv[1:])
    args = parse_args(argv)

    ferryman_bin, haproxy_bin, paths = find_binaries(args)
    for tool, metric in (("iperf3", "throughput"), ("redis-benchmark", "redis")):
        if metric in args.only and shutil.which(tool) is None:
            log(f"{tool} not found: {metric} skipped")
            args.only.remove(metric)

    proxy_cpus, tool_cpus = pin_cpus(args.no_pin)

    # A proxy needs two descriptors per relayed connection (plus a few hundred of its own:
    # listeners, pipes, the event loop); children inherit this process's limit.
    idle = args.idle_conns
    soft = raise_nofile(2 * idle + 1024)
    if "memory" in args.only and soft < 2 * idle + 600:
        idle = max(100, (soft - 600) // 2)
        log(f"RLIMIT_NOFILE hard limit is {soft}: idle connections reduced to {idle}")
    haproxy_maxconn = max(256, min(idle + 100, (soft - 500) // 2))

    tmp = Path(tempfile.mkdtemp(prefix="ferryman-bench-"))
    (tmp / "policy.json").write_text(json.dumps(FERRYMAN_POLICY))
    procs = Procs(tmp, tool_cpus, proxy_cpus)
    ctx = Ctx(args, tmp, procs, ferryman_bin, haproxy_bin, idle, haproxy_maxconn)

    install_signal_handlers()
    results: Results = {}
    raw: dict[str, Any] = {}
    started = time.time()
    log(
        f"paths: {', '.join(paths)}; metrics: {', '.join(args.only)}; {args.seconds:g}s per run; "
        f"proxy CPUs {sorted(proxy_cpus) if proxy_cpus else 'any'}, "
        f"tool CPUs {sorted(tool_cpus) if tool_cpus else 'any'}; "
        f"temp dir {tmp}"
    )
    interrupted = False
    try:
        steps: dict[str, Callable[[Ctx, list[str], Results, dict[str, Any]], None]] = {
            "throughput": bench_throughput,
            "redis": bench_redis,
            "connrate": bench_connrate,
            "memory": bench_memory,
        }
        for metric in METRICS:
            if metric in args.only:
                log(f"== {metric}")
                steps[metric](ctx, paths, results, raw)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping everything")
    finally:
        procs.stop_all()
        if args.keep_tmp or interrupted:
            log(f"temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if interrupted:
        return 130

    evaluation = evaluate(results)
    print()
    print(render(results, evaluation, paths))
    if ctx.notes:
        print("\nNotes:")
        for note in ctx.notes:
            print(f"  - {note}")
    bound = [p for p, d in raw.get("connrate", {}).items() if d.get("tools_bound")]
    if bound:
        print(
            f"\n  connrate: the load generators were CPU-bound for {', '.join(bound)} "
            "(that path's rate is a lower bound of what it can do)"
        )

    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    out = out_dir / f"tcp-{stamp}.json"
    doc = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "options": {
            "seconds": args.seconds,
            "only": args.only,
            "paths": paths,
            "idle_conns": idle,
            "idle_conns_requested": args.idle_conns,
            "rlimit_nofile": soft,
            "haproxy_maxconn": haproxy_maxconn,
            "conn_concurrency": args.conn_concurrency,
            "redis_rounds": args.redis_rounds,
            "own_redis": args.own_redis,
            "haproxy_threads": args.haproxy_threads,
            "pinned": proxy_cpus is not None,
            "proxy_cpus": sorted(proxy_cpus) if proxy_cpus else None,
            "tool_cpus": sorted(tool_cpus) if tool_cpus else None,
        },
        "machine": {"cpus": os.cpu_count(), **tool_versions(haproxy_bin)},
        "source": source_state(),
        "targets": {r.key: target_text(r) for r in rows()},
        "results": results,
        "evaluation": evaluation,
        "details": raw,
        "machine_busy_before": ctx.busy,
        "notes": ctx.notes,
    }
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
