"""Free memory of the devices a node's ranks will use, for `--split auto`: measured before any worker
starts, or given in TENSORSPLIT_FREE_MEMORY to plan for another machine (and in tests).

  TENSORSPLIT_FREE_MEMORY="cuda:0=24G,cpu=64G"    one entry per device; K, M, G, T are powers of 1024
  TENSORSPLIT_FREE_MEMORY="cuda=80G,cpu=500G"     a bare kind stands for each device of that kind

Devices are named as the ranks will use them (devices.py `rank_devices`). Measuring: the CPU from
/proc/meminfo's MemAvailable (os.sysconf without /proc); GPUs in a short-lived child process
(`torch.cuda.mem_get_info`), so that this process, which watches the workers for the whole run, never
holds a CUDA context on their devices.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Mapping, Sequence

from ..errors import AutoSplitError

FREE_MEMORY_ENV = "TENSORSPLIT_FREE_MEMORY"
MEASURE_TIMEOUT_S = 120.0     # the child imports torch and starts a context on each device
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)
_DEVICE = re.compile(r"(cpu|mps|cuda|xpu)(?::(\d+))?")


def parse_size(text: str, where: str) -> int:
    """'24G' -> 24 * 2**30; '512M', '1.5T', '64GiB', a plain byte count. Errors name `where`."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise AutoSplitError(f"{where}: {text!r} is not a size such as 24G, 512M or 1.5T")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_free_memory(text: str) -> dict[str, int]:
    """'cuda:0=24G,cpu=64G' -> {'cuda:0': 24 GiB, 'cpu': 64 GiB}. Keys: cpu, mps, cuda, cuda:N, xpu, xpu:N."""
    out: dict[str, int] = {}
    for entry in (e.strip() for e in text.split(",")):
        name, eq, size = entry.partition("=")
        name = name.strip().lower()
        m = _DEVICE.fullmatch(name)
        if not eq or not m or (m.group(2) is not None and m.group(1) in ("cpu", "mps")):
            raise AutoSplitError(f"{FREE_MEMORY_ENV} entry {entry!r}: expected DEVICE=SIZE such as cuda:0=24G "
                                 "or cpu=64G")
        if name in out:
            raise AutoSplitError(f"{FREE_MEMORY_ENV} names {name} twice")
        out[name] = parse_size(size, f"{FREE_MEMORY_ENV} entry {entry!r}")
    return out


def override() -> dict[str, int] | None:
    text = os.environ.get(FREE_MEMORY_ENV, "").strip()
    return parse_free_memory(text) if text else None


def free_memory(devices: Sequence[str]) -> dict[str, int]:
    """Free bytes of each named device: from TENSORSPLIT_FREE_MEMORY when set, else measured."""
    given = override()
    if given is not None:
        return {d: _given(given, d) for d in dict.fromkeys(devices)}
    out: dict[str, int] = {}
    if "cpu" in devices:
        out["cpu"] = cpu_available()
    for kind in ("cuda", "xpu", "mps"):
        named = sorted({d for d in devices if d.split(":")[0] == kind})
        if named:
            out.update(zip(named, _measure_in_child(kind, named)))
    return out


def _given(given: Mapping[str, int], device: str) -> int:
    for key in (device, device.split(":")[0]):
        if key in given:
            return given[key]
    raise AutoSplitError(f"{FREE_MEMORY_ENV} has no entry for {device}, which a rank will use "
                         f"(it gives {', '.join(given)})")


def cpu_available() -> int:
    """Bytes the kernel could give to new processes without swapping: MemAvailable, else free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        raise AutoSplitError(f"--split auto: cannot read the CPU's free memory here; set {FREE_MEMORY_ENV} "
                             "or give --split") from None


def _measure_in_child(kind: str, devices: Sequence[str]) -> list[int]:
    cmd = [sys.executable, "-m", "tensorsplit.plan.free_memory", kind, *devices]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=MEASURE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        r = None
    if r is None or r.returncode != 0:
        why = "timed out" if r is None else (r.stderr.strip().splitlines() or ["no output"])[-1][:200]
        raise AutoSplitError(f"--split auto: cannot read the free memory of {', '.join(devices)} ({why}); "
                             f"set {FREE_MEMORY_ENV} or give --split")
    return [int(x) for x in json.loads(r.stdout)]


def _measure(kind: str, devices: Sequence[str]) -> list[int]:
    """In the child: free bytes of each device, from torch's API for the kind."""
    import torch
    module = getattr(torch, kind)
    if not module.is_available():
        raise SystemExit(f"no {kind} device is available")
    if kind == "mps":
        if not hasattr(module, "recommended_max_memory"):
            raise SystemExit("this torch cannot report MPS memory")
        return [module.recommended_max_memory() - module.driver_allocated_memory()]
    if not hasattr(module, "mem_get_info"):
        raise SystemExit(f"this torch cannot report {kind} memory")
    return [module.mem_get_info(int(d.split(":")[1]))[0] for d in devices]


if __name__ == "__main__":
    print(json.dumps(_measure(sys.argv[1], sys.argv[2:])))
