#!/usr/bin/env python3
"""Experiment: would an in-kernel relay (BPF sockhash + sk_skb verdict) make ferryman faster?

Not product code. This measures one design that was considered for the relay and rejected: once
a connection is admitted, put both sockets in a ``BPF_MAP_TYPE_SOCKHASH`` whose stream-verdict
program redirects every received skb to the peer socket's egress, so no byte (and no wake-up)
reaches user space again. Per-direction byte counts and the time of the last byte live in a BPF
hash map (what audit records and ``idle_timeout`` would need).

The relay here is minimal: accept, connect, join the pair to the map, then wait for EOF on each
side; on EOF it waits until everything the kernel redirected has entered the peer's send queue
(the verdict program's byte count against ``tcpi_bytes_acked`` + ``SIOCOUTQ`` of the peer),
then passes the half-close on. Data that arrived before the join is pushed through the verdict
program by setting ``SO_RCVLOWAT`` (which calls ``sk_data_ready``).

    .venv/bin/python bench/sockmap.py                  # all rows (~3 min)
    .venv/bin/python bench/sockmap.py --only redis --seconds 3

Paths: ``direct``, ``sockmap`` (this relay), ``ferryman`` (the product, TCP mode) and
``haproxy`` (Debian's, ``nbthread 1``), pinned as in ``tcp.py`` (proxy alone on the last CPU).
Rows: redis-benchmark PING_INLINE c=1/c=50 (system Redis), iperf3 P1/P8 fwd/rev, and
``pgbench -S -c 16 -j 2`` (persistent connections) against the system PostgreSQL on 5432 (trust
auth; the bench creates database ``ferryman_sockmap_bench``). Needs root (BPF) and Linux ≥ 5.10.

Results on the dev VM, and why it was not adopted: bench/README.md (`sockmap.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import fcntl
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tcp

# ----------------------------------------------------------------------------------------------
# bpf(2) through ctypes: two maps and one 28-instruction program

_libc = ctypes.CDLL(None, use_errno=True)
_NR_BPF = 321  # x86_64
_MAP_CREATE, _MAP_LOOKUP, _MAP_UPDATE, _MAP_DELETE, _PROG_LOAD, _PROG_ATTACH = 0, 1, 2, 3, 5, 8
_MAP_HASH, _MAP_SOCKHASH = 1, 18
_PROG_SK_SKB = 14
_ATTACH_STREAM_VERDICT = 5
_SO_COOKIE = 57
_TCPI_BYTES_ACKED = 120  # offsetof(struct tcp_info, tcpi_bytes_acked)
_TCPI_BYTES_RECEIVED = 128


def _bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr.ljust(128, b"\0"), 128)
    fd = _libc.syscall(_NR_BPF, cmd, buf, 128)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({cmd}): {os.strerror(err)}")
    return int(fd)


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | (src << 4), off, imm)


def _ld_map(dst: int, fd: int) -> bytes:
    return _insn(0x18, dst, 1, 0, fd) + _insn(0)  # BPF_LD_IMM64 with BPF_PSEUDO_MAP_FD


def verdict_program(counters: int, peers: int) -> bytes:
    """key = socket cookie; counters[key] += len, = now; redirect to peers[key] (egress).

    Empty skbs (a FIN comes as one) are dropped: redirected, they would reach the peer after
    the relay has passed the half-close on, and the send would fail with EPIPE."""
    return b"".join(
        [
            _insn(0xBF, 6, 1),  # r6 = skb
            _insn(0x61, 2, 6, 0),  # r2 = skb->len
            _insn(0x15, 2, off=23, imm=0),  # an empty skb (a FIN): drop
            _insn(0x85, imm=46),  # r0 = bpf_get_socket_cookie(skb)
            _insn(0x7B, 10, 0, -8),  # *(u64 *)(r10 - 8) = r0
            _insn(0xBF, 2, 10),
            _insn(0x07, 2, imm=-8),  # r2 = &key
            _ld_map(1, counters),
            _insn(0x85, imm=1),  # r0 = bpf_map_lookup_elem(counters, &key)
            _insn(0x15, 0, off=13, imm=0),  # not ours: pass
            _insn(0x61, 1, 6, 0),  # r1 = skb->len
            _insn(0xDB, 0, 1, 0, 0),  # lock *(u64 *)(r0 + 0) += r1
            _insn(0xBF, 7, 0),
            _insn(0x85, imm=5),  # r0 = bpf_ktime_get_ns()
            _insn(0x7B, 7, 0, 8),  # *(u64 *)(r7 + 8) = r0
            _insn(0xBF, 1, 6),
            _ld_map(2, peers),
            _insn(0xBF, 3, 10),
            _insn(0x07, 3, imm=-8),
            _insn(0xB7, 4, imm=0),  # flags 0: the peer's egress
            _insn(0x85, imm=72),  # bpf_sk_redirect_hash(skb, peers, &key, 0)
            _insn(0x95),
            _insn(0xB7, 0, imm=1),  # pass: SK_PASS
            _insn(0x95),
            _insn(0xB7, 0, imm=0),  # drop: SK_DROP
            _insn(0x95),
        ]
    )


class KernelRelay:
    """The maps and the attached program; :meth:`join` hands a connected pair to the kernel."""

    def __init__(self, entries: int = 65536) -> None:
        self.counters = _bpf(_MAP_CREATE, struct.pack("IIIII", _MAP_HASH, 8, 16, entries, 0))
        self.peers = _bpf(_MAP_CREATE, struct.pack("IIIII", _MAP_SOCKHASH, 8, 4, entries, 0))
        insns = verdict_program(self.counters, self.peers)
        code = ctypes.create_string_buffer(insns, len(insns))
        lic = ctypes.create_string_buffer(b"GPL")
        log = ctypes.create_string_buffer(1 << 16)
        attr = struct.pack(
            "IIQQIIQII16s",
            _PROG_SK_SKB,
            len(insns) // 8,
            ctypes.addressof(code),
            ctypes.addressof(lic),
            1,
            len(log),
            ctypes.addressof(log),
            0,
            0,
            b"ferryman_relay",
        )
        try:
            self.prog = _bpf(_PROG_LOAD, attr)
        except OSError as exc:
            raise OSError(exc.errno, f"{exc.strerror}: {log.value.decode(errors='replace')}") from None
        _bpf(_PROG_ATTACH, struct.pack("IIIII", self.peers, self.prog, _ATTACH_STREAM_VERDICT, 0, 0))

    def _elem(self, cmd: int, fd: int, key: bytes, value: bytes = b"") -> bytes:
        k = ctypes.create_string_buffer(key, len(key))
        v = ctypes.create_string_buffer(value.ljust(16, b"\0"), 16)
        _bpf(cmd, struct.pack("IIQQQ", fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0))
        return v.raw

    def join(self, a: socket.socket, b: socket.socket) -> tuple[bytes, bytes]:
        ka = a.getsockopt(socket.SOL_SOCKET, _SO_COOKIE, 8)
        kb = b.getsockopt(socket.SOL_SOCKET, _SO_COOKIE, 8)
        try:  # only ESTABLISHED sockets can join (EOPNOTSUPP after a FIN)
            for key in (ka, kb):
                self._elem(_MAP_UPDATE, self.counters, key)
            # The client first: it is the side likely to have sent its FIN already, and a
            # failure before any socket joined leaves both untouched.
            self._elem(_MAP_UPDATE, self.peers, kb, struct.pack("I", a.fileno()))
            self._elem(_MAP_UPDATE, self.peers, ka, struct.pack("I", b.fileno()))
        except OSError:
            self.leave(ka, kb)
            raise
        for s in (a, b):  # bytes that arrived before the join: through the verdict now
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        return ka, kb

    def moved(self, key: bytes) -> int:
        """Bytes received on the socket with cookie ``key`` and redirected to its peer."""
        return int(struct.unpack_from("Q", self._elem(_MAP_LOOKUP, self.counters, key))[0])

    def leave(self, *keys: bytes) -> None:
        for key in keys:
            for fd in (self.peers, self.counters):
                with contextlib.suppress(OSError):
                    self._elem(_MAP_DELETE, fd, key)


def _tcp_info(sock: socket.socket, offset: int) -> int:
    return int(struct.unpack_from("Q", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232), offset)[0])


def _ioctl_int(sock: socket.socket, request: int) -> int:
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0])


def _written(sock: socket.socket) -> int:
    """A lower bound of the bytes ever queued on ``sock``: acked + still in the send queue."""
    acked = _tcp_info(sock, _TCPI_BYTES_ACKED)
    return acked + _ioctl_int(sock, termios.TIOCOUTQ)


def _consumed(sock: socket.socket) -> int:
    """Bytes received on ``sock`` and taken off its receive queue (by us or by the verdict)."""
    while True:
        before = _tcp_info(sock, _TCPI_BYTES_RECEIVED)
        unread = _ioctl_int(sock, termios.FIONREAD)
        if _tcp_info(sock, _TCPI_BYTES_RECEIVED) == before:
            return before - unread


class _Pair:
    def __init__(
        self, kernel: KernelRelay, loop: asyncio.AbstractEventLoop, a: socket.socket, b: socket.socket
    ):
        self.kernel, self.loop, self.socks = kernel, loop, (a, b)
        self.written = (_written(a), _written(b))
        self.received = (_consumed(a), _consumed(b))  # before the join: ours, not the verdict's
        self.keys = kernel.join(a, b)
        self.ended = [False, False]
        for i in (0, 1):
            loop.add_reader(self.socks[i].fileno(), self._readable, i)

    def _readable(self, i: int) -> None:
        src, dst = self.socks[i], self.socks[1 - i]
        try:
            data = src.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:  # only if the peer left the map; not expected
            dst.sendall(data)
            return
        self.loop.remove_reader(src.fileno())
        self._pass_eof(i)

    def _pass_eof(self, i: int) -> None:
        src, dst = self.socks[i], self.socks[1 - i]
        try:
            moved = self.kernel.moved(self.keys[i])
            # Everything received has been through the verdict program, and everything it
            # redirected has left the peer's psock backlog for its send queue.
            # (At EOF: the FIN took one sequence number, which tcpi_bytes_received counts.)
            pending = _tcp_info(src, _TCPI_BYTES_RECEIVED) - 1 - self.received[i] - moved
            pending += moved - (_written(dst) - self.written[1 - i])
        except OSError:
            pending = 0
        if pending > 0:  # look again shortly
            self.loop.call_later(0.001, self._pass_eof, i)
            return
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        self.ended[i] = True
        if all(self.ended):
            self.kernel.leave(*self.keys)
            for s in self.socks:
                s.close()


async def _relay_main(port: int, target: tuple[str, int]) -> None:
    kernel = KernelRelay()
    loop = asyncio.get_running_loop()
    server = socket.create_server((tcp.HOST, port), backlog=1024)
    server.setblocking(False)
    while True:
        a, _ = await loop.sock_accept(server)
        b = socket.socket()
        for s in (a, b):
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await loop.sock_connect(b, target)
        except OSError:
            a.close()
            b.close()
            continue
        try:
            _Pair(kernel, loop, a, b)
        except OSError:  # a side already sent its FIN: relay in user space
            asyncio.ensure_future(_copy_pair(loop, a, b))


async def _copy_pair(loop: asyncio.AbstractEventLoop, a: socket.socket, b: socket.socket) -> None:
    async def pump(src: socket.socket, dst: socket.socket) -> None:
        while data := await loop.sock_recv(src, 65536):
            await loop.sock_sendall(dst, data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    with a, b, contextlib.suppress(OSError):
        await asyncio.gather(pump(a, b), pump(b, a))


# ----------------------------------------------------------------------------------------------
# Measurement

PATHS = ("direct", "sockmap", "ferryman", "haproxy")
DB = "ferryman_sockmap_bench"


@contextlib.contextmanager
def proxy(ctx: tcp.Ctx, path: str, backend_port: int, metric: str) -> Iterator[int]:
    if path != "sockmap":
        with tcp.proxy_for(ctx, path, backend_port, metric) as p:
            yield p.port
        return
    name = ctx.next_name(f"sockmap-{metric}")
    port = tcp.free_port()
    cmd = [sys.executable, str(Path(__file__).resolve()), "_relay", str(port), str(backend_port)]
    proc = ctx.procs.start(name, cmd, role="proxy")
    try:
        tcp.wait_listening(port, proc, ctx.procs, name)
        yield port
    finally:
        ctx.procs.stop(proc)


def iperf(ctx: tcp.Ctx, port: int, streams: int, reverse: bool) -> float:
    cmd = ["iperf3", "-c", tcp.HOST, "-p", str(port), "-t", str(ctx.args.seconds), "-P", str(streams), "-J"]
    done = ctx.procs.run("iperf3", cmd + (["-R"] if reverse else []), timeout=ctx.args.seconds + 30)
    return float(json.loads(done.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e9


def pgbench(ctx: tcp.Ctx, port: int) -> float:
    cmd = ["pgbench", "-h", tcp.HOST, "-p", str(port), "-U", "postgres", "-S", "-c", "16", "-j", "2"]
    done = ctx.procs.run("pgbench", [*cmd, "-T", str(ctx.args.seconds), DB], timeout=ctx.args.seconds + 60)
    match = re.search(r"tps = ([0-9.]+)", done.stdout)
    if match is None:
        raise RuntimeError(f"pgbench: {done.stdout[-300:]} {done.stderr[-300:]}")
    return float(match.group(1))


def measure(ctx: tcp.Ctx, paths: list[str]) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    only = ctx.args.only
    if "redis" in only:
        for clients in (1, 50):
            for path in paths:
                with proxy(ctx, path, 6379, "redis") as port:
                    tcp.redis_run(ctx, port, clients, 1000)
                    rps = [
                        tcp.redis_run(ctx, port, clients, ctx.args.redis_requests)["rps"] for _ in range(3)
                    ]
                rows.setdefault(f"redis c={clients} req/s", {})[path] = sorted(rps)[1]
                tcp.log(f"redis c={clients} {path}: {sorted(rps)[1]:,.0f} req/s")
    if "iperf" in only:
        _, server_port = tcp.start_iperf_server(ctx)
        for streams in (1, 8):
            for reverse in (False, True):
                key = f"iperf3 P{streams} {'rev' if reverse else 'fwd'} Gbit/s"
                for path in paths:
                    with proxy(ctx, path, server_port, "iperf") as port:
                        rows.setdefault(key, {})[path] = iperf(ctx, port, streams, reverse)
                    tcp.log(f"{key} {path}: {rows[key][path]:.2f}")
    if "pgbench" in only:
        subprocess.run(["createdb", "-h", tcp.HOST, "-U", "postgres", DB], capture_output=True)
        init = ["pgbench", "-h", tcp.HOST, "-U", "postgres", "-i", "-q", "-s", "10", DB]
        subprocess.run(init, capture_output=True, check=True)
        for path in paths:
            with proxy(ctx, path, 5432, "pgbench") as port:
                rows.setdefault("pgbench -S -c16 TPS", {})[path] = pgbench(ctx, port)
            tcp.log(f"pgbench {path}: {rows['pgbench -S -c16 TPS'][path]:,.0f} TPS")
    return rows


def render(rows: dict[str, dict[str, float]], paths: list[str]) -> str:
    head = ["row", *paths, "sockmap/haproxy", "sockmap/ferryman"]
    body = []
    for key, values in rows.items():
        cells = [key] + [f"{values[p]:,.2f}" if p in values else "-" for p in paths]
        sm = values.get("sockmap")
        for other in ("haproxy", "ferryman"):
            base = values.get(other)
            cells.append(f"{sm / base:.2f}x" if sm and base else "-")
        body.append(cells)
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *body]]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv[:1] == ["_relay"]:
        tcp.run_async(_relay_main(int(argv[1]), (tcp.HOST, int(argv[2]))))
        return 0
    parser = argparse.ArgumentParser(prog="bench/sockmap.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--redis-requests", type=int, default=40000)
    parser.add_argument("--only", default="redis,iperf,pgbench", type=lambda s: s.split(","))
    parser.add_argument("--paths", default=",".join(PATHS), type=lambda s: s.split(","))
    parser.add_argument("--ferryman", default=None)
    parser.add_argument("--haproxy", default="/usr/sbin/haproxy")
    parser.add_argument("--haproxy-threads", type=int, default=1)
    parser.add_argument("--no-pin", action="store_true")
    args = parser.parse_args(argv)
    KernelRelay()  # fail early without BPF
    ferryman_bin, haproxy_bin, paths = tcp.find_binaries(args)
    proxy_cpus, tool_cpus = tcp.pin_cpus(args.no_pin)
    tmp = Path(tempfile.mkdtemp(prefix="ferryman-sockmap-"))
    (tmp / "policy.json").write_text(json.dumps(tcp.FERRYMAN_POLICY))
    procs = tcp.Procs(tmp, tool_cpus, proxy_cpus)
    ctx = tcp.Ctx(args, tmp, procs, ferryman_bin, haproxy_bin, 0, 4096)
    started = time.time()
    try:
        rows = measure(ctx, paths)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(render(rows, paths))
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    doc: dict[str, Any] = {"rows": rows, "paths": paths, "seconds": args.seconds}
    (out / f"sockmap-{stamp}.json").write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
