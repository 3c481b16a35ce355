"""Generation: chunked prefill, stop conditions, stop strings, cache continuation."""

import itertools

import mlx.core as mx
import numpy as np
import pytest

from mlx_mistral import MistralError, generate, load, make_cache, stream_generate
from mlx_mistral.generate import prefill


@pytest.fixture(scope="module")
def tiny(hf_checkpoint):
    return load(str(hf_checkpoint[0]))


def scripted(tokens, filler=100):
    """A sampler that ignores the logits and returns `tokens`, then `filler` forever."""
    it = itertools.chain(tokens, itertools.repeat(filler))
    return lambda logits: mx.array([next(it)])


PROMPT = "The rolling buffer keeps the last window of keys and values, so memory stays flat."


@pytest.mark.parametrize("chunk", [1, 3, 8, 512])
def test_prefill_chunk_size_does_not_change_output(tiny, chunk):
    model, tok = tiny
    ids = tok.encode(PROMPT, bos=True)
    assert len(ids) > 2 * model.args.sliding_window
    reference = [r.token for r in stream_generate(model, tok, ids, max_tokens=12, prefill_chunk=10_000)]
    assert [r.token for r in stream_generate(model, tok, ids, max_tokens=12, prefill_chunk=chunk)] == reference


def test_prefill_logits_match_one_forward(tiny):
    model, tok = tiny
    ids = tok.encode(PROMPT, bos=True)
    whole = model(mx.array([ids]), make_cache(model.args))[:, -1]
    chunked = prefill(model, ids, make_cache(model.args), chunk=5)
    assert np.abs(np.array(whole) - np.array(chunked)).max() <= 1e-5


def test_stops_at_eos_and_max_tokens(tiny):
    model, tok = tiny
    words = tok.encode("one two three four")
    out = list(stream_generate(model, tok, PROMPT, max_tokens=50, sampler=scripted(words + [tok.eos_id])))
    assert [r.token for r in out] == words + [tok.eos_id]
    assert out[-1].finish_reason == "stop" and all(r.finish_reason is None for r in out[:-1])
    assert "".join(r.text for r in out) == "one two three four"
    out = list(stream_generate(model, tok, PROMPT, max_tokens=3, sampler=scripted(words)))
    assert len(out) == 3 and out[-1].finish_reason == "length" and out[-1].generation_tokens == 3


def test_stop_strings_are_held_back_and_cut(tiny):
    model, tok = tiny
    words = tok.encode("alpha beta gamma delta")
    out = list(stream_generate(model, tok, PROMPT, max_tokens=20, sampler=scripted(words), stop=["gamma de"]))
    texts = [r.text for r in out]
    assert "".join(texts) == "alpha beta "
    assert out[-1].finish_reason == "stop"
    assert all("gam" not in t for t in texts)  # a possible stop prefix is never streamed
    # a partial match that turns out not to be the stop string is released
    out = generate(model, tok, PROMPT, max_tokens=len(words), sampler=scripted(words), stop=["gamma x"])
    assert out == "alpha beta gamma delta"


def test_cache_holds_every_token_and_continues_a_conversation(tiny):
    model, tok = tiny
    ids = tok.encode(PROMPT, bos=True)
    cache = make_cache(model.args)
    first = list(stream_generate(model, tok, ids, max_tokens=6, cache=cache))
    fed = ids + [r.token for r in first]
    assert cache.offset == len(fed) and first[-1].kv_cache_tokens == cache.size
    more = tok.encode(" and then", bos=False)
    continued = [r.token for r in stream_generate(model, tok, more, max_tokens=6, cache=cache)]
    fresh = [r.token for r in stream_generate(model, tok, fed + more, max_tokens=6)]
    assert continued == fresh


def test_text_equals_decode_of_tokens(tiny):
    model, tok = tiny
    out = list(stream_generate(model, tok, PROMPT, max_tokens=40))
    tokens = [r.token for r in out if r.token != tok.eos_id]
    assert "".join(r.text for r in out) == tok.decode(tokens)
    last = out[-1]
    assert last.prompt_tokens == len(tok.encode(PROMPT, bos=True)) and last.kv_cache_bytes > 0
    assert last.peak_memory > 0 and last.ttft > 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt="   "), "prompt is empty"),
    (dict(prompt=[]), "prompt is empty"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(stop=[""]), "stop strings"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(prefill_chunk=0), "prefill_chunk"),
])
def test_bad_arguments(tiny, kwargs, match):
    model, tok = tiny
    kwargs = {"prompt": PROMPT, **kwargs}
    with pytest.raises(MistralError, match=match):
        list(stream_generate(model, tok, **kwargs))


def test_prompt_past_a_windowless_models_context(windowless):
    model, tok = load(str(windowless[0]))  # max_position_embeddings 512, no window
    with pytest.raises(MistralError, match="prompt is 601 tokens, past the model's context of 512 tokens"):
        list(stream_generate(model, tok, [1] + [100] * 600))
