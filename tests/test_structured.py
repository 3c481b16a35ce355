"""Structured output through the Python API, on tiny random-weight models whose free text is
gibberish: any valid JSON comes from the constraint. V1, V3 (SentencePiece), Tekken v3 and v11."""

import json

import pytest

from checkpoints import TOKENIZER_TEKKEN, TOKENIZER_V1, TOKENIZER_V3, write_tekken
from mlx_mistral import Grammars, batch_generate, load, stream_generate
from structured_cases import (
    BOUNDED, Closing, allowed_ids, check_calls, check_json, generate, random_schemas, strict_tools, write_model,
)

TOKENIZERS = {"v1": TOKENIZER_V1, "v3": TOKENIZER_V3, "tekken": TOKENIZER_TEKKEN}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (model, tokenizer, Grammars) of a tiny model with that tokenizer, made on first use
    (names: TOKENIZERS, and "v11": a Tekken v11 file, whose calls are [TOOL_CALLS]name[ARGS]{...})."""
    made = {}

    def get(name: str):
        if name not in made:
            tokenizer = TOKENIZERS.get(name) or write_tekken(tmp_path_factory.mktemp("tok") / "tekken.json", name)
            model, tok = load(write_model(tmp_path_factory.mktemp(name), tokenizer))
            made[name] = model, tok, Grammars(tok, model.args.vocab_size)
        return made[name]
    return get


def chat(tok, content: str, tools: list | None = None) -> list[int]:
    return tok.chat_tokens([{"role": "user", "content": content}], tools=tools)


@pytest.mark.parametrize("temp", [0.0, 1.0], ids=["greedy", "temperature 1"])
@pytest.mark.parametrize("name", ["v1", "v3", "tekken"])
def test_fifty_random_schemas_parse_and_validate(models, name, temp):
    """50 seeded schemas as one batch: every answer is JSON that validates, properties in the
    schema's order, bounded whitespace, no control token before EOS."""
    model, tok, grammars = models(name)
    schemas = random_schemas(50)
    prompts = [chat(tok, "Answer in JSON: " + json.dumps(s)) for s in schemas]
    out = generate(model, tok, prompts, [grammars.json(s) for s in schemas],
                   Closing(tok, model.args.vocab_size, temp, after=80, seed=1))
    for schema, (text, ids, last) in zip(schemas, out):
        assert last.finish_reason == "stop", text
        check_json(text, ids, tok, schema)
    assert len({text for text, _, _ in out}) >= 40  # the prompts differ: so do the answers


def test_the_schemas_cover_the_issue_s_keywords():
    text = json.dumps(random_schemas(50))
    for keyword in ('"properties": {', '"minItems"', '"maxItems"', '"enum"', '"minimum"', '"maximum"', '"pattern"',
                    '"minLength"', '"maxLength"', '"anyOf"', '"const"', '"type": "number"', '"type": "array"'):
        assert keyword in text, keyword
    objects = [s for s in random_schemas(50) if s["required"] != list(s["properties"])]
    assert objects, "some properties are optional"
    assert any(v.get("type") == "object" for s in random_schemas(50) for v in s["properties"].values())


@pytest.mark.parametrize("temp", [0.0, 1.0], ids=["greedy", "temperature 1"])
@pytest.mark.parametrize("name", ["v3", "tekken", "v11"])
def test_json_object_and_strict_tool_calls(models, name, temp):
    """json_object answers are objects; tool_choice "required" and named ones are calls that
    mistral-common's decoder parses, in the tokenizer's format, valid for the tool's parameters."""
    model, tok, grammars = models(name)
    tools = strict_tools()
    named = [t["function"]["name"] for t in tools]
    constraints = [grammars.json(None)] * 4 + [grammars.tool_calls(tools)] * 4 + \
        [grammars.tool_calls(tools, name=n) for n in named]
    prompts = [chat(tok, f"request {i}", tools) for i in range(len(constraints))]
    out = generate(model, tok, prompts, constraints, Closing(tok, model.args.vocab_size, temp, after=60, seed=2),
                   tool_calls=True)
    for text, ids, last in out[:4]:
        assert last.finish_reason == "stop" and isinstance(check_json(text, ids, tok, None), dict)
    for (text, ids, last), n in zip(out[4:], [None] * 4 + named):
        assert last.finish_reason == "tool_calls", tok.decode(ids)
        check_calls(ids, tok, last.tool_calls, tools, n)


def test_json_object_on_v1(models):
    model, tok, grammars = models("v1")
    out = generate(model, tok, [chat(tok, f"object {i}") for i in range(4)], [grammars.json(None)] * 4,
                   Closing(tok, model.args.vocab_size, 1.0, after=60, seed=3))
    for text, ids, last in out:
        assert last.finish_reason == "stop" and isinstance(check_json(text, ids, tok, None), dict)


@pytest.mark.parametrize("name", ["v1", "v3", "tekken"])
def test_first_piece_and_forced_names(models, name):
    """Step 0 allows SentencePiece's "▁{" and "▁{\"" (a space, then the brace: the dummy prefix),
    and Tekken's "{"; text the grammar forces is the tokenizer's own split without the dummy
    prefix: after `{"` the one token allowed is the plain `name` piece, never `▁name`."""
    model, tok, grammars = models(name)
    guide = grammars.json({"type": "object", "properties": {"name": {"const": "x"}}, "required": ["name"]}).guide()
    first = allowed_ids(guide, model.args.vocab_size)
    pieces = [tok.piece_bytes[i] for i in first]
    assert b"{" in pieces and b'{"' in pieces
    if not tok.tekken:
        assert b" {" in pieces and b' {"' in pieces
    assert guide.advance(tok.piece_bytes.index(b'{"')) is None
    [forced] = allowed_ids(guide, model.args.vocab_size)
    assert tok.piece_bytes[forced] == b"name"


@pytest.mark.parametrize("name", ["v3", "tekken"])
def test_mask_eos_order_and_whitespace(models, name):
    """Fed a valid answer token by token, the mask allows each next token, EOS only at the end,
    never a control token; properties out of the schema's order, two spaces, a newline or an
    unknown property break the grammar (the guide says how)."""
    model, tok, grammars = models(name)
    controls = (set(tok.control_ids) | {tok.unk_id}) - {tok.eos_id}
    guide = grammars.json(BOUNDED).guide()
    for token in tok.encode('{"name": "Ann", "age": 7, "colour": "red", "tags": ["ab"], "ok": true}'):
        allowed = allowed_ids(guide, model.args.vocab_size)
        assert token in allowed and tok.eos_id not in allowed and not allowed & controls
        assert guide.advance(token) is None
    assert tok.eos_id in allowed_ids(guide, model.args.vocab_size) and guide.advance(tok.eos_id) is None
    for bad, piece in [('{"name": "Ann", "age": 7, "colour": "red", "ok": true,', ","),  # no "tags" after "ok"
                       ('{"age', "age"),  # "name" first
                       ('{"name":  "', '"'), ('{"name": "Ann",\n', "\n"),
                       ('{"name": "Ann", "age": 7, "colour": "red", "x', "x")]:
        guide, ids = grammars.json(BOUNDED).guide(), tok.encode(bad)
        errors = [guide.advance(t) for t in ids]
        assert all(e is None for e in errors[:-1]) and "broke the grammar" in errors[-1], (bad, errors)
        assert "broke the grammar" in guide.advance(tok.eos_id)  # broken for good: nothing more is taken
        assert piece in tok.decode(ids[-1:]), (bad, tok.decode(ids[-1:]))


def test_stream_generate_and_a_mixed_batch_equal_solo_runs(models):
    """Greedy: stream_generate with a constraint gives valid JSON; in batch_generate with
    constrained and free rows, every free row equals its solo run and every constrained row
    its solo constrained run."""
    model, tok, grammars = models("v3")
    constraint = grammars.json(BOUNDED)
    prompts = [chat(tok, f"person {i}") for i in range(6)]
    constraints = [constraint if i % 2 else None for i in range(6)]
    solo = []
    for p, c in zip(prompts, constraints):
        responses = list(stream_generate(model, tok, p, max_tokens=100, constraint=c))
        solo.append(("".join(r.text for r in responses), [r.token for r in responses]))
    batch = generate(model, tok, prompts, constraints, max_tokens=100)
    assert [(text, ids) for text, ids, _ in batch] == solo
    for (text, ids), c in zip(solo, constraints):
        if c:
            check_json(text, ids, tok, BOUNDED)
    assert batch_generate(model, tok, prompts[1:2], max_tokens=100, constraint=constraint)[0][0] == solo[1][0]


@pytest.mark.parametrize("name", ["v3", "v11"])
def test_one_call_at_most_when_not_parallel(models, name):
    """parallel=False (OpenAI's parallel_tool_calls false, Anthropic's disable_parallel_tool_use):
    after one call the mask allows no second one (V3: no "," in the array; v11: EOS alone, no
    [TOOL_CALLS]); parallel, it does."""
    model, tok, grammars = models(name)
    add = {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}
    if name == "v3":
        call = [tok.tool_calls_id, *tok.encode('[{"name": "add", "arguments": {"a": 1}}')]
    else:
        call = [tok.tool_calls_id, *tok.encode("add"), tok.control_id("[ARGS]"), *tok.encode('{"a": 1}')]

    def after_one_call(parallel: bool) -> set[int]:
        guide = grammars.for_chat(None, [add], "required", parallel=parallel).guide()
        assert [e for e in map(guide.advance, call) if e] == []
        return allowed_ids(guide, model.args.vocab_size)

    one, more = after_one_call(False), after_one_call(True)
    if name == "v3":
        assert not any(b"," in tok.piece_bytes[i] for i in one) and any(b"," in tok.piece_bytes[i] for i in more)
        assert any(b"]" in tok.piece_bytes[i] for i in one)
    else:
        assert one == {tok.eos_id} and tok.tool_calls_id in more


ENV_TOOL = {"type": "function", "function": {"name": "bash", "parameters": {  # Claude Code's kind of schema
    "$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "required": ["env"],
    "properties": {"env": {"type": "object", "propertyNames": {"pattern": "^[A-Z_]+$"}}}}}}


@pytest.mark.parametrize("name", ["v3", "v11"])
def test_a_non_strict_tool_with_keywords_llguidance_lacks_compiles_per_tool(models, name):
    """A tool whose schema uses propertyNames (which llguidance lacks) compiles leniently beside
    other tools when it is not strict, and a call to it is accepted; strict, the request is
    refused naming the keyword."""
    from mlx_mistral import MistralError

    model, tok, grammars = models(name)
    other = {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}
    guide = grammars.for_chat(None, [other, ENV_TOOL], "required").guide()
    if name == "v3":
        call = [tok.tool_calls_id, *tok.encode('[{"name": "bash", "arguments": {"env": {"HOME": "x"}}}]')]
    else:
        call = [tok.tool_calls_id, *tok.encode("bash"), tok.control_id("[ARGS]"), *tok.encode('{"env": {"HOME": "x"}}')]
    assert [e for e in map(guide.advance, call) if e] == []
    assert tok.eos_id in allowed_ids(guide, model.args.vocab_size)
    strict = {"type": "function", "function": ENV_TOOL["function"] | {"strict": True}}
    with pytest.raises(MistralError, match="propertyNames"):
        grammars.for_chat(None, [other, strict], "required")


@pytest.mark.parametrize("name", ["v3", "tekken"])
def test_before_the_json_only_the_whitespace_the_tokenizer_needs(models, name):
    """SentencePiece's first piece may be "▁{" (one space: its dummy prefix), never two spaces, a
    tab or a newline; Tekken's starts at the brace. A V3 call array starts "[TOOL_CALLS] [" alike
    (pydantic-ai's request once began `\t\t\t\t [ {` on a random model)."""
    model, tok, grammars = models(name)
    first = [tok.piece_bytes[i] for i in allowed_ids(grammars.json(BOUNDED).guide(), model.args.vocab_size)]
    leading = {p[:len(p) - len(p.lstrip())] for p in first if p.strip()}
    assert leading == ({b"", b" "} if name == "v3" else {b""})
    if name == "v3":
        guide = grammars.for_chat(None, [ENV_TOOL], "required").guide()
        assert guide.advance(tok.tool_calls_id) is None
        after = {tok.piece_bytes[i] for i in allowed_ids(guide, model.args.vocab_size)}
        assert b"[" in after and all(p == b" " or p.removeprefix(b" ").startswith(b"[") for p in after)


def test_a_v3_call_array_holds_at_most_max_parallel_calls(models):
    from mlx_mistral.structured import MAX_PARALLEL_CALLS

    model, tok, grammars = models("v3")
    add = {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}
    guide = grammars.for_chat(None, [add], "required").guide()
    calls = ", ".join(['{"name": "add", "arguments": {"a": 1}}'] * MAX_PARALLEL_CALLS)
    assert [e for e in map(guide.advance, [tok.tool_calls_id, *tok.encode("[" + calls)]) if e] == []
    assert not any(b"," in tok.piece_bytes[i] for i in allowed_ids(guide, model.args.vocab_size))
