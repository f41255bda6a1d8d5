"""Make importable, from a folder of wheels, the modules this Python lacks: standard library only, so
it runs where neither pip nor a network is (the GPU check's machine).

    python scripts/install_wheels.py WHEELS_DIR TARGET_DIR module[=distribution] ...

For each module that does not import, the best wheel of its distribution in WHEELS_DIR (pure
Python, or built for this Python and this machine) is unpacked into TARGET_DIR, which the caller
puts on PYTHONPATH. Prints what it unpacked; exits 1 naming a module with no usable wheel.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import re
import sys
import zipfile
from pathlib import Path

WHEEL = re.compile(r"^(?P<dist>[^-]+)-(?P<ver>[^-]+)(-\d[^-]*)?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def usable(filename: str) -> int | None:
    """How well a wheel fits this interpreter (higher is better), or None when it does not."""
    m = WHEEL.match(filename)
    if not m:
        return None
    plat, py, abi = m["plat"], m["py"], m["abi"]
    if plat != "any" and not (sys.platform.startswith("linux") and "linux" in plat and platform.machine() in plat):
        return None
    here = sys.version_info[0] * 100 + sys.version_info[1]
    for tag in py.split("."):
        if tag in ("py3", "py2.py3"):
            return 1
        cp = re.fullmatch(r"cp(\d)(\d+)", tag)
        if cp:
            built = int(cp[1]) * 100 + int(cp[2])
            if abi == "abi3" and built <= here:
                return 2
            if built == here:
                return 3
    return None


def main(argv: list[str]) -> int:
    wheels, target = Path(argv[0]), Path(argv[1])
    target.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(target))
    for want in argv[2:]:
        module, _, dist = want.partition("=")
        if importlib.util.find_spec(module) is not None:
            continue
        dist = _norm(dist or module)
        fits = [(usable(w.name), w) for w in wheels.glob("*.whl") if _norm(w.name.split("-")[0]) == dist]
        fits = [f for f in fits if f[0] is not None]
        if not fits:
            print(f"install_wheels: no wheel of {dist} for Python {platform.python_version()} on "
                  f"{platform.machine()} in {wheels}", file=sys.stderr)
            return 1
        best = max(fits, key=lambda f: f[0])[1]
        with zipfile.ZipFile(best) as z:
            z.extractall(target)
            for info in z.infolist():                 # keep executable bits (ninja's binary)
                mode = info.external_attr >> 16 & 0o777
                if mode:
                    os.chmod(target / info.filename, mode)
        importlib.invalidate_caches()
        print(f"install_wheels: {module} from {best.name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
