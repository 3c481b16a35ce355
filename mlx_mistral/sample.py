"""Sampling: make_sampler(...) builds one function from logits to next token ids."""

import math
from collections.abc import Callable, Sequence

import mlx.core as mx

from .errors import MistralError

Sampler = Callable[[mx.array], mx.array]


# logits [B, V] -> (token ids [B], the log-weights [B, V] they were drawn from: see make_picker)
Picker = Callable[[mx.array], tuple[mx.array, mx.array]]


def make_sampler(temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                 seed: int | None = None) -> Sampler:
    """A function logits [B, V] -> token ids [B].

    temp 0 is greedy. top_k 0, top_p 1 and min_p 0 switch those filters off.
    The same seed gives the same tokens.
    """
    pick = make_picker(temp, top_p, top_k, min_p, seed)

    def sample(logits: mx.array) -> mx.array:
        return pick(logits)[0]

    return sample


def make_picker(temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                seed: int | None = None) -> Picker:
    """make_sampler's draw, which also hands back what it drew from: the log-weights [B, V]
    (float32) whose log_softmax is the distribution of the token. At temp 0 (argmax) they
    are the logits; otherwise log_softmax(logits / temp) with the tokens top_k, top_p and
    min_p remove (in that order) at -inf, the rest not renormalized."""
    check_sampler(temp, top_p, top_k, min_p)
    key = [mx.random.key(seed)] if seed is not None else None

    def pick(logits: mx.array) -> tuple[mx.array, mx.array]:
        logits = logits.astype(mx.float32)
        if temp == 0:
            return mx.argmax(logits, axis=-1), logits
        logprobs = logits / temp
        logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
        if top_k:
            logprobs = keep_top_k(logprobs, top_k)
        if top_p < 1.0:
            logprobs = keep_top_p(logprobs, top_p)
        if min_p > 0.0:
            logprobs = keep_min_p(logprobs, min_p)
        if key is None:
            return mx.random.categorical(logprobs), logprobs
        key[0], sub = mx.random.split(key[0])
        return mx.random.categorical(logprobs, key=sub), logprobs

    return pick


def check_sampler(temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0) -> None:
    """make_sampler's checks alone (no MLX call: safe on any thread)."""
    _check("temp", temp, temp >= 0, ">= 0 (0 = greedy)")
    _check("top_p", top_p, 0 < top_p <= 1, "in (0, 1]")
    _check("min_p", min_p, 0 <= min_p < 1, "in [0, 1)")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise MistralError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")


def check_repetition_penalty(penalty: float) -> None:
    _check("repetition_penalty", penalty, penalty > 0, "> 0 (1 = off)")


def _check(name: str, value: float, ok: bool, expected: str) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not ok:
        raise MistralError(f"{name} must be {expected}, got {value!r}")


def keep_top_k(logprobs: mx.array, k: int) -> mx.array:
    """Keep the k most likely tokens (ties with the k-th included)."""
    if k >= logprobs.shape[-1]:
        return logprobs
    kth = mx.min(mx.topk(logprobs, k, axis=-1), axis=-1, keepdims=True)
    return mx.where(logprobs >= kth, logprobs, -mx.inf)


def keep_top_p(logprobs: mx.array, p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose probability mass reaches p."""
    sorted_lp = -mx.sort(-logprobs, axis=-1)  # descending
    probs = mx.exp(sorted_lp)
    before = mx.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    threshold = mx.min(mx.where(before < p, sorted_lp, mx.inf), axis=-1, keepdims=True)
    return mx.where(logprobs >= threshold, logprobs, -mx.inf)


def keep_min_p(logprobs: mx.array, min_p: float) -> mx.array:
    """Keep tokens at least min_p times as likely as the most likely one."""
    threshold = mx.max(logprobs, axis=-1, keepdims=True) + math.log(min_p)
    return mx.where(logprobs >= threshold, logprobs, -mx.inf)


def penalize_repetition(logits: mx.array, recent: mx.array, penalty: float) -> mx.array:
    """CTRL-style: divide positive (multiply negative) logits of recent tokens by penalty."""
    picked = mx.take_along_axis(logits, recent, axis=-1)
    picked = mx.where(picked > 0, picked / penalty, picked * penalty)
    return mx.put_along_axis(logits, recent, picked, axis=-1)


def with_repetition_penalty(sampler: Sampler, tokens: Sequence[int], penalty: float,
                            context: int = 64) -> Sampler:
    """`sampler` for one sequence (logits [1, V]) after penalize_repetition over the last
    `context` tokens it has seen: the end of `tokens` (its prompt), then each token it picked."""
    if penalty == 1.0:
        return sampler
    pick = penalized(lambda logits: (sampler(logits), logits), tokens, penalty, context)

    def sample(logits: mx.array) -> mx.array:
        return pick(logits)[0]

    return sample


def penalized(pick: Picker, tokens: Sequence[int], penalty: float, context: int = 64) -> Picker:
    """with_repetition_penalty for a picker: its log-weights include the penalty."""
    if penalty == 1.0:
        return pick
    recent = mx.array(list(tokens[-context:]), dtype=mx.uint32)[None]

    def pick_penalized(logits: mx.array) -> tuple[mx.array, mx.array]:
        nonlocal recent
        y, weights = pick(penalize_repetition(logits, recent, penalty))
        recent = mx.concatenate([recent, y[:, None].astype(mx.uint32)], axis=1)[:, -context:]
        return y, weights

    return pick_penalized


def top_logprobs(weights: mx.array, tokens: mx.array, n: int) -> tuple[mx.array, mx.array, mx.array]:
    """From log-weights [k, V] (a picker's) and the tokens [k] drawn from them: each token's
    log-probability [k] (log_softmax of the weights), and the n most likely tokens [k, n] with
    theirs [k, n], most likely first (a token a filter removed has -inf). Only the picked
    entries are normalized: no [k, V] array beside the weights."""
    lse = mx.logsumexp(weights, axis=-1, keepdims=True)
    chosen = (mx.take_along_axis(weights, tokens.astype(mx.int32)[:, None], axis=-1) - lse)[:, 0]
    if n == 0:
        return chosen, mx.zeros((len(tokens), 0), dtype=mx.uint32), mx.zeros((len(tokens), 0))
    top = mx.argpartition(-weights, kth=n - 1, axis=-1)[:, :n]
    values = mx.take_along_axis(weights, top, axis=-1) - lse
    order = mx.argsort(-values, axis=-1)
    return chosen, mx.take_along_axis(top, order, axis=-1), mx.take_along_axis(values, order, axis=-1)
