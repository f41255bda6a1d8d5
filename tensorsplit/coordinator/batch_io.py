"""JSONL in and out for `tensorsplit batch`: validated input lines, resumable output.

Input: one JSON object a line, {"id": ..., "prompt": "..."} or {"id": ..., "messages": [...]},
with optional per-line sampling fields. Each bad line is reported with its line number.
Output: one line per finished prompt, appended and flushed as it finishes. A rerun skips the
ids already in the output; a line cut short by a crash is dropped first, so the file always
holds whole JSON lines, one per id.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import TensorsplitError

# field -> (accepted JSON types, description for the message)
SAMPLING_FIELDS = {
    "max_tokens": ((int,), "an integer"),
    "temperature": ((int, float), "a number"),
    "top_k": ((int,), "an integer"),
    "top_p": ((int, float), "a number"),
    "min_p": ((int, float), "a number"),
    "repeat_penalty": ((int, float), "a number"),
    "repeat_last_n": ((int,), "an integer"),
    "seed": ((int,), "an integer"),
    "stop": ((str, list), "a string or a list of strings"),
}
KNOWN_FIELDS = {"id", "prompt", "messages", *SAMPLING_FIELDS}


@dataclass
class InputLine:
    line_no: int
    id: str | int
    prompt: str | None
    messages: list | None
    options: dict          # the sampling fields given on this line


@dataclass
class BadLine:
    line_no: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line_no}: {self.reason}"


def parse_line(line_no: int, text: str) -> InputLine | BadLine:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return BadLine(line_no, f"not valid JSON ({e.msg} at column {e.colno})")
    if not isinstance(obj, dict):
        return BadLine(line_no, f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - KNOWN_FIELDS)
    if unknown:
        return BadLine(line_no, f"unknown field(s) {', '.join(map(repr, unknown))}; known: "
                                f"{', '.join(sorted(KNOWN_FIELDS))}")
    if "id" not in obj:
        return BadLine(line_no, "no 'id' (every line needs one, so that a rerun can skip finished prompts)")
    if not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
        return BadLine(line_no, f"'id' must be a string or an integer, got {type(obj['id']).__name__}")
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        return BadLine(line_no, "give exactly one of 'prompt' or 'messages'")
    if has_prompt:
        if not isinstance(obj["prompt"], str):
            return BadLine(line_no, f"'prompt' must be a string, got {type(obj['prompt']).__name__}")
        if not obj["prompt"].strip():
            return BadLine(line_no, "'prompt' is empty")
    else:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            return BadLine(line_no, "'messages' must be a non-empty list of {\"role\": str, \"content\": str}")
    options = {}
    for key, (types, what) in SAMPLING_FIELDS.items():
        if key not in obj:
            continue
        v = obj[key]
        if isinstance(v, bool) or not isinstance(v, types) or (isinstance(v, float) and not math.isfinite(v)):
            return BadLine(line_no, f"'{key}' must be {what}, got {json.dumps(v)[:40]}")
        if key == "stop" and isinstance(v, list) and not all(isinstance(s, str) and s for s in v):
            return BadLine(line_no, "'stop' must be a string or a list of non-empty strings")
        options[key] = [v] if key == "stop" and isinstance(v, str) else v
    return InputLine(line_no, obj["id"], obj.get("prompt"), obj.get("messages"), options)


def read_input(path: Path) -> Iterator[InputLine | BadLine]:
    """Every non-blank line of the input, parsed; duplicate ids are bad lines."""
    seen: dict = {}
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise TensorsplitError(f"{path}: {e.strerror}") from None
    with f:
        for no, text in enumerate(f, 1):
            if not text.strip():
                continue
            item = parse_line(no, text)
            if isinstance(item, InputLine):
                key = json.dumps(item.id)
                if key in seen:
                    item = BadLine(no, f"id {key} repeats line {seen[key]}")
                else:
                    seen[key] = no
            yield item


def done_ids(out_path: Path) -> set[str]:
    """ids (as JSON text) already in the output. Drops a last line cut short by a crash."""
    if not out_path.exists():
        return set()
    data = out_path.read_bytes()
    keep = data.rfind(b"\n") + 1          # everything up to the last complete line
    if keep < len(data):
        with open(out_path, "r+b") as f:
            f.truncate(keep)
    ids = set()
    for no, line in enumerate(data[:keep].splitlines(), 1):
        try:
            ids.add(json.dumps(json.loads(line)["id"]))
        except (ValueError, KeyError, TypeError):
            raise TensorsplitError(f"{out_path}: line {no} is not a tensorsplit result line; "
                                   "refusing to append to it") from None
    return ids


class OutputWriter:
    """Appends one JSON line per result and flushes it to the OS at once."""

    def __init__(self, path: Path):
        self.f = open(path, "ab")

    def write(self, record: dict) -> None:
        self.f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()
