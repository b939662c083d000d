"""Talking to tailscaled: the LocalAPI client, its answer types and errors, and a cert store.

Owns: everything ferryman says to tailscaled over its unix socket (``whois``, ``dial``,
``cert``). Must not: decide identities or grants (``ferryman.identity.tailscale`` and the policy
engine do) or keep global state.
"""

from ferryman.tailscale.apitype import Node, UserProfile, WhoIsResponse, split_cert_pair
from ferryman.tailscale.certs import CertPair, InvalidCertPair, TailscaleCertStore
from ferryman.tailscale.errors import (
    DialRefused,
    LocalAPIAccessDenied,
    LocalAPIError,
    LocalAPIProtocolError,
    LocalAPITimeout,
    LocalAPIUnreachable,
    PeerNotFound,
    TailscaleError,
)
from ferryman.tailscale.localapi import DEFAULT_SOCKET, DialedConnection, LocalAPIClient

__all__ = [
    "DEFAULT_SOCKET",
    "CertPair",
    "DialRefused",
    "DialedConnection",
    "InvalidCertPair",
    "LocalAPIAccessDenied",
    "LocalAPIClient",
    "LocalAPIError",
    "LocalAPIProtocolError",
    "LocalAPITimeout",
    "LocalAPIUnreachable",
    "Node",
    "PeerNotFound",
    "TailscaleCertStore",
    "TailscaleError",
    "UserProfile",
    "WhoIsResponse",
    "split_cert_pair",
]
