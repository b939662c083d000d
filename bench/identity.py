#!/usr/bin/env python3
"""Identity lookup cost: new connections per second through a TCP listener identified by
Tailscale WhoIs (against the LocalAPI double, over a real unix socket) versus the same listener
with ``static`` identity, in one run. Target (Tailscale issue): ratio ≥ 0.8.

Each connection does one small round trip to an echo backend and is identified, authorized
and audited. The double is the test suite's faithful LocalAPI (tests/support/localapi_double.py),
run in its own process; a real tailscaled answers WhoIs from memory in Go, so this measures
ferryman's client cost plus a Python double's -- an upper bound on the real overhead.

    .venv/bin/python bench/identity.py [--seconds 5] [--concurrency 16] [--rounds 3]

Reuses bench/tcp.py's echo and connection-rate workers. Loopback only; everything it starts is
stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
CAP = "ferryman.dev/cap/ferryman"

DOUBLE = r"""
import asyncio, sys
sys.path.insert(0, {repo!r})
from tests.support.localapi_double import LocalAPIDouble
async def main():
    async with LocalAPIDouble({sock!r}) as d:
        d.add_peer("127.0.0.1", login="bench@example.com", host="bench",
                   cap_map={{{cap!r}: [{{"backends": {{"ts": {{}}}}}}]}})
        print("ready", flush=True)
        await asyncio.Event().wait()
try:
    import uvloop; uvloop.run(main())
except KeyboardInterrupt:
    pass
"""


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
    args = parser.parse_args()

    procs: list[subprocess.Popen[bytes]] = []
    tmp = Path(tempfile.mkdtemp(prefix="ferryman-idbench-"))
    try:
        sock_path = str(tmp / "tailscaled.sock")
        double = subprocess.Popen(
            [PY, "-c", DOUBLE.format(repo=str(REPO), sock=sock_path, cap=CAP)], stdout=subprocess.PIPE
        )
        procs.append(double)
        assert double.stdout is not None
        if double.stdout.readline().strip() != b"ready":
            raise RuntimeError("LocalAPI double did not start")
        echo_port = free_port()
        procs.append(
            subprocess.Popen([PY, str(HERE / "tcp.py"), "_worker", "echo", "--port", str(echo_port)])
        )
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
        for round_no in range(args.rounds):
            for name, port in (("static", p_static), ("tailscale", p_ts)):
                data = connrate(port, args.seconds, args.concurrency)
                if data.get("errors"):
                    print(f"warning: {name}: {data['errors']} errors", file=sys.stderr)
                rates[name].append(data["rate"])
                rate, p99 = data["rate"], data["p99_ms"]
                print(
                    f"round {round_no + 1}: {name:9s} {rate:8.0f} conn/s  p99 {p99:.2f} ms", file=sys.stderr
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
        results = HERE / "results"
        results.mkdir(exist_ok=True)
        (results / f"identity-{int(time.time())}.json").write_text(
            json.dumps({"rates": rates, "ratio": ratio})
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


if __name__ == "__main__":
    raise SystemExit(main())
