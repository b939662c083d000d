"""Server certificates for terminated TLS: loading, SNI choice, run-time replacement.

Owns: :class:`CertificateSet` (the ordered server certificates of one listener, each with the
DNS names it answers for), the ``ssl.SSLContext`` objects built from it
(:meth:`CertificateSet.server_context`), the record of what each handshake negotiated
(:meth:`CertificateSet.handshake_info`) and :func:`peer_certificate`.

Must not: accept connections, read from sockets, decide identity (``identity.mtls`` turns the
certificate :func:`peer_certificate` returns into an ``Identity``), or fetch certificates
(``tailscale.certs`` does; it hands the pair to :meth:`CertificateSet.replace`).

How SNI selection works. The context a listener wraps sockets with carries no certificate of
its own; its ``sni_callback`` runs for every ClientHello -- OpenSSL calls it with
``server_name=None`` when the client sent no SNI -- picks the entry (SPEC §6: the first whose
names match, else the first) and switches the connection to that entry's context
(``ssl_object.context = …``, i.e. ``SSL_set_SSL_CTX``). Every per-entry context is configured
like the dispatching one (versions, client verification, ALPN), because after the switch
OpenSSL takes the certificate, the verify store and the ALPN callback from the new context
while the verify mode and version bounds stay those of the first. :meth:`CertificateSet.replace`
swaps one entry's contexts, so the *next* handshake on every listener built from the set
serves the new pair; connections already open keep theirs.

What the callback records. A server-side ``SSLObject.server_hostname`` is always ``None``, so
the callback stores the SNI (lower-cased, RFC 4343) and the chosen entry's key in a
``WeakKeyDictionary`` keyed by the ``SSLObject`` (or ``SSLSocket``) it was called with -- the
same object asyncio and uvloop return from ``transport.get_extra_info("ssl_object")``; the entry
goes away with the connection. ALPN needs no record: ``selected_alpn_protocol()`` answers on
the server side. :meth:`CertificateSet.handshake_info` reads both.

Client certificates (``client_auth``, SPEC §6): ``none`` sends no CertificateRequest; ``want``
(``CERT_OPTIONAL``) asks for one and lets the client send none, but a certificate that is sent
and does not verify (unknown CA, expired, not for client use) fails the handshake -- OpenSSL
does not downgrade a bad certificate to "no certificate"; ``need`` (``CERT_REQUIRED``) also
fails when none is sent. Only the configured CA file is trusted: the system store is never
loaded (``ssl.create_default_context(Purpose.CLIENT_AUTH)`` would load it, making every
publicly issued certificate a client identity). With TLS 1.3 the client finishes its side of
the handshake before the server has judged its certificate, so a rejected client sees the
alert on its first read, not in ``do_handshake()``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import ssl
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeAlias, runtime_checkable

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from ferryman.errors import ConfigError
from ferryman.tls.names import certificate_names, name_matches

logger = logging.getLogger(__name__)

StrPath: TypeAlias = str | os.PathLike[str]

ClientAuth: TypeAlias = Literal["none", "want", "need"]
"""Client certificate policy of a terminating listener (SPEC §6 ``client_auth``)."""

VERIFY_MODES: dict[ClientAuth, ssl.VerifyMode] = {
    "none": ssl.CERT_NONE,
    "want": ssl.CERT_OPTIONAL,
    "need": ssl.CERT_REQUIRED,
}

_PRIVATE_KEY_PEM = re.compile(
    rb"-----BEGIN ((?:RSA |EC |DSA |ENCRYPTED )?PRIVATE KEY)-----\r?\n.*?-----END \1-----", re.DOTALL
)
_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True, slots=True)
class CertificateEntry:
    """One server certificate chain with its key, as loaded and checked."""

    key: str
    """Name of the slot, for :meth:`CertificateSet.replace` and logs: the certificate file's
    path for file entries, the caller's label (e.g. ``tailscale:host.ts.net``) otherwise."""
    names: tuple[str, ...]
    """Lower-cased DNS names the leaf is valid for (SAN, else CN); may hold wildcards."""
    certificate: x509.Certificate
    """The leaf (first certificate of the chain)."""
    chain_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)

    def matches(self, server_name: str) -> bool:
        """Whether one of :attr:`names` covers ``server_name`` (see ``tls.names``)."""
        return any(name_matches(name, server_name) for name in self.names)

    @property
    def not_after(self) -> float:
        """Expiry of the leaf, Unix seconds."""
        return self.certificate.not_valid_after_utc.timestamp()

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the leaf's DER, hex."""
        return hashlib.sha256(self.certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def load_entry(
    cert_file: StrPath, key_file: StrPath | None = None, *, key: str | None = None
) -> CertificateEntry:
    """Load a PEM chain (leaf first) and its key; ``key_file=None`` means the key is in ``cert_file``.

    Raises :class:`ConfigError` naming the file: unreadable, not PEM, no key, encrypted key,
    key not matching the leaf, or refused by OpenSSL.
    """
    cert_path = os.fspath(cert_file)
    key_path = cert_path if key_file is None else os.fspath(key_file)
    cert_data = _read(cert_path, "certificate")
    key_data = cert_data if key_path == cert_path else _read(key_path, "private key")
    return parse_entry(cert_data, key_data, key=key or cert_path, cert_source=cert_path, key_source=key_path)


def parse_entry(
    cert_pem: bytes,
    key_pem: bytes,
    *,
    key: str,
    cert_source: str | None = None,
    key_source: str | None = None,
) -> CertificateEntry:
    """Check an in-memory PEM chain and key (a tailscaled-issued pair) and make an entry.

    ``cert_source``/``key_source`` name the files in errors; without them the message names
    ``key``. Raises :class:`ConfigError` as :func:`load_entry` does.
    """

    def fail(message: str, source: str | None) -> ConfigError:
        if source is None:
            return ConfigError(message, key=key)
        return ConfigError(message, file=source)

    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        hint = " (it looks like DER: convert it with `openssl x509 -outform pem`)"
        if not _is_der(cert_pem):
            hint = ""
        raise fail(f"no PEM certificate found{hint}", cert_source) from None
    match = _PRIVATE_KEY_PEM.search(key_pem)
    if match is None:
        raise fail("no PEM private key found (expected -----BEGIN PRIVATE KEY-----)", key_source)
    if match.group(1) == b"ENCRYPTED PRIVATE KEY":
        raise fail("the private key is encrypted; ferryman needs an unencrypted key", key_source)
    try:
        private_key = serialization.load_pem_private_key(match.group(0), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise fail(f"unusable private key: {exc}", key_source) from None
    leaf = chain[0]
    if private_key.public_key().public_bytes(*_SPKI) != leaf.public_key().public_bytes(*_SPKI):
        where = f" in {cert_source}" if cert_source else ""
        raise fail(f"the private key does not match the certificate{where}", key_source)
    entry = CertificateEntry(
        key=key,
        names=certificate_names(leaf),
        certificate=leaf,
        chain_pem=b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in chain),
        key_pem=match.group(0) + b"\n",
    )
    try:  # what cryptography accepts OpenSSL may still refuse (a key type it is built without)
        _load_into(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), entry)
    except ssl.SSLError as exc:
        raise fail(f"OpenSSL refused the certificate and key: {exc}", cert_source) from None
    return entry


@dataclass(frozen=True, slots=True)
class HandshakeInfo:
    """What a completed server-side handshake negotiated, as the gateway needs it."""

    sni: str | None
    """Server name the client sent, lower-cased; None without SNI."""
    alpn: str | None
    """Protocol chosen by ALPN; None when the client offered none we serve."""
    certificate: str
    """:attr:`CertificateEntry.key` of the certificate served."""
    version: str | None
    """``TLSv1.2`` / ``TLSv1.3``."""
    peer_cert_der: bytes | None = field(repr=False)
    """The verified client certificate (see :func:`peer_certificate`)."""


@dataclass(frozen=True, slots=True)
class _Options:
    verify_mode: ssl.VerifyMode
    ca_pem: str | None
    alpn: tuple[str, ...]
    session_tickets: bool


class _Server:
    """The per-entry contexts behind one :meth:`CertificateSet.server_context` call."""

    __slots__ = ("__weakref__", "contexts", "options")

    def __init__(self, options: _Options, contexts: list[ssl.SSLContext]) -> None:
        self.options = options
        self.contexts = contexts


@dataclass(frozen=True, slots=True)
class _Seen:
    sni: str | None
    certificate: str


class CertificateSet:
    """The ordered server certificates of a terminating listener (SPEC §6).

    The first entry is the default: it is served when the client sent no SNI or an SNI no
    entry matches. Raises :class:`ConfigError` when empty or when two entries share a key.
    """

    def __init__(self, entries: Iterable[CertificateEntry]) -> None:
        self._entries = list(entries)
        if not self._entries:
            raise ConfigError("a TLS listener needs at least one certificate")
        keys = [entry.key for entry in self._entries]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"certificate keys must be unique, got {keys}")
        self._servers: weakref.WeakSet[_Server] = weakref.WeakSet()
        self._seen: weakref.WeakKeyDictionary[ssl.SSLObject | ssl.SSLSocket, _Seen] = (
            weakref.WeakKeyDictionary()
        )

    @classmethod
    def from_files(cls, pairs: Iterable[tuple[StrPath, StrPath | None]]) -> CertificateSet:
        """A set from ``(cert_file, key_file)`` pairs, in order (the first is the default)."""
        return cls(load_entry(cert_file, key_file) for cert_file, key_file in pairs)

    @property
    def entries(self) -> tuple[CertificateEntry, ...]:
        return tuple(self._entries)

    def index_for(self, sni: str | None) -> int:
        """Position of the entry :meth:`choose` returns."""
        if sni:
            for index, entry in enumerate(self._entries):
                if entry.matches(sni):
                    return index
        return 0

    def choose(self, sni: str | None) -> CertificateEntry:
        """The first entry whose names match ``sni``, else the first entry (the default)."""
        return self._entries[self.index_for(sni)]

    def server_context(
        self,
        *,
        client_auth: ClientAuth = "none",
        ca_file: StrPath | None = None,
        alpn_protocols: Sequence[str] | None = None,
        session_tickets: bool = True,
    ) -> ssl.SSLContext:
        """A server context (TLS 1.2 or newer) that serves these certificates by SNI.

        ``ca_file`` is required for ``want``/``need`` and read once, here; with ``none`` it is
        ignored. ``alpn_protocols`` are the protocols offered, in preference order; a client
        offering none of them gets no ALPN rather than a failed handshake. ``session_tickets``
        False sends TLS 1.3 clients no ticket (so they cannot resume; TLS 1.2 is unaffected).
        Raises :class:`ConfigError` for an unusable CA file or a missing one.
        """
        ca_pem: str | None = None
        if client_auth != "none":
            if ca_file is None:
                raise ConfigError(f"client_auth = {client_auth!r} needs a client CA file")
            ca_pem = _load_ca(os.fspath(ca_file))
        options = _Options(VERIFY_MODES[client_auth], ca_pem, tuple(alpn_protocols or ()), session_tickets)
        server = _Server(options, [_context(entry, options) for entry in self._entries])
        self._servers.add(server)
        dispatcher = _base_context(options)

        def on_server_name(ssl_object: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> int | None:
            return self._select(server, ssl_object, name)

        dispatcher.sni_callback = on_server_name
        return dispatcher

    def replace(self, index_or_key: int | str, cert_pem: bytes, key_pem: bytes) -> CertificateEntry:
        """Serve a new pair in one slot from the next handshake on; open connections keep theirs.

        The slot keeps its key and position (so the default stays the default); its names
        become the new leaf's. Raises :class:`ConfigError` (and changes nothing) for an unusable
        pair, ``KeyError``/``IndexError`` for an unknown slot.
        """
        index = self._index(index_or_key)
        entry = parse_entry(cert_pem, key_pem, key=self._entries[index].key)
        servers = list(self._servers)
        contexts = [_context(entry, server.options) for server in servers]
        self._entries[index] = entry
        for server, context in zip(servers, contexts, strict=True):
            server.contexts[index] = context
        logger.info(
            "TLS certificate replaced",
            extra={"certificate": entry.key, "names": list(entry.names), "not_after": entry.not_after},
        )
        return entry

    def handshake_info(self, endpoint: TlsEndpoint) -> HandshakeInfo:
        """SNI, ALPN, served certificate and client certificate of a finished handshake.

        ``endpoint`` is the ``SSLObject``/``SSLSocket``, an asyncio transport, or anything with
        ``extra(name)`` (``proxy.streams.Conn``). Raises ``ValueError`` when it carries no TLS or
        its handshake did not run through a context of this set.
        """
        ssl_object = ssl_object_of(endpoint)
        if ssl_object is None:
            raise ValueError("not a TLS connection")
        seen = self._seen.get(ssl_object)
        if seen is None:
            raise ValueError("this handshake did not go through this certificate set")
        return HandshakeInfo(
            sni=seen.sni,
            alpn=ssl_object.selected_alpn_protocol(),
            certificate=seen.certificate,
            version=ssl_object.version(),
            peer_cert_der=peer_certificate(ssl_object),
        )

    def _index(self, index_or_key: int | str) -> int:
        if isinstance(index_or_key, int):
            if not 0 <= index_or_key < len(self._entries):
                raise IndexError(f"no certificate at index {index_or_key}")
            return index_or_key
        for index, entry in enumerate(self._entries):
            if entry.key == index_or_key:
                return index
        raise KeyError(f"no certificate with key {index_or_key!r}")

    def _select(self, server: _Server, ssl_object: ssl.SSLObject, server_name: str | None) -> int | None:
        # An exception escaping an sni_callback only reaches sys.unraisablehook; answer with an
        # alert instead so the handshake fails cleanly and the reason is logged once.
        try:
            sni = server_name.lower() if server_name else None
            index = self.index_for(sni)
            ssl_object.context = server.contexts[index]
            self._seen[ssl_object] = _Seen(sni, self._entries[index].key)
        except Exception:
            logger.exception("TLS certificate selection failed", extra={"sni": server_name})
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        return None


@runtime_checkable
class _HasExtraInfo(Protocol):
    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


@runtime_checkable
class _HasExtra(Protocol):
    def extra(self, name: str, default: Any = None) -> Any: ...


TlsEndpoint: TypeAlias = ssl.SSLObject | ssl.SSLSocket | _HasExtraInfo | _HasExtra
"""Where a TLS session can be found: the SSL object, a transport, or a ``Conn``."""


def ssl_object_of(endpoint: TlsEndpoint) -> ssl.SSLObject | ssl.SSLSocket | None:
    """The ``SSLObject`` (or ``SSLSocket``) behind ``endpoint``; None for a plaintext one."""
    if isinstance(endpoint, ssl.SSLObject | ssl.SSLSocket):
        return endpoint
    # getattr, not isinstance on the runtime-checkable protocols: that costs microseconds per
    # handshake (typing walks the protocol's members every time).
    get_extra_info = getattr(endpoint, "get_extra_info", None)
    found = get_extra_info("ssl_object") if get_extra_info is not None else None
    if found is None:
        extra = getattr(endpoint, "extra", None)
        found = extra("ssl_object") if extra is not None else None
    return found if isinstance(found, ssl.SSLObject | ssl.SSLSocket) else None


def peer_certificate(endpoint: TlsEndpoint) -> bytes | None:
    """DER of the client certificate the handshake verified, or None.

    None for plaintext, when the client sent no certificate (``want``), and when the context
    does not verify client certificates at all (so a certificate returned here is always one
    OpenSSL checked against the CA file). Raises ``ValueError`` before the handshake is done.
    """
    ssl_object = ssl_object_of(endpoint)
    if ssl_object is None or ssl_object.context.verify_mode == ssl.CERT_NONE:
        return None
    return ssl_object.getpeercert(binary_form=True)


# -- building contexts ---------------------------------------------------------------------


def _base_context(options: _Options) -> ssl.SSLContext:
    # Not ssl.create_default_context(Purpose.CLIENT_AUTH): it trusts the system store.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Client-initiated TLS 1.2 renegotiation only costs the server CPU (CVE-2011-1473).
    context.options |= ssl.OP_NO_RENEGOTIATION
    # One TLS 1.3 session ticket per full handshake, not OpenSSL's two: each ticket costs the
    # server a serialise/parse of the session, which with OpenSSL 3.0 re-decodes the client
    # certificate (~0.15 ms of CPU per ticket with mTLS). One ticket still lets a client resume
    # (and a resumed handshake hands it the next one), as Go's crypto/tls does.
    context.num_tickets = 1 if options.session_tickets else 0
    context.verify_mode = options.verify_mode
    if options.ca_pem is not None:
        context.load_verify_locations(cadata=options.ca_pem)
    if options.alpn:
        context.set_alpn_protocols(list(options.alpn))
    return context


def _context(entry: CertificateEntry, options: _Options) -> ssl.SSLContext:
    context = _base_context(options)
    _load_into(context, entry)
    return context


def _load_into(context: ssl.SSLContext, entry: CertificateEntry) -> None:
    with _pem_paths(entry.chain_pem, entry.key_pem) as (cert_path, key_path):
        context.load_cert_chain(cert_path, key_path)


@contextlib.contextmanager
def _pem_paths(*blobs: bytes) -> Iterator[list[str]]:
    """Paths OpenSSL can read ``blobs`` from (``load_cert_chain`` takes no in-memory PEM).

    Anonymous memory files where the platform has them, so keys never touch a disk; else a
    private (0700) temporary directory, removed at once.
    """
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fds: list[int] = []
        try:
            for blob in blobs:
                fd = os.memfd_create("ferryman-pem", os.MFD_CLOEXEC)
                fds.append(fd)
                _write_all(fd, blob)
            yield [f"/proc/self/fd/{fd}" for fd in fds]
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="ferryman-tls-") as directory:
        paths = []
        for number, blob in enumerate(blobs):
            path = os.path.join(directory, f"{number}.pem")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _write_all(fd, blob)
            finally:
                os.close(fd)
            paths.append(path)
        yield paths


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} file: {exc.strerror or exc}", file=path) from None


def _load_ca(path: str) -> str:
    data = _read(path, "client CA")
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError("no PEM CA certificate found", file=path) from None
    pem = "".join(cert.public_bytes(serialization.Encoding.PEM).decode("ascii") for cert in certificates)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cadata=pem)
    except ssl.SSLError as exc:
        raise ConfigError(f"OpenSSL refused the CA certificates: {exc}", file=path) from None
    return pem


def _is_der(data: bytes) -> bool:
    return data[:1] == b"\x30" and b"-----BEGIN" not in data
