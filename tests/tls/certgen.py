"""Test certificates with chosen names, subject fields and validity (EC P-256: fast to make).

``Authority`` is a self-signed CA; ``Authority.issue`` makes a leaf signed by it. Nothing here
is used by ferryman itself.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
DAY = dt.timedelta(days=1)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...] = ()
    """Intermediates sent after the leaf."""

    @property
    def cert_pem(self) -> bytes:
        return b"".join(_pem(c) for c in (self.cert, *self.chain))

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self.key)

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}-key.pem"
        cert_path.write_bytes(self.cert_pem)
        key_path.write_bytes(self.key_pem)
        return cert_path, key_path


class Authority:
    """A CA that issues leaves for tests."""

    def __init__(self, name: str = "ferryman test CA", *, parent: Authority | None = None) -> None:
        self.key = _key()
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.parent = parent
        issuer_name = parent.name if parent else self.name
        signing_key = parent.key if parent else self.key
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(issuer_name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY)
            .not_valid_after(NOW + 3650 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(signing_key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return _pem(self.cert)

    def write(self, directory: Path, stem: str = "ca") -> Path:
        path = directory / f"{stem}.pem"
        path.write_bytes(self.cert_pem)
        return path

    def intermediate(self, name: str = "ferryman test intermediate") -> Authority:
        return Authority(name, parent=self)

    def issue(
        self,
        *,
        cn: str | None = None,
        cns: tuple[str, ...] = (),
        ous: tuple[str, ...] = (),
        dns: tuple[str, ...] = (),
        emails: tuple[str, ...] = (),
        uris: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        san: bool = True,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        usages: tuple[str, ...] = ("server", "client"),
        serial: int | None = None,
    ) -> Issued:
        """A leaf; ``san=False`` leaves out the SAN extension (CN-only certificates)."""
        key = _key()
        attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ferryman tests")]
        attributes += [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou) for ou in ous]
        attributes += [x509.NameAttribute(NameOID.COMMON_NAME, name) for name in (cn, *cns) if name]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attributes))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(serial or x509.random_serial_number())
            .not_valid_before(not_before or NOW - DAY)
            .not_valid_after(not_after or NOW + 30 * DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.RFC822Name(e) for e in emails]
        names += [x509.UniformResourceIdentifier(u) for u in uris]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if san and names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        ekus = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}
        if usages:
            builder = builder.add_extension(x509.ExtendedKeyUsage([ekus[u] for u in usages]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        chain: tuple[x509.Certificate, ...] = ()
        authority: Authority | None = self
        while authority is not None and authority.parent is not None:
            chain += (authority.cert,)
            authority = authority.parent
        return Issued(cert, key, chain)
