"""Long runs stay flat: 20x the window in one generation, memory and cache bytes unchanged."""

import mlx.core as mx

from mlx_mistral import load, make_cache, make_sampler, stream_generate


def test_memory_flat_over_20_windows(hf_checkpoint):
    model, tok = load(str(hf_checkpoint[0]))
    W = model.args.sliding_window
    cache = make_cache(model.args, dtype=model.dtype)
    marks = {}
    prompt = tok.encode("Soak test of the rolling buffer", bos=True)
    stream = stream_generate(model, tok, prompt, max_tokens=20 * W, cache=cache,
                             sampler=make_sampler(temp=1.0, seed=0))
    for r in stream:
        if cache.offset in (2 * W, 5 * W, 20 * W):
            marks[cache.offset // W] = (r.peak_memory, mx.get_active_memory(), r.kv_cache_bytes, r.kv_cache_tokens)
    assert sorted(marks) == [2, 5, 20]
    peak2, active2, kv2, held2 = marks[2]
    for k in (5, 20):
        peak, active, kv, held = marks[k]
        assert kv == kv2 == cache.nbytes and held == held2 == W
        assert peak <= peak2 * 1.01 and active <= active2 * 1.01, (k, peak, peak2, active, active2)
