"""The one request builder. Each API (openai.py, anthropic.py) translates its wire format into a
Spec; build() turns a Spec into the scheduler's Request: the conversation through mistral-common
(Tokenizer.chat_tokens) or a raw prompt, then the sampling fields. What a request may hold the
model to (tool_choice, response_format) is decided in one place: constrain()."""

import hashlib
import itertools
import re
import string
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import MistralError
from ..images import data_uri_image
from ..structured import Constraint
from .http import APIError, Service
from .request import Request

ALNUM = string.ascii_letters + string.digits
DEFAULT_MAX_TOKENS = 512  # when a request names none (and the context allows)


@dataclass(frozen=True)
class Spec:
    """A request in the neutral form: chat messages in OpenAI's format (the one mistral-common
    reads) or a raw prompt; tools in OpenAI's function form ({"type": "function", "function":
    {"name", "description", "parameters"}}); tool_choice and response_format in OpenAI's forms
    ("auto", "none", "required" or {"type": "function", "function": {"name": ...}}; text,
    json_object or json_schema)."""

    model: str
    messages: Sequence[dict] | None = None
    prompt: str | None = None  # a completion's raw prompt, when there are no messages
    tools: Sequence[dict] = ()
    tool_choice: str | dict = "auto"
    response_format: dict | None = None  # None or {"type": "text"}: free text
    parallel_tool_calls: bool = True  # False: one call at most (the grammar's)
    format_param: str | None = None  # the request's own name of response_format, if it has another
    max_tokens: int | None = None  # None: up to DEFAULT_MAX_TOKENS, within the context
    clamp_max_tokens: bool = False  # True: a max_tokens past the context is cut to what it leaves (Anthropic's route)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: Sequence[str] = ()
    logprobs: int | None = None  # None: none; n: each token's and the n most likely (Request.logprobs)
    reasoning: bool | None = None  # the request's thinking switch (Service.reasoning_for); None: the server's
    speculate: bool = True  # False: no drafts for this request (the body's "speculative": false)


def build(service: Service, spec: Spec) -> Request:
    """The scheduler Request of `spec` (an APIError naming the field at fault if it cannot be one)."""
    tokens, images = prompt_inputs(service, spec)
    constraint = constrain(service, spec)
    max_tokens, left = spec.max_tokens, service.ready().context - len(tokens)
    if max_tokens is None or spec.clamp_max_tokens:
        max_tokens = max(1, min(DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens, left))
    chat = spec.messages is not None
    if service.log_requests:
        log_request(spec, len(tokens), max_tokens)
    return Request(tokens, max_tokens, spec.temperature, spec.top_p, spec.seed, list(spec.stop),
                   service.ready().tokenizer.encode if chat else None, tool_calls=bool(_offered(spec)),
                   top_k=spec.top_k, constraint=constraint, logprobs=spec.logprobs, speculate=spec.speculate,
                   images=images)


def image_part(url: object, where: str) -> dict:
    """The image_url part (mistral-common's) of a client's image `url`, checked: a base64 data URI
    of an image within the limits (images.data_uri_image), else a 400 naming `where`."""
    try:
        data_uri_image(url, where)
    except MistralError as e:
        raise APIError(400, str(e), param=where) from None
    return {"type": "image_url", "image_url": {"url": url}}


def speculative(extra: dict) -> bool:
    """A body's "speculative" field (any of the three APIs): false turns the server's
    speculation off for that request; absent or true leaves it as the server has it."""
    value = extra.get("speculative", True)
    if not isinstance(value, bool):
        raise APIError(400, f"speculative must be true or false, got {value!r}", param="speculative")
    return value


def log_request(spec: Spec, prompt: int, max_tokens: int) -> None:
    """One line on stderr: the roles of the request's messages (runs of one role counted), its tools,
    its prompt tokens and the most it may generate."""
    roles = [m["role"] for m in spec.messages] if spec.messages is not None else ["prompt"]
    counted = [(role, len(list(group))) for role, group in itertools.groupby(roles)]
    runs = [role if n == 1 else f"{role} x{n}" for role, n in counted]
    print(f"request for {spec.model!r}: {', '.join(runs)}; {len(spec.tools)} tools; "
          f"{prompt} prompt tokens, up to {max_tokens} new", file=sys.stderr, flush=True)


def prompt_tokens(service: Service, spec: Spec) -> list[int]:
    """The token ids of the prompt `spec` makes (what usage reports as its prompt or input tokens)."""
    return prompt_inputs(service, spec)[0]


def prompt_inputs(service: Service, spec: Spec) -> tuple[list[int], list]:
    """prompt_tokens, and the images of an image model's chat (their pixels, in order)."""
    tok = service.ready().tokenizer
    if spec.messages is None:
        try:
            return tok.encode(spec.prompt, bos=True), []
        except MistralError as e:
            raise APIError(400, service.public(f"prompt: {e}"), param="prompt")
    tools = _offered(spec)
    try:
        reasoning = service.reasoning_for(spec.reasoning)
        if service.images:
            return tok.chat_inputs(spec.messages, tools=tools, reasoning=reasoning)
        return tok.chat_tokens(spec.messages, tools=tools, reasoning=reasoning), []
    except MistralError as e:
        raise APIError(400, service.public(str(e)), param="tools" if tools and tok.tool_calls_id is None else "messages")


def constrain(service: Service, spec: Spec) -> Constraint | None:
    """The one place that decides what a request may hold the model to: the grammar of its
    response_format and tool_choice (structured.Grammars), or None for free text; a 400 names the field."""
    try:
        reasoning = service.reasoning_for(spec.reasoning) and spec.messages is not None
        return service.ready().grammars.for_chat(spec.response_format, spec.tools, spec.tool_choice, reasoning,
                                                 spec.parallel_tool_calls)
    except MistralError as e:
        message = service.public(str(e))
        if spec.format_param and message.startswith("response_format"):  # a schema's field: named as sent
            message = spec.format_param + re.sub(r"^response_format(\.json_schema)?", "", message)
        param = message.split(":", 1)[0]
        raise APIError(400, message, param=param if " " not in param else None) from None


def _offered(spec: Spec) -> list[dict]:
    """The tools the prompt offers the model: none under tool_choice "none"."""
    return list(spec.tools) if spec.tool_choice != "none" else []


def call_id(given: str) -> str:
    """Mistral's form of a tool-call id: 9 letters and digits. This server's ids pass as they are;
    another model's (Claude's toolu_..., OpenAI's call_...) become 9 characters of its hash, the same
    for the call and for its result, so a conversation begun elsewhere goes on here."""
    if re.fullmatch(r"[A-Za-z0-9]{9}", given):
        return given
    n = int.from_bytes(hashlib.sha256(given.encode("utf-8", "surrogatepass")).digest(), "big")
    return "".join(ALNUM[n // 62 ** k % 62] for k in range(9))
