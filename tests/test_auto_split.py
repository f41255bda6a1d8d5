"""--split auto and the world's plan: shares from the devices' free memory (plan/auto_split.py), the
free memory itself (plan/free_memory.py: TENSORSPLIT_FREE_MEMORY and measuring), the choice checked
under the real plan of SmolLM2 (plan/world.py), which device each rank uses (devices.py), and the
command line: `info --split auto`, the worlds where it is refused, and a real 2-rank run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from cli_helpers import ROOT, run_cli
from tensorsplit.kernels.choice import choose_kernels
from tensorsplit.errors import AutoSplitError, ShardPlanError
from tensorsplit.comm.backend import decode_graphs
from tensorsplit.devices import rank_devices
from tensorsplit.model import make_plan, open_model, parse_split
from tensorsplit.plan import check_world, plan_world
from tensorsplit.plan.auto_split import (FREE_MARGIN, MIN_CPU_SHARE, RANK_RESERVE, fit_to_units, rank_budgets,
                                         share_by_memory)
from tensorsplit.plan.free_memory import FREE_MEMORY_ENV, cpu_available, free_memory, parse_free_memory, parse_size
from tensorsplit.plan.world import choose_split, rank_totals, split_text
from tensorsplit.spec import NodeSpec, WorldSpec

G, M = 2**30, 2**20
PROMPT = "The capital of France is"


def usable(free: int, ranks: int = 1) -> float:
    """What the planner leaves of a device's free memory to its ranks, all together."""
    return free * (1 - FREE_MARGIN) - ranks * RANK_RESERVE


def free_for(budget: int, ranks: int = 1) -> int:
    """The free memory that gives each of `ranks` ranks on a device this budget."""
    return int((budget * ranks + ranks * RANK_RESERVE) / (1 - FREE_MARGIN)) + 1


# -- the planner, on given figures -------------------------------------------------------------------

def test_two_equal_gpus_get_equal_shares():
    ratios = share_by_memory(["cuda:0", "cuda:1"], {"cuda:0": 24 * G, "cuda:1": 24 * G}, [M, M], 30 * G)
    assert ratios == (0.5, 0.5)


def test_a_gpu_takes_what_its_room_holds_and_the_cpu_the_rest():
    """24G GPU + 64G CPU and a 40 GiB model: the GPU's room (after 5% spare, 1 GiB per rank and its fixed
    bytes) is filled, and the CPU rank, which every step would wait for, takes only the rest."""
    fixed = [2 * M, 2 * M]
    ratios = share_by_memory(["cuda:0", "cpu"], {"cuda:0": 24 * G, "cpu": 64 * G}, fixed, 40 * G)
    gpu_room = usable(24 * G) - fixed[0]
    assert ratios[0] == pytest.approx(gpu_room / (40 * G), rel=1e-6)
    assert 0.54 < ratios[0] < 0.56


def test_a_model_the_gpu_holds_leaves_the_cpu_a_token_share():
    ratios = share_by_memory(["cuda:0", "cpu"], {"cuda:0": 24 * G, "cpu": 64 * G}, [0, 0], 10 * G)
    assert ratios[1] == pytest.approx(MIN_CPU_SHARE / (1 + MIN_CPU_SHARE))


def test_a_gpu_too_small_for_an_equal_share_is_filled_and_the_cpu_takes_the_rest():
    """A 20 GiB model over a 4G GPU and a 64G CPU: an equal split would put 10 GiB on the GPU."""
    devices, free, scaled = ["cuda:0", "cpu"], {"cuda:0": 4 * G, "cpu": 64 * G}, 20 * G
    ratios = share_by_memory(devices, free, [0, 0], scaled)
    budgets = rank_budgets(devices, free)
    assert 0.5 * scaled > budgets[0]
    assert ratios[0] * scaled == pytest.approx(budgets[0], rel=1e-6) and ratios[1] * scaled <= budgets[1]


def test_a_device_below_the_reserve_is_named():
    with pytest.raises(AutoSplitError) as e:
        share_by_memory(["cuda:0", "cpu"], {"cuda:0": int(0.8 * G), "cpu": 64 * G}, [0, 0], G)
    assert str(e.value) == ("--split auto: cuda:0 has 0.8 GiB free, less than the 1.0 GiB its 1 rank(s) need besides "
                            "their shards; use fewer ranks on it, or give --split")


def test_ranks_on_one_device_share_it():
    """Two ranks on one GPU and one on the CPU: the two split the GPU's usable memory (and its reserve is
    taken twice); two CPU ranks split the CPU's."""
    free = {"cuda:0": 24 * G, "cpu": 64 * G}
    budgets = rank_budgets(["cuda:0", "cuda:0", "cpu"], free)
    assert budgets[0] == budgets[1] == int(usable(24 * G, 2)) // 2
    assert budgets[2] == int(usable(64 * G))
    ratios = share_by_memory(["cuda:0", "cuda:0", "cpu"], free, [0, 0, 0], 10 * G)
    assert ratios[0] == ratios[1] and ratios[2] == pytest.approx(1 - 2 * ratios[0])
    assert share_by_memory(["cpu", "cpu"], {"cpu": 64 * G}, [M, M], 10 * G) == (0.5, 0.5)


def test_a_model_that_fits_nowhere_is_refused_with_every_device():
    with pytest.raises(AutoSplitError) as e:
        share_by_memory(["cuda:0", "cpu"], {"cuda:0": 8 * G, "cpu": 16 * G}, [G // 2, G // 2], 30 * G)
    assert str(e.value) == ("--split auto: the model needs 33.0 GiB on 2 rank(s) (31.0 GiB of weights and KV cache, "
                            "1.0 GiB per rank besides) and 5% of free memory spare; cuda:0 has 8.0 GiB free, cpu has "
                            "16.0 GiB free")


def test_fit_to_units_moves_a_share_off_an_over_budget_rank():
    """A step model of a plan: rank bytes = 10 units of 100 bytes shared by largest remainder. Rank 0's
    budget holds 6 units; ratios of 0.65 would give it 7 (ties to rank 0), so the share moves to rank 1."""
    def held(ratios):
        units = [int(r * 10) for r in ratios]
        units[0] += 10 - sum(units)
        return tuple(ratios), [100 * u for u in units]
    ratios, nbytes = fit_to_units((0.65, 0.35), [600, 1000], ["cuda:0", "cpu"], 1000, held)
    assert nbytes[0] <= 600 and nbytes[1] <= 1000 and sum(nbytes) == 1000
    with pytest.raises(AutoSplitError) as e:
        fit_to_units((0.5, 0.5), [400, 400], ["cuda:0", "cpu"], 1000, held)
    assert str(e.value).startswith("--split auto: rank ") and "once shares are rounded to whole heads" in str(e.value)


# -- on a real model: the plan's whole units ---------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    gf, cfg = open_model(smollm2_path)
    yield gf, cfg
    gf.close()


def _spec(path, n_slots, n_ctx):
    return WorldSpec(model=path, n_slots=n_slots, n_ctx=n_ctx, numerics="llamacpp")


def _graphs(devices, backend=None, cuda_graphs=True):
    """The plan's rule for CUDA graphs, for devices named as ranks use them ("cuda:0", "cpu")."""
    kinds = [d.split(":")[0] for d in devices]
    return decode_graphs(kinds, backend or ("nccl" if set(kinds) == {"cuda"} else "gloo"), cuda_graphs)


def _memory(smollm2, devices, ratios, n_slots, n_ctx, graphs=None):
    gf, cfg = smollm2
    return rank_totals(gf, cfg, ratios, devices, _spec(gf.path, n_slots, n_ctx), True,
                       _graphs(devices) if graphs is None else graphs)


def _choose(smollm2, devices, free, n_slots, n_ctx):
    gf, cfg = smollm2
    return choose_split(gf, cfg, devices, free, _spec(gf.path, n_slots, n_ctx), True, _graphs(devices))


def _check_within_budgets(smollm2, devices, free, chosen, n_slots, n_ctx):
    gf, cfg = smollm2
    ratios, auto = chosen
    plan = make_plan(cfg, gf.tensors, len(devices), ratios)
    memory = _memory(smollm2, devices, ratios, n_slots, n_ctx)
    assert auto.budgets == tuple(rank_budgets(devices, free))
    assert all(m.total <= b for m, b in zip(memory, auto.budgets)), ([m.total for m in memory], auto.budgets)
    return plan, memory


def test_real_plan_fits_each_budget_after_rounding_to_units(smollm2):
    """SmolLM2 (3 KV heads) with 4 slots of 8192 positions: the KV cache is 720 MiB in 3 units of 240.
    Budgets of 530 and 300 MiB: the proportional shares (0.64, 0.36) give rank 0 two KV heads and
    more weights than fit; the planner moves FFN and vocabulary units to rank 1 until rank 0 fits."""
    devices = ["cuda:0", "cpu"]
    free = {"cuda:0": free_for(530 * M), "cpu": free_for(300 * M)}
    equal = _memory(smollm2, devices, (0.5, 0.5), 4, 8192)
    proportional = share_by_memory(devices, free, [0, 0], sum(m.total for m in equal))
    raw_memory = _memory(smollm2, devices, parse_split(split_text(proportional), 2), 4, 8192)
    assert raw_memory[0].total > rank_budgets(devices, free)[0]          # rounding alone would overflow
    plan, memory = _check_within_budgets(smollm2, devices, free, _choose(smollm2, devices, free, 4, 8192), 4, 8192)
    assert plan.ranks[0].n_local_kv_heads == 2 and plan.ratios[0] < proportional[0]


def test_the_plan_counts_the_graphs_scratch_slot_only_where_the_world_runs_graphs(smollm2):
    """Decode runs as CUDA graphs over a static cache with one scratch slot where every rank is a GPU on
    NCCL and --no-cuda-graphs is not given (comm/backend.py decode_graphs, which the worker follows):
    planned per rank as the cache such a rank allocates. A cuda,cpu world, --backend gloo and
    --no-cuda-graphs have no graphs, and no scratch slot."""
    from tensorsplit.model.attention import KVCache
    gf, cfg = smollm2
    plan = make_plan(cfg, gf.tensors, 2)
    gpus = ["cuda:0", "cuda:1"]
    assert _graphs(gpus) and _graphs(gpus, "nccl")
    assert not _graphs(gpus, None, False) and not _graphs(gpus, "gloo")
    assert not _graphs(["cuda:0", "cpu"]) and not _graphs(["cpu", "cpu"])
    graphs = _memory(smollm2, gpus, (0.5, 0.5), 4, 512, graphs=True)
    plain = _memory(smollm2, gpus, (0.5, 0.5), 4, 512, graphs=False)
    for r, rs in enumerate(plan.ranks):
        static = KVCache(cfg.n_layers, 4, 512, rs.n_local_kv_heads, cfg.head_dim, "cpu", torch.float16,
                         cfg.layer_windows, static=True)
        assert graphs[r].kv_cache + graphs[r].graph_scratch == static.nbytes
        assert plain[r].kv_cache * 5 == static.nbytes * 4 and plain[r].graph_scratch == 0   # 4 slots, not 4 + 1


def test_info_plans_the_graphs_as_the_run_flags_say(smollm2_path):
    """`info` takes the run's --backend and --no-cuda-graphs, so its KV cache is what the ranks allocate."""
    def kv(*flags):
        r = run_cli("info", str(smollm2_path), "--nproc-per-node", "2", "--device", "cuda", "-np", "4", "-c", "512",
                    "--json", *flags, env={FREE_MEMORY_ENV: "cuda=24G,cpu=64G"})
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)["world_plan"]
        return doc["cuda_graphs"], [m["kv_cache"] + m["graph_scratch"] for m in doc["ranks"]]
    on, with_graphs = kv()
    off, without = kv("--no-cuda-graphs")
    gloo, on_gloo = kv("--backend", "gloo")
    assert (on, off, gloo) == (True, False, False)
    assert without == on_gloo and [a * 4 for a in with_graphs] == [b * 5 for b in without]


def test_real_plan_with_ample_gpu_memory_leaves_the_cpu_one_unit(smollm2):
    devices, free = ["cuda:0", "cpu"], {"cuda:0": 24 * G, "cpu": 64 * G}
    chosen = _choose(smollm2, devices, free, 1, 2048)
    assert chosen[0][0] == pytest.approx(1 / (1 + MIN_CPU_SHARE), abs=1e-3)
    plan, _ = _check_within_budgets(smollm2, devices, free, chosen, 1, 2048)
    assert plan.ranks[1].n_local_heads == 3 and plan.ranks[1].local_ff <= 64     # one head group, one FFN unit


def test_real_plan_that_whole_kv_heads_cannot_fit_is_refused(smollm2):
    """Equal budgets of 440 MiB hold 810 MiB in total, but one rank must take 2 of the 3 KV heads (480 MiB)."""
    free = {"cuda:0": free_for(440 * M), "cpu": free_for(440 * M)}
    with pytest.raises(AutoSplitError) as e:
        _choose(smollm2, ["cuda:0", "cpu"], free, 4, 8192)
    assert "once shares are rounded to whole heads and FFN blocks" in str(e.value)


# -- free memory: the override and measuring -----------------------------------------------------------

def test_sizes_and_the_override_parse():
    assert parse_size("24G", "x") == 24 * G and parse_size("512M", "x") == 512 * M
    assert parse_size("1.5T", "x") == int(1.5 * 2**40) and parse_size("64GiB", "x") == 64 * G
    assert parse_size("1000", "x") == 1000 and parse_size("4k", "x") == 4096
    assert parse_free_memory("cuda:0=24G, cpu=64G") == {"cuda:0": 24 * G, "cpu": 64 * G}
    assert parse_free_memory("CUDA=80G") == {"cuda": 80 * G}


@pytest.mark.parametrize("text, message", [
    ("cuda:0=24X", f"{FREE_MEMORY_ENV} entry 'cuda:0=24X': '24X' is not a size such as 24G, 512M or 1.5T"),
    ("cuda:0", f"{FREE_MEMORY_ENV} entry 'cuda:0': expected DEVICE=SIZE such as cuda:0=24G or cpu=64G"),
    ("gpu=4G", f"{FREE_MEMORY_ENV} entry 'gpu=4G': expected DEVICE=SIZE such as cuda:0=24G or cpu=64G"),
    ("cpu:1=4G", f"{FREE_MEMORY_ENV} entry 'cpu:1=4G': expected DEVICE=SIZE such as cuda:0=24G or cpu=64G"),
    ("cpu=4G,cpu=8G", f"{FREE_MEMORY_ENV} names cpu twice"),
])
def test_override_errors_are_one_line(text, message):
    with pytest.raises(AutoSplitError) as e:
        parse_free_memory(text)
    assert str(e.value) == message


def test_override_gives_each_device_and_names_a_missing_one(monkeypatch):
    monkeypatch.setenv(FREE_MEMORY_ENV, "cuda:1=8G,cuda=24G,cpu=64G")
    assert free_memory(["cuda:0", "cuda:1", "cpu", "cpu"]) == {"cuda:0": 24 * G, "cuda:1": 8 * G, "cpu": 64 * G}
    monkeypatch.setenv(FREE_MEMORY_ENV, "cuda:0=8G")
    with pytest.raises(AutoSplitError) as e:
        free_memory(["cuda:0", "cpu"])
    assert str(e.value) == f"{FREE_MEMORY_ENV} has no entry for cpu, which a rank will use (it gives cuda:0)"


def test_rank_devices_follow_the_launchers_gpu_choice(monkeypatch):
    """Local rank i on a GPU kind uses GPU i % count (as worker/process.py resolve_device); CPU ranks share 'cpu'.
    With no GPU visible, the override's cuda:N entries say how many there are."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert rank_devices(["cuda", "cuda", "cuda", "cpu"]) == ["cuda:0", "cuda:1", "cuda:0", "cpu"]
    assert rank_devices(["cpu", "cuda"]) == ["cpu", "cuda:1"]
    assert rank_devices(["cuda", "cuda"] * 2, nproc=2) == ["cuda:0", "cuda:1"] * 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert rank_devices(["cuda"] * 3, {"cuda:0": G, "cuda:1": G}) == ["cuda:0", "cuda:1", "cuda:0"]
    assert rank_devices(["cuda"] * 2) == ["cuda:0", "cuda:0"]


def test_measured_free_memory(monkeypatch):
    """The CPU's from /proc/meminfo; a GPU's in a child process, or a one-line error naming it."""
    monkeypatch.delenv(FREE_MEMORY_ENV, raising=False)
    assert 0 < cpu_available() and free_memory(["cpu"])["cpu"] > 0
    if torch.cuda.is_available():
        assert free_memory(["cuda:0"])["cuda:0"] > 0
    else:
        with pytest.raises(AutoSplitError) as e:
            free_memory(["cuda:0"])
        assert str(e.value) == ("--split auto: cannot read the free memory of cuda:0 (no cuda device is available); "
                                f"set {FREE_MEMORY_ENV} or give --split")


# -- where auto is resolved, and where it is refused -----------------------------------------------------

def test_auto_is_resolved_before_workers_and_refused_across_nodes(smollm2_path, monkeypatch):
    monkeypatch.setenv(FREE_MEMORY_ENV, "cpu=16G")
    spec = WorldSpec(model=smollm2_path, split="auto", device="cpu", quiet=True)
    check_world(spec, NodeSpec(nproc=2))
    assert plan_world(spec, NodeSpec(nproc=2)).ratios == (0.5, 0.5)
    with pytest.raises(AutoSplitError, match=r"--split auto needs --nnodes 1 \(got 2\)"):
        check_world(spec, NodeSpec(nproc=2, nnodes=2, master_port=29500))
    with pytest.raises(ShardPlanError, match="--split auto is resolved from free memory"):
        parse_split("auto", 2)        # a rank never plans from "auto"


def test_info_split_auto_prints_ratios_bytes_and_free_memory(smollm2_path):
    env = {FREE_MEMORY_ENV: "cuda:0=24G,cpu=64G", "CUDA_VISIBLE_DEVICES": ""}
    args = ["info", str(smollm2_path), "--nproc-per-node", "2", "--device", "cuda,cpu", "--split", "auto",
            "-c", "4096", "-np", "2"]
    r = run_cli(*args, "--json", env=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    plan = doc["world_plan"]
    auto, memory = plan["auto"], plan["ranks"]
    ratios = [float(x) for x in auto["split"].split(",")]
    assert ratios[0] == pytest.approx(1 / (1 + MIN_CPU_SHARE), abs=1e-3)     # the GPU holds it all
    assert plan["ratios"] == pytest.approx(ratios, abs=1e-3) == doc["shard_plan"]["ratios"]
    assert auto["free"] == {"cuda:0": 24 * G, "cpu": 64 * G} and auto["given"] is True
    assert auto["rank_reserve"] == RANK_RESERVE and auto["free_margin"] == FREE_MARGIN
    assert (plan["spec"]["n_ctx"], plan["spec"]["n_slots"], plan["kv_types"]) == (4096, 2, ["f16", "f16"])
    assert [m["device"] for m in memory] == ["cuda:0", "cpu"] and plan["backend"]["name"] == "gloo"
    # KV cache: 30 layers x 4096 positions x 2 slots x 64 head_dim x k and v x float16, per KV head
    kv_heads = [r["kv_heads"][1] - r["kv_heads"][0] for r in doc["shard_plan"]["ranks"]]
    assert [m["kv_cache"] for m in memory] == [30 * 4096 * 2 * 64 * 2 * 2 * h for h in kv_heads]
    assert all(m["total"] == m["weights"] + m["kv_cache"] <= b for m, b in zip(memory, auto["budgets"]))
    text = run_cli(*args, env=env)
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert f"split auto {auto['split']}, from the free memory given in {FREE_MEMORY_ENV}" in out
    assert "KV cache for 2 sequence(s) of 4096 positions (k f16, v f16)" in out
    rows = [ln.split() for ln in out.splitlines() if ln.strip().startswith(("0  cuda:0", "1  cpu"))]
    assert [row[:2] for row in rows] == [["0", "cuda:0"], ["1", "cpu"]]
    assert rows[0][-4:-2] == ["24.0", "GiB"] and rows[1][-4:-2] == ["64.0", "GiB"]     # free, per device


def test_info_without_auto_shows_devices_and_measures_nothing(smollm2_path):
    r = run_cli("info", str(smollm2_path), "--nproc-per-node", "3", "--device", "cpu", "--split", "2,1,1", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)["world_plan"]
    assert plan["auto"] is None and [m["device"] for m in plan["ranks"]] == ["cpu"] * 3
    assert plan["ratios"] == pytest.approx([0.5, 0.25, 0.25])


def test_split_auto_is_refused_across_nodes_before_anything_starts(smollm2_path):
    for args in (["generate", "-m", str(smollm2_path), "-p", "x"], ["info", str(smollm2_path)]):
        r = run_cli(*args, "--nproc-per-node", "1", "--nnodes", "2", "--split", "auto")
        assert r.returncode == 1
        assert r.stderr.strip() == ("tensorsplit: error: --split auto needs --nnodes 1 (got 2): each node sees only "
                                    "its own devices; give --split R0,R1,..")


def test_a_model_too_big_for_the_given_memory_fails_in_one_line(smollm2_path):
    r = run_cli("generate", "-m", str(smollm2_path), "-p", "x", "--nproc-per-node", "2", "--split", "auto",
                env={FREE_MEMORY_ENV: "cpu=2.2G"})
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("tensorsplit: error: --split auto: the model needs ")
    assert r.stderr.strip().endswith("; cpu has 2.2 GiB free")


def _token_ids(stdout: str) -> list[int]:
    return json.loads([ln for ln in stdout.splitlines() if ln.startswith("{")][-1])["token_ids"]


def test_generate_split_auto_on_two_cpu_ranks_gives_the_default_tokens(smollm2_path):
    """Two CPU ranks share the CPU, so auto gives them equal shares, measured here; greedy tokens are the
    default split's (the repo's logits are bitwise equal across splits: test_e2e.py)."""
    args = ["generate", "-m", str(smollm2_path), "-p", PROMPT, "-n", "8", "--temp", "0", "--json",
            "--nproc-per-node", "2"]
    auto = run_cli(*args, "--split", "auto")
    assert auto.returncode == 0, auto.stderr
    assert "tensorsplit: --split auto: 0.5,0.5 (free: cpu " in auto.stderr
    default = run_cli(*args)
    assert default.returncode == 0, default.stderr
    assert _token_ids(auto.stdout) == _token_ids(default.stdout) and len(_token_ids(auto.stdout)) == 8


def test_torchrun_resolves_auto_from_the_override_only(smollm2_path):
    """Under plain torchrun every rank resolves --split auto itself: from TENSORSPLIT_FREE_MEMORY (the
    same figures on every rank), and without it the run is refused."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    args = [torchrun, "--nproc-per-node", "2", "-m", "tensorsplit.worker", "generate", "-m", str(smollm2_path),
            "-p", PROMPT, "-n", "4", "--temp", "0", "--json", "--split", "auto"]
    env = {k: v for k, v in os.environ.items() if k != FREE_MEMORY_ENV}
    r = subprocess.run(args, capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    assert r.returncode != 0 and "--split auto under torchrun: each rank would measure free memory" in r.stderr
    r = subprocess.run(args, capture_output=True, text=True, timeout=240, cwd=ROOT,
                       env={**env, FREE_MEMORY_ENV: "cpu=16G"})
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("tensorsplit: --split auto: 0.5,0.5") == 1        # said once, by rank 0
    assert len(_token_ids(r.stdout)) == 4


def test_a_rank_holding_other_bytes_than_its_plan_fails(smollm2_path, monkeypatch):
    """worker/main.py check_allocation, which every world of the suite runs (conftest.py): a rank loaded
    as its plan says passes; a plan off by 2% in weights or KV cache is refused, naming the rank."""
    from dataclasses import replace

    from tensorsplit.errors import TensorsplitError
    from tensorsplit.model.layers import no_reduce
    from tensorsplit.kernels.numerics import Numerics
    from tensorsplit.model.transformer import RankModel
    from tensorsplit.worker.main import CHECK_PLAN_ENV, check_allocation
    monkeypatch.setenv(CHECK_PLAN_ENV, "1")
    spec = WorldSpec(model=smollm2_path, device="cpu", n_ctx=256, n_slots=2)
    plan = plan_world(spec, NodeSpec(nproc=1))
    gf, cfg = open_model(smollm2_path)
    model = RankModel(cfg, make_plan(cfg, gf.tensors, 1).ranks[0], 1, no_reduce, gf, choose_kernels("cpu", Numerics(spec.numerics)))
    model.allocate_cache(spec.n_slots, spec.n_ctx)
    mine = plan.ranks[0]
    check_allocation(mine, model)
    for field in ("weights", "kv_cache"):
        with pytest.raises(TensorsplitError, match=f"rank 0 holds .* bytes of {field}, its plan said"):
            check_allocation(replace(mine, **{field: int(getattr(mine, field) * 1.02)}), model)
