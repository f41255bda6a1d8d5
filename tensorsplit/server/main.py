"""`tensorsplit serve`: this process is rank 0 and the HTTP server; the launcher starts the other ranks.

Threads:
  main      uvicorn: the HTTP server (its event loop runs every request handler)
  engine    loads rank 0's shard, then runs the Scheduler: every forward on every rank starts here
  watcher   the launcher's watch over the other ranks
The HTTP server answers (503) while the model loads. On SIGTERM or Ctrl-C it stops accepting, lets
the requests in flight finish (for at most --grace seconds), then shuts the world down and exits 0.
If a rank dies, streams in flight end with an error event, other requests get 503, and the process
exits 1 with the launcher's one line naming the rank.
"""
from __future__ import annotations

import ipaddress
import signal
import socket
import threading
from pathlib import Path

from ..errors import TensorsplitError
from ..launcher.world import World
from ..plan import check_world, plan_world
from ..spec import NodeSpec, WorldSpec
from .app import build_app
from .metrics import Metrics
from .scheduler import Scheduler
from .state import ServerState
from .web import BodyLimit
from ..messages import say




def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def run_server(spec: WorldSpec, node: NodeSpec, *, host: str, port: int, api_key: str | None, max_queue: int,
               chat_template: Path | None, grace_s: float, alias: str | None = None, slots: bool = False,
               cors_origins: tuple[str, ...] = ()) -> int:
    import uvicorn
    check_world(spec, node)
    if node.nnodes > 1:
        raise TensorsplitError("serve runs on one node (--nnodes 1)")
    plan = plan_world(spec, node)
    if not _is_loopback(host) and not api_key:
        say(f"warning: serving on {host} without --api-key: anyone who can reach this address can use the model")
    metrics = Metrics()
    state = ServerState(model_id=alias or Path(spec.model).name.removesuffix(".gguf"), model_path=str(spec.model),
                        api_key=api_key, metrics=metrics, scheduler=Scheduler(max_queue, metrics),
                        n_slots=spec.n_slots, slots_endpoint=slots)
    server = uvicorn.Server(uvicorn.Config(BodyLimit(build_app(state, list(cors_origins))), host=host, port=port, log_level="warning",
                                           lifespan="off", timeout_graceful_shutdown=grace_s, access_log=False))
    outcome = {"code": 0}

    def fail(line: str) -> None:
        if state.failed is None:
            state.failed = line
            state.scheduler.fail(line)
            say(line)
            outcome["code"] = 1
            server.should_exit = True

    world = World(plan, node, on_failure=fail)       # the other ranks start; rank 0 loads on the engine thread
    engine_thread = threading.Thread(target=_engine_main, args=(world, state, chat_template, host, port, fail),
                                     name="tensorsplit-engine", daemon=True)
    engine_thread.start()
    # uvicorn re-raises the SIGTERM/SIGINT it caught once it has shut down, with the handlers it found:
    # these make that a no-op, so the world is closed below and the exit code is ours.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()
        if not server.started and not state.failed:
            raise TensorsplitError(f"cannot serve on {host}:{port} (is the port in use?)")
    finally:
        state.scheduler.stop()
        engine_thread.join(timeout=grace_s + 15)
        world.close()
    return outcome["code"]


def _engine_main(world: World, state: ServerState, chat_template: Path | None, host: str, port: int, fail) -> None:
    from ..coordinator.chat import ChatFormatter
    from ..coordinator.chat_template import ChatTemplateError
    from ..coordinator.generate import Generator
    from ..coordinator.tokenizer import Tokenizer
    spec, node = world.plan.spec, world.node
    try:
        engine = world.load()
        tok = Tokenizer.from_gguf_kv(world.gf.kv)
        try:
            chat = ChatFormatter(tok, world.gf, chat_template)
        except ChatTemplateError as e:
            if chat_template is not None:
                raise
            say(f"chat completions are off: {e}")
            chat = None
        state.tokenizer, state.chat, state.n_ctx = tok, chat, spec.n_ctx
        state.ready = True
        say(f"serving {state.model_id} on http://{host}:{port} ({node.world} rank(s), {spec.n_slots} slot(s) of "
             f"{spec.n_ctx} tokens; all-reduce: {engine.all_reduce_path})")
        state.scheduler.run(Generator(world.forward, tok, engine.n_slots, engine.n_ctx), tok)
    except BaseException as e:  # noqa: BLE001 - reported as one line; the launcher's when a rank died
        e = world.explained(e)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(world.failure or (f"error: {first}" if isinstance(e, TensorsplitError) else f"rank 0 failed: {first}"))
