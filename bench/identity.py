#!/usr/bin/env python3
"""Identity lookup cost: new connections per second through a TCP listener identified by
Tailscale WhoIs (against the LocalAPI double, over a real unix socket) versus the same listener
with ``static`` identity, in one run. Target (Tailscale issue): ratio ≥ 0.8.

Each connection does one small round trip to an echo backend and is identified, authorized
and audited; every Tailscale connection sends its own WhoIs (the double counts them: the
"WhoIs/conn" column). The LocalAPI runs in its own process, over a real unix socket:
``--double lean`` (default) serves the test double's own answers, rendered once and replayed
byte for byte (a real tailscaled answers from Go, not from a Python h11 server);
``--double test`` runs the test suite's LocalAPI double itself, for reference. Per-process CPU
(``/proc/<pid>/stat``) is reported per connection. See bench/README.md.

    .venv/bin/python bench/identity.py [--seconds 5] [--concurrency 16] [--rounds 3] [--double lean|test]

Reuses bench/tcp.py's echo and connection-rate workers. Loopback only; everything it starts is
stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
CAP = "ferryman.dev/cap/ferryman"

PEER_IP = "127.0.0.1"


def _peer_kwargs() -> dict[str, Any]:
    return {"login": "bench@example.com", "host": "bench", "cap_map": {CAP: [{"backends": {"ts": {}}}]}}


async def _render(sock_path: str, request: bytes) -> bytes:
    """One complete answer of the test double to ``request`` (sent on a fresh connection)."""
    reader, writer = await asyncio.open_unix_connection(sock_path)
    writer.write(request)
    data = b""
    while True:
        chunk = await reader.read(65536)
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if not chunk or (sep and len(body) >= int(re.search(rb"Content-Length: (\d+)", head)[1])):  # type: ignore[index]
            break
    writer.close()
    await writer.wait_closed()
    return data


_REQ_RE = re.compile(rb"GET /localapi/v0/whois\?addr=([^ \r\n]+) HTTP/1\.1\r\n((?:[^\r\n]+\r\n)*?)\r\n")
_DATE_RE = re.compile(rb"\r\nDate: [^\r\n]*\r\n")


class LeanWhoIs(asyncio.Protocol):
    """``GET /localapi/v0/whois`` served with answers the test double rendered once, byte for byte
    (only ``Date`` is refreshed, once a second); see bench/README.md for what this leaves out."""

    def __init__(self, answers: dict[str, bytes], stats: dict[str, int]) -> None:
        self.answers = answers
        self.stats = stats
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        stats["connections"] += 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        out = []
        while True:
            m = _REQ_RE.match(buf)
            if m is None:
                break
            buf = buf[m.end() :]
            out.append(self.answer(m[1], b"\r\n" + m[2].lower()))
        self.buf = buf
        assert self.transport is not None
        if out:
            self.transport.write(b"".join(out))
        if b"\r\n\r\n" in buf or len(buf) > 16384:  # something this double does not serve
            self.transport.write(_with_date(self.answers["bad"]))
            self.transport.close()

    def answer(self, addr: bytes, headers: bytes) -> bytes:
        self.stats["requests"] += 1
        if b"\r\nhost: local-tailscaled.sock\r\n" not in headers or b"\r\nreferer:" in headers:
            return _with_date(self.answers["forbidden"])
        ip, sep, port = unquote_plus(addr.decode("latin-1")).rpartition(":")
        if not sep or not port.isdigit():
            ip = "?"
        return _with_date(self.answers["ok" if ip == PEER_IP else "notfound"])


_date = [0, b""]


def _with_date(template: bytes) -> bytes:
    now = int(time.time())
    if now != _date[0]:
        _date[0], _date[1] = now, email.utils.formatdate(now, usegmt=True).encode()
    return template.replace(b"@DATE@", _date[1])  # type: ignore[arg-type]


async def serve_double(kind: str, sock_path: str) -> None:
    sys.path.insert(0, str(REPO))
    from tests.support.localapi_double import LocalAPIDouble

    loop = asyncio.get_running_loop()
    stats = {"requests": 0, "connections": 0}
    keep: list[Any] = []
    if kind == "test":
        double = await LocalAPIDouble(sock_path).start()
        double.add_peer(PEER_IP, **_peer_kwargs())

        def report() -> None:
            stats.update(requests=double.count("whois"), connections=double.connections)
            print(json.dumps(stats), flush=True)
    else:
        ref = await LocalAPIDouble(sock_path + ".ref").start()
        ref.add_peer(PEER_IP, **_peer_kwargs())
        tail = b" HTTP/1.1\r\nHost: local-tailscaled.sock\r\n\r\n"
        answers = {
            "ok": await _render(ref.socket_path, b"GET /localapi/v0/whois?addr=127.0.0.1%3A1" + tail),
            "notfound": await _render(ref.socket_path, b"GET /localapi/v0/whois?addr=100.64.9.9%3A1" + tail),
            "forbidden": await _render(
                ref.socket_path, b"GET /localapi/v0/whois?addr=1.2.3.4 HTTP/1.1\r\nHost: x\r\n\r\n"
            ),
            "bad": await _render(ref.socket_path, b"GET /localapi/v0/whois?addr=x" + tail),
        }
        await ref.close()
        answers = {k: _DATE_RE.sub(b"\r\nDate: @DATE@\r\n", v) for k, v in answers.items()}
        keep.append(await loop.create_unix_server(lambda: LeanWhoIs(answers, stats), sock_path))

        def report() -> None:
            print(json.dumps(stats), flush=True)

    loop.add_signal_handler(signal.SIGUSR1, report)
    print("ready", flush=True)
    await asyncio.Event().wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (``/proc/<pid>/stat``), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def connrate(port: int, seconds: float, concurrency: int) -> dict[str, float]:
    out = subprocess.run(
        [
            PY,
            str(HERE / "tcp.py"),
            "_worker",
            "connrate",
            "--port",
            str(port),
            "--concurrency",
            str(concurrency),
            "--seconds",
            str(seconds),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    )
    return json.loads(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="alternate static/tailscale this many times")
    parser.add_argument(
        "--double",
        choices=["lean", "test"],
        default="lean",
        help="lean: pre-rendered answers of the test double (default); test: the test double itself",
    )
    args = parser.parse_args()

    procs: list[subprocess.Popen[bytes]] = []
    tmp = Path(tempfile.mkdtemp(prefix="ferryman-idbench-"))
    try:
        sock_path = str(tmp / "tailscaled.sock")
        double = subprocess.Popen(
            [PY, str(Path(__file__).resolve()), "_double", args.double, sock_path], stdout=subprocess.PIPE
        )
        procs.append(double)
        assert double.stdout is not None
        if double.stdout.readline().strip() != b"ready":
            raise RuntimeError("LocalAPI double did not start")
        echo_port = free_port()
        echo = subprocess.Popen([PY, str(HERE / "tcp.py"), "_worker", "echo", "--port", str(echo_port)])
        procs.append(echo)
        wait_port(echo_port)
        p_static, p_ts = free_port(), free_port()
        (tmp / "policy.json").write_text(
            json.dumps({"grants": [{"src": ["*"], "app": {CAP: [{"backends": {"static": {}}}]}}]})
        )
        (tmp / "gw.toml").write_text(f"""
policy_file = "policy.json"
log_level = "warning"
[audit]
file = "{tmp / "audit.jsonl"}"
[revalidation]
interval = "0"
[tailscale]
socket = "{sock_path}"
[[identity.static]]
cidr = "127.0.0.0/8"
user = "bench@example.com"
[[listeners]]
name = "static"
listen = "127.0.0.1:{p_static}"
backend = "127.0.0.1:{echo_port}"
identity = ["static"]
[[listeners]]
name = "ts"
listen = "127.0.0.1:{p_ts}"
backend = "127.0.0.1:{echo_port}"
identity = ["tailscale"]
""")
        gw = subprocess.Popen(
            [str(REPO / ".venv/bin/ferryman"), "serve", "-c", str(tmp / "gw.toml")], stderr=subprocess.DEVNULL
        )
        procs.append(gw)
        wait_port(p_static)
        wait_port(p_ts)
        rates: dict[str, list[float]] = {"static": [], "tailscale": []}
        cpu: dict[str, dict[str, list[float]]] = {"static": {}, "tailscale": {}}
        watched = {"gateway": gw.pid, "double": double.pid, "echo": echo.pid}
        for round_no in range(args.rounds):
            for name, port in (("static", p_static), ("tailscale", p_ts)):
                stats0 = double_stats(double)
                before = {k: cpu_seconds(pid) for k, pid in watched.items()}
                data = connrate(port, args.seconds, args.concurrency)
                after = {k: cpu_seconds(pid) for k, pid in watched.items()}
                stats1 = double_stats(double)
                if data.get("errors"):
                    print(f"warning: {name}: {data['errors']} errors", file=sys.stderr)
                rates[name].append(data["rate"])
                rate, p99 = data["rate"], data["p99_ms"]
                # CPU over the whole client run (warm-up included) per connection made in it.
                made = rate * data["elapsed"]
                per_conn = {k: (after[k] - before[k]) / made * 1e6 if made else 0.0 for k in watched}
                for k, us in per_conn.items():
                    cpu[name].setdefault(k, []).append(us)
                whois = stats1["requests"] - stats0["requests"]
                opened = stats1["connections"] - stats0["connections"]
                print(
                    f"round {round_no + 1}: {name:9s} {rate:8.0f} conn/s  p99 {p99:6.2f} ms  CPU µs/conn: "
                    + "  ".join(f"{k} {us:4.0f}" for k, us in per_conn.items())
                    + f"  WhoIs/conn {whois / made if made else 0:.2f} (LocalAPI conns opened {opened})",
                    file=sys.stderr,
                )
        static, tailscale = statistics.median(rates["static"]), statistics.median(rates["tailscale"])
        ratio = tailscale / static if static else 0.0
        print()
        print("| identity | new connections/s (median) | each round |")
        print("|---|---:|---|")
        for label, median, key in (
            ("static", static, "static"),
            ("tailscale (WhoIs)", tailscale, "tailscale"),
        ):
            each = ", ".join(f"{r:,.0f}" for r in rates[key])
            print(f"| {label} | {median:,.0f} | {each} |")
        print(
            f"\nratio tailscale/static = {ratio:.2f} (target ≥ 0.80: {'met' if ratio >= 0.8 else 'NOT met'})"
        )
        cpu_median = {name: {k: statistics.median(v) for k, v in per.items()} for name, per in cpu.items()}
        print("\nCPU µs per connection (median):")
        for name, per in cpu_median.items():
            print(f"  {name:9s} " + "  ".join(f"{k} {us:,.0f}" for k, us in per.items()))
        results = HERE / "results"
        results.mkdir(exist_ok=True)
        (results / f"identity-{int(time.time())}.json").write_text(
            json.dumps({"rates": rates, "ratio": ratio, "cpu_us_per_conn": cpu})
        )
        return 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
        for path in tmp.iterdir():
            path.unlink()
        os.rmdir(tmp)


def double_stats(double: subprocess.Popen[bytes]) -> dict[str, int]:
    assert double.stdout is not None
    double.send_signal(signal.SIGUSR1)
    return dict(json.loads(double.stdout.readline()))


if __name__ == "__main__":
    if sys.argv[1:2] == ["_double"]:
        import uvloop

        try:
            uvloop.run(serve_double(sys.argv[2], sys.argv[3]))
        except KeyboardInterrupt:
            pass
        raise SystemExit(0)
    raise SystemExit(main())
