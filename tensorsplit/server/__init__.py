"""`tensorsplit serve`: an OpenAI-compatible HTTP server over a tensor-parallel world.

main (the process: rank 0, the HTTP server, the engine thread), app (the endpoints), schemas (the
request bodies), scheduler (continuous batching across requests), metrics (Prometheus counters).
"""
