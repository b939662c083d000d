"""Access: identification with and without waiting; repeated decisions are remembered per policy
generation, never across one."""

import ipaddress
import time
from typing import Any

import pytest

from ferryman.errors import AccessDenied, IdentityUnavailable
from ferryman.identity.base import Identity, IdentitySource, PeerInfo
from ferryman.identity.static import StaticEntry, StaticSource
from ferryman.policy.engine import authorize
from ferryman.policy.parse import parse_policy
from ferryman.proxy.access import Access, AccessGeneration

CAP = "ferryman.dev/cap/ferryman"
ALICE = Identity(user="alice@example.com", source="static", groups=("dba",))


def generation(*grants: dict[str, Any], sources: dict[str, IdentitySource] | None = None) -> AccessGeneration:
    policy = parse_policy({"grants": list(grants)}, capability=CAP)
    return AccessGeneration(policy, sources or {}, CAP)


def grant(src: list[str], backends: dict[str, Any]) -> dict[str, Any]:
    return {"src": src, "app": {CAP: [{"backends": backends}]}}


def peer(host: str = "10.0.0.5") -> PeerInfo:
    return PeerInfo(
        remote_host=host, remote_port=40000, local_host="127.0.0.1", local_port=5432, listener="db"
    )


def test_repeat_decisions_match_the_engine() -> None:
    gen = generation(grant(["group:dba"], {"db": {"limits": {"max_conns": 3}}}))
    access = Access(gen)
    first = access.authorize(ALICE, peer(), "db")
    assert first == authorize(ALICE, peer().remote_ip, "db", gen.policy)
    assert access.authorize(ALICE, peer(), "db") == first
    assert first.connection_limits.max_conns == 3


def test_a_reload_is_never_answered_from_the_old_policy() -> None:
    access = Access(generation(grant(["group:dba"], {"db": {}})))
    access.authorize(ALICE, peer(), "db")
    access.generation = generation(grant(["bob@example.com"], {"db": {}}))
    with pytest.raises(AccessDenied, match="no grant for listener 'db'"):
        access.authorize(ALICE, peer(), "db")
    access.generation = generation(grant(["group:dba"], {"db": {"limits": {"max_conns": 7}}}))
    assert access.authorize(ALICE, peer(), "db").connection_limits.max_conns == 7


def test_denials_repeat_with_their_reason() -> None:
    access = Access(generation(grant(["bob@example.com"], {"db": {}})))
    for _ in range(2):
        with pytest.raises(AccessDenied) as info:
            access.authorize(ALICE, peer(), "db")
        assert info.value.reason == "no grant for listener 'db'"
        assert info.value.client_message == "no grant for this service"


def test_address_groups_and_listener_are_part_of_the_decision() -> None:
    access = Access(generation(grant(["10.0.0.0/8"], {"db": {}})))
    assert access.authorize(ALICE, peer("10.0.0.5"), "db").listener == "db"
    with pytest.raises(AccessDenied):
        access.authorize(ALICE, peer("192.0.2.9"), "db")  # same person, another address
    with pytest.raises(AccessDenied):
        access.authorize(ALICE, peer("10.0.0.5"), "other")
    access = Access(generation(grant(["group:dba"], {"db": {}})))
    assert access.authorize(ALICE, peer("192.0.2.9"), "db")
    outsider = Identity(user="alice@example.com", source="static", groups=("dev",))
    with pytest.raises(AccessDenied):
        access.authorize(outsider, peer("192.0.2.9"), "db")  # same login, other groups


def test_carried_grants_are_decided_afresh() -> None:
    access = Access(generation())
    carried = Identity(
        user="ci@example.com",
        source="tailscale",
        grants=({"backends": {"db": {"limits": {"max_conns": 2}}}},),
    )
    assert access.authorize(carried, peer(), "db").connection_limits.max_conns == 2
    other = Identity(
        user="ci@example.com",
        source="tailscale",
        grants=({"backends": {"db": {"limits": {"max_conns": 5}}}},),
    )
    assert access.authorize(other, peer(), "db").connection_limits.max_conns == 5


class AwaitedSource:
    """A source that can only answer asynchronously (as tailscale's WhoIs does): no ``lookup``."""

    name = "awaited"

    def __init__(self, identity: Identity | None) -> None:
        self.identity = identity
        self.asked = 0

    async def identify(self, peer: PeerInfo) -> Identity | None:
        self.asked += 1
        return self.identity

    async def aclose(self) -> None:
        return None


def static(cidr: str, identity: Identity) -> StaticSource:
    return StaticSource([StaticEntry(ipaddress.ip_network(cidr), identity)])


async def test_identify_now_answers_what_identify_answers_when_no_source_waits() -> None:
    bob = Identity(user="bob@example.com", source="static")
    sources: dict[str, IdentitySource] = {
        "lan": static("10.0.0.0/8", ALICE),
        "vpn": static("192.0.2.0/24", bob),
    }
    access = Access(generation(sources=sources))
    for host, expected in (("10.0.0.5", ALICE), ("192.0.2.9", bob)):
        assert access.identify_now(peer(host), ["lan", "vpn"]) == expected
        assert await access.identify(peer(host), ["lan", "vpn"]) == expected
    with pytest.raises(AccessDenied) as now:
        access.identify_now(peer("198.51.100.1"), ["lan", "vpn"])
    with pytest.raises(AccessDenied) as awaited:
        await access.identify(peer("198.51.100.1"), ["lan", "vpn"])
    assert now.value.reason == awaited.value.reason
    assert "none of lan, vpn recognised 198.51.100.1:40000" in now.value.reason


async def test_identify_now_defers_to_identify_when_a_source_it_must_ask_waits() -> None:
    waiting = AwaitedSource(Identity(user="carol@example.com", source="awaited"))
    access = Access(generation(sources={"lan": static("10.0.0.0/8", ALICE), "ts": waiting}))
    assert access.identify_now(peer("10.0.0.5"), ["lan", "ts"]) == ALICE  # answered before "ts"
    assert access.identify_now(peer("192.0.2.9"), ["lan", "ts"]) is None  # "ts" would have to wait
    assert access.identify_now(peer("10.0.0.5"), ["ts", "lan"]) is None
    assert waiting.asked == 0
    assert (await access.identify(peer("192.0.2.9"), ["lan", "ts"])).user == "carol@example.com"


def test_identify_now_refuses_an_expired_identity() -> None:
    expired = Identity(user="alice@example.com", source="static", expires_at=time.time() - 1)
    access = Access(generation(sources={"lan": static("10.0.0.0/8", expired)}))
    with pytest.raises(IdentityUnavailable, match="lan: identity expired"):
        access.identify_now(peer("10.0.0.5"), ["lan"])
