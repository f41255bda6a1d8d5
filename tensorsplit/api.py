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

import time
from pathlib import Path
from typing import Sequence

from . import models
from .coordinator.generate import GenerationResult, Generator, Request
from .coordinator.sampling import SamplingParams
from .coordinator.tokenizer import Tokenizer
from .errors import CollectiveError, TensorsplitError, WorkerFailed
from .launcher import Launch
from .rank_memory import resolve_split
from .spec import NodeSpec, WorldSpec, check_world
from .worker.engine import Engine
from .worker.main import join_and_load
from .worker.process import RankEnv

FAILURE_REPORT_S = 5.0   # how long to wait for the launcher's account of a failure seen in a collective


class World:
    """A world started with this process as rank 0: the launcher starts the other ranks and watches
    them. `forward` speaks token ids (Engine.forward); a failure anywhere in the world comes out of
    it as WorkerFailed naming the rank. LLM adds the tokenizer; scripts/gpu_check.py drives a model
    without one."""

    def __init__(self, spec: WorldSpec, node: NodeSpec):
        check_world(spec, node)
        spec = resolve_split(spec, node)      # split="auto": ratios from the devices' free memory
        self.engine: Engine | None = None
        self.failure: str | None = None
        self._launch = Launch(spec, node, rank0_here=True)
        self._launch.watch_from_thread(self._on_failure)
        try:
            env = RankEnv(0, node.world, 0, node.nproc, node.master_addr, self._launch.port)
            shard, self.gf, self.config = join_and_load(env, spec)
        except BaseException as e:
            self._launch.close(0)
            raise self.explained(e) from None
        self.engine = Engine(shard, spec.n_slots, spec.n_ctx)

    def _on_failure(self, line: str) -> None:
        self.failure = line

    def check(self) -> Engine:
        """The engine, or WorkerFailed when the world has failed or is closed."""
        if self.failure:
            raise WorkerFailed(self.failure)
        if self.engine is None:
            raise WorkerFailed("this world is closed")
        return self.engine

    def forward(self, ids, positions, slots, logit_rows):
        engine = self.check()
        try:
            return engine.forward(ids, positions, slots, logit_rows)
        except BaseException as e:
            raise self.explained(e) from None

    def explained(self, e: BaseException) -> BaseException:
        """An error seen from rank 0 because a peer died (a collective that lost it) becomes WorkerFailed,
        with the launcher's line naming the rank, once the watcher has it."""
        if isinstance(e, (KeyboardInterrupt, WorkerFailed)):
            return e
        lost_peer = isinstance(e, CollectiveError) or (isinstance(e, (RuntimeError, OSError))
                                                        and not isinstance(e, TensorsplitError))
        deadline = time.monotonic() + (FAILURE_REPORT_S if lost_peer else 0.0)
        while self.failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return WorkerFailed(self.failure) if self.failure else e

    def close(self) -> None:
        if self.engine is not None:
            engine, self.engine = self.engine, None
            try:
                if self.failure is None:
                    engine.shutdown()
            finally:
                engine.shard.comm.close()
        self._launch.close()


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
        self._world = World(spec, node)
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
