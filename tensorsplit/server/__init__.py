"""`tensorsplit serve`: OpenAI's API and llama-server's own over a tensor-parallel world.

main (the process: rank 0, the HTTP server, the engine thread), app (the app: handlers, key, CORS,
/health, /metrics, /tokenize), openai_api and schemas (OpenAI's routes and bodies), llama_api and
llama_schemas (llama-server's /completion, /props, /slots, /apply-template), params (sampling
fields and logit_bias), tickets (a request into the scheduler and back), state, web (errors, body
bound), scheduler (continuous batching across requests), metrics (Prometheus counters).
"""
