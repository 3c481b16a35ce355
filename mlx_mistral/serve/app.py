"""The FastAPI app: the shared middleware, error handlers, /health and /metrics, then each
API's routes (openai.py; a second API is one more module and one more add_routes line)."""

from collections import Counter
from concurrent.futures import Future

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException

from . import openai
from .http import MAX_BODY_BYTES, APIError, BodyLimitAndCount, Service, error_response, prometheus
from .scheduler import Scheduler


def create_app(scheduler: Scheduler | Future, api_key: str | None = None, cors_origin: str | None = None,
               max_body: int = MAX_BODY_BYTES, name: str | None = None, reasoning: bool = False) -> FastAPI:
    """The API over `scheduler` (the chat app mounts its page on the same app), or over the Future
    of one still loading (503 until it is ready; `name` is then the model's id). With `reasoning`,
    chats start with the model's reasoning system prompt (Tokenizer.reasoning_prompt)."""
    app = FastAPI(title="mlx-mistral", docs_url=None, redoc_url=None, openapi_url=None)
    statuses: Counter = Counter()
    service = Service(scheduler, api_key, name or scheduler.name, reasoning)
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

    @app.get("/health")
    async def health():
        if service.loading():
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
        return {"status": "ok" if service.ready().model is not None else "closed"}

    @app.get("/metrics", dependencies=[Depends(service.authorize)])
    async def metrics():
        return PlainTextResponse(prometheus(service.ready().stats(), statuses))

    openai.add_routes(app, service)
    return app
