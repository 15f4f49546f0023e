"""N data-parallel replicas of one model behind a dispatcher. Each replica is an engine with
its own scheduler and block manager, its own devices (one, or a pipeline group of g) and its
own loop thread. A replica whose worker dies, fails or hangs fails the requests whose state
was on it, hands those that never started to the others, and restarts on new workers
(kunserve/cluster/recovery.py) while the rest serve on."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
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
from kunserve.cluster.recovery import Recovery
from kunserve.config import EngineConfig
from kunserve.engine.async_engine import AsyncEngine, EngineDeadError, RequestStream
from kunserve.engine.llm_engine import Clock, LLMEngine, PromptInput
from kunserve.engine.sequence import Sequence
from kunserve.executor.base import Executor, WorkerExecutor
from kunserve.executor.factory import build_executor, cluster_rendezvous
from kunserve.executor.rendezvous import Rendezvous
from kunserve.executor.workers import StartCancelled
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
        rendezvous: Rendezvous | None = None,
    ) -> None:
        """`rendezvous`: where the replicas' workers meet to link (kept as long as the cluster:
        restarted replicas' workers meet there too); None where they never link."""
        if not engines:
            raise ValueError("replicas: a cluster needs at least one engine")
        self.engines = engines  # each replica's own engine (a group runs its members' requests)
        self.rendezvous = rendezvous
        self.clock: Clock = time.monotonic  # what the coordinator times overloads by
        self.wall_clock: Clock = time.time  # what transitions are stamped with
        streams: dict[str, RequestStream] = {}  # shared: a request's stream, whichever loop runs it
        self.replicas = [AsyncEngine(engine, max_waiting_requests, streams) for engine in engines]
        for replica in self.replicas:
            replica.peers = self.replicas
            replica.on_failure = self._replica_failed
        self.dispatcher = Dispatcher(dispatch_policy)
        self._dispatch_lock = threading.Lock()  # requests arrive on the event loop, and from failed loops
        self.links = Links()
        self.coordinator = Coordinator(self, coordinator or CoordinatorConfig())
        self.recovery = Recovery(self)
        self._stopping = False
        self._engines_lock = threading.Lock()  # a restart's new engines against a shutdown
        self._starting: set[Executor] = set()  # a restart's new executors, preparing their stages

    @classmethod
    def launch(
        cls,
        config: EngineConfig,
        num_replicas: int = 1,
        dispatch_policy: str = "least_loaded",
        max_waiting_requests: int | None = None,
        coordinator: CoordinatorConfig | None = None,
        open_links: bool = True,
    ) -> Cluster:
        """`open_links`: link the replicas' devices before serving, so that the first drop or
        migration pays nothing (False: the first transition opens the links it needs, or the
        caller does, e.g. to time it)."""
        coordinator = coordinator or CoordinatorConfig()
        preemption_mode = policy_class(coordinator.overload_policy).preemption_mode
        if config.preemption_mode != preemption_mode:
            logger.info("overload policy %r: preemption_mode=%r", coordinator.overload_policy, preemption_mode)
            config = dataclasses.replace(config, preemption_mode=preemption_mode)
        configs = replica_configs(config, num_replicas)
        logger.info("starting %d replica(s)", num_replicas)
        model = resolve_model(config.model)
        rendezvous = cluster_rendezvous(config) if num_replicas > 1 else None
        worlds = [None if rendezvous is None else rendezvous.world(config.devices_per_replica, i)
                  for i in range(len(configs))]
        # Replicas start side by side: most of a start is the workers loading weights.
        with ThreadPoolExecutor(len(configs)) as pool:
            futures = [pool.submit(lambda c, w: LLMEngine(c, build_executor(c, model, w)), c, w)
                       for c, w in zip(configs, worlds)]
        errors = [error for f in futures if (error := f.exception()) is not None]
        engines = [f.result() for f in futures if f.exception() is None]
        if errors:
            for engine in engines:
                engine.shutdown()
            raise errors[0]
        cluster = cls(engines, dispatch_policy, max_waiting_requests, coordinator, rendezvous)
        if open_links and cluster.can_link():
            try:
                cluster.open_links()
            except BaseException:
                cluster.shutdown()
                raise
        return cluster

    def can_link(self) -> bool:
        """Whether the replicas' devices can link to each other: two or more replicas of one
        device each, whose devices take calls (drops and migrations need that)."""
        return len(self.engines) > 1 and all(
            isinstance(e.executor, WorkerExecutor) and e.executor.num_stages == 1 for e in self.engines)

    def open_links(self, members: list[int] | None = None) -> None:
        """Open the links between these replicas' devices (all when None), once per pair, so a
        drop or migration copies device to device at once (kunserve/cluster/links.py), and
        prepare every stage they may become (stage models, CUDA graphs captured), so a drop
        finds them ready. A transition opens those it needs (those of a restarted replica's new
        workers, whose stages `new_engine` prepared). The replicas' engine loops must be paused
        (or not started)."""
        indices = list(range(len(self.engines))) if members is None else members
        self.links.open({i: self.engines[i].executor for i in indices})
        for i in indices:
            self._prepare_stages(self.engines[i].executor, len(indices), "open_links")

    def _prepare_stages(self, executor: Executor, num_replicas: int, purpose: str) -> None:
        """Have a replica's device build every stage it may become in groups of `num_replicas`."""
        sizes = self.coordinator.runner.group_sizes(num_replicas)
        replica_device(executor, purpose).call(0, DeviceCalls.prepare_stages, sizes)

    # ---- failures --------------------------------------------------------------------------

    def _replica_failed(self, loop: AsyncEngine, error: BaseException, unstarted: list[Sequence]) -> None:
        """A replica's loop went down: its requests that never started run elsewhere (or on it
        once it is back, when no replica serves), and it restarts."""
        for seq in unstarted:
            with self._dispatch_lock:
                try:
                    target = self.replicas[self.dispatcher.choose([r.kv_load() for r in self.replicas])]
                except NoReplicaError:
                    target = loop
            target.adopt_unstarted([seq])
        self.recovery.replica_failed(self.replicas.index(loop), error)

    def new_engine(self, index: int, stop: threading.Event | None = None) -> LLMEngine:
        """Replica `index`'s engine on new workers (its old ones failed): the same config and
        model, weights loaded again, new global ranks, every stage it may become prepared (its
        links open at the next transition that needs them); StartCancelled once `stop` is set."""
        failed = self.engines[index]
        config = failed.config
        world = None if self.rendezvous is None else self.rendezvous.world(config.devices_per_replica, index)
        executor = build_executor(config, failed.model, world, stop)
        if self.can_link():  # its stages ready before it serves, as at launch: a drop never builds them
            self._prepare_new_stages(executor)
        return LLMEngine.replacing(failed, executor)

    def _prepare_new_stages(self, executor: Executor) -> None:
        """`_prepare_stages` of a restart's new executor, which a shutdown meanwhile stops
        (StartCancelled): preparing takes seconds on a GPU (graph capture)."""
        with self._engines_lock:
            if not self._stopping:
                self._starting.add(executor)
        try:
            if self._stopping:
                raise StartCancelled("called off before its stages were prepared")
            self._prepare_stages(executor, len(self.engines), "restart")
        except BaseException as error:
            executor.shutdown()
            if self._stopping and not isinstance(error, StartCancelled):
                raise StartCancelled("called off while its stages were prepared") from error
            raise
        finally:
            with self._engines_lock:
                self._starting.discard(executor)

    def revive(self, engines: dict[int, LLMEngine]) -> bool:
        """Put these replicas (by index, held by the caller, their loops down) back in service
        on their new engines; False, changing nothing, when the cluster is shutting down."""
        with self._engines_lock:
            if self._stopping:
                return False
            for index, engine in engines.items():
                self.engines[index] = engine
                self.replicas[index].revive(engine)
        return True

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
        self.recovery.start()

    def shutdown(self) -> None:
        """Stop everything, a bounded time: the threads are told first, then the workers are
        stopped (those that do not exit within the grace are killed), which ends any wait on
        them; only then are the threads joined."""
        with self._engines_lock:
            self._stopping = True
            starting = list(self._starting)
        self.recovery.request_stop()
        self.coordinator.request_stop()
        for replica in self.replicas:
            replica.request_stop()
        for executor in [engine.executor for engine in self.engines] + starting:  # all workers at once
            executor.request_shutdown()
        for engine in self.engines:
            engine.shutdown()
        for executor in starting:
            executor.shutdown()
        for replica in self.replicas:
            replica.join()
        self.coordinator.stop()
        self.recovery.join()

    def add_requests(
        self, request_ids: Seq[str], prompts: Seq[PromptInput], params: Seq[SamplingParams]
    ) -> RequestStream:
        """Queue the requests on one replica, chosen by the dispatcher (see AsyncEngine)."""
        with self._dispatch_lock:
            try:
                index = self.dispatcher.choose([replica.kv_load() for replica in self.replicas])
            except NoReplicaError as error:
                raise EngineDeadError(str(error)) from None
            return self.replicas[index].add_requests(request_ids, prompts, params)
