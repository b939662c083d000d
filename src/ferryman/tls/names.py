"""Which server names a certificate answers for, and whether an SNI name matches one of them.

Owns: reading the DNS names of a certificate (SAN ``dNSName`` entries; the subject CN only when
the certificate has no SAN extension at all, RFC 6125 §6.4.4) and RFC 6125 §6.4.3 matching of a
presented name against them.

Must not: do I/O, touch ``ssl``, or decide which certificate is the default -- that is
:class:`ferryman.tls.certs.CertificateSet`'s job.

Matching rules (the subset of RFC 6125 every mainstream TLS stack implements):

- comparison is case-insensitive (RFC 4343), on A-labels as sent in SNI;
- a wildcard is only honoured as the complete left-most label (``*.example.com``) and matches
  exactly one label: ``a.example.com`` yes, ``example.com`` and ``a.b.example.com`` no;
- partial-label wildcards (``f*.example.com``), wildcards in other positions and wildcards
  directly over a single-label suffix (``*.com``) never match (RFC 6125 §7.2 and the CA/B
  Baseline Requirements forbid them);
- a trailing dot is not a valid SNI (RFC 6066 §3), so ``example.com.`` matches nothing.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import NameOID


def certificate_names(certificate: x509.Certificate) -> tuple[str, ...]:
    """The lower-cased DNS names ``certificate`` is valid for, in certificate order.

    SAN ``dNSName`` entries when a SAN extension is present (even if it holds only IP
    addresses: then the result is empty); else the subject common names.
    """
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        common_names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return tuple(_as_str(attr.value).lower() for attr in common_names)
    return tuple(name.lower() for name in san.get_values_for_type(x509.DNSName))


def name_matches(pattern: str, server_name: str) -> bool:
    """Whether ``server_name`` (an SNI host name) is covered by certificate name ``pattern``."""
    pattern = pattern.lower()
    server_name = server_name.lower()
    if not server_name or server_name.endswith(".") or "*" in server_name:
        return False
    if "*" not in pattern:
        return pattern == server_name
    wildcard, dot, suffix = pattern.partition(".")
    if wildcard != "*" or not dot or "*" in suffix or "." not in suffix:
        return False
    label, dot, rest = server_name.partition(".")
    return bool(label) and bool(dot) and rest == suffix


def _as_str(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode("utf-8", "replace")
