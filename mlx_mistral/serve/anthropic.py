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
from collections.abc import AsyncIterator, Iterator

from fastapi import Depends, FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse

from ..text import ToolCall
from .anthropic_request import Conversation, MessagesRequest, to_spec
from .build import build, prompt_tokens
from .http import Service, answer, sse, submit
from .request import Event, Request

PREFIX = "/v1/messages"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
# the first content block of each kind, streamed, and the delta that extends it
START = {"thinking": {"type": "thinking", "thinking": "", "signature": ""}, "text": {"type": "text", "text": ""}}
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
        spec = to_spec(body, max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                       top_k=body.top_k, stop=body.stop_sequences)
        request = build(service, spec)
        events = submit(service, request, "messages")
        head = {"id": "msg_" + uuid.uuid4().hex, "type": "message", "role": "assistant", "model": service.answering(body.model)}
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
        return {"input_tokens": len(prompt_tokens(service, to_spec(body)))}


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


def frame(obj: dict) -> str:
    """One server-sent event, named by its type as Anthropic names them."""
    return f"event: {obj['type']}\n" + sse(obj)


def signature(thinking: str) -> str:
    """A thinking block's signature: a digest of its text (clients send the block back whole in
    later turns; its text never reaches the prompt again)."""
    return base64.b64encode(hashlib.blake2b(thinking.encode("utf-8", "surrogatepass"), digest_size=24).digest()).decode()


class Blocks:
    """The content blocks of a streamed answer: each opened with content_block_start, extended by
    deltas, closed with content_block_stop; a new kind of text (thinking, then the answer) opens
    the next one, and the calls come whole at the end."""

    def __init__(self):
        self.index, self.open, self.thinking = -1, None, ""

    def add(self, event: Event) -> Iterator[str]:
        """The server-sent events of one Event; the last one's end with message_stop."""
        for kind, piece in (("thinking", event.reasoning), ("text", event.text)):
            if piece:  # the reasoning first: an event may end it and begin the answer
                yield from self.delta(kind, piece)
        if event.finish_reason:
            yield from self.close()
            for call in event.tool_calls or []:
                yield from self.tool_use(call)
            end = ending(event)
            yield frame({"type": "message_delta", "usage": end.pop("usage"), "delta": end})
            yield frame({"type": "message_stop"})

    def delta(self, kind: str, piece: str) -> Iterator[str]:
        if self.open != kind:
            yield from self.start(kind, START[kind])
        delta_type, field = DELTA[kind]
        self.thinking += piece if kind == "thinking" else ""
        yield frame({"type": "content_block_delta", "index": self.index, "delta": {"type": delta_type, field: piece}})

    def tool_use(self, call: ToolCall) -> Iterator[str]:
        """A whole call: its block, its input as one input_json_delta, its end."""
        yield from self.start("tool_use", {"type": "tool_use", "id": call.id, "name": call.name, "input": {}})
        yield frame({"type": "content_block_delta", "index": self.index,
                     "delta": {"type": "input_json_delta", "partial_json": call.arguments}})
        yield from self.close()

    def start(self, kind: str, block: dict) -> Iterator[str]:
        yield from self.close()
        self.index, self.open = self.index + 1, kind
        yield frame({"type": "content_block_start", "index": self.index, "content_block": block})

    def close(self) -> Iterator[str]:
        if self.open == "thinking":  # as Anthropic: the signature comes last, in its own delta
            yield frame({"type": "content_block_delta", "index": self.index,
                         "delta": {"type": "signature_delta", "signature": signature(self.thinking)}})
        if self.open is not None:
            yield frame({"type": "content_block_stop", "index": self.index})
            self.open = None


async def stream(request: Request, events: asyncio.Queue, head: dict) -> AsyncIterator[str]:
    """The server-sent events of a streamed answer: message_start (once the first token says how much
    of the prompt was cached), ping, the content blocks, message_delta, message_stop; an error as
    Anthropic's error event."""
    try:
        event, blocks = await events.get(), Blocks()
        if event.finish_reason != "error":
            yield frame({"type": "message_start", "message": head | {
                "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage(event)}})
            yield frame({"type": "ping"})
        while event.finish_reason != "error":
            for chunk in blocks.add(event):
                yield chunk
            if event.finish_reason:
                return
            event = await events.get()
        yield frame(error_body(500, f"generation failed: {event.error}"))
    finally:
        request.cancel()  # the client left mid-stream: its row leaves the batch
