"""Suite-wide settings: run every async test on uvloop (what ``ferryman serve`` uses) and
register hypothesis profiles (``HYPOTHESIS_PROFILE=fast|deep``)."""

from __future__ import annotations

import os

import pytest
import uvloop
from hypothesis import settings

settings.register_profile("fast", max_examples=100, deadline=None)
settings.register_profile("deep", max_examples=100_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, object]:
    return {"uvloop": uvloop.new_event_loop}
