"""Rejection sampling for drafts that were sampled (Leviathan et al. 2023, Chen et al. 2023): a
draft x drawn from the draft's distribution q is kept with probability min(1, p(x) / q(x)), p the
target's; the first one rejected is replaced by a draw from the residual max(0, p - q),
renormalized; when every draft is kept the target draws one more from its own p. Each emitted
token is then distributed exactly as the target's own draw at that position, whatever q is.

(Greedy drafts are the case q = one-hot: sample and compare, speculative.verify, is this rule.)"""

from collections.abc import Sequence

import mlx.core as mx

from ..sample import position_key


def accept(weights: mx.array, drafts: Sequence[int], q: mx.array, drawn: mx.array,
           positions: Sequence[int], seed: int | None) -> mx.array:
    """The tokens to emit at the 1 + n positions of a row with n sampled `drafts`: the drafts
    kept, then the residual's draw (or, all kept, `drawn[n]`, the target's own draw).

    weights [1 + n, V]: the target's log-weights (make_picker's: log_softmax is p); q [n, V]:
    the draft's log-probabilities; positions: the absolute position of each of the 1 + n
    tokens, which keys the uniform and the residual's noise of a seeded request. The tokens
    after the first rejected one are meaningless (verify keeps up to the first disagreement:
    the residual is 0 at the rejected draft, so it never draws it again)."""
    n = len(drafts)
    logp = weights - mx.logsumexp(weights, axis=-1, keepdims=True)
    d = mx.array(drafts, dtype=mx.int32)[:, None]
    ratio = mx.take_along_axis(logp[:n], d, axis=-1)[:, 0] - mx.take_along_axis(q, d, axis=-1)[:, 0]
    if seed is None:
        u = mx.random.uniform(shape=(n,))
        residual_keys = [None] * n
    else:
        u = mx.stack([mx.random.uniform(key=position_key(seed, p, "accept")) for p in positions[:n]])
        residual_keys = [position_key(seed, p, "residual") for p in positions[:n]]
    kept = mx.cumprod((mx.log(u) < ratio).astype(mx.int32))  # 1 while every draft so far was kept
    mass = mx.maximum(mx.exp(logp[:n]) - mx.exp(q), 0.0)
    # p == q (nothing left over) only where a draft cannot be rejected: draw from p there
    mass = mx.where(mx.sum(mass, axis=-1, keepdims=True) > 0, mass, mx.exp(logp[:n]))
    residual = mx.log(mass)
    redrawn = mx.stack([mx.random.categorical(residual[t], key=k) for t, k in enumerate(residual_keys)])
    kept_drafts = mx.concatenate([d[:, 0], drawn[n:]])
    fallback = mx.concatenate([redrawn.astype(drawn.dtype), drawn[n:]])
    return mx.where(mx.concatenate([kept, mx.zeros((1,), dtype=kept.dtype)]) > 0,
                    kept_drafts.astype(drawn.dtype), fallback)
