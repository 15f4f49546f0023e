"""The OpenAI-compatible HTTP server: routes, API-key check, errors as OpenAI shapes them,
health and Prometheus metrics. The engine runs on its own thread (AsyncEngine)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

import kunserve
from kunserve.cluster.cluster import Cluster
from kunserve.cluster.coordinator import CoordinatorConfig
from kunserve.config import EngineConfig
from kunserve.server.metrics import ServerMetrics
from kunserve.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, DropRequest, RestoreRequest
from kunserve.server.serving import OpenAIServing

logger = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8000
    api_key: str | None = None  # when set, /v1/* requires `Authorization: Bearer <key>`
    served_model_names: list[str] = field(default_factory=list)  # empty: the model argument
    max_waiting_requests: int | None = None  # per replica; beyond it, 503 with Retry-After; None: no limit
    num_replicas: int = 1  # data-parallel replicas, each on its own device(s)
    dispatch_policy: str = "least_loaded"  # or "round_robin"
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)  # drop / restore policy
    retry_after_s: int = 1  # the Retry-After a 503 suggests
    log_level: str = "info"


def build_app(cluster: Cluster, config: ServerConfig) -> FastAPI:
    engine = cluster.first
    names = config.served_model_names or [engine.config.model or engine.model.name]
    metrics = ServerMetrics(names[0], CollectorRegistry())
    for index, replica in enumerate(cluster.engines):
        replica.stats_listener = metrics.for_engine(index).record_step
    metrics.replicas_alive.set_function(lambda: cluster.num_alive)
    metrics.watch_cluster(cluster.coordinator)
    serving = OpenAIServing(
        cluster, names, cluster.tokenizer, config.retry_after_s, metrics.requests_rejected_queue_full.inc
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
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
            raise APIError(401, "a valid API key is required: `Authorization: Bearer <key>`")

    authorized = [Depends(check_api_key)]

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serving.completions(body, request)

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await serving.chat(body, request)

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
    async def cluster_drop(body: DropRequest) -> dict:
        try:
            members = body.replicas or cluster.coordinator.default_drop_members()
            transition = await asyncio.to_thread(cluster.coordinator.drop, members, "operator")
        except ValueError as error:
            raise APIError(400, str(error), "replicas") from None
        return dataclasses.asdict(transition)

    @app.post("/v1/cluster/restore", dependencies=authorized)
    async def cluster_restore(body: RestoreRequest) -> dict:
        if not cluster.coordinator.groups:
            restore_after_s = cluster.coordinator.config.restore_after_s
            raise APIError(400, f"group: there is no pipeline group to restore (a group restores itself once its "
                                f"demand fits its replicas for --restore-after-s, {restore_after_s} s here)", "group")
        try:
            transition = await asyncio.to_thread(cluster.coordinator.restore, body.group, "operator")
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

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    _add_error_handlers(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        if first.get("type") == "json_invalid":
            api = APIError(400, f"malformed JSON body: {first.get('msg')}")
        else:
            param = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or None
            api = APIError(400, f"{param}: {first.get('msg')}", param)
        return JSONResponse(api.body(), status_code=400)

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
    logger.info("serving %s on http://%s:%d", cluster.first.model.name, config.host, config.port)
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
