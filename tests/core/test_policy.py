"""Grant parsing and the pure engine (SPEC §3)."""

import ipaddress
from pathlib import Path

import pytest

from ferryman.errors import AccessDenied, ConfigError
from ferryman.identity.base import Identity
from ferryman.policy.engine import authorize
from ferryman.policy.model import Bandwidth, Limits
from ferryman.policy.parse import GrantError, load_policy, parse_cap_value, parse_cap_values, parse_policy

CAP = "ferryman.dev/cap/ferryman"
ALICE = Identity(user="alice@example.com", source="static")
IP = ipaddress.ip_address("10.1.2.3")

SPEC_EXAMPLE = """
{
  // comments and trailing commas are allowed, as in a tailnet policy file
  "groups": { "group:dba": ["alice@example.com"] },
  "grants": [
    { "src": ["group:dba", "tag:ci", "bob@example.com", "100.64.0.0/10"],
      "app": { "ferryman.dev/cap/ferryman": [ {
        "backends": {
          "raw-mysql": {},
          "pg-main": {
            "pg": { "databases": {
              "appdb": { "permissions": ["readwrite"], "schemas": ["public"] },
              "*":     { "permissions": ["readonly"] } } },
            "limits": { "max_conns": 3 } } },
        "limits": { "max_conns": 10, "max_bytes_per_conn": "10GB", "max_conn_duration": "8h",
                    "bandwidth": [ { "bytes": "50GB", "period": "24h" } ] } } ] } },
  ],
}
"""


def spec_policy(tmp_path: Path):
    path = tmp_path / "policy.json"
    path.write_text(SPEC_EXAMPLE)
    return load_policy(path, capability=CAP, listeners=["raw-mysql", "pg-main"])


def test_spec_example_grants_group_member(tmp_path: Path) -> None:
    policy = spec_policy(tmp_path)
    auth = authorize(ALICE, IP, "pg-main", policy)
    assert auth.user_limits == Limits(10, 10 * 1000**3, 8 * 3600.0, (Bandwidth(50 * 1000**3, 86400.0),))
    assert auth.listener_limits.max_conns == 3
    assert auth.pg is not None
    assert auth.pg["appdb"].permissions == {"readwrite"}
    assert auth.pg["*"].permissions == {"readonly"}
    assert auth.connection_limits.max_conns == 3
    assert authorize(ALICE, IP, "raw-mysql", policy).pg is None


@pytest.mark.parametrize(
    ("identity", "ip"),
    [
        (Identity(user="BOB@example.com", source="static"), "10.0.0.1"),  # logins compare case-insensitively
        (Identity(user="ci-runner", source="tailscale", tags=("tag:ci",)), "10.0.0.1"),
        (Identity(user="carol@example.com", source="static"), "100.100.1.1"),  # CIDR
    ],
)
def test_selectors(tmp_path: Path, identity: Identity, ip: str) -> None:
    authorize(identity, ipaddress.ip_address(ip), "raw-mysql", spec_policy(tmp_path))


def test_identity_groups_match_group_selector(tmp_path: Path) -> None:
    dave = Identity(user="dave@example.com", source="mtls", groups=("dba",))
    authorize(dave, IP, "raw-mysql", spec_policy(tmp_path))


def test_no_matching_rule_is_denied(tmp_path: Path) -> None:
    eve = Identity(user="eve@example.com", source="static")
    with pytest.raises(AccessDenied) as info:
        authorize(eve, IP, "raw-mysql", spec_policy(tmp_path))
    assert info.value.sqlstate == "28000"


def test_grant_must_name_the_listener(tmp_path: Path) -> None:
    with pytest.raises(AccessDenied, match="no grant for listener 'other'"):
        authorize(ALICE, IP, "other", spec_policy(tmp_path))


def test_wildcard_src() -> None:
    policy = parse_policy(
        {"grants": [{"src": ["*"], "app": {CAP: [{"backends": {"x": {}}}]}}]}, capability=CAP
    )
    authorize(Identity(user="anyone", source="static"), None, "x", policy)


def test_other_capabilities_are_ignored() -> None:
    policy = parse_policy(
        {"grants": [{"src": ["*"], "app": {"other/cap": [{"backends": {"x": {}}}]}}]}, capability=CAP
    )
    with pytest.raises(AccessDenied):
        authorize(ALICE, IP, "x", policy)
    assert policy.warnings


def test_union_of_permissions_and_strictest_limits() -> None:
    policy = parse_policy(
        {
            "groups": {"group:a": ["alice@example.com"]},
            "grants": [
                {
                    "src": ["group:a"],
                    "app": {
                        CAP: [
                            {
                                "backends": {
                                    "pg": {
                                        "pg": {"databases": {"app": {"permissions": ["readonly"]}}},
                                        "limits": {"max_conns": 5, "max_bytes_per_conn": 0},
                                    }
                                },
                                "limits": {
                                    "max_conns": 0,
                                    "max_conn_duration": "1h",
                                    "bandwidth": [{"bytes": "1GB", "period": "1h"}],
                                },
                            }
                        ]
                    },
                },
                {
                    "src": ["alice@example.com"],
                    "app": {
                        CAP: [
                            {
                                "backends": {
                                    "pg": {
                                        "pg": {
                                            "databases": {
                                                "app": {"permissions": ["admin"], "schemas": ["s"]},
                                                "other": {"permissions": ["readwrite"]},
                                            }
                                        },
                                        "limits": {"max_conns": 2},
                                    }
                                },
                                "limits": {
                                    "max_conns": 7,
                                    "max_conn_duration": "2h",
                                    "max_bytes_per_conn": 1000,
                                    "bandwidth": [
                                        {"bytes": 500, "period": "1h"},
                                        {"bytes": 9, "period": "1m"},
                                    ],
                                },
                            }
                        ]
                    },
                },
            ],
        },
        capability=CAP,
    )
    auth = authorize(ALICE, IP, "pg", policy)
    assert auth.pg is not None
    assert auth.pg["app"].permissions == {"readonly", "admin"}
    assert auth.pg["app"].schemas == {"s"}
    assert auth.pg["other"].permissions == {"readwrite"}
    assert auth.user_limits.max_conns == 7  # 0 means "no limit", not "strictest"
    assert auth.user_limits.max_conn_duration == 3600
    assert auth.user_limits.max_bytes_per_conn == 1000
    assert auth.user_limits.bandwidth == (Bandwidth(9, 60.0), Bandwidth(500, 3600.0))
    assert auth.listener_limits.max_conns == 2


def test_carried_grants_are_added_to_local_ones() -> None:
    carried, problems = parse_cap_values([{"backends": {"ts-only": {}}}], "tailscale CapMap")
    assert not problems
    auth = authorize(ALICE, IP, "ts-only", parse_policy({}, capability=CAP), carried)
    assert auth.origins == ("tailscale CapMap[0]",)


def test_malformed_carried_value_denies_only_that_rule() -> None:
    caps, problems = parse_cap_values(
        [{"backends": {"a": {"limits": {"max_conns": "x"}}}}, {"backends": {"b": {}}}], "tailscale CapMap"
    )
    assert [list(c.backends) for c in caps] == [["b"]]
    assert "max_conns" in problems[0] and '"x"' in problems[0]


def test_waypoint_legacy_shape() -> None:
    cap = parse_cap_value(
        {
            "backends": ["pg-main", "redis"],
            "pg": {"databases": {"app": {"permissions": ["readonly"]}}},
            "endpoint_limits": {"redis": {"max_conns": 2}},
            "unknown_field": True,
        },
        "legacy",
    )
    assert set(cap.backends) == {"pg-main", "redis"}
    assert cap.backends["pg-main"].pg is not None
    assert cap.backends["redis"].limits.max_conns == 2


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"backends": {"x": {"pg": {"databases": {"d": {"permissions": ["superuser"]}}}}}}, "unknown preset"),
        ({"backends": "x"}, "backends: expected an object"),
        ({"limits": {"bandwidth": [{"bytes": 1}]}}, "needs both"),
        ({"limits": {"max_bytes_per_conn": "lots"}}, "byte size"),
        ({"limits": {"max_conn_duration": "forever"}}, "duration"),
        ({"limits": {"max_conns": -1}}, "negative"),
    ],
)
def test_malformed_cap_values(value: object, message: str) -> None:
    with pytest.raises(GrantError, match=message):
        parse_cap_value(value, "v")


def test_policy_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text('{"grants": [ {"src": ["*"] ')
    with pytest.raises(ConfigError, match=r"p\.json: not valid JSON"):
        load_policy(path, capability=CAP)
    path.write_text('{"grants": [{"app": {}}]}')
    with pytest.raises(ConfigError, match=r"grants\[0\]: 'src' is required"):
        load_policy(path, capability=CAP)
