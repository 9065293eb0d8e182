"""The HTTP side: OpenAI-compatible routes, the web page, auth, limits, metrics and OpenAI-style errors.

`create_app` takes an `Engine`, the `medtune.infer.Assistant` it generates for (prompt format,
department classifier, disclaimer, context window) and an `AppConfig`; the app starts the engine when
it starts. Every error is ``{"error": {"message", "type", "param", "code"}}`` with its
HTTP status; no response carries a traceback. Question and answer text is logged only with
``log_content``.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from medtune.chat_format import compose_reply, get_prompt_format
from medtune.errors import MedtuneError
from medtune.infer import Query
from medtune.safety import assess
from medtune.serve.engine import Engine, Event, QueueFull, SamplingParams
from medtune.serve.metrics import Metrics
from medtune.serve.protocol import (
    AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice, ChunkChoice,
    Delta, ErrorResponse, Health, ModelCard, ModelList, Usage, completion_id,
)

log = logging.getLogger("medtune.serve")
STATIC = Path(__file__).parent / "static"


@dataclasses.dataclass
class AppConfig:
    """What the app serves and its limits (`medtune.serve.ServeArgs` fills it from the command line)."""

    model_id: str  # the id clients name: the adapter's name (as vLLM's --lora-modules names it)
    root: str | None = None  # the base model
    department: str | None = None  # for requests that name none (default: the adapter's classifier guesses)
    api_key: str | None = None
    cors_origins: list[str] = dataclasses.field(default_factory=list)
    log_content: bool = False
    max_body_bytes: int = 1 << 20
    max_messages: int = 64
    max_prompt_tokens: int = 4096
    max_tokens_limit: int = 2048
    defaults: SamplingParams = dataclasses.field(default_factory=SamplingParams.defaults)


class APIError(Exception):
    """An error answered as OpenAI does: status, type, code and the offending parameter."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers


def error_response(status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                   param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


_STATUS_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                 405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is a 413 before any route parses it."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_big = error_response(413, f"request body larger than {self.limit} bytes", code="body_too_large")
        if declared is not None:
            if not declared.isdigit():
                return await error_response(400, "bad Content-Length header")(scope, receive, send)
            if int(declared) > self.limit:
                return await too_big(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await too_big(scope, receive, send)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later: the disconnect, which streaming responses listen for

        await self.app(scope, replay, send)


def _loc(error: dict) -> str:
    return ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return "the request body is not valid JSON", None
    first = errors[0] if errors else {}
    if first.get("type") == "missing" and first.get("loc") == ("body",):
        return "the request needs a JSON body", None
    msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return f"{_loc(first)}: {msg}", _loc(first)


def _sse(payload: Any) -> str:
    data = payload.model_dump_json(exclude_none=False) if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {data}\n\n"


def create_app(engine: Engine, assistant: Any, config: AppConfig) -> FastAPI:
    """The FastAPI app: ``/`` (page), ``/health``, ``/metrics``, ``/v1/models``, ``/v1/chat/completions``."""
    metrics = Metrics(engine)
    tokenizer = assistant.tokenizer
    fmt = get_prompt_format(assistant.prompt_format)
    added = [assistant.disclaimer] if assistant.disclaimer else []  # stripped from history sent back
    bearer = HTTPBearer(auto_error=False, description="the server's --api-key")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="medtune", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None,
                  description="OpenAI-compatible Chinese medical QA (medtune). Errors: {\"error\": {...}}.")
    app.state.engine, app.state.config, app.state.metrics = engine, config, metrics
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)

    async def require_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), (config.api_key or "").encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(require_key)] if config.api_key else []
    errors: dict[int | str, dict[str, Any]] = {400: {"model": ErrorResponse, "description": "invalid request"}}
    if config.api_key:
        errors[401] = {"model": ErrorResponse, "description": "missing or wrong API key"}

    # ---------------------------------------------------------------- errors

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.type, exc.code, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), _STATUS_TYPES.get(exc.status_code, "invalid_request_error"),
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s: %s", request.url.path, type(exc).__name__)
        return error_response(500, "internal server error", "server_error")

    # ---------------------------------------------------------------- page, health, metrics

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health", response_model=Health, tags=["service"])
    async def health() -> Health:
        """Liveness (no key needed)."""
        return Health(model=config.model_id)

    @app.get("/metrics", dependencies=auth, tags=["service"], responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}, **{k: v for k, v in errors.items() if k == 401}})
    async def prometheus() -> Response:
        """Prometheus metrics: requests, tokens, latency, time to first token, queue depth."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    # ---------------------------------------------------------------- OpenAI API

    @app.get("/v1/models", response_model=ModelList, dependencies=auth, tags=["openai"],
             responses={k: v for k, v in errors.items() if k == 401})
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=config.model_id, created=int(time.time()), root=config.root)])

    def prepare(req: ChatCompletionRequest) -> tuple[list[int], SamplingParams, Any, str | None]:
        if req.model is not None and req.model != config.model_id:
            raise APIError(404, f"model {req.model!r} is not served here; GET /v1/models lists {config.model_id!r}",
                           "not_found_error", "model_not_found", "model")
        if len(req.messages) > config.max_messages:
            raise APIError(400, f"{len(req.messages)} messages; this server takes at most {config.max_messages}",
                           code="too_many_messages", param="messages")
        limit = req.token_limit or config.defaults.max_tokens
        if limit > config.max_tokens_limit:
            raise APIError(400, f"max_tokens {limit} is over this server's limit of {config.max_tokens_limit}",
                           code="invalid_value", param="max_tokens")
        try:
            query = Query.from_messages([m.model_dump() for m in req.messages],
                                        department=req.department or config.department)
        except ValueError as e:
            raise APIError(400, str(e), code="invalid_value", param="messages") from None
        verdict = assess(query.question, query.history)
        department = None
        if query.system is None:  # a client's own system prompt replaces ours, department and all
            department, _ = assistant.department(query)
            query = dataclasses.replace(query, department=department)
        try:
            query, _ = assistant.fit(query, limit)  # oldest turns go first, as in `medtune chat`
        except MedtuneError as e:
            raise APIError(400, str(e), code="context_length_exceeded", param="messages") from None
        prompt = fmt.prompt(tokenizer, query.messages(added))
        ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if len(ids) > config.max_prompt_tokens:
            raise APIError(400, f"the conversation is {len(ids)} tokens; this server takes at most "
                           f"{config.max_prompt_tokens}", code="context_length_exceeded", param="messages")
        d = config.defaults
        params = SamplingParams(
            max_tokens=limit, temperature=d.temperature if req.temperature is None else req.temperature,
            top_p=d.top_p if req.top_p is None else req.top_p, top_k=d.top_k, min_p=d.min_p,
            repetition_penalty=d.repetition_penalty, stop=tuple(req.stop or ()), seed=req.seed, ignore_eos=req.ignore_eos)
        return ids, params, verdict, department

    @app.post("/v1/chat/completions", dependencies=auth, tags=["openai"], response_model=ChatCompletion, responses={
        200: {"content": {"text/event-stream": {"schema": {"type": "string", "description":
              "with stream=true: `data: <ChatCompletionChunk JSON>` events, then `data: [DONE]`"}}}},
        **errors,
        404: {"model": ErrorResponse, "description": "unknown model"},
        413: {"model": ErrorResponse, "description": "request body too large"},
        429: {"model": ErrorResponse, "description": "the queue is full; retry later"},
        500: {"model": ErrorResponse, "description": "generation failed"}})
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        """Answer a conversation (OpenAI chat completions), streamed as server-sent events with ``stream``."""
        started = time.perf_counter()
        ids, params, verdict, department = prepare(req)
        try:
            handle = engine.submit(ids, params)
        except QueueFull as e:
            metrics.rejected()
            raise APIError(429, f"server busy: {e}; retry later", "rate_limit_error", "queue_full",
                           headers={"Retry-After": "1"}) from None
        safety = dict(emergency=verdict.emergency, emergency_category=verdict.category, department=department)
        opening = compose_reply("", verdict.notice) if verdict.emergency else ""  # notice + "\n\n"
        closing = compose_reply("", None, assistant.disclaimer) if assistant.disclaimer else ""
        cid, created = completion_id(), int(time.time())
        tracker = metrics.track(started)

        def done(last: Event, answer: str) -> None:
            tracker.finish(last)
            log.info("%s: %s, %d prompt + %d completion tokens, %.2f s%s", cid, last.finish_reason,
                     last.prompt_tokens, last.completion_tokens, time.perf_counter() - started,
                     ", emergency " + str(verdict.category) if verdict.emergency else "")
            if config.log_content:
                log.info("%s question: %s | answer: %s", cid, req.messages[-1].content, answer)

        if not req.stream:
            watcher = asyncio.create_task(_cancel_on_disconnect(request, handle))
            answer, last = [], Event(finish_reason="cancelled")
            try:
                async for event in handle:
                    if event.text:
                        tracker.token_text()
                    answer.append(event.text)
                    last = event
            finally:
                watcher.cancel()
                handle.cancel()
            done(last, "".join(answer))
            if last.finish_reason not in ("stop", "length"):
                raise APIError(500, last.error or "generation stopped", "server_error", "generation_failed")
            usage = Usage(prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens,
                          total_tokens=last.prompt_tokens + last.completion_tokens)
            content = opening + "".join(answer) + closing
            return ChatCompletion(id=cid, created=created, model=config.model_id, usage=usage, **safety,
                                  choices=[Choice(message=AssistantMessage(content=content), finish_reason=last.finish_reason)])

        def chunk(content: str | None, finish: str | None = None, usage: Usage | None = None, role: bool = False) -> str:
            delta = Delta(role="assistant" if role else None, content=content)
            return _sse(ChatCompletionChunk(id=cid, created=created, model=config.model_id, usage=usage, **safety,
                                            choices=[ChunkChoice(delta=delta, finish_reason=finish)]))

        async def events() -> AsyncIterator[str]:
            answer, last = [], Event(finish_reason="cancelled")
            try:
                yield chunk(opening, role=True)
                async for event in handle:
                    last = event
                    if event.text:
                        tracker.token_text()
                        answer.append(event.text)
                        yield chunk(event.text)
                if last.finish_reason in ("stop", "length"):
                    usage = Usage(prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens,
                                  total_tokens=last.prompt_tokens + last.completion_tokens)
                    yield chunk(closing, last.finish_reason, usage)
                else:
                    yield _sse({"error": {"message": last.error or "generation stopped", "type": "server_error",
                                          "param": None, "code": "generation_failed"}})
                yield "data: [DONE]\n\n"
            finally:
                handle.cancel()  # the client went away mid-stream: stop generating, free the slot
                if last.finish_reason is None:
                    last = Event(finish_reason="cancelled")
                done(last, "".join(answer))

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    _openapi_without_422(app)
    return app


async def _cancel_on_disconnect(request: Request, handle: Any) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.1)
    handle.cancel()


def _openapi_without_422(app: FastAPI) -> None:
    """Our validation errors are 400s in OpenAI's shape: the schema says so instead of FastAPI's 422."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = original()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


