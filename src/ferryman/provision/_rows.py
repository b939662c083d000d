"""Typed views of the catalog and registry rows the provisioner reads.

Owns: turning ``tuple[object, ...]`` rows (column order fixed by ``statements.ROLE_STATE`` and
``statements.Registry.select``) into frozen values. Must not: query anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class RoleState:
    """A role as ``statements.ROLE_STATE`` sees it."""

    can_login: bool
    managed: bool
    member_of: tuple[str, ...]

    @staticmethod
    def parse(row: tuple[object, ...] | None) -> RoleState | None:
        if row is None:
            return None
        members = row[3] if isinstance(row[3], list) else []
        return RoleState(bool(row[0]), bool(row[2]), tuple(str(m) for m in members))


@dataclass(frozen=True, slots=True)
class RegistryRow:
    """One registry row (``Registry.select`` column order)."""

    login: str
    node: str
    database: str
    cap: str | None
    key_id: str | None
    epoch: int
    valid_until: datetime | None
    raw_sql: tuple[str, ...]

    @staticmethod
    def parse(row: tuple[object, ...] | None) -> RegistryRow | None:
        if row is None:
            return None
        login, node, database, cap, key_id, epoch, valid_until, raw = row
        return RegistryRow(
            str(login or ""),
            str(node or ""),
            str(database or ""),
            str(cap) if cap is not None else None,
            str(key_id) if key_id is not None else None,
            int(epoch) if isinstance(epoch, int) else 0,
            valid_until if isinstance(valid_until, datetime) else None,
            tuple(str(t) for t in raw) if isinstance(raw, list) else (),
        )
