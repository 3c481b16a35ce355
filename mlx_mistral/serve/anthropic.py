"""Anthropic's Messages API: POST /v1/messages (streamed or whole) and /v1/messages/count_tokens,
with Anthropic's error objects on both.

A request is translated (anthropic_request.py) into build.Spec, so its prompt is the one the OpenAI
route makes of the same conversation; the Events come back as Anthropic's content blocks
(thinking, text, tool_use) or its server-sent events.
"""

import asyncio
import base64
import hashlib
import json
import uuid
from dataclasses import replace
from collections.abc import AsyncIterator, Iterator

from fastapi import Depends, FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse

from ..text import ToolCall
from .anthropic_request import Conversation, MessagesRequest, to_spec
from . import context_edits
from .build import Spec, build, prompt_tokens
from .http import Service, answer, frame, submit
from .request import Event, Request
from .stream import Part, parts

PREFIX = "/v1/messages"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
# the first content block of each kind, streamed, and the delta that extends it
START = {"thinking": {"type": "thinking", "thinking": "", "signature": ""}, "text": {"type": "text", "text": ""}}
KIND = {"reasoning": "thinking", "text": "text"}  # stream.Part's field -> the block's type
DELTA = {"thinking": ("thinking_delta", "thinking"), "text": ("text_delta", "text")}


def owns(path: str) -> bool:
    """Whether `path` is one of this API's (its errors are then Anthropic's)."""
    return path == PREFIX or path.startswith(PREFIX + "/")


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message), status_code=status, headers=headers)


def error_body(status: int, message: str) -> dict:
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def add_routes(app: FastAPI, service: Service) -> None:
    auth = [Depends(service.authorize)]

    @app.post(PREFIX, dependencies=auth)
    async def messages(body: MessagesRequest, http: HTTPRequest):
        spec, applied = edited(service, body, max_tokens=body.max_tokens, temperature=body.temperature,
                               top_p=body.top_p, top_k=body.top_k, stop=body.stop_sequences)
        request = build(service, spec)
        events = submit(service, request, "messages")
        head = {"id": "msg_" + uuid.uuid4().hex, "type": "message", "role": "assistant", "model": service.answering(body.model)}
        head |= {"context_management": {"applied_edits": applied}} if applied is not None else {}
        if body.stream:
            return StreamingResponse(stream(request, events, head), media_type="text/event-stream")
        received, last = await answer(request, events, http)
        reasoning = "".join(e.reasoning for e in received + [last])
        text = "".join(e.text for e in received + [last])
        blocks = ([{"type": "thinking", "thinking": reasoning, "signature": signature(reasoning)}] if reasoning else []) + \
            ([{"type": "text", "text": text}] if text else []) + \
            [tool_use(call) for call in last.tool_calls or []]
        return head | {"content": blocks} | ending(last)

    @app.post(PREFIX + "/count_tokens", dependencies=auth)
    async def count_tokens(body: Conversation):
        return {"input_tokens": len(prompt_tokens(service, edited(service, body)[0]))}


def edited(service: Service, body: Conversation, **sampling) -> tuple[Spec, list[dict] | None]:
    """The builder's Spec of `body` with its context_management edits applied (context_edits.py),
    and the applied_edits to report (None when the request asked for none)."""
    edits = context_edits.check(body.model_extra.get("context_management"))
    spec = to_spec(body, service.images, **sampling)
    messages, applied = context_edits.apply(
        edits, list(spec.messages), lambda m: len(prompt_tokens(service, replace(spec, messages=m))))
    return replace(spec, messages=messages), applied if edits else None


def tool_use(call: ToolCall) -> dict:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": json.loads(call.arguments)}


def ending(event: Event) -> dict:
    """The stop reason, the stop sequence and the usage of a finished answer."""
    reason = "stop_sequence" if event.stop_sequence is not None else STOP_REASONS[event.finish_reason]
    return {"stop_reason": reason, "stop_sequence": event.stop_sequence, "usage": usage(event)}


def usage(event: Event) -> dict:
    """Prompt tokens found in the prefix cache (not prefilled again) are the cache reads, those whose
    blocks this request wrote to it the cache creation, input_tokens the rest: their sum is the
    prompt, what count_tokens says."""
    fresh = event.prompt_tokens - event.reused_tokens - event.written_tokens
    return {"input_tokens": fresh, "output_tokens": event.generated_tokens,
            "cache_read_input_tokens": event.reused_tokens, "cache_creation_input_tokens": event.written_tokens}


def signature(thinking: str) -> str:
    """A thinking block's signature: a digest of its text (clients send the block back whole in
    later turns; its text never reaches the prompt again)."""
    return base64.b64encode(hashlib.blake2b(thinking.encode("utf-8", "surrogatepass"), digest_size=24).digest()).decode()


def render(part: Part, index: int, head: dict) -> Iterator[str]:
    """The server-sent events of one part of the stream (stream.parts); `index` is the content
    block's, counted by the caller: a new kind of text (thinking, then the answer) is a new block,
    each call its own, whole: its block, its input as one input_json_delta, its end."""
    if part.kind == "begin":  # the first token says how much of the prompt was cached
        yield frame({"type": "message_start", "message": head | {
            "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage(part.event)}})
        yield frame({"type": "ping"})
    elif part.kind == "start":
        yield frame({"type": "content_block_start", "index": index, "content_block": START[KIND[part.field]]})
    elif part.kind == "delta":
        delta_type, field = DELTA[KIND[part.field]]
        yield frame({"type": "content_block_delta", "index": index, "delta": {"type": delta_type, field: part.text}})
    elif part.kind == "stop":
        if part.field == "reasoning":  # as Anthropic: the signature comes last, in its own delta
            yield frame({"type": "content_block_delta", "index": index,
                         "delta": {"type": "signature_delta", "signature": signature(part.text)}})
        yield frame({"type": "content_block_stop", "index": index})
    elif part.kind == "call":
        call = part.call
        block = {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
        yield frame({"type": "content_block_start", "index": index, "content_block": block})
        yield frame({"type": "content_block_delta", "index": index,
                     "delta": {"type": "input_json_delta", "partial_json": call.arguments}})
        yield frame({"type": "content_block_stop", "index": index})
    elif part.kind == "end":
        end = ending(part.event)
        yield frame({"type": "message_delta", "usage": end.pop("usage"), "delta": end})
        yield frame({"type": "message_stop"})
    elif part.kind == "error":
        yield frame(error_body(500, part.text))


async def stream(request: Request, events: asyncio.Queue, head: dict) -> AsyncIterator[str]:
    """The server-sent events of a streamed answer: message_start, ping, the content blocks,
    message_delta, message_stop; an error as Anthropic's error event."""
    index = -1
    async for part in parts(request, events):
        index += part.kind in ("start", "call")
        for chunk in render(part, index, head):
            yield chunk
