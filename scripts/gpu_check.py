"""The GPU check, step by step (scripts/gpu_check.sh sets up the imports and runs this).

    python scripts/gpu_check.py --out DIR [--rehearse]

Steps, each timed and recorded even when another fails; the whole stays inside BUDGET_S:
  env        torch, CUDA, the GPU, Triton
  kernels    the GPU kernel and decode-graph tests (tests/test_triton_kernels.py,
             tests/test_decode_graphs.py), which compare the GPU with the CPU reference; five
             pytest processes at once, since compiling each format's kernels takes most of it
  copy       the device's copy rate (bytes read + written per second), for the bandwidth floor
  logits     a synthetic llama file of mixed quant types, one rank on the CPU and one on the GPU:
             prompt logits (max abs difference, relative to the largest logit; top-1 agreement)
             and 32 greedy tokens, in exact and llamacpp numerics
  world      the same file on a `cuda,cpu` world of 2 ranks: its greedy tokens against 1 rank's
  bench      `tensorsplit bench` pp512 / tg128 on a TinyLlama-shaped 1.1B Q4_0 (with and without
             CUDA graphs), then, if time is left, a Llama-3-8B-shaped Q4_0; decode tokens/s as a
             fraction of the bandwidth floor (copy rate / weight bytes read per token)
Writes DIR/gpu_check.json and DIR/gpu_check.md. --rehearse runs every step on the CPU (the
"GPU" rank is the CPU without native kernels; Triton under its interpreter), to try the script.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

BUDGET_S = 450            # the wrapper kills this process at 470 s
# the kernel tests run as these -k selections in parallel (and one more for everything else)
KERNEL_GROUPS = (("Q4_0", "Q4_1", "Q5_0"), ("Q5_1", "Q8_0", "IQ4_NL"), ("Q2_K", "Q3_K", "Q4_K"),
                 ("Q5_K", "Q6_K", "IQ4_XS"))
N_PROMPT, N_GREEDY = 48, 32
MIXED_TYPES = {           # one of each family on the data path, and the embedding in a K-quant
    "token_embd": "Q6_K", "attn_q": "Q4_0", "attn_k": "Q4_K", "attn_v": "Q8_0", "attn_output": "Q5_K",
    "ffn_gate": "Q4_1", "ffn_up": "Q5_0", "ffn_down": "Q6_K", "output": "Q8_0",
}


def say(msg: str) -> None:
    print(f"gpu_check: {msg}", file=sys.stderr, flush=True)


class Check:
    def __init__(self, out: Path, rehearse: bool):
        self.out, self.rehearse = out, rehearse
        self.device = "cpu" if rehearse else "cuda"
        self.t0 = time.monotonic()
        self.doc: dict = {"rehearsal": rehearse, "steps": {}}
        (out / "models").mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return BUDGET_S - (time.monotonic() - self.t0)

    def step(self, name: str, fn, need_s: float = 0.0) -> None:
        if self.left() < need_s:
            self.doc["steps"][name] = {"skipped": f"{self.left():.0f} s left, needs about {need_s:.0f}"}
            say(f"{name}: skipped (time)")
            return
        t = time.monotonic()
        say(f"{name} ...")
        try:
            result = fn()
            entry = {"ok": True, **(result or {})}
        except Exception as e:  # noqa: BLE001 - recorded, and the next step still runs
            entry = {"ok": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                     "traceback": traceback.format_exc()[-3000:]}
        entry["seconds"] = round(time.monotonic() - t, 1)
        self.doc["steps"][name] = entry
        say(f"{name}: {'ok' if entry['ok'] else entry['error']} ({entry['seconds']} s)")
        self.save()

    def save(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps(self.doc, indent=2, default=str))
        (self.out / "gpu_check.md").write_text(markdown(self.doc))

    # -- steps ---------------------------------------------------------------------------------
    def env(self) -> dict:
        import torch
        info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "hip": getattr(torch.version, "hip", None), "cuda_available": torch.cuda.is_available()}
        try:
            import triton
            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1))
        elif not self.rehearse:
            raise RuntimeError("torch sees no CUDA device (run with --rehearse to try the script on a CPU)")
        return info

    def kernels(self) -> dict:
        """The kernel tests, in KERNEL_GROUPS processes at once: each format is its own Triton
        specialisation, and compiling them (a second or so each, on the CPU) is most of the time."""
        env = {**os.environ, **({"TRITON_INTERPRET": "1"} if self.rehearse else {})}
        files = ["tests/test_triton_kernels.py", "tests/test_decode_graphs.py"]
        every = " or ".join(f for group in KERNEL_GROUPS for f in group)
        selections = [" or ".join(group) for group in KERNEL_GROUPS] + [f"not ({every})"]
        procs = [subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, "-k", k],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for k in selections]
        deadline = time.monotonic() + max(30, self.left() - 200)
        results = []
        for k, p in zip(selections, procs):
            try:
                out, _ = p.communicate(timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise RuntimeError(f"the kernel tests ran out of time (selection {k!r})") from None
            tail = out.strip().splitlines()
            results.append((k, p.returncode, tail))
        summaries = [f"{tail[-1] if tail else 'no output'} [{k}]" for k, _, tail in results]
        failed = [(k, rc, tail) for k, rc, tail in results if rc != 0]
        if failed:
            raise RuntimeError("; ".join(f"pytest -k {k!r} exited {rc}" for k, rc, _ in failed) + "\n" +
                               "\n".join(line for _, _, tail in failed for line in tail[-30:]))
        return {"summary": "; ".join(t[-1].split(" in ")[0] if t else "?" for _, _, t in results),
                "selections": summaries}

    def copy(self) -> dict:
        import torch
        dev = torch.device(self.device)
        n = 256 << 20 if self.rehearse else min(2 << 30, torch.cuda.mem_get_info()[0] // 4)
        a = torch.empty(n, dtype=torch.uint8, device=dev)
        b = torch.empty_like(a)
        reps = 3 if self.rehearse else 20
        for _ in range(2):
            b.copy_(a)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            b.copy_(a)
        sync()
        secs = time.perf_counter() - t
        self.copy_bytes_per_s = 2 * n * reps / secs
        return {"bytes": n, "copy_GB_per_s": round(self.copy_bytes_per_s / 1e9, 1)}

    def mixed_model(self) -> Path:
        path = self.out / "models" / "mixed-llama.gguf"
        if not path.exists():
            from gguf import GGMLQuantizationType as Q
            from synthetic import write_model
            write_model(path, "llama", n_layers=4, n_embd=512, n_heads=8, n_kv=2, n_ff=1024, vocab=512,
                        types={k: Q[v] for k, v in MIXED_TYPES.items()}, tied=False, init="fan_in", seed=1)
        return path

    def logits(self) -> dict:
        import torch
        from tensorsplit.model import make_plan, open_model
        from tensorsplit.model.layers import no_reduce
        from tensorsplit.kernels.choice import choose_kernels
        from tensorsplit.kernels.numerics import Numerics
        from tensorsplit.kernels.torch_kernels import TorchKernels
        from tensorsplit.model.transformer import RankModel
        path = self.mixed_model()
        prompt = torch.randint(0, 512, (N_PROMPT,), generator=torch.Generator().manual_seed(7))
        self.prompt = prompt
        self.tokens: dict = {}
        out = {}
        for numerics in ("exact", "llamacpp"):
            runs = {}
            for where in ("cpu", "gpu"):
                gf, cfg = open_model(path)
                # the "GPU" of a rehearsal is the CPU without native kernels
                kernels = (choose_kernels("cpu", Numerics(numerics)) if where == "cpu" else
                           TorchKernels(Numerics(numerics)) if self.rehearse else choose_kernels(self.device, Numerics(numerics)))
                m = RankModel(cfg, make_plan(cfg, gf.tensors, 1).ranks[0], 1, no_reduce, gf, kernels)
                graphs = None if where == "cpu" else ("eager" if self.rehearse else "cuda")
                m.allocate_cache(1, 256, decode_graphs=graphs)
                logits = m.forward(prompt, torch.arange(N_PROMPT), torch.zeros(N_PROMPT, dtype=torch.int64)).float().cpu()
                runs[where] = (logits, greedy(m.forward, logits[-1], N_PROMPT))
                if where == "gpu" and m.graphs is not None:
                    out[f"{numerics}_graphs_captured"] = m.graphs.captured
            (lc, tc), (lg, tg) = runs["cpu"], runs["gpu"]
            diff = float((lc - lg).abs().max())
            out[numerics] = {"max_abs_diff": diff, "relative": diff / float(lc.abs().max()),
                             "top1_agreement": float((lc.argmax(-1) == lg.argmax(-1)).float().mean()),
                             "greedy_equal": tc == tg, "first_difference": _first_difference(tc, tg)}
            self.tokens[numerics] = {"cpu": tc, "gpu": tg}
        if not out["exact"]["greedy_equal"]:
            raise RuntimeError(f"exact numerics: GPU greedy tokens differ from the CPU's at {out['exact']['first_difference']}")
        return out

    def world(self) -> dict:
        import torch
        from tensorsplit.launcher.world import World
        from tensorsplit.spec import NodeSpec, WorldSpec
        out = {}
        for numerics in ("exact", "llamacpp"):
            spec = WorldSpec(model=self.mixed_model().resolve(), device=f"{self.device},cpu", n_ctx=256, n_slots=1,
                             quiet=True, numerics=numerics, timeout_s=60)
            world = World.start(spec, NodeSpec(nproc=2))
            try:
                first = world.forward(self.prompt, torch.arange(N_PROMPT), torch.zeros(N_PROMPT, dtype=torch.int64),
                                      torch.tensor([N_PROMPT - 1]))
                tokens = greedy(lambda i, p, s: world.forward(i, p, s, torch.tensor([0])), first[0], N_PROMPT)
                path = world.engine.all_reduce_path
            finally:
                world.close()
            ref = self.tokens[numerics]
            out[numerics] = {"all_reduce": path, "equal_cpu_1_rank": tokens == ref["cpu"],
                             "equal_gpu_1_rank": tokens == ref["gpu"],
                             "first_difference_cpu": _first_difference(tokens, ref["cpu"])}
        if not out["exact"]["equal_cpu_1_rank"]:
            raise RuntimeError(f"exact numerics: the {self.device},cpu world's greedy tokens differ from 1 rank's")
        return out

    def bench(self, shape: str, graphs_off_too: bool) -> dict:
        r = subprocess.run([sys.executable, "scripts/make_bench_models.py", "--no-tokenizer", "--shape", shape,
                            "--out", str(self.out / "models")], cwd=ROOT, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "make_bench_models failed")
        path = Path(r.stdout.strip().splitlines()[-1])
        per_token = _bytes_read_per_token(path)
        pp, tg, reps = (64, 16, 1) if self.rehearse else (512, 128, 3)
        out = {"model": path.name, "weight_bytes_per_token": per_token,
               "floor_tokens_per_s": self.copy_bytes_per_s / per_token if hasattr(self, "copy_bytes_per_s") else None}
        for label, extra in (("graphs", []), ("no_graphs", ["--no-cuda-graphs"]))[: 2 if graphs_off_too else 1]:
            n_prompt = pp if label == "graphs" else 0
            result = self.out / f"bench-{shape}-{label}.json"
            cmd = [sys.executable, "-m", "tensorsplit", "bench", str(path), "--device", self.device,
                   "--nproc-per-node", "1", "-p", str(n_prompt), "-n", str(tg), "-r", str(reps), "-o", str(result),
                   *extra]
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(30, self.left() - 10))
            if r.returncode != 0:
                raise RuntimeError(f"bench ({label}) exited {r.returncode}: {r.stderr.strip()[-500:]}")
            for row in json.loads(result.read_text())["worlds"][0]["results"]:
                entry = {"tokens_per_s": row["tokens_per_s"], "stddev": row["stddev"]}
                if row["test"].startswith("tg") and out["floor_tokens_per_s"]:
                    entry["fraction_of_floor"] = row["tokens_per_s"] / out["floor_tokens_per_s"]
                out[f"{row['test']}{'' if label == 'graphs' else ' (no graphs)'}"] = entry
        return out


def greedy(forward, last_logits, n_prompt: int) -> list[int]:
    """N_GREEDY greedy tokens after a prompt whose last logits are given: forward(ids, positions, slots)."""
    import torch
    tokens, logits = [], last_logits
    for i in range(N_GREEDY):
        t = int(logits.float().argmax())
        tokens.append(t)
        logits = forward(torch.tensor([t]), torch.tensor([n_prompt + i]), torch.tensor([0]))[-1]
    return tokens


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def _bytes_read_per_token(path: Path) -> int:
    """Weight bytes a decode step reads: every 2-D weight once, except the embedding table (one row is
    read) unless it doubles as the output layer."""
    from tensorsplit.model.gguf_file import GGUFFile
    with GGUFFile(path) as gf:
        tied = "output.weight" not in gf.tensors
        return sum(t.nbytes for name, t in gf.tensors.items()
                   if len(t.shape) == 2 and int(t.shape[1]) > 1 and (name != "token_embd.weight" or tied))


def markdown(doc: dict) -> str:
    s = doc["steps"]
    lines = [f"# tensorsplit GPU check{' (rehearsal on a CPU)' if doc['rehearsal'] else ''}", ""]
    env = s.get("env", {})
    lines += [f"{env.get('gpu', 'no GPU')}, torch {env.get('torch')}, CUDA {env.get('cuda')}, "
              f"Triton {env.get('triton')}, Python {env.get('python')}", "",
              "| step | result | seconds |", "| --- | --- | ---: |"]
    for name, e in s.items():
        if "skipped" in e:
            res = "skipped: " + e["skipped"]
        elif not e["ok"]:
            res = "**failed**: " + e["error"]
        else:
            res = _summary(name, e)
        lines.append(f"| {name} | {res} | {e.get('seconds', '')} |")
    for name, e in s.items():
        if name.startswith("bench") and e.get("ok"):
            lines += ["", f"**{e['model']}**: {e['weight_bytes_per_token'] / 2**20:.0f} MiB read per token; floor "
                          f"{e['floor_tokens_per_s'] or 0:.0f} tok/s", "",
                      "| test | tokens/s | fraction of the floor |", "| --- | ---: | ---: |"]
            for test, r in e.items():
                if isinstance(r, dict) and "tokens_per_s" in r:
                    frac = f"{r['fraction_of_floor']:.0%}" if "fraction_of_floor" in r else ""
                    lines.append(f"| {test} | {r['tokens_per_s']:.1f} ± {r['stddev']:.1f} | {frac} |")
    return "\n".join(lines) + "\n"


def _summary(name: str, e: dict) -> str:
    if name == "kernels":
        return e["summary"]
    if name == "copy":
        return f"{e['copy_GB_per_s']} GB/s (read + write)"
    if name == "logits":
        return "; ".join(f"{k}: rel. diff {e[k]['relative']:.1e}, top-1 {e[k]['top1_agreement']:.1%}, greedy "
                         f"{'equal' if e[k]['greedy_equal'] else 'differs at ' + str(e[k]['first_difference'])}"
                         for k in ("exact", "llamacpp"))
    if name == "world":
        return "; ".join(f"{k}: 2 ranks vs 1 (CPU) {'equal' if e[k]['equal_cpu_1_rank'] else 'differ'}, vs 1 (GPU) "
                         f"{'equal' if e[k]['equal_gpu_1_rank'] else 'differ'}" for k in ("exact", "llamacpp"))
    if name == "env":
        return f"torch {e['torch']}"
    return "ok"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rehearse", action="store_true", help="run every step on the CPU (no GPU needed)")
    a = ap.parse_args()
    c = Check(a.out, a.rehearse)
    c.step("env", c.env)
    c.step("copy", c.copy)
    c.step("kernels", c.kernels, need_s=60)
    c.step("logits", c.logits, need_s=30)
    if "logits" in c.doc["steps"] and c.doc["steps"]["logits"].get("ok"):
        c.step("world", c.world, need_s=40)
    c.step("bench 1.1B", lambda: c.bench("tinyllama-1.1b", graphs_off_too=True), need_s=60)
    if not a.rehearse:
        c.step("bench 8B", lambda: c.bench("llama3-8b", graphs_off_too=False), need_s=120)
    c.save()
    failed = [n for n, e in c.doc["steps"].items() if e.get("ok") is False]
    say(f"wrote {a.out / 'gpu_check.json'} and gpu_check.md; {len(failed)} step(s) failed"
        f"{': ' + ', '.join(failed) if failed else ''}")
    print((a.out / "gpu_check.md").read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
