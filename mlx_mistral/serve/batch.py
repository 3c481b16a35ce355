"""The rows of the continuous batch: a request being served (Row), rows prefilled side by
side (Group), and the decode batch (Batch). Only the scheduler's thread touches them."""

import math
import time
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from ..layered_cache import KVCache
from ..errors import MistralError
from ..generate import TextStream
from ..model import Mistral
from ..sample import make_picker, penalize_histories, top_logprobs
from ..speculative import DraftModel, Draw, Lookup, PromptLookup, Width, verify
from ..speculative.lookup import Pace
from ..structured import masked
from ..vision import image_slots
from .blocks import BlockStore
from .prefix_cache import Marks
from .request import Event, Request, TokenLogprob


class Row:
    """A request being served: its prompt (`ids`, of which `feed` is not in the cache yet)
    and its stream."""

    def __init__(self, request: Request, ids: list[int], held: int, text: TextStream, marks: Marks,
                 lookup: Lookup | None = None, draft_tokens: int = 0):
        self.request, self.ids, self.text, self.marks = request, ids, text, marks  # marks: see Held
        self.feed = ids[held:]  # never empty: the last prompt token is fed by a decode step
        self.reused = held  # prompt tokens already in the cache
        self.written = 0  # prompt tokens whose blocks its prefill put in the prefix cache
        self.answer: list[int] = []
        self.pieces: list[str] = []
        self.pick = make_picker(request.temperature, request.top_p, request.top_k, seed=request.seed)
        self.guide = request.constraint.guide() if request.constraint else None
        # prompt lookup's drafts (or a draft model's, draft_tokens at most), how many a step (None:
        # this row does not speculate), and its counts
        self.lookup = PromptLookup(lookup, ids) if lookup and request.speculate else None
        self.pace = self.lookup.pace if self.lookup else None
        if draft_tokens and request.speculate:
            self.pace = Pace(draft_tokens)
        self.drafted = self.accepted = self.forwards = 0
        self.images = None  # with images: (their [IMG] positions in ids, their features), see encode

    def encode(self, model: Mistral) -> None:
        """The request's images through the vision tower, once, as the row is admitted."""
        if self.request.images:
            self.images = image_slots(model, self.ids, self.request.images)
            if self.images[0][-1] >= len(self.ids) - 1:
                raise MistralError("images: the prompt's last token is an [IMG] token")

    @property
    def greedy(self) -> bool:
        return self.request.temperature == 0 and self.request.repetition_penalty == 1.0

    def draw(self, q: mx.array | None = None) -> Draw:
        """How the row draws at a verify step; `q`: its draft model's drafts' log-probabilities,
        when they were sampled (rejection sampling, keyed by the request's seed)."""
        r = self.request
        return Draw(self.pick, self.ids + self.answer, self.greedy, r.repetition_penalty, self.guide,
                    r.logprobs, q=q, seed=r.seed)

    def limit(self, headroom: int) -> int:
        """The drafts the next step may take: never past max_tokens (nor the headroom)."""
        return min(self.request.max_tokens - len(self.answer) - 1, headroom)

    def drafts(self, headroom: int) -> list[int]:
        """Prompt lookup's drafts for the next step."""
        return self.lookup.propose(self.limit(headroom)) if self.lookup else []

    def sampled(self) -> bool:
        """Its draft model's drafts are draws (temperature > 0), checked by rejection sampling."""
        return self.pace is not None and self.request.temperature > 0

    def add(self, token: int, cache: KVCache):
        """Take generated `token`: (TextStream.add's result, None), or (None, the error) when
        its grammar refuses it."""
        error = self.guide.advance(token) if self.guide else None
        if error:
            return None, error
        r = self.text.add(token, cache)
        self.answer.append(token)
        self.pieces.append(r.text)
        return r, None

    def event(self, r, token: int, capacity: int, logprob: TokenLogprob | None = None) -> Event:
        """The Event of generated `token` (r: TextStream.add's result), with the row's stats."""
        n = r.generation_tokens
        return Event(r.text, len(self.request.tokens), n, token, r.finish_reason, reused_tokens=self.reused,
                     tool_calls=r.tool_calls, prefilled_tokens=len(self.ids) - self.reused, ttft=r.ttft,
                     generation_tps=r.generation_tps, peak_memory=r.peak_memory,
                     kv_tokens=min(len(self.ids) + n - 1, capacity),  # all but the newest token are fed
                     reasoning=r.reasoning, stop_sequence=r.stop_sequence, logprob=logprob,
                     written_tokens=self.written, drafted_tokens=self.drafted, accepted_tokens=self.accepted,
                     forwards=self.forwards)


@dataclass
class Group:
    """Rows prefilled side by side: one cache, row b of it is rows[b]'s, all at one position
    (fresh rows start at 0 and are all fed the same number of tokens at every step)."""

    rows: list[Row]
    cache: KVCache

    def keep(self, keep: list[int]) -> None:
        """Only rows `keep` go on being prefilled (none: the group is done)."""
        if keep:
            self.cache.keep(keep)
        self.rows = [self.rows[b] for b in keep]

    def drop_cancelled(self) -> list[Row]:
        """The rows whose client cancelled, dropped from the group."""
        gone = [row for row in self.rows if row.request.cancelled]
        if gone:
            self.keep([b for b, row in enumerate(self.rows) if not row.request.cancelled])
        return gone

    def prefill(self, model: Mistral, n: int, blocks: BlockStore) -> None:
        """Feed every row its next n prompt tokens (one [rows, n] forward, image rows' features in
        place of their [IMG] tokens); `blocks` keeps the blocks they complete (not an image row's)."""
        at, features = [], []
        for b, row in enumerate(self.rows):
            if row.images:
                start = len(row.ids) - len(row.feed)
                lo, hi = np.searchsorted(row.images[0], [start, start + n])
                at.extend(b * n + row.images[0][lo:hi] - start)
                features.append(row.images[1][lo:hi])
        images = (mx.array(np.array(at, dtype=np.int64)), mx.concatenate(features)) if at else None
        model(mx.array([row.feed[:n] for row in self.rows], dtype=mx.uint32), self.cache, images)
        mx.eval(self.cache.keys, self.cache.values)
        for b, row in enumerate(self.rows):
            row.feed = row.feed[n:]
            if row.images:
                continue
            written = row.written + blocks.capture(self.cache, b, row.ids[:len(row.ids) - len(row.feed)])
            row.written = min(written, len(row.ids) - row.reused)  # a block may begin among the reused

    def take_ready(self) -> tuple[list[Row], KVCache] | None:
        """Take out the rows with only their last prompt token left, and their cache rows."""
        ready = [b for b, row in enumerate(self.rows) if len(row.feed) == 1]
        if not ready:
            return None
        rows = [self.rows[b] for b in ready]
        rest = [b for b in range(len(self.rows)) if b not in ready]
        cache = self.cache.rows(ready) if rest else self.cache  # all ready: the group's cache as is
        self.keep(rest)
        return rows, cache


@dataclass
class Batch:
    """The decode batch: rows[b]'s K/V are row b of `cache`, its next token to feed y[b]."""

    rows: list[Row] = field(default_factory=list)
    cache: KVCache | None = None
    y: mx.array | None = None
    # the last step's drafted_tokens, accepted_tokens, verify_steps (0 or 1), drafting_rows (rows with drafts)
    speculated: dict = field(default_factory=dict)
    width: Width = field(default_factory=Width)  # how many drafts a verify step feeds, from step timings
    draft: DraftModel | None = None  # the rows' draft model (else prompt lookup, for rows that speculate)

    def join(self, rows: list[Row], cache: KVCache) -> None:
        """Rows whose prompts are in but their last token, which they feed next."""
        if self.cache is None:
            self.cache = cache
        else:
            self.cache.extend(cache)
        y = mx.array([row.feed[0] for row in rows], dtype=mx.uint32)
        self.y = y if self.y is None else mx.concatenate([self.y, y.astype(self.y.dtype)])
        self.rows.extend(rows)
        if self.draft:
            self.draft.join([row.ids for row in rows])

    def step(self, model: Mistral) -> tuple[list[list[int]], dict[int, list[TokenLogprob]]]:
        """One step for every row: the tokens each row emits (one, or with speculation its
        accepted drafts and one more), and the TokenLogprobs of each row b that asks for them
        (one sync for the step). Rows with drafts make it a verify step (speculative/verify.py)."""
        start = time.perf_counter()
        for row in self.rows:
            row.forwards += 1
        if self.draft:
            drafts = self.draft.propose([row.pace.budget(row.limit(self.cache.headroom)) if row.pace else 0
                                         for row in self.rows], [row.pick if row.sampled() else None
                                                                 for row in self.rows])
        else:
            drafts = [row.drafts(self.cache.headroom) for row in self.rows]
        rates = [row.pace.rate if row.pace else 0.0 for row in self.rows]
        width = self.width.choose([len(d) for d in drafts], rates)
        if width == 0:
            for row, d in zip(self.rows, drafts):
                if d:
                    row.pace.withheld()
        drafts = [d[:width] for d in drafts]
        self.speculated = dict(drafted_tokens=sum(map(len, drafts)), accepted_tokens=0,
                               verify_steps=int(any(drafts)), drafting_rows=sum(map(bool, drafts)))
        if not any(drafts):
            tokens, logprobs = self._decode(model)
            runs, logprobs = [[t] for t in tokens], {b: [lp] for b, lp in logprobs.items()}
        else:
            qs = self.draft.q if self.draft else [None] * len(self.rows)
            draws = [row.draw(q) for row, q in zip(self.rows, qs)]
            verdicts = verify(model, self.cache, self.y.tolist(), drafts, draws)
            runs = [v.tokens for v in verdicts]
            # what the grammars let through
            self.speculated["drafted_tokens"] = sum(v.drafted for v in verdicts)
            logprobs = {b: [TokenLogprob(t, lp, top) for t, (lp, top) in zip(v.tokens, v.logprobs)]
                        for b, v in enumerate(verdicts) if v.logprobs is not None}
            for row, v in zip(self.rows, verdicts):
                row.drafted, row.accepted = row.drafted + v.drafted, row.accepted + v.accepted
                self.speculated["accepted_tokens"] += v.accepted
                if row.pace:
                    row.pace.update(v.drafted, v.accepted)
            self.y = mx.array([run[-1] for run in runs], dtype=mx.uint32)
        for row, run in zip(self.rows, runs):
            if row.lookup:
                row.lookup.extend(run)
        if self.draft:
            self.draft.update([len(run) - 1 for run in runs], runs)
        self.width.observe(len(self.rows) * (1 + max(map(len, drafts))), time.perf_counter() - start)
        return runs, logprobs

    def _decode(self, model: Mistral) -> tuple[list[int], dict[int, TokenLogprob]]:
        """One plain decode step: each row's next token, and the TokenLogprob of each row b
        that asks for logprobs. A row with an active grammar picks among the tokens it allows;
        with none, and no row asking for logprobs, this is the step of an unconstrained batch
        as it is."""
        logits = model(self.y[:, None], self.cache)[:, -1]
        guides = {b: row.guide for b, row in enumerate(self.rows) if row.guide and row.guide.active}
        if guides:  # the forward runs while the CPU fills their masks
            idx, allowed = masked(logits, guides)
        asking = [b for b, row in enumerate(self.rows) if row.request.logprobs is not None]
        rows = {b: allowed[i:i + 1] for i, b in enumerate(guides)} if guides else {}
        if all(row.greedy for row in self.rows):
            y = mx.argmax(logits, axis=-1)
            if guides:  # the guided rows again, masked
                y[idx] = mx.argmax(allowed, axis=-1).astype(y.dtype)
            weights = [rows.get(b, logits[b:b + 1]).astype(mx.float32) for b in asking]
        else:  # each row its own sampler (its own seeded noise, its own recent tokens)
            picks = [row.pick(penalize_histories(rows.get(b, logits[b:b + 1]), [row.ids + row.answer],
                                                 row.request.repetition_penalty), [self.cache.offsets[b]])
                     for b, row in enumerate(self.rows)]
            y = mx.concatenate([p[0] for p in picks])
            weights = [picks[b][1] for b in asking]
        self.y = y
        if not asking:
            return y.tolist(), {}
        return self._read(y, asking, weights)

    def _read(self, y: mx.array, asking: list[int], weights: list[mx.array]) -> tuple[list[int], dict]:
        """The tokens, and the TokenLogprobs of rows `asking` from the log-weights their tokens
        were picked from: computed on the device for those rows only, read with the tokens."""
        n = max(self.rows[b].request.logprobs for b in asking)
        chosen, ids, values = top_logprobs(mx.concatenate(weights), y[mx.array(asking, dtype=mx.int32)], n)
        mx.eval(y, chosen, ids, values)
        tokens, chosen, ids, values = y.tolist(), chosen.tolist(), ids.tolist(), values.tolist()
        out = {}
        for i, b in enumerate(asking):
            top = list(zip(ids[i], values[i]))[:self.rows[b].request.logprobs]
            out[b] = TokenLogprob(tokens[b], chosen[i], [(t, v) for t, v in top if v != -math.inf])
        return tokens, out

    def drop(self, gone: list[int]) -> None:
        """Rows `gone` leave the batch (their cache rows are freed)."""
        keep = [b for b in range(len(self.rows)) if b not in gone]
        if keep:
            self.cache.keep(keep)
            self.y = self.y[mx.array(keep, dtype=mx.int32)]
        else:
            self.cache = self.y = None
        if self.draft:
            self.draft.keep(keep)
        self.rows = [self.rows[b] for b in keep]


def prefill(groups: list[Group], batch: Batch, model: Mistral, budget: int, capacity: int,
            blocks: BlockStore) -> list[tuple[int, int]]:
    """Feed up to `budget` prompt tokens, oldest group first, and (n, rows) for each chunk fed.
    Every row of a group gets the same n tokens: at most the fewest any row has left before its
    last token, so the rows stay at one position, and no further than the blocks can be
    captured from (BlockStore.room). Rows down to their last token join `batch`."""
    chunks = []
    for group in groups:
        _join(group, batch)
        if not group.rows or budget <= 0:
            continue
        rows = group.rows
        n = min(min(len(row.feed) for row in rows) - 1, max(1, budget // len(rows)), capacity,
                blocks.room(group.cache.offset))
        group.prefill(model, n, blocks)
        budget -= n * len(rows)
        chunks.append((n, len(rows)))
        _join(group, batch)
    return chunks


def _join(group: Group, batch: Batch) -> None:
    """The rows of `group` with only their last prompt token left join the decode batch."""
    ready = group.take_ready()
    if ready:
        batch.join(*ready)
