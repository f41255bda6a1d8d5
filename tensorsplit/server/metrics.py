"""The server's counters, and their Prometheus text exposition (GET /metrics)."""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field


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
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[endpoint, status] += 1

    def observe_step(self, seconds: float) -> None:
        with self._lock:
            self.step_seconds_sum += seconds
            self.step_count += 1

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
                      f"tensorsplit_step_seconds_count {self.step_count}"]
            return "\n".join(lines) + "\n"
