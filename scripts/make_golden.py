#!/usr/bin/env python3
"""Write llama.cpp golden fixtures for the tests (tokenizer ids, top logits, perplexity).

Run with a Python that has llama-cpp-python (the reference llama.cpp); CI never runs this, the
tests only read the JSON files it leaves in tests/fixtures/:

    /work/refvenv/bin/python scripts/make_golden.py [--models smollm2,gemma3-270m]

Files written:
  tests/fixtures/english.txt            plain English prose (the start of the GNU GPL v3 text,
                                         /usr/share/common-licenses/GPL-3; verbatim copying permitted)
  tests/fixtures/<model>_golden.json    per model: tokenize, pieces, vocab, top_logits, perplexity

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
FIXTURES = ROOT / "tests" / "fixtures"
ENGLISH = FIXTURES / "english.txt"
ENGLISH_SOURCE = Path("/usr/share/common-licenses/GPL-3")
ENGLISH_MIN_CHARS = 19_600   # enough for >= 8 chunks of 512 SmolLM2 tokens

N_CTX = 512
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


def make(model_key: str, english: str, command: str) -> dict:
    import llama_cpp
    from llama_cpp import Llama

    from tensorsplit import models

    path = models.fetch(model_key, quiet=True)
    llm = Llama(model_path=str(path), n_ctx=N_CTX, n_batch=N_CTX, n_ubatch=N_CTX, n_threads=N_THREADS,
                n_threads_batch=N_THREADS, logits_all=True, verbose=False, seed=0)
    vocab = llm._model.vocab
    n_vocab = llm.n_vocab()
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
    add_eos = bool(llama_cpp.llama_vocab_get_add_eos(vocab))
    bos = int(llama_cpp.llama_vocab_bos(vocab))

    def tok(text: str, add_special: bool, parse_special: bool) -> list[int]:
        if not text:
            return [bos] if (add_special and add_bos) else []
        return [int(t) for t in llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)]

    out: dict = {
        "_comment": (f"llama.cpp golden fixture for {path.name}. english.txt is the start of the GNU GPL v3 "
                     f"text ({ENGLISH_SOURCE}, verbatim copying permitted). Written by scripts/make_golden.py."),
        "model": model_key,
        "model_file": path.name,
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
    out["top_logits"] = {"n_ctx": N_CTX, "n_threads": N_THREADS, "k": TOP_K, "prompts": top}

    # --- perplexity, llama-perplexity style
    tokens = tok(english, True, False)
    n_chunks = len(tokens) // N_CTX
    first = N_CTX // 2
    chunks = []
    t0 = time.time()
    for c in range(n_chunks):
        chunk = tokens[c * N_CTX:(c + 1) * N_CTX]
        if add_bos:
            chunk[0] = bos
        llm.reset()
        llm.eval(chunk)
        logits = np.array(llm.scores[first:N_CTX - 1], dtype=np.float32)
        lp = log_softmax(logits)
        targets = np.array(chunk[first + 1:N_CTX])
        nll = -lp[np.arange(len(targets)), targets]
        chunks.append({"nll_sum": float(nll.sum()), "count": int(len(targets)),
                       "argmax": [int(i) for i in logits.argmax(axis=-1)]})
        print(f"  {model_key}: chunk {c + 1}/{n_chunks} ppl so far "
              f"{math.exp(sum(x['nll_sum'] for x in chunks) / sum(x['count'] for x in chunks)):.4f}",
              file=sys.stderr)
    total_nll = sum(x["nll_sum"] for x in chunks)
    total_n = sum(x["count"] for x in chunks)
    out["perplexity"] = {
        "text_file": ENGLISH.name,
        "n_ctx": N_CTX,
        "n_threads": N_THREADS,
        "add_bos": add_bos,
        "n_tokens": len(tokens),
        "n_chunks": n_chunks,
        "first_scored": first,
        "chunks": chunks,
        "ppl": math.exp(total_nll / total_n),
        "seconds": round(time.time() - t0, 1),
    }
    if hasattr(llm, "close"):
        llm.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,gemma3-270m")
    args = ap.parse_args()
    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).as_posix(), "scripts/make_golden.py", *sys.argv[1:]])
    english = english_text()
    for key in args.models.split(","):
        key = key.strip()
        data = make(key, english, command)
        dest = FIXTURES / f"{key}_golden.json"
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        dest.write_text(text + "\n", encoding="utf-8")
        print(f"{dest.relative_to(ROOT)}: {len(text.encode()) / 1024:.0f} KiB, "
              f"ppl {data['perplexity']['ppl']:.4f} over {data['perplexity']['n_chunks']} chunks",
              file=sys.stderr)


if __name__ == "__main__":
    main()
