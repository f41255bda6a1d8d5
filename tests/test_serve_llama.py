"""`tensorsplit serve` speaking llama-server's own API, so that its users' scripts run unchanged:
/completion (prompt shapes, n_predict, n_probs, stop types, timings, streaming), /props, /slots,
/apply-template, logit_bias in both APIs, the OpenAI routes without /v1 and under any model name
(--alias), llama-server's context error, --cors-origin, and seeded sampling that batching leaves
alone. One server process (2 workers) serves the whole module; everything is plain HTTP but the
OpenAI-route checks, which use the official client."""
from __future__ import annotations

import json
import math
import threading

import pytest

from cli_helpers import run_cli
from test_serve import PROMPT, QUESTION, Server, _preflight, openai

ALIAS = "tiny-alias"
N = 8


@pytest.fixture(scope="module")
def server(smollm2_path):
    s = Server(smollm2_path, "--nproc-per-node", "2", "-np", "4", "-c", "1024", "--alias", ALIAS, "--slots",
               "--cors-origin", "https://app.example")
    yield s
    assert s.stop() == 0, s.err


def post(server: Server, path: str, body: dict, status: int = 200) -> dict:
    code, out = server.request(path, json.dumps(body).encode())
    assert code == status, (path, body, code, out[:400])
    return json.loads(out)


def complete(server: Server, **body) -> dict:
    return post(server, "/completion", {"temperature": 0, "n_predict": N, **body})


def tokenize(server: Server, text: str) -> list[int]:
    return post(server, "/tokenize", {"content": text, "add_special": True})["tokens"]


# ------------------------------------------------------------------ OpenAI routes, names

def test_openai_routes_without_v1_under_any_model_name(server):
    """/models, /completions and /chat/completions also without /v1 (base_url without it); `model`
    may be left out, and a name this server does not have is served anyway (llama-server's rule:
    clients hard-code names), the response naming the model that answered (--alias)."""
    for base in ("", "/v1"):
        code, out = server.request(f"{base}/models")
        assert code == 200 and [m["id"] for m in json.loads(out)["data"]] == [ALIAS]
    bare = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120)
    ref = server.client().completions.create(model=ALIAS, prompt=PROMPT, max_tokens=N, temperature=0)
    for name in ("gpt-4", ALIAS):
        c = bare.completions.create(model=name, prompt=PROMPT, max_tokens=N, temperature=0)
        assert c.choices[0].text == ref.choices[0].text and c.model == ALIAS
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": N, "temperature": 0}
    chat = post(server, "/chat/completions", body)                # no model at all
    assert chat["model"] == ALIAS and chat["choices"][0]["message"]["content"]
    assert post(server, "/v1/chat/completions", {**body, "model": "gpt-4o-mini"})["choices"] == chat["choices"]
    assert post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": N, "temperature": 0}
                )["choices"][0]["text"] == ref.choices[0].text


# ------------------------------------------------------------------ /completion

def test_completion_prompt_as_text_ids_mixed_or_a_list_of_one(server):
    ids = tokenize(server, PROMPT)
    words = PROMPT.split(" ")
    head = tokenize(server, words[0])
    ref = complete(server, prompt=PROMPT)
    assert ref["content"] and ref["tokens_evaluated"] == len(ids)
    # the same text as OpenAI's route gives at temperature 0
    assert ref["content"] == post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": N, "temperature": 0}
                                  )["choices"][0]["text"]
    for prompt in (ids, [PROMPT], [ids], head + [" " + " ".join(words[1:])]):
        out = complete(server, prompt=prompt)
        assert (out["content"], out["tokens_evaluated"]) == (ref["content"], len(ids)), prompt
    # llama-server reads any body as JSON: `curl -d` declares a form
    code, out = server.request("/completion", json.dumps({"prompt": PROMPT, "temperature": 0, "n_predict": N}).encode(),
                               headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert code == 200 and json.loads(out)["content"] == ref["content"]
    err = post(server, "/completion", {"prompt": [PROMPT, "another"]}, 400)["error"]
    assert err["code"] == 400 and "one per request" in err["message"]
    err = post(server, "/completion", {"prompt": [10**9]}, 400)["error"]
    assert "vocabulary" in err["message"] and err["param"] == "prompt"


def test_completion_fields_probabilities_and_timings(server):
    out = complete(server, prompt=PROMPT, n_probs=3, return_tokens=True)
    assert out["stop"] is True and out["stop_type"] == "limit" and out["stopping_word"] == ""
    assert out["tokens_predicted"] == N and len(out["tokens"]) == N and out["truncated"] is False
    assert post(server, "/detokenize", {"tokens": out["tokens"]})["content"] == out["content"]
    assert out["model"] == ALIAS and out["generation_settings"]["n_predict"] == N and out["id_slot"] in range(4)
    t = out["timings"]
    assert (t["prompt_n"], t["predicted_n"], t["cache_n"]) == (out["tokens_evaluated"], N, 0)
    assert t["prompt_ms"] > 0 and t["predicted_ms"] > 0
    assert t["predicted_per_second"] == pytest.approx(N / t["predicted_ms"] * 1e3)
    assert t["prompt_per_token_ms"] == pytest.approx(t["prompt_ms"] / t["prompt_n"])
    probs = out["completion_probabilities"]
    assert [p["id"] for p in probs] == out["tokens"]
    for p in probs:          # greedy: the chosen token is the most likely of the model's distribution
        assert set(p) == {"id", "token", "bytes", "logprob", "top_logprobs"} and len(p["top_logprobs"]) == 3
        assert p["top_logprobs"][0]["id"] == p["id"] and p["top_logprobs"][0]["logprob"] == pytest.approx(p["logprob"])
        assert p["logprob"] <= 0 and bytes(p["bytes"]).decode() == p["token"]
        lps = [q["logprob"] for q in p["top_logprobs"]]
        assert lps == sorted(lps, reverse=True)
    assert "".join(p["token"] for p in probs) == out["content"]


def test_completion_stop_types(server):
    ref = complete(server, prompt=PROMPT)
    cut = ref["content"][3:6]                    # a stop string from inside the greedy text
    word = complete(server, prompt=PROMPT, stop=[cut, "never appears"])
    assert (word["stop_type"], word["stopping_word"]) == ("word", cut)
    assert word["content"] == ref["content"][:ref["content"].index(cut)]
    eos = tokenize(server, "<|im_end|>")                         # parsed as the special token
    assert len(eos) == 1
    forced = complete(server, prompt=PROMPT, logit_bias=[[eos[0], 100]])
    assert (forced["stop_type"], forced["content"], forced["tokens_predicted"]) == ("eos", "", 1)
    # ignore_eos bans every end-of-generation token, whatever the bias asked
    kept = complete(server, prompt=PROMPT, logit_bias=[[eos[0], 100]], ignore_eos=True)
    assert kept["stop_type"] == "limit" and kept["tokens_predicted"] == N
    # n_predict past the context's end: it stops there (llama-server's rule), truncated
    long = "word " * 1010
    n_prompt = len(tokenize(server, long))
    end = complete(server, prompt=long, n_predict=500)
    assert end["tokens_predicted"] == 1024 - n_prompt and end["truncated"] is True and end["stop_type"] == "limit"
    # n_predict 0: nothing generated (llama-server would only fill its prompt cache; there is none)
    zero = complete(server, prompt=PROMPT, n_predict=0)
    assert (zero["content"], zero["tokens_predicted"], zero["stop_type"]) == ("", 0, "limit")


def test_completion_streams_llama_server_events(server):
    ref = complete(server, prompt=PROMPT, n_probs=2, return_tokens=True)
    events = server.sse("/completion", {"prompt": PROMPT, "temperature": 0, "n_predict": N, "stream": True,
                                        "n_probs": 2})
    assert "[DONE]" not in events                      # OpenAI's marker; llama-server's stream has none
    *chunks, last = events
    assert all(c["stop"] is False and set(c) >= {"content", "tokens"} for c in chunks)
    assert "".join(c["content"] for c in chunks) == ref["content"]
    assert [t for c in events for t in c["tokens"]] == ref["tokens"]
    assert [p for c in events for p in c["completion_probabilities"]] == ref["completion_probabilities"]
    assert last["stop"] is True and last["content"] == "" and last["tokens_predicted"] == N
    assert last["stop_type"] == "limit" and set(last["timings"]) == set(ref["timings"])


def test_llama_fields_neutral_values_pass_others_are_refused(server):
    # what llama-server's web UI and scripts send along, at the values that turn them off
    neutral = {"mirostat": 0, "mirostat_tau": 5, "typical_p": 1, "dry_multiplier": 0, "xtc_probability": 0,
               "n_keep": 0, "cache_prompt": True, "presence_penalty": 0, "samplers": None, "top_n_sigma": -1}
    assert complete(server, prompt=PROMPT, **neutral)["content"] == complete(server, prompt=PROMPT)["content"]
    for field, value in (("mirostat", 2), ("typical_p", 0.5), ("grammar", "root ::= \"a\""), ("frobnicate", 1)):
        err = post(server, "/completion", {"prompt": PROMPT, field: value}, 400)["error"]
        assert field in err["message"] and err["code"] == 400, err


# ------------------------------------------------------------------ logit_bias

@pytest.mark.parametrize("path", ["/completion", "/v1/completions"])
def test_logit_bias_in_both_apis_and_all_forms(server, path):
    def text(bias) -> str:
        body = {"prompt": PROMPT, "temperature": 0, "n_predict" if path == "/completion" else "max_tokens": N}
        out = post(server, path, {**body, **({"logit_bias": bias} if bias is not None else {})})
        return out["content"] if path == "/completion" else out["choices"][0]["text"]
    ref = text(None)
    first = tokenize(server, ref)[0]
    piece = post(server, "/detokenize", {"tokens": [first]})["content"]
    banned = [{str(first): -100}, {str(first): False}, [[first, False]], [[piece, False]], {piece: False}]
    for bias in banned:                           # the greedy first token, banned four ways
        out = text(bias)
        assert out != ref and not out.startswith(piece), (bias, out)
    (word,) = tokenize(server, " banana")        # one token; +100 makes it every greedy pick
    for bias in ({str(word): 100}, [[word, 100]], [[" banana", 100]]):
        assert text(bias) == " banana" * N, bias
    for bad in ({"99999999": 1}, [[first, True]], [[first, "x"]], [1, 2], "x"):
        code, out = server.request(path, json.dumps({"prompt": PROMPT, "logit_bias": bad}).encode())
        assert code == 400 and "logit_bias" in json.loads(out)["error"]["message"], (bad, out)


# ------------------------------------------------------------------ props, slots, template, errors

def test_props_and_apply_template(server):
    props = json.loads(server.request("/props")[1])
    assert props["total_slots"] == 4 and props["model_alias"] == ALIAS and props["model_path"].endswith(".gguf")
    settings = props["default_generation_settings"]
    assert settings["n_ctx"] == 1024 and settings["params"]["temperature"] == pytest.approx(0.8)
    assert "im_start" in props["chat_template"]
    messages = [{"role": "user", "content": QUESTION}]
    prompt = post(server, "/apply-template", {"messages": messages})["prompt"]
    assert QUESTION in prompt and prompt.rstrip().endswith("assistant")
    # the templated prompt sent to /completion gives what chat gives
    chat = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": N, "temperature": 0})
    assert complete(server, prompt=prompt)["content"] == chat["choices"][0]["message"]["content"]


def test_slots_show_a_request_in_flight(server):
    idle = json.loads(server.request("/slots")[1])
    assert [s["id"] for s in idle] == [0, 1, 2, 3] and not any(s["is_processing"] for s in idle)
    events = server.stream("/completion", {"prompt": PROMPT, "temperature": 0, "n_predict": 300, "stream": True,
                                           "seed": 7})
    try:
        for _ in range(3):
            next(events)
        busy = [s for s in json.loads(server.request("/slots")[1]) if s["is_processing"]]
        assert len(busy) == 1 and busy[0]["next_token"]["n_decoded"] >= 3 and busy[0]["params"]["seed"] == 7
        assert busy[0]["next_token"]["n_remain"] == 300 - busy[0]["next_token"]["n_decoded"]
        assert server.status("/slots?fail_on_no_slot=1") == 200           # three are free
    finally:
        events.close()


@pytest.mark.parametrize("path,body,code", [
    ("/completion", {"prompt": "word " * 1100}, 400),
    ("/v1/completions", {"prompt": "word " * 1100}, "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 1100}]}, "context_length_exceeded"),
])
def test_a_prompt_over_the_context_gets_llama_servers_error(server, path, body, code):
    err = post(server, path, body, 400)["error"]
    assert err["type"] == "exceed_context_size_error" and err["n_ctx"] == 1024 and err["code"] == code
    assert err["n_prompt_tokens"] > 1024 and "context" in err["message"]


@pytest.mark.parametrize("args,word", [
    (("--cors-origin", "not an origin"), "--cors-origin"),
    (("--cors-origin", "https://ok.example,ftp//x"), "--cors-origin"),
    (("--alias", " "), "--alias"),
])
def test_bad_serve_flags_fail_before_loading(smollm2_path, args, word):
    r = run_cli("serve", str(smollm2_path), "--port", "1", *args, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and word in lines[0], r.stderr


def test_cors_origin_widens_the_default(server):
    for origin in ("https://app.example", "http://localhost:3000"):
        code, headers = _preflight(server, origin)
        assert code == 200 and headers["access-control-allow-origin"] == origin
    code, headers = _preflight(server, "https://other.example")
    assert code == 400 and "access-control-allow-origin" not in headers


# ------------------------------------------------------------------ seeded sampling under batching

def test_seeded_sampling_is_the_same_alone_and_batched(server):
    """A sampled request (temperature 1) with a seed gives the same text, token probabilities and
    logprobs alone and while three other requests are decoded in the same steps."""
    native = {"prompt": PROMPT, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": 1234,
              "n_predict": 24, "n_probs": 3}
    chat = {"messages": [{"role": "user", "content": QUESTION}], "temperature": 1.0, "seed": 99,
            "max_tokens": 24, "logprobs": True, "top_logprobs": 3}

    def both() -> tuple[dict, dict]:
        a = post(server, "/completion", native)
        b = post(server, "/v1/chat/completions", chat)
        return ((a["content"], a["completion_probabilities"]),
                (b["choices"][0]["message"]["content"], b["choices"][0]["logprobs"]))
    alone = both()
    assert alone[0][0] and alone[1][0]
    # ignore_eos: a sampled story could end early, and the seeded requests would then run beside fewer
    other = [{"prompt": f"Story {i}: once upon a time", "temperature": 0.9, "n_predict": 200, "ignore_eos": True}
             for i in range(3)]
    threads = [threading.Thread(target=post, args=(server, "/completion", o)) for o in other]
    for t in threads:
        t.start()
    server.wait_metric("tensorsplit_requests_running", lambda v: v >= 3, 60, "the other requests never ran")
    batched = both()
    # the others (200 tokens each) outlast the seeded two (24 tokens each, one after the other)
    still = server.metrics()["tensorsplit_requests_running"]
    for t in threads:
        t.join(300)
    assert still == 3, "the other requests had finished: the seeded ones may have run alone"
    assert batched == alone
    # and a different seed gives a different text, so the seed is what made them equal
    assert post(server, "/completion", {**native, "seed": 4321})["content"] != alone[0][0]
    assert all(math.isfinite(p["logprob"]) for p in alone[0][1])
