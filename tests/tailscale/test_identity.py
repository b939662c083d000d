"""TailscaleSource against the LocalAPI double: identities, grants, and failing closed."""

from __future__ import annotations

import os

import pytest

from ferryman.errors import IdentityUnavailable
from ferryman.identity.base import IdentitySource, PeerInfo
from ferryman.identity.tailscale import TailscaleSource, whois_addr
from ferryman.tailscale.localapi import LocalAPIClient
from tests.support.localapi_double import LocalAPIDouble, short_socket_dir

CAP = "ferryman.dev/cap/ferryman"
WAYPOINT = "redo.com/cap/waypoint"


def peer(host: str, port: int = 4567) -> PeerInfo:
    return PeerInfo(remote_host=host, remote_port=port, listener="pg-main")


@pytest.fixture
def source(client: LocalAPIClient) -> TailscaleSource:
    return TailscaleSource(client, CAP)


async def test_user_node_tags_and_grants(double: LocalAPIDouble, source: TailscaleSource) -> None:
    value = {"backends": {"pg-main": {"pg": {"databases": {"*": {"permissions": ["readonly"]}}}}}}
    double.add_peer("100.101.102.103", login="alice@example.com", host="alice-laptop", cap_map={CAP: [value]})
    ident = await source.identify(peer("100.101.102.103"))
    assert ident is not None
    assert (ident.user, ident.node, ident.source, ident.tags) == (
        "alice@example.com",
        "alice-laptop",
        "tailscale",
        (),
    )
    assert ident.grants == (value,)
    assert ident.claims["tailscale_node_name"] == "alice-laptop.tail1234.ts.net"
    assert isinstance(source, IdentitySource)


async def test_tagged_device_is_identified_by_its_tags(
    double: LocalAPIDouble, source: TailscaleSource
) -> None:
    double.add_peer("100.64.0.50", host="ci-runner", tags=("tag:ci", "tag:prod"), cap_map={CAP: [{}]})
    ident = await source.identify(peer("100.64.0.50"))
    assert ident is not None
    assert ident.user == "tag:ci,tag:prod" and ident.tags == ("tag:ci", "tag:prod")
    assert ident.principals() >= {"tag:ci", "tag:prod"}
    assert ident.claims["tailscale_login_name"] == "tagged-devices"


async def test_capability_name_selects_the_grants(double: LocalAPIDouble, client: LocalAPIClient) -> None:
    ours: dict[str, object] = {"backends": {"a": {}}}
    theirs: dict[str, object] = {"backends": {"b": {}}}
    double.add_peer("100.64.0.2", cap_map={CAP: [ours], WAYPOINT: [theirs, {"backends": {"c": {}}}]})
    mine = await TailscaleSource(client, CAP).identify(peer("100.64.0.2"))
    waypoint = await TailscaleSource(client, WAYPOINT).identify(peer("100.64.0.2"))
    other = await TailscaleSource(client, "example.com/cap/none").identify(peer("100.64.0.2"))
    assert mine is not None and mine.grants == (ours,)
    assert waypoint is not None and waypoint.grants == (theirs, {"backends": {"c": {}}})
    assert other is not None and other.grants == ()


async def test_unknown_fields_are_ignored(double: LocalAPIDouble, source: TailscaleSource) -> None:
    p = double.add_peer("100.64.0.3", login="bob@example.com")
    p.node["BrandNewField"] = {"nested": [1, 2, 3]}
    p.node["Hostinfo"]["FutureThing"] = True
    assert p.user_profile is not None
    p.user_profile["Roles"] = ["admin"]
    ident = await source.identify(peer("100.64.0.3"))
    assert ident is not None and ident.user == "bob@example.com"


async def test_node_name_falls_back_to_first_label(double: LocalAPIDouble, source: TailscaleSource) -> None:
    p = double.add_peer("100.64.0.4", host="db-1")
    del p.node["ComputedName"]
    ident = await source.identify(peer("100.64.0.4"))
    assert ident is not None and ident.node == "db-1"


async def test_loopback_peer_is_asked_unchanged(double: LocalAPIDouble, source: TailscaleSource) -> None:
    double.add_peer("127.0.0.1:40001", login="carol@example.com")  # userspace-networking proxy map
    ident = await source.identify(peer("127.0.0.1", 40001))
    assert ident is not None and ident.user == "carol@example.com"
    assert double.requests[-1].query["addr"] == ["127.0.0.1:40001"]
    with pytest.raises(IdentityUnavailable, match=r"no such peer 127\.0\.0\.1:40002 \(404\)"):
        await source.identify(peer("127.0.0.1", 40002))


async def test_ipv4_mapped_and_ipv6_peers(double: LocalAPIDouble, source: TailscaleSource) -> None:
    double.add_peer("100.64.0.6")
    double.add_peer("fd7a:115c:a1e0::9", login="dave@example.com")
    assert await source.identify(peer("::ffff:100.64.0.6")) is not None
    assert double.requests[-1].query["addr"] == ["100.64.0.6:4567"]
    ident = await source.identify(peer("fd7a:115c:a1e0::9"))
    assert ident is not None and ident.user == "dave@example.com"
    assert double.requests[-1].query["addr"] == ["[fd7a:115c:a1e0::9]:4567"]


@pytest.mark.parametrize(
    ("host", "port"),
    [
        ("", 1),
        ("/run/ferryman.sock", 0),
        ("0.0.0.0", 5),
        ("::", 5),
        ("fe80::1%eth0", 5),
        ("224.0.0.1", 5),
        ("100.64.0.1", 0),
    ],
)
async def test_addresses_tailscaled_cannot_know_are_not_asked(
    double: LocalAPIDouble, source: TailscaleSource, host: str, port: int
) -> None:
    assert whois_addr(peer(host, port)) is None
    assert await source.identify(peer(host, port)) is None
    assert double.count("whois") == 0


async def test_grant_change_is_seen_on_the_next_identify(
    double: LocalAPIDouble, source: TailscaleSource
) -> None:
    double.add_peer("100.64.0.7", cap_map={CAP: [{"backends": {"pg-main": {}}}]})
    first = await source.identify(peer("100.64.0.7"))
    double.set_cap_map("100.64.0.7", {CAP: [{"backends": {"raw-mysql": {}}}]})
    second = await source.identify(peer("100.64.0.7"))
    double.set_cap_map("100.64.0.7", None)
    third = await source.identify(peer("100.64.0.7"))
    assert first is not None and second is not None and third is not None
    assert first.grants == ({"backends": {"pg-main": {}}},)
    assert second.grants == ({"backends": {"raw-mysql": {}}},)
    assert third.grants == ()
    assert double.count("whois") == 3  # no caching: revalidation always asks


async def test_removed_peer_fails_closed(double: LocalAPIDouble, source: TailscaleSource) -> None:
    double.add_peer("100.64.0.8")
    assert await source.identify(peer("100.64.0.8")) is not None
    double.remove_peer("100.64.0.8")
    with pytest.raises(IdentityUnavailable) as info:
        await source.identify(peer("100.64.0.8"))
    assert info.value.reason == "tailscale whois: no such peer 100.64.0.8:4567 (404)"
    assert info.value.sqlstate == "28000" and info.value.kind == "identity_unavailable"


async def test_unreachable_socket_fails_closed() -> None:
    with short_socket_dir() as d:
        path = os.path.join(d, "gone.sock")
        source = TailscaleSource(LocalAPIClient(path), CAP)
        with pytest.raises(IdentityUnavailable) as info:
            await source.identify(peer("100.64.0.1"))
    assert (
        info.value.reason == f"tailscale whois: tailscaled unreachable at {path}: No such file or directory"
    )


async def test_slow_answer_fails_closed(double: LocalAPIDouble, client: LocalAPIClient) -> None:
    double.add_peer("100.64.0.9")
    double.delays["whois"] = 3.0
    source = TailscaleSource(client, CAP, timeout=0.2)
    with pytest.raises(IdentityUnavailable) as info:
        await source.identify(peer("100.64.0.9"))
    assert info.value.reason == (
        f"tailscale whois: no answer from tailscaled at {double.socket_path} within 0.2s for 100.64.0.9:4567"
    )


async def test_garbage_fails_closed(double: LocalAPIDouble, source: TailscaleSource) -> None:
    double.fail("whois", raw=b"garbage\x00\r\n\r\n", times=1)
    with pytest.raises(
        IdentityUnavailable, match=r"^tailscale whois: bad answer from tailscaled for 100\.64"
    ):
        await source.identify(peer("100.64.0.10"))
    double.fail("whois", status=200, body=b"[1, 2", content_type="application/json", times=1)
    with pytest.raises(IdentityUnavailable, match="not JSON"):
        await source.identify(peer("100.64.0.10"))
    double.fail("whois", status=200, body=b'{"Node": {"Tags": "tag:x"}}', content_type="application/json")
    with pytest.raises(IdentityUnavailable, match=r"Node\.Tags: expected array"):
        await source.identify(peer("100.64.0.10"))


async def test_missing_user_profile_fails_closed(double: LocalAPIDouble, source: TailscaleSource) -> None:
    double.add_peer("100.64.0.11", with_profile=False)
    with pytest.raises(IdentityUnavailable) as info:
        await source.identify(peer("100.64.0.11"))
    assert info.value.reason == "tailscale whois: 100.64.0.11:4567 has no user profile in the WhoIs answer"


async def test_tagged_profile_without_tags_fails_closed(
    double: LocalAPIDouble, source: TailscaleSource
) -> None:
    p = double.add_peer("100.64.0.12", tags=("tag:x",))
    del p.node["Tags"]
    with pytest.raises(IdentityUnavailable, match="tagged device without tags"):
        await source.identify(peer("100.64.0.12"))


async def test_forbidden_fails_closed() -> None:
    async with LocalAPIDouble.running(permit_read=False) as d:
        source = TailscaleSource(LocalAPIClient(d.socket_path), CAP)
        with pytest.raises(IdentityUnavailable) as info:
            await source.identify(peer("100.64.0.1"))
    assert info.value.reason == (
        "tailscale whois: tailscaled refused access (403) for 100.64.0.1:4567: whois access denied"
    )


async def test_server_error_fails_closed(double: LocalAPIDouble, source: TailscaleSource) -> None:
    double.fail("whois", status=500, body=b"server has no local backend\n")
    with pytest.raises(IdentityUnavailable) as info:
        await source.identify(peer("100.64.0.1"))
    assert info.value.reason == (
        "tailscale whois: tailscaled answered 500 for 100.64.0.1:4567: server has no local backend"
    )
