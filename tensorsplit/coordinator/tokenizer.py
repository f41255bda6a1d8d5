"""Text <-> token ids, built from a GGUF file's tokenizer metadata, matching llama.cpp's ids.

Two vocabulary kinds are supported, both run by the HF `tokenizers` library's BPE model:

* `tokenizer.ggml.model == "gpt2"`: byte-level BPE. Words come from llama.cpp's pre-tokenizer
  regexes for `tokenizer.ggml.pre` (see pretokenize.py), are byte-encoded, and merged with the
  file's `tokenizer.ggml.merges`.
* `tokenizer.ggml.model == "llama"`: SentencePiece-style vocabulary with scores (Llama 2, Gemma).
  llama.cpp (llm_tokenizer_spm_session) escapes spaces to U+2581, splits the text into UTF-8
  characters and repeatedly merges the adjacent pair whose concatenation is a vocabulary token of
  highest score (leftmost on ties); characters left over that are no token become byte tokens
  <0xXX>. That is a BPE whose merges are every split (a, b) of every token a+b with both halves in
  the vocabulary, ranked by the score of a+b, with byte fallback; it is built that way here.

Special tokens (CONTROL, USER_DEFINED, UNKNOWN) are cut out of the text first, as llama.cpp does,
and the rest is tokenized fragment by fragment.
"""
from __future__ import annotations

import codecs
from typing import Iterable, Mapping

import numpy as np

from ..errors import ConfigError, UnsupportedError
from .pretokenize import PRE_TOKENIZERS, SpecialPartitioner, bytes_to_unicode

# token types in tokenizer.ggml.token_type (gguf TokenType / llama_token_type)
TYPE_NORMAL, TYPE_UNKNOWN, TYPE_CONTROL, TYPE_USER_DEFINED, TYPE_UNUSED, TYPE_BYTE = 1, 2, 3, 4, 5, 6

# token attributes (llama_token_attr bits)
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
_TYPE_TO_ATTR = {
    TYPE_NORMAL: ATTR_NORMAL, TYPE_UNKNOWN: ATTR_UNKNOWN, TYPE_CONTROL: ATTR_CONTROL,
    TYPE_USER_DEFINED: ATTR_USER_DEFINED, TYPE_UNUSED: ATTR_UNUSED, TYPE_BYTE: ATTR_BYTE,
}
_SPECIAL_ATTRS = ATTR_CONTROL | ATTR_UNKNOWN

SUPPORTED_MODELS = ("gpt2", "llama")

# Token texts llama.cpp treats as end of generation (llama-vocab.cpp, "maintain a list of tokens
# that cause end-of-generation"), and the texts it recognises as EOT / EOM / FIM tokens.
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
})
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}

_K = "tokenizer.ggml."


def _key(kv: Mapping[str, object], name: str, default=None):
    return kv.get(_K + name, default)


class Tokenizer:
    """A GGUF file's tokenizer. Build with `Tokenizer.from_gguf_kv(kv)`."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    eot_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    eog_ids: frozenset[int]

    def __init__(self):  # use from_gguf_kv
        raise TypeError("use Tokenizer.from_gguf_kv(kv)")

    # --- construction -----------------------------------------------------------------------------

    @classmethod
    def from_gguf_kv(cls, kv: Mapping[str, object]) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        self = object.__new__(cls)
        model = _key(kv, "model")
        if model is None:
            raise UnsupportedError(f"the GGUF file has no tokenizer ({_K}model is missing)")
        if model not in SUPPORTED_MODELS:
            raise UnsupportedError(
                f"unsupported tokenizer: {_K}model = {model!r} (supported: {', '.join(SUPPORTED_MODELS)})")
        tokens = _key(kv, "tokens")
        if tokens is None or len(tokens) == 0:
            raise UnsupportedError(f"the GGUF file has no tokenizer vocabulary ({_K}tokens is missing)")
        tokens = [str(t) for t in tokens]
        n = len(tokens)
        self.model = model
        self.vocab_size = n
        # llama.cpp: an empty token text is renamed so that texts stay unique
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self._tokens = tokens

        types = _key(kv, "token_type")
        if types is not None:
            types = np.asarray(types).astype(np.int64)
            if len(types) < n:
                raise ConfigError(f"{_K}token_type has {len(types)} entries for {n} tokens")
            attrs = [_TYPE_TO_ATTR.get(int(t), 0) for t in types[:n]]
        else:
            attrs = [ATTR_NORMAL] * n

        # text -> id; llama.cpp keeps the last id for a repeated text
        token_to_id = {t: i for i, t in enumerate(tokens)}
        self._token_to_id = token_to_id

        # --- flags and special ids, with llama.cpp's defaults per vocabulary kind
        if model == "llama":
            ids = dict(bos=1, eos=2, unk=0)
            add_bos, add_eos, add_space_prefix = True, False, True
            self._pre = None
            pre_name = None
        else:  # gpt2
            ids = dict(bos=11, eos=11)
            add_bos, add_eos, add_space_prefix = False, False, False
            pre_name = _key(kv, "pre")
            pre_key = "default" if pre_name in (None, "") else str(pre_name)
            if pre_key not in PRE_TOKENIZERS:
                raise UnsupportedError(
                    f"unsupported pre-tokenizer: {_K}pre = {pre_name!r} "
                    f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
            self._pre = PRE_TOKENIZERS[pre_key]
            if self._pre.add_bos_default is not None:
                add_bos = self._pre.add_bos_default
        add_space_prefix = bool(_key(kv, "add_space_prefix", add_space_prefix))
        add_bos = bool(_key(kv, "add_bos_token", add_bos))
        add_eos = bool(_key(kv, "add_eos_token", add_eos))
        self.add_bos, self.add_eos, self.add_space_prefix = add_bos, add_eos, add_space_prefix
        # encode puts a space before SPM text; decode takes the first one off again (as SentencePiece
        # does; llama.cpp's detokenize keeps it when the ids start with BOS)
        self._strip_first_space = model == "llama" and add_space_prefix

        for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("eot", "eot_token_id"),
                          ("eom", "eom_token_id"), ("unk", "unknown_token_id"), ("sep", "seperator_token_id"),
                          ("pad", "padding_token_id"), ("fim_pre", "fim_pre_token_id"),
                          ("fim_suf", "fim_suf_token_id"), ("fim_mid", "fim_mid_token_id"),
                          ("fim_pad", "fim_pad_token_id"), ("fim_rep", "fim_rep_token_id"),
                          ("fim_sep", "fim_sep_token_id"), ("fim_pre", "prefix_token_id"),
                          ("fim_suf", "suffix_token_id"), ("fim_mid", "middle_token_id")):
            if name in ids and ids[name] is not None and not (0 <= ids[name] < n):
                ids[name] = None
            v = _key(kv, key)
            if v is not None and 0 <= int(v) < n:
                ids[name] = int(v)
        for name in ("bos", "eos", "eot", "eom", "unk", "sep", "pad"):
            ids.setdefault(name, None)

        # --- llama.cpp's text-based detection of EOT / EOM / FIM / EOG tokens (it also marks them CONTROL)
        def detect(name: str, texts: Iterable[str]):
            if ids.get(name) is not None:
                return
            for t in texts:
                tid = token_to_id.get(t)
                if tid is not None:
                    ids[name] = tid
                    attrs[tid] |= ATTR_CONTROL
                    return

        detect("eot", _EOT_TEXTS)
        detect("eom", _EOM_TEXTS)
        for name, texts in _FIM_TEXTS.items():
            detect(name, texts)
        for i, t in enumerate(tokens):   # control tokens named "unused..." are unused
            if attrs[i] & ATTR_CONTROL and "unused" in t:
                attrs[i] |= ATTR_UNUSED

        eog = {ids[k] for k in ("fim_pad", "fim_rep", "fim_sep") if ids.get(k) is not None}
        for t in _EOG_TEXTS:
            tid = token_to_id.get(t)
            if tid is not None:
                eog.add(tid)
                attrs[tid] |= ATTR_CONTROL
        for t in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):   # gpt-oss
            tid = token_to_id.get(t)
            if tid is not None:
                attrs[tid] = ATTR_USER_DEFINED
        eog.update(ids[k] for k in ("eos", "eot", "eom") if ids.get(k) is not None)
        texts_in = {tokens[i] for i in eog}
        if ("<|end|>" in texts_in and (("<|return|>" in texts_in and "<|call|>" in texts_in)
                                       or ({"<|call|>", "<|calls|>"} & texts_in and "<|flush|>" in texts_in))):
            end = token_to_id["<|end|>"]
            eog.discard(end)
            attrs[end] = ATTR_USER_DEFINED
        if "</s>" in texts_in and texts_in & {"<|tool_response>", "<|plamo:eos|>"}:
            s = token_to_id["</s>"]
            eog.discard(s)
            attrs[s] = ATTR_NORMAL

        self.bos_id, self.eos_id, self.unk_id, self.pad_id = ids["bos"], ids["eos"], ids["unk"], ids["pad"]
        self.eot_id = ids["eot"]
        self.eog_ids = frozenset(int(i) for i in eog)
        self._attrs = attrs
        if add_bos and self.bos_id is None:
            raise ConfigError(f"{_K}add_bos_token is set but the vocabulary has no BOS token")
        if add_eos and self.eos_id is None:
            raise ConfigError(f"{_K}add_eos_token is set but the vocabulary has no EOS token")

        # --- special-token partition (CONTROL / USER_DEFINED / UNKNOWN tokens)
        specials = []
        for i, a in enumerate(attrs):
            if a & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN):
                specials.append((i, tokens[i], not (a & _SPECIAL_ATTRS)))
        self._partitioner = SpecialPartitioner(specials)

        # --- the HF tokenizer that tokenizes the raw text fragments
        if model == "gpt2":
            self._hf = _build_byte_level_bpe(kv, tokens, token_to_id, self._pre)
        else:
            self._hf = _build_spm_bpe(kv, tokens, token_to_id, self.unk_id)
        assert isinstance(self._hf, HFTokenizer)

        # --- token pieces (bytes), as llama.cpp's token_to_piece(special=True) renders them
        self._pieces = _pieces(model, tokens, attrs)
        self._skip = np.array([bool(a & _SPECIAL_ATTRS) for a in attrs], dtype=bool)
        return self

    # --- encoding ---------------------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text`, as llama.cpp's llama_tokenize(text, add_special, parse_special).

        add_special: prepend BOS / append EOS where the file asks for them.
        parse_special: text spelling a control token ("<|im_end|>") becomes that token; when False
        it is tokenized as plain text (user-defined tokens are cut out either way, as in llama.cpp).
        """
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self.bos_id)
        frags = self._partitioner.partition(text, parse_special)
        if self.model == "llama":
            texts = []
            prev_special = True
            for f in frags:
                if isinstance(f, int):
                    prev_special = True
                    continue
                t = (" " + f) if (self.add_space_prefix and prev_special) else f
                texts.append(t.replace(" ", "\u2581"))
                prev_special = False
        else:
            texts = [f for f in frags if not isinstance(f, int)]
        # one fragment at a time: encode_batch would start the library's thread pool, which then
        # warns and turns itself off in processes forked later
        texts_it = iter(texts)
        for f in frags:
            if isinstance(f, int):
                out.append(f)
            else:
                out.extend(self._hf.encode(next(texts_it), add_special_tokens=False).ids)
        if add_special and self.add_eos:
            out.append(self.eos_id)
        return out

    # --- decoding ---------------------------------------------------------------------------------

    def token_piece(self, id: int) -> bytes:
        """The bytes token `id` stands for (control tokens as their text; byte tokens as that byte)."""
        return self._pieces[int(id)]

    def is_special(self, id: int) -> bool:
        """A control or unknown token (left out of text when decoding with skip_special)."""
        return bool(self._skip[int(id)])

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = False) -> bytes:
        pieces = self._pieces
        skip = self._skip
        parts = []
        first = True
        for i in ids:
            i = int(i)
            if skip_special and skip[i]:
                continue
            p = pieces[i]
            if first and self._strip_first_space and not skip[i]:
                if p[:1] == b" ":
                    p = p[1:]
                first = False
            parts.append(p)
        return b"".join(parts)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids`. Invalid UTF-8 (a cut-off character) decodes to U+FFFD."""
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    def detokenizer(self, skip_special: bool = False) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self, skip_special)

    def __repr__(self) -> str:
        return (f"Tokenizer(model={self.model!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
                f"eos={self.eos_id}, add_bos={self.add_bos}, eog={sorted(self.eog_ids)})")


class IncrementalDetokenizer:
    """Turns a stream of token ids into text, yielding only whole UTF-8 characters.

    `push(id)` returns the text that became complete with this token ('' while a multi-byte
    character is still cut off); `flush()` returns what is left (a cut-off character as U+FFFD).
    The pushes and the flush concatenate to `tokenizer.decode(ids, skip_special)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tok = tokenizer
        self._skip_special = skip_special
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._first = True

    def push(self, id: int) -> str:
        tok = self._tok
        id = int(id)
        special = tok.is_special(id)
        if self._skip_special and special:
            return ""
        p = tok.token_piece(id)
        if self._first and tok._strip_first_space and not special:
            if p[:1] == b" ":
                p = p[1:]
            self._first = False
        return self._dec.decode(p, final=False)

    def flush(self) -> str:
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out


# --- builders -------------------------------------------------------------------------------------

def _build_byte_level_bpe(kv, tokens, token_to_id, pre):
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    merges_raw = _key(kv, "merges")
    if merges_raw is None:
        raise UnsupportedError(f"byte-level BPE tokenizer without merges ({_K}merges is missing)")
    merges = []
    for m in merges_raw:
        m = str(m)
        pos = m.find(" ", 1)   # llama.cpp splits at the first space after the first character
        if pos < 0:
            continue
        a, b = m[:pos], m[pos + 1:]
        if a in token_to_id and b in token_to_id and (a + b) in token_to_id:
            merges.append((a, b))
    bpe = models.BPE(vocab=token_to_id, merges=merges, ignore_merges=pre.ignore_merges)
    hf = HFTokenizer(bpe)
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    return hf


def _build_spm_bpe(kv, tokens, token_to_id, unk_id):
    from tokenizers import Tokenizer as HFTokenizer, models

    scores = _key(kv, "scores")
    if scores is None:
        scores = np.zeros(len(tokens), dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32)
    if len(scores) < len(tokens):
        raise ConfigError(f"{_K}scores has {len(scores)} entries for {len(tokens)} tokens")
    # every split of every token into two tokens is a merge; rank by the merged token's score
    # (highest first), as llama.cpp's SPM tokenizer picks the best-scoring adjacent pair
    known = set(token_to_id)
    neg_scores = (-scores[: len(tokens)].astype(np.float64)).tolist()
    cand = []
    add = cand.append
    for tid, t in enumerate(tokens):
        n = len(t)
        if n < 2:
            continue
        for k in range(1, n):
            if t[:k] in known and t[k:] in known:
                add((neg_scores[tid], tid, k))
    cand.sort()   # best score first; ties by token id, then by split point
    merges = [(tokens[tid][:k], tokens[tid][k:]) for _, tid, k in cand]
    has_bytes = all(f"<0x{b:02X}>" in token_to_id for b in range(256))
    unk = tokens[unk_id] if (not has_bytes and unk_id is not None) else None
    bpe = models.BPE(vocab=token_to_id, merges=merges, byte_fallback=has_bytes, unk_token=unk)
    return HFTokenizer(bpe)


def _pieces(model: str, tokens: list[str], attrs: list[int]) -> list[bytes]:
    out: list[bytes] = []
    if model == "gpt2":
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
    for t, a in zip(tokens, attrs):
        if a & (_SPECIAL_ATTRS | ATTR_USER_DEFINED):
            out.append(t.encode("utf-8"))
        elif a & ATTR_NORMAL:
            if model == "llama":
                out.append(t.replace("\u2581", " ").encode("utf-8"))
            else:
                try:
                    out.append(bytes(byte_of[c] for c in t))
                except KeyError:   # not byte-encoded text; llama.cpp writes [UNK_BYTE_..]
                    out.append(t.encode("utf-8"))
        elif a & ATTR_BYTE:
            out.append(_byte_token(t))
        else:   # unused / undefined tokens render as nothing (llama.cpp suppresses them)
            out.append(b"")
    return out


def _byte_token(t: str) -> bytes:
    # "<0x0A>" -> b"\n"; byte-level vocabularies may mark single characters as BYTE
    if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
        try:
            return bytes([int(t[3:5], 16)])
        except ValueError:
            pass
    return t.encode("utf-8")
