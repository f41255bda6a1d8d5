"""Human- and machine-readable reports: `tensorsplit info` and the `tensorsplit bench` table."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .free_memory import FREE_MEMORY_ENV, override, rank_devices
from .model import make_plan, open_model, parse_split
from .model.auto_split import FREE_MARGIN, RANK_RESERVE
from .model.shard_plan import format_plan
from .rank_memory import AUTO, auto_split, check_auto_world, rank_memory, world_graphs
from .worker.process import device_kinds

_BIG_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.scores")


def _metadata(kv: dict) -> dict:
    out = {}
    for k, v in kv.items():
        if k in _BIG_ARRAYS:
            out[k] = f"<{len(v)} entries>"
        elif k == "tokenizer.chat_template":
            out[k] = f"<{len(v)} characters>"
        elif hasattr(v, "tolist"):
            out[k] = v.tolist()
        else:
            out[k] = v
    return out


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _memory_lines(memory, auto, n_slots: int, n_ctx: int, numerics: str, file_ratio: float, graphs: bool) -> list[str]:
    """Per rank: device, weights as loaded, KV cache, total; with --split auto, the free memory planned
    against and the rank's budget."""
    kv_dtype = "float16" if numerics == "llamacpp" else "float32"
    lines = [f"memory per rank once loaded: weights ({file_ratio:.3f} x their file bytes; CPU ranks in the native "
             "kernels' layout)",
             f"  and KV cache for {n_slots} sequence(s) of {n_ctx} positions ({kv_dtype})"
             + (", and one scratch slot for the CUDA graphs" if graphs else "")]
    if auto is not None:
        source = f"given in {FREE_MEMORY_ENV}" if auto.given else "measured"
        lines += [f"split auto {auto.split}, from the free memory {source}",
                  f"  ({FREE_MARGIN:.0%} kept spare and {_size(RANK_RESERVE)} per rank; ranks on one device share "
                  "its budget)"]
    head = f"{'rank':>4}  {'device':<8}  {'weights':>10}  {'kv cache':>10}  {'total':>10}"
    lines.append(head + (f"  {'free':>10}  {'budget':>10}" if auto else ""))
    for m in memory:
        row = f"{m.rank:>4}  {m.device:<8}  {_size(m.weights):>10}  {_size(m.kv_cache):>10}  {_size(m.total):>10}"
        if auto is not None:
            row += f"  {_size(auto.free[m.device]):>10}  {_size(auto.budgets[m.rank]):>10}"
        lines.append(row)
    return lines


def info_report(path: Path, *, nproc: int, nnodes: int = 1, split: str | None = None, device: str = "auto",
                n_ctx: int = 2048, n_slots: int = 1, numerics: str = "llamacpp", backend: str | None = None,
                cuda_graphs: bool = True, verbose: bool = False, as_json: bool = False) -> str:
    """Metadata, the plan, and what each rank will hold, for a world of nproc x nnodes ranks; with
    split "auto", the ratios chosen from the devices' free memory. Nothing is loaded."""
    from .kernels import native
    world = nproc * nnodes
    native_ok = native(announce=False)
    devices = rank_devices(device_kinds(device, world), override(), nproc)
    graphs = world_graphs(devices, backend, cuda_graphs)
    gf, cfg = open_model(path)
    auto = None
    if split == AUTO:
        check_auto_world(nnodes)
        auto = auto_split(gf, cfg, devices, n_slots, n_ctx, numerics, native_ok, graphs)
        split = auto.split
    plan = make_plan(cfg, gf.tensors, world, parse_split(split, world))
    memory = rank_memory(gf, cfg, plan, devices, n_slots, n_ctx, numerics, native_ok, graphs)
    total = sum(t.nbytes for t in gf.tensors.values())
    resident = [m.weights for m in memory]
    if as_json:
        config = {k: v for k, v in asdict(cfg).items() if k != "spec"}
        mem = {"n_ctx": n_ctx, "n_slots": n_slots, "numerics": numerics, "cuda_graphs": graphs,
               "ranks": [{**asdict(m), "total": m.total} for m in memory]}
        auto_doc = None if auto is None else {**asdict(auto), "rank_reserve": RANK_RESERVE, "free_margin": FREE_MARGIN}
        return json.dumps({"file": str(path), "file_bytes": path.stat().st_size, "weight_bytes": total,
                           "fingerprint": gf.fingerprint(), "metadata": _metadata(gf.kv), "config": config,
                           "plan": plan.to_dict(), "resident_bytes_per_rank": resident, "memory": mem,
                           "auto_split": auto_doc}, indent=2, default=str)
    types: dict[str, int] = {}
    for t in gf.tensors.values():
        types[t.qtype.name] = types.get(t.qtype.name, 0) + 1
    file_ratio = sum(resident) / max(1, sum(r.nbytes for r in plan.ranks))
    lines = [
        f"file        {path} ({path.stat().st_size / 2**20:.1f} MiB, GGUF v{gf.version})",
        f"model       {gf.kv.get('general.name', '?')} ({cfg.arch})",
        f"layers      {cfg.n_layers}, n_embd {cfg.n_embd}, n_ff {cfg.n_ff}, vocab {cfg.vocab_size}"
        f"{', tied output' if cfg.tied_output else ''}",
        f"attention   {cfg.n_heads} heads, {cfg.n_kv_heads} KV heads, head_dim {cfg.head_dim}, "
        f"rope base {cfg.rope_base:g} ({'neox' if cfg.spec.rope_neox else 'normal'} layout)",
        *([f"window      sliding window {cfg.swa_window} on {sum(cfg.swa_layers)} of {cfg.n_layers} layers "
           f"(their rope base {cfg.rope_base_swa:g}; their KV cache keeps only the window)"] if cfg.swa_layers else []),
        f"context     {cfg.n_ctx_train} (training)",
        f"tensors     {len(gf.tensors)}: " + ", ".join(f"{n} {k}" for k, n in sorted(types.items())),
        f"weights     {total / 2**20:.1f} MiB",
        "",
        format_plan(plan, cfg, verbose),
        "",
        *_memory_lines(memory, auto, n_slots, n_ctx, numerics, file_ratio, graphs),
    ]
    return "\n".join(lines)


def bench_table(doc: dict) -> str:
    """llama-bench-style markdown: one row per (world size, test)."""
    lines = ["| model | world | backend | threads | test | t/s |", "| --- | ---: | --- | ---: | --- | ---: |"]
    for w in doc["worlds"]:
        for r in w["results"]:
            lines.append(f"| {doc['model']} | {w['world']} | {w['backend']} | {w['threads']} | {r['test']} | "
                         f"{r['tokens_per_s']:.2f} ± {r['stddev']:.2f} |")
    return "\n".join(lines)


def comm_table(doc: dict) -> str:
    """`bench --comm`: microseconds per all-reduce, the world's path against plain Gloo."""
    lines = ["| world | path | rows | bytes | all-reduce (us) | Gloo (us) | Gloo / path |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for w in doc["worlds"]:
        for r in w["results"]:
            lines.append(f"| {w['world']} | {w['path']} | {r['rows']} | {r['bytes']} | {r['auto_us']:.1f} | "
                         f"{r['gloo_us']:.1f} | {r['gloo_us'] / r['auto_us']:.1f}x |")
    return "\n".join(lines)
