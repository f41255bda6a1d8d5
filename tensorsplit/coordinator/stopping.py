"""When a sequence ends, and how much of its text is safe to stream so far.

A stop string may arrive split over several tokens, so text that could still turn into a stop
string (a suffix of the text so far that is a prefix of some stop string) is held back until the
next tokens decide it; the rest is emitted at once. A stop string is never partially emitted.

Finish reasons, checked in this order for each token:
  "eos"    the token is an end-of-generation token; its own text is not emitted.
  "stop"   a stop string appeared; only the text before its first occurrence is emitted (the stop
           string and anything after it are dropped).
  "length" max_tokens tokens have been pushed, this one included (max_tokens < 0: no limit).
On every finish the held-back text that precedes it is released by that push (it can no longer
become a stop string), so flush() is "" afterwards; calling flush() anyway is harmless.
"""
from __future__ import annotations

from typing import Collection, Sequence


class StopChecker:
    """Decides when a sequence ends and how much text is safe to stream."""

    def __init__(self, eog_ids: Collection[int], stop_strings: Sequence[str], max_tokens: int):
        self.eog_ids = frozenset(int(t) for t in eog_ids)
        self.stop_strings = tuple(dict.fromkeys(s for s in stop_strings if s))  # empty ones never match
        self.max_tokens = max_tokens
        self.n_tokens = 0
        self.finish_reason: str | None = None
        self.stop_string = ""       # the stop string that ended the sequence (finish "stop")
        self._held = ""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, token_id: int, text: str) -> tuple[str, str | None]:
        """Take one generated token and its newly decoded text (may be ""); return (text safe to
        emit now, finish reason or None)."""
        assert self.finish_reason is None, "push() after the sequence finished"
        self.n_tokens += 1

        if token_id in self.eog_ids:
            return self._finish("eos", self._held)

        buf = self._held + text
        # the earliest occurrence of any stop string (held text never holds a whole one)
        cut, stop = min(((i, s) for s in self.stop_strings if (i := buf.find(s)) >= 0), default=(-1, ""))
        if cut >= 0:
            self.stop_string = stop
            return self._finish("stop", buf[:cut])

        if 0 <= self.max_tokens <= self.n_tokens:
            return self._finish("length", buf)

        hold = self._longest_partial(buf)
        self._held = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], None

    def flush(self) -> str:
        """Text still held back, at the end (a would-be stop string that never completed)."""
        out, self._held = self._held, ""
        return out

    def _finish(self, reason: str, out: str) -> tuple[str, str]:
        self.finish_reason = reason
        self._held = ""
        return out, reason

    def _longest_partial(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best
