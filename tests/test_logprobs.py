"""logprobs: each token's log-probability and the most likely tokens', against transformers'
logits for the same tokens, through the OpenAI routes (chat and completions, streamed and
whole) and the scheduler (rows that ask beside rows that do not, sampled, penalized)."""

import httpx
import numpy as np
import pytest
import torch

from checkpoints import TOKENIZER_V1, tiny_config, write_hf
from mlx_mistral.serve import Request
from mlx_mistral.serve.logprobs import token_name
from mlx_mistral.tokenizer import Tokenizer
from test_server_tools import Script, serving

QUESTION = [{"role": "user", "content": "Which bridges cross the river in the capital?"}]
PROMPT = "The capital of France is a city of many bridges and"
ATOL = 1e-4  # float32 logits, ours cached step by step, transformers' in one forward


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    """(path, transformers model) of a tiny random model whose lm_head is 8 times write_hf's: its
    next-token distributions are peaked, so that top_p 0.9 keeps fewer than 20 tokens."""
    path = tmp_path_factory.mktemp("sharp")
    hf = write_hf(path, tiny_config())
    with torch.no_grad():
        hf.lm_head.weight.mul_(8.0)
    hf.save_pretrained(path, safe_serialization=True)
    return path, hf


@pytest.fixture(scope="module")
def live(sharp):
    with serving(sharp[0], None, max_batch=8) as (client, sched):
        yield client, sched


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(TOKENIZER_V1)


def oracle(hf, ids: list[int]) -> np.ndarray:
    """transformers' logits [len(ids), V] of `ids`, in float64."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].double().numpy()


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def greedy(hf, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """transformers' greedy answer of n tokens and the log_softmax [n, V] each was picked from."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(oracle(hf, ids)[-1].argmax()))
    return ids[len(prompt):], log_softmax(oracle(hf, ids)[len(prompt) - 1:-1])


def expected_chat(tok, answer: list[int], logprobs: np.ndarray, n: int) -> list[tuple]:
    """(token, bytes, logprob, [(token, logprob)] of the top n) of each answer token."""
    out = []
    for token, lp in zip(answer, logprobs):
        top = np.argsort(-lp)[:n]
        out.append((*token_name(tok, token), lp[token], [(token_name(tok, int(t))[0], lp[t]) for t in top]))
    return out


def assert_chat_entries(got: list, want: list[tuple]) -> None:
    assert len(got) == len(want)
    for g, (name, raw, logprob, top) in zip(got, want):
        assert (g.token, g.bytes) == (name, raw) and g.logprob == pytest.approx(logprob, abs=ATOL)
        assert [t.token for t in g.top_logprobs] == [t for t, _ in top]
        assert [t.logprob for t in g.top_logprobs] == pytest.approx([v for _, v in top], abs=ATOL)
        assert all(t.bytes == list(t.token.encode()) for t in g.top_logprobs if t.token[:6] != "bytes:")


def test_chat_logprobs_whole_and_streamed_equal_transformers(live, sharp, tok):
    client, _ = live
    answer, logprobs = greedy(sharp[1], tok.chat_tokens(QUESTION), 10)
    want = expected_chat(tok, answer, logprobs, 5)
    kw = dict(model="tiny", messages=QUESTION, temperature=0, max_tokens=10, logprobs=True, top_logprobs=5)
    whole = client.chat.completions.create(**kw)
    assert whole.choices[0].logprobs.refusal is None
    assert_chat_entries(whole.choices[0].logprobs.content, want)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == len(want)
    streamed, text = [], []
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            streamed += c.logprobs.content if c.logprobs else []
            text.append(c.delta.content or "")
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in whole.choices[0].logprobs.content]
    assert "".join(text) == whole.choices[0].message.content
    plain = client.chat.completions.create(**kw | dict(logprobs=False, top_logprobs=None))
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == "".join(text)


def test_chat_logprobs_without_top(live, sharp, tok):
    answer, logprobs = greedy(sharp[1], tok.chat_tokens(QUESTION), 4)
    r = live[0].chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=4,
                                        logprobs=True)
    assert_chat_entries(r.choices[0].logprobs.content, expected_chat(tok, answer, logprobs, 0))


def test_completions_logprobs_whole_and_streamed_equal_transformers(live, sharp, tok):
    client, _ = live
    answer, logprobs = greedy(sharp[1], tok.encode(PROMPT, bos=True), 10)
    kw = dict(model="tiny", prompt=PROMPT, temperature=0, max_tokens=10, logprobs=3)
    whole = client.completions.create(**kw)
    got = whole.choices[0].logprobs
    names = [token_name(tok, t)[0] for t in answer]
    assert got.tokens == names
    assert got.token_logprobs == pytest.approx([lp[t] for t, lp in zip(answer, logprobs)], abs=ATOL)
    for top, token, lp in zip(got.top_logprobs, answer, logprobs):  # the top 3 and the chosen token
        want = {token_name(tok, int(t))[0]: lp[t] for t in [*np.argsort(-lp)[:3], token]}
        assert top == pytest.approx(want, abs=ATOL)
    text = whole.choices[0].text
    ends = [len(tok.decode(answer[:i + 1])) for i in range(len(answer))]
    assert got.text_offset == [0, *ends[:-1]] and ends[-1] == len(text)
    chunks = [c.choices[0].logprobs for c in client.completions.create(stream=True, **kw) if c.choices]
    joined = {k: sum((getattr(c, k) for c in chunks if c), []) for k in ("tokens", "token_logprobs",
                                                                          "top_logprobs", "text_offset")}
    assert joined == {k: getattr(got, k) for k in joined}


def sampled_expectation(hf, prompt, answer, temp, top_p):
    """Per answer token: the log_softmax of transformers' logits / temp over the smallest set of most
    likely tokens whose mass reaches top_p (the others -inf)."""
    lp = log_softmax(oracle(hf, prompt + answer)[len(prompt) - 1:-1] / temp)
    out = []
    for row in lp:
        order = np.argsort(-row)
        before = np.cumsum(np.exp(row[order])) - np.exp(row[order])
        kept = order[before < top_p]
        renorm = np.full_like(row, -np.inf)
        renorm[kept] = row[kept] - np.log(np.exp(row[kept]).sum())
        out.append(renorm)
    return out


def test_sampled_rows_use_the_filtered_distribution(live, sharp, tok):
    """temperature 0.7, top_p 0.9: the chosen token's logprob and the top 20 are those of the
    distribution after temperature and top_p (renormalized); tokens top_p removed are not listed."""
    _, sched = live
    prompt = tok.encode(PROMPT, bos=True)
    events = list(sched.submit(Request(prompt, 12, 0.7, 0.9, seed=3, logprobs=20)).events())
    answer = [e.token for e in events]
    want = sampled_expectation(sharp[1], prompt, answer, 0.7, 0.9)
    short = 0
    for e, lp in zip(events, want):
        kept = int(np.isfinite(lp).sum())
        assert np.isfinite(e.logprob.logprob) and e.logprob.logprob == pytest.approx(lp[e.token], abs=ATOL)
        assert [t for t, _ in e.logprob.top] == list(np.argsort(-lp)[:min(kept, 20)])
        assert [v for _, v in e.logprob.top] == pytest.approx(np.sort(lp)[::-1][:min(kept, 20)], abs=ATOL)
        short += kept < 20
    assert short >= len(events) // 2  # top_p left fewer than 20 tokens: the rest were not listed


def penalized_expectation(hf, prompt, answer, penalty, context=64):
    """Per answer token: log_softmax of transformers' logits after the repetition penalty (CTRL's,
    over the last `context` tokens before it, prompt included)."""
    logits, out = oracle(hf, prompt + answer)[len(prompt) - 1:-1], []
    for i, row in enumerate(logits):
        recent = np.unique((prompt + answer[:i])[-context:])
        row = row.copy()
        row[recent] = np.where(row[recent] > 0, row[recent] / penalty, row[recent] * penalty)
        out.append(log_softmax(row))
    return out


def test_repetition_penalty_is_in_the_distribution(live, sharp, tok):
    _, sched = live
    prompt = tok.encode(PROMPT, bos=True)
    events = list(sched.submit(Request(prompt, 10, repetition_penalty=1.5, logprobs=2)).events())
    answer = [e.token for e in events]
    for e, lp in zip(events, penalized_expectation(sharp[1], prompt, answer, 1.5)):
        assert e.token == int(lp.argmax()) and e.logprob.logprob == pytest.approx(lp.max(), abs=ATOL)
        assert [t for t, _ in e.logprob.top] == list(np.argsort(-lp)[:2])


def test_a_grammar_row_lists_only_tokens_its_grammar_allows(live, sharp, tok):
    """A JSON-object row (greedy): the log-softmax over the tokens the grammar allows, so no chosen
    token is less likely than under the raw logits (the first far more), and the first token's list
    holds only tokens that may begin a JSON object."""
    _, sched = live
    prompt = tok.encode(PROMPT, bos=True)
    constraint = sched.grammars.for_chat({"type": "json_object"}, [], None)
    events = [e for e in sched.submit(Request(prompt, 6, constraint=constraint, logprobs=20)).events() if e.token]
    raw = log_softmax(oracle(sharp[1], prompt + [e.token for e in events])[len(prompt) - 1:-1])
    for e, lp in zip(events, raw):
        assert e.logprob.logprob >= lp[e.token] - ATOL and e.logprob.top[0] == (e.token, e.logprob.logprob)
        assert sum(np.exp(v) for _, v in e.logprob.top) <= 1 + 1e-5
    assert events[0].logprob.logprob > raw[0][events[0].token] + 1  # most tokens cannot begin an object
    first = [tok.decode([t]) for t, _ in events[0].logprob.top]
    assert first and all(text.strip()[:1] in ("{", "") for text in first), first


def test_rows_with_and_without_logprobs_in_one_batch_equal_their_solo_runs(live, tok):
    _, sched = live
    base = tok.encode(PROMPT * 3, bos=True)
    prompts = [base[:8 + 5 * i] for i in range(6)]
    settings = [dict(logprobs=5), dict(), dict(temperature=0.7, top_p=0.9, seed=1, logprobs=0),
                dict(temperature=0.9, seed=2), dict(repetition_penalty=1.3, logprobs=20),
                dict(repetition_penalty=1.3)]

    def run(requests):
        return [[(e.token, e.logprob) for e in r.events() if e.token is not None] for r in requests]

    solo = [run([sched.submit(Request(p, 12, **kw))])[0] for p, kw in zip(prompts, settings)]
    sched.call(sched.counters.update, max_rows=0)
    batched = run([sched.submit(Request(p, 12, **kw)) for p, kw in zip(prompts, settings)])
    assert sched.stats()["max_rows"] >= 4  # they did share decode steps
    for s, b, kw in zip(solo, batched, settings):
        assert [t for t, _ in b] == [t for t, _ in s]
        if "logprobs" not in kw:
            assert all(lp is None for _, lp in b)
            continue
        for (_, got), (_, want) in zip(b, s):
            assert got.logprob == pytest.approx(want.logprob, abs=1e-5)
            assert [t for t, _ in got.top] == [t for t, _ in want.top] and len(got.top) <= kw["logprobs"]


def test_eos_has_no_entry_and_control_tokens_are_named(sharp, tok):
    """A scripted answer with a control token (<s>) that ends with EOS: one entry per token before
    EOS (OpenAI lists none for it), <s> by its name with bytes null, usage still counting EOS."""
    script = Script(tok.eos_id)
    script.ids = [*tok.encode("Hello"), tok.bos_id, *tok.encode("world"), tok.eos_id]
    with serving(sharp[0], script) as (client, _):
        for stream in (False, True):
            r = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=20, logprobs=True,
                                               top_logprobs=1, stream=stream)
            chunks = list(r) if stream else [r]
            content = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
            assert [(e.token, e.bytes) for e in content] == [token_name(tok, t) for t in script.ids[:-1]]
            named = content[script.ids.index(tok.bos_id)]
            assert named.token == "<s>" and named.bytes is None
            if not stream:
                assert r.usage.completion_tokens == len(script.ids) and r.choices[0].finish_reason == "stop"


BAD = [
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": False, "top_logprobs": 0}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": 3}, "logprobs"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"logprobs": -1}, "logprobs"),
    ("/v1/completions", {"logprobs": True}, "logprobs"),
]


@pytest.mark.parametrize("path, fields, param", BAD, ids=[f"{p[4:]}-{f}" for p, f, _ in BAD])
def test_bad_logprobs_get_a_400_naming_the_field(live, path, fields, param):
    body = {"model": "tiny", "max_tokens": 2} | fields
    body |= {"messages": QUESTION} if "chat" in path else {"prompt": PROMPT}
    r = httpx.post(str(live[0].base_url).rstrip("/") + path.removeprefix("/v1"), json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert param in error["message"] and error["type"] == "invalid_request_error"
