"""Structured output's test cases: seeded random JSON schemas, strict tools, a sampler that
walks toward closing tokens, and the checks every constrained answer must pass."""

import json
import random
import re

import jsonschema
import mlx.core as mx
import numpy as np

from checkpoints import tiny_config, write_hf
from mlx_mistral import batch_stream_generate
from mlx_mistral.sample import make_sampler
from mlx_mistral.structured import masked
from mlx_mistral.tokenizer import Tokenizer

WORDS = "id name city kind size tags score level price owner colour items note flag unit rank".split()
PATTERNS = ["^[a-z]{2,6}$", "^[A-Z][0-9]{3}$", "^(yes|no|maybe)$", "^[0-9]{2}-[0-9]{2}$"]
STRING = re.compile(r'"(?:[^"\\]|\\.)*"')  # a JSON string literal
# Every string and array bounded, no extra properties: even a greedy walk ends (the server's tests).
BOUNDED = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "colour": {"enum": ["red", "green", "blue"]},
    "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,4}$"}, "maxItems": 2},
    "ok": {"type": "boolean"}}, "required": ["name", "age", "colour"], "additionalProperties": False}


def write_model(path, tokenizer) -> str:
    """A tiny random model (no window, 4096 positions: tool prompts are long) for `tokenizer`'s vocabulary."""
    vocab = Tokenizer(tokenizer).vocab_size
    write_hf(path, tiny_config(sliding_window=None, vocab_size=vocab, hidden_size=32, intermediate_size=64,
                               head_dim=8, max_position_embeddings=4096), tokenizer=tokenizer)
    return str(path)


def generate(model, tokenizer, prompts: list, constraints: list, sampler=None, max_tokens: int = 300,
             tool_calls: bool = False) -> list[tuple[str, list[int], object]]:
    """(text, token ids, last response) of each prompt, generated as one batch."""
    out = [("", [], None) for _ in prompts]
    for i, r in batch_stream_generate(model, tokenizer, prompts, max_tokens=max_tokens, sampler=sampler,
                                      constraint=constraints, tool_calls=tool_calls):
        out[i] = (out[i][0] + r.text, out[i][1] + [r.token], r)
    return out


def allowed_ids(guide, vocab_size: int) -> set[int]:
    """The tokens `guide` allows next, read from the mask as it lands on (zero) logits."""
    _, logits = masked(mx.zeros((1, vocab_size)), {0: guide})
    return set(np.flatnonzero(np.isfinite(np.array(logits[0]))).tolist())


def random_schemas(n: int = 50, seed: int = 23) -> list[dict]:
    """`n` object schemas from one seeded generator: nested objects, arrays with min/max items,
    enums, numbers with bounds, string patterns and lengths, required and optional fields, anyOf.
    Every string and array is bounded and no object takes extra properties."""
    rng = random.Random(seed)
    return [_object(rng, 0) for _ in range(n)]


def _object(rng: random.Random, depth: int) -> dict:
    names = rng.sample(WORDS, rng.randint(1, 4))
    return {"type": "object", "properties": {k: _value(rng, depth + 1) for k in names},
            "required": [k for k in names if rng.random() < 0.6], "additionalProperties": False}


def _value(rng: random.Random, depth: int) -> dict:
    kinds = ["string", "pattern", "integer", "number", "enum", "boolean", "const", "null"]
    kinds += ["object", "array", "anyOf"] if depth < 3 else []
    kind = rng.choice(kinds)
    if kind == "string":
        low = rng.randint(0, 3)
        return {"type": "string", "minLength": low, "maxLength": low + rng.randint(0, 8)}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(PATTERNS)}
    if kind in ("integer", "number"):
        low = rng.randint(-100, 100)
        return {"type": kind, "minimum": low, "maximum": low + rng.randint(0, 1000)}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 1, 2.5, None, True], rng.randint(1, 4))}
    if kind == "const":
        return {"const": rng.choice(["v1", 7, False])}
    if kind in ("boolean", "null"):
        return {"type": kind}
    if kind == "object":
        return _object(rng, depth)
    if kind == "array":
        low = rng.randint(0, 2)
        return {"type": "array", "items": _value(rng, depth + 1), "minItems": low, "maxItems": low + rng.randint(0, 3)}
    return {"anyOf": [_value(rng, depth + 1), _value(rng, depth + 1)]}


def strict_tools(seed: int = 5) -> list[dict]:
    """Three OpenAI tools, strict, whose parameters are random schemas."""
    schemas = random_schemas(3, seed)
    return [{"type": "function", "function": {"name": f"tool_{i}", "description": f"tool number {i}",
                                              "parameters": s, "strict": True}} for i, s in enumerate(schemas)]


class Closing:
    """A sampler (greedy at `temp` 0, else seeded) that, after `after` calls, adds a large bias to
    the tokens that end things, so that a random model's walks end: EOS most, then those that
    close (" } ]) and open nothing, then those that go on (, :), never those that open ({ [). It
    sees logits already masked (-inf stays -inf), so the mask alone still decides what is valid.
    Batch generation calls it once a step when every row is guided (twice when some are free)."""

    def __init__(self, tokenizer, vocab_size: int, temp: float = 0.0, after: int = 60, seed: int = 0):
        pieces = tokenizer.piece_bytes + [b""] * (vocab_size - len(tokenizer.piece_bytes))
        bias = np.array([_closing(p) for p in pieces], dtype=np.float32)
        bias[tokenizer.eos_id] = 1000.0
        self.bias = mx.array(bias)
        self.sampler, self.after, self.calls = make_sampler(temp, seed=seed), after, 0

    def __call__(self, logits: mx.array) -> mx.array:
        self.calls += 1
        return self.sampler(logits + self.bias if self.calls > self.after else logits)

    def pick(self, logits: mx.array, positions=None) -> tuple[mx.array, mx.array]:
        """As a picker (the server's rows): the tokens and the logits they were drawn from."""
        return self(logits), logits


def _closing(piece: bytes) -> float:
    if b"{" in piece or b"[" in piece:
        return -100.0
    if b"," in piece or b":" in piece:
        return 50.0
    return 150.0 * (b'"' in piece) + 100.0 * (b"}" in piece) + 100.0 * (b"]" in piece)


def check_json(text: str, ids: list[int], tokenizer, schema: dict | None) -> object:
    """The answer's value, after checking what every constrained answer must be: JSON (after at
    most 8 leading whitespace characters), valid for `schema` (an object if None), its properties
    in the schema's order, at most one space between JSON tokens, no control token before its EOS."""
    controls = set(tokenizer.control_ids) | {tokenizer.unk_id}
    assert ids[-1] == tokenizer.eos_id and not controls & set(ids[:-1]), ids
    value = json.loads(text)
    jsonschema.validate(value, schema or {"type": "object"})
    body = text.lstrip(" \t\r\n")
    assert len(text) - len(body) <= 8, repr(text)
    between = STRING.sub('""', body)  # the text between string literals: JSON's own whitespace
    assert not re.search(r"\s\s|[\t\r\n]", between), repr(text)
    if schema:
        check_order(value, schema)
    return value


def check_order(value: object, schema: dict) -> None:
    """The properties `schema` names come in its order, in `value` and every value it nests."""
    if isinstance(value, dict) and "properties" in schema:
        names = list(schema["properties"])
        assert [k for k in value if k in names] == [k for k in names if k in value], (value, names)
        for k, v in value.items():
            check_order(v, schema["properties"].get(k, {}))
    elif isinstance(value, list) and "items" in schema:
        for v in value:
            check_order(v, schema["items"])
    for branch in schema.get("anyOf", []):
        if jsonschema.Draft202012Validator(branch).is_valid(value):
            check_order(value, branch)
            break


def check_calls(ids: list[int], tokenizer, calls, tools: list[dict], name: str | None = None) -> None:
    """Generated `ids` that are function calls in the tokenizer's format, which `calls` (the
    response's) are, as Tokenizer.parse_tool_calls (mistral-common's decoder) reads them: calls
    of `tools` (of the one named `name`), each one's arguments valid for that tool's parameters."""
    assert ids[0] == tokenizer.tool_calls_id and ids[-1] == tokenizer.eos_id, ids
    parsed = tokenizer.parse_tool_calls(ids) or []
    assert calls and [(c.name, c.arguments) for c in parsed] == [(c.name, c.arguments) for c in calls], ids
    args = tokenizer.control_id("[ARGS]")
    controls = set(tokenizer.control_ids) | {tokenizer.unk_id}
    if args is None:  # [TOOL_CALLS] [{"name": ..., "arguments": ...}, ...]
        assert not controls & set(ids[1:-1]), ids
        assert tokenizer.decode(ids[1:-1]).lstrip().startswith("["), ids
    else:  # ([TOOL_CALLS]name[ARGS]{...})+
        assert set(ids[1:-1]) & controls <= {tokenizer.tool_calls_id, args}, ids
        assert ids.count(args) == ids.count(tokenizer.tool_calls_id) == len(calls), ids
        for call, start in zip(calls, [i for i, t in enumerate(ids) if t == tokenizer.tool_calls_id]):
            assert tokenizer.decode(ids[start + 1:ids.index(args, start)]) == call.name, ids
    params = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for call in calls:
        assert call.name == (name or call.name) and call.name in params, call
        jsonschema.validate(json.loads(call.arguments), params[call.name])
