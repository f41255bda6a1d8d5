#!/usr/bin/env python3
"""Write llama.cpp golden fixtures for the tests (tokenizer ids, top logits, perplexity).

Run with a Python that has llama-cpp-python (the reference llama.cpp); CI never runs this, the
tests only read the JSON files it leaves in tests/fixtures/:

    /work/refvenv/bin/python scripts/make_golden.py [--models smollm2,gemma3-270m] [--archs all] [--pre all]

(that Python needs numpy and gguf as well; `--models ''` etc. skips a group.)

Files written:
  tests/fixtures/english.txt            plain English prose (the start of the GNU GPL v3 text,
                                         /usr/share/common-licenses/GPL-3; verbatim copying permitted)
  tests/fixtures/<model>_golden.json    per model: tokenize, pieces, vocab, top_logits, perplexity
                                         (Gemma 3 also perplexity_long, at n_ctx 2048 > its window 512)
  tests/fixtures/arch_<name>_golden.json  per synthetic architecture file (tests/golden_models.py):
                                         top_logits and perplexity at each of its contexts
  tests/fixtures/<model>_kv_golden.json per model (`--kv`): perplexity as above with the KV cache in
                                         q8_0 and in q4_0 (keys and values; flash attention on, which
                                         llama.cpp needs for a quantized V cache), and in f16 with flash
                                         attention, the baseline of those two
  tests/fixtures/pretokenizers_golden.json  ids of the tokenizer texts under SmolLM2's vocabulary
                                         with tokenizer.ggml.pre set to each of llama-bpe, qwen2, ...
  tests/fixtures/smollm2_chat_reply.json  llama.cpp's greedy reply to the chat test's prompt, with its
                                         top two logits at each step, one entry per instruction-set
                                         family (`--chat`: this machine's entry is replaced, the
                                         others kept; llama.cpp's greedy text differs between
                                         AVX2 and AVX-512 builds where its top two are close)

Every fixture records the sha256 of the GGUF file llama.cpp read; the synthetic files are written
to a temporary folder from tests/golden_models.py, which the tests use to rebuild them.

Perplexity follows llama-perplexity: tokenize the whole text once (BOS per the model's add_bos),
cut it into chunks of n_ctx tokens, replace each chunk's first token by BOS where the model adds
BOS, evaluate each chunk from an empty cache, and score the second half only: the logits at
positions n_ctx/2 .. n_ctx-2 predicting tokens n_ctx/2+1 .. n_ctx-1.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
FIXTURES = ROOT / "tests" / "fixtures"
ENGLISH = FIXTURES / "english.txt"
ENGLISH_SOURCE = Path("/usr/share/common-licenses/GPL-3")
ENGLISH_MIN_CHARS = 19_600   # enough for >= 8 chunks of 512 SmolLM2 tokens

N_CTX = 512
N_CTX_LONG = {"gemma3-270m": 2048}   # a second perplexity run, past Gemma 3's sliding window of 512
N_THREADS = 2
TOP_K = 10

UNICODE_TEXT = (
    "Unicode: naïve café, Ünïcödé — “quotes” ‘single’ … ½ ² ③ Ⅻ\n"
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️\n"
    "CJK: 你好，世界！日本語のテキスト、カタカナ。한국어 텍스트\n"
    "Other scripts: Привет мир. Γειά σου κόσμε. مرحبا بالعالم. שלום עולם. नमस्ते दुनिया\n"
    "Numbers: 0 7 42 1234 1234567890 3.14159 -2.5e-10 1,000,000 0x1F $19.99 100%\n"
    "Code:\n"
    "def f(x, y=2):\n"
    "    if x >= 10 and y != 0:\n"
    "\treturn {'a': [1, 2, 3]}  # comment\n"
    "    return x ** y // 3\n"
    "int main() { printf(\"%d\\n\", a[i++]); return 0; }\n"
    "Whitespace:  two   three    four     five\t\ttabs \t mixed\u00a0nbsp\u3000ideographic\n"
    "\n\n\nthree newlines above\r\nCRLF line\n"
    "   leading spaces and trailing spaces   \n"
    "Contractions: I'm you're we've they'll she'd it's don't DON'T I'M We'Re\n"
    "HTML: <table><tr><td>cell</td></tr></table> <b>bold</b> <h1>Title</h1>\n"
    "Markup-like: <s> </s> <unk> <pad> <eos> <bos> [INST] <<SYS>> <0x0A> ▁▁ lone▁marker\n"
    "end"
)
CHAT_TEXT = "<|im_start|>user\nhi<|im_end|>"
SPECIALS_TEXT = (
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|><|endoftext|>"
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n<eos><bos></s><unused3><mask>"
    "<repo_name><reponame><file_sep>x<|im_end|>y"
)
EDGE_TEXTS = {
    "empty": "",
    "space": " ",
    "spaces": "     ",
    "newline": "\n",
    "newlines_long": "\n" * 40 + "x" + " " * 40 + "y" + "\t" * 40,
    "leading_space_word": " Hello",
    "digits": "12345678901234567890",
    "punct": "!!!???...,,,;;;:::---___===+++***&&&^^^%%%$$$###@@@",
    "apostrophes": "'s 's's ''' 'll'LL 've 'S",
    "single_emoji": "😀",
}

PROMPTS = {
    # name -> (text, parse_special); chat prompts are per model (their own template tokens)
    "plain": ("The capital of France is Paris. The capital of Germany is", False),
    "code": ("def fibonacci(n):\n    if n < 2:\n        return n\n    return", False),
}
CHAT_PROMPT = {
    "smollm2": "<|im_start|>user\nWhat is 2+2? Answer briefly.<|im_end|>\n<|im_start|>assistant\n",
    "gemma3-270m": "<start_of_turn>user\nWhat is 2+2? Answer briefly.<end_of_turn>\n<start_of_turn>model\n",
}


def english_text() -> str:
    if ENGLISH.exists():
        return ENGLISH.read_text(encoding="utf-8")
    src = ENGLISH_SOURCE.read_text(encoding="utf-8")
    cut = src.find("\n\n", ENGLISH_MIN_CHARS)
    text = src[: cut + 1] if cut > 0 else src
    FIXTURES.mkdir(parents=True, exist_ok=True)
    ENGLISH.write_text(text, encoding="utf-8")
    return text


def piece(llama_cpp, vocab, tid: int, special: bool) -> bytes:
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_token_to_piece(vocab, tid, buf, 256, 0, special)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, tid, buf, -n, 0, special)
    return buf.raw[:n]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def load(path: Path, n_ctx: int, **kw):
    from llama_cpp import Llama
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=N_THREADS,
                 n_threads_batch=N_THREADS, logits_all=True, verbose=False, seed=0, **kw)


def tokenizer(llm):
    """tok(text, add_special, parse_special) -> llama.cpp's ids."""
    import llama_cpp
    vocab = llm._model.vocab
    bos, add_bos = int(llama_cpp.llama_vocab_bos(vocab)), bool(llama_cpp.llama_vocab_get_add_bos(vocab))

    def tok(text: str, add_special: bool, parse_special: bool) -> list[int]:
        if not text:
            return [bos] if (add_special and add_bos) else []
        return [int(t) for t in llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)]
    return tok


def top_logits(llm, tok, prompts: dict, n_ctx: int) -> dict:
    """The top TOP_K logits at every position of each prompt, each evaluated from an empty cache."""
    top = []
    for name, (text, parse_special) in prompts.items():
        ids_p = tok(text, True, parse_special)
        assert 10 <= len(ids_p) <= 40, (name, len(ids_p))
        llm.reset()
        llm.eval(ids_p)
        logits = np.array(llm.scores[: len(ids_p)], dtype=np.float32)
        positions = []
        for row in logits:
            idx = np.argsort(-row, kind="stable")[:TOP_K]
            positions.append([[int(i), round(float(row[i]), 5)] for i in idx])
        top.append({"name": name, "text": text, "parse_special": parse_special, "ids": ids_p, "top": positions})
    return {"n_ctx": n_ctx, "n_threads": N_THREADS, "k": TOP_K, "prompts": top}


def perplexity(llm, tokens: list[int], n_ctx: int, bos: int | None, label: str) -> dict:
    """llama-perplexity's convention (see the module docstring); bos: the id that replaces each
    chunk's first token, None where the model adds no BOS."""
    n_chunks = len(tokens) // n_ctx
    first = n_ctx // 2
    chunks = []
    t0 = time.time()
    for c in range(n_chunks):
        chunk = tokens[c * n_ctx:(c + 1) * n_ctx]
        if bos is not None:
            chunk[0] = bos
        llm.reset()
        llm.eval(chunk)
        logits = np.array(llm.scores[first:n_ctx - 1], dtype=np.float32)
        lp = log_softmax(logits)
        targets = np.array(chunk[first + 1:n_ctx])
        nll = -lp[np.arange(len(targets)), targets]
        chunks.append({"nll_sum": float(nll.sum()), "count": int(len(targets)),
                       "argmax": [int(i) for i in logits.argmax(axis=-1)]})
        print(f"  {label} n_ctx {n_ctx}: chunk {c + 1}/{n_chunks} ppl so far "
              f"{math.exp(sum(x['nll_sum'] for x in chunks) / sum(x['count'] for x in chunks)):.4f}",
              file=sys.stderr)
    total_nll = sum(x["nll_sum"] for x in chunks)
    total_n = sum(x["count"] for x in chunks)
    return {
        "text_file": ENGLISH.name,
        "n_ctx": n_ctx,
        "n_threads": N_THREADS,
        "add_bos": bos is not None,
        "n_tokens": len(tokens),
        "n_chunks": n_chunks,
        "first_scored": first,
        "chunks": chunks,
        "ppl": math.exp(total_nll / total_n),
        "seconds": round(time.time() - t0, 1),
    }


def make(model_key: str, english: str, command: str) -> dict:
    import llama_cpp

    from golden_models import sha256
    from tensorsplit import models

    path = models.fetch(model_key, quiet=True)
    llm = load(path, N_CTX)
    vocab = llm._model.vocab
    n_vocab = llm.n_vocab()
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
    add_eos = bool(llama_cpp.llama_vocab_get_add_eos(vocab))
    bos = int(llama_cpp.llama_vocab_bos(vocab))
    tok = tokenizer(llm)

    out: dict = {
        "_comment": (f"llama.cpp golden fixture for {path.name}. english.txt is the start of the GNU GPL v3 "
                     f"text ({ENGLISH_SOURCE}, verbatim copying permitted). Written by scripts/make_golden.py."),
        "model": model_key,
        "model_file": path.name,
        "model_sha256": sha256(path),
        "llama_cpp_version": llama_cpp.__version__,
        "command": command,
        "vocab": {
            "n_vocab": n_vocab,
            "bos_id": bos,
            "eos_id": int(llama_cpp.llama_vocab_eos(vocab)),
            "add_bos": add_bos,
            "add_eos": add_eos,
            "eog_ids": [i for i in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i)],
        },
    }

    # --- tokenize
    texts = {"english": None, "unicode": UNICODE_TEXT, "chat": CHAT_TEXT, "specials": SPECIALS_TEXT,
             **EDGE_TEXTS}
    cases = []
    for name, text in texts.items():
        full = english if text is None else text
        for add_special in (True, False):
            for parse_special in (False, True):
                case = {"name": name, "add_special": add_special, "parse_special": parse_special,
                        "ids": tok(full, add_special, parse_special)}
                if text is None:
                    case["text_file"] = ENGLISH.name
                else:
                    case["text"] = text
                cases.append(case)
    out["tokenize"] = cases

    # --- pieces (token_to_piece with special true / false), as hex
    ids = set(tok(UNICODE_TEXT, False, False)) | set(tok(SPECIALS_TEXT, True, True))
    ids |= set(range(0, min(n_vocab, 300)))
    ids |= set(range(0, n_vocab, 997))
    out["pieces"] = [
        {"id": i, "special": piece(llama_cpp, vocab, i, True).hex(), "plain": piece(llama_cpp, vocab, i, False).hex()}
        for i in sorted(ids)
    ]

    # --- top logits for short prompts
    prompts = dict(PROMPTS)
    prompts["chat"] = (CHAT_PROMPT[model_key], True)
    out["top_logits"] = top_logits(llm, tok, prompts, N_CTX)

    # --- perplexity, llama-perplexity style
    tokens = tok(english, True, False)
    out["perplexity"] = perplexity(llm, tokens, N_CTX, bos if add_bos else None, model_key)
    if model_key in N_CTX_LONG:
        n_ctx = N_CTX_LONG[model_key]
        if hasattr(llm, "close"):
            llm.close()
        llm = load(path, n_ctx)
        out["perplexity_long"] = perplexity(llm, tokens, n_ctx, bos if add_bos else None, model_key)
    if hasattr(llm, "close"):
        llm.close()
    return out


KV_RUNS = {"f16-fa": 1, "q8_0": 8, "q4_0": 2}      # run name -> GGML type of k and v (flash attention on)


def make_kv(model_key: str, english: str, command: str) -> dict:
    """Perplexity with each KV cache type of KV_RUNS, llama-perplexity -ctk T -ctv T -fa on style."""
    import llama_cpp

    from golden_models import sha256
    from tensorsplit import models

    path = models.fetch(model_key, quiet=True)
    out: dict = {"_comment": f"llama.cpp perplexity of {path.name} per KV cache type. Written by scripts/make_golden.py.",
                 "model": model_key, "model_file": path.name, "model_sha256": sha256(path),
                 "llama_cpp_version": llama_cpp.__version__, "command": command, "runs": {}}
    for name, ggml_type in KV_RUNS.items():
        llm = load(path, N_CTX, flash_attn=True, type_k=ggml_type, type_v=ggml_type)
        vocab = llm._model.vocab
        add_bos, bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab)), int(llama_cpp.llama_vocab_bos(vocab))
        tokens = tokenizer(llm)(english, True, False)
        out["runs"][name] = perplexity(llm, tokens, N_CTX, bos if add_bos else None, f"{model_key} {name}")
        if hasattr(llm, "close"):
            llm.close()
    return out


# run name -> (tensorsplit's flags, llama-cpp-python's context parameters): rope overrides over SmolLM2's file
ROPE_RUNS = {
    "yarn": (["--rope-scaling", "yarn", "--rope-scale", "4", "--yarn-orig-ctx", "128", "--yarn-ext-factor", "0.5",
              "--yarn-beta-fast", "16", "--yarn-beta-slow", "2"],
             {"rope_scaling_type": 2, "rope_freq_scale": 0.25, "yarn_orig_ctx": 128, "yarn_ext_factor": 0.5,
              "yarn_beta_fast": 16.0, "yarn_beta_slow": 2.0}),
    "linear": (["--rope-scaling", "linear", "--rope-freq-scale", "0.5", "--rope-freq-base", "50000",
                "--yarn-attn-factor", "0.9"],
               {"rope_scaling_type": 1, "rope_freq_scale": 0.5, "rope_freq_base": 50000.0, "yarn_attn_factor": 0.9}),
}
ROPE_CHUNKS = 4


def make_rope(english: str, command: str) -> dict:
    """SmolLM2's perplexity over ROPE_CHUNKS chunks with each of ROPE_RUNS's rope overrides."""
    import llama_cpp

    from golden_models import sha256
    from tensorsplit import models

    path = models.fetch("smollm2", quiet=True)
    out: dict = {"_comment": f"llama.cpp perplexity of {path.name} with rope flags (ROPE_RUNS: tensorsplit's flags "
                             "and llama.cpp's context parameters). Written by scripts/make_golden.py.",
                 "model": "smollm2", "model_file": path.name, "model_sha256": sha256(path),
                 "llama_cpp_version": llama_cpp.__version__, "command": command, "runs": {}}
    for name, (flags, params) in ROPE_RUNS.items():
        llm = load(path, N_CTX, **params)
        tokens = tokenizer(llm)(english, True, False)[:ROPE_CHUNKS * N_CTX]
        out["runs"][name] = {"flags": flags, "llama_cpp_params": params,
                             **perplexity(llm, tokens, N_CTX, None, f"smollm2 rope {name}")}
        if hasattr(llm, "close"):
            llm.close()
    return out


def make_arch(name: str, english: str, command: str, smollm2: Path, tmp: Path) -> dict:
    """Goldens of one synthetic architecture file (tests/golden_models.py's ARCH_MODELS[name])."""
    from golden_models import ARCH_MODELS, sha256, write_arch_model

    import llama_cpp
    spec = ARCH_MODELS[name]
    path = write_arch_model(name, tmp / f"{name}.gguf", smollm2)
    out: dict = {
        "_comment": (f"llama.cpp golden fixture for the synthetic {spec.arch} file '{name}' ({spec.note}): random "
                     "weights, SmolLM2's tokenizer; tests/golden_models.py rebuilds it bit for bit (model_sha256). "
                     "Written by scripts/make_golden.py."),
        "arch_model": name,
        "arch": spec.arch,
        "model_sha256": sha256(path),
        "model_bytes": path.stat().st_size,
        "tokenizer_from": {"file": smollm2.name, "sha256": sha256(smollm2)},
        "llama_cpp_version": llama_cpp.__version__,
        "command": command,
        "top_logits": [],
        "perplexity": [],
    }
    prompts = dict(PROMPTS)
    prompts["chat"] = (CHAT_PROMPT["smollm2"], True)
    for n_ctx in sorted(set(spec.top_ctx) | set(spec.ppl_ctx)):
        llm = load(path, n_ctx)
        assert bool(llama_cpp.llama_vocab_get_add_bos(llm._model.vocab)) is False   # SmolLM2's tokenizer
        tok = tokenizer(llm)
        if n_ctx in spec.top_ctx:
            out["top_logits"].append(top_logits(llm, tok, prompts, n_ctx))
        if n_ctx in spec.ppl_ctx:
            out["perplexity"].append(perplexity(llm, tok(english, True, False), n_ctx, None, name))
        if hasattr(llm, "close"):
            llm.close()
    return out


PRE_EXTRA_TEXTS = {
    "multibyte": "𠀋 𝔘 䶵 ᚠ 𐌀 😀 👨‍👩‍👧‍👦 你好，世界 ½ ü",
    "mixed": "Hello world! It's 12345 apples.\n\n  x 12345 I'M they'LL 3.14 ++x -- 'quoted' \r\n\tend",
    # for gpt-4o's case-split words: upper/lower runs, contractions in any case, non-ASCII letters
    # (which llama.cpp counts as both cases), combining marks, digit runs, "/" after punctuation
    "cased": ("CamelCase camelCase XMLHttpRequest iPhone McDonald's HELLO'S DON'T don't Don'T I'LL i'm "
              "WE'VE they'D x'Re\n"
              "ÉCOLE école Straße ǅemal ÀBC àBc ΑΘΗΝΑ Αθήνα МОСКВА Москва e\u0301te\u0301 n\u0303o\n"
              "1 12 123 1234 12345 1234567 x1y22z333 3.14159 1,000,000 ½² ③Ⅻ ٣٤٥\n"
              "日本語テキスト漢字 한국어 😀👍🏽👨\u200d👩\u200d👧 🇫🇷 a😀b\n"
              "two  three   tab\t\tx \u00a0nbsp\u3000ideo\u2028ls\u0085nel \n\n\n  \r\n\r\n end  \n"
              "...!!! ?! a/b/c // path/to/file.txt http://x.y/z {{x}} --flag=1 'q' \"dq\" ;;\n/\n=/\n"
              "  trailing   "),
}


def make_pretokenizers(english: str, command: str, smollm2: Path, tmp: Path) -> dict:
    """Ids of the tokenizer texts under SmolLM2's vocabulary with each tokenizer.ggml.pre of
    tests/golden_models.py's PRE_VOCABS (vocab-only files)."""
    import llama_cpp
    from llama_cpp import Llama

    from golden_models import PRE_VOCABS, sha256, write_vocab

    texts = {"english": None, "unicode": UNICODE_TEXT, "chat": CHAT_TEXT, "specials": SPECIALS_TEXT,
             **EDGE_TEXTS, **PRE_EXTRA_TEXTS}
    out: dict = {
        "_comment": ("llama.cpp's ids for SmolLM2's vocabulary and merges under other pre-tokenizers "
                     "(tokenizer.ggml.pre), from vocab-only files that tests/golden_models.py rebuilds bit for bit. "
                     "English (english.txt) only with add_special; the other texts with add_special and no "
                     "parse_special, and without add_special with parse_special. Written by scripts/make_golden.py."),
        "tokenizer_from": {"file": smollm2.name, "sha256": sha256(smollm2)},
        "llama_cpp_version": llama_cpp.__version__,
        "command": command,
        "texts": {k: v for k, v in texts.items() if v is not None},
        "vocabs": {},
    }
    for name, (pre, drop) in PRE_VOCABS.items():
        path = write_vocab(name, tmp / f"vocab-{name}.gguf", smollm2)
        llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
        tok = tokenizer(llm)
        cases = []
        for text_name, text in texts.items():
            combos = [(True, False)] if text is None else [(True, False), (False, True)]
            for add_special, parse_special in combos:
                cases.append({"text": text_name, "add_special": add_special, "parse_special": parse_special,
                              "ids": tok(english if text is None else text, add_special, parse_special)})
        out["vocabs"][name] = {"pre": pre, "dropped": list(drop), "sha256": sha256(path),
                               "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(llm._model.vocab)), "cases": cases}
        if hasattr(llm, "close"):
            llm.close()
    return out


CHAT_REPLY = FIXTURES / "smollm2_chat_reply.json"
CHAT_REPLY_TOKENS = 8


def isa_family(system_info: str) -> str:
    """The instruction-set family of a llama.cpp build, from its system info ("AVX512 = 1 | ...")."""
    flags = dict(part.strip().split(" = ") for part in system_info.replace("CPU :", "").split("|") if " = " in part)
    if flags.get("AVX512") == "1":
        return "avx512"
    return "avx2" if flags.get("AVX2") == "1" else "other"


def _literal(path: Path, name: str):
    """The literal assigned to `name` at the top of a Python file, read without importing it."""
    import ast
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise KeyError(f"{path}: no {name} = ...")


def make_chat_reply(smollm2: Path, command: str) -> dict:
    """llama.cpp's greedy reply to tests/test_chat_cli.py's prompt ids, one token at a time as its
    generate() decodes, with the top two logits at each step; merged into the fixture under this
    build's instruction-set family."""
    import llama_cpp
    from golden_models import sha256

    QUESTION_IDS = _literal(ROOT / "tests" / "test_chat_cli.py", "QUESTION_IDS")   # the test's own prompt ids
    llm = load(smollm2, 256)
    llm.reset()
    llm.eval(QUESTION_IDS)
    ids, top2 = [], []
    for _ in range(CHAT_REPLY_TOKENS):
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        first, second = np.argsort(-row, kind="stable")[:2]
        top2.append([[int(first), round(float(row[first]), 5)], [int(second), round(float(row[second]), 5)]])
        ids.append(int(first))
        llm.eval([int(first)])
    info = llama_cpp.llama_print_system_info().decode().strip()
    old = json.loads(CHAT_REPLY.read_text()) if CHAT_REPLY.exists() else {}
    replies = {**old.get("replies", {}), isa_family(info): {
        "ids": ids, "top2": top2, "system_info": info, "n_threads": N_THREADS,
        "llama_cpp_version": llama_cpp.__version__, "command": command}}
    return {"_comment": ("llama.cpp's greedy reply to the chat prompt of tests/test_chat_cli.py (QUESTION_IDS), "
                         "decoded one token at a time, with its top two logits per step, per instruction-set "
                         "family of the llama.cpp build (AVX2 and AVX-512 builds reply differently where the top "
                         "two are close). Written by scripts/make_golden.py --chat."),
            "model_file": smollm2.name, "model_sha256": sha256(smollm2), "prompt_ids": QUESTION_IDS,
            "replies": dict(sorted(replies.items()))}


def write_fixture(dest: Path, data: dict, summary: str) -> None:
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    dest.write_text(text + "\n", encoding="utf-8")
    print(f"{dest.relative_to(ROOT)}: {len(text.encode()) / 1024:.0f} KiB, {summary}", file=sys.stderr)


def main() -> None:
    import tempfile

    from golden_models import ARCH_MODELS
    from tensorsplit import models

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,gemma3-270m", help="real models ('' for none)")
    ap.add_argument("--archs", default="all", help=f"synthetic architecture files: all, '' or some of "
                                                   f"{','.join(ARCH_MODELS)}")
    ap.add_argument("--pre", default="all", help="the pre-tokenizer fixture: all or ''")
    ap.add_argument("--kv", action="store_true", help="only the KV-cache-type perplexities of --models "
                                                       "(<model>_kv_golden.json)")
    ap.add_argument("--chat", action="store_true", help="only SmolLM2's greedy chat reply, for this machine's "
                                                         "instruction-set family (smollm2_chat_reply.json)")
    ap.add_argument("--rope", action="store_true", help="only SmolLM2's perplexities with rope flags "
                                                         "(smollm2_rope_golden.json)")
    args = ap.parse_args()
    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).as_posix(), "scripts/make_golden.py", *sys.argv[1:]])
    if args.chat:
        data = make_chat_reply(models.fetch("smollm2", quiet=True), command)
        write_fixture(CHAT_REPLY, data, "replies for " + ", ".join(data["replies"]))
        return
    english = english_text()
    if args.rope:
        data = make_rope(english, command)
        write_fixture(FIXTURES / "smollm2_rope_golden.json", data,
                      "; ".join(f"{n} ppl {r['ppl']:.4f}" for n, r in data["runs"].items()))
        return
    if args.kv:
        for key in filter(None, (k.strip() for k in args.models.split(","))):
            data = make_kv(key, english, command)
            write_fixture(FIXTURES / f"{key}_kv_golden.json", data,
                          "; ".join(f"{n} ppl {r['ppl']:.4f}" for n, r in data["runs"].items()))
        return
    for key in filter(None, (k.strip() for k in args.models.split(","))):
        data = make(key, english, command)
        ppl = [data["perplexity"]] + ([data["perplexity_long"]] if "perplexity_long" in data else [])
        write_fixture(FIXTURES / f"{key}_golden.json", data,
                      "; ".join(f"ppl {p['ppl']:.4f} over {p['n_chunks']} chunks of {p['n_ctx']}" for p in ppl))
    archs = list(ARCH_MODELS) if args.archs == "all" else list(filter(None, (a.strip() for a in args.archs.split(","))))
    if archs or args.pre:
        smollm2 = models.fetch("smollm2", quiet=True)
        with tempfile.TemporaryDirectory() as tmp:
            for name in archs:
                data = make_arch(name, english, command, smollm2, Path(tmp))
                write_fixture(FIXTURES / f"arch_{name}_golden.json", data,
                              "; ".join(f"ppl {p['ppl']:.2f} at n_ctx {p['n_ctx']}" for p in data["perplexity"]))
            if args.pre:
                data = make_pretokenizers(english, command, smollm2, Path(tmp))
                write_fixture(FIXTURES / "pretokenizers_golden.json", data, f"{len(data['vocabs'])} vocabularies")


if __name__ == "__main__":
    main()
