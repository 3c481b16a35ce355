"""The rows of the continuous batch: a request being served (Row), rows prefilled side by
side (Group), and the decode batch (Batch). Only the scheduler's thread touches them."""

from dataclasses import dataclass, field

import mlx.core as mx

from ..cache import KVCache
from ..generate import TextStream
from ..model import Mistral
from ..sample import make_sampler, with_repetition_penalty
from .blocks import BlockStore
from .prefix_cache import Marks
from .request import Event, Request


class Row:
    """A request being served: its prompt (`ids`, of which `feed` is not in the cache yet)
    and its stream."""

    def __init__(self, request: Request, ids: list[int], held: int, text: TextStream, marks: Marks):
        self.request, self.ids, self.text, self.marks = request, ids, text, marks  # marks: see Held
        self.feed = ids[held:]  # never empty: the last prompt token is fed by a decode step
        self.reused = held  # prompt tokens already in the cache
        self.answer: list[int] = []
        self.pieces: list[str] = []
        sampler = make_sampler(request.temperature, request.top_p, seed=request.seed)
        self.sampler = with_repetition_penalty(sampler, ids, request.repetition_penalty)

    def event(self, r, token: int, capacity: int) -> Event:
        """The Event of generated `token` (r: TextStream.add's result), with the row's stats."""
        n = r.generation_tokens
        return Event(r.text, len(self.request.tokens), n, token, r.finish_reason, reused_tokens=self.reused,
                     tool_calls=r.tool_calls, prefilled_tokens=len(self.ids) - self.reused, ttft=r.ttft,
                     generation_tps=r.generation_tps, peak_memory=r.peak_memory,
                     kv_tokens=min(len(self.ids) + n - 1, capacity),  # all but the newest token are fed
                     reasoning=r.reasoning)


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

    def prefill(self, model: Mistral, n: int, blocks: BlockStore) -> None:
        """Feed every row its next n prompt tokens (one [rows, n] forward); `blocks` keeps the
        blocks they complete."""
        model(mx.array([row.feed[:n] for row in self.rows], dtype=mx.uint32), self.cache)
        mx.eval(self.cache.keys, self.cache.values)
        for b, row in enumerate(self.rows):
            row.feed = row.feed[n:]
            blocks.capture(self.cache, b, row.ids[:len(row.ids) - len(row.feed)])

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

    def join(self, rows: list[Row], cache: KVCache) -> None:
        """Rows whose prompts are in but their last token, which they feed next."""
        if self.cache is None:
            self.cache = cache
        else:
            self.cache.extend(cache)
        y = mx.array([row.feed[0] for row in rows], dtype=mx.uint32)
        self.y = y if self.y is None else mx.concatenate([self.y, y.astype(self.y.dtype)])
        self.rows.extend(rows)

    def step(self, model: Mistral) -> list[int]:
        """One decode step for every row: each row's next token (the one sync of the step)."""
        logits = model(self.y[:, None], self.cache)[:, -1]
        if all(row.request.temperature == 0 and row.request.repetition_penalty == 1.0 for row in self.rows):
            y = mx.argmax(logits, axis=-1)
        else:  # each row its own sampler (its own seeded random stream, its own recent tokens)
            y = mx.concatenate([row.sampler(logits[b:b + 1]) for b, row in enumerate(self.rows)])
        self.y = y
        return y.tolist()

    def drop(self, gone: list[int]) -> None:
        """Rows `gone` leave the batch (their cache rows are freed)."""
        keep = [b for b in range(len(self.rows)) if b not in gone]
        if keep:
            self.cache.keep(keep)
            self.y = self.y[mx.array(keep, dtype=mx.int32)]
        else:
            self.cache = self.y = None
        self.rows = [self.rows[b] for b in keep]
