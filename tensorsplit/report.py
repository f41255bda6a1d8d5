"""Human- and machine-readable reports: `tensorsplit info` and the `tensorsplit bench` table."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .model import make_plan, open_model, parse_split
from .model.attention import KVCache
from .model.loader import resident_bytes
from .model.shard_plan import format_plan

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


def _kv_line(cfg, plan) -> str:
    """KV cache per rank for one sequence at the training context, float16 as the default numerics keep
    it (sliding layers: a ring)."""
    per_rank = [KVCache.planned_bytes(cfg.layer_windows, 1, cfg.n_ctx_train, r.n_local_kv_heads, cfg.head_dim,
                                      elem_bytes=2) / 2**20 for r in plan.ranks]
    return (f"kv cache    {' + '.join(f'{b:.1f}' for b in per_rank)} MiB per sequence at context "
            f"{cfg.n_ctx_train} (float16; twice that with --numerics exact"
            f"{'; sliding layers keep their window' if cfg.swa_layers else ''})")


def _resident(gf, plan) -> list[int]:
    """Bytes each rank will hold once loaded on the CPU, in the native kernels' layout when available."""
    from .kernels import native
    return [resident_bytes(gf, r.tensors, native(announce=False)) for r in plan.ranks]


def info_report(path: Path, world: int, split: str | None, verbose: bool, as_json: bool) -> str:
    gf, cfg = open_model(path)
    plan = make_plan(cfg, gf.tensors, world, parse_split(split, world))
    total = sum(t.nbytes for t in gf.tensors.values())
    resident = _resident(gf, plan)
    if as_json:
        config = {k: v for k, v in asdict(cfg).items() if k != "spec"}
        return json.dumps({"file": str(path), "file_bytes": path.stat().st_size, "weight_bytes": total,
                           "fingerprint": gf.fingerprint(), "metadata": _metadata(gf.kv), "config": config,
                           "plan": plan.to_dict(), "resident_bytes_per_rank": resident}, indent=2, default=str)
    types: dict[str, int] = {}
    for t in gf.tensors.values():
        types[t.qtype.name] = types.get(t.qtype.name, 0) + 1
    lines = [
        f"file        {path} ({path.stat().st_size / 2**20:.1f} MiB, GGUF v{gf.version})",
        f"model       {gf.kv.get('general.name', '?')} ({cfg.arch})",
        f"layers      {cfg.n_layers}, n_embd {cfg.n_embd}, n_ff {cfg.n_ff}, vocab {cfg.vocab_size}"
        f"{', tied output' if cfg.tied_output else ''}",
        f"attention   {cfg.n_heads} heads, {cfg.n_kv_heads} KV heads, head_dim {cfg.head_dim}, "
        f"rope base {cfg.rope_base:g} ({'neox' if cfg.spec.rope_neox else 'normal'} layout)",
        *([f"window      sliding window {cfg.swa_window} on {sum(cfg.swa_layers)} of {cfg.n_layers} layers "
           f"(their rope base {cfg.rope_base_swa:g})"] if cfg.swa_layers else []),
        f"context     {cfg.n_ctx_train} (training)",
        f"tensors     {len(gf.tensors)}: " + ", ".join(f"{n} {k}" for k, n in sorted(types.items())),
        f"weights     {total / 2**20:.1f} MiB",
        f"resident    {' + '.join(f'{b / 2**20:.1f}' for b in resident)} MiB per rank once loaded on the CPU "
        f"({sum(resident) / max(1, sum(r.nbytes for r in plan.ranks)):.3f} x the shards' file bytes)",
        _kv_line(cfg, plan),
        "",
        format_plan(plan, cfg, verbose),
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
