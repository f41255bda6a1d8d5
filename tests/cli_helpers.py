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


def start_cli(*args: str, env: dict | None = None, stdin=None):
    """Popen of the real command, text mode, stdout and stderr piped."""
    import time  # noqa: F401
    return subprocess.Popen([sys.executable, "-m", "tensorsplit", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=stdin, text=True, cwd=ROOT,
                            env={**os.environ, **(env or {})})


def wait_for_workers(launcher_pid: int, n: int, timeout: float = 60) -> dict[int, int]:
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        w = workers_of(launcher_pid)
        if len(w) == n:
            return w
        time.sleep(0.05)
    raise AssertionError(f"{n} workers did not appear within {timeout} s: {workers_of(launcher_pid)}")


def assert_all_gone(launcher_pid: int, within: float = 5) -> None:
    import time
    deadline = time.monotonic() + within
    while workers_of(launcher_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert workers_of(launcher_pid) == {}, f"orphaned workers: {workers_of(launcher_pid)}"
