"""Shared fixtures: the real models (fetched once into the tensorsplit cache) and paths; files of
tests/fixtures/, whose absence fails a test instead of skipping it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels (tensorsplit/kernels/gpu) run under Triton's interpreter, on CPU
# tensors; it must be chosen before triton decorates the first kernel, so before any test imports them
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tensorsplit import models
from tensorsplit.worker.main import CHECK_PLAN_ENV

# Every world the suite starts checks that each rank holds the bytes its world's plan said (weights and
# KV cache, within 1%; worker/main.py check_allocation): the plan `info` prints is the one ranks hold
os.environ[CHECK_PLAN_ENV] = "1"

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
