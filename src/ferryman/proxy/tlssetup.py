"""Server-side TLS of one listener: certificates chosen by SNI, client certificates, and the
tailnet certificate from tailscaled kept fresh.

Owns: :class:`ListenerTLS` -- the listener's :class:`~ferryman.tls.CertificateSet` (files from
``cert_file``/``key_file`` and ``certificates``, then the tailnet certificate when
``use_tailscale_tls`` is on), the ``ssl.SSLContext`` handshakes use (TLS ≥ 1.2, SNI choice,
``client_auth``), and renewal: :meth:`ListenerTLS.refresh` asks the cert store and swaps the
pair in place, so new handshakes get the new certificate without restarting anything.

Must not: accept connections or read client bytes.
"""

from __future__ import annotations

import logging
import ssl
import time
from dataclasses import dataclass

from ferryman.config.model import Config, ListenerConfig
from ferryman.errors import ConfigError, FerrymanError
from ferryman.tailscale.certs import TailscaleCertStore
from ferryman.tailscale.localapi import LocalAPIClient
from ferryman.tls import CertificateEntry, CertificateSet, HandshakeInfo, load_entry, parse_entry

logger = logging.getLogger(__name__)

TAILSCALE_KEY = "tailscale"


@dataclass(eq=False)
class ListenerTLS:
    certs: CertificateSet
    context: ssl.SSLContext
    store: TailscaleCertStore | None = None

    def info(self, endpoint: object) -> HandshakeInfo:
        return self.certs.handshake_info(endpoint)  # type: ignore[arg-type]

    async def refresh(self) -> bool:
        """Renew the tailnet certificate if it is due; True when a new one is now served."""
        if self.store is None:
            return False
        before = self.store.version
        await self.store.refresh_if_needed(time.time())
        pair = self.store.pair
        if self.store.version == before or pair is None:
            return False
        self.certs.replace(TAILSCALE_KEY, pair.cert_pem, pair.key_pem)
        logger.info("renewed tailnet certificate, valid until %s", time.ctime(pair.not_after))
        return True


async def build_listener_tls(
    item: ListenerConfig, config: Config, tailscale: LocalAPIClient | None
) -> ListenerTLS | None:
    """The listener's TLS, or None when it has no certificates. Raises ConfigError."""
    if not item.has_certificates:
        return None
    entries: list[CertificateEntry] = []
    if item.cert_file and item.key_file:
        entries.append(load_entry(item.cert_file, item.key_file, key="cert_file"))
    for i, files in enumerate(item.certificates):
        entries.append(load_entry(files.cert_file, files.key_file, key=f"certificates[{i}]"))
    store: TailscaleCertStore | None = None
    if item.use_tailscale_tls:
        if tailscale is None:
            raise ConfigError("use_tailscale_tls needs [tailscale]", key=f"listeners.{item.name}")
        try:
            domain = item.tailscale_cert_domain or (await tailscale.cert_domains())[0]
            interval = config.tailscale.cert_check_interval if config.tailscale else 3600.0
            # Retry a renewal that brought nothing new at the check interval, not later.
            store = TailscaleCertStore(tailscale, domain, retry_interval=interval)
            await store.load()
        except (FerrymanError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"cannot get the tailnet certificate from tailscaled: {exc}", key=f"listeners.{item.name}"
            ) from exc
        pair = store.pair
        assert pair is not None
        entries.append(
            parse_entry(pair.cert_pem, pair.key_pem, key=TAILSCALE_KEY, cert_source=f"tailscale:{domain}")
        )
    certs = CertificateSet(entries)
    ca_file = item.client_ca_file or (config.identity.mtls.ca_file if config.identity.mtls else None)
    # Offer what the rules route on, so the negotiated protocol can pick the rule.
    offered = list(dict.fromkeys(p for rule in item.rules for p in rule.alpn))
    alpn = ["postgresql"] if item.mode == "postgres" else (offered or None)
    context = certs.server_context(
        client_auth=item.client_auth,
        ca_file=ca_file,
        alpn_protocols=alpn,
        session_tickets=item.issues_session_tickets,
    )
    return ListenerTLS(certs, context, store)
