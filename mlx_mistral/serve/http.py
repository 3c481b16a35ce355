"""What every API route shares: the Service (scheduler, model id, auth), error objects, the
body limit, submitting a request, waiting for a whole answer, SSE framing and the Prometheus
text of /metrics."""

import asyncio
import json
import secrets
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse

from ..errors import MistralError
from .request import Event, QueueFull, Request
from .scheduler import Scheduler

MAX_BODY_BYTES = 1 << 20
DISCONNECT_POLL_S = 0.5  # how often a request answered whole looks whether its client left


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code, self.headers = status, type, param, code, headers


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class Service:
    """What the routes need: the scheduler, or the Future of one still loading (503 until it
    is ready), the model's served names (the first is its id), and `authorize` (a FastAPI
    dependency: 401 without the key, given as `Authorization: Bearer KEY` or as Anthropic's
    `x-api-key: KEY`).
    With `reasoning`, every chat starts with the model's reasoning system prompt; with
    `log_requests` each request's summary is printed (build.log_request)."""

    def __init__(self, scheduler: Scheduler | Future, api_key: str | None, names: Sequence[str],
                 reasoning: bool = False, log_requests: bool = False):
        self.scheduler, self.api_key, self.names, self.reasoning = scheduler, api_key, tuple(names), reasoning
        self.log_requests = log_requests
        self.model_id = self.names[0]
        self._can_reason: bool | None = None  # known once a request asks for thinking

    def answering(self, requested: str) -> str:
        """The model name a response gives: the one asked for if it is a served name, else the
        first. One model is loaded, so it answers every name (Claude Code asks for its small/fast
        model by a Claude name): the response's `model` says which model answered."""
        return requested if requested in self.names else self.model_id

    @property
    def images(self) -> bool:
        """Whether the model sees images (a vision tower): its requests may carry them."""
        return bool(self.ready().model.args.vision)

    def reasoning_for(self, asked: bool | None) -> bool:
        """Whether a request's chat starts with the reasoning system prompt: as asked (Anthropic's
        `thinking`) where the model can reason (a reasoning model with its SYSTEM_PROMPT.txt;
        elsewhere a request for thinking is accepted and ignored), else the server's --reasoning."""
        if asked is None:
            return self.reasoning
        if asked and self._can_reason is None:
            try:
                self.ready().tokenizer.reasoning_prompt()
                self._can_reason = True
            except MistralError:
                self._can_reason = False
        return bool(asked and self._can_reason)

    def public(self, message: str) -> str:
        """An error message as a client may see it: the model's local files named by the model."""
        tokenizer = self.ready().tokenizer
        return message.replace(str(tokenizer.path), self.model_id) if tokenizer is not None else message

    def loading(self) -> bool:
        return isinstance(self.scheduler, Future) and not self.scheduler.done()

    def ready(self) -> Scheduler:
        if isinstance(self.scheduler, Scheduler):
            return self.scheduler
        if not self.scheduler.done():
            raise APIError(503, "the model is still loading; try again shortly", "server_error",
                           code="loading", headers={"Retry-After": "5"})
        return self.scheduler.result()

    def authorize(self, request: HTTPRequest) -> None:
        if self.api_key is None:
            return
        bearer = request.headers.get("authorization", "")
        given = (request.headers.get("x-api-key", ""), bearer[7:] if bearer.lower().startswith("bearer ") else "")
        if not any(secrets.compare_digest(key.encode(), self.api_key.encode()) for key in given):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer KEY, or x-api-key: KEY)",
                           code="invalid_api_key")


class BodyLimitAndCount:
    """ASGI middleware: 413 once a body passes max_body bytes (declared or streamed), and a count
    of the response statuses for /metrics. `respond(path, status, message)` is the error response
    in the dialect of the API at `path`."""

    def __init__(self, app, max_body: int, statuses: Counter, respond: Callable[[str, int, str], JSONResponse]):
        self.app, self.max_body, self.statuses, self.respond = app, max_body, statuses, respond

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        received, too_large = 0, not length.isdigit() or int(length) > self.max_body

        async def limited_receive():
            nonlocal received, too_large
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:  # the app sees an empty body end: its answer is replaced
                too_large = True
                return {"type": "http.request", "body": b"", "more_body": False}
            return message

        async def counted_send(message):
            if too_large:
                return
            if message["type"] == "http.response.start":
                self.statuses[message["status"]] += 1
            await send(message)

        if not too_large:
            await self.app(scope, limited_receive, counted_send)
        if too_large:
            too_large = False
            response = self.respond(scope["path"], 413, f"request body is larger than {self.max_body} bytes")
            await response(scope, receive, counted_send)


def submit(service: Service, request: Request, param: str) -> asyncio.Queue:
    """Hand `request` to the scheduler; its events arrive on the queue returned, on this event
    loop. 429 when the queue is full; 400 naming `param` when the scheduler refuses it."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def sink(event: Event) -> None:  # on the scheduler thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the event loop is gone
            request.cancel()

    request.sink = sink
    try:
        service.ready().submit(request)
    except QueueFull as e:
        raise APIError(429, str(e), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    except MistralError as e:
        raise APIError(400, str(e), param=param)
    return events


async def answer(request: Request, events: asyncio.Queue, http: HTTPRequest) -> tuple[list[Event], Event]:
    """The events of a request answered whole, and its last one (a 500 if generation failed)."""
    try:
        received, event = await collect(events, http)
    finally:
        request.cancel()  # a no-op once finished; frees the row if the client left
    if event.finish_reason == "error":
        raise APIError(500, f"generation failed: {event.error}", "server_error")
    return received, event


async def collect(events: asyncio.Queue, http: HTTPRequest) -> tuple[list[Event], Event]:
    """The events of a request answered whole, and its last one. Every DISCONNECT_POLL_S
    it looks whether the client has left (then 499, and the caller cancels the row); the
    pending get is never cancelled in between, so no event is lost."""
    received, getter, next_check = [], None, time.monotonic() + DISCONNECT_POLL_S
    while True:
        getter = getter or asyncio.ensure_future(events.get())
        done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
        if time.monotonic() >= next_check:
            next_check = time.monotonic() + DISCONNECT_POLL_S
            if await http.is_disconnected():
                getter.cancel()
                raise APIError(499, "the client closed the connection", code="client_closed")
        if not done:
            continue
        event, getter = getter.result(), None
        if event.finish_reason:
            return received, event
        received.append(event)


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def frame(obj: dict) -> str:
    """One server-sent event named by its type (Anthropic's and the Responses API's framing)."""
    return f"event: {obj['type']}\n" + sse(obj)


def prometheus(stats: dict, statuses: Counter) -> str:
    """The scheduler's counters, the prefix cache's hit rates and tiers, and the HTTP statuses
    as Prometheus text."""
    lines = ["# TYPE mlx_mistral_http_requests_total counter"]
    lines += [f'mlx_mistral_http_requests_total{{status="{s}"}} {n}' for s, n in sorted(statuses.items())]
    lines.append("# TYPE mlx_mistral_finished_requests_total counter")
    lines += [f'mlx_mistral_finished_requests_total{{reason="{r}"}} {stats[r]}'
              for r in ("stop", "length", "tool_calls", "cancelled", "error")]
    for name, key, kind in (
        ("queue_depth", "waiting", "gauge"), ("running_rows", "running", "gauge"),
        ("prefilling_rows", "prefilling", "gauge"), ("decode_steps_total", "steps", "counter"),
        ("decode_rows_total", "rows", "counter"), ("decode_rows_max", "max_rows", "gauge"),
        ("prefill_rows_max", "max_prefill_rows", "gauge"),
        ("generated_tokens_total", "generated_tokens", "counter"),
        ("prefilled_tokens_total", "prefilled_tokens", "counter"),
        ("reused_tokens_total", "reused_tokens", "counter"),
        ("tokens_per_second", "tokens_per_second", "gauge"), ("kv_bytes", "kv_bytes", "gauge"),
        ("idle_caches", "idle_caches", "gauge"),
        ("drafted_tokens_total", "drafted_tokens", "counter"),
        ("accepted_tokens_total", "accepted_tokens", "counter"),
        ("verify_steps_total", "verify_steps", "counter"),
        ("images_total", "images", "counter"), ("image_tokens_total", "image_tokens", "counter"),
        ("vision_seconds_total", "vision_seconds", "counter"),
    ):
        lines += [f"# TYPE mlx_mistral_{name} {kind}", f"mlx_mistral_{name} {stats[key]}"]
    # speculation: the share of drafts kept, and the rows' forwards of the target per token they got
    # (1 without speculation, since every step gives each row one token)
    acceptance = stats["accepted_tokens"] / max(stats["drafted_tokens"], 1)
    lines += ["# TYPE mlx_mistral_draft_acceptance_rate gauge",
              f"mlx_mistral_draft_acceptance_rate {acceptance}",
              "# TYPE mlx_mistral_mean_accepted_run gauge",  # accepted drafts per row and step that drafted
              f"mlx_mistral_mean_accepted_run {stats['accepted_tokens'] / max(stats['drafting_rows'], 1)}",
              "# TYPE mlx_mistral_forwards_per_token gauge",
              f"mlx_mistral_forwards_per_token {stats['rows'] / max(stats['generated_tokens'], 1)}"]
    # the prefix cache: the share of requests (and of prompt tokens) it answered, and its blocks per tier
    requests, tokens = stats["reused_requests"] / max(stats["admitted"], 1), \
        stats["reused_tokens"] / max(stats["prompt_tokens"], 1)
    lines += ["# TYPE mlx_mistral_prefix_cache_hit_rate gauge",
              f'mlx_mistral_prefix_cache_hit_rate{{of="requests"}} {requests}',
              f'mlx_mistral_prefix_cache_hit_rate{{of="tokens"}} {tokens}']
    for name, memory, disk in (("bytes", "block_bytes", "disk_bytes"), ("blocks", "blocks", "disk_blocks")):
        lines += [f"# TYPE mlx_mistral_prefix_cache_{name} gauge",
                  f'mlx_mistral_prefix_cache_{name}{{tier="memory"}} {stats[memory]}',
                  f'mlx_mistral_prefix_cache_{name}{{tier="disk"}} {stats[disk]}']
    return "\n".join(lines) + "\n"
