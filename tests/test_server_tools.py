"""Function calling through the server: OpenAI's tools / tool_calls / role "tool", with the official client
against a live server (uvicorn in a thread, on 127.0.0.1) whose model's answers are scripted token ids."""

import json
import threading
import time
from contextlib import contextmanager

import httpx
import mlx.core as mx
import openai
import pytest
import uvicorn

import mlx_mistral.serve.batch as scheduler_module
from checkpoints import TOKENIZER_V3, tiny_config, write_hf
from mlx_mistral.serve import Scheduler, create_app
from mlx_mistral.tokenizer import Tokenizer
from test_server import free_port

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
PROMPT = [{"role": "user", "content": "Weather in Zürich and Paris?"}]
CALLS = '[{"name": "get_weather", "arguments": {"city": "Zürich"}}, ' \
        '{"name": "get_weather", "arguments": {"city": "Paris"}}]'


class Script:
    """The next answer's token ids: every picker (a row's sampler) made from now on plays them
    (then EOS forever)."""

    def __init__(self, eos: int):
        self.ids, self.eos = [], eos

    def picker(self, *args, **kwargs):
        script = iter(self.ids)
        return lambda logits, positions=None: (mx.array([next(script, self.eos)], dtype=mx.uint32), logits)


@contextmanager
def serving(path, script: "Script | None", max_batch: int = 2, max_kv_size: int | None = None, **app_kw):
    """(client, scheduler) of the model at `path` served in this process (uvicorn in a thread, on
    127.0.0.1), every row's sampler playing `script` if given; `app_kw` go to create_app."""
    patch = pytest.MonkeyPatch()
    if script:
        patch.setattr(scheduler_module, "make_picker", script.picker)
    sched = Scheduler(str(path), max_batch=max_batch, max_kv_size=max_kv_size)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(sched, name="tiny", **app_kw), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=30), sched
    finally:
        server.should_exit = True
        thread.join(30)
        sched.close()
        patch.undo()


def tiny_v3(tmp_path_factory) -> tuple:
    """(directory, tokenizer, script) of a tiny V3-tokenizer model whose answers the script plays."""
    path = tmp_path_factory.mktemp("v3")
    write_hf(path, tiny_config(vocab_size=32768), tokenizer=TOKENIZER_V3)
    tok = Tokenizer(TOKENIZER_V3)
    return path, tok, Script(tok.eos_id)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """(client, scheduler, script, tokenizer) for a tiny V3-tokenizer model served in this process."""
    path, tok, script = tiny_v3(tmp_path_factory)
    with serving(path, script) as (client, sched):
        yield client, sched, script, tok


def ask(client, messages, stream=False, **kw):
    # temperature > 0: every token goes through the row's (scripted) sampler, none through argmax
    return client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], temperature=1,
                                          max_tokens=100, stream=stream, **kw)


def streamed(client, messages, **kw):
    """(content, {index: call}, finish_reason, usage) from the chunks, joined as OpenAI clients join them."""
    content, calls, finish, usage = "", {}, None, None
    for chunk in ask(client, messages, stream=True, stream_options={"include_usage": True}, **kw):
        usage = chunk.usage or usage
        for c in chunk.choices:
            content += c.delta.content or ""
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += d.id or ""
                call["name"] += d.function.name or ""
                call["arguments"] += d.function.arguments or ""
                assert d.type in (None, "function")
    return content, calls, finish, usage


def test_tool_calls_round_trip_whole_and_streamed(live):
    client, sched, script, tok = live
    script.ids = [tok.tool_calls_id, *tok.encode(CALLS), tok.eos_id]
    whole = ask(client, PROMPT)
    [choice] = whole.choices
    assert (choice.finish_reason, choice.message.content) == ("tool_calls", None)
    calls = choice.message.tool_calls
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in calls] == \
        [("function", "get_weather", {"city": "Zürich"}), ("function", "get_weather", {"city": "Paris"})]
    assert whole.usage.prompt_tokens == len(tok.chat_tokens(PROMPT, tools=[WEATHER]))

    content, streamed_calls, finish, usage = streamed(client, PROMPT)
    assert (content, finish) == ("", "tool_calls")
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(streamed_calls.items())] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in calls]
    assert all(len(c["id"]) == 9 for c in streamed_calls.values())
    # on the wire: the role, the calls in one chunk, the finish reason, [DONE]
    body = {"model": "tiny", "messages": PROMPT, "tools": [WEATHER], "temperature": 1, "stream": True}
    lines = httpx.post(str(client.base_url) + "chat/completions", json=body, timeout=30).text.split("\n\n")
    assert lines[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(line.removeprefix("data: "))["choices"][0] for line in lines[:-2]]
    assert [(c["delta"], c["finish_reason"]) for c in chunks[::2]] == [({"role": "assistant", "content": ""}, None),
                                                                      ({}, "tool_calls")]
    assert [(d["index"], d["type"], d["function"]["name"]) for d in chunks[1]["delta"]["tool_calls"]] == \
        [(0, "function", "get_weather"), (1, "function", "get_weather")]
    assert sched.stats()["tool_calls"] == 3

    # the calls and their results go back; the prompt is mistral-common's encoding of the same messages
    follow = PROMPT + [{"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]}] \
        + [{"role": "tool", "tool_call_id": c.id, "content": f"sunny in {json.loads(c.function.arguments)['city']}"}
           for c in calls]
    script.ids = [*tok.encode("Sunny in both."), tok.eos_id]
    answer = ask(client, follow)
    assert (answer.choices[0].message.content.strip(), answer.choices[0].finish_reason) == ("Sunny in both.", "stop")
    assert answer.choices[0].message.tool_calls is None
    assert answer.usage.prompt_tokens == len(tok.chat_tokens(follow, tools=[WEATHER]))


def test_malformed_call_is_an_error_and_tool_choice_none_never_calls(live):
    """With tools offered an answer that begins with [TOOL_CALLS] follows the calls' grammar; a
    sampler that ignores the mask (this scripted one) ends the row with an error, never with
    unchecked text."""
    client, sched, script, tok = live
    body = '[{"name": "get_weather", "arguments": {"city": }]'
    script.ids = [tok.tool_calls_id, *tok.encode(body), tok.eos_id]
    with pytest.raises(openai.InternalServerError, match="broke the grammar"):
        ask(client, PROMPT)
    with pytest.raises(openai.APIError, match="broke the grammar"):
        streamed(client, PROMPT)

    # "none": the tools are left out of the prompt, and a call the model makes anyway stays text
    script.ids = [tok.tool_calls_id, *tok.encode(CALLS), tok.eos_id]
    none = ask(client, PROMPT, tool_choice="none")
    assert (none.choices[0].finish_reason, none.choices[0].message.tool_calls) == ("stop", None)
    assert none.choices[0].message.content.strip() == CALLS
    assert none.usage.prompt_tokens == len(tok.chat_tokens(PROMPT))


@pytest.mark.parametrize("kw, param, says", [
    ({"tool_choice": "sometimes"}, "tool_choice", "expected 'auto', 'none', 'required'"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice",
     "no tool named 'get_time'"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name",
     "Field required"),
    ({"messages": [{"role": "tool", "tool_call_id": "abcdefghi"}]}, "messages.0", "a tool message needs its content"),
])
def test_bad_tool_requests_get_400(live, kw, param, says):
    client = live[0]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{"model": "tiny", "messages": PROMPT, "tools": [WEATHER], **kw})
    assert e.value.body["param"] == param and says in e.value.body["message"]


def test_tools_on_a_v1_tokenizer_get_400_and_served_names(tmp_path):
    """The demo model's tokenizer is V1: no function calling, said without a path of this machine
    (and no server needed to see it). --served-model-name's names are listed and answered as
    asked; any other name is served by the one model, the response naming the first."""
    from fastapi.testclient import TestClient

    from mlx_mistral.serve.app import served_name

    (tmp_path / "Mistral-7B").mkdir()
    (tmp_path / "x.Q4_K_M.gguf").write_bytes(b"")
    assert [served_name(str(p)) for p in (tmp_path / "Mistral-7B", tmp_path / "x.Q4_K_M.gguf")] == \
        ["Mistral-7B", "x.Q4_K_M"]
    assert served_name("org/name") == "org/name" and served_name("demo") == "demo"
    sched = Scheduler("demo", max_batch=1)
    try:
        with TestClient(create_app(sched)) as http:
            r = http.post("/v1/chat/completions", json={"model": "demo", "messages": PROMPT, "tools": [WEATHER]})
        with TestClient(create_app(sched, name=["mistral", "alias"])) as http:
            assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["mistral", "alias"]
            answered = [http.post("/v1/chat/completions", json={"model": name, "messages": PROMPT, "max_tokens": 1,
                                                                "temperature": 0}).json()["model"]
                        for name in ("alias", "gpt-9")]
            assert answered == ["alias", "mistral"]
    finally:
        sched.close()
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    message = r.json()["error"]["message"]
    assert message.startswith("demo: a v1 tokenizer has no function calling") and "/" not in message  # no server path
