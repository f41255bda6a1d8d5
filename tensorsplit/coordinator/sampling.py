"""Token sampling on the coordinator: llama.cpp's default sampler chain on one position's logits.

The chain and its semantics follow llama.cpp (`common/sampling.cpp` builds the chain,
`src/llama-sampling.cpp` implements each sampler); of its default order (penalties, dry,
top-n-sigma, top-k, typical, top-p, min-p, xtc, temperature, dist) the samplers left at their
defaults are no-ops, which leaves:

    logit bias -> repetition penalty -> top-k -> top-p -> min-p -> temperature -> sample

* Logit bias (llama.cpp's "logit_bias" sampler, which common/sampling.cpp puts ahead of the
  chain): a per-request list of (token id, bias) pairs, each added to its token's logit; a bias
  of -inf bans the token. Pairs for the same token add up. It applies to greedy requests too.

* Repetition penalty (llama.cpp's "penalties" sampler, repeat part only): each *distinct* token
  among the last `repeat_last_n` tokens of the history has its logit divided by the penalty when
  it is > 0 and multiplied by it otherwise, once however often it occurs.
  `repeat_last_n` 0 disables, -1 looks at the whole history.
* Top-k keeps the k largest logits, exactly k of them. Ties at the k-th value are broken towards
  the lower token id (llama.cpp's partial sort leaves that order unspecified; this makes it
  deterministic).
* Top-p takes the softmax over the candidates still left (so after top-k the probabilities are
  renormalized over those k), sorts them in decreasing order and keeps the smallest prefix whose
  cumulative sum is >= p; at least one token is always kept, and if rounding keeps the sum below p
  everything is kept. Ties at the cut are broken towards the lower token id, as in top-k.
* Min-p keeps the candidates with prob >= min_p * (largest prob), i.e. logit >= max logit +
  ln(min_p); the ratio does not depend on which set the softmax is normalized over.
* Temperature divides the logits; the token is then drawn from the softmax of what is left.
  Temperature <= 0 is greedy: the argmax of the penalized logits (lowest id on ties, like
  llama.cpp's temperature sampler). Top-k/top-p/min-p always keep the argmax, so they are skipped.

Each filter is a pure function on a (n,) float tensor returning a new tensor with the removed
tokens set to -inf, so each can be tested alone. `Sampler.candidates` runs the same chain but keeps
only the survivors as it goes (after top-k only k values are left, sorted largest first as in
llama.cpp), which is what keeps a 262,144-token vocabulary at about a millisecond per token with
the default parameters; `Sampler.sample` then draws like llama.cpp's `dist` sampler, an
inverse-CDF draw (the first candidate whose running sum of probabilities passes u * total, u
uniform in [0, 1) from the sequence's own `torch.Generator`), so the same seed and the same logits
give the same tokens. Without top-k, top-p on a large vocabulary looks at the 256 largest
probabilities first and widens only when they do not reach p; a flat distribution whose nucleus
holds tens of thousands of tokens then costs tens of ms.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field, fields
from typing import Sequence

import torch

from ..errors import TensorsplitError

# the command-line flag of each field, as llama.cpp spells them; used in validation messages
_NEG_INF = float("-inf")
# top-p first looks at this many of the largest probabilities (llama.cpp: 256) and widens the
# window 8x at a time only while they do not reach p
_TOP_P_FIRST = 256
# Sampler.candidates sorts the candidates once there are at most this many (after top-k on a large
# vocabulary), as llama.cpp works on sorted candidates
_SORT_MAX = 4096


def _option(default, flag: str, type_: type, help: str):
    return field(default=default, metadata={"flag": flag, "type": type_, "help": help})


@dataclass(frozen=True)
class SamplingParams:
    """Each field is a sampling option: the CLI's flag (generated from `flag` and `help`) and the keyword
    of LLM.generate are both made from it. logit_bias has no flag (the servers' requests carry it)."""
    temperature: float = _option(0.8, "--temp", float, "Temperature; 0 is greedy.")   # <= 0: argmax, as llama.cpp
    top_k: int = _option(40, "--top-k", int, "Top-k filter (0 disables).")
    top_p: float = _option(0.95, "--top-p", float, "Top-p filter (1 disables).")
    min_p: float = _option(0.05, "--min-p", float, "Min-p filter (0 disables).")
    repeat_penalty: float = _option(1.0, "--repeat-penalty", float, "1.0 disables.")
    repeat_last_n: int = _option(64, "--repeat-last-n", int, "Tokens the penalty looks back over (0 disables, -1 all).")
    # None (or -1, as llama.cpp): a random seed, reported by Sampler.seed
    seed: int | None = _option(None, "--seed", int, "Sampling seed; the same seed gives the same text.")
    # (token id, bias) pairs, -inf bans the token; named in errors as llama.cpp's flag, not a flag here
    logit_bias: tuple[tuple[int, float], ...] = field(default=(), metadata={"flag": "--logit-bias"})

    def validate(self) -> None:
        """Raise TensorsplitError naming the flag for a value that makes no sense."""

        def bad(name: str, value, why: str) -> TensorsplitError:
            return TensorsplitError(f"{flag(name)} {value}: {why}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_real(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        t = self.temperature
        if not is_real(t) or not math.isfinite(t):
            raise bad("temperature", t, "must be a finite number (<= 0 means greedy)")
        if not is_int(self.top_k):
            raise bad("top_k", self.top_k, "must be an integer (<= 0 disables)")
        p = self.top_p
        if not is_real(p) or not (0.0 < p <= 1.0):
            raise bad("top_p", p, "must be in (0, 1] (1 disables)")
        m = self.min_p
        if not is_real(m) or not (0.0 <= m <= 1.0):
            raise bad("min_p", m, "must be in [0, 1] (0 disables)")
        r = self.repeat_penalty
        if not is_real(r) or not math.isfinite(r) or r <= 0.0:
            raise bad("repeat_penalty", r, "must be a finite number > 0 (1 disables)")
        if not is_int(self.repeat_last_n) or self.repeat_last_n < -1:
            raise bad("repeat_last_n", self.repeat_last_n, "must be an integer >= -1 (0 disables, -1 = all)")
        s = self.seed
        if s is not None and (not is_int(s) or not (s == -1 or 0 <= s < 2**64)):
            raise bad("seed", s, "must be an integer in [0, 2**64) (or -1 for a random seed)")
        for pair in self.logit_bias:
            if (len(pair) != 2 or not is_int(pair[0]) or pair[0] < 0 or not is_real(pair[1])
                    or math.isnan(pair[1]) or pair[1] == math.inf):
                raise bad("logit_bias", pair, "must be a (token id >= 0, bias) pair, the bias a number "
                                               "(-inf bans the token)")


# ---------------------------------------------------------------------------------------------
# filters: (n,) logits in, a new (n,) tensor out, removed tokens at -inf

def apply_logit_bias(logits: torch.Tensor, bias: Sequence[tuple[int, float]]) -> torch.Tensor:
    """Add each (token id, bias) to its token's logit; pairs for one token add up, -inf bans it."""
    out = logits.clone()
    if bias:
        ids = torch.tensor([i for i, _ in bias], dtype=torch.long)
        assert int(ids.max()) < out.shape[0], "logit_bias names a token id outside the vocabulary"
        out.index_add_(0, ids, torch.tensor([float(b) for _, b in bias], dtype=out.dtype))
    return out


def apply_repeat_penalty(logits: torch.Tensor, history: Sequence[int], penalty: float,
                         last_n: int) -> torch.Tensor:
    """llama.cpp's repetition penalty on each distinct token among the last `last_n` of `history`
    (0: none, -1: all): logit / penalty if logit > 0, else logit * penalty."""
    if penalty == 1.0 or last_n == 0 or len(history) == 0:
        return logits.clone()
    recent = history if last_n < 0 else history[-last_n:]
    if not isinstance(recent, torch.Tensor):
        recent = torch.as_tensor(list(recent), dtype=torch.long)
    ids = torch.unique(recent.long())
    assert ids.numel() == 0 or (0 <= int(ids[0]) and int(ids[-1]) < logits.shape[0]), \
        "history holds a token id outside the vocabulary"
    out = logits.clone()
    vals = out[ids]
    out[ids] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return out


def _k_largest(values: torch.Tensor, k: int, kth: torch.Tensor | None = None) -> torch.Tensor:
    """Ascending ids of the k largest entries of `values` (0 < k < n), ties at the k-th value
    going to the lower ids. `kth`, the k-th largest value, may be given when already known."""
    if kth is None:
        top, idx = torch.topk(values, k, sorted=False)
        kth = top.min()
        # topk picks arbitrarily among ties; when every entry equal to the k-th value was picked,
        # there was no choice to make
        if int((top == kth).sum()) == int((values == kth).sum()):
            return torch.sort(idx).values
    keep = values > kth
    need = k - int(keep.sum())
    tied = values == kth
    keep |= tied & (torch.cumsum(tied, 0) <= need)
    return torch.nonzero(keep).squeeze(1)


def _only(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    out = torch.full_like(logits, _NEG_INF)
    out[ids] = logits[ids]
    return out


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (exactly k; ties at the k-th value go to the lower token ids)."""
    if k <= 0 or k >= logits.shape[0]:
        return logits.clone()
    return _only(logits, _k_largest(logits, k))


def _top_p_ids(logits: torch.Tensor, p: float) -> torch.Tensor | None:
    """Ascending ids of the tokens top-p keeps, or None when it keeps every candidate."""
    if p >= 1.0:
        return None
    n_cand = int(torch.isfinite(logits).sum())
    if n_cand <= 1:
        return None
    probs = torch.softmax(logits, 0)
    # look at the largest probabilities first, as llama.cpp does, widening only when they do not
    # reach p (a full sort of a 262k vocabulary costs tens of ms)
    k = min(_TOP_P_FIRST, n_cand)
    while True:
        if k < n_cand:
            top = torch.topk(probs, k, sorted=True).values
        else:
            top = torch.sort(probs, descending=True).values[:n_cand]
        reached = torch.nonzero(torch.cumsum(top.double(), 0) >= p)
        if reached.numel():
            n_keep = int(reached[0]) + 1
            break
        if k >= n_cand:  # rounding kept the whole sum below p: llama.cpp keeps everything
            return None
        k = min(8 * k, n_cand)
    if n_keep >= n_cand:
        return None
    return _k_largest(probs, n_keep, top[n_keep - 1])


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of the most probable candidates (softmax over the finite logits) whose
    probabilities sum to >= p; at least one. Ties at the cut go to the lower token ids."""
    ids = _top_p_ids(logits, p)
    return logits.clone() if ids is None else _only(logits, ids)


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep the candidates whose probability is >= min_p times the largest one."""
    if min_p <= 0.0:
        return logits.clone()
    threshold = logits.max() + math.log(min_p)
    return torch.where(logits >= threshold, logits, _NEG_INF)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by the temperature (> 0; <= 0 is greedy and handled by the caller)."""
    assert temperature > 0.0
    return logits / temperature


# ---------------------------------------------------------------------------------------------

class Sampler:
    """One per sequence. Owns a torch.Generator seeded from params.seed; same seed + same logits
    -> same tokens."""

    def __init__(self, params: SamplingParams):
        params.validate()
        self.params = params
        if params.seed is None or params.seed == -1:
            self.seed = secrets.randbits(32)   # a uint32 like llama.cpp's, so it is easy to retype
        else:
            self.seed = int(params.seed)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)

    def sample(self, logits: torch.Tensor, history: Sequence[int]) -> int:
        """logits: (vocab,) float32 of one position; history: the token ids so far (prompt +
        generated), for the repetition penalty. Returns the chosen token id."""
        ids, x = self.candidates(logits, history)
        if x.shape[0] == 1:
            return int(ids[0])
        # llama.cpp's dist: the first token whose running sum of exp(logit - max) reaches u * sum
        # (strictly passes it here, so a token of probability 0 is never drawn)
        w = torch.exp((x - x.max()).double())
        cdf = torch.cumsum(w, 0)
        u = torch.rand((), dtype=torch.float64, generator=self.generator)
        i = min(int(torch.searchsorted(cdf, u * cdf[-1], right=True)), x.shape[0] - 1)
        return int(ids[i])

    def candidates(self, logits: torch.Tensor, history: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens the chain leaves and their temperature-scaled logits: (ids, logits), whose
        softmax is the distribution `sample` draws from. Greedy: the argmax alone."""
        assert logits.dim() == 1, f"expected (vocab,) logits, got {tuple(logits.shape)}"
        pr = self.params
        x = logits.detach().to(device="cpu", dtype=torch.float32)
        if pr.logit_bias:
            x = apply_logit_bias(x, pr.logit_bias)
        if pr.repeat_penalty != 1.0 and pr.repeat_last_n != 0:
            x = apply_repeat_penalty(x, history, pr.repeat_penalty, pr.repeat_last_n)
        if pr.temperature <= 0.0:
            i = torch.argmax(x)   # the first of equal maxima
            return i.reshape(1), torch.zeros(1)

        # The filters below are apply_top_k, apply_top_p and apply_min_p, but each keeps only its
        # survivors (x: their logits, ids: their token ids; ids None: x is the whole vocabulary).
        # Once few enough are left they are sorted, largest first (stable: among equal logits the
        # lower id first, the tie rule of the filters), and each filter keeps a prefix, as in
        # llama.cpp.
        ids = None
        if 0 < pr.top_k < x.shape[0] and x.shape[0] > _SORT_MAX:
            ids = _k_largest(x, pr.top_k)
            x = x[ids]
        is_sorted = x.shape[0] <= _SORT_MAX
        if is_sorted:
            x, order = torch.sort(x, descending=True, stable=True)
            ids = order if ids is None else ids[order]
            if 0 < pr.top_k < x.shape[0]:
                x, ids = x[:pr.top_k], ids[:pr.top_k]

        if pr.top_p < 1.0 and x.shape[0] > 1:
            if is_sorted:
                cum = torch.cumsum(torch.softmax(x, 0).double(), 0)
                n_keep = int(torch.searchsorted(cum, pr.top_p)) + 1   # first cum >= p, or all
                x, ids = x[:n_keep], ids[:n_keep]
            else:
                keep = _top_p_ids(x, pr.top_p)
                if keep is not None:
                    x = x[keep]
                    ids = keep if ids is None else ids[keep]

        if pr.min_p > 0.0:
            keep = x >= x.max() + math.log(pr.min_p)
            if is_sorted:
                n_keep = int(keep.sum())
                x, ids = x[:n_keep], ids[:n_keep]
            else:
                x = x[keep]
                ids = torch.nonzero(keep).squeeze(1) if ids is None else ids[keep]
        if ids is None:
            ids = torch.arange(x.shape[0])
        return ids, apply_temperature(x, pr.temperature)


def flag(name: str) -> str:
    """The command-line flag of a SamplingParams field, as errors name it."""
    return {f.name: f.metadata["flag"] for f in fields(SamplingParams)}[name]


def sampling_options() -> list:
    """The SamplingParams fields that are command-line options, in declaration order."""
    return [f for f in fields(SamplingParams) if "help" in f.metadata]
