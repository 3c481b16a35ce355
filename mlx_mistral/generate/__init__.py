"""Generation: chunked prefill, a pipelined decode loop, and a text stream with stats."""

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..layered_cache import KVCache, make_cache
from ..errors import MistralError
from ..model import Mistral
from ..sample import Sampler, check_repetition_penalty, make_sampler, positional, with_repetition_penalty
from ..speculative import DEFAULT_DRAFT_TOKENS, Draw, DraftRow, Lookup, PromptLookup, Width, verify
from ..structured import Constraint, Guide, masked
from ..text import StreamingDetokenizer, TextTokenizer, ToolCall
from ..vision import image_slots

DEFAULT_PREFILL_CHUNK = 512


@dataclass
class GenerationResponse:
    """One generated token (EOS included) and the text it completes, with running stats.

    The cache holds the prompt and every token of every response so far.
    """

    text: str  # new answer text since the previous response (may be empty)
    token: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    ttft: float  # seconds from the call to the first generated token
    peak_memory: int  # bytes, since the call started
    kv_cache_bytes: int  # allocated once, fixed
    kv_cache_tokens: int  # tokens the cache holds now
    finish_reason: str | None = None  # on the last response: "stop" (EOS or stop string), "length", "tool_calls"
    tool_calls: list[ToolCall] | None = None  # on the last response, when the answer is function calls
    reasoning: str = ""  # new reasoning text since the previous response ([THINK]...[/THINK], not in `text`)
    stop_sequence: str | None = None  # on the last response, when a stop string ended it: which one
    # with speculation: drafts proposed and accepted so far, target forwards (steps) so far, and
    # those of them that checked drafts (accepted_tokens / drafting_forwards: the mean accepted run)
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    forwards: int = 0
    drafting_forwards: int = 0
    # with images: how many, their [IMG] tokens, and the seconds the vision tower took on them
    images: int = 0
    image_tokens: int = 0
    vision_seconds: float = 0.0


def prefill(model: Mistral, tokens: Sequence[int], cache: KVCache, chunk: int,
            images: tuple[np.ndarray, mx.array] | None = None) -> mx.array:
    """Feed the prompt in chunks; return the logits [1, vocab] after its last token.

    All but the last token go through in chunks of at most `chunk` (and the cache's
    capacity), evaluating only the cache after each, so peak memory is bounded by the
    chunk, not by the prompt. The last token goes alone so that the vocabulary
    projection runs on one position. `images` (image_slots'): the features go in place of the
    prompt's [IMG] tokens, a chunk taking those of its own tokens.
    """
    if not isinstance(chunk, int) or chunk <= 0:
        raise MistralError(f"prefill_chunk must be a positive integer, got {chunk!r}")
    at, features = images or (np.zeros(0, dtype=np.int64), None)
    x = mx.array(tokens, dtype=mx.uint32)[None]
    chunk = min(chunk, cache.capacity)
    last = len(tokens) - 1
    for start, end in [*((s, min(s + chunk, last)) for s in range(0, last, chunk)), (last, last + 1)]:
        lo, hi = np.searchsorted(at, [start, end])  # this chunk's [IMG] tokens: features lo..hi
        here = (mx.array(at[lo:hi] - start), features[lo:hi]) if hi > lo else None
        logits = model(x[:, start:end], cache, here)
        if end <= last:
            mx.eval(cache.keys, cache.values)
    return logits[:, -1]


def generate_step(model: Mistral, prompt: Sequence[int], cache: KVCache, sampler: Sampler,
                  prefill_chunk: int = DEFAULT_PREFILL_CHUNK, repetition_penalty: float = 1.0,
                  repetition_context: int = 64, guide: Guide | None = None,
                  images: tuple[np.ndarray, mx.array] | None = None) -> Iterator[int]:
    """Yield generated token ids without end; the caller decides when to stop.

    Step n+1 is scheduled with async_eval before token n is handed out, so the
    device computes while Python works: one sync (`.item()`) per token. With a `guide`
    (structured output) token n must reach the grammar before step n+1's mask: the
    mask is filled while step n+1's forward runs instead.
    """
    sampler = with_repetition_penalty(positional(sampler), prompt, repetition_penalty, repetition_context)
    logits = prefill(model, prompt, cache, prefill_chunk, images)
    if guide is None:
        y = sampler(logits, [cache.offset])
        mx.async_eval(y)
        while True:
            logits = model(y[:, None], cache)[:, -1]
            next_y = sampler(logits, [cache.offset])  # the noise of a seeded sampler is keyed by position
            mx.async_eval(next_y)
            yield y.item()
            y = next_y
    while True:
        y = pick(sampler, logits, {0: guide} if guide.active else {}, [cache.offset])
        token = y.item()
        error = guide.advance(token)
        if error:
            raise MistralError(error)
        yield token
        logits = model(y[:, None], cache)[:, -1]


def speculative_step(model: Mistral, prompt: Sequence[int], cache: KVCache, sampler: Sampler,
                     proposer: PromptLookup | DraftRow, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                     repetition_penalty: float = 1.0, repetition_context: int = 64,
                     guide: Guide | None = None, max_tokens: int | None = None,
                     images: tuple[np.ndarray, mx.array] | None = None) -> Iterator[tuple[list[int], int]]:
    """generate_step with speculation: yield (each step's tokens, its drafts) without end; the
    `proposer` (extended with the prompt) drafts at most the cache's headroom a step, and never
    past `max_tokens` tokens in all.

    A step is one forward of the last token and the drafts (speculative.verify): it gives the
    accepted drafts and the token after them, each what `sampler` draws from its logits (a
    seeded sampler's noise is keyed by position: the same tokens as generate_step). The
    cache then holds every token yielded but the last (the caller rewinds what it drops).
    """
    logits = prefill(model, prompt, cache, prefill_chunk, images)
    first = pick(sampler, logits, {0: guide} if guide and guide.active else {}, [cache.offset]).item()
    history = list(prompt) + [first]
    proposer.extend([first])
    run, drafts, emitted, width = [first], 0, 1, Width()

    def draw(logits: mx.array, positions: Sequence[int]) -> tuple[mx.array, mx.array]:
        return sampler(logits, positions), logits

    draw = getattr(sampler, "pick", draw)  # make_sampler's: it gives the distribution too

    while True:
        for token in run:
            error = guide.advance(token) if guide else None
            if error:
                raise MistralError(error)
        yield run, drafts
        left = cache.headroom if max_tokens is None else min(cache.headroom, max_tokens - emitted - 1)
        start, proposed = time.perf_counter(), proposer.propose(left)
        drafts = proposed[:width.choose([len(proposed)], [proposer.pace.rate])]
        if proposed and not drafts:
            proposer.pace.withheld()
        v = verify(model, cache, [run[-1]], [drafts],
                   [Draw(draw, history[-repetition_context:], False, repetition_penalty, guide,
                         q=proposer.q, seed=getattr(draw, "seed", None))])[0]
        width.observe(1 + len(drafts), time.perf_counter() - start)
        proposer.update(v.drafted, v.accepted)
        run, drafts, emitted = v.tokens, v.drafted, emitted + len(v.tokens)
        history += run
        proposer.extend(run)


def pick(sampler: Sampler, logits: mx.array, guides: dict[int, Guide], positions: Sequence[int]) -> mx.array:
    """`sampler`'s tokens for `logits` [B, V] at `positions` (each row's next token's), rows
    `guides` among the tokens their grammar allows (the sampler runs once a step)."""
    if not guides:
        return sampler(logits, positions)
    _, allowed = masked(logits, guides)
    if len(guides) < logits.shape[0]:
        at = {b: i for i, b in enumerate(guides)}
        allowed = mx.concatenate([allowed[at[b]:at[b] + 1] if b in at else logits[b:b + 1].astype(mx.float32)
                                  for b in range(logits.shape[0])])
    return sampler(allowed, positions)


class TextStream:
    """One sequence's generated tokens -> text pieces, with its stop rules and stats.

    Stops at EOS, after `max_tokens`, or before the first of the `stop` strings: text
    that may begin a stop string is held back until it is known not to. An answer that
    begins with [TOOL_CALLS] is held back whole and ends as parsed `tool_calls` (or, if
    it does not parse, as plain text) when `tool_calls` is set (the prompt offered tools);
    otherwise it is plain text from the start. A reasoning model's [THINK]...[/THINK] is
    the responses' `reasoning`, never their `text` (stop strings look at the text only);
    the answer begins after it.
    """

    def __init__(self, tokenizer: TextTokenizer, prompt_tokens: int, max_tokens: int, stop: Sequence[str],
                 start: float, tool_calls: bool = False):
        self._tokenizer = tokenizer
        self._detokenizer = StreamingDetokenizer(tokenizer)
        self._reasoning = StreamingDetokenizer(tokenizer)
        self._think, self._thinking, self._answering = tokenizer.think_ids, False, False
        self._eos, self._max_tokens, self._stop = tokenizer.eos_id, max_tokens, stop
        self._held = ""  # decoded text not yet emitted: it may be the start of a stop string
        self._calls: list[int] | None = None  # the answer's ids, once it began with [TOOL_CALLS]
        self._parse_calls = tool_calls
        self.prompt_tokens, self.start, self.first, self.n = prompt_tokens, start, 0.0, 0
        self.finish: str | None = None
        self.stop_sequence: str | None = None  # the stop string that ended the answer

    def add(self, token: int, cache: KVCache) -> GenerationResponse:
        """The response for the next generated token; sets `finish` on the last one."""
        self.first = self.first or time.perf_counter()
        self.n += 1
        if self._think and self._calls is None and (self._thinking or token in self._think):
            return self._add_reasoning(token, cache)
        if not self._answering:
            self._answering = True
            if self._parse_calls and token == self._tokenizer.tool_calls_id:
                self._calls = []
        if self._calls is not None:
            return self._add_call(token, cache)
        if token == self._eos:
            return self._response(self._held + self._detokenizer.flush(), token, cache, "stop")
        self._held += self._detokenizer.add(token)
        hits = [(self._held.find(s), s) for s in self._stop]
        hit, stop = min(((i, s) for i, s in hits if i >= 0), key=lambda h: h[0], default=(-1, None))
        if stop is not None:  # what follows the stop string is dropped (the first listed wins a tie)
            self.stop_sequence = stop
            return self._response(self._held[:hit], token, cache, "stop")
        if self.n == self._max_tokens:
            return self._response(self._held + self._detokenizer.flush(), token, cache, "length")
        held, stop = self._held, self._stop
        keep = max((k for s in stop for k in range(len(s) - 1, 0, -1) if held.endswith(s[:k])), default=0)
        self._held = held[len(held) - keep:]
        return self._response(held[: len(held) - keep], token, cache)

    def _add_reasoning(self, token: int, cache: KVCache) -> GenerationResponse:
        """[THINK], [/THINK], or a token between them (EOS included: the reasoning ends unclosed)."""
        if token == self._think[0]:
            self._thinking, reasoning = True, ""
        elif token in (self._think[1], self._eos):
            self._thinking, reasoning = False, self._reasoning.flush()
        else:
            reasoning = self._reasoning.add(token)
        if token == self._eos or self.n == self._max_tokens:
            text = self._held + self._detokenizer.flush()
            return self._response(text, token, cache, "stop" if token == self._eos else "length",
                                  reasoning=reasoning + self._reasoning.flush())
        return self._response("", token, cache, reasoning=reasoning)

    def _add_call(self, token: int, cache: KVCache) -> GenerationResponse:
        self._calls.append(token)
        if token != self._eos and self.n < self._max_tokens:
            self._held += self._detokenizer.add(token)
            return self._response("", token, cache)
        calls = self._tokenizer.parse_tool_calls(self._calls)
        if calls:
            return self._response("", token, cache, "tool_calls", calls)
        text = self._held + ("" if token == self._eos else self._detokenizer.add(token)) + self._detokenizer.flush()
        return self._response(text, token, cache, "stop" if token == self._eos else "length")

    def _response(self, text: str, token: int, cache: KVCache, finish: str | None = None,
                  tool_calls: list[ToolCall] | None = None, reasoning: str = ""):
        self.finish = finish
        now, ttft, n = time.perf_counter(), self.first - self.start, self.n
        return GenerationResponse(
            text=text, token=token, prompt_tokens=self.prompt_tokens, prompt_tps=self.prompt_tokens / ttft,
            generation_tokens=n, generation_tps=(n - 1) / (now - self.first) if n > 1 else 0.0, ttft=ttft,
            peak_memory=mx.get_peak_memory(), kv_cache_bytes=cache.nbytes, kv_cache_tokens=cache.size,
            finish_reason=finish, tool_calls=tool_calls, reasoning=reasoning, stop_sequence=self.stop_sequence,
        )


def _prompt_ids(tokenizer: TextTokenizer, prompt: str | Sequence[int], what: str = "prompt") -> list[int]:
    ids = tokenizer.encode(prompt, bos=True) if isinstance(prompt, str) else list(prompt)
    if not ids or (isinstance(prompt, str) and not prompt.strip()):
        raise MistralError(f"{what} is empty")
    return ids


def _check_request(model: Mistral, past: int, ids: list[int], max_tokens: int, stop: Sequence[str],
                   what: str = "prompt") -> None:
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens <= 0:
        raise MistralError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if isinstance(stop, str) or any(not isinstance(s, str) or not s for s in stop):
        raise MistralError("stop strings must be a list of non-empty strings")
    context = model.args.max_position_embeddings
    if model.args.sliding_window is None and past + len(ids) > context:
        raise MistralError(f"{what} is {past + len(ids)} tokens, past the model's context of {context} tokens")


def stream_generate(model: Mistral, tokenizer: TextTokenizer, prompt: str | Sequence[int],
                    max_tokens: int = 256, sampler: Sampler | None = None,
                    repetition_penalty: float = 1.0, stop: Sequence[str] = (),
                    cache: KVCache | None = None, max_kv_size: int | None = None,
                    prefill_chunk: int = DEFAULT_PREFILL_CHUNK, kv_bits: int | None = None,
                    kv_group_size: int = 64, tool_calls: bool = False,
                    constraint: Constraint | None = None, lookup: Lookup | None = None,
                    draft_model: Mistral | None = None, draft_tokens: int = DEFAULT_DRAFT_TOKENS,
                    images: Sequence = ()) -> Iterator[GenerationResponse]:
    """Stream the answer to `prompt` (raw text, or token ids such as chat_tokens(...); with
    `images`, chat_inputs(...)'s tokens and images: an image model sees them in place of the
    prompt's [IMG] tokens).

    One response per generated token (see TextStream for the stop rules; `tool_calls`:
    the prompt offered tools, so an answer of function calls ends as parsed calls). With a
    `constraint` (structured.Grammars: JSON, a schema, function calls) every token is one its
    grammar allows (MistralError if a sampler picks another). Pass a `cache`
    to continue a conversation: the prompt is then the tokens that follow what it holds.
    Otherwise a new cache is made, with keys and values quantized to kv_bits (8 or 4) in
    groups of kv_group_size when kv_bits is given (see make_cache). With `lookup` (prompt
    lookup's settings) or a `draft_model` (speculative.load_draft: the same tokenizer, checked;
    `draft_tokens` a step at most) it speculates (speculative_step): the same tokens, fewer
    forwards; a cache passed in then needs that many drafts of headroom (make_cache(headroom=...)).
    """
    start = time.perf_counter()
    ids = _prompt_ids(tokenizer, prompt)
    _check_request(model, cache.offset if cache else 0, ids, max_tokens, stop)
    check_repetition_penalty(repetition_penalty)
    if lookup and draft_model:
        raise MistralError("speculate with prompt lookup or with a draft model, not both")
    if draft_model:
        Lookup(draft_tokens)  # draft_tokens is checked as prompt lookup's is
    headroom = lookup.draft_tokens if lookup else draft_tokens if draft_model else 0
    if cache is None:
        cache = make_cache(model.args, max_kv_size or len(ids) + max_tokens, dtype=model.dtype,
                           kv_bits=kv_bits, kv_group_size=kv_group_size, headroom=headroom)
    elif cache.headroom < headroom:
        raise MistralError(f"prompt lookup of {headroom} draft tokens needs a cache with that much headroom "
                           f"(make_cache(..., headroom={headroom})), this one has {cache.headroom}")
    mx.reset_peak_memory()
    text = TextStream(tokenizer, len(ids), max_tokens, stop, start, tool_calls)
    vision = time.perf_counter()
    slots = image_slots(model, ids, images) if images else None
    seen = (len(images), len(slots[0]) if slots else 0, time.perf_counter() - vision)

    def stamp(r: GenerationResponse) -> GenerationResponse:
        r.images, r.image_tokens, r.vision_seconds = seen
        return r

    guide = constraint.guide() if constraint else None
    sampler = positional(sampler or make_sampler())
    if not headroom:
        for token in generate_step(model, ids, cache, sampler, prefill_chunk, repetition_penalty,
                                   guide=guide, images=slots):
            yield stamp(text.add(token, cache))
            if text.finish:
                return
    if draft_model and cache.offset:  # the draft model's own cache starts empty
        raise MistralError("a draft model cannot continue a cache: give the whole conversation as the prompt")
    sampling = getattr(sampler, "pick", None)  # a draft model samples with it (rejection sampling)
    if sampling is not None and sampling.greedy:
        sampling = None
    proposer = PromptLookup(lookup, ids) if lookup else DraftRow(draft_model, headroom, ids, cache.window,
                                                                 prefill_chunk, sampling)
    drafted = accepted = forwards = drafting = 0
    steps = speculative_step(model, ids, cache, sampler, proposer, prefill_chunk, repetition_penalty,
                             guide=guide, max_tokens=max_tokens, images=slots)
    for run, drafts in steps:
        drafted, accepted, forwards = drafted + drafts, accepted + len(run) - 1, forwards + 1
        drafting += drafts > 0
        for i, token in enumerate(run):
            r = text.add(token, cache)
            r.drafted_tokens, r.accepted_tokens = drafted, accepted
            r.forwards, r.drafting_forwards = forwards, drafting
            yield stamp(r)
            if text.finish:
                cache.rewind([len(run) - 1 - i])  # it holds the run but its last token: as if it ended here
                return


def generate(model: Mistral, tokenizer: TextTokenizer, prompt: str | Sequence[int], **kwargs) -> str:
    """The whole answer as one string (see stream_generate for the arguments)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))


def batch_stream_generate(model: Mistral, tokenizer: TextTokenizer, prompts: Sequence[str | Sequence[int]],
                          max_tokens: int | Sequence[int] = 256, sampler: Sampler | None = None,
                          stop: Sequence[str] = (), max_kv_size: int | None = None,
                          prefill_chunk: int = DEFAULT_PREFILL_CHUNK, kv_bits: int | None = None,
                          kv_group_size: int = 64, tool_calls: bool = False,
                          constraint: Constraint | Sequence[Constraint | None] | None = None
                          ) -> Iterator[tuple[int, GenerationResponse]]:
    """Answer many prompts at once, yielding (prompt index, response) as tokens come.

    Each prompt is prefilled into its own cache row, then all rows decode together as one
    batch: rows keep their own positions (no padding), each stops on its own, and finished
    rows leave the batch. With greedy sampling every row equals its single-prompt answer.
    kv_bits, kv_group_size and tool_calls are as in stream_generate; `constraint` too, one
    for every prompt or a list with one (or None) per prompt.
    """
    start = time.perf_counter()
    if isinstance(prompts, str) or not prompts:
        raise MistralError("prompts must be a non-empty list")
    limits = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
    if len(limits) != len(prompts):
        raise MistralError(f"max_tokens has {len(limits)} entries for {len(prompts)} prompts")
    ids = [_prompt_ids(tokenizer, p, f"prompt {i}") for i, p in enumerate(prompts)]
    for i, (row, limit) in enumerate(zip(ids, limits)):
        _check_request(model, 0, row, limit, stop, f"prompt {i}")
    constraints = list(constraint) if isinstance(constraint, Sequence) else [constraint] * len(prompts)
    if len(constraints) != len(prompts):
        raise MistralError(f"constraint has {len(constraints)} entries for {len(prompts)} prompts")
    guides = [c.guide() if c else None for c in constraints]
    sampler = positional(sampler or make_sampler())
    capacity = max_kv_size or max(len(row) + limit for row, limit in zip(ids, limits))
    mx.reset_peak_memory()
    caches, first = [], []
    streams = [TextStream(tokenizer, len(row), limit, stop, start, tool_calls) for row, limit in zip(ids, limits)]
    for row in ids:  # prefill row by row: peak memory stays that of one prompt chunk
        caches.append(make_cache(model.args, capacity, dtype=model.dtype, kv_bits=kv_bits,
                                 kv_group_size=kv_group_size))
        guide = guides[len(first)]
        logits = prefill(model, row, caches[-1], prefill_chunk)
        first.append(pick(sampler, logits, _active({0: guide}), caches[-1].offsets))
        mx.async_eval(first[-1])
    cache, y = type(caches[0]).stack(caches), mx.concatenate(first)  # a RollingKVCache or LayeredKVCache
    del caches, first
    rows = list(range(len(prompts)))  # prompt index of each batch row
    guided = any(guides)  # then the masks wait for each step's tokens: no step ahead
    while rows:
        logits = model(y[:, None], cache)[:, -1]
        next_y = None if guided else sampler(logits, cache.offsets)
        mx.async_eval(logits if guided else next_y)
        keep = []
        for b, token in enumerate(y.tolist()):  # one sync per step for the whole batch
            error = guides[rows[b]].advance(token) if guides[rows[b]] else None
            if error:
                raise MistralError(f"prompt {rows[b]}: {error}")
            yield rows[b], streams[rows[b]].add(token, cache)
            if not streams[rows[b]].finish:
                keep.append(b)
        if guided:
            next_y = pick(sampler, logits, _active({b: guides[i] for b, i in enumerate(rows)}), cache.offsets)
        if 0 < len(keep) < len(rows):  # finished rows leave the batch
            cache.keep(keep)
            next_y = next_y[mx.array(keep, dtype=mx.int32)]
        rows = [rows[b] for b in keep]
        y = next_y


def _active(guides: dict[int, Guide | None]) -> dict[int, Guide]:
    return {b: guide for b, guide in guides.items() if guide is not None and guide.active}


def batch_generate(model: Mistral, tokenizer: TextTokenizer, prompts: Sequence[str | Sequence[int]],
                   **kwargs) -> list[tuple[str, GenerationResponse]]:
    """(text, last response with its stats) for each prompt, in input order."""
    texts: dict[int, list[str]] = {i: [] for i in range(len(prompts))}
    last: dict[int, GenerationResponse] = {}
    for i, r in batch_stream_generate(model, tokenizer, prompts, **kwargs):
        texts[i].append(r.text)
        last[i] = r
    return [("".join(texts[i]), last[i]) for i in range(len(prompts))]
