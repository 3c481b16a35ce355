"""The scheduler without sockets: continuous batching equals solo runs, rows come and go."""

import threading

import pytest

from mlx_mistral import MistralError, make_sampler, stream_generate
from mlx_mistral.serve import QueueFull, Request, Scheduler

TEXT = "Grouped-query attention shares key and value heads between query heads, so the cache is smaller. "


@pytest.fixture(scope="module")
def sched():
    s = Scheduler("demo", max_batch=8, prefill_chunk=32)
    yield s
    s.close()


def solo(s, tokens, max_tokens, **kw):
    """The same request alone, through stream_generate (no scheduler batching)."""
    sampler = make_sampler(kw.get("temperature", 0.0), kw.get("top_p", 1.0), seed=kw.get("seed"))
    run = lambda: [r.token for r in stream_generate(s.model, s.tokenizer, tokens, max_tokens=max_tokens,  # noqa: E731
                                                     sampler=sampler, stop=kw.get("stop", ()),
                                                     repetition_penalty=kw.get("repetition_penalty", 1.0))]
    return s.call(run)


def tokens_of(request):
    events = list(request.events())
    return [e.token for e in events if e.token is not None], events[-1]


def prompts(s, n):
    ids = s.tokenizer.encode(TEXT * 6, bos=True)  # past the 64-token window and the 32-token chunk
    return [ids[: 1 + (i * 37) % len(ids)] for i in range(n)]


def test_ragged_batch_equals_solo_runs(sched):
    ps = prompts(sched, 10)
    before = sched.stats()["max_rows"]
    requests = [sched.submit(Request(p, max_tokens=40)) for p in ps]
    got = [tokens_of(r) for r in requests]
    assert [g[0] for g in got] == [solo(sched, p, 40) for p in ps]
    assert all(g[1].finish_reason == "length" and g[1].generated_tokens == 40 for g in got)
    stats = sched.stats()
    assert max(before, stats["max_rows"]) == 8  # max_batch rows decoded in one step
    assert (stats["running"], stats["prefilling"], stats["waiting"]) == (0, 0, 0)


def test_prompts_admitted_together_are_prefilled_side_by_side(sched):
    """Requests that wait while the thread is busy are admitted at once and prefilled as one
    [rows, n] batch, prompts of different lengths included, and still equal their solo runs."""
    ps = prompts(sched, 5)[1:]  # 38, 75, 112 and 27 tokens
    sched.call(sched.counters.update, max_prefill_rows=0)
    gate = threading.Event()
    busy = threading.Thread(target=sched.call, args=(gate.wait,))
    busy.start()
    try:
        requests = [sched.submit(Request(p, max_tokens=12)) for p in ps]
    finally:
        gate.set()
        busy.join()
    got = [tokens_of(r)[0] for r in requests]
    assert sched.stats()["max_prefill_rows"] == 4
    assert got == [solo(sched, p, 12) for p in ps]


def test_seeded_and_greedy_rows_mixed_equal_solo_runs(sched):
    ps = prompts(sched, 4)
    settings = [dict(temperature=0.9, seed=1), dict(), dict(temperature=0.7, top_p=0.9, seed=2), dict()]
    requests = [sched.submit(Request(p, max_tokens=10, **kw)) for p, kw in zip(ps, settings)]
    assert [tokens_of(r)[0] for r in requests] == [solo(sched, p, 10, **kw) for p, kw in zip(ps, settings)]


@pytest.mark.parametrize("sampled", [False, True])
def test_repetition_penalty_per_row_equals_solo_runs(sched, sampled):
    """Penalized rows beside plain ones in one batch (all greedy, or with a seeded row):
    each equals stream_generate with the same penalty alone, and the penalty changes the answer."""
    ps = prompts(sched, 4)
    settings = [dict(repetition_penalty=1.5), dict(), dict(repetition_penalty=0.7),
                dict(temperature=0.8, seed=3, repetition_penalty=1.3) if sampled else dict()]
    before = sched.stats()
    requests = [sched.submit(Request(p, max_tokens=24, **kw)) for p, kw in zip(ps, settings)]
    got = [tokens_of(r)[0] for r in requests]
    after = sched.stats()
    assert after["rows"] - before["rows"] > after["steps"] - before["steps"]  # batched
    assert got == [solo(sched, p, 24, **kw) for p, kw in zip(ps, settings)]
    assert got[0] != solo(sched, ps[0], 24)


def test_stop_string_and_text(sched):
    p = prompts(sched, 2)[1]
    text = "".join(e.text for e in sched.submit(Request(p, max_tokens=12)).events())
    stop = text[len(text) // 2: len(text) // 2 + 2]
    events = list(sched.submit(Request(p, max_tokens=12, stop=[stop])).events())
    assert events[-1].finish_reason == "stop"
    assert "".join(e.text for e in events) == text[: text.index(stop)]


def test_cancel_leaves_within_two_steps(sched):
    ps = prompts(sched, 3)
    stays = [sched.submit(Request(p, max_tokens=30)) for p in ps[:2]]
    leaves = sched.submit(Request(ps[2], max_tokens=30))
    events = leaves.events()
    for _ in range(3):
        next(events)
    leaves.cancel()
    rest = list(events)
    assert rest[-1].finish_reason == "cancelled"
    assert len([e for e in rest if e.token is not None]) <= 2
    assert all(tokens_of(r)[1].generated_tokens == 30 for r in stays)
    stats = sched.stats()
    assert (stats["running"], stats["prefilling"], stats["waiting"]) == (0, 0, 0)
    assert stats["kv_bytes"] == stats["idle_caches"] * sched.row_bytes


def test_a_request_failing_before_it_is_a_row_gets_its_error_at_once(sched, monkeypatch):
    """A failure while a request is admitted (here the prefix cache's lookup) ends that request with
    its error; the requests beside it are answered as ever."""
    ps = prompts(sched, 3)
    take = sched.prefixes.take

    def failing(request):
        if request.tokens == ps[1]:
            raise OSError("disk tier unreadable")
        return take(request)

    monkeypatch.setattr(sched.prefixes, "take", failing)
    requests = [sched.submit(Request(p, max_tokens=5)) for p in ps]
    ends = [tokens_of(r) for r in requests]
    assert (ends[1][1].finish_reason, ends[1][1].error) == ("error", "OSError: disk tier unreadable")
    assert [len(ends[i][0]) for i in (0, 2)] == [5, 5]
    assert sched.stats()["waiting"] == 0


def test_queue_full_then_all_complete():
    s = Scheduler("demo", max_batch=1, max_queue=2)
    try:
        gate = threading.Event()
        busy = threading.Thread(target=s.call, args=(gate.wait,))
        busy.start()  # the model thread waits: nothing is admitted meanwhile
        p = s.tokenizer.encode("hello", bos=True)
        accepted = [s.submit(Request(p, max_tokens=3)) for _ in range(2)]
        with pytest.raises(QueueFull, match="queue is full"):
            s.submit(Request(p, max_tokens=3))
        gate.set()
        busy.join(10)
        assert all(tokens_of(r)[1].finish_reason == "length" for r in accepted)
    finally:
        s.close()


def test_a_kv_budget_below_one_row_is_refused():
    with pytest.raises(MistralError, match="less than one row's KV cache"):
        Scheduler("demo", kv_budget=1000)


def test_kv_budget_bounds_the_batch():
    s = Scheduler("demo", max_batch=8, max_idle=0)
    try:
        s.kv_budget = 2 * s.row_bytes
        requests = [s.submit(Request(p, max_tokens=6)) for p in prompts(s, 5)]
        assert all(tokens_of(r)[1].generated_tokens == 6 for r in requests)
        assert s.stats()["max_rows"] == 2
    finally:
        s.close()


@pytest.mark.parametrize("kw, match", [
    (dict(tokens=[]), "prompt must be a non-empty list"),
    (dict(tokens=[1, 10**6]), "token ids in"),
    (dict(max_tokens=0), "max_tokens must be a positive integer"),
    (dict(temperature=-1.0), "temp must be >= 0"),
    (dict(top_p=0.0), "top_p must be in"),
    (dict(stop=[""]), "stop strings"),
    (dict(seed="x"), "seed must be an integer"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty must be > 0"),
    (dict(max_tokens=40000), "past the context"),
])
def test_bad_requests(sched, kw, match):
    kw = {"tokens": [1, 2, 3], **kw}
    with pytest.raises(MistralError, match=match):
        sched.submit(Request(**kw))


def test_next_turn_reuses_the_cache_and_equals_a_fresh_run(sched):
    tok = sched.tokenizer
    first = [{"role": "user", "content": "Tell me about attention."}]
    events = list(sched.submit(Request(tok.chat_tokens(first), max_tokens=8, echo=tok.encode)).events())
    answer, answer_ids = "".join(e.text for e in events), [e.token for e in events]
    assert events[-1].finish_reason == "length"
    second = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And caches?"}]
    got, last = tokens_of(sched.submit(Request(tok.chat_tokens(second), max_tokens=8, echo=tok.encode)))
    n = len(tok.chat_tokens(first))
    assert last.reused_tokens == n + 7  # the prompt and the answer but its last token
    # the cache keeps the model's own answer tokens: the same tokens prefilled from scratch
    fresh = tok.chat_tokens(first) + answer_ids + tok.chat_tokens(second)[n + len(tok.encode(answer)):]
    assert got == solo(sched, fresh, 8)


def test_long_prompt_is_prefilled_between_decode_steps(sched):
    """A 300-token prompt goes in 32-token chunks: the running stream gets a token after each."""
    order, done = [], threading.Event()

    def sink(name):
        def put(event):
            order.append(name)
            if event.finish_reason and name == "long":
                done.set()
        return put

    ids = sched.tokenizer.encode(TEXT * 20, bos=True)[:300]
    running = sched.submit(Request(ids[:5], max_tokens=60, sink=sink("running")))
    while not order:
        threading.Event().wait(0.01)
    start = len(order)
    sched.submit(Request(ids, max_tokens=1, sink=sink("long")))
    assert done.wait(60)
    running.cancel()
    assert order[start:order.index("long")].count("running") >= 300 // 32 - 1  # a token per prefill chunk


def test_quantized_kv_rows_equal_solo_runs_and_bytes():
    """kv_bits reaches every row's cache: batched rows equal solo runs on the same quantized
    cache, and the KV bytes the scheduler counts are those such a cache allocates."""
    from mlx_mistral import make_cache

    s = Scheduler("demo", max_batch=4, prefill_chunk=32, kv_bits=8, kv_group_size=32)
    try:
        ps = prompts(s, 4)

        def alone(p):
            cache = make_cache(s.model.args, s.max_kv_size, dtype=s.model.dtype, kv_bits=8, kv_group_size=32)
            return [r.token for r in stream_generate(s.model, s.tokenizer, p, max_tokens=12, cache=cache)], \
                cache.nbytes

        requests = [s.submit(Request(p, max_tokens=12)) for p in ps]
        got = [tokens_of(r)[0] for r in requests]
        solos = [s.call(alone, p) for p in ps]
        assert got == [tokens for tokens, _ in solos]
        assert s.row_bytes == solos[0][1]  # what the scheduler counts per row = a real cache's bytes
    finally:
        s.close()
    with pytest.raises(MistralError, match="kv_bits must be 4 or 8"):
        Scheduler("demo", kv_bits=3)
