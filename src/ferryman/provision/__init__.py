"""Per-person backend roles for PostgreSQL mode (SPEC 5.3 step 4).

``names`` (pure: role names, effective preset), ``statements`` (pure: every SQL statement and
the raw-grant validator), ``provisioner`` (:class:`Provisioner` on an admin connection pool),
``sweeper`` (dropping idle roles). Imports: ``errors``, ``policy.model``, psycopg, psycopg_pool.
"""

from __future__ import annotations

from .names import effective_preset, grant_for_database, group_name, marker_name, role_name
from .provisioner import Provisioner, ProvisionerSettings, RoleLogin
from .statements import RawGrant, RawSqlRejected, Registry, validate_raw_grant

__all__ = [
    "Provisioner",
    "ProvisionerSettings",
    "RawGrant",
    "RawSqlRejected",
    "Registry",
    "RoleLogin",
    "effective_preset",
    "grant_for_database",
    "group_name",
    "marker_name",
    "role_name",
    "validate_raw_grant",
]
