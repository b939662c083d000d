"""PostgreSQL-mode fixtures: a throwaway cluster per backend auth method, and a gateway in
front of it with a PostgreSQL listener."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway import GatewayFiles, grant
from tests.support.pgcluster import PgCluster, pg_cluster_factory  # noqa: F401 - fixture

APPDB = "appdb"


def pg_grant(databases: dict[str, Any], listener: str = "pg", **kw: Any) -> dict[str, Any]:
    return grant({listener: {"pg": {"databases": databases}}}, **kw)


def needs_psql() -> None:
    if shutil.which("psql") is None:
        pytest.skip("psql not installed")


def prepare(cluster: PgCluster) -> PgCluster:
    if not getattr(cluster, "_ferryman_prepared", False):
        cluster.create_database(APPDB)
        cluster.execute(
            "CREATE TABLE items (id serial PRIMARY KEY, name text)",
            "INSERT INTO items (name) VALUES ('first'), ('second')",
            dbname=APPDB,
        )
        cluster._ferryman_prepared = True  # type: ignore[attr-defined]
    return cluster


@pytest.fixture(scope="session")
def cluster(pg_cluster_factory: Callable[..., PgCluster]) -> PgCluster:  # noqa: F811
    return prepare(pg_cluster_factory("gateway"))


def pg_files(
    tmp_path: Path, cluster: PgCluster, *, prefix: str = "fm_", name: str = "pg", **listener: Any
) -> GatewayFiles:
    files = GatewayFiles(tmp_path)
    postgres = {
        "admin_user": "postgres",
        "admin_database": "postgres",
        "user_prefix": prefix,
        **listener.pop("postgres", {}),
    }
    files.add_listener(name, f"127.0.0.1:{cluster.port}", mode="postgres", postgres=postgres, **listener)
    return files


def listener_port(files: GatewayFiles, name: str = "pg") -> int:
    entry = next(item for item in files.listeners if item["name"] == name)
    return int(entry["listen"].rsplit(":", 1)[1])
