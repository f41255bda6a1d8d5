"""Building and loading the native kernels (csrc/) with torch.utils.cpp_extension.

The library is compiled once per source text, torch version and compiler, into
$TENSORSPLIT_CACHE/kernels/<hash>/ (default ~/.cache/tensorsplit), and loaded from there by every
later process: workers of a world find it built. Compiling takes about a minute on 2 cores.

The build is for any x86-64 CPU: only csrc/isa_avx512.cpp and csrc/isa_avx2.cpp are compiled for
those instruction sets (by a `#pragma GCC target` inside them), and the library picks one at run
time from the CPU's features; other CPUs (and non-x86 machines) run the portable scalar kernels.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from ..messages import say

NAME = "tensorsplit_kernels"
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("ops.cpp", "elementwise.cpp", "experts.cpp", "repack.cpp", "shm.cpp", "wire.cpp", "replay.cpp",
           "isa_avx512.cpp", "isa_avx2.cpp", "isa_scalar.cpp")
# -ffp-contract=off: no fused multiply-adds the code does not ask for, so every instruction set rounds alike
CFLAGS = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-Wno-unused-function"]
LDFLAGS = ["-fopenmp", "-lrt"]
OK_MARK = "built.ok"   # written after a build succeeded: a half-written library is never loaded


class BuildError(RuntimeError):
    pass


def _compiler() -> str:
    return os.environ.get("CXX") or "c++"


def _compiler_version(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BuildError(f"no C++ compiler ({cxx}: {e.strerror if isinstance(e, OSError) else 'timed out'})") from None
    if out.returncode != 0:
        raise BuildError(f"no working C++ compiler ({cxx} --version failed)")
    return out.stdout.splitlines()[0] if out.stdout else cxx


def build_dir() -> Path:
    """Where this source text, torch and compiler build to."""
    import torch
    from ..models import cache_dir
    h = hashlib.sha256()
    for name in sorted(p.name for p in CSRC.iterdir() if p.suffix in (".cpp", ".h")):
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    h.update(torch.__version__.encode())
    h.update(_compiler_version(_compiler()).encode())
    h.update(" ".join(CFLAGS + LDFLAGS + list(SOURCES)).encode())
    return cache_dir() / "kernels" / h.hexdigest()[:16]


def _ninja_on_path() -> None:
    """cpp_extension runs `ninja`; the pip-installed one lives beside this Python, maybe not on PATH."""
    if shutil.which("ninja"):
        return
    candidates = [Path(sys.executable).parent]
    try:
        import ninja
        candidates.insert(0, Path(ninja.BIN_DIR))
    except ImportError:
        pass
    for d in candidates:
        if (d / "ninja").exists():
            os.environ["PATH"] = f"{d}{os.pathsep}{os.environ.get('PATH', '')}"
            return
    raise BuildError("ninja is not installed (pip install ninja)")


def load_library(announce: bool = True) -> Path:
    """Build if needed and load the library into torch.ops.tensorsplit; returns its path."""
    import torch
    where = build_dir()
    lib = where / f"{NAME}.so"
    if (where / OK_MARK).exists() and lib.exists():
        torch.ops.load_library(str(lib))
        return lib
    _ninja_on_path()
    from torch.utils import cpp_extension
    where.mkdir(parents=True, exist_ok=True)
    # One builder per folder at a time, by an flock that the kernel drops when its holder exits however it
    # exits. cpp_extension's own lock is a file that a killed build leaves behind, on which every later
    # build would wait forever: under the flock no one else is building, so such a file is stale.
    with open(where / "build.flock", "w") as baton:
        fcntl.flock(baton, fcntl.LOCK_EX)
        if (where / OK_MARK).exists() and lib.exists():       # built meanwhile by the holder before us
            torch.ops.load_library(str(lib))
            return lib
        (where / "lock").unlink(missing_ok=True)
        if announce:
            say("compiling the native kernels (once; about a minute)")
        try:
            cpp_extension.load(NAME, [str(CSRC / s) for s in SOURCES], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
                               build_directory=str(where), is_python_module=False, verbose=False)
        except Exception as e:  # noqa: BLE001 - compiler output is long; keep its first error line
            text = str(e)
            lines = [ln.strip() for ln in text.splitlines()]
            first = next((ln for ln in lines if "error:" in ln), next((ln for ln in lines if ln), "unknown error"))
            raise BuildError(f"compiling the native kernels failed: {first[:300]}") from None
        (where / OK_MARK).write_text("ok\n")
    return lib
