"""The ``mtls`` identity source: certificate fields → Identity. Pure: no TLS, no I/O."""

import hashlib

import pytest

from ferryman.errors import ConfigError, IdentityUnavailable
from ferryman.identity.base import IdentitySource, PeerInfo
from ferryman.identity.mtls import MtlsSource
from tests.tls.certgen import DAY, NOW, Authority, Issued

CA = Authority("client CA")
FULL = CA.issue(
    cn="alice",
    ous=("dba", "eng", "dba"),
    emails=("alice@example.com", "a@example.org"),
    uris=("spiffe://example.org/ns/prod/sa/alice", "https://example.org/alice"),
    dns=("alice.example.com",),
    ips=("10.0.0.7",),
    serial=0xC0FFEE,
)
NOW_TS = NOW.timestamp()


def source(user_from: str = "san_email", groups_from: str = "ou", now: float = NOW_TS) -> MtlsSource:
    return MtlsSource(user_from, groups_from, clock=lambda: now)  # type: ignore[arg-type]


def peer(issued: Issued | None) -> PeerInfo:
    return PeerInfo("192.0.2.1", 50000, peer_cert_der=issued.der if issued else None)


@pytest.mark.parametrize(
    ("user_from", "groups_from", "user", "groups"),
    [
        ("san_email", "ou", "alice@example.com", ("dba", "eng")),
        ("san_uri", "ou", "spiffe://example.org/ns/prod/sa/alice", ("dba", "eng")),
        ("cn", "ou", "alice", ("dba", "eng")),
        ("san_email", "none", "alice@example.com", ()),
        ("cn", "none", "alice", ()),
    ],
)
async def test_user_and_groups(user_from: str, groups_from: str, user: str, groups: tuple[str, ...]) -> None:
    identity = await source(user_from, groups_from).identify(peer(FULL))
    assert identity is not None
    assert (identity.user, identity.groups, identity.source, identity.node) == (user, groups, "mtls", "")
    assert identity.expires_at == FULL.cert.not_valid_after_utc.timestamp()


async def test_no_certificate_means_not_mine() -> None:
    assert await source().identify(peer(None)) is None


@pytest.mark.parametrize(
    ("user_from", "issued", "reason"),
    [
        ("san_email", CA.issue(cn="bob", uris=("spiffe://x/y",)), "has no SAN email (rfc822Name)"),
        ("san_uri", CA.issue(cn="bob", emails=("bob@example.com",)), "has no SAN URI"),
        ("san_email", CA.issue(cn="bob"), "has no SAN email"),
        ("cn", CA.issue(emails=("bob@example.com",)), "has no subject CN"),
    ],
)
async def test_missing_user_field_fails_closed(user_from: str, issued: Issued, reason: str) -> None:
    with pytest.raises(IdentityUnavailable) as info:
        await source(user_from).identify(peer(issued))
    assert reason in str(info.value)
    assert f"user_from = {user_from!r}" in str(info.value)
    assert info.value.sqlstate == "28000"


async def test_several_cns_are_ambiguous() -> None:
    with pytest.raises(IdentityUnavailable, match="2 subject CNs"):
        await source("cn").identify(peer(CA.issue(cn="alice", cns=("root",))))


async def test_no_ou_means_no_groups() -> None:
    identity = await source().identify(peer(CA.issue(emails=("carol@example.com",))))
    assert identity is not None and identity.groups == ()


async def test_claims() -> None:
    identity = await source().identify(peer(FULL))
    assert identity is not None
    claims = identity.claims
    assert claims["subject"] == "CN=alice,OU=dba,OU=eng,OU=dba,O=ferryman tests"
    assert claims["issuer"] == "CN=client CA"
    assert claims["serial"] == "c0ffee"
    assert claims["fingerprint_sha256"] == hashlib.sha256(FULL.der).hexdigest()
    assert claims["san"] == {
        "email": ("alice@example.com", "a@example.org"),
        "uri": ("spiffe://example.org/ns/prod/sa/alice", "https://example.org/alice"),
        "dns": ("alice.example.com",),
        "ip": ("10.0.0.7",),
    }
    assert claims["not_after"] == FULL.cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")


async def test_expires_at_and_validity_window() -> None:
    not_after = NOW + 2 * DAY
    issued = CA.issue(emails=("dave@example.com",), not_before=NOW - DAY, not_after=not_after)
    identity = await source(now=NOW_TS).identify(peer(issued))
    assert identity is not None and identity.expires_at == not_after.timestamp()
    # A resumed TLS session is not re-verified by OpenSSL: the source checks the window itself.
    with pytest.raises(IdentityUnavailable, match="expired at"):
        await source(now=not_after.timestamp() + 1).identify(peer(issued))
    with pytest.raises(IdentityUnavailable, match="not valid before"):
        await source(now=(NOW - 2 * DAY).timestamp()).identify(peer(issued))


async def test_garbage_der_fails_closed() -> None:
    bad = PeerInfo("192.0.2.1", 1, peer_cert_der=b"\x30\x03junk")
    with pytest.raises(IdentityUnavailable, match="not valid DER"):
        await source().identify(bad)


def test_configuration_is_checked() -> None:
    with pytest.raises(ConfigError, match="user_from"):
        MtlsSource("san_dns")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="groups_from"):
        MtlsSource(groups_from="o")  # type: ignore[arg-type]


async def test_is_an_identity_source() -> None:
    mtls = MtlsSource()
    assert isinstance(mtls, IdentitySource)
    assert mtls.name == "mtls"
    await mtls.aclose()


async def test_memoised_certificate_is_still_checked_against_the_clock() -> None:
    """The mapping is memoised per DER; the validity window and refusals are not."""
    not_after = NOW + DAY
    issued = CA.issue(emails=("erin@example.com",), not_before=NOW - DAY, not_after=not_after)
    now = [NOW_TS]
    src = MtlsSource("san_email", "ou", clock=lambda: now[0])
    first = await src.identify(peer(issued))
    assert first is not None and await src.identify(peer(issued)) is first
    now[0] = not_after.timestamp() + 1
    with pytest.raises(IdentityUnavailable, match="expired at"):
        await src.identify(peer(issued))
    no_email = CA.issue(cn="frank")
    for _ in range(2):  # a refusal stays a refusal when it comes from the memo
        with pytest.raises(IdentityUnavailable, match="has no SAN email"):
            await MtlsSource(clock=lambda: NOW_TS).identify(peer(no_email))
    src2 = MtlsSource(clock=lambda: NOW_TS)
    for _ in range(2):
        with pytest.raises(IdentityUnavailable, match="has no SAN email"):
            await src2.identify(peer(no_email))
