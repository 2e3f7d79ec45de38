"""The FastAPI application: routes, API-key check, body-size limit and OpenAI-shaped errors.

`build_app` takes the address of a running engine core (`engine/core_proc.py`) and what it said at start-up; the app
connects to it when it starts, and each request goes through this process's `AsyncEngine`. The key is checked
before anything reads the body (a request without it costs no buffering and gets 401 even when its body is not
JSON); the body limit counts bytes as they are read (FastAPI's `max_body_size`), so nothing is buffered twice.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from valora import __version__
from valora.config import EngineConfig
from valora.engine.core_host import CoreInfo
from valora.engine.errors import AdapterNotLoadedError, EngineDeadError, QueueFullError
from valora.engine.input_processor import InputProcessor
from valora.lora.adapter import AdapterError
from valora.multimodal.inputs import InputError, lone_surrogate
from valora.server.async_engine import AsyncEngine, ClientDisconnectedError
from valora.server.errors import APIError, adapter_load_failed, bad_request, not_found
from valora.server.logs import logger
from valora.server.metrics import CONTENT_TYPE, ServerMetrics, StatsLogger
from valora.server.models import ServedModels
from valora.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ClassificationRequest,
    ClassificationResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    HealthStatus,
    LoadLoRAAdapterRequest,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    UnloadLoRAAdapterRequest,
    VersionResponse,
)
from valora.server.serving import OpenAIServing


@dataclass
class ServerConfig:
    served_model_names: list[str]
    lora_modules: list[tuple[str, str]] = field(default_factory=list)  # (name, path) served from the start
    api_key: str | None = None
    lora_root: Path | None = None
    allowed_local_media_path: Path | None = None
    max_body_bytes: int = 64 * 2**20
    max_queued_requests: int = 4096
    retry_after_s: int = 1
    allow_special_tokens_in_messages: bool = False  # tokenise special-token strings typed in messages as control
    lora_resolver: bool = False  # adapters on first use: a request naming a directory under lora_root loads it
    log_requests: bool = True  # one line per request
    log_stats: bool = True  # the periodic stats line
    vllm_compatible_metrics: bool = False  # also export the metrics vLLM has under its `vllm:` names
    api_server_count: int = 1

    def max_in_flight(self, engine: EngineConfig) -> int:
        """Sequences the server holds at once: the running batch plus the waiting queue."""
        return engine.scheduler.max_num_seqs + self.max_queued_requests


class APIKeyAuth:
    """`Authorization: Bearer <key>` on every path under `/v1`, checked from the headers alone: a request without
    the key is answered 401 before its body is read, and its connection is closed rather than drained."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (scope["path"] == "/v1" or scope["path"].startswith("/v1/")):
            headers = dict(scope["headers"])
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token, self.key):
                err = APIError(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'",
                               "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                _log(scope["method"], scope["path"], err)
                unread_body = b"content-length" in headers or b"transfer-encoding" in headers
                return await err.response(close=unread_body)(scope, receive, send)
        await self.app(scope, receive, send)


class BodySizeLimit:
    """413 for a body over `max_bytes`: at once when Content-Length says so (the body is never read), else as soon
    as the bytes the app reads pass the limit (chunked bodies); bytes are counted, not buffered, here."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            err = _too_large(self.max_bytes)
            _log(scope["method"], scope["path"], err)
            return await err.response(close=True)(scope, receive, send)
        total = 0

        async def counted() -> Message:
            nonlocal total
            message = await receive()
            total += len(message.get("body", b""))
            if total > self.max_bytes:  # FastAPI's body reader re-raises its own HTTPException to our handler
                raise HTTPException(413)
            return message

        await self.app(scope, counted, send)


def _too_large(max_bytes: int) -> APIError:
    return APIError(413, f"request body is over the limit of {max_bytes} bytes", "request_too_large")


class _JSONRoute(APIRoute):
    """Bodies that are not JSON text (invalid UTF-8, nesting deeper than the parser's recursion limit, a string
    with a lone UTF-16 surrogate, which no tokenizer can encode) are refused as `invalid_json`, like any other
    malformed JSON, instead of FastAPI's generic 400 or a tokenizer's 500."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            return await handler(_JSONRequest(request.scope, request.receive))

        return handle


class _JSONRequest(Request):
    async def json(self) -> Any:
        body = await self.body()
        try:
            text = body.decode()  # strict UTF-8: json.loads(bytes) lets encoded surrogates through
            value = json.loads(text)
        except (UnicodeDecodeError, RecursionError) as e:
            reason = "is not UTF-8" if isinstance(e, UnicodeDecodeError) else "is nested too deeply"
            raise json.JSONDecodeError(f"the body {reason}", body.decode("utf-8", "replace"), 0) from e
        if _SURROGATE_ESCAPE.search(body) and _has_lone_surrogate(value):
            raise json.JSONDecodeError("a string has a lone UTF-16 surrogate (\\ud800-\\udfff), no Unicode text",
                                       text, 0)
        return value


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # what any surrogate, paired or lone, is written as in JSON


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if lone_surrogate(v) is not None:
                return True
        elif isinstance(v, dict):
            stack += v.keys()
            stack += v.values()
        elif isinstance(v, list):
            stack += v
    return False


_ERROR_DESCRIPTIONS = {
    400: "invalid request", 401: "missing or wrong API key (with --api-key)", 404: "unknown model or adapter",
    413: "body over --max-request-body-bytes", 503: "the server is full (with Retry-After) or its engine stopped",
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The errors a route can answer, for the OpenAPI schema (and so for client generators and fuzzers)."""
    return {s: {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[s]} for s in statuses}


_INFERENCE_ERRORS = _errors(400, 401, 404, 413, 503)


def build_app(engine_config: EngineConfig, core_address: str, core_info: CoreInfo, config: ServerConfig) -> FastAPI:
    """The app of one API-server process for the engine core at `core_address`."""
    models = ServedModels(config.served_model_names, str(engine_config.model), core_info.max_model_len,
                          config.lora_root)
    inputs = InputProcessor(engine_config, core_info.max_model_len)
    async_engine = AsyncEngine(core_address, inputs, config.max_in_flight(engine_config), models.apply)
    metrics = async_engine.metrics = ServerMetrics(models.name, lambda: async_engine.stats,
                                                   config.vllm_compatible_metrics)
    serving = OpenAIServing(async_engine, models, config.allowed_local_media_path,
                            config.allow_special_tokens_in_messages, config.log_requests, config.lora_resolver)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await async_engine.start()
        stats_task = None
        if config.log_stats:
            stats_task = asyncio.create_task(StatsLogger(lambda: async_engine.stats).run(async_engine.refresh_stats))
        yield
        if stats_task is not None:
            stats_task.cancel()
        await async_engine.stop()
        serving.close()

    app = FastAPI(title="VaLoRA", description="OpenAI-compatible multi-LoRA multimodal server",
                  lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = async_engine
    app.state.models = models
    v1 = APIRouter(prefix="/v1", route_class=_JSONRoute, responses=_errors(401) if config.api_key else {})

    @app.get("/health", responses={200: {"model": HealthStatus}, 503: {"model": HealthStatus}})
    async def health() -> Response:
        if async_engine.error is not None:
            return JSONResponse({"status": "engine stopped", "error": str(async_engine.error)}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.api_route("/ping", methods=["GET", "POST"], responses={200: {"model": HealthStatus},
                                                                503: {"model": HealthStatus}})
    async def ping() -> Response:
        """vLLM's (SageMaker's) liveness route: the same answer as /health."""
        return await health()

    @app.get("/version", response_model=VersionResponse)
    async def version():
        return VersionResponse(version=__version__)

    tokens = APIRouter(route_class=_JSONRoute)  # vLLM's paths, outside /v1

    @tokens.post("/tokenize", response_model=TokenizeResponse, responses=_errors(400, 404, 413))
    async def tokenize(body: TokenizeRequest):
        return await serving.tokenize(body)

    @tokens.post("/detokenize", response_model=DetokenizeResponse, responses=_errors(400, 404, 413))
    async def detokenize(body: DetokenizeRequest):
        return await serving.detokenize(body)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        await async_engine.refresh_stats()
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @v1.get("/models", response_model=ModelList)
    async def list_models():
        return models.cards()

    # a stream's events (OpenAPI 3.1: `schema` describes each one): `data` is a chunk, an error object, or [DONE]
    sse = {"text/event-stream": {"schema": {"type": "object", "required": ["data"], "properties": {
        "data": {"type": "string", "description": "a chunk or an error object as JSON, or [DONE] at the end"}}}}}

    @v1.post("/chat/completions", responses={200: {"model": ChatCompletionResponse, "content": sse},
                                              **_INFERENCE_ERRORS})
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        return _respond(await serving.chat(body, request.is_disconnected))

    @v1.post("/completions", responses={200: {"model": CompletionResponse, "content": sse}, **_INFERENCE_ERRORS})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return _respond(await serving.completion(body, request.is_disconnected))

    @v1.post("/classify", responses={200: {"model": ClassificationResponse}, **_INFERENCE_ERRORS})
    async def classify(body: ClassificationRequest, request: Request) -> Response:
        return _respond(await serving.classify(body, request.is_disconnected))

    @v1.post("/load_lora_adapter", response_class=PlainTextResponse, responses=_errors(400, 413, 503))
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> Response:
        lora = models.new_adapter(body.lora_name, body.lora_path)
        try:  # in the core, which tells every front end (this one included) before it answers
            await serving.load_adapter(lora)
        except (AdapterError, InputError) as e:
            raise adapter_load_failed(body.lora_name, e, "lora_path") from e
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @v1.post("/unload_lora_adapter", response_class=PlainTextResponse, responses=_errors(400, 404, 413, 503))
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> Response:
        if body.lora_name not in models.adapters:
            raise not_found(f"The adapter `{body.lora_name}` is not loaded", "adapter_not_found", "lora_name")
        try:  # new requests for it are refused from now on, by the core and by every front end
            gone = await async_engine.client.call("unload_lora", body.lora_name)
        except (AdapterError, InputError) as e:
            raise bad_request(f"cannot unload adapter {body.lora_name!r}: {e}", "adapter_unload_failed",
                              "lora_name") from e
        later = "" if gone else " (it leaves memory once the requests using it finish)"
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.{later}")

    app.include_router(v1)
    app.include_router(tokens)
    app.add_middleware(BodySizeLimit, max_bytes=config.max_body_bytes)
    if config.api_key is not None:  # added last, so it runs first
        app.add_middleware(APIKeyAuth, api_key=config.api_key)
    _install_error_handlers(app, config)
    app.openapi = lambda: _openapi(app, secured=config.api_key is not None)
    return app


def _openapi(app: FastAPI, secured: bool) -> dict:
    """FastAPI's schema, made to say what the server does: no 422 (validation errors are OpenAI's 400), errors
    always JSON (also on the plain-text routes), the bearer scheme on `/v1` when a key is required, and an id of
    its own for each method of a route of several (FastAPI gives them all the first method's, and warns)."""
    if app.openapi_schema is None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Duplicate Operation ID", UserWarning)
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
        ids = Counter(op["operationId"] for ops in schema["paths"].values() for op in ops.values())
        error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
        for path, operations in schema["paths"].items():
            for method, op in operations.items():
                if ids[op["operationId"]] > 1:  # "<name><path>_<first method>" -> "<name><path>_<method>"
                    op["operationId"] = f"{op['operationId'].rsplit('_', 1)[0]}_{method}"
                op["responses"].pop("422", None)
                for status, response in op["responses"].items():
                    if status[0] in "45":
                        response["content"] = error
                if secured and path.startswith("/v1/"):
                    op["security"] = [{"bearer": []}]
        components = schema.setdefault("components", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.get("schemas", {}).pop(unused, None)
        if secured:
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        app.openapi_schema = schema
    return app.openapi_schema


def _log(method: str, path: str, err: APIError) -> None:
    logger.info("%s %s %d %s: %s", method, path, err.status, err.code, err.message)


def _respond(result) -> Response:
    if isinstance(result, AsyncIterator):
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    headers = {"X-Request-Id": result.id}
    if result.metrics is not None and result.metrics.queue_time is not None:
        headers["X-Queue-Time"] = f"{result.metrics.queue_time:.6f}"
    return JSONResponse(result.model_dump(mode="json"), headers=headers)


def _served_paths(app: FastAPI) -> list[str]:
    """The OpenAI-style endpoints `app` answers, from its (cached) schema: what a 404 for an unknown path lists."""
    return sorted(path for path in app.openapi()["paths"] if path.startswith("/v1/"))


def _install_error_handlers(app: FastAPI, config: ServerConfig) -> None:
    def log(request: Request, err: APIError) -> JSONResponse:
        _log(request.method, request.url.path, err)
        return err.response()

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return log(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            reason = errors[0].get("ctx", {}).get("error") or errors[0].get("msg")
            return log(request, bad_request(f"request body is not valid JSON: {reason}", "invalid_json"))
        parts = []
        for e in errors:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {e.get('msg')}")
        first = errors[0].get("loc", ()) if errors else ()
        param = str(first[1]) if len(first) > 1 else None
        return log(request, bad_request("; ".join(parts), "invalid_value", param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 413:  # from BodySizeLimit, mid-body: the rest is not worth reading
            err = _too_large(config.max_body_bytes)
            _log(request.method, request.url.path, err)
            return err.response(close=True)
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":  # no route matched: say what is served instead
            detail = (f"{request.url.path} is not an endpoint of this server; it serves "
                      f"{', '.join(_served_paths(app))} (the API is described at /openapi.json)")
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return log(request, APIError(exc.status_code, detail, code, headers=exc.headers))  # 405 keeps its Allow

    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, exc: QueueFullError):
        return log(request, APIError(503, f"The server is busy: {exc}. Retry later.", "queue_full",
                                     headers={"Retry-After": str(config.retry_after_s)}))

    @app.exception_handler(EngineDeadError)
    async def engine_dead(request: Request, exc: EngineDeadError):
        return log(request, APIError(503, str(exc), "engine_dead"))

    @app.exception_handler(ClientDisconnectedError)
    async def disconnected(request: Request, exc: ClientDisconnectedError):
        return Response(status_code=499)  # nobody reads it; the request was aborted and logged

    @app.exception_handler(AdapterNotLoadedError)
    async def adapter_gone(request: Request, exc: AdapterNotLoadedError):
        # resolved while it was loaded, refused by the core: it was unloaded while the request was prepared
        return log(request, not_found(f"{exc}; it was unloaded", "model_not_found", "model"))

    async def engine_refused(request: Request, exc: ValueError):
        # refused by the input processor or the core after the server's own checks (a call that never fits)
        code, param = getattr(exc, "code", None), getattr(exc, "param", None)
        return log(request, bad_request(str(exc), code or "invalid_request", param))

    app.add_exception_handler(InputError, engine_refused)
    app.add_exception_handler(AdapterError, engine_refused)
