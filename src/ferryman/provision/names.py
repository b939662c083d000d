"""Role names and the effective preset: pure functions, no I/O (SPEC 5.3, 5.4).

Owns: how a caller's ``(user, node, database[, preset])`` becomes a PostgreSQL role name, the
names of the preset group roles and of the marker role, which preset a connection gets
(:func:`effective_preset`), and which database entry of a grant applies
(:func:`grant_for_database`).

Must not: talk to a database, or let any byte of a client- or identity-supplied string reach a
role name other than through :func:`sanitize` (names are also always quoted when used; the
sanitising is for readability and for backends that fold case, not for safety).

Naming rules, exactly:

* ``sanitize(text)``: lower-case (``str.lower``), then every character outside ``[a-z0-9_]``
  becomes one ``_``. Runs are *not* collapsed, so ``a.b`` and ``a..b`` stay distinct; the
  mapping is still lossy (``a.b`` and ``a_b`` meet), and the provisioner refuses a connection
  whose role is already registered to a different identity rather than share it.
* user role: ``prefix + sanitize(user) + "_" + sanitize(node) + "_" + sanitize(database)``,
  plus ``"_" + preset`` when the connection lowered its preset.
* group role, per (database, schema, preset): ``prefix + preset + "." + sanitize(database) +
  "." + sanitize(schema) + "." + h`` where ``h`` is 8 hex digits of the SHA-256 of the *raw*
  database and schema names. The dots keep group names out of the user-role namespace (a
  sanitised name never holds a dot; CockroachDB allows dots in role names), and ``h`` keeps two
  databases whose names sanitise alike (``a.b`` / ``a_b``) from sharing a group and so each
  other's grants.
* marker role: ``prefix + "managed"``; a user role always holds two ``_`` after the prefix, and
  this name none, so they cannot meet.
* any name over 63 *bytes* (PostgreSQL's NAMEDATALEN - 1): the first 54 bytes, ``"_"``, and 8
  hex digits of the SHA-256 of the full untruncated name. The same caller always gets the same
  name; two callers whose names differ only after the cut get different hashes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

from ferryman.errors import InvalidParameter
from ferryman.policy.model import PRESETS, PgDatabaseGrant

MAX_NAME_BYTES = 63
"""PostgreSQL truncates identifiers to NAMEDATALEN - 1 = 63 bytes (docs: "Identifiers")."""
HASH_HEX = 8
CUT = MAX_NAME_BYTES - HASH_HEX - 1
DEFAULT_PREFIX = "fm_"
DEFAULT_SCHEMA = "public"

_UNSAFE = re.compile(r"[^a-z0-9_]")
_PREFIX = re.compile(r"[a-z_][a-z0-9_]{0,23}")
_RANK = {name: rank for rank, name in enumerate(PRESETS)}


def sanitize(text: str) -> str:
    """Lower-case ``text`` and replace each character outside ``[a-z0-9_]`` with ``_``."""
    return _UNSAFE.sub("_", text.lower())


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:HASH_HEX]


def fit(name: str) -> str:
    """``name`` if it fits 63 bytes, else its first 54 bytes + ``_`` + 8 hex of its hash.

    Callers pass ASCII names (sanitised parts), so cutting bytes never splits a character.
    """
    if len(name.encode("utf-8")) <= MAX_NAME_BYTES:
        return name
    return name[:CUT] + "_" + _digest(name)


def check_prefix(prefix: str) -> str:
    """Validate a configured role prefix: ``[a-z_][a-z0-9_]{0,23}``, not ``pg_``.

    Raises ``ValueError`` (configuration code turns it into a ConfigError). The length bound
    leaves room in 63 bytes for a readable part of the name; ``pg_`` is reserved by
    PostgreSQL and CockroachDB for system roles.
    """
    if not _PREFIX.fullmatch(prefix) or prefix.startswith(("pg_", "crdb_internal")):
        raise ValueError(f"role prefix {prefix!r} must match [a-z_][a-z0-9_]{{0,23}} and not start with pg_")
    return prefix


def role_name(prefix: str, user: str, node: str, database: str, lowered_preset: str | None = None) -> str:
    """The login role for one caller in one database (see the module docstring)."""
    name = prefix + sanitize(user) + "_" + sanitize(node) + "_" + sanitize(database)
    if lowered_preset is not None:
        name += "_" + sanitize(lowered_preset)
    return fit(name)


def group_name(prefix: str, database: str, schema: str, preset: str) -> str:
    """The NOLOGIN role holding ``preset``'s object grants in ``database``.``schema``."""
    raw = _digest(database + "\x00" + schema)
    return fit(f"{prefix}{sanitize(preset)}.{sanitize(database)}.{sanitize(schema)}.{raw}")


def marker_name(prefix: str) -> str:
    """The NOLOGIN role every managed login role is a direct member of."""
    return prefix + "managed"


def parse_presets(text: str | None) -> frozenset[str] | None:
    """A per-connection request (``"readonly"``, ``"readonly, readwrite"``) → preset names.

    ``None`` or an empty/blank list means "no request". Raises :class:`InvalidParameter`
    (22023) for a name that is not a preset.
    """
    if text is None:
        return None
    names = {part.strip().lower() for part in text.split(",")} - {""}
    unknown = sorted(names - set(PRESETS))
    if unknown:
        raise InvalidParameter(
            f"unknown preset {unknown[0]!r} in ferryman.presets (valid: {', '.join(PRESETS)})"
        )
    return frozenset(names) or None


def strongest(presets: frozenset[str] | set[str]) -> str | None:
    """The strongest known preset in ``presets`` (readonly < readwrite < admin), or ``None``."""
    known = [p for p in presets if p in _RANK]
    return max(known, key=_RANK.__getitem__) if known else None


def effective_preset(granted: frozenset[str] | set[str], requested: str | None) -> tuple[str | None, bool]:
    """The preset a connection gets, and whether it was lowered below the grant.

    The strongest granted preset, capped by the strongest preset the client listed. A cap at or
    above the grant changes nothing (``lowered`` is False): the request is a ceiling, never a
    demand, so a client that always sends ``ferryman_presets=readwrite`` still connects where
    it only holds ``readonly``. SPEC 5.3: "lowered (never raised)". ``None`` as the preset
    means the grant names no preset (CONNECT and raw SQL only); a request cannot add one.

    Raises :class:`InvalidParameter` (22023) for an unknown preset name in the request.
    """
    cap = strongest(parse_presets(requested) or frozenset())
    best = strongest(granted)
    if best is None or cap is None or _RANK[cap] >= _RANK[best]:
        return best, False
    return cap, True


def grant_for_database(pg: Mapping[str, PgDatabaseGrant], database: str) -> PgDatabaseGrant | None:
    """The grant entry for ``database``: its exact name beats ``"*"``; ``None`` when neither.

    The caller turns ``None`` into :class:`~ferryman.errors.PermissionDenied` (42501).
    """
    exact = pg.get(database)
    if exact is not None:
        return exact
    return pg.get("*")
