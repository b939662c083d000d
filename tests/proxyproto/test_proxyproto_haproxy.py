"""Interop: what a real HAProxy sends with ``send-proxy`` / ``send-proxy-v2`` parses to the truth.

HAProxy runs in the foreground (``-db``) from a temporary config: TCP-mode frontends on free
loopback ports, each relaying to one listening socket owned by the test. A client connects to a
frontend, and the header HAProxy writes to our socket must name the client's real address and
port and the frontend's. Skipped when ``/usr/sbin/haproxy`` is absent.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ferryman import proxyproto

HAPROXY = Path("/usr/sbin/haproxy")

pytestmark = pytest.mark.skipif(not os.access(HAPROXY, os.X_OK), reason="haproxy not installed")


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


HAS_IPV6 = _ipv6_loopback()


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def _is_listening(host: str, port: int) -> bool:
    # Probe by binding rather than connecting: a probe connection would be relayed to our
    # backend socket and arrive before the test's own connection.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


@dataclass
class HAProxy:
    backend: socket.socket
    frontends: dict[str, tuple[str, int]]


@pytest.fixture(scope="module")
def haproxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HAProxy]:
    directory = tmp_path_factory.mktemp("haproxy")
    with socket.socket() as backend:
        backend.bind(("127.0.0.1", 0))
        backend.listen(8)
        backend.settimeout(5)
        backend_port = backend.getsockname()[1]
        # name -> (bind host, server options)
        variants = {
            "v2": ("127.0.0.1", "send-proxy-v2"),
            "v1": ("127.0.0.1", "send-proxy"),
            "v2-crc": ("127.0.0.1", "send-proxy-v2 proxy-v2-options crc32c,unique-id"),
        }
        if HAS_IPV6:
            variants["v2-ipv6"] = ("::1", "send-proxy-v2")
            variants["v1-ipv6"] = ("::1", "send-proxy")
        frontends = {name: (host, _free_port(host)) for name, (host, _) in variants.items()}
        sections = [
            "global\n    maxconn 64\n",
            "defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 5s\n    timeout server 5s\n",
        ]
        for name, (host, options) in variants.items():
            bind_host = f"[{host}]" if ":" in host else host
            sections.append(
                f"frontend fe-{name}\n    bind {bind_host}:{frontends[name][1]}\n"
                f'    unique-id-format "%ci:%cp"\n    default_backend be-{name}\n'
                f"backend be-{name}\n    server s 127.0.0.1:{backend_port} {options}\n"
            )
        config = directory / "haproxy.cfg"
        config.write_text("\n".join(sections))
        log = directory / "haproxy.log"
        with (
            log.open("wb") as log_file,
            subprocess.Popen(
                [str(HAPROXY), "-db", "-f", str(config)], stdout=log_file, stderr=subprocess.STDOUT
            ) as proc,
        ):
            try:
                deadline = time.monotonic() + 10
                while not all(_is_listening(h, p) for h, p in frontends.values()):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"haproxy did not start:\n{log.read_text()}")
                    time.sleep(0.02)
                yield HAProxy(backend, frontends)
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()


def _relay(haproxy: HAProxy, name: str) -> tuple[proxyproto.ProxyHeader, bytes, tuple[str, int]]:
    """Connect through frontend ``name``; return the parsed header, the rest, the client address."""
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(socket.create_connection(haproxy.frontends[name], timeout=5))
        client_addr = client.getsockname()[:2]
        client.sendall(b"ping")
        conn, _ = haproxy.backend.accept()
        stack.enter_context(conn)
        conn.settimeout(5)
        buffer = b""
        # Feed the parser as bytes arrive, exactly as the gateway's driver will.
        while (header := proxyproto.parse_proxy_header(buffer)) is proxyproto.NEED_DATA:
            chunk = conn.recv(4096)
            assert chunk, f"haproxy closed after {buffer!r}"
            buffer += chunk
        while len(buffer) < header.length + 4:
            chunk = conn.recv(4096)
            assert chunk
            buffer += chunk
        return header, buffer[header.length :], client_addr


@pytest.mark.parametrize(
    ("name", "version", "family"),
    [
        ("v2", 2, proxyproto.Family.TCP4),
        ("v1", 1, proxyproto.Family.TCP4),
        ("v2-crc", 2, proxyproto.Family.TCP4),
        pytest.param(
            "v2-ipv6",
            2,
            proxyproto.Family.TCP6,
            marks=pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback"),
        ),
        pytest.param(
            "v1-ipv6",
            1,
            proxyproto.Family.TCP6,
            marks=pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback"),
        ),
    ],
)
def test_haproxy_header_names_the_real_client(
    haproxy: HAProxy, name: str, version: int, family: proxyproto.Family
) -> None:
    header, rest, (client_host, client_port) = _relay(haproxy, name)
    frontend_host, frontend_port = haproxy.frontends[name]
    assert header.version == version
    assert header.command is proxyproto.Command.PROXY
    assert header.family is family
    assert (header.src_addr, header.src_port) == (client_host, client_port)
    assert (header.dst_addr, header.dst_port) == (frontend_host, frontend_port)
    assert rest == b"ping"
    if name == "v2-crc":
        # The parser verified HAProxy's checksum before returning (section 2.2.3).
        assert len(header.tlvs[proxyproto.PP2_TYPE_CRC32C]) == 4
        assert header.tlvs[proxyproto.PP2_TYPE_UNIQUE_ID] == f"{client_host}:{client_port}".encode()
