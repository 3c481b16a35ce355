"""What a client hands the scheduler (a Request) and what it gets back (its Events)."""

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass

from ..errors import MistralError
from ..generate import _check_request
from ..model import Mistral
from ..sample import check_repetition_penalty, check_sampler
from ..structured import Constraint
from ..text import ToolCall

# Out of idle, admission waits for a burst of requests to finish arriving (Waiting.gather): while
# each comes within GATHER_GAP_S of the last, for GATHER_S at most.
GATHER_GAP_S, GATHER_S = 0.02, 0.25


MAX_LOGPROBS = 20  # the most likely tokens a request may ask for beside each chosen one (OpenAI's limit)


class QueueFull(MistralError):
    """Every row is busy and the waiting queue is full: try again later."""


@dataclass
class TokenLogprob:
    """A generated token's log-probability and the `top` (id, log-probability) most likely
    first, under the distribution it was picked from (Request.logprobs says which)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Event:
    """One generated token's text (answer or reasoning), or the end of a request (finish_reason set)."""

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
    reasoning: str = ""  # a reasoning model's [THINK]...[/THINK] text (TextStream's split), not in `text`
    stop_sequence: str | None = None  # on the last event, when one of the request's stop strings ended it
    logprob: TokenLogprob | None = None  # the token's, when the request asked for logprobs
    written_tokens: int = 0  # prompt tokens whose K/V blocks this request's prefill wrote to the prefix cache
    # speculation (the server's --prompt-lookup): drafts proposed and accepted so far, and the steps
    # (target forwards) this row took part in: forwards / generated_tokens below 1 is what it saved
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    forwards: int = 0


@dataclass(eq=False)
class Request:
    """What to generate. `tokens` is the whole prompt (a chat's every turn); `echo` turns an
    answer's text into the tokens a client sends back for it (chat: tokenizer.encode), so
    that the next turn can reuse this answer's cache. `sink` receives the events on the
    scheduler's thread (it must not block); by default they wait for events(). With
    `tool_calls` (the prompt offered tools), an answer that begins with [TOOL_CALLS] ends
    as parsed calls (TextStream). The requests of one `session` (a chat tab) share one idle
    cache, the last one's (see PrefixCache.plan); `reuse=False` prefills the whole prompt all
    the same (benchmarks). With `roll`, a windowless model's prompt and answer may pass the KV
    cache, which then rolls as a sliding window (the chat app's rule) instead of being refused.
    With a `constraint` (structured.py: JSON, a schema, function calls) every token it picks
    is one its grammar allows. With `logprobs` (0 to MAX_LOGPROBS) each token's Event carries
    its log-probability and the `logprobs` most likely tokens' (a TokenLogprob): the
    log_softmax of the logits the token was picked from, after every step that changed them:
    the grammar's mask, the repetition penalty, then (temperature > 0) the temperature,
    top_k and top_p; a token the mask, top_k or top_p removed has -inf and is never listed.
    Only the rows that ask compute them."""

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
    constraint: Constraint | None = None  # the answer must match its grammar (structured.py)
    top_k: int = 0  # sample among the k likeliest tokens only (0 = off)
    logprobs: int | None = None  # None: none; n: each token's and the n most likely (see above)
    speculate: bool = True  # False: this request never drafts, where the server speculates
    # an image model's images (Tokenizer.chat_inputs'), for the prompt's [IMG] tokens; such a
    # request neither reuses nor leaves K/V in the prefix cache (its [IMG] ids do not say which image)
    images: Sequence = ()

    def __post_init__(self):
        if self.images:
            self.reuse = False
        self.cancelled = False
        self.submitted = time.perf_counter()
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self.sink = self.sink or self._events.put

    def check(self, model: Mistral, context: int) -> None:
        """Raise MistralError unless `model` can answer this request within `context` tokens
        (prompt + max_tokens; a rolling request's is the model's own)."""
        tokens, vocab = self.tokens, model.args.vocab_size
        if not tokens or any(not isinstance(t, int) or not 0 <= t < vocab for t in tokens):
            raise MistralError(f"prompt must be a non-empty list of token ids in [0, {vocab})")
        _check_request(model, 0, tokens, self.max_tokens, self.stop)
        check_sampler(self.temperature, self.top_p, self.top_k)
        check_repetition_penalty(self.repetition_penalty)
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise MistralError(f"seed must be an integer, got {self.seed!r}")
        n = self.logprobs
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_LOGPROBS):
            raise MistralError(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {n!r}")
        if self.images and not model.args.vision:
            raise MistralError("images: this model takes text only (it has no vision tower)")
        context = model.args.max_position_embeddings if self.roll else context
        if len(tokens) + self.max_tokens > context:
            raise MistralError(f"prompt ({len(tokens)} tokens) + max_tokens ({self.max_tokens}) is past "
                               f"the context of {context} tokens")

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


class Waiting:
    """The requests submitted and not yet admitted, oldest first: at most `max_queue` (then
    put raises QueueFull). Any thread puts; the scheduler's thread takes."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self._deque: deque[Request] = deque()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._deque)

    def put(self, request: Request) -> None:
        with self._lock:
            if len(self._deque) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); try again later")
            self._deque.append(request)

    def first(self) -> Request:
        return self._deque[0]

    def take(self) -> Request:
        with self._lock:
            return self._deque.popleft()

    def drain(self) -> list[Request]:
        """Take every waiting request."""
        with self._lock:
            taken = list(self._deque)
            self._deque.clear()
        return taken

    def gather(self, max_batch: int) -> None:
        """Out of idle, let a burst of requests (clients that start together) finish arriving,
        so that they are prefilled side by side rather than the first one alone: clients that
        start together still arrive ms apart (one HTTP event loop parses them in turn). A lone
        request waits GATHER_GAP_S, 5% of a 128-token prompt's TTFT on this CPU."""
        deadline, n = time.perf_counter() + GATHER_S, len(self)
        while n < max_batch and time.perf_counter() < deadline:
            time.sleep(GATHER_GAP_S)
            if len(self) == n:
                return
            n = len(self)


def check_positive(**values: int | None) -> None:
    """MistralError naming the first of `values` (None: not given) that is not a positive integer."""
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise MistralError(f"{name} must be a positive integer, got {value!r}")
