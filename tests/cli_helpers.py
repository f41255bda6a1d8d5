"""Run the real `tensorsplit` command in subprocesses, and find its processes through /proc."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tensorsplit", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=ROOT)


def environ_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def workers_of(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the live worker processes started by this launcher."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        env = environ_of(int(entry.name))
        if env.get("TENSORSPLIT_LAUNCHER_PID") == str(launcher_pid) and "RANK" in env:
            try:
                state = Path(f"/proc/{entry.name}/stat").read_text().split(") ")[1][0]
            except OSError:
                continue
            if state != "Z":
                out[int(env["RANK"])] = int(entry.name)
    return out
