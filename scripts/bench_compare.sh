#!/usr/bin/env bash
# tensorsplit bench next to llama.cpp on the same models and threads, in one run, as ratios.
#
#   LLAMA_BENCH=/path/to/llama-bench scripts/bench_compare.sh [MODEL.gguf ...]
#   LLAMA_PY=/path/to/python-with-llama-cpp-python scripts/bench_compare.sh [MODEL.gguf ...]
#
# llama.cpp's side: llama-bench itself where LLAMA_BENCH names it (../shared/tools/build-llama-cpp.sh
# builds one for this CPU; its llama-quantize beside it writes the Q4_K_M subject), else
# scripts/llamacpp_bench.py through llama-cpp-python (LLAMA_PY).
# Without models: the four speed subjects (the synthetic TinyLlama-shaped 1.1B in Q4_0 and Q4_K_M,
# written by scripts/make_bench_models.py if missing; Gemma 3 270M Q4_K_M; SmolLM2-135M Q4_1).
# WORLDS (default 1,2): tensorsplit world sizes; the workers share all cores (threads = cores / world).
# PP (128), TG (32), REPS (3): llama-bench's pp<PP> and tg<TG>, timed REPS times after a warm-up.
# DEPTH (0): KV-cache depths, a list as llama-bench's -d takes it (DEPTH=0,4096): every test at each.
# CACHE_TYPE (f16): the KV cache type of keys and values on both sides (-ctk/-ctv; llama-bench with flash
# attention where it is not f16, which llama.cpp needs for a quantized V cache).
# TS_ARGS: more flags for tensorsplit bench. llama.cpp runs with as many threads as there are cores.
set -euo pipefail
cd "$(dirname "$0")/.."
WORLDS=${WORLDS:-1,2}; PP=${PP:-128}; TG=${TG:-32}; REPS=${REPS:-3}; DEPTH=${DEPTH:-0}; CACHE_TYPE=${CACHE_TYPE:-f16}
LB_CACHE=(-ctk "$CACHE_TYPE" -ctv "$CACHE_TYPE"); [ "$CACHE_TYPE" = f16 ] || LB_CACHE+=(-fa 1)
LLAMA_PY=${LLAMA_PY:-python3}
THREADS=$(nproc)
CACHE=${TENSORSPLIT_CACHE:-$HOME/.cache/tensorsplit}
if [ $# -eq 0 ]; then
    QUANT=()
    [ -n "${LLAMA_BENCH:-}" ] && QUANT=(--llama-quantize "$(dirname "$LLAMA_BENCH")/llama-quantize")
    .venv/bin/python scripts/make_bench_models.py --llama-py "$LLAMA_PY" "${QUANT[@]}" >&2
    .venv/bin/python -c "from tensorsplit import models; models.fetch('smollm2'); models.fetch('gemma3-270m')"
    set -- "$CACHE/tinyllama-1.1b-random.Q4_0.gguf" "$CACHE/tinyllama-1.1b-random.Q4_K_M.gguf" \
           "$CACHE/gemma-3-270m-q4_k_m.gguf" "$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
fi
OUT=$(mktemp -d)
i=0
for MODEL in "$@"; do
    [ -f "$MODEL" ] || { echo "bench_compare: $MODEL: no such file" >&2; continue; }
    i=$((i + 1))
    echo "bench_compare: $(basename "$MODEL")" >&2
    if [ -n "${LLAMA_BENCH:-}" ]; then
        "$LLAMA_BENCH" -m "$MODEL" -p "$PP" -n "$TG" -r "$REPS" -t "$THREADS" -d "$DEPTH" "${LB_CACHE[@]}" -o json \
            > "$OUT/llama$i.json"
    else
        [ "$DEPTH" = 0 ] && [ "$CACHE_TYPE" = f16 ] || { echo "bench_compare: DEPTH and CACHE_TYPE need llama-bench itself (LLAMA_BENCH)" >&2; exit 2; }
        "$LLAMA_PY" scripts/llamacpp_bench.py "$MODEL" -p "$PP" -n "$TG" -r "$REPS" -t "$THREADS" > "$OUT/llama$i.json"
    fi
    .venv/bin/tensorsplit bench -m "$MODEL" --nproc-per-node "$WORLDS" -p "$PP" -n "$TG" -r "$REPS" -d "$DEPTH" -ctk "$CACHE_TYPE" -ctv "$CACHE_TYPE" ${TS_ARGS:-} \
        -o "$OUT/ts$i.json" >/dev/null
    echo "$MODEL" > "$OUT/name$i"
done
.venv/bin/python - "$OUT" "$i" <<'PY'
import json, os, sys
out, n = sys.argv[1], int(sys.argv[2])
rows = []
for i in range(1, n + 1):
    name = os.path.basename(open(f"{out}/name{i}").read().strip()).removesuffix(".gguf")
    ll = json.load(open(f"{out}/llama{i}.json"))
    if isinstance(ll, list):      # llama-bench -o json: one object per test
        ll = {"version": ll[0]["build_commit"], "threads": ll[0]["n_threads"],
              "results": [{"test": (f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}")
                                   + (f" @ d{r['n_depth']}" if r.get("n_depth") else ""),
                           "tokens_per_s": r["avg_ts"], "stddev": r["stddev_ts"]} for r in ll]}
    ts = json.load(open(f"{out}/ts{i}.json"))
    ref = {r["test"]: r for r in ll["results"]}
    worlds = ts["worlds"]
    if i == 1:
        head = ["model", "test", f"llama.cpp {ll['version']} ({ll['threads']} threads)"]
        head += [f"tensorsplit {w['world']} x {w['threads']} threads" for w in worlds]
        print("| " + " | ".join(head) + " |")
        print("| --- | --- | " + " | ".join("---:" for _ in head[2:]) + " |")
    def spread(r):
        return f" ± {r['stddev']:.1f}" if r.get("stddev") else ""
    for test, theirs in ref.items():
        base = theirs["tokens_per_s"]
        cells = [name, test, f"{base:.1f}{spread(theirs)}"]
        for w in worlds:
            r = next(r for r in w["results"] if r["test"] == test)
            cells.append(f"{r['tokens_per_s']:.1f}{spread(r)} ({r['tokens_per_s'] / base:.2f}x)")
        print("| " + " | ".join(cells) + " |")
PY
