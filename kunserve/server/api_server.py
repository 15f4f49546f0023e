"""The OpenAI-compatible HTTP server: routes, API-key check, errors as OpenAI shapes them,
health and Prometheus metrics. The engine runs on its own thread (AsyncEngine)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException

import kunserve
from kunserve.cluster.cluster import Cluster
from kunserve.cluster.config import CoordinatorConfig
from kunserve.cluster.runner import TransitionConflict
from kunserve.config import EngineConfig
from kunserve.server.limits import DEFAULT_MAX_REQUEST_BYTES
from kunserve.server.metrics import ServerMetrics
from kunserve.server.protocol import (
    APIError,
    Body,
    ChatCompletionRequest,
    CompletionRequest,
    DropRequest,
    RestoreRequest,
    parse_body,
)
from kunserve.server.serving import OpenAIServing

logger = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8000
    api_key: str | None = None  # when set, /v1/* requires `Authorization: Bearer <key>`
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # a larger request body is refused with 413
    metrics_need_key: bool = False  # /metrics, too, requires the API key
    served_model_names: list[str] = field(default_factory=list)  # empty: the model argument
    max_waiting_requests: int | None = None  # per replica; beyond it, 503 with Retry-After; None: no limit
    num_replicas: int = 1  # data-parallel replicas, each on its own device(s)
    dispatch_policy: str = "least_loaded"  # or "round_robin"
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)  # drop / restore policy
    retry_after_s: int = 1  # the Retry-After a 503 suggests
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes: must be >= 1, got {self.max_request_bytes}")
        if self.metrics_need_key and self.api_key is None:
            raise ValueError("metrics_need_key: needs an api_key to check")


def build_app(cluster: Cluster, config: ServerConfig) -> FastAPI:
    engine = cluster.first
    names = config.served_model_names or [engine.config.model or engine.model.name]
    metrics = ServerMetrics(names[0], CollectorRegistry())
    for index, replica in enumerate(cluster.engines):
        replica.stats_listener = metrics.for_engine(index).record_step
    metrics.replicas_alive.set_function(lambda: cluster.num_alive)
    metrics.watch_cluster(cluster.coordinator)
    serving = OpenAIServing(
        cluster, names, cluster.tokenizer, engine.max_model_len, config.retry_after_s,
        metrics.requests_rejected_queue_full.inc,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        cluster.start(asyncio.get_running_loop())
        yield
        cluster.shutdown()

    app = FastAPI(title="kunserve", version=kunserve.__version__, lifespan=lifespan)
    app.state.cluster = cluster
    app.state.metrics = metrics

    def check_api_key(request: Request) -> None:
        if config.api_key is None:
            return
        # The scheme is case-insensitive (RFC 9110); the key is compared as the bytes sent.
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        expected = config.api_key.encode()
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode("latin-1"), expected):
            raise APIError(401, "a valid API key is required: `Authorization: Bearer <key>`")

    authorized = [Depends(check_api_key)]

    async def parsed(request: Request, model: type[Body], empty_means_defaults: bool = False) -> Body:
        """The request's body as `model`, read within the size limit and parsed off the event
        loop (a large body would stall every other request and /health)."""
        body = await read_body(request, config.max_request_bytes)
        if empty_means_defaults and not body.strip():
            body = b"{}"
        return await asyncio.to_thread(parse_body, model, body)

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(request: Request) -> Response:
        return await serving.completions(await parsed(request, CompletionRequest), request)

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(request: Request) -> Response:
        return await serving.chat(await parsed(request, ChatCompletionRequest), request)

    @app.get("/v1/models", dependencies=authorized)
    async def models() -> dict:
        created = int(time.time())
        cards = [
            {"id": name, "object": "model", "created": created, "owned_by": "kunserve",
             "root": engine.config.model or engine.model.name, "max_model_len": engine.max_model_len}
            for name in names
        ]
        return {"object": "list", "data": cards}

    @app.get("/v1/cluster", dependencies=authorized)
    async def cluster_state() -> dict:
        return cluster.coordinator.describe()

    @app.post("/v1/cluster/drop", dependencies=authorized)
    async def cluster_drop(request: Request) -> dict:
        body = await parsed(request, DropRequest, empty_means_defaults=True)
        if body.replicas is not None:
            _check_replicas(body.replicas, len(cluster.replicas))
        try:
            members = body.replicas or cluster.coordinator.runner.default_drop_members()
            transition = await asyncio.to_thread(cluster.coordinator.runner.drop, members, "operator")
        except TransitionConflict as error:
            raise APIError(409, str(error), "replicas") from None
        except ValueError as error:
            raise APIError(400, str(error), "replicas") from None
        return dataclasses.asdict(transition)

    @app.post("/v1/cluster/restore", dependencies=authorized)
    async def cluster_restore(request: Request) -> dict:
        body = await parsed(request, RestoreRequest, empty_means_defaults=True)
        try:
            transition = await asyncio.to_thread(cluster.coordinator.runner.restore, body.group, "operator")
        except TransitionConflict as error:
            raise APIError(409, str(error), "group") from None
        except ValueError as error:
            raise APIError(400, str(error), "group") from None
        except RuntimeError as error:
            raise APIError(503, f"restore not possible now: {error}") from None
        return dataclasses.asdict(transition)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if cluster.is_alive else 503)

    @app.get("/version")
    async def version() -> dict:
        return {"version": kunserve.__version__}

    @app.get("/metrics", dependencies=authorized if config.metrics_need_key else [])
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    _add_error_handlers(app)
    _document_request_bodies(app)
    return app


# The bodies `parsed` reads (within the size limit, off the event loop): FastAPI documents only
# the bodies it parses itself, so their schemas are added to /openapi.json here.
REQUEST_BODIES: dict[str, tuple[type[BaseModel], bool]] = {  # path -> (its body, required)
    "/v1/completions": (CompletionRequest, True),
    "/v1/chat/completions": (ChatCompletionRequest, True),
    "/v1/cluster/drop": (DropRequest, False),
    "/v1/cluster/restore": (RestoreRequest, False),
}


def _document_request_bodies(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            refs, definitions = models_json_schema([(model, "validation") for model, _ in REQUEST_BODIES.values()],
                                                   ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(definitions["$defs"])
            for path, (model, required) in REQUEST_BODIES.items():
                schema["paths"][path]["post"]["requestBody"] = {
                    "required": required, "content": {"application/json": {"schema": refs[(model, "validation")]}}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body; APIError(413) as soon as it is known to exceed `limit` bytes, by its
    Content-Length or, streamed without one, by the bytes received so far."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than the server's limit of {limit} bytes (--max-request-bytes)")


def _check_replicas(replicas: list[int], num_replicas: int) -> None:
    """Refuse replica indices that do not exist or repeat, before the coordinator is asked."""
    outside = [r for r in replicas if not 0 <= r < num_replicas]
    if outside:
        raise APIError(400, f"replicas: {outside[:5]} are not replicas of this cluster [0, {num_replicas})", "replicas")
    repeated = sorted(r for r, times in Counter(replicas).items() if times > 1)
    if repeated:
        raise APIError(400, f"replicas: {repeated[:5]} named more than once", "replicas")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        # Routing's errors (404 unknown path, 405 wrong method with its Allow header).
        api = APIError(error.status_code, str(error.detail), headers=error.headers)
        return JSONResponse(api.body(), status_code=api.status, headers=api.headers)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error while serving a request")
        return JSONResponse(APIError(500, f"internal error: {error!r}").body(), status_code=500)


def run_server(engine_config: EngineConfig, config: ServerConfig) -> None:
    # The port first: one in use fails now, not after the model has loaded.
    sock = bind_port(config.host, config.port)
    cluster = Cluster.launch(engine_config, config.num_replicas, config.dispatch_policy, config.max_waiting_requests,
                             config.coordinator)
    app = build_app(cluster, config)
    # The bound port: with --port 0 the system chose it, and this line is how one learns it.
    logger.info("serving %s on http://%s:%d", cluster.first.model.name, config.host, sock.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level))
    server.run(sockets=[sock])


def bind_port(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) for the server to listen on (as uvicorn binds one:
    SO_REUSEADDR, so a port left in TIME_WAIT by a previous server is taken). Raises
    ValueError naming the port when something else holds it."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ValueError(f"port: cannot listen on {host}:{port} ({error.strerror}); stop what uses it or pass "
                         "another --port") from None
    return sock
