"""Waypoint grants, read and combined the way Waypoint does (docs/waypoint.md).

The grant values below are JSON literals copied from Waypoint's own documentation and tests
(github.com/redoapp/waypoint; the source file is named above each one). Expected results follow
Waypoint's Go code: ``internal/auth/caps.go`` (``CapRule``, ``CapRule.UnmarshalJSON``),
``internal/auth/auth.go`` (``Authorize``, ``mergeRules``, ``mergeLimits``,
``mergeEndpointLimits``, ``DatabasePermissions``) and ``internal/restrict/tracker.go``
(``Tracker.Acquire``, ``Tracker.WrapConn``). Where ferryman deliberately differs the test says
so and docs/waypoint.md explains why.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest

from ferryman.errors import AccessDenied, ConfigError
from ferryman.identity.base import Identity
from ferryman.policy.engine import Authorization, authorize
from ferryman.policy.model import EMPTY_POLICY, Bandwidth, Limits, PgDatabaseGrant
from ferryman.policy.parse import GrantError, parse_cap_value, parse_cap_values, parse_policy

WAYPOINT_CAP = "redo.com/cap/waypoint"
ALICE = Identity(user="alice@example.com", source="tailscale")
IP = ipaddress.ip_address("100.64.0.7")
GB = 1000**3
DAY = 86400.0


def values(*docs: str) -> list[Any]:
    """Capability values as a tailnet's CapMap carries them: raw JSON, one per grant value."""
    return [json.loads(doc) for doc in docs]


def auth(listener: str, *docs: str) -> Authorization:
    """Authorize ALICE for ``listener`` with ``docs`` as the grants her Tailscale identity carries."""
    caps, problems = parse_cap_values(values(*docs), "tailscale CapMap")
    assert problems == []
    return authorize(ALICE, IP, listener, EMPTY_POLICY, caps)


def pg(listener: str, database: str, *docs: str) -> PgDatabaseGrant | None:
    return auth(listener, *docs).database_grant(database)


def on_x(limits: str) -> str:
    """A value granting listener ``x`` with top-level ``limits`` (a JSON object literal)."""
    return f'{{"backends": {{"x": {{}}}}, "limits": {limits}}}'


# --- Waypoint's documented grants -------------------------------------------------------------

# website/src/content/docs/acl/examples.md "Backend team gets readwrite on their app, readonly on
# everything else" (also README.md "Example policy snippet", docs/acl/capability-grants.md).
BACKEND_TEAM = """
{
  "limits": {
    "max_conns": 10,
    "max_conn_duration": "1h"
  },
  "backends": {
    "pg-main": {
      "pg": {
        "databases": {
          "myapp":   { "permissions": ["readwrite"], "schemas": ["public", "app"] },
          "*":       { "permissions": ["readonly"] }
        }
      }
    }
  }
}
"""

# website/src/content/docs/acl/examples.md "Data team gets readonly on analytics, no other access"
DATA_TEAM = """
{
  "backends": {
    "pg-main": {
      "pg": {
        "databases": {
          "analytics": { "permissions": ["readonly"], "schemas": ["public"] }
        }
      }
    }
  }
}
"""

# website/src/content/docs/acl/examples.md "Admin emergency access (high limits, all databases)"
DBA_EMERGENCY = """
{
  "limits": { "max_conns": 50 },
  "backends": {
    "pg-main": {
      "pg": {
        "databases": {
          "*": { "permissions": ["admin"] }
        }
      }
    }
  }
}
"""

# website/src/content/docs/acl/examples.md "TCP listener — flat access"
TCP_FLAT = """
{
  "limits": { "max_conns": 5 },
  "backends": { "raw-mysql": {} }
}
"""

# website/src/content/docs/listeners/tcp.md "ACL grants for TCP listeners"
TCP_DOC = """
{
  "backends": {
    "raw-mysql": {}
  }
}
"""

# website/src/content/docs/getting-started/quickstart.md "5. Add an ACL grant"
QUICKSTART = """
{
  "backends": {
    "pg-main": {
      "pg": {
        "databases": {
          "myapp": { "permissions": ["readwrite"] }
        }
      }
    }
  }
}
"""

# website/src/content/docs/acl/raw-sql.md (the `databases` block, wrapped in a backend and pg)
RAW_SQL = """
{
  "backends": { "pg-main": { "pg": {
  "databases": {
    "myapp": {
      "permissions": ["readonly"],
      "sql": [
        "GRANT INSERT ON public.audit_log TO {{.Role}}",
        "GRANT USAGE ON SCHEMA analytics TO {{.Role}}",
        "GRANT SELECT ON ALL TABLES IN SCHEMA analytics TO {{.Role}}"
      ]
    }
  }
  } } }
}
"""

# website/src/content/docs/acl/examples.md "MongoDB with mixed presets" (wrapped as a value).
# Waypoint's decoder field is `mongo` (BackendCap.Mongo), so `mongodb` is an unknown field there.
MONGO_DOC = """
{
  "backends": {
    "mongo-prod": {
      "mongodb": {
        "databases": {
          "app":   { "permissions": ["readwrite"] },
          "logs":  { "permissions": ["readonly"] }
        }
      }
    }
  }
}
"""

# internal/auth/auth_test.go TestCapRuleUnmarshal_Kubernetes
K8S_TEST = """{
		"backends": {
			"eks-prod": {
				"k8s": {
					"groups": ["waypoint:readonly"],
					"extra": {"node": ["alice-laptop"]}
				}
			}
		}
	}"""

# cmd/waypoint/e2e_test.go TestE2E_ServiceListener_ProxyProto: json.Marshal of the legacy
# auth.CapRule{Backends: []string{"echo-svc"}, Limits: &auth.LimitsCap{MaxConns: 5}}.
LEGACY_E2E = '{"backends":["echo-svc"],"limits":{"max_conns":5}}'

# The legacy shape internal/auth/caps.go CapRule.UnmarshalJSON falls back to: backends a list,
# top-level pg for all of them, endpoint_limits per backend.
LEGACY_FULL = """
{
  "backends": ["pg-main", "raw-mysql"],
  "pg": { "databases": { "myapp": { "permissions": ["readwrite"] } } },
  "limits": { "max_conns": 10, "max_bytes_per_conn": 1000000 },
  "endpoint_limits": {
    "raw-mysql": { "max_conns": 2, "max_conn_duration": "30m" },
    "not-listed": { "max_conns": 1 }
  }
}
"""


@pytest.mark.parametrize(
    ("doc", "listener", "user_limits", "listener_limits"),
    [
        (BACKEND_TEAM, "pg-main", Limits(max_conns=10, max_conn_duration=3600.0), Limits()),
        (DATA_TEAM, "pg-main", Limits(), Limits()),
        (DBA_EMERGENCY, "pg-main", Limits(max_conns=50), Limits()),
        (TCP_FLAT, "raw-mysql", Limits(max_conns=5), Limits()),
        (TCP_DOC, "raw-mysql", Limits(), Limits()),
        (QUICKSTART, "pg-main", Limits(), Limits()),
        (RAW_SQL, "pg-main", Limits(), Limits()),
        (MONGO_DOC, "mongo-prod", Limits(), Limits()),
        (K8S_TEST, "eks-prod", Limits(), Limits()),
        (LEGACY_E2E, "echo-svc", Limits(max_conns=5), Limits()),
        (LEGACY_FULL, "pg-main", Limits(max_conns=10, max_bytes_per_conn=1000000), Limits()),
        (
            LEGACY_FULL,
            "raw-mysql",
            Limits(max_conns=10, max_bytes_per_conn=1000000),
            Limits(max_conns=2, max_conn_duration=1800.0),
        ),
    ],
)
def test_documented_grants_authorize(
    doc: str, listener: str, user_limits: Limits, listener_limits: Limits
) -> None:
    result = auth(listener, doc)
    assert result.user_limits == user_limits
    assert result.listener_limits == listener_limits


@pytest.mark.parametrize(
    ("doc", "listener"),
    [
        (DATA_TEAM, "raw-mysql"),  # a value grants only the backends it names
        (TCP_FLAT, "pg-main"),
        (LEGACY_E2E, "pg-main"),
        (LEGACY_FULL, "not-listed"),  # endpoint_limits does not grant a backend
    ],
)
def test_documented_grants_deny_other_listeners(doc: str, listener: str) -> None:
    with pytest.raises(AccessDenied):
        auth(listener, doc)


# (doc, listener, database, expected (permissions, schemas, sql) or None = 42501)
DATABASES: list[tuple[str, str, str, tuple[set[str], set[str], tuple[str, ...]] | None]] = [
    # exact entry and "*" both apply (auth.DatabasePermissions): readwrite + readonly
    (BACKEND_TEAM, "pg-main", "myapp", ({"readwrite", "readonly"}, {"public", "app"}, ())),
    (BACKEND_TEAM, "pg-main", "billing", ({"readonly"}, set(), ())),
    (DATA_TEAM, "pg-main", "analytics", ({"readonly"}, {"public"}, ())),
    (DATA_TEAM, "pg-main", "myapp", None),  # "no other access"
    (DBA_EMERGENCY, "pg-main", "anything", ({"admin"}, set(), ())),
    (QUICKSTART, "pg-main", "myapp", ({"readwrite"}, set(), ())),
    (QUICKSTART, "pg-main", "postgres", None),
    (
        RAW_SQL,
        "pg-main",
        "myapp",
        (
            {"readonly"},
            set(),
            (
                "GRANT INSERT ON public.audit_log TO {{.Role}}",
                "GRANT USAGE ON SCHEMA analytics TO {{.Role}}",
                "GRANT SELECT ON ALL TABLES IN SCHEMA analytics TO {{.Role}}",
            ),
        ),
    ),
    (LEGACY_FULL, "pg-main", "myapp", ({"readwrite"}, set(), ())),
    (LEGACY_FULL, "raw-mysql", "myapp", ({"readwrite"}, set(), ())),  # legacy pg covers every backend
    (TCP_DOC, "raw-mysql", "myapp", None),  # no pg block: no database is granted
]


@pytest.mark.parametrize(("doc", "listener", "database", "expected"), DATABASES)
def test_documented_database_grants(
    doc: str, listener: str, database: str, expected: tuple[set[str], set[str], tuple[str, ...]] | None
) -> None:
    got = pg(listener, database, doc)
    if expected is None:
        assert got is None
    else:
        assert got is not None
        assert (set(got.permissions), set(got.schemas), got.sql) == expected


# --- several grants: internal/auth/auth_test.go, as JSON ---------------------------------------

# TestMergeRules_MultipleRulesMergePermissions. The Go test's permissions are raw GRANT
# fragments from before presets; current Waypoint rejects those when provisioning
# (provision.ExpandPresets), so presets stand in for them here.
MERGE_A = """{"limits": {"max_conns": 10, "max_bytes_per_conn": 1000},
  "backends": {"pg-main": {"pg": {"databases": {"app_db": {"permissions": ["readonly"]}}}}}}"""
MERGE_B = """{"limits": {"max_conns": 5, "max_bytes_per_conn": 2000},
  "backends": {"pg-main": {"pg": {"databases": {"app_db": {"permissions": ["readwrite"]}}}}}}"""


def test_merge_rules_union_and_most_restrictive() -> None:
    result = auth("pg-main", MERGE_A, MERGE_B)
    assert result.user_limits == Limits(max_conns=5, max_bytes_per_conn=1000)
    grant = result.database_grant("app_db")
    assert grant is not None and grant.permissions == {"readonly", "readwrite"}
    assert result.origins == ("tailscale CapMap[0]", "tailscale CapMap[1]")


# (limits of each grant, merged user limits) — TestMergeLimits_* in internal/auth/auth_test.go
LIMIT_MERGES: list[tuple[list[str], Limits]] = [
    # TestMergeLimits_MostRestrictiveWins
    (['{"max_conns": 10, "max_conn_duration": "2h"}', '{"max_conns": 5, "max_conn_duration": "1h"}'],
     Limits(max_conns=5, max_conn_duration=3600.0)),
    # TestMergeLimits_FirstValueSetsBaseline
    (['{"max_bytes_per_conn": 500}'], Limits(max_bytes_per_conn=500)),
    # TestMergeLimits_LargerValueDoesNotOverride
    (['{"max_conns": 5}', '{"max_conns": 10}'], Limits(max_conns=5)),
    # TestMergeLimits_ZeroDoesNotOverride
    (['{"max_conns": 5}', '{"max_conns": 0}'], Limits(max_conns=5)),
    # TestMergeLimits_Bandwidth
    (['{"bandwidth": [{"bytes": 1000000, "period": "1h"}]}'], Limits(bandwidth=(Bandwidth(10**6, 3600.0),))),
    # TestMergeLimits_BandwidthMostRestrictive
    (['{"bandwidth": [{"bytes": 2000000, "period": "1h"}]}',
      '{"bandwidth": [{"bytes": 1000000, "period": "1h"}]}'],
     Limits(bandwidth=(Bandwidth(1000000, 3600.0),))),
    # TestMergeLimits_BandwidthMultipleTiers
    (['{"bandwidth": [{"bytes": 100000000, "period": "1h"}, {"bytes": 10000000000, "period": "168h"}]}'],
     Limits(bandwidth=(Bandwidth(100000000, 3600.0), Bandwidth(10000000000, 168 * 3600.0)))),
    # TestMergeLimits_BandwidthMultipleTiers_DedupByPeriod
    (['{"bandwidth": [{"bytes": 200000000, "period": "1h"}, {"bytes": 10000000000, "period": "168h"}]}',
      '{"bandwidth": [{"bytes": 100000000, "period": "1h"}]}'],
     Limits(bandwidth=(Bandwidth(100000000, 3600.0), Bandwidth(10000000000, 168 * 3600.0)))),
    # TestMergeLimits_BandwidthZeroBytesSkipped
    (['{"bandwidth": [{"bytes": 0, "period": "1h"}]}'], Limits()),
    # a zero period is skipped too (mergeLimits: `period <= 0`)
    (['{"bandwidth": [{"bytes": 10, "period": "0"}]}'], Limits()),
    # TestMergeRules_NoLimits: a value without limits adds none
    (["null", '{"max_conns": 3}'], Limits(max_conns=3)),
]  # fmt: skip


@pytest.mark.parametrize(("limits", "expected"), LIMIT_MERGES)
def test_limit_merging(limits: list[str], expected: Limits) -> None:
    docs = [f'{{"limits": {lim}, "backends": {{"raw-tcp": {{}}}}}}' for lim in limits]
    assert auth("raw-tcp", *docs).user_limits == expected


def test_values_not_naming_the_listener_contribute_nothing() -> None:
    # auth.Authorize keeps only rules whose backends include the listener before mergeRules, so
    # a strict value for another backend does not limit this one.
    strict_elsewhere = '{"limits": {"max_conns": 1}, "backends": {"other": {}}}'
    assert auth("raw-mysql", TCP_DOC, strict_elsewhere).user_limits == Limits()


def test_global_and_endpoint_limits() -> None:
    # auth.mergeRules: top-level limits → MergedLimits (per user, all listeners); backends.X.limits
    # → MergedLimits.Endpoint (per user and listener). restrict.Tracker.WrapConn: per connection
    # the smaller of the two byte and duration limits; bandwidth tiers merged by period.
    a = """{"limits": {"max_conns": 10, "max_bytes_per_conn": 5000, "max_conn_duration": "8h",
                       "bandwidth": [{"bytes": 900, "period": "1h"}]},
            "backends": {"db": {"limits": {"max_conns": 3, "max_conn_duration": "1h",
                                            "bandwidth": [{"bytes": 100, "period": "1h"},
                                                          {"bytes": 50, "period": "1m"}]}}}}"""
    b = '{"backends": {"db": {"limits": {"max_conns": 2, "max_bytes_per_conn": 9000}}}}'
    result = auth("db", a, b)
    assert result.user_limits == Limits(10, 5000, 8 * 3600.0, (Bandwidth(900, 3600.0),))
    assert result.listener_limits == Limits(2, 9000, 3600.0, (Bandwidth(50, 60.0), Bandwidth(100, 3600.0)))
    assert result.connection_limits == Limits(2, 5000, 3600.0, (Bandwidth(50, 60.0), Bandwidth(100, 3600.0)))


# (grants, database, expected (permissions, schemas, sql)) — TestDatabasePermissions_* in
# internal/auth/auth_test.go, as JSON (presets in place of the Go test's raw GRANT fragments).
def _pg_value(databases: str) -> str:
    return f'{{"backends": {{"pg-main": {{"pg": {{"databases": {databases}}}}}}}}}'


DATABASE_MERGES: list[tuple[list[str], str, tuple[set[str], set[str], tuple[str, ...]] | None]] = [
    # TestDatabasePermissions_ExactMatch
    ([_pg_value('{"app_db": {"permissions": ["readonly"]}, "analytics": {"permissions": ["readwrite"]}}')],
     "analytics", ({"readwrite"}, set(), ())),
    # TestDatabasePermissions_WildcardMatch
    ([_pg_value('{"*": {"permissions": ["readonly"]}}')], "any_database", ({"readonly"}, set(), ())),
    # TestDatabasePermissions_ExactAndWildcardMerge
    ([_pg_value('{"app_db": {"permissions": ["readwrite"]}, "*": {"permissions": ["readonly"]}}')],
     "app_db", ({"readwrite", "readonly"}, set(), ())),
    # TestDatabasePermissions_NoMatch
    ([_pg_value('{"app_db": {"permissions": ["readonly"]}}')], "secret_db", None),
    # TestDatabasePermissions_MultipleRulesMerge
    ([_pg_value('{"app_db": {"permissions": ["readonly"]}}'),
      _pg_value('{"app_db": {"permissions": ["readwrite"]}}')],
     "app_db", ({"readonly", "readwrite"}, set(), ())),
    # TestDatabasePermissions_SQLFieldMerge: exact, then exact + wildcard, in grant order
    ([_pg_value('{"app_db": {"permissions": ["readonly"],'
                ' "sql": ["GRANT USAGE ON SCHEMA analytics TO {{.Role}}"]}}'),
      _pg_value('{"app_db": {"sql":'
                ' ["ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO {{.Role}}"]},'
                ' "*": {"sql": ["GRANT USAGE ON SCHEMA public TO {{.Role}}"]}}')],
     "app_db",
     ({"readonly"}, set(), ("GRANT USAGE ON SCHEMA analytics TO {{.Role}}",
                            "ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO {{.Role}}",
                            "GRANT USAGE ON SCHEMA public TO {{.Role}}"))),
    # TestDatabasePermissions_SQLOnlyAccess
    ([_pg_value('{"app_db": {"sql": ["GRANT SELECT ON public.users TO {{.Role}}"]}}')],
     "app_db", (set(), set(), ("GRANT SELECT ON public.users TO {{.Role}}",))),
    # schemas are unioned across exact and "*" (auth.DatabasePermissions schemasSeen)
    ([_pg_value('{"app_db": {"permissions": ["readwrite"]},'
                ' "*": {"permissions": ["readonly"], "schemas": ["s"]}}')],
     "app_db", ({"readwrite", "readonly"}, {"s"}, ())),
    # an empty or null entry still grants the database (CONNECT, no presets)
    ([_pg_value('{"app_db": {}}')], "app_db", (set(), set(), ())),
    ([_pg_value('{"app_db": null}')], "app_db", (set(), set(), ())),
    # a value without pg adds nothing to a database (TestDatabasePermissions_NoPGCap)
    (['{"backends": {"pg-main": {}}}', _pg_value('{"*": {"permissions": ["readonly"]}}')],
     "x", ({"readonly"}, set(), ())),
]  # fmt: skip


@pytest.mark.parametrize(("docs", "database", "expected"), DATABASE_MERGES)
def test_database_permissions(
    docs: list[str], database: str, expected: tuple[set[str], set[str], tuple[str, ...]] | None
) -> None:
    got = pg("pg-main", database, *docs)
    if expected is None:
        assert got is None
    else:
        assert got is not None
        assert (set(got.permissions), set(got.schemas), got.sql) == expected


def test_pg_union_view_is_unchanged() -> None:
    # Authorization.pg stays the per-key union (what ferryman's own code reads); the Waypoint
    # per-database view is Authorization.database_grant.
    result = auth("pg-main", BACKEND_TEAM)
    assert result.pg is not None
    assert result.pg["myapp"].permissions == {"readwrite"}
    assert result.pg["*"].permissions == {"readonly"}
    assert auth("raw-mysql", TCP_DOC).pg is None


# --- decoding as Go's encoding/json does ---------------------------------------------------


# (value, listener, expected user limits) for values Waypoint decodes successfully
DECODES: list[tuple[str, str, Limits]] = [
    # field names match case-insensitively; the last matching key wins
    ('{"Backends": {"x": {}}, "LIMITS": {"Max_Conns": 3}}', "x", Limits(max_conns=3)),
    (on_x('{"max_conns": 3, "MAX_CONNS": 4}'), "x", Limits(max_conns=4)),
    # ... including Go's special folds (long s, Kelvin sign)
    ('{"backend\u017f": {"x": {}}}', "x", Limits()),
    # null is the same as absent
    ('{"backends": {"x": null}, "limits": null}', "x", Limits()),
    ('{"backends": {"x": {"pg": null, "limits": null}}}', "x", Limits()),
    (on_x('{"max_conns": null, "bandwidth": null}'), "x", Limits()),
    (on_x('{"bandwidth": [null]}'), "x", Limits()),
    # "" is Go's zero value for max_conn_duration: no limit
    (on_x('{"max_conn_duration": ""}'), "x", Limits()),
    # unknown fields are ignored, at every level
    ('{"backends": {"x": {"future": 1, "mongodb": {}}}, "note": "hi", "limits": {"other": true}}',
     "x", Limits()),
    # current shape: top-level pg and endpoint_limits are unknown fields, even malformed
    ('{"backends": {"x": {}}, "pg": 7, "endpoint_limits": {"x": {"max_conns": 1}}}', "x", Limits()),
    # fields ferryman does not use are still accepted when well-formed
    ('{"backends": {"x": {"mongo": {"databases": {"app": {"permissions": ["readwrite"]}}},'
     ' "k8s": {"user": "alice", "groups": ["g"], "extra": {"k": ["v"]}}}}}', "x", Limits()),
    # Go duration syntax
    (on_x('{"max_conn_duration": "1h30m"}'), "x", Limits(max_conn_duration=5400.0)),
    (on_x('{"max_conn_duration": ".5h"}'), "x", Limits(max_conn_duration=1800.0)),
    (on_x('{"max_conn_duration": "1.5m"}'), "x", Limits(max_conn_duration=90.0)),
    (on_x('{"max_conn_duration": "500ms"}'), "x", Limits(max_conn_duration=0.5)),
    (on_x('{"max_conn_duration": "+2h"}'), "x", Limits(max_conn_duration=7200.0)),
    (on_x('{"max_conn_duration": "0"}'), "x", Limits()),
    (on_x('{"max_conn_duration": "-0s"}'), "x", Limits()),
    # byte counts are JSON whole numbers; 0 means no limit
    (on_x('{"max_bytes_per_conn": 10737418240}'), "x",
     Limits(max_bytes_per_conn=10737418240)),
    (on_x('{"max_bytes_per_conn": 0}'), "x", Limits()),
    # preset names are case-insensitive (provision.ExpandPresets lower-cases them)
    ('{"backends": {"x": {"pg": {"databases": {"d": {"permissions": ["ReadOnly"]}}}}}}', "x", Limits()),
    # legacy shape: a list, possibly with null names (Go decodes them to "")
    ('{"backends": ["x", null]}', "x", Limits()),
    ('{"backends": ["x"], "endpoint_limits": {"x": null}, "pg": null}', "x", Limits()),
]  # fmt: skip


@pytest.mark.parametrize(("doc", "listener", "expected"), DECODES)
def test_go_decoding(doc: str, listener: str, expected: Limits) -> None:
    assert auth(listener, doc).user_limits == expected


def test_preset_names_are_normalised() -> None:
    grant = pg("x", "d", '{"backends": {"x": {"pg": {"databases": {"d": {"permissions": ["ReadOnly"]}}}}}}')
    assert grant is not None and grant.permissions == {"readonly"}


@pytest.mark.parametrize(
    "doc",
    [
        "{}",  # no backends: decoded by the legacy path, grants nothing
        '{"backends": null, "limits": {"max_conns": 1}}',
        '{"backends": {}}',
        '{"backends": []}',
    ],
)
def test_values_granting_nothing(doc: str) -> None:
    cap = parse_cap_value(json.loads(doc), "v")
    assert dict(cap.backends) == {}


def test_current_shape_ignores_legacy_fields() -> None:
    # CapRule.UnmarshalJSON uses the current decoder whenever backends is an object, and that
    # decoder has no pg or endpoint_limits at the top level.
    doc = """{"backends": {"x": {}},
              "pg": {"databases": {"*": {"permissions": ["admin"]}}},
              "endpoint_limits": {"x": {"max_conns": 1}}}"""
    result = auth("x", doc)
    assert result.listener_limits == Limits()
    assert result.pg is None and result.database_grant("any") is None


def test_legacy_shape_matches_caps_go() -> None:
    cap = parse_cap_value(json.loads(LEGACY_FULL), "v")
    assert set(cap.backends) == {"pg-main", "raw-mysql"}
    assert cap.backends["pg-main"].pg == cap.backends["raw-mysql"].pg  # one pg for all
    assert cap.backends["pg-main"].limits == Limits()
    assert cap.backends["raw-mysql"].limits == Limits(max_conns=2, max_conn_duration=1800.0)
    assert cap.limits == Limits(max_conns=10, max_bytes_per_conn=1000000)


# Values Waypoint cannot decode (tailcfg.UnmarshalCapJSON returns the json error and
# auth.Authorize refuses the connection): ferryman refuses the value too.
GO_DECODE_ERRORS: list[tuple[str, str]] = [
    ('{"backends": "x"}', "backends: expected an object"),
    ('{"backends": {"x": true}}', "backends.x: expected an object"),
    ('{"backends": [1]}', "backends[0]: expected a string"),
    ('{"backends": {"x": {}}, "limits": []}', "limits: expected an object"),
    (on_x('{"max_conns": "5"}'), "max_conns: expected a whole number"),
    (on_x('{"max_conns": 5.0}'), "max_conns: expected a whole number"),
    (on_x('{"max_conns": 1e3}'), "max_conns: expected a whole number"),
    (on_x('{"max_conns": true}'), "max_conns: expected a whole number"),
    (on_x('{"max_conns": 9223372036854775808}'), "too large"),
    (on_x('{"max_bytes_per_conn": 1.5e9}'), "max_bytes_per_conn"),
    (on_x('{"max_conn_duration": 3600}'), "not a duration"),
    (on_x('{"bandwidth": {"bytes": 1, "period": "1h"}}'), "bandwidth: expected a list"),
    (on_x('{"bandwidth": [{"bytes": "1", "period": 60}]}'), "not a duration"),
    ('{"backends": {"x": {"pg": []}}}', "pg: expected an object"),
    ('{"backends": {"x": {"pg": {"databases": []}}}}', "databases: expected an object"),
    ('{"backends": {"x": {"pg": {"databases": {"d": {"permissions": "readonly"}}}}}}', "expected a list"),
    ('{"backends": {"x": {"pg": {"databases": {"d": {"schemas": [1]}}}}}}', "schemas[0]: expected a string"),
    ('{"backends": {"x": {"pg": {"databases": {"d": {"sql": "GRANT"}}}}}}', "sql: expected a list"),
    ('{"backends": {"x": {"mongo": {"databases": {"d": {"permissions": [1]}}}}}}', "mongo.databases.d"),
    ('{"backends": {"x": {"k8s": {"user": 7}}}}', "k8s.user: expected a string"),
    ('{"backends": {"x": {"k8s": {"extra": {"k": "v"}}}}}', "k8s.extra.k: expected a list"),
    # legacy: pg and every endpoint_limits entry are decoded, listed or not
    ('{"backends": ["x"], "pg": "all"}', "pg: expected an object"),
    ('{"backends": ["x"], "endpoint_limits": {"y": {"max_conns": "1"}}}', "endpoint_limits.y.max_conns"),
    # the very first Waypoint shape had a single bandwidth object; current Waypoint rejects it
    ('{"backends": ["x"], "limits": {"bandwidth": {"bytes": 1, "period": "1h"}}}', "expected a list"),
]  # fmt: skip


@pytest.mark.parametrize(("doc", "message"), GO_DECODE_ERRORS)
def test_go_decode_errors(doc: str, message: str) -> None:
    with pytest.raises(GrantError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_cap_value(json.loads(doc), "v")


# --- deliberate differences (docs/waypoint.md) -------------------------------------------------


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        # byte sizes as strings, as Waypoint's docs write them (its decoder wants a number)
        ('{"max_bytes_per_conn": "10GB"}', Limits(max_bytes_per_conn=10 * GB)),
        (
            '{"bandwidth": [{"bytes": "50GiB", "period": "24h"}]}',
            Limits(bandwidth=(Bandwidth(50 << 30, DAY),)),
        ),
        # days and weeks (Waypoint: invalid duration, limit silently dropped)
        ('{"max_conn_duration": "7d"}', Limits(max_conn_duration=7 * 86400.0)),
        ('{"bandwidth": [{"bytes": 1, "period": "1w"}]}', Limits(bandwidth=(Bandwidth(1, 7 * 86400.0),))),
    ],
)  # fmt: skip
def test_ferryman_extensions(limits: str, expected: Limits) -> None:
    assert auth("x", f'{{"backends": {{"x": {{}}}}, "limits": {limits}}}').user_limits == expected


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        # Waypoint ignores each of these limits (mergeLimits) and lets the connection through
        # without it; ferryman refuses the value instead of granting more than was written.
        # TestMergeLimits_InvalidDurationIgnored
        ('{"max_conn_duration": "not-a-duration"}', "not a duration"),
        ('{"max_conn_duration": "90"}', "missing unit"),
        ('{"max_conn_duration": "-1h"}', "negative"),
        ('{"max_conn_duration": "2562048h"}', "too long"),  # beyond time.Duration
        ('{"max_conns": -1}', "negative"),
        ('{"max_bytes_per_conn": -5}', "negative"),
        # TestMergeLimits_BandwidthInvalidPeriodSkipped, ...NegativeBytesSkipped, ...EmptyPeriodSkipped
        ('{"bandwidth": [{"bytes": 1000000, "period": "not-a-duration"}]}', "not a duration"),
        ('{"bandwidth": [{"bytes": -100, "period": "1h"}]}', "negative"),
        ('{"bandwidth": [{"bytes": 1000000, "period": ""}]}', "not a duration"),
        ('{"bandwidth": [{"bytes": 1000000}]}', "needs both"),
    ],
)  # fmt: skip
def test_ferryman_refuses_what_waypoint_silently_drops(limits: str, message: str) -> None:
    with pytest.raises(GrantError, match=message):
        parse_cap_value(json.loads(f'{{"backends": {{"x": {{}}}}, "limits": {limits}}}'), "v")


def test_unknown_preset_is_refused_when_read() -> None:
    # Waypoint authorizes and then fails provisioning (provision.ExpandPresets, SQLSTATE 58000);
    # ferryman refuses the value up front. Raw GRANT fragments from Waypoint's pre-preset days
    # (internal/auth/auth_test.go) are unknown presets in current Waypoint too.
    doc = _pg_value('{"app_db": {"permissions": ["SELECT ON ALL TABLES IN SCHEMA public"]}}')
    with pytest.raises(GrantError, match="unknown preset"):
        parse_cap_value(json.loads(doc), "v")


def test_malformed_carried_value_drops_only_that_value() -> None:
    # Waypoint: one undecodable value makes tailcfg.UnmarshalCapJSON fail and the whole
    # connection is refused. ferryman drops (and logs) just that value.
    caps, problems = parse_cap_values(values(TCP_DOC, '{"backends": {"raw-mysql": {}}, "limits": 3}'), "ts")
    assert [list(c.backends) for c in caps] == [["raw-mysql"]]
    assert len(problems) == 1 and "limits: expected an object" in problems[0]


# --- the local policy file ------------------------------------------------------------------


def test_local_policy_accepts_waypoint_grant_syntax() -> None:
    # website/src/content/docs/acl/examples.md writes the capability under "cap" (a tailnet
    # policy writes "app"); "dst" names the Waypoint node and means nothing locally.
    policy_doc = """
    {
      "grants": [{
        "src": ["alice@example.com"],
        "dst": ["tag:waypoint"],
        "cap": {
          "redo.com/cap/waypoint": [{
            "limits": { "max_conns": 5 },
            "backends": { "raw-mysql": {} }
          }]
        }
      }]
    }
    """
    policy = parse_policy(json.loads(policy_doc), capability=WAYPOINT_CAP, file="p.json")
    result = authorize(ALICE, IP, "raw-mysql", policy)
    assert result.user_limits == Limits(max_conns=5)
    assert result.origins == ("p.json grants[0].cap['redo.com/cap/waypoint'][0]",)


def test_local_policy_app_and_cap_both_count() -> None:
    doc = {
        "grants": [
            {
                "src": ["*"],
                "app": {WAYPOINT_CAP: [{"backends": {"a": {}}}]},
                "cap": {WAYPOINT_CAP: [{"backends": {"b": {}}}]},
            }
        ]
    }
    policy = parse_policy(doc, capability=WAYPOINT_CAP)
    for listener in ("a", "b"):
        authorize(ALICE, IP, listener, policy)


def test_local_policy_errors_name_the_value() -> None:
    doc = {
        "grants": [
            {"src": ["*"], "cap": {WAYPOINT_CAP: [{"backends": {"a": {"limits": {"max_conns": -1}}}}]}}
        ]
    }
    with pytest.raises(ConfigError, match=r"grants\[0\]\.cap\['redo\.com/cap/waypoint'\]\[0\]\.backends\.a"):
        parse_policy(doc, capability=WAYPOINT_CAP, file="p.json")


def test_local_and_carried_grants_combine() -> None:
    # A Tailscale identity's own CapMap values and matching local values are merged like
    # several CapMap values: union of permissions, strictest limits.
    doc = {"grants": [{"src": ["alice@example.com"], "app": {WAYPOINT_CAP: [json.loads(DBA_EMERGENCY)]}}]}
    policy = parse_policy(doc, capability=WAYPOINT_CAP, file="p.json")
    caps, _ = parse_cap_values(values(BACKEND_TEAM), "tailscale CapMap")
    result = authorize(ALICE, IP, "pg-main", policy, caps)
    assert result.user_limits == Limits(max_conns=10, max_conn_duration=3600.0)
    grant = result.database_grant("myapp")
    assert grant is not None and grant.permissions == {"readwrite", "readonly", "admin"}
    assert result.origins == ("tailscale CapMap[0]", "p.json grants[0].app['redo.com/cap/waypoint'][0]")
