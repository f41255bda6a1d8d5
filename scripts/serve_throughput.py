"""Aggregate decode throughput of `tensorsplit serve` under concurrent clients.

For each world size in --nproc and each client count in --clients, starts `tensorsplit serve`
(-np = the largest client count, so every client holds a slot), lets C clients each stream one
completion of --tokens tokens at temperature 0 from distinct prompts, and prints the tokens of all
streams over the wall time from the first request to the last token, with the median time to first
token. One warm-up request per server is not counted.

    .venv/bin/python scripts/serve_throughput.py [-m model.gguf] [--nproc 1,2] [--clients 1,4,16] [--tokens 64]
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post_stream(url: str, body: dict) -> tuple[float, int]:
    """Stream one completion; (seconds to the first text chunk, completion tokens from the usage)."""
    t0 = time.perf_counter()
    first, tokens = None, 0
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=3600) as r:
        for line in r:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first or 0.0, tokens


def measure(base: str, model_id: str, clients: int, n_tokens: int) -> dict:
    url = f"{base}/v1/completions"
    results: list = [None] * clients

    def one(i: int) -> None:
        body = {"model": model_id, "prompt": f"Story number {i}: once upon a time", "max_tokens": n_tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        results[i] = post_stream(url, body)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r[1] for r in results)
    return {"clients": clients, "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "ttft_median_s": statistics.median(r[0] for r in results)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None, help="GGUF file (default: tensorsplit's default model)")
    ap.add_argument("--nproc", default="1,2", help="world sizes, comma-separated")
    ap.add_argument("--clients", default="1,4,16", help="concurrent client counts, comma-separated")
    ap.add_argument("--tokens", type=int, default=64, help="completion tokens per client")
    ap.add_argument("--json", action="store_true", help="one JSON line per measurement")
    args = ap.parse_args()
    counts = [int(x) for x in args.clients.split(",")]
    model_args = ["-m", args.model] if args.model else []
    rows = []
    for nproc in [int(x) for x in args.nproc.split(",")]:
        port = free_port()
        cmd = [sys.executable, "-m", "tensorsplit", "serve", *model_args, "--nproc-per-node", str(nproc),
               "--port", str(port), "-np", str(max(counts)), "-c", str(max(512, 2 * args.tokens + 64))]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            while True:
                if proc.poll() is not None:
                    print(f"serve exited {proc.returncode}", file=sys.stderr)
                    return 1
                try:
                    with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                time.sleep(0.5)
            with urllib.request.urlopen(f"{base}/v1/models") as r:
                model_id = json.loads(r.read())["data"][0]["id"]
            measure(base, model_id, 1, 4)                      # warm-up
            for c in counts:
                row = {"model": model_id, "nproc": nproc, **measure(base, model_id, c, args.tokens)}
                rows.append(row)
                if args.json:
                    print(json.dumps(row), flush=True)
        finally:
            proc.terminate()
            proc.wait(120)
    if not args.json:
        print(f"{'model':<36} {'ranks':>5} {'clients':>7} {'tokens':>6} {'wall s':>7} {'tok/s':>7} {'ttft s':>7}")
        for r in rows:
            print(f"{r['model']:<36} {r['nproc']:>5} {r['clients']:>7} {r['tokens']:>6} {r['wall_s']:>7.2f} "
                  f"{r['tok_s']:>7.1f} {r['ttft_median_s']:>7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
