"""OpenAI's Responses API: POST /v1/responses (streamed or whole), GET and DELETE /v1/responses/{id},
with OpenAI's error objects. What Codex CLI speaks (its only wire API) and the OpenAI Agents SDK's default.

A request is translated (responses_request.py) into build.Spec, so its prompt is the one the chat
route makes of the same conversation; the Events come back as output items (reasoning, message,
function_call) or the stream's named events. A stored response (`store`, the default) keeps its
conversation in memory, LRU, for GET and for a later request's previous_response_id.
"""

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator

from fastapi import Depends, FastAPI, Request as HTTPRequest
from fastapi.responses import StreamingResponse

from ..text import ToolCall
from .build import build
from .http import APIError, Service, answer, frame, submit
from .request import Event, Request
from .responses_request import Offer, ResponsesRequest, to_spec
from .stream import Part, parts

STORED = 256  # responses kept for GET and previous_response_id, least recently used dropped first
ITEM_PREFIX = {"reasoning": "rs_", "message": "msg_", "function_call": "fc_"}


class ResponseStore:
    """Stored responses: each id's response object and its conversation (the messages of its
    input and its output, without its instructions, which a later turn does not inherit)."""

    def __init__(self, size: int = STORED):
        self.size, self._items = size, OrderedDict()

    def get(self, ident: str, param: str | None = None) -> tuple[dict, list[dict]]:
        if ident not in self._items:
            raise APIError(400 if param else 404, f"{param + ': ' if param else ''}response {ident!r} not found",
                           param=param, code="not_found")
        self._items.move_to_end(ident)
        return self._items[ident]

    def put(self, response: dict, conversation: list[dict]) -> None:
        self._items[response["id"]] = (response, conversation)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def delete(self, ident: str) -> None:
        self.get(ident)
        del self._items[ident]


def add_routes(app: FastAPI, service: Service) -> None:
    auth = [Depends(service.authorize)]
    store = ResponseStore()

    @app.post("/v1/responses", dependencies=auth)
    async def create(body: ResponsesRequest, http: HTTPRequest):
        history = store.get(body.previous_response_id, "previous_response_id")[1] if body.previous_response_id else []
        offer = Offer(body.tools)
        spec = to_spec(body, history, offer, service.ready().context, service.images)
        request = build(service, spec)
        events = submit(service, request, "input")
        turn = Turn(body, service.answering(body.model), offer, list(spec.messages[bool(body.instructions):]))
        if body.stream:
            return StreamingResponse(stream(request, events, turn, store), media_type="text/event-stream")
        received, last = await answer(request, events, http)
        for part in whole_parts(received + [last]):
            turn.add(part)
        return turn.finish(last, store)

    @app.get("/v1/responses/{ident}", dependencies=auth)
    async def retrieve(ident: str):
        return store.get(ident)[0]

    @app.delete("/v1/responses/{ident}", dependencies=auth)
    async def delete(ident: str):
        store.delete(ident)
        return {"id": ident, "object": "response", "deleted": True}


class Turn:
    """One response as it is made: its object, its output items (added from the stream's parts)
    and the conversation it continues (stored with its output at the end, if `store`)."""

    def __init__(self, body: ResponsesRequest, model: str, offer: Offer, conversation: list[dict]):
        self.body, self.offer, self.conversation = body, offer, conversation
        self.output: list[dict] = []
        self.reasoning_tokens = 0
        self.object = {
            "id": "resp_" + uuid.uuid4().hex, "object": "response", "created_at": int(time.time()),
            "status": "in_progress", "model": model, "output": self.output, "error": None, "incomplete_details": None,
            "instructions": body.instructions, "previous_response_id": body.previous_response_id,
            "tools": body.tools, "tool_choice": body.tool_choice, "parallel_tool_calls": body.parallel_tool_calls,
            "temperature": body.temperature, "top_p": body.top_p, "max_output_tokens": body.max_output_tokens,
            "text": body.text or {"format": {"type": "text"}}, "reasoning": body.reasoning, "store": body.store,
            "metadata": body.model_extra.get("metadata") or {}, "usage": None}

    def add(self, part: Part) -> dict | None:
        """The output item `part` starts, or completes (start, stop, call), else None."""
        self.reasoning_tokens += part.kind == "token" and bool(part.event.reasoning) and not part.event.text
        if part.kind == "start":
            kind = "reasoning" if part.field == "reasoning" else "message"
            item = {"reasoning": {"type": "reasoning", "summary": [], "content": []},
                    "message": {"type": "message", "role": "assistant", "content": []}}[kind]
            self.output.append({"id": ITEM_PREFIX[kind] + uuid.uuid4().hex} | item | {"status": "in_progress"})
            return self.output[-1]
        if part.kind == "stop":
            item = self.output[-1]
            item["content"] = [content_part(part.field, part.text)]
            item["status"] = "completed"
            return item
        if part.kind == "call":
            item = {"id": ITEM_PREFIX["function_call"] + uuid.uuid4().hex, "type": "function_call", "status": "completed",
                    "call_id": part.call.id, "name": part.call.name, "arguments": part.call.arguments}
            namespace = self.offer.namespaces.get(part.call.name)
            self.output.append(item | ({"namespace": namespace} if namespace else {}))
            return self.output[-1]
        return None

    def finish(self, last: Event, store: ResponseStore) -> dict:
        """The whole response object, stored with its conversation when asked."""
        incomplete = last.finish_reason == "length"
        self.object |= {"status": "incomplete" if incomplete else "completed", "usage": usage(last, self.reasoning_tokens),
                        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None}
        if self.body.store:
            store.put(self.object, self.conversation + [assistant_message(self.output)])
        return self.object


def content_part(field: str, text: str) -> dict:
    if field == "reasoning":
        return {"type": "reasoning_text", "text": text}
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def whole_parts(events: list[Event]) -> Iterator[Part]:
    """The parts of an answer received whole: its tokens, its reasoning, its text, its calls."""
    last = events[-1]
    yield from (Part("token", e) for e in events)
    for field in ("reasoning", "text"):
        text = "".join(getattr(e, field) for e in events)
        if text:
            yield from (Part("start", last, field), Part("stop", last, field, text))
    yield from (Part("call", last, call=call) for call in last.tool_calls or [])


def assistant_message(output: list[dict]) -> dict:
    """The output as the chat message a later turn's prompt holds (without its reasoning)."""
    text = "".join(item["content"][0]["text"] for item in output if item["type"] == "message")
    calls = [ToolCall(item["call_id"], item["name"], item["arguments"]).to_openai()
             for item in output if item["type"] == "function_call"]
    return {"role": "assistant", "content": text or None} | ({"tool_calls": calls} if calls else {})


def usage(event: Event, reasoning_tokens: int) -> dict:
    """Prompt tokens found in the prefix cache are the cached ones, those whose blocks this request
    wrote the cache writes; the reasoning tokens are the output tokens that were reasoning only."""
    return {"input_tokens": event.prompt_tokens, "output_tokens": event.generated_tokens,
            "total_tokens": event.prompt_tokens + event.generated_tokens,
            "input_tokens_details": {"cached_tokens": event.reused_tokens, "cache_write_tokens": event.written_tokens},
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens}}


async def stream(request: Request, events: asyncio.Queue, turn: Turn, store: ResponseStore) -> AsyncIterator[str]:
    """The named events of a streamed response: response.created and .in_progress, per output item
    its .added, content part and deltas, .done; response.completed (or .incomplete); an error as the
    `error` event and response.failed."""
    sequence = 0

    def emit(kind: str, **fields) -> str:
        nonlocal sequence
        sequence += 1
        return frame({"type": kind, "sequence_number": sequence - 1} | fields)

    async for part in parts(request, events):
        for kind, fields in render(part, turn, store):
            yield emit(kind, **fields)


def render(part: Part, turn: Turn, store: ResponseStore) -> Iterator[tuple[str, dict]]:
    """The events (type, fields) of one part of the stream."""
    index = len(turn.output) - 1
    at = {"item_id": turn.output[-1]["id"], "output_index": index} if turn.output else {}
    if part.kind == "token":  # counted: the usage's reasoning tokens
        turn.add(part)
    elif part.kind == "begin":
        yield "response.created", {"response": turn.object}
        yield "response.in_progress", {"response": turn.object}
    elif part.kind == "start":
        item = turn.add(part)
        at = {"item_id": item["id"], "output_index": index + 1}
        yield "response.output_item.added", {"output_index": index + 1, "item": item}
        yield "response.content_part.added", at | {"content_index": 0, "part": content_part(part.field, "")}
    elif part.kind == "delta":
        kind = "response.reasoning_text.delta" if part.field == "reasoning" else "response.output_text.delta"
        yield kind, at | {"content_index": 0, "delta": part.text} | ({"logprobs": []} if part.field == "text" else {})
    elif part.kind == "stop":
        item = turn.add(part)
        kind = "response.reasoning_text.done" if part.field == "reasoning" else "response.output_text.done"
        yield kind, at | {"content_index": 0, "text": part.text} | ({"logprobs": []} if part.field == "text" else {})
        yield "response.content_part.done", at | {"content_index": 0, "part": item["content"][0]}
        yield "response.output_item.done", {"output_index": index, "item": item}
    elif part.kind == "call":
        item = turn.add(part)
        at = {"item_id": item["id"], "output_index": index + 1}
        yield "response.output_item.added", {"output_index": index + 1, "item": item | {"status": "in_progress",
                                                                                         "arguments": ""}}
        yield "response.function_call_arguments.delta", at | {"delta": item["arguments"]}
        yield "response.function_call_arguments.done", at | {"name": item["name"], "arguments": item["arguments"]}
        yield "response.output_item.done", {"output_index": index + 1, "item": item}
    elif part.kind == "end":
        response = turn.finish(part.event, store)
        yield ("response.incomplete" if response["status"] == "incomplete" else "response.completed"), {"response": response}
    elif part.kind == "error":
        yield "error", {"code": "server_error", "message": part.text, "param": None}
        turn.object |= {"status": "failed", "error": {"code": "server_error", "message": part.text}}
        yield "response.failed", {"response": turn.object}
