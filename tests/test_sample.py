import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_mistral import MistralError, make_sampler
from mlx_mistral.sample import penalize_repetition

LOGITS = mx.array(np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32) * 2)


def draws(sampler, n=200):
    return np.stack([np.array(sampler(LOGITS)) for _ in range(n)])  # [n, 3]


def test_greedy_at_temp_zero():
    assert make_sampler(temp=0)(LOGITS).tolist() == np.argmax(np.array(LOGITS), -1).tolist()


def support_top_k(lp, k):
    return lp >= np.sort(lp, -1)[:, -k][:, None]


def support_top_p(lp, p):
    probs = np.exp(lp - np.logaddexp.reduce(lp, -1, keepdims=True))
    out = np.zeros_like(lp, bool)
    for r in range(lp.shape[0]):
        order = np.argsort(-probs[r])
        mass = np.cumsum(probs[r][order]) - probs[r][order]
        out[r, order[mass < p]] = True
    return out


def support_min_p(lp, m):
    return lp >= lp.max(-1, keepdims=True) + math.log(m)


@pytest.mark.parametrize("kwargs,support", [
    (dict(top_k=3), lambda lp: support_top_k(lp, 3)),
    (dict(top_p=0.5), lambda lp: support_top_p(lp, 0.5)),
    (dict(min_p=0.2), lambda lp: support_min_p(lp, 0.2)),
    (dict(top_k=5, min_p=0.1), lambda lp: support_top_k(lp, 5) & support_min_p(lp, 0.1)),
])
def test_filters_never_leave_their_support(kwargs, support):
    lp = np.array(LOGITS)  # temp 1: scaled logits are the logits
    allowed = support(lp)
    got = draws(make_sampler(temp=1.0, seed=0, **kwargs))
    for row in range(3):
        assert allowed[row, got[:, row]].all()
        assert len(set(got[:, row])) > 1  # still sampling, not argmax


def test_same_seed_same_tokens():
    a = draws(make_sampler(temp=1.0, seed=7), 50)
    b = draws(make_sampler(temp=1.0, seed=7), 50)
    c = draws(make_sampler(temp=1.0, seed=8), 50)
    assert (a == b).all() and (a != c).any()


def test_repetition_penalty():
    logits = mx.array([[2.0, -2.0, 1.0, 0.5]])
    out = penalize_repetition(logits, mx.array([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]


@pytest.mark.parametrize("kwargs", [
    dict(temp=-1), dict(temp=float("nan")), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
    dict(top_k=1.5), dict(min_p=1.0), dict(min_p=-0.1),
])
def test_invalid_parameters(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(MistralError, match=name):
        make_sampler(**kwargs)


# Chi-square goodness of fit. Critical values by the Wilson-Hilferty approximation (within 3% of the
# exact quantile for df >= 2, a little above it in the far tail: lenient to a correct
# sampler by that much): at significance ALPHA = 0.001 a correct sampler fails 1 run in 1000,
# and the seed is fixed, so the outcome is the same every run.
Z_999 = 3.0902  # standard normal quantile at 1 - ALPHA


def chi2_critical(df: int) -> float:
    return df * (1 - 2 / (9 * df) + Z_999 * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """The statistic and its degrees of freedom over the kept tokens."""
    expected = probs * counts.sum()
    kept = probs > 0
    return float((((counts - expected) ** 2)[kept] / expected[kept]).sum()), int(kept.sum()) - 1


WORDS = np.array([2.0, 1.5, 1.0, 0.6, 0.3, 0.0, -0.4, -1.0, -1.5, -3.0], np.float32)  # one row, 10 tokens
N = 4000


def expected_probs(kept: np.ndarray, temp: float = 0.7) -> np.ndarray:
    """softmax(logits / temp) over the kept tokens, renormalised; 0 elsewhere."""
    p = np.exp(WORDS / temp - (WORDS / temp).max()) * kept
    return p / p.sum()


def sample_counts(sampler) -> np.ndarray:
    logits = mx.array(np.repeat(WORDS[None], N, axis=0))  # N independent rows, one call
    return np.bincount(np.array(sampler(logits)), minlength=len(WORDS))


p07 = expected_probs(np.ones(10, bool))
CASES = {  # filter -> the tokens it must keep (computed by hand from p07, the probabilities at temp 0.7)
    "none": (dict(), np.ones(10, bool)),
    "top_k=3": (dict(top_k=3), np.arange(10) < 3),
    "top_p=0.9": (dict(top_p=0.9), np.arange(10) < 1 + int((np.cumsum(p07) < 0.9).sum())),
    "min_p=0.05": (dict(min_p=0.05), p07 >= 0.05 * p07.max()),
}


@pytest.mark.parametrize("case", CASES)
def test_temperature_and_filters_match_the_distribution(case):
    """temp 0.7 draws follow softmax(logits / 0.7) restricted to the kept set and renormalised: a
    chi-square test at 0.001 passes, and no draw falls outside the set. The negative controls fail
    it: drawing uniformly from the kept set, or ignoring the temperature (temp 1), gives a statistic
    many times the critical value (asserted below, so the test can tell them apart)."""
    kwargs, kept = CASES[case]
    assert 1 < kept.sum() < 10 or case == "none"
    probs = expected_probs(kept)
    counts = sample_counts(make_sampler(temp=0.7, seed=0, **kwargs))
    assert not counts[~kept].any()
    stat, df = chi2(counts, probs)
    assert stat < chi2_critical(df), (stat, df)
    uniform = sample_counts(lambda logits: mx.array(np.random.default_rng(0).choice(np.flatnonzero(kept), N)))
    ignores_temp = sample_counts(make_sampler(temp=1.0, seed=0, **kwargs))
    for wrong in (uniform, ignores_temp):
        assert chi2(wrong, probs)[0] > 2 * chi2_critical(df)
