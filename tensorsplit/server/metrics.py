"""The server's counters, and their Prometheus text exposition (GET /metrics)."""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

# upper bounds of the step-sequences histogram's buckets: how many requests one step served
SEQUENCE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class Metrics:
    requests: Counter = field(default_factory=Counter)   # (endpoint, status code) -> count
    prompt_tokens: int = 0
    generation_tokens: int = 0
    cancelled: int = 0
    running: int = 0
    waiting: int = 0
    step_seconds_sum: float = 0.0
    step_count: int = 0
    step_sequences: Counter = field(default_factory=Counter)   # sequences in a step -> steps
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[endpoint, status] += 1

    def observe_step(self, seconds: float, sequences: int) -> None:
        """One engine step that took `seconds` and fed tokens for `sequences` requests (the rows
        batched together: one per decoding request, one per prompt chunk)."""
        with self._lock:
            self.step_seconds_sum += seconds
            self.step_count += 1
            self.step_sequences[sequences] += 1

    def exposition(self) -> str:
        """Prometheus text format 0.0.4."""
        with self._lock:
            lines = ["# HELP tensorsplit_requests_total HTTP requests, by endpoint and status code.",
                     "# TYPE tensorsplit_requests_total counter"]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'tensorsplit_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            for name, kind, help_, value in [
                ("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", self.prompt_tokens),
                ("generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens),
                ("requests_cancelled_total", "counter", "Requests whose client went away.", self.cancelled),
                ("requests_running", "gauge", "Requests holding a KV-cache slot.", self.running),
                ("requests_waiting", "gauge", "Requests queued for a slot.", self.waiting),
            ]:
                lines += [f"# HELP tensorsplit_{name} {help_}", f"# TYPE tensorsplit_{name} {kind}",
                          f"tensorsplit_{name} {value}"]
            lines += ["# HELP tensorsplit_step_seconds Time of one engine step (a forward on every rank).",
                      "# TYPE tensorsplit_step_seconds summary",
                      f"tensorsplit_step_seconds_sum {self.step_seconds_sum:.6f}",
                      f"tensorsplit_step_seconds_count {self.step_count}",
                      "# HELP tensorsplit_step_sequences Requests batched into one engine step.",
                      "# TYPE tensorsplit_step_sequences histogram"]
            for le in SEQUENCE_BUCKETS:
                n = sum(c for k, c in self.step_sequences.items() if k <= le)
                lines.append(f'tensorsplit_step_sequences_bucket{{le="{le}"}} {n}')
            total = sum(self.step_sequences.values())
            lines += [f'tensorsplit_step_sequences_bucket{{le="+Inf"}} {total}',
                      f"tensorsplit_step_sequences_sum {sum(k * c for k, c in self.step_sequences.items())}",
                      f"tensorsplit_step_sequences_count {total}"]
            return "\n".join(lines) + "\n"
