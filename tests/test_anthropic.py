"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens) with the official `anthropic` SDK
against a live server (uvicorn in a thread, test_server_tools.serving): a tiny V3-tokenizer model
whose answers at temperature > 0 are scripted token ids; at temperature 0 it answers greedily."""

import json
from concurrent.futures import Future

import anthropic
import httpx
import jsonschema
import pytest
from fastapi.testclient import TestClient

import mlx_mistral.serve.batch as batch_module
from mlx_mistral.serve import QueueFull, create_app
from mlx_mistral.serve.anthropic import signature
from mlx_mistral.tokenizer import Tokenizer
from checkpoints import write_tekken
from structured_cases import BOUNDED, Closing
from test_reasoning import answer_ids
from test_server_tools import CALLS, WEATHER, Script, serving, tiny_v3

KEY = "test-key"
TOOL = {"name": "get_weather", "description": "The weather in a city",
        "input_schema": WEATHER["function"]["parameters"]}
ASK = [{"role": "user", "content": "Weather in Zürich and Paris?"}]
SCRIPTED = {"temperature": 1}  # every token through the row's scripted sampler (Anthropic's SDK no longer names it)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """(Anthropic client, base url, scheduler, script, tokenizer) of a tiny V3 model served with an API key."""
    path, tok, script = tiny_v3(tmp_path_factory)
    with serving(path, script, api_key=KEY) as (openai_client, sched):
        url = str(openai_client.base_url).removesuffix("/v1/")
        yield anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0, timeout=30), url, sched, script, tok


def create(client, messages=ASK, stream=False, **kw):
    kw = {"model": "tiny", "max_tokens": 100, "messages": messages, "extra_body": SCRIPTED} | kw
    if stream:
        with client.messages.stream(**kw) as s:
            return "".join(s.text_stream), s.get_final_message()
    return client.messages.create(**kw)


def wire(url, body, headers=None) -> list[tuple[str, dict]]:
    """The (event name, data) of a streamed answer, as sent."""
    h = {"x-api-key": KEY, "anthropic-version": "2023-06-01"} | (headers or {})
    text = httpx.post(url + "/v1/messages", json=body | {"stream": True}, headers=h, timeout=30).text
    frames = [f.split("\n") for f in text.split("\n\n") if f]
    assert all(len(f) == 2 and f[0].startswith("event: ") and f[1].startswith("data: ") for f in frames), text
    return [(f[0][7:], json.loads(f[1][6:])) for f in frames]


def blocks(message) -> list[dict]:
    """The content blocks of a message, whole or accumulated from a stream (less the SDK's parse of them)."""
    return [b.model_dump(exclude={"parsed_output"}) for b in message.content]


def prompt(usage) -> int:
    return usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens


def test_greedy_message_whole_and_streamed_are_one_answer(live):
    client, _, _, _, tok = live
    kw = {"system": "Be brief.", "max_tokens": 8, "extra_body": {"temperature": 0}}
    whole = create(client, **kw)
    assert (whole.type, whole.role, whole.model, whole.id[:4]) == ("message", "assistant", "tiny", "msg_")
    assert (whole.stop_reason, whole.stop_sequence, whole.usage.output_tokens) == ("max_tokens", None, 8)
    [block] = whole.content
    text, final = create(client, stream=True, **kw)
    assert text == block.text and text
    assert blocks(final) == blocks(whole) and (final.stop_reason, final.usage.output_tokens) == ("max_tokens", 8)
    expected = len(tok.chat_tokens([{"role": "system", "content": "Be brief."}, *ASK]))
    assert prompt(whole.usage) == prompt(final.usage) == expected
    count = client.messages.count_tokens(model="tiny", system="Be brief.", messages=ASK)
    assert count.input_tokens == expected == whole.usage.input_tokens + whole.usage.cache_read_input_tokens


def test_stream_events_in_anthropics_order(live):
    client, url, _, script, tok = live
    script.ids = [*tok.encode("Hello there, friend"), tok.eos_id]
    events = wire(url, {"model": "tiny", "max_tokens": 50, "messages": ASK, **SCRIPTED})
    names = [name for name, _ in events]
    deltas = len(names) - 6
    assert names == ["message_start", "ping", "content_block_start", *["content_block_delta"] * deltas,
                     "content_block_stop", "message_delta", "message_stop"] and deltas >= 2
    assert all(data["type"] == name for name, data in events)
    start = events[0][1]["message"]
    assert (start["content"], start["stop_reason"], start["role"]) == ([], None, "assistant")
    assert events[2][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert "".join(d["delta"]["text"] for _, d in events[3:3 + deltas]).strip() == "Hello there, friend"
    assert events[-2][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert events[-2][1]["usage"]["output_tokens"] == len(script.ids)


def test_system_and_content_blocks_encode_as_openai_parts(live):
    client, _, _, _, tok = live
    system = [{"type": "text", "text": "Be brief."},
              {"type": "text", "text": "Really.", "cache_control": {"type": "ephemeral"}}]
    user = [{"type": "text", "text": "What is"}, {"type": "text", "text": "2 + 2?"}]
    count = client.messages.count_tokens(model="tiny", system=system, messages=[{"role": "user", "content": user}])
    parts = [{"type": "text", "text": b["text"]} for b in system]
    assert count.input_tokens == len(tok.chat_tokens([{"role": "system", "content": parts},
                                                      {"role": "user", "content": user}]))


def test_claude_codes_request_shape_is_served(live, tmp_path):
    """What Claude Code 2.1 sends (../shared/notes/agent-clients.md): system blocks with
    cache_control, a system-role message inside `messages`, thinking adaptive, output_config's
    effort, context_management clear_thinking, metadata, max_tokens 32000 past the context (cut to
    what the context leaves): a streamed answer. mistral-common folds the system message into the
    one system prompt with a V3 template, and keeps it in place from V7 on."""
    client, _, _, script, tok = live
    script.ids = [*tok.encode("Hi!"), tok.eos_id]
    system = [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1"},
              {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}]
    messages = [{"role": "user", "content": [{"type": "text", "text": "<system-reminder>be kind</system-reminder>"},
                                             {"type": "text", "text": "Say hi", "cache_control": {"type": "ephemeral"}}]},
                {"role": "system", "content": "Available agent types: general-purpose"}]
    extra = {"thinking": {"type": "adaptive"}, "output_config": {"effort": "high"},
             "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}} | SCRIPTED
    text, message = create(client, messages, stream=True, system=system, max_tokens=32000,
                           metadata={"user_id": json.dumps({"device_id": "x"})}, extra_body=extra)
    assert (text.strip(), message.stop_reason) == ("Hi!", "end_turn")
    plain = [{"role": "system", "content": [{"type": "text", "text": b["text"]} for b in system]},
             {"role": "user", "content": [{"type": "text", "text": b["text"]} for b in messages[0]["content"]]},
             {"role": "system", "content": messages[1]["content"]}]
    assert prompt(message.usage) == len(tok.chat_tokens(plain))
    assert tok.decode(tok.chat_tokens(plain)).index("Available agent") < tok.decode(tok.chat_tokens(plain)).index("Say hi")
    v7 = Tokenizer(write_tekken(tmp_path / "tekken.json", "v7"))
    pieces = [v7.piece(i) for i in v7.chat_tokens(plain) if i in v7.control_ids]
    assert pieces[-2:] == ["[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]  # after the user turn, in place


def test_clear_tool_uses_clears_all_but_the_latest_results(live):
    """context_management's clear_tool_uses: past its trigger, every tool result but the `keep` latest
    (and those of exclude_tools) becomes a placeholder; the prompt is the cleared conversation's, and
    applied_edits says what was cleared. Below clear_at_least nothing is cleared."""
    client, _, _, script, tok = live
    messages = [{"role": "user", "content": "Weather?"}]
    for i, tool in enumerate(["get_weather", "get_weather", "get_time", "get_weather"]):
        use = {"type": "tool_use", "id": f"toolu_{i}", "name": tool, "input": {"city": f"city {i}"}}
        result = f"result {i}: " + "sunny and warm " * 6
        messages += [{"role": "assistant", "content": [use]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"toolu_{i}", "content": result}]}]
    tools = [TOOL, TOOL | {"name": "get_time"}]
    edit = {"type": "clear_tool_uses_20250919", "trigger": {"type": "input_tokens", "value": 100},
            "keep": {"type": "tool_uses", "value": 1}, "exclude_tools": ["get_time"]}
    script.ids = [*tok.encode("Done."), tok.eos_id]
    answer = create(client, messages, tools=tools, extra_body=SCRIPTED | {"context_management": {"edits": [edit]}})
    [applied] = answer.model_dump()["context_management"]["applied_edits"]
    assert (applied["type"], applied["cleared_tool_uses"]) == ("clear_tool_uses_20250919", 2)  # results 0 and 1
    plain = create(client, messages, tools=tools).usage
    assert prompt(plain) - prompt(answer.usage) == applied["cleared_input_tokens"] > 0
    cleared = [m | {"content": [{"type": "tool_result", "tool_use_id": m["content"][0]["tool_use_id"],
                                 "content": "[tool result cleared]"}]} if i in (2, 4) else m
               for i, m in enumerate(messages)]
    assert prompt(create(client, cleared, tools=tools).usage) == prompt(answer.usage)
    below = edit | {"clear_at_least": {"type": "input_tokens", "value": 10**6}}
    untouched = create(client, messages, tools=tools, extra_body=SCRIPTED | {"context_management": {"edits": [below]}})
    assert (untouched.model_dump()["context_management"]["applied_edits"], prompt(untouched.usage)) == ([], prompt(plain))


def test_any_model_name_is_served_by_the_one_model(live):
    """Claude Code's side calls name its small/fast model by a Claude name: the loaded model answers
    them, and the response's `model` says which model answered."""
    client, _, _, script, tok = live
    script.ids = [*tok.encode("ok"), tok.eos_id]
    message = create(client, model="claude-haiku-4-5")
    assert message.model == "tiny" and message.content[0].text.strip() == "ok"
    assert client.messages.count_tokens(model="claude-haiku-4-5", messages=ASK).input_tokens == \
        len(tok.chat_tokens(ASK))


def test_cache_creation_counts_the_prompt_blocks_written(live):
    """A new long prompt writes its whole 128-token blocks to the prefix cache
    (cache_creation_input_tokens); sent again, they are read (cache_read_input_tokens) and none is
    written; the three counts always sum to the prompt."""
    client, _, _, script, tok = live
    script.ids = [*tok.encode("ok"), tok.eos_id]
    long = [{"role": "user", "content": " ".join(f"word{i}" for i in range(150))}]
    n = client.messages.count_tokens(model="tiny", messages=long).input_tokens
    first, again = create(client, long).usage, create(client, long).usage
    assert n > 300 and first.cache_creation_input_tokens == (n - 1) // 128 * 128 and first.cache_read_input_tokens == 0
    assert again.cache_read_input_tokens >= first.cache_creation_input_tokens and again.cache_creation_input_tokens == 0
    assert prompt(first) == prompt(again) == n


def test_stop_sequences_and_max_tokens(live):
    client, _, _, script, tok = live
    script.ids = [*tok.encode("Hello world. Bye now."), tok.eos_id]
    for stream in (False, True):
        message = create(client, stop_sequences=["never", "world"], stream=stream)
        message = message[1] if stream else message
        assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "world")
        assert message.content[0].text.strip() == "Hello"
    short = create(client, max_tokens=3)
    assert (short.stop_reason, short.stop_sequence, short.usage.output_tokens) == ("max_tokens", None, 3)
    whole = create(client)
    assert (whole.stop_reason, whole.content[0].text.strip()) == ("end_turn", "Hello world. Bye now.")


def test_tool_use_round_trip_whole_and_streamed(live):
    client, url, sched, script, tok = live
    script.ids = [tok.tool_calls_id, *tok.encode(CALLS), tok.eos_id]
    whole = create(client, tools=[TOOL])
    assert whole.stop_reason == "tool_use"
    assert [(b.type, b.name, b.input) for b in whole.content] == \
        [("tool_use", "get_weather", {"city": "Zürich"}), ("tool_use", "get_weather", {"city": "Paris"})]
    assert all(len(b.id) == 9 and b.id.isalnum() for b in whole.content)
    _, final = create(client, tools=[TOOL], stream=True)
    assert [(b.name, b.input) for b in final.content] == [(b.name, b.input) for b in whole.content]
    assert final.stop_reason == "tool_use"
    events = wire(url, {"model": "tiny", "max_tokens": 100, "messages": ASK, "tools": [TOOL], **SCRIPTED})
    calls = [d for name, d in events if name == "content_block_delta"]
    assert [json.loads(d["delta"]["partial_json"]) for d in calls] == [{"city": "Zürich"}, {"city": "Paris"}]
    assert {d["delta"]["type"] for d in calls} == {"input_json_delta"}

    # the calls and their results go back: the prompt is mistral-common's encoding of the same conversation
    results = [{"type": "tool_result", "tool_use_id": b.id, "content": f"sunny in {b.input['city']}"}
               for b in whole.content]
    follow = [*ASK, {"role": "assistant", "content": [b.model_dump() for b in whole.content]},
              {"role": "user", "content": results}]
    script.ids = [*tok.encode("Sunny in both."), tok.eos_id]
    answer = create(client, follow, tools=[TOOL])
    assert (answer.stop_reason, answer.content[0].text.strip()) == ("end_turn", "Sunny in both.")
    openai_form = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": b.id, "type": "function", "function": {"name": b.name, "arguments": json.dumps(b.input)}}
        for b in whole.content]}] + [{"role": "tool", "tool_call_id": r["tool_use_id"], "content": r["content"]}
                                     for r in results]
    expected = len(tok.chat_tokens(openai_form, tools=[WEATHER]))
    assert prompt(answer.usage) == expected == client.messages.count_tokens(
        model="tiny", messages=follow, tools=[TOOL]).input_tokens
    # another model's ids (Claude's toolu_...) map to Mistral's form, the same for the use and its result
    claude = [*ASK, {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01D7FLrfh4GYq7yT1ULFeyMV",
                                                       "name": "get_weather", "input": {"city": "Paris"}}]},
              {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01D7FLrfh4GYq7yT1ULFeyMV",
                                            "content": [{"type": "text", "text": "sunny"}], "is_error": False}]}]
    assert create(client, claude, tools=[TOOL]).stop_reason == "end_turn"
    assert sched.stats()["tool_calls"] >= 3


def test_tool_choice_any_and_tool_force_calls_and_output_format_forces_json(live, monkeypatch):
    """The model answers in text when free; tool_choice any / tool make it call (the grammar; one
    call under disable_parallel_tool_use), and
    output_config.format makes it answer JSON of the schema. The random model's walks are ended by
    a sampler that favours closing tokens after 40 steps (it sees masked logits: the mask decides)."""
    client, url, sched, script, tok = live
    script.ids = [*tok.encode("No tools needed."), tok.eos_id]
    free = create(client, tools=[TOOL])
    assert (free.stop_reason, free.content[0].text.strip()) == ("end_turn", "No tools needed.")
    vocab = sched.model.args.vocab_size
    monkeypatch.setattr(batch_module, "make_picker", lambda temp, top_p=1.0, top_k=0, seed=None:
                        Closing(tok, vocab, temp, after=40, seed=seed or 0).pick)
    for choice, stream in (({"type": "any"}, False), ({"type": "tool", "name": "get_weather"}, True),
                           ({"type": "any", "disable_parallel_tool_use": True}, True)):
        forced = create(client, tools=[TOOL], tool_choice=choice, max_tokens=200, stream=stream)
        forced = forced[1] if stream else forced
        assert forced.stop_reason == "tool_use" and forced.content, forced
        if "disable_parallel_tool_use" in choice:  # one call: the grammar allows no second
            assert len(forced.content) == 1
        for block in forced.content:
            assert (block.type, block.name) == ("tool_use", "get_weather")
            jsonschema.validate(block.input, TOOL["input_schema"])
    fmt = {"output_config": {"format": {"type": "json_schema", "schema": BOUNDED}}}
    answer = create(client, max_tokens=200, extra_body=SCRIPTED | fmt)
    assert answer.stop_reason == "end_turn"
    jsonschema.validate(json.loads(answer.content[0].text), BOUNDED)


@pytest.fixture
def reasoning(reasoning_checkpoint):
    """(client, url, script, tokenizer) of the tiny reasoning model served with --reasoning (for one test:
    its script replaces `live`'s sampler while it is served)."""
    tok = Tokenizer(reasoning_checkpoint / "tekken.json")
    script = Script(tok.eos_id)
    with serving(reasoning_checkpoint, script, reasoning=True) as (openai_client, _):
        url = str(openai_client.base_url).removesuffix("/v1/")
        yield anthropic.Anthropic(base_url=url, api_key="none", max_retries=0, timeout=30), url, script, tok


def test_thinking_blocks_out_and_left_out_of_the_history(reasoning):
    client, url, script, tok = reasoning
    script.ids = answer_ids(tok)
    whole = create(client)
    assert blocks(whole) == [{"type": "thinking", "thinking": "Two plus two: four.",
                              "signature": signature("Two plus two: four.")},
                             {"type": "text", "text": "The answer is 4.", "citations": None}]
    assert blocks(create(client, stream=True)[1]) == blocks(whole)
    events = wire(url, {"model": "tiny", "max_tokens": 100, "messages": ASK, **SCRIPTED})
    deltas = [(d["index"], d["delta"]["type"]) for name, d in events if name == "content_block_delta"]
    assert sorted(set(deltas)) == [(0, "signature_delta"), (0, "thinking_delta"), (1, "text_delta")]
    assert deltas.index((0, "signature_delta")) == deltas.index((1, "text_delta")) - 1  # it ends the thinking block
    # a thinking block sent back is left out of the prompt, as the OpenAI route leaves out reasoning_content
    history = [*ASK, {"role": "assistant", "content": [b.model_dump() for b in whole.content]},
               {"role": "user", "content": "And 3 + 3?"}]
    openai_form = [*ASK, {"role": "assistant", "content": "The answer is 4."}, history[-1]]
    assert client.messages.count_tokens(model="tiny", messages=history).input_tokens == \
        len(tok.chat_tokens(openai_form, reasoning=True))


def test_thinking_switches_a_reasoning_models_reasoning(reasoning, live):
    """`thinking` per request: disabled turns the served --reasoning off, enabled/adaptive keep it on;
    on a model that does not reason it is accepted and changes nothing; a bad type is a 400."""
    client, _, _, tok = reasoning

    def count(c, thinking=None):
        extra = {"thinking": thinking} if thinking else {}
        return c.messages.count_tokens(model="tiny", messages=ASK, extra_body=extra).input_tokens

    on, off = len(tok.chat_tokens(ASK, reasoning=True)), len(tok.chat_tokens(ASK))
    assert on > off
    assert [count(client, t) for t in (None, {"type": "adaptive"}, {"type": "enabled", "budget_tokens": 2048},
                                       {"type": "disabled"})] == [on, on, on, off]
    plain = live[0]
    assert count(plain, {"type": "enabled", "budget_tokens": 1024}) == count(plain) == len(live[4].chat_tokens(ASK))
    with pytest.raises(anthropic.BadRequestError, match="thinking.type: expected"):
        count(plain, {"type": "always"})


def test_api_key_as_x_api_key_or_bearer_on_every_route(live):
    client, url, _, script, tok = live
    script.ids = [*tok.encode("ok"), tok.eos_id]
    bearer = anthropic.Anthropic(base_url=url, api_key=None, auth_token=KEY, max_retries=0,
                                 default_headers={"anthropic-beta": "some-beta-2025-01-01"})
    assert create(bearer).stop_reason == "end_turn" and create(client).stop_reason == "end_turn"
    with pytest.raises(anthropic.AuthenticationError) as e:
        create(anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0))
    assert e.value.body == {"type": "error", "error": {"type": "authentication_error", "message":
                                                       "invalid or missing API key (Authorization: Bearer KEY, or "
                                                       "x-api-key: KEY)"}}
    openai_body = {"model": "tiny", "messages": ASK, "max_tokens": 2}
    assert httpx.post(url + "/v1/chat/completions", json=openai_body, headers={"x-api-key": KEY}).status_code == 200
    r = httpx.post(url + "/v1/chat/completions", json=openai_body, headers={"x-api-key": "wrong"})
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}


GOOD = {"model": "tiny", "max_tokens": 5, "messages": ASK}
WITHOUT_MAX = {"model": "tiny", "messages": ASK}
IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
UNKNOWN_RESULT = [*ASK, {"role": "assistant", "content": "Let me see."},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "abcdefghi", "content": "x"}]}]
BAD = [  # (path, body or raw bytes, headers, status, error type, the message or its start)
    ("", WITHOUT_MAX, None, 400, "invalid_request_error", "max_tokens: Field required"),
    ("", GOOD | {"messages": [{"role": "tool", "content": "x"}]}, None, 400, "invalid_request_error",
     "messages.0.role: Input should be 'user', 'assistant' or 'system'"),
    ("", GOOD | {"context_management": {"edits": [{"type": "compact_20260101"}]}}, None, 400, "invalid_request_error",
     "context_management.edits.0.type: 'compact_20260101' is not supported (only clear_thinking_* and "
     "clear_tool_uses_*)"),
    ("", GOOD | {"context_management": {"edits": [{"type": "clear_tool_uses_20250919", "keep": 3}]}}, None, 400,
     "invalid_request_error", 'context_management.edits.0.keep: expected {"type": ..., "value": N} with N >= 0'),
    ("", GOOD | {"messages": []}, None, 400, "invalid_request_error", "messages: List should have at least 1 item"),
    ("", GOOD | {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, IMAGE]}]}, None,
     400, "invalid_request_error", "messages.0.content.1: image input is not supported (text-only model)"),
    ("", GOOD, {"x-api-key": "wrong"}, 401, "authentication_error", "invalid or missing API key"),
    ("", GOOD | {"system": "x" * (2 << 20)}, None, 413, "request_too_large", "request body is larger than"),
    ("", GOOD | {"temperature": 1.5}, None, 400, "invalid_request_error", "temperature: Input should be less than"),
    ("", GOOD | {"messages": UNKNOWN_RESULT}, None, 400, "invalid_request_error",
     "messages.2.content.0.tool_use_id: 'abcdefghi' is not the id of a tool_use"),
    ("", b'{"model": "tiny",', None, 400, "invalid_request_error", "request body is not valid JSON"),
    ("", GOOD | {"tools": [TOOL], "tool_choice": {"type": "tool", "name": "nowhere"}}, None, 400,
     "invalid_request_error", "tool_choice: no tool named 'nowhere' among the tools offered"),
    ("", GOOD | {"tool_choice": {"type": "any"}}, None, 400, "invalid_request_error", "tool_choice: 'required' needs"),
    ("", GOOD | {"output_config": {"format": {"type": "json_schema", "schema": {"type": "strng"}}}}, None, 400,
     "invalid_request_error", "output_config.format: failed to compile JSON schema: Invalid type: strng"),
    ("", GOOD | {"output_config": {"format": {"type": "yaml"}}}, None, 400, "invalid_request_error",
     'output_config.format: expected {"type": "json_schema"'),
    ("", GOOD | {"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, None, 400,
     "invalid_request_error", "tools.0.type: server tool 'web_search_20250305' is not supported"),
    ("", GOOD | {"mcp_servers": [{"type": "url", "url": "https://x", "name": "x"}]}, None, 400,
     "invalid_request_error", "mcp_servers: not supported"),
    ("", GOOD | {"messages": [*ASK, {"role": "assistant", "content": "The answer is"}]}, None, 400,
     "invalid_request_error", "chat messages: the conversation must end with a user message"),
    ("", GOOD | {"messages": [{"role": "user", "content": "hi " * 2000}]}, None, 400, "invalid_request_error",
     "prompt"),
    ("", GOOD | {"max_tokens": 0}, None, 400, "invalid_request_error", "max_tokens: Input should be greater than 0"),
    ("", GOOD | {"stop_sequences": ["ok", ""]}, None, 400, "invalid_request_error", "stop_sequences.1: String should"),
]


@pytest.mark.parametrize("path, body, headers, status, kind, says", BAD, ids=[f"{b[3]}-{b[5][:24]}" for b in BAD])
def test_bad_request_gets_an_anthropic_error(live, path, body, headers, status, kind, says):
    url = live[1]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    h = {"x-api-key": KEY, "content-type": "application/json", "anthropic-version": "2023-06-01"} | (headers or {})
    r = httpx.post(url + "/v1/messages" + path, content=content, headers=h, timeout=30)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"type", "error"} and r.json()["type"] == "error"
    assert set(r.json()["error"]) == {"type", "message"} and r.json()["error"]["type"] == kind
    assert r.json()["error"]["message"].startswith(says), r.text
    assert httpx.get(url + "/health").json() == {"status": "ok"}


def test_queue_full_loading_and_failed_generation(live, monkeypatch):
    client, url, sched, script, tok = live

    def full(request):
        raise QueueFull("the queue is full (32 requests waiting); try again later")
    with monkeypatch.context() as patch:
        patch.setattr(sched, "submit", full)
        with pytest.raises(anthropic.RateLimitError) as e:
            create(client)
    assert e.value.response.headers["Retry-After"] == "1" and e.value.body["error"]["type"] == "rate_limit_error"
    with TestClient(create_app(Future(), name="tiny")) as loading:
        r = loading.post("/v1/messages", json=GOOD)
    assert r.status_code == 503 and r.json()["error"]["type"] == "overloaded_error"
    assert r.headers["Retry-After"] == "5"

    script.ids = [*tok.encode("Hello there"), "not a token"]  # the sampler fails after two tokens
    events = wire(url, {"model": "tiny", "max_tokens": 50, "messages": ASK, **SCRIPTED})
    assert [name for name, _ in events[:3]] == ["message_start", "ping", "content_block_start"]
    assert events[-1][0] == "error" and events[-1][1]["error"]["type"] == "api_error"
    assert events[-1][1]["error"]["message"].startswith("generation failed:")
    with pytest.raises(anthropic.InternalServerError) as e:
        create(client)
    assert e.value.status_code == 500 and e.value.body["error"]["type"] == "api_error"
    script.ids = [*tok.encode("fine"), tok.eos_id]
    assert create(client).stop_reason == "end_turn"
