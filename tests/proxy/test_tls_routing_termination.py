"""TLS termination on TCP listeners (``tls = "enabled"``) and verified TLS to targets (SPEC §6),
end to end with certificates made here, Python ssl clients and real backends.

What each client sees is checked on its side (the certificate served, ALPN, the version) and
what the gateway decided on the audit side; a client that must not get through is also
checked at the backend (it never sees a connection).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
from pathlib import Path

import pytest

from tests.proxy.routing_peers import (
    NamedTLSServer,
    add_routed_listener,
    client_context,
    subject_cn,
    tls_client,
    write_pair,
)
from tests.support.gateway import EchoServer, GatewayFiles, grant, running_gateway, wait_for
from tests.tls.certgen import DAY, Authority

ALICE = "alice@example.com"


@pytest.fixture
def files(tmp_path: Path) -> GatewayFiles:
    return GatewayFiles(tmp_path)


@pytest.fixture
def gateway_ca() -> Authority:
    return Authority("gateway server CA")


def server_certificates(ca: Authority, directory: Path) -> list[dict[str, str]]:
    """The default certificate first, then an exact name and a wildcard."""
    return [
        write_pair(ca.issue(cn="default", dns=("default.test",)), directory, "default"),
        write_pair(ca.issue(cn="exact", dns=("exact.test",)), directory, "exact"),
        write_pair(ca.issue(cn="wild", dns=("*.wild.test",)), directory, "wild"),
    ]


async def test_certificate_is_chosen_by_sni(files: GatewayFiles, gateway_ca: Authority) -> None:
    async with EchoServer() as echo:
        port = files.add_listener(
            "tls", echo.address, tls="enabled", certificates=server_certificates(gateway_ca, files.dir)
        )
        files.grants.append(grant({"tls": {}}))
        verifying = client_context(gateway_ca)
        lenient = client_context(gateway_ca, check_hostname=False)  # chain checked, name not
        async with running_gateway(files):
            for sni, context, served in (
                ("exact.test", verifying, "exact"),
                ("EXACT.Test", verifying, "exact"),
                ("api.wild.test", verifying, "wild"),
                ("a.b.wild.test", lenient, "default"),  # a wildcard covers one label only
                ("nothing.test", lenient, "default"),
                (None, lenient, "default"),  # no SNI
            ):
                result = await tls_client(port, context, sni, greeting=False)
                assert result.error is None, (sni, result.error)
                assert subject_cn(result.served) == served, sni
                assert result.echoed == b"ping\n"
            await wait_for(lambda: len(files.closes()) == 6)
    decisions = [r for r in files.audit() if r["event"] == "decision"]
    assert [d["sni"] for d in decisions] == [
        "exact.test",
        "exact.test",
        "api.wild.test",
        "a.b.wild.test",
        "nothing.test",
        None,
    ]
    assert all(c["reason"] == "normal" and c["bytes_up"] == 5 for c in files.closes())


async def test_alpn_offer_is_accepted_and_no_protocol_is_claimed(
    files: GatewayFiles, gateway_ca: Authority
) -> None:
    # The gateway relays opaque bytes to a plaintext backend, so it must not pretend to speak
    # h2: a client offering ALPN completes the handshake, with no protocol selected.
    async with EchoServer() as echo:
        port = files.add_listener(
            "tls", echo.address, tls="enabled", certificates=server_certificates(gateway_ca, files.dir)
        )
        files.grants.append(grant({"tls": {}}))
        async with running_gateway(files):
            context = client_context(gateway_ca, alpn=("h2", "http/1.1"))
            result = await tls_client(port, context, "exact.test", greeting=False)
    assert result.error is None and result.echoed == b"ping\n"
    assert result.alpn is None and result.version == "TLSv1.3"


async def test_tls_1_1_client_is_refused(files: GatewayFiles, gateway_ca: Authority) -> None:
    async with EchoServer() as echo:
        port = files.add_listener(
            "tls", echo.address, tls="enabled", certificates=server_certificates(gateway_ca, files.dir)
        )
        files.grants.append(grant({"tls": {}}))
        async with running_gateway(files):
            old = client_context(gateway_ca, max_version=ssl.TLSVersion.TLSv1_1)
            result = await tls_client(port, old, "exact.test", greeting=False)
            assert result.error is not None and result.version is None  # an alert or a reset
            tls12 = client_context(gateway_ca, max_version=ssl.TLSVersion.TLSv1_2)
            result = await tls_client(port, tls12, "exact.test", greeting=False)
            assert result.error is None and result.version == "TLSv1.2"
            await wait_for(lambda: files.closes())
        assert echo.connections == 1
    refusal = files.audit()[0]
    assert refusal["allowed"] is False and "TLS handshake failed" in refusal["reason"]
    assert "UNSUPPORTED_PROTOCOL" in refusal["reason"]


def mtls_setup(
    files: GatewayFiles, gateway_ca: Authority, backend: str, **options: object
) -> tuple[int, Authority]:
    client_ca = Authority("clients CA")
    ca_file = client_ca.write(files.dir, "clients-ca")
    files.extra += f'[identity.mtls]\nca_file = "{ca_file}"\nuser_from = "san_email"\n'
    pair = write_pair(gateway_ca.issue(cn="db", dns=("db.test",)), files.dir, "db")
    port = files.add_listener("mtls", backend, tls="enabled", **pair, **options)
    # Only the certificate's identity is granted, not the loopback static identity.
    files.grants.append(grant({"mtls": {}}, src=[ALICE]))
    return port, client_ca


async def test_client_auth_need_keeps_unverified_clients_from_the_backend(
    files: GatewayFiles, gateway_ca: Authority
) -> None:
    async with EchoServer() as echo:
        port, client_ca = mtls_setup(files, gateway_ca, echo.address, client_auth="need")
        foreign = Authority("someone else's CA").issue(cn="alice", emails=(ALICE,))
        expired = client_ca.issue(
            cn="alice",
            emails=(ALICE,),
            not_before=dt.datetime.now(dt.UTC) - 3 * DAY,
            not_after=dt.datetime.now(dt.UTC) - DAY,
        )
        async with running_gateway(files):
            for cert in (None, foreign, expired):
                context = client_context(gateway_ca, cert=cert, directory=files.dir)
                result = await tls_client(port, context, "db.test", greeting=False)
                # TLS 1.3: the client may finish its half before the server's verdict arrives;
                # either way it never gets a byte of the backend's.
                assert result.error is not None and result.echoed == b""
            await wait_for(lambda: len(files.audit()) == 3)
            assert echo.connections == 0
            good = client_ca.issue(cn="alice", emails=(ALICE,), ous=("dba",))
            context = client_context(gateway_ca, cert=good, directory=files.dir)
            result = await tls_client(port, context, "db.test", greeting=False)
            assert result.error is None and result.echoed == b"ping\n"
            await wait_for(files.closes)
        assert echo.connections == 1
    refusals = files.audit()[:3]
    assert all(r["allowed"] is False and "TLS handshake failed" in r["reason"] for r in refusals)
    reasons = [r["reason"] for r in refusals]
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reasons[0]
    assert "CERTIFICATE_VERIFY_FAILED" in reasons[1] and "CERTIFICATE_VERIFY_FAILED" in reasons[2]
    decision = files.audit()[3]
    assert (decision["user"], decision["identity_source"], decision["allowed"]) == (ALICE, "mtls", True)
    (close,) = files.closes()
    assert (close["user"], close["identity_source"], close["reason"]) == (ALICE, "mtls", "normal")


async def test_client_auth_want_falls_back_to_other_sources(
    files: GatewayFiles, gateway_ca: Authority
) -> None:
    async with EchoServer() as echo:
        port, client_ca = mtls_setup(files, gateway_ca, echo.address, client_auth="want")
        files.grants.append(grant({"mtls": {}}, src=["dev@localhost"]))
        async with running_gateway(files):
            anonymous = await tls_client(port, client_context(gateway_ca), "db.test", greeting=False)
            assert anonymous.error is None
            cert = client_ca.issue(cn="alice", emails=(ALICE,))
            context = client_context(gateway_ca, cert=cert, directory=files.dir)
            assert (await tls_client(port, context, "db.test", greeting=False)).error is None
            await wait_for(lambda: len(files.closes()) == 2)
    assert [(c["user"], c["identity_source"]) for c in files.closes()] == [
        ("dev@localhost", "static"),
        (ALICE, "mtls"),
    ]


async def test_revalidation_closes_a_connection_whose_client_certificate_expires(
    files: GatewayFiles, gateway_ca: Authority
) -> None:
    files.revalidation = "200ms"
    async with EchoServer() as echo:
        port, client_ca = mtls_setup(files, gateway_ca, echo.address, client_auth="need")
        async with running_gateway(files):
            now = dt.datetime.now(dt.UTC).replace(microsecond=0)
            short = client_ca.issue(
                emails=(ALICE,), not_before=now - DAY, not_after=now + dt.timedelta(seconds=3)
            )
            context = client_context(gateway_ca, cert=short, directory=files.dir)
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname="db.test"
            )
            try:
                writer.write(b"still valid\n")
                assert await reader.readexactly(12) == b"still valid\n"
                async with asyncio.timeout(8):
                    try:
                        rest = await reader.read()
                    except (ConnectionResetError, ssl.SSLError):
                        rest = b""
                assert rest == b""
                closed_at = dt.datetime.now(dt.UTC)
            finally:
                writer.close()
            await wait_for(files.closes)
    assert closed_at >= now + dt.timedelta(seconds=3)  # not before the certificate expired
    (close,) = files.closes()
    assert (close["reason"], close["user"], close["identity_source"]) == ("revoked", ALICE, "mtls")
    assert "expired" in close["detail"]


# -- TLS to targets ------------------------------------------------------------------------


async def test_target_ip_is_dialled_and_host_is_verified(
    files: GatewayFiles, gateway_ca: Authority, tmp_path: Path
) -> None:
    svc_ca = Authority("svc CA")
    svc_ca_file = svc_ca.write(tmp_path, "svc-ca")
    front = write_pair(gateway_ca.issue(cn="front", dns=("front.test",)), tmp_path, "front")
    async with NamedTLSServer("svc", svc_ca.issue(cn="svc", dns=("svc.test",)), tmp_path) as svc:

        def listener(name: str, host: str, **options: object) -> int:
            target = {"host": host, "ip": "127.0.0.1", "port": svc.port, "tls": True}
            return add_routed_listener(
                files,
                name,
                tls="enabled",
                **front,
                rules=[{"domain": "front.test", "targets": [target]}],
                **options,
            )

        # svc.test resolves nowhere: only the ip can have been dialled.
        good = listener("good", "svc.test", backend_ca_file=str(svc_ca_file))
        wrong_name = listener("wrong-name", "other.test", backend_ca_file=str(svc_ca_file))
        unknown_ca = listener("unknown-ca", "svc.test")  # system CAs do not know svc CA
        insecure = listener("insecure", "other.test", backend_insecure_skip_verify=True)
        files.grants.append(grant({"good": {}, "wrong-name": {}, "unknown-ca": {}, "insecure": {}}))
        context = client_context(gateway_ca)
        async with running_gateway(files):
            result = await tls_client(good, context, "front.test")
            assert (result.error, result.greeting, result.echoed) == (None, b"svc", b"ping\n")
            for port in (wrong_name, unknown_ca):
                result = await tls_client(port, context, "front.test")
                assert result.greeting == b"" and result.echoed == b"", port
            result = await tls_client(insecure, context, "front.test")
            assert (result.error, result.greeting) == (None, b"svc")
            await wait_for(lambda: len(files.closes()) == 4)
    # The backend was asked for the target's host name, never for the client's front.test.
    assert svc.snis == ["svc.test", "other.test", "svc.test", "other.test"]
    assert svc.connections == 2  # the two verification failures never completed a handshake
    closes = {c["listener"]: c for c in files.closes()}
    assert closes["good"]["reason"] == "normal"
    assert closes["good"]["backend"] == f"svc.test@127.0.0.1:{svc.port}"
    assert closes["wrong-name"]["reason"] == "backend_error"
    assert "other.test" in closes["wrong-name"]["detail"] and "certificate" in closes["wrong-name"]["detail"]
    assert closes["unknown-ca"]["reason"] == "backend_error"
    assert "certificate verify failed" in closes["unknown-ca"]["detail"]
    assert closes["insecure"]["reason"] == "normal"


def _resuming_client(port: int, context: ssl.SSLContext, sni: str) -> list[tuple[bool, bool]]:
    """Two connections, the second offering the first one's session; (got a ticket, resumed)
    for each. Each sends a line and reads its echo, which also takes in any ticket."""
    session: ssl.SSLSession | None = None
    seen: list[tuple[bool, bool]] = []
    for _ in range(2):
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=sni, session=session) as tls,
        ):
            tls.sendall(b"ping\n")
            assert tls.recv(5) == b"ping\n"
            assert tls.session is not None
            seen.append((tls.session.has_ticket, tls.session_reused))
            session = tls.session
    return seen


@pytest.mark.parametrize("session_tickets", [None, True])
async def test_session_tickets_are_off_by_default_with_client_certificates(
    files: GatewayFiles, gateway_ca: Authority, session_tickets: bool | None
) -> None:
    options = {} if session_tickets is None else {"session_tickets": session_tickets}
    async with EchoServer() as echo:
        port, client_ca = mtls_setup(files, gateway_ca, echo.address, client_auth="need", **options)
        plain_port = files.add_listener(
            "plain-tls",
            echo.address,
            tls="enabled",
            **write_pair(gateway_ca.issue(dns=("db.test",)), files.dir, "p"),
        )
        files.grants.append(grant({"plain-tls": {}}))
        async with running_gateway(files):
            cert = client_ca.issue(cn="alice", emails=(ALICE,))
            context = client_context(gateway_ca, cert=cert, directory=files.dir)
            mtls = await asyncio.to_thread(_resuming_client, port, context, "db.test")
            plain = await asyncio.to_thread(
                _resuming_client, plain_port, client_context(gateway_ca), "db.test"
            )
            await wait_for(lambda: len(files.closes()) == 4)
    # Without client certificates tickets stay on, so clients resume.
    assert plain == [(True, False), (True, True)]
    if session_tickets:
        # Asked for: the client resumes, and the resumed session still names its certificate.
        assert mtls == [(True, False), (True, True)]
    else:
        assert mtls == [(False, False), (False, False)]
    closes = [c for c in files.closes() if c["listener"] == "mtls"]
    assert [(c["user"], c["identity_source"]) for c in closes] == [(ALICE, "mtls")] * 2
