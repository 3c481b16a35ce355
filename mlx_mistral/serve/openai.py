"""OpenAI's API: /v1/models, /v1/chat/completions and /v1/completions, streamed and whole.

The pydantic schemas of the requests, each request translated into build.Spec (the builder
makes the scheduler Request), and the Events back out as OpenAI's response objects or SSE chunks.
"""

import asyncio
import time
import uuid
from typing import Literal

from fastapi import Depends, FastAPI, Request as HTTPRequest
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from .build import Spec, build, image_part, speculative
from .http import APIError, Service, answer, sse, submit
from .logprobs import Logprobs, requested
from .request import MAX_LOGPROBS, Event, Request
from .stream import parts

# Fields of OpenAI's API that would change the answer: refused unless off (None, False, 0, empty).
UNSUPPORTED = ("logit_bias", "presence_penalty", "frequency_penalty", "functions",
               "best_of", "echo", "suffix")
IMAGE_PARTS = ("image_url", "input_image", "image")  # content parts of vision models: refused by name


class Function(BaseModel):
    name: str
    arguments: str  # a JSON object, as text


class ToolCallIn(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: Function


class Message(BaseModel):
    """A chat turn: an assistant turn may be function calls (content null), a tool turn their result.
    Content is text, or a list of parts ({"type": "text", "text": ...}: see text_messages)."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[dict] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def has_content(self) -> "Message":
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs its content (only assistant tool calls may have none)")
        return self


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """The fields chat and completions share; unknown harmless fields are ignored."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: StrictInt | None = Field(None, gt=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = 1


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="allow")  # description, strict: handed to mistral-common as given
    name: str
    parameters: dict = Field(default_factory=dict)


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionSpec


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, gt=0)
    tools: list[Tool] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: StrictBool = True
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)


class CompletionRequest(Sampling):
    prompt: str = Field(min_length=1)
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)


def add_routes(app: FastAPI, service: Service) -> None:
    auth = [Depends(service.authorize)]

    @app.get("/v1/models", dependencies=auth)
    async def models():
        service.ready()
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "mlx-mistral"}
                                           for name in service.names]}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(body: ChatRequest, http: HTTPRequest):
        spec = Spec(body.model, messages=text_messages(body.messages, service.images),
                    tools=[t.model_dump(exclude_none=True) for t in body.tools or []],
                    tool_choice=body.tool_choice or "auto", parallel_tool_calls=body.parallel_tool_calls,
                    max_tokens=body.max_completion_tokens or body.max_tokens, **spec_fields(body, "chat"))
        return await run(service, build(service, spec), body, "chat", http)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, http: HTTPRequest):
        spec = Spec(body.model, prompt=body.prompt, max_tokens=body.max_tokens, **spec_fields(body, "text"))
        return await run(service, build(service, spec), body, "text", http)


def text_messages(messages: list[Message], images: bool = False) -> list[dict]:
    """The messages as mistral-common takes them: a list of text parts stays a list (it joins
    them); with `images` (an image model) image_url parts of data URIs too (build.image_part: a
    400 naming the part otherwise); any other part gets a 400 naming the message."""
    out = []
    for i, m in enumerate(messages):
        for j, part in enumerate(m.content if isinstance(m.content, list) else ()):
            kind = part.get("type")
            if kind == "image_url" and images:
                image_part((part.get("image_url") or {}).get("url"), f"messages[{i}].content[{j}]")
                continue
            if kind in IMAGE_PARTS:
                raise APIError(400, f"messages[{i}].content: image input is not supported (text-only model)",
                               param=f"messages[{i}].content")
            if kind != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{i}].content: expected text parts "
                               f'{{"type": "text", "text": ...}}, got type {kind!r}', param=f"messages[{i}].content")
        out.append(m.model_dump(exclude_none=True))
    return out


def spec_fields(body: Sampling, kind: str) -> dict:
    """The Spec fields chat and completions (`kind` "chat" or "text") share; the fields that
    would change the answer are refused."""
    if body.n != 1:
        raise APIError(400, "n: only n = 1 is supported", param="n")
    for name in UNSUPPORTED:
        if body.model_extra.get(name) not in (None, False, 0, [], {}):
            raise APIError(400, f"{name}: not supported by this server", param=name)
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    return {"temperature": body.temperature, "top_p": body.top_p, "seed": body.seed, "stop": stop,
            "response_format": body.model_extra.get("response_format"), "logprobs": requested(body, kind),
            "speculate": speculative(body.model_extra)}


async def run(service: Service, request: Request, body: Sampling, kind: str, http: HTTPRequest):
    """Submit `request` and answer it: an SSE stream, or the whole completion object."""
    logprobs = Logprobs(kind, service.ready().tokenizer) if request.logprobs is not None else None
    events = submit(service, request, "messages" if kind == "chat" else "prompt")
    ident = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
    head = {"id": ident, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": service.answering(body.model)}
    if body.stream:
        return StreamingResponse(stream(request, events, body, kind, head, logprobs),
                                 media_type="text/event-stream")
    received, event = await answer(request, events, http)
    text = "".join(e.text for e in received) + event.text
    reasoning = "".join(e.reasoning for e in received) + event.reasoning
    choice = {"index": 0, "finish_reason": event.finish_reason,
              "logprobs": logprobs.whole(received + [event]) if logprobs else None}
    if kind == "text":
        choice |= {"text": text} | ({"reasoning_content": reasoning} if reasoning else {})
    else:
        message = {"role": "assistant", "content": None if event.tool_calls else text}
        message |= {"reasoning_content": reasoning} if reasoning else {}
        message |= {"tool_calls": [c.to_openai() for c in event.tool_calls]} if event.tool_calls else {}
        choice["message"] = message
    return head | {"choices": [choice], "usage": usage(event)}


async def stream(request: Request, events: asyncio.Queue, body: Sampling, kind: str, head: dict,
                 logprobs: Logprobs | None = None):
    """The SSE chunks of a streamed answer; `head` is the completion object's id, model and time."""
    head = head | {"object": "chat.completion.chunk" if kind == "chat" else "text_completion"}

    def chunk(text: str | None, finish: str | None, first: bool = False, calls: list | None = None,
              reasoning: str = "") -> str:
        choice = {"index": 0, "finish_reason": finish,  # the logprobs of the tokens since the last chunk
                  "logprobs": logprobs.take() if logprobs and logprobs.pending else None}
        if kind == "chat":
            choice["delta"] = ({"role": "assistant"} if first else {}) | \
                ({"content": text} if text is not None else {}) | \
                ({"reasoning_content": reasoning} if reasoning else {}) | \
                ({"tool_calls": [{"index": i} | c.to_openai() for i, c in enumerate(calls)]} if calls else {})
        else:
            choice |= {"text": text or ""} | ({"reasoning_content": reasoning} if reasoning else {})
        return sse(head | {"choices": [choice]})

    if kind == "chat":
        yield chunk("", None, first=True)
    calls = []
    async for part in parts(request, events):
        if part.kind == "error":
            yield sse({"error": {"message": part.text, "type": "server_error", "param": None, "code": None}})
            break
        if part.kind == "token" and logprobs:
            logprobs.add(part.event)
        elif part.kind == "delta":
            yield chunk(part.text, None) if part.field == "text" else chunk(None, None, reasoning=part.text)
        elif part.kind == "call":
            calls.append(part.call)
        elif part.kind == "end":
            if calls:  # the whole calls in one chunk
                yield chunk(None, None, calls=calls)
            yield chunk(None, part.event.finish_reason)
            if body.stream_options and body.stream_options.include_usage:
                yield sse(head | {"choices": [], "usage": usage(part.event)})
    yield "data: [DONE]\n\n"


def usage(event: Event) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.generated_tokens,
            "total_tokens": event.prompt_tokens + event.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": event.reused_tokens}}
