"""Shared fixtures: the real models (fetched once into the tensorsplit cache) and paths; files of
tests/fixtures/, whose absence fails a test instead of skipping it."""
from __future__ import annotations

from pathlib import Path

import pytest

from tensorsplit import models

FIXTURES = Path(__file__).parent / "fixtures"


def fixture_path(name: str) -> Path:
    """tests/fixtures/<name>. The fixtures are part of the suite (scripts/make_golden.py writes
    them): a missing one fails the test that needs it, never skips it."""
    path = FIXTURES / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: the fixtures are part of the suite (scripts/make_golden.py writes "
                    "the llama.cpp ones)", pytrace=False)
    return path


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return models.fetch("smollm2")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    return models.fetch("gemma3-270m")
