"""Replicas behind Ray Serve: N copies of `valora serve` (each an engine core process and its front end), one
OpenAI-compatible front door that routes every request by its adapter
(docs/distributed.md#replicas-behind-ray-serve).

- `valora-engine` replicas run the server's own app in-process (serving/asgi.py) and get requests forwarded to
  it unchanged, so errors, streams and headers are exactly the single server's. Adapters are loaded on demand
  through `serve.multiplexed`: the first request for an adapter on a replica loads it there, at most
  `--max-cpu-loras` are held (the least recently used one is let go, and unloaded once no request uses it), and
  Ray Serve's router sends a request to a replica that holds its adapter (the less loaded of two), and otherwise,
  or when every holder is full, to one holding the fewest adapters. A replica takes `--max-num-seqs` requests at
  a time (`max_ongoing_requests`); more wait in Ray's router for the first free one. Its health is its engine
  core's.
- `valora-openai` (the ingress) owns the served names and the adapter registry (`--lora-modules`, runtime loads,
  `--enable-lora-resolver`): it answers `/v1/models`, checks the API key and body size, resolves each request's
  `model`, and forwards the rest. A request whose replica is lost (its actor, or its engine core) before any byte
  of its response was sent (a whole answer, or a stream's first event) is sent again, to another replica, for up
  to a minute while the deployment recovers; a stream that had started ends with an error event, as the single
  server's does when its engine stops.
- `/metrics` is every replica's, each series labelled `replica` (replicas publish theirs to the ingress every
  2 s), plus `valora:adapter_affinity_requests_total{resident}` per replica (requests
  that found their adapter already loaded on their replica) and the ingress's `valora:request_retries_total`.

`valora serve MODEL --data-parallel-size N [flags]` runs it (serving/cli.py); `serve run
valora.serving.ray:build_app model=MODEL data-parallel-size=N [flag=value ...]` deploys the same app on a running
Ray cluster.

(No postponed annotations here: FastAPI reads the ingress handlers' through Ray Serve's class wrapper. The ingress
app is pickled when its class is decorated: what its handlers call is defined above it.)
"""

import asyncio
import functools
import hmac
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

from fastapi import FastAPI, Request
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from valora.config import EngineConfig
from valora.lora.request import LoRARequest
from valora.server.app import ServerConfig
from valora.server.app import build_app as build_server_app
from valora.server.errors import APIError, bad_request
from valora.server.launch import start_core
from valora.server.metrics import CONTENT_TYPE
from valora.server.models import ServedModels
from valora.serving.asgi import AsgiApp, Forwarded, Head
from valora.serving.metrics import merge

logger = logging.getLogger("valora.serving")

APP = "valora"
INGRESS = "valora-openai"
PUBLISH_S = 2.0  # how often a replica publishes its /metrics
RETRY_FOR_S = 60.0  # how long a request whose replica was lost is sent again, while the deployment recovers
REPLICA_LOST = (RayActorError, ActorUnavailableError)


class _Held:
    """What `serve.multiplexed` keeps for an adapter loaded on a replica. Ray calls (and awaits) `__del__` when it
    lets the adapter go; it is set on the instance, so the garbage collector never calls it."""

    def __init__(self, release: Callable[[], Awaitable[None]]) -> None:
        self.__del__ = release


class _LoadFailed(Exception):
    def __init__(self, head: Head, body: bytes) -> None:
        super().__init__(body.decode(errors="replace"))
        self.head, self.body = head, body


def replica_class(max_adapters: int) -> type:
    """The engine replica holding at most `max_adapters` adapters (`serve.multiplexed` takes its bound when the
    class is defined)."""

    class Replica:
        async def __init__(self, engine: EngineConfig, config: ServerConfig) -> None:
            # the ingress checks keys, confines paths and resolves names: the replica serves what it is given
            self.config = replace(config, lora_modules=[], api_key=None, lora_root=None, lora_resolver=False,
                                  api_server_count=1)
            self.core = start_core(engine, self.config)
            await asyncio.to_thread(self.core.wait_ready)
            self.app = AsgiApp(build_server_app(engine, self.core.address, self.core.info, self.config))
            await self.app.start()
            context = serve.get_replica_context()
            self.id, self.app_name = context.replica_id.unique_id, context.app_name
            self.registrations: dict[str, tuple[str, str]] = {}  # adapter id -> (name, path)
            self.loaded: dict[str, str] = {}  # adapter name -> the id it is loaded under
            self.in_use: Counter[str] = Counter()  # adapter id -> requests using it
            self.released: set[str] = set()  # let go while in use: unloaded when its last request ends
            self.resident = {"true": 0, "false": 0}  # requests by whether their adapter was already loaded here
            self._adapter_ops = asyncio.Lock()
            self.stopping = False
            self._publisher = asyncio.create_task(self._publish())

        async def __del__(self) -> None:
            self.stopping = True  # serve.multiplexed lets every adapter go next: nothing to unload then
            self._publisher.cancel()
            await self.app.stop()
            self.core.stop()

        def check_health(self) -> None:
            if not self.core.alive:
                raise RuntimeError("the engine core stopped")

        def info(self) -> dict:
            return {"max_model_len": self.core.info.max_model_len}

        async def forward(self, request: Forwarded, adapter: tuple[str, str] | None
                          ) -> AsyncIterator[Head | bytes]:
            """The server's answer to `request`, as it comes; `adapter` (name, path) is loaded here first."""
            if adapter is None:
                async for part in self.app.request(request):
                    yield part
                return
            adapter_id = serve.get_multiplexed_model_id()
            self.resident[str(self.loaded.get(adapter[0]) == adapter_id).lower()] += 1
            self.registrations[adapter_id] = adapter
            self.in_use[adapter_id] += 1
            try:
                try:
                    await self.adapter(adapter_id)
                except _LoadFailed as e:
                    yield e.head
                    yield e.body
                    return
                if request.path == "/v1/load_lora_adapter":  # the load was the request
                    yield Head(200, [(b"content-type", b"text/plain; charset=utf-8")])
                    yield f"Success: LoRA adapter '{adapter[0]}' added successfully.".encode()
                    return
                async for part in self.app.request(request):
                    yield part
            finally:
                self.in_use[adapter_id] -= 1
                if not self.in_use[adapter_id]:
                    del self.in_use[adapter_id]
                    if adapter_id in self.released:
                        await self._unload(adapter_id)

        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def adapter(self, adapter_id: str) -> _Held:
            name, path = self.registrations[adapter_id]
            async with self._adapter_ops:
                if self.loaded.get(name) == adapter_id:  # let go while in use, and wanted again: still here
                    self.released.discard(adapter_id)
                else:
                    if name in self.loaded:  # an older registration under this name: replaced
                        await self._call("/v1/unload_lora_adapter", {"lora_name": name})
                    head, body = await self._call("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
                    if head.status != 200:
                        raise _LoadFailed(head, body)
                    self.loaded[name] = adapter_id
            return _Held(functools.partial(self._release, adapter_id))

        async def _release(self, adapter_id: str) -> None:
            if self.stopping:
                return
            if self.in_use[adapter_id]:
                self.released.add(adapter_id)
            else:
                await self._unload(adapter_id)

        async def _unload(self, adapter_id: str) -> None:
            self.released.discard(adapter_id)
            name, _ = self.registrations[adapter_id]
            async with self._adapter_ops:
                if self.loaded.get(name) == adapter_id:
                    del self.loaded[name]
                    await self._call("/v1/unload_lora_adapter", {"lora_name": name})

        async def _call(self, path: str, body: dict) -> tuple[Head, bytes]:
            parts = [p async for p in self.app.request(Forwarded("POST", path, headers=[
                (b"content-type", b"application/json")], body=json.dumps(body).encode()))]
            return parts[0], b"".join(parts[1:])

        async def _publish(self) -> None:
            """This replica's /metrics to the ingress, every PUBLISH_S (the ingress is bound to the replicas, so
            they reach it by name)."""
            ingress = serve.get_deployment_handle(INGRESS, self.app_name)
            while True:
                try:
                    parts = [p async for p in self.app.request(Forwarded("GET", "/metrics"))]
                    text = b"".join(parts[1:]).decode() + _counter(
                        "valora:adapter_affinity_requests", "Requests by whether their adapter was already loaded "
                        "on their replica.", {f'resident="{k}"': v for k, v in self.resident.items()})
                    await ingress.publish.remote(self.id, text)
                except Exception as e:  # the ingress (re)starting: the next round publishes again
                    logger.debug("replica %s could not publish its metrics: %s", self.id, e)
                await asyncio.sleep(PUBLISH_S)

    return Replica


def _counter(name: str, help_text: str, samples: dict[str, int]) -> str:
    """One counter family in Prometheus text: `samples` maps label text (or "") to its value."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
    lines += [f"{name}_total{{{labels}}} {value}" if labels else f"{name}_total {value}"
              for labels, value in samples.items()]
    return "\n".join(lines) + "\n"


def _engine_stopped(head: Head, first: bytes) -> bool:
    """Whether a replica answered that its engine core has stopped (the replica is being replaced)."""
    if head.status != 503:
        return False
    try:
        return json.loads(first)["error"]["code"] == "engine_dead"
    except (ValueError, KeyError, TypeError):
        return False


def _forwarded(request: Request, body: bytes) -> Forwarded:
    return Forwarded(request.method, request.url.path, request.url.query.encode(),
                     [(k, v) for k, v in request.headers.raw if k.lower() != b"host"], body)


def _event_stream(head: Head) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in head.headers)


def _respond(head: Head, body: bytes | AsyncIterator[bytes]) -> Response:
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in head.headers}
    if isinstance(body, bytes):
        return Response(body, status_code=head.status, headers=headers)
    return StreamingResponse(body, status_code=head.status, headers=headers)


web = FastAPI(title="VaLoRA replicas", docs_url=None, redoc_url=None, openapi_url=None)  # /openapi.json: a replica's
web.add_exception_handler(APIError, lambda _request, e: e.response())


@serve.ingress(web)
class Ingress:
    async def __init__(self, replicas, engine: EngineConfig, config: ServerConfig) -> None:
        self.replicas, self.config = replicas, config
        self.published: dict[str, tuple[float, str]] = {}  # replica -> (when, its /metrics text)
        info = await replicas.info.remote()
        self.models = ServedModels(config.served_model_names, str(engine.model), info["max_model_len"],
                                   config.lora_root)
        for name, path in config.lora_modules:  # operator-given paths are trusted
            self.models.adapters[name] = self.models.new_adapter(name, path, confine=False)
        self._resolving: dict[str, asyncio.Future] = {}
        self.retries = 0

    def _refused(self, request: Request, body: bytes) -> Response | None:
        """The server's API key (on /v1) and body size checks, made here: replicas see only what passed."""
        key = self.config.api_key
        if key is not None and request.url.path.startswith("/v1"):
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), key.encode()):
                return APIError(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'",
                                "invalid_api_key", headers={"WWW-Authenticate": "Bearer"}).response()
        if len(body) > self.config.max_body_bytes:
            return APIError(413, f"request body is over the limit of {self.config.max_body_bytes} bytes",
                            "request_too_large").response()
        return None

    @staticmethod
    def _json(body: bytes) -> dict:
        try:
            parsed = json.loads(body)
        except ValueError as e:
            raise bad_request(f"request body is not valid JSON: {e}", "invalid_json") from e
        return parsed if isinstance(parsed, dict) else {}

    @web.get("/v1/models")
    async def list_models(self, request: Request) -> Response:
        return self._refused(request, b"") or JSONResponse(self.models.cards().model_dump())

    @web.get("/metrics")
    async def metrics(self) -> Response:
        now = time.monotonic()  # a replica that stopped publishing has gone
        texts = {r: text for r, (t, text) in sorted(self.published.items()) if now - t < 3 * PUBLISH_S}
        own = _counter("valora:request_retries", "Times a request was sent again because its replica was lost "
                       "before answering.", {"": self.retries})
        return Response(merge(texts) + own, media_type=CONTENT_TYPE)

    def publish(self, replica: str, text: str) -> None:
        """A replica's latest /metrics (called by each replica through its handle, not over HTTP)."""
        self.published[replica] = (time.monotonic(), text)

    @web.post("/v1/load_lora_adapter")
    async def load(self, request: Request) -> Response:
        body = await request.body()
        if refused := self._refused(request, body):
            return refused
        fields = self._json(body)
        lora = self.models.new_adapter(str(fields.get("lora_name", "")), str(fields.get("lora_path", "")))
        head, text = await self._load_adapter(lora)
        if head.status == 200:
            self.models.adapters[lora.lora_name] = lora
        return _respond(head, text)

    @web.post("/v1/unload_lora_adapter")
    async def unload(self, request: Request) -> Response:
        body = await request.body()
        if refused := self._refused(request, body):
            return refused
        name = self._json(body).get("lora_name")
        if name not in self.models.adapters:
            return APIError(404, f"The adapter `{name}` is not loaded", "adapter_not_found", "lora_name").response()
        del self.models.adapters[name]  # replicas holding it let it go as others come (least recently used)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @web.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
    async def proxy(self, request: Request, path: str) -> Response:
        body = await request.body()
        if refused := self._refused(request, body):
            return refused
        lora = None
        if request.method == "POST" and body:
            try:
                model = json.loads(body).get("model")
            except (ValueError, AttributeError):
                model = None  # the replica's own parser says what is wrong with the body
            if isinstance(model, str):
                lora = await self._resolve(model)
        return _respond(*await self._send(_forwarded(request, body), lora))

    async def _resolve(self, model: str) -> LoRARequest | None:
        """As the single server resolves `model` (serving.py), adapters on first use included: loaded on one
        replica before the request goes, once however many requests name it at the same time."""
        try:
            return self.models.resolve(model)
        except APIError:
            lora = self.models.resolvable(model) if self.config.lora_resolver else None
            if lora is None:
                raise
        task = self._resolving.get(model)
        if task is None:
            task = self._resolving[model] = asyncio.ensure_future(self._load_adapter(lora))
            task.add_done_callback(lambda _: self._resolving.pop(model, None))
        head, text = await asyncio.shield(task)  # a waiter that goes away does not cancel the load for the others
        if head.status != 200:
            raise bad_request(f"failed to load adapter {model!r} from the adapter root: "
                              f"{text.decode(errors='replace')}", "adapter_load_failed", "model")
        self.models.adapters.setdefault(model, lora)
        return self.models.resolve(model)

    async def _load_adapter(self, lora: LoRARequest) -> tuple[Head, bytes]:
        """`lora` loaded on one replica (the one holding the fewest adapters): its answer, whole."""
        load = Forwarded("POST", "/v1/load_lora_adapter", headers=[(b"content-type", b"application/json")],
                         body=json.dumps({"lora_name": lora.lora_name, "lora_path": lora.lora_path}).encode())
        head, text = await self._send(load, lora)
        assert isinstance(text, bytes)  # a load answers plain text or an error object, never an event stream
        return head, text

    async def _send(self, request: Forwarded, lora: LoRARequest | None
                    ) -> tuple[Head, bytes | AsyncIterator[bytes]]:
        """`request` on a replica (one holding `lora` if any): its head and its body, whole, or for an event stream
        the events to come. Until the whole body, or a stream's first event, is here nothing has reached the client:
        a replica lost before then is replaced by another."""
        adapter_id = f"{lora.lora_name}@{lora.lora_int_id}" if lora is not None else ""  # a reload: a new id
        adapter = (lora.lora_name, lora.lora_path) if lora is not None else None
        deadline = time.monotonic() + RETRY_FOR_S
        while True:
            stream = self.replicas.options(stream=True, multiplexed_model_id=adapter_id).forward.remote(
                request, adapter)
            try:
                head = await anext(stream)
                first = await anext(stream, b"")
                if _engine_stopped(head, first):
                    lost = "its engine core stopped"
                elif _event_stream(head):
                    break
                else:
                    return head, first + b"".join([part async for part in stream])
            except REPLICA_LOST as e:
                lost = type(e).__name__
            if time.monotonic() > deadline:
                raise APIError(503, f"no replica could serve the request ({lost})", "replicas_unavailable",
                               headers={"Retry-After": "1"})
            self.retries += 1
            logger.warning("replica lost before it answered (%s); sending the request again", lost)
            await asyncio.sleep(0.5)

        async def events() -> AsyncIterator[bytes]:
            done = False
            try:
                yield first
                async for part in stream:
                    yield part
                done = True
            except REPLICA_LOST as e:
                done = True
                logger.warning("replica lost while streaming (%s): the stream ends with an error", type(e).__name__)
                error = APIError(503, "the replica serving this request stopped", "replica_lost").body()
                yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()
            finally:
                if not done:  # the client left: the replica's app sees it go and aborts the request
                    stream.cancel()

        return head, events()


def application(engine: EngineConfig, config: ServerConfig, replicas: int):
    """The Ray Serve app: `replicas` engines (each with one CPU, and its tensor-parallel GPUs) and the ingress."""
    device = str(engine.device or "auto")
    on_gpu = device.startswith("cuda") or (device == "auto" and _cuda())
    engines = serve.deployment(
        replica_class(engine.lora.max_cpu_loras or engine.lora.max_loras), name="valora-engine",
        num_replicas=replicas, max_ongoing_requests=engine.scheduler.max_num_seqs, health_check_period_s=1,
        health_check_timeout_s=30, graceful_shutdown_wait_loop_s=0.5, graceful_shutdown_timeout_s=5,
        ray_actor_options={"num_cpus": 1, "num_gpus": engine.tensor_parallel_size if on_gpu else 0},
    ).bind(engine, config)
    ingress = serve.deployment(Ingress, name=INGRESS, max_ongoing_requests=100_000,
                               ray_actor_options={"num_cpus": 0})
    return ingress.bind(engines, engine, config)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def start(engine: EngineConfig, config: ServerConfig, replicas: int, host: str, port: int,
          keep_alive_s: float) -> None:
    """Ray (the cluster at $RAY_ADDRESS, else a new local one), Serve's HTTP proxy on host:port, and the app,
    returning once every replica is ready."""
    import ray

    ray.init(ignore_reinit_error=True, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port, "keep_alive_timeout_s": keep_alive_s})
    serve.run(application(engine, config, replicas), name=APP, route_prefix="/")


def stop() -> None:
    """The app deleted, and this process's Ray stopped (a local cluster with it)."""
    import ray

    serve.delete(APP)
    ray.shutdown()


def build_app(args: dict[str, str]):
    """`serve run valora.serving.ray:build_app model=DIR data-parallel-size=N flag=value ...`: the flags of
    `valora serve` without their dashes (`flag=true` for one that takes no value)."""
    from valora.server.cli import checked_configs
    from valora.serving.cli import parse_serve_args

    args = dict(args)
    argv = [str(args.pop("model"))]
    for key, value in args.items():
        argv += [f"--{key}"] if str(value).lower() == "true" else [f"--{key}", *str(value).split()]
    ns = parse_serve_args(argv)
    engine, config = checked_configs(ns)
    return application(engine, config, ns.data_parallel_size)
