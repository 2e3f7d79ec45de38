"""The FastAPI application: routes, API-key check, body-size limit and OpenAI-shaped errors.

`build_app` takes a ready `LLMEngine`; the engine thread starts with the app and stops with it.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from valora.engine.llm_engine import LLMEngine
from valora.lora.adapter import AdapterError
from valora.multimodal.inputs import InputError
from valora.server.async_engine import AsyncEngine, ClientDisconnectedError, EngineDeadError, QueueFullError
from valora.server.errors import APIError, bad_request, not_found
from valora.server.metrics import CONTENT_TYPE, ServerMetrics
from valora.server.models import ServedModels
from valora.server.protocol import (
    ChatCompletionRequest,
    ClassificationRequest,
    CompletionRequest,
    LoadLoRAAdapterRequest,
    UnloadLoRAAdapterRequest,
)
from valora.server.serving import OpenAIServing

logger = logging.getLogger("valora.server")


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


class BodySizeLimit:
    """Refuses request bodies over `max_bytes` with 413 before the app parses them (chunked bodies too)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_large = declared is not None and declared.isdigit() and int(declared) > self.max_bytes
        body, messages = 0, []
        while not too_large:
            message = await receive()
            messages.append(message)
            body += len(message.get("body", b""))
            too_large = body > self.max_bytes
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        if too_large:
            err = APIError(413, f"request body is over the limit of {self.max_bytes} bytes", "request_too_large")
            logger.info("%s %s 413 request_too_large", scope["method"], scope["path"])
            return await err.response()(scope, receive, send)

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def build_app(engine: LLMEngine, config: ServerConfig) -> FastAPI:
    """Loads `config.lora_modules` into `engine` (an adapter that cannot be served raises `AdapterError`)."""
    models = ServedModels(config.served_model_names, str(engine.config.model), engine.max_model_len,
                          config.lora_root)
    for name, path in config.lora_modules:
        lora = models.new_adapter(name, path, confine=False)  # operator-given paths are trusted
        engine.add_lora(lora)
        models.adapters[name] = lora
    async_engine = AsyncEngine(engine, config.max_queued_requests, admit=models.check_served)
    metrics = async_engine.metrics = ServerMetrics(models.name, lambda: async_engine.stats)
    serving = OpenAIServing(async_engine, models, config.allowed_local_media_path)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        yield
        async_engine.stop()
        serving.close()

    app = FastAPI(title="VaLoRA", description="OpenAI-compatible multi-LoRA multimodal server",
                  lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = async_engine
    app.state.models = models

    def check_api_key(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), config.api_key.encode()):
            raise APIError(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'", "invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @app.get("/health")
    async def health() -> Response:
        if async_engine.error is not None:
            return JSONResponse({"status": "engine stopped", "error": str(async_engine.error)}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @v1.get("/models")
    async def list_models():
        return models.cards()

    @v1.post("/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        return _respond(await serving.chat(body, request.is_disconnected))

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        return _respond(await serving.completion(body, request.is_disconnected))

    @v1.post("/classify")
    async def classify(body: ClassificationRequest, request: Request):
        return _respond(await serving.classify(body, request.is_disconnected))

    @v1.post("/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> Response:
        lora = models.new_adapter(body.lora_name, body.lora_path)

        def load(engine: LLMEngine) -> None:  # on the engine thread, so no request sees a half-loaded name
            if lora.lora_name in models.adapters:
                raise AdapterError(f"the name {lora.lora_name!r} was taken by a concurrent load")
            engine.add_lora(lora)
            models.adapters[lora.lora_name] = lora

        try:
            await async_engine.call(load)
        except (AdapterError, InputError) as e:
            raise bad_request(f"failed to load adapter {body.lora_name!r}: {e}", "adapter_load_failed",
                              "lora_path") from e
        logger.info("loaded adapter %s from %s", lora.lora_name, lora.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{lora.lora_name}' added successfully.")

    @v1.post("/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> Response:
        if body.lora_name not in models.adapters:
            raise not_found(f"The adapter `{body.lora_name}` is not loaded", "adapter_not_found", "lora_name")

        def unload(engine: LLMEngine) -> bool:
            gone = engine.remove_lora(body.lora_name)
            del models.adapters[body.lora_name]  # new requests for it are refused from now on
            return gone

        try:
            gone = await async_engine.call(unload)
        except (AdapterError, InputError) as e:
            raise bad_request(f"cannot unload adapter {body.lora_name!r}: {e}", "adapter_unload_failed",
                              "lora_name") from e
        later = "" if gone else " (it leaves memory once the requests using it finish)"
        logger.info("unloaded adapter %s%s", body.lora_name, later)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.{later}")

    app.include_router(v1)
    app.add_middleware(BodySizeLimit, max_bytes=config.max_body_bytes)
    _install_error_handlers(app, config)
    return app


def _respond(result) -> Response:
    if isinstance(result, AsyncIterator):
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    headers = {"X-Request-Id": result.id}
    if result.metrics is not None and result.metrics.queue_time is not None:
        headers["X-Queue-Time"] = f"{result.metrics.queue_time:.6f}"
    return JSONResponse(result.model_dump(mode="json"), headers=headers)


def _install_error_handlers(app: FastAPI, config: ServerConfig) -> None:
    def log(request: Request, err: APIError) -> JSONResponse:
        logger.info("%s %s %d %s: %s", request.method, request.url.path, err.status, err.code, err.message)
        return err.response()

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return log(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return log(request, bad_request(f"request body is not valid JSON: {errors[0].get('msg')}", "invalid_json"))
        parts = []
        for e in errors:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {e.get('msg')}")
        first = errors[0].get("loc", ()) if errors else ()
        param = str(first[1]) if len(first) > 1 else None
        return log(request, bad_request("; ".join(parts), "invalid_value", param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return log(request, APIError(exc.status_code, detail, "not_found" if exc.status_code == 404 else "http_error"))

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

    async def engine_refused(request: Request, exc: ValueError):
        # raised by the engine itself when a request passed the server's checks but not the engine's
        return log(request, bad_request(str(exc), "invalid_request"))

    app.add_exception_handler(InputError, engine_refused)
    app.add_exception_handler(AdapterError, engine_refused)
