"""The scheduler: the one thread that owns the model and MLX, and its continuous batch.

Who owns MLX: this module. Everything else (the HTTP server, the chat app) hands the
Scheduler `Request`s and reads their `Event`s, or runs a function on its thread with `call`.
It knows nothing of HTTP or Gradio.

Between two decode steps the thread (1) drops rows whose client cancelled, (2) admits
waiting requests while `max_batch` and the KV budget allow: the fresh ones admitted together
form one prefill group with one cache of that many rows, a request that extends an idle
cache (the next turn of a chat) a group of its own with that cache, (3) prefills at most
`prefill_chunk` prompt tokens, a group's rows side by side (one [rows, n] forward, which
BLAS runs far faster than n-token products one row at a time), so running streams keep
flowing while a long prompt goes in; a row whose prompt is in but its last token joins
the batch with that token, (4) runs one decode step for all rows with one sync (for a row
that just joined, it gives the first answer token). Each row keeps its own positions (a
ragged batch) and its own sampler, so greedy output of a row never depends on its neighbours.
"""

import atexit
import gc
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass

import mlx.core as mx

from .cache import RollingKVCache, check_kv_quantization
from .errors import MistralError
from .generate import DEFAULT_PREFILL_CHUNK, TextStream, _check_request
from .loading import load
from .memory import kv_bytes_per_token
from .sample import check_repetition_penalty, check_sampler, make_sampler, with_repetition_penalty
from .tokenizer import ToolCall

# KV cache slots for a model without a sliding window (v0.2, v0.3), unless max_kv_size says otherwise.
DEFAULT_MAX_KV_SIZE = 8192
# Out of idle, admission waits for a burst of requests to finish arriving (see _gather): while
# each comes within GATHER_GAP_S of the last, for GATHER_S at most.
GATHER_GAP_S, GATHER_S = 0.02, 0.25


class QueueFull(MistralError):
    """Every row is busy and the waiting queue is full: try again later."""


@dataclass
class Event:
    """One generated token's text, or the end of a request (finish_reason set)."""

    text: str
    prompt_tokens: int
    generated_tokens: int
    token: int | None = None
    # on the last event: "stop" (EOS or stop string), "length", "tool_calls", "cancelled" or "error"
    finish_reason: str | None = None
    error: str | None = None
    reused_tokens: int = 0  # prompt tokens found in an idle cache: not prefilled again
    tool_calls: list[ToolCall] | None = None  # on the last event when the answer is function calls
    # the row's stats on each token's event (TextStream's, and what the row's own cache holds)
    prefilled_tokens: int = 0  # prompt tokens fed for this request (the conversation, less reused_tokens)
    ttft: float = 0.0  # seconds from submit() to the first token
    generation_tps: float = 0.0
    peak_memory: int = 0  # bytes, since the scheduler was last idle
    kv_tokens: int = 0  # tokens the row's cache holds (at most `capacity`)


@dataclass(eq=False)
class Request:
    """What to generate. `tokens` is the whole prompt (a chat's every turn); `echo` turns an
    answer's text into the tokens a client sends back for it (chat: tokenizer.encode), so
    that the next turn can reuse this answer's cache. `sink` receives the events on the
    scheduler's thread (it must not block); by default they wait for events(). With
    `tool_calls` (the prompt offered tools), an answer that begins with [TOOL_CALLS] ends
    as parsed calls (TextStream). The requests of one `session` (a chat tab) share one idle
    cache, the last one's (see _plan); `reuse=False` prefills the whole prompt all the same
    (benchmarks). With `roll`, a windowless model's prompt and answer may pass the KV cache,
    which then rolls as a sliding window (the chat app's rule) instead of being refused."""

    tokens: list[int]
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    echo: Callable[[str], list[int]] | None = None
    sink: Callable[[Event], None] | None = None
    tool_calls: bool = False
    repetition_penalty: float = 1.0  # over the row's last 64 tokens, prompt included (1 = off)
    session: Hashable | None = None
    reuse: bool = True
    roll: bool = False

    def __post_init__(self):
        self.cancelled = False
        self.submitted = time.perf_counter()
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self.sink = self.sink or self._events.put

    def cancel(self) -> None:
        """Stop generating (the client left): the row leaves the batch before the next step."""
        self.cancelled = True

    def events(self) -> Iterator[Event]:
        """The events of a request submitted without a sink, up to the last one."""
        while True:
            event = self._events.get()
            yield event
            if event.finish_reason:
                return


class _Row:
    """A request being served: its prompt (`ids`, of which `feed` is not in the cache yet)
    and its stream."""

    def __init__(self, request: Request, ids: list[int], held: int, text: TextStream,
                 marks: list[tuple[int, int]]):
        self.request, self.ids, self.text, self.marks = request, ids, text, marks  # marks: see _Held
        self.feed = ids[held:]  # never empty: the last prompt token is fed by a decode step
        self.reused = held  # prompt tokens already in the cache
        self.answer: list[int] = []
        self.pieces: list[str] = []
        sampler = make_sampler(request.temperature, request.top_p, seed=request.seed)
        self.sampler = with_repetition_penalty(sampler, ids, request.repetition_penalty)


@dataclass
class _Group:
    """Rows prefilled side by side: one cache, row b of it is rows[b]'s, all at one position
    (fresh rows start at 0 and are all fed the same number of tokens at every step)."""

    rows: list[_Row]
    cache: RollingKVCache


@dataclass
class _Held:
    """An idle cache: `fed` is what it holds, `actual` the conversation with the model's own
    last token, `template` the same as a client writes it back (empty: no echo). At each
    (t, a) of `marks`, the end of one of the conversation's answers, template[:t] and
    actual[:a] are the same conversation; marks[0] is (0, 0)."""

    cache: RollingKVCache
    fed: list[int]
    actual: list[int]
    template: list[int]
    marks: list[tuple[int, int]]


class Scheduler:
    """The one model in memory, the one thread that runs it, and its continuous batch.

    The thread is a daemon that lives as long as the process, and the model is freed
    before the process exits: with OpenBLAS preloaded, a thread that ran MLX and then
    ended, or was joined at exit, or a model still alive at exit, sometimes made the
    process abort ("terminate called without an active exception") or hang at exit
    (seen with MLX 0.32.4 on Linux; ml-explore/mlx#3126 is alike). MLX streams are
    thread-local (MLX >= 0.31.2 on Metal): every MLX call runs here.

    Every row gets a cache of `capacity` slots (the sliding window, or max_kv_size if
    smaller), quantized to `kv_bits` (8 or 4, in groups of kv_group_size) if given;
    admission stops at `max_batch` rows or when one more row would pass `kv_budget` bytes;
    the next `max_queue` requests wait, in order; past them submit() raises QueueFull. Up to
    `max_idle` finished caches (and `max_idle_bytes`) are kept, least recently used out
    first, for requests that continue them.
    """

    def __init__(self, model: str = "demo", max_kv_size: int | None = None, max_batch: int = 8,
                 max_queue: int = 32, kv_budget: int | None = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 max_idle: int = 4, max_idle_bytes: int | None = None, kv_bits: int | None = None,
                 kv_group_size: int = 64):
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue),
                            ("prefill_chunk", prefill_chunk)):
            if not isinstance(value, int) or value <= 0:
                raise MistralError(f"{name} must be a positive integer, got {value!r}")
        for name, value in (("max_kv_size", max_kv_size), ("kv_budget", kv_budget)):
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise MistralError(f"{name} must be a positive integer, got {value!r}")
        self.max_batch, self.max_queue, self.kv_budget = max_batch, max_queue, kv_budget
        self.prefill_chunk, self.max_idle, self.max_idle_bytes = prefill_chunk, max_idle, max_idle_bytes
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque[Request] = deque()
        self._waiting_lock = threading.Lock()
        self._prefilling: list[_Group] = []  # oldest first
        self._rows: list[_Row] = []  # the decode batch, in the order of the cache's rows
        self._cache: RollingKVCache | None = None
        self._y: mx.array | None = None  # each row's last token, not yet fed
        self._idle: OrderedDict[Hashable, _Held] = OrderedDict()  # by session or id(cache), LRU first
        self._outbox: list[tuple[Request, Event]] = []  # sent once the step's bookkeeping is done
        self.counters = dict(steps=0, rows=0, max_rows=0, max_prefill_rows=0, generated_tokens=0,
                             prefilled_tokens=0, reused_tokens=0, stop=0, length=0, tool_calls=0,
                             cancelled=0, error=0)
        self.tokens_per_second = 0.0  # the last decode step's rows / its time
        self.model = self.tokenizer = None
        threading.Thread(target=self._serve, name="mlx", daemon=True).start()
        self.name = model
        self.model, self.tokenizer = self.call(load, model)
        atexit.register(self.close)
        args = self.model.args
        try:
            check_kv_quantization(args, kv_bits, kv_group_size, self.model.dtype)
        except MistralError:
            self.close()
            raise
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size
        self.window = args.sliding_window
        if max_kv_size is None and self.window is None:
            max_kv_size = DEFAULT_MAX_KV_SIZE
        self.max_kv_size = max_kv_size
        self.capacity = min(n for n in (self.window, max_kv_size) if n)  # KV cache slots per row
        # prompt + answer: a windowless model stops at its cache, a windowed one slides on
        self.context = self.capacity if self.window is None else args.max_position_embeddings
        self.row_bytes = self.capacity * kv_bytes_per_token(args, self.model.dtype.size, bits=kv_bits,
                                                            group=kv_group_size)  # K and V of one row
        if kv_budget is not None and kv_budget < self.row_bytes:
            self.close()
            raise MistralError(f"kv_budget of {kv_budget} bytes is less than one row's KV cache "
                               f"({self.row_bytes} bytes: {self.capacity} slots)")

    # --- any thread ---------------------------------------------------------------------

    def call(self, fn: Callable, *args, **kwargs):
        """Run fn on the model thread (between two steps) and return its result (or raise)."""
        future: Future = Future()
        self._jobs.put((future, fn, args, kwargs))
        try:
            return future.result()
        except KeyboardInterrupt:  # Ctrl-C: let the job end and drop its result (a model?) on this thread
            wait([future])
            del future
            self.call(gc.collect)
            raise

    def plan(self, request: Request) -> tuple[list[int], int]:
        """(the prompt as `request` would be fed, how many of its tokens an idle cache holds),
        changing nothing (see _plan)."""
        ids, _, held, _ = self.call(self._plan, request)
        return ids, held

    def held(self, session: Hashable) -> "_Held | None":
        """The idle cache kept for `session` (a chat tab), if any."""
        return self._idle.get(session)

    def forget(self, session: Hashable) -> None:
        """Drop the idle cache kept for `session` (a closed chat tab)."""
        self.call(lambda: self._idle.pop(session, None) and None)  # no result: the thread keeps the last one

    def submit(self, request: Request) -> Request:
        """Queue a request (MistralError if it is invalid, QueueFull if the queue is)."""
        if self.model is None:
            raise MistralError("the model is closed")
        tokens, vocab = request.tokens, self.model.args.vocab_size
        if not tokens or any(not isinstance(t, int) or not 0 <= t < vocab for t in tokens):
            raise MistralError(f"prompt must be a non-empty list of token ids in [0, {vocab})")
        _check_request(self.model, 0, tokens, request.max_tokens, request.stop)
        check_sampler(request.temperature, request.top_p)
        check_repetition_penalty(request.repetition_penalty)
        if request.seed is not None and (not isinstance(request.seed, int) or isinstance(request.seed, bool)):
            raise MistralError(f"seed must be an integer, got {request.seed!r}")
        context = self.model.args.max_position_embeddings if request.roll else self.context
        if len(tokens) + request.max_tokens > context:
            raise MistralError(f"prompt ({len(tokens)} tokens) + max_tokens ({request.max_tokens}) is past "
                               f"the context of {context} tokens")
        with self._waiting_lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); try again later")
            self._waiting.append(request)
        self._jobs.put(None)  # wake the thread
        return request

    def stats(self) -> dict:
        """A snapshot for /metrics and tests: counters, rows, queue depth, KV bytes held."""
        prefilling = self._n_prefilling()
        rows = len(self._rows) + prefilling
        return dict(self.counters, waiting=len(self._waiting), running=len(self._rows),
                    prefilling=prefilling, idle_caches=len(self._idle),
                    kv_bytes=(rows + len(self._idle)) * self.row_bytes,
                    tokens_per_second=self.tokens_per_second)

    def close(self) -> None:
        """Fail what is pending and free the model (at exit at the latest); the thread stays, idle."""
        if self.model is not None:
            self.call(self._free)

    def _n_prefilling(self) -> int:
        return sum(len(group.rows) for group in self._prefilling)

    # --- the model thread ---------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            busy = self._rows or self._prefilling or self._waiting
            try:
                job = self._jobs.get(block=not busy)
            except queue.Empty:
                job = None
            if job:
                future, fn, args, kwargs = job
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as e:  # handed to the caller
                    future.set_exception(e)
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
        gone = [b for b, row in enumerate(self._rows) if row.request.cancelled]
        for b in gone:
            self._finish(self._rows[b], "cancelled")
        if gone:
            self._leave(gone)
        for group in self._prefilling:
            gone = [row for row in group.rows if row.request.cancelled]
            for row in gone:
                self._finish(row, "cancelled")
            if gone:
                self._keep(group, [b for b, row in enumerate(group.rows) if not row.request.cancelled])
        self._prefilling = [group for group in self._prefilling if group.rows]
        if not self._rows and not self._prefilling:
            mx.reset_peak_memory()  # the Events' peak_memory: since the scheduler was last idle
        self._admit()
        self._prefill()
        if self._rows:
            self._decode()

    def _gather(self) -> None:
        """Out of idle, let a burst of requests (clients that start together) finish arriving,
        so that they are prefilled side by side rather than the first one alone: clients that
        start together still arrive ms apart (one HTTP event loop parses them in turn). A lone
        request waits GATHER_GAP_S, 5% of a 128-token prompt's TTFT on this CPU."""
        deadline, n = time.perf_counter() + GATHER_S, len(self._waiting)
        while n < self.max_batch and time.perf_counter() < deadline:
            time.sleep(GATHER_GAP_S)
            if len(self._waiting) == n:
                return
            n = len(self._waiting)

    def _admit(self) -> None:
        if self._waiting and not self._rows and not self._prefilling:
            self._gather()
        fresh: list[_Row] = []
        while self._waiting:
            rows = len(self._rows) + self._n_prefilling() + len(fresh) + 1  # with this request's
            if rows > self.max_batch:
                break
            if self.kv_budget is not None and (rows + len(self._idle)) * self.row_bytes > self.kv_budget:
                if not self._idle:
                    break
                self._idle.popitem(last=False)
                continue
            with self._waiting_lock:
                request = self._waiting.popleft()
            if request.cancelled:
                self._end(request, "cancelled")
                continue
            ids, cache, held, marks = self._reuse(request)
            text = TextStream(self.tokenizer, len(request.tokens), request.max_tokens, request.stop,
                              request.submitted, request.tool_calls)
            row = _Row(request, ids, held, text, marks)
            self.counters["reused_tokens"] += held
            if cache is None:
                fresh.append(row)
            else:
                self._prefilling.append(_Group([row], cache))
        if fresh:
            roll = any(row.request.roll for row in fresh) and self.window != self.capacity  # warn when it rolls
            cache = RollingKVCache(self.model.args, self.capacity, len(fresh), dtype=self.model.dtype,
                                   warn_on_roll=roll, bits=self.kv_bits, group_size=self.kv_group_size)
            self._prefilling.append(_Group(fresh, cache))

    def _reuse(self, request: Request) -> tuple[list[int], RollingKVCache | None, int, list[tuple[int, int]]]:
        """(the prompt to feed, an idle cache it extends or None, the tokens that cache holds,
        the marks of the prompt's answers): _plan's choice, that cache taken out of the idle
        ones, and a session's old cache dropped even when it cannot be continued."""
        ids, key, n, marks = self._plan(request)
        held = self._idle.pop(key) if key is not None else None
        if request.session is not None:
            self._idle.pop(request.session, None)
        return ids, held and held.cache, n, marks

    def _plan(self, request: Request) -> tuple[list[int], Hashable | None, int, list[tuple[int, int]]]:
        """(the prompt to feed, the key of the idle cache it extends or None, the tokens that
        cache holds, the marks of the prompt's answers).

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

    def _prefill(self) -> None:
        """Up to prefill_chunk prompt tokens, oldest group first. Every row of a group gets
        the same n tokens: at most the fewest any row has left before its last token, so
        the rows stay at one position. Rows down to their last token join the batch."""
        budget = self.prefill_chunk
        for group in self._prefilling:
            self._join(group)
            if not group.rows or budget <= 0:
                continue
            rows = group.rows
            n = min(min(len(row.feed) for row in rows) - 1, max(1, budget // len(rows)), self.capacity)
            self.model(mx.array([row.feed[:n] for row in rows], dtype=mx.uint32), group.cache)
            mx.eval(group.cache.keys, group.cache.values)
            for row in rows:
                row.feed = row.feed[n:]
            budget -= n * len(rows)
            self.counters["prefilled_tokens"] += n * len(rows)
            self.counters["max_prefill_rows"] = max(self.counters["max_prefill_rows"], len(rows))
            self._join(group)
        self._prefilling = [group for group in self._prefilling if group.rows]

    def _join(self, group: _Group) -> None:
        """The rows of `group` with only their last prompt token left join the decode batch,
        that token as the next one to feed."""
        ready = [b for b, row in enumerate(group.rows) if len(row.feed) == 1]
        if not ready:
            return
        rows = [group.rows[b] for b in ready]
        rest = [b for b in range(len(group.rows)) if b not in ready]
        cache = group.cache.rows(ready) if rest else group.cache  # all ready: the group's cache as is
        self._keep(group, rest)
        if self._cache is None:
            self._cache = cache
        else:
            self._cache.extend(cache)
        y = mx.array([row.feed[0] for row in rows], dtype=mx.uint32)
        self._y = y if self._y is None else mx.concatenate([self._y, y.astype(self._y.dtype)])
        self._rows.extend(rows)

    @staticmethod
    def _keep(group: _Group, keep: list[int]) -> None:
        """Only rows `keep` of `group` go on being prefilled (none: the group is done)."""
        if keep:
            group.cache.keep(keep)
        group.rows = [group.rows[b] for b in keep]

    def _decode(self) -> None:
        start = time.perf_counter()
        logits = self.model(self._y[:, None], self._cache)[:, -1]
        if all(row.request.temperature == 0 and row.request.repetition_penalty == 1.0 for row in self._rows):
            y = mx.argmax(logits, axis=-1)
        else:  # each row its own sampler (its own seeded random stream, its own recent tokens)
            y = mx.concatenate([row.sampler(logits[b:b + 1]) for b, row in enumerate(self._rows)])
        tokens = y.tolist()  # the one sync of the step
        n = len(self._rows)
        self.counters["steps"] += 1
        self.counters["rows"] += n
        self.counters["max_rows"] = max(self.counters["max_rows"], n)
        self.tokens_per_second = n / (time.perf_counter() - start)
        self._y = y
        done = [b for b, (row, token) in enumerate(zip(self._rows, tokens))
                if self._emit(row, token, self._cache)]
        if done:
            self._leave(done)

    def _emit(self, row: _Row, token: int, cache: RollingKVCache) -> bool:
        """Send the event of one generated token; True when it ends the request."""
        r = row.text.add(token, cache)
        row.answer.append(token)
        row.pieces.append(r.text)
        self.counters["generated_tokens"] += 1
        if r.finish_reason:
            self.counters[r.finish_reason] += 1
        n = r.generation_tokens
        self._outbox.append((row.request, Event(
            r.text, len(row.request.tokens), n, token, r.finish_reason, reused_tokens=row.reused,
            tool_calls=r.tool_calls, prefilled_tokens=len(row.ids) - row.reused, ttft=r.ttft,
            generation_tps=r.generation_tps, peak_memory=r.peak_memory,
            kv_tokens=min(len(row.ids) + n - 1, self.capacity))))  # all but the newest token are fed
        return r.finish_reason is not None

    def _finish(self, row: _Row, reason: str, error: str | None = None) -> None:
        self._end(row.request, reason, error, len(row.answer), row.reused)

    def _end(self, request: Request, reason: str, error: str | None = None, generated: int = 0,
             reused: int = 0) -> None:
        """Send a request's last event, one that carries no token (cancelled, error)."""
        self.counters[reason] += 1
        self._outbox.append((request, Event("", len(request.tokens), generated, None, reason, error, reused)))

    def _leave(self, gone: list[int]) -> None:
        """Rows `gone` leave the batch; their caches become idle ones."""
        for b in gone:
            if self.max_idle and self._rows[b].answer:
                self._hold(self._rows[b], self._cache.rows([b]))
        keep = [b for b in range(len(self._rows)) if b not in gone]
        if keep:
            self._cache.keep(keep)
            self._y = self._y[mx.array(keep, dtype=mx.int32)]
        else:
            self._cache = self._y = None
        self._rows = [self._rows[b] for b in keep]

    def _hold(self, row: _Row, cache: RollingKVCache) -> None:
        """Keep a finished (or cancelled) row's cache: it holds the prompt and all but the
        last token of the answer. A session's replaces the one it had."""
        request, actual = row.request, row.ids + row.answer
        template, marks = [], [(0, 0)]
        if request.echo is not None:
            eos = [self.tokenizer.eos_id] if actual[-1] == self.tokenizer.eos_id else []
            template = request.tokens + request.echo("".join(row.pieces)) + eos
            marks = row.marks + [(len(template), len(actual))]
        key = id(cache) if request.session is None else request.session
        self._idle.pop(key, None)
        self._idle[key] = _Held(cache, actual[:-1], actual, template, marks)
        while len(self._idle) > self.max_idle or (
                self.max_idle_bytes is not None and len(self._idle) * self.row_bytes > self.max_idle_bytes):
            self._idle.popitem(last=False)

    def _fail_all(self, message: str) -> None:
        for row in self._rows + [row for group in self._prefilling for row in group.rows]:
            self._finish(row, "error", message)
        with self._waiting_lock:
            waiting, self._waiting = list(self._waiting), deque()
        for request in waiting:
            self._end(request, "error", message)
        self._rows, self._prefilling, self._cache, self._y = [], [], None, None

    def _free(self) -> None:
        self._fail_all("the model was closed")
        self._send()
        self._idle.clear()
        self.model = self.tokenizer = None
        gc.collect()
