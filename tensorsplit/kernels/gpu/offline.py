"""Compile the GPU kernels for GPUs that are not here, and read what each compiled kernel uses.

Triton compiles for a named target without a device: its own pipeline, then for NVIDIA the ptxas
its wheel ships (cuobjdump, beside it, reads the registers back), for AMD its bundled LLVM (the
register counts are in the amdgcn text). So a CPU-only machine can check that every kernel the
launcher can pick (matmul.launch_config: each format, each gemv row bucket, the gemm in fp16 and in
float32) compiles for the GPUs the users have, and that none spills registers to local memory,
which would make a memory-bound kernel read its spills too. tests/test_triton_compile.py runs it.

    python -m tensorsplit.kernels.gpu.offline [--targets sm_90,gfx942] [--json]

Must run without TRITON_INTERPRET=1 (under the interpreter a kernel is a Python function, with
nothing to compile); the test runs it in a child process for that reason.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

# name -> (backend, arch, warp size): H100/H200, A100, RTX 30xx / A10, RTX 40xx, MI300, RX 7900
TARGETS = {"sm_90": ("cuda", 90, 32), "sm_80": ("cuda", 80, 32), "sm_86": ("cuda", 86, 32),
           "sm_89": ("cuda", 89, 32), "gfx942": ("hip", "gfx942", 64), "gfx1100": ("hip", "gfx1100", 32)}
ROWS = (1, 2, 4, 8, 16, 64, 512)   # the gemv row buckets, and prompt chunks (the gemm, both tile heights)
_POINTERS = {"x_ptr": "*fp32", "w_ptr": "*u8", "tab_ptr": "*fp32", "y_ptr": "*fp32"}
_INTS = ("M", "N", "K", "row_bytes", "k_per_split", "units_per_split")


@dataclass
class Compiled:
    target: str
    kernel: str          # gemv_words, gemv or gemm
    type_id: int
    rows: int
    fp16: bool | None    # the gemm's operands: fp16 (llamacpp numerics) or ieee float32 (exact); None: a gemv
    constants: dict
    registers: int       # per thread (NVIDIA), VGPRs (AMD)
    spilled_bytes: int   # local memory / stack per thread (NVIDIA), spilled VGPRs + SGPRs (AMD)
    # NVIDIA: instructions of the main loop's body per weight element a thread decodes in it (the
    # issue cost of streaming the weights; ~4.4 is what an H200's issue rate allows at its memory rate)
    loop_instructions_per_element: float | None = None
    error: str = ""


def _signature(kernel) -> dict:
    names = kernel.arg_names
    return {n: _POINTERS.get(n, "i32") for n in names if n in _POINTERS or n in _INTS}


def _nvidia_tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _nvidia_resources(cubin: bytes) -> tuple[int, int, int]:
    """(registers, spilled bytes, instructions in the body of the largest loop) of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
        sass = subprocess.run([_nvidia_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout.splitlines()
    regs = int(re.search(r"REG:(\d+)", out).group(1))
    spill = int(re.search(r"STACK:(\d+)", out).group(1)) + int(re.search(r"LOCAL:(\d+)", out).group(1))
    labels = {line.strip()[:-1]: n for n, line in enumerate(sass) if re.match(r"^\.L_x_\d+:", line)}
    body = 0
    for n, line in enumerate(sass):                 # a backward branch closes a loop
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), n) < n:
            body = max(body, sum(1 for x in sass[labels[m.group(1)]:n + 1] if re.match(r"\s+/\*[0-9a-f]{4}\*/", x)))
    return regs, spill, body


def _elements_per_thread(name: str, const: dict, warps: int) -> int:
    """Weight elements one thread decodes per trip of the main loop."""
    per_trip = const["BLOCK_N"] * (const["UNIT"] if name == "gemv_words" else const["KC"])
    return max(1, per_trip // (32 * warps))


def _amd_resources(amdgcn: str) -> tuple[int, int]:
    def field(name):
        return max(int(v) for v in re.findall(rf"\.{name}:\s+(\d+)", amdgcn))
    return field("vgpr_count"), field("vgpr_spill_count") + field("sgpr_spill_count")


def compile_one(target: str, type_id: int, rows: int, fp16_gemm: bool = True) -> Compiled:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from .matmul import GEMM_WARPS, GEMV_WARPS, launch_config
    name, kernel, const = launch_config(type_id, rows, fp16_gemm)
    warps = GEMM_WARPS if name == "gemm" else GEMV_WARPS
    fp16 = fp16_gemm if name == "gemm" else None
    sig = {**_signature(kernel), **{k: "constexpr" for k in const}}
    try:
        k = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const), target=GPUTarget(*TARGETS[target]),
                           options={"num_warps": warps})
        if TARGETS[target][0] == "cuda":
            regs, spill, body = _nvidia_resources(k.asm["cubin"])
            per_element = round(body / _elements_per_thread(name, const, warps), 1) if body else None
            return Compiled(target, name, type_id, rows, fp16, const, regs, spill, per_element)
        regs, spill = _amd_resources(k.asm["amdgcn"])
        return Compiled(target, name, type_id, rows, fp16, const, regs, spill)
    except Exception as e:  # noqa: BLE001 - reported per kernel, with the others still compiled
        return Compiled(target, name, type_id, rows, fp16, const, -1, -1,
                        error=f"{type(e).__name__}: {str(e)[:500]}")


def _one(args) -> Compiled:
    return compile_one(*args)


def compile_all(targets=("sm_90",), type_ids=None, rows=ROWS, jobs: int | None = None) -> list[Compiled]:
    """Every kernel the launcher can choose, for each target (a process pool: compiling is CPU-bound)."""
    from ..layout import FORMATS
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("offline compilation needs TRITON_INTERPRET unset")
    from .matmul import GEMV_MAX_ROWS
    type_ids = type_ids or sorted(t for t, f in FORMATS.items() if f.act is not None)
    # prompt-sized rows run the gemm, in fp16 (llamacpp numerics) or float32 (--numerics exact)
    work = [(t, q, m, fp16) for t in targets for q in type_ids for m in rows
            for fp16 in ((True, False) if m > GEMV_MAX_ROWS else (True,))]
    with ProcessPoolExecutor(max_workers=jobs or min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(_one, work))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="sm_90", help=f"comma-separated, of {', '.join(TARGETS)}")
    ap.add_argument("--rows", default=",".join(map(str, ROWS)))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")     # Triton 3.9's default, said out loud
    done = compile_all(tuple(a.targets.split(",")), rows=tuple(int(r) for r in a.rows.split(",")))
    if a.json:
        print(json.dumps([asdict(c) for c in done]))
    else:
        from gguf import GGMLQuantizationType as Q
        print(f"{'target':<8} {'format':<7} {'rows':>4} {'kernel':<10} {'regs':>4} {'spill':>5} {'loop/elem':>9}")
        for c in done:
            per = "" if c.loop_instructions_per_element is None else f"{c.loop_instructions_per_element:.1f}"
            kernel = c.kernel + {True: " fp16", False: " f32", None: ""}[c.fp16]
            print(f"{c.target:<8} {Q(c.type_id).name:<7} {c.rows:>4} {kernel:<10} {c.registers:>4} "
                  f"{c.spilled_bytes:>5} {per:>9} {c.error}")
    return 1 if any(c.error for c in done) else 0


if __name__ == "__main__":
    sys.exit(main())
