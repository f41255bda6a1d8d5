"""Every fixture the suite reads is present: a golden file per known model, and the texts they name.
The tests that read them skip when one is absent (their own guard); this makes the absence a
failure of the suite."""
from __future__ import annotations

import json

import pytest

from conftest import fixture_path
from tensorsplit import models


def _text_files(node) -> set[str]:
    if isinstance(node, dict):
        return {v for k, v in node.items() if k == "text_file"} | {f for v in node.values() for f in _text_files(v)}
    if isinstance(node, list):
        return {f for v in node for f in _text_files(v)}
    return set()


@pytest.mark.parametrize("model", sorted(models.KNOWN))
def test_golden_fixture_and_its_texts_are_present(model):
    golden = json.loads(fixture_path(f"{model}_golden.json").read_text(encoding="utf-8"))
    texts = _text_files(golden)
    assert texts, "the golden file names no text"
    for name in texts:
        fixture_path(name)


def test_a_missing_fixture_fails(tmp_path):
    with pytest.raises(pytest.fail.Exception, match="nope.json is missing"):
        fixture_path("nope.json")
