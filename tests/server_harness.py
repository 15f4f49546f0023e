"""A kunserve server for tests: on an ephemeral loopback port in a background thread, or in
process behind Starlette's TestClient (the real app and engine, no sockets: fast enough for
thousands of requests)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import uvicorn
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from kunserve import EngineConfig
from kunserve.cluster.cluster import Cluster
from kunserve.server.api_server import ServerConfig, build_app

MAX_MODEL_LEN = 256
WAIT_S = 30.0  # a liveness bound for things the server does in the background, not a timing


class RunningServer:
    def __init__(self, model_dir: Path, server: ServerConfig, **engine_args: object) -> None:
        config = EngineConfig(**{"model": str(model_dir), "max_model_len": MAX_MODEL_LEN, **engine_args})
        self.cluster = Cluster.launch(config, server.num_replicas, server.dispatch_policy, server.max_waiting_requests,
                                      server.coordinator)
        self.engine = self.cluster.first
        app = build_app(self.cluster, server)
        self.metrics = app.state.metrics
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        wait_until(lambda: self._server.started, "the server to start")
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join()


class InProcessServer:
    """The app on a real cluster, driven through `client` (a started TestClient: the lifespan
    ran, so the engine loops are up); `stop` shuts the cluster down."""

    def __init__(self, model_dir: Path, server: ServerConfig, **engine_args: object) -> None:
        config = EngineConfig(model=str(model_dir), max_model_len=engine_args.pop("max_model_len", MAX_MODEL_LEN),
                              **engine_args)
        self.cluster = Cluster.launch(config, server.num_replicas, server.dispatch_policy, server.max_waiting_requests,
                                      server.coordinator)
        self.engine = self.cluster.first
        # Server errors come back as responses (500s), as a client would see them.
        self.client = TestClient(build_app(self.cluster, server), raise_server_exceptions=False)
        self.client.__enter__()

    def stop(self) -> None:
        self.client.__exit__(None, None, None)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def scrape(server: RunningServer, engine: int | None = None) -> dict[str, float]:
    """Every sample of /metrics by name and labels, summed over replicas (or replica `engine`'s
    alone): `name{label="v",...}` -> value."""
    text = httpx.get(f"{server.url}/metrics").text
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if engine is not None and s.labels.get("engine") != str(engine):
                continue
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()) if k not in ("model_name", "engine"))
            key = f"{s.name}{{{labels}}}"
            samples[key] = samples.get(key, 0.0) + s.value
    return samples


def process_gone(pid: int) -> bool:
    """Whether process `pid` has exited (a zombie not yet reaped by its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True
