"""World options are declared once (spec.py, on WorldSpec's and NodeSpec's fields): the CLI's flags and
LLM's keywords are both generated from that declaration, so LLM can set everything the CLI can."""
from __future__ import annotations

import inspect
import socket

import pytest

from tensorsplit import LLM
from tensorsplit.cli import _sampling_options, _world_options
from tensorsplit.coordinator.sampling import SamplingParams, sampling_options
from tensorsplit.spec import world_options


def _cli_options(decorator) -> set[str]:
    def command(**_):
        pass
    return {p.name for p in decorator(command).__click_params__}


def _cli_world_options() -> set[str]:
    return _cli_options(_world_options)


def test_llm_takes_every_world_option_the_cli_has():
    llm_keywords = set(inspect.signature(LLM).parameters) - {"model", "n_ctx", "parallel"}
    assert llm_keywords == _cli_world_options() == {o.keyword for o in world_options()}
    assert {"split", "device", "backend", "threads", "timeout", "numerics", "cuda_graphs", "nproc_per_node",
            "nnodes", "node_rank", "master_addr", "master_port"} <= llm_keywords


def test_every_world_option_reaches_the_plan(smollm2_path):
    """An LLM with every world option away from its default: the world's plan says each of them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with LLM(smollm2_path, n_ctx=128, parallel=2, nproc_per_node=2, split="3,1", device="cpu", backend="gloo",
             threads=1, timeout=60.0, numerics="exact", cuda_graphs=False, nnodes=1, node_rank=0,
             master_addr="127.0.0.1", master_port=port) as llm:
        plan = llm.plan
        assert plan.ratios == (0.75, 0.25) and plan.backend.name == "gloo" and plan.kv_types == ("f32", "f32")
        assert [r.threads for r in plan.ranks] == [1, 1] and [r.device for r in plan.ranks] == ["cpu", "cpu"]
        assert (plan.spec.timeout_s, plan.spec.cuda_graphs, plan.spec.n_ctx, plan.spec.n_slots) == (60.0, False, 128, 2)
        assert llm.generate("The capital of France is", max_tokens=2, temperature=0)[0].completion_tokens == 2


def test_an_unknown_keyword_names_the_options():
    with pytest.raises(TypeError, match="unknown world option.*frobnicate.*the options are split, device"):
        LLM(frobnicate=1)


def test_llm_generate_takes_every_sampling_option_the_cli_has():
    """The CLI's sampling flags and LLM.generate's keywords both come from SamplingParams' fields; generate
    also takes logit_bias (no flag: the servers' requests carry it)."""
    from dataclasses import fields
    keywords = set(inspect.signature(LLM.generate).parameters) - {"self", "prompts", "max_tokens", "stop"}
    assert keywords == {f.name for f in fields(SamplingParams)}
    assert _cli_options(_sampling_options) - {"stop"} == {f.name for f in sampling_options()} == keywords - {"logit_bias"}
