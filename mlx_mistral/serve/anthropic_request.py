"""Anthropic's Messages request: its pydantic schema, and its translation into build.Spec.

The messages become OpenAI-style chat messages for mistral-common: the system prompt (a string
or text blocks) first; a `system`-role message inside `messages` (Claude Code sends one) a system
message in its place, where mistral-common's V7+ templates keep it ([SYSTEM_PROMPT] in place) and
its V1-V3 ones fold every system message into the one system prompt; a user turn's tool_result
blocks become tool messages and its text one user message; an assistant turn's text and tool_use
blocks one assistant message with tool_calls. Earlier thinking blocks are left out, as the OpenAI route leaves out
reasoning_content (and as Anthropic leaves out earlier turns' thinking): both routes make the
same prompt of the same conversation. Tool-use ids are Mistral's 9 letters and digits; another
model's (Claude's toolu_...) become 9 characters of its hash, the same for the tool_use and for
its tool_result, so a conversation begun elsewhere goes on here.
"""

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from .build import Spec, call_id, image_part, speculative
from .http import APIError

MEDIA = ("image", "document")  # multimodal input blocks: refused by name
# Top-level fields that would change the answer (server-side tools): refused unless off. Other
# fields are ignored: metadata, service_tier, cache_control, output_config's effort (Mistral's
# reasoning has no effort levels). thinking: see _thinking; context_management: context_edits.py.
UNSUPPORTED = ("container", "mcp_servers")


class Turn(BaseModel):
    role: Literal["user", "assistant", "system"]
    content: str | list[dict]


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")  # cache_control and the like: harmless
    name: str
    description: str | None = None
    input_schema: dict | None = None
    type: str | None = None  # "custom" or none; Anthropic's server tools (web search, bash, ...) are refused


class ToolChoice(BaseModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class Conversation(BaseModel):
    """What count_tokens reads. Unknown harmless fields are ignored (see UNSUPPORTED)."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Turn] = Field(min_length=1)
    system: str | list[dict] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None


class MessagesRequest(Conversation):
    max_tokens: StrictInt = Field(gt=0)
    stop_sequences: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    temperature: float = Field(1.0, ge=0, le=1)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: StrictInt = Field(0, ge=0)
    metadata: dict | None = None
    stream: bool = False


def to_spec(body: Conversation, images: bool = False, **sampling) -> Spec:
    """The builder's form of `body`; `sampling`: the Spec's max_tokens, temperature, top_p, top_k, stop.
    With `images` (an image model) a user turn's base64 image blocks are taken (_image)."""
    for name in UNSUPPORTED:
        if body.model_extra.get(name) not in (None, [], {}):
            raise APIError(400, f"{name}: not supported by this server", param=name)
    messages = [{"role": "system", "content": _text(body.system, "system")}] if body.system else []
    called: set[str] = set()  # the tool-use ids of the assistant turn before
    for i, turn in enumerate(body.messages):
        if turn.role == "system":
            messages.append({"role": "system", "content": _text(turn.content, f"messages.{i}.content")})
        elif turn.role == "assistant":
            message = _assistant(turn.content, f"messages.{i}")
            messages.append(message)
            called = {call["id"] for call in message.get("tool_calls", ())}
        else:
            messages += _user(turn.content, f"messages.{i}", called, images)
            called = set()
    tools = [_tool(tool, f"tools.{i}") for i, tool in enumerate(body.tools or [])]
    one = bool(body.tool_choice and body.tool_choice.disable_parallel_tool_use)
    return Spec(body.model, messages=messages, tools=tools, tool_choice=_tool_choice(body.tool_choice),
                parallel_tool_calls=not one, clamp_max_tokens=True, reasoning=_thinking(body.model_extra.get("thinking")),
                response_format=_format(body.model_extra.get("output_config")), format_param="output_config.format",
                speculate=speculative(body.model_extra), **sampling)


def _thinking(thinking: object) -> bool | None:
    """`thinking` {"type": "enabled" (with budget_tokens), "adaptive" or "disabled"}: the model's
    reasoning switch (on only where the model reasons; Mistral's reasoning has no token budget);
    absent: the server's --reasoning."""
    if thinking is None:
        return None
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind not in ("enabled", "adaptive", "disabled"):
        raise APIError(400, f"thinking.type: expected 'enabled', 'adaptive' or 'disabled', got {kind!r}",
                       param="thinking.type")
    return kind != "disabled"


def _user(content: str | list[dict], where: str, called: set[str], images: bool = False) -> list[dict]:
    """A user turn: a tool message per tool_result block, then one user message of the text (and,
    with `images`, the images)."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    results, texts = [], []
    for j, block in enumerate(content):
        at = f"{where}.content.{j}"
        if block.get("type") == "tool_result":
            results.append(_tool_result(block, at, called))
        elif block.get("type") == "image" and images:
            texts.append(_image(block, at))
        else:
            texts.append({"type": "text", "text": _text_block(block, at)})
    return results + ([{"role": "user", "content": texts}] if texts else [])


def _image(block: dict, where: str) -> dict:
    """An image block {"type": "image", "source": {"type": "base64", "media_type", "data"}} as
    OpenAI's image_url part (a data URI, checked by build.image_part: a 400 naming the block)."""
    source = block.get("source") if isinstance(block.get("source"), dict) else {}
    if source.get("type") != "base64":
        raise APIError(400, f"{where}.source: only base64 image sources are accepted (image URLs are not "
                       f"fetched by this server), got {source.get('type')!r}", param=f"{where}.source")
    return image_part(f"data:{source.get('media_type')};base64,{source.get('data')}", where)


def _assistant(content: str | list[dict], where: str) -> dict:
    """An assistant turn: its text and its calls, without its thinking."""
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts, calls = [], []
    for j, block in enumerate(content):
        kind = block.get("type")
        if kind == "tool_use":
            calls.append(_tool_use(block, f"{where}.content.{j}"))
        elif kind not in ("thinking", "redacted_thinking"):
            texts.append({"type": "text", "text": _text_block(block, f"{where}.content.{j}")})
    return {"role": "assistant", "content": texts or None} | ({"tool_calls": calls} if calls else {})


def _tool_use(block: dict, where: str) -> dict:
    for field, kind, expected in (("id", str, "a string"), ("name", str, "a string"), ("input", dict, "an object")):
        if not isinstance(block.get(field), kind):
            raise APIError(400, f"{where}.{field}: expected {expected}", param=f"{where}.{field}")
    function = {"name": block["name"], "arguments": json.dumps(block["input"], ensure_ascii=False)}
    return {"id": call_id(block["id"]), "type": "function", "function": function}


def _tool_result(block: dict, where: str, called: set[str]) -> dict:
    given = block.get("tool_use_id")
    if not isinstance(given, str) or call_id(given) not in called:
        raise APIError(400, f"{where}.tool_use_id: {given!r} is not the id of a tool_use in the assistant message "
                       "before it", param=f"{where}.tool_use_id")
    content = _text(block.get("content", ""), f"{where}.content")
    if block.get("is_error"):  # Mistral's tool messages have no error flag: the text says it
        content = [{"type": "text", "text": "Error:"}, *([{"type": "text", "text": content}]
                                                        if isinstance(content, str) else content)]
    return {"role": "tool", "tool_call_id": call_id(given), "content": content}


def _text(content: str | list, where: str) -> str | list[dict]:
    """A string, or a list of text blocks as OpenAI's text parts (mistral-common joins them)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}: expected a string or a list of text blocks", param=where)
    return [{"type": "text", "text": _text_block(block, f"{where}.{j}")} for j, block in enumerate(content)]


def _text_block(block: dict, where: str) -> str:
    kind = block.get("type") if isinstance(block, dict) else None
    if kind in MEDIA:
        raise APIError(400, f"{where}: {kind} input is not supported (text-only model)", param=where)
    if kind != "text" or not isinstance(block.get("text"), str):
        raise APIError(400, f'{where}: expected a text block {{"type": "text", "text": ...}}, got type {kind!r}',
                       param=where)
    return block["text"]


def _tool(tool: Tool, where: str) -> dict:
    """A tool in OpenAI's function form."""
    if tool.type not in (None, "custom"):
        raise APIError(400, f"{where}.type: server tool {tool.type!r} is not supported (only tools with an "
                       "input_schema)", param=f"{where}.type")
    if tool.input_schema is None:
        raise APIError(400, f"{where}.input_schema: Field required", param=f"{where}.input_schema")
    function = {"name": tool.name, "parameters": tool.input_schema}
    function |= {"description": tool.description} if tool.description else {}
    return {"type": "function", "function": function}


def _tool_choice(choice: ToolChoice | None) -> str | dict:
    """OpenAI's form, which the builder takes: "auto", "none", "required" (Anthropic's "any", a
    call enforced by the grammar) or {"type": "function", ...} naming the one tool to call."""
    if choice is None or choice.type in ("auto", "none"):
        return choice.type if choice else "auto"
    if choice.type == "any":
        return "required"
    if not choice.name:
        raise APIError(400, "tool_choice.name: required when tool_choice.type is 'tool'", param="tool_choice.name")
    return {"type": "function", "function": {"name": choice.name}}


def _format(output_config: object) -> dict | None:
    """output_config.format ({"type": "json_schema", "schema": {...}}) as OpenAI's response_format."""
    fmt = output_config.get("format") if isinstance(output_config, dict) else None
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise APIError(400, 'output_config.format: expected {"type": "json_schema", "schema": {...}}',
                       param="output_config.format")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt.get("schema")}}
