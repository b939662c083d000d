"""Role names, the effective preset and database lookup: pure, table-driven and hypothesis."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as stt

from ferryman.errors import InvalidParameter
from ferryman.policy.model import PRESETS, PgDatabaseGrant
from ferryman.provision import names
from ferryman.provision.names import (
    effective_preset,
    grant_for_database,
    group_name,
    marker_name,
    role_name,
    sanitize,
)

SAFE = re.compile(r"[a-z0-9_]+")


@pytest.mark.parametrize(
    ("user", "node", "db", "lowered", "expected"),
    [
        ("alice@example.com", "laptop", "appdb", None, "fm_alice_example_com_laptop_appdb"),
        ("Alice@Example.COM", "", "appdb", None, "fm_alice_example_com__appdb"),
        ("bob", "mac-book.local", "app db", "readonly", "fm_bob_mac_book_local_app_db_readonly"),
        ('alice"; DROP ROLE x; --@evil', "n", "d", None, "fm_alice___drop_role_x_____evil_n_d"),
        ("zoë", "nöde", "dä", None, "fm_zo__n_de_d_"),
        ("a..b", "n", "d", None, "fm_a__b_n_d"),  # runs are not collapsed
    ],
)
def test_role_name_examples(user: str, node: str, db: str, lowered: str | None, expected: str) -> None:
    assert role_name("fm_", user, node, db, lowered) == expected


def test_long_names_are_cut_and_hashed() -> None:
    user, node, db = "a" * 40 + "@example.com", "workstation-" * 4, "analytics_" * 5
    name = role_name("fm_", user, node, db)
    assert len(name.encode()) == 63
    full = "fm_" + sanitize(user) + "_" + sanitize(node) + "_" + sanitize(db)
    assert name.startswith(full[:54]) and name[54] == "_" and re.fullmatch(r"[0-9a-f]{8}", name[55:])
    # Same caller, same name; a difference past the cut still changes the name.
    assert role_name("fm_", user, node, db) == name
    assert role_name("fm_", user, node, db + "x") != name
    assert role_name("fm_", user, node, db, "readonly") != name


def test_group_and_marker_names() -> None:
    g = group_name("fm_", "appdb", "public", "readonly")
    assert re.fullmatch(r"fm_readonly\.appdb\.public\.[0-9a-f]{8}", g)
    # Databases that sanitise alike still get different groups (they must not share grants).
    assert group_name("fm_", "a.b", "public", "readonly") != group_name("fm_", "a_b", "public", "readonly")
    assert group_name("fm_", "appdb", "public", "admin") != g
    long = group_name("fm_", "d" * 63, "s" * 63, "readwrite")
    assert len(long.encode()) == 63 and "." in long
    assert marker_name("fm_") == "fm_managed"
    # A person's role never holds a dot, so it can never be a group's or the marker's name.
    assert "." not in role_name("fm_", "readonly", "appdb", "public")
    assert role_name("fm_", "managed", "", "") != marker_name("fm_")


@pytest.mark.parametrize("prefix", ["", "PG_", "pg_x_", "1abc", "a-b", "x" * 25])
def test_bad_prefixes(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        names.check_prefix(prefix)


@pytest.mark.parametrize("prefix", ["fm_", "waypoint_", "_x", "a"])
def test_good_prefixes(prefix: str) -> None:
    assert names.check_prefix(prefix) == prefix


idents = stt.text(min_size=0, max_size=120)


@given(idents, idents, idents, stt.sampled_from([None, "readonly", "readwrite", "admin"]))
def test_role_name_properties(user: str, node: str, db: str, lowered: str | None) -> None:
    name = role_name("fm_", user, node, db, lowered)
    assert len(name.encode("utf-8")) <= 63
    assert SAFE.fullmatch(name)
    assert name == role_name("fm_", user, node, db, lowered)


@given(stt.text(alphabet="abcdefgh0123456789_", min_size=70, max_size=120), stt.text(min_size=1, max_size=5))
def test_differences_past_the_cut_change_the_name(user: str, tail: str) -> None:
    a = role_name("fm_", user, "n", "d")
    b = role_name("fm_", user + tail, "n", "d")
    assert a[:54] == b[:54]
    assert a != b


@given(idents, idents, stt.sampled_from(["readonly", "readwrite", "admin"]))
def test_group_name_properties(db: str, schema: str, preset: str) -> None:
    name = group_name("fm_", db, schema, preset)
    assert len(name.encode()) <= 63
    assert re.fullmatch(r"[a-z0-9_.]+", name)


# --- effective preset ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("granted", "requested", "expected"),
    [
        ({"readonly"}, None, ("readonly", False)),
        ({"readonly", "admin"}, None, ("admin", False)),
        ({"admin"}, "readonly", ("readonly", True)),
        ({"admin"}, "readonly,readwrite", ("readwrite", True)),  # the strongest listed is the cap
        ({"admin"}, " ReadOnly , ", ("readonly", True)),
        ({"readwrite"}, "readwrite", ("readwrite", False)),  # equal cap: not lowered, same role
        ({"readonly"}, "admin", ("readonly", False)),  # a cap above the grant is no cap (never raised)
        ({"readonly"}, "", ("readonly", False)),
        (set(), "readonly", (None, False)),  # no preset granted: a request cannot add one
    ],
)
def test_effective_preset(
    granted: set[str], requested: str | None, expected: tuple[str | None, bool]
) -> None:
    assert effective_preset(granted, requested) == expected


@pytest.mark.parametrize("requested", ["superuser", "readonly,root", "read-only"])
def test_unknown_requested_preset_is_22023(requested: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        effective_preset({"admin"}, requested)
    assert info.value.sqlstate == "22023"


@given(
    stt.sets(stt.sampled_from(PRESETS)),
    stt.none() | stt.lists(stt.sampled_from(PRESETS), max_size=3).map(",".join),
)
def test_effective_preset_never_raises_the_grant(granted: set[str], requested: str | None) -> None:
    preset, lowered = effective_preset(granted, requested)
    best = names.strongest(granted)
    if best is None:
        assert preset is None
        return
    assert preset is not None
    assert PRESETS.index(preset) <= PRESETS.index(best)
    assert lowered == (preset != best)


def test_grant_for_database() -> None:
    exact, star = PgDatabaseGrant(frozenset({"readwrite"})), PgDatabaseGrant(frozenset({"readonly"}))
    assert grant_for_database({"appdb": exact, "*": star}, "appdb") is exact
    assert grant_for_database({"appdb": exact, "*": star}, "other") is star
    assert grant_for_database({"appdb": exact}, "other") is None
    assert grant_for_database({}, "appdb") is None
