"""TailscaleCertStore: fetch through the client and the double, validate, renew near expiry."""

from __future__ import annotations

import datetime as dt

import pytest
import trustme

from ferryman.tailscale.certs import InvalidCertPair, TailscaleCertStore, parse_cert_pair
from ferryman.tailscale.errors import LocalAPIError, TailscaleError
from ferryman.tailscale.localapi import LocalAPIClient
from tests.support.localapi_double import LocalAPIDouble

DOMAIN = "gw.tail1234.ts.net"
DAY = 86400.0
T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
NOW = T0.timestamp()


def issue(ca: trustme.CA, start_day: float, days: float, name: str = DOMAIN) -> tuple[bytes, bytes]:
    leaf = ca.issue_cert(
        name,
        not_before=T0 + dt.timedelta(days=start_day),
        not_after=T0 + dt.timedelta(days=start_day + days),
    )
    return b"".join(p.bytes() for p in leaf.cert_chain_pems), leaf.private_key_pem.bytes()


def last_error(store: TailscaleCertStore) -> TailscaleError | None:
    return store.last_error  # read through a call so type narrowing does not stick


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


async def test_load_parses_validity_and_counts_versions(
    double: LocalAPIDouble, client: LocalAPIClient, ca: trustme.CA
) -> None:
    double.set_cert(DOMAIN, *issue(ca, -1, 90))
    store = TailscaleCertStore(client, DOMAIN)
    assert (store.pair, store.version) == (None, 0)
    pair = await store.load()
    assert store.version == 1 and store.pair is pair
    assert pair.not_after == NOW + 89 * DAY and pair.lifetime == 90 * DAY
    assert b"PRIVATE KEY" in pair.key_pem and b"PRIVATE KEY" not in pair.cert_pem
    assert "KEY" not in repr(pair)
    assert store.renew_at() == pair.not_after - 14 * DAY  # min(90d/3, 14d)


async def test_renewal_picks_up_the_swapped_pair_near_expiry(
    double: LocalAPIDouble, client: LocalAPIClient, ca: trustme.CA
) -> None:
    double.set_cert(DOMAIN, *issue(ca, -1, 90))
    store = TailscaleCertStore(client, DOMAIN, retry_interval=3600)
    assert await store.refresh_if_needed(NOW) is True  # first call loads
    first = store.pair
    assert first is not None
    fetches = double.count("cert")

    assert await store.refresh_if_needed(NOW + 60 * DAY) is False  # 29 days left: not due
    assert double.count("cert") == fetches

    # due, but tailscaled still has the old pair: nothing changes, and no re-ask for an hour
    assert await store.refresh_if_needed(NOW + 80 * DAY) is False
    assert await store.refresh_if_needed(NOW + 80 * DAY + 60) is False
    assert double.count("cert") == fetches + 1 and store.version == 1

    double.set_cert(DOMAIN, *issue(ca, 79, 90))  # tailscaled renewed
    assert await store.refresh_if_needed(NOW + 80 * DAY + 3600) is True
    assert store.version == 2 and store.pair is not None and store.pair != first
    assert store.pair.not_after == NOW + 169 * DAY
    assert await store.refresh_if_needed(NOW + 81 * DAY) is False


async def test_failed_renewal_keeps_the_old_pair_then_retries(
    double: LocalAPIDouble, client: LocalAPIClient, ca: trustme.CA
) -> None:
    double.set_cert(DOMAIN, *issue(ca, -1, 3))  # short-lived: fraction bound (1 day) applies
    store = TailscaleCertStore(client, DOMAIN, retry_interval=600)
    await store.load()
    assert store.renew_at() == NOW + 1 * DAY
    double.fail("cert", status=500, body=b"acme: rate limited\n", times=1)
    assert await store.refresh_if_needed(NOW + 1.5 * DAY) is False
    assert isinstance(last_error(store), LocalAPIError) and store.version == 1
    double.set_cert(DOMAIN, *issue(ca, 1, 3))
    assert await store.refresh_if_needed(NOW + 1.5 * DAY + 60) is False  # backing off
    assert await store.refresh_if_needed(NOW + 1.5 * DAY + 600) is True
    assert last_error(store) is None and store.version == 2


async def test_without_a_usable_pair_failures_raise(
    double: LocalAPIDouble, client: LocalAPIClient, ca: trustme.CA
) -> None:
    store = TailscaleCertStore(client, DOMAIN)
    with pytest.raises(LocalAPIError, match="invalid domain"):
        await store.refresh_if_needed(NOW)
    double.set_cert(DOMAIN, *issue(ca, -1, 2))
    await store.load()
    double.fail("cert", status=500, body=b"boom")
    with pytest.raises(LocalAPIError):  # the held pair has expired: nothing to fall back on
        await store.refresh_if_needed(NOW + 3 * DAY)


async def test_mismatched_or_foreign_pairs_are_refused(
    double: LocalAPIDouble, client: LocalAPIClient, ca: trustme.CA
) -> None:
    cert_a, _ = issue(ca, -1, 90)
    _, key_b = issue(ca, -1, 90)
    double.set_cert(DOMAIN, cert_a, key_b)
    with pytest.raises(InvalidCertPair, match="does not match"):
        await TailscaleCertStore(client, DOMAIN).load()
    with pytest.raises(InvalidCertPair, match="does not name"):
        parse_cert_pair(DOMAIN, *issue(ca, -1, 90, name="other.tail1234.ts.net"))
    wildcard = parse_cert_pair(DOMAIN, *issue(ca, -1, 90, name="*.tail1234.ts.net"))
    assert wildcard.not_after == NOW + 89 * DAY
