#!/usr/bin/env bash
# tensorsplit bench at the given world sizes and llama.cpp on the same model and threads, in one run,
# with tensorsplit/llama.cpp ratios.
#   scripts/bench_compare.sh MODEL [WORLDS=1,2] [PP=512] [TG=128] [REPS=2]
# LLAMA_PY: a python with llama-cpp-python (default: python3). Threads: all cores, shared by the workers.
# TS_ARGS: more flags for tensorsplit bench, e.g. TS_ARGS="--kernels compiled".
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$1; WORLDS=${2:-1,2}; PP=${3:-512}; TG=${4:-128}; REPS=${5:-2}
LLAMA_PY=${LLAMA_PY:-python3}
THREADS=$(nproc)
OUT=$(mktemp -d)
.venv/bin/tensorsplit bench -m "$MODEL" --nproc-per-node "$WORLDS" -p "$PP" -n "$TG" -r "$REPS" ${TS_ARGS:-} -o "$OUT/ts.json" >/dev/null
"$LLAMA_PY" scripts/llamacpp_bench.py "$MODEL" -p "$PP" -n "$TG" -r "$REPS" -t "$THREADS" > "$OUT/llama.json"
.venv/bin/python - "$OUT/ts.json" "$OUT/llama.json" <<'PY'
import json, sys
ts, ll = (json.load(open(p)) for p in sys.argv[1:3])
ref = {r["test"]: r["tokens_per_s"] for r in ll["results"]}
print(f"| engine | world | threads/worker | test | t/s | vs llama.cpp |")
print(f"| --- | ---: | ---: | --- | ---: | ---: |")
for r in ll["results"]:
    print(f"| llama.cpp {ll['version']} | 1 | {ll['threads']} | {r['test']} | {r['tokens_per_s']:.2f} | 1.00 |")
for w in ts["worlds"]:
    for r in w["results"]:
        print(f"| tensorsplit | {w['world']} | {w['threads']} | {r['test']} | {r['tokens_per_s']:.2f} | "
              f"{r['tokens_per_s'] / ref[r['test']]:.3f} |")
PY
