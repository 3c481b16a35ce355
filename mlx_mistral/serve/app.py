"""The FastAPI app: the shared middleware, error handlers, /health and /metrics, then each
API's routes (openai.py, anthropic.py, responses.py). An error is answered in the dialect of its route:
Anthropic's error object under /v1/messages, OpenAI's everywhere else."""

from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

from fastapi import Depends, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException

from . import anthropic, openai, responses
from .http import MAX_BODY_BYTES, APIError, BodyLimitAndCount, Service, error_response, prometheus
from .scheduler import Scheduler


def create_app(scheduler: Scheduler | Future, api_key: str | None = None, cors_origin: str | None = None,
               max_body: int = MAX_BODY_BYTES, name: str | Sequence[str] | None = None,
               reasoning: bool = False, log_requests: bool = False) -> FastAPI:
    """The API over `scheduler` (the chat app mounts its page on the same app), or over the Future
    of one still loading (503 until it is ready). `name`: the model's served name or names (the
    first is its id; default served_name of the scheduler's model). With `reasoning`, chats start
    with the model's reasoning system prompt (Tokenizer.reasoning_prompt). With `log_requests`, each
    request's summary is printed to stderr (build.log_request)."""
    app = FastAPI(title="mlx-mistral", docs_url=None, redoc_url=None, openapi_url=None)
    statuses: Counter = Counter()
    names = [name] if isinstance(name, str) else list(name or [served_name(scheduler.name)])
    service = Service(scheduler, api_key, names, reasoning, log_requests)
    if cors_origin:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=[cors_origin], allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(BodyLimitAndCount, max_body=max_body, statuses=statuses, respond=respond)

    @app.exception_handler(APIError)
    async def api_error(http: HTTPRequest, e: APIError):
        return respond(http.url.path, e.status, str(e), e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(http: HTTPRequest, e: RequestValidationError):  # 400, never 422
        first = e.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            return respond(http.url.path, 400, "request body is not valid JSON")
        return respond(http.url.path, 400, f"{param or 'body'}: {first.get('msg')}", param=param)

    @app.exception_handler(HTTPException)
    async def http_error(http: HTTPRequest, e: HTTPException):
        message = "unknown route" if e.status_code == 404 else str(e.detail)
        return respond(http.url.path, e.status_code, message, code="not_found" if e.status_code == 404 else None)

    @app.get("/health")
    async def health():
        if service.loading():
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
        return {"status": "ok" if service.ready().model is not None else "closed"}

    @app.get("/metrics", dependencies=[Depends(service.authorize)])
    async def metrics():
        return PlainTextResponse(prometheus(service.ready().stats(), statuses))

    openai.add_routes(app, service)
    anthropic.add_routes(app, service)
    responses.add_routes(app, service)
    return app


def served_name(model: str) -> str:
    """The name a model is served by when none is given: a local directory's or file's name (never
    a path on this machine: a GGUF file's without .gguf), else what was asked for (a Hub repo id,
    "smollm2", "demo")."""
    path = Path(model).expanduser()
    return (path.stem if path.suffix == ".gguf" else path.name) if path.exists() else model


def respond(path: str, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
            code: str | None = None, headers: dict | None = None) -> JSONResponse:
    """The error response of the API at `path`: Anthropic's object, or OpenAI's (with its type, param, code)."""
    if anthropic.owns(path):
        return anthropic.error_response(status, message, headers)
    return error_response(status, message, type, param, code, headers)
