"""Long runs stay flat: 20x the window in one generation, memory and cache bytes unchanged."""

import mlx.core as mx

from mlx_mistral import load, make_cache, make_sampler, stream_generate


def settled_active_memory() -> int:
    """Active bytes once the step scheduled ahead with async_eval has finished: read while it
    runs, the count includes its scratch buffers or not depending on timing (80 steps gave
    15 different counts, up to +4%, and CI once failed on +2.5%); settled, one count."""
    mx.synchronize()
    return mx.get_active_memory()


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
            marks[cache.offset // W] = (r.peak_memory, settled_active_memory(), r.kv_cache_bytes, r.kv_cache_tokens)
    assert sorted(marks) == [2, 5, 20]
    peak2, active2, kv2, held2 = marks[2]
    for k in (5, 20):
        peak, active, kv, held = marks[k]
        assert kv == kv2 == cache.nbytes and held == held2 == W
        assert peak <= peak2 * 1.01 and active == active2, (k, peak, peak2, active, active2)


def test_fifty_chat_turns_and_sessions_leak_nothing():
    """50 turns through the app's handler: flat memory once the window fills; closed sessions
    give their memory back."""
    import gc

    from app.chat import Engine, SessionStore, Settings

    engine = Engine("demo")
    try:
        settings = Settings(temperature=0.7, max_tokens=8, seed=0)
        store = SessionStore(engine)
        session, history, marks = store.get("soak"), [], []
        for turn in range(50):
            history.append({"role": "user", "content": f"turn {turn}"})
            text = ""
            for _, text, _ in session.respond(history, settings):
                pass
            history.append({"role": "assistant", "content": text})
            if session.cache.offset > engine.window:
                marks.append((session.stats.kv_bytes, session.stats.peak_memory, engine.call(settled_active_memory)))
        assert session.cache.offset > 5 * engine.window and len(marks) > 30
        assert len({kv for kv, _, _ in marks}) == 1
        assert max(p for _, p, _ in marks) <= 1.02 * min(p for _, p, _ in marks)
        assert max(a for _, _, a in marks) <= 1.02 * min(a for _, _, a in marks)
        store.close("soak")
        gc.collect()
        baseline = engine.call(settled_active_memory)
        for i in range(5):  # sessions come and go: nothing stays behind
            s = store.get(f"tab-{i}")
            for _ in s.respond([{"role": "user", "content": "hello"}], settings):
                pass
            store.close(f"tab-{i}")
        gc.collect()
        assert engine.call(settled_active_memory) <= baseline * 1.01
    finally:
        engine.close()
