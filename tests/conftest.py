"""Shared fixtures: the real models (fetched once into the tensorsplit cache) and paths."""
from __future__ import annotations

from pathlib import Path

import pytest

from tensorsplit import models

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return models.fetch("smollm2")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    return models.fetch("gemma3-270m")
