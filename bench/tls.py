#!/usr/bin/env python3
"""TLS benchmark: ferryman vs HAProxy, side by side, with the same certificate, in one run.

Measures, per path (``ferryman``, ``haproxy``, ``haproxy-buf64k``; ``direct`` where it means
something):

* ``terminated`` -- TLS-terminated throughput: TLS client → proxy (terminates) → plaintext
  backend, 1 and 8 streams, forward (client sends) and reverse (backend sends); Gbit/s and the
  proxy's CPU seconds per GB. Reported, no target.
* ``handshakes`` -- full TLS handshakes per second, each with one client-certificate check
  (ferryman ``client_auth = "need"`` + ``[identity.mtls]``; HAProxy ``verify required
  ca-file``): ``openssl s_time -new -www /`` (no session resumption), one small HTTP-like round
  trip to a plaintext responder behind the proxy, close. Rate and proxy CPU per handshake.
  Target: ≥ 0.8x HAProxy.
* ``passthrough`` -- SNI-routed TLS passthrough throughput to a TLS backend (ferryman
  ``tls = "passthrough"`` + a ``rules`` entry on the SNI; HAProxy ``mode tcp`` +
  ``req.ssl_hello_type``/``req.ssl_sni`` inspection). Target: ≥ 1.0x HAProxy.
* ``passthrough-raw`` -- the same, but after the (real, routed) handshake the payload is sent
  unencrypted, shaped as TLS records: a proxy in passthrough never looks past the ClientHello,
  so this moves the same bytes for the proxy while the load generators do no bulk crypto and
  stop being the bottleneck. Same target.

The certificates (CA, server, client) are generated here with trustme: ECDSA P-256 by default,
``--key-type rsa`` for RSA-2048. Both proxies serve the same server certificate and check
client certificates against the same CA.

Everything (proxies, backends, load generators) is started and stopped here, on loopback only,
pinned as in bench/tcp.py (proxy alone on the last CPU, everything else on the others), and
reuses its helpers. See bench/README.md ("TLS").

    /work/main/.venv/bin/python bench/tls.py [--seconds 5] [--only terminated,handshakes,passthrough,...]

Internal helpers run as ``tls.py _worker blast|responder|tput ...`` (started by the bench).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import re
import select
import shutil
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# bench/tcp.py is this file's sibling (sys.path[0] when run as a script): its process management,
# CPU pinning, quiet-machine wait, uvloop runner and table helpers are reused as they are.
import tcp
from tcp import GB, HOST, Procs, Proxy, Row, free_port, log, proc_cpu_seconds, wait_listening, wait_quiet

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
THIS = str(Path(__file__).resolve())
CLK_TCK = os.sysconf("SC_CLK_TCK")

METRICS = ("terminated", "handshakes", "passthrough", "passthrough-raw")
PREFIX = {"terminated": "term", "passthrough": "pass", "passthrough-raw": "praw"}
"""Row-key prefix of each throughput metric."""
DEFAULT_PATHS = ("direct", "ferryman", "haproxy", "haproxy-buf64k")
OPTIONAL_PATHS = ("ferryman-splice",)
FERRYMAN_PATHS = ("ferryman", "ferryman-splice")
HAPROXY_BASELINES = tcp.HAPROXY_BASELINES
TPUT_RUNS = ((1, "fwd"), (1, "rev"), (8, "fwd"), (8, "rev"))
"""(parallel TLS streams, direction): ``fwd`` the client sends, ``rev`` the backend sends."""

SNI = "bench.example"
USER = "bench@localhost"
CHUNK = 256 * 1024
RAW_CHUNK = (b"\x17\x03\x03" + (16384 - 5).to_bytes(2, "big") + bytes(16384 - 5)) * (CHUNK // 16384)
"""Unencrypted payload for ``passthrough-raw``, shaped as TLS application-data records."""
RESPONSE = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


# ----------------------------------------------------------------------------------------------
# Context, certificates, source snapshot


@dataclass
class Certs:
    key_type: str
    description: str
    ca: Path
    server_cert: Path
    server_key: Path
    server_combined: Path
    client_cert: Path
    client_key: Path


@dataclass
class Ctx:
    """What every step needs. Duck-compatible with ``tcp.Ctx`` for ``tcp.wait_quiet``."""

    args: argparse.Namespace
    tmp: Path
    procs: Procs
    certs: Certs
    ferryman_bin: str
    haproxy_bin: str | None
    snapshot: Path | None
    haproxy_maxconn: int
    stamp: str
    counter: int = 0
    notes: list[str] = field(default_factory=list)
    busy: dict[str, float] = field(default_factory=dict)
    profiles: list[str] = field(default_factory=list)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    """metric → path → results of the functional probes run before measuring."""

    def next_name(self, stem: str) -> str:
        self.counter += 1
        return f"{self.counter:03d}-{stem}"

    @property
    def tool_ncpu(self) -> int:
        return len(self.procs.tool_cpus) if self.procs.tool_cpus else os.cpu_count() or 1


def make_certs(tmp: Path, key_type: str) -> Certs:
    """CA, server certificate (bench.example, localhost, 127.0.0.1) and client certificate
    (SAN email bench@localhost, OU bench), all of ``key_type``."""
    import trustme

    kt = trustme.KeyType.ECDSA if key_type == "ecdsa" else trustme.KeyType.RSA
    ca = trustme.CA(key_type=kt, organization_name="ferryman bench")
    server = ca.issue_cert(SNI, "localhost", HOST, key_type=kt)
    client = ca.issue_cert(USER, common_name="bench", organization_unit_name="bench", key_type=kt)
    d = tmp / "certs"
    d.mkdir()
    certs = Certs(
        key_type=key_type,
        description="ECDSA P-256 (CA, server and client)"
        if key_type == "ecdsa"
        else "RSA-2048 (CA, server and client)",
        ca=d / "ca.pem",
        server_cert=d / "server.pem",
        server_key=d / "server.key",
        server_combined=d / "server-combined.pem",
        client_cert=d / "client.pem",
        client_key=d / "client.key",
    )
    ca.cert_pem.write_to_path(str(certs.ca))
    server.private_key_pem.write_to_path(str(certs.server_key))
    for i, blob in enumerate(server.cert_chain_pems):
        blob.write_to_path(str(certs.server_cert), append=i > 0)
    server.private_key_and_cert_chain_pem.write_to_path(str(certs.server_combined))
    client.private_key_pem.write_to_path(str(certs.client_key))
    for i, blob in enumerate(client.cert_chain_pems):
        blob.write_to_path(str(certs.client_cert), append=i > 0)
    return certs


def snapshot_source(tmp: Path, wait: float) -> dict[str, Any]:
    """Copy ``src/ferryman`` into the temp directory; every ferryman of this run imports it.

    The working tree may be edited while the bench runs (minutes): without a copy one row could
    measure other code than the next. A copy that does not import (caught mid-edit) is retried
    for up to ``wait`` seconds.
    """
    dst = tmp / "src"
    python = str(REPO / ".venv" / "bin" / "python")
    if not os.access(python, os.X_OK):
        python = sys.executable
    deadline = time.monotonic() + wait
    while True:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(
            REPO / "src" / "ferryman", dst / "ferryman", ignore=shutil.ignore_patterns("__pycache__")
        )
        probe = "import ferryman, ferryman.app, ferryman.cli.main; print(ferryman.__file__)"
        done = subprocess.run(
            [python, "-c", probe],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(dst)},
        )
        if done.returncode == 0 and done.stdout.strip().startswith(str(dst)):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"src/ferryman does not import:\n{done.stderr[-2000:]}")
        log("src/ferryman does not import right now (being edited?): retrying in 5 s")
        time.sleep(5)
    digest = hashlib.sha256()
    files = sorted(p for p in (dst / "ferryman").rglob("*") if p.is_file())
    for path in files:
        digest.update(str(path.relative_to(dst)).encode() + b"\0" + path.read_bytes())
    return {"snapshot": str(dst), "files": len(files), "sha256": digest.hexdigest()[:16]}


# ----------------------------------------------------------------------------------------------
# Proxies


FERRYMAN_HEAD = """\
log_level = "info"
log_format = "text"
policy_file = "{policy}"

[audit]
file = "{audit}"

[shutdown]
grace = "1s"

[[identity.static]]
cidr = "127.0.0.0/8"
user = "{user}"
groups = ["bench"]
"""

FERRYMAN_POLICY = {
    "grants": [
        {"src": [USER], "app": {"ferryman.dev/cap/ferryman": [{"backends": {"bench": {}}}]}},
    ],
}

HAPROXY_HEAD = """\
global
    maxconn {maxconn}
    nbthread {threads}
    tune.ssl.default-dh-param 2048
{tune}
defaults
    mode tcp
    maxconn {maxconn}
    timeout connect 5s
    timeout client 1h
    timeout server 1h
"""


def ferryman_config(ctx: Ctx, name: str, metric: str, port: int, backend: int) -> str:
    c = ctx.certs
    text = FERRYMAN_HEAD.format(
        policy=ctx.tmp / "policy.json", audit=ctx.tmp / f"{name}.audit.jsonl", user=USER
    )
    if metric == "handshakes":
        text += f'\n[identity.mtls]\nca_file = "{c.ca}"\nuser_from = "san_email"\n'
    text += f'\n[[listeners]]\nname = "bench"\nlisten = "{HOST}:{port}"\n'
    if metric == "terminated":
        text += (
            f'backend = "{HOST}:{backend}"\ntls = "enabled"\n'
            f'cert_file = "{c.server_cert}"\nkey_file = "{c.server_key}"\nidentity = ["static"]\n'
        )
    elif metric == "handshakes":
        text += (
            f'backend = "{HOST}:{backend}"\ntls = "enabled"\n'
            f'cert_file = "{c.server_cert}"\nkey_file = "{c.server_key}"\n'
            'client_auth = "need"\nidentity = ["mtls"]\n'
        )
    else:  # passthrough: route on the ClientHello's SNI, forward the TLS bytes untouched
        domain = SNI.replace(".", "\\.")
        text += (
            'tls = "passthrough"\nidentity = ["static"]\n'
            f"rules = [ {{ domain = '{domain}', targets = [ "
            f'{{ host = "{SNI}", ip = "{HOST}", port = {backend} }} ] }} ]\n'
        )
    return text


def haproxy_config(ctx: Ctx, path: str, metric: str, port: int, backend: int) -> str:
    c = ctx.certs
    text = HAPROXY_HEAD.format(
        maxconn=ctx.haproxy_maxconn,
        threads=ctx.args.haproxy_threads,
        tune="    tune.bufsize 65536\n" if path == "haproxy-buf64k" else "",
    )
    if metric == "terminated":
        text += f"\nlisten bench\n    bind {HOST}:{port} ssl crt {c.server_combined}\n"
        text += f"    server backend {HOST}:{backend}\n"
    elif metric == "handshakes":
        text += (
            f"\nlisten bench\n    bind {HOST}:{port} ssl crt {c.server_combined}"
            f" verify required ca-file {c.ca}\n"
        )
        text += f"    server backend {HOST}:{backend}\n"
    else:
        text += (
            f"\nfrontend bench\n    bind {HOST}:{port}\n"
            "    tcp-request inspect-delay 5s\n"
            "    tcp-request content accept if { req.ssl_hello_type 1 }\n"
            f"    use_backend sni_bench if {{ req.ssl_sni -i {SNI} }}\n"
            f"\nbackend sni_bench\n    server target {HOST}:{backend}\n"
        )
    return text


@contextlib.contextmanager
def proxy_for(ctx: Ctx, path: str, metric: str, backend_port: int) -> Iterator[Proxy]:
    """A fresh proxy (or none for ``direct``) in front of ``backend_port`` for one metric."""
    if path == "direct":
        yield Proxy(path, backend_port, None)
        return
    name = ctx.next_name(f"{path}-{metric}")
    port = free_port()
    if path.startswith("ferryman"):
        cfg = ctx.tmp / f"{name}.toml"
        cfg.write_text(ferryman_config(ctx, name, metric, port, backend_port))
        cmd = [ctx.ferryman_bin, "serve", "-c", str(cfg)]
        if path == "ferryman-splice":
            cmd.append("--splice")
        if ctx.snapshot is not None:  # env execs: the pid stays ferryman's
            cmd = ["env", f"PYTHONPATH={ctx.snapshot}", *cmd]
    else:
        assert ctx.haproxy_bin is not None
        cfg = ctx.tmp / f"{name}.cfg"
        cfg.write_text(haproxy_config(ctx, path, metric, port, backend_port))
        cmd = [ctx.haproxy_bin, "-f", str(cfg), "-db"]
    proc = ctx.procs.start(name, cmd, role="proxy")
    try:
        wait_listening(port, proc, ctx.procs, name)
        yield Proxy(path, port, proc)
    finally:
        ctx.procs.stop(proc)


# ----------------------------------------------------------------------------------------------
# Backends and probes


def start_worker(ctx: Ctx, kind: str, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    name = ctx.next_name(kind)
    cmd = [sys.executable, THIS, "_worker", kind, "--port", str(port), *extra]
    proc = ctx.procs.start(name, cmd, role="tool")
    wait_listening(port, proc, ctx.procs, name)
    return proc, port


def start_blast(ctx: Ctx, tls: bool) -> tuple[subprocess.Popen[bytes], int]:
    """Sink/source backend (plaintext, or TLS with the server certificate)."""
    extra = ["--cert", str(ctx.certs.server_cert), "--key", str(ctx.certs.server_key)] if tls else []
    return start_worker(ctx, "blast", *extra)


def responder_stats(port: int) -> tuple[int, float]:
    """(requests answered so far, the responder's monotonic clock) straight from the responder."""
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.sendall(b"STATS\r\n\r\n")
        data = b""
        while chunk := s.recv(256):
            data += chunk
    count, clock = data.split()
    return int(count), float(clock)


def client_context(ca: Path | None, cert: Certs | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    if cert is not None:
        ctx.load_cert_chain(str(cert.client_cert), str(cert.client_key))
    return ctx


def tls_probe(port: int, ctx: ssl.SSLContext, sni: str, payload: bytes, expect: bytes) -> str:
    """One TLS connection: send ``payload``, expect the answer to start with ``expect``.

    Returns ``ok`` or what went wrong (a refusal is what the negative probes want).
    """
    try:
        with (
            socket.create_connection((HOST, port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname=sni) as s,
        ):
            s.sendall(payload)
            got = b""
            while len(got) < len(expect):
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
            if got.startswith(expect):
                return f"ok ({s.version()}, {s.cipher()[0]})"  # type: ignore[index]
            return f"refused (got {got[:40]!r})"
    except (OSError, ssl.SSLError) as exc:
        return f"refused ({type(exc).__name__}: {exc})"


# ----------------------------------------------------------------------------------------------
# CPU accounting


ProcSnap = dict[int, tuple[str, int, float]]
"""pid → (command name, parent pid, own + reaped children's CPU seconds)."""


def snapshot_processes() -> ProcSnap:
    snap: ProcSnap = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                text = f.read()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        cpu = sum(int(v) for v in fields[11:15]) / CLK_TCK  # utime stime cutime cstime
        snap[int(name)] = (comm, int(fields[1]), cpu)
    return snap


def others_cpu(before: ProcSnap, after: ProcSnap, ours: set[int]) -> tuple[float, list[tuple[str, float]]]:
    """CPU seconds used between the snapshots by processes that are not ours (nor kernel threads),
    and the biggest consumers. Processes that came and went count through their parent."""
    total = 0.0
    top: list[tuple[str, float]] = []
    for pid, (comm, ppid, cpu) in after.items():
        if pid in ours or ppid in ours or pid == 2 or ppid == 2:
            continue
        prev = before.get(pid)
        used = cpu - (prev[2] if prev else 0.0)
        if used > 0:
            total += used
            if used >= 0.05:
                top.append((f"{comm}[{pid}]", round(used, 2)))
    top.sort(key=lambda x: -x[1])
    return total, top[:3]


def cpu_of(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        return proc_cpu_seconds(pid)
    except (OSError, IndexError, ValueError):
        return None


@dataclass
class Sample:
    t: float
    proxy: float | None
    tools: dict[int, float | None]
    procs: ProcSnap
    busy_s: float
    """CPU seconds the whole machine has been busy (``/proc/stat``, all CPUs)."""


def sample(proxy_pid: int | None, tool_pids: list[int]) -> Sample:
    total, idle = tcp._cpu_jiffies()
    return Sample(
        time.monotonic(),
        cpu_of(proxy_pid),
        {p: cpu_of(p) for p in tool_pids},
        snapshot_processes(),
        (total - idle) / CLK_TCK,
    )


def window_cpu(ctx: Ctx, s0: Sample, s1: Sample) -> dict[str, Any]:
    """Proxy, load generators and other work between two samples."""
    wall = s1.t - s0.t
    out: dict[str, Any] = {"wall_s": round(wall, 3)}
    if s0.proxy is not None and s1.proxy is not None:
        out["proxy_cpu_s"] = s1.proxy - s0.proxy
        out["proxy_cpu_util"] = (s1.proxy - s0.proxy) / wall
    tools = 0.0
    for pid, c0 in s0.tools.items():
        c1 = s1.tools.get(pid)
        if c0 is not None and c1 is not None:
            tools += c1 - c0
    out["tools_cpu_util"] = tools / wall
    out["tools_bound"] = tools / wall >= 0.9 * ctx.tool_ncpu
    ours = {os.getpid(), *ctx.procs.live.keys(), *s0.tools.keys()}
    other, top = others_cpu(s0.procs, s1.procs, ours)
    # Two upper bounds of other people's work; the smaller one is used. Per process: a parent
    # that reaps a long-lived child in the window is charged the child's whole life. Machine
    # minus ours: also counts kernel time charged to no process (softirq of our own traffic).
    mine = out.get("proxy_cpu_s", 0.0) + tools
    me = os.getpid()
    if me in s0.procs and me in s1.procs:
        mine += s1.procs[me][2] - s0.procs[me][2]
    unattributed = max(0.0, (s1.busy_s - s0.busy_s) - mine)
    ncpu = os.cpu_count() or 1
    out["other_share"] = round(min(other, unattributed) / (wall * ncpu), 3)
    out["machine_busy"] = round((s1.busy_s - s0.busy_s) / (wall * ncpu), 3)
    out["others_top"] = top
    return out


# ----------------------------------------------------------------------------------------------
# Running load generators


def run_marked(
    ctx: Ctx, name: str, cmd: list[str], timeout: float, on_mark: Callable[[str, int], None]
) -> tuple[int, list[str], str]:
    """Run ``cmd`` on the tool CPUs; every ``MARK <label>`` line it prints calls ``on_mark``
    at once (to sample CPU counters exactly when its timed window opens and closes).

    Returns (exit code, the other stdout lines, the stderr tail). Raises on timeout.
    """
    cpus = ctx.procs.tool_cpus
    name = ctx.next_name(name)
    errf = open(ctx.tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed right after Popen
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errf,
            start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
    finally:
        errf.close()
    ctx.procs.live[proc.pid] = (name, proc)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    lines: list[str] = []
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"{name} did not finish within {timeout:.0f}s")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                raw, buf = buf.split(b"\n", 1)
                line = raw.decode(errors="replace")
                if line.startswith("MARK "):
                    on_mark(line[5:].strip(), proc.pid)
                else:
                    lines.append(line)
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except BaseException:
        ctx.procs.stop(proc, timeout=5.0)
        raise
    finally:
        ctx.procs.live.pop(proc.pid, None)
        proc.stdout.close()
    if buf.strip():
        lines.append(buf.decode(errors="replace"))
    return proc.returncode, lines, ctx.procs.log_tail(name)


def start_profiler(ctx: Ctx, proxy: Proxy, what: str, seconds: float) -> subprocess.Popen[bytes] | None:
    if not ctx.args.py_spy or not proxy.path.startswith("ferryman") or proxy.pid is None:
        return None
    out = Path(ctx.args.results_dir) / f"tls-{ctx.stamp}-{what}-{proxy.path}.folded"
    cmd = [ctx.args.py_spy, "record", "--pid", str(proxy.pid), "--duration", str(max(1, round(seconds)))]
    cmd += ["--rate", "250", "--format", "raw", "-o", str(out)]
    cmd += ["--native"] if ctx.args.py_spy_native else ["--nonblocking"]
    ctx.profiles.append(str(out))
    return ctx.procs.start(ctx.next_name("py-spy"), cmd, role="tool")


def stop_profiler(ctx: Ctx, proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        ctx.procs.stop(proc)


def tput_once(
    ctx: Ctx,
    proxy: Proxy,
    backend: tuple[subprocess.Popen[bytes], int],
    streams: int,
    direction: str,
    what: str,
) -> dict[str, Any]:
    """One timed throughput run of the bench's TLS client against ``proxy``.

    Bytes are counted where they arrive: by the backend's sinks for ``fwd`` (asked at both ends
    of the window), by the client for ``rev``.
    """
    seconds, warmup = ctx.args.seconds, ctx.args.warmup
    cmd = [sys.executable, THIS, "_worker", "tput", "--port", str(proxy.port), "--streams", str(streams)]
    cmd += ["--direction", direction, "--seconds", str(seconds), "--warmup", str(warmup)]
    cmd += ["--ca", str(ctx.certs.ca), "--sni", SNI]
    if what.startswith("praw"):
        cmd.append("--raw")
    marks: dict[str, Sample] = {}
    sink: dict[str, tuple[int, float]] = {}
    profiler: list[subprocess.Popen[bytes] | None] = [None]
    backend_proc, backend_port = backend

    def on_mark(label: str, pid: int) -> None:
        if direction == "fwd":
            sink[label] = sink_stats(backend_port)
        marks[label] = sample(proxy.pid, [pid, backend_proc.pid])
        if label == "start":
            profiler[0] = start_profiler(ctx, proxy, what, seconds)

    try:
        rc, lines, err = run_marked(ctx, "tput-client", cmd, seconds + warmup + 60, on_mark)
    finally:
        stop_profiler(ctx, profiler[0])
    try:
        data: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        data = {}
    if rc != 0 or "bytes" not in data or "start" not in marks or "end" not in marks:
        return {"error": f"TLS client failed ({rc}): {(data.get('error') or err)[-400:]}"}
    data.update(window_cpu(ctx, marks["start"], marks["end"]))
    if direction == "fwd" and "start" in sink and "end" in sink:
        data["client_bytes"], data["client_seconds"] = data["bytes"], data["seconds"]
        data["bytes"] = sink["end"][0] - sink["start"][0]
        data["seconds"] = sink["end"][1] - sink["start"][1]
        data["counted_by"] = "backend sink"
    else:
        data["counted_by"] = "client"
    data["gbit_per_s"] = data["bytes"] * 8 / data["seconds"] / 1e9
    if data["bytes"]:
        # What the client and the backend spent per GB: when their core is saturated, this is
        # what the proxy path costs *them* (loopback work for the proxy's sockets lands here too).
        data["tools_cpu_s_per_gb"] = data["tools_cpu_util"] / (data["bytes"] / data["seconds"] / GB)
    if "proxy_cpu_util" in data and data["bytes"]:
        data["proxy_cpu_s_per_gb"] = data["proxy_cpu_util"] / (data["bytes"] / data["seconds"] / GB)
    data["profiled"] = profiler[0] is not None
    return data


def handshake_client_cmd(ctx: Ctx, port: int, run_for: int) -> list[str]:
    c = ctx.certs
    if ctx.args.hs_client == "s_time":
        cmd = ["openssl", "s_time", "-connect", f"{HOST}:{port}", "-new", "-time", str(run_for)]
        return [*cmd, "-www", "/", "-cert", str(c.client_cert), "-key", str(c.client_key)]
    cmd = [sys.executable, THIS, "_worker", "hsclient", "--port", str(port), "--seconds", str(run_for)]
    return [*cmd, "--cert", str(c.client_cert), "--key", str(c.client_key), "--sni", SNI]


def handshakes_once(
    ctx: Ctx, proxy: Proxy, responder: subprocess.Popen[bytes], responder_port: int
) -> dict[str, Any]:
    """``--hs-clients`` handshake clients (each: connect, full handshake with the client
    certificate, one request/response, close; in a loop) for warm-up + ``--seconds``. The rate
    is the responder's count over the timed window, so the clients' start-up, their clocks and
    uneven ends do not matter."""
    seconds, warmup = ctx.args.seconds, ctx.args.warmup
    s_time = ctx.args.hs_client == "s_time"
    # s_time stops by itself, anywhere in [run_for, run_for + 1); the cffi clients are stopped
    # with SIGTERM once the window has closed (run_for only bounds them).
    run_for = math.ceil(warmup + seconds) + (2 if s_time else 90)
    cmd = handshake_client_cmd(ctx, proxy.port, run_for)
    clients: list[subprocess.Popen[bytes]] = []
    names: list[str] = []
    profiler = None
    try:
        for i in range(ctx.args.hs_clients):
            names.append(ctx.next_name(f"{ctx.args.hs_client}{i}"))
            clients.append(ctx.procs.start(names[-1], cmd, role="tool"))
        tool_pids = [p.pid for p in clients] + [responder.pid]
        if not s_time:
            wait_ready(ctx, names, clients)
        time.sleep(warmup)
        n0, clock0 = responder_stats(responder_port)
        s0 = sample(proxy.pid, tool_pids)
        profiler = start_profiler(ctx, proxy, "handshakes", seconds)
        time.sleep(seconds)
        n1, clock1 = responder_stats(responder_port)
        s1 = sample(proxy.pid, tool_pids)
        early = [p.returncode for p in clients if p.poll() is not None]
        if not s_time:
            for p in clients:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)  # each prints its report and exits
        deadline = time.monotonic() + (run_for if s_time else 0) + 30
        for p in clients:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, deadline - time.monotonic()))
    finally:
        stop_profiler(ctx, profiler)
        for p in clients:
            ctx.procs.stop(p, timeout=5.0)
    counted = n1 - n0
    data: dict[str, Any] = {
        "handshakes": counted,
        "seconds": clock1 - clock0,
        "rate": counted / (clock1 - clock0),
        "clients": len(clients),
        "client": ctx.args.hs_client,
        "command": " ".join(cmd),
        "profiled": profiler is not None,
    }
    data.update(window_cpu(ctx, s0, s1))
    if "proxy_cpu_s" in data and counted:
        data["proxy_cpu_us_per_handshake"] = data["proxy_cpu_s"] / counted * 1e6
    total, failed, problems = 0, 0, []
    for name, p in zip(names, clients, strict=True):
        text = ctx.procs.log_tail(name, 40)
        if s_time:
            m = re.search(r"(\d+) connections in [\d.]+s", text)
            total += int(m.group(1)) if m else 0
            good = m is not None
        else:
            try:
                report = json.loads(text.strip().splitlines()[-1])
            except (json.JSONDecodeError, IndexError):
                report = {}
            total += report.get("ok", 0)
            failed += report.get("failed", 0)
            good = "ok" in report
            if report.get("tls"):
                data["tls"] = report["tls"]
            if report.get("errors"):
                problems.append(f"{name}: {report['failed']} failed: {report['errors']}")
        if p.returncode not in (0, None) or not good:
            problems.append(f"{name}: exit {p.returncode}: {text.strip().splitlines()[-1:] or ''}")
    data["client_connections_total"] = total
    data["client_failures_total"] = failed
    if early:
        problems.append(f"{len(early)} client process(es) ended before the timed window did")
    if problems:
        data["problems"] = problems
    return data


def wait_ready(ctx: Ctx, names: list[str], clients: list[subprocess.Popen[bytes]]) -> None:
    """Wait until every client process has started (printed READY), so the start-up of many
    Python processes on one core does not spill into the warm-up or the timed window."""
    deadline = time.monotonic() + 60
    pending = list(names)
    while pending and time.monotonic() < deadline:
        for name, proc in zip(names, clients, strict=True):
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{ctx.procs.log_tail(name)}")
        pending = [n for n in pending if "READY" not in ctx.procs.log_tail(n, 5)]
        time.sleep(0.05)
    if pending:
        raise RuntimeError(f"handshake clients not ready after 60 s: {', '.join(pending)}")


def least_disturbed(ctx: Ctx, what: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run; repeat (up to ``--retries``) while other work took more than ``--max-interference``
    of the machine; return the least disturbed attempt (with how many there were)."""
    attempts: list[dict[str, Any]] = []
    for attempt in range(ctx.args.retries + 1):
        if attempt:
            wait_quiet(ctx, f"{what}/retry{attempt}")  # type: ignore[arg-type]
        try:
            entry = run()
        except (RuntimeError, OSError, ValueError) as exc:  # a run that could not happen at all
            entry = {"error": f"{type(exc).__name__}: {str(exc)[-600:]}"}
        attempts.append(entry)
        if "error" in entry or entry.get("other_share", 0.0) <= ctx.args.max_interference:
            break
        log(
            f"{what}: other work took {entry['other_share'] * 100:.0f}% of the machine "
            f"({', '.join(f'{n} {s}s' for n, s in entry.get('others_top', []))}): repeating"
        )
    best = min(attempts, key=lambda e: ("error" in e, e.get("other_share", 0.0)))
    best["attempts"] = len(attempts)
    if best.get("other_share", 0.0) > ctx.args.max_interference:
        msg = f"{what}: other work took {best['other_share'] * 100:.0f}% of the machine in every attempt"
        log(msg)
        ctx.notes.append(msg)
    return best


# ----------------------------------------------------------------------------------------------
# Metrics

Samples = dict[tuple[str, str], list[dict[str, Any]]]
"""(row key, path) → one entry per round."""


def tput_key(metric: str, streams: int, direction: str) -> str:
    return f"{PREFIX[metric]}-P{streams}-{direction}"


def bench_throughput(ctx: Ctx, metric: str, paths: list[str], rnd: int, samples: Samples) -> None:
    passthrough = metric.startswith("passthrough")
    for path in paths:
        if path == "direct" and not passthrough:
            continue
        what = f"{metric}/{path}/round{rnd + 1}"
        wait_quiet(ctx, what)  # type: ignore[arg-type]
        backend, backend_port = start_blast(ctx, tls=passthrough)
        try:
            with proxy_for(ctx, path, metric, backend_port) as proxy:
                if metric == "passthrough" and path != "direct" and rnd == 0:
                    check_passthrough(ctx, proxy, path)
                for streams, direction in TPUT_RUNS:
                    key = tput_key(metric, streams, direction)
                    entry = least_disturbed(
                        ctx,
                        f"{what}/{key}",
                        lambda s=streams, d=direction, k=key, b=(backend, backend_port): tput_once(
                            ctx, proxy, b, s, d, k
                        ),
                    )
                    samples.setdefault((key, path), []).append(entry)
                    if "error" in entry:
                        msg = f"{metric} {key} via {path}: {entry['error']}"
                        log(msg)
                        ctx.notes.append(msg)
                        continue
                    pu = (
                        f", proxy CPU {entry['proxy_cpu_util'] * 100:3.0f}%"
                        if "proxy_cpu_util" in entry
                        else ""
                    )
                    log(
                        f"{metric:11s} {key:14s} {path:17s} {entry['gbit_per_s']:6.2f} Gbit/s{pu}, "
                        f"load generators {entry['tools_cpu_util'] * 100:3.0f}% CPU, "
                        f"other {entry['other_share'] * 100:.0f}%  ({entry.get('tls', '')})"
                    )
                    time.sleep(0.3)
        finally:
            ctx.procs.stop(backend)


def check_passthrough(ctx: Ctx, proxy: Proxy, path: str) -> None:
    """The SNI rule routes bench.example to the TLS backend and refuses other names."""
    good = tls_probe(proxy.port, client_context(ctx.certs.ca), SNI, b"E ping", b" ping")
    other = ssl.create_default_context(cafile=str(ctx.certs.ca))
    other.check_hostname = False
    bad = tls_probe(proxy.port, other, "other.example", b"E ping", b" ping")
    ctx.checks.setdefault("passthrough", {})[path] = {"sni_" + SNI: good, "sni_other.example": bad}
    if not good.startswith("ok") or bad.startswith("ok"):
        msg = f"passthrough via {path}: routing check unexpected: {SNI} → {good}; other.example → {bad}"
        log(msg)
        ctx.notes.append(msg)


def check_mtls(ctx: Ctx, proxy: Proxy, path: str) -> bool:
    """A client certificate gets through; no client certificate is refused."""
    request = b"GET / HTTP/1.0\r\n\r\n"
    with_cert = tls_probe(proxy.port, client_context(ctx.certs.ca, ctx.certs), SNI, request, b"HTTP/1.0 200")
    without = tls_probe(proxy.port, client_context(ctx.certs.ca), SNI, request, b"HTTP/1.0 200")
    ctx.checks.setdefault("handshakes", {})[path] = {"with_client_cert": with_cert, "without": without}
    ok = with_cert.startswith("ok") and not without.startswith("ok")
    if not ok:
        msg = f"handshakes via {path}: mTLS check unexpected: with cert → {with_cert}; without → {without}"
        log(msg)
        ctx.notes.append(msg)
    return ok


def bench_handshakes(ctx: Ctx, paths: list[str], rnd: int, samples: Samples) -> None:
    responder, responder_port = start_worker(ctx, "responder")
    try:
        for path in paths:
            if path == "direct":
                continue
            what = f"handshakes/{path}/round{rnd + 1}"
            wait_quiet(ctx, what)  # type: ignore[arg-type]
            with proxy_for(ctx, path, "handshakes", responder_port) as proxy:
                if rnd == 0 and not check_mtls(ctx, proxy, path):
                    continue
                entry = least_disturbed(
                    ctx, what, lambda p=proxy: handshakes_once(ctx, p, responder, responder_port)
                )
                if proxy.path.startswith("ferryman"):
                    entry["audit"] = audit_summary(ctx, proxy)
            samples.setdefault(("hs-rate", path), []).append(entry)
            for problem in entry.get("problems", []):
                ctx.notes.append(f"handshakes via {path}: {problem}")
            if "error" in entry:
                msg = f"handshakes via {path}: {entry['error']}"
                log(msg)
                ctx.notes.append(msg)
                continue
            per = entry.get("proxy_cpu_us_per_handshake", float("nan"))
            util = entry.get("proxy_cpu_util", 0.0) * 100
            log(
                f"handshakes  {path:17s} {entry['rate']:7.0f} /s, proxy CPU {util:3.0f}% "
                f"({per:.0f} µs each), "
                f"load generators {entry['tools_cpu_util'] * 100:3.0f}% CPU, "
                f"other {entry['other_share'] * 100:.0f}%"
            )
            time.sleep(1.0)
    finally:
        ctx.procs.stop(responder)


def audit_summary(ctx: Ctx, proxy: Proxy) -> dict[str, Any]:
    """Decision records of this ferryman: how many, allowed, identified by mtls."""
    name = next((n for pid, (n, _) in ctx.procs.live.items() if pid == proxy.pid), None)
    files = sorted(ctx.tmp.glob(f"{name}.audit.jsonl")) if name else []
    out = {"decisions": 0, "allowed": 0, "mtls": 0}
    for f in files:
        with open(f, errors="replace") as fh:
            for line in fh:
                if '"decision"' not in line:
                    continue
                out["decisions"] += 1
                out["allowed"] += '"allowed":true' in line.replace(" ", "")
                out["mtls"] += '"identity_source":"mtls"' in line.replace(" ", "")
    return out


# ----------------------------------------------------------------------------------------------
# Report


def rows() -> list[Row]:
    def tput(metric: str, target: float | None) -> list[Row]:
        out = []
        for streams, direction in TPUT_RUNS:
            key = tput_key(metric, streams, direction)
            vs = (">=", target) if target else None
            out.append(Row(key, f"{metric} P{streams} {direction}", "Gbit/s", "{:.2f}", True, vs))
        for streams, direction in TPUT_RUNS:
            key = tput_key(metric, streams, direction)
            out.append(Row(f"cpu-{key}", f"CPU/GB {metric} P{streams} {direction}", "s/GB", "{:.3f}", False))
        return out

    handshakes = [
        Row("hs-rate", "mTLS handshakes", "hs/s", "{:,.0f}", True, (">=", 0.8)),
        Row("hs-cpu", "proxy CPU/handshake", "µs", "{:,.0f}", False),
        Row("hs-per-cpu", "handshakes/CPU-s", "hs/cpu-s", "{:,.0f}", True),
    ]
    return [*tput("terminated", None), *handshakes, *tput("passthrough", 1.0), *tput("passthrough-raw", 1.0)]


Results = dict[str, dict[str, Any]]


def aggregate(samples: Samples) -> tuple[Results, dict[str, list[str]]]:
    """Median over rounds per (row, path); and, per row, the paths whose load generators were
    CPU-bound in some round (their number is a lower bound)."""
    results: Results = {}
    bound: dict[str, list[str]] = {}

    def med(values: list[float | None]) -> float | None:
        vals = [v for v in values if v is not None]
        return statistics.median(vals) if vals else None

    for (key, path), runs in samples.items():
        ok = [r for r in runs if "error" not in r]
        if key == "hs-rate":
            put(results, "hs-rate", path, med([r.get("rate") for r in ok]))
            put(results, "hs-cpu", path, med([r.get("proxy_cpu_us_per_handshake") for r in ok]))
            per = med([r["rate"] / r["proxy_cpu_util"] for r in ok if r.get("proxy_cpu_util")])
            put(results, "hs-per-cpu", path, per)
        else:
            put(results, key, path, med([r.get("gbit_per_s") for r in ok]))
            put(results, f"cpu-{key}", path, med([r.get("proxy_cpu_s_per_gb") for r in ok]))
        if any(r.get("tools_bound") for r in ok):
            bound.setdefault(key, []).append(path)
    return results, bound


def put(results: Results, key: str, path: str, value: Any) -> None:
    if value is not None:
        results.setdefault(key, {})[path] = value


def round_ratios(samples: Samples) -> dict[str, dict[str, list[float | None]]]:
    """Per row and ferryman variant: ferryman ÷ the better HAProxy variant *of the same round*.
    The machine's speed drifts over minutes, so these are steadier than a ratio of medians."""
    value = {"hs-rate": "rate"}
    out: dict[str, dict[str, list[float | None]]] = {}
    keys = {key for key, _ in samples}
    for key in sorted(keys):
        field_ = value.get(key, "gbit_per_s")
        for fm in FERRYMAN_PATHS:
            runs = samples.get((key, fm))
            if not runs:
                continue
            ratios: list[float | None] = []
            for rnd, run in enumerate(runs):
                haps = [
                    samples[(key, h)][rnd].get(field_)
                    for h in HAPROXY_BASELINES
                    if len(samples.get((key, h), [])) > rnd
                ]
                best = max((h for h in haps if h), default=None)
                mine = run.get(field_)
                ratios.append(round(mine / best, 3) if mine and best else None)
            out.setdefault(key, {})[fm] = ratios
    return out


def evaluate(results: Results) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for row in rows():
        values = results.get(row.key)
        if not values:
            continue
        hap, hap_path = tcp.haproxy_best(row, values)
        entry: dict[str, Any] = {"haproxy_best": hap, "haproxy_best_path": hap_path}
        for fm in FERRYMAN_PATHS:
            v = values.get(fm)
            if v is None:
                continue
            r_hap = v / hap if hap else None
            verdict = None
            if row.vs_haproxy and r_hap is not None:
                verdict = tcp.meets(row.vs_haproxy[0], r_hap, row.vs_haproxy[1])
            entry[fm] = {"value": v, "ratio_haproxy": r_hap, "pass": verdict}
        out[row.key] = entry
    return out


def target_text(row: Row) -> str:
    return f"{row.vs_haproxy[0]}{row.vs_haproxy[1]:g}x hap" if row.vs_haproxy else "report"


def render(
    results: Results, evaluation: dict[str, dict[str, Any]], paths: list[str], bound: dict[str, list[str]]
) -> str:
    def fmt(row: Row, v: Any) -> str:
        return "n/a" if v is None else row.fmt.format(v)

    short = {"direct": "dir", "ferryman": "fm", "ferryman-splice": "fm-sp", "haproxy": "def"}
    short["haproxy-buf64k"] = "64k"
    table_rows = [r for r in rows() if r.key in results]
    head = ["metric", "unit", *paths]
    body = []
    for r in table_rows:
        cells = []
        for p in paths:
            cell = fmt(r, results[r.key].get(p))
            if p in bound.get(r.key, []):
                cell += "*"
            cells.append(cell)
        body.append([r.label, r.unit, *cells])
    lines = tcp._grid(head, body, "Absolute numbers (median of rounds; n/a: not applicable or not measured)")
    lines.append("  * the load generators' core was saturated (≥ 90 %): that number is a lower bound")
    lines.append("")

    fms = [p for p in FERRYMAN_PATHS if p in paths]
    head = ["metric", "haproxy best", *(f"{short[f]}/hap" for f in fms), "target", *(short[f] for f in fms)]
    head.append("tool-bound")
    body = []
    for r in table_rows:
        ev = evaluation.get(r.key, {})
        hap = ev.get("haproxy_best")
        hap_txt = "n/a" if hap is None else f"{fmt(r, hap)} ({short.get(ev['haproxy_best_path'], '?')})"

        def ratio(f: str, ev: dict[str, Any] = ev) -> str:
            v = ev.get(f, {}).get("ratio_haproxy")
            return "-" if v is None else f"{v:.3g}x"

        def verdict(f: str, ev: dict[str, Any] = ev) -> str:
            p = ev.get(f, {}).get("pass")
            return "-" if p is None else ("PASS" if p else "FAIL")

        tb = ",".join(short.get(p, p) for p in bound.get(r.key, [])) or "-"
        body.append(
            [r.label, hap_txt, *(ratio(f) for f in fms), target_text(r), *(verdict(f) for f in fms), tb]
        )
    lines += tcp._grid(
        head, body, "Ratios and targets (haproxy best = better of default and tune.bufsize 65536, per row)"
    )
    return "\n".join(lines)


def tool_versions(haproxy: str | None) -> dict[str, str]:
    def first_line(cmd: list[str]) -> str:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "unavailable"
        text = (done.stdout or done.stderr).strip()
        return text.splitlines()[0] if text else ""

    out = {
        "openssl": first_line(["openssl", "version"]),
        "python": sys.version.split()[0],
        "python_ssl": ssl.OPENSSL_VERSION,
        "uvloop": getattr(tcp.uvloop, "__version__", "absent") if tcp.uvloop else "absent",
        "kernel": platform.release(),
    }
    if haproxy:
        out["haproxy"] = first_line([haproxy, "-v"])
    return out


# ----------------------------------------------------------------------------------------------
# Worker processes (load generators and backends; run on the tool CPUs)


_SINK_BYTES: dict[int, int] = {}
"""Bytes received so far by each sink connection of this blast server (one writer per key)."""


def _blast_conn(conn: socket.socket, tls: ssl.SSLContext | None) -> None:
    """One backend connection: the first byte says what to do (F sink, R source, E echo).

    A plaintext ``S`` (peeked before any TLS) asks for ``<bytes received by all sinks so far>
    <monotonic clock>``, so the bench can count delivered bytes in its window.
    """
    try:
        if conn.recv(1, socket.MSG_PEEK) == b"S":
            conn.recv(1)  # consume it: closing with unread data would send a reset
            total = sum(list(_SINK_BYTES.values()))
            conn.sendall(f"{total} {time.monotonic()!r}\n".encode())
            return
        s: socket.socket = tls.wrap_socket(conn, server_side=True) if tls else conn
        cmd = s.recv(1)
        # f/r: like F/R, but after this (encrypted) command byte the payload is not encrypted:
        # the raw socket under the TLS session carries it (OpenSSL reads records exactly, so
        # nothing past the command was consumed).
        recv_into = socket.socket.recv_into if cmd in (b"f", b"r") else type(s).recv_into
        sendall = socket.socket.sendall if cmd in (b"f", b"r") else type(s).sendall
        if cmd in (b"F", b"f"):
            key = id(threading.current_thread())
            _SINK_BYTES[key] = 0
            buf = bytearray(1 << 20)
            while n := recv_into(s, buf):
                _SINK_BYTES[key] += n
        elif cmd in (b"R", b"r"):
            data = RAW_CHUNK if cmd == b"r" else bytes(CHUNK)
            while True:
                sendall(s, data)
        elif cmd == b"E":
            while chunk := s.recv(65536):
                s.sendall(chunk)
    except (OSError, ssl.SSLError):
        pass
    finally:
        conn.close()


def sink_stats(port: int) -> tuple[int, float]:
    """(bytes the blast server's sinks have received so far, its monotonic clock)."""
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.sendall(b"S")
        data = b""
        while chunk := s.recv(256):
            data += chunk
    total, clock = data.split()
    return int(total), float(clock)


def _blast_main(port: int, cert: str | None, key: str | None) -> None:
    tls = None
    if cert:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(cert, key)
    with socket.create_server((HOST, port), backlog=1024) as lsock:
        while True:
            conn, _ = lsock.accept()
            threading.Thread(target=_blast_conn, args=(conn, tls), daemon=True).start()


async def _responder_main(port: int) -> None:
    """Answers one HTTP-ish request per connection and closes; ``STATS`` returns the count."""
    import asyncio

    loop = asyncio.get_running_loop()
    state = {"count": 0}

    class Responder(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            self.buf += data
            if b"\r\n\r\n" not in self.buf:
                return
            if self.buf.startswith(b"STATS"):
                self.transport.write(f"{state['count']} {time.monotonic()!r}\n".encode())
            else:
                state["count"] += 1
                self.transport.write(RESPONSE)
            self.transport.close()

    server = await loop.create_server(Responder, HOST, port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def _tput_main(args: argparse.Namespace) -> dict[str, Any]:
    """``--streams`` TLS connections; each sends (fwd) or receives (rev) as fast as it can. The
    bytes moved between the ``MARK start`` and ``MARK end`` lines (after ``--warmup``) count."""
    ctx = ssl.create_default_context(cafile=args.ca)
    socks: list[ssl.SSLSocket] = []
    for _ in range(args.streams):
        raw = socket.create_connection((HOST, args.port), timeout=10)
        s = ctx.wrap_socket(raw, server_hostname=args.sni)
        s.settimeout(None)
        cmd = b"F" if args.direction == "fwd" else b"R"
        s.sendall(cmd.lower() if args.raw else cmd)
        socks.append(s)
    negotiated = f"{socks[0].version()} {socks[0].cipher()[0]}"  # type: ignore[index]
    counts = [0] * args.streams
    errors: list[str] = []
    stop = threading.Event()

    # --raw: the payload bypasses the TLS session (see _blast_conn), the socket carries it as is.
    sendall = socket.socket.sendall if args.raw else ssl.SSLSocket.sendall
    recv_into = socket.socket.recv_into if args.raw else ssl.SSLSocket.recv_into

    def send(i: int, s: ssl.SSLSocket) -> None:
        data = memoryview(RAW_CHUNK if args.raw else bytes(CHUNK))
        try:
            while not stop.is_set():
                sendall(s, data)
                counts[i] += CHUNK
        except OSError as exc:
            if not stop.is_set():
                errors.append(f"stream {i}: {exc}")

    def recv(i: int, s: ssl.SSLSocket) -> None:
        buf = bytearray(1 << 20)
        try:
            while not stop.is_set():
                n = recv_into(s, buf)
                if not n:
                    if not stop.is_set():
                        errors.append(f"stream {i}: EOF")
                    return
                counts[i] += n
        except OSError as exc:
            if not stop.is_set():
                errors.append(f"stream {i}: {exc}")

    target = send if args.direction == "fwd" else recv
    threads = [threading.Thread(target=target, args=(i, s), daemon=True) for i, s in enumerate(socks)]
    for t in threads:
        t.start()
    time.sleep(args.warmup)
    b0, t0 = sum(counts), time.monotonic()
    print("MARK start", flush=True)
    time.sleep(args.seconds)
    b1, t1 = sum(counts), time.monotonic()
    print("MARK end", flush=True)
    stop.set()
    for s in socks:
        with contextlib.suppress(OSError):
            socket.socket.shutdown(s, socket.SHUT_RDWR)  # unblocks a thread stuck in send/recv
    for t in threads:
        t.join(10)
    for s in socks:
        with contextlib.suppress(OSError):
            s.close()
    out: dict[str, Any] = {
        "bytes": b1 - b0,
        "seconds": t1 - t0,
        "streams": args.streams,
        "direction": args.direction,
        "tls": negotiated,
        "payload": "raw (unencrypted after the handshake)" if args.raw else "TLS records",
        "per_stream_bytes": counts,
    }
    if errors:
        out["error"] = "; ".join(errors[:4])
    return out


def hsclient_available() -> str | None:
    """Why the cffi handshake client cannot run here, or None when it can."""
    try:
        from cryptography.hazmat.bindings.openssl.binding import Binding

        lib = Binding.lib
        for name in HS_SYMBOLS:
            getattr(lib, name)
    except (ImportError, AttributeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


HS_SYMBOLS = (
    "TLS_client_method",
    "SSL_CTX_new",
    "SSL_CTX_use_certificate_chain_file",
    "SSL_CTX_use_PrivateKey_file",
    "SSL_CTX_set_verify",
    "SSL_CTX_set_session_cache_mode",
    "SSL_new",
    "SSL_set_fd",
    "SSL_set_connect_state",
    "SSL_set_tlsext_host_name",
    "SSL_do_handshake",
    "SSL_write",
    "SSL_read",
    "SSL_get_error",
    "SSL_free",
    "SSL_get_version",
    "SSL_get_current_cipher",
    "SSL_CIPHER_get_name",
    "ERR_clear_error",
    "OpenSSL_version",
)


def _hsclient_main(args: argparse.Namespace) -> dict[str, Any]:
    """Loop for ``--seconds``: connect, full TLS handshake presenting the client certificate,
    ``GET /``, read the answer to EOF, close. No session is ever reused.

    Driven through the OpenSSL that the ``cryptography`` wheel bundles (a project dependency),
    called directly via its cffi bindings: C does the work, Python only loops, so one client
    handshake costs about half of what ``openssl s_time`` (system OpenSSL 3.0) spends. The
    server's certificate is not verified here (the probe before the run does that): the
    proxies' work -- including their client-certificate check -- is what is measured.
    """
    from cryptography.hazmat.bindings.openssl.binding import Binding

    lib, ffi = Binding.lib, Binding.ffi
    ctx = lib.SSL_CTX_new(lib.TLS_client_method())
    if ctx == ffi.NULL:
        raise RuntimeError("SSL_CTX_new failed")
    if lib.SSL_CTX_use_certificate_chain_file(ctx, args.cert.encode()) != 1:
        raise RuntimeError(f"cannot load {args.cert}")
    if lib.SSL_CTX_use_PrivateKey_file(ctx, args.key.encode(), lib.SSL_FILETYPE_PEM) != 1:
        raise RuntimeError(f"cannot load {args.key}")
    lib.SSL_CTX_set_verify(ctx, lib.SSL_VERIFY_NONE, ffi.NULL)
    lib.SSL_CTX_set_session_cache_mode(ctx, lib.SSL_SESS_CACHE_OFF)
    request = b"GET / HTTP/1.0\r\n\r\n"
    buf = ffi.new("char[]", 4096)
    sni = args.sni.encode()
    timeout = struct.pack("ll", 10, 0)  # bound every blocking call without Python's timeout mode
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("READY", flush=True)
    ok = failed = 0
    errors: dict[str, int] = {}
    negotiated = ""
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline and not stop.is_set():
        try:
            sock = socket.create_connection((HOST, args.port), timeout=10)
        except OSError as exc:
            failed += 1
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            time.sleep(0.01)
            continue
        sock.settimeout(None)
        # Like curl, Go, libpq and asyncio: without it the small request after the handshake
        # can wait for a delayed ACK (40 ms) whenever the server sends nothing first.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
        conn = lib.SSL_new(ctx)
        try:
            lib.SSL_set_fd(conn, sock.fileno())
            lib.SSL_set_connect_state(conn)
            lib.SSL_set_tlsext_host_name(conn, sni)
            got = 0
            rc = lib.SSL_do_handshake(conn)
            if rc == 1 and lib.SSL_write(conn, request, len(request)) == len(request):
                while (n := lib.SSL_read(conn, buf, 4096)) > 0:
                    got += n
            if got:
                ok += 1
                if not negotiated:
                    cipher = lib.SSL_CIPHER_get_name(lib.SSL_get_current_cipher(conn))
                    version = ffi.string(lib.SSL_get_version(conn)).decode()
                    negotiated = f"{version} {ffi.string(cipher).decode()}"
            elif not stop.is_set():  # not the connection that SIGTERM interrupted
                failed += 1
                kind = f"handshake={rc} ssl_error={lib.SSL_get_error(conn, rc)}"
                errors[kind] = errors.get(kind, 0) + 1
        finally:
            lib.ERR_clear_error()
            lib.SSL_free(conn)
            sock.close()
    version = ffi.string(lib.OpenSSL_version(0)).decode()
    return {"ok": ok, "failed": failed, "errors": errors, "tls": negotiated, "openssl": version}


def worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tls.py _worker")
    parser.add_argument("kind", choices=["blast", "responder", "tput", "hsclient"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--direction", choices=["fwd", "rev"], default="fwd")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--ca")
    parser.add_argument("--sni", default=SNI)
    parser.add_argument("--raw", action="store_true", help="tput: unencrypted payload after the handshake")
    args = parser.parse_args(argv)
    tcp.raise_nofile(None)
    if args.kind == "blast":
        _blast_main(args.port, args.cert, args.key)
    elif args.kind == "responder":
        tcp.run_async(_responder_main(args.port))
    else:
        try:
            result = _tput_main(args) if args.kind == "tput" else _hsclient_main(args)
        except (OSError, ssl.SSLError, RuntimeError) as exc:
            result = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(result), flush=True)
        return 1 if "error" in result else 0
    return 0


# ----------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/tls.py",
        description="Side-by-side TLS benchmark: ferryman vs HAProxy (see bench/README.md, TLS).",
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each timed window (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="untimed lead-in of each run (default 1)")
    parser.add_argument(
        "--only", default=",".join(METRICS), help=f"comma-separated subset of {','.join(METRICS)}"
    )
    parser.add_argument(
        "--paths",
        default=",".join(DEFAULT_PATHS),
        help=f"comma-separated subset of {','.join(DEFAULT_PATHS + OPTIONAL_PATHS)} "
        "(direct: passthrough rows only: the client talks to the TLS backend itself)",
    )
    parser.add_argument(
        "--key-type", choices=["ecdsa", "rsa"], default="ecdsa", help="ECDSA P-256 or RSA-2048"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="interleaved rounds; the median is shown (default 1)"
    )
    parser.add_argument(
        "--hs-clients", type=int, default=8, help="parallel handshake client processes (default 8)"
    )
    parser.add_argument(
        "--hs-client",
        choices=["auto", "cffi", "s_time"],
        default="auto",
        help="handshake load generator: cffi (this file's client on the OpenSSL bundled with "
        "cryptography), s_time (openssl s_time -new -www /), auto: cffi when usable (default)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="repeat a run disturbed by other work up to N times (default 2)",
    )
    parser.add_argument(
        "--max-interference",
        type=float,
        default=0.10,
        help="a run is disturbed when other processes took more than this share of the machine "
        "(default 0.10)",
    )
    parser.add_argument(
        "--haproxy-threads", type=int, default=1, help="HAProxy nbthread (default 1, like ferryman)"
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin the proxy and the tools to separate CPUs"
    )
    parser.add_argument(
        "--wait-idle", type=float, default=120.0, help="wait up to this long for a quiet machine"
    )
    parser.add_argument("--idle-threshold", type=float, default=0.10, help="busy fraction counted as quiet")
    parser.add_argument("--ferryman", help="ferryman executable (default: the repo's .venv/bin/ferryman)")
    parser.add_argument(
        "--no-snapshot",
        action="store_true",
        help="run ferryman from the live working tree, not a copy of src/",
    )
    parser.add_argument("--haproxy", default="/usr/sbin/haproxy", help="HAProxy executable")
    parser.add_argument(
        "--py-spy",
        nargs="?",
        const="auto",
        default=None,
        help="record ferryman with py-spy (raw folded stacks, into --results-dir) during its timed "
        "windows; optional value: the py-spy executable. Profiled runs are slower (the JSON marks them)",
    )
    parser.add_argument("--py-spy-native", action="store_true", help="with --py-spy: also sample C frames")
    parser.add_argument("--results-dir", default=str(HERE / "results"), help="where the JSON goes")
    parser.add_argument(
        "--keep-tmp", action="store_true", help="keep the temp dir (configs, logs, certificates)"
    )
    args = parser.parse_args(argv)
    args.only = [m.strip() for m in args.only.split(",") if m.strip()]
    bad = [m for m in args.only if m not in METRICS]
    if bad or not args.only:
        parser.error(f"--only: unknown metric(s) {', '.join(bad)}; choose from {', '.join(METRICS)}")
    args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    bad = [p for p in args.paths if p not in DEFAULT_PATHS + OPTIONAL_PATHS]
    if bad or not args.paths:
        parser.error(f"--paths: unknown path(s) {', '.join(bad)}")
    if args.seconds <= 0 or args.warmup < 0 or args.rounds < 1 or args.hs_clients < 1:
        parser.error("--seconds > 0, --warmup >= 0, --rounds >= 1, --hs-clients >= 1")
    if args.py_spy == "auto":
        args.py_spy = shutil.which("py-spy") or str(REPO / ".venv" / "bin" / "py-spy")
    if args.py_spy and not os.access(args.py_spy, os.X_OK):
        parser.error(f"py-spy not found: {args.py_spy}")
    return args


def main(argv: list[str]) -> int:
    if argv[:1] == ["_worker"]:
        return worker_main(argv[1:])
    args = parse_args(argv)

    ferryman_bin, haproxy_bin, paths = tcp.find_binaries(args)
    if args.hs_client in ("auto", "cffi"):
        why = hsclient_available()
        if why and args.hs_client == "cffi":
            log(f"cffi handshake client unusable ({why})")
            return 2
        args.hs_client = "s_time" if why else "cffi"
        if why:
            log(f"cffi handshake client unusable ({why}): using openssl s_time")
    if "handshakes" in args.only and args.hs_client == "s_time" and shutil.which("openssl") is None:
        log("openssl not found: handshakes skipped")
        args.only.remove("handshakes")

    proxy_cpus, tool_cpus = tcp.pin_cpus(args.no_pin)
    soft = tcp.raise_nofile(16384)
    haproxy_maxconn = max(256, min(4096, (soft - 500) // 2))

    started = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    tmp = Path(tempfile.mkdtemp(prefix="ferryman-tls-bench-"))
    (tmp / "policy.json").write_text(json.dumps(FERRYMAN_POLICY))
    procs = Procs(tmp, tool_cpus, proxy_cpus)
    tcp.install_signal_handlers()
    source: dict[str, Any] = tcp.source_state()
    samples: Samples = {}
    interrupted = False
    ctx: Ctx | None = None
    try:
        certs = make_certs(tmp, args.key_type)
        snapshot = None
        if not args.ferryman and not args.no_snapshot and any(p.startswith("ferryman") for p in paths):
            source.update(snapshot_source(tmp, args.wait_idle))
            snapshot = Path(source["snapshot"])
            log(f"ferryman runs from a snapshot of src/ferryman ({source['sha256']})")
        ctx = Ctx(args, tmp, procs, certs, ferryman_bin, haproxy_bin, snapshot, haproxy_maxconn, stamp)
        log(
            f"paths: {', '.join(paths)}; metrics: {', '.join(args.only)}; {args.seconds:g}s windows "
            f"(+{args.warmup:g}s warm-up), {args.rounds} round(s); certificates: {certs.description}; "
            f"proxy CPUs {sorted(proxy_cpus) if proxy_cpus else 'any'}, "
            f"tool CPUs {sorted(tool_cpus) if tool_cpus else 'any'}; temp dir {tmp}"
        )
        for rnd in range(args.rounds):
            for metric in METRICS:
                if metric not in args.only:
                    continue
                log(f"== {metric} (round {rnd + 1}/{args.rounds})")
                if metric == "handshakes":
                    bench_handshakes(ctx, paths, rnd, samples)
                else:
                    bench_throughput(ctx, metric, paths, rnd, samples)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping everything")
    finally:
        procs.stop_all()
        if args.keep_tmp or interrupted:
            log(f"temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if interrupted or ctx is None:
        return 130

    results, bound = aggregate(samples)
    evaluation = evaluate(results)
    per_round = round_ratios(samples)
    shown = [p for p in paths if any(p in v for v in results.values())]
    print()
    print(f"Certificates: {ctx.certs.description}; TLS as negotiated: {negotiated(samples)}")
    print(render(results, evaluation, shown, bound))
    if args.rounds > 1:
        print("\nferryman/HAProxy per round (same-round best HAProxy; the machine's speed drifts):")
        for key, by_fm in per_round.items():
            for fm, ratios in by_fm.items():
                shown_r = ", ".join("n/a" if r is None else f"{r:.2f}" for r in ratios)
                print(f"  {key:14s} {fm:18s} {shown_r}")
    if ctx.notes:
        print("\nNotes:")
        for note in ctx.notes:
            print(f"  - {note}")

    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"tls-{stamp}.json"
    details: dict[str, Any] = {}
    for (key, path), runs in samples.items():
        details.setdefault(key, {})[path] = runs
    doc = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "options": {
            "seconds": args.seconds,
            "warmup": args.warmup,
            "only": args.only,
            "paths": paths,
            "rounds": args.rounds,
            "hs_clients": args.hs_clients,
            "hs_client": args.hs_client,
            "key_type": args.key_type,
            "haproxy_threads": args.haproxy_threads,
            "haproxy_maxconn": haproxy_maxconn,
            "max_interference": args.max_interference,
            "pinned": proxy_cpus is not None,
            "proxy_cpus": sorted(proxy_cpus) if proxy_cpus else None,
            "tool_cpus": sorted(tool_cpus) if tool_cpus else None,
            "py_spy": bool(args.py_spy),
        },
        "certificates": ctx.certs.description,
        "tls_negotiated": negotiated(samples),
        "machine": {"cpus": os.cpu_count(), **tool_versions(haproxy_bin)},
        "source": source,
        "targets": {r.key: target_text(r) for r in rows()},
        "results": results,
        "evaluation": evaluation,
        "ratios_per_round": per_round,
        "tools_bound": bound,
        "checks": ctx.checks,
        "details": details,
        "machine_busy_before": ctx.busy,
        "profiles": ctx.profiles,
        "notes": ctx.notes,
    }
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"\nJSON: {out}")
    return 0


def negotiated(samples: Samples) -> str:
    seen = sorted({r["tls"] for runs in samples.values() for r in runs if r.get("tls")})
    return ", ".join(seen) or "n/a"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
