#!/usr/bin/env bash
# Decode throughput of `tensorsplit batch` (tokens/s over all sequences) at several --parallel
# values and world sizes, on the same chat prompts (greedy, so every run generates the same tokens):
#   scripts/batch_throughput.sh [MODEL] [PROMPTS=16] [MAX_TOKENS=32] [PARALLEL="1 4 16"] [WORLDS="1 2"]
# TS_ARGS: more flags for tensorsplit batch, e.g. TS_ARGS="--numerics exact".
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-$(.venv/bin/python -c "from tensorsplit import models; print(models.fetch())")}
N=${2:-16}; MAXTOK=${3:-32}; PARALLEL=${4:-"1 4 16"}; WORLDS=${5:-"1 2"}
TMP=$(mktemp -d)
.venv/bin/python - "$TMP/prompts.jsonl" "$N" "$MAXTOK" <<'PY'
import json, sys
path, n, m = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
topics = ["the sea", "a city at night", "an old clock", "the first snow", "a long train journey", "a lost key",
          "the smell of rain", "a quiet library"]
with open(path, "w") as f:
    for i in range(n):
        f.write(json.dumps({"id": i, "messages": [{"role": "user", "content":
                            f"Write a short poem about {topics[i % len(topics)]}."}],
                            "max_tokens": m, "temperature": 0}) + "\n")
PY
echo "| workers | --parallel | prompts | tokens | seconds | tok/s (all sequences) |"
echo "| ---: | ---: | ---: | ---: | ---: | ---: |"
for w in $WORLDS; do
  for p in $PARALLEL; do
    rm -f "$TMP/out.jsonl"
    line=$(.venv/bin/tensorsplit batch "$MODEL" "$TMP/prompts.jsonl" -o "$TMP/out.jsonl" -np "$p" \
           --nproc-per-node "$w" ${TS_ARGS:-} 2>&1 >/dev/null | grep "tensorsplit: done:")
    # "done: N of N prompt(s) written to ...; T tokens in S s (X tok/s over all sequences)"
    echo "$line" | sed -E "s/.*done: ([0-9]+) of.*; ([0-9]+) tokens in ([0-9.]+) s \(([0-9.]+) tok\/s.*/| $w | $p | \1 | \2 | \3 | \4 |/"
  done
done
rm -rf "$TMP"
