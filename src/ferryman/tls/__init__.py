"""Terminated TLS: server certificates chosen by SNI, client certificate verification.

Owns the ``ssl.SSLContext`` objects of terminating listeners and what their handshakes
negotiated. Must not accept connections or decide identity; ``proxy`` wraps sockets with these
contexts (``proxy.streams.accept_tls``) and ``identity.mtls`` reads the verified certificate.
Imports: stdlib ``ssl``, ``cryptography``, ``errors``.
"""

from ferryman.tls.certs import (
    VERIFY_MODES,
    CertificateEntry,
    CertificateSet,
    ClientAuth,
    HandshakeInfo,
    TlsEndpoint,
    load_entry,
    parse_entry,
    peer_certificate,
    ssl_object_of,
)
from ferryman.tls.names import certificate_names, name_matches

__all__ = [
    "VERIFY_MODES",
    "CertificateEntry",
    "CertificateSet",
    "ClientAuth",
    "HandshakeInfo",
    "TlsEndpoint",
    "certificate_names",
    "load_entry",
    "name_matches",
    "parse_entry",
    "peer_certificate",
    "ssl_object_of",
]
