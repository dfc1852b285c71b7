"""Shared test fixtures: paths to ../shared/data and a scratch run directory."""

from __future__ import annotations

from pathlib import Path

import pytest

# the server and cache fixtures of llm_servers.py, registered once: session fixtures (the llama.cpp server, the
# fault server, the converted transformers model) are then shared by every module instead of made per module
pytest_plugins = ["llm_servers"]

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"../shared/data not found at {SHARED_DATA}: tests read the reference datasets from there")
    return SHARED_DATA
