"""Speculative decoding (prompt lookup): the same tokens as plain decoding, fewer forwards.

Exactness is tested two ways: with prompt lookup's own drafts, and with "oracle" drafts (the
plain run's own continuation, some tokens corrupted), which are accepted far more often, so
that runs of accepted drafts cross the window's wrap, end on a stop string, and meet a grammar.
"""

import re

import mlx.core as mx
import mlx.utils
import numpy as np
import pytest

from checkpoints import tiny_config, write_hf
from mlx_mistral import load, make_cache, make_sampler, stream_generate
from mlx_mistral.errors import MistralError
from mlx_mistral.loading import build_model, dequantized, read_gguf, resolve
from mlx_mistral.serve import Request, Scheduler
from mlx_mistral.serve.batch import Row
from mlx_mistral.speculative import Lookup, PromptLookup, Width, parse_ngram
from test_moe import mixtral_config, write_mixtral

TEXT = "Grouped-query attention shares key and value heads between query heads, so the cache is smaller. "
LOOKUP = Lookup(draft_tokens=4, ngram=(1, 3))


@pytest.fixture(scope="module", params=["demo", "window 8", "kv 8-bit", "mixtral"])
def sched(request, tmp_path_factory):
    """A scheduler that speculates: the demo shape, a GQA model whose window of 8 wraps many times
    in an answer, the demo with an 8-bit KV cache, a Mixtral with a window of 8."""
    model, kw = "demo", {}
    if request.param == "window 8":
        model = tmp_path_factory.mktemp("window8")
        write_hf(model, tiny_config(sliding_window=8))
    elif request.param == "kv 8-bit":
        kw = dict(kv_bits=8, kv_group_size=32)
    elif request.param == "mixtral":
        model = tmp_path_factory.mktemp("mixtral")
        write_mixtral(model, mixtral_config(8))
    s = Scheduler(str(model), max_batch=8, prefill_chunk=32, lookup=LOOKUP, prompt_cache_bytes=0, **kw)
    yield s
    s.close()


def solo(s, tokens, max_tokens, constraint=None, **kw):
    """The request alone and plain (no speculation, a cache of W slots): stream_generate."""
    sampler = make_sampler(kw.get("temperature", 0.0), kw.get("top_p", 1.0), seed=kw.get("seed"))
    args = dict(max_tokens=max_tokens, sampler=sampler, stop=kw.get("stop", ()), constraint=constraint,
                repetition_penalty=kw.get("repetition_penalty", 1.0), kv_bits=s.kv_bits,
                kv_group_size=s.kv_group_size)
    return s.call(lambda: [r.token for r in stream_generate(s.model, s.tokenizer, tokens, **args)])


def prompts(s, n):
    ids = s.tokenizer.encode(TEXT * 6, bos=True)
    return [ids[: 2 + (i * 37) % (len(ids) - 2)] for i in range(n)]


def served(s, requests):
    out = []
    for r in [s.submit(r) for r in requests]:
        events = list(r.events())
        out.append(([e.token for e in events if e.token is not None], events[-1]))
    return out


@pytest.fixture
def full_width(monkeypatch):
    """Every verify step feeds all the drafts: what the width controller picks depends on step
    timings (tested on its own below), and these tests are about exactness, not speed."""
    monkeypatch.setattr(Width, "choose", lambda self, drafts, rates: max(drafts, default=0))


@pytest.fixture
def oracle(monkeypatch, full_width):
    """Rows draft what the plain run emitted next (request.oracle), up to the headroom, a random
    number of tokens, one in four drafts with a wrong token somewhere."""
    rng = np.random.default_rng(0)

    def drafts(row, headroom):
        if row.lookup is None:  # the request opted out
            return []
        n, left = len(row.answer), row.request.max_tokens - len(row.answer) - 1
        d = list(row.request.oracle[n:n + min(int(rng.integers(0, headroom + 1)), left)])
        if d and rng.random() < 0.25:
            d[int(rng.integers(len(d)))] = int(rng.integers(3, 1000))
        return d

    monkeypatch.setattr(Row, "drafts", drafts)


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_greedy_with_oracle_drafts_equals_plain(sched, oracle, batch):
    """Ragged rows, accepted runs across the wrap of the window (of 8 in two models), a row ended
    by a stop string inside an accepted run, a row under a JSON grammar: each equals its plain run."""
    ps = prompts(sched, batch)
    kws = [{} for _ in ps]
    plain = [solo(sched, p, 40) for p in ps]
    if batch > 1:  # a stop string: the text of a token in the middle of row 1's answer
        piece = sched.tokenizer.decode(plain[1][:20])[-3:]
        kws[1] = dict(stop=[piece]) if piece.strip() else {}
        plain[1] = solo(sched, ps[1], 40, **kws[1])
    json = sched.grammars.json() if batch == 3 else None
    if json:
        plain[2] = solo(sched, ps[2], 40, constraint=json)
    requests = []
    for i, (p, kw) in enumerate(zip(ps, kws)):
        requests.append(Request(p, max_tokens=40, constraint=json if i == 2 else None, **kw))
        requests[-1].oracle = plain[i]
    before = sched.stats()
    got = served(sched, requests)
    assert [g[0] for g in got] == plain
    stats = sched.stats()
    drafted, accepted = (stats[k] - before[k] for k in ("drafted_tokens", "accepted_tokens"))
    assert drafted > 20 and accepted > drafted / 2
    assert sum(e.forwards for _, e in got) < sum(e.generated_tokens for _, e in got)


def test_eos_inside_an_accepted_run_ends_the_row(sched, full_width, monkeypatch):
    """A row drafts the plain run's next 4 tokens every step (all accepted: runs of 5), and a token
    inside one of its runs is made the EOS: the row ends there, EOS its last token, the rows beside
    it go on; each equals its plain run."""
    ps = prompts(sched, 3)
    full = [solo(sched, p, 40) for p in ps]
    firsts = [i for i in range(8, 30) if full[1].index(full[1][i]) == i and i % 5 != 0]
    cut = firsts[0]  # of the runs 0 | 1-5 | 6-10 ..., not a run's last token
    monkeypatch.setattr(sched.tokenizer, "eos_id", full[1][cut])
    plain = [solo(sched, p, 40) for p in ps]
    assert plain[1] == full[1][:cut + 1]
    monkeypatch.setattr(Row, "drafts", lambda row, headroom: list(
        row.request.oracle[len(row.answer):len(row.answer) + min(headroom, 38 - len(row.answer))]))
    requests = [Request(p, max_tokens=40) for p in ps]
    for r, tokens in zip(requests, full):
        r.oracle = tokens
    got = served(sched, requests)
    assert [g[0] for g in got] == plain
    assert got[1][1].finish_reason == "stop" and got[1][1].forwards == (cut + 4) // 5


def test_prompt_lookup_greedy_equals_plain(sched, full_width):
    """Prompt lookup's own drafts (random models repeat themselves: it finds runs to draft)."""
    ps = prompts(sched, 5)
    got = served(sched, [Request(p, max_tokens=48) for p in ps])
    assert [g[0] for g in got] == [solo(sched, p, 48) for p in ps]
    assert sum(e.drafted_tokens for _, e in got) > 0


def test_seeded_sampling_with_drafts_equals_seeded_plain(sched, oracle):
    """T = 0.8 with top-p and a repetition penalty, seeded: sample and compare with noise keyed by
    position gives the plain seeded run token for token."""
    ps = prompts(sched, 3)
    kw = dict(temperature=0.8, top_p=0.95, repetition_penalty=1.3)
    plain = [solo(sched, p, 32, seed=7 + i, **kw) for i, p in enumerate(ps)]
    requests = [Request(p, max_tokens=32, seed=7 + i, **kw) for i, p in enumerate(ps)]
    for r, tokens in zip(requests, plain):
        r.oracle = tokens
    got = served(sched, requests)
    assert [g[0] for g in got] == plain
    assert sum(e.accepted_tokens for _, e in got) > 10


def test_logprobs_and_opt_out(sched, oracle):
    """Logprobs stay per emitted token, as without speculation (a request that opts out is the
    plain reference, in the same batch); an opted-out request drafts nothing."""
    p = prompts(sched, 2)[1]
    plain_request = Request(p, max_tokens=24, logprobs=3, speculate=False)
    plain_request.oracle = solo(sched, p, 24)
    spec_request = Request(p, max_tokens=24, logprobs=3)
    spec_request.oracle = plain_request.oracle
    (plain_tokens, plain_end), (spec_tokens, spec_end) = served(sched, [plain_request, spec_request])
    assert spec_tokens == plain_tokens and plain_end.drafted_tokens == 0 < spec_end.drafted_tokens
    events = [list(r.events()) for r in [sched.submit(Request(p, max_tokens=24, logprobs=3, speculate=s))
                                          for s in (False, True)]]
    for a, b in zip(*events):
        if a.logprob:
            assert a.logprob.token == b.logprob.token
            assert abs(a.logprob.logprob - b.logprob.logprob) < 1e-4
            assert [t for t, _ in a.logprob.top] == [t for t, _ in b.logprob.top]


@pytest.mark.parametrize("seed", [None, 3])
def test_stream_generate_with_lookup_equals_plain_past_the_wrap(tmp_path_factory, seed):
    """The Python API: greedy and seeded T = 0.8, a window of 8 wrapped many times."""
    path = tmp_path_factory.mktemp("w8")
    write_hf(path, tiny_config(sliding_window=8))
    model, tok = load(str(path))
    ids = tok.encode(TEXT * 3, bos=True)
    temp = 0.0 if seed is None else 0.8
    runs = [list(stream_generate(model, tok, ids, max_tokens=60, sampler=make_sampler(temp, seed=seed),
                                 lookup=lk)) for lk in (None, LOOKUP)]
    assert [r.token for r in runs[0]] == [r.token for r in runs[1]]
    assert runs[1][-1].forwards <= 60 and runs[0][-1].forwards == 0
    with pytest.raises(MistralError, match="headroom"):
        next(stream_generate(model, tok, ids, cache=make_cache(model.args), lookup=LOOKUP))


def test_width_feeds_the_drafts_that_pay_for_their_positions():
    """Steps cost 10 ms + 1 ms per row x position: a batch of 8 whose drafts are seldom accepted
    steps plainly, one whose drafts are nearly always accepted feeds them all, one in between
    stops where more positions cost more than they bring; one row alone drafts cheaply."""
    width = Width()
    for positions in (8, 16, 40, 8, 24, 72) * 20:  # the prior (a slope of 5% a position) forgotten
        width.observe(positions, 0.010 + 0.001 * positions)
    a, b = width.line()
    assert abs(a - 0.010) < 1e-4 and abs(b - 0.001) < 1e-5
    assert width.choose([8] * 8, [0.1] * 8) == 0
    assert width.choose([8] * 8, [0.99] * 8) == 8
    assert width.choose([8] * 8, [0.9] * 8) == 4  # (8 + 24.8) / 50 ms beats (8 + 41.0) / 82 ms
    assert width.choose([8] + [0] * 7, [0.5] + [0.0] * 7) == 0  # one row's drafts: all 8 rows pay
    assert width.choose([8], [0.5]) > 0
    assert width.choose([0] * 4, [0.9] * 4) == 0


def test_prompt_lookup_proposes_the_latest_continuation():
    lookup = PromptLookup(Lookup(draft_tokens=3, ngram=(1, 2)), [5, 6, 7, 8, 9, 5, 6, 1, 2, 5, 6])
    assert lookup.propose(8) == [1, 2, 5]  # "5 6" last seen before "1 2 5"
    assert lookup.propose(2) == [1, 2]
    lookup.update(3, 0)  # nothing accepted: fewer drafts and a pause
    assert lookup.propose(8) == [] and lookup.propose(8) == [1]
    assert PromptLookup(LOOKUP, [1, 2, 3]).propose(4) == []
    assert parse_ngram("2:5") == (2, 5) and parse_ngram("3") == (3, 3)
    for bad in ("2-5", "a:b", "1:2:3"):
        with pytest.raises(MistralError, match="MIN:MAX"):
            parse_ngram(bad)
    with pytest.raises(MistralError, match="1 <= MIN <= MAX"):
        Lookup(4, (3, 2))
    with pytest.raises(MistralError, match="draft_tokens"):
        Lookup(0)


EDIT = '''def send_message(client, user, text):
    """Send a message to a user and log it."""
    if not text:
        raise ValueError("empty message")
    payload = {"to": user.email, "body": text, "priority": "normal"}
    client.post("/messages", json=payload)
    print("message sent to", user.email)
    return payload
'''


def test_smollm2_copy_heavy_edit_needs_few_forwards():
    """The real model asked to rewrite a function with one change: under 0.6 forwards a token
    (0.2 measured), the same greedy text as without speculation (float32, from the GGUF)."""
    _, tok = load("smollm2")
    model = build_model(*dequantized(*read_gguf(resolve("smollm2"))[:2]), mx.float32)
    message = ("Change the priority from \"normal\" to \"high\" in this function and show the whole "
               f"function:\n\n```python\n{EDIT}```")
    ids = tok.chat_tokens([{"role": "user", "content": message}])
    plain = list(stream_generate(model, tok, ids, max_tokens=120))
    spec = list(stream_generate(model, tok, ids, max_tokens=120, lookup=Lookup()))
    assert "".join(r.text for r in spec) == "".join(r.text for r in plain)
    assert EDIT.splitlines()[0] in "".join(r.text for r in plain)  # (the 135M model copies; it may not edit)
    last = spec[-1]
    assert last.forwards / last.generation_tokens < 0.6, (last.forwards, last.generation_tokens)


def test_cli_prompt_lookup_stats_and_errors(capsys):
    """--prompt-lookup: the same tokens as without, its counts in --json and on the stats line; bad
    settings are one error line each."""
    from mlx_mistral.generate.__main__ import main

    argv = ["--model", "demo", "--prompt", TEXT * 2, "--max-tokens", "40", "--json"]
    runs = []
    for extra in ([], ["--prompt-lookup", "--draft-tokens", "4", "--lookup-ngram", "1:3"]):
        assert main(argv + extra) == 0
        runs.append(__import__("json").loads(capsys.readouterr().out))
    assert runs[0]["tokens"] == runs[1]["tokens"] and runs[0]["forwards"] == 0
    assert 0 < runs[1]["forwards"] <= 40 and runs[1]["drafted_tokens"] >= runs[1]["accepted_tokens"]
    spec = runs[1]["speculation"]
    assert runs[0]["speculation"] is None and spec["forwards_per_token"] == runs[1]["forwards"] / 40
    assert spec["mean_accepted_run"] == spec["accepted"] / runs[1]["drafting_forwards"]
    assert main(argv[:-1] + ["--prompt-lookup"]) == 0
    line = r"speculation: \d+/\d+ drafts accepted \(\d+%\), mean run [\d.]+, [\d.]+ forwards a token"
    assert re.search(line, capsys.readouterr().err)
    for bad, message in ((["--lookup-ngram", "4:2"], "1 <= MIN <= MAX"),
                         (["--draft-tokens", "0"], "draft_tokens"), (["--lookup-ngram", "x"], "MIN:MAX")):
        assert main(argv + ["--prompt-lookup", *bad]) == 2
        assert message in capsys.readouterr().err


def test_request_field_and_metrics():
    """A body's "speculative" must be a boolean (a 400 naming it); /metrics has the counters."""
    from collections import Counter

    from mlx_mistral.serve.build import speculative
    from mlx_mistral.serve.http import APIError, prometheus

    assert speculative({}) is True and speculative({"speculative": False}) is False
    with pytest.raises(APIError, match="speculative must be true or false"):
        speculative({"speculative": "no"})
    names = ("stop length tool_calls cancelled error waiting running prefilling steps max_rows "
             "max_prefill_rows prefilled_tokens reused_tokens tokens_per_second kv_bytes idle_caches "
             "verify_steps reused_requests admitted prompt_tokens block_bytes disk_bytes blocks disk_blocks "
             "images image_tokens vision_seconds")
    stats = dict.fromkeys(names.split(), 0)
    stats.update(rows=30, generated_tokens=60, drafted_tokens=50, accepted_tokens=40, drafting_rows=10)
    text = prometheus(stats, Counter())
    assert "mlx_mistral_forwards_per_token 0.5" in text and "mlx_mistral_draft_acceptance_rate 0.8" in text
    assert "mlx_mistral_accepted_tokens_total 40" in text and "mlx_mistral_mean_accepted_run 4.0" in text


@pytest.fixture(scope="module")
def window8(tmp_path_factory):
    """A GQA model with a window of 8, and a smaller one (1 layer, another seed) with its tokenizer."""
    target, draft = tmp_path_factory.mktemp("target8"), tmp_path_factory.mktemp("draft8")
    write_hf(target, tiny_config(sliding_window=8))
    write_hf(draft, tiny_config(sliding_window=8, num_hidden_layers=1), seed=5)
    return load(str(target)), str(target), str(draft)


@pytest.mark.parametrize("temp", [0.0, 0.8])
def test_draft_model_equals_plain(window8, temp, full_width):
    """The target as its own draft: every draft is accepted, and the tokens are the plain run's,
    greedy and seeded (its draws are the target's own, same noise at the same positions), past the
    window's wrap. A smaller model's drafts: greedy, the plain tokens (sample and compare); seeded,
    rejection sampling (its distribution is tested below), the same tokens for the same seed and
    the same verify widths (in use those follow step timings: the same distribution, not the same
    tokens)."""
    from mlx_mistral.speculative import load_draft

    (model, tok), target, draft = window8
    ids = tok.encode(TEXT * 3, bos=True)
    sampler = lambda: make_sampler(temp, seed=11)  # noqa: E731
    plain = [r.token for r in stream_generate(model, tok, ids, max_tokens=50, sampler=sampler())]

    def speculated(path):
        return list(stream_generate(model, tok, ids, max_tokens=50, sampler=sampler(),
                                    draft_model=load_draft(path, tok), draft_tokens=4))

    runs = speculated(target)
    assert [r.token for r in runs] == plain
    assert runs[-1].accepted_tokens == runs[-1].drafted_tokens > 0
    assert runs[-1].forwards <= 50 // 5 + 2  # 4 drafts and one more a forward
    runs = speculated(draft)
    assert runs[-1].drafted_tokens > 0 and len(runs) == 50
    if temp == 0:
        assert [r.token for r in runs] == plain
    else:
        assert [r.token for r in runs] == [r.token for r in speculated(draft)]


def test_draft_model_with_another_tokenizer_is_refused(window8, tmp_path):
    from mlx_mistral.speculative import load_draft

    (_, tok), _, _ = window8
    with pytest.raises(MistralError, match="another vocabulary"):
        load_draft("smollm2", tok)


def test_sampled_drafts_keep_the_targets_distribution():
    """Rejection sampling (a draft model at T = 0.8): 20000 rows at once, each with one draft drawn
    from the draft model's distribution q, emit tokens distributed as the target's own p (chi-square
    over a 16-token vocabulary), while the drafts themselves fail the same test (q is far from p)."""
    from mlx_mistral.config import ModelArgs
    from mlx_mistral.model import Mistral
    from mlx_mistral.sample import make_picker
    from mlx_mistral.speculative import Draw, verify

    args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=64, vocab_size=16)
    target, draft = Mistral(args), Mistral(args)
    mx.random.seed(0)
    for m in (target, draft):
        m.update(mlx.utils.tree_map(lambda w: mx.random.normal(w.shape) * 0.5, m.parameters()))
    prompt, rows, temp = [3, 1, 4], 6000, 0.8
    pick = make_picker(temp)
    p = mx.softmax(target(mx.array([prompt]), make_cache(args))[0, -1] / temp).tolist()
    q = draft(mx.array([prompt]), make_cache(args))[0, -1] / temp
    q = q - mx.logsumexp(q)
    drafts = mx.random.categorical(mx.broadcast_to(q, (rows, 16))).tolist()
    cache = make_cache(args, 8, batch_size=rows, headroom=1)
    target(mx.array([prompt[:-1]] * rows), cache)
    verdicts = verify(target, cache, [prompt[-1]] * rows, [[d] for d in drafts],
                      [Draw(pick, prompt, False, q=q[None]) for _ in range(rows)])

    def chi2(tokens):
        counts = np.bincount(tokens, minlength=16)
        expected = rows * np.array(p)
        return float(np.sum((counts - expected) ** 2 / expected))

    assert chi2([v.tokens[0] for v in verdicts]) < 37.7  # 15 degrees of freedom, p = 0.001
    assert chi2(drafts) > 1000
    accepted = sum(v.accepted for v in verdicts) / rows
    assert abs(accepted - sum(min(a, b) for a, b in zip(p, mx.exp(q).tolist()))) < 0.02


@pytest.fixture(scope="module", params=["demo", "window 8", "window 8, smaller draft", "kv 8-bit", "mixtral"])
def drafting(request, window8, tmp_path_factory):
    """A scheduler whose rows draft with a draft model: the target itself (the demo shape, a GQA
    model with a window of 8, the demo with an 8-bit KV cache, a Mixtral with a window of 8), or
    the smaller model beside the window-8 one. True when every draft must be accepted: the draft
    computes as the target does (not so beside an 8-bit KV cache, nor with another model)."""
    _, target, smaller = window8
    draft, kw = target, {}
    if request.param.startswith("demo") or request.param.startswith("kv"):
        target = draft = "demo"
        kw = dict(kv_bits=8, kv_group_size=32) if request.param.startswith("kv") else {}
    elif request.param == "mixtral":
        target = draft = tmp_path_factory.mktemp("mixtral-draft")
        write_mixtral(target, mixtral_config(8))
    elif "smaller" in request.param:
        draft = smaller
    s = Scheduler(str(target), max_batch=10, prefill_chunk=16, prompt_cache_bytes=0, draft_model=str(draft),
                  draft_tokens=4, **kw)
    yield s, draft == target and not kw
    s.close()


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_draft_model_in_the_batch_equals_plain(drafting, window8, batch, full_width, monkeypatch):
    """The server's batch with a draft model (the target itself: every draft accepted; a smaller
    random one: few if any): ragged rows, greedy, past the window's wrap, a row under a JSON grammar,
    each row its plain run; with the target as draft, a token inside an accepted run made the EOS
    ends its row there. A sampled row beside them (rejection sampling) and an opted-out one; the
    draft's caches count in the KV budget."""
    s, own = drafting
    if own:  # the same model, the same cache
        assert s.draft_bytes == s.row_bytes
    ps = prompts(s, batch)
    if own:  # the runs are 5 tokens (1 + 4 drafts): 0-4, 5-9, ...; an EOS not at a run's end
        first = solo(s, ps[-1], 40)
        cut = next(i for i in range(8, 30) if first.index(first[i]) == i and i % 5 != 4)
        monkeypatch.setattr(s.tokenizer, "eos_id", first[cut])
    json = s.grammars.json() if batch == 3 else None
    plain = [solo(s, p, 40, constraint=json if i == 1 else None) for i, p in enumerate(ps)]
    requests = [Request(p, max_tokens=40, constraint=json if i == 1 else None) for i, p in enumerate(ps)]
    requests.append(Request(ps[0], max_tokens=20, temperature=0.8, seed=1))
    requests.append(Request(ps[-1], max_tokens=20, speculate=False))
    got = served(s, requests)
    assert [g[0] for g in got[:batch]] == plain and got[-1][0] == plain[-1][:20]
    assert 0 < len(got[-2][0]) <= 20 and got[-2][1].finish_reason in ("stop", "length")
    assert got[-2][1].drafted_tokens > 0 and got[-1][1].drafted_tokens == 0
    ends = [e for _, e in got[:batch]]
    drafted, accepted = sum(e.drafted_tokens for e in ends), sum(e.accepted_tokens for e in ends)
    assert drafted > 0 and (accepted == drafted or not own)  # (a random smaller one: few, if any)
    if own:
        assert got[batch - 1][0] == first[:cut + 1] and ends[-1].finish_reason == "stop"
        assert ends[-1].forwards == cut // 5 + 1
