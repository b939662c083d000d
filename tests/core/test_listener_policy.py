"""Listener policies in Pomerium Policy Language: every criterion and operator, rule semantics
(deny wins), time criteria on an injected ``now``, parse errors with their key path, and
configuration errors naming file, line and key (SPEC §3, last bullet)."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, time
from typing import Any

import pytest

from ferryman.config.load import load_config_text
from ferryman.errors import ConfigError
from ferryman.identity.base import Identity
from ferryman.policy.ppl import ListenerPolicy
from ferryman.policy.pplparse import PolicyError, parse_listener_policy

MONDAY_10_UTC = datetime(2024, 6, 3, 10, 0, tzinfo=UTC).timestamp()
"""2024-06-03 was a Monday."""
ALICE = Identity(
    user="Alice@Example.com",
    source="static",
    groups=("dba", "group:ops"),
    tags=("tag:prod",),
    claims={
        "department": "eng",
        "level": 3,
        "verified": True,
        "roles": ["reader", "writer"],
        "san": {"email": ["alice@example.com"], "uri": []},
        "https://idp.example.com/team": "blue",
        "nothing": None,
    },
)
BOB = Identity(user="bob@other.org", source="static", groups=("dev",))
CI = Identity(user="tag:ci", source="tailscale", tags=("tag:ci",))
HOME = ipaddress.ip_address("10.1.2.3")


def compile_(value: Any) -> ListenerPolicy:
    policy = parse_listener_policy(value)
    assert policy is not None
    return policy


def admits(
    criterion: dict[str, Any], who: Identity = ALICE, ip: str | None = "10.1.2.3", now: float = MONDAY_10_UTC
) -> bool:
    """Whether ``allow = { and = [ criterion ] }`` admits."""
    policy = compile_({"allow": {"and": [criterion]}})
    address = ipaddress.ip_address(ip) if ip is not None else None
    return policy.evaluate(who, address, now).allowed


def at(day: int, hour: int, minute: int = 0, second: float = 0.0) -> float:
    """Unix time of 2024-06-(day) hour:minute UTC (the 3rd is a Monday, the 9th a Sunday)."""
    return datetime(2024, 6, day, hour, minute, tzinfo=UTC).timestamp() + second


# -- rules and operators ----------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, [], {}])
def test_an_empty_or_absent_policy_is_no_condition(value: Any) -> None:
    assert parse_listener_policy(value) is None


def test_allow_needs_a_matching_allow_rule() -> None:
    policy = compile_([{"allow": {"or": [{"groups": {"has": "dba"}}]}}])
    assert policy.evaluate(ALICE, HOME, MONDAY_10_UTC).allowed
    refused = policy.evaluate(BOB, HOME, MONDAY_10_UTC)
    assert not refused.allowed
    assert refused.reason == "listener policy: no allow rule matched"


def test_deny_always_wins_and_names_its_rule_and_criteria() -> None:
    policy = compile_(
        [
            {"allow": {"or": [{"email": {"is": "alice@example.com"}}, {"groups": {"has": "dba"}}]}},
            {"deny": {"and": [{"day_of_week": "mon-fri"}, {"source_ip": "10.0.0.0/8"}]}},
        ]
    )
    decision = policy.evaluate(ALICE, HOME, MONDAY_10_UTC)
    assert not decision.allowed
    assert decision.reason == "listener policy: denied by rule 2 (day_of_week, source_ip)"
    assert (decision.rule, decision.criteria) == (2, ("day_of_week", "source_ip"))
    assert policy.evaluate(ALICE, ipaddress.ip_address("192.0.2.1"), MONDAY_10_UTC).allowed
    assert policy.evaluate(ALICE, HOME, at(8, 10)).allowed  # Saturday


def test_a_deny_that_matches_wins_even_when_nothing_is_allowed() -> None:
    policy = compile_([{"allow": {"and": [{"reject": True}]}}, {"deny": {"or": [{"accept": True}]}}])
    assert policy.evaluate(ALICE, HOME, MONDAY_10_UTC).reason == "listener policy: denied by rule 2 (accept)"


def test_a_policy_with_only_deny_rules_admits_nobody() -> None:
    """Pomerium: access needs at least one matching allow rule."""
    policy = compile_({"deny": {"or": [{"email": "bob@other.org"}]}})
    assert policy.evaluate(ALICE, HOME, MONDAY_10_UTC).reason == (
        "listener policy: no allow rule matched (the policy has only deny rules)"
    )
    assert policy.evaluate(BOB, HOME, MONDAY_10_UTC).reason == "listener policy: denied by rule 1 (email)"


def test_single_table_and_array_forms_mean_the_same() -> None:
    table = compile_({"allow": {"or": [{"groups": "dba"}]}, "deny": {"or": [{"source_ip": "192.0.2.0/24"}]}})
    array = compile_(
        [{"allow": {"or": [{"groups": "dba"}]}}, {"deny": {"or": [{"source_ip": "192.0.2.0/24"}]}}]
    )
    assert table == array and hash(table) == hash(array)
    assert [(r.number, r.action) for r in table.rules] == [(1, "allow"), (2, "deny")]
    outside = ipaddress.ip_address("192.0.2.7")
    for policy in (table, array):
        assert policy.evaluate(ALICE, HOME, MONDAY_10_UTC).allowed
        assert policy.evaluate(ALICE, outside, MONDAY_10_UTC).reason == (
            "listener policy: denied by rule 2 (source_ip)"
        )


def test_rules_are_numbered_in_the_order_written() -> None:
    policy = compile_(
        [
            {"allow": {"or": [{"accept": True}]}, "deny": {"or": [{"user": "x@y"}]}},
            {"deny": {"or": [{"groups": "dev"}]}},
        ]
    )
    assert [(r.number, r.action) for r in policy.rules] == [(1, "allow"), (2, "deny"), (3, "deny")]
    assert policy.evaluate(BOB, HOME, MONDAY_10_UTC).reason == "listener policy: denied by rule 3 (groups)"


T, F = {"accept": True}, {"reject": True}


@pytest.mark.parametrize(
    ("op", "expected"),
    [
        # (A, B) = (T, T), (T, F), (F, T), (F, F)
        ("and", (True, False, False, False)),
        ("or", (True, True, True, False)),
        ("not", (False, False, False, True)),  # none of them: not A and not B
        ("nor", (False, True, True, True)),  # not all of them: not A or not B
    ],
)
def test_operator_truth_tables(op: str, expected: tuple[bool, ...]) -> None:
    got = tuple(
        compile_({"allow": {op: [a, b]}}).evaluate(ALICE, HOME, MONDAY_10_UTC).allowed
        for a, b in ((T, T), (T, F), (F, T), (F, F))
    )
    assert got == expected


def test_several_operators_in_one_rule_match_when_any_does() -> None:
    """Pomerium's documented example: `and` on a claim, `or` on domains, in one allow rule."""
    policy = compile_(
        {
            "allow": {
                "and": [{"claim/department": "sales"}],
                "or": [{"domain": "example.com"}, {"domain": "x.org"}],
            }
        }
    )
    assert policy.evaluate(ALICE, HOME, MONDAY_10_UTC).allowed  # by domain
    assert not policy.evaluate(BOB, HOME, MONDAY_10_UTC).allowed
    sales = Identity(user="carol@elsewhere.net", source="mtls", claims={"department": "sales"})
    assert policy.evaluate(sales, HOME, MONDAY_10_UTC).allowed  # by claim


def test_operators_nest() -> None:
    policy = compile_(
        {
            "allow": {
                "and": [
                    {"or": [{"groups": "dba"}, {"tag": "ci"}]},
                    {"not": [{"and": [{"source_ip": "192.0.2.0/24"}, {"day_of_week": "sat-sun"}]}]},
                    {"nor": [{"reject": True}, {"accept": True}]},
                ]
            }
        }
    )
    outside, weekend = ipaddress.ip_address("192.0.2.9"), at(8, 12)
    assert policy.evaluate(ALICE, HOME, MONDAY_10_UTC).allowed
    assert policy.evaluate(CI, outside, MONDAY_10_UTC).allowed  # outside, but not at the weekend
    assert not policy.evaluate(CI, outside, weekend).allowed
    assert policy.evaluate(CI, HOME, weekend).allowed
    assert not policy.evaluate(BOB, HOME, MONDAY_10_UTC).allowed


@pytest.mark.parametrize(
    ("deny", "criteria"),
    [
        (
            {"or": [{"groups": "nope"}, {"email": {"ends_with": "@example.com"}}, {"accept": True}]},
            ("email",),
        ),
        ({"and": [{"groups": "dba"}, {"tag": "prod"}]}, ("groups", "tag")),
        ({"not": [{"groups": "nope"}, {"reject": True}]}, ("groups", "reject")),
        ({"nor": [{"groups": "dba"}, {"tag": "nope"}, {"reject": True}]}, ("tag",)),
        (
            {"and": [{"or": [{"reject": True}, {"claim/level": 3}]}, {"not": [{"tag": "x"}]}]},
            ("claim/level", "tag"),
        ),
    ],
)
def test_the_reason_names_the_criteria_that_made_the_deny_rule_match(
    deny: dict[str, Any], criteria: tuple[str, ...]
) -> None:
    decision = compile_([{"allow": {"or": [T]}}, {"deny": deny}]).evaluate(ALICE, HOME, MONDAY_10_UTC)
    assert decision.criteria == criteria
    assert decision.reason == f"listener policy: denied by rule 2 ({', '.join(criteria)})"


def test_compiled_policies_are_values() -> None:
    source = {
        "allow": {
            "or": [{"source_ip": ["10.0.0.0/8"]}, {"time_of_day": {"timezone": "UTC", "after": "9:00"}}]
        }
    }
    first, second = compile_(source), compile_(source)
    assert first == second and hash(first) == hash(second)
    assert first.source is source
    assert first != compile_({"allow": {"or": [{"source_ip": ["10.0.0.0/9"]}]}})
    assert compile_(one({"claim/x": True})) != compile_(one({"claim/x": 1}))  # as JSON compares


# -- criteria -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["email", "user"])
@pytest.mark.parametrize(
    ("matcher", "expected"),
    [
        ("alice@example.com", True),  # a bare string is `is`
        ({"is": "ALICE@example.COM"}, True),  # logins compare case-insensitively
        ({"is": "bob@other.org"}, False),
        ({"not": "bob@other.org"}, True),
        ({"not": "alice@example.com"}, False),
        ({"contains": "ice@ex"}, True),
        ({"contains": "bob"}, False),
        ({"starts_with": "alice@"}, True),
        ({"starts_with": "admin@"}, False),
        ({"ends_with": "@example.com"}, True),
        ({"ends_with": "@example.org"}, False),
        ({"in": ["bob@other.org", "alice@example.com"]}, True),
        ({"in": ["bob@other.org"]}, False),
        ({"not_in": ["bob@other.org"]}, True),
        ({"not_in": ["Alice@example.com"]}, False),
        ({"starts_with": "alice", "ends_with": ".com", "not": "alice@example.org"}, True),  # all hold
        ({"starts_with": "alice", "ends_with": ".org"}, False),
    ],
)
def test_email_and_user_match_the_login(name: str, matcher: Any, expected: bool) -> None:
    assert admits({name: matcher}) is expected


@pytest.mark.parametrize(
    ("matcher", "who", "expected"),
    [
        ("example.com", ALICE, True),
        ({"is": "EXAMPLE.com"}, ALICE, True),
        ({"ends_with": ".org"}, BOB, True),
        ({"in": ["example.com", "other.org"]}, BOB, True),
        ({"not": "example.com"}, BOB, True),
        ({"not": "example.com"}, ALICE, False),
        ("example.com", Identity(user="x@y@example.com", source="static"), True),  # after the last @
        # A login without a domain matches no domain criterion, negated ones included (Pomerium).
        ({"not": "example.com"}, CI, False),
        ({"not_in": ["example.com"]}, CI, False),
    ],
)
def test_domain_matches_the_part_after_the_at(matcher: Any, who: Identity, expected: bool) -> None:
    assert admits({"domain": matcher}, who) is expected


@pytest.mark.parametrize(
    ("matcher", "expected"),
    [
        ("dba", True),  # a bare value is `has`
        ({"has": "ops"}, True),  # the identity's "group:ops": the prefix is optional on either side
        ({"has": "group:dba"}, True),
        ({"has": "dev"}, False),
        ({"is": "dba"}, False),  # `is`: the only group
        ({"exclude": "dev"}, True),
        ({"exclude": "ops"}, False),
        ({"has": "dba", "exclude": "dev"}, True),
    ],
)
def test_groups(matcher: Any, expected: bool) -> None:
    assert admits({"groups": matcher}) is expected


def test_groups_is_means_the_only_group() -> None:
    assert admits({"groups": {"is": "dev"}}, BOB)
    assert not admits({"groups": {"is": "dev"}}, ALICE)
    assert not admits({"groups": "dba"}, CI)  # no groups at all


@pytest.mark.parametrize(
    ("matcher", "who", "expected"),
    [
        ("prod", ALICE, True),
        ("tag:prod", ALICE, True),
        ({"has": "ci"}, CI, True),
        ({"is": "tag:ci"}, CI, True),
        ({"exclude": "ci"}, CI, False),
        ({"exclude": "ci"}, BOB, True),
        ("prod", BOB, False),
    ],
)
def test_tag(matcher: Any, who: Identity, expected: bool) -> None:
    assert admits({"tag": matcher}, who) is expected


@pytest.mark.parametrize(
    ("criterion", "expected"),
    [
        ({"claim/department": "eng"}, True),
        ({"claim/department": {"is": "eng"}}, True),
        ({"claim/department": "Eng"}, False),  # claims compare exactly
        ({"claim/level": 3}, True),
        ({"claim/level": 3.0}, True),
        ({"claim/level": "3"}, False),  # JSON equality: a string is not a number
        ({"claim/verified": True}, True),
        ({"claim/verified": 1}, False),  # nor is a number a boolean
        ({"claim/roles": {"has": "writer"}}, True),
        ({"claim/roles": {"is": "writer"}}, False),  # two values
        ({"claim/roles": {"exclude": "admin"}}, True),
        ({"claim/roles": {"exclude": "reader"}}, False),
        ({"claim/san/email": "alice@example.com"}, True),  # nested, with /
        ({"claim/san.email": {"is": "alice@example.com"}}, True),  # nested, with .
        ({"claim/san/uri": {"exclude": "x"}}, True),
        ({"claim/san": "x"}, False),  # a table has no values to compare
        ({"claim/https://idp.example.com/team": "blue"}, True),  # the whole name first
        ({"claim/missing": "x"}, False),
        ({"claim/missing": {"exclude": "x"}}, True),  # a missing claim is an empty list
        ({"claim/nothing": {"has": "x"}}, False),
    ],
)
def test_claims(criterion: dict[str, Any], expected: bool) -> None:
    assert admits(criterion) is expected


def test_an_identity_without_claims_matches_no_claim() -> None:
    """Static identities carry no claims: `has` never matches, so an allow rule on a claim
    fails closed for them."""
    assert not admits({"claim/department": "eng"}, BOB)
    assert not admits({"claim/department": {"is": "eng"}}, BOB)


@pytest.mark.parametrize(
    ("data", "ip", "expected"),
    [
        ("10.1.2.3", "10.1.2.3", True),
        ("10.1.2.3", "10.1.2.4", False),
        ("10.1.2.99/24", "10.1.2.200", True),  # host bits allowed, as in Pomerium
        ("10.0.0.0/8", "11.0.0.1", False),
        (["192.0.2.0/24", "10.0.0.0/8"], "10.200.0.1", True),
        (["192.0.2.0/24", "198.51.100.7"], "198.51.100.8", False),
        ("2001:db8::/32", "2001:db8:1::5", True),
        ("2001:db8::1", "2001:db8::2", False),
        ("10.0.0.0/8", "::ffff:10.9.8.7", True),  # IPv4-mapped: dual-stack listeners
        ("::/0", "10.0.0.1", False),  # families do not mix
        ("10.0.0.0/8", None, False),  # no usable client address
    ],
)
def test_source_ip(data: Any, ip: str | None, expected: bool) -> None:
    assert admits({"source_ip": data}, ip=ip) is expected


@pytest.mark.parametrize(
    ("criterion", "expected"),
    [({"accept": True}, True), ({"reject": True}, False), ({"authenticated_user": True}, True)],
)
def test_constants(criterion: dict[str, Any], expected: bool) -> None:
    assert admits(criterion) is expected


@pytest.mark.parametrize(
    ("spec", "open_days"),
    [
        ("mon-fri", {3, 4, 5, 6, 7}),
        ("sat,sun", {8, 9}),
        ("Saturday, SUNDAY", {8, 9}),
        ("*", {3, 4, 5, 6, 7, 8, 9}),
        ("fri-mon", {3, 7, 8, 9}),  # ranges wrap over the weekend
        ("mon-wed,fri", {3, 4, 5, 7}),
        (["tue", "thu-thursday"], {4, 6}),
        ("wed-wed", {5}),
    ],
)
def test_day_of_week(spec: Any, open_days: set[int]) -> None:
    """June 2024: the 3rd is a Monday, the 9th a Sunday; evaluated at noon UTC."""
    got = {day for day in range(3, 10) if admits({"day_of_week": spec}, now=at(day, 12))}
    assert got == open_days


def test_day_of_week_is_utc_unless_a_time_zone_is_given() -> None:
    friday_late = at(7, 23, 30)  # Friday 23:30 UTC = Saturday 01:30 in Berlin (CEST)
    assert not admits({"day_of_week": "sat"}, now=friday_late)
    assert admits({"day_of_week": {"days": "sat", "timezone": "Europe/Berlin"}}, now=friday_late)
    assert admits({"day_of_week": {"days": ["fri", "sun"]}}, now=friday_late)


@pytest.mark.parametrize(
    ("window", "open_hours"),
    [
        ({"after": "09:00", "before": "17:00"}, {9, 10, 16}),
        ({"after": "9:00 AM", "before": "5PM"}, {9, 10, 16}),
        ({"after": "9am", "before": "5:00 pm"}, {9, 10, 16}),
        ({"after": time(9), "before": time(17)}, {9, 10, 16}),  # TOML local times
        ({"after": "17:00"}, {17, 23}),
        ({"before": "09:00"}, {0, 8}),
        ({"after": "22:00", "before": "06:00"}, {0, 23}),  # across midnight
        ({"after": "12:00 AM", "before": "12:00 PM"}, {0, 8, 9, 10}),
    ],
)
def test_time_of_day(window: dict[str, Any], open_hours: set[int]) -> None:
    """``after`` is inclusive, ``before`` exclusive: adjacent windows tile the day."""
    criterion = {"time_of_day": {"timezone": "UTC", **window}}
    hours = (0, 8, 9, 10, 16, 17, 23)
    assert {hour for hour in hours if admits(criterion, now=at(3, hour))} == open_hours


def test_time_of_day_boundaries_and_fractions() -> None:
    window = {"time_of_day": {"timezone": "UTC", "after": "09:00:00.5", "before": "17:00:01"}}
    assert not admits(window, now=at(3, 9, 0, 0.25))
    assert admits(window, now=at(3, 9, 0, 0.5))
    assert admits(window, now=at(3, 17, 0, 0.999))
    assert not admits(window, now=at(3, 17, 0, 1.0))


def test_time_of_day_uses_its_time_zone() -> None:
    business = {"time_of_day": {"timezone": "America/New_York", "after": "9:00", "before": "17:00"}}
    assert not admits(business, now=at(3, 10))  # 06:00 in New York (EDT)
    assert admits(business, now=at(3, 14))  # 10:00 in New York


# -- parse errors -----------------------------------------------------------------------------

AT = ("allow", "or", 0)
"""Where :func:`one` puts its criterion."""


def one(criterion: Any) -> dict[str, Any]:
    return {"allow": {"or": [criterion]}}


@pytest.mark.parametrize(
    ("value", "path", "message"),
    [
        ("allow", (), "a policy is a table"),
        ([one(T), "deny"], (1,), "a rule is a table with allow and/or deny"),
        ([{}], (0,), "a rule needs allow or deny"),
        ({"permit": {"or": [T]}}, ("permit",), "unknown action 'permit'"),
        ({"allow": {}}, ("allow",), "allow takes a table of operators"),
        ({"allow": {"xor": [T]}}, ("allow", "xor"), "unknown operator 'xor' (and, or, not, nor)"),
        ({"allow": {"and": T}}, ("allow", "and"), "and takes a list of criteria"),
        ({"allow": {"and": []}}, ("allow", "and"), "and is empty"),
        (one({"email": "a@b", "user": "a@b"}), AT, "a criterion is a table with one key"),
        (one("email"), AT, "a criterion is a table with one key"),
        (one({"emial": "a@b"}), (*AT, "emial"), "criterion 'emial' is unknown"),
        (
            one({"http_path": "/"}),
            (*AT, "http_path"),
            "is a Pomerium criterion ferryman listeners do not support",
        ),
        (one({"claim": "x"}), (*AT, "claim"), "claim needs the claim's name"),
        (one({"email/x": "a"}), (*AT, "email/x"), "only claim takes a sub-path"),
        (one({"accept": False}), (*AT, "accept"), "accept takes true, got false"),
        (one({"email": 42}), (*AT, "email"), "email takes a string or a table"),
        (one({"email": {}}), (*AT, "email"), "email takes a string or a table"),
        (
            one({"email": {"equals": "a"}}),
            (*AT, "email", "equals"),
            "unknown operator 'equals' for email (is, not, contains, starts_with, ends_with, in, not_in)",
        ),
        (one({"user": {"is": ["a"]}}), (*AT, "user", "is"), "is takes a string, got a list"),
        (one({"domain": {"in": "a"}}), (*AT, "domain", "in"), "in takes a non-empty list"),
        (
            one({"groups": {"in": ["a"]}}),
            (*AT, "groups", "in"),
            "unknown operator 'in' for groups (has, is, exclude)",
        ),
        (one({"groups": 1}), (*AT, "groups"), "groups compares with a string, got"),
        (one({"tag": ["a"]}), (*AT, "tag"), "tag compares with a string, got a list"),
        (
            one({"claim/x": {"has": [1]}}),
            (*AT, "claim/x", "has"),
            "compares with a string, number or boolean",
        ),
        (one({"source_ip": "10.0.0.300"}), (*AT, "source_ip"), "not an IP address or CIDR"),
        (one({"source_ip": ["10.0.0.1", "x"]}), (*AT, "source_ip", 1), "not an IP"),
        (one({"source_ip": []}), (*AT, "source_ip"), "source_ip takes an IP address"),
        (one({"day_of_week": "mon-fry"}), (*AT, "day_of_week"), "unknown day 'fry'"),
        (one({"day_of_week": "mon,"}), (*AT, "day_of_week"), "unknown day ''"),
        (one({"day_of_week": ["mon", 2]}), (*AT, "day_of_week", 1), "takes days"),
        (
            one({"day_of_week": {"days": "mon", "tz": "UTC"}}),
            (*AT, "day_of_week", "tz"),
            "unknown key",
        ),
        (
            one({"day_of_week": {"days": "mon", "timezone": "Mars/Base"}}),
            (*AT, "day_of_week", "timezone"),
            "unknown time zone 'Mars/Base'",
        ),
        (one({"time_of_day": "9-5"}), (*AT, "time_of_day"), "time_of_day takes a table"),
        (
            one({"time_of_day": {"after": "09:00"}}),
            (*AT, "time_of_day"),
            "time_of_day needs timezone",
        ),
        (
            one({"time_of_day": {"timezone": "UTC"}}),
            (*AT, "time_of_day"),
            "needs after, before or both",
        ),
        (
            one({"time_of_day": {"timezone": "UTC", "after": "25:00"}}),
            (*AT, "time_of_day", "after"),
            "not a time of day: '25:00'",
        ),
        (
            one({"time_of_day": {"timezone": "UTC", "before": "13 PM"}}),
            (*AT, "time_of_day", "before"),
            "not a time of day",
        ),
        (
            one({"time_of_day": {"timezone": "UTC", "after": "9:00", "before": "09:00:00"}}),
            (*AT, "time_of_day", "before"),
            "the window would be empty",
        ),
        (
            one({"time_of_day": {"timezone": "", "after": "9:00"}}),
            (*AT, "time_of_day", "timezone"),
            "unknown time zone",
        ),
        (
            one({"time_of_day": {"timezone": "UTC", "after": "9:00", "until": "10:00"}}),
            (*AT, "time_of_day", "until"),
            "unknown key",
        ),
        (one({"not": []}), (*AT, "not"), "not is empty"),
    ],
)
def test_parse_errors_name_the_key_path(value: Any, path: tuple[str | int, ...], message: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_listener_policy(value)
    assert info.value.path == path
    assert message in info.value.message


def test_nesting_is_bounded() -> None:
    node: dict[str, Any] = {"accept": True}
    for _ in range(20):
        node = {"and": [node]}
    with pytest.raises(PolicyError, match="nested more than 16 deep"):
        parse_listener_policy({"allow": node})


# -- in the configuration file ----------------------------------------------------------------

BASE = """\
[[identity.static]]
cidr = "127.0.0.0/8"
user = "dev@localhost"

[[listeners]]
name = "redis"
listen = "127.0.0.1:7000"
backend = "127.0.0.1:6379"

[[listeners]]
name = "pg-main"
listen = "127.0.0.1:7001"
backend = "127.0.0.1:5432"
"""


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, file="gw.toml", env={})
    return str(info.value)


def test_the_spec_example_loads_compiled() -> None:
    config = load_config_text(
        BASE
        + """\
policy = [
  { allow = { or = [ { email = { is = "alice@example.com" } }, { groups = { has = "dba" } } ] } },
  { deny = { and = [ { day_of_week = "sat-sun" } ] } },
]
""",
        env={},
    )
    redis, pg = config.listeners
    assert redis.policy is None
    assert isinstance(pg.policy, ListenerPolicy)
    assert [(r.number, r.action) for r in pg.policy.rules] == [(1, "allow"), (2, "deny")]
    assert (
        pg.policy.evaluate(ALICE, HOME, at(8, 12)).reason == "listener policy: denied by rule 2 (day_of_week)"
    )


def test_a_table_form_policy_and_toml_times_load() -> None:
    config = load_config_text(
        BASE
        + """\
[listeners.policy.allow]
and = [ { time_of_day = { timezone = "UTC", after = 09:00:00, before = 17:30:00 } } ]
""",
        env={},
    )
    policy = config.listeners[1].policy
    assert policy is not None
    assert policy.evaluate(ALICE, HOME, at(3, 17, 29)).allowed
    assert not policy.evaluate(ALICE, HOME, at(3, 17, 30)).allowed


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (
            'policy = [ { allow = { or = [ { emial = "a@b" } ] } } ]',
            "gw.toml:14: listeners[1].policy[0].allow.or[0].emial: criterion 'emial' is unknown (supported: ",
        ),
        (
            "policy = { allow = { xor = [ { accept = true } ] } }",
            "gw.toml:14: listeners[1].policy.allow.xor: unknown operator 'xor' (and, or, not, nor)",
        ),
        (
            "policy = [\n"
            "  { allow = { or = [ { accept = true } ] } },\n"
            '  { deny = { and = [ { source_ip = "10.0.0.256/8" } ] } },\n'
            "]",
            "gw.toml:14: listeners[1].policy[1].deny.and[0].source_ip: "
            "not an IP address or CIDR: '10.0.0.256/8'",
        ),
        (
            'policy = [ { allow = { or = [ { email = { equals = "a@b" } } ] } } ]',
            "gw.toml:14: listeners[1].policy[0].allow.or[0].email.equals: "
            "unknown operator 'equals' for email",
        ),
        (
            'policy = { deny = { or = [ { day_of_week = "sat-sunday-x" } ] } }',
            "gw.toml:14: listeners[1].policy.deny.or[0].day_of_week: unknown day 'sunday-x'",
        ),
        (
            'policy = "allow everyone"',
            "gw.toml:14: listeners[1].policy: a policy is a table { allow = …, deny = … } or a list of them, "
            "got the string 'allow everyone'",
        ),
        (
            '[listeners.policy.allow]\nor = [ { time_of_day = { timezone = "Mars/Base", after = "9:00" } } ]',
            "gw.toml:15: listeners[1].policy.allow.or[0].time_of_day.timezone: unknown time zone 'Mars/Base'",
        ),
    ],
)
def test_config_errors_name_file_line_and_key(policy: str, expected: str) -> None:
    assert error_of(BASE + policy + "\n").startswith(expected)


def test_a_policy_error_is_one_of_several_config_errors() -> None:
    text = (
        BASE.replace('backend = "127.0.0.1:6379"', 'backend = "nope"') + "policy = { allow = { and = [] } }\n"
    )
    message = error_of(text)
    assert "gw.toml:8: listeners[0].backend:" in message
    assert (
        "gw.toml:14: listeners[1].policy.allow.and: and is empty: give it at least one criterion" in message
    )


def test_the_line_of_the_first_problem_in_a_later_listener() -> None:
    text = (
        BASE.replace(
            'backend = "127.0.0.1:6379"\n',
            'backend = "127.0.0.1:6379"\npolicy = { allow = { or = [ { groups = "ok" } ] } }\n',
        )
        + "policy = { allow = { or = [ { groups = { has = 1 } } ] } }\n"
    )
    assert error_of(text).startswith(
        "gw.toml:15: listeners[1].policy.allow.or[0].groups.has: groups compares with"
    )
