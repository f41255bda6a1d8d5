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

from pathlib import Path
from typing import Sequence

from . import models
from .coordinator.generate import GenerationResult, Generator, Request
from .coordinator.sampling import SamplingParams
from .coordinator.tokenizer import Tokenizer
from .launcher.world import World
from .spec import NodeSpec, WorldSpec

__all__ = ["LLM", "World"]


class LLM:
    def __init__(self, model: str | Path | None = None, *, nproc_per_node: int = 1, split: str | None = None,
                 device: str = "auto", n_ctx: int = 2048, parallel: int = 4, threads: int | None = None,
                 timeout: float = 120.0, numerics: str = "llamacpp"):
        """parallel: sequences decoded together (KV-cache slots); n_ctx: context per sequence; split: "3,1",
        or "auto" for shares by the devices' free memory (as the CLI's --split)."""
        path = Path(model) if model is not None else models.fetch(models.DEFAULT)
        node = NodeSpec(nproc=nproc_per_node, threads=threads)
        spec = WorldSpec(model=path.resolve() if path.exists() else path, split=split, device=device, n_ctx=n_ctx,
                         n_slots=parallel, timeout_s=timeout, threads=threads, quiet=True, numerics=numerics)
        self._world = World.start(spec, node)
        self.config = self._world.config
        self.tokenizer = Tokenizer.from_gguf_kv(self._world.gf.kv)

    def generate(self, prompts: str | Sequence[str], *, max_tokens: int = 128, temperature: float = 0.8,
                 top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                 seed: int | None = None, stop: Sequence[str] = ()) -> list[GenerationResult]:
        """Generate for each prompt, `parallel` at a time (continuous batching); results in input order."""
        engine = self._world.check()
        if isinstance(prompts, str):
            prompts = [prompts]
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repeat_penalty=repeat_penalty, seed=seed)
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
