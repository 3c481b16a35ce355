"""Structured output: grammars that make an answer valid JSON (a schema, or any object) or
valid function calls, one llguidance matcher per sequence, and the mask it puts on logits.

    Grammars(tokenizer)        the tokenizer as llguidance sees it (built once, lazily)
      .json(schema)            -> Constraint: the answer is JSON matching `schema`
      .tool_calls(tools, ...)  -> Constraint: the answer is [TOOL_CALLS] and calls of those tools
    Constraint.guide()         -> Guide: one sequence's matcher
    masked(logits, guides)     the guided rows' logits, every token their grammar forbids at -inf
    Guide.advance(token)       feed the sampled token; an error message if the grammar broke

Masks are applied before the repetition penalty, temperature and top-k/top-p/min-p (which
all keep -inf as -inf), so the sampler only ever picks an allowed token. llguidance allows
EOS only where the grammar may end, and never a control token ([INST], [TOOL_CALLS]) except
where the grammar names it, so no control token can appear inside a JSON string.
"""

import itertools
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import mlx.core as mx
import numpy as np

from .errors import MistralError
from .text import TextTokenizer

# Limits on a schema a client sends: its JSON text, and how deeply it nests.
MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 32
# Whitespace: before the JSON only what the tokenizer needs (a SentencePiece model's first piece
# is "▁{" or "▁[": one space; Tekken's none), one optional space between JSON tokens (Mistral
# writes `{"a": 1, "b": 2}`, `[{...}, {...}]`; unbounded whitespace lets a model loop on spaces).
LEADING_WS = 'SAFE_WS: / /'
JSON_WS = {"whitespace_pattern": "[ ]?"}
MATCHERS_KEPT = 64  # pristine matchers cached by grammar (a copy of one costs microseconds)
_QUOTED = re.compile(r"\d+ \| ")  # a line of the grammar in llguidance's errors
CALL_ID = {"type": "string", "pattern": "^[A-Za-z0-9]{9}$"}
MAX_PARALLEL_CALLS = 16  # the most calls one V2-V7 [TOOL_CALLS] array may hold


@dataclass(frozen=True)
class Constraint:
    """What an answer must be: llguidance `grammar` text (its pristine `matcher`). With a
    `trigger` (a token id) the grammar applies only if the answer's first token (after any
    reasoning between the `think` ids) is that one ([TOOL_CALLS] for tool_choice "auto"): an
    answer that starts otherwise is free text, never masked."""

    grammar: str
    matcher: object = field(compare=False, repr=False)
    trigger: int | None = None
    think: tuple[int, int] | None = None

    def guide(self) -> "Guide":
        """A fresh matcher for one sequence (a copy of the pristine one: microseconds)."""
        return Guide(self.matcher.deep_copy(), self.trigger, self.think)


class Grammars:
    """The grammars of one tokenizer and their matchers."""

    def __init__(self, tokenizer: TextTokenizer, vocab_size: int | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size or tokenizer.vocab_size  # a model may pad its vocabulary
        self._pristine: OrderedDict[str, object] = OrderedDict()  # grammar text -> matcher
        self._lock = threading.RLock()  # the HTTP threads build constraints

    @cached_property
    def ll_tokenizer(self):
        """The tokenizer as llguidance reads it (0.1 s for SentencePiece, 0.5 s for Tekken)."""
        import llguidance

        with self._lock:
            return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary(self.tokenizer, self.vocab_size)))

    def json(self, schema: dict | None = None, what: str = "response_format", reasoning: bool = False) -> Constraint:
        """The answer is one JSON value matching `schema` (None: any JSON object, OpenAI's json_object).
        With `reasoning` (a reasoning model's chat), it may first think: [THINK] any text [/THINK]."""
        return self._constraint([self._json(schema, what)], what, reasoning=reasoning)

    def tool_calls(self, tools: Sequence[dict], name: str | None = None, required: bool = True,
                   reasoning: bool = False, parallel: bool = True) -> Constraint:
        """The answer is function calls of `tools` (OpenAI's form: {"type": "function", "function":
        {"name", "parameters", "strict"}}), of the one named `name` if given. Required: from the
        first token (after any thinking, with `reasoning`); otherwise only if the answer begins
        with [TOOL_CALLS] (tool_choice "auto"). Not `parallel`: one call at most."""
        trigger = None if required else self.tokenizer.tool_calls_id
        return self._constraint([self._calls(tools, name, parallel)], "tools", trigger, reasoning)

    def for_chat(self, response_format: dict | None, tools: Sequence[dict], tool_choice: str | dict | None,
                 reasoning: bool = False, parallel: bool = True) -> Constraint | None:
        """The constraint of an OpenAI chat request: `response_format` (text, json_object, or
        json_schema {"schema", ...}) and `tool_choice` ("auto", "none", "required" or
        {"type": "function", "function": {"name"}}) over `tools`; None if the answer is free.
        With tools and tool_choice "auto", a JSON answer may be function calls instead; with
        `reasoning`, the model may think first; not `parallel` (OpenAI's parallel_tool_calls
        false), it calls one function at most. MistralError names the field at fault."""
        schema = _response_schema(response_format)
        name = _tool_choice(tool_choice, bool(tools))
        if tool_choice == "none":
            tools = []
        if schema is None:
            if not tools:
                return None
            return self.tool_calls(tools, name, tool_choice not in (None, "auto"), reasoning, parallel)
        if tools and tool_choice not in (None, "auto"):
            raise MistralError("response_format: a JSON answer cannot also be a required function call "
                               "(use tool_choice 'auto' or 'none')")
        json_rule = self._json(schema or None, "response_format.json_schema.schema")
        parts = [json_rule, self._calls(tools, parallel=parallel)] if tools else [json_rule]
        return self._constraint(parts, "response_format", reasoning=reasoning)

    def _json(self, schema: dict | None, what: str) -> tuple[str, list[str]]:
        schema = {"type": "object"} if schema is None else _checked_schema(schema, what)
        return f"{self._leading} %json {_with_ws(schema)}", [LEADING_WS]

    @property
    def _leading(self) -> str:
        """The whitespace allowed before a JSON answer (LEADING_WS): one space where the tokenizer
        writes a dummy prefix, none otherwise."""
        return "SAFE_WS?" if self.tokenizer.space_prefix else ""

    def _calls(self, tools: Sequence[dict], name: str | None = None, parallel: bool = True) -> tuple[str, list[str]]:
        """(the rule of an answer of function calls, the rules it uses) in the tokenizer's format.
        A strict tool's arguments must match its parameters exactly (an unsupported keyword is
        an error); another's match them as far as llguidance understands them (lenient)."""
        tok = self.tokenizer
        if tok.tool_calls_id is None:
            raise MistralError(f"tools: a {tok.version} tokenizer has no function calling (V3 or later needed)")
        functions = [t.get("function", t) for t in tools]
        if name is not None:
            functions = [f for f in functions if f.get("name") == name]
            if not functions:
                raise MistralError(f"tool_choice: no tool named {name!r} among the tools offered")
        if not functions:
            raise MistralError("tool_choice: a function call needs at least one tool")
        arguments = [_arguments(f, f"tools[{i}].function.parameters") for i, f in enumerate(functions)]
        one = "(" + " | ".join(f"call_{i}" for i in range(len(functions))) + ")"
        if tok.version in ("v2", "v3", "v7"):  # [TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]
            # one %json rule per call, so that each non-strict tool is lenient at its own top level
            # (llguidance reads x-guidance there only); at most MAX_PARALLEL_CALLS calls in the array
            rules = [f"call_{i}: %json " + _with_ws(_lenient(f, {
                "type": "object", "properties": {"name": {"const": f["name"]}, "arguments": a, "id": CALL_ID},
                "required": ["name", "arguments"], "additionalProperties": False}))
                for i, (f, a) in enumerate(zip(functions, arguments))]
            more = f' ("," " "? {one}){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else ""
            return f'<[{tok.tool_calls_id}]> {self._leading} "[" {one}{more} "]"', [LEADING_WS, *rules]
        args = tok.control_id("[ARGS]")  # v11+: ([TOOL_CALLS]name[ARGS]{...})+
        rules = [f'call_{i}: <[{tok.tool_calls_id}]> {json.dumps(f["name"])} <[{args}]> %json {_with_ws(_lenient(f, a))}'
                 for i, (f, a) in enumerate(zip(functions, arguments))]
        return one + "+" * parallel, rules

    def _constraint(self, parts: list[tuple[str, list[str]]], what: str, trigger: int | None = None,
                    reasoning: bool = False) -> Constraint:
        """The constraint whose answer is one of `parts` (a rule and the rules it uses), its
        matcher built once (2-5 ms) and cached by the grammar's text. With `reasoning` and no
        trigger (whose Guide skips the thinking itself), an optional thinking block comes first."""
        import llguidance

        rules = dict.fromkeys(rule for _, used in parts for rule in used)
        start = " | ".join(body for body, _ in parts)
        think = self.tokenizer.think_ids if reasoning and trigger is None else None
        if think:  # as mistral-common's think grammars: any text (no control token) between the two
            start = f"think? ({start})"
            rules.update(dict.fromkeys([f"think: <[{think[0]}]> THOUGHT <[{think[1]}]>", "THOUGHT: /(.|\\n)+/"]))
        grammar = "\n".join(["start: " + start, *rules]) + "\n"
        with self._lock:
            matcher = self._pristine.pop(grammar, None)
            if matcher is None:
                matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
                if matcher.is_error():
                    raise MistralError(f"{what}: {_message(matcher.get_error())}")
            self._pristine[grammar] = matcher  # the most recently used last
            while len(self._pristine) > MATCHERS_KEPT:
                self._pristine.popitem(last=False)
        return Constraint(grammar, matcher, trigger, self.tokenizer.think_ids)


class Guide:
    """One sequence's matcher. Waiting for its `trigger`, it looks at the answer's first token
    (after any [THINK]...[/THINK]): the trigger starts the grammar, any other token ends the wait."""

    def __init__(self, matcher, trigger: int | None = None, think: tuple[int, int] | None = None):
        self.matcher, self.trigger, self._think = matcher, trigger, think
        self.active = trigger is None
        self.waiting = trigger is not None
        self._thinking = False

    def advance(self, token: int) -> str | None:
        """Feed the token the sequence got; an error message if the grammar cannot take it."""
        if self.waiting:
            if self._think and (self._thinking or token == self._think[0]):
                self._thinking = token != self._think[1]
                return None
            self.waiting, self.active = False, token == self.trigger
            if not self.active:
                return None
        if not self.active or (self.matcher.is_stopped() and not self.matcher.is_error()):
            return None
        if self.matcher.is_error() or not self.matcher.consume_token(token) or self.matcher.is_error():
            return f"structured output: token {token} broke the grammar ({_message(self.matcher.get_error())})"
        return None


def masked(logits: mx.array, guides: dict[int, "Guide"]) -> tuple[mx.array, mx.array]:
    """(the row indices of `guides`, those rows of `logits` [B, V] in float32 with every token
    their grammar does not allow next at -inf). The masks are filled on the CPU (llguidance,
    its own threads) while the forward of `logits` runs."""
    mx.async_eval(logits)
    rows = list(guides)
    bitmask = np.zeros((len(rows), (logits.shape[-1] + 31) // 32), dtype=np.int32)
    import llguidance.numpy

    llguidance.numpy.fill_next_token_bitmask_par(_executor(), [(guides[b].matcher, i) for i, b in enumerate(rows)],
                                                 bitmask)
    idx = mx.array(rows, dtype=mx.int32)
    return idx, allow(logits[idx].astype(mx.float32), bitmask)


def allow(logits: mx.array, bitmask: np.ndarray) -> mx.array:
    """`logits` [k, V] with the tokens `bitmask` [k, ceil(V / 32)] does not allow at -inf. The
    one place a mask meets MLX, on every backend (llguidance's own MLX kernel is Metal-only):
    each byte of the mask picks its 8 tokens' 0 or -inf from a 256 x 8 table, added to the
    logits (a gather and an add: half the time of unpacking the bits into an mx.where on this
    CPU, 0.7 against 1.6 ms for 8 rows of 32000)."""
    add = mx.array(_byte_table())[mx.array(bitmask.view(np.uint8))].reshape(bitmask.shape[0], -1)
    return logits + add[:, :logits.shape[-1]]


@lru_cache(maxsize=1)
def _byte_table() -> np.ndarray:
    """[256, 8] float32: row b holds 0 where bit i of b is set (little-endian, as llguidance packs),
    else -inf. Kept in numpy (8 KiB, copied per call): no MLX array shared between threads."""
    bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")
    return np.where(bits, np.float32(0), np.float32(-np.inf))


@lru_cache(maxsize=1)
def _executor():
    import llguidance

    return llguidance.LLExecutor(2)


class _Vocabulary:
    """What llguidance.TokenizerWrapper reads: each id's bytes (control tokens as <[id]>:
    allowed only where a grammar names them), the control ids, and `encode`, which llguidance
    calls on text the grammar forces and trusts to be the canonical split."""

    def __init__(self, tok: TextTokenizer, vocab_size: int):
        pieces = tok.piece_bytes
        special = sorted(set(tok.control_ids) | {tok.unk_id} | set(range(len(pieces), vocab_size)))
        names = set(special)
        self.tokens = [f"<[{i}]>".encode() if i in names else pieces[i] for i in range(vocab_size)]
        self.special_token_ids = special
        self.eos_token_id, self.bos_token_id = tok.eos_id, tok.bos_id
        self._tok = tok
        # SentencePiece puts its dummy "▁" before text (forced `name` would become "▁name"). A
        # newline never merges with what follows (byte fallback): encode "\n" + text, drop its ids.
        self._newline = tok.encode("\n") if tok.space_prefix else []

    def __call__(self, text: str) -> list[int]:
        if not self._newline:
            return self._tok.encode(text)
        ids = self._tok.encode("\n" + text)
        n = len(self._newline)
        return ids[n:] if ids[:n] == self._newline else self._tok.encode(text)


def _response_schema(response_format: dict | None) -> dict | None:
    """OpenAI's response_format: None for text, {} for any JSON object, or the schema."""
    kind = response_format.get("type") if isinstance(response_format, dict) else response_format
    if response_format is None or kind == "text":
        return None
    if kind == "json_object":
        return {}
    if kind != "json_schema":
        raise MistralError(f"response_format.type: expected 'text', 'json_object' or 'json_schema', got {kind!r}")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or "schema" not in spec:
        raise MistralError("response_format.json_schema: expected {'name': ..., 'schema': {...}}, with its schema")
    return _checked_schema(spec["schema"], "response_format.json_schema.schema") or {"type": "object"}


def _tool_choice(choice: str | dict | None, tools: bool) -> str | None:
    """The function `choice` names (None if it names none), after checking its form."""
    if choice in (None, "auto", "none"):
        return None
    if choice == "required":
        if not tools:
            raise MistralError("tool_choice: 'required' needs tools")
        return None
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str) or choice.get("type", "function") != "function":
        raise MistralError("tool_choice: expected 'auto', 'none', 'required' or "
                           f"{{'type': 'function', 'function': {{'name': ...}}}}, got {choice!r}")
    if not tools:
        raise MistralError(f"tool_choice: names the function {name!r} but no tools were given")
    return name


def _checked_schema(schema: object, what: str) -> dict:
    if not isinstance(schema, dict):
        raise MistralError(f"{what}: the JSON schema must be an object, got {type(schema).__name__}")
    if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise MistralError(f"{what}: the JSON schema is larger than {MAX_SCHEMA_BYTES} bytes")
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        raise MistralError(f"{what}: the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
    return schema


def _arguments(function: dict, what: str) -> dict:
    """A tool's arguments schema, checked."""
    return _checked_schema(function.get("parameters") or {"type": "object"}, what)


def _lenient(function: dict, schema: dict) -> dict:
    """`schema` (a %json rule's top level, where llguidance reads x-guidance) lenient unless the
    tool is strict: keywords llguidance lacks (propertyNames, ...) are then ignored, not an error."""
    if function.get("strict"):
        return schema
    return schema | {"x-guidance": {**schema.get("x-guidance", {}), "lenient": True}}


def _with_ws(schema: dict) -> str:
    """The schema as JSON text for %json, with the bounded whitespace unless it sets its own."""
    return json.dumps(schema | {"x-guidance": {**JSON_WS, **schema.get("x-guidance", {})}})


def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def _message(error: str) -> str:
    """llguidance's error on one line, without its position ("at 1(8): "), the grammar's text
    it quotes ("   1 | start: ...") or the parser's state dump."""
    lines = [line.strip() for line in re.split(r"\s<state>", error)[0].splitlines()]
    text = " ".join(line for line in itertools.takewhile(lambda line: not _QUOTED.match(line), lines) if line)
    return re.sub(r"^at \d+\(\d+\): ", "", text)[:300] or "invalid grammar"
