"""A reasoning model's [THINK]...[/THINK]: the model's own system prompt turns it on, and the
reasoning comes apart from the answer (TextStream), in the CLI and in the API with the official client.

The answers are scripted token ids played by the sampler through the real stream; the tokenizer is
a Tekken v13 with [THINK] tokens (tests/checkpoints.write_tekken: no shipped tekken file has them)."""

import json
import sys

import mlx.core as mx
import openai
import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from checkpoints import TOKENIZER_TEKKEN
from mlx_mistral import Grammars, MistralError, load, stream_generate
from mlx_mistral.generate.__main__ import DIM, main
from mlx_mistral.tokenizer import Tokenizer

QUESTION = [{"role": "user", "content": "What is 2 + 2?"}]


def scripted(ids, eos):
    """A sampler that plays `ids`, then EOS forever."""
    script = iter(ids)
    return lambda logits: mx.array([next(script, eos)], dtype=mx.uint32)


@pytest.fixture(scope="module")
def model(reasoning_checkpoint):
    return load(str(reasoning_checkpoint))


def answer_ids(tok, reasoning="Two plus two: four.", answer="The answer is 4.", think=True):
    begin, end = tok.think_ids
    return ([begin, *tok.encode(reasoning), end] if think else []) + tok.encode(answer) + [tok.eos_id]


def test_reasoning_prompt_is_the_models_own_encoded_by_mistral_common(reasoning_checkpoint):
    tok = Tokenizer(reasoning_checkpoint / "tekken.json")
    assert tok.think_ids == (34, 35) and Tokenizer(TOKENIZER_TEKKEN).think_ids is None
    system = {"role": "system", "content": [{"type": "text", "text": "Draft your thinking first."},
                                            {"type": "thinking", "thinking": "scratch work", "closed": True},
                                            {"type": "text", "text": "Then answer."}]}
    assert tok.reasoning_prompt() == system
    oracle = MistralTokenizer.from_file(str(reasoning_checkpoint / "tekken.json"))
    ids = tok.chat_tokens(QUESTION, reasoning=True)
    assert ids == oracle.encode_chat_completion(ChatCompletionRequest.from_openai([system, *QUESTION])).tokens
    assert ids.count(34) == ids.count(35) == 1 and ids != tok.chat_tokens(QUESTION)


def test_reasoning_refused_without_think_tokens_or_system_prompt(tmp_path, reasoning_checkpoint):
    with pytest.raises(MistralError, match="no \\[THINK\\] and \\[/THINK\\] tokens: not a reasoning model"):
        Tokenizer(TOKENIZER_TEKKEN).chat_tokens(QUESTION, reasoning=True)
    (tmp_path / "tekken.json").write_bytes((reasoning_checkpoint / "tekken.json").read_bytes())
    with pytest.raises(MistralError, match="SYSTEM_PROMPT.txt: cannot read the model's reasoning system prompt"):
        Tokenizer(tmp_path / "tekken.json").chat_tokens(QUESTION, reasoning=True)


@pytest.mark.parametrize("max_tokens", [100, 4])
def test_stream_splits_reasoning_from_the_answer(model, max_tokens):
    model, tok = model
    ids = answer_ids(tok)
    out = list(stream_generate(model, tok, tok.chat_tokens(QUESTION), max_tokens=max_tokens,
                               sampler=scripted(ids, tok.eos_id), stop=["is 4"]))
    reasoning, text = "".join(r.reasoning for r in out), "".join(r.text for r in out)
    if max_tokens == 4:  # cut inside the reasoning: what came of it, and no answer
        assert (text, out[-1].finish_reason) == ("", "length")
        assert reasoning == tok.decode(ids[1:4]) and len(out) == 4
        return
    # stop strings apply to the answer only; "is 4" in the answer stops it
    assert reasoning == "Two plus two: four." and text == "The answer " and out[-1].finish_reason == "stop"
    assert not any(r.reasoning and r.text for r in out)


def test_text_without_think_is_unchanged(model):
    model, tok = model
    ids = answer_ids(tok, think=False)
    out = list(stream_generate(model, tok, tok.chat_tokens(QUESTION), sampler=scripted(ids, tok.eos_id)))
    assert "".join(r.text for r in out) == "The answer is 4." and all(r.reasoning == "" for r in out)
    assert [r.token for r in out] == ids


def test_cli_json_has_reasoning_and_a_terminal_dims_it(capsys, monkeypatch, model, reasoning_checkpoint):
    tok = model[1]
    cli_module = sys.modules[main.__module__]
    monkeypatch.setattr(cli_module, "make_sampler", lambda *a: scripted(answer_ids(tok), tok.eos_id))
    argv = ["--model", str(reasoning_checkpoint), "--prompt", "What is 2 + 2?", "--reasoning"]
    assert main(argv + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["reasoning"], result["text"]) == ("Two plus two: four.", "The answer is 4.")
    assert result["prompt_tokens"] == len(tok.chat_tokens(QUESTION, reasoning=True))
    assert main(argv) == 0
    assert capsys.readouterr().out == "Two plus two: four.\nThe answer is 4.\n"  # not a terminal: no escapes
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith(f"{DIM}Two")


@pytest.fixture(scope="module")
def live(reasoning_checkpoint, model):
    """(client, script, tokenizer) of the tiny reasoning model served with --reasoning."""
    from test_server_tools import Script, serving

    tok = model[1]
    script = Script(tok.eos_id)
    with serving(reasoning_checkpoint, script, reasoning=True) as (client, _):
        yield client, script, tok


def ask(client, stream=False, **kw):
    return client.chat.completions.create(model="tiny", messages=QUESTION, temperature=1, max_tokens=100,
                                          stream=stream, **kw)


def streamed(client, **kw):
    """(reasoning, content, finish_reason) joined from the chunks, as clients of vLLM's field join them."""
    reasoning, content, finish = "", "", None
    for chunk in ask(client, stream=True, **kw):
        for c in chunk.choices:
            reasoning += (c.delta.model_extra or {}).get("reasoning_content") or ""
            content += c.delta.content or ""
            finish = c.finish_reason or finish
    return reasoning, content, finish


def test_server_splits_reasoning_content_whole_and_streamed(live):
    client, script, tok = live
    script.ids = answer_ids(tok)
    whole = ask(client)
    message = whole.choices[0].message
    assert (message.model_extra["reasoning_content"], message.content) == ("Two plus two: four.", "The answer is 4.")
    assert whole.usage.prompt_tokens == len(tok.chat_tokens(QUESTION, reasoning=True))  # --reasoning's prompt
    assert streamed(client) == ("Two plus two: four.", "The answer is 4.", "stop")
    # no [THINK]: no reasoning_content at all, the answer unchanged
    script.ids = answer_ids(tok, think=False)
    message = ask(client).choices[0].message
    assert message.content == "The answer is 4." and "reasoning_content" not in (message.model_extra or {})
    assert streamed(client) == ("", "The answer is 4.", "stop")


def test_images_are_refused_by_name_and_text_parts_joined(live):
    client, script, tok = live
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    for part in (image, {"type": "input_image", "image_url": "https://example.com/cat.png"}):
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [
            {"type": "text", "text": "What is this?"}, part]}]
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=messages)
        assert e.value.body["param"] == "messages[1].content"
        assert e.value.body["message"] == "messages[1].content: image input is not supported (text-only model)"
    # OpenAI clients' list of text parts: accepted, and joined as mistral-common joins them
    script.ids = answer_ids(tok, think=False)
    parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "2 + 2?"}]
    whole = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts}])
    oracle = MistralTokenizer.from_file(str(tok.path))
    expected = oracle.encode_chat_completion(ChatCompletionRequest.from_openai(
        [tok.reasoning_prompt(), {"role": "user", "content": parts}]))
    assert whole.usage.prompt_tokens == len(expected.tokens) and "What is\n\n2 + 2?" in expected.text
    assert whole.choices[0].message.content == "The answer is 4."


def test_a_call_after_the_reasoning_is_parsed(model):
    model, tok = model
    begin, end = tok.think_ids
    args = tok._raw.get_special_token("[ARGS]")  # v13's calls: [TOOL_CALLS]name[ARGS]{...}
    ids = [begin, *tok.encode("I should call add."), end, tok.tool_calls_id, *tok.encode("add"), args,
           *tok.encode('{"a": 2, "b": 2}'), tok.eos_id]
    out = list(stream_generate(model, tok, tok.chat_tokens(QUESTION), sampler=scripted(ids, tok.eos_id),
                               tool_calls=True))
    assert "".join(r.reasoning for r in out) == "I should call add." and "".join(r.text for r in out) == ""
    assert out[-1].finish_reason == "tool_calls"
    assert [(c.name, json.loads(c.arguments)) for c in out[-1].tool_calls] == [("add", {"a": 2, "b": 2})]


def test_a_constrained_answer_may_think_first_with_reasoning(model):
    """With reasoning, a JSON schema or a required call lets the model think first ([THINK] any
    text [/THINK]), then holds the answer to its grammar; without it, [THINK] breaks the grammar."""
    model, tok = model
    begin, end = tok.think_ids
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    ids = [begin, *tok.encode("Two plus two: four."), end, *tok.encode('{"answer": 4}'), tok.eos_id]
    grammars = Grammars(tok, model.args.vocab_size)
    out = list(stream_generate(model, tok, tok.chat_tokens(QUESTION, reasoning=True), sampler=scripted(ids, tok.eos_id),
                               constraint=grammars.json(schema, reasoning=True)))
    assert "".join(r.reasoning for r in out) == "Two plus two: four." and out[-1].finish_reason == "stop"
    assert json.loads("".join(r.text for r in out)) == {"answer": 4}
    with pytest.raises(MistralError, match=f"token {begin} broke the grammar"):
        list(stream_generate(model, tok, tok.chat_tokens(QUESTION), sampler=scripted(ids, tok.eos_id),
                             constraint=grammars.json(schema)))
    args = tok._raw.get_special_token("[ARGS]")
    call = [begin, *tok.encode("I should call add."), end, tok.tool_calls_id, *tok.encode("add"), args,
            *tok.encode('{"a": 2, "b": 2}'), tok.eos_id]
    add = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
    out = list(stream_generate(model, tok, tok.chat_tokens(QUESTION, tools=[add], reasoning=True),
                               sampler=scripted(call, tok.eos_id), tool_calls=True,
                               constraint=grammars.for_chat(None, [add], "required", reasoning=True)))
    assert "".join(r.reasoning for r in out) == "I should call add." and out[-1].finish_reason == "tool_calls"


def test_server_response_format_lets_a_reasoning_model_think(live):
    client, script, tok = live
    begin, end = tok.think_ids
    script.ids = [begin, *tok.encode("Four."), end, *tok.encode('{"answer": 4}'), tok.eos_id]
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}}}
    message = ask(client, response_format=fmt).choices[0].message
    assert message.model_extra["reasoning_content"] == "Four." and json.loads(message.content) == {"answer": 4}
    assert streamed(client, response_format=fmt) == ("Four.", '{"answer": 4}', "stop")
