"""Generation: chunked prefill, a pipelined decode loop, and a text stream with stats."""

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx

from ..cache import RollingKVCache, make_cache
from ..errors import MistralError
from ..model import Mistral
from ..sample import Sampler, check_repetition_penalty, make_sampler, penalize_repetition
from ..tokenizer import StreamingDetokenizer, Tokenizer

DEFAULT_PREFILL_CHUNK = 512


@dataclass
class GenerationResponse:
    """One generated token (EOS included) and the text it completes, with running stats.

    The cache holds the prompt and every token of every response so far.
    """

    text: str  # new text since the previous response (may be empty)
    token: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    ttft: float  # seconds from the call to the first generated token
    peak_memory: int  # bytes, since the call started
    kv_cache_bytes: int  # allocated once, fixed
    kv_cache_tokens: int  # tokens the cache holds now
    finish_reason: str | None = None  # on the last response: "stop" (EOS or stop string) or "length"


def prefill(model: Mistral, tokens: Sequence[int], cache: RollingKVCache, chunk: int) -> mx.array:
    """Feed the prompt in chunks; return the logits [1, vocab] after its last token.

    All but the last token go through in chunks of at most `chunk` (and the cache's
    capacity), evaluating only the cache after each, so peak memory is bounded by the
    chunk, not by the prompt. The last token goes alone so that the vocabulary
    projection runs on one position.
    """
    if not isinstance(chunk, int) or chunk <= 0:
        raise MistralError(f"prefill_chunk must be a positive integer, got {chunk!r}")
    x = mx.array(tokens, dtype=mx.uint32)[None]
    chunk = min(chunk, cache.capacity)
    for start in range(0, len(tokens) - 1, chunk):
        model(x[:, start:min(start + chunk, len(tokens) - 1)], cache)
        mx.eval(cache.keys, cache.values)
    return model(x[:, -1:], cache)[:, -1]


def generate_step(model: Mistral, prompt: Sequence[int], cache: RollingKVCache, sampler: Sampler,
                  prefill_chunk: int = DEFAULT_PREFILL_CHUNK, repetition_penalty: float = 1.0,
                  repetition_context: int = 64) -> Iterator[int]:
    """Yield generated token ids without end; the caller decides when to stop.

    Step n+1 is scheduled with async_eval before token n is handed out, so the
    device computes while Python works: one sync (`.item()`) per token.
    """
    penalize = repetition_penalty != 1.0
    recent = mx.array(list(prompt[-repetition_context:]), dtype=mx.uint32)[None]

    def next_token(logits: mx.array) -> mx.array:
        nonlocal recent
        if penalize:
            logits = penalize_repetition(logits, recent, repetition_penalty)
        y = sampler(logits)
        if penalize:
            recent = mx.concatenate([recent, y[:, None].astype(mx.uint32)], axis=1)[:, -repetition_context:]
        return y

    y = next_token(prefill(model, prompt, cache, prefill_chunk))
    mx.async_eval(y, recent)
    while True:
        next_y = next_token(model(y[:, None], cache)[:, -1])
        mx.async_eval(next_y, recent)
        yield y.item()
        y = next_y


def stream_generate(model: Mistral, tokenizer: Tokenizer, prompt: str | Sequence[int],
                    max_tokens: int = 256, sampler: Sampler | None = None,
                    repetition_penalty: float = 1.0, stop: Sequence[str] = (),
                    cache: RollingKVCache | None = None, max_kv_size: int | None = None,
                    prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> Iterator[GenerationResponse]:
    """Stream the answer to `prompt` (raw text, or token ids such as chat_tokens(...)).

    Stops at EOS, after `max_tokens`, or before the first of the `stop` strings (text
    that may begin a stop string is held back until it is known not to). Pass a `cache`
    to continue a conversation: the prompt is then the tokens that follow what it holds.
    """
    start = time.perf_counter()
    ids = tokenizer.encode(prompt, bos=True) if isinstance(prompt, str) else list(prompt)
    if not ids or (isinstance(prompt, str) and not prompt.strip()):
        raise MistralError("prompt is empty")
    if not isinstance(max_tokens, int) or max_tokens <= 0:
        raise MistralError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if any(not isinstance(s, str) or not s for s in stop):
        raise MistralError("stop strings must be non-empty text")
    check_repetition_penalty(repetition_penalty)
    args = model.args
    past = cache.offset if cache else 0
    if args.sliding_window is None and past + len(ids) > args.max_position_embeddings:
        raise MistralError(
            f"prompt is {past + len(ids)} tokens, past the model's context of "
            f"{args.max_position_embeddings} tokens"
        )
    if cache is None:
        cache = make_cache(args, max_kv_size or len(ids) + max_tokens, dtype=model.dtype)
    sampler = sampler or make_sampler()
    mx.reset_peak_memory()

    detokenizer = StreamingDetokenizer(tokenizer)
    held = ""  # decoded text not yet emitted: it may be the start of a stop string
    first = 0.0

    def response(n: int, text: str, token: int, finish: str | None = None) -> GenerationResponse:
        now = time.perf_counter()
        return GenerationResponse(
            text=text, token=token, prompt_tokens=len(ids), prompt_tps=len(ids) / (first - start),
            generation_tokens=n, generation_tps=(n - 1) / (now - first) if n > 1 else 0.0,
            ttft=first - start, peak_memory=mx.get_peak_memory(), kv_cache_bytes=cache.nbytes,
            kv_cache_tokens=cache.size, finish_reason=finish,
        )

    steps = generate_step(model, ids, cache, sampler, prefill_chunk, repetition_penalty)
    for n, token in enumerate(steps, start=1):
        first = first or time.perf_counter()
        if token == tokenizer.eos_id:
            yield response(n, held + detokenizer.flush(), token, "stop")
            return
        held += detokenizer.add(token)
        hit = min((i for i in (held.find(s) for s in stop) if i >= 0), default=-1)
        if hit >= 0:  # what follows the stop string is dropped
            yield response(n, held[:hit], token, "stop")
            return
        if n == max_tokens:
            yield response(n, held + detokenizer.flush(), token, "length")
            return
        keep = max((k for s in stop for k in range(len(s) - 1, 0, -1) if held.endswith(s[:k])), default=0)
        yield response(n, held[: len(held) - keep], token)
        held = held[len(held) - keep:]


def generate(model: Mistral, tokenizer: Tokenizer, prompt: str | Sequence[int], **kwargs) -> str:
    """The whole answer as one string (see stream_generate for the arguments)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))
