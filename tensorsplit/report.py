"""Human- and machine-readable reports: `tensorsplit info` and the `tensorsplit bench` table."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .model import make_plan, open_model
from .model.shard_plan import format_plan
from .plan import WorldPlan, plan_world
from .plan.auto_split import FREE_MARGIN, RANK_RESERVE
from .plan.free_memory import FREE_MEMORY_ENV
from .spec import NodeSpec, WorldSpec

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


def _world_lines(plan: WorldPlan, file_ratio: float) -> list[str]:
    """The world's plan: its decisions, then per rank its device, threads and bytes; with --split auto,
    the free memory planned against and each rank's budget."""
    spec, auto = plan.spec, plan.auto
    lines = [f"world       {plan.world} rank(s), {plan.nproc} per node; backend {plan.backend.name} "
             f"({plan.backend.why}); decode {'as CUDA graphs' if plan.cuda_graphs else 'without CUDA graphs'}",
             f"split       {plan.split_text()}" + (" (auto)" if auto is not None else ""),
             f"memory per rank once loaded: weights ({file_ratio:.3f} x their file bytes; CPU ranks in the native "
             "kernels' layout)",
             f"  and KV cache for {spec.n_slots} sequence(s) of {spec.n_ctx} positions (k {plan.kv_types[0]}, v {plan.kv_types[1]})"
             + (", and one scratch slot for the CUDA graphs" if plan.cuda_graphs else "")]
    if auto is not None:
        source = f"given in {FREE_MEMORY_ENV}" if auto.given else "measured"
        lines += [f"split auto {plan.split_text()}, from the free memory {source}",
                  f"  ({FREE_MARGIN:.0%} kept spare and {_size(RANK_RESERVE)} per rank; ranks on one device share "
                  "its budget)"]
    head = f"{'rank':>4}  {'device':<8}  {'threads':>7}  {'weights':>10}  {'kv cache':>10}  {'total':>10}"
    lines.append(head + (f"  {'free':>10}  {'budget':>10}" if auto else ""))
    for m in plan.ranks:
        row = (f"{m.rank:>4}  {m.device:<8}  {m.threads:>7}  {_size(m.weights):>10}  "
               f"{_size(m.kv_cache + m.graph_scratch):>10}  {_size(m.total):>10}")
        if auto is not None:
            row += f"  {_size(auto.free[m.device]):>10}  {_size(auto.budgets[m.rank]):>10}"
        lines.append(row)
    return lines


def info_report(spec: WorldSpec, node: NodeSpec, *, verbose: bool = False, as_json: bool = False) -> str:
    """Metadata, the shard plan, and the world's plan (world/plan.py: devices, backend, bytes per rank)
    for `spec` on nproc x nnodes ranks; with split "auto", the ratios chosen from the devices' free
    memory. Nothing is loaded; the world may be planned for another machine."""
    path = Path(spec.model)
    plan = plan_world(spec, node, here=False, announce=False)
    gf, cfg = open_model(path)
    shard_plan = make_plan(cfg, gf.tensors, plan.world, plan.ratios)
    total = sum(t.nbytes for t in gf.tensors.values())
    if as_json:
        config = {k: v for k, v in asdict(cfg).items() if k != "spec"}
        world_plan = json.loads(plan.to_json())
        world_plan["ranks"] = [{**r, "total": m.total} for r, m in zip(world_plan["ranks"], plan.ranks)]
        if world_plan["auto"] is not None:
            world_plan["auto"].update(split=plan.split_text(), rank_reserve=RANK_RESERVE, free_margin=FREE_MARGIN)
        return json.dumps({"file": str(path), "file_bytes": path.stat().st_size, "weight_bytes": total,
                           "fingerprint": gf.fingerprint(), "metadata": _metadata(gf.kv), "config": config,
                           "shard_plan": shard_plan.to_dict(), "world_plan": world_plan}, indent=2, default=str)
    types: dict[str, int] = {}
    for t in gf.tensors.values():
        types[t.qtype.name] = types.get(t.qtype.name, 0) + 1
    file_ratio = sum(m.weights for m in plan.ranks) / max(1, sum(r.nbytes for r in shard_plan.ranks))
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
        format_plan(shard_plan, cfg, verbose),
        "",
        *_world_lines(plan, file_ratio),
    ]
    return "\n".join(lines)


def bench_table(doc: dict) -> str:
    """llama-bench-style markdown: one row per (world size, test)."""
    lines = ["| model | world | backend | threads | test | t/s |", "| --- | ---: | --- | ---: | --- | ---: |"]
    for w in doc["worlds"]:
        for r in w["results"]:
            lines.append(f"| {doc['model']} | {w['world']} | {w['backend']} | {w['threads']} | {r['test']} | "
                         f"{r['tokens_per_s']:.2f} ± {r['stddev']:.2f} |")
    for w in doc["worlds"]:
        if "profile" in w:
            lines += ["", profile_table(w)]
    return "\n".join(lines)


def profile_table(w: dict) -> str:
    """`bench --profile`: where a decode step's time goes, microseconds per step (and its share) per rank."""
    from .worker.profile import PARTS
    p = w["profile"]
    ranks = p["ranks"]
    head = " | ".join(f"rank {i}" for i in range(len(ranks)))
    lines = [f"decode step of world {w['world']} x {w['threads']} thread(s): {p['measured_step_us']:.0f} us measured",
             "", f"| part | {head} |", "| --- |" + " ---: |" * len(ranks)]
    for part in PARTS + ("step",):
        cells = []
        for r in ranks:
            us = r["step_us"] if part == "step" else r["parts_us"][part]
            cells.append(f"{us:.0f} ({100 * us / max(r['step_us'], 1e-9):.1f}%)")
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comm_table(doc: dict) -> str:
    """`bench --comm`: microseconds per all-reduce, the world's path against Gloo's all_reduce and the
    other algorithms on Gloo (exchange: isend/irecv to every rank; doubling: recursive doubling;
    all_gather: all_gather_into_tensor and a local sum)."""
    others = ("gloo", "exchange", "doubling", "all_gather")
    lines = ["| world | path | rows | bytes | all-reduce (us) | Gloo (us) | exchange (us) | doubling (us) | "
             "all_gather (us) | Gloo / path |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for w in doc["worlds"]:
        for r in w["results"]:
            cells = " | ".join(f"{r[k + '_us']:.1f}" if k + "_us" in r else "-" for k in others)
            lines.append(f"| {w['world']} | {w['path']} | {r['rows']} | {r['bytes']} | {r['auto_us']:.1f} | {cells} | "
                         f"{r['gloo_us'] / r['auto_us']:.1f}x |")
    return "\n".join(lines)
