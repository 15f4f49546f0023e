"""Which executor runs a model: the one place that knows the concrete kinds, so the engine
sees only `Executor` (in-process for one device, worker processes, or Ray actors)."""

from __future__ import annotations

import dataclasses

from kunserve.config import EngineConfig
from kunserve.executor.base import Executor
from kunserve.executor.in_process import InProcessExecutor
from kunserve.executor.multiproc import MultiprocExecutor
from kunserve.executor.worker_set import free_port
from kunserve.model.presets import ResolvedModel
from kunserve.worker.protocol import WorkerWorld
from kunserve.worker.worker import build_worker


def build_executor(config: EngineConfig, model: ResolvedModel, world: WorkerWorld | None = None) -> Executor:
    """The executor `config.distributed_executor_backend` names; `world`: the cluster's shared
    torch.distributed world (cluster_worlds), None for an engine alone."""
    backend = config.resolve_executor_backend()
    if backend == "uni":
        return InProcessExecutor(build_worker(config, model, (0, model.spec.num_layers), config.resolve_device()))
    if backend == "ray":
        from kunserve.executor.ray_executor import RayExecutor  # ray: an optional extra

        return RayExecutor(config, model, world)
    return MultiprocExecutor(config, model, world)


def cluster_worlds(config: EngineConfig, num_replicas: int) -> list[WorkerWorld | None]:
    """Each replica's place in the one torch.distributed world of all of a cluster's devices
    (replica i's devices, g stages of t ranks, are ranks [i·g·t, (i+1)·g·t)); [None] for a
    single replica."""
    if num_replicas == 1:
        return [None]
    g = config.devices_per_replica
    size = num_replicas * g
    if config.resolve_executor_backend() == "ray":
        from kunserve.executor.ray_executor import ray_world  # ray: an optional extra

        world = ray_world(config, size)
    else:
        world = WorkerWorld(f"tcp://127.0.0.1:{free_port()}", size)
    return [dataclasses.replace(world, first_rank=i * g) for i in range(num_replicas)]
