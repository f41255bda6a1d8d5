"""What rank 0's coordinator does in each command, given the Engine of a loaded world.

Each job is built from the command's options (once, by whoever parses them) and called as
job(engine, gguf_file, config) on rank 0 only; it returns the process exit code. Output goes to
stdout (text, tables, JSON), progress and timings to stderr. A job travels to a rank 0 the
launcher starts as JSON (job_to_json / job_from_json): the other ranks never get it, nor its text.
The engine is all a job sees of the world (worker/engine.py).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from .generate import generate_one
from .perplexity import perplexity
from .sampling import SamplingParams
from .tokenizer import Tokenizer
from ..messages import say



@dataclass(frozen=True)
class GenerateJob:
    prompt: str
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    as_json: bool = False
    save_logits: Path | None = None   # .npy of (generated tokens, vocab) float32: the logits each token came from
    chat: bool = False                # the prompt is a user message rendered through the chat template
    chat_template: Path | None = None

    def __call__(self, engine, gf, cfg) -> int:
        tok = Tokenizer.from_gguf_kv(gf.kv)
        ids = _prompt_encoder(tok, gf, self.chat, self.chat_template)(self.prompt, None)
        out = None if self.as_json else _Stdout()
        seen: list[torch.Tensor] = []
        try:
            res = generate_one(engine.forward, tok, ids, self.sampling, self.max_tokens, engine.n_ctx,
                               self.stop, on_text=out, on_logits=seen.append if self.save_logits else None)
        except KeyboardInterrupt:
            if out:
                out.end_line()
            say("interrupted")
            return 130
        except BaseException:
            if out:
                out.end_line()       # whatever reports the failure starts on a line of its own
            raise
        if self.save_logits:
            import numpy as np
            np.save(self.save_logits, torch.stack(seen).numpy() if seen else np.zeros((0, engine.vocab_size)))
        if self.as_json:
            print(json.dumps(res.to_dict()))
        else:
            sys.stdout.write("\n")
            sys.stdout.flush()
            say(f"prompt {res.prompt_tokens} tokens in {res.prefill_s:.2f} s "
                 f"({res.prompt_tokens / max(res.prefill_s, 1e-9):.1f} tok/s); "
                 f"generated {res.completion_tokens} tokens in {res.decode_s:.2f} s "
                 f"({res.completion_tokens / max(res.decode_s, 1e-9):.1f} tok/s); finish: {res.finish_reason}; "
                 f"seed {res.seed}; world {engine.world} ({engine.backend_name})")
        return 0


class _Stdout:
    """Streamed text on stdout, remembering whether the last line is open."""

    def __init__(self):
        self.open_line = False

    def __call__(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
        if text:
            self.open_line = not text.endswith("\n")

    def end_line(self) -> None:
        if self.open_line:
            sys.stdout.write("\n")
            sys.stdout.flush()
            self.open_line = False


@dataclass(frozen=True)
class PerplexityJob:
    text_file: Path
    n_ctx: int
    max_chunks: int | None
    as_json: bool = False

    def __call__(self, engine, gf, cfg) -> int:
        tok = Tokenizer.from_gguf_kv(gf.kv)
        tokens = tok.encode(Path(self.text_file).read_text(encoding="utf-8"), add_special=True)
        say(f"{len(tokens)} tokens, chunks of {self.n_ctx}")
        t0 = time.perf_counter()

        def progress(done: int, total: int, ppl: float) -> None:
            print(f"[{done}/{total}] ppl {ppl:.4f}", file=sys.stderr, flush=True)

        res = perplexity(engine.forward, tokens, self.n_ctx, tok.bos_id if tok.add_bos else None,
                         self.max_chunks, on_chunk=progress)
        out = res.to_dict() | {"seconds": time.perf_counter() - t0, "world": engine.world}
        print(json.dumps(out) if self.as_json else f"Final estimate: PPL = {res.ppl:.4f} "
              f"({sum(res.chunk_count)} scored tokens, {len(res.chunk_nll)} chunks of {self.n_ctx})")
        return 0


@dataclass(frozen=True)
class BenchJob:
    """llama-bench's tests: pp<N> = one prompt of N random tokens; tg<N> = N single-token decode steps; each
    at every depth d (-d): after d positions of random tokens are in the cache (filled untimed, once per
    depth, by prompt chunks of FILL_CHUNK), the test's tokens take positions d, d + 1, ..."""
    n_prompt: int
    n_gen: int
    repetitions: int
    result_file: Path
    depths: tuple[int, ...] = (0,)

    FILL_CHUNK = 512

    def __call__(self, engine, gf, cfg) -> int:
        gen = torch.Generator().manual_seed(1234)
        rows, profile = [], None
        for depth in self.depths:
            self._fill(engine, depth, cfg, gen)
            for test, n in (("pp", self.n_prompt), ("tg", self.n_gen)):
                if n <= 0:
                    continue
                times = []
                for rep in range(self.repetitions + 1):    # the first run warms up and is not counted
                    ids = torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist()
                    if rep == 1 and test == "tg" and engine.profiled:
                        engine.profile(reset=True)          # the timed decode steps only
                    t0 = time.perf_counter()
                    if test == "pp":   # the whole prompt in one step, only its last logits gathered
                        engine.forward(torch.tensor(ids), torch.arange(depth, depth + n),
                                       torch.zeros(n, dtype=torch.int64), torch.tensor([n - 1]))
                    elif engine.profiled:
                        self._profiled_decode(engine, ids, depth)
                    else:
                        for pos, t in enumerate(ids, depth):
                            engine.forward(torch.tensor([t]), torch.tensor([pos]), torch.tensor([0]), torch.tensor([0]))
                    if rep:
                        times.append(time.perf_counter() - t0)
                if test == "tg" and engine.profiled and depth == self.depths[0]:
                    profile = profile_rows(engine.profile(reset=True), sum(times) / (n * len(times)))
                speeds = torch.tensor([n / t for t in times], dtype=torch.float64)
                rows.append({"test": f"{test}{n}" + (f" @ d{depth}" if depth else ""), "n_depth": depth,
                             "tokens_per_s": float(speeds.mean()),
                             "stddev": float(speeds.std()) if len(times) > 1 else 0.0, "seconds": times})
        Path(self.result_file).write_text(json.dumps({
            "world": engine.world, "backend": engine.backend_name, "device": engine.device,
            "threads": torch.get_num_threads(), "weight_bytes_rank0": engine.weight_bytes,
            "results": rows} | ({"profile": profile} if profile is not None else {})))
        return 0

    def _fill(self, engine, depth: int, cfg, gen) -> None:
        """Positions [0, depth) of slot 0 written with random tokens, in prompt chunks (untimed)."""
        for p0 in range(0, depth, self.FILL_CHUNK):
            n = min(self.FILL_CHUNK, depth - p0)
            ids = torch.randint(0, cfg.vocab_size, (n,), generator=gen)
            engine.forward(ids, torch.arange(p0, p0 + n), torch.zeros(n, dtype=torch.int64), torch.tensor([n - 1]))

    @staticmethod
    def _profiled_decode(engine, ids: list[int], depth: int = 0) -> None:
        """The tg steps, each followed by what generate does with its logits: the default sampler picks a
        token (timed as rank 0's sampling; the step's token stays the random one, as llama-bench's)."""
        from .sampling import Sampler, SamplingParams
        sampler, history = Sampler(SamplingParams()), []
        for pos, t in enumerate(ids, depth):
            logits = engine.forward([t], [pos], [0], [0])       # lists: their tensors are made inside the step
            t0 = time.perf_counter_ns()
            history.append(sampler.sample(logits[0], history))
            engine.add_to_step("sampling", time.perf_counter_ns() - t0)


def profile_rows(per_rank: list[dict], measured_s: float) -> dict:
    """The bench's profile: per rank, microseconds per decode step by part (engine.profile), and the
    step time the bench measured on its own clock, to check them against."""
    return {"measured_step_us": measured_s * 1e6, "ranks": per_rank}


@dataclass(frozen=True)
class CommBenchJob:
    """`bench --comm`: all-reduce latency for the sizes a layer sends (n_embd values per token row,
    float64 partial sums: rows 1, 4, 16, then 4x more up to 1 MiB), the world's own path against Gloo's
    all_reduce and the other algorithms on Gloo (comm/gloo_algorithms.py; recursive doubling in a
    power-of-two world), written as JSON to result_file."""
    iters: int
    result_file: Path

    def __call__(self, engine, gf, cfg) -> int:
        rows, r = [], 1
        while cfg.n_embd * r * 8 <= 1 << 20:
            rows.append(r)
            r *= 4
        results = []
        others = ["gloo", "exchange", "all_gather"] + (["doubling"] if engine.world & (engine.world - 1) == 0 else [])
        for r in rows:
            n = cfg.n_embd * r
            result = {"rows": r, "elements": n, "bytes": 8 * n,
                      "auto_us": engine.time_all_reduce(n, self.iters, "auto") * 1e6}
            for path in others:                 # Gloo's own all-reduce, and other algorithms on Gloo
                result[f"{path}_us"] = engine.time_all_reduce(n, max(10, self.iters // 10), path) * 1e6
            results.append(result)
        Path(self.result_file).write_text(json.dumps({
            "world": engine.world, "path": engine.all_reduce_path, "dtype": "float64", "results": results}))
        return 0


@dataclass(frozen=True)
class BatchJob:
    """`tensorsplit batch`: every prompt of a JSONL file, continuously batched over the engine's slots."""
    input: Path
    output: Path
    defaults: SamplingParams
    max_tokens: int
    stop: tuple[str, ...] = ()
    on_error: str = "skip"      # "skip" bad lines, or "fail" before generating anything
    chat: bool = False
    chat_template: Path | None = None

    def __call__(self, engine, gf, cfg) -> int:
        from dataclasses import replace

        from ..errors import TensorsplitError
        from .batch_io import BadLine, done_ids, read_input
        from .generate import Generator, Request
        tok = Tokenizer.from_gguf_kv(gf.kv)
        prompt_ids = _prompt_encoder(tok, gf, self.chat, self.chat_template)
        done = done_ids(self.output)
        requests, bad, skipped = [], [], 0
        for item in read_input(self.input):
            if isinstance(item, BadLine):
                bad.append(item)
                continue
            if json.dumps(item.id) in done:
                skipped += 1
                continue
            opts = dict(item.options)
            params = replace(self.defaults, **{k: opts[k] for k in
                                               ("temperature", "top_k", "top_p", "min_p", "repeat_penalty",
                                                "repeat_last_n", "seed") if k in opts})
            try:
                params.validate()
                ids = prompt_ids(item.prompt, item.messages)
            except TensorsplitError as e:
                bad.append(BadLine(item.line_no, str(e)))
                continue
            requests.append(Request(item.id, ids, params, opts.get("max_tokens", self.max_tokens),
                                    tuple(opts.get("stop", self.stop))))
        for b in bad:
            say(f"{self.input}: {b}" + (" (skipped)" if self.on_error == "skip" else ""))
        if bad and self.on_error == "fail":
            raise TensorsplitError(f"{self.input}: {len(bad)} bad line(s), the first {bad[0]}; nothing generated")
        if skipped:
            say(f"{skipped} prompt(s) already in {self.output}: skipped")
        return _run_batch(engine, tok, requests, self.output, len(bad))


def _prompt_encoder(tok: Tokenizer, gf, chat: bool, template_path):
    """(prompt, messages) -> token ids. Messages always go through the chat template; a plain
    prompt does too with --chat."""
    template = None

    def encode(prompt: str | None, messages: list | None) -> list[int]:
        nonlocal template
        if messages is None and not chat:
            return tok.encode(prompt, add_special=True)
        if template is None:
            from .chat import ChatFormatter
            template = ChatFormatter(tok, gf, template_path)
        return template.encode(messages if messages is not None else [{"role": "user", "content": prompt}])
    return encode


def _run_batch(engine, tok: Tokenizer, requests, output: Path, n_bad: int) -> int:
    from tqdm import tqdm

    from .batch_io import OutputWriter
    from .generate import Generator
    writer = OutputWriter(output)
    bar = tqdm(total=len(requests), unit="prompt", file=sys.stderr, dynamic_ncols=True, disable=None)
    t0 = time.perf_counter()
    totals = {"done": 0, "tokens": 0}

    def on_done(req, res) -> None:
        writer.write({"id": req.key, "text": res.text, "finish_reason": res.finish_reason,
                      "prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
                      "seed": res.seed, "time_to_first_token_s": round(res.prefill_s, 4),
                      "generation_s": round(res.decode_s, 4),
                      "tokens_per_s": round(res.completion_tokens / max(res.prefill_s + res.decode_s, 1e-9), 3)})
        totals["done"] += 1
        totals["tokens"] += res.completion_tokens
        bar.update(1)
        bar.set_postfix_str(f"{totals['tokens'] / (time.perf_counter() - t0):.1f} tok/s")

    code = 0
    try:
        Generator(engine.forward, tok, engine.n_slots, engine.n_ctx).run(requests, on_done)
    except KeyboardInterrupt:
        code = 130
    finally:
        bar.close()
        writer.close()
    secs = time.perf_counter() - t0
    say(f"{'stopped' if code else 'done'}: {totals['done']} of {len(requests)} prompt(s) written to {output}"
         f"{f', {n_bad} bad line(s) skipped' if n_bad else ''}; {totals['tokens']} tokens in {secs:.1f} s "
         f"({totals['tokens'] / max(secs, 1e-9):.1f} tok/s over all sequences)"
         f"{'; rerun the same command to continue' if code else ''}")
    return code


@dataclass(frozen=True)
class ChatJob:
    """`tensorsplit chat`: an interactive multi-turn conversation on stdin/stdout."""
    sampling: SamplingParams
    max_tokens: int
    system: str | None = None
    chat_template: Path | None = None

    def __call__(self, engine, gf, cfg) -> int:
        from .chat import ChatFormatter
        from .generate import generate_one
        tok = Tokenizer.from_gguf_kv(gf.kv)
        fmt = ChatFormatter(tok, gf, self.chat_template)
        messages = [{"role": "system", "content": self.system}] if self.system else []
        interactive = sys.stdin.isatty()
        say("chat: type a message and press Enter; /exit or Ctrl-D to quit")
        while True:
            if interactive:
                sys.stdout.write("> ")
                sys.stdout.flush()
            try:
                line = sys.stdin.readline()
            except KeyboardInterrupt:
                return 130
            if not line or line.strip() in ("/exit", "/quit"):
                return 0
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line.rstrip("\n")})
            ids = fmt.encode(messages)
            out = _Stdout()
            try:
                res = generate_one(engine.forward, tok, ids, self.sampling, self.max_tokens, engine.n_ctx, on_text=out)
            except KeyboardInterrupt:
                out.end_line()
                return 130
            except BaseException:
                out.end_line()
                raise
            sys.stdout.write("\n")
            sys.stdout.flush()
            messages.append({"role": "assistant", "content": res.text})


JOBS = {"generate": GenerateJob, "perplexity": PerplexityJob, "bench": BenchJob, "comm-bench": CommBenchJob,
        "batch": BatchJob, "chat": ChatJob}


def job_to_json(job) -> str:
    """{"kind": ..., "fields": {...}}: paths as text, sampling parameters as a dict, tuples as lists."""
    kind = next(k for k, cls in JOBS.items() if type(job) is cls)
    out = {}
    for f in fields(job):
        v = getattr(job, f.name)
        out[f.name] = (str(v) if isinstance(v, Path) else asdict(v) if isinstance(v, SamplingParams)
                       else list(v) if isinstance(v, tuple) else v)
    return json.dumps({"kind": kind, "fields": out})


def job_from_json(text: str):
    d = json.loads(text)
    cls = JOBS[d["kind"]]
    kw = {}
    for f in fields(cls):
        if f.name not in d["fields"]:
            continue
        v, hint = d["fields"][f.name], str(f.type)
        if v is not None and "Path" in hint:
            v = Path(v)
        elif v is not None and "SamplingParams" in hint:
            v = SamplingParams(**v)
        elif isinstance(v, list) and hint.startswith("tuple"):
            v = tuple(v)
        kw[f.name] = v
    return cls(**kw)
