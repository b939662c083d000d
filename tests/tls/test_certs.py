"""Loading certificates, SNI choice and replacement, without a handshake."""

import ssl
from pathlib import Path

import pytest

from ferryman.errors import ConfigError
from ferryman.tls import CertificateSet, load_entry, parse_entry
from tests.tls.certgen import Authority


@pytest.fixture(scope="module")
def ca() -> Authority:
    return Authority()


def make_set(ca: Authority) -> CertificateSet:
    leaves = [
        ca.issue(cn="default", dns=("default.test",)),
        ca.issue(cn="multi", dns=("api.example.com", "db.example.com")),
        ca.issue(cn="wild", dns=("*.apps.example.com",)),
        ca.issue(cn="shadowed", dns=("db.example.com",)),
        ca.issue(cn="cn-only.test", san=False),
    ]
    return CertificateSet(
        parse_entry(leaf.cert_pem, leaf.key_pem, key=f"slot{i}") for i, leaf in enumerate(leaves)
    )


@pytest.mark.parametrize(
    ("sni", "key"),
    [
        ("api.example.com", "slot1"),
        ("db.example.com", "slot1"),  # the first match wins over slot3
        ("DB.Example.COM", "slot1"),
        ("x.apps.example.com", "slot2"),
        ("a.b.apps.example.com", "slot0"),  # wildcard covers one label only
        ("apps.example.com", "slot0"),
        ("cn-only.test", "slot4"),
        ("unknown.test", "slot0"),
        ("", "slot0"),
        (None, "slot0"),
    ],
)
def test_choose(ca: Authority, sni: str | None, key: str) -> None:
    assert make_set(ca).choose(sni).key == key


def test_load_files_with_chain_and_combined_pem(ca: Authority, tmp_path: Path) -> None:
    leaf = ca.intermediate().issue(dns=("chain.test",))
    cert_file, key_file = leaf.write(tmp_path, "leaf")
    entry = load_entry(cert_file, key_file)
    assert entry.key == str(cert_file)
    assert entry.names == ("chain.test",)
    assert entry.certificate == leaf.cert
    assert entry.chain_pem.count(b"BEGIN CERTIFICATE") == 2
    combined = tmp_path / "combined.pem"
    combined.write_bytes(leaf.cert_pem + leaf.key_pem)
    assert load_entry(combined, key="mine").key == "mine"
    assert "key_pem" not in repr(entry) and "PRIVATE" not in repr(entry)


def test_file_errors_name_the_file_and_the_problem(ca: Authority, tmp_path: Path) -> None:
    leaf, other = ca.issue(dns=("a.test",)), ca.issue(dns=("b.test",))
    cert_file, key_file = leaf.write(tmp_path, "a")
    _, other_key = other.write(tmp_path, "b")
    missing = tmp_path / "missing.pem"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")
    der = tmp_path / "cert.der"
    der.write_bytes(leaf.der)

    cases = [
        (missing, key_file, missing, "cannot read the certificate file"),
        (cert_file, missing, missing, "cannot read the private key file"),
        (garbage, key_file, garbage, "no PEM certificate found"),
        (der, key_file, der, "looks like DER"),
        (cert_file, garbage, garbage, "no PEM private key found"),
        (cert_file, cert_file, cert_file, "no PEM private key found"),
        (cert_file, other_key, other_key, f"does not match the certificate in {cert_file}"),
    ]
    for cert, key, blamed, message in cases:
        with pytest.raises(ConfigError) as info:
            load_entry(cert, key)
        assert info.value.file == str(blamed), message
        assert message in str(info.value)
        assert str(info.value).startswith(f"{blamed}: ")


def test_encrypted_key_is_refused(ca: Authority, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    leaf = ca.issue(dns=("a.test",))
    encrypted = leaf.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(ConfigError, match="encrypted"):
        parse_entry(leaf.cert_pem, encrypted, key="tailscale:a.test")


def test_in_memory_errors_name_the_slot(ca: Authority) -> None:
    with pytest.raises(ConfigError) as info:
        parse_entry(b"nope", b"nope", key="tailscale:host.ts.net")
    assert str(info.value) == "tailscale:host.ts.net: no PEM certificate found"


def test_set_validation(ca: Authority) -> None:
    leaf = ca.issue(dns=("a.test",))
    with pytest.raises(ConfigError, match="at least one"):
        CertificateSet([])
    entry = parse_entry(leaf.cert_pem, leaf.key_pem, key="same")
    with pytest.raises(ConfigError, match="unique"):
        CertificateSet([entry, entry])


def test_client_auth_needs_a_usable_ca_file(ca: Authority, tmp_path: Path) -> None:
    certs = make_set(ca)
    with pytest.raises(ConfigError, match="needs a client CA file"):
        certs.server_context(client_auth="need")
    with pytest.raises(ConfigError) as info:
        certs.server_context(client_auth="want", ca_file=tmp_path / "nope.pem")
    assert info.value.file == str(tmp_path / "nope.pem")
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError, match="no PEM CA certificate"):
        certs.server_context(client_auth="need", ca_file=bad)
    # "none" ignores the CA file entirely.
    assert certs.server_context(client_auth="none", ca_file=bad).verify_mode == ssl.CERT_NONE


def test_server_context_settings(ca: Authority, tmp_path: Path) -> None:
    ca_file = ca.write(tmp_path)
    context = make_set(ca).server_context(client_auth="want", ca_file=ca_file, alpn_protocols=["postgresql"])
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_OPTIONAL
    assert context.sni_callback is not None
    assert context.num_tickets == 1  # see tls.certs._base_context
    no_tickets = make_set(ca).server_context(client_auth="need", ca_file=ca_file, session_tickets=False)
    assert no_tickets.num_tickets == 0
    # Only the configured CA is trusted: the system store is not loaded.
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "ferryman test CA"),),)]


def test_replace_by_key_and_index(ca: Authority) -> None:
    certs = make_set(ca)
    certs.server_context()
    new = ca.issue(dns=("renewed.test",))
    entry = certs.replace("slot2", new.cert_pem, new.key_pem)
    assert entry.key == "slot2" and entry.names == ("renewed.test",)
    assert certs.choose("renewed.test").certificate == new.cert
    assert certs.choose("x.apps.example.com").key == "slot0"
    assert certs.replace(0, new.cert_pem, new.key_pem).key == "slot0"
    with pytest.raises(KeyError):
        certs.replace("nope", new.cert_pem, new.key_pem)
    with pytest.raises(IndexError):
        certs.replace(9, new.cert_pem, new.key_pem)


def test_failed_replace_changes_nothing(ca: Authority) -> None:
    certs = make_set(ca)
    before = certs.entries
    other = ca.issue(dns=("x.test",))
    with pytest.raises(ConfigError, match="does not match"):
        certs.replace("slot1", other.cert_pem, ca.issue(dns=("y.test",)).key_pem)
    assert certs.entries == before
