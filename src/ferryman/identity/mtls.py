"""The ``mtls`` identity source: the verified client certificate becomes an identity.

Owns: :class:`MtlsSource`, which reads a client certificate (DER, as the TLS layer verified it:
``PeerInfo.peer_cert_der``) and maps it to an :class:`~ferryman.identity.base.Identity` per
``[identity.mtls]`` (SPEC §1, §2): user from the first SAN email (``san_email``), the first SAN
URI (``san_uri``, e.g. SPIFFE ``spiffe://trust-domain/workload``) or the subject CN (``cn``);
groups from every subject OU (``groups_from = "ou"``) or none; ``expires_at`` = ``notAfter``, so
revalidation closes the connection when the certificate expires.

Must not: verify chains or trust anything itself (``tls.certs`` configures OpenSSL to do that
against the CA file; a certificate only reaches ``PeerInfo`` once verified), do I/O, or log
certificate contents.

Returns None only when the peer presented no certificate. A certificate that lacks the field
``user_from`` names, carries more than one subject CN (``cn``: which one is the user would be a
guess), or is outside its validity period at the injected clock's ``now`` raises
:class:`~ferryman.errors.IdentityUnavailable`: the caller did present a certificate, so the
connection fails closed instead of falling through to a weaker source. The validity check
matters for resumed TLS sessions, which OpenSSL does not re-verify.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypeAlias, assert_never

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from ferryman.errors import ConfigError, IdentityUnavailable
from ferryman.identity.base import Identity, PeerInfo

UserFrom: TypeAlias = Literal["san_email", "san_uri", "cn"]
GroupsFrom: TypeAlias = Literal["ou", "none"]

USER_FROM: tuple[UserFrom, ...] = ("san_email", "san_uri", "cn")
GROUPS_FROM: tuple[GroupsFrom, ...] = ("ou", "none")


_MEMO_SIZE = 1024


@dataclass(frozen=True, slots=True)
class _Mapped:
    """What a certificate maps to, before the clock is consulted: its validity period and the
    identity, or why it cannot be one."""

    not_before: datetime
    not_after: datetime
    identity: Identity | str


class MtlsSource:
    """Verified client certificate → :class:`Identity` (see the module docstring)."""

    name = "mtls"

    def __init__(
        self,
        user_from: UserFrom = "san_email",
        groups_from: GroupsFrom = "ou",
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if user_from not in USER_FROM:
            raise ConfigError(f"must be one of {', '.join(USER_FROM)}, got {user_from!r}", key="user_from")
        if groups_from not in GROUPS_FROM:
            raise ConfigError(
                f"must be one of {', '.join(GROUPS_FROM)}, got {groups_from!r}", key="groups_from"
            )
        self.user_from = user_from
        self.groups_from = groups_from
        self._clock = clock
        self._memo: dict[bytes, _Mapped] = {}

    async def identify(self, peer: PeerInfo) -> Identity | None:
        return self.lookup(peer)

    def lookup(self, peer: PeerInfo) -> Identity | None:
        """:meth:`identify` without waiting (mapping a verified certificate needs no I/O)."""
        if peer.peer_cert_der is None:
            return None
        return self.identity_from_der(peer.peer_cert_der)

    def identity_from_der(self, der: bytes) -> Identity:
        """The identity a DER client certificate vouches for. Raises ``IdentityUnavailable``.

        Mapping a certificate is pure, so it is memoised per DER (a client presents the same
        certificate on every connection); the validity period is checked against the clock on
        every call."""
        mapped = self._memo.get(der)
        if mapped is None:
            try:
                certificate = x509.load_der_x509_certificate(der)
            except ValueError:
                raise IdentityUnavailable("mtls: client certificate is not valid DER") from None
            mapped = self._map(certificate)
            if len(self._memo) >= _MEMO_SIZE:
                del self._memo[next(iter(self._memo))]
            self._memo[der] = mapped
        return self._checked(mapped)

    def _map(self, certificate: x509.Certificate) -> _Mapped:
        not_before = certificate.not_valid_before_utc
        not_after = certificate.not_valid_after_utc
        sans = _subject_alt_names(certificate)
        try:
            identity: Identity | str = Identity(
                user=self._user(certificate, sans),
                source=self.name,
                groups=self._groups(certificate),
                claims=_claims(certificate, sans),
                expires_at=not_after.timestamp(),
            )
        except IdentityUnavailable as exc:
            identity = str(exc)
        return _Mapped(not_before, not_after, identity)

    def _checked(self, mapped: _Mapped) -> Identity:
        now = self._clock()
        if now > mapped.not_after.timestamp():
            raise IdentityUnavailable(f"mtls: client certificate expired at {_iso(mapped.not_after)}")
        if now < mapped.not_before.timestamp():
            raise IdentityUnavailable(f"mtls: client certificate not valid before {_iso(mapped.not_before)}")
        if isinstance(mapped.identity, str):
            raise IdentityUnavailable(mapped.identity)
        return mapped.identity

    async def aclose(self) -> None:
        return None

    def _user(self, certificate: x509.Certificate, sans: dict[str, tuple[str, ...]]) -> str:
        match self.user_from:
            case "san_email":
                values = sans["email"]
                what = "SAN email (rfc822Name)"
            case "san_uri":
                values = sans["uri"]
                what = "SAN URI"
            case "cn":
                values = _attribute_values(certificate.subject, NameOID.COMMON_NAME)
                what = "subject CN"
                if len(values) > 1:
                    raise IdentityUnavailable(
                        f"mtls: client certificate has {len(values)} subject CNs; user_from = 'cn' "
                        "needs exactly one"
                    )
            case _:
                assert_never(self.user_from)
        for value in values:
            if value:
                return value
        raise IdentityUnavailable(
            f"mtls: client certificate has no {what}, which user_from = {self.user_from!r} needs"
        )

    def _groups(self, certificate: x509.Certificate) -> tuple[str, ...]:
        if self.groups_from == "none":
            return ()
        values = _attribute_values(certificate.subject, NameOID.ORGANIZATIONAL_UNIT_NAME)
        return tuple(dict.fromkeys(value for value in values if value))


def _subject_alt_names(certificate: x509.Certificate) -> dict[str, tuple[str, ...]]:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return {"email": (), "uri": (), "dns": (), "ip": ()}
    return {
        "email": tuple(san.get_values_for_type(x509.RFC822Name)),
        "uri": tuple(san.get_values_for_type(x509.UniformResourceIdentifier)),
        "dns": tuple(san.get_values_for_type(x509.DNSName)),
        "ip": tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress)),
    }


def _attribute_values(name: x509.Name, oid: x509.ObjectIdentifier) -> tuple[str, ...]:
    return tuple(
        value if isinstance(value, str) else value.decode("utf-8", "replace")
        for value in (attribute.value for attribute in name.get_attributes_for_oid(oid))
    )


def _claims(certificate: x509.Certificate, sans: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    der = certificate.public_bytes(serialization.Encoding.DER)
    return {
        "subject": certificate.subject.rfc4514_string(),
        "issuer": certificate.issuer.rfc4514_string(),
        "serial": format(certificate.serial_number, "x"),
        "san": {kind: values for kind, values in sans.items() if values},
        "fingerprint_sha256": hashlib.sha256(der).hexdigest(),
        "not_before": _iso(certificate.not_valid_before_utc),
        "not_after": _iso(certificate.not_valid_after_utc),
    }


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
