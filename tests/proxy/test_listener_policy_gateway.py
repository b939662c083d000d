"""A listener's ``policy`` (Pomerium Policy Language) on top of its grants: in
:class:`~ferryman.proxy.access.Access` (never served from the decision memo, time on an
injected clock), and end to end through a running gateway -- refusals audited with their
reason, deny winning over allow, 28000 in PostgreSQL mode, and a reload or the clock closing a
live connection at revalidation (``revoked``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from ferryman.errors import AccessDenied
from ferryman.identity.base import Identity, PeerInfo
from ferryman.policy.parse import parse_policy
from ferryman.policy.ppl import ListenerPolicy
from ferryman.policy.pplparse import parse_listener_policy
from ferryman.proxy.access import POLICY_CLIENT_MESSAGE, Access, AccessGeneration
from tests.support.gateway import (
    CAP,
    EchoServer,
    GatewayFiles,
    free_port,
    grant,
    read_until_closed,
    refused,
    roundtrip,
    running_gateway,
    wait_for,
)

ALICE = Identity(user="alice@example.com", source="static", groups=("dba",))
BOB = Identity(user="bob@example.com", source="static", groups=("dev",))
MONDAY = datetime(2024, 6, 3, tzinfo=UTC).timestamp()
"""Midnight UTC at the start of Monday 2024-06-03."""
OFFICE_HOURS = {"allow": {"and": [{"time_of_day": {"timezone": "UTC", "after": "09:00", "before": "17:00"}}]}}


class Settings:
    """A listener's configuration as Access reads it."""

    def __init__(self, policy: Any) -> None:
        self.policy: ListenerPolicy | None = parse_listener_policy(policy)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def peer(host: str = "10.0.0.5") -> PeerInfo:
    return PeerInfo(remote_host=host, remote_port=40000, listener="db")


def access_with(policy: Any, clock: Clock | None = None) -> tuple[Access, dict[str, Settings]]:
    grants = [{"src": ["*"], "app": {CAP: [{"backends": {"db": {}, "other": {}}}]}}]
    listeners = {"db": Settings(policy)}
    generation = AccessGeneration(parse_policy({"grants": grants}, capability=CAP), {}, CAP)
    return Access(generation, listeners=listeners, clock=clock or Clock(MONDAY)), listeners


# -- Access ------------------------------------------------------------------------------------


def test_the_listener_policy_applies_after_the_grants() -> None:
    access, _ = access_with({"allow": {"or": [{"groups": {"has": "dba"}}]}})
    assert access.authorize(ALICE, peer(), "db").listener == "db"
    with pytest.raises(AccessDenied) as info:
        access.authorize(BOB, peer(), "db")
    assert info.value.reason == "listener policy: no allow rule matched"
    assert info.value.client_message == POLICY_CLIENT_MESSAGE
    assert (info.value.sqlstate, info.value.kind) == ("28000", "denied")
    assert access.authorize(BOB, peer(), "other").listener == "other"  # no policy there


def test_no_grant_is_refused_for_that_reason_first() -> None:
    access, _ = access_with({"allow": {"or": [{"accept": True}]}})
    with pytest.raises(AccessDenied, match="no grant for listener 'nowhere'"):
        access.authorize(ALICE, peer(), "nowhere")


def test_a_remembered_grant_never_skips_the_policy() -> None:
    """The grant decision is memoised per identity and address; the policy is evaluated every
    time, so the same caller is refused once the clock leaves the window (and the next
    revalidation closes the session)."""
    clock = Clock(MONDAY + 10 * 3600)
    access, _ = access_with(OFFICE_HOURS, clock)
    first = access.authorize(ALICE, peer(), "db")
    assert access.generation.decisions  # the grant decision is remembered
    clock.now = MONDAY + 18 * 3600
    with pytest.raises(AccessDenied, match="listener policy: no allow rule matched"):
        access.authorize(ALICE, peer(), "db")
    clock.now = MONDAY + 16 * 3600
    assert access.authorize(ALICE, peer(), "db") is first


def test_the_policy_sees_the_client_address_and_claims() -> None:
    access, _ = access_with(
        [
            {"allow": {"or": [{"claim/department": "eng"}, {"source_ip": "10.0.0.0/8"}]}},
            {"deny": {"and": [{"source_ip": "10.9.0.0/16"}]}},
        ]
    )
    engineer = Identity(user="carol@example.com", source="mtls", claims={"department": "eng"})
    assert access.authorize(engineer, peer("192.0.2.1"), "db").listener == "db"
    assert access.authorize(BOB, peer("10.1.0.1"), "db").listener == "db"
    with pytest.raises(AccessDenied, match="no allow rule matched"):
        access.authorize(BOB, peer("192.0.2.1"), "db")
    with pytest.raises(AccessDenied, match=r"denied by rule 2 \(source_ip\)"):
        access.authorize(engineer, peer("10.9.1.1"), "db")


def test_identities_with_carried_grants_meet_the_policy_too() -> None:
    """A Tailscale identity brings its own grants (decided afresh, not from the memo): the
    listener policy applies to it all the same."""
    access, _ = access_with({"allow": {"or": [{"tag": "ci"}]}})
    carried = ({"backends": {"db": {}}},)
    device = Identity(user="tag:ci", source="tailscale", tags=("tag:ci",), grants=carried)
    person = Identity(user="eve@example.com", source="tailscale", grants=carried)
    assert access.authorize(device, peer(), "db").origins[0] == "tailscale capability[0]"
    with pytest.raises(AccessDenied, match="listener policy: no allow rule matched"):
        access.authorize(person, peer(), "db")


def test_a_changed_listener_policy_applies_to_the_next_decision() -> None:
    access, listeners = access_with({"allow": {"or": [{"groups": "dba"}]}})
    assert access.authorize(ALICE, peer(), "db").listener == "db"
    listeners["db"] = Settings({"allow": {"or": [{"groups": "dev"}]}})
    with pytest.raises(AccessDenied):
        access.authorize(ALICE, peer(), "db")
    listeners["db"] = Settings(None)
    assert access.authorize(ALICE, peer(), "db").listener == "db"


# -- end to end --------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> GatewayFiles:
    files = GatewayFiles(tmp_path)
    # 127.0.0.1 stays dev@localhost (groups dev); 127.0.0.2 is alice, a dba.
    files.static.append({"cidr": "127.0.0.2/32", "user": "alice@example.com", "groups": ["dba"]})
    files.grants.append(grant({"db": {}}))
    return files


async def connect_from(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(host, 0))


@contextlib.asynccontextmanager
async def opened(
    port: int, host: str = "127.0.0.1"
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A client connection from ``host``, closed however the test ends."""
    reader, writer = await connect_from(host, port)
    try:
        yield reader, writer
    finally:
        writer.close()


async def echo_from(host: str, port: int, payload: bytes = b"ping") -> bytes:
    reader, writer = await connect_from(host, port)
    try:
        writer.write(payload)
        async with asyncio.timeout(5):
            return await reader.readexactly(len(payload))
    finally:
        writer.close()


def decisions(files: GatewayFiles) -> list[dict[str, Any]]:
    return [r for r in files.audit() if r["event"] == "decision"]


async def test_a_group_policy_admits_members_and_refuses_others_with_a_reason(files: GatewayFiles) -> None:
    async with EchoServer() as echo:
        port = files.add_listener("db", echo.address, policy={"allow": {"or": [{"groups": {"has": "dba"}}]}})
        async with running_gateway(files):
            assert await echo_from("127.0.0.2", port) == b"ping"
            assert await refused(port)  # dev@localhost from 127.0.0.1: granted, but not a dba
            await wait_for(lambda: len(decisions(files)) == 2)
    admitted, refusal = decisions(files)
    assert (admitted["allowed"], admitted["user"]) == (True, "alice@example.com")
    assert refusal["allowed"] is False
    assert refusal["user"] == "dev@localhost"
    assert refusal["outcome"] == "denied"
    assert refusal["reason"] == "listener policy: no allow rule matched"
    assert echo.connections == 1  # the refused client never reached the backend


async def test_deny_wins_over_allow(files: GatewayFiles) -> None:
    policy = [
        {"allow": {"or": [{"email": {"ends_with": "@localhost"}}, {"groups": {"has": "dba"}}]}},
        {"deny": {"and": [{"source_ip": "127.0.0.1"}]}},
    ]
    async with EchoServer() as echo:
        port = files.add_listener("db", echo.address, policy=policy)
        async with running_gateway(files):
            assert await refused(port)  # allowed by rule 1, denied by rule 2
            assert await echo_from("127.0.0.2", port) == b"ping"
            await wait_for(lambda: len(decisions(files)) == 2)
    refusal, admitted = decisions(files)
    assert refusal["reason"] == "listener policy: denied by rule 2 (source_ip)"
    assert (refusal["user"], refusal["outcome"]) == ("dev@localhost", "denied")
    assert admitted["allowed"] is True


async def test_a_listener_without_policy_is_unaffected(files: GatewayFiles) -> None:
    async with EchoServer() as echo:
        guarded = files.add_listener("db", echo.address, policy={"allow": {"or": [{"reject": True}]}})
        files.grants.append(grant({"open": {}}))
        open_port = files.add_listener("open", echo.address)
        async with running_gateway(files):
            assert await roundtrip(open_port) == b"ping"
            assert await refused(guarded)


async def test_a_reloaded_policy_closes_a_live_connection_at_revalidation(files: GatewayFiles) -> None:
    files.revalidation = "200ms"
    async with EchoServer() as echo:
        port = files.add_listener(
            "db", echo.address, policy={"allow": {"or": [{"groups": "dev"}, {"groups": "dba"}]}}
        )
        async with running_gateway(files) as gateway, opened(port) as (reader, writer):
            writer.write(b"hello")
            assert await reader.readexactly(5) == b"hello"
            async with opened(port, "127.0.0.2") as (alice_reader, alice_writer):  # keeps hers
                alice_writer.write(b"hi")
                assert await alice_reader.readexactly(2) == b"hi"
                files.listeners[0]["policy"]["deny"] = {"or": [{"email": "dev@localhost"}]}
                files.write()
                assert await gateway.reload()
                assert await read_until_closed(reader) == b""
                assert await refused(port)
                alice_writer.write(b"still here")
                assert await alice_reader.readexactly(10) == b"still here"
            await wait_for(lambda: len(files.closes()) == 2)
    revoked, normal = sorted(files.closes(), key=lambda c: c["reason"] != "revoked")
    assert (revoked["reason"], revoked["closed_by"], revoked["user"]) == (
        "revoked",
        "gateway",
        "dev@localhost",
    )
    assert revoked["detail"] == "listener policy: denied by rule 2 (email)"
    assert (normal["reason"], normal["user"]) == ("normal", "alice@example.com")


async def test_revalidation_closes_a_connection_whose_time_window_ended(files: GatewayFiles) -> None:
    """The gateway's clock is the one seam: set to office hours, then past them."""
    files.revalidation = "1h"  # revalidated by hand below
    async with EchoServer() as echo:
        port = files.add_listener("db", echo.address, policy=OFFICE_HOURS)
        async with running_gateway(files) as gateway:
            clock = Clock(MONDAY + 16 * 3600 + 59 * 60)
            gateway.runtime.access.clock = clock
            async with opened(port) as (reader, writer):
                writer.write(b"late")
                assert await reader.readexactly(4) == b"late"
                await gateway.revalidate()
                writer.write(b"still")
                assert await reader.readexactly(5) == b"still"
                clock.now = MONDAY + 17 * 3600
                await gateway.revalidate()
                assert await read_until_closed(reader) == b""
            assert await refused(port)
            await wait_for(files.closes)
    (close,) = files.closes()
    assert (close["reason"], close["detail"]) == ("revoked", "listener policy: no allow rule matched")


async def test_postgres_listener_refuses_with_28000(files: GatewayFiles) -> None:
    """Refused before the backend is contacted: no database is needed behind the listener."""
    port = files.add_listener(
        "db",
        f"127.0.0.1:{free_port()}",
        mode="postgres",
        postgres={"admin_user": "postgres"},
        policy={"allow": {"or": [{"groups": "dba"}]}},
    )
    async with running_gateway(files):
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncpg.connect(host="127.0.0.1", port=port, user="x", database="appdb", ssl=False)
        await wait_for(lambda: decisions(files))
    assert info.value.sqlstate == "28000"
    assert POLICY_CLIENT_MESSAGE in str(info.value)
    (refusal,) = decisions(files)
    assert (refusal["mode"], refusal["outcome"]) == ("postgres", "denied")
    assert refusal["reason"] == "listener policy: no allow rule matched"
