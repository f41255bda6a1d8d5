"""Sampling filters, the sampler chain and stop handling, against hand-computed values.

Most filter tests use one 6-token distribution whose probabilities are written out by hand:

    token id:    0     1     2     3     4     5
    prob:      0.08  0.45  0.02  0.25  0.05  0.15      (sum 1.00)
    by rank:   1 (.45), 3 (.25), 5 (.15), 0 (.08), 4 (.05), 2 (.02)
    cumsum:    .45, .70, .85, .93, .98, 1.00

The logits are ln(prob) + an offset, so nothing relies on them being normalized.
"""
from __future__ import annotations

import math
import re
import time

import pytest
import torch

from tensorsplit.coordinator.sampling import (
    Sampler, SamplingParams, apply_logit_bias, apply_min_p, apply_repeat_penalty, apply_top_k, apply_top_p,
)
from tensorsplit.coordinator.stopping import StopChecker
from tensorsplit.errors import TensorsplitError

PROBS = [0.08, 0.45, 0.02, 0.25, 0.05, 0.15]
OFFSET = 3.7


def logits6() -> torch.Tensor:
    return torch.tensor([math.log(p) + OFFSET for p in PROBS], dtype=torch.float32)


def kept(out: torch.Tensor) -> set[int]:
    return {i for i, v in enumerate(out.tolist()) if v != float("-inf")}


def check_survivors(out: torch.Tensor, x: torch.Tensor, expected: set[int]) -> None:
    assert kept(out) == expected
    # survivors keep their logit unchanged, the others are exactly -inf
    for i in range(x.shape[0]):
        assert out[i].item() == (x[i].item() if i in expected else float("-inf"))


# ----------------------------------------------------------------------------- filters

@pytest.mark.parametrize("k, expected", [
    (1, {1}),
    (3, {1, 3, 5}),
    (5, {1, 3, 5, 0, 4}),
    (6, {0, 1, 2, 3, 4, 5}),     # k >= vocab: no-op
    (100, {0, 1, 2, 3, 4, 5}),
    (0, {0, 1, 2, 3, 4, 5}),     # disabled
    (-1, {0, 1, 2, 3, 4, 5}),
])
def test_top_k(k, expected):
    x = logits6()
    out = apply_top_k(x, k)
    check_survivors(out, x, expected)
    assert torch.equal(x, logits6())  # input untouched


def test_top_k_ties_go_to_lower_ids():
    # three tokens share the top value 3.0; exactly k are kept, lowest ids first
    x = torch.tensor([1.0, 3.0, 2.0, 3.0, 3.0, 0.0])
    assert kept(apply_top_k(x, 1)) == {1}
    assert kept(apply_top_k(x, 2)) == {1, 3}
    assert kept(apply_top_k(x, 3)) == {1, 3, 4}
    assert kept(apply_top_k(x, 4)) == {1, 3, 4, 2}


@pytest.mark.parametrize("p, expected", [
    (0.40, {1}),                  # .45 >= .40
    (0.50, {1, 3}),               # .45 < .50 <= .70
    (0.80, {1, 3, 5}),            # .70 < .80 <= .85
    (0.90, {1, 3, 5, 0}),         # .85 < .90 <= .93
    (0.97, {1, 3, 5, 0, 4}),      # .93 < .97 <= .98
    (1.00, {0, 1, 2, 3, 4, 5}),   # disabled
])
def test_top_p(p, expected):
    x = logits6()
    check_survivors(apply_top_p(x, p), x, expected)


def test_top_p_renormalizes_over_the_candidates_left():
    # after top-k=2 the candidates are {1: .45, 3: .25}; renormalized, token 1 has .45/.70 = .643,
    # which alone reaches p = .6 (over the full vocabulary .45 would not, and 3 would stay too)
    x = logits6()
    assert kept(apply_top_p(apply_top_k(x, 2), 0.6)) == {1}
    assert kept(apply_top_p(x, 0.6)) == {1, 3}
    # after top-k=4 (sum .93): .45/.93 = .484, +.25/.93 = .753, +.15/.93 = .914 -> p = .9 keeps 3
    assert kept(apply_top_p(apply_top_k(x, 4), 0.9)) == {1, 3, 5}
    assert kept(apply_top_p(x, 0.9)) == {1, 3, 5, 0}


def test_top_p_large_vocab_widens_past_the_first_window():
    # 1000 equally likely tokens + nothing else: p = .5 needs 500 of them (beyond a 256 window);
    # the ties at the cut go to the lowest ids
    x = torch.zeros(1000)
    assert kept(apply_top_p(x, 0.5)) == set(range(500))


@pytest.mark.parametrize("m, expected", [
    (0.1, {1, 3, 5, 0, 4}),       # threshold .1 * .45 = .045: drops .02
    (0.2, {1, 3, 5}),             # threshold .09: drops .08, .05, .02
    (0.5, {1, 3}),                # threshold .225
    (0.6, {1}),                   # threshold .27
    (0.0, {0, 1, 2, 3, 4, 5}),    # disabled
])
def test_min_p(m, expected):
    x = logits6()
    check_survivors(apply_min_p(x, m), x, expected)


def test_min_p_ignores_removed_tokens():
    # after top-p=.5 ({1, 3} left) min-p=.6 is still relative to the largest prob (.45): keeps {1}
    x = logits6()
    assert kept(apply_min_p(apply_top_p(x, 0.5), 0.6)) == {1}


def test_repeat_penalty():
    x = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, 0.0])
    history = [0, 1, 1, 5, 4]
    # every distinct token of the history, once: positive / 2, negative and zero * 2
    out = apply_repeat_penalty(x, history, 2.0, -1)
    assert out.tolist() == [1.0, -2.0, 0.5, 3.0, -4.0, 0.0]
    # a window larger than the history is the whole history
    assert apply_repeat_penalty(x, history, 2.0, 64).tolist() == [1.0, -2.0, 0.5, 3.0, -4.0, 0.0]
    # only the last 3 tokens (1, 5, 4): token 0 keeps its logit
    assert apply_repeat_penalty(x, history, 2.0, 3).tolist() == [2.0, -2.0, 0.5, 3.0, -4.0, 0.0]
    # a penalty below 1 rewards repeats the same way round
    assert apply_repeat_penalty(x, history, 0.5, -1).tolist() == [4.0, -0.5, 0.5, 3.0, -1.0, 0.0]
    # disabled
    assert apply_repeat_penalty(x, history, 2.0, 0).tolist() == x.tolist()
    assert apply_repeat_penalty(x, history, 1.0, -1).tolist() == x.tolist()
    assert apply_repeat_penalty(x, [], 2.0, -1).tolist() == x.tolist()
    assert x.tolist() == [2.0, -1.0, 0.5, 3.0, -2.0, 0.0]  # input untouched


# ----------------------------------------------------------------------------- sampler

def test_greedy_is_argmax():
    g = torch.Generator().manual_seed(0)
    for temp in (0.0, -1.0):
        s = Sampler(SamplingParams(temperature=temp, seed=7))
        for _ in range(20):
            x = torch.randn(1000, generator=g)
            assert s.sample(x, []) == int(x.argmax())
    s = Sampler(SamplingParams(temperature=0.0))
    assert s.sample(logits6(), []) == 1
    assert s.sample(torch.tensor([0.0, 5.0, 1.0, 5.0]), []) == 1      # tie: lowest id


def test_greedy_uses_the_penalized_logits():
    p = SamplingParams(temperature=0.0, repeat_penalty=2.0, repeat_last_n=64)
    # positive: 2.0 / 2 = 1.0 < 1.5
    assert Sampler(p).sample(torch.tensor([2.0, 1.5, -3.0]), [0]) == 1
    # negative: -1.0 * 2 = -2.0 < -1.5
    assert Sampler(p).sample(torch.tensor([-1.0, -1.5, -3.0]), [0]) == 1
    # the penalized token is outside the window of 1
    p1 = SamplingParams(temperature=0.0, repeat_penalty=2.0, repeat_last_n=1)
    assert Sampler(p1).sample(torch.tensor([2.0, 1.5, -3.0]), [0, 2]) == 0


def draws(params: SamplingParams, x: torch.Tensor, n: int, history=()) -> list[int]:
    s = Sampler(params)
    return [s.sample(x, history) for _ in range(n)]


def test_seed_reproducible_and_different_seeds_differ():
    x = torch.zeros(50)   # 50 equally likely tokens
    flat = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = draws(SamplingParams(seed=42, **flat), x, 200)
    assert a == draws(SamplingParams(seed=42, **flat), x, 200)
    assert a != draws(SamplingParams(seed=43, **flat), x, 200)
    assert len(set(a)) > 30
    # no seed: a random one is chosen and reported, and reusing it repeats the run
    s = Sampler(SamplingParams(**flat))
    assert isinstance(s.seed, int)
    first = [s.sample(x, []) for _ in range(200)]
    assert first == draws(SamplingParams(seed=s.seed, **flat), x, 200)
    assert Sampler(SamplingParams(seed=-1, **flat)).seed >= 0


@pytest.mark.parametrize("params, expected, n", [
    # top-k 4 -> {1, 3, 5, 0}; top-p .9 on .93-renormalized probs -> {1, 3, 5} (cum .484, .753,
    # .914); min-p .1 keeps all three (.15/.45 = .33); T = .5 squares the probs:
    # .2025, .0625, .0225 / .2875
    (SamplingParams(temperature=0.5, top_k=4, top_p=0.9, min_p=0.1, seed=1234),
     {1: 0.704348, 3: 0.217391, 5: 0.078261}, 20000),
    # no filters, T = 2: sqrt(p) / 2.205990 (sqrt: .282843 .670820 .141421 .5 .223607 .387298)
    (SamplingParams(temperature=2.0, top_k=0, top_p=1.0, min_p=0.0, seed=5),
     {0: 0.128216, 1: 0.304090, 2: 0.064108, 3: 0.226656, 4: 0.101363, 5: 0.175567}, 20000),
    # as the first but min-p .4 also drops token 5 (.15/.45 = .33 < .4): .2025, .0625 / .265
    # (fewer draws, to keep the file fast; the tolerance scales with 1/sqrt(n))
    (SamplingParams(temperature=0.5, top_k=4, top_p=0.9, min_p=0.4, seed=99),
     {1: 0.764151, 3: 0.235849}, 8000),
])
def test_empirical_frequencies_match_filtered_softmax(params, expected, n):
    counts = [0] * 6
    for t in draws(params, logits6(), n):
        counts[t] += 1
    freqs = [c / n for c in counts]
    # filtered-out tokens are never drawn; the others are within 0.01 at 20k draws (about 3
    # standard deviations of a frequency near 0.5), 0.01 * sqrt(20000 / n) at n draws
    tol = 0.01 * math.sqrt(20000 / n)
    for i in range(6):
        assert abs(freqs[i] - expected.get(i, 0.0)) < tol, (i, freqs, expected)
        if i not in expected:
            assert counts[i] == 0
    # and a chi-square goodness of fit: below the 99.9% point for (categories - 1) degrees of freedom
    chi2 = sum((counts[i] - n * q) ** 2 / (n * q) for i, q in expected.items())
    limit = {1: 10.83, 2: 13.82, 5: 20.52}[len(expected) - 1]
    assert chi2 < limit, (chi2, counts)


@pytest.mark.parametrize("vocab", [6, 10000])   # 10000: the large-vocabulary (unsorted) path
@pytest.mark.parametrize("params, expected", [
    # the first case above
    (SamplingParams(temperature=0.5, top_k=4, top_p=0.9, min_p=0.1),
     {1: 0.704348, 3: 0.217391, 5: 0.078261}),
    # no top-k: top-p .9 keeps {1, 3, 5, 0} (cum .93), min-p .1 keeps them all, T = 1: p / .93
    (SamplingParams(temperature=1.0, top_k=0, top_p=0.9, min_p=0.1),
     {1: 0.483871, 3: 0.268817, 5: 0.161290, 0: 0.086022}),
    # top-k 5, top-p 1: min-p .2 keeps {1, 3, 5} (.15 >= .09); T = 1: .45 .25 .15 / .85
    (SamplingParams(temperature=1.0, top_k=5, top_p=1.0, min_p=0.2),
     {1: 0.529412, 3: 0.294118, 5: 0.176471}),
])
def test_candidates_distribution(vocab, params, expected):
    # tokens 6.. (if any) get logit -30: probability ~1e-14 of the total, removed by every filter
    x = torch.full((vocab,), -30.0)
    x[:6] = logits6()
    ids, scaled = Sampler(params).candidates(x, [])
    probs = torch.softmax(scaled.double(), 0)
    got = dict(zip(ids.tolist(), probs.tolist()))
    assert set(got) == set(expected)
    for i, q in expected.items():
        assert got[i] == pytest.approx(q, abs=1e-5)


def test_candidates_agree_with_the_filter_functions():
    # the sampler's fused path against the composition of the exported filters, with many ties
    g = torch.Generator().manual_seed(1)
    for vocab in (50, 9000):
        for trial in range(20):
            x = torch.randint(-8, 9, (vocab,), generator=g).float() / 2
            history = torch.randint(0, vocab, (30,), generator=g).tolist()
            p = SamplingParams(temperature=0.7, top_k=[0, 5, 40, 200][trial % 4],
                               top_p=[1.0, 0.9, 0.5, 0.97, 0.3][trial % 5],
                               min_p=[0.0, 0.05, 0.3][trial % 3], repeat_penalty=1.3,
                               repeat_last_n=[16, -1][trial % 2])
            ref = apply_repeat_penalty(x, history, p.repeat_penalty, p.repeat_last_n)
            ref = apply_min_p(apply_top_p(apply_top_k(ref, p.top_k), p.top_p), p.min_p)
            ids, scaled = Sampler(p).candidates(x, history)
            assert sorted(ids.tolist()) == sorted(kept(ref)), (vocab, trial)
            assert torch.allclose(scaled, ref[ids] / 0.7)


def test_penalty_in_the_chain():
    # history [1]: token 1's logit ln(.45) + 3.7 = 2.901 > 0 becomes 1.450; top-k 1 then keeps
    # token 3 (ln(.25) + 3.7 = 2.314)
    p = SamplingParams(temperature=1.0, top_k=1, repeat_penalty=2.0, seed=3)
    assert set(draws(p, logits6(), 50, history=[1])) == {3}
    assert set(draws(p, logits6(), 50, history=[])) == {1}
    x = logits6()
    Sampler(p).sample(x, [1])
    assert torch.equal(x, logits6())   # the caller's logits are not modified


def test_logit_bias_adds_per_token_and_minus_inf_bans():
    x = logits6()
    out = apply_logit_bias(x, [(0, 1.5), (4, float("-inf")), (0, -0.5), (2, 2.0)])
    v = x.tolist()
    # token 0 gets both of its entries (+1.5 - 0.5), 4 is banned, 2 is raised, the rest unchanged
    assert out.tolist() == pytest.approx([v[0] + 1.0, v[1], v[2] + 2.0, v[3], float("-inf"), v[5]])
    assert torch.equal(x, logits6())   # input untouched
    assert torch.equal(apply_logit_bias(x, []), x)


def test_logit_bias_comes_before_the_chain():
    # greedy: banning the argmax (1) leaves the next best (3); +4 on token 2 makes its logit
    # ln(.02) + 4 + 3.7 = 3.79, above token 1's ln(.45) + 3.7 = 2.90, so it wins
    greedy = dict(temperature=0.0)
    assert draws(SamplingParams(**greedy, logit_bias=((1, float("-inf")),)), logits6(), 1) == [3]
    assert draws(SamplingParams(**greedy, logit_bias=((2, 4.0),)), logits6(), 1) == [2]
    # sampled with top-k 1: the bias decides which token top-k keeps, so it ran before top-k
    p = SamplingParams(temperature=1.0, top_k=1, logit_bias=((5, 2.0),), seed=1)
    assert set(draws(p, logits6(), 50)) == {5}
    # a banned token is never drawn, even with every filter off
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, logit_bias=((1, float("-inf")),), seed=2)
    assert 1 not in set(draws(p, logits6(), 500))


def test_large_vocab_is_fast():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(262144, generator=g) * 2
    x[torch.randint(0, 262144, (20,), generator=g)] += 20
    s = Sampler(SamplingParams(seed=0, repeat_penalty=1.1))
    history = list(range(0, 6400, 100))
    s.sample(x, history)
    times = []
    for _ in range(8):
        t0 = time.perf_counter()
        s.sample(x, history)
        times.append(time.perf_counter() - t0)
    # ~1 ms on an idle core; the fastest of 8 and a loose bound, so a busy machine does not fail it
    assert min(times) < 0.05, f"{min(times) * 1e3:.1f} ms per sample"


@pytest.mark.parametrize("field, value, flag", [
    ("top_p", 1.5, "--top-p 1.5"),
    ("top_p", 0.0, "--top-p 0.0"),
    ("top_p", -0.1, "--top-p -0.1"),
    ("min_p", -0.1, "--min-p -0.1"),
    ("min_p", 1.5, "--min-p 1.5"),
    ("temperature", float("nan"), "--temp nan"),
    ("temperature", float("inf"), "--temp inf"),
    ("top_k", 2.5, "--top-k 2.5"),
    ("repeat_penalty", 0.0, "--repeat-penalty 0.0"),
    ("repeat_penalty", -1.0, "--repeat-penalty -1.0"),
    ("repeat_last_n", -2, "--repeat-last-n -2"),
    ("seed", -5, "--seed -5"),
    ("seed", 2**64, f"--seed {2**64}"),
    ("seed", "abc", "--seed abc"),
    ("logit_bias", ((-1, 1.0),), "--logit-bias (-1, 1.0)"),
    ("logit_bias", ((3, float("nan")),), "--logit-bias (3, nan)"),
    ("logit_bias", ((3, float("inf")),), "--logit-bias (3, inf)"),
    ("logit_bias", ((3, "x"),), "--logit-bias (3, 'x')"),
])
def test_validate_rejects(field, value, flag):
    p = SamplingParams(**{field: value})
    with pytest.raises(TensorsplitError, match="^" + re.escape(flag) + ": must"):
        p.validate()
    with pytest.raises(TensorsplitError):
        Sampler(p)


@pytest.mark.parametrize("kwargs", [
    {}, dict(temperature=0.0), dict(temperature=-1.0), dict(top_k=0), dict(top_k=-1),
    dict(top_p=1.0), dict(min_p=0.0), dict(min_p=1.0), dict(repeat_last_n=-1), dict(repeat_last_n=0),
    dict(seed=0), dict(seed=-1), dict(seed=2**64 - 1), dict(repeat_penalty=1.3),
    dict(logit_bias=((0, -100.0), (5, float("-inf")), (5, 2))),
])
def test_validate_accepts(kwargs):
    SamplingParams(**kwargs).validate()


# ----------------------------------------------------------------------------- stopping

def test_stop_eos():
    sc = StopChecker({2, 7}, [], 100)
    assert sc.push(5, "Hello") == ("Hello", None)
    assert sc.push(7, "<end_of_turn>") == ("", "eos")
    assert sc.flush() == ""


def test_stop_eos_releases_held_text():
    sc = StopChecker({2}, ["###"], 100)
    assert sc.push(5, "a#") == ("a", None)
    assert sc.push(2, "</s>") == ("#", "eos")    # '#' can no longer become '###'
    assert sc.flush() == ""


def test_stop_max_tokens():
    sc = StopChecker({2}, [], 3)
    assert sc.push(10, "a") == ("a", None)
    assert sc.push(11, "b") == ("b", None)
    assert sc.push(12, "c") == ("c", "length")   # the 3rd token counts and is emitted


def test_stop_max_tokens_releases_held_text():
    sc = StopChecker({2}, ["###"], 2)
    assert sc.push(10, "x#") == ("x", None)
    assert sc.push(11, "#") == ("##", "length")


def test_no_limit_when_negative():
    sc = StopChecker({2}, [], -1)
    for i in range(1000):
        assert sc.push(10, "a") == ("a", None)


def test_stop_string_within_one_token():
    sc = StopChecker({2}, ["\n\nUser:"], 100)
    assert sc.push(1, "Hi") == ("Hi", None)
    assert sc.push(2 + 1, " there\n\nUser: more") == (" there", "stop")


def test_stop_string_split_over_three_tokens():
    sc = StopChecker({2}, ["<|end|>"], 100)
    out = []
    for tok, text in [(1, "Hello <|"), (2 + 1, "en"), (4, "d|>tail")]:
        emitted, reason = sc.push(tok, text)
        out.append(emitted)
    assert out == ["Hello ", "", ""]
    assert reason == "stop"
    assert sc.flush() == ""
    assert "<" not in "".join(out)


def test_held_text_released_when_not_a_stop_string():
    sc = StopChecker({2}, ["<|end|>"], 100)
    assert sc.push(1, "a <") == ("a ", None)
    assert sc.push(3, "|e") == ("", None)
    assert sc.push(4, "x") == ("<|ex", None)      # '<|ex' cannot start '<|end|>'
    # overlapping: 'ab' + 'a' -> 'aba' is released up to the 'a' that may still start 'abc'
    sc = StopChecker({2}, ["abc"], 100)
    assert sc.push(1, "xab") == ("x", None)
    assert sc.push(3, "a") == ("ab", None)
    assert sc.push(4, "bc!") == ("", "stop")


def test_flush():
    sc = StopChecker({2}, ["STOP"], 100)
    assert sc.push(1, "the ST") == ("the ", None)
    assert sc.push(3, "") == ("", None)
    assert sc.flush() == "ST"
    assert sc.flush() == ""


def test_earliest_stop_string_wins_and_beats_length():
    sc = StopChecker({2}, ["world", "lo w"], 100)
    assert sc.push(1, "hello world") == ("hel", "stop")
    assert sc.stop_string == "lo w"           # the one that ended it (the server's stopping_word)
    sc = StopChecker({2}, ["<|end|>"], 1)
    assert sc.push(1, "ab<|end|>cd") == ("ab", "stop")
    # a stop string completed by the last allowed token is still cut
    sc = StopChecker({2}, ["<|end|>"], 2)
    assert sc.push(1, "ab<|e") == ("ab", None)
    assert sc.push(3, "nd|>") == ("", "stop") and sc.stop_string == "<|end|>"
