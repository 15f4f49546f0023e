"""N data-parallel replicas of one model behind a dispatcher. Each replica is an engine with
its own scheduler and block manager, its own devices (one, or a pipeline group of g) and its
own loop thread; a replica whose worker dies fails its own requests and leaves the rest
serving."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from concurrent.futures import ThreadPoolExecutor

from transformers import PreTrainedTokenizerBase

from kunserve.cluster.config import CoordinatorConfig
from kunserve.cluster.coordinator import Coordinator
from kunserve.cluster.dispatcher import Dispatcher, NoReplicaError
from kunserve.cluster.links import Links, replica_device
from kunserve.cluster.policies.registry import policy_class
from kunserve.config import EngineConfig
from kunserve.engine.async_engine import AsyncEngine, EngineDeadError, RequestStream
from kunserve.engine.llm_engine import Clock, LLMEngine, PromptInput
from kunserve.executor.factory import build_executor, cluster_worlds
from kunserve.model.presets import resolve_model
from kunserve.sampling_params import SamplingParams
from kunserve.worker.protocol import DeviceCalls

logger = logging.getLogger(__name__)


def replica_configs(config: EngineConfig, num_replicas: int) -> list[EngineConfig]:
    """Replica i's engine config: on CUDA, devices [i·d, (i+1)·d) after `config.device` (d: its
    pipeline stages x tensor-parallel ranks); several replicas always run in worker processes
    (or Ray actors), whose CPU threads share the cores."""
    if num_replicas < 1:
        raise ValueError(f"replicas: must be >= 1, got {num_replicas}")
    if num_replicas == 1:
        return [config]
    g = config.devices_per_replica
    device = config.resolve_device()
    threads = config.worker_threads
    if device.type != "cuda" and threads is None:
        threads = max(1, (os.cpu_count() or 1) // (num_replicas * g))
    backend = "ray" if config.resolve_executor_backend() == "ray" else "mp"
    return [
        dataclasses.replace(
            config,
            device=str(config.stage_device(i * g)),
            distributed_executor_backend=backend,
            worker_threads=threads,
        )
        for i in range(num_replicas)
    ]


class Cluster:
    def __init__(
        self,
        engines: list[LLMEngine],
        dispatch_policy: str = "least_loaded",
        max_waiting_requests: int | None = None,
        coordinator: CoordinatorConfig | None = None,
    ) -> None:
        if not engines:
            raise ValueError("replicas: a cluster needs at least one engine")
        self.engines = engines  # each replica's own engine (a group runs its members' requests)
        self.clock: Clock = time.monotonic  # what the coordinator times overloads by
        self.wall_clock: Clock = time.time  # what transitions are stamped with
        streams: dict[str, RequestStream] = {}  # shared: a request's stream, whichever loop runs it
        self.replicas = [AsyncEngine(engine, max_waiting_requests, streams) for engine in engines]
        for replica in self.replicas:
            replica.peers = self.replicas
        self.dispatcher = Dispatcher(dispatch_policy)
        self.links = Links()
        self.coordinator = Coordinator(self, coordinator or CoordinatorConfig())

    @classmethod
    def launch(
        cls,
        config: EngineConfig,
        num_replicas: int = 1,
        dispatch_policy: str = "least_loaded",
        max_waiting_requests: int | None = None,
        coordinator: CoordinatorConfig | None = None,
    ) -> Cluster:
        coordinator = coordinator or CoordinatorConfig()
        preemption_mode = policy_class(coordinator.overload_policy).preemption_mode
        if config.preemption_mode != preemption_mode:
            logger.info("overload policy %r: preemption_mode=%r", coordinator.overload_policy, preemption_mode)
            config = dataclasses.replace(config, preemption_mode=preemption_mode)
        configs = replica_configs(config, num_replicas)
        logger.info("starting %d replica(s)", num_replicas)
        model = resolve_model(config.model)
        worlds = cluster_worlds(config, num_replicas)
        # Replicas start side by side (they also meet in one world): most of a start is
        # the workers loading weights.
        with ThreadPoolExecutor(len(configs)) as pool:
            futures = [pool.submit(lambda c, w: LLMEngine(c, build_executor(c, model, w)), c, w)
                       for c, w in zip(configs, worlds)]
        errors = [error for f in futures if (error := f.exception()) is not None]
        engines = [f.result() for f in futures if f.exception() is None]
        if errors:
            for engine in engines:
                engine.shutdown()
            raise errors[0]
        return cls(engines, dispatch_policy, max_waiting_requests, coordinator)

    def open_links(self, members: list[int] | None = None) -> None:
        """Open the links between these replicas' devices (all when None), once per pair, so a
        drop or migration copies device to device at once (kunserve/cluster/links.py), and
        prepare every stage they may become (stage models, CUDA graphs captured), so a drop
        finds them ready. Only when a transition needs them, or before serving: a worker
        holding a dead peer's mapped arena hangs. The replicas' engine loops must be paused
        (or not started)."""
        indices = list(range(len(self.engines))) if members is None else members
        self.links.open({i: self.engines[i].executor for i in indices})
        sizes = self.coordinator.runner.group_sizes(len(indices))
        for i in indices:
            replica_device(self.engines[i].executor, "open_links").call(0, DeviceCalls.prepare_stages, sizes)

    def run_together(self, transitions: list[Callable[[], object]]) -> None:
        """Run transitions of disjoint replicas side by side (each mostly waits on its own
        devices); once all have ended, raise the first one's error, if any."""
        if len(transitions) <= 1:
            for transition in transitions:
                transition()
            return
        with ThreadPoolExecutor(len(transitions), thread_name_prefix="kunserve-transition") as pool:
            futures = [pool.submit(transition) for transition in transitions]
        errors = [error for future in futures if (error := future.exception()) is not None]
        if errors:
            raise errors[0]

    # ---- what the server sees ---------------------------------------------------------------

    @property
    def first(self) -> LLMEngine:
        return self.engines[0]

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        return self.first.tokenizer

    @property
    def is_alive(self) -> bool:
        return any(replica.is_alive for replica in self.replicas)

    @property
    def num_alive(self) -> int:
        return sum(replica.is_alive for replica in self.replicas)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        for replica in self.replicas:
            replica.start(loop)
        self.coordinator.start()

    def shutdown(self) -> None:
        self.coordinator.stop()
        for replica in self.replicas:
            replica.stop()
        for engine in self.engines:  # all workers at once: they leave one shared world
            engine.executor.request_shutdown()
        for engine in self.engines:
            engine.shutdown()

    def add_requests(
        self, request_ids: Seq[str], prompts: Seq[PromptInput], params: Seq[SamplingParams]
    ) -> RequestStream:
        """Queue the requests on one replica, chosen by the dispatcher (see AsyncEngine)."""
        try:
            index = self.dispatcher.choose([replica.kv_load() for replica in self.replicas])
        except NoReplicaError as error:
            raise EngineDeadError(str(error)) from None
        return self.replicas[index].add_requests(request_ids, prompts, params)
