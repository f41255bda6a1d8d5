"""A small Python API for scripts.

    from tensorsplit import LLM
    with LLM(nproc_per_node=2) as llm:
        for r in llm.generate(["The capital of France is", "2 + 2 ="], max_tokens=16, temperature=0):
            print(r.text)

The calling process becomes rank 0 (coordinator and first shard); ranks 1.. are worker
processes started with `python -m tensorsplit.worker serve`, ended by `close()` or when
this process exits (they die with their parent).
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from . import models
from .coordinator.generate import GenerationResult, Generator, Request
from .coordinator.sampling import SamplingParams
from .coordinator.tokenizer import Tokenizer
from .errors import TensorsplitError
from .launcher.spawn import NodeSpec, free_port, visible_gpus, worker_env
from .worker.engine import Engine
from .worker.main import WorldSpec, join_and_load
from .worker.process import RankEnv


class LLM:
    def __init__(self, model: str | Path | None = None, *, nproc_per_node: int = 1, split: str | None = None,
                 device: str = "auto", n_ctx: int = 2048, parallel: int = 4, threads: int | None = None,
                 timeout: float = 120.0, numerics: str = "llamacpp"):
        """parallel: sequences decoded together (KV-cache slots); n_ctx: context per sequence."""
        path = Path(model) if model is not None else models.fetch(models.DEFAULT)
        if not path.exists():
            raise TensorsplitError(f"{path}: no such file")
        node = NodeSpec(nproc=nproc_per_node, threads=threads)
        port = free_port(node.master_addr)
        self._tmp = tempfile.TemporaryDirectory(prefix="tensorsplit-api-")
        argv = ["serve", "--model", str(path), "--ctx-size", str(n_ctx), "--parallel", str(parallel), "--device", device,
                "--timeout", str(timeout), "--numerics", numerics] + (["--split", split] if split else []) + \
               (["--threads", str(threads)] if threads else [])
        gpus = visible_gpus()
        self._procs = [subprocess.Popen([sys.executable, "-m", "tensorsplit.worker", *argv],
                                        env=worker_env(node, i, port, f"{self._tmp.name}/rank{i}.json", gpus),
                                        start_new_session=True)
                       for i in range(1, nproc_per_node)]
        env = RankEnv(0, nproc_per_node, 0, nproc_per_node, node.master_addr, port)
        spec = WorldSpec(model=path, split=split, device=device, n_ctx=n_ctx, n_slots=parallel, timeout_s=timeout,
                         threads=threads, quiet=True, numerics=numerics)
        try:
            shard, self._gf, self.config = join_and_load(env, spec)
        except BaseException:
            self._end_workers()
            raise
        self._engine = Engine(shard, parallel, n_ctx)
        self.tokenizer = Tokenizer.from_gguf_kv(self._gf.kv)

    def generate(self, prompts: str | Sequence[str], *, max_tokens: int = 128, temperature: float = 0.8,
                 top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                 seed: int | None = None, stop: Sequence[str] = ()) -> list[GenerationResult]:
        """Generate for each prompt, `parallel` at a time (continuous batching); results in input order."""
        if isinstance(prompts, str):
            prompts = [prompts]
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repeat_penalty=repeat_penalty, seed=seed)
        params.validate()
        requests = [Request(i, self.tokenizer.encode(p, add_special=True), params, max_tokens, tuple(stop))
                    for i, p in enumerate(prompts)]
        results: list[GenerationResult | None] = [None] * len(requests)
        Generator(self._engine.forward, self.tokenizer, self._engine.n_slots, self._engine.n_ctx).run(
            requests, on_done=lambda req, res: results.__setitem__(req.key, res))
        return results

    def close(self) -> None:
        if getattr(self, "_engine", None) is not None:
            try:
                self._engine.shutdown()
            finally:
                self._engine.shard.comm.close()
                self._engine = None
        self._end_workers()

    def _end_workers(self) -> None:
        for p in self._procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._procs = []
        self._tmp.cleanup()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

