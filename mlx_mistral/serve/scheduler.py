"""The scheduler: the one model in memory and its continuous batch, run on the model thread.

Who owns MLX: the Scheduler's ModelThread (thread.py), the only thread that runs the model.
Everything else (the HTTP server, the chat app) hands the Scheduler `Request`s and reads their
`Event`s, or runs a function on its thread with `call`; it knows nothing of HTTP or Gradio.
Between two decode steps the thread drops cancelled rows, admits waiting requests (max_batch,
the KV budget; a prefix the PrefixCache holds gives a prefill group of its own), prefills up to
`prefill_chunk` prompt tokens (a group's rows side by side), and runs one decode step for all
rows with one sync. Each row keeps its own positions and sampler, so a row's greedy output
never depends on its neighbours. A request's life, step by step: docs/design.md.
"""

import atexit
import gc
import time
from collections.abc import Callable, Hashable

import mlx.core as mx

from ..cache import check_kv_quantization
from ..layered_cache import KVCache, make_cache
from ..errors import MistralError
from ..generate import DEFAULT_PREFILL_CHUNK, TextStream
from ..loading import load
from ..memory import row_cache
from ..speculative import DEFAULT_DRAFT_TOKENS, DraftModel, Lookup, load_draft
from ..structured import Grammars
from .batch import Batch, Group, Row, prefill
from .blocks import BlockStore
from .disk_cache import model_identity
from .prefix_cache import Held, PrefixCache
from .request import Event, QueueFull, Request, TokenLogprob, Waiting, check_positive
from .thread import ModelThread

# KV cache slots for a model with full-attention layers (v0.2, v0.3), unless max_kv_size says otherwise.
DEFAULT_MAX_KV_SIZE = 8192
# The prefix cache's blocks in memory (BlockStore): 1 GiB is 8k tokens of Mistral 7B's float16 K/V,
# a 4k-token system prompt and tools twice over; they count in kv_budget and make room for rows.
DEFAULT_PROMPT_CACHE_BYTES = 1 << 30
DEFAULT_PROMPT_CACHE_DISK_BYTES = 10 * 10**9  # 10 GB, with a prompt_cache_dir

__all__ = ["DEFAULT_MAX_KV_SIZE", "Event", "QueueFull", "Request", "Scheduler"]


class Scheduler:
    """The one model in memory, the one thread that runs it, and its continuous batch.

    Every row gets a cache of `capacity` slots (the sliding window, or max_kv_size if smaller;
    with per-layer windows, the largest), quantized to `kv_bits` (8 or 4, kv_group_size) if
    given. Admission stops at `max_batch` rows or past `kv_budget` bytes; the next `max_queue`
    requests wait, in order (then QueueFull). Up to `max_idle` finished caches (`max_idle_bytes`)
    wait for requests that continue them, `prompt_cache_bytes` of K/V blocks for any that start
    the same, and `prompt_cache_disk_bytes` of them in `prompt_cache_dir` (prefix_cache.py).
    `gguf_bits`: see loading.load. Rows speculate (speculative/; a request may opt out) with
    prompt lookup (`lookup`) or a `draft_model` (a path or name with the same tokenizer,
    `draft_tokens` a step); each row's cache then has that many slots past its window, and the
    draft's caches count in kv_budget (the prefix cache holds the model's K/V only: the draft
    prefills each row's whole prompt as it joins the batch).
    """

    def __init__(self, model: str = "demo", max_kv_size: int | None = None, max_batch: int = 8,
                 max_queue: int = 32, kv_budget: int | None = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 max_idle: int = 4, max_idle_bytes: int | None = None, kv_bits: int | None = None,
                 kv_group_size: int = 64, prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES,
                 prompt_cache_dir: str | None = None,
                 prompt_cache_disk_bytes: int = DEFAULT_PROMPT_CACHE_DISK_BYTES, gguf_bits: int | None = None,
                 lookup: Lookup | None = None, draft_model: str | None = None,
                 draft_tokens: int = DEFAULT_DRAFT_TOKENS):
        check_positive(max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk,
                       kv_budget=kv_budget, prompt_cache_disk_bytes=prompt_cache_disk_bytes,
                       max_kv_size=max_kv_size)
        if not isinstance(prompt_cache_bytes, int) or prompt_cache_bytes < 0:
            raise MistralError(f"prompt_cache_bytes must be an integer >= 0, got {prompt_cache_bytes!r}")
        self.max_batch, self.kv_budget = max_batch, kv_budget
        if lookup and draft_model:
            raise MistralError("speculate with prompt lookup or with a draft model, not both")
        self.prefill_chunk, self.lookup = prefill_chunk, lookup
        self.headroom = lookup.draft_tokens if lookup else 0
        if draft_model:
            self.headroom = Lookup(draft_tokens).draft_tokens  # (checked as prompt lookup's)
        self.prefixes = PrefixCache(max_idle, max_idle_bytes)  # its blocks come once the model is loaded
        self._waiting = Waiting(max_queue)
        self._prefilling: list[Group] = []  # oldest first
        self._outbox: list[tuple[Request, Event]] = []  # sent once the step's bookkeeping is done
        self.counters = dict(steps=0, rows=0, max_rows=0, max_prefill_rows=0, generated_tokens=0,
                             prefilled_tokens=0, reused_tokens=0, stop=0, length=0, tool_calls=0,
                             cancelled=0, error=0, admitted=0, reused_requests=0, prompt_tokens=0,
                             drafted_tokens=0, accepted_tokens=0, verify_steps=0, drafting_rows=0,
                             images=0, image_tokens=0, vision_seconds=0.0)
        self.tokens_per_second = 0.0  # the last decode step's rows / its time
        self.model = self.tokenizer = self.draft = None
        self._batch = Batch()
        self._thread = ModelThread(self._tick, lambda: bool(self._batch.rows or self._prefilling or self._waiting))
        self.name = model
        self.model, self.tokenizer = self.call(load, model, gguf_bits=gguf_bits)
        atexit.register(self.close)
        self.grammars = Grammars(self.tokenizer, self.model.args.vocab_size)  # structured output's (built on first use)
        try:
            if draft_model:
                self.draft = self.call(load_draft, draft_model, self.tokenizer, gguf_bits=gguf_bits)
            self._configure(max_kv_size, kv_budget, kv_bits, kv_group_size)
            self._batch = self._new_batch()
            self.prefixes.blocks = self.call(
                BlockStore, self._new_cache, model_identity(model, self.model.args, self.model.dtype, gguf_bits),
                prompt_cache_bytes, prompt_cache_dir, prompt_cache_disk_bytes)
        except MistralError:
            self.close()
            raise

    def _configure(self, max_kv_size: int | None, kv_budget: int | None, kv_bits: int | None,
                   kv_group_size: int) -> None:
        """The loaded model's row caches: their slots, quantization and bytes (MistralError if bad)."""
        args = self.model.args
        check_kv_quantization(args, kv_bits, kv_group_size, self.model.dtype)
        self.kv_bits, self.kv_group_size, self.window = kv_bits, kv_group_size, args.sliding_window
        self.max_kv_size = DEFAULT_MAX_KV_SIZE if max_kv_size is None and self.window is None else max_kv_size
        self.capacity, self.context, self.row_bytes = row_cache(args, self.max_kv_size, self.model.dtype.size,
                                                                kv_bits, kv_group_size, self.headroom)
        self.draft_bytes = row_cache(self.draft.args, self.capacity, self.draft.dtype.size, None, 64,
                                     self.headroom)[2] if self.draft else 0  # a row's, while it runs
        if kv_budget is not None and kv_budget < self.row_bytes:
            raise MistralError(f"kv_budget of {kv_budget} bytes is less than one row's KV cache "
                               f"({self.row_bytes} bytes: {self.capacity} slots)")

    # --- any thread ---------------------------------------------------------------------

    def call(self, fn: Callable, *args, **kwargs):
        """Run fn on the model thread (between two steps) and return its result (or raise)."""
        return self._thread.call(fn, *args, **kwargs)

    def plan(self, request: Request) -> tuple[list[int], int]:
        """(the prompt as `request` would be fed, how many of its tokens an idle cache holds),
        changing nothing (see PrefixCache.plan)."""
        ids, _, held, _ = self.call(self.prefixes.plan, request)
        return ids, held

    def held(self, session: Hashable) -> Held | None:
        """The idle cache kept for `session` (a chat tab), if any."""
        return self.prefixes.get(session)

    def forget(self, session: Hashable) -> None:
        """Drop the idle cache kept for `session` (a closed chat tab)."""
        self.call(self.prefixes.forget, session)

    def submit(self, request: Request) -> Request:
        """Queue a request (MistralError if it is invalid, QueueFull if the queue is)."""
        if self.model is None:
            raise MistralError("the model is closed")
        request.check(self.model, self.context)
        self._waiting.put(request)
        self._thread.wake()
        return request

    def stats(self) -> dict:
        """A snapshot for /metrics and tests: counters, rows, queue depth, KV bytes held."""
        prefilling = self._n_prefilling()
        rows = len(self._batch.rows) + prefilling
        return dict(self.counters, waiting=len(self._waiting), running=len(self._batch.rows),
                    prefilling=prefilling, idle_caches=len(self.prefixes), kv_bytes=self._kv_bytes(rows),
                    tokens_per_second=self.tokens_per_second, **self.prefixes.blocks.stats())

    def close(self) -> None:
        """Fail what is pending and free the model (at exit at the latest); the thread stays, idle."""
        if self.model is not None:
            self.call(self._free)

    @property
    def max_idle(self) -> int:
        return self.prefixes.max_idle

    def _n_prefilling(self) -> int:
        return sum(len(group.rows) for group in self._prefilling)

    def _kv_bytes(self, rows: int) -> int:
        """The K/V bytes of `rows` rows (and their draft model's), the idle caches and the blocks."""
        rows_bytes = rows * (self.row_bytes + self.draft_bytes) + len(self.prefixes) * self.row_bytes
        return rows_bytes + self.prefixes.blocks.nbytes

    def _new_cache(self, roll: bool, rows: int = 1) -> KVCache:
        """An empty cache of `rows` rows (warning once if it rolls, when `roll`)."""
        return make_cache(self.model.args, self.max_kv_size, rows, self.model.dtype, self.kv_bits,
                          self.kv_group_size, warn_on_roll=roll, headroom=self.headroom)

    def _new_batch(self) -> Batch:
        return Batch(draft=DraftModel(self.draft, self.headroom, self.capacity, self.prefill_chunk)
                     if self.draft else None)

    # --- the model thread ---------------------------------------------------------------

    def _tick(self) -> None:
        if self.model is not None:
            try:
                self._step()
            except Exception as e:  # an MLX failure: every row gets it, the scheduler goes on
                self._fail_all(f"{type(e).__name__}: {e}")
        self._send()

    def _send(self) -> None:
        outbox, self._outbox = self._outbox, []
        for request, event in outbox:
            request.sink(event)

    def _step(self) -> None:
        gone = [b for b, row in enumerate(self._batch.rows) if row.request.cancelled]
        for b in gone:
            self._finish(self._batch.rows[b], "cancelled")
        if gone:
            self._leave(gone)
        for row in [row for group in self._prefilling for row in group.drop_cancelled()]:
            self._finish(row, "cancelled")
        self._prefilling = [group for group in self._prefilling if group.rows]
        if not self._batch.rows and not self._prefilling:
            mx.reset_peak_memory()  # the Events' peak_memory: since the scheduler was last idle
        self._admit()
        self._prefill()
        if self._batch.rows:
            self._decode()
        self._fit_blocks()

    def _fit_blocks(self) -> None:
        """The blocks captured this step go, least recently used first, while past the KV budget."""
        rows = len(self._batch.rows) + self._n_prefilling()
        while self.kv_budget is not None and self._kv_bytes(rows) > self.kv_budget and self.prefixes.blocks.evict():
            pass

    def _admit(self) -> None:
        if self._waiting and not self._batch.rows and not self._prefilling:
            self._waiting.gather(self.max_batch)
        fresh: list[Row] = []
        while self._waiting:
            rows = len(self._batch.rows) + self._n_prefilling() + len(fresh) + 1  # with this request's
            if rows > self.max_batch:
                break
            if self.kv_budget is not None and self._kv_bytes(rows) > self.kv_budget:
                if not self.prefixes.evict():
                    break
                continue
            first, prefilling = self._waiting.first(), [row.ids for g in self._prefilling for row in g.rows]
            if first.reuse and self.prefixes.blocks.wait_for(first.tokens, prefilling + [r.ids for r in fresh]):
                break  # the blocks of its prefix are on their way
            request = self._waiting.take()
            if request.cancelled:
                self._end(request, "cancelled")
                continue
            try:  # a request that fails before it is a row gets its error at once, the others go on
                ids, cache, held, marks = self.prefixes.take(request)
                text = TextStream(self.tokenizer, len(request.tokens), request.max_tokens, request.stop,
                                  request.submitted, request.tool_calls)
                row = Row(request, ids, held, text, marks, self.lookup, self.headroom if self.draft else 0)
                vision = time.perf_counter()
                row.encode(self.model)
                self.counters["vision_seconds"] += time.perf_counter() - vision
            except Exception as e:
                self._end(request, "error", f"{type(e).__name__}: {e}")
                continue
            counts = dict(admitted=1, reused_requests=held > 0, prompt_tokens=len(ids), reused_tokens=held)
            if row.images:
                counts.update(images=len(request.images), image_tokens=len(row.images[0]))
            for name, n in counts.items():
                self.counters[name] += n
            if cache is None:
                fresh.append(row)
            else:
                self._prefilling.append(Group([row], cache))
        if fresh:  # warn when it rolls
            self._prefilling.append(Group(fresh, self._new_cache(any(row.request.roll for row in fresh), len(fresh))))

    def _prefill(self) -> None:
        """Up to prefill_chunk prompt tokens, oldest group first (batch.prefill)."""
        for n, rows in prefill(self._prefilling, self._batch, self.model, self.prefill_chunk, self.capacity,
                               self.prefixes.blocks):
            self.counters["prefilled_tokens"] += n * rows
            self.counters["max_prefill_rows"] = max(self.counters["max_prefill_rows"], rows)
        self._prefilling = [group for group in self._prefilling if group.rows]

    def _decode(self) -> None:
        start = time.perf_counter()
        runs, logprobs = self._batch.step(self.model)
        n = len(runs)
        self.counters["steps"] += 1
        for name, value in self._batch.speculated.items():  # drafted and accepted tokens, verify steps, rows
            self.counters[name] += value
        self.counters["rows"] += n
        self.counters["max_rows"] = max(self.counters["max_rows"], n)
        self.tokens_per_second = sum(map(len, runs)) / (time.perf_counter() - start)
        done = []
        for b, (row, run) in enumerate(zip(self._batch.rows, runs)):
            for i, token in enumerate(run):
                if self._emit(row, token, self._batch.cache, logprobs[b][i] if b in logprobs else None):
                    done.append(b)
                    # the cache holds the run but its last token: take back what follows the end
                    self._batch.cache.rewind([len(run) - 1 - i if r == b else 0 for r in range(n)])
                    break
        if done:
            self._leave(done)

    def _emit(self, row: Row, token: int, cache: KVCache, logprob: TokenLogprob | None = None) -> bool:
        """Send the event of one generated token; True when it ends the request (a token its
        grammar cannot take ends it with an error, the token unsent)."""
        r, error = row.add(token, cache)
        if error:
            self._finish(row, "error", error)
            return True
        self.counters["generated_tokens"] += 1
        if r.finish_reason:
            self.counters[r.finish_reason] += 1
        self._outbox.append((row.request, row.event(r, token, self.capacity, logprob)))
        return r.finish_reason is not None

    def _finish(self, row: Row, reason: str, error: str | None = None) -> None:
        self._end(row.request, reason, error, len(row.answer), row.reused)

    def _end(self, request: Request, reason: str, error: str | None = None, generated: int = 0,
             reused: int = 0) -> None:
        """Send a request's last event, one that carries no token (cancelled, error)."""
        self.counters[reason] += 1
        self._outbox.append((request, Event("", len(request.tokens), generated, None, reason, error, reused)))

    def _leave(self, gone: list[int]) -> None:
        """Rows `gone` leave the batch; their blocks are kept, their caches become idle ones."""
        for b in gone:
            row = self._batch.rows[b]
            if row.images:  # its [IMG] ids do not say which image: nothing of it is kept
                continue
            fed = (row.ids + row.answer)[:self._batch.cache.offsets[b]]
            self.prefixes.blocks.capture(self._batch.cache, b, fed)
            if self.prefixes.max_idle and row.answer:
                self.prefixes.hold(row.request, self._batch.cache.rows([b]), row.ids + row.answer,
                                   "".join(row.pieces), row.marks, self.tokenizer.eos_id)
        self._batch.drop(gone)

    def _fail_all(self, message: str) -> None:
        for row in self._batch.rows + [row for group in self._prefilling for row in group.rows]:
            self._finish(row, "error", message)
        for request in self._waiting.drain():
            self._end(request, "error", message)
        self._batch, self._prefilling = self._new_batch(), []

    def _free(self) -> None:
        self._fail_all("the model was closed")
        self._batch = Batch()  # without the draft model
        self._send()
        self.prefixes.clear()
        self.model = self.tokenizer = self.draft = None
        gc.collect()
