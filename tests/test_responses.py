"""OpenAI's Responses API through the official client's `responses.create` (whole and streamed), against
a live server in this process: text, a function call round trip (stored and stateless), namespace
tools, text.format json_schema (Codex CLI's recorded request: test_agent_clients.py)."""

import json
import jsonschema
import pytest

from checkpoints import TOKENIZER_V3, tiny_config, write_hf
from mlx_mistral.tokenizer import Tokenizer
from test_server_tools import CALLS, PROMPT, WEATHER, Script, serving

TOOL = {"type": "function", "name": "get_weather", "description": WEATHER["function"]["description"],
        "parameters": WEATHER["function"]["parameters"]}


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    path = tmp_path_factory.mktemp("v3")
    write_hf(path, tiny_config(vocab_size=32768, max_position_embeddings=4096), tokenizer=TOKENIZER_V3)
    return path, Tokenizer(TOKENIZER_V3)


@pytest.fixture(scope="module")
def live(v3):
    """(client, scheduler, script, tokenizer): the script plays an answer only while it has ids
    (temperature > 0 runs every token through the scripted sampler); greedy requests run the model."""
    path, tok = v3
    script = Script(tok.eos_id)
    with serving(path, script) as (client, sched):
        yield client, sched, script, tok


def events_of(stream) -> list:
    events = list(stream)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    return events


def test_whole_and_streamed_text_are_one_answer(live):
    client, _, script, tok = live
    script.ids = [*tok.encode("Sunny and warm."), tok.eos_id]
    whole = client.responses.create(model="tiny", input="Weather?", temperature=1, max_output_tokens=20)
    assert (whole.status, whole.output_text) == ("completed", "Sunny and warm.")
    assert whole.usage.input_tokens == len(tok.chat_tokens([{"role": "user", "content": "Weather?"}]))
    assert whole.usage.output_tokens == len(script.ids)
    events = events_of(client.responses.create(model="tiny", input="Weather?", temperature=1, max_output_tokens=20,
                                               stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    final = events[-1].response
    assert (final.output_text, final.usage.input_tokens) == (whole.output_text, whole.usage.input_tokens)
    # greedy: the model's own answer, cut at max_output_tokens; the deltas join to the whole text
    greedy = client.responses.create(model="tiny", input="Hello", temperature=0, max_output_tokens=12)
    assert (greedy.status, greedy.incomplete_details.reason, greedy.usage.output_tokens) == \
        ("incomplete", "max_output_tokens", 12)
    events = events_of(client.responses.create(model="tiny", input="Hello", temperature=0, max_output_tokens=12,
                                               stream=True))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == greedy.output_text
    assert events[-1].type == "response.incomplete"


def test_function_call_round_trip_stored_and_stateless(live):
    client, _, script, tok = live
    script.ids = [tok.tool_calls_id, *tok.encode(CALLS), tok.eos_id]
    first = client.responses.create(model="tiny", input=PROMPT[0]["content"], tools=[TOOL], temperature=1,
                                    max_output_tokens=100)
    calls = [item for item in first.output if item.type == "function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == \
        [("get_weather", {"city": "Zürich"}), ("get_weather", {"city": "Paris"})]
    assert first.usage.input_tokens == len(tok.chat_tokens(PROMPT, tools=[WEATHER]))
    # the results go back by previous_response_id; the prompt is the chat route's of the same conversation
    results = [{"type": "function_call_output", "call_id": c.call_id, "output": f"sunny in {json.loads(c.arguments)['city']}"}
               for c in calls]
    chat = PROMPT + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]}] + \
        [{"role": "tool", "tool_call_id": r["call_id"], "content": r["output"]} for r in results]
    script.ids = [*tok.encode("Sunny in both."), tok.eos_id]
    second = client.responses.create(model="tiny", previous_response_id=first.id, input=results, tools=[TOOL],
                                     temperature=1, max_output_tokens=100)
    assert second.output_text == "Sunny in both."
    assert second.usage.input_tokens == len(tok.chat_tokens(chat, tools=[WEATHER]))
    # stateless (store false, as Codex sends): the whole conversation as input items gives the same prompt
    items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": PROMPT[0]["content"]}]},
             *[{"type": "function_call", "call_id": c.call_id, "name": c.name, "arguments": c.arguments} for c in calls],
             *results]
    events = events_of(client.responses.create(model="tiny", input=items, tools=[TOOL], temperature=1, store=False,
                                               max_output_tokens=100, stream=True))
    assert events[-1].response.usage.input_tokens == second.usage.input_tokens
    with pytest.raises(Exception, match="not found"):  # store false: nothing kept
        client.responses.retrieve(events[-1].response.id)
    assert client.responses.retrieve(second.id).output_text == "Sunny in both."
    client.responses.delete(second.id)
    with pytest.raises(Exception, match="not found"):
        client.responses.retrieve(second.id)


def test_streamed_calls_and_namespace_tools(live):
    client, _, script, tok = live
    inner = {"type": "function", "name": "get_weather", "parameters": TOOL["parameters"]}
    tools = [{"type": "namespace", "name": "weather", "description": "Weather tools", "tools": [inner]},
             {"type": "web_search", "external_web_access": False}]  # a hosted tool: not offered to the model
    script.ids = [tok.tool_calls_id, *tok.encode('[{"name": "get_weather", "arguments": {"city": "Oslo"}}]'), tok.eos_id]
    events = events_of(client.responses.create(model="tiny", input="Oslo?", tools=tools, temperature=1,
                                               max_output_tokens=100, stream=True))
    kinds = [e.type for e in events]
    assert kinds[2:6] == ["response.output_item.added", "response.function_call_arguments.delta",
                          "response.function_call_arguments.done", "response.output_item.done"]
    call = events[5].item
    assert (call.type, call.name, call.namespace, json.loads(call.arguments)) == \
        ("function_call", "get_weather", "weather", {"city": "Oslo"})
    assert events[-1].response.usage.input_tokens == len(tok.chat_tokens([{"role": "user", "content": "Oslo?"}],
                                                                         tools=[{"type": "function", "function": inner}]))


def test_text_format_json_schema_is_valid(live):
    client, *_ = live
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "sunny": {"type": "boolean"}},
              "required": ["city", "sunny"], "additionalProperties": False}
    answer = client.responses.create(model="tiny", input="JSON please", temperature=0, max_output_tokens=60,
                                     text={"format": {"type": "json_schema", "name": "weather", "schema": schema,
                                                      "strict": True}})
    assert answer.status == "completed"
    jsonschema.validate(json.loads(answer.output_text), schema)
