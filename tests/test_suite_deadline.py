"""The suite's own guard: every test has a deadline (pytest-timeout, `timeout` in pyproject.toml), so a
hang fails that test instead of eating CI's time."""
from __future__ import annotations

import subprocess
import sys
import time

from cli_helpers import ROOT


def test_every_test_has_a_default_deadline(pytestconfig):
    assert float(pytestconfig.getini("timeout")) == 600


def test_a_hanging_test_fails_at_its_deadline(tmp_path):
    """A test that would sleep a minute, run with this project's configuration and a 2 s deadline."""
    (tmp_path / "test_hang.py").write_text("import time\n\ndef test_hang():\n    time.sleep(60)\n")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(ROOT / "pyproject.toml"),
                        "--rootdir", str(tmp_path), "-o", "timeout=2", str(tmp_path / "test_hang.py")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Timeout" in r.stdout and "1 failed" in r.stdout, r.stdout[-2000:]
    assert time.monotonic() - t0 < 40
