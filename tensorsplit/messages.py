"""The one way tensorsplit speaks to the person running it: `say("...")` writes "tensorsplit: ..." as one
line on stderr, flushed (stdout is the model's output). Errors take the same form, from the CLI."""
from __future__ import annotations

import sys


def say(message: str) -> None:
    print(f"tensorsplit: {message}", file=sys.stderr, flush=True)
