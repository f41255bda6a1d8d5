"""Pre-tokenizer tables and the special-token partition, as llama.cpp's vocab does them.

Facts taken from llama.cpp (src/llama-vocab.cpp, src/unicode.cpp, llama-cpp-python 0.3.36):

* A byte-level BPE vocabulary (`tokenizer.ggml.model == "gpt2"`) splits text into words with a
  list of regexes chosen by `tokenizer.ggml.pre`. The regexes are applied one after the other,
  each to the pieces the previous one left; a match becomes its own piece and so does the text
  between matches ("isolated" splitting). The words are then byte-encoded (GPT-2's byte-to-unicode
  table) and merged with the file's BPE merges.
* Before any of that, special tokens are cut out of the text (`tokenizer_st_partition`): each
  CONTROL / USER_DEFINED / UNKNOWN token, longest text first, is searched for in every raw
  fragment left to right. CONTROL and UNKNOWN tokens are only cut out when the caller asks to
  parse special tokens; USER_DEFINED ones always are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

# --- regexes (from llama-vocab.cpp's llm_tokenizer_bpe, the "adapted" forms llama.cpp uses) ------

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's form of the o200k regex (tokenizer.json's `[\p{Lu}...\p{M}]*[\p{Ll}...\p{M}]+` letter
# classes and `(?i:'s|...)` contractions, spelled without Unicode case classes or inline flags). Its
# letter classes are "a letter not a-z" / "a letter not A-Z": a non-ASCII letter of any case counts as
# both upper and lower case ("xÉCOLE" -> "xÉ", "COLE"), and a combining mark (\p{M}) is no letter, as
# in llama.cpp's matching on category-collapsed text. tokenizer.json's own regex splits those otherwise.
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT = (
    r"[\p{P}\$\+<=>\^~\|]+",
    _GPT2,
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
)


@dataclass(frozen=True)
class PreTokenizerSpec:
    """How llama.cpp pre-tokenizes one `tokenizer.ggml.pre` family."""

    kind: str                      # llama.cpp's LLAMA_VOCAB_PRE_TYPE_* name (lower case)
    regexes: tuple[str, ...]       # applied in order, each splitting the previous pieces
    ignore_merges: bool = False    # a word that is itself a token is taken whole (llama3)
    add_bos_default: bool | None = None  # llama.cpp's default before add_bos_token is read


_SPECS = {
    "default": PreTokenizerSpec("default", _DEFAULT),
    "gpt2": PreTokenizerSpec("gpt2", (_GPT2,)),
    "smollm": PreTokenizerSpec("smollm", (r"\p{N}", _GPT2)),
    "llama3": PreTokenizerSpec("llama3", (_LLAMA3,), ignore_merges=True, add_bos_default=True),
    "dbrx": PreTokenizerSpec("dbrx", (_LLAMA3,)),
    "qwen2": PreTokenizerSpec("qwen2", (_QWEN2,)),
    "gpt4o": PreTokenizerSpec("gpt4o", (_GPT4O,)),
}

# `tokenizer.ggml.pre` value -> spec (the names llama.cpp maps to these pre types)
PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    "default": _SPECS["default"],
    # GPT2
    "gpt-2": _SPECS["gpt2"], "gpt2": _SPECS["gpt2"], "phi-2": _SPECS["gpt2"],
    "mpt": _SPECS["gpt2"], "olmo": _SPECS["gpt2"], "jais": _SPECS["gpt2"], "exaone4": _SPECS["gpt2"],
    # SMOLLM and the pre types that share its regexes
    "smollm": _SPECS["smollm"], "starcoder": _SPECS["smollm"], "refact": _SPECS["smollm"],
    "command-r": _SPECS["smollm"], "codeshell": _SPECS["smollm"], "exaone": _SPECS["smollm"],
    "minerva-7b": _SPECS["smollm"],
    # LLAMA3
    "llama-bpe": _SPECS["llama3"], "llama3": _SPECS["llama3"], "llama-v3": _SPECS["llama3"],
    "falcon3": _SPECS["llama3"], "dbrx": _SPECS["dbrx"], "smaug-bpe": _SPECS["dbrx"],
    # QWEN2
    "qwen2": _SPECS["qwen2"], "deepseek-r1-qwen": _SPECS["qwen2"], "stablelm2": _SPECS["qwen2"],
    "megrez": _SPECS["qwen2"],
    # GPT4O (gpt-oss, Llama 4, ...); MiniMax-M2's pre type has the same regexes and flags
    "gpt-4o": _SPECS["gpt4o"], "llama4": _SPECS["gpt4o"], "kanana2": _SPECS["gpt4o"],
    "talkie": _SPECS["gpt4o"], "minimax-m2": _SPECS["gpt4o"],
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table (used by byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


# --- special-token partition ----------------------------------------------------------------------

Fragment = Union[str, int]   # raw text, or a token id cut out of it


class SpecialPartitioner:
    """Cuts special tokens out of text the way llama.cpp's `tokenizer_st_partition` does.

    tokens: (id, text, always) for every CONTROL / USER_DEFINED / UNKNOWN token; `always` is True
    for tokens cut out even when parse_special is False (USER_DEFINED ones that are not CONTROL).
    """

    def __init__(self, tokens: Sequence[tuple[int, str, bool]]):
        # llama.cpp sorts by byte length, longest first (std::sort; ties keep no fixed order, we use id)
        order = sorted((t for t in tokens if t[1]), key=lambda t: (-len(t[1].encode("utf-8")), t[0]))
        self._all = [(tid, text) for tid, text, _ in order]
        self._always = [(tid, text) for tid, text, always in order if always]
        # first character -> does any special token start with it (cheap pre-filter)
        self._first_all = {text[0] for _, text in self._all}
        self._first_always = {text[0] for _, text in self._always}

    def partition(self, text: str, parse_special: bool) -> list[Fragment]:
        if not text:
            return []
        cands, firsts = (self._all, self._first_all) if parse_special else (self._always, self._first_always)
        chars = set(text)
        if not (chars & firsts):
            return [text]
        frags: list[Fragment] = [text]
        for tid, tok in cands:
            if tok[0] not in chars or tok not in text:
                continue
            out: list[Fragment] = []
            for frag in frags:
                if isinstance(frag, int) or tok not in frag:
                    out.append(frag)
                    continue
                parts = frag.split(tok)
                for i, part in enumerate(parts):
                    if i:
                        out.append(tid)
                    if part:
                        out.append(part)
            frags = out
        return frags
