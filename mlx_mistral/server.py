"""python -m mlx_mistral.server: an OpenAI-compatible API (chat, completions, models) on 127.0.0.1.

The HTTP layer only: pydantic schemas, FastAPI routes, SSE framing and OpenAI error objects.
Every request becomes a scheduler.Request; the Scheduler (one thread, one model) batches them.
"""

import argparse
import asyncio
import ipaddress
import json
import secrets
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import Future
from typing import Literal

from fastapi import Depends, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator
from starlette.exceptions import HTTPException

from .cache import check_kv_bits
from .errors import MistralError, run_command
from .generate import DEFAULT_PREFILL_CHUNK
from .scheduler import Event, QueueFull, Request, Scheduler

DEFAULT_MAX_TOKENS = 512  # when a request names none (and the context allows)
MAX_BODY_BYTES = 1 << 20
DISCONNECT_POLL_S = 0.5  # how often a request answered whole looks whether its client left
# Fields of OpenAI's API that would change the answer: refused unless off (None, False, 0, empty).
UNSUPPORTED = ("logprobs", "top_logprobs", "logit_bias", "presence_penalty", "frequency_penalty", "functions",
               "best_of", "echo", "suffix")


class Function(BaseModel):
    name: str
    arguments: str  # a JSON object, as text


class ToolCallIn(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: Function


class Message(BaseModel):
    """A chat turn: an assistant turn may be function calls (content null), a tool turn their result."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
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


class CompletionRequest(Sampling):
    prompt: str = Field(min_length=1)


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code, self.headers = status, type, param, code, headers


class BodyLimitAndCount:
    """ASGI middleware: 413 once a body passes max_body bytes (declared or streamed), and a count
    of the response statuses for /metrics."""

    def __init__(self, app, max_body: int, statuses: Counter):
        self.app, self.max_body, self.statuses = app, max_body, statuses

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
            await error_response(413, f"request body is larger than {self.max_body} bytes")(scope, receive,
                                                                                            counted_send)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(scheduler: Scheduler | Future, api_key: str | None = None, cors_origin: str | None = None,
               max_body: int = MAX_BODY_BYTES, name: str | None = None) -> FastAPI:
    """The API over `scheduler` (the chat app mounts its page on the same app), or over the Future
    of one still loading (503 until it is ready; `name` is then the model's id)."""
    app = FastAPI(title="mlx-mistral", docs_url=None, redoc_url=None, openapi_url=None)
    statuses: Counter = Counter()
    model_id = name or scheduler.name

    def ready() -> Scheduler:
        if isinstance(scheduler, Scheduler):
            return scheduler
        if not scheduler.done():
            raise APIError(503, "the model is still loading; try again shortly", "server_error",
                           code="loading", headers={"Retry-After": "5"})
        return scheduler.result()

    if cors_origin:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=[cors_origin], allow_methods=["*"],
                           allow_headers=["*"])

    app.add_middleware(BodyLimitAndCount, max_body=max_body, statuses=statuses)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return error_response(e.status, str(e), e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):  # OpenAI answers 400, never 422
        first = e.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            return error_response(400, "request body is not valid JSON")
        return error_response(400, f"{param or 'body'}: {first.get('msg')}", param=param)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        message = "unknown route" if e.status_code == 404 else str(e.detail)
        return error_response(e.status_code, message, code="not_found" if e.status_code == 404 else None)

    def authorize(request: HTTPRequest) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        given = given[7:] if given.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                           code="invalid_api_key")

    @app.get("/health")
    async def health():
        if isinstance(scheduler, Future) and not scheduler.done():
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
        return {"status": "ok" if ready().model is not None else "closed"}

    @app.get("/metrics", dependencies=[Depends(authorize)])
    async def metrics():
        return PlainTextResponse(prometheus(ready().stats(), statuses))

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        ready()
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                            "owned_by": "mlx-mistral"}]}

    def to_request(body: Sampling, tokens: list[int], max_tokens: int | None, echo, tools: bool = False) -> Request:
        if body.model != model_id:
            raise APIError(404, f"model {body.model!r} not found (this server has {model_id!r})",
                           param="model", code="model_not_found")
        if body.n != 1:
            raise APIError(400, "n: only n = 1 is supported", param="n")
        for name in UNSUPPORTED:
            if (body.model_extra or {}).get(name) not in (None, False, 0, [], {}):
                raise APIError(400, f"{name}: not supported by this server", param=name)
        fmt = (body.model_extra or {}).get("response_format")
        if fmt not in (None, {"type": "text"}):
            raise APIError(400, "response_format: only {'type': 'text'} is supported",
                           param="response_format")
        if max_tokens is None:
            max_tokens = max(1, min(DEFAULT_MAX_TOKENS, ready().context - len(tokens)))
        stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
        return Request(tokens, max_tokens, body.temperature, body.top_p, body.seed, stop, echo, tool_calls=tools)

    async def run(request: Request, body: Sampling, kind: str, http: HTTPRequest):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def sink(event: Event) -> None:  # on the scheduler thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone
                request.cancel()

        request.sink = sink
        try:
            ready().submit(request)
        except QueueFull as e:
            raise APIError(429, str(e), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        except MistralError as e:
            raise APIError(400, str(e), param="messages" if kind == "chat" else "prompt")
        ident = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if body.stream:
            return StreamingResponse(stream(request, events, body, kind, ident, created),
                                     media_type="text/event-stream")
        try:
            pieces, event = await collect(events, http)
        finally:
            request.cancel()  # a no-op once finished; frees the row if the client left
        if event.finish_reason == "error":
            raise APIError(500, f"generation failed: {event.error}", "server_error")
        text = "".join(pieces) + event.text
        choice = {"index": 0, "finish_reason": event.finish_reason, "logprobs": None}
        if event.tool_calls:
            choice["message"] = {"role": "assistant", "content": None,
                                 "tool_calls": [c.to_openai() for c in event.tool_calls]}
        else:
            choice |= {"message": {"role": "assistant", "content": text}} if kind == "chat" else {"text": text}
        return {"id": ident, "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": created, "model": model_id, "choices": [choice], "usage": usage(event)}

    async def stream(request: Request, events: asyncio.Queue, body: Sampling, kind: str, ident: str,
                     created: int):
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        head = {"id": ident, "object": obj, "created": created, "model": model_id}

        def chunk(text: str | None, finish: str | None, first: bool = False, calls: list | None = None) -> str:
            choice = {"index": 0, "finish_reason": finish, "logprobs": None}
            if kind == "chat":
                choice["delta"] = ({"role": "assistant"} if first else {}) | \
                    ({"content": text} if text is not None else {}) | \
                    ({"tool_calls": [{"index": i} | c.to_openai() for i, c in enumerate(calls)]} if calls else {})
            else:
                choice["text"] = text or ""
            return sse(head | {"choices": [choice]})

        try:
            if kind == "chat":
                yield chunk("", None, first=True)
            while True:
                event = await events.get()
                if event.finish_reason == "error":
                    error = {"message": f"generation failed: {event.error}", "type": "server_error"}
                    yield sse({"error": error | {"param": None, "code": None}})
                    break
                if event.text:
                    yield chunk(event.text, None)
                if event.tool_calls:  # held back until the end: whole calls in one chunk
                    yield chunk(None, None, calls=event.tool_calls)
                if event.finish_reason:
                    yield chunk(None, event.finish_reason)
                    if body.stream_options and body.stream_options.include_usage:
                        yield sse(head | {"choices": [], "usage": usage(event)})
                    break
            yield "data: [DONE]\n\n"
        finally:
            request.cancel()  # the client left mid-stream: its row leaves the batch

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(body: ChatRequest, http: HTTPRequest):
        tok = ready().tokenizer
        if body.tool_choice not in (None, "auto", "none"):
            raise APIError(400, "tool_choice: only 'auto' and 'none' are supported (the model decides whether to "
                           "call a function)", param="tool_choice")
        tools = [t.model_dump(exclude_none=True) for t in body.tools or []] if body.tool_choice != "none" else []
        try:
            tokens = tok.chat_tokens([m.model_dump(exclude_none=True) for m in body.messages], tools=tools)
        except MistralError as e:
            raise APIError(400, str(e), param="tools" if tools and tok.tool_calls_id is None else "messages")
        request = to_request(body, tokens, body.max_completion_tokens or body.max_tokens, tok.encode, bool(tools))
        return await run(request, body, "chat", http)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, http: HTTPRequest):
        request = to_request(body, ready().tokenizer.encode(body.prompt, bos=True), body.max_tokens, None)
        return await run(request, body, "text", http)

    return app


async def collect(events: asyncio.Queue, http: HTTPRequest) -> tuple[list[str], Event]:
    """The text pieces and the last event of a request answered whole. Every DISCONNECT_POLL_S
    it looks whether the client has left (then 499, and the caller cancels the row); the
    pending get is never cancelled in between, so no event is lost."""
    pieces, getter, next_check = [], None, time.monotonic() + DISCONNECT_POLL_S
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
            return pieces, event
        pieces.append(event.text)


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(event: Event) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.generated_tokens,
            "total_tokens": event.prompt_tokens + event.generated_tokens}


def prometheus(stats: dict, statuses: Counter) -> str:
    """The scheduler's counters and the HTTP statuses as Prometheus text."""
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
    ):
        lines += [f"# TYPE mlx_mistral_{name} {kind}", f"mlx_mistral_{name} {stats[key]}"]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mlx_mistral.server", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo", help="local directory, Hugging Face repo id, or 'demo'")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--max-batch", type=int, default=8, help="rows decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=32, help="requests waiting beyond them; past it, 429")
    p.add_argument("--max-kv-size", type=int,
                   help="KV cache slots per row (default: the sliding window, or 8192)")
    p.add_argument("--kv-budget-mib", type=int,
                   help="admit rows only while their KV caches (and the idle ones) fit in this many MiB")
    p.add_argument("--kv-bits", type=int, help="store each row's KV cache quantized to 8 or 4 bits (default: float)")
    p.add_argument("--kv-group-size", type=int, default=64, help="KV quantization group along head_dim")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                   help="prompt tokens prefilled between two decode steps (default %(default)s)")
    p.add_argument("--api-key", help="required as 'Authorization: Bearer KEY' (required off loopback)")
    p.add_argument("--cors-origin", help="allow browser pages from this origin (default: no CORS)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def check_host(host: str, api_key: str | None) -> None:
    if not is_loopback(host) and not api_key:
        raise MistralError(f"--host {host} is reachable from other machines: pass --api-key KEY too")


def check_port(host: str, port: int) -> None:
    """Fail now, with one line, if host:port cannot be listened on (in use, not an address here),
    rather than after the model has loaded."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.create_server((host, port), family=family):  # SO_REUSEADDR, as uvicorn and Gradio bind
            pass
    except (OSError, OverflowError) as e:
        raise MistralError(f"cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e})") from None


def serve(app: FastAPI, host: str, port: int) -> None:
    """(python -m app --api) Run `app` with uvicorn until Ctrl-C (or SIGTERM) stops it, then raise
    KeyboardInterrupt."""
    import uvicorn
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning")).run()
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def run() -> int:
        check_host(args.host, args.api_key)
        check_port(args.host, args.port)
        for flag in ("max_batch", "max_queue", "prefill_chunk", "max_kv_size", "kv_budget_mib"):
            value = getattr(args, flag)
            if value is not None and value <= 0:
                raise MistralError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
        check_kv_bits(args.kv_bits, args.kv_group_size)  # before the model loads
        loading: Future = Future()  # the API answers 503 until the model is loaded

        def load() -> None:
            try:
                budget = args.kv_budget_mib and args.kv_budget_mib << 20
                loading.set_result(Scheduler(args.model, args.max_kv_size, args.max_batch, args.max_queue,
                                             budget, prefill_chunk=args.prefill_chunk, kv_bits=args.kv_bits,
                                             kv_group_size=args.kv_group_size))
            except BaseException as e:
                loading.set_exception(e)
                server.should_exit = True

        import uvicorn
        app = create_app(loading, args.api_key, args.cors_origin, name=args.model)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))
        threading.Thread(target=load, name="load").start()
        print(f"serving {args.model} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
        server.run()
        loading.result().close()  # waits for a load in progress; a model that failed to load: its error
        raise KeyboardInterrupt  # uvicorn returns once Ctrl-C (or SIGTERM) has stopped it

    return run_command(run, args.debug, "[server stopped]")


if __name__ == "__main__":
    sys.exit(main())
