"""Suite-wide settings: run every async test on uvloop (what ``ferryman serve`` uses) and
register hypothesis profiles (``HYPOTHESIS_PROFILE=fast|deep``)."""

from __future__ import annotations

import os

import pytest
import uvloop
from hypothesis import HealthCheck, settings

# One registration for the whole suite: hypothesis profiles are process-wide.
for _name, _examples in (("fast", 100), ("deep", 5_000)):
    settings.register_profile(
        _name,
        max_examples=_examples,
        deadline=None,
        database=None,  # keep .hypothesis/ out of the work tree
        suppress_health_check=[HealthCheck.too_slow],
    )
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, object]:
    return {"uvloop": uvloop.new_event_loop}
