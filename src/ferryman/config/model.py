"""The configuration model: every key ferryman accepts, its type, default and cross-checks.

Owns: frozen pydantic models mirroring the TOML file (SPEC §2), unit conversion of durations
and sizes, and checks that span several keys (duplicate listener names, two listeners on one
address, identity sources that are named but not configured, ``client_auth`` where no TLS is
terminated).

Must not: read files or the environment (``config.load`` does), or be imported by the
sans-I/O cores (pgwire, tlshello, policy.engine): they take plain values.

Every model forbids unknown keys, so a misspelt key is an error naming it.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from ferryman.policy.pplfield import ListenerPolicyField
from ferryman.units import parse_duration, parse_size


def _duration(value: object) -> float:
    return parse_duration(value)


def _size(value: object) -> int:
    return parse_size(value)


Duration = Annotated[float, BeforeValidator(_duration)]
"""Seconds, written in the file as ``"90s"``, ``"1m"``, ``"24h"``; ``"0"`` disables."""
Size = Annotated[int, BeforeValidator(_size)]
"""Bytes, written as a number or ``"10MiB"`` / ``"10GB"``."""

IDENTITY_SOURCES = ("tailscale", "mtls", "token", "static")


def split_hostport(text: str, *, default_host: str = "") -> tuple[str, int]:
    """``"host:port"``, ``":port"``, ``"[v6]:port"`` → ``(host, port)``. Raises ``ValueError``."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError(f"not a host:port address: {text!r}")
        host, port_text = text[1:end], text[end + 2 :]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"not a host:port address: {text!r} (the port is missing)")
        if ":" in host:
            raise ValueError(f'IPv6 addresses must be bracketed: {text!r} (e.g. "[::1]:5432")')
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in {text!r}")
    return (host or default_host), int(port_text)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class StateConfig(_Model):
    url: str = ""
    """``sqlite:///path`` or ``postgresql://…``: the shared state of the admin API and fleets.
    Accepted so configurations can carry it; nothing in this build checks or uses it yet."""


class AdminConfig(_Model):
    listen: str = "127.0.0.1:9180"
    """Where ``/metrics`` and ``/healthz`` (and later the REST API) are served; ``"off"``: nowhere."""
    token: str | None = Field(default=None, repr=False)

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        if value != "off":
            split_hostport(value)
        return value

    @property
    def loopback_only(self) -> bool:
        """Whether only this machine can reach the admin listener (or there is none)."""
        if self.listen == "off":
            return True
        host, _ = split_hostport(self.listen)
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host.strip("[]")).is_loopback
        except ValueError:
            return False  # "" (every interface) or a name


class RevalidationConfig(_Model):
    interval: Duration = 60.0
    """Seconds between re-checks of live connections; 0 disables revalidation."""


class AuditConfig(_Model):
    file: str = "-"
    """Path of the JSON-lines audit file; ``"-"`` writes to standard output."""


class ShutdownConfig(_Model):
    grace: Duration = 30.0
    """How long SIGTERM waits for live connections before closing them (reason ``shutdown``)."""


class TailscaleConfig(_Model):
    socket: str = "/var/run/tailscale/tailscaled.sock"
    capability: str = "ferryman.dev/cap/ferryman"
    timeout: Duration = 5.0
    """Bound on one LocalAPI call (WhoIs, dial, cert)."""
    cert_check_interval: Duration = 3600.0
    """How often tailnet certificates (``use_tailscale_tls``) are checked for renewal."""
    socks5: str | None = None
    """``host:port`` of tailscaled's SOCKS5 server (``tailscaled --socks5-server``): listeners
    with ``backend_via_tailscale`` dial through it instead of the LocalAPI ``ts-dial`` upgrade.
    Names are resolved by tailscaled (MagicDNS)."""

    @field_validator("socks5")
    @classmethod
    def _check_socks5(cls, value: str | None) -> str | None:
        if value is not None and not split_hostport(value)[0]:
            raise ValueError(f"socks5 needs a host: {value!r}")
        return value


class StaticIdentityConfig(_Model):
    cidr: str
    user: str
    node: str = ""
    groups: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()

    @field_validator("cidr")
    @classmethod
    def _check_cidr(cls, value: str) -> str:
        ipaddress.ip_network(value, strict=False)
        return value


class MtlsIdentityConfig(_Model):
    ca_file: str
    """CA that client certificates must chain to (listeners may name their own client_ca_file)."""
    user_from: Literal["san_email", "san_uri", "cn"] = "san_email"
    groups_from: Literal["ou", "none"] = "ou"


class IdentityConfig(_Model):
    static: tuple[StaticIdentityConfig, ...] = ()
    mtls: MtlsIdentityConfig | None = None


class CertificateConfig(_Model):
    cert_file: str
    key_file: str


class TargetConfig(_Model):
    """Where a route leads (Otoroshi's target): dial ``ip`` (or ``host``), use ``host`` for SNI
    and certificate checks; ``tls`` wraps the backend side in verified TLS."""

    host: str
    ip: str | None = None
    port: int = Field(gt=0, lt=65536)
    tls: bool = False

    @field_validator("ip")
    @classmethod
    def _check_ip(cls, value: str | None) -> str | None:
        if value is not None:
            ipaddress.ip_address(value)
        return value

    @property
    def dial_host(self) -> str:
        return self.ip or self.host


class SniConfig(_Model):
    enabled: bool = True
    forward_if_no_match: bool = False
    forwards_to: TargetConfig | None = None


class RuleConfig(_Model):
    domain: str
    """A regular expression matched in full, case-insensitively, against the SNI name (or the
    HTTP Host header on plaintext listeners); a pattern starting with ``*`` is a wildcard instead
    (``*`` = any characters, the rest literal), as in Otoroshi."""
    targets: tuple[TargetConfig, ...] = Field(min_length=1)
    alpn: tuple[str, ...] = ()
    """Also require one of these ALPN protocols (offered by the client with passthrough,
    negotiated with ``tls = "enabled"``); empty = any."""

    @field_validator("domain")
    @classmethod
    def _check_domain(cls, value: str) -> str:
        from ferryman.routing import compile_domain

        compile_domain(value)
        return value


class PostgresConfig(_Model):
    """``[listeners.postgres]``: how the gateway manages roles on the backend (SPEC §5)."""

    admin_user: str = "postgres"
    admin_password: str | None = Field(default=None, repr=False)
    admin_database: str = "postgres"
    user_prefix: str = Field(default="fm_", pattern=r"^[a-z_][a-z0-9_]{0,15}$")
    user_ttl: Duration = 86400.0
    """Managed roles unused for this long, with no live session, are dropped by the sweeper."""
    allow_raw_sql: bool = False
    """Apply grants' raw ``sql`` statements (validated GRANT/REVOKE/ALTER DEFAULT PRIVILEGES)."""
    password_encryption: Literal["scram-sha-256", "md5"] = "scram-sha-256"
    """How role passwords are stored; use ``md5`` only for backends whose pg_hba asks for md5."""
    handshake_timeout: Duration = 15.0
    """Bound on the client's startup (SSLRequest, TLS, StartupMessage) before we answer."""
    sweep_interval: Duration = 300.0
    reuse_backend_sessions: bool = True
    """When a client ends its session with ``Terminate`` and no transaction open, keep the
    backend session, clean it with ``DISCARD ALL`` and hand it to the next connection of the
    same role, database and start-up parameters (PgBouncer's session pooling): no backend fork
    and login per connection. Only for plaintext on both sides (``tls_mode`` with TLS in use
    or ``backend_tls`` ≠ ``off`` → never reused)."""
    backend_idle_timeout: Duration = 30.0
    """An unused kept session is closed after this long (and never outlives ``user_ttl``)."""
    backend_lifetime: Duration = 3600.0
    """A kept session is not reused once it is this old; it is closed instead."""
    backend_max_idle: int = Field(default=20, ge=0)
    """At most this many unused sessions are kept per backend (the oldest goes first)."""


class ListenerConfig(_Model):
    """One ``[[listeners]]`` entry (the admin API calls it a *service*)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    listen: str
    mode: Literal["tcp", "postgres"] = "tcp"
    backend: str | None = None
    """``host:port`` to dial; optional when ``rules`` (or ``sni.forwards_to`` with
    ``forward_if_no_match``) say where to go."""
    tls: Literal["disabled", "passthrough", "enabled"] = "disabled"
    """TCP listeners: ``passthrough`` routes on the ClientHello's SNI and forwards the TLS bytes
    untouched; ``enabled`` terminates TLS with the listener's certificates."""
    sni: SniConfig | None = None
    rules: tuple[RuleConfig, ...] = ()
    target_down_time: Duration = 10.0
    """A target whose dial failed is skipped for this long."""
    backend_insecure_skip_verify: bool = False
    """Targets with ``tls = true`` are verified unless this is set (only if you must)."""
    proxy_protocol: Literal["off", "v1", "v2"] = "off"
    """Send the client's address to the backend in a PROXY protocol header."""
    accept_proxy_protocol: bool = False
    """Require a PROXY protocol header (v1 or v2) from a load balancer in front; its address is
    the client's for identity, audit and logs."""
    proxy_protocol_timeout: Duration = 5.0
    identity: tuple[Literal["tailscale", "mtls", "token", "static"], ...] | None = None
    """Identity sources in the order they are tried; default: every configured source."""
    idle_timeout: Duration = 0.0
    """No bytes either way for this long closes the connection (reason ``idle``); 0 = never."""
    dial_timeout: Duration = 10.0
    """Bound on connecting to the backend; a failure closes the client (``backend_error``)."""
    backend_via_tailscale: bool = False
    """Dial the backend through tailscaled's LocalAPI (MagicDNS names, 100.x addresses)."""
    identity_timeout: Duration = 10.0
    """Bound on identifying the caller (all sources together); past it the connection is refused."""
    tls_mode: Literal["off", "optional", "require"] = "off"
    """PostgreSQL listeners: answer SSLRequest (optional/require) and refuse plaintext (require)."""
    cert_file: str | None = None
    key_file: str | None = None
    certificates: tuple[CertificateConfig, ...] = ()
    """Several certificates, chosen by SNI: the first whose names match, else the first."""
    use_tailscale_tls: bool = False
    """Serve the node's tailnet certificate from tailscaled (renewed before expiry)."""
    tailscale_cert_domain: str | None = None
    """The tailnet name to fetch a certificate for (default: tailscaled's first CertDomain)."""
    client_auth: Literal["none", "want", "need"] = "none"
    """Ask for a client certificate (``want``) or require one (``need``), verified against
    ``client_ca_file`` or ``[identity.mtls] ca_file``; a verified one can be the mtls identity.
    Only where the gateway terminates TLS: ``tls = "enabled"`` (TCP), ``tls_mode`` other than
    ``off`` (PostgreSQL; ``need`` requires ``tls_mode = "require"``)."""
    client_ca_file: str | None = None
    session_tickets: bool | None = None
    """TLS 1.3 session tickets (one per full handshake) so clients can resume. Default: on
    when ``client_auth = "none"``, off when client certificates are requested (see
    :attr:`issues_session_tickets`)."""
    backend_tls: Literal["off", "require", "verify-full"] = "off"
    """PostgreSQL listeners: TLS to the backend via SSLRequest; verify-full checks CA and name."""
    backend_ca_file: str | None = None
    postgres: PostgresConfig | None = None
    policy: ListenerPolicyField = None
    """Pomerium Policy Language (SPEC §3, ``policy.ppl``): a connection must satisfy it as well
    as hold a grant; ``deny`` always wins. Absent or empty: no condition beyond the grant."""

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        split_hostport(value)
        return value

    @field_validator("backend")
    @classmethod
    def _check_backend(cls, value: str | None) -> str | None:
        if value is None:
            return value
        host, _ = split_hostport(value)
        if not host:
            raise ValueError(f"backend needs a host: {value!r}")
        return value

    @property
    def issues_session_tickets(self) -> bool:
        """Whether TLS 1.3 clients get a session ticket. Off by default with client
        certificates: each ticket carries the client certificate, which OpenSSL 3.0 decodes
        again to issue it (~0.15 ms of CPU per handshake, measured), a resumed session skips
        the chain check, and the usual clients of a database gateway (libpq, Go's and
        Python's defaults) never resume anyway."""
        if self.session_tickets is not None:
            return self.session_tickets
        return self.client_auth == "none"

    @property
    def has_certificates(self) -> bool:
        return bool(self.cert_file or self.certificates or self.use_tailscale_tls)

    @property
    def listen_address(self) -> tuple[str, int]:
        return split_hostport(self.listen)

    @property
    def backend_address(self) -> tuple[str, int]:
        if self.backend is None:
            raise ValueError(f"listener {self.name} has no fixed backend")
        return split_hostport(self.backend)

    @property
    def routes_by_name(self) -> bool:
        """Whether the backend is chosen per connection from SNI/Host rules."""
        sni = self.sni
        return bool(self.rules) or (
            sni is not None and sni.forward_if_no_match and sni.forwards_to is not None
        )

    @property
    def reads_before_identity(self) -> bool:
        """Whether a TCP-mode connection is read from before it can be identified (a PROXY
        header, a TLS ClientHello or handshake, an HTTP request head to route on)."""
        return self.accept_proxy_protocol or self.tls != "disabled" or self.routes_by_name

    @property
    def terminates_tls(self) -> bool:
        return self.tls == "enabled" or (self.mode == "postgres" and self.tls_mode != "off")


def _check_admin(admin: AdminConfig) -> None:
    if not admin.loopback_only and not admin.token:
        raise ValueError(
            f"@admin.listen: {admin.listen!r} is reachable from other machines: set [admin] token "
            '(e.g. token = "${FERRYMAN_ADMIN_TOKEN}") or listen on a loopback address'
        )


def _check_client_auth(index: int, listener: ListenerConfig) -> None:
    """A client certificate is only asked for in a TLS handshake the gateway terminates:
    ``client_auth`` where none is terminated (or where a client may skip it) would be a
    setting that silently checks nothing."""
    value = listener.client_auth
    if value == "none":
        return
    key = f"@listeners.{index}.client_auth"
    if listener.mode == "tcp" and listener.tls != "enabled":
        raise ValueError(
            f'{key}: "{value}" needs tls = "enabled" (with tls = "{listener.tls}" the gateway '
            "terminates no TLS, so no client certificate would ever be checked)"
        )
    if listener.mode == "postgres" and listener.tls_mode == "off":
        wanted = '"require"' if value == "need" else '"optional" or "require"'
        raise ValueError(
            f'{key}: "{value}" needs tls_mode = {wanted} (with tls_mode = "off" the gateway '
            "terminates no TLS, so no client certificate would ever be checked)"
        )
    if listener.mode == "postgres" and value == "need" and listener.tls_mode != "require":
        raise ValueError(
            f'{key}: "need" needs tls_mode = "require" (with tls_mode = "{listener.tls_mode}" '
            "a plaintext client would skip the certificate check)"
        )


class Config(_Model):
    """The whole configuration file."""

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "json"
    policy_file: str | None = None
    state: StateConfig = StateConfig()
    admin: AdminConfig = AdminConfig()
    revalidation: RevalidationConfig = RevalidationConfig()
    audit: AuditConfig = AuditConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    tailscale: TailscaleConfig | None = None
    identity: IdentityConfig = IdentityConfig()
    listeners: tuple[ListenerConfig, ...] = ()

    def configured_sources(self) -> tuple[str, ...]:
        """Identity sources that have configuration, in SPEC order."""
        present = {
            "tailscale": self.tailscale is not None,
            "mtls": self.identity.mtls is not None,
            "static": bool(self.identity.static),
        }
        return tuple(name for name in IDENTITY_SOURCES if present.get(name, False))

    def sources_for(self, listener: ListenerConfig) -> tuple[str, ...]:
        return listener.identity if listener.identity is not None else self.configured_sources()

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        # Each problem is raised as a ValueError whose first word is a key path, so the loader
        # can point at the right line ("listeners[1].name: duplicate listener name").
        _check_admin(self.admin)
        seen_names: dict[str, int] = {}
        seen_addrs: dict[tuple[str, int], int] = {}
        configured = set(self.configured_sources())
        for index, listener in enumerate(self.listeners):
            if listener.name in seen_names:
                raise ValueError(
                    f"@listeners.{index}.name: duplicate listener name {listener.name!r} "
                    f"(also listeners[{seen_names[listener.name]}])"
                )
            seen_names[listener.name] = index
            host, port = listener.listen_address
            for (other_host, other_port), other in seen_addrs.items():
                if port == other_port and (host == other_host or "" in (host, other_host)):
                    raise ValueError(
                        f"@listeners.{index}.listen: {listener.listen!r} is already used by "
                        f"listeners[{other}] ({self.listeners[other].name})"
                    )
            seen_addrs[(host, port)] = index
            for source in listener.identity or ():
                if source not in configured:
                    raise ValueError(
                        f"@listeners.{index}.identity: source {source!r} is not configured "
                        f"(configured: {', '.join(sorted(configured)) or 'none'})"
                    )
            if listener.backend is None and not listener.routes_by_name:
                raise ValueError(
                    f"@listeners.{index}.backend: required (or give rules, or sni.forwards_to "
                    "with sni.forward_if_no_match = true)"
                )
            if listener.mode == "postgres" and listener.tls != "disabled":
                raise ValueError(f"@listeners.{index}.tls: postgres listeners use tls_mode")
            if listener.tls == "enabled" and not listener.has_certificates:
                raise ValueError(
                    f"@listeners.{index}.tls: 'enabled' needs cert_file/key_file, certificates "
                    "or use_tailscale_tls"
                )
            if listener.mode == "postgres" and listener.routes_by_name and listener.tls_mode == "off":
                raise ValueError(f"@listeners.{index}.rules: postgres listeners route on SNI: set tls_mode")
            if listener.backend_via_tailscale and self.tailscale is None:
                raise ValueError(f"@listeners.{index}.backend_via_tailscale: needs a [tailscale] section")
            if listener.mode == "postgres" and listener.postgres is None:
                raise ValueError(
                    f"@listeners.{index}.postgres: a postgres listener needs [listeners.postgres] "
                    "(at least admin_user)"
                )
            if listener.mode != "postgres" and (listener.tls_mode != "off" or listener.backend_tls != "off"):
                raise ValueError(
                    f"@listeners.{index}.tls_mode: tls_mode/backend_tls apply to postgres listeners"
                )
            if listener.tls_mode != "off" and not listener.has_certificates:
                raise ValueError(
                    f"@listeners.{index}.tls_mode: needs cert_file/key_file, certificates "
                    "or use_tailscale_tls"
                )
            if listener.use_tailscale_tls and self.tailscale is None:
                raise ValueError(f"@listeners.{index}.use_tailscale_tls: needs a [tailscale] section")
            _check_client_auth(index, listener)
            if listener.client_auth != "none" and not (
                listener.client_ca_file or (self.identity.mtls and self.identity.mtls.ca_file)
            ):
                raise ValueError(
                    f"@listeners.{index}.client_auth: needs client_ca_file or [identity.mtls] ca_file"
                )
            if (listener.cert_file is None) != (listener.key_file is None):
                raise ValueError(f"@listeners.{index}.cert_file: cert_file and key_file go together")
        return self
