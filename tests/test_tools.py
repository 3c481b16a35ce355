"""Function calling: scripted [TOOL_CALLS] answers through the real stream become structured calls."""

import importlib
import json
import re

import mlx.core as mx
import pytest

from checkpoints import TOKENIZER_TEKKEN, TOKENIZER_V3, tiny_config, write_hf
from mlx_mistral import Mistral, ModelArgs, Tokenizer, stream_generate

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
cli_main = importlib.import_module("mlx_mistral.generate.__main__")  # `mlx_mistral.generate` is also a function
PROMPT = [{"role": "user", "content": "Weather in Zürich and Paris?"}]


@pytest.fixture(scope="module", params=[TOKENIZER_V3, TOKENIZER_TEKKEN], ids=["v3", "tekken"])
def tokenizer_and_model(request):
    tokenizer = Tokenizer(request.param)
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=64,
                     vocab_size=tokenizer.vocab_size, sliding_window=None, max_position_embeddings=512)
    return tokenizer, Mistral(args)


def scripted(ids: list[int], eos: int):
    """A sampler that ignores the logits and returns the script's next token (then EOS forever)."""
    script = iter(ids)
    return lambda logits: mx.array([next(script, eos)], dtype=mx.uint32)


def answer(tokenizer, model, ids: list[int], max_tokens: int = 200, tools: bool = True):
    prompt = tokenizer.chat_tokens(PROMPT, tools=[WEATHER] if tools else None)
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=max_tokens,
                                     sampler=scripted(ids, tokenizer.eos_id), tool_calls=tools))
    return "".join(r.text for r in responses), responses[-1]


def test_tool_calls_are_parsed(tokenizer_and_model):
    tok, model = tokenizer_and_model
    body = '[{"name": "get_weather", "arguments": {"city": "Zürich 🌦"}}, ' \
           '{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call00042"}]'
    text, last = answer(tok, model, [tok.tool_calls_id, *tok.encode(body), tok.eos_id])
    assert text == "" and last.finish_reason == "tool_calls"
    first, second = last.tool_calls
    assert (first.name, json.loads(first.arguments)) == ("get_weather", {"city": "Zürich 🌦"})
    assert re.fullmatch(r"[A-Za-z0-9]{9}", first.id)  # the model gave none: a new one
    assert (second.id, second.name, json.loads(second.arguments)) == ("call00042", "get_weather", {"city": "Paris"})
    # the calls and their results go back in as the next prompt, encoded by mistral-common
    follow = PROMPT + [{"role": "assistant", "content": "", "tool_calls": [c.to_openai() for c in last.tool_calls]}] \
        + [{"role": "tool", "tool_call_id": c.id, "content": "sunny"} for c in last.tool_calls]
    ids = tok.chat_tokens(follow, tools=[WEATHER])
    assert ids.count(tok.tool_calls_id) == 1 and tok.decode(ids).count("sunny") == 2


@pytest.mark.parametrize("body", ['[{"name": "get_weather", "arguments": {"city": }]', '{"name": 1}', "not json"])
def test_malformed_calls_become_plain_text(tokenizer_and_model, body):
    tok, model = tokenizer_and_model
    text, last = answer(tok, model, [tok.tool_calls_id, *tok.encode(body), tok.eos_id])
    assert (text.strip(), last.finish_reason, last.tool_calls) == (body, "stop", None)


def test_truncated_call_ends_as_text_at_the_length_limit(tokenizer_and_model):
    tok, model = tokenizer_and_model
    body = tok.encode('[{"name": "get_weather", "arguments": {"city": "Paris"}}]')
    text, last = answer(tok, model, [tok.tool_calls_id, *body], max_tokens=6)
    assert (last.finish_reason, last.tool_calls, last.generation_tokens) == ("length", None, 6)
    assert text.strip() == tok.decode(body[:5]).strip()


def test_plain_answer_with_tools_offered_has_no_calls(tokenizer_and_model):
    tok, model = tokenizer_and_model
    text, last = answer(tok, model, [*tok.encode("It is sunny."), tok.eos_id])
    assert (text.strip(), last.finish_reason, last.tool_calls) == ("It is sunny.", "stop", None)


@pytest.fixture(scope="module")
def v3_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("v3")
    write_hf(path, tiny_config(vocab_size=32768), tokenizer=TOKENIZER_V3)
    return path


@pytest.fixture
def tools_file(tmp_path):
    path = tmp_path / "tools.json"
    path.write_text(json.dumps([WEATHER]))
    return path


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "text"])
def test_cli_prints_the_calls(capsys, monkeypatch, v3_checkpoint, tools_file, as_json):
    tok = Tokenizer(TOKENIZER_V3)
    script = [tok.tool_calls_id, *tok.encode('[{"name": "get_weather", "arguments": {"city": "Paris"}}]'), tok.eos_id]
    monkeypatch.setattr(cli_main, "make_sampler", lambda *a: scripted(script, tok.eos_id))
    code = cli_main.main(["--model", str(v3_checkpoint), "--prompt", PROMPT[0]["content"], "--tools", str(tools_file)]
                         + ["--json"] * as_json)
    out = capsys.readouterr().out
    assert code == 0
    if not as_json:
        assert re.search(r'^\[tool call [A-Za-z0-9]{9}\] get_weather {"city": "Paris"}$', out, re.M), out
        return
    result = json.loads(out)
    assert result["prompt_tokens"] == len(tok.chat_tokens(PROMPT, tools=[WEATHER]))
    assert result["finish_reason"] == "tool_calls" and result["text"] == ""
    [c] = result["tool_calls"]
    assert (c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) == \
        ("function", "get_weather", {"city": "Paris"})


@pytest.mark.parametrize("content, flags, message", [
    (None, [], "a v1 tokenizer has no function calling"),
    ("[{oops", [], "--tools .*: not valid JSON"),
    ('{"type": "function"}', [], "--tools .*: expected a non-empty list"),
    (None, ["--raw"], "--tools needs the chat template"),
])
def test_cli_tools_errors(capsys, tmp_path, tools_file, content, flags, message):
    if content is not None:
        tools_file.write_text(content)
    code = cli_main.main(["--model", "demo", "--prompt", "hi", "--tools", str(tools_file), *flags])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert re.search(message, err.strip().splitlines()[-1]), err


def test_calls_are_plain_text_when_no_tools_were_offered(tokenizer_and_model):
    """Parsing follows the prompt: without tools, an answer that begins with [TOOL_CALLS]
    streams as text like any other (nothing is held back)."""
    tok, model = tokenizer_and_model
    body = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    text, last = answer(tok, model, [tok.tool_calls_id, *tok.encode(body), tok.eos_id], tools=False)
    assert (last.finish_reason, last.tool_calls) == ("stop", None) and body in text
