"""OpenAI's Responses request (what Codex CLI and the OpenAI Agents SDK send): its pydantic schema
and its translation into build.Spec.

The input items become chat messages for mistral-common, as the chat route's messages: the
`instructions` a system message first, then the earlier turns of `previous_response_id` (kept by
the server's ResponseStore), then `input`: a string is a user message; a `message` item's role
`developer` or `system` is a system message (mistral-common places system messages as the model's
template allows), `user` and `assistant` their own; `function_call` items join the assistant
message before them as its tool_calls, `function_call_output` items are tool messages; `reasoning`
items are left out, as the other routes leave out earlier reasoning. Function tools are offered as
they are; a `namespace` tool's functions are offered by their own names (the call that comes back
names its namespace); the hosted tools (web search, file search, ...) cannot run here and are not
offered: a tool_choice naming one is refused.
"""


from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from .build import Spec, call_id, image_part, speculative
from .http import APIError

TEXT_PARTS = ("input_text", "output_text", "refusal")  # a refusal's text is in "refusal"
MEDIA_PARTS = ("input_image", "input_file", "input_audio")  # refused by name (text-only model)
SKIPPED_ITEMS = ("reasoning",)  # earlier reasoning: never in the prompt again
# Fields that would change the answer or how it is run: refused unless off.
UNSUPPORTED = ("background", "conversation", "prompt", "max_tool_calls", "top_logprobs")


class ResponsesRequest(BaseModel):
    """Unknown harmless fields are ignored: store, include, metadata, prompt_cache_key, user,
    safety_identifier, service_tier, truncation, client_metadata, stream_options."""

    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[dict] = Field(min_length=1)
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[dict] = Field(default_factory=list)
    tool_choice: str | dict = "auto"
    parallel_tool_calls: StrictBool = True
    text: dict | None = None
    reasoning: dict | None = None
    max_output_tokens: StrictInt | None = Field(None, gt=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: StrictInt | None = None
    store: StrictBool = True
    stream: StrictBool = False


class Offer:
    """The tools of a request as the model sees them (OpenAI's chat form) and the namespace of
    each function offered from a `namespace` tool."""

    def __init__(self, tools: list[dict]):
        self.functions: list[dict] = []
        self.namespaces: dict[str, str] = {}
        self.hosted: list[str] = []  # the hosted tools' types, not offered
        for i, tool in enumerate(tools):
            kind = tool.get("type")
            if kind == "function":
                self._add(tool, f"tools.{i}")
            elif kind == "namespace":
                for j, inner in enumerate(tool.get("tools") or []):
                    self._add(inner, f"tools.{i}.tools.{j}", tool.get("name"))
            elif isinstance(kind, str):
                self.hosted.append(kind)
            else:
                raise APIError(400, f"tools.{i}.type: expected a string", param=f"tools.{i}.type")

    def _add(self, tool: dict, where: str, namespace: str | None = None) -> None:
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise APIError(400, f"{where}.name: expected the function's name", param=f"{where}.name")
        if any(f["function"]["name"] == name for f in self.functions):
            raise APIError(400, f"{where}.name: {name!r} is offered twice", param=f"{where}.name")
        function = {"name": name, "parameters": tool.get("parameters") or {}}
        function |= {key: tool[key] for key in ("description", "strict") if tool.get(key) is not None}
        self.functions.append({"type": "function", "function": function})
        if namespace:
            self.namespaces[name] = namespace


def to_spec(body: ResponsesRequest, history: list[dict], offer: Offer, context: int,
            images: bool = False) -> Spec:
    """The builder's form of `body`; `history`: the messages of previous_response_id's turns;
    `context`: the model's, the most a response may take when max_output_tokens is not given;
    `images`: an image model's, whose messages' input_image parts are taken (data URIs)."""
    for name in UNSUPPORTED:
        if body.model_extra.get(name) not in (None, False, 0, [], {}):
            raise APIError(400, f"{name}: not supported by this server", param=name)
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    messages = system + history + input_messages(body.input, images)
    return Spec(body.model, messages=messages, tools=offer.functions, tool_choice=_tool_choice(body.tool_choice, offer),
                parallel_tool_calls=body.parallel_tool_calls, response_format=_format(body.text), format_param="text.format",
                max_tokens=body.max_output_tokens or context, clamp_max_tokens=True, temperature=body.temperature,
                top_p=body.top_p, seed=body.seed, reasoning=_reasoning(body.reasoning),
                speculate=speculative(body.model_extra))


def input_messages(items: str | list[dict], images: bool = False) -> list[dict]:
    """`input` as chat messages (see the module's docstring)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict] = []
    for i, item in enumerate(items):
        where = f"input.{i}"
        if not isinstance(item, dict):
            raise APIError(400, f"{where}: expected an input item (an object)", param=where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            messages.append(_message(item, where, images))
        elif kind == "function_call":
            call = {"id": call_id(_string(item, "call_id", where)), "type": "function",
                    "function": {"name": _string(item, "name", where), "arguments": _string(item, "arguments", where)}}
            if not (messages and messages[-1]["role"] == "assistant"):
                messages.append({"role": "assistant", "content": None})
            messages[-1].setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            output = item.get("output")
            content = output if isinstance(output, str) else _parts(output, f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": call_id(_string(item, "call_id", where)), "content": content})
        elif kind not in SKIPPED_ITEMS:
            raise APIError(400, f"{where}.type: input items of type {kind!r} are not supported (message, function_call, "
                           "function_call_output, reasoning)", param=f"{where}.type")
    return messages


def _message(item: dict, where: str, images: bool = False) -> dict:
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        raise APIError(400, f"{where}.role: expected 'user', 'assistant', 'system' or 'developer', got {role!r}",
                       param=f"{where}.role")
    content = item.get("content")
    content = content if isinstance(content, str) else _parts(content, f"{where}.content", images)
    return {"role": "system" if role == "developer" else role, "content": content}


def _parts(parts: object, where: str, images: bool = False) -> list[dict]:
    """Content parts as OpenAI's chat text parts (mistral-common joins them); with `images`,
    input_image parts of data URIs as image_url parts (build.image_part: a 400 otherwise)."""
    if not isinstance(parts, list):
        raise APIError(400, f"{where}: expected a string or a list of content parts", param=where)
    out = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        text = part.get("refusal" if kind == "refusal" else "text") if kind in TEXT_PARTS else None
        if kind == "input_image" and images:
            out.append(image_part(part.get("image_url"), f"{where}.{j}"))
            continue
        if kind in MEDIA_PARTS:
            raise APIError(400, f"{where}.{j}: {kind} is not supported (text-only model)", param=f"{where}.{j}")
        if not isinstance(text, str):
            raise APIError(400, f"{where}.{j}: expected a text part (input_text, output_text or refusal), "
                           f"got type {kind!r}", param=f"{where}.{j}")
        out.append({"type": "text", "text": text})
    return out


def _string(item: dict, field: str, where: str) -> str:
    if not isinstance(item.get(field), str):
        raise APIError(400, f"{where}.{field}: expected a string", param=f"{where}.{field}")
    return item[field]


def _tool_choice(choice: str | dict, offer: Offer) -> str | dict:
    """OpenAI's chat form: "auto", "none", "required" or the one function to call."""
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise APIError(400, f"tool_choice: expected 'auto', 'none' or 'required', got {choice!r}", param="tool_choice")
        return choice
    kind = choice.get("type")
    if kind != "function":
        raise APIError(400, f"tool_choice.type: {kind!r} is not supported (a hosted tool cannot run here; only "
                       "'function')", param="tool_choice.type")
    if not any(f["function"]["name"] == choice.get("name") for f in offer.functions):
        raise APIError(400, f"tool_choice.name: {choice.get('name')!r} is not one of the tools", param="tool_choice.name")
    return {"type": "function", "function": {"name": choice["name"]}}


def _format(text: dict | None) -> dict | None:
    """text.format as the chat route's response_format."""
    fmt = (text or {}).get("format")
    if fmt is None or fmt.get("type") in ("text", "json_object"):
        return fmt
    if fmt.get("type") != "json_schema":
        raise APIError(400, f"text.format.type: expected 'text', 'json_object' or 'json_schema', got "
                       f"{fmt.get('type')!r}", param="text.format.type")
    schema = {key: fmt[key] for key in ("name", "schema", "strict", "description") if key in fmt}
    return {"type": "json_schema", "json_schema": schema}


def _reasoning(reasoning: dict | None) -> bool | None:
    """`reasoning` turns the model's reasoning on (where it reasons) unless its effort is "none";
    Mistral's reasoning has no effort levels. Absent: the server's --reasoning."""
    if reasoning is None:
        return None
    return reasoning.get("effort") != "none"
