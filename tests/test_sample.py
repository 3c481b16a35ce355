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
