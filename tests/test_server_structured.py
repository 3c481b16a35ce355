"""Structured output through the server and the official openai client, on a tiny random-weight
V3 model (uvicorn in a thread, on 127.0.0.1): response_format, tool_choice, a batch mixing
constrained and free rows, and the errors."""

import json
import threading
import time

import httpx
import jsonschema
import openai
import pytest

import mlx_mistral.serve.batch as batch_module
from checkpoints import TOKENIZER_V3
from mlx_mistral.structured import MAX_SCHEMA_BYTES, MAX_SCHEMA_DEPTH
from structured_cases import BOUNDED, Closing, write_model
from test_server_tools import serving

SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": BOUNDED, "strict": True}}
LOOKUP = {"type": "function", "function": {"name": "lookup", "description": "Look a city up", "strict": True,
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "maxLength": 12},
                                               "unit": {"enum": ["c", "f"]}},
                                               "required": ["city", "unit"], "additionalProperties": False}}}
OTHER = {"type": "function", "function": {"name": "other", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """(client, scheduler) of a tiny V3 model served with 16 rows."""
    path = write_model(tmp_path_factory.mktemp("v3"), TOKENIZER_V3)
    with serving(path, None, max_batch=16) as (client, sched):
        yield client, sched


def streamed(client, i: int, **kw) -> dict:
    """One streamed chat: its content pieces (one a token, as they come), calls, finish reason, usage."""
    out = {"pieces": [], "calls": {}, "finish": None, "usage": None}
    for chunk in client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"person {i}"}],
                                                stream=True, stream_options={"include_usage": True}, **kw):
        out["usage"] = chunk.usage or out["usage"]
        for c in chunk.choices:
            out["pieces"].append(c.delta.content or "")
            out["finish"] = c.finish_reason or out["finish"]
            for d in c.delta.tool_calls or []:
                out["calls"][d.index] = (d.function.name, json.loads(d.function.arguments))
    return out


def check(out: dict, kw: dict) -> None:
    """A constrained answer is what it must be: JSON valid for the schema, or calls of the tool named."""
    if "tool_choice" in kw:
        assert out["finish"] == "tool_calls" and out["calls"], out
        for name, arguments in out["calls"].values():
            assert name == "lookup"
            jsonschema.validate(arguments, LOOKUP["function"]["parameters"])
    else:
        assert out["finish"] == "stop", out
        jsonschema.validate(json.loads("".join(out["pieces"])), BOUNDED)


def test_sixteen_clients_mixing_constrained_and_free_rows(live):
    """16 streamed clients admitted as one batch: free greedy rows, rows under a JSON schema (greedy
    and at temperature 1) and named strict tool calls. Each free row equals its solo run piece for
    piece, each constrained row is valid, and the greedy ones equal their solo runs too."""
    client, sched = live
    kinds = [dict(temperature=0, max_tokens=32),
             dict(temperature=0, max_tokens=120, response_format=SCHEMA_FORMAT),
             dict(temperature=1, seed=7, max_tokens=120, response_format=SCHEMA_FORMAT),
             dict(temperature=0, max_tokens=120, tools=[LOOKUP, OTHER],
                  tool_choice={"type": "function", "function": {"name": "lookup"}})]
    requests = [kinds[i % 4] for i in range(16)]
    outs: list[dict] = [{} for _ in requests]
    held = threading.Thread(target=sched.call, args=(wait_for, sched, 16))  # the scheduler waits for all 16
    held.start()
    clients = [threading.Thread(target=lambda i=i: outs[i].update(streamed(client, i, **requests[i])))
               for i in range(16)]
    for t in clients:
        t.start()
    for t in clients + [held]:
        t.join(120)
    assert sched.stats()["max_rows"] == 16  # they were decoded side by side
    for i, (out, kw) in enumerate(zip(outs, requests)):
        if "response_format" in kw or "tool_choice" in kw:
            check(out, kw)
        if kw["temperature"] == 0:
            solo = streamed(client, i, **kw)
            assert (out["pieces"], out["calls"], out["finish"]) == (solo["pieces"], solo["calls"], solo["finish"])
            assert out["usage"].completion_tokens == solo["usage"].completion_tokens


def wait_for(sched, n: int, timeout: float = 60) -> None:
    """On the model thread: return once `n` requests wait (or after `timeout`)."""
    deadline = time.monotonic() + timeout
    while sched.stats()["waiting"] < n and time.monotonic() < deadline:
        time.sleep(0.01)


def test_json_object_and_tool_choice_required_whole(live, monkeypatch):
    """Any object, and calls of any number (tool_choice "required"): walks a random model may not
    end, so each row's sampler is one that goes for closing tokens after 40 steps (Closing: it
    gets the row's masked logits, so the mask still decides what is valid)."""
    client, sched = live
    vocab = sched.model.args.vocab_size
    monkeypatch.setattr(batch_module, "make_picker", lambda temp, top_p=1.0, top_k=0, seed=None:
                        Closing(sched.tokenizer, vocab, temp, after=40, seed=seed).pick)
    answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            response_format={"type": "json_object"}, max_tokens=200, seed=3)
    assert answer.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(answer.choices[0].message.content), dict)
    calls = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                           tools=[LOOKUP], tool_choice="required", max_tokens=200, seed=3)
    [choice] = calls.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    for call in choice.message.tool_calls:
        assert call.function.name == "lookup" and len(call.id) == 9
        jsonschema.validate(json.loads(call.function.arguments), LOOKUP["function"]["parameters"])
    one = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], tools=[LOOKUP],
                                         tool_choice="required", parallel_tool_calls=False, max_tokens=200, seed=3)
    assert one.choices[0].finish_reason == "tool_calls" and len(one.choices[0].message.tool_calls) == 1


def deep(levels: int) -> dict:
    schema = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


ERRORS = [  # (request fields, the error's param, what its message says)
    (dict(response_format=schema_format({"type": "object", "properties": {"a": {"type": "strng"}}})),
     "response_format", "failed to compile JSON schema: Invalid type: strng"),
    (dict(response_format=schema_format({"type": "array", "uniqueItems": True})),
     "response_format", 'failed to compile JSON schema: Unimplemented keys: ["uniqueItems"]'),
    (dict(response_format=schema_format({"type": "integer", "minimum": 5, "maximum": 1})),
     "response_format", "Unsatisfiable schema: minimum (5) is greater than maximum (1)"),
    (dict(response_format=schema_format({"type": "object", "description": "x" * MAX_SCHEMA_BYTES})),
     "response_format.json_schema.schema", f"the JSON schema is larger than {MAX_SCHEMA_BYTES} bytes"),
    (dict(response_format=schema_format(deep(MAX_SCHEMA_DEPTH))),
     "response_format.json_schema.schema", f"the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels"),
    (dict(tools=[LOOKUP], tool_choice={"type": "function", "function": {"name": "nowhere"}}),
     "tool_choice", "no tool named 'nowhere' among the tools offered"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
     "response_format.json_schema", "expected {'name': ..., 'schema': {...}}, with its schema"),
    (dict(response_format={"type": "yaml"}),
     "response_format.type", "expected 'text', 'json_object' or 'json_schema', got 'yaml'"),
]


@pytest.mark.parametrize("fields, param, says", ERRORS, ids=[
    "invalid schema", "unsupported keyword", "unsatisfiable", "too large", "too deep", "tool not offered",
    "json_schema without schema", "unknown type"])
def test_errors_are_400_with_openai_bodies(live, fields, param, says):
    client = live[0]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **fields}
    r = httpx.post(str(client.base_url) + "chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error == {"message": error["message"], "type": "invalid_request_error", "param": param, "code": None}
    assert error["message"].startswith(param + ": ") and says in error["message"], error["message"]
    assert "\n" not in error["message"] and "SAFE_WS" not in error["message"]  # no grammar listing
    with pytest.raises(openai.BadRequestError) as e:  # the official client reads it as OpenAI's
        client.chat.completions.create(**body)
    assert e.value.status_code == 400 and e.value.body == error
    health = httpx.get(str(client.base_url).removesuffix("v1/") + "health", timeout=10)
    assert health.json() == {"status": "ok"}


def test_unsatisfiable_within_max_tokens_ends_with_length(live):
    """A valid grammar whose shortest answer is longer than max_tokens: finish_reason "length"
    with usage, whole and streamed, as OpenAI's does."""
    client = live[0]
    fmt = schema_format({"type": "object", "properties": {"s": {"type": "string", "minLength": 64}},
                         "required": ["s"], "additionalProperties": False})
    whole = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "person 0"}],
                                           response_format=fmt, max_tokens=8, temperature=0)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 8 and whole.usage.prompt_tokens > 0
    out = streamed(client, 0, response_format=fmt, max_tokens=8, temperature=0)
    assert out["finish"] == "length" and out["usage"].completion_tokens == 8
    assert "".join(out["pieces"]) == whole.choices[0].message.content
