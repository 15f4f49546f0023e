"""A soak: many greedy requests through the HTTP server while an operator drops and restores
replicas back to back and some clients disconnect mid-stream; every answer is checked
against an uninterrupted single-device run, and at the end no block may be left in use.

What is counted (`SoakReport`): requests tried; answered 2xx, 4xx, 5xx; lost (no answer: a
connection error or a request that outlived `request_timeout_s`); mismatched (a 200 whose text
is not the reference's); clients that disconnected on purpose; transitions carried out and
refused (a drop or restore the cluster declined, e.g. while another ran); and blocks still
in use once the load is gone. tests/bench/test_soak.py runs a short one; benchmarks/soak.py the long.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import uvicorn

from kunserve.cluster.cluster import Cluster
from kunserve.cluster.config import CoordinatorConfig
from kunserve.config import EngineConfig
from kunserve.llm import LLM
from kunserve.sampling_params import SamplingParams
from kunserve.server.api_server import ServerConfig, build_app

logger = logging.getLogger(__name__)

HTTP_OK, HTTP_CLIENT_ERROR, HTTP_SERVER_ERROR = 200, 400, 500
EVENTS_BEFORE_DISCONNECT = 2  # a disconnecting client reads this many events, then hangs up
SERVER_START_S = 60.0  # how long the in-process server may take to listen
POLL_S = 0.05  # how often the end of the load is looked for


@dataclass
class SoakSettings:
    requests: int = 5000
    concurrency: int = 16  # requests in flight at once
    disconnect_every: int = 7  # every n-th request streams and disconnects after two events (0: none)
    # The operator asks for a drop, then a restore, and so on, each time this many more requests
    # have been answered: the transitions follow the load, however fast the machine.
    transition_every: int = 40
    max_tokens: int = 16
    num_prompts: int = 24  # distinct prompts (each with its reference text), cycled through
    replicas: int = 2
    request_timeout_s: float = 120.0  # a request unanswered this long counts as lost
    idle_timeout_s: float = 60.0  # after the load, how long the cluster may take to free every block


@dataclass
class SoakReport:
    tried: int = 0
    ok: int = 0
    client_errors: int = 0  # 4xx
    server_errors: int = 0  # 5xx
    lost: int = 0
    mismatched: int = 0
    disconnected: int = 0
    transitions: int = 0  # drops and restores carried out
    transitions_refused: int = 0
    answered: int = 0  # requests that ended, however
    blocks_in_use_after: int = 0  # summed over replicas (and groups) once the load is gone
    duration_s: float = 0.0
    errors: list[str] = field(default_factory=list)  # the first few messages of 5xx and lost requests

    def table(self) -> str:
        rows = [(name, value) for name, value in dataclasses.asdict(self).items() if name != "errors"]
        return "\n".join(f"{name:>22}  {value:.1f}" if isinstance(value, float) else f"{name:>22}  {value}"
                         for name, value in rows)


def soak_prompts(vocab_size: int, count: int) -> list[list[int]]:
    """`count` distinct token-id prompts of varied lengths."""
    return [[(7 * i + 13 * j + 5) % vocab_size for j in range(4 + (i * 11) % 60)] for i in range(count)]


def run_soak(config: EngineConfig, settings: SoakSettings) -> SoakReport:
    """The soak on a cluster of `settings.replicas` replicas of `config` (operator transitions
    only: the recompute policy, so what the operator asks is all that changes)."""
    reference_llm = LLM(**dataclasses.asdict(config))
    if reference_llm.engine.tokenizer is None:
        raise ValueError("model: the soak compares texts, so the model needs a tokenizer")
    prompts = soak_prompts(reference_llm.engine.spec.vocab_size, settings.num_prompts)
    params = SamplingParams(temperature=0.0, max_tokens=settings.max_tokens, ignore_eos=True)
    reference = [out.outputs[0].text for out in reference_llm.generate(prompts, params, use_tqdm=False)]
    reference_llm.engine.shutdown()
    cluster = Cluster.launch(config, settings.replicas, "least_loaded", None, CoordinatorConfig("recompute"))
    with serving(cluster) as url:
        report = asyncio.run(_soak(url, cluster, settings, prompts, reference))
    return report


@contextlib.contextmanager
def serving(cluster: Cluster) -> Iterator[str]:
    """The cluster behind the HTTP server on a loopback port, in a thread; yields its URL."""
    server = uvicorn.Server(uvicorn.Config(build_app(cluster, ServerConfig()), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + SERVER_START_S
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the soak's server did not start")
        time.sleep(POLL_S)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()


async def _soak(url: str, cluster: Cluster, settings: SoakSettings, prompts: list[list[int]],
                reference: list[str]) -> SoakReport:
    report = SoakReport()
    began = time.monotonic()
    progress = asyncio.Condition()
    limits = httpx.Limits(max_connections=settings.concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=settings.request_timeout_s, limits=limits) as client:
        operator = asyncio.create_task(_operate(client, settings, report, progress))
        gate = asyncio.Semaphore(settings.concurrency)
        await asyncio.gather(*(_one(client, gate, i, settings, prompts, reference, report, progress)
                               for i in range(settings.requests)))
        operator.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await operator
        if (await client.post("/v1/cluster/restore", json={})).status_code == HTTP_OK:  # a group left over
            report.transitions += 1
    report.blocks_in_use_after = await asyncio.to_thread(_blocks_in_use_when_idle, cluster, settings.idle_timeout_s)
    report.duration_s = time.monotonic() - began
    return report


async def _one(client: httpx.AsyncClient, gate: asyncio.Semaphore, i: int, settings: SoakSettings,
               prompts: list[list[int]], reference: list[str], report: SoakReport, progress: asyncio.Condition
               ) -> None:
    body = {"prompt": prompts[i % len(prompts)], "max_tokens": settings.max_tokens, "temperature": 0,
            "ignore_eos": True}
    disconnects = settings.disconnect_every and i % settings.disconnect_every == settings.disconnect_every - 1
    async with gate:
        report.tried += 1
        try:
            if disconnects:
                await _disconnect_after_events(client, body, report)
            else:
                _check(await client.post("/v1/completions", json=body), reference[i % len(prompts)], report)
        except httpx.HTTPError as error:
            report.lost += 1
            _note(report, f"lost: {error!r}")
    async with progress:
        report.answered += 1
        progress.notify_all()


async def _disconnect_after_events(client: httpx.AsyncClient, body: dict, report: SoakReport) -> None:
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        if response.status_code != HTTP_OK:
            _count_status(response.status_code, report)
            return
        events = 0
        async for line in response.aiter_lines():
            events += line.startswith("data:")
            if events >= EVENTS_BEFORE_DISCONNECT:
                break
    report.ok += 1
    report.disconnected += 1


def _check(response: httpx.Response, expected: str, report: SoakReport) -> None:
    """A greedy answer must be the reference's text (the same tokens, detokenized alike)."""
    if response.status_code != HTTP_OK:
        _count_status(response.status_code, report)
        _note(report, f"{response.status_code}: {response.text[:200]}")
        return
    report.ok += 1
    text = response.json()["choices"][0]["text"]
    if text != expected:
        report.mismatched += 1
        _note(report, f"mismatch: {text!r} instead of {expected!r}")


def _count_status(status: int, report: SoakReport) -> None:
    if status >= HTTP_SERVER_ERROR:
        report.server_errors += 1
    elif status >= HTTP_CLIENT_ERROR:
        report.client_errors += 1


def _note(report: SoakReport, message: str, keep: int = 10) -> None:
    if len(report.errors) < keep:
        report.errors.append(message)


async def _operate(client: httpx.AsyncClient, settings: SoakSettings, report: SoakReport,
                   progress: asyncio.Condition) -> None:
    """Ask for a drop, then a restore, then a drop... each time `transition_every` more requests
    have been answered, while the others keep coming (cancelled when the load is over)."""
    for mark, kind in zip(itertools.count(settings.transition_every, settings.transition_every),
                          itertools.cycle(("drop", "restore"))):
        async with progress:
            while report.answered < mark:
                await progress.wait()
        answer = await client.post(f"/v1/cluster/{kind}", json={})
        if answer.status_code == HTTP_OK:
            report.transitions += 1
        else:
            report.transitions_refused += 1
            _note(report, f"{kind} refused: {answer.text[:200]}")


def _blocks_in_use_when_idle(cluster: Cluster, timeout_s: float) -> int:
    """Blocks in use once every replica is idle (or when `timeout_s` has passed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        engines = {id(e): e for e in map(cluster.coordinator.runner.engine_of, range(len(cluster.engines)))}.values()
        idle = not any(e.has_unfinished_requests() for e in engines)
        in_use = sum(e.block_manager.num_total_blocks - e.block_manager.num_free_blocks for e in engines)
        if (idle and in_use == 0) or time.monotonic() > deadline:
            return in_use
        time.sleep(POLL_S)
