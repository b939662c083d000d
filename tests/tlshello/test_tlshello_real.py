"""ClientHellos from real TLS stacks: Python's ``ssl`` (in memory) and ``openssl s_client``."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess

import pytest
from tlshello_helpers import python_hello

from ferryman import tlshello

OPENSSL = shutil.which("openssl")


def _record_lengths(data: bytes) -> list[int]:
    lengths, pos = [], 0
    while pos < len(data):
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        lengths.append(length)
        pos += 5 + length
    return lengths


def test_python_tls13_hello_with_sni_and_alpn() -> None:
    data = python_hello("DB.Example.COM", ["h2", "http/1.1"])
    hello = tlshello.parse_client_hello(data)
    assert isinstance(hello, tlshello.ClientHello)
    assert hello.sni == "db.example.com"
    assert hello.alpn == ("h2", "http/1.1")
    assert hello.legacy_version == 0x0303
    assert hello.supported_versions[0] == 0x0304
    assert 0x0303 in hello.supported_versions
    assert 0x1301 in hello.cipher_suites
    assert hello.raw_length == len(data)


def test_python_tls12_only_hello_has_no_supported_versions() -> None:
    data = python_hello("legacy.example", ["postgresql"], maximum_version=ssl.TLSVersion.TLSv1_2)
    hello = tlshello.parse_client_hello(data)
    assert isinstance(hello, tlshello.ClientHello)
    assert hello.sni == "legacy.example"
    assert hello.alpn == ("postgresql",)
    assert hello.legacy_version == 0x0303
    assert hello.supported_versions == ()
    assert 43 not in hello.extension_types


def test_python_idna_name_arrives_as_a_label() -> None:
    hello = tlshello.parse_client_hello(python_hello("bücher.example"))
    assert isinstance(hello, tlshello.ClientHello)
    assert hello.sni == "xn--bcher-kva.example"


@pytest.mark.parametrize("server_hostname", [None, "127.0.0.1", "::1"])
def test_python_hello_without_sni(server_hostname: str | None) -> None:
    # Python sends no SNI for IP addresses, as RFC 6066 §3 requires.
    hello = tlshello.parse_client_hello(python_hello(server_hostname))
    assert isinstance(hello, tlshello.ClientHello)
    assert hello.sni is None
    assert 0 not in hello.extension_types


def test_python_hello_larger_than_one_record_is_reassembled() -> None:
    # A long ALPN list pushes the hello past 2^14, so OpenSSL fragments it over two records.
    protocols = [f"proto-{i:03d}-" + "x" * 180 for i in range(100)]
    data = python_hello("big.example", protocols)
    assert len(_record_lengths(data)) == 2
    assert max(_record_lengths(data)) == tlshello.MAX_RECORD_LENGTH
    hello = tlshello.parse_client_hello(data)
    assert isinstance(hello, tlshello.ClientHello)
    assert hello.alpn == tuple(protocols)
    assert hello.sni == "big.example"
    assert hello.raw_length == len(data)


def _capture_s_client(args: list[str]) -> tuple[bytes, tlshello.SniffResult]:
    """Run ``openssl s_client`` against a local socket and sniff what it sends, chunk by chunk."""
    assert OPENSSL is not None
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(10)
        port = server.getsockname()[1]
        command = [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", *args]
        with subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        ) as proc:
            try:
                conn, _ = server.accept()
                with conn:
                    conn.settimeout(10)
                    sniffer = tlshello.ClientHelloSniffer()
                    seen = bytearray()
                    while (result := sniffer.next_event()) is tlshello.NEED_DATA:
                        chunk = conn.recv(4096)
                        seen += chunk
                        sniffer.receive_data(chunk)
            finally:
                # Closing our end makes s_client fail its handshake and exit; kill if it lingers.
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return bytes(seen), result


@pytest.mark.skipif(OPENSSL is None, reason="openssl binary not installed")
@pytest.mark.parametrize(
    ("args", "sni", "alpn", "tls13"),
    [
        (
            ["-servername", "Pg.Example.Net", "-alpn", "postgresql,h2"],
            "pg.example.net",
            ("postgresql", "h2"),
            True,
        ),
        (["-servername", "old.example", "-alpn", "a,b", "-tls1_2"], "old.example", ("a", "b"), False),
        (["-noservername"], None, (), True),
    ],
)
def test_openssl_s_client_hello(args: list[str], sni: str | None, alpn: tuple[str, ...], tls13: bool) -> None:
    data, result = _capture_s_client(args)
    assert isinstance(result, tlshello.ClientHello)
    assert result.sni == sni
    assert result.alpn == alpn
    assert (0x0304 in result.supported_versions) is tls13
    assert result.raw_length <= len(data)
    # The same bytes, handed over in one piece, give the same answer as the chunked sniffer.
    assert tlshello.parse_client_hello(data) == result
