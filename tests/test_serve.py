"""`tensorsplit serve` as a real process on 127.0.0.1 with 2 workers, driven by the official `openai`
client (and plain HTTP for what the client cannot send or hides): greedy text equal to `tensorsplit
generate`, usage counts and where a stream carries them, continuous batching of concurrent streams
(seen to batch in /metrics), clients that go away, bad requests, the API key, CORS preflights,
a worker killed mid-stream, SIGTERM with a request in flight. llama-server's own routes:
test_serve_llama.py."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from cli_helpers import ROOT, assert_pids_gone, listeners, run_cli, workers_of

openai = pytest.importorskip("openai", reason="the openai client is a test dependency: pip install -e .[test]")

MODEL = "SmolLM2-135M-Instruct.Q4_1"
PROMPT = "The capital of France is"
QUESTION = "What is the capital of France?"
N = 8
START_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `tensorsplit serve` process, its stderr collected on a thread."""

    def __init__(self, model_path, *args: str):
        self.port = _free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "tensorsplit", "serve", str(model_path), "--port",
                                      str(self.port), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, cwd=ROOT)
        self.err_lines: list[str] = []
        threading.Thread(target=lambda: self.err_lines.extend(self.proc.stderr), daemon=True).start()
        deadline = time.monotonic() + START_S
        self.health_seen: list[int] = []       # /health's answers while starting (0: not listening yet)
        while not self.health_seen or self.health_seen[-1] != 200:
            self.health_seen.append(self.status("/health"))
            assert self.proc.poll() is None, f"serve exited {self.proc.returncode}: {self.err}"
            assert time.monotonic() < deadline, f"not ready after {START_S} s: {self.err}"
            time.sleep(0.1)
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def err(self) -> str:
        return "".join(self.err_lines)

    def status(self, path: str, **kw) -> int:
        return self.request(path, **kw)[0]

    def request(self, path: str, body: bytes | None = None, headers: dict | None = None, method: str | None = None):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=body, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, ConnectionError, OSError):
            return 0, b""

    def metrics(self) -> dict[str, float]:
        """GET /metrics as {sample name with its labels: value}."""
        code, body = self.request("/metrics")
        assert code == 200, body
        return {name: float(value) for name, value in
                (ln.rsplit(" ", 1) for ln in body.decode().splitlines() if ln and not ln.startswith("#"))}

    def wait_metric(self, name: str, test, within: float, what: str) -> dict[str, float]:
        """Poll /metrics until test(value of `name`) holds; fail naming `what` after `within` seconds."""
        deadline = time.monotonic() + within
        while True:
            m = self.metrics()
            if test(m.get(name, 0.0)):
                return m
            assert time.monotonic() < deadline, f"{what}: {name} = {m.get(name)} after {within:g} s"
            time.sleep(0.05)

    def stream(self, path: str, body: dict, headers: dict | None = None):
        """POST `body` and yield the reply's server-sent events as they arrive, read as plain HTTP:
        each `data:` line's JSON, and the string "[DONE]" for OpenAI's end marker."""
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json", **(headers or {})})
            r = conn.getresponse()
            assert r.status == 200 and r.getheader("Content-Type").startswith("text/event-stream"), r.read()
            for line in r:
                line = line.strip()
                if line.startswith(b"data: "):
                    yield "[DONE]" if line == b"data: [DONE]" else json.loads(line[6:])
        finally:
            conn.close()

    def sse(self, path: str, body: dict, headers: dict | None = None) -> list:
        """Every event of the reply (see stream)."""
        return list(self.stream(path, body, headers))

    def client(self, key: str = "none"):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, timeout=120)

    def stop(self, sig=signal.SIGTERM, within: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(within)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture(scope="module")
def server(smollm2_path):
    s = Server(smollm2_path, "--nproc-per-node", "2", "-np", "4", "-c", "1024")
    yield s
    workers = list(workers_of(s.proc.pid).values())
    assert s.stop() == 0, s.err
    assert_pids_gone(workers)


def _generate(smollm2_path, *args) -> dict:
    r = run_cli("generate", "-m", str(smollm2_path), "-n", str(N), "--temp", "0", "--json", "--nproc-per-node", "2",
                *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_completions_and_chat_equal_generate_with_usage(server, smollm2_path):
    client = server.client()
    ref = _generate(smollm2_path, "-p", PROMPT)
    c = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0)
    assert c.choices[0].text == ref["text"] and c.choices[0].finish_reason == "length"
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == \
        (ref["prompt_tokens"], N, ref["prompt_tokens"] + N)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == ref["text"]
    assert chunks[-1].usage.completion_tokens == N and chunks[-2].choices[0].finish_reason == "length"

    chat_ref = _generate(smollm2_path, "--chat", "-p", QUESTION)
    messages = [{"role": "user", "content": QUESTION}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=N, temperature=0)
    assert r.choices[0].message.content == chat_ref["text"] and r.choices[0].message.role == "assistant"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (chat_ref["prompt_tokens"], N)
    stream = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=N, temperature=0,
                                                  stream=True, logprobs=True, top_logprobs=3,
                                                  stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == chat_ref["text"]
    assert stream[-1].usage.prompt_tokens == chat_ref["prompt_tokens"]
    lps = [t for ch in stream if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert len(lps) == N
    for t in lps:       # greedy: the chosen token is the most likely, and the log-probabilities are sane
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob) and t.top_logprobs[0].token == t.token
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob


def _openai_chunk(kind: str, chunk: dict):
    """A streamed chunk parsed by the openai client's own type (model_validate, so a missing or
    mistyped field fails). openai's Completion type requires a finish_reason, which OpenAI itself
    streams as null until the last text chunk: such a chunk is checked with that one field filled."""
    from openai.types import Completion
    from openai.types.chat import ChatCompletionChunk
    if kind == "chat":
        return ChatCompletionChunk.model_validate(chunk)
    choices = chunk["choices"]
    if choices and choices[0]["finish_reason"] is None:
        choices = [{**choices[0], "finish_reason": "stop"}]
    return Completion.model_validate({**chunk, "choices": choices})


@pytest.mark.parametrize("kind,path,extra", [
    ("completion", "/v1/completions", {"prompt": PROMPT}),
    ("chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": QUESTION}]}),
])
def test_usage_on_a_stream_only_when_asked_in_an_extra_last_chunk(server, kind, path, extra):
    """OpenAI's rule: no usage on a stream by default; with stream_options.include_usage, every chunk
    has "usage": null but an extra last one, whose choices are [], before [DONE]."""
    body = {"model": MODEL, "max_tokens": N, "temperature": 0, "stream": True, **extra}
    plain = server.sse(path, body)
    assert plain[-1] == "[DONE]" and len(plain) > 2
    for chunk in plain[:-1]:
        assert "usage" not in chunk and len(chunk["choices"]) == 1, chunk
        _openai_chunk(kind, chunk)
    assert plain[-2]["choices"][0]["finish_reason"] == "length"

    events = server.sse(path, {**body, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]" and len(events) == len(plain) + 1
    chunks = [_openai_chunk(kind, c) for c in events[:-1]]
    *text_chunks, last = chunks
    assert all(c.usage is None and len(c.choices) == 1 for c in text_chunks)
    assert all("usage" in c and c["usage"] is None for c in events[:-2])       # present, and null
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert last.choices == [] and last.usage.completion_tokens == N
    assert last.usage.total_tokens == last.usage.prompt_tokens + N and last.id == text_chunks[0].id
    assert [c["choices"] for c in events[:-2]] == [c["choices"] for c in plain[:-1]]     # greedy: the same text

    off = server.sse(path, {**body, "stream_options": {"include_usage": False}})
    assert [c for c in off if c != "[DONE]" and "usage" in c] == []


def test_sixteen_concurrent_streams_each_equal_its_sequential_run(server):
    """16 streaming clients at once over 4 slots (12 wait in the queue): each text is the one the same
    request gave alone."""
    client = server.client()
    prompts = [f"{PROMPT[:-3]} number {i} is" for i in range(16)]

    def run(p: str) -> str:
        return "".join(ch.choices[0].text for ch in client.completions.create(
            model=MODEL, prompt=p, max_tokens=N, temperature=0, stream=True))
    alone = [run(p) for p in prompts]
    together: list = [None] * 16
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, run(prompts[i]))) for i in range(16)]
    before = server.metrics()
    for t in threads:
        t.start()
    # read /metrics while the 16 run (a few steps in, two or more requests running): the steps since
    # `before` carried more than one request each, on average
    deadline = time.monotonic() + 60
    while True:
        during = server.metrics()
        if (during["tensorsplit_requests_running"] >= 2
                and during["tensorsplit_step_sequences_count"] - before["tensorsplit_step_sequences_count"] >= 8):
            break
        assert time.monotonic() < deadline, "no two requests ran at once for 8 steps"
        time.sleep(0.02)
    for t in threads:
        t.join(300)
    after = server.metrics()
    assert together == alone
    assert len(set(alone)) > 1

    def batched(m: dict) -> tuple[float, float, float]:
        """(steps, sequences over those steps, steps that served more than one request) since `before`"""
        def d(name): return m[name] - before[name]
        return (d("tensorsplit_step_sequences_count"), d("tensorsplit_step_sequences_sum"),
                d("tensorsplit_step_sequences_count") - d('tensorsplit_step_sequences_bucket{le="1"}'))
    for m in (during, after):
        steps, sequences, multi = batched(m)
        assert steps > 0 and sequences / steps > 1 and multi > 0, (steps, sequences, multi)
    # over the whole load (4 slots, 12 waiting): more than two requests a step, on average
    steps, sequences, _ = batched(after)
    assert sequences / steps > 2, (steps, sequences)


def test_health_is_503_while_loading_and_the_server_listens_on_loopback_only(server):
    """README: /health answers 503 while the model loads, then 200; without --host the server binds
    127.0.0.1 only."""
    seen = [c for c in server.health_seen if c]                # 0: before the port listened
    assert seen[-1] == 200 and 503 in seen and set(seen) == {503, 200}, server.health_seen
    assert listeners(server.port) == ["127.0.0.1"]


def test_tokenize_detokenize_models_and_metrics(server, smollm2_path):
    ids = json.loads(run_cli("tokenize", str(smollm2_path), "-p", PROMPT).stdout)
    code, body = server.request("/tokenize", json.dumps({"content": PROMPT}).encode())
    assert code == 200 and json.loads(body)["tokens"] == ids
    code, body = server.request("/detokenize", json.dumps({"tokens": ids}).encode())
    assert code == 200 and json.loads(body)["content"] == PROMPT
    assert [m.id for m in server.client().models.list()] == [MODEL]
    ok = 'tensorsplit_requests_total{endpoint="/v1/completions",status="200"}'
    before = server.metrics()
    server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0)
    code, body = server.request("/metrics")
    text = body.decode()
    after = server.metrics()
    assert code == 200 and after[ok] == before.get(ok, 0) + 1
    assert after["tensorsplit_generation_tokens_total"] >= before["tensorsplit_generation_tokens_total"] + 2
    assert after["tensorsplit_prompt_tokens_total"] == before["tensorsplit_prompt_tokens_total"] + len(ids)
    for name in ("prompt_tokens_total", "generation_tokens_total", "requests_running", "requests_waiting",
                 "step_seconds_count", "step_sequences_count", "requests_cancelled_total"):
        assert f"tensorsplit_{name} " in text


BAD = [   # (what, path, raw body, status, a word of the message)
    ("malformed JSON", "/v1/completions", b'{"model": ', 400, "JSON"),
    ("a wrong type", "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": "many"}, 400, "max_tokens"),
    ("an unknown field", "/v1/completions", {"model": MODEL, "prompt": PROMPT, "frobnicate": 1}, 400, "frobnicate"),
    ("five stop strings", "/v1/completions", {"model": MODEL, "prompt": PROMPT, "stop": list("abcde")}, 400, "stop"),
    ("an empty stop string", "/v1/completions", {"model": MODEL, "prompt": PROMPT, "stop": [""]}, 400, "stop"),
    ("n = 2", "/v1/completions", {"model": MODEL, "prompt": PROMPT, "n": 2}, 400, "n"),
    ("too many tokens", "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 5000}, 400, "context"),
    ("temperature 3", "/v1/completions", {"model": MODEL, "prompt": PROMPT, "temperature": 3}, 400, "temperature"),
    ("an empty prompt", "/v1/completions", {"model": MODEL, "prompt": ""}, 400, "empty"),
    ("no messages", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("a tool role", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, 400,
     "role"),
    ("tools", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                       "tools": [{"type": "function"}]}, 400, "tools"),
    ("top_logprobs without logprobs", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "logprobs"),
    ("a token outside the vocabulary", "/detokenize", {"tokens": [10**9]}, 400, "vocabulary"),
    ("a body over 8 MiB", "/v1/completions", {"model": MODEL, "prompt": "x" * (9 << 20)}, 413, "bytes"),
    # a byte under the bound is read, and refused for what it is
    ("a malformed body of 8 MiB less a byte", "/v1/completions", b'{"model": ' + b" " * ((8 << 20) - 11), 400, "JSON"),
]


@pytest.mark.parametrize("what,path,body,status,word", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, what, path, body, status, word):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    code, out = server.request(path, raw)
    assert code == status, (what, code, out[:300])
    err = json.loads(out)["error"]
    assert {"message", "type", "param", "code"} <= set(err) and word.lower() in err["message"].lower(), err
    assert server.status("/health") == 200


def test_a_streamed_body_over_the_bound_gets_413(server):
    """A chunked body declares no length: the server counts as it reads."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    piece = b"x" * (1 << 20)
    conn.request("POST", "/v1/completions", body=iter([b'{"model": "m", "prompt": "'] + [piece] * 9 + [b'"}']),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413 and "bytes" in json.loads(r.read())["error"]["message"]
    conn.close()
    assert server.status("/health") == 200


def test_a_client_that_goes_away_frees_its_slot_for_a_queued_request(smollm2_path):
    """One slot: a long stream read for 3 chunks then dropped, and a short request queued behind it. The
    short one is served at once (the long one would take minutes), and the drop is counted."""
    s = Server(smollm2_path, "--nproc-per-node", "2", "-np", "1", "--max-queue", "1", "-c", "4096")
    try:
        long = s.client().with_options(timeout=600).completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=4000, temperature=0, stream=True)
        it = iter(long)
        for _ in range(3):
            next(it)
        done = {}
        short = threading.Thread(target=lambda: done.setdefault("text", s.client().completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0).choices[0].text))
        short.start()
        deadline = time.monotonic() + 30
        while "tensorsplit_requests_waiting 1" not in s.request("/metrics")[1].decode():
            assert time.monotonic() < deadline, "the short request never queued"
            time.sleep(0.05)
        # with the slot taken and the short request waiting, the queue is full: 429
        code, out = s.request("/v1/completions", json.dumps({"model": MODEL, "prompt": PROMPT}).encode())
        assert code == 429 and json.loads(out)["error"]["type"] == "rate_limit_error"
        long.response.close()                 # the client goes away
        short.join(60)
        assert done.get("text"), "the queued request was not served"
        assert "tensorsplit_requests_cancelled_total 1" in s.request("/metrics")[1].decode()
    finally:
        assert s.stop() == 0, s.err


def test_non_streamed_clients_that_go_away_free_their_slots_at_once(server):
    """Three non-streamed requests for 1000 tokens each, their sockets closed once all three hold a
    slot: the slots free within seconds (generating 1000 tokens takes far longer), each counted as
    cancelled. Plain sockets, so that nothing but the close tells the server."""
    server.wait_metric("tensorsplit_requests_running", lambda v: v == 0, 30, "an earlier request still runs")
    cancelled = server.metrics()["tensorsplit_requests_cancelled_total"]
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 1000, "temperature": 0}).encode()
    socks = []
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        socks.append(s)
    server.wait_metric("tensorsplit_requests_running", lambda v: v == 3, 30, "the three requests never ran")
    for s in socks:
        s.close()
    m = server.wait_metric("tensorsplit_requests_running", lambda v: v == 0, 5, "the slots were not freed")
    assert m["tensorsplit_requests_cancelled_total"] == cancelled + 3
    assert server.status("/health") == 200


@pytest.fixture(scope="module")
def keyed(smollm2_path):
    """A server with --api-key and otherwise default flags (no --slots, no --cors-origin)."""
    s = Server(smollm2_path, "--nproc-per-node", "1", "--api-key", "s3cret", "-c", "256")
    yield s
    assert s.stop() == 0, s.err


KEY = {"Authorization": "Bearer s3cret"}


def test_api_key_is_required_and_compared(keyed):
    s = keyed
    assert s.status("/health") == 200                                    # open, for load balancers
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        code, body = s.request("/v1/models", headers=headers)
        err = json.loads(body)["error"]
        assert code == 401 and err["type"] == "authentication_error" and err["code"] == "invalid_api_key", body
    code, body = s.request("/completion", json.dumps({"prompt": PROMPT}).encode())
    assert code == 401 and json.loads(body)["error"]["code"] == 401           # llama-server's shape there
    assert s.status("/v1/models", headers=KEY) == 200
    with pytest.raises(openai.AuthenticationError):
        s.client("wrong").models.list()
    assert [m.id for m in s.client("s3cret").models.list()] == [MODEL]


def _preflight(s: Server, origin: str):
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    try:
        conn.request("OPTIONS", "/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        r = conn.getresponse()
        r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}
    finally:
        conn.close()


def test_cors_preflight_from_localhost_is_answered_without_the_key(keyed):
    """A browser never sends the key on a preflight: it must be answered (it got 401), for pages from
    this machine by default; a page from elsewhere is not allowed without --cors-origin."""
    for origin in ("http://localhost:5173", "http://127.0.0.1:8000"):
        code, headers = _preflight(keyed, origin)
        assert code == 200 and headers["access-control-allow-origin"] == origin, (origin, code, headers)
        assert "authorization" in headers["access-control-allow-headers"].lower()
    code, headers = _preflight(keyed, "https://evil.example")
    assert code == 400 and "access-control-allow-origin" not in headers
    # the real request then carries the key, and its answer names the origin for the browser
    req = urllib.request.Request(f"{keyed.url}/v1/models", headers={**KEY, "Origin": "http://localhost:5173"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"


def test_slots_is_501_without_the_flag(keyed):
    code, body = keyed.request("/slots", headers=KEY)
    assert code == 501 and json.loads(body)["error"] == {
        "message": "the slots endpoint is off: start the server with --slots", "type": "not_supported_error",
        "param": None, "code": 501}


def test_non_loopback_without_a_key_warns(smollm2_path):
    s = Server(smollm2_path, "--nproc-per-node", "1", "--host", "0.0.0.0", "-c", "256")
    try:
        assert "without --api-key" in s.err
    finally:
        s.stop()


def test_sigterm_lets_a_request_in_flight_finish(smollm2_path):
    """A stream that has some of its tokens when SIGTERM arrives gets the rest, up to its max_tokens,
    while the server already refuses new connections; then the server exits 0."""
    s = Server(smollm2_path, "--nproc-per-node", "2", "-c", "1024")
    events = s.stream("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 200, "temperature": 0,
                                          "stream": True, "stream_options": {"include_usage": True}})
    before = [next(events) for _ in range(3)]
    assert all(e != "[DONE]" and e["choices"] and e["choices"][0]["finish_reason"] is None for e in before)
    assert s.metrics()["tensorsplit_requests_running"] == 1
    workers = list(workers_of(s.proc.pid).values())
    s.proc.send_signal(signal.SIGTERM)
    after = [next(events)]
    deadline = time.monotonic() + 10
    while s.status("/health") != 0:            # no longer accepting, the stream still going
        assert time.monotonic() < deadline, "still accepting connections 10 s after SIGTERM"
        time.sleep(0.1)
    after += list(events)
    assert after[-1] == "[DONE]" and after[-2]["usage"]["completion_tokens"] == 200
    assert after[-3]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for e in after[:-2] if e["choices"][0]["text"]) > 100     # most of it came after SIGTERM
    assert s.proc.wait(60) == 0, s.err
    assert_pids_gone(workers)


def test_a_worker_killed_mid_stream_ends_the_stream_and_the_server(smollm2_path):
    """The stream, read as plain HTTP, ends with OpenAI's error object naming the rank (not just a
    dropped connection, which a client could not tell from a network failure), and no [DONE]."""
    s = Server(smollm2_path, "--nproc-per-node", "2", "-c", "4096")
    workers = workers_of(s.proc.pid)
    events = s.stream("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 4000, "temperature": 0,
                                          "stream": True})
    assert next(events)["choices"][0]["text"] is not None
    os.kill(workers[1], signal.SIGKILL)
    t0 = time.monotonic()
    rest = list(events)
    assert rest[-1] == {"error": {"message": "rank 1 failed: killed by SIGKILL", "type": "server_error",
                                  "param": None, "code": None}}, rest[-3:]
    assert "[DONE]" not in rest and all("choices" in e for e in rest[:-1])
    code = s.proc.wait(15)
    assert code == 1 and time.monotonic() - t0 < 15
    lines = [ln for ln in s.err.splitlines() if ln.startswith("tensorsplit:")]
    assert lines[-1] == "tensorsplit: rank 1 failed: killed by SIGKILL", s.err
    assert "Traceback" not in s.err
    assert_pids_gone(list(workers.values()) + [s.proc.pid])


def test_llm_raises_when_a_worker_dies(smollm2_path):
    """The Python API with a worker killed: the caller gets WorkerFailed naming the rank, quickly."""
    from tensorsplit import LLM
    from tensorsplit.errors import WorkerFailed
    llm = LLM(smollm2_path, nproc_per_node=2, parallel=2, n_ctx=256)
    try:
        assert llm.generate(PROMPT, max_tokens=2, temperature=0)[0].completion_tokens == 2
        (pid,) = workers_of(os.getpid()).values()
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(WorkerFailed, match="rank 1 failed: killed by SIGKILL"):
            llm.generate(PROMPT, max_tokens=50, temperature=0)
        assert time.monotonic() - t0 < 15
    finally:
        llm.close()
