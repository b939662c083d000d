"""A renewing in-memory cache of one Tailscale TLS certificate (``tailscale cert``'s pair).

Owns: :class:`TailscaleCertStore`: fetch the key and chain for a domain from tailscaled,
check them (PEM parses, key matches the leaf, the leaf names the domain), remember
``notBefore``/``notAfter``, and renew when little validity is left. Each accepted new pair bumps
``version`` so a TLS layer knows to rebuild its ``SSLContext``.

Must not: build ``SSLContext`` objects, write files, schedule itself, or read the clock behind
the caller's back: the owner calls :meth:`TailscaleCertStore.refresh_if_needed` with ``now``
(a background loop, or before a handshake).

Renewal threshold: renewal is due once the remaining validity falls below the *smaller* of
``renew_fraction`` of the certificate's lifetime and ``renew_before`` seconds (defaults: one
third, 14 days; 0 disables that bound). A 90-day certificate is thus re-fetched from 14 days
before expiry -- when tailscaled itself starts renewing (``ipn/localapi/cert.go`` begins an
async renewal 14 days ahead and serves its cached pair meanwhile) -- and a 6-day one from 2 days
before. A fetch that returns the pair already held changes nothing and is retried after
``retry_interval`` seconds; so is a failed fetch, while the old pair stays in use.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ferryman.tailscale.errors import LocalAPIProtocolError, TailscaleError

logger = logging.getLogger(__name__)


class CertPairSource(Protocol):
    """What the store needs from a LocalAPI client."""

    async def cert_pair(
        self, domain: str, *, min_validity: float = 0, timeout: float | None = None
    ) -> tuple[bytes, bytes]: ...


class InvalidCertPair(LocalAPIProtocolError):
    """tailscaled returned a pair that cannot be used for the domain."""


@dataclass(frozen=True, slots=True)
class CertPair:
    """One certificate chain and its key, as PEM, with the leaf's validity (Unix seconds)."""

    cert_pem: bytes
    key_pem: bytes
    not_before: float
    not_after: float
    fingerprint: str
    """SHA-256 of the leaf's DER, hex: identifies the pair across fetches."""

    @property
    def lifetime(self) -> float:
        return self.not_after - self.not_before

    def remaining(self, now: float) -> float:
        return self.not_after - now

    def __repr__(self) -> str:  # never print the key
        return f"CertPair(fingerprint={self.fingerprint[:16]}…, not_after={self.not_after:.0f})"


def _names(leaf: x509.Certificate) -> list[str]:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [n.lower() for n in san.get_values_for_type(x509.DNSName)]


def _covers(names: list[str], domain: str) -> bool:
    domain = domain.lower().rstrip(".")
    for name in names:
        if name == domain:
            return True
        if name.startswith("*.") and domain.partition(".")[2] == name[2:]:
            return True
    return False


def parse_cert_pair(domain: str, cert_pem: bytes, key_pem: bytes) -> CertPair:
    """Validate a pair for ``domain``. Raises :class:`InvalidCertPair`."""
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as exc:
        raise InvalidCertPair(f"certificate for {domain} does not parse: {exc}") from None
    leaf = chain[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise InvalidCertPair(f"private key for {domain} does not parse: {exc}") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != leaf.public_key().public_bytes(der, spki):
        raise InvalidCertPair(f"private key does not match the certificate for {domain}")
    if not _covers(_names(leaf), domain):
        raise InvalidCertPair(f"certificate does not name {domain} (names: {', '.join(_names(leaf))})")
    return CertPair(
        cert_pem=cert_pem,
        key_pem=key_pem,
        not_before=leaf.not_valid_before_utc.timestamp(),
        not_after=leaf.not_valid_after_utc.timestamp(),
        fingerprint=hashlib.sha256(leaf.public_bytes(der)).hexdigest(),
    )


class TailscaleCertStore:
    """The current certificate for ``domain``, fetched from tailscaled and renewed in time.

    ``pair`` is None until :meth:`load` (or the first :meth:`refresh_if_needed`) succeeds;
    ``version`` starts at 0 and grows by one for every different pair accepted.
    """

    def __init__(
        self,
        client: CertPairSource,
        domain: str,
        *,
        renew_fraction: float = 1 / 3,
        renew_before: float = 14 * 86400,
        retry_interval: float = 300.0,
        min_validity: float = 0.0,
        timeout: float | None = None,
    ) -> None:
        if not 0 <= renew_fraction < 1:
            raise ValueError("renew_fraction must be in [0, 1)")
        self.domain = domain
        self.renew_fraction = renew_fraction
        self.renew_before = renew_before
        self.retry_interval = retry_interval
        self.min_validity = min_validity
        self.timeout = timeout
        self._client = client
        self._pair: CertPair | None = None
        self._version = 0
        self._retry_at = float("-inf")
        self.last_error: TailscaleError | None = None

    @property
    def pair(self) -> CertPair | None:
        return self._pair

    @property
    def version(self) -> int:
        return self._version

    def renew_at(self) -> float | None:
        """When renewal becomes due for the current pair (None before the first load)."""
        pair = self._pair
        if pair is None:
            return None
        margins = [m for m in (pair.lifetime * self.renew_fraction, self.renew_before) if m > 0]
        return pair.not_after - (min(margins) if margins else 0.0)

    def needs_renewal(self, now: float) -> bool:
        due = self.renew_at()
        return due is None or now >= due

    async def load(self) -> CertPair:
        """Fetch now, whatever the current pair. Raises on failure (nothing is cached then)."""
        cert_pem, key_pem = await self._client.cert_pair(
            self.domain, min_validity=self.min_validity, timeout=self.timeout
        )
        pair = parse_cert_pair(self.domain, cert_pem, key_pem)
        self._accept(pair)
        return pair

    async def refresh_if_needed(self, now: float) -> bool:
        """Renew if due; return True when a different pair was installed (``version`` bumped).

        With no usable pair (none yet, or the current one expired) a failure is raised; with a
        still-valid pair it is logged, kept in ``last_error``, and retried after
        ``retry_interval`` seconds. A fetch returning the pair already held is also retried only
        after ``retry_interval``.
        """
        if not self.needs_renewal(now):
            return False
        usable = self._pair is not None and now < self._pair.not_after
        if usable and now < self._retry_at:
            return False
        before = self._version
        try:
            pair = await self.load()
        except TailscaleError as exc:
            self.last_error = exc
            self._retry_at = now + self.retry_interval
            if not usable:
                raise
            logger.warning("renewing the Tailscale certificate for %s failed: %s", self.domain, exc)
            return False
        self.last_error = None
        if self._version != before:
            self._retry_at = float("-inf")
            return True
        # tailscaled still serves the same pair (it renews on its own schedule): ask again
        # after retry_interval rather than on every call.
        self._retry_at = now + self.retry_interval
        logger.info(
            "tailscaled still serves the certificate for %s (expires in %.0fs)",
            self.domain,
            pair.not_after - now,
        )
        return False

    def _accept(self, pair: CertPair) -> None:
        current = self._pair
        if (
            current is not None
            and current.fingerprint == pair.fingerprint
            and current.key_pem == pair.key_pem
        ):
            return
        self._pair = pair
        self._version += 1
        logger.info(
            "Tailscale certificate for %s installed (version %d, valid until %.0f)",
            self.domain,
            self._version,
            pair.not_after,
        )
