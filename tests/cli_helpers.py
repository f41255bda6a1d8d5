"""Run the real `tensorsplit` command in subprocesses, and find its processes through /proc."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 240, env: dict | None = None, stdin_text: str | None = None,
            ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tensorsplit", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=ROOT, input=stdin_text)


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


class PipeReader:
    """Reads a child's pipe on a thread, so that a test can wait for what the child printed with a
    deadline (a blocking `proc.stdout.read(1)` hangs CI when the child prints nothing)."""

    def __init__(self, pipe, name: str = "output"):
        self.name, self._chunks, self._lock = name, [], threading.Lock()
        self.closed = threading.Event()
        self._fd = pipe.fileno()
        self._thread = threading.Thread(target=self._pump, daemon=True, name=f"read {name}")
        self._thread.start()

    def _pump(self) -> None:
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            with self._lock:
                self._chunks.append(chunk)
        self.closed.set()

    def text(self) -> str:
        with self._lock:
            return b"".join(self._chunks).decode(errors="replace")

    def wait_for(self, condition: str | Callable[[str], bool], timeout: float, what: str | None = None) -> str:
        """Wait until the text read so far contains `condition` (a string) or satisfies it (a
        predicate); fail with everything read so far when `timeout` seconds pass first, or when the
        pipe closes without it."""
        test = (lambda s: condition in s) if isinstance(condition, str) else condition
        deadline = time.monotonic() + timeout
        while True:
            closed = self.closed.is_set()
            text = self.text()
            if test(text):
                return text
            if closed:
                raise AssertionError(f"{self.name} closed before {what or repr(condition)} appeared: {text!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what or repr(condition)} on {self.name} within {timeout:g} s: {text!r}")
            time.sleep(0.05)

    def join(self, timeout: float = 10) -> str:
        """Everything, once the child has closed the pipe."""
        self._thread.join(timeout)
        return self.text()


class Child:
    """A started command with both pipes read on threads: `out` and `err` are PipeReaders."""

    def __init__(self, args: list[str], env: dict | None = None, stdin=None):
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=stdin, cwd=ROOT,
                                     env={**os.environ, **(env or {})})
        self.pid = self.proc.pid
        self.out, self.err = PipeReader(self.proc.stdout, "stdout"), PipeReader(self.proc.stderr, "stderr")

    def finish(self, within: float) -> tuple[int, str, float]:
        """Wait at most `within` seconds for the exit: (exit code, stderr, seconds waited). On the
        deadline the child is killed and the test fails."""
        t0 = time.monotonic()
        try:
            code = self.proc.wait(timeout=within)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running after {within:g} s; stderr: {self.err.text()!r}") from None
        took = time.monotonic() - t0
        self.out.join()
        return code, self.err.join(), took

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_cli(*args: str, env: dict | None = None, stdin=None) -> Child:
    """The real command, started; its stdout and stderr are read on threads (Child.out, Child.err)."""
    return Child([sys.executable, "-m", "tensorsplit", *args], env=env, stdin=stdin)


def wait_for_workers(launcher_pid: int, n: int, timeout: float = 120) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        w = workers_of(launcher_pid)
        if len(w) == n:
            return w
        time.sleep(0.05)
    raise AssertionError(f"{n} workers did not appear within {timeout} s: {workers_of(launcher_pid)}")


def assert_all_gone(launcher_pid: int, within: float = 10) -> None:
    """No worker of the job is left, and no shared-memory segment name of the job (comm/shm.py)."""
    deadline = time.monotonic() + within
    while workers_of(launcher_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert workers_of(launcher_pid) == {}, f"orphaned workers: {workers_of(launcher_pid)}"
    left = list(Path("/dev/shm").glob(f"tensorsplit-{launcher_pid}-*"))
    assert not left, f"shared-memory segments left: {left}"


def assert_pids_gone(pids, within: float = 10) -> None:
    """Every process in `pids` has ended (gone from /proc, or a zombie awaiting its reaper)."""
    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
        except OSError:
            return False
    deadline = time.monotonic() + within
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if alive(p)], f"still running: {[p for p in pids if alive(p)]}"


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(0.05)


def listeners(port: int) -> list[str]:
    """Local addresses of the sockets listening on `port` (/proc/net/tcp and tcp6, state 0A)."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:
                raw = bytes.fromhex(addr)
                if len(raw) == 4:   # little-endian IPv4
                    out.append(socket.inet_ntop(socket.AF_INET, raw[::-1]))
                else:               # IPv6: four little-endian 32-bit words
                    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                    out.append(socket.inet_ntop(socket.AF_INET6, words))
    return out
