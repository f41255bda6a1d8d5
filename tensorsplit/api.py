"""A small Python API for scripts.

    from tensorsplit import LLM
    with LLM(nproc_per_node=2) as llm:
        for r in llm.generate(["The capital of France is", "2 + 2 ="], max_tokens=16, temperature=0):
            print(r.text)

The calling process becomes rank 0 (coordinator and first shard); the launcher starts ranks 1..,
which end with `close()` or with this process (they die with their parent), and watches them: if
one dies, the call in progress (or the next) raises WorkerFailed naming it, instead of hanging.
"""
from __future__ import annotations

import inspect
from dataclasses import fields
from pathlib import Path
from typing import Sequence

from . import models
from .coordinator.generate import GenerationResult, Generator, Request
from .coordinator.sampling import SamplingParams
from .coordinator.tokenizer import Tokenizer
from .launcher.world import World
from .errors import TensorsplitError
from .spec import specs_from_options, world_options

__all__ = ["LLM", "World"]


class LLM:
    def __init__(self, model: str | Path | None = None, *, n_ctx: int = 2048, parallel: int = 4, **world_options):
        """parallel: sequences decoded together (KV-cache slots); n_ctx: context per sequence. The other
        keywords are the CLI's world options, declared once in spec.py (nproc_per_node, split ("3,1", or
        "auto" for shares by the devices' free memory), device, backend, threads, timeout, numerics,
        cuda_graphs, and for a multi-node world nnodes, master_addr, master_port; this process is rank 0,
        so node_rank is 0). The signature lists them all."""
        path = Path(model) if model is not None else models.fetch(models.DEFAULT)
        spec, node = specs_from_options(path.resolve() if path.exists() else path, n_ctx=n_ctx, n_slots=parallel,
                                        quiet=True, **world_options)
        if node.node_rank != 0:
            raise TensorsplitError(f"LLM runs rank 0, on node 0 (node_rank {node.node_rank}): start the other "
                                   "nodes with the `tensorsplit` command and --node-rank")
        self._world = World.start(spec, node)
        self.config = self._world.config
        self.tokenizer = Tokenizer.from_gguf_kv(self._world.gf.kv)

    @property
    def plan(self):
        """The world's plan (plan/world.py): devices, backend, split and bytes per rank."""
        return self._world.plan

    def generate(self, prompts: str | Sequence[str], *, max_tokens: int = 128, stop: Sequence[str] = (),
                 **sampling) -> list[GenerationResult]:
        """Generate for each prompt, `parallel` at a time (continuous batching); results in input order.
        The sampling keywords are SamplingParams' fields, the CLI's sampling options (temperature, top_k,
        top_p, min_p, repeat_penalty, repeat_last_n, seed; and logit_bias)."""
        engine = self._world.check()
        if isinstance(prompts, str):
            prompts = [prompts]
        known = {f.name for f in fields(SamplingParams)}
        if set(sampling) - known:
            raise TypeError(f"unknown sampling option(s) {', '.join(sorted(set(sampling) - known))}; the options "
                            f"are {', '.join(known)}")
        params = SamplingParams(**sampling)
        params.validate()
        requests = [Request(i, self.tokenizer.encode(p, add_special=True), params, max_tokens, tuple(stop))
                    for i, p in enumerate(prompts)]
        results: list[GenerationResult | None] = [None] * len(requests)
        Generator(self._world.forward, self.tokenizer, engine.n_slots, engine.n_ctx).run(
            requests, on_done=lambda req, res: results.__setitem__(req.key, res))
        return results

    def close(self) -> None:
        self._world.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _signature() -> inspect.Signature:
    """LLM.__init__'s signature with every world option as a keyword, from the one declaration."""
    base = list(inspect.signature(LLM.__init__).parameters.values())[:-1]      # drop **world_options
    extra = [inspect.Parameter(o.keyword, inspect.Parameter.KEYWORD_ONLY, default=o.default)
             for o in world_options()]
    return inspect.Signature(base + extra)


def _generate_signature() -> inspect.Signature:
    """LLM.generate's signature with every sampling option as a keyword, from SamplingParams' fields."""
    base = list(inspect.signature(LLM.generate).parameters.values())[:-1]      # drop **sampling
    extra = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
             for f in fields(SamplingParams)]
    return inspect.Signature(base + extra)


LLM.__init__.__signature__ = _signature()
LLM.generate.__signature__ = _generate_signature()
