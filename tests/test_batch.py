"""Batched generation: ragged prompts decode together and equal their single runs."""

import mlx.core as mx
import pytest

from mlx_mistral import (
    MistralError, RollingKVCache, batch_generate, batch_stream_generate, load, make_cache, stream_generate,
)
from mlx_mistral.generate import prefill


@pytest.fixture(scope="module")
def tiny(hf_checkpoint):
    return load(str(hf_checkpoint[0]))


TEXT = ("Grouped-query attention shares key and value heads between query heads, so the cache is "
        "smaller and larger batches fit in the same memory budget on a laptop.")


def ragged_prompts(tok, window):
    ids = tok.encode(TEXT, bos=True)
    assert len(ids) >= 3 * window
    return [ids[:1], ids[:5], ids[: window + 1], ids[: 2 * window + 3], ids[: 3 * window]]


def eos_when(token, eos):
    """Greedy, except that whenever the argmax is `token`, EOS is emitted instead."""
    def sample(logits):
        best = mx.argmax(logits, axis=-1)
        return mx.where(best == token, eos, best)
    return sample


def single(model, tok, prompt, **kwargs):
    return [r.token for r in stream_generate(model, tok, prompt, **kwargs)]


def test_ragged_batch_equals_single_runs(hf_checkpoint, loader):
    model, tok = loader(hf_checkpoint[0])
    prompts = ragged_prompts(tok, model.args.sliding_window)
    singles = [single(model, tok, p, max_tokens=12) for p in prompts]
    sampler = eos_when(singles[1][3], tok.eos_id)  # row 1 ends with EOS by its 4th token
    singles = [single(model, tok, p, max_tokens=12, sampler=sampler) for p in prompts]
    assert singles[1][-1] == tok.eos_id and len(singles[1]) <= 4
    assert any(len(s) == 12 for s in singles)  # others run on

    batched = {i: [] for i in range(len(prompts))}
    for i, r in batch_stream_generate(model, tok, prompts, max_tokens=12, sampler=sampler):
        batched[i].append(r.token)
    assert [batched[i] for i in range(len(prompts))] == singles
    results = batch_generate(model, tok, prompts, max_tokens=12, sampler=sampler)
    assert [r.finish_reason for _, r in results][1] == "stop"
    assert results[0][0] == tok.decode([t for t in singles[0] if t != tok.eos_id])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_ragged_decode_logits_are_finite(hf_checkpoint, loader, dtype):
    """Rows of 1, 5 and W + 1 tokens decode together past the window: the short rows have
    not filled slots the long one uses, the mask hides them, and no row is left with no key
    at all (GPU kernels may return NaN for such a row), on every path and dtype."""
    model, tok = loader(hf_checkpoint[0], getattr(mx, dtype))
    W = model.args.sliding_window
    prompts = ragged_prompts(tok, W)[:3]
    caches = [make_cache(model.args, dtype=model.dtype) for _ in prompts]
    y = mx.concatenate([prefill(model, p, c, 3).argmax(-1) for p, c in zip(prompts, caches)])
    cache = RollingKVCache.stack(caches)
    for _ in range(W + 2):
        assert mx.array(cache.mask(1)).any(axis=-1).all().item()
        logits = model(y[:, None], cache)[:, -1]
        assert mx.isfinite(logits).all().item()
        y = logits.argmax(-1)
    assert cache.offsets == [len(p) + W + 2 for p in prompts]


def test_per_prompt_max_tokens_and_text_prompts(tiny):
    model, tok = tiny
    texts = ["Hello there", "A much longer prompt " * 6, "Short"]
    out = batch_generate(model, tok, texts, max_tokens=[3, 9, 5])
    assert [r.generation_tokens for _, r in out] == [3, 9, 5]
    for text, (answer, r) in zip(texts, out):
        assert answer == "".join(x.text for x in stream_generate(model, tok, text, max_tokens=r.generation_tokens))


@pytest.mark.parametrize("prompts,kwargs,match", [
    ([], {}, "non-empty list"),
    (["ok", "", "fine"], {}, "prompt 1 is empty"),
    (["ok", [1, 2], []], {}, "prompt 2 is empty"),
    (["a", "b"], {"max_tokens": [3]}, "max_tokens has 1 entries for 2 prompts"),
    (["a", "b"], {"max_tokens": [3, 0]}, "max_tokens must be a positive integer"),
])
def test_bad_batches(tiny, prompts, kwargs, match):
    model, tok = tiny
    with pytest.raises(MistralError, match=match):
        list(batch_stream_generate(model, tok, prompts, **kwargs))


def test_stop_strings_stop_each_row_on_its_own(tiny):
    """Two stop strings, each found in one row's answer: each row is cut before its own, at its
    own step, the way a single run with the same stop strings is; the other row runs on."""
    model, tok = tiny
    prompts = ["Hello there", "A question about rolling caches?"]
    full = [text for text, _ in batch_generate(model, tok, prompts, max_tokens=20)]
    stops = [text[len(text) // 2: len(text) // 2 + 2] for text in full]
    for i, stop in enumerate(stops):
        assert full[i].find(stop) > 0 and stop not in full[1 - i], (full, stops)
    stopped = batch_generate(model, tok, prompts, max_tokens=20, stop=stops)
    for i, (text, last) in enumerate(stopped):
        assert text == full[i][: full[i].find(stops[i])] and last.finish_reason == "stop"
        single = list(stream_generate(model, tok, prompts[i], max_tokens=20, stop=stops))
        assert "".join(r.text for r in single) == text
        assert single[-1].generation_tokens == last.generation_tokens
    assert stopped[0][1].generation_tokens != stopped[1][1].generation_tokens
