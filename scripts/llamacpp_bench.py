"""llama.cpp's pp/tg speed through llama-cpp-python, for side-by-side figures with `tensorsplit bench`.

Run with an environment that has llama-cpp-python (not a tensorsplit dependency):
    python scripts/llamacpp_bench.py MODEL -p 512 -n 128 -r 3 -t 2
Prints one JSON object: tokens per second for pp<N> (one prompt of N random tokens, one batch)
and tg<N> (N single-token decode steps from an empty context), as llama-bench measures them.
"""
import argparse
import json
import random
import time

import llama_cpp


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("-t", type=int, default=2)
    a = ap.parse_args()
    llm = llama_cpp.Llama(a.model, n_ctx=max(a.p, a.n) + 8, n_batch=max(a.p, 1), n_ubatch=max(a.p, 1),
                          n_threads=a.t, n_threads_batch=a.t, verbose=False, use_extra_bufts=False)
    rng = random.Random(1234)
    vocab = llm.n_vocab()
    results = []
    for test, n in (("pp", a.p), ("tg", a.n)):
        times = []
        for rep in range(a.r + 1):   # first run warms up
            ids = [rng.randrange(vocab) for _ in range(n)]
            llm.reset()
            llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
            t0 = time.perf_counter()
            if test == "pp":
                llm.eval(ids)
            else:
                for t in ids:
                    llm.eval([t])
            if rep:
                times.append(time.perf_counter() - t0)
        speeds = [n / t for t in times]
        mean = sum(speeds) / len(speeds)
        results.append({"test": f"{test}{n}", "tokens_per_s": mean, "seconds": times})
    print(json.dumps({"engine": "llama.cpp", "version": llama_cpp.__version__, "threads": a.t, "results": results}))


if __name__ == "__main__":
    main()
