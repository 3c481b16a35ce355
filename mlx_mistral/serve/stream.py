"""The one stream writer: a request's Events as the parts every API streams, in order. Each route
(openai.py, anthropic.py, responses.py) only renders these parts in its own wire format.

A streamed answer is: `begin` (its first event: how much of the prompt was cached), then per
event a `token` (logprobs read it) and its text as parts: `start` of a part (the reasoning, then
the answer), its `delta`s, its `stop` (with the part's whole text); at the end the tool calls
whole, one `call` each, and `end` (the last event: finish reason and usage); or, if generation
failed, `error` instead.
"""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..text import ToolCall
from .request import Event, Request


@dataclass(frozen=True)
class Part:
    kind: str  # "begin", "token", "start", "delta", "stop", "call", "end" or "error"
    event: Event
    field: str = ""  # start, delta, stop: "reasoning" or "text"
    text: str = ""  # delta: the new text; stop: the part's whole text; error: the message
    call: ToolCall | None = None


async def parts(request: Request, events: asyncio.Queue) -> AsyncIterator[Part]:
    """The parts of `request`'s answer as its events arrive; the row is cancelled if the
    client leaves mid-stream (the generator is closed)."""
    open_field, whole = "", ""
    try:
        event = await events.get()
        if event.finish_reason != "error":
            yield Part("begin", event)
        while True:
            if event.finish_reason == "error":
                yield Part("error", event, text=f"generation failed: {event.error}")
                return
            yield Part("token", event)
            for field, piece in (("reasoning", event.reasoning), ("text", event.text)):
                if not piece:  # the reasoning first: an event may end it and begin the answer
                    continue
                if open_field != field:
                    if open_field:
                        yield Part("stop", event, open_field, whole)
                    open_field, whole = field, ""
                    yield Part("start", event, field)
                whole += piece
                yield Part("delta", event, field, piece)
            if event.finish_reason:
                if open_field:
                    yield Part("stop", event, open_field, whole)
                for call in event.tool_calls or []:
                    yield Part("call", event, call=call)
                yield Part("end", event)
                return
            event = await events.get()
    finally:
        request.cancel()  # a no-op once finished
