"""Sampling: make_sampler(...) builds one function from logits to next token ids."""

import hashlib
import inspect
import math
from collections.abc import Callable, Sequence

import mlx.core as mx

from .errors import MistralError

# logits [B, V] (and, for a seeded sampler, each row's absolute position) -> token ids [B]
Sampler = Callable[..., mx.array]


# logits [B, V], positions -> (token ids [B], the log-weights [B, V] they were drawn from: see make_picker)
Picker = Callable[..., tuple[mx.array, mx.array]]


def make_sampler(temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                 seed: int | None = None) -> Sampler:
    """A function logits [B, V] -> token ids [B].

    temp 0 is greedy. top_k 0, top_p 1 and min_p 0 switch those filters off.
    The same seed gives the same tokens: see make_picker.
    """
    pick = make_picker(temp, top_p, top_k, min_p, seed)

    def sample(logits: mx.array, positions: Sequence[int] | None = None) -> mx.array:
        return pick(logits, positions)[0]

    sample.pick = pick  # what speculation draws with (the distribution too)
    return sample


def positional(sampler: Callable) -> Sampler:
    """`sampler` taking (logits, positions): make_sampler's as they are, a function of the
    logits alone (mlx-lm's kind) with the positions ignored."""
    try:
        inspect.signature(sampler).bind(None, None)
        return sampler
    except TypeError:
        return lambda logits, positions=None: sampler(logits)


def make_picker(temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                seed: int | None = None) -> Picker:
    """make_sampler's draw, which also hands back what it drew from: the log-weights [B, V]
    (float32) whose log_softmax is the distribution of the token. At temp 0 (argmax) they
    are the logits; otherwise log_softmax(logits / temp) with the tokens top_k, top_p and
    min_p remove (in that order) at -inf, the rest not renormalized.

    With a seed, the noise of row b is keyed by (seed, positions[b]), the absolute position of
    the token drawn (without positions: the number of rows drawn before), so a token depends
    on its own logits and position only: speculation, which draws several positions at once
    and some twice, draws each exactly as plain decoding does.
    """
    check_sampler(temp, top_p, top_k, min_p)
    drawn = [0]

    def pick(logits: mx.array, positions: Sequence[int] | None = None) -> tuple[mx.array, mx.array]:
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
        if seed is None:
            return mx.random.categorical(logprobs), logprobs
        if positions is None:
            positions = range(drawn[0], drawn[0] + logprobs.shape[0])
            drawn[0] += logprobs.shape[0]
        keys = [position_key(seed, p) for p in positions]
        return mx.stack([mx.random.categorical(logprobs[b], key=k) for b, k in enumerate(keys)]), logprobs

    pick.greedy, pick.seed = temp == 0, seed  # for speculation (rejection sampling's noise)
    return pick


def position_key(seed: int, position: int, use: str = "") -> mx.array:
    """The random key of the token at `position` of a request seeded `seed` (another `use`:
    another draw at that position, independent of the token's own)."""
    digest = hashlib.blake2b(f"{seed}:{position}{use and ':' + use}".encode(), digest_size=8).digest()
    return mx.random.key(int.from_bytes(digest, "little"))


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
    `context` tokens it has seen: the end of `tokens` (its prompt), then each token it picked
    (kept on the device: the next step is scheduled before this one's token is read)."""
    if penalty == 1.0:
        return sampler
    recent = mx.array(list(tokens[-context:]), dtype=mx.uint32)[None]

    def sample(logits: mx.array, positions: Sequence[int] | None = None) -> mx.array:
        nonlocal recent
        y = sampler(penalize_repetition(logits, recent, penalty), positions)
        recent = mx.concatenate([recent, y[:, None].astype(mx.uint32)], axis=1)[:, -context:]
        return y

    return sample


def penalize_histories(logits: mx.array, histories: Sequence[Sequence[int]], penalty: float,
                       context: int = 64) -> mx.array:
    """penalize_repetition of row b of `logits` [N, V] over the last `context` tokens of
    histories[b] (every token before the one row b draws)."""
    if penalty == 1.0:
        return logits
    recent = [list(h[-context:]) for h in histories]
    width = max(len(r) for r in recent)
    recent = [r + r[:1] * (width - len(r)) for r in recent]  # a token twice is penalized once
    return penalize_repetition(logits, mx.array(recent, dtype=mx.uint32), penalty)


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
