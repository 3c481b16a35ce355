"""The prefix cache: what a request finds of its prompt already computed, in two forms.

- Idle caches (Held): finished requests' whole one-row caches. A request whose prompt continues
  one's conversation (the next turn of a chat) takes it and prefills only its new tokens; the
  echo/marks rule (plan) lets a chat client's re-encoded copy of the model's answer match.
  Exact to the token, but one conversation each, and at most max_idle of them.
- Blocks (blocks.py, BlockStore): K/V of BLOCK_TOKENS-token blocks keyed by a hash chain, shared
  by any request whose prompt starts the same (eight agents' common system prompt and tools), up
  to the last block boundary; in memory and, with a directory, on disk across restarts.

take() uses whichever holds more of the prompt (the idle cache on a tie: it needs no copy) and
leaves the other as it was; prefill captures blocks, and a row that leaves adds its blocks and
(up to max_idle) its idle cache. Only the scheduler's thread calls it.
"""

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from ..layered_cache import KVCache
from .blocks import BlockStore
from .request import Request

Marks = list[tuple[int, int]]


@dataclass
class Held:
    """An idle cache: `fed` is what it holds, `actual` the conversation with the model's own
    last token, `template` the same as a client writes it back (empty: no echo). At each
    (t, a) of `marks`, the end of one of the conversation's answers, template[:t] and
    actual[:a] are the same conversation; marks[0] is (0, 0)."""

    cache: KVCache
    fed: list[int]
    actual: list[int]
    template: list[int]
    marks: Marks


class PrefixCache:
    """Up to `max_idle` idle caches (and `max_idle_bytes` of them), least recently used out
    first, by session (a chat tab: its last cache) or by the cache's id; and the `blocks`, if any."""

    def __init__(self, max_idle: int = 4, max_idle_bytes: int | None = None, blocks: BlockStore | None = None):
        self.max_idle, self.max_idle_bytes, self.blocks = max_idle, max_idle_bytes, blocks
        self._idle: OrderedDict[Hashable, Held] = OrderedDict()  # LRU first

    def __len__(self) -> int:
        return len(self._idle)

    def keys(self) -> list[Hashable]:
        """The keys held, least recently used first."""
        return list(self._idle)

    def get(self, key: Hashable) -> Held | None:
        return self._idle.get(key)

    def forget(self, key: Hashable) -> None:
        self._idle.pop(key, None)

    def clear(self) -> None:
        """Forget every idle cache and block (the scheduler closes: pending block files are written)."""
        self._idle.clear()
        if self.blocks is not None:
            self.blocks.close()

    def evict(self) -> bool:
        """Drop the least recently used idle cache, or else block; False if there was none."""
        if self._idle:
            self._idle.popitem(last=False)
            return True
        return self.blocks is not None and self.blocks.evict()

    def plan(self, request: Request) -> tuple[list[int], Hashable | None, int, Marks]:
        """(the prompt to feed, the key of the idle cache it extends or None, the tokens that
        cache holds, the marks of the prompt's answers), changing nothing.

        The one reuse rule (the chat app's too). A chat client sends the model's earlier
        answers back as text, which the tokenizer may split differently: where the prompt
        starts like an idle cache's `template` up to the end of one of its answers (the last
        such mark), the model's own tokens replace that part, so the model sees what it
        generated. If the cache holds the start of the result, only the rest is prefilled;
        otherwise (an edited, regenerated or undone turn) it is prefilled whole. A session's
        request looks at its own cache only; others at every idle cache, newest first."""
        tokens, session = request.tokens, request.session
        if session is not None:
            candidates = [(session, self._idle[session])] if session in self._idle else []
        else:
            candidates = list(reversed(self._idle.items()))
        for key, held in candidates:
            i = max(i for i, (t, _) in enumerate(held.marks) if tokens[:t] == held.template[:t])
            t, a = held.marks[i]
            ids, n = held.actual[:a] + tokens[t:], len(held.fed)
            if request.reuse and n < len(ids) and ids[:n] == held.fed:
                return ids, key, n, held.marks[:i + 1]
            if session is not None:
                return ids, None, 0, held.marks[:i + 1]
        return tokens, None, 0, [(0, 0)]

    def take(self, request: Request) -> tuple[list[int], KVCache | None, int, Marks]:
        """plan's prompt with the cache that holds most of it (or None) and how many tokens:
        the idle cache plan chose, taken out of the idle ones, or one restored from blocks
        when they hold more. A session's old cache is dropped even when it cannot be continued."""
        ids, key, n, marks = self.plan(request)
        found = self.blocks.find(ids) if self.blocks is not None and request.reuse else None
        from_blocks = found is not None and found.tokens > n
        held = self._idle.pop(key) if key is not None and not from_blocks else None
        if request.session is not None:
            self._idle.pop(request.session, None)
        if from_blocks:
            return ids, self.blocks.restore(found, request.roll), found.tokens, marks
        return ids, held and held.cache, n, marks

    def hold(self, request: Request, cache: KVCache, actual: list[int], answer_text: str,
             marks: Marks, eos_id: int) -> None:
        """Keep a finished (or cancelled) request's cache: it holds `actual` (the prompt as fed
        and the answer's tokens) but its last token. A session's replaces the one it had."""
        template, kept = [], [(0, 0)]
        if request.echo is not None:
            eos = [eos_id] if actual[-1] == eos_id else []
            template = request.tokens + request.echo(answer_text) + eos
            kept = marks + [(len(template), len(actual))]
        key = id(cache) if request.session is None else request.session
        self._idle.pop(key, None)
        self._idle[key] = Held(cache, actual[:-1], actual, template, kept)
        while len(self._idle) > self.max_idle or (
                self.max_idle_bytes is not None and self.nbytes > self.max_idle_bytes):
            self._idle.popitem(last=False)

    @property
    def nbytes(self) -> int:
        """The bytes of the idle caches' K/V."""
        return sum(held.cache.nbytes for held in self._idle.values())
