#!/usr/bin/env bash
# Decode and prefill across two hosts against one host, on one machine: two network namespaces joined
# by a veth pair stand for two hosts, one worker of THREADS threads each, each namespace on its own
# cores (taskset). The baseline is one worker of THREADS threads on the first host's cores.
#
#   scripts/multinode_bench.sh [MODEL.gguf]
#
# Environment:
#   SHAPES  link shapings to run, any of: none 10gbit 1gbit            (default: "none 1gbit")
#           1gbit: netem delay 0.1 ms + rate 1 Gbit/s on both ends; 10gbit: delay 0.05 ms + 10 Gbit/s.
#           Where the kernel has no netem, the rate alone is shaped with tbf, and the table says so.
#   MODES   how the hosts exchange: --wire-transport, and /--wire for tcp (default: "tcp tcp/bf16 tcp/q8 gloo")
#   COMM    1: also `bench --comm` between the two hosts under each shaping: the all-reduce's latency per
#           message size, the wire against Gloo's all_reduce and other algorithms on Gloo (default: 1)
#   PROMPT GEN REPS THREADS  bench -p, -n, -r and threads per worker (default: 32 32 3 1)
#   PY      the Python with tensorsplit installed (default: .venv/bin/python, else python3)
#
# Needs root and iproute2 (tc for shaping). The namespaces are removed on exit, whatever ends it.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-$HOME/.cache/tensorsplit/tinyllama-1.1b-random.Q4_0.gguf}
SHAPES=${SHAPES:-"none 1gbit"}
MODES=${MODES:-"tcp tcp/bf16 tcp/q8 gloo"}
COMM=${COMM:-1}
PROMPT=${PROMPT:-32} GEN=${GEN:-32} REPS=${REPS:-3} THREADS=${THREADS:-1}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
PY=$(command -v "$PY"); [ "${PY#/}" != "$PY" ] || PY="$PWD/$PY"     # absolute, the venv's link kept

[ -f "$MODEL" ] || { echo "multinode_bench: no model file $MODEL" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "multinode_bench: network namespaces need root" >&2; exit 2; }
NCPU=$(nproc)
[ "$NCPU" -ge $((2 * THREADS)) ] || { echo "multinode_bench: $NCPU cores, but two hosts of $THREADS threads need $((2 * THREADS))" >&2; exit 2; }
CORES_A="0-$((THREADS - 1))" CORES_B="$THREADS-$((2 * THREADS - 1))"

NSA=tsbA$$ NSB=tsbB$$ VA=tsva$$ VB=tsvb$$ ADDR_A=10.231.9.1 ADDR_B=10.231.9.2
OUT=$(mktemp -d)
cleanup() {
    for ns in "$NSA" "$NSB"; do ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true; done
    ip netns del "$NSA" 2>/dev/null || true
    ip netns del "$NSB" 2>/dev/null || true
    rm -rf "$OUT"
}
trap cleanup EXIT INT TERM
ip netns add "$NSA"; ip netns add "$NSB"
ip link add "$VA" type veth peer name "$VB"
ip link set "$VA" netns "$NSA"; ip link set "$VB" netns "$NSB"
ip -n "$NSA" addr add $ADDR_A/24 dev "$VA"; ip -n "$NSB" addr add $ADDR_B/24 dev "$VB"
for ns in "$NSA" "$NSB"; do ip -n "$ns" link set lo up; done
ip -n "$NSA" link set "$VA" up; ip -n "$NSB" link set "$VB" up

shape() {   # shape <none|1gbit|10gbit>: prints how the link was shaped
    for pair in "$NSA:$VA" "$NSB:$VB"; do
        ip netns exec "${pair%%:*}" tc qdisc del dev "${pair##*:}" root 2>/dev/null || true
    done
    [ "$1" = none ] && { echo "unshaped"; return; }
    local rate delay
    case $1 in 1gbit) rate=1gbit delay=0.1ms ;; 10gbit) rate=10gbit delay=0.05ms ;;
               *) echo "multinode_bench: unknown shaping $1" >&2; exit 2 ;; esac
    local how="netem delay $delay rate $rate"
    for pair in "$NSA:$VA" "$NSB:$VB"; do
        if ! ip netns exec "${pair%%:*}" tc qdisc add dev "${pair##*:}" root netem delay $delay rate $rate 2>/dev/null; then
            ip netns exec "${pair%%:*}" tc qdisc add dev "${pair##*:}" root tbf rate $rate burst 256kbit latency 50ms
            how="tbf rate $rate (no netem in this kernel: delay not shaped)"
        fi
    done
    echo "$how"
}

bench() {   # bench <ns> <cores> <json> <args...>
    local ns=$1 cores=$2 json=$3; shift 3
    ip netns exec "$ns" taskset -c "$cores" "$PY" -m tensorsplit bench -m "$MODEL" -p "$PROMPT" -n "$GEN" \
        -t "$THREADS" -o "$json" --timeout 120 "$@" >/dev/null 2>"$json.err" \
        || { echo "multinode_bench: bench failed in $ns ($*):" >&2; tail -3 "$json.err" >&2; return 1; }
}

two_hosts() {   # two_hosts <json> <extra args...>: node 1 in B in the background, node 0 in A
    local json=$1; shift
    local port=$((29000 + RANDOM % 2000))
    local common=(--nnodes 2 --nproc-per-node 1 --master-addr $ADDR_A --master-port $port "$@")
    bench "$NSB" "$CORES_B" "$json.node1" "${common[@]}" --node-rank 1 &
    local node1=$!
    bench "$NSA" "$CORES_A" "$json" "${common[@]}" --node-rank 0
    wait $node1
}

rate() {   # rate <json> <pp|tg>: "tokens/s ± stddev"
    "$PY" - "$1" "$2" <<'EOF'
import json, sys
r = [x for x in json.load(open(sys.argv[1]))["worlds"][0]["results"] if x["test"].startswith(sys.argv[2])][0]
print(f"{r['tokens_per_s']:.2f} {r['stddev']:.2f}")
EOF
}

echo "model $(basename "$MODEL"); $THREADS thread(s) per host; bench -p $PROMPT -n $GEN -r $REPS; $(date -u +%FT%TZ)"
bench "$NSA" "$CORES_A" "$OUT/one.json" --nproc-per-node 1 -r "$REPS"
read -r pp1 pp1s <<<"$(rate "$OUT/one.json" pp)"; read -r tg1 tg1s <<<"$(rate "$OUT/one.json" tg)"
echo
echo "| link | between hosts (transport/wire) | pp$PROMPT t/s | vs 1 host | tg$GEN t/s | vs 1 host |"
echo "| --- | --- | ---: | ---: | ---: | ---: |"
echo "| one host | - | $pp1 ± $pp1s | 1.00x | $tg1 ± $tg1s | 1.00x |"
for s in $SHAPES; do
    how=$(shape "$s")
    for m in $MODES; do
        json="$OUT/$s-${m//\//-}.json"
        wire=(--wire-transport "${m%%/*}"); [ "${m#*/}" != "$m" ] && wire+=(--wire "${m#*/}")
        two_hosts "$json" "${wire[@]}" -r "$REPS"
        read -r pp pps <<<"$(rate "$json" pp)"; read -r tg tgs <<<"$(rate "$json" tg)"
        echo "| $how | $m | $pp ± $pps | $(awk "BEGIN{printf \"%.2f\", $pp/$pp1}")x | $tg ± $tgs | $(awk "BEGIN{printf \"%.2f\", $tg/$tg1}")x |"
    done
done
if [ "$COMM" = 1 ]; then
    for s in $SHAPES; do
        how=$(shape "$s")
        two_hosts "$OUT/$s-comm.json" --comm -r 1
        echo
        echo "bench --comm between the two hosts, $how:"
        "$PY" -c "import json, sys; from tensorsplit.report import comm_table; print(comm_table(json.load(open(sys.argv[1]))))" \
            "$OUT/$s-comm.json"
    done
fi
