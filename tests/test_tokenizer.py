"""The coordinator's tokenizer against llama.cpp's ids (tests/fixtures/*_golden.json).

The golden files are written by scripts/make_golden.py with llama-cpp-python; CI only reads them.
A missing fixture fails its tests. Besides the two real models' own tokenizers, the pre-tokenizers
llama-bpe, qwen2, gpt-2, default and gpt-4o are checked on SmolLM2's vocabulary (pretokenizers_golden.json,
files rebuilt from tests/golden_models.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from golden_models import PRE_VOCABS, sha256, write_vocab
from tensorsplit import models
from tensorsplit.coordinator.tokenizer import Tokenizer
from tensorsplit.errors import UnsupportedError
from tensorsplit.model.gguf_file import GGUFFile

FIXTURES = Path(__file__).parent / "fixtures"
MODELS = ("smollm2", "gemma3-270m")

# characters that the vocabularies spell with several byte tokens (byte-level BPE, or SPM byte fallback)
MULTIBYTE = "𠀋 𝔘 䶵 ᚠ 𐌀 😀 👨‍👩‍👧‍👦 你好，世界 ½ ü"


def _fixture(name: str) -> dict:
    path = FIXTURES / name
    if not path.exists():
        pytest.fail(f"{path} is missing (write it with scripts/make_golden.py and llama-cpp-python)")
    return json.loads(path.read_text(encoding="utf-8"))


def _golden(model: str) -> dict:
    return _fixture(f"{model}_golden.json")


def _text(case: dict) -> str:
    if "text" in case:
        return case["text"]
    path = FIXTURES / case["text_file"]
    if not path.exists():
        pytest.fail(f"{path} is missing")
    return path.read_text(encoding="utf-8")


def _kv(path: Path) -> dict:
    with GGUFFile(path) as f:
        return dict(f.kv)


@pytest.fixture(scope="module")
def paths(smollm2_path, gemma3_path) -> dict[str, Path]:
    return {"smollm2": smollm2_path, "gemma3-270m": gemma3_path}


@pytest.fixture(scope="module")
def kvs(paths) -> dict[str, dict]:
    return {name: _kv(path) for name, path in paths.items()}


@pytest.fixture(scope="module")
def toks(kvs) -> dict[str, Tokenizer]:
    return {name: Tokenizer.from_gguf_kv(kv) for name, kv in kvs.items()}


# --- llama.cpp parity -----------------------------------------------------------------------------

@pytest.mark.parametrize("model", MODELS)
def test_fixture_is_of_this_model_file(paths, model):
    """The fixture was written from the very file under test, the one models.py pins."""
    sha = _golden(model)["model_sha256"]
    assert sha == models.KNOWN[model].sha256
    assert sha256(paths[model]) == sha, f"{paths[model]} is not the file {model}_golden.json was made from"


@pytest.mark.parametrize("model", MODELS)
def test_ids_match_llamacpp(toks, model):
    golden = _golden(model)
    tok = toks[model]
    bad = []
    for case in golden["tokenize"]:
        ids = tok.encode(_text(case), add_special=case["add_special"], parse_special=case["parse_special"])
        if ids != case["ids"]:
            first = next((i for i, (a, b) in enumerate(zip(ids, case["ids"])) if a != b),
                         min(len(ids), len(case["ids"])))
            bad.append(f"{case['name']} add_special={case['add_special']} parse_special={case['parse_special']}: "
                       f"first difference at {first}: ours {ids[first:first + 5]} llama.cpp "
                       f"{case['ids'][first:first + 5]} (lengths {len(ids)} / {len(case['ids'])})")
    assert not bad, "\n".join(bad)
    assert len(golden["tokenize"]) >= 8


@pytest.mark.parametrize("model", MODELS)
def test_vocab_matches_llamacpp(toks, model):
    v = _golden(model)["vocab"]
    tok = toks[model]
    assert tok.vocab_size == v["n_vocab"]
    assert tok.bos_id == v["bos_id"] and tok.eos_id == v["eos_id"]
    assert tok.add_bos == v["add_bos"] and tok.add_eos == v["add_eos"]
    assert sorted(tok.eog_ids) == v["eog_ids"]


@pytest.mark.parametrize("model", MODELS)
def test_pieces_match_llamacpp(toks, model):
    tok = toks[model]
    for p in _golden(model)["pieces"]:
        assert tok.token_piece(p["id"]).hex() == p["special"], p
        # token_to_piece(special=False): control tokens render as nothing
        assert tok.decode_bytes([p["id"]], skip_special=True).hex() == p["plain"], p


def test_expected_eog_and_specials(toks):
    s, g = toks["smollm2"], toks["gemma3-270m"]
    assert s.eog_ids == {0, 2, 4}          # <|endoftext|>, <|im_end|>, <reponame> (a FIM token)
    assert g.eog_ids == {1, 106, 212}      # <eos>, <end_of_turn>, </s>
    assert (s.add_bos, g.add_bos) == (False, True)
    assert g.encode("", add_special=True) == [g.bos_id] and g.encode("", add_special=False) == []
    assert s.encode("") == []


# --- round trips and the incremental detokenizer --------------------------------------------------

def _texts(model: str) -> list[tuple[str, bool]]:
    out, seen = [], set()
    for case in _golden(model)["tokenize"]:
        key = (case["name"], case["parse_special"])
        if key not in seen:
            seen.add(key)
            out.append((_text(case), case["parse_special"]))
    out.append((MULTIBYTE, False))
    return out


@pytest.mark.parametrize("model", MODELS)
def test_round_trip(toks, model):
    tok = toks[model]
    for text, parse_special in _texts(model):
        if tok.model == "llama":
            # SentencePiece vocabularies spell spaces as U+2581, so a literal U+2581 in the text
            # comes back as a space (in llama.cpp too)
            text = text.replace("\u2581", "_")
        assert tok.decode(tok.encode(text, add_special=False, parse_special=parse_special)) == text
        if not parse_special:
            # BOS / EOS are control tokens, left out with skip_special
            assert tok.decode(tok.encode(text, add_special=True), skip_special=True) == text


@pytest.mark.parametrize("model", MODELS)
def test_detokenizer_streams_whole_characters(toks, model):
    tok = toks[model]
    held_back = 0
    for text, parse_special in _texts(model):
        for skip_special in (False, True):
            ids = tok.encode(text, add_special=True, parse_special=parse_special)
            det = tok.detokenizer(skip_special=skip_special)
            parts = [det.push(i) for i in ids]
            parts.append(det.flush())
            assert "".join(parts) == tok.decode(ids, skip_special=skip_special)
            for part in parts:
                assert "\ufffd" not in part     # never half a character
                part.encode("utf-8")            # and no lone surrogates
            held_back += sum(1 for p, i in zip(parts, ids) if p == "" and tok.token_piece(i))
    assert held_back > 0   # some tokens really were partial characters


def test_detokenizer_cut_character(toks):
    tok = toks["gemma3-270m"]
    ids = tok.encode("𠀋", add_special=False)   # four byte tokens
    assert len(ids) == 4
    det = tok.detokenizer()
    assert [det.push(i) for i in ids[:3]] == ["", "", ""]
    assert det.flush() == "\ufffd"
    assert tok.decode(ids[:3]) == "\ufffd"
    det = tok.detokenizer()
    assert "".join(det.push(i) for i in ids) + det.flush() == "𠀋"


# --- special tokens -------------------------------------------------------------------------------

def test_parse_special(toks):
    s, g = toks["smollm2"], toks["gemma3-270m"]
    plain = s.encode("<|im_end|>", add_special=False, parse_special=False)
    assert len(plain) > 1 and 2 not in plain
    assert s.decode(plain) == "<|im_end|>"
    assert s.encode("<|im_end|>", add_special=False, parse_special=True) == [2]
    assert s.encode("<|im_start|>user\nhi<|im_end|>", parse_special=True)[0] == 1

    plain = g.encode("<end_of_turn>", add_special=False, parse_special=False)
    assert 106 not in plain and g.decode(plain) == "<end_of_turn>"
    assert g.encode("<end_of_turn>", add_special=False, parse_special=True) == [106]
    # user-defined tokens (whitespace runs, html tags) are cut out even from plain text
    assert g.encode("a  b<table>", add_special=False) == [g.encode("a", add_special=False)[0], 138,
                                                            g.encode("b", add_special=False)[0], 168]


def test_skip_special_decode(toks):
    s = toks["smollm2"]
    ids = s.encode("<|im_start|>user\nhi<|im_end|>", parse_special=True)
    assert s.decode(ids) == "<|im_start|>user\nhi<|im_end|>"
    assert s.decode(ids, skip_special=True) == "user\nhi"


# --- errors ---------------------------------------------------------------------------------------

def test_unknown_pre_tokenizer(kvs):
    kv = dict(kvs["smollm2"])
    kv["tokenizer.ggml.pre"] = "no-such-pre"
    with pytest.raises(UnsupportedError, match="no-such-pre") as e:
        Tokenizer.from_gguf_kv(kv)
    assert "tokenizer.ggml.pre" in str(e.value) and "smollm" in str(e.value) and "llama-bpe" in str(e.value)


def test_unknown_tokenizer_model(kvs):
    kv = dict(kvs["smollm2"])
    kv["tokenizer.ggml.model"] = "wordpiece-x"
    with pytest.raises(UnsupportedError, match="wordpiece-x") as e:
        Tokenizer.from_gguf_kv(kv)
    assert "tokenizer.ggml.model" in str(e.value)


def test_no_tokenizer(kvs):
    kv = {k: v for k, v in kvs["smollm2"].items() if not k.startswith("tokenizer.")}
    with pytest.raises(UnsupportedError, match="tokenizer.ggml.model"):
        Tokenizer.from_gguf_kv(kv)


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-2", "gpt2", "default", "gpt-4o"])
def test_other_pre_tokenizers_build(kvs, pre):
    # the regexes compile and split as expected; ids are SmolLM2's vocabulary, not those models'
    kv = dict(kvs["smollm2"])
    kv["tokenizer.ggml.pre"] = pre
    tok = Tokenizer.from_gguf_kv(kv)
    text = "Hello world! It's 12345 apples.\n\n  x"
    assert tok.decode(tok.encode(text, add_special=False)) == text
    words = [w for w, _ in tok._hf.pre_tokenizer.pre_tokenize_str("12345 I'M")]
    expect = {"llama-bpe": ["123", "45", "ĠI", "'M"], "qwen2": ["1", "2", "3", "4", "5", "ĠI", "'M"],
              "gpt-2": ["12345", "ĠI", "'", "M"], "gpt2": ["12345", "ĠI", "'", "M"],
              "default": ["123", "45", "ĠI", "'", "M"], "gpt-4o": ["123", "45", "ĠI'M"]}[pre]
    assert words == expect


def test_gpt4o_splits_words_at_case_changes(kvs):
    """gpt-4o (gpt-oss, Llama 4): a word is upper-case letters then lower-case ones, with a contraction
    of either case; llama.cpp counts a non-ASCII letter as both cases, so "ÉCOLE" splits after "É".
    The other names llama.cpp maps to the same pre type (and flags) take the same spec."""
    from tensorsplit.coordinator.pretokenize import PRE_TOKENIZERS
    kv = dict(kvs["smollm2"])
    kv["tokenizer.ggml.pre"] = "gpt-4o"
    tok = Tokenizer.from_gguf_kv(kv)
    text = "CamelCase XMLParser DON'T don't ÉCOLE 1234567 a//\n"
    words = [w for w, _ in tok._hf.pre_tokenizer.pre_tokenize_str(text)]
    assert words == ["Camel", "Case", "ĠXMLParser", "ĠDON'T", "Ġdon't", "ĠÃī", "COLE", "Ġ", "123", "456", "7",
                     "Ġa", "//Ċ"]
    for alias in ("llama4", "kanana2", "talkie", "minimax-m2"):
        assert PRE_TOKENIZERS[alias] is PRE_TOKENIZERS["gpt-4o"]


# Where llama.cpp's gpt-4o regex and tokenizer.json's split differently: llama.cpp counts a non-ASCII letter
# as lower case too, so "xÉ" is one word ("x", "ÉCOLE" in tokenizer.json's), and a combining mark (U+0301)
# is no letter, so "e" + U+0301 are two. SmolLM2's merges give the same ids either way; these merges cross
# those splits. llama.cpp's ids: one-off run (not in CI) with llama-cpp-python 0.3.36,
# Llama(vocab_only=True).tokenize(text, add_bos=False, special=False) on the file write_vocab writes for
# tokenizer_items(smollm2, "gpt-4o", (), PRE_EXTRA_MERGES + GPT4O_CROSSING_MERGES) (new tokens 49155-49157).
GPT4O_CROSSING_MERGES = ("Ì ģ", "e Ìģ", "x Ãī")
GPT4O_CROSSING_IDS = {
    "xÉCOLE": [49157, 4105, 4796],
    "e\u0301te\u0301": [85, 49155, 676, 49155],
    "Two wordsxÉ: re\u0301sume\u0301 and xÉx": [10345, 1924, 49157, 42, 298, 49155, 99, 2522, 49155, 284, 1792,
                                               39614, 104],
}


def test_gpt4o_splits_as_llamacpp_where_merges_cross(kvs):
    from golden_models import PRE_EXTRA_MERGES
    kv = dict(kvs["smollm2"])
    merges = PRE_EXTRA_MERGES + GPT4O_CROSSING_MERGES
    kv["tokenizer.ggml.pre"] = "gpt-4o"
    kv["tokenizer.ggml.merges"] = list(kv["tokenizer.ggml.merges"]) + list(merges)
    kv["tokenizer.ggml.tokens"] = list(kv["tokenizer.ggml.tokens"]) + [m.replace(" ", "") for m in merges]
    kv["tokenizer.ggml.token_type"] = list(kv["tokenizer.ggml.token_type"]) + [1] * len(merges)
    tok = Tokenizer.from_gguf_kv(kv)
    assert tok.vocab_size == 49152 + len(merges) and tok.encode("x\u00c9", add_special=False) == [49157]
    for text, ids in GPT4O_CROSSING_IDS.items():
        assert tok.encode(text, add_special=False) == ids, text


# --- other pre-tokenizers on SmolLM2's vocabulary -------------------------------------------------

@pytest.fixture(scope="module")
def pre_golden(smollm2_path) -> dict:
    g = _fixture("pretokenizers_golden.json")
    assert sha256(smollm2_path) == g["tokenizer_from"]["sha256"], "made from another SmolLM2 file"
    return g


@pytest.mark.parametrize("vocab", list(PRE_VOCABS))
def test_pre_tokenizer_ids_match_llamacpp(pre_golden, smollm2_path, tmp_path, vocab):
    """llama.cpp's ids for the test texts under each tokenizer.ggml.pre, from the same vocab-only
    file (rebuilt here; its sha256 is the one llama.cpp read)."""
    g = pre_golden["vocabs"][vocab]
    path = write_vocab(vocab, tmp_path / f"{vocab}.gguf", smollm2_path)
    assert sha256(path) == g["sha256"], "the rebuilt vocabulary differs from the one llama.cpp read"
    tok = Tokenizer.from_gguf_kv(_kv(path))
    assert tok.add_bos == g["add_bos"]
    bad = []
    for case in g["cases"]:
        name = case["text"]
        text = pre_golden["texts"][name] if name in pre_golden["texts"] else _text({"text_file": "english.txt"})
        ids = tok.encode(text, add_special=case["add_special"], parse_special=case["parse_special"])
        if ids != case["ids"]:
            first = next((i for i, (a, b) in enumerate(zip(ids, case["ids"])) if a != b),
                         min(len(ids), len(case["ids"])))
            bad.append(f"{name} add_special={case['add_special']}: first difference at {first}: ours "
                       f"{ids[first:first + 5]} llama.cpp {case['ids'][first:first + 5]}")
    assert not bad, "\n".join(bad)
    assert len(g["cases"]) >= 30
