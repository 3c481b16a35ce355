"""The verify step: every row feeds its last token and its drafts in one forward of the target
([B, 1 + k], ragged rows padded, each at its own positions), draws the token of each position
exactly as plain decoding would from that position's logits, and keeps its drafts up to the
first the draw disagrees with (sample and compare: the emitted tokens are the target's own
draws, so greedy output is plain greedy's and seeded output, whose noise is keyed by position,
plain seeded's). Drafts a draft model sampled go through rejection sampling instead
(speculative.rejection): the same distribution, not the same tokens as a seeded plain run.
The rejected tokens' K/V are taken back by moving the row's offset (RollingKVCache.rewind):
the cache needs 1 + k <= 1 + headroom."""

import math
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from ..layered_cache import KVCache
from ..model import Mistral
from ..sample import Picker, penalize_histories, top_logprobs
from ..structured import Guide, allow
from . import rejection


@dataclass
class Draw:
    """How one row draws: its picker (make_picker: temperature, top-k/p, seeded noise), every
    token it has so far (the repetition penalty's context), its grammar, its logprobs ask."""

    pick: Picker
    history: list[int]
    greedy: bool = True  # temperature 0 and no penalty: a plain argmax
    penalty: float = 1.0
    guide: Guide | None = None
    logprobs: int | None = None
    # drafts sampled from a draft model (temperature > 0): their log-probabilities [k, V] there,
    # for rejection sampling (speculative.rejection), and the request's seed
    q: mx.array | None = None
    seed: int | None = None


@dataclass
class Verdict:
    """One row's step: the tokens it emits (its accepted drafts, then the target's own next
    token), how many it drafted and how many of them were kept, and (when asked) each
    emitted token's (log-probability, [(token, log-probability)] of the most likely)."""

    tokens: list[int]
    drafted: int
    accepted: int
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = field(default=None)


def verify(model: Mistral, cache: KVCache, last: list[int], drafts: list[list[int]],
           draws: list[Draw]) -> list[Verdict]:
    """One forward for every row b: last[b] then drafts[b], rows padded to the longest; the
    cache ends holding what each row keeps (all but its last emitted token, fed next step)."""
    drafts = [_grammatical(d, draw.guide) for d, draw in zip(drafts, draws)]
    L = 1 + max(len(d) for d in drafts)
    x = mx.array([[y] + d + [y] * (L - 1 - len(d)) for y, d in zip(last, drafts)], dtype=mx.uint32)
    positions = [o + 1 for o in cache.offsets]  # of the token drawn at a row's first place
    logits = model(x, cache)  # [B, L, V]
    mx.async_eval(logits)
    tokens, weights = [], []
    for b, (d, draw) in enumerate(zip(drafts, draws)):
        rows = logits[b, :len(d) + 1]
        if draw.guide is not None and draw.guide.active:
            rows = allow(rows.astype(mx.float32), _masks(draw.guide, d, logits.shape[-1]))
        if draw.greedy:
            tokens.append(mx.argmax(rows, axis=-1))
            weights.append(rows.astype(mx.float32))
            continue
        histories = [draw.history + d[:t] for t in range(len(d) + 1)]
        at = range(positions[b], positions[b] + len(d) + 1)  # each position's own noise (a seeded sampler)
        y, w = draw.pick(penalize_histories(rows, histories, draw.penalty), at)
        if draw.q is not None and d:
            y = rejection.accept(w, d, draw.q[:len(d)], y, at, draw.seed)
        tokens.append(y)
        weights.append(w)
    asking = [b for b, draw in enumerate(draws) if draw.logprobs is not None]
    tops = {b: top_logprobs(weights[b], tokens[b], draws[b].logprobs) for b in asking}
    mx.eval(tokens, tops)
    verdicts = []
    for b, (d, draw) in enumerate(zip(drafts, draws)):
        drawn = tokens[b].tolist()
        kept = next((t for t in range(len(d)) if drawn[t] != d[t]), len(d))
        verdict = Verdict(drawn[:kept + 1], len(d), kept)
        if b in tops:
            chosen, ids, values = (a.tolist() for a in tops[b])
            verdict.logprobs = [(chosen[t], [(i, v) for i, v in zip(ids[t], values[t]) if v != -math.inf])
                                for t in range(kept + 1)]
        verdicts.append(verdict)
    cache.rewind([L - 1 - v.accepted for v in verdicts])
    return verdicts


def _grammatical(drafts: list[int], guide: Guide | None) -> list[int]:
    """The drafts up to the first the row's grammar would refuse (it would be rejected anyway);
    none while the grammar waits for its trigger (the first answer token decides)."""
    if guide is None or not drafts:
        return drafts
    if not guide.active or guide.matcher.is_stopped():
        return []
    n = 0
    while n < len(drafts) and guide.matcher.try_consume_tokens(drafts[n:n + 1]) == 1:
        n += 1
    guide.matcher.rollback(n)
    return drafts[:n]


def _masks(guide: Guide, drafts: list[int], vocab: int) -> np.ndarray:
    """The grammar's allowed tokens at each of the 1 + len(drafts) positions: after the tokens
    so far, then after each draft (the matcher advances through them and rolls back)."""
    import llguidance.numpy

    bitmask = np.zeros((len(drafts) + 1, (vocab + 31) // 32), dtype=np.int32)
    for t in range(len(drafts) + 1):
        llguidance.numpy.fill_next_token_bitmask(guide.matcher, bitmask, t)
        if t < len(drafts):
            guide.matcher.consume_token(drafts[t])
    guide.matcher.rollback(len(drafts))
    return bitmask
