"""Which executor runs a model: the one place that knows the concrete kinds, so the engine
sees only `Executor` (in-process for one device, worker processes, or Ray actors)."""

from __future__ import annotations

import threading

from kunserve.config import EngineConfig
from kunserve.executor.base import Executor
from kunserve.executor.in_process import InProcessExecutor
from kunserve.executor.multiproc import MultiprocExecutor
from kunserve.executor.rendezvous import Rendezvous
from kunserve.model.presets import ResolvedModel
from kunserve.worker.protocol import WorkerWorld
from kunserve.worker.worker import build_worker


def build_executor(config: EngineConfig, model: ResolvedModel, world: WorkerWorld | None = None,
                   stop: threading.Event | None = None) -> Executor:
    """The executor `config.distributed_executor_backend` names; `world`: its place among a
    cluster's workers (cluster_rendezvous), None for an engine alone; `stop`: once set, a start
    of worker processes is called off (StartCancelled)."""
    backend = config.resolve_executor_backend()
    if backend == "uni":
        return InProcessExecutor(build_worker(config, model, (0, model.spec.num_layers), config.resolve_device()))
    if backend == "ray":
        from kunserve.executor.ray_executor import RayExecutor  # ray: an optional extra

        return RayExecutor(config, model, world, stop)
    return MultiprocExecutor(config, model, world, stop)


def cluster_rendezvous(config: EngineConfig) -> Rendezvous:
    """Where the workers of a cluster's replicas meet to link to each other: a store in this
    driver, at an address every worker reaches (this host's loopback, or under Ray this node's
    address). Each replica takes its global ranks from it (`Rendezvous.world`), a restarted
    one new ranks."""
    if config.resolve_executor_backend() == "ray":
        from kunserve.executor.ray_executor import driver_address  # ray: an optional extra

        return Rendezvous(config.worker_timeout_s, driver_address(config))
    return Rendezvous(config.worker_timeout_s)
